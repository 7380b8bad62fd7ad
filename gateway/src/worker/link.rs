//! One gateway ↔ worker connection, split into a sending and a receiving half, whatever carries
//! it. Each message is one encoded control message ([`omnistage_connectors::remote`]).
//!
//! - **Shared memory** (a child worker of this gateway, same host): each direction is a
//!   [`ShmSender`]/[`ShmReceiver`] pair — message bytes go through a sealed memfd ring mapped by
//!   both processes, and only a 24-byte descriptor (and an 8-byte acknowledgement back) crosses
//!   the private Unix socket. The worker opens two connections to the gateway's socket: the
//!   first carries gateway → worker messages, the second worker → gateway. The ring is
//!   [`RING_BYTES`]; pages are touched only as messages use them.
//! - **TCP** (a worker on another host): authenticated, checksummed frames
//!   ([`omnistage_connectors::tcp::blocking`]).

use super::MAX_FRAME;
use omnistage_connectors::shm::{ShmError, ShmReceiver, ShmSender};
use omnistage_connectors::tcp::blocking::{FrameReader, FrameWriter};
use std::os::unix::net::UnixStream;
use std::time::Instant;

/// Ring size of each direction of a shared-memory link: every message up to [`MAX_FRAME`] fits.
pub const RING_BYTES: usize = MAX_FRAME;

/// The sending half.
pub enum LinkWriter {
    Shm(ShmSender),
    Tcp(FrameWriter),
}

/// The receiving half.
pub enum LinkReader {
    Shm(ShmReceiver),
    Tcp(FrameReader),
}

/// The gateway's halves of a shared-memory link to a child worker: it creates the ring it sends
/// on over `to_worker` and maps the worker's ring from `from_worker`.
pub fn shm_gateway(
    to_worker: UnixStream,
    from_worker: UnixStream,
) -> Result<(LinkWriter, LinkReader), String> {
    let tx = ShmSender::over(to_worker, RING_BYTES).map_err(|e| e.to_string())?;
    let rx = ShmReceiver::over(from_worker).map_err(|e| e.to_string())?;
    Ok((LinkWriter::Shm(tx), LinkReader::Shm(rx)))
}

/// The worker's halves: `to_worker` is the first connection it made, `from_worker` the second.
pub fn shm_worker(
    to_worker: UnixStream,
    from_worker: UnixStream,
) -> Result<(LinkWriter, LinkReader), String> {
    let rx = ShmReceiver::over(to_worker).map_err(|e| e.to_string())?;
    let tx = ShmSender::over(from_worker, RING_BYTES).map_err(|e| e.to_string())?;
    Ok((LinkWriter::Shm(tx), LinkReader::Shm(rx)))
}

/// Both halves of an authenticated TCP stream.
pub fn tcp(stream: std::net::TcpStream) -> std::io::Result<(LinkWriter, LinkReader)> {
    let read = stream.try_clone()?;
    Ok((
        LinkWriter::Tcp(FrameWriter::new(stream, MAX_FRAME)),
        LinkReader::Tcp(FrameReader::new(read, MAX_FRAME)),
    ))
}

impl LinkWriter {
    /// Sends one message (blocks while the peer is [`RING_BYTES`] or a TCP window behind).
    pub fn send(&mut self, msg: &[u8]) -> Result<(), String> {
        match self {
            LinkWriter::Shm(tx) => tx.send_bytes(msg).map(|_| ()).map_err(|e| e.to_string()),
            LinkWriter::Tcp(w) => w.send(msg).map_err(|e| e.to_string()),
        }
    }

    /// Closes the connection both ways, which also ends the peer's reader.
    pub fn shutdown(&self) {
        match self {
            LinkWriter::Shm(tx) => tx.shutdown(),
            LinkWriter::Tcp(w) => w.shutdown(),
        }
    }
}

impl LinkReader {
    /// Runs `f` on the next message's bytes (in place for shared memory); `Ok(None)` when the
    /// peer closed the connection. With a `deadline`, gives up after it with an error.
    pub fn recv_with<T>(
        &mut self,
        deadline: Option<Instant>,
        f: impl FnOnce(&[u8]) -> T,
    ) -> Result<Option<T>, String> {
        match self {
            LinkReader::Shm(rx) => match rx.recv_with(deadline, |b| Ok(f(b))) {
                Ok(t) => Ok(Some(t)),
                // The control socket maps EOF and resets to `Disconnected`.
                Err(ShmError::Disconnected) => Ok(None),
                Err(e) => Err(e.to_string()),
            },
            LinkReader::Tcp(r) => {
                r.set_deadline(deadline).map_err(|e| e.to_string())?;
                let got = r.recv().map_err(|e| e.to_string())?;
                r.set_deadline(None).map_err(|e| e.to_string())?;
                Ok(got.map(|b| f(&b)))
            }
        }
    }
}
