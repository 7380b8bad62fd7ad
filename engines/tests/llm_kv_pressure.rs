//! Property test of the paged LLM engine under the real stage scheduler: requests arrive at random
//! times with random prompt lengths, many sharing prompt prefixes, into a KV pool small enough to
//! force preemption — and each still gets exactly the greedy tokens it gets alone.

use candle_core::{DType, Device};
use crossbeam_channel::{unbounded, Receiver};
use omnistage_engines::llm::engine::{LlmEngine, LlmEngineSettings};
use omnistage_engines::llm::paged::PagedKvPool;
use omnistage_scheduler::{spawn_stage, BatchLimits, NoopObserver};
use omnistage_stages::{
    JobId, JobRequest, Modality, Payload, Prompt, SamplingParams, StageEngine, StageEvent,
    StageInput, StepWork,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn load(dir: &Path, kv_cache_bytes: Option<u64>, block_size: usize) -> LlmEngine {
    let settings = LlmEngineSettings {
        kv_cache_bytes,
        kv_block_size: block_size,
        max_batch_size: 16,
        ..Default::default()
    };
    LlmEngine::load(dir, DType::F32, &Device::Cpu, settings).unwrap()
}

fn input(tokens: &[u32], max_tokens: usize) -> StageInput {
    let request = JobRequest {
        id: JobId(0),
        prompt: Prompt::Completion(String::new()),
        sampling: SamplingParams {
            temperature: Some(0.0),
            max_tokens: Some(max_tokens),
            ignore_eos: true,
            ..Default::default()
        },
        outputs: vec![Modality::Text],
        deadline: Instant::now() + Duration::from_secs(600),
        image: None,
        media: Vec::new(),
        audio: None,
        route: Default::default(),
    };
    StageInput {
        request: Arc::new(request),
        upstream: vec![Payload::Tokens(tokens.to_vec().into())],
        client_facing: true,
        streaming: false,
    }
}

/// Greedy tokens of one request run alone on a fresh engine with a roomy pool.
fn solo(engine: &mut LlmEngine, job: JobId, tokens: &[u32], max_tokens: usize) -> Vec<u32> {
    engine.admit(job, input(tokens, max_tokens)).unwrap();
    let mut out = Vec::new();
    let mut done = false;
    while !done {
        engine
            .step(
                &[StepWork {
                    job,
                    token_budget: 4096,
                }],
                &mut |_, ev| match ev {
                    StageEvent::Output(ps) => {
                        for p in ps {
                            if let Payload::Tokens(t) = p {
                                out.extend_from_slice(&t);
                            }
                        }
                    }
                    StageEvent::Finished { .. } => done = true,
                    StageEvent::Failed(e) => panic!("solo run failed: {e}"),
                    StageEvent::Admitted | StageEvent::Consumed(_) => {}
                },
            )
            .unwrap();
    }
    out
}

struct Case {
    prompt: Vec<u32>,
    max_tokens: usize,
    delay: Duration,
}

fn cases(rng: &mut StdRng, n: usize, vocab: u32) -> Vec<Case> {
    let prefixes: Vec<Vec<u32>> = (0..3)
        .map(|_| {
            (0..rng.gen_range(9..40))
                .map(|_| rng.gen_range(0..vocab))
                .collect()
        })
        .collect();
    (0..n)
        .map(|_| {
            let mut prompt = if rng.gen_bool(0.7) {
                prefixes[rng.gen_range(0..prefixes.len())].clone()
            } else {
                Vec::new()
            };
            prompt.extend((0..rng.gen_range(1..30)).map(|_| rng.gen_range(0..vocab)));
            Case {
                prompt,
                max_tokens: rng.gen_range(3..24),
                delay: Duration::from_millis(rng.gen_range(0..4)),
            }
        })
        .collect()
}

fn collect(rx: &Receiver<(JobId, StageEvent)>, n: usize) -> HashMap<JobId, Vec<u32>> {
    let mut tokens: HashMap<JobId, Vec<u32>> = HashMap::new();
    let mut finished = 0;
    while finished < n {
        let (job, ev) = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("stage stalled");
        match ev {
            StageEvent::Output(ps) => {
                for p in ps {
                    if let Payload::Tokens(t) = p {
                        tokens.entry(job).or_default().extend_from_slice(&t);
                    }
                }
            }
            StageEvent::Finished { .. } => finished += 1,
            StageEvent::Failed(e) => panic!("{job} failed under KV pressure: {e}"),
            StageEvent::Admitted | StageEvent::Consumed(_) => {}
        }
    }
    tokens
}

#[test]
fn random_arrivals_shared_prefixes_and_preemption_keep_greedy_tokens_exact() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = omnistage_engines::tiny::make_tiny(dir.path(), 11).unwrap();
    let model_dir = manifest.checkpoint("thinker").unwrap().dir.clone();
    let mut reference = load(&model_dir, None, 16);
    let vocab = reference.model().config().vocab_size as u32;
    let mut totals = (0u64, 0u64);
    for seed in [1u64, 2, 3] {
        let mut rng = StdRng::seed_from_u64(seed);
        let cases = cases(&mut rng, 20, vocab);
        let expected: Vec<Vec<u32>> = cases
            .iter()
            .enumerate()
            .map(|(i, c)| {
                solo(
                    &mut reference,
                    JobId(10_000 * seed + i as u64),
                    &c.prompt,
                    c.max_tokens,
                )
            })
            .collect();
        // 40 blocks of 4 tokens: room for about three of these sequences at once.
        let per_block = PagedKvPool::bytes_per_block(reference.model().config(), 4, DType::F32);
        let stressed = load(&model_dir, Some(per_block as u64 * 40), 4);
        let (tx, rx) = unbounded();
        let sink = Arc::new(move |job, ev| {
            let _ = tx.send((job, ev));
        });
        let limits = BatchLimits {
            max_batch_size: 16,
            max_batched_tokens: 24,
            max_wait: Duration::ZERO,
            max_queue: 64,
        };
        let stage = spawn_stage(
            format!("kv-pressure-{seed}"),
            stressed,
            limits,
            Arc::new(NoopObserver),
            sink,
        );
        for (i, c) in cases.iter().enumerate() {
            std::thread::sleep(c.delay);
            stage
                .submit(JobId(i as u64), input(&c.prompt, c.max_tokens))
                .unwrap();
        }
        let got = collect(&rx, cases.len());
        for (i, want) in expected.iter().enumerate() {
            assert_eq!(
                got.get(&JobId(i as u64)),
                Some(want),
                "seed {seed}, request {i}"
            );
        }
        let stats = stage.stats().engine;
        assert_eq!(stats.kv_blocks_used, 0, "finished requests hold no blocks");
        totals.0 += stats.preemptions_total;
        totals.1 += stats.prefix_hit_tokens_total;
        stage.shutdown();
    }
    assert!(
        totals.0 > 0,
        "the pool never ran out: the test did not force preemption"
    );
    assert!(totals.1 > 0, "no prefix was ever reused");
}
