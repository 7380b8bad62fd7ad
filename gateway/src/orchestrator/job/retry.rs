//! Retrying a job once on another replica when the replica running it became unavailable (its
//! worker process died or its remote worker left) before the job produced anything there: the
//! stage is resubmitted with the input it started with and every chunk fed to it since, so
//! nobody downstream or at the client can tell. A job that already produced output at that stage
//! fails with the 503-class error instead, since part of its answer is already on its way.

use super::JobRun;
use crate::orchestrator::JobError;
use omnistage_stages::{Payload, StageInput};

/// What a running stage was given for a job, kept until the stage produces its first output so
/// the job can be resubmitted elsewhere. Payloads share their buffers (`Arc`), so keeping them
/// costs no copies.
pub(super) struct Attempt {
    input: StageInput,
    /// Chunks fed on a streamed inbound edge since the start, and whether each was the last.
    fed: Vec<(Vec<Payload>, bool)>,
}

impl Attempt {
    pub fn new(input: StageInput) -> Self {
        Self {
            input,
            fed: Vec::new(),
        }
    }
}

impl JobRun {
    /// Notes a chunk fed to stage `s`, for a resubmission.
    pub(super) fn note_fed(&mut self, s: usize, more: &[Payload], last: bool) {
        if let Some(a) = self.attempts.get_mut(&s) {
            a.fed.push((more.to_vec(), last));
        }
    }

    /// Stage `s` produced output for this job: it can no longer be retried.
    pub(super) fn note_produced(&mut self, s: usize) {
        self.attempts.remove(&s);
    }

    /// Whether the job may be resubmitted at stage `s` when its replica becomes unavailable: the
    /// stage runs in workers, produced nothing for the job and was not retried yet, and no
    /// Mixture-of-Thoughts exchange depends on its position.
    pub(super) fn may_retry(&self, s: usize) -> bool {
        self.mot.is_none() && self.attempts.contains_key(&s)
    }

    /// Stage `s`'s replica became unavailable (`why`) and [`JobRun::may_retry`]: resubmits the
    /// job there, to whichever replica takes it; the job fails as unavailable when none does.
    /// The retry is not kept as an attempt, so losing it too fails the job.
    pub(super) fn retry_unavailable(&mut self, s: usize, why: String) -> Result<(), JobError> {
        let stage = self.stage_name(s);
        let submitted = self
            .attempts
            .remove(&s)
            .map(|a| (self.orch.stages[s].submit(self.request.id, a.input), a.fed));
        let Some((Ok(replica), fed)) = submitted else {
            // No other replica takes it (none left, or all full): the original failure stands.
            return Err(JobError::Unavailable {
                stage,
                message: why,
            });
        };
        tracing::warn!(stage = %stage, job = self.request.id.0, %why, "retrying the job on another replica");
        self.trace.retried(&stage, &why);
        self.trace.submitted(&stage);
        self.orch.observer.retried(&stage);
        self.active.insert(s, replica);
        for (more, last) in fed {
            self.orch.stages[s].feed(replica, self.request.id, more, last);
        }
        Ok(())
    }
}
