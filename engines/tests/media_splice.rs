//! Media spliced into an LLM prompt: rows in place of placeholder tokens enter the forward at the
//! right positions (through chunked prefill and batching), mismatches are refused, and the prefix
//! cache shares blocks only between prompts with the same media.

use candle_core::{DType, Device, Tensor};
use omnistage_engines::llm::engine::{LlmEngine, LlmEngineSettings};
use omnistage_engines::tiny::{TINY_AUDIO_TOKEN_ID, TINY_IMAGE_TOKEN_ID};
use omnistage_stages::{
    EngineError, HiddenStates, JobId, JobRequest, MediaEmbedding, MediaInput, Modality, Payload,
    Prompt, SamplingParams, StageEngine, StageEvent, StageInput, StepWork,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Thinker {
    _dir: tempfile::TempDir,
    engine: LlmEngine,
    /// `[vocab, hidden]` token embeddings of the checkpoint.
    embed: Tensor,
}

fn thinker(prefix_caching: bool) -> Thinker {
    let dir = tempfile::tempdir().unwrap();
    let manifest = omnistage_engines::tiny::make_tiny(dir.path(), 3).unwrap();
    let model_dir = manifest.checkpoint("thinker").unwrap().dir.clone();
    let settings = LlmEngineSettings {
        emit_hidden: true,
        prefix_caching,
        kv_block_size: 4,
        ..Default::default()
    };
    let engine = LlmEngine::load(&model_dir, DType::F32, &Device::Cpu, settings).unwrap();
    let weights =
        candle_core::safetensors::load(model_dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let embed = weights["model.embed_tokens.weight"].clone();
    Thinker {
        _dir: dir,
        engine,
        embed,
    }
}

impl Thinker {
    /// The token embeddings of `ids`, as an encoder's rows for media item `media`.
    fn rows_of(&self, media: usize, ids: &[u32]) -> MediaEmbedding {
        let idx = Tensor::new(ids, &Device::Cpu).unwrap();
        let rows = self.embed.index_select(&idx, 0).unwrap();
        let dim = rows.dim(1).unwrap();
        let data: Vec<f32> = rows.flatten_all().unwrap().to_vec1().unwrap();
        MediaEmbedding {
            media,
            rows: HiddenStates::new(data, dim),
        }
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

fn image(seed: u8) -> MediaInput {
    MediaInput::image(vec![seed; 4 * 4 * 3], 4, 4).unwrap()
}

fn audio() -> MediaInput {
    MediaInput::audio(vec![0.25; 160], 16_000).unwrap()
}

fn input(tokens: Vec<u32>, media: Vec<MediaInput>, upstream: Vec<MediaEmbedding>) -> StageInput {
    let request = JobRequest {
        id: JobId(0),
        prompt: Prompt::Tokens(tokens),
        sampling: greedy(6),
        outputs: vec![Modality::Text],
        deadline: Instant::now() + Duration::from_secs(60),
        image: None,
        audio: None,
        media,
        route: Default::default(),
    };
    let upstream = if upstream.is_empty() {
        Vec::new()
    } else {
        vec![Payload::MediaEmbeddings(upstream.into())]
    };
    StageInput {
        request: Arc::new(request),
        upstream,
        client_facing: true,
        streaming: false,
    }
}

/// Generated tokens and every hidden row of each job, run together with `budget` prompt tokens
/// per job and step.
fn run(
    engine: &mut LlmEngine,
    jobs: Vec<(JobId, StageInput)>,
    budget: usize,
) -> HashMap<JobId, (Vec<u32>, Vec<f32>)> {
    let mut out: HashMap<JobId, (Vec<u32>, Vec<f32>)> = HashMap::new();
    let mut running = Vec::new();
    for (job, inp) in jobs {
        engine.admit(job, inp).unwrap();
        running.push(job);
    }
    while !running.is_empty() {
        let work: Vec<StepWork> = running
            .iter()
            .map(|j| StepWork {
                job: *j,
                token_budget: budget,
            })
            .collect();
        let mut finished = Vec::new();
        engine
            .step(&work, &mut |job, ev| match ev {
                StageEvent::Output(payloads) => {
                    let o = out.entry(job).or_default();
                    for p in payloads {
                        match p {
                            Payload::Tokens(t) => o.0.extend_from_slice(&t),
                            Payload::Hidden(h) => o.1.extend_from_slice(&h.data),
                            _ => {}
                        }
                    }
                }
                StageEvent::Finished { .. } => finished.push(job),
                StageEvent::Failed(e) => panic!("{job} failed: {e}"),
                _ => {}
            })
            .unwrap();
        running.retain(|j| !finished.contains(j));
    }
    out
}

#[test]
fn spliced_rows_enter_at_their_placeholders_through_chunked_prefill() {
    let mut t = thinker(false);
    let (img, aud) = (TINY_IMAGE_TOKEN_ID, TINY_AUDIO_TOKEN_ID);
    // An image that "encodes" to the embeddings of tokens 40 41 42 and a clip that encodes to
    // those of 100 101: the spliced prompt must behave exactly as the prompt with those tokens.
    let spliced = vec![5, 6, img, 7, aud, 8, 9, 10, 11];
    let plain = vec![5, 6, 40, 41, 42, 7, 100, 101, 8, 9, 10, 11];
    for budget in [1, 3, 4096] {
        let rows = vec![t.rows_of(0, &[40, 41, 42]), t.rows_of(1, &[100, 101])];
        let jobs = vec![
            (
                JobId(1),
                input(spliced.clone(), vec![image(1), audio()], rows),
            ),
            (JobId(2), input(plain.clone(), Vec::new(), Vec::new())),
        ];
        let r = run(&mut t.engine, jobs, budget);
        let (a, b) = (&r[&JobId(1)], &r[&JobId(2)]);
        assert_eq!(a.0.len(), 6, "budget {budget}");
        assert_eq!(a.0, b.0, "budget {budget}: greedy tokens");
        // Same chunking, same arithmetic: the hidden rows are bit-identical.
        assert_eq!(a.1, b.1, "budget {budget}: hidden rows");
    }
    assert_eq!(t.engine.state_bytes(), 0);
}

#[test]
fn other_rows_at_the_placeholders_change_the_answer() {
    let mut t = thinker(false);
    let prompt = vec![5, 6, TINY_IMAGE_TOKEN_ID, 7];
    let (rows_a, rows_b) = (t.rows_of(0, &[40, 41]), t.rows_of(0, &[300, 301]));
    let a = run(
        &mut t.engine,
        vec![(
            JobId(1),
            input(prompt.clone(), vec![image(1)], vec![rows_a]),
        )],
        4096,
    );
    let b = run(
        &mut t.engine,
        vec![(JobId(2), input(prompt, vec![image(2)], vec![rows_b]))],
        4096,
    );
    assert_ne!(a[&JobId(1)].1, b[&JobId(2)].1);
}

fn admit_error(t: &mut Thinker, inp: StageInput) -> String {
    match t.engine.admit(JobId(9), inp) {
        Err(EngineError::InvalidInput(m)) => m,
        other => panic!("expected invalid input, got {other:?}"),
    }
}

#[test]
fn mismatched_media_is_refused_with_a_reason() {
    let mut t = thinker(false);
    let img = TINY_IMAGE_TOKEN_ID;
    let row = t.rows_of(0, &[40]);
    let two_placeholders = input(vec![img, 5, img], vec![image(1)], vec![row.clone()]);
    let m = admit_error(&mut t, two_placeholders);
    assert!(m.contains("more image placeholders"), "{m}");
    let none_placed = input(vec![5, 6], vec![image(1)], vec![row]);
    let m = admit_error(&mut t, none_placed);
    assert!(m.contains("placed 0 image"), "{m}");
    let missing = input(vec![img], vec![image(1)], Vec::new());
    let m = admit_error(&mut t, missing);
    assert!(m.contains("no embedding arrived for image #1"), "{m}");
    let narrow = MediaEmbedding {
        media: 0,
        rows: HiddenStates::new(vec![0.0; 6], 3),
    };
    let m = admit_error(&mut t, input(vec![img], vec![image(1)], vec![narrow]));
    assert!(m.contains("width 3"), "{m}");
    assert_eq!(t.engine.state_bytes(), 0);
}

#[test]
fn prefix_cache_is_shared_only_with_the_same_media() {
    let mut t = thinker(true);
    let img = TINY_IMAGE_TOKEN_ID;
    // 16 prompt tokens (4 blocks of 4) after expansion.
    let prompt = vec![5, 6, 7, img, 8, 9, 10, 11, 12, 13, 14, 15];
    let rows = vec![t.rows_of(0, &[40, 41, 42, 43, 44])];
    let hits = |t: &Thinker| t.engine.stats().prefix_hit_tokens_total;

    let first = run(
        &mut t.engine,
        vec![(
            JobId(1),
            input(prompt.clone(), vec![image(1)], rows.clone()),
        )],
        4096,
    );
    let before = hits(&t);
    let same = run(
        &mut t.engine,
        vec![(
            JobId(2),
            input(prompt.clone(), vec![image(1)], rows.clone()),
        )],
        4096,
    );
    assert!(hits(&t) > before, "the same image reuses cached blocks");
    assert_eq!(first[&JobId(1)].0, same[&JobId(2)].0);

    let before = hits(&t);
    // Another image (another digest) with, for the test, the very same rows: no block is shared,
    // not even the text before the placeholder (the salt roots the whole chain).
    run(
        &mut t.engine,
        vec![(JobId(3), input(prompt, vec![image(2)], rows))],
        4096,
    );
    assert_eq!(hits(&t), before, "other media share nothing");
}
