//! A stage's replicas, load-balanced least-loaded-first: in this process, or each in its own
//! worker process (`process = true`, see [`crate::worker`]).

use crate::worker::RemoteReplica;
use omnistage_scheduler::{StageHandle, StageStats, SubmitError};
use omnistage_stages::{JobId, Payload, StageInput};

/// One replica of a stage.
pub enum Replica {
    /// A stage thread in the gateway's process.
    Local(StageHandle),
    /// A supervised worker process.
    Remote(RemoteReplica),
}

impl Replica {
    fn submit(&self, job: JobId, input: StageInput) -> Result<(), SubmitError> {
        match self {
            Replica::Local(h) => h.submit(job, input),
            Replica::Remote(r) => r.submit(job, input),
        }
    }

    fn cancel(&self, job: JobId) {
        match self {
            Replica::Local(h) => {
                h.cancel(job);
            }
            Replica::Remote(r) => {
                r.cancel(job);
            }
        }
    }

    fn feed(&self, job: JobId, more: Vec<Payload>, last: bool) -> bool {
        match self {
            Replica::Local(h) => h.feed(job, more, last),
            Replica::Remote(r) => r.feed(job, more, last),
        }
    }

    fn hold(&self, job: JobId, held: bool) -> bool {
        match self {
            Replica::Local(h) => h.hold(job, held),
            Replica::Remote(r) => r.hold(job, held),
        }
    }

    fn stats(&self) -> StageStats {
        match self {
            Replica::Local(h) => h.stats(),
            Replica::Remote(r) => r.stats(),
        }
    }

    fn shutdown(&self) {
        match self {
            Replica::Local(h) => h.shutdown(),
            Replica::Remote(r) => r.shutdown(),
        }
    }
}

/// Replicas of one stage; each has its own engine, thread and queue.
pub struct StagePool {
    id: String,
    replicas: Vec<Replica>,
}

impl StagePool {
    pub fn new(id: String, replicas: Vec<StageHandle>) -> Self {
        Self::with_replicas(id, replicas.into_iter().map(Replica::Local).collect())
    }

    pub fn with_replicas(id: String, replicas: Vec<Replica>) -> Self {
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
        self.replicas.iter().map(Replica::stats).collect()
    }

    /// Process ids of the replicas running in worker processes (and how often each restarted).
    pub fn workers(&self) -> Vec<(Option<u32>, u64)> {
        self.replicas
            .iter()
            .filter_map(|r| match r {
                Replica::Local(_) => None,
                Replica::Remote(r) => Some((r.pid(), r.restarts())),
            })
            .collect()
    }

    pub fn shutdown(&self) {
        for r in &self.replicas {
            r.shutdown();
        }
    }
}
