//! The LLM stage engine driven step by step, as the scheduler drives it: batching does not change
//! greedy tokens, hidden states come out when asked (one row per generated token), limits and
//! stops hold, release frees memory.

use candle_core::{DType, Device};
use omnistage_engines::llm::engine::{LlmEngine, LlmEngineSettings};
use omnistage_stages::{
    FinishReason, JobId, JobRequest, Modality, Payload, PayloadKind, Prompt, SamplingParams,
    StageEngine, StageEvent, StageInput, StepWork,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn engine(emit_hidden: bool) -> (tempfile::TempDir, LlmEngine) {
    let dir = tempfile::tempdir().unwrap();
    let manifest = omnistage_engines::tiny::make_tiny(dir.path(), 3).unwrap();
    let model_dir = manifest.checkpoint("thinker").unwrap().dir.clone();
    let settings = LlmEngineSettings {
        emit_hidden,
        ..Default::default()
    };
    let engine = LlmEngine::load(&model_dir, DType::F32, &Device::Cpu, settings).unwrap();
    (dir, engine)
}

fn input(prompt: &str, sampling: SamplingParams) -> StageInput {
    let request = JobRequest {
        id: JobId(0),
        prompt: Prompt::Completion(prompt.to_string()),
        sampling,
        outputs: vec![Modality::Text],
        deadline: Instant::now() + Duration::from_secs(60),
        image: None,
        media: Vec::new(),
        audio: None,
        route: Default::default(),
    };
    StageInput {
        request: Arc::new(request),
        upstream: vec![],
        client_facing: true,
        streaming: false,
    }
}

fn greedy(n: usize) -> SamplingParams {
    SamplingParams {
        temperature: Some(0.0),
        max_tokens: Some(n),
        ignore_eos: true,
        ..Default::default()
    }
}

#[derive(Default)]
struct Outcome {
    tokens: Vec<u32>,
    text: String,
    hidden_rows: usize,
    hidden_dim: usize,
    /// Output events with hidden rows whose count differs from their token count.
    unpaired_events: usize,
    finish: Option<FinishReason>,
}

/// Runs the engine until every admitted job finishes, admitting `late` jobs at given steps.
fn run(
    engine: &mut LlmEngine,
    jobs: Vec<(usize, JobId, StageInput)>,
    budget: usize,
) -> HashMap<JobId, Outcome> {
    let mut out: HashMap<JobId, Outcome> = HashMap::new();
    let mut pending = jobs;
    let mut running: Vec<JobId> = Vec::new();
    for step in 0..10_000 {
        let (now, later): (Vec<_>, Vec<_>) =
            pending.into_iter().partition(|(at, _, _)| *at <= step);
        pending = later;
        for (_, job, inp) in now {
            engine.admit(job, inp).unwrap();
            running.push(job);
        }
        if running.is_empty() && pending.is_empty() {
            break;
        }
        let work: Vec<StepWork> = running
            .iter()
            .map(|j| StepWork {
                job: *j,
                token_budget: budget,
            })
            .collect();
        let mut finished = Vec::new();
        engine
            .step(&work, &mut |job, ev| {
                let o = out.entry(job).or_default();
                match ev {
                    StageEvent::Output(payloads) => {
                        let count = |k| {
                            payloads
                                .iter()
                                .filter(|p| p.kind() == k)
                                .map(Payload::units)
                                .sum::<usize>()
                        };
                        let (t, h) = (count(PayloadKind::Tokens), count(PayloadKind::Hidden));
                        if h > 0 && h != t {
                            o.unpaired_events += 1;
                        }
                        for p in payloads {
                            match p {
                                Payload::Tokens(t) => o.tokens.extend_from_slice(&t),
                                Payload::Text(t) => o.text.push_str(&t),
                                Payload::Hidden(h) => {
                                    o.hidden_rows += h.rows;
                                    o.hidden_dim = h.dim;
                                }
                                other => panic!("an LLM stage emitted {:?}", other.kind()),
                            }
                        }
                    }
                    StageEvent::Finished { reason, usage } => {
                        assert_eq!(usage.completion_tokens, o.tokens.len());
                        o.finish = Some(reason);
                        finished.push(job);
                    }
                    StageEvent::Failed(e) => panic!("{job} failed: {e}"),
                    StageEvent::Admitted => panic!("engines never report admission"),
                    StageEvent::Consumed(_) => panic!("no streamed input here"),
                }
            })
            .unwrap();
        running.retain(|j| !finished.contains(j));
    }
    out
}

#[test]
fn batched_and_chunked_runs_give_each_prompt_its_solo_tokens() {
    let (_dir, mut e) = engine(false);
    let prompts = [
        "Hello",
        "The quick brown fox jumps over the lazy dog",
        "a b c d e f g",
        "Once upon a time there was",
    ];
    let mut solo = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let r = run(
            &mut e,
            vec![(0, JobId(i as u64), input(p, greedy(10)))],
            4096,
        );
        solo.push(r[&JobId(i as u64)].tokens.clone());
    }
    // All four join one running batch at different steps, with prompts prefilled 3 tokens a step.
    let jobs = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| (i * 2, JobId(100 + i as u64), input(p, greedy(10))))
        .collect();
    let batched = run(&mut e, jobs, 3);
    for (i, tokens) in solo.iter().enumerate() {
        assert_eq!(
            &batched[&JobId(100 + i as u64)].tokens,
            tokens,
            "prompt {i}"
        );
        assert_eq!(tokens.len(), 10);
    }
    assert_eq!(e.state_bytes(), 0, "finished sequences hold no KV cache");
}

#[test]
fn hidden_states_come_one_row_per_generated_token() {
    let (_dir, mut e) = engine(true);
    let hidden_size = e.model().config().hidden_size;
    // Prefilled 2 tokens a step: prompt chunks send no rows.
    let r = run(
        &mut e,
        vec![(0, JobId(1), input("Hello there, how are you", greedy(5)))],
        2,
    );
    let o = &r[&JobId(1)];
    assert_eq!(o.hidden_dim, hidden_size);
    // The last prompt position's row for the first token, then each decode position's.
    assert_eq!(o.tokens.len(), 5);
    assert_eq!(o.hidden_rows, 5);
    assert_eq!(
        o.unpaired_events, 0,
        "each row comes in its token's output event"
    );
}

#[test]
fn stops_limits_and_release() {
    let (_dir, mut e) = engine(false);
    let r = run(&mut e, vec![(0, JobId(1), input("abc", greedy(12)))], 4096);
    let first = r[&JobId(1)].tokens[2];
    assert_eq!(r[&JobId(1)].finish, Some(FinishReason::Length));
    // A stop token id ends the sequence before emitting it.
    let stop = SamplingParams {
        stop_token_ids: vec![first],
        ..greedy(12)
    };
    let r = run(&mut e, vec![(0, JobId(2), input("abc", stop))], 4096);
    assert_eq!(r[&JobId(2)].finish, Some(FinishReason::Stop));
    assert!(!r[&JobId(2)].tokens.contains(&first));
    // Too long a prompt is refused at admission.
    let long = "word ".repeat(4000);
    let err = e.admit(JobId(3), input(&long, greedy(4))).unwrap_err();
    assert!(err.to_string().contains("at most"), "{err}");
    // Release mid-generation frees the cache.
    e.admit(JobId(4), input("hello", greedy(100))).unwrap();
    e.step(
        &[StepWork {
            job: JobId(4),
            token_budget: 64,
        }],
        &mut |_, _| {},
    )
    .unwrap();
    assert!(e.state_bytes() > 0);
    e.release(JobId(4));
    assert_eq!(e.state_bytes(), 0);
    assert_eq!(e.active_sequences(), 0);
}

#[test]
fn speaking_forces_the_text_as_the_output_with_one_hidden_row_per_token() {
    let (_dir, mut e) = engine(true);
    let text = "the quick brown fox";
    let expected = e.tokenizer().encode(text, false).unwrap();
    let mut speak = input(
        "",
        SamplingParams {
            temperature: Some(1.0),
            max_tokens: Some(2),
            stop: vec!["fox".into()],
            ..Default::default()
        },
    );
    Arc::make_mut(&mut speak.request).prompt = Prompt::Speak(text.into());
    let out = run(&mut e, vec![(0, JobId(1), speak)], 64);
    let o = &out[&JobId(1)];
    // Whatever the sampler, limit or stop strings say, the output is the text, then it stops.
    assert_eq!(o.tokens, expected);
    assert_eq!(o.text, text);
    assert_eq!(o.hidden_rows, expected.len());
    assert_eq!(o.finish, Some(FinishReason::Stop));
}
