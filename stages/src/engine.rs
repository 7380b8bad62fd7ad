//! The contract between a stage's scheduler and its engine.
//!
//! The scheduler (crate `scheduler`) owns the queue and decides, step by step, which jobs run and
//! how many tokens each may process; the engine owns per-job state (KV cache, sampler) and the
//! model. The split keeps batching policy testable with no model behind it.

use crate::job::{FinishReason, JobId, StageInput, Usage};
use crate::payload::Payload;

/// Why an engine refused or failed a job. The message is shown to the client.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// The job's input is unusable (too long, empty, wrong payload kind): a client error.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The engine failed while computing: a server error; the stage keeps serving others.
    #[error("engine failure: {0}")]
    Compute(String),
    /// The stage could not be reached (its worker process died or its connection closed): a
    /// transient server error (503); the job may be retried once the stage is back.
    #[error("stage unavailable: {0}")]
    Unavailable(String),
}

/// One job's share of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepWork {
    pub job: JobId,
    /// Most input tokens the job may consume this step (prefill budget); at least 1.
    pub token_budget: usize,
}

/// What an engine reports for a job during a step.
#[derive(Debug, Clone, PartialEq)]
pub enum StageEvent {
    /// The job entered the stage's running batch: its queue wait is over. Emitted by the stage
    /// scheduler when the engine accepted the job, never by engines themselves.
    Admitted,
    /// A streamed piece of output; several kinds may arrive together (text delta, its token ids,
    /// hidden rows). Routed by kind to edges and to the client.
    Output(Vec<Payload>),
    /// The job used this many units (see `Payload::units`) of its streamed input: the
    /// orchestrator's credit for the edge's bounded buffer, so a lagging consumer holds its
    /// producer back.
    Consumed(usize),
    /// The job is done at this stage; the engine has already released its state.
    Finished { reason: FinishReason, usage: Usage },
    /// The job failed at this stage; the engine has already released its state.
    Failed(EngineError),
}

/// What an engine reports about its memory and caches, for metrics and tests. Counters
/// (`*_total`) only grow over the engine's life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Bytes of state held for live jobs (KV blocks they reference).
    pub state_bytes: usize,
    /// KV cache blocks referenced by live jobs, and the pool's size (0 for engines without one).
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
    /// Unreferenced blocks kept because they hold a reusable prompt prefix.
    pub kv_blocks_cached: usize,
    /// Jobs whose KV cache was dropped to make room, to be recomputed later.
    pub preemptions_total: u64,
    /// Prompt tokens looked up in the prefix cache, and how many were found.
    pub prefix_query_tokens_total: u64,
    pub prefix_hit_tokens_total: u64,
    /// Denoising steps completed, summed over images (DiT stages), and how many of them reused a
    /// cached block-stack residual instead of running the blocks.
    pub denoise_image_steps_total: u64,
    pub denoise_cached_image_steps_total: u64,
    /// Transformer forwards run and the rows they carried (DiT stages): rows per forward is the
    /// step-level batch occupancy.
    pub denoise_forwards_total: u64,
    pub denoise_rows_total: u64,
    /// Images produced (VAE stages).
    pub images_total: u64,
    /// PCM samples produced (codec stages).
    pub audio_samples_total: u64,
    /// Media items encoded by the model (media encoder stages), and the items looked up in the
    /// embedding cache and found there.
    pub media_encoded_total: u64,
    pub encoder_cache_queries_total: u64,
    pub encoder_cache_hits_total: u64,
    /// Stack boundaries a Mixture-of-Thoughts primary reached in its prompt passes, and the
    /// microseconds it waited there, summed, for its peers' states to arrive.
    pub mot_boundaries_total: u64,
    pub mot_boundary_wait_us_total: u64,
}

/// A batched engine driven by a stage scheduler on the stage's own OS thread.
pub trait StageEngine: Send + 'static {
    /// Validates a new job and sets up its state. Returns the number of input tokens it must
    /// process before producing output (the scheduler's prefill cost).
    fn admit(&mut self, job: JobId, input: StageInput) -> Result<usize, EngineError>;

    /// Input tokens the job still has to process (0 once it is decoding).
    fn pending_input(&self, job: JobId) -> usize;

    /// Runs one step for `work` (jobs already admitted) and reports events through `emit`.
    /// A job that finishes or fails must be released before its final event is emitted.
    /// `Err` means the whole step failed; the scheduler then fails and releases every job in it.
    fn step(
        &mut self,
        work: &[StepWork],
        emit: &mut dyn FnMut(JobId, StageEvent),
    ) -> Result<(), EngineError>;

    /// More input for an admitted job on a streamed edge (in order); `last` says nothing more
    /// follows. Engines that take no streamed input refuse it.
    fn feed(
        &mut self,
        job: JobId,
        more: Vec<crate::Payload>,
        last: bool,
    ) -> Result<(), EngineError> {
        let _ = (job, more, last);
        Err(EngineError::InvalidInput(
            "this stage does not take streamed input; remove `stream` from its inbound edge".into(),
        ))
    }

    /// Whether the job cannot progress until more streamed input arrives: the scheduler gives
    /// it no share of a step until [`feed`](StageEngine::feed) brings some. An engine reports
    /// `true` only once it has emitted [`StageEvent::Consumed`] for all the input it took (else
    /// its producer, held back on that credit, would never be released), and a step that still
    /// includes a waiting job (admitted in the same step) must simply skip it.
    fn awaiting_input(&self, job: JobId) -> bool {
        let _ = job;
        false
    }

    /// Drops a job's state and frees its memory (cancel, deadline, or a failed step).
    fn release(&mut self, job: JobId);

    /// Bytes of per-job state (KV cache) currently held; for metrics and leak tests.
    fn state_bytes(&self) -> usize;

    /// Memory and cache figures; engines with a KV pool override this.
    fn stats(&self) -> EngineStats {
        EngineStats {
            state_bytes: self.state_bytes(),
            ..EngineStats::default()
        }
    }
}

/// Lets the runtime hold engines of different kinds behind one type.
impl StageEngine for Box<dyn StageEngine> {
    fn admit(&mut self, job: JobId, input: StageInput) -> Result<usize, EngineError> {
        (**self).admit(job, input)
    }

    fn pending_input(&self, job: JobId) -> usize {
        (**self).pending_input(job)
    }

    fn step(
        &mut self,
        work: &[StepWork],
        emit: &mut dyn FnMut(JobId, StageEvent),
    ) -> Result<(), EngineError> {
        (**self).step(work, emit)
    }

    fn feed(
        &mut self,
        job: JobId,
        more: Vec<crate::Payload>,
        last: bool,
    ) -> Result<(), EngineError> {
        (**self).feed(job, more, last)
    }

    fn awaiting_input(&self, job: JobId) -> bool {
        (**self).awaiting_input(job)
    }

    fn release(&mut self, job: JobId) {
        (**self).release(job)
    }

    fn state_bytes(&self) -> usize {
        (**self).state_bytes()
    }

    fn stats(&self) -> EngineStats {
        (**self).stats()
    }
}
