//! Hooks through which a stage reports its load and failures (the gateway backs them with
//! Prometheus; tests can record them).

use std::time::Duration;

/// Receives a stage's load and failure reports.
///
/// Calls come from the stage thread and from callers of [`StageHandle`](crate::StageHandle)
/// methods. [`queue_changed`](StageObserver::queue_changed) is called with the stage's queue lock
/// held, so the reported counts are never stale; an observer must therefore be quick and must not
/// call back into the stage.
pub trait StageObserver: Send + Sync {
    /// One engine step finished (or failed): `batch_size` jobs, `tokens` scheduled input tokens
    /// (the sum of the step's token budgets), `elapsed` wall time of the step.
    fn step_done(&self, batch_size: usize, tokens: usize, elapsed: Duration);

    /// The number of waiting or running jobs changed.
    fn queue_changed(&self, waiting: usize, running: usize);

    /// A job failed at this stage. `reason` is a short, low-cardinality label usable as a metric
    /// label: `invalid_input`, `compute`, `panic` or `shutdown`.
    fn job_failed(&self, reason: &str);
}

/// An observer that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopObserver;

impl StageObserver for NoopObserver {
    fn step_done(&self, _batch_size: usize, _tokens: usize, _elapsed: Duration) {}
    fn queue_changed(&self, _waiting: usize, _running: usize) {}
    fn job_failed(&self, _reason: &str) {}
}
