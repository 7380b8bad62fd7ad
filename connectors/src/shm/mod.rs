//! Shared-memory transport between processes on one host.
//!
//! A producer ([`ShmSender`]) and a consumer ([`ShmReceiver`]) share one segment — a sealed
//! `memfd` (fallback: a 0600 `/dev/shm` file unlinked as soon as it is opened) — and one Unix
//! stream socket:
//!
//! - **Setup**: the producer creates the segment and sends its descriptor with `SCM_RIGHTS` in a
//!   hello frame; the consumer maps it ([`ShmSender::over`] / [`ShmReceiver::over`]; [`channel`]
//!   does both over a `socketpair` in one process). Across processes, one side binds a
//!   `UnixListener`, the other connects; no descriptor is inherited and no name is left anywhere.
//! - **Send**: the producer encodes the payload ([`crate::wire`]) straight into a free region of the
//!   ring and writes a 24-byte descriptor (sequence, offset, length) on the socket.
//! - **Receive**: the consumer blocks in `read` on the socket (woken by the descriptor, or by the
//!   producer closing it), decodes from the mapped region and writes back an 8-byte
//!   acknowledgement, which frees the region.
//! - **Bounds**: the ring holds at most `capacity` bytes and [`MAX_IN_FLIGHT`] messages. When it is
//!   full the producer blocks in `poll` on the socket until an acknowledgement arrives
//!   ([`ShmSender::send_timeout`] gives up with [`ShmError::Timeout`]). A payload whose encoding is
//!   larger than the ring is refused with [`ShmError::TooLarge`]; it is never chunked.
//!
//! Nothing sleeps or spins: every wait is a blocking syscall on the socket.

mod channel;
mod connector;
mod control;
mod ring;
mod segment;

pub use channel::{channel, ShmReceiver, ShmSender, MAX_IN_FLIGHT};
pub(crate) use connector::to_connector_error;
pub use connector::{ShmConnector, DEFAULT_CAPACITY};
pub use control::Descriptor;
pub use segment::{Backing, Segment};

use crate::wire::WireError;

/// Why the shared-memory transport failed.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    #[error("shm {op} failed: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("a shared-memory segment needs a non-zero capacity")]
    ZeroCapacity,
    #[error("payload encodes to {len} bytes, more than the {capacity}-byte shm ring; payloads are not chunked: raise the ring capacity")]
    TooLarge { len: usize, capacity: usize },
    #[error("timed out waiting on the shm channel")]
    Timeout,
    #[error("the shm channel's peer is gone")]
    Disconnected,
    #[error("shm protocol violation: {0}")]
    Protocol(String),
    #[error(transparent)]
    Wire(#[from] WireError),
}
