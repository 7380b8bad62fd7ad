//! Shared helpers of the talker tests: a tiny talker, requests, thinker rows, and a driver
//! that steps talker jobs as the stage scheduler does, feeding streamed rows when they starve.

#![allow(dead_code)]

use candle_core::{DType, Device};
use omnistage_engines::llm::engine::LlmEngineSettings;
use omnistage_engines::llm::talker::TalkerEngine;
use omnistage_engines::tiny::{self, TinyTalkerSpec};
use omnistage_stages::deploy::TalkerSettings;
use omnistage_stages::{
    AudioParams, FinishReason, HiddenStates, JobId, JobRequest, Modality, Payload, Prompt,
    SamplingParams, StageEngine, StageEvent, StageInput, StepWork,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const DIM: usize = 64;
pub const FRAMES: usize = 6;

pub fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature: Some(0.0),
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        ..Default::default()
    }
}

pub fn talker(sampling: SamplingParams) -> (tempfile::TempDir, TalkerEngine) {
    talker_with(sampling, |_| {})
}

pub fn talker_with(
    sampling: SamplingParams,
    edit: impl FnOnce(&mut TalkerSettings),
) -> (tempfile::TempDir, TalkerEngine) {
    let settings = LlmEngineSettings {
        sampling,
        ..Default::default()
    };
    talker_full(settings, edit)
}

/// A tiny talker with its matching settings, edited by `edit`.
pub fn talker_full(
    settings: LlmEngineSettings,
    edit: impl FnOnce(&mut TalkerSettings),
) -> (tempfile::TempDir, TalkerEngine) {
    let dir = tempfile::tempdir().unwrap();
    let mut written = tiny::write_tiny_talker(dir.path(), &TinyTalkerSpec::tiny(DIM), 5).unwrap();
    edit(&mut written.settings);
    let engine = TalkerEngine::load(
        dir.path(),
        DType::F32,
        &Device::Cpu,
        settings,
        written.settings,
    )
    .unwrap();
    (dir, engine)
}

pub fn request(prompt: Prompt, voice: Option<&str>, seed: u64) -> Arc<JobRequest> {
    Arc::new(JobRequest {
        id: JobId(0),
        prompt,
        sampling: SamplingParams::default(),
        outputs: vec![Modality::Text, Modality::Audio],
        deadline: Instant::now() + Duration::from_secs(60),
        image: None,
        media: Vec::new(),
        audio: voice.map(|v| AudioParams {
            voice: v.to_string(),
            seed,
        }),
        route: Default::default(),
    })
}

pub fn input(upstream: Vec<Payload>, streaming: bool, seed: u64) -> StageInput {
    StageInput {
        request: request(Prompt::Completion("hi".into()), Some("default"), seed),
        upstream,
        client_facing: false,
        streaming,
    }
}

pub fn rows(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n * DIM).map(|_| rng.gen_range(-2.0f32..2.0)).collect()
}

pub fn hidden(data: &[f32]) -> Payload {
    Payload::Hidden(HiddenStates::new(data.to_vec(), DIM))
}

/// How one job's thinker rows arrive: `first` rows at admission, then `chunks` (row counts)
/// each fed when the talker starves; `None` = all rows at once, not streamed.
#[derive(Clone)]
pub struct Arrival {
    pub data: Vec<f32>,
    pub stream: Option<(usize, Vec<usize>)>,
}

#[derive(Default, Debug)]
pub struct Outcome {
    /// Raw tokens of whole frames, talker order.
    pub raw: Vec<u32>,
    /// Codes in canonical order.
    pub codes: Vec<u32>,
    pub consumed: usize,
    pub starved_steps: usize,
    pub finish: Option<FinishReason>,
    pub completion_tokens: usize,
}

/// Checks a frame's canonical codes against its raw tokens.
pub fn check_frame(s: &TalkerSettings, raw: &[u32], codes: &[u32]) {
    let canonical = s.canonical_slots();
    assert_eq!(raw.len() % 7, 0, "whole frames only");
    assert_eq!(raw.len(), codes.len());
    for (f, (r, c)) in raw.chunks(7).zip(codes.chunks(7)).enumerate() {
        for p in 0..7 {
            let code = r[p] - s.codec_token_offset - (p * s.codebook_size) as u32;
            assert!(
                (code as usize) < s.codebook_size,
                "frame {f} slot {p}: {r:?}"
            );
            assert_eq!(c[canonical[p]], code, "frame {f} slot {p}");
        }
    }
}

/// Runs talker jobs to completion in one batch, feeding streamed rows whenever a job starves.
pub fn run(
    e: &mut TalkerEngine,
    jobs: Vec<(JobId, StageInput, Option<Arrival>)>,
) -> HashMap<JobId, Outcome> {
    let settings = e.talker_settings().clone();
    let mut out: HashMap<JobId, Outcome> = HashMap::new();
    // Per streamed job: (rows data, next row to feed, remaining chunk sizes).
    let mut feeds: HashMap<JobId, (Vec<f32>, usize, Vec<usize>)> = HashMap::new();
    let mut running = Vec::new();
    for (job, mut inp, arrival) in jobs {
        if let Some(a) = arrival {
            match a.stream {
                None => inp.upstream.push(hidden(&a.data)),
                Some((first, chunks)) => {
                    inp.upstream.push(hidden(&a.data[..first * DIM]));
                    inp.streaming = true;
                    feeds.insert(job, (a.data, first, chunks));
                }
            }
        }
        e.admit(job, inp).unwrap();
        out.insert(job, Outcome::default());
        running.push(job);
    }
    for _ in 0..10_000 {
        if running.is_empty() {
            break;
        }
        for job in &running {
            if !e.awaiting_input(*job) {
                continue;
            }
            let (data, next, chunks) = feeds.get_mut(job).expect("only streamed jobs starve");
            assert!(!chunks.is_empty(), "{job} starves after its stream closed");
            out.get_mut(job).unwrap().starved_steps += 1;
            // A starved job given a share anyway does nothing.
            let mut quiet = true;
            e.step(
                &[StepWork {
                    job: *job,
                    token_budget: 64,
                }],
                &mut |_, _| quiet = false,
            )
            .unwrap();
            assert!(quiet, "{job} ran without its row");
            let n = chunks.remove(0);
            let end = (*next + n) * DIM;
            let last = chunks.is_empty();
            e.feed(*job, vec![hidden(&data[*next * DIM..end])], last)
                .unwrap();
            *next += n;
            assert!(!e.awaiting_input(*job) || !last);
        }
        let work: Vec<StepWork> = running
            .iter()
            .filter(|j| !e.awaiting_input(**j))
            .map(|j| StepWork {
                job: *j,
                token_budget: 5,
            })
            .collect();
        let mut finished = Vec::new();
        e.step(&work, &mut |job, ev| {
            let o = out.get_mut(&job).unwrap();
            match ev {
                StageEvent::Output(payloads) => {
                    let mut raw = Vec::new();
                    let mut codes = Vec::new();
                    for p in payloads {
                        match p {
                            Payload::Tokens(t) => raw.extend_from_slice(&t),
                            Payload::Codes(c) => {
                                assert_eq!(c.codes_per_frame, 7);
                                assert_eq!(c.codes.len(), c.frames * 7);
                                codes.extend_from_slice(&c.codes);
                            }
                            other => panic!("a talker emitted {:?}", other.kind()),
                        }
                    }
                    check_frame(&settings, &raw, &codes);
                    o.raw.extend(raw);
                    o.codes.extend(codes);
                }
                StageEvent::Consumed(n) => o.consumed += n,
                StageEvent::Finished { reason, usage } => {
                    assert!(usage.completion_tokens >= o.raw.len());
                    o.completion_tokens = usage.completion_tokens;
                    o.finish = Some(reason);
                    finished.push(job);
                }
                StageEvent::Failed(err) => panic!("{job} failed: {err}"),
                StageEvent::Admitted => panic!("engines never report admission"),
            }
        })
        .unwrap();
        running.retain(|j| !finished.contains(j));
    }
    assert!(running.is_empty(), "jobs left running: {running:?}");
    assert_eq!(e.state_bytes(), 0, "finished jobs hold no KV blocks");
    out
}

pub fn solo(e: &mut TalkerEngine, inp: StageInput, arrival: Option<Arrival>) -> Outcome {
    run(e, vec![(JobId(99), inp, arrival)])
        .remove(&JobId(99))
        .unwrap()
}
