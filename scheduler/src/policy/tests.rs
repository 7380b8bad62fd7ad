use super::*;
use omnistage_stages::{JobRequest, Modality, Prompt, SamplingParams};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

fn limits(max_batch_size: usize, max_batched_tokens: usize, max_queue: usize) -> BatchLimits {
    BatchLimits {
        max_batch_size,
        max_batched_tokens,
        max_wait: Duration::ZERO,
        max_queue,
    }
}

/// A job whose prefill cost is `prompt_len` tokens (see `admit_by_len`).
fn input(prompt_len: usize) -> StageInput {
    StageInput {
        request: Arc::new(JobRequest {
            id: JobId(0),
            prompt: Prompt::Completion("x".repeat(prompt_len)),
            sampling: SamplingParams::default(),
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

/// Stands in for `engine.admit`: prefill = prompt length; an empty prompt is refused.
fn admit_by_len(_job: JobId, input: StageInput) -> Result<usize, EngineError> {
    match &input.request.prompt {
        Prompt::Completion(text) if !text.is_empty() => Ok(text.len()),
        _ => Err(EngineError::InvalidInput("empty prompt".into())),
    }
}

fn shares(plan: &StepPlan) -> Vec<(u64, usize)> {
    let mut s: Vec<_> = plan
        .work()
        .iter()
        .map(|w| (w.job.0, w.token_budget))
        .collect();
    s.sort();
    s
}

fn jobs(plan: &StepPlan) -> Vec<u64> {
    plan.work().iter().map(|w| w.job.0).collect()
}

/// A model-free engine double: tracks pending prefill per job and reports it back after a step.
#[derive(Default)]
struct Sim {
    pending: HashMap<JobId, usize>,
}

impl Sim {
    fn plan(&mut self, state: &mut BatchState, now: Instant) -> StepPlan {
        let (plan, rejected) = state.plan_with(now, |job, input| {
            let n = admit_by_len(job, input)?;
            self.pending.insert(job, n);
            Ok(n)
        });
        assert!(rejected.is_empty(), "unexpected rejections: {rejected:?}");
        plan
    }

    /// Runs the step: each job consumes its budget of pending input (decoders consume nothing).
    fn step(&mut self, state: &mut BatchState, plan: &StepPlan) {
        for w in plan.work() {
            let p = self.pending.get_mut(&w.job).expect("admitted");
            *p = p.saturating_sub(w.token_budget);
            state.set_pending(w.job, *p);
        }
    }
}

fn push(state: &mut BatchState, id: u64, prompt_len: usize, now: Instant) {
    state
        .push(JobId(id), input(prompt_len), now)
        .expect("queue has room");
}

#[test]
fn admits_in_fifo_order() {
    let now = Instant::now();
    let mut state = BatchState::new(limits(3, 100, 10));
    for id in 1..=5 {
        push(&mut state, id, 2, now);
    }
    let mut sim = Sim::default();
    let plan = sim.plan(&mut state, now);
    assert_eq!(jobs(&plan), vec![1, 2, 3]);
    assert_eq!(state.waiting_len(), 2);

    assert!(state.finish(JobId(2)));
    sim.step(&mut state, &plan);
    let plan = sim.plan(&mut state, now);
    let mut running = jobs(&plan);
    running.sort();
    assert_eq!(running, vec![1, 3, 4], "job 4 is next in line, before 5");
}

#[test]
fn max_batch_size_is_respected() {
    let now = Instant::now();
    let mut state = BatchState::new(limits(2, 100, 10));
    for id in 1..=5 {
        push(&mut state, id, 1, now);
    }
    let mut sim = Sim::default();
    for _ in 0..3 {
        let plan = sim.plan(&mut state, now);
        assert_eq!(plan.work().len(), 2);
        assert_eq!(state.running_len(), 2);
        assert_eq!(state.waiting_len(), 3);
        sim.step(&mut state, &plan);
    }
}

#[test]
fn budget_is_split_between_decodes_and_new_prefills() {
    let now = Instant::now();
    let mut state = BatchState::new(limits(8, 10, 10));
    let mut sim = Sim::default();
    push(&mut state, 1, 1, now);
    push(&mut state, 2, 1, now);
    let plan = sim.plan(&mut state, now);
    sim.step(&mut state, &plan); // 1 and 2 are now decoding

    push(&mut state, 3, 5, now);
    push(&mut state, 4, 6, now);
    push(&mut state, 5, 1, now);
    let plan = sim.plan(&mut state, now);
    assert_eq!(shares(&plan), vec![(1, 1), (2, 1), (3, 5), (4, 3)]);
    assert_eq!(plan.tokens(), 10);
    assert_eq!(plan.budget_left(), 0);
    assert_eq!(state.waiting_len(), 1, "no budget left to admit job 5");
}

#[test]
fn long_prompt_is_chunked_while_decodes_run_every_step() {
    let now = Instant::now();
    let mut state = BatchState::new(limits(4, 8, 10));
    let mut sim = Sim::default();
    push(&mut state, 1, 2, now);
    let plan = sim.plan(&mut state, now);
    sim.step(&mut state, &plan); // job 1 decodes from now on

    push(&mut state, 2, 20, now);
    let mut chunks = Vec::new();
    for _ in 0..4 {
        let plan = sim.plan(&mut state, now);
        let s = shares(&plan);
        assert_eq!(s[0], (1, 1), "the decode runs in every step: {s:?}");
        assert!(plan.tokens() <= 8);
        chunks.push(s[1].1);
        sim.step(&mut state, &plan);
    }
    assert_eq!(
        chunks,
        vec![7, 7, 6, 1],
        "20 prompt tokens in 7+7+6, then decoding"
    );
}

#[test]
fn running_prefills_continue_in_admission_order_until_the_budget_is_spent() {
    let now = Instant::now();
    let mut state = BatchState::new(limits(5, 5, 10));
    let mut sim = Sim::default();
    for id in 1..=5 {
        push(&mut state, id, 1, now);
    }
    let plan = sim.plan(&mut state, now);
    assert_eq!(plan.work().len(), 5);
    sim.step(&mut state, &plan);
    // The engine reports more input for 4 and 5 (e.g. a second modality to encode).
    state.set_pending(JobId(4), 10);
    state.set_pending(JobId(5), 10);
    sim.pending.insert(JobId(4), 10);
    sim.pending.insert(JobId(5), 10);

    let plan = sim.plan(&mut state, now);
    assert_eq!(
        shares(&plan),
        vec![(1, 1), (2, 1), (3, 1), (4, 2)],
        "job 5 gets nothing"
    );
    assert!(state.is_running(JobId(5)));
}

#[test]
fn job_without_input_gets_one_token() {
    let now = Instant::now();
    let mut state = BatchState::new(limits(4, 8, 10));
    push(&mut state, 1, 3, now);
    let (plan, rejected) = state.plan_with(now, |_, _| Ok(0));
    assert!(rejected.is_empty());
    assert_eq!(shares(&plan), vec![(1, 1)]);
}

#[test]
fn rejected_admission_frees_its_slot_for_the_next_waiter() {
    let now = Instant::now();
    let mut state = BatchState::new(limits(1, 8, 10));
    push(&mut state, 1, 0, now);
    push(&mut state, 2, 3, now);
    let (plan, rejected) = state.plan_with(now, admit_by_len);
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].0, JobId(1));
    assert!(matches!(rejected[0].1, EngineError::InvalidInput(_)));
    assert_eq!(shares(&plan), vec![(2, 3)]);
    assert!(!state.is_running(JobId(1)));
}

#[test]
fn cancel_from_waiting() {
    let now = Instant::now();
    let mut state = BatchState::new(limits(4, 8, 10));
    push(&mut state, 1, 2, now);
    push(&mut state, 2, 2, now);
    let outcome = state.cancel(JobId(1));
    assert_eq!(outcome, CancelOutcome::Waiting);
    assert!(!outcome.must_release());
    assert_eq!(state.cancel(JobId(1)), CancelOutcome::NotFound);
    let (plan, _) = state.plan_with(now, admit_by_len);
    assert_eq!(jobs(&plan), vec![2]);
}

#[test]
fn cancel_from_running() {
    let now = Instant::now();
    let mut state = BatchState::new(limits(4, 8, 10));
    push(&mut state, 1, 2, now);
    push(&mut state, 2, 2, now);
    let (plan, _) = state.plan_with(now, admit_by_len);
    assert_eq!(plan.work().len(), 2);
    let outcome = state.cancel(JobId(1));
    assert_eq!(outcome, CancelOutcome::Running);
    assert!(outcome.must_release());
    assert_eq!(state.running_len(), 1);
    assert!(!state.is_running(JobId(1)));
    let plan = state.plan(now);
    assert_eq!(jobs(&plan), vec![2]);
    assert_eq!(state.cancel(JobId(99)), CancelOutcome::NotFound);
}

#[test]
fn cancel_while_admitting() {
    let now = Instant::now();
    let mut state = BatchState::new(limits(4, 8, 10));
    push(&mut state, 1, 2, now);
    push(&mut state, 2, 2, now);
    let mut plan = state.plan(now);

    let (job, _) = state.next_admission(&mut plan).expect("job 1");
    assert_eq!(state.cancel(job), CancelOutcome::Admitting);
    assert_eq!(
        state.running_len(),
        1,
        "still counted until the engine answers"
    );
    let outcome = state.finish_admission(&mut plan, job, Ok(2));
    assert_eq!(outcome, AdmitOutcome::Cancelled { must_release: true });

    let (job, _) = state.next_admission(&mut plan).expect("job 2");
    assert_eq!(state.cancel(job), CancelOutcome::Admitting);
    let outcome =
        state.finish_admission(&mut plan, job, Err(EngineError::InvalidInput("x".into())));
    assert_eq!(
        outcome,
        AdmitOutcome::Cancelled {
            must_release: false
        }
    );

    assert!(plan.work().is_empty());
    assert!(state.is_empty());
}

#[test]
fn queue_full_refuses_and_frees_up_on_admission() {
    let now = Instant::now();
    let mut state = BatchState::new(limits(4, 8, 2));
    push(&mut state, 1, 1, now);
    push(&mut state, 2, 1, now);
    assert!(state.is_full());
    assert_eq!(
        state.push(JobId(3), input(1), now),
        Err(QueueFull { capacity: 2 })
    );
    let (plan, _) = state.plan_with(now, admit_by_len);
    assert_eq!(plan.work().len(), 2);
    assert!(
        !state.is_full(),
        "running jobs do not count against the queue"
    );
    push(&mut state, 3, 1, now);
}

#[test]
fn zero_capacity_queue_refuses_everything() {
    let mut state = BatchState::new(limits(4, 8, 0));
    assert_eq!(
        state.push(JobId(1), input(1), Instant::now()),
        Err(QueueFull { capacity: 0 })
    );
}

#[test]
fn max_wait_holds_a_partial_batch_then_releases_it() {
    let t0 = Instant::now();
    let wait = Duration::from_millis(100);
    let mut state = BatchState::new(BatchLimits {
        max_wait: wait,
        ..limits(3, 16, 10)
    });
    push(&mut state, 1, 2, t0);
    push(&mut state, 2, 2, t0 + Duration::from_millis(30));

    let mut plan = state.plan(t0 + Duration::from_millis(50));
    assert_eq!(
        plan.hold_until(),
        Some(t0 + wait),
        "the oldest waiter sets the deadline"
    );
    assert!(state.next_admission(&mut plan).is_none());

    let (plan, _) = state.plan_with(t0 + wait, admit_by_len);
    assert_eq!(plan.hold_until(), None);
    assert_eq!(jobs(&plan), vec![1, 2]);
}

#[test]
fn max_wait_ends_early_when_the_batch_is_full() {
    let t0 = Instant::now();
    let mut state = BatchState::new(BatchLimits {
        max_wait: Duration::from_secs(60),
        ..limits(2, 16, 10)
    });
    push(&mut state, 1, 2, t0);
    assert!(state.plan(t0).hold_until().is_some());
    push(&mut state, 2, 2, t0);
    let (plan, _) = state.plan_with(t0, admit_by_len);
    assert_eq!(jobs(&plan), vec![1, 2]);
}

#[test]
fn max_wait_does_not_delay_joining_a_running_batch() {
    let t0 = Instant::now();
    let mut state = BatchState::new(BatchLimits {
        max_wait: Duration::from_secs(60),
        ..limits(4, 16, 10)
    });
    push(&mut state, 1, 2, t0);
    push(&mut state, 2, 2, t0);
    push(&mut state, 3, 2, t0);
    push(&mut state, 4, 2, t0);
    let (plan, _) = state.plan_with(t0, admit_by_len);
    assert_eq!(plan.work().len(), 4);
    state.finish(JobId(1));
    push(&mut state, 5, 2, t0);
    let (plan, _) = state.plan_with(t0, admit_by_len);
    assert_eq!(plan.hold_until(), None);
    assert!(jobs(&plan).contains(&5));
}

#[test]
fn zero_max_wait_starts_at_once() {
    let t0 = Instant::now();
    let mut state = BatchState::new(limits(8, 16, 10));
    push(&mut state, 1, 2, t0);
    let (plan, _) = state.plan_with(t0, admit_by_len);
    assert_eq!(plan.hold_until(), None);
    assert_eq!(jobs(&plan), vec![1]);
}

#[test]
fn idle_state_plans_nothing() {
    let mut state = BatchState::new(limits(8, 16, 10));
    let (plan, rejected) = state.plan_with(Instant::now(), admit_by_len);
    assert!(plan.work().is_empty() && rejected.is_empty());
    assert_eq!(plan.hold_until(), None);
}

#[test]
fn drain_empties_everything() {
    let now = Instant::now();
    let mut state = BatchState::new(limits(1, 8, 10));
    push(&mut state, 1, 1, now);
    push(&mut state, 2, 1, now);
    let _ = state.plan_with(now, admit_by_len);
    let drained = state.drain();
    assert_eq!(drained.running, vec![JobId(1)]);
    assert_eq!(drained.waiting, vec![JobId(2)]);
    assert!(state.is_empty());
}
