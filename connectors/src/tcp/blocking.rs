//! Blocking authenticated streams: the same handshake ([`super::auth`]) and frames
//! ([`super::frame`]) as [`super::TcpLink`], on a plain [`std::net::TcpStream`], for callers that
//! run a thread per direction and treat a dropped connection as the end of the session (no
//! resend: the gateway fails what a lost worker held and reconnects as a new session).
//!
//! Bounds: a frame body is at most `max_frame`; the reader refuses a larger one from its header.
//! Flow control is the callers' bounded queues plus TCP's own back-pressure (a peer that stops
//! reading stops the writer in `write`).

use super::auth::{handshake, Authenticated, HelloParams, Role, Secret};
use super::frame::{read_frame_blocking, write_frame_blocking, FrameError, FrameType};
use super::{Limits, LinkError};
use std::io::{BufReader, BufWriter, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

const IO_BUF: usize = 256 << 10;

fn params(limits: &Limits, session: [u8; 16]) -> Result<HelloParams, LinkError> {
    let max_frame = u32::try_from(limits.max_frame)
        .map_err(|_| LinkError::BadLimits("max_frame must fit in u32"))?;
    Ok(HelloParams {
        window: limits.window.max(1),
        max_frame,
        session,
    })
}

/// Runs the handshake on a blocking stream (on a throwaway current-thread runtime).
fn authenticate(
    stream: TcpStream,
    role: Role,
    secret: &Secret,
    p: HelloParams,
    timeout: Duration,
) -> Result<(TcpStream, Authenticated), LinkError> {
    stream.set_nodelay(true)?;
    stream.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (stream, auth) = rt.block_on(async move {
        let mut s = tokio::net::TcpStream::from_std(stream)?;
        let auth = handshake(&mut s, role, secret, p, timeout).await?;
        Ok::<_, LinkError>((s.into_std()?, auth))
    })?;
    stream.set_nonblocking(false)?;
    Ok((stream, auth))
}

/// Connects to `addr` within `limits.connect_timeout` and proves knowledge of `secret` (and
/// checks the server's proof).
pub fn connect(addr: &str, secret: &Secret, limits: &Limits) -> Result<TcpStream, LinkError> {
    let mut last = None;
    let addrs = addr
        .to_socket_addrs()
        .map_err(|e| LinkError::Protocol(format!("cannot resolve `{addr}`: {e}")))?;
    for a in addrs {
        match TcpStream::connect_timeout(&a, limits.connect_timeout) {
            Ok(s) => {
                let mut session = [0u8; 16];
                rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut session);
                let p = params(limits, session)?;
                return authenticate(s, Role::Client, secret, p, limits.handshake_timeout)
                    .map(|(s, _)| s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                last = Some(LinkError::ConnectTimeout { addr: addr.into() })
            }
            Err(e) => last = Some(LinkError::Io(e)),
        }
    }
    Err(last.unwrap_or_else(|| LinkError::Protocol(format!("`{addr}` resolves to no address"))))
}

/// Authenticates a connection a listener accepted; a peer without the secret is refused.
pub fn accept(
    stream: TcpStream,
    secret: &Secret,
    limits: &Limits,
) -> Result<(TcpStream, Authenticated), LinkError> {
    let p = params(limits, [0; 16])?;
    authenticate(stream, Role::Server, secret, p, limits.handshake_timeout)
}

/// Sends data frames on an authenticated stream.
pub struct FrameWriter {
    w: BufWriter<TcpStream>,
    seq: u64,
    max_frame: usize,
}

impl FrameWriter {
    pub fn new(stream: TcpStream, max_frame: usize) -> Self {
        Self {
            w: BufWriter::with_capacity(IO_BUF, stream),
            seq: 0,
            max_frame,
        }
    }

    /// Writes one data frame and flushes it.
    pub fn send(&mut self, body: &[u8]) -> Result<(), FrameError> {
        self.seq += 1;
        write_frame_blocking(&mut self.w, FrameType::Data, self.seq, body, self.max_frame)?;
        self.w.flush()?;
        Ok(())
    }

    /// Shuts the connection down both ways (wakes the reading side too).
    pub fn shutdown(&self) {
        let _ = self.w.get_ref().shutdown(std::net::Shutdown::Both);
    }
}

/// Receives data frames from an authenticated stream.
pub struct FrameReader {
    r: BufReader<TcpStream>,
    next_seq: u64,
    max_frame: usize,
}

impl FrameReader {
    pub fn new(stream: TcpStream, max_frame: usize) -> Self {
        Self {
            r: BufReader::with_capacity(IO_BUF, stream),
            next_seq: 1,
            max_frame,
        }
    }

    /// Makes [`FrameReader::recv`] fail once `deadline` passes (`None`: wait for ever).
    pub fn set_deadline(&self, deadline: Option<std::time::Instant>) -> std::io::Result<()> {
        let timeout = deadline.map(|d| {
            d.saturating_duration_since(std::time::Instant::now())
                .max(Duration::from_millis(1))
        });
        self.r.get_ref().set_read_timeout(timeout)
    }

    /// The next frame's body; `Ok(None)` when the peer closed the connection cleanly. A frame
    /// out of sequence or of another type is a protocol error.
    pub fn recv(&mut self) -> Result<Option<Vec<u8>>, LinkError> {
        let Some(frame) = read_frame_blocking(&mut self.r, self.max_frame)? else {
            return Ok(None);
        };
        if frame.kind != FrameType::Data || frame.seq != self.next_seq {
            return Err(LinkError::Protocol(format!(
                "expected data frame {}, got {:?} {}",
                self.next_seq, frame.kind, frame.seq
            )));
        }
        self.next_seq += 1;
        Ok(Some(frame.body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn limits() -> Limits {
        Limits {
            max_frame: 1 << 20,
            ..Limits::default()
        }
    }

    #[test]
    fn authenticated_frames_cross_and_a_wrong_secret_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = std::thread::spawn(move || {
            let good = Secret::new("0123456789abcdef-good");
            // First peer has the wrong secret, second the right one.
            let (s, _) = listener.accept().unwrap();
            assert!(accept(s, &good, &limits()).is_err());
            let (s, _) = listener.accept().unwrap();
            let (s, auth) = accept(s, &good, &limits()).unwrap();
            assert_ne!(auth.peer_session, [0; 16]);
            let mut r = FrameReader::new(s.try_clone().unwrap(), 1 << 20);
            let mut w = FrameWriter::new(s, 1 << 20);
            while let Some(body) = r.recv().unwrap() {
                w.send(&body.iter().rev().copied().collect::<Vec<_>>())
                    .unwrap();
            }
        });
        assert!(connect(&addr, &Secret::new("0123456789abcdef-bad!"), &limits()).is_err());
        let s = connect(&addr, &Secret::new("0123456789abcdef-good"), &limits()).unwrap();
        let mut r = FrameReader::new(s.try_clone().unwrap(), 1 << 20);
        let mut w = FrameWriter::new(s, 1 << 20);
        for msg in [&b"abc"[..], b"", &vec![7u8; 300_000]] {
            w.send(msg).unwrap();
            let back = r.recv().unwrap().unwrap();
            assert_eq!(back, msg.iter().rev().copied().collect::<Vec<_>>());
        }
        assert!(matches!(
            w.send(&vec![0u8; (1 << 20) + 1]),
            Err(FrameError::Oversize { .. })
        ));
        w.shutdown();
        server.join().unwrap();
    }
}
