//! The stage thread end to end, with a small deterministic engine standing in for a model.

use crossbeam_channel::{unbounded, Receiver, Sender};
use omnistage_scheduler::{
    spawn_stage, BatchLimits, EventSink, StageHandle, StageObserver, SubmitError,
};
use omnistage_stages::{
    EngineError, FinishReason, JobId, JobRequest, Modality, Payload, Prompt, SamplingParams,
    StageEngine, StageEvent, StageInput, StepWork, Usage,
};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);
const BYTES_PER_JOB: usize = 1000;

// ---------------------------------------------------------------------------------------------
// The test engine

/// What the engine saw, for assertions.
#[derive(Default)]
struct Log {
    steps: Vec<Vec<StepWork>>,
    released: Vec<JobId>,
}

/// Lets a test hold each step: the engine reports the step's work on `started`, then waits for a
/// `go` (or runs freely once the test drops the sender).
struct Gate {
    started: Sender<Vec<StepWork>>,
    go: Receiver<()>,
}

#[derive(Clone, Copy)]
enum Failure {
    Panic,
    Error,
}

struct JobState {
    prompt_len: usize,
    prompt_left: usize,
    to_emit: usize,
    emitted: usize,
}

/// Prefill cost = prompt length in bytes; then emits `max_tokens` tokens (0, 1, 2, ...), one per
/// step, the first on the step that finishes the prefill. Holds `BYTES_PER_JOB` per job.
struct TestEngine {
    jobs: HashMap<JobId, JobState>,
    log: Arc<Mutex<Log>>,
    gate: Option<Gate>,
    fail_when: Option<(JobId, Failure)>,
    dropped: Arc<AtomicBool>,
}

impl TestEngine {
    fn new() -> Self {
        TestEngine {
            jobs: HashMap::new(),
            log: Arc::default(),
            gate: None,
            fail_when: None,
            dropped: Arc::default(),
        }
    }

    /// Adds a gate; returns (started steps, go sender).
    fn gated(mut self) -> (Self, Receiver<Vec<StepWork>>, Sender<()>) {
        let (started_tx, started_rx) = unbounded();
        let (go_tx, go_rx) = unbounded();
        self.gate = Some(Gate {
            started: started_tx,
            go: go_rx,
        });
        (self, started_rx, go_tx)
    }

    fn log(&self) -> Arc<Mutex<Log>> {
        Arc::clone(&self.log)
    }
}

impl Drop for TestEngine {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}

impl StageEngine for TestEngine {
    fn admit(&mut self, job: JobId, input: StageInput) -> Result<usize, EngineError> {
        let prompt_len = match &input.request.prompt {
            Prompt::Completion(text) | Prompt::Speak(text) => text.len(),
            Prompt::Tokens(ids) => ids.len(),
            Prompt::Chat(_) => 0,
        };
        if prompt_len == 0 {
            return Err(EngineError::InvalidInput("empty prompt".into()));
        }
        let to_emit = input.request.sampling.max_tokens.unwrap_or(1);
        self.jobs.insert(
            job,
            JobState {
                prompt_len,
                prompt_left: prompt_len,
                to_emit,
                emitted: 0,
            },
        );
        Ok(prompt_len)
    }

    fn pending_input(&self, job: JobId) -> usize {
        self.jobs.get(&job).map_or(0, |j| j.prompt_left)
    }

    fn step(
        &mut self,
        work: &[StepWork],
        emit: &mut dyn FnMut(JobId, StageEvent),
    ) -> Result<(), EngineError> {
        self.log.lock().unwrap().steps.push(work.to_vec());
        if let Some(gate) = &self.gate {
            let _ = gate.started.send(work.to_vec());
            let _ = gate.go.recv_timeout(WAIT);
        }
        if let Some((bad, failure)) = self.fail_when {
            if work.iter().any(|w| w.job == bad) {
                match failure {
                    Failure::Panic => panic!("boom in {bad}"),
                    Failure::Error => return Err(EngineError::Compute(format!("boom in {bad}"))),
                }
            }
        }
        for w in work {
            let state = self.jobs.get_mut(&w.job).expect("step for an admitted job");
            assert!(w.token_budget >= 1, "{w:?}");
            if state.prompt_left > 0 {
                assert!(
                    w.token_budget <= state.prompt_left,
                    "{w:?} exceeds the prompt"
                );
                state.prompt_left -= w.token_budget;
                if state.prompt_left > 0 {
                    continue;
                }
            } else {
                assert_eq!(w.token_budget, 1, "a decoding job gets one token");
            }
            let token = state.emitted as u32;
            state.emitted += 1;
            emit(
                w.job,
                StageEvent::Output(vec![Payload::Tokens(Arc::from([token]))]),
            );
            if state.emitted == state.to_emit {
                let usage = Usage {
                    prompt_tokens: state.prompt_len,
                    completion_tokens: state.emitted,
                };
                self.jobs.remove(&w.job);
                emit(
                    w.job,
                    StageEvent::Finished {
                        reason: FinishReason::Length,
                        usage,
                    },
                );
            }
        }
        Ok(())
    }

    fn release(&mut self, job: JobId) {
        self.log.lock().unwrap().released.push(job);
        self.jobs.remove(&job);
    }

    fn state_bytes(&self) -> usize {
        self.jobs.len() * BYTES_PER_JOB
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

#[derive(Default)]
struct Recorder {
    steps: AtomicUsize,
    failures: Mutex<Vec<String>>,
}

impl StageObserver for Recorder {
    fn step_done(&self, _batch_size: usize, _tokens: usize, _elapsed: Duration) {
        self.steps.fetch_add(1, Ordering::SeqCst);
    }
    fn queue_changed(&self, _waiting: usize, _running: usize) {}
    fn job_failed(&self, reason: &str) {
        self.failures.lock().unwrap().push(reason.to_owned());
    }
}

fn limits(max_batch_size: usize, max_batched_tokens: usize, max_queue: usize) -> BatchLimits {
    BatchLimits {
        max_batch_size,
        max_batched_tokens,
        max_wait: Duration::ZERO,
        max_queue,
    }
}

fn input(prompt_len: usize, max_tokens: usize) -> StageInput {
    StageInput {
        request: Arc::new(JobRequest {
            id: JobId(0),
            prompt: Prompt::Completion("x".repeat(prompt_len)),
            sampling: SamplingParams {
                max_tokens: Some(max_tokens),
                ..SamplingParams::default()
            },
            outputs: vec![Modality::Text],
            deadline: Instant::now() + Duration::from_secs(3600),
            image: None,
            media: Vec::new(),
            audio: None,
            route: Default::default(),
        }),
        upstream: Vec::new(),
        client_facing: true,
        streaming: false,
    }
}

type Events = Receiver<(JobId, StageEvent)>;

/// Starts a stage whose sink forwards every event except `Admitted` (see
/// `admission_is_reported_before_any_output`).
fn start(engine: TestEngine, limits: BatchLimits) -> (StageHandle, Events, Arc<Recorder>) {
    let (tx, rx) = unbounded();
    let sink: EventSink = Arc::new(move |job, event| {
        if event != StageEvent::Admitted {
            let _ = tx.send((job, event));
        }
    });
    let recorder = Arc::new(Recorder::default());
    let handle = spawn_stage("llm".into(), engine, limits, recorder.clone(), sink);
    (handle, rx, recorder)
}

fn recv<T>(rx: &Receiver<T>) -> T {
    rx.recv_timeout(WAIT).expect("nothing arrived within 10 s")
}

fn is_end(event: &StageEvent) -> bool {
    matches!(event, StageEvent::Finished { .. } | StageEvent::Failed(_))
}

/// Receives events until each of `jobs` has ended; returns every event by job, in arrival order.
fn collect(rx: &Events, jobs: &[JobId]) -> HashMap<JobId, Vec<StageEvent>> {
    let mut open: HashSet<JobId> = jobs.iter().copied().collect();
    let mut by_job: HashMap<JobId, Vec<StageEvent>> = HashMap::new();
    while !open.is_empty() {
        let (job, event) = recv(rx);
        if is_end(&event) {
            open.remove(&job);
        }
        by_job.entry(job).or_default().push(event);
    }
    by_job
}

/// The token ids a job's Output events carried.
fn tokens(events: &[StageEvent]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match e {
            StageEvent::Output(p) => Some(p),
            _ => None,
        })
        .flatten()
        .flat_map(|p| match p {
            Payload::Tokens(t) => t.to_vec(),
            other => panic!("unexpected payload {other:?}"),
        })
        .collect()
}

fn shares(work: &[StepWork]) -> Vec<(u64, usize)> {
    let mut s: Vec<_> = work.iter().map(|w| (w.job.0, w.token_budget)).collect();
    s.sort();
    s
}

/// Waits (bounded) for a condition the stage thread makes true shortly after an observable point.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn continuous_batching_joins_at_the_next_step_and_leaves_at_once() {
    let (engine, started, go) = TestEngine::new().gated();
    let (stage, events, _) = start(engine, limits(8, 64, 16));
    let (a, b) = (JobId(1), JobId(2));

    stage.submit(a, input(2, 3)).unwrap();
    assert_eq!(shares(&recv(&started)), vec![(1, 2)]);
    stage.submit(b, input(2, 5)).unwrap(); // arrives while step 1 runs
    go.send(()).unwrap();

    let mut steps = Vec::new();
    for _ in 0..5 {
        steps.push(shares(&recv(&started)));
        go.send(()).unwrap();
    }
    assert_eq!(
        steps,
        vec![
            vec![(1, 1), (2, 2)], // b joins at the next step with its whole prefill
            vec![(1, 1), (2, 1)], // a emits its 3rd token and finishes
            vec![(2, 1)],         // a has left at once
            vec![(2, 1)],
            vec![(2, 1)], // b's 5th token
        ]
    );

    let by_job = collect(&events, &[a, b]);
    assert_eq!(tokens(&by_job[&a]), vec![0, 1, 2]);
    assert_eq!(tokens(&by_job[&b]), vec![0, 1, 2, 3, 4]);
    let stats = stage.stats();
    assert_eq!((stats.waiting, stats.running, stats.state_bytes), (0, 0, 0));
    assert_eq!(stats.steps_total, 6);
}

#[test]
fn a_full_queue_refuses_with_the_stage_name() {
    let (engine, started, go) = TestEngine::new().gated();
    let (stage, events, _) = start(engine, limits(1, 8, 2));

    stage.submit(JobId(1), input(1, 2)).unwrap();
    recv(&started); // job 1 is running; the next two wait
    stage.submit(JobId(2), input(1, 2)).unwrap();
    stage.submit(JobId(3), input(1, 2)).unwrap();
    let err = stage.submit(JobId(4), input(1, 2)).unwrap_err();
    assert_eq!(
        err,
        SubmitError::QueueFull {
            stage: "llm".into(),
            capacity: 2
        }
    );
    assert!(err.to_string().contains("llm"), "{err}");
    assert_eq!(stage.stats().waiting, 2);

    drop(go); // run freely
    let by_job = collect(&events, &[JobId(1), JobId(2), JobId(3)]);
    assert!(by_job
        .values()
        .all(|e| matches!(e.last(), Some(StageEvent::Finished { .. }))));
    assert!(!by_job.contains_key(&JobId(4)));
}

#[test]
fn cancelling_a_running_job_releases_it_and_silences_it() {
    let (engine, started, go) = TestEngine::new().gated();
    let log = engine.log();
    let (stage, events, _) = start(engine, limits(4, 16, 16));
    let (a, b) = (JobId(1), JobId(2));

    stage.submit(a, input(2, 1_000_000)).unwrap();
    recv(&started);
    go.send(()).unwrap();
    let (job, event) = recv(&events);
    assert_eq!(job, a);
    assert!(matches!(event, StageEvent::Output(_)));
    assert_eq!(stage.stats().state_bytes, BYTES_PER_JOB);

    assert!(stage.cancel(a));
    go.send(()).unwrap(); // lets a step already under way finish
    eventually("the release of the cancelled job", || {
        log.lock().unwrap().released.contains(&a)
    });
    eventually("state_bytes to drop to 0", || {
        let s = stage.stats();
        s.state_bytes == 0 && s.running == 0
    });
    assert!(!stage.cancel(a), "already gone");

    // Events are delivered in order from one thread: none for `a` may come before b's.
    drop(go);
    stage.submit(b, input(1, 2)).unwrap();
    let by_job = collect(&events, &[b]);
    assert!(
        !by_job.contains_key(&a),
        "events after cancel: {:?}",
        by_job.get(&a)
    );
    assert_eq!(
        log.lock().unwrap().released,
        vec![a],
        "released exactly once"
    );
}

#[test]
fn cancelling_a_waiting_job_never_reaches_the_engine() {
    let (engine, started, go) = TestEngine::new().gated();
    let log = engine.log();
    let (stage, events, _) = start(engine, limits(1, 8, 8));

    stage.submit(JobId(1), input(1, 2)).unwrap();
    recv(&started);
    stage.submit(JobId(2), input(1, 2)).unwrap();
    assert!(stage.cancel(JobId(2)));
    assert_eq!(stage.stats().waiting, 0);
    drop(go);

    let by_job = collect(&events, &[JobId(1)]);
    assert!(!by_job.contains_key(&JobId(2)));
    assert!(log.lock().unwrap().released.is_empty());
    let stepped: HashSet<JobId> = log
        .lock()
        .unwrap()
        .steps
        .iter()
        .flatten()
        .map(|w| w.job)
        .collect();
    assert_eq!(stepped, HashSet::from([JobId(1)]));
}

fn failing_step_fails_exactly_its_jobs(failure: Failure, reason: &str) {
    let mut engine = TestEngine::new();
    engine.fail_when = Some((JobId(1), failure));
    let log = engine.log();
    // A long max_wait with batch size 2: the first two jobs start together once both arrived.
    let limits = BatchLimits {
        max_wait: Duration::from_secs(60),
        ..limits(2, 16, 16)
    };
    let (stage, events, recorder) = start(engine, limits);

    stage.submit(JobId(1), input(1, 3)).unwrap();
    stage.submit(JobId(2), input(1, 3)).unwrap();
    let by_job = collect(&events, &[JobId(1), JobId(2)]);
    for job in [JobId(1), JobId(2)] {
        match by_job[&job].as_slice() {
            [StageEvent::Failed(EngineError::Compute(msg))] => {
                assert!(msg.contains("boom in job-1"), "{msg}")
            }
            other => panic!("{job}: {other:?}"),
        }
    }
    let mut released = log.lock().unwrap().released.clone();
    released.sort();
    assert_eq!(released, vec![JobId(1), JobId(2)]);
    assert_eq!(stage.stats().state_bytes, 0);

    // The stage keeps serving.
    stage.submit(JobId(3), input(2, 3)).unwrap();
    stage.submit(JobId(4), input(3, 2)).unwrap();
    let by_job = collect(&events, &[JobId(3), JobId(4)]);
    assert_eq!(tokens(&by_job[&JobId(3)]), vec![0, 1, 2]);
    assert_eq!(tokens(&by_job[&JobId(4)]), vec![0, 1]);
    assert!(matches!(
        by_job[&JobId(4)].last(),
        Some(StageEvent::Finished { .. })
    ));
    assert_eq!(*recorder.failures.lock().unwrap(), vec![reason, reason]);
    assert_eq!(stage.stats().state_bytes, 0);
}

#[test]
fn a_panicking_step_fails_exactly_its_jobs_and_the_stage_keeps_serving() {
    failing_step_fails_exactly_its_jobs(Failure::Panic, "panic");
}

#[test]
fn a_failed_step_fails_exactly_its_jobs_and_the_stage_keeps_serving() {
    failing_step_fails_exactly_its_jobs(Failure::Error, "compute");
}

#[test]
fn an_admission_error_fails_only_that_job() {
    let (stage, events, recorder) = start(TestEngine::new(), limits(4, 16, 16));
    stage.submit(JobId(1), input(0, 3)).unwrap(); // empty prompt: refused by the engine
    stage.submit(JobId(2), input(2, 3)).unwrap();
    let by_job = collect(&events, &[JobId(1), JobId(2)]);
    assert!(matches!(
        by_job[&JobId(1)].as_slice(),
        [StageEvent::Failed(EngineError::InvalidInput(_))]
    ));
    assert_eq!(tokens(&by_job[&JobId(2)]), vec![0, 1, 2]);
    assert_eq!(*recorder.failures.lock().unwrap(), vec!["invalid_input"]);
}

#[test]
fn events_arrive_in_order() {
    // A budget of 4 chunks the prompts, so prefill and decode interleave across jobs.
    let (stage, events, _) = start(TestEngine::new(), limits(4, 4, 16));
    let jobs: Vec<JobId> = (1..=4).map(JobId).collect();
    for (i, &job) in jobs.iter().enumerate() {
        stage.submit(job, input(3 + 4 * i, 20 + i)).unwrap();
    }
    let by_job = collect(&events, &jobs);
    for (i, job) in jobs.iter().enumerate() {
        let events = &by_job[job];
        let expected: Vec<u32> = (0..(20 + i) as u32).collect();
        assert_eq!(tokens(events), expected, "{job}");
        assert_eq!(events.iter().filter(|e| is_end(e)).count(), 1);
        match events.last() {
            Some(StageEvent::Finished { reason, usage }) => {
                assert_eq!(*reason, FinishReason::Length);
                assert_eq!(usage.prompt_tokens, 3 + 4 * i);
                assert_eq!(usage.completion_tokens, 20 + i);
            }
            other => panic!("{job} ended with {other:?}"),
        }
    }
}

#[test]
fn many_concurrent_jobs_all_finish() {
    const JOBS: u64 = 200;
    let engine = TestEngine::new();
    let log = engine.log();
    let (stage, events, recorder) = start(engine, limits(16, 64, JOBS as usize));

    let submitters: Vec<_> = (0..8u64)
        .map(|t| {
            let stage = stage.clone();
            thread::spawn(move || {
                for id in (t..JOBS).step_by(8) {
                    let prompt = 1 + (id as usize * 7) % 100;
                    let max_tokens = 1 + id as usize % 20;
                    stage.submit(JobId(id), input(prompt, max_tokens)).unwrap();
                }
            })
        })
        .collect();
    for s in submitters {
        s.join().unwrap();
    }

    let all: Vec<JobId> = (0..JOBS).map(JobId).collect();
    let by_job = collect(&events, &all);
    for job in &all {
        let n = 1 + job.0 as usize % 20;
        assert_eq!(tokens(&by_job[job]).len(), n, "{job}");
        assert!(matches!(
            by_job[job].last(),
            Some(StageEvent::Finished { .. })
        ));
    }

    let log = log.lock().unwrap();
    for step in &log.steps {
        assert!(step.len() <= 16, "batch of {}", step.len());
        assert!(step.iter().map(|w| w.token_budget).sum::<usize>() <= 64);
        let distinct: HashSet<JobId> = step.iter().map(|w| w.job).collect();
        assert_eq!(distinct.len(), step.len(), "a job twice in one step");
    }
    let stats = stage.stats();
    assert_eq!((stats.waiting, stats.running, stats.state_bytes), (0, 0, 0));
    assert_eq!(stats.steps_total as usize, log.steps.len());
    assert_eq!(recorder.steps.load(Ordering::SeqCst), log.steps.len());
}

#[test]
fn a_partial_batch_waits_for_max_wait() {
    let wait = Duration::from_millis(100);
    let limits = BatchLimits {
        max_wait: wait,
        ..limits(4, 16, 16)
    };
    let (stage, events, _) = start(TestEngine::new(), limits);
    let submitted = Instant::now();
    stage.submit(JobId(1), input(1, 1)).unwrap();
    let _ = recv(&events);
    assert!(
        submitted.elapsed() >= wait,
        "started after {:?}",
        submitted.elapsed()
    );
}

#[test]
fn shutdown_fails_pending_jobs_and_refuses_new_ones() {
    let (engine, started, go) = TestEngine::new().gated();
    let log = engine.log();
    let (stage, events, recorder) = start(engine, limits(1, 8, 8));

    stage.submit(JobId(1), input(1, 1_000_000)).unwrap();
    recv(&started);
    stage.submit(JobId(2), input(1, 1)).unwrap(); // waits: batch size 1
    drop(go);
    stage.shutdown();

    let by_job = collect(&events, &[JobId(1), JobId(2)]);
    for job in [JobId(1), JobId(2)] {
        match by_job[&job].last() {
            Some(StageEvent::Failed(EngineError::Compute(msg))) => {
                assert!(msg.contains("llm") && msg.contains("shut down"), "{msg}")
            }
            other => panic!("{job} ended with {other:?}"),
        }
    }
    assert_eq!(log.lock().unwrap().released, vec![JobId(1)]);
    assert_eq!(stage.stats().state_bytes, 0);
    assert_eq!(
        stage.submit(JobId(3), input(1, 1)),
        Err(SubmitError::Stopped {
            stage: "llm".into()
        })
    );
    assert_eq!(
        *recorder.failures.lock().unwrap(),
        vec!["shutdown", "shutdown"]
    );
}

#[test]
fn dropping_the_last_handle_stops_the_thread() {
    let engine = TestEngine::new();
    let dropped = Arc::clone(&engine.dropped);
    let (stage, events, _) = start(engine, limits(4, 16, 16));
    let other = stage.clone();
    drop(stage);
    other.submit(JobId(1), input(1, 2)).unwrap();
    collect(&events, &[JobId(1)]);
    assert!(!dropped.load(Ordering::SeqCst));
    drop(other);
    assert!(
        dropped.load(Ordering::SeqCst),
        "the thread was joined and dropped its engine"
    );
}

#[test]
fn the_sink_may_call_back_into_its_own_stage() {
    // A two-pass pipeline on one stage: when job n finishes, the sink submits job n + 100.
    let (tx, rx) = unbounded();
    let slot: Arc<Mutex<Option<StageHandle>>> = Arc::default();
    let sink_slot = Arc::clone(&slot);
    let sink: EventSink = Arc::new(move |job: JobId, event: StageEvent| {
        if event == StageEvent::Admitted {
            return;
        }
        if matches!(event, StageEvent::Finished { .. }) && job.0 < 100 {
            let stage = sink_slot.lock().unwrap().clone().expect("handle set");
            stage.submit(JobId(job.0 + 100), input(1, 1)).unwrap();
        }
        let _ = tx.send((job, event));
    });
    let stage = spawn_stage(
        "loop".into(),
        TestEngine::new(),
        limits(4, 16, 16),
        Arc::new(omnistage_scheduler::NoopObserver),
        sink,
    );
    *slot.lock().unwrap() = Some(stage.clone());
    stage.submit(JobId(1), input(1, 2)).unwrap();
    collect(&rx, &[JobId(1), JobId(101)]);
    slot.lock().unwrap().take(); // break the cycle so dropping `stage` stops the thread
}

#[test]
fn admission_is_reported_before_any_output() {
    let (tx, rx) = unbounded();
    let sink: EventSink = Arc::new(move |job, event| {
        let _ = tx.send((job, event));
    });
    let stage = spawn_stage(
        "admit".into(),
        TestEngine::new(),
        limits(1, 16, 16),
        Arc::new(omnistage_scheduler::NoopObserver),
        sink,
    );
    // Batch size 1: the second job waits in the queue until the first finishes.
    stage.submit(JobId(1), input(1, 2)).unwrap();
    stage.submit(JobId(2), input(1, 2)).unwrap();
    let mut by_job: HashMap<JobId, Vec<StageEvent>> = HashMap::new();
    let mut order = Vec::new();
    while by_job
        .values()
        .filter(|e| e.last().is_some_and(is_end))
        .count()
        < 2
    {
        let (job, event) = recv(&rx);
        order.push((job, event == StageEvent::Admitted));
        by_job.entry(job).or_default().push(event);
    }
    for job in [JobId(1), JobId(2)] {
        let events = &by_job[&job];
        assert_eq!(events[0], StageEvent::Admitted, "{job}: {events:?}");
        assert_eq!(
            events
                .iter()
                .filter(|e| **e == StageEvent::Admitted)
                .count(),
            1
        );
    }
    let second_admitted = order.iter().position(|&(j, a)| j == JobId(2) && a).unwrap();
    let first_ended = order.iter().rposition(|&(j, _)| j == JobId(1)).unwrap();
    assert!(
        second_admitted > first_ended,
        "job 2 was admitted while job 1 held the only slot"
    );
}
