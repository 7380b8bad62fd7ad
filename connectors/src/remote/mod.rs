//! Control messages between the gateway's orchestrator and a stage worker process, and their
//! binary encoding.
//!
//! The gateway sends [`ToWorker`] (what `StagePool` offers in process: submit, feed, cancel, hold,
//! stats) and receives [`FromWorker`] (per-job [`StageEvent`]s, stats, readiness, refusals). Each
//! encoded message is one transport frame (a TCP frame or a shared-memory slot): the decoder takes
//! exactly one message and refuses trailing bytes.
//!
//! Layout (all integers little-endian; `usize` values travel as `u64`):
//!
//! ```text
//! header (8 bytes): magic "OSRM" | version u16 | direction u8 (1 to worker, 2 from worker) | tag u8
//! body:             the variant's fields, in declaration order
//! ```
//!
//! | field                | encoding                                                          |
//! |----------------------|-------------------------------------------------------------------|
//! | job id, counters     | `u64`                                                             |
//! | bool                 | `u8` 0 or 1                                                       |
//! | `Option<T>`          | `u8` 0, or `u8` 1 then `T`                                        |
//! | string               | `u64` byte length, UTF-8 bytes                                    |
//! | `f64` / `f32`        | IEEE bits, `u64` / `u32`                                          |
//! | list                 | `u64` count, then the items                                      |
//! | payload              | `u64` length, then the payload in the [`wire`](crate::wire) format |
//! | media item           | digest (32 bytes, as sent), `u64` length, `wire` image or pcm     |
//! | enum                 | `u8` tag (explicit, listed in the encoders), then its fields      |
//! | deadline (`Instant`) | `u64` milliseconds left when encoded                              |
//!
//! A binary format (not JSON) keeps pixels, PCM and hidden states as raw little-endian bytes and
//! reuses the payload wire format for them.
//!
//! **Deadlines.** `Instant`s are not comparable across processes or hosts, so a request's deadline
//! travels as the milliseconds it had left at encoding (rounded down, 0 once past) and is rebuilt
//! on decoding as `Instant::now()` plus that time. Clocks are never compared across hosts; time in
//! transit is not subtracted (the gateway keeps the authoritative deadline and cancels the job).
//!
//! **Media.** An item keeps the digest it was sent with (never recomputed: encoder caches key on
//! it); decoding checks that an image is one image whose pixels match its shape and that a clip is
//! non-empty with a non-zero sample rate.
//!
//! **Untrusted bytes.** Decoding never panics, checks every declared count against the bytes that
//! remain before allocating, and returns a [`RemoteError`].

mod decode;
mod encode;

use crate::wire::WireError;
use omnistage_stages::{EngineStats, JobId, Payload, StageEvent, StageInput};

pub use decode::{decode_from_worker, decode_to_worker};
pub use encode::{encode_from_worker, encode_to_worker};

/// First four bytes of every control message.
pub const MAGIC: [u8; 4] = *b"OSRM";
/// The control format version this build writes and reads (2: requests carry routing fields).
pub const VERSION: u16 = 2;
/// Size of the fixed header in bytes.
pub const HEADER_LEN: usize = 8;
/// Header direction byte of a [`ToWorker`] message.
pub const DIR_TO_WORKER: u8 = 1;
/// Header direction byte of a [`FromWorker`] message.
pub const DIR_FROM_WORKER: u8 = 2;

/// What the gateway asks of a stage worker.
#[derive(Debug, Clone)]
pub enum ToWorker {
    /// A new job for the worker's stage (its queue may refuse it: [`FromWorker::Refused`]).
    Submit { job: JobId, input: StageInput },
    /// More streamed input for a submitted job; `last` says nothing more follows.
    Feed {
        job: JobId,
        payloads: Vec<Payload>,
        last: bool,
    },
    /// Drop the job (client gone, deadline, failure elsewhere in the graph).
    Cancel { job: JobId },
    /// Hold the job back from steps (its consumer lags), or let it go.
    Hold { job: JobId, held: bool },
    /// Ask for a [`FromWorker::Stats`] answer.
    StatsRequest,
    /// Stop: finish nothing more, release every job, exit.
    Shutdown,
}

/// What a stage worker tells the gateway.
#[derive(Debug, Clone, PartialEq)]
pub enum FromWorker {
    /// One event of one job, as the in-process stage reports it.
    Event { job: JobId, event: StageEvent },
    /// The answer to [`ToWorker::StatsRequest`].
    Stats(WorkerStats),
    /// The worker loaded its stage and takes jobs.
    Ready { stage: String, replica: usize },
    /// The worker did not take a submitted job (the gateway answers 429 or 503).
    Refused { job: JobId, reason: RefuseReason },
}

/// A worker's load and its engine's figures (the scheduler's `StageStats`, field for field).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Jobs waiting for admission.
    pub waiting: usize,
    /// Jobs admitted to the engine and not yet finished.
    pub running: usize,
    /// The engine's `state_bytes()` after its last step or release.
    pub state_bytes: usize,
    /// The engine's full stats at the same moment.
    pub engine: EngineStats,
    /// Steps run since the stage started (failed steps included).
    pub steps_total: u64,
}

/// Why a worker refused a job (the scheduler's `SubmitError`, without the stage name the gateway
/// already knows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    /// The stage's queue already holds `capacity` waiting jobs (429).
    QueueFull { capacity: usize },
    /// The stage is shutting down or its thread died (503).
    Stopped,
}

/// Why a control message could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RemoteError {
    #[error("not an omnistage control message (bad magic bytes)")]
    BadMagic,
    #[error("control message version {0} is not supported (this build reads {VERSION})")]
    UnsupportedVersion(u16),
    #[error("control message goes in direction {found}, expected {expected}")]
    Direction { expected: u8, found: u8 },
    #[error("unknown {what} tag {tag}")]
    UnknownTag { what: &'static str, tag: u8 },
    #[error("message truncated: needed {needed} more bytes, {available} left")]
    Truncated { needed: u64, available: usize },
    #[error("{0} bytes left over after the message")]
    TrailingBytes(usize),
    #[error("a value overflows ({0})")]
    Overflow(&'static str),
    #[error("text is not valid UTF-8")]
    InvalidUtf8,
    #[error("invalid flag byte {0} (expected 0 or 1)")]
    BadFlag(u8),
    #[error("invalid media item: {0}")]
    InvalidMedia(&'static str),
    #[error("payload: {0}")]
    Payload(#[from] WireError),
}

#[cfg(test)]
mod tests;
