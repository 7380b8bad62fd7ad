//! [`TcpLink`]: an authenticated, bounded, bidirectional frame link over TCP.
//!
//! **Bounds.** Flow control is by credit: a sender holds one permit of a `window`-sized semaphore
//! per data frame in flight and gets it back only when the peer *application* has consumed the
//! frame (`recv` returns it, then an `Ack` frame carrying the cumulative sequence number goes
//! back). A peer that stops reading therefore stops its sender after `window` frames, and memory
//! on both sides is bounded by about `window × max_frame` per direction (the receive queue holds
//! up to `2 × window` frames to absorb a reconnect; past that the reader stops and TCP
//! backpressure holds the peer).
//!
//! **Reconnects (client only).** A client link that loses its connection reconnects with
//! exponential back-off ([`super::Backoff`]), re-authenticates, and **resends every frame not yet
//! acknowledged**, in order, with its original sequence number. Delivery is at-least-once: a
//! frame the old server link consumed whose `Ack` was lost with the connection arrives again;
//! receivers dedupe on `(peer_session, seq)` ([`TcpLink::peer_session`], [`TcpLink::recv_frame`]),
//! since the client's session id and sequence numbers survive reconnects. A server link is one
//! connection: when it drops, the link fails, and [`TcpLink::unacknowledged`] lists the sequence
//! numbers it had sent that the client never confirmed. After `max_attempts` failed reconnects
//! the client fails the same way.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use rand::RngCore;
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinHandle;

use super::auth::{handshake, AuthError, HelloParams, Role, Secret};
use super::frame::{read_frame, write_frame, FrameError, FrameType};
use super::Limits;

const IO_BUF: usize = 256 << 10;

/// Why a link operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("connect to {addr} timed out")]
    ConnectTimeout { addr: String },
    #[error("authentication failed: {0}")]
    Auth(#[from] AuthError),
    #[error("framing error: {0}")]
    Frame(#[from] FrameError),
    #[error("payload of {len} bytes exceeds the link's max frame of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("invalid limits: {0}")]
    BadLimits(&'static str),
    #[error("protocol violation by the peer: {0}")]
    Protocol(String),
    #[error("link closed: {0}")]
    Closed(String),
}

struct Inbound {
    generation: u64,
    seq: u64,
    body: Vec<u8>,
}

#[derive(Default)]
struct State {
    next_seq: u64,
    /// Sent (or queued) data frames the peer has not acknowledged, in sequence order.
    unacked: VecDeque<(u64, Arc<Vec<u8>>)>,
    /// Cumulative ack to send: (connection generation, seq).
    ack_out: Option<(u64, u64)>,
    generation: u64,
    failed: Option<String>,
}

struct Shared {
    state: Mutex<State>,
    wake_writer: Notify,
    credits: Semaphore,
    max_frame: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means another thread panicked mid-update; the queue is still
        // structurally valid, so keep going rather than propagate the panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail(&self, why: String) {
        self.lock().failed.get_or_insert(why);
        self.credits.close();
    }

    fn closed_error(&self) -> LinkError {
        LinkError::Closed(
            self.lock()
                .failed
                .clone()
                .unwrap_or_else(|| "link dropped".into()),
        )
    }
}

/// An authenticated frame link; see the module docs for bounds and reconnect semantics.
pub struct TcpLink {
    shared: Arc<Shared>,
    inbound: tokio::sync::Mutex<mpsc::Receiver<Inbound>>,
    peer_session: [u8; 16],
    task: JoinHandle<()>,
}

impl Drop for TcpLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn check(limits: &Limits) -> Result<HelloParams, LinkError> {
    let max_frame = u32::try_from(limits.max_frame)
        .map_err(|_| LinkError::BadLimits("max_frame must fit in u32"))?;
    if limits.window == 0 || limits.window > 1 << 30 {
        return Err(LinkError::BadLimits("window must be between 1 and 2^30"));
    }
    Ok(HelloParams {
        window: limits.window,
        max_frame,
        session: [0; 16],
    })
}

async fn dial(
    addr: &str,
    secret: &Secret,
    limits: &Limits,
    p: HelloParams,
) -> Result<TcpStream, LinkError> {
    let mut s = match tokio::time::timeout(limits.connect_timeout, TcpStream::connect(addr)).await {
        Ok(s) => s?,
        Err(_) => return Err(LinkError::ConnectTimeout { addr: addr.into() }),
    };
    s.set_nodelay(true)?;
    handshake(&mut s, Role::Client, secret, p, limits.handshake_timeout).await?;
    Ok(s)
}

impl TcpLink {
    /// Connects to `addr`, authenticates with `secret`, and returns a link that reconnects on
    /// its own after the connection drops. The first connect is not retried.
    pub async fn connect(
        addr: impl Into<String>,
        secret: &Secret,
        limits: &Limits,
    ) -> Result<Self, LinkError> {
        let addr = addr.into();
        let mut p = check(limits)?;
        rand::rngs::OsRng.fill_bytes(&mut p.session);
        let stream = dial(&addr, secret, limits, p).await?;
        let (shared, tx, rx) = Self::parts(limits);
        let task_shared = shared.clone();
        let (secret, limits) = (secret.clone(), limits.clone());
        let task = tokio::spawn(async move {
            let shared = task_shared;
            let mut stream = stream;
            loop {
                let generation = {
                    let mut st = shared.lock();
                    st.generation += 1;
                    st.generation
                };
                let _ = run_connection(stream, generation, &shared, &tx).await;
                let mut delay = limits.reconnect.initial;
                let mut attempt = 0;
                stream = loop {
                    attempt += 1;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(limits.reconnect.max);
                    match dial(&addr, &secret, &limits, p).await {
                        Ok(s) => break s,
                        Err(e) if attempt >= limits.reconnect.max_attempts => {
                            shared.fail(format!(
                                "gave up reconnecting to {addr} after {attempt} attempts: {e}"
                            ));
                            return;
                        }
                        Err(_) => {}
                    }
                };
            }
        });
        Ok(Self::assemble(shared, rx, [0; 16], task))
    }

    /// Accepts one connection from `listener` and authenticates it. A peer that fails the
    /// handshake is disconnected and reported as the error; call again for the next peer.
    pub async fn accept(
        listener: &TcpListener,
        secret: &Secret,
        limits: &Limits,
    ) -> Result<Self, LinkError> {
        let p = check(limits)?;
        let (mut stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let auth = handshake(
            &mut stream,
            Role::Server,
            secret,
            p,
            limits.handshake_timeout,
        )
        .await?;
        let (shared, tx, rx) = Self::parts(limits);
        let task_shared = shared.clone();
        let task = tokio::spawn(async move {
            let shared = task_shared;
            shared.lock().generation = 1;
            let why = match run_connection(stream, 1, &shared, &tx).await {
                Ok(()) => "peer closed the connection".to_string(),
                Err(e) => e.to_string(),
            };
            shared.fail(why);
        });
        Ok(Self::assemble(shared, rx, auth.peer_session, task))
    }

    fn parts(limits: &Limits) -> (Arc<Shared>, mpsc::Sender<Inbound>, mpsc::Receiver<Inbound>) {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                next_seq: 1,
                ..State::default()
            }),
            wake_writer: Notify::new(),
            credits: Semaphore::new(limits.window as usize),
            max_frame: limits.max_frame,
        });
        let (tx, rx) = mpsc::channel(2 * limits.window as usize);
        (shared, tx, rx)
    }

    fn assemble(
        shared: Arc<Shared>,
        rx: mpsc::Receiver<Inbound>,
        peer_session: [u8; 16],
        task: JoinHandle<()>,
    ) -> Self {
        Self {
            shared,
            inbound: tokio::sync::Mutex::new(rx),
            peer_session,
            task,
        }
    }

    /// Queues `body` for the peer and returns its sequence number. Waits while `window` frames
    /// are unconsumed by the peer. On a client, a send during a reconnect is queued and goes out
    /// once the link is back.
    pub async fn send(&self, body: Vec<u8>) -> Result<u64, LinkError> {
        self.send_shared(Arc::new(body)).await
    }

    /// [`TcpLink::send`] for a buffer the caller keeps sharing (kept, not copied, until acked).
    pub async fn send_shared(&self, body: Arc<Vec<u8>>) -> Result<u64, LinkError> {
        if body.len() > self.shared.max_frame {
            return Err(LinkError::TooLarge {
                len: body.len(),
                max: self.shared.max_frame,
            });
        }
        let permit = self
            .shared
            .credits
            .acquire()
            .await
            .map_err(|_| self.shared.closed_error())?;
        permit.forget();
        let seq = {
            let mut st = self.shared.lock();
            let seq = st.next_seq;
            st.next_seq += 1;
            st.unacked.push_back((seq, body));
            seq
        };
        self.shared.wake_writer.notify_one();
        Ok(seq)
    }

    /// The next frame's body from the peer.
    pub async fn recv(&self) -> Result<Vec<u8>, LinkError> {
        self.recv_frame().await.map(|(_, body)| body)
    }

    /// The next frame from the peer with its sequence number (the peer's numbering; on a server
    /// link it continues across the client's reconnects). Consuming it returns a credit.
    pub async fn recv_frame(&self) -> Result<(u64, Vec<u8>), LinkError> {
        let mut inbound = self.inbound.lock().await;
        let Some(item) = inbound.recv().await else {
            return Err(self.shared.closed_error());
        };
        {
            // Still holding `inbound`, so concurrent receivers record acks in order.
            let mut st = self.shared.lock();
            if item.generation == st.generation {
                st.ack_out = Some((item.generation, item.seq));
            }
        }
        drop(inbound);
        self.shared.wake_writer.notify_one();
        Ok((item.seq, item.body))
    }

    /// The client's session id as seen by a server link (stable across the client's
    /// reconnects); all zero on a client link.
    pub fn peer_session(&self) -> [u8; 16] {
        self.peer_session
    }

    /// Sequence numbers sent (or queued) that the peer has not acknowledged yet. After a server
    /// link fails, these are the frames that may be lost.
    pub fn unacknowledged(&self) -> Vec<u64> {
        self.shared.lock().unacked.iter().map(|(s, _)| *s).collect()
    }

    /// How many times this (client) link has reconnected.
    pub fn reconnects(&self) -> u64 {
        self.shared.lock().generation.saturating_sub(1)
    }
}

/// Drives one authenticated connection until it ends: `Ok` on a clean close by the peer.
async fn run_connection(
    stream: TcpStream,
    generation: u64,
    shared: &Shared,
    inbound: &mpsc::Sender<Inbound>,
) -> Result<(), LinkError> {
    let (rd, wr) = stream.into_split();
    tokio::select! {
        r = read_loop(rd, generation, shared, inbound) => r,
        w = write_loop(wr, generation, shared) => w,
    }
}

async fn read_loop(
    rd: OwnedReadHalf,
    generation: u64,
    shared: &Shared,
    inbound: &mpsc::Sender<Inbound>,
) -> Result<(), LinkError> {
    let mut rd = BufReader::with_capacity(IO_BUF, rd);
    let mut last_seq = 0u64;
    loop {
        let Some(frame) = read_frame(&mut rd, shared.max_frame).await? else {
            return Ok(());
        };
        match frame.kind {
            FrameType::Data => {
                if frame.seq <= last_seq {
                    return Err(LinkError::Protocol(format!(
                        "data frame {} after {last_seq} (replayed or reordered)",
                        frame.seq
                    )));
                }
                last_seq = frame.seq;
                let item = Inbound {
                    generation,
                    seq: frame.seq,
                    body: frame.body,
                };
                if inbound.send(item).await.is_err() {
                    return Ok(()); // the link was dropped
                }
            }
            FrameType::Ack => {
                let released = {
                    let mut st = shared.lock();
                    if frame.seq >= st.next_seq {
                        return Err(LinkError::Protocol(format!(
                            "ack for unsent frame {}",
                            frame.seq
                        )));
                    }
                    let before = st.unacked.len();
                    while st.unacked.front().is_some_and(|(s, _)| *s <= frame.seq) {
                        st.unacked.pop_front();
                    }
                    before - st.unacked.len()
                };
                shared.credits.add_permits(released);
            }
            other => {
                return Err(LinkError::Protocol(format!(
                    "{other:?} frame after the handshake"
                )))
            }
        }
    }
}

async fn write_loop(wr: OwnedWriteHalf, generation: u64, shared: &Shared) -> Result<(), LinkError> {
    let mut wr = BufWriter::with_capacity(IO_BUF, wr);
    // Resend from the oldest unacknowledged frame: on a fresh link that is simply the first.
    let mut next_write = 0u64;
    loop {
        let (batch, ack) = {
            let mut st = shared.lock();
            let from = st.unacked.partition_point(|(s, _)| *s < next_write);
            let batch: Vec<_> = st.unacked.range(from..).cloned().collect();
            let ack = match st.ack_out.take() {
                Some((g, seq)) if g == generation => Some(seq),
                _ => None,
            };
            (batch, ack)
        };
        if batch.is_empty() && ack.is_none() {
            wr.flush().await?;
            shared.wake_writer.notified().await;
            continue;
        }
        for (seq, body) in batch {
            write_frame(&mut wr, FrameType::Data, seq, &body, shared.max_frame).await?;
            next_write = seq + 1;
        }
        if let Some(seq) = ack {
            write_frame(&mut wr, FrameType::Ack, seq, &[], 0).await?;
        }
    }
}
