//! The pure batch-forming state of one stage: which jobs wait, which run, and what the next step
//! does. No threads, no engine, no clock of its own (callers pass `now`), so every rule here is
//! unit-tested without a model.
//!
//! A step is formed in two phases because admitting a job needs the engine (it returns the job's
//! prefill cost), and the stage thread calls the engine outside its lock:
//!
//! 1. [`BatchState::plan`] gives every running job its share of the step's token budget
//!    (`max_batched_tokens`): each decoding job (no pending input) gets 1, then jobs still in
//!    prefill continue, in admission order, with as much of the rest as they need (chunked
//!    prefill; a job gets nothing this step once the budget is spent).
//! 2. While [`BatchState::next_admission`] hands out waiting jobs (FIFO, while fewer than
//!    `max_batch_size` run and budget is left), the caller admits each to the engine and reports
//!    the result with [`BatchState::finish_admission`]; an admitted job's first share is
//!    `min(prefill tokens, budget left)`, so a prompt longer than the budget is prefilled over
//!    several steps while decodes keep running every step.
//!
//! [`BatchState::plan_with`] runs both phases with an admission closure, for callers (and tests)
//! that can admit in place.

use crate::limits::BatchLimits;
use omnistage_stages::{EngineError, JobId, Payload, StageInput, StepWork};
use std::collections::VecDeque;
use std::time::Instant;

/// A submit was refused: `max_queue` jobs are already waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull {
    /// The queue's capacity (`max_queue`).
    pub capacity: usize,
}

/// What [`BatchState::cancel`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The job is not at this stage (unknown, or already finished).
    NotFound,
    /// Removed from the queue; the engine never saw it.
    Waiting,
    /// Removed from the running set; the engine still holds its state and must release it.
    Running,
    /// The engine is admitting it right now; [`BatchState::finish_admission`] will say to release
    /// it.
    Admitting,
}

impl CancelOutcome {
    /// Whether the caller must now call `engine.release(job)`.
    pub fn must_release(self) -> bool {
        self == CancelOutcome::Running
    }
}

/// What became of a job handed out by [`BatchState::next_admission`].
#[derive(Debug, Clone, PartialEq)]
pub enum AdmitOutcome {
    /// The job runs; it may already have a share of the current step.
    Admitted,
    /// The engine refused it; report the error for the job. Nothing to release.
    Rejected(EngineError),
    /// The job was cancelled while being admitted; release it when `must_release` (the engine had
    /// accepted it). Report nothing.
    Cancelled {
        /// Whether the engine holds state for the job that must be released.
        must_release: bool,
    },
}

/// The jobs removed by [`BatchState::drain`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drained {
    /// Jobs that were waiting (the engine never saw them), oldest first.
    pub waiting: Vec<JobId>,
    /// Jobs that were running (the engine holds their state), in admission order.
    pub running: Vec<JobId>,
}

/// The next step being formed: each job's share of the token budget, plus what is left of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepPlan {
    work: Vec<StepWork>,
    budget_left: usize,
    hold_until: Option<Instant>,
}

impl StepPlan {
    /// The shares given so far: decoding jobs, then prefill continuations, then new admissions.
    pub fn work(&self) -> &[StepWork] {
        &self.work
    }

    /// Takes the formed step.
    pub fn into_work(self) -> Vec<StepWork> {
        self.work
    }

    /// Tokens of the step's budget not yet given to any job.
    pub fn budget_left(&self) -> usize {
        self.budget_left
    }

    /// `Some(t)`: nothing is running and the queue holds a partial batch that should wait for more
    /// jobs until `t` (`max_wait`); plan again at `t` or when a job arrives. No job is admitted
    /// from a holding plan.
    pub fn hold_until(&self) -> Option<Instant> {
        self.hold_until
    }

    /// Total input tokens scheduled so far.
    pub fn tokens(&self) -> usize {
        self.work.iter().map(|w| w.token_budget).sum()
    }
}

#[derive(Debug)]
struct Waiting {
    job: JobId,
    input: StageInput,
    arrived: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Running {
    job: JobId,
    /// Input tokens still to process, as last reported by the engine (0 = decoding).
    pending: usize,
    /// The engine waits for more streamed input before this job can progress.
    awaiting: bool,
    /// Its consumer lags: the job gets no share until released (streamed edge backpressure).
    held: bool,
}

impl Running {
    fn can_step(&self) -> bool {
        !self.awaiting && !self.held
    }
}

#[derive(Debug, Clone, Copy)]
struct Admitting {
    job: JobId,
    cancelled: bool,
}

/// One stage's waiting FIFO and running set, and the rules that form each step from them.
#[derive(Debug)]
pub struct BatchState {
    limits: BatchLimits,
    waiting: VecDeque<Waiting>,
    /// In admission order; earlier jobs get prefill budget first.
    running: Vec<Running>,
    /// Handed out by `next_admission`, not yet reported by `finish_admission`.
    admitting: Vec<Admitting>,
}

impl BatchState {
    /// An empty state. Limits are [normalized](BatchLimits::normalized) so the policy always makes
    /// progress.
    pub fn new(limits: BatchLimits) -> Self {
        BatchState {
            limits: limits.normalized(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            admitting: Vec::new(),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &BatchLimits {
        &self.limits
    }

    /// Jobs waiting for admission.
    pub fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    /// Jobs running, counting those being admitted.
    pub fn running_len(&self) -> usize {
        self.running.len() + self.admitting.len()
    }

    /// Whether nothing waits and nothing runs.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty() && self.admitting.is_empty()
    }

    /// Whether the queue is full: a [`push`](BatchState::push) now would be refused.
    pub fn is_full(&self) -> bool {
        self.waiting.len() >= self.limits.max_queue
    }

    /// Whether `job` is in the running set (admitted, not finished, not cancelled).
    pub fn is_running(&self, job: JobId) -> bool {
        self.running.iter().any(|r| r.job == job)
    }

    /// Queues a job arriving at `now`, or refuses it when the queue is full.
    pub fn push(&mut self, job: JobId, input: StageInput, now: Instant) -> Result<(), QueueFull> {
        if self.is_full() {
            return Err(QueueFull {
                capacity: self.limits.max_queue,
            });
        }
        self.waiting.push_back(Waiting {
            job,
            input,
            arrived: now,
        });
        Ok(())
    }

    /// Phase 1 of forming a step: shares for the running jobs (decodes 1 each, then prefill
    /// continuations from what is left), and whether to hold off for `max_wait`.
    pub fn plan(&mut self, now: Instant) -> StepPlan {
        let mut budget = self.limits.max_batched_tokens;
        let mut work = Vec::with_capacity(self.running.len());
        for r in self
            .running
            .iter()
            .filter(|r| r.pending == 0 && r.can_step())
        {
            work.push(StepWork {
                job: r.job,
                token_budget: 1,
            });
            budget = budget.saturating_sub(1);
        }
        for r in self
            .running
            .iter()
            .filter(|r| r.pending > 0 && r.can_step())
        {
            if budget == 0 {
                break;
            }
            let share = r.pending.min(budget);
            work.push(StepWork {
                job: r.job,
                token_budget: share,
            });
            budget -= share;
        }
        let idle = self.running.is_empty() && self.admitting.is_empty();
        StepPlan {
            work,
            budget_left: budget,
            hold_until: if idle { self.hold_until(now) } else { None },
        }
    }

    /// When nothing runs and fewer than `max_batch_size` wait: the instant the oldest waiter will
    /// have waited `max_wait`, if that is still ahead.
    fn hold_until(&self, now: Instant) -> Option<Instant> {
        let oldest = self.waiting.front()?;
        if self.limits.max_wait.is_zero() || self.waiting.len() >= self.limits.max_batch_size {
            return None;
        }
        let release = oldest.arrived.checked_add(self.limits.max_wait)?;
        (now < release).then_some(release)
    }

    /// Phase 2: the next waiting job to admit into `plan`, oldest first, or `None` when the batch
    /// is full, the budget is spent, the plan holds, or nobody waits. The caller must report the
    /// engine's answer with [`finish_admission`](BatchState::finish_admission).
    pub fn next_admission(&mut self, plan: &mut StepPlan) -> Option<(JobId, StageInput)> {
        if plan.hold_until.is_some()
            || plan.budget_left == 0
            || self.running_len() >= self.limits.max_batch_size
        {
            return None;
        }
        let waiting = self.waiting.pop_front()?;
        self.admitting.push(Admitting {
            job: waiting.job,
            cancelled: false,
        });
        Some((waiting.job, waiting.input))
    }

    /// Records the engine's answer for a job from [`next_admission`](BatchState::next_admission):
    /// `Ok(prefill_tokens)` makes it run with a first share of `min(prefill_tokens, budget left)`
    /// (1 for a job with no input to process).
    pub fn finish_admission(
        &mut self,
        plan: &mut StepPlan,
        job: JobId,
        result: Result<usize, EngineError>,
    ) -> AdmitOutcome {
        let cancelled = match self.admitting.iter().position(|a| a.job == job) {
            Some(pos) => self.admitting.remove(pos).cancelled,
            None => true,
        };
        if cancelled {
            return AdmitOutcome::Cancelled {
                must_release: result.is_ok(),
            };
        }
        let prefill = match result {
            Ok(prefill) => prefill,
            Err(err) => return AdmitOutcome::Rejected(err),
        };
        self.running.push(Running {
            job,
            pending: prefill,
            awaiting: false,
            held: false,
        });
        let share = prefill.max(1).min(plan.budget_left);
        if share > 0 {
            plan.work.push(StepWork {
                job,
                token_budget: share,
            });
            plan.budget_left -= share;
        }
        AdmitOutcome::Admitted
    }

    /// Both phases with `admit` standing in for the engine. Returns the plan and the jobs the
    /// engine refused, with their errors.
    pub fn plan_with<F>(
        &mut self,
        now: Instant,
        mut admit: F,
    ) -> (StepPlan, Vec<(JobId, EngineError)>)
    where
        F: FnMut(JobId, StageInput) -> Result<usize, EngineError>,
    {
        let mut plan = self.plan(now);
        let mut rejected = Vec::new();
        while let Some((job, input)) = self.next_admission(&mut plan) {
            let result = admit(job, input);
            if let AdmitOutcome::Rejected(err) = self.finish_admission(&mut plan, job, result) {
                rejected.push((job, err));
            }
        }
        (plan, rejected)
    }

    /// Records the engine's count of input tokens `job` still has to process (after a step).
    pub fn set_pending(&mut self, job: JobId, pending: usize) {
        if let Some(r) = self.running.iter_mut().find(|r| r.job == job) {
            r.pending = pending;
        }
    }

    /// Records whether the engine waits for more streamed input for `job` (no share until it
    /// arrives). Returns whether the job is running.
    pub fn set_awaiting(&mut self, job: JobId, awaiting: bool) -> bool {
        self.running
            .iter_mut()
            .find(|r| r.job == job)
            .map(|r| r.awaiting = awaiting)
            .is_some()
    }

    /// Holds a running job back (no share in any step) or lets it go again: a streamed edge's
    /// consumer has too much of its output buffered. Returns whether the job is running.
    pub fn set_held(&mut self, job: JobId, held: bool) -> bool {
        self.running
            .iter_mut()
            .find(|r| r.job == job)
            .map(|r| r.held = held)
            .is_some()
    }

    /// Appends streamed input to a job that still waits in the queue (joined to the upstream
    /// payload of the same kind, so the engine sees one whole value at admission). Returns `false` when the job does not wait here.
    pub fn extend_waiting(&mut self, job: JobId, more: &[Payload], last: bool) -> bool {
        let Some(w) = self.waiting.iter_mut().find(|w| w.job == job) else {
            return false;
        };
        for p in more {
            let same = w.input.upstream.iter_mut().find(|u| u.kind() == p.kind());
            match same.and_then(|u| Some((Payload::concat(&[u.clone(), p.clone()])?, u))) {
                Some((joined, slot)) => *slot = joined,
                None => w.input.upstream.push(p.clone()),
            }
        }
        if last {
            w.input.streaming = false;
        }
        true
    }

    /// Whether `job` is being admitted right now.
    pub fn is_admitting(&self, job: JobId) -> bool {
        self.admitting.iter().any(|a| a.job == job && !a.cancelled)
    }

    /// Removes a job that finished or failed from the running set. Returns whether it was running.
    pub fn finish(&mut self, job: JobId) -> bool {
        let before = self.running.len();
        self.running.retain(|r| r.job != job);
        self.running.len() != before
    }

    /// Removes `job` wherever it is; the outcome says whether the engine must release it.
    pub fn cancel(&mut self, job: JobId) -> CancelOutcome {
        if let Some(pos) = self.waiting.iter().position(|w| w.job == job) {
            self.waiting.remove(pos);
            return CancelOutcome::Waiting;
        }
        if self.finish(job) {
            return CancelOutcome::Running;
        }
        if let Some(a) = self
            .admitting
            .iter_mut()
            .find(|a| a.job == job && !a.cancelled)
        {
            a.cancelled = true;
            return CancelOutcome::Admitting;
        }
        CancelOutcome::NotFound
    }

    /// Empties the queue and the running set (shutdown). Jobs being admitted are left to
    /// [`finish_admission`](BatchState::finish_admission).
    pub fn drain(&mut self) -> Drained {
        Drained {
            waiting: self.waiting.drain(..).map(|w| w.job).collect(),
            running: self.running.drain(..).map(|r| r.job).collect(),
        }
    }
}

#[cfg(test)]
mod tests;
