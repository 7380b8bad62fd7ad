//! TCP transport between hosts: authenticated, checksummed, bounded, reconnecting links that
//! carry opaque byte frames (the payload encoding lives elsewhere).
//!
//! - [`frame`]: the wire framing (magic, version, type, sequence, length, body, CRC-32).
//! - [`auth`]: the mutual HMAC-SHA256 challenge–response that runs before any payload.
//! - [`blocking`]: the same handshake and frames on a blocking `std` stream, one session per
//!   connection (the gateway ↔ remote worker link).
//! - [`conn`]: [`TcpLink`], the client/server link with credit-based flow control and
//!   client-side reconnect with resend of unacknowledged frames.

pub mod auth;
pub mod blocking;
pub mod conn;
pub mod frame;

use std::time::Duration;

pub use auth::{AuthError, Secret};
pub use conn::{LinkError, TcpLink};
pub use frame::FrameError;

/// Bounds of one link. Both ends must use the same `window` and `max_frame` (the handshake
/// checks it).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest body one frame may carry, in bytes (at most `u32::MAX`).
    pub max_frame: usize,
    /// Data frames a sender may have in flight: sent but not yet consumed by the peer's `recv`.
    pub window: u32,
    /// Time allowed for the authentication handshake.
    pub handshake_timeout: Duration,
    /// Time allowed for one TCP connect attempt.
    pub connect_timeout: Duration,
    /// Client reconnect policy after an established connection drops.
    pub reconnect: Backoff,
}

/// Exponential back-off between reconnect attempts.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// Delay before the first attempt.
    pub initial: Duration,
    /// Cap on the delay (it doubles each failed attempt).
    pub max: Duration,
    /// Consecutive failed attempts after which the link gives up and fails.
    pub max_attempts: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame: 64 << 20,
            window: 16,
            handshake_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            reconnect: Backoff {
                initial: Duration::from_millis(50),
                max: Duration::from_secs(5),
                max_attempts: 10,
            },
        }
    }
}
