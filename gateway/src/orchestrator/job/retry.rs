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
    upstream: Vec<Payload>,
    streaming: bool,
    /// Chunks fed on a streamed inbound edge since the start, and whether each was the last.
    fed: Vec<(Vec<Payload>, bool)>,
}

impl Attempt {
    pub fn new(upstream: Vec<Payload>, streaming: bool) -> Self {
        Self {
            upstream,
            streaming,
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

    /// Stage `s`'s replica became unavailable (`why`). Resubmits the job there once, to whichever
    /// replica takes it, when the stage had produced nothing for it and no Mixture-of-Thoughts
    /// exchange depends on its position; otherwise the job fails as unavailable.
    pub(super) fn retry_unavailable(&mut self, s: usize, why: String) -> Result<(), JobError> {
        let stage = self.stage_name(s);
        let attempt = self.attempts.remove(&s);
        let Some(attempt) = attempt.filter(|_| self.mot.is_none() && self.retried.insert(s)) else {
            return Err(JobError::Unavailable {
                stage,
                message: why,
            });
        };
        let input = StageInput {
            request: self.request.clone(),
            upstream: attempt.upstream.clone(),
            client_facing: self.plan.output_stage.values().any(|o| *o == s),
            streaming: attempt.streaming,
        };
        let Ok(replica) = self.orch.stages[s].submit(self.request.id, input) else {
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
        for (more, last) in &attempt.fed {
            self.orch.stages[s].feed(replica, self.request.id, more.clone(), *last);
        }
        self.attempts.insert(s, attempt);
        Ok(())
    }
}
