//! Streamed input at the stage thread: jobs fed chunk by chunk, jobs that wait for input get no
//! steps (and cost nothing), input for a queued job joins its first chunk, and a held job (its
//! consumer lags) pauses until released.

use crossbeam_channel::{unbounded, Receiver};
use omnistage_scheduler::{spawn_stage, BatchLimits, EventSink, NoopObserver, StageHandle};
use omnistage_stages::{
    EngineError, FinishReason, JobId, JobRequest, Modality, Payload, Prompt, SamplingParams,
    StageEngine, StageEvent, StageInput, StepWork, Usage,
};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);

/// Echoes its streamed token input, one token per step; waits while its buffer is empty and the
/// stream is open; finishes once the stream is closed and drained.
struct EchoEngine {
    jobs: HashMap<JobId, Echo>,
    steps: Arc<AtomicUsize>,
}

struct Echo {
    buffer: VecDeque<u32>,
    closed: bool,
    echoed: usize,
}

fn tokens_of(payloads: &[Payload]) -> Result<Vec<u32>, EngineError> {
    let mut out = Vec::new();
    for p in payloads {
        match p {
            Payload::Tokens(t) => out.extend_from_slice(t),
            other => {
                return Err(EngineError::InvalidInput(format!(
                    "echo takes tokens, not {}",
                    other.kind()
                )))
            }
        }
    }
    Ok(out)
}

impl StageEngine for EchoEngine {
    fn admit(&mut self, job: JobId, input: StageInput) -> Result<usize, EngineError> {
        let buffer = tokens_of(&input.upstream)?.into();
        self.jobs.insert(
            job,
            Echo {
                buffer,
                closed: !input.streaming,
                echoed: 0,
            },
        );
        Ok(0)
    }

    fn pending_input(&self, _job: JobId) -> usize {
        0
    }

    fn step(
        &mut self,
        work: &[StepWork],
        emit: &mut dyn FnMut(JobId, StageEvent),
    ) -> Result<(), EngineError> {
        self.steps.fetch_add(1, Ordering::SeqCst);
        for w in work {
            let Some(e) = self.jobs.get_mut(&w.job) else {
                continue;
            };
            if let Some(t) = e.buffer.pop_front() {
                e.echoed += 1;
                emit(w.job, StageEvent::Consumed(1));
                emit(
                    w.job,
                    StageEvent::Output(vec![Payload::Tokens(vec![t].into())]),
                );
            }
            if e.closed && e.buffer.is_empty() {
                let echoed = e.echoed;
                self.jobs.remove(&w.job);
                emit(
                    w.job,
                    StageEvent::Finished {
                        reason: FinishReason::Stop,
                        usage: Usage {
                            prompt_tokens: 0,
                            completion_tokens: echoed,
                        },
                    },
                );
            }
        }
        Ok(())
    }

    fn feed(&mut self, job: JobId, more: Vec<Payload>, last: bool) -> Result<(), EngineError> {
        let e = self
            .jobs
            .get_mut(&job)
            .ok_or_else(|| EngineError::InvalidInput("unknown job".into()))?;
        if e.closed {
            return Err(EngineError::InvalidInput(
                "input after the last chunk".into(),
            ));
        }
        e.buffer.extend(tokens_of(&more)?);
        e.closed = last;
        Ok(())
    }

    fn awaiting_input(&self, job: JobId) -> bool {
        self.jobs
            .get(&job)
            .is_some_and(|e| e.buffer.is_empty() && !e.closed)
    }

    fn release(&mut self, job: JobId) {
        self.jobs.remove(&job);
    }

    fn state_bytes(&self) -> usize {
        0
    }
}

fn streamed_input(first: &[u32]) -> StageInput {
    StageInput {
        request: Arc::new(JobRequest {
            id: JobId(0),
            prompt: Prompt::Completion(String::new()),
            sampling: SamplingParams::default(),
            outputs: vec![Modality::Audio],
            deadline: Instant::now() + Duration::from_secs(3600),
            image: None,
            media: Vec::new(),
            audio: None,
            route: Default::default(),
        }),
        upstream: vec![Payload::Tokens(first.to_vec().into())],
        client_facing: false,
        streaming: true,
    }
}

fn tokens(v: &[u32]) -> Vec<Payload> {
    vec![Payload::Tokens(v.to_vec().into())]
}

type Events = Receiver<(JobId, StageEvent)>;

fn start(max_batch_size: usize) -> (StageHandle, Events, Arc<AtomicUsize>) {
    let (tx, rx) = unbounded();
    let sink: EventSink = Arc::new(move |job, event| {
        if !matches!(event, StageEvent::Admitted | StageEvent::Consumed(_)) {
            let _ = tx.send((job, event));
        }
    });
    let steps = Arc::new(AtomicUsize::new(0));
    let engine = EchoEngine {
        jobs: HashMap::new(),
        steps: steps.clone(),
    };
    let limits = BatchLimits {
        max_batch_size,
        max_batched_tokens: 64,
        max_wait: Duration::ZERO,
        max_queue: 16,
    };
    let handle = spawn_stage("echo".into(), engine, limits, Arc::new(NoopObserver), sink);
    (handle, rx, steps)
}

/// Receives `n` echoed tokens of `job` (and nothing else).
fn echoed(rx: &Events, job: JobId, n: usize) -> Vec<u32> {
    let mut out = Vec::new();
    while out.len() < n {
        match rx.recv_timeout(WAIT).expect("nothing arrived within 10 s") {
            (j, StageEvent::Output(p)) if j == job => match &p[..] {
                [Payload::Tokens(t)] => out.extend_from_slice(t),
                other => panic!("unexpected output {other:?}"),
            },
            other => panic!("unexpected event {other:?}"),
        }
    }
    out
}

fn finished(rx: &Events, job: JobId) -> usize {
    match rx.recv_timeout(WAIT).expect("no finish within 10 s") {
        (j, StageEvent::Finished { usage, .. }) if j == job => usage.completion_tokens,
        other => panic!("expected {job} to finish, got {other:?}"),
    }
}

#[test]
fn a_fed_job_runs_chunk_by_chunk_and_costs_no_steps_while_it_waits() {
    let (stage, rx, steps) = start(4);
    let job = JobId(1);
    stage.submit(job, streamed_input(&[1, 2])).unwrap();
    assert_eq!(echoed(&rx, job, 2), vec![1, 2]);
    // Starved: the thread sleeps instead of stepping the job.
    thread::sleep(Duration::from_millis(50));
    let idle = steps.load(Ordering::SeqCst);
    thread::sleep(Duration::from_millis(100));
    assert_eq!(
        steps.load(Ordering::SeqCst),
        idle,
        "a starved job was stepped"
    );
    assert!(stage.feed(job, tokens(&[3, 4]), false));
    assert_eq!(echoed(&rx, job, 2), vec![3, 4]);
    assert!(stage.feed(job, tokens(&[5]), true));
    assert_eq!(echoed(&rx, job, 1), vec![5]);
    assert_eq!(finished(&rx, job), 5);
    assert!(
        !stage.feed(job, tokens(&[6]), true),
        "input for an ended job"
    );
    assert!(stage.stats().running == 0);
}

#[test]
fn input_for_a_queued_job_joins_its_first_chunk() {
    let (stage, rx, _) = start(1);
    let (a, b) = (JobId(1), JobId(2));
    stage.submit(a, streamed_input(&[1])).unwrap();
    assert_eq!(echoed(&rx, a, 1), vec![1]);
    // `a` holds the only slot, so `b` waits in the queue while its input arrives.
    stage.submit(b, streamed_input(&[10])).unwrap();
    assert!(stage.feed(b, tokens(&[11, 12]), false));
    assert!(stage.feed(b, tokens(&[13]), true));
    assert_eq!(stage.stats().waiting, 1);
    assert!(stage.feed(a, Vec::new(), true));
    assert_eq!(finished(&rx, a), 1);
    assert_eq!(echoed(&rx, b, 4), vec![10, 11, 12, 13]);
    assert_eq!(finished(&rx, b), 4);
}

#[test]
fn a_held_job_pauses_until_released_while_others_run() {
    let (stage, rx, _) = start(4);
    let (held, free) = (JobId(1), JobId(2));
    stage.submit(held, streamed_input(&[])).unwrap();
    // Hold it once it is admitted (it waits for input, so nothing comes out).
    let t0 = Instant::now();
    while !stage.hold(held, true) {
        assert!(t0.elapsed() < WAIT, "never admitted");
        thread::yield_now();
    }
    assert!(stage.feed(held, tokens(&[1, 2, 3]), true));
    stage.submit(free, streamed_input(&[7])).unwrap();
    assert!(stage.feed(free, Vec::new(), true));
    assert_eq!(echoed(&rx, free, 1), vec![7]);
    assert_eq!(finished(&rx, free), 1);
    assert!(
        rx.recv_timeout(Duration::from_millis(100)).is_err(),
        "a held job ran"
    );
    assert!(stage.hold(held, false));
    assert_eq!(echoed(&rx, held, 3), vec![1, 2, 3]);
    assert_eq!(finished(&rx, held), 3);
}

#[test]
fn a_refused_feed_fails_only_that_job() {
    let (stage, rx, _) = start(4);
    let job = JobId(1);
    stage.submit(job, streamed_input(&[1])).unwrap();
    assert_eq!(echoed(&rx, job, 1), vec![1]);
    let text = vec![Payload::Text("not tokens".into())];
    assert!(stage.feed(job, text, false));
    match rx.recv_timeout(WAIT).unwrap() {
        (j, StageEvent::Failed(EngineError::InvalidInput(m))) if j == job => {
            assert!(m.contains("echo takes tokens"), "{m}")
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    assert_eq!(stage.stats().running, 0);
}
