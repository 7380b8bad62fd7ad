//! A stage's replicas in this process, load-balanced least-loaded-first.

use omnistage_scheduler::{StageHandle, StageStats, SubmitError};
use omnistage_stages::{JobId, Payload, StageInput};

/// Replicas of one stage; each has its own engine, thread and queue.
pub struct StagePool {
    id: String,
    replicas: Vec<StageHandle>,
}

impl StagePool {
    pub fn new(id: String, replicas: Vec<StageHandle>) -> Self {
        Self { id, replicas }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Submits to the replica with the fewest waiting + running jobs; returns its index. Tries
    /// the others when the first is full, so the job is refused only when every replica is.
    pub fn submit(&self, job: JobId, input: StageInput) -> Result<usize, SubmitError> {
        let mut order: Vec<usize> = (0..self.replicas.len()).collect();
        order.sort_by_key(|r| {
            let s = self.replicas[*r].stats();
            s.waiting + s.running
        });
        let mut last_err = None;
        for r in order {
            match self.replicas[r].submit(job, input.clone()) {
                Ok(()) => return Ok(r),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| SubmitError::Stopped {
            stage: self.id.clone(),
        }))
    }

    pub fn cancel(&self, replica: usize, job: JobId) {
        if let Some(r) = self.replicas.get(replica) {
            r.cancel(job);
        }
    }

    /// Streamed input for a job on `replica` (see [`StageHandle::feed`]).
    pub fn feed(&self, replica: usize, job: JobId, more: Vec<Payload>, last: bool) -> bool {
        self.replicas
            .get(replica)
            .is_some_and(|r| r.feed(job, more, last))
    }

    /// Holds a job on `replica` back, or lets it go (see [`StageHandle::hold`]).
    pub fn hold(&self, replica: usize, job: JobId, held: bool) -> bool {
        self.replicas
            .get(replica)
            .is_some_and(|r| r.hold(job, held))
    }

    /// Stats of every replica.
    pub fn stats(&self) -> Vec<StageStats> {
        self.replicas.iter().map(StageHandle::stats).collect()
    }

    pub fn shutdown(&self) {
        for r in &self.replicas {
            r.shutdown();
        }
    }
}
