//! Model code for every stage kind, on candle.
//!
//! Owns: loading checkpoints in their released layouts, the forward passes, per-job model state
//! (KV caches, samplers), the [`omnistage_stages::StageEngine`] implementations, and `make-tiny`
//! (seeded random checkpoints in the real layouts, for tests and the embedded default).
//!
//! Must not know: HTTP, the stage graph, queues or batching policy (the scheduler decides what runs
//! in a step; an engine only runs it).

pub mod audio;
pub mod diffusion;
pub mod factory;
pub mod kernels;
pub mod llm;
pub mod media;
pub mod mot;
pub mod router;
pub mod tiny;
