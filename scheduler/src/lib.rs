//! How one stage executes: its bounded queue, its batching policy and its engine thread.
//!
//! Owns: the per-stage bounded queue and admission control ([`BatchState::push`] refuses when
//! full), the batch-forming policy (continuous batching under a per-step token budget with chunked
//! prefill, [`policy`]), and the stage's own OS thread that drives a
//! [`StageEngine`](omnistage_stages::StageEngine) step by step ([`spawn_stage`]), reporting each
//! job's events to a sink and its load to a [`StageObserver`].
//!
//! Must not know: HTTP, model code (an engine is only the `StageEngine` trait here), or the stage
//! graph (where a job's events go next is the sink's business, not the scheduler's).
//!
//! The policy ([`BatchState`]) is pure — no threads, no clock of its own, no engine — so it is
//! unit-tested without a model; [`stage`] wraps it in a `Mutex` + `Condvar` and keeps every engine
//! call outside that mutex, so submitting or cancelling never waits for a forward pass.

pub mod kv;
pub mod limits;
pub mod observer;
pub mod policy;
pub mod stage;

pub use kv::{BlockId, BlockManager, KvConfig, KvError, KvStats, SeqKey};
pub use limits::{BatchLimits, LimitsError};
pub use observer::{NoopObserver, StageObserver};
pub use policy::{AdmitOutcome, BatchState, CancelOutcome, Drained, QueueFull, StepPlan};
pub use stage::{spawn_stage, EventSink, StageHandle, StageStats, SubmitError};
