//! A stage's engine thread: it drives a [`StageEngine`] step by step over the jobs the
//! [`BatchState`] policy picks, and hands the engine's events to a sink.
//!
//! Shared state is one `Mutex` (the policy state, pending releases, stats) and one `Condvar`. The
//! thread blocks on the condvar when there is nothing to do (with a timeout only while a partial
//! batch waits out `max_wait`); every engine call is made outside the mutex, so
//! [`StageHandle::submit`] and [`StageHandle::cancel`] never wait for a forward pass. The sink is
//! also called outside the mutex, so it may submit to or cancel at this very stage.

use crate::limits::BatchLimits;
use crate::observer::StageObserver;
use crate::policy::{AdmitOutcome, BatchState, CancelOutcome, StepPlan};
use omnistage_stages::{
    EngineError, EngineStats, JobId, Payload, StageEngine, StageEvent, StageInput, StepWork,
};
use std::any::Any;
use std::collections::HashSet;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Instant;

/// Where a stage sends every event of every job: called on the stage thread, in order per job,
/// never with the stage's lock held.
pub type EventSink = Arc<dyn Fn(JobId, StageEvent) + Send + Sync>;

/// Why a stage refused a job.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The stage's queue already holds `capacity` waiting jobs.
    #[error("stage '{stage}' is overloaded: its queue is full ({capacity} jobs waiting)")]
    QueueFull { stage: String, capacity: usize },
    /// The stage was shut down or its thread died.
    #[error("stage '{stage}' is stopped")]
    Stopped { stage: String },
}

/// A snapshot of a stage's load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StageStats {
    /// Jobs waiting for admission.
    pub waiting: usize,
    /// Jobs admitted to the engine and not yet finished.
    pub running: usize,
    /// The engine's `state_bytes()` after its last step or release.
    pub state_bytes: usize,
    /// The engine's full [`EngineStats`] at the same moment.
    pub engine: EngineStats,
    /// Steps run since the stage started (failed steps included).
    pub steps_total: u64,
}

/// A cheap, cloneable handle to a running stage. When the last clone is dropped the stage shuts
/// down as by [`StageHandle::shutdown`].
#[derive(Clone)]
pub struct StageHandle {
    inner: Arc<HandleInner>,
}

struct HandleInner {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    name: String,
    queue: Mutex<Queue>,
    wake: Condvar,
    observer: Arc<dyn StageObserver>,
}

struct Queue {
    batch: BatchState,
    /// Running jobs cancelled since the thread last looked; it releases them before its next step.
    to_release: Vec<JobId>,
    /// Streamed input for running jobs, in arrival order; the thread hands it to the engine
    /// before its next step.
    to_feed: Vec<(JobId, Vec<Payload>, bool)>,
    /// Shutdown requested.
    stopping: bool,
    /// The thread has exited.
    stopped: bool,
    engine_stats: EngineStats,
    steps_total: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn queue_changed(&self, queue: &Queue) {
        self.observer
            .queue_changed(queue.batch.waiting_len(), queue.batch.running_len());
    }
}

/// Starts a stage named `name` on its own OS thread (`stage-<name>`), driving `engine` under
/// `limits` (normalized, see [`BatchLimits::normalized`]). Every event of every job goes to
/// `sink`; load and failures are reported to `observer`.
///
/// # Panics
/// If the OS refuses to create the thread.
pub fn spawn_stage<E: StageEngine>(
    name: String,
    engine: E,
    limits: BatchLimits,
    observer: Arc<dyn StageObserver>,
    sink: EventSink,
) -> StageHandle {
    let shared = Arc::new(Shared {
        name: name.clone(),
        queue: Mutex::new(Queue {
            batch: BatchState::new(limits),
            to_release: Vec::new(),
            to_feed: Vec::new(),
            stopping: false,
            stopped: false,
            engine_stats: engine.stats(),
            steps_total: 0,
        }),
        wake: Condvar::new(),
        observer,
    });
    let worker = Worker {
        shared: Arc::clone(&shared),
        engine,
        sink,
    };
    let thread = thread::Builder::new()
        .name(format!("stage-{name}"))
        .spawn(move || worker.run())
        .unwrap_or_else(|err| panic!("cannot start the thread of stage '{name}': {err}"));
    StageHandle {
        inner: Arc::new(HandleInner {
            shared,
            thread: Mutex::new(Some(thread)),
        }),
    }
}

impl StageHandle {
    /// The stage's name.
    pub fn name(&self) -> &str {
        &self.inner.shared.name
    }

    /// Queues a job. Never blocks on compute: refuses at once when the queue is full or the stage
    /// is stopped. The job's events then arrive at the sink.
    pub fn submit(&self, job: JobId, input: StageInput) -> Result<(), SubmitError> {
        let shared = &self.inner.shared;
        let mut queue = shared.lock();
        if queue.stopping || queue.stopped {
            return Err(SubmitError::Stopped {
                stage: shared.name.clone(),
            });
        }
        if let Err(full) = queue.batch.push(job, input, Instant::now()) {
            return Err(SubmitError::QueueFull {
                stage: shared.name.clone(),
                capacity: full.capacity,
            });
        }
        shared.queue_changed(&queue);
        drop(queue);
        shared.wake.notify_one();
        Ok(())
    }

    /// Cancels a job: drops it from the queue, or — if it runs — has the thread release its engine
    /// state before the next step. Nothing more is emitted for it once this returns, except an
    /// event the thread is handing to the sink at this very moment. Never blocks on compute.
    /// Returns whether the job was at this stage.
    pub fn cancel(&self, job: JobId) -> bool {
        let shared = &self.inner.shared;
        let mut queue = shared.lock();
        let outcome = queue.batch.cancel(job);
        if outcome.must_release() {
            queue.to_release.push(job);
        }
        let found = outcome != CancelOutcome::NotFound;
        if found {
            shared.queue_changed(&queue);
        }
        drop(queue);
        if found {
            shared.wake.notify_one();
        }
        found
    }

    /// More input for a job on a streamed edge (`last`: nothing more follows). A job still in
    /// the queue gets it joined to its input; a running job gets it through
    /// [`StageEngine::feed`] before the stage's next step. Never blocks on compute. Returns
    /// whether the job is at this stage (input for a job that already ended is dropped).
    pub fn feed(&self, job: JobId, more: Vec<Payload>, last: bool) -> bool {
        let shared = &self.inner.shared;
        let mut queue = shared.lock();
        if queue.batch.extend_waiting(job, &more, last) {
            return true;
        }
        if !queue.batch.is_running(job) && !queue.batch.is_admitting(job) {
            return false;
        }
        queue.to_feed.push((job, more, last));
        drop(queue);
        shared.wake.notify_one();
        true
    }

    /// Holds a running job back from every step (`held`), or lets it run again: the consumer of
    /// its streamed output has too much of it buffered. Returns whether the job runs here.
    pub fn hold(&self, job: JobId, held: bool) -> bool {
        let shared = &self.inner.shared;
        let found = shared.lock().batch.set_held(job, held);
        if found && !held {
            shared.wake.notify_one();
        }
        found
    }

    /// The stage's current load.
    pub fn stats(&self) -> StageStats {
        let queue = self.inner.shared.lock();
        StageStats {
            waiting: queue.batch.waiting_len(),
            running: queue.batch.running_len(),
            state_bytes: queue.engine_stats.state_bytes,
            engine: queue.engine_stats,
            steps_total: queue.steps_total,
        }
    }

    /// Stops the stage: later submits are refused, the thread finishes its current step, fails
    /// every job still waiting or running (`EngineError::Compute("stage ... shut down")`),
    /// releases their state and exits. Returns once the thread has exited — or at once when called
    /// from the stage thread itself (e.g. from the sink), or while another caller is joining it.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }
}

impl HandleInner {
    fn shutdown(&self) {
        self.shared.lock().stopping = true;
        self.shared.wake.notify_all();
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(thread) = thread else { return };
        if thread.thread().id() == thread::current().id() {
            return; // Joining ourselves would deadlock; the loop exits after this step.
        }
        if thread.join().is_err() {
            tracing::error!(stage = %self.shared.name, "stage thread panicked");
        }
    }
}

impl Drop for HandleInner {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl fmt::Debug for StageHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StageHandle")
            .field("name", &self.inner.shared.name)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Marks the stage stopped when the thread exits, even by panic, so submits are refused.
struct MarkStopped<'a>(&'a Shared);

impl Drop for MarkStopped<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            tracing::error!(stage = %self.0.name, "stage thread died; the stage is stopped");
        }
        self.0.lock().stopped = true;
    }
}

/// The thread's side: owns the engine.
struct Worker<E> {
    shared: Arc<Shared>,
    engine: E,
    sink: EventSink,
}

/// The observer's failure label for an error.
fn failure_reason(err: &EngineError) -> &'static str {
    match err {
        EngineError::InvalidInput(_) => "invalid_input",
        EngineError::Compute(_) => "compute",
        EngineError::Unavailable(_) => "unavailable",
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_owned()
    }
}

impl<E: StageEngine> Worker<E> {
    fn run(mut self) {
        let shared = Arc::clone(&self.shared);
        let _stopped = MarkStopped(&shared);
        tracing::debug!(stage = %shared.name, "stage thread started");
        while let Some((releases, feeds, plan)) = self.wait_for_work() {
            self.release(&releases);
            let plan = if feeds.is_empty() {
                plan
            } else {
                // Fed jobs may be runnable now: plan again with their new state.
                self.feed(feeds);
                self.shared.lock().batch.plan(Instant::now())
            };
            let work = self.admit_waiting(plan);
            if !work.is_empty() {
                self.step(work);
            }
        }
        self.fail_remaining();
        tracing::debug!(stage = %shared.name, "stage thread stopped");
    }

    /// Blocks until there is something to do: cancelled jobs to release, or a step to form.
    /// `None` once shutdown is requested.
    #[allow(clippy::type_complexity)]
    fn wait_for_work(
        &mut self,
    ) -> Option<(Vec<JobId>, Vec<(JobId, Vec<Payload>, bool)>, StepPlan)> {
        let mut queue = self.shared.lock();
        loop {
            if queue.stopping {
                return None;
            }
            let now = Instant::now();
            let plan = queue.batch.plan(now);
            let can_admit = plan.hold_until().is_none() && queue.batch.waiting_len() > 0;
            if !queue.to_release.is_empty()
                || !queue.to_feed.is_empty()
                || !plan.work().is_empty()
                || can_admit
            {
                return Some((
                    std::mem::take(&mut queue.to_release),
                    std::mem::take(&mut queue.to_feed),
                    plan,
                ));
            }
            queue = match plan.hold_until() {
                Some(until) => {
                    let timeout = until.saturating_duration_since(now);
                    self.shared
                        .wake
                        .wait_timeout(queue, timeout)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => self
                    .shared
                    .wake
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner),
            };
        }
    }

    /// Releases jobs' engine state and records the engine's new `state_bytes`.
    fn release(&mut self, jobs: &[JobId]) {
        if jobs.is_empty() {
            return;
        }
        for &job in jobs {
            self.engine.release(job);
        }
        let stats = self.engine.stats();
        self.shared.lock().engine_stats = stats;
    }

    /// Hands streamed input to the engine (outside the lock) and records whether each fed job
    /// still waits for more. A refused feed fails the job.
    fn feed(&mut self, feeds: Vec<(JobId, Vec<Payload>, bool)>) {
        for (job, more, last) in feeds {
            if !self.shared.lock().batch.is_running(job) {
                continue; // Ended or cancelled meanwhile.
            }
            let outcome = catch_unwind(AssertUnwindSafe(|| self.engine.feed(job, more, last)));
            let failure = match outcome {
                Ok(Ok(())) => None,
                Ok(Err(err)) => Some((err, false)),
                Err(payload) => {
                    let msg = panic_message(payload.as_ref());
                    tracing::error!(stage = %self.shared.name, %job, panic = %msg, "engine panicked in feed");
                    let err = EngineError::Compute(format!(
                        "stage '{}': engine panicked while taking streamed input: {msg}",
                        self.shared.name
                    ));
                    Some((err, true))
                }
            };
            match failure {
                None => {
                    let awaiting = self.engine.awaiting_input(job);
                    self.shared.lock().batch.set_awaiting(job, awaiting);
                }
                Some((err, panicked)) => {
                    self.engine.release(job);
                    let ended = {
                        let mut queue = self.shared.lock();
                        let ended = queue.batch.finish(job);
                        self.shared.queue_changed(&queue);
                        ended
                    };
                    if ended {
                        self.shared.observer.job_failed(if panicked {
                            "panic"
                        } else {
                            failure_reason(&err)
                        });
                        (self.sink)(job, StageEvent::Failed(err));
                    }
                }
            }
        }
        let stats = self.engine.stats();
        self.shared.lock().engine_stats = stats;
    }

    /// Admits waiting jobs into `plan` one by one (engine calls outside the lock) and returns the
    /// step's work, less any job cancelled meanwhile.
    fn admit_waiting(&mut self, mut plan: StepPlan) -> Vec<StepWork> {
        let mut queue = self.shared.lock();
        while let Some((job, input)) = queue.batch.next_admission(&mut plan) {
            drop(queue);
            let (result, panicked) = self.admit(job, input);
            queue = self.shared.lock();
            let outcome = queue.batch.finish_admission(&mut plan, job, result);
            self.shared.queue_changed(&queue);
            match outcome {
                AdmitOutcome::Admitted => {
                    drop(queue);
                    let awaiting = self.engine.awaiting_input(job);
                    (self.sink)(job, StageEvent::Admitted);
                    queue = self.shared.lock();
                    queue.batch.set_awaiting(job, awaiting);
                }
                AdmitOutcome::Rejected(err) => {
                    drop(queue);
                    if panicked {
                        self.release(&[job]);
                    }
                    self.shared.observer.job_failed(if panicked {
                        "panic"
                    } else {
                        failure_reason(&err)
                    });
                    (self.sink)(job, StageEvent::Failed(err));
                    queue = self.shared.lock();
                }
                AdmitOutcome::Cancelled { must_release } => {
                    if must_release || panicked {
                        drop(queue);
                        self.release(&[job]);
                        queue = self.shared.lock();
                    }
                }
            }
        }
        let mut work = plan.into_work();
        work.retain(|w| queue.batch.is_running(w.job));
        work
    }

    /// `engine.admit`, with a panic turned into a compute error (second value: it panicked).
    fn admit(&mut self, job: JobId, input: StageInput) -> (Result<usize, EngineError>, bool) {
        match catch_unwind(AssertUnwindSafe(|| self.engine.admit(job, input))) {
            Ok(result) => (result, false),
            Err(payload) => {
                let msg = panic_message(payload.as_ref());
                tracing::error!(stage = %self.shared.name, %job, panic = %msg, "engine panicked in admit");
                let err = EngineError::Compute(format!(
                    "stage '{}': engine panicked while admitting the job: {msg}",
                    self.shared.name
                ));
                (Err(err), true)
            }
        }
    }

    /// Runs one engine step and delivers its events; a failed or panicking step fails and releases
    /// every job in it that had not ended.
    fn step(&mut self, work: Vec<StepWork>) {
        let tokens = work.iter().map(|w| w.token_budget).sum();
        let mut events: Vec<(JobId, StageEvent)> = Vec::new();
        let started = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            self.engine
                .step(&work, &mut |job, event| events.push((job, event)))
        }));
        let elapsed = started.elapsed();
        tracing::trace!(
            stage = %self.shared.name,
            jobs = work.len(),
            tokens,
            ms = elapsed.as_secs_f64() * 1e3,
            "step"
        );

        let failure = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(err)) => {
                tracing::warn!(stage = %self.shared.name, error = %err, "engine step failed");
                let msg = match err {
                    EngineError::Compute(msg) => msg,
                    other => other.to_string(),
                };
                Some((EngineError::Compute(msg), "compute"))
            }
            Err(payload) => {
                let msg = panic_message(payload.as_ref());
                tracing::error!(stage = %self.shared.name, panic = %msg, "engine panicked in step");
                let msg = format!("stage '{}': engine panicked: {msg}", self.shared.name);
                Some((EngineError::Compute(msg), "panic"))
            }
        };

        // Jobs the engine ended itself (it has released them).
        let ended: HashSet<JobId> = events
            .iter()
            .filter(|(_, e)| matches!(e, StageEvent::Finished { .. } | StageEvent::Failed(_)))
            .map(|(job, _)| *job)
            .collect();
        let unended = work
            .iter()
            .map(|w| w.job)
            .filter(|job| !ended.contains(job));
        #[allow(clippy::type_complexity)]
        let (failed, pending): (Vec<JobId>, Vec<(JobId, usize, bool)>) = if failure.is_some() {
            let failed: Vec<JobId> = unended.collect();
            for &job in &failed {
                self.engine.release(job);
            }
            (failed, Vec::new())
        } else {
            let pending = unended
                .map(|job| {
                    let e = &self.engine;
                    (job, e.pending_input(job), e.awaiting_input(job))
                })
                .collect();
            (Vec::new(), pending)
        };
        let stats = self.engine.stats();

        let mut deliver = Vec::with_capacity(events.len() + failed.len());
        {
            let mut queue = self.shared.lock();
            queue.steps_total += 1;
            queue.engine_stats = stats;
            for (job, event) in events {
                let ends = matches!(event, StageEvent::Finished { .. } | StageEvent::Failed(_));
                if !queue.batch.is_running(job) {
                    // Cancelled during the step: drop its events; if the engine already released
                    // it, don't release it again.
                    if ends {
                        queue.to_release.retain(|j| *j != job);
                    }
                    continue;
                }
                if ends {
                    queue.batch.finish(job);
                }
                deliver.push((job, event));
            }
            if let Some((err, _)) = &failure {
                for &job in &failed {
                    queue.to_release.retain(|j| *j != job);
                    if queue.batch.finish(job) {
                        deliver.push((job, StageEvent::Failed(err.clone())));
                    }
                }
            }
            for (job, n, awaiting) in pending {
                queue.batch.set_pending(job, n);
                queue.batch.set_awaiting(job, awaiting);
            }
            self.shared.queue_changed(&queue);
        }

        let observer = &self.shared.observer;
        observer.step_done(work.len(), tokens, elapsed);
        let step_failure = failure.map(|(_, reason)| reason);
        for (job, event) in deliver {
            if let StageEvent::Failed(err) = &event {
                let from_step = failed.contains(&job);
                observer.job_failed(match step_failure {
                    Some(reason) if from_step => reason,
                    _ => failure_reason(err),
                });
            }
            (self.sink)(job, event);
        }
    }

    /// On shutdown: releases and fails every job still here.
    fn fail_remaining(&mut self) {
        let (drained, releases) = {
            let mut queue = self.shared.lock();
            let drained = queue.batch.drain();
            let releases = std::mem::take(&mut queue.to_release);
            self.shared.queue_changed(&queue);
            (drained, releases)
        };
        let mut release = releases;
        release.extend_from_slice(&drained.running);
        self.release(&release);
        let err = EngineError::Compute(format!("stage '{}' shut down", self.shared.name));
        for job in drained.running.into_iter().chain(drained.waiting) {
            self.shared.observer.job_failed("shutdown");
            (self.sink)(job, StageEvent::Failed(err.clone()));
        }
    }
}
