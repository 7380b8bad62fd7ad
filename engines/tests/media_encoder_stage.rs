//! The media encoder stage engine over the tiny vision and Whisper encoders: items of several
//! jobs are encoded together and each job gets exactly what encoding its items alone gives; the
//! same image twice (in one job or across jobs) is encoded once; the cache answers repeats.

use candle_core::{DType, Device};
use omnistage_engines::media::stage::MediaEncoderEngine;
use omnistage_engines::media::vision::VisionEncoder;
use omnistage_engines::media::whisper::WhisperEncoder;
use omnistage_engines::media::MediaEncoder;
use omnistage_engines::tiny::{
    write_tiny_vision, write_tiny_whisper, TinyVisionSpec, TinyWhisperSpec,
};
use omnistage_stages::{
    EngineError, HiddenStates, JobId, JobRequest, MediaEmbedding, MediaInput, Modality, Payload,
    Prompt, SamplingParams, StageEngine, StageEvent, StageInput, StepWork,
};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const WIDTH: usize = 24;

fn input(media: Vec<MediaInput>) -> StageInput {
    StageInput {
        request: Arc::new(JobRequest {
            id: JobId(0),
            prompt: Prompt::Completion(String::new()),
            sampling: SamplingParams::default(),
            outputs: vec![Modality::Text],
            deadline: Instant::now() + Duration::from_secs(60),
            image: None,
            audio: None,
            media,
            route: Default::default(),
        }),
        upstream: Vec::new(),
        client_facing: false,
        streaming: false,
    }
}

/// A deterministic test picture of `w × h` with a pattern set by `k`.
fn picture(w: usize, h: usize, k: usize) -> MediaInput {
    let mut px = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            px.extend([
                (x * 7 + k * 31) as u8,
                (y * 5 + k * 17) as u8,
                ((x ^ y) * 3 + k) as u8,
            ]);
        }
    }
    MediaInput::image(px, w, h).unwrap()
}

fn clip(seconds: f64, rate: u32, pitch: f64) -> MediaInput {
    let n = (seconds * f64::from(rate)) as usize;
    let samples = (0..n)
        .map(|i| (0.4 * (i as f64 * pitch / f64::from(rate) * std::f64::consts::TAU).sin()) as f32)
        .collect();
    MediaInput::audio(samples, rate).unwrap()
}

/// Admits every job, steps them all together, and returns each job's embeddings.
fn run<E: MediaEncoder>(
    engine: &mut MediaEncoderEngine<E>,
    jobs: Vec<(JobId, StageInput)>,
) -> HashMap<JobId, Vec<MediaEmbedding>> {
    let work: Vec<StepWork> = jobs
        .iter()
        .map(|(job, _)| StepWork {
            job: *job,
            token_budget: 1 << 20,
        })
        .collect();
    for (job, inp) in jobs {
        engine.admit(job, inp).unwrap();
    }
    let mut out = HashMap::new();
    let mut finished = 0;
    engine
        .step(&work, &mut |job, ev| match ev {
            StageEvent::Output(p) => match &p[..] {
                [Payload::MediaEmbeddings(items)] => {
                    out.insert(job, items.to_vec());
                }
                other => panic!("unexpected output {other:?}"),
            },
            StageEvent::Finished { .. } => finished += 1,
            other => panic!("unexpected event {other:?}"),
        })
        .unwrap();
    assert_eq!(finished, work.len(), "every job finishes in one step");
    assert_eq!(engine.state_bytes(), 0);
    out
}

fn alone<E: MediaEncoder>(encoder: &mut E, media: &MediaInput) -> HiddenStates {
    let p = encoder.prepare(&media.data).unwrap();
    encoder.encode(&[&p]).unwrap().remove(0)
}

fn max_diff(a: &HiddenStates, b: &HiddenStates) -> f32 {
    assert_eq!((a.rows, a.dim), (b.rows, b.dim));
    a.data
        .iter()
        .zip(b.data.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn images_of_several_jobs_batch_dedupe_and_hit_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_vision(dir.path(), &TinyVisionSpec::tiny(WIDTH), 5).unwrap();
    let mut reference = VisionEncoder::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let encoder = VisionEncoder::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let mut engine = MediaEncoderEngine::new(encoder, 1 << 20);
    let (a, b, c) = (picture(40, 28, 1), picture(17, 33, 2), picture(64, 64, 3));
    let jobs = vec![
        (
            JobId(1),
            input(vec![a.clone(), clip(0.5, 16_000, 440.0), b.clone()]),
        ),
        (JobId(2), input(vec![c.clone()])),
        // `a` again, in another job of the same step: encoded once.
        (JobId(3), input(vec![a.clone()])),
    ];
    let out = run(&mut engine, jobs);
    let stats = engine.stats();
    assert_eq!(stats.media_encoded_total, 3, "a, b and c, each once");
    // Job 1's items keep their request indices (the audio clip at 1 is not this stage's).
    let j1: Vec<usize> = out[&JobId(1)].iter().map(|e| e.media).collect();
    assert_eq!(j1, vec![0, 2]);
    for (got, want) in [
        (&out[&JobId(1)][0].rows, &a),
        (&out[&JobId(1)][1].rows, &b),
        (&out[&JobId(2)][0].rows, &c),
        (&out[&JobId(3)][0].rows, &a),
    ] {
        let d = max_diff(got, &alone(&mut reference, want));
        assert!(d <= 1e-5, "batched vs alone: {d}");
        assert_eq!(got.dim, WIDTH);
    }
    // A later job with a seen image is answered from the cache without encoding.
    let out = run(&mut engine, vec![(JobId(4), input(vec![b.clone()]))]);
    let after = engine.stats();
    assert_eq!(after.media_encoded_total, 3);
    assert_eq!(
        after.encoder_cache_hits_total - stats.encoder_cache_hits_total,
        1
    );
    assert_eq!(out[&JobId(4)][0].rows, alone(&mut reference, &b));
}

#[test]
fn clips_of_different_lengths_batch_together() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_whisper(dir.path(), &TinyWhisperSpec::tiny(WIDTH), 5).unwrap();
    let mut reference = WhisperEncoder::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let encoder = WhisperEncoder::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let mut engine = MediaEncoderEngine::new(encoder, 0);
    let clips = [
        clip(0.4, 16_000, 300.0),
        clip(1.3, 22_050, 500.0),
        clip(2.0, 8_000, 700.0),
    ];
    let jobs = clips
        .iter()
        .enumerate()
        .map(|(i, c)| (JobId(i as u64), input(vec![c.clone()])))
        .collect();
    let out = run(&mut engine, jobs);
    let mut rows = Vec::new();
    for (i, c) in clips.iter().enumerate() {
        let got = &out[&JobId(i as u64)][0].rows;
        let d = max_diff(got, &alone(&mut reference, c));
        assert!(d <= 1e-5, "clip {i}: batched vs alone {d}");
        rows.push(got.rows);
    }
    assert!(
        rows[0] < rows[1] && rows[1] < rows[2],
        "rows follow duration: {rows:?}"
    );
    assert_eq!(engine.stats().encoder_cache_hits_total, 0, "cache off");
}

#[test]
fn a_job_with_nothing_for_the_stage_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_vision(dir.path(), &TinyVisionSpec::tiny(WIDTH), 5).unwrap();
    let encoder = VisionEncoder::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let mut engine = MediaEncoderEngine::new(encoder, 1 << 20);
    match engine.admit(JobId(1), input(vec![clip(0.5, 16_000, 440.0)])) {
        Err(EngineError::InvalidInput(m)) => assert!(m.contains("carries no image"), "{m}"),
        other => panic!("expected invalid input, got {other:?}"),
    }
    assert_eq!(engine.state_bytes(), 0);
}

#[test]
fn an_encoder_whose_width_differs_from_its_llm_is_refused_at_start_up() {
    use omnistage_engines::factory::{build_engine, StageWiring};
    use omnistage_stages::deploy::DeployGraph;
    let dir = tempfile::tempdir().unwrap();
    let manifest = omnistage_engines::tiny::make_tiny(dir.path(), 1).unwrap();
    let thinker = manifest.checkpoint("thinker").unwrap().dir.clone();
    // The tiny thinker is 64 wide; this encoder writes rows of 24.
    write_tiny_vision(&dir.path().join("narrow"), &TinyVisionSpec::tiny(WIDTH), 1).unwrap();
    let toml = r#"
[[stage]]
id = "thinker"
kind = "llm"
model = "tiny-omni/thinker"

[[stage]]
id = "eyes"
kind = "encoder"
model = "narrow"
[stage.encoder]
encodes = "image"

[[edge]]
from = "eyes"
to = "thinker"
carries = "media_embeddings"

[outputs]
text = "thinker"
"#;
    let graph = DeployGraph::from_toml_str(toml, Path::new("t.toml"), dir.path(), &[]).unwrap();
    let spec = graph.stage("eyes").unwrap();
    let wiring = |consumers| StageWiring {
        consumed: vec![omnistage_stages::PayloadKind::MediaEmbeddings],
        media_consumers: consumers,
        ..StageWiring::default()
    };
    let err = build_engine(spec, &wiring(vec![thinker.clone()]))
        .err()
        .expect("a width mismatch must be refused")
        .to_string();
    assert!(
        err.contains("width 24") && err.contains("hidden_size 64") && err.contains("`eyes`"),
        "{err}"
    );
    // The default tiny encoder is as wide as the thinker.
    let wide = manifest.checkpoint("vision-encoder").unwrap().dir.clone();
    let mut spec = spec.clone();
    spec.model = wide;
    assert!(build_engine(&spec, &wiring(vec![thinker])).is_ok());
}
