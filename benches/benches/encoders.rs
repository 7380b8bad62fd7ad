//! Media encoder stages: what batching and the embedding cache buy.
//!
//! A CLIP ViT-B/16-shaped vision tower at 224 px (12 layers, width 768, seeded random weights)
//! and a Whisper-base-shaped audio encoder (6 layers, width 512, 30 s windows), each behind the
//! media encoder stage engine, on the stage's own thread as the scheduler drives it:
//! - one item per step (batch 1) against all items of the round in one step (one forward per
//!   input shape), the same items, side by side in one run;
//! - the same items again, answered from the embedding cache.
//!
//! Run: `cargo bench -p omnistage-benches --bench encoders` (env `ENCODER_BENCH_ITEMS`, default
//! 16 images and 8 clips). Ratios are what to compare; the machine is shared.

use candle_core::{DType, Device};
use omnistage_engines::media::stage::MediaEncoderEngine;
use omnistage_engines::media::vision::VisionEncoder;
use omnistage_engines::media::whisper::WhisperEncoder;
use omnistage_engines::media::MediaEncoder;
use omnistage_engines::tiny::{
    write_tiny_vision, write_tiny_whisper, TinyVisionSpec, TinyVisionTower, TinyWhisperSpec,
};
use omnistage_stages::{
    JobId, JobRequest, MediaInput, Modality, Prompt, SamplingParams, StageEngine, StageEvent,
    StageInput, StepWork,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn input(media: MediaInput) -> StageInput {
    StageInput {
        request: Arc::new(JobRequest {
            id: JobId(0),
            prompt: Prompt::Completion(String::new()),
            sampling: SamplingParams::default(),
            outputs: vec![Modality::Text],
            deadline: Instant::now() + Duration::from_secs(3600),
            image: None,
            audio: None,
            media: vec![media],
            route: Default::default(),
        }),
        upstream: Vec::new(),
        client_facing: false,
        streaming: false,
    }
}

/// Admits `items` as jobs and steps them `per_step` at a time; returns the seconds it took.
fn run<E: MediaEncoder>(
    engine: &mut MediaEncoderEngine<E>,
    items: &[MediaInput],
    first_id: u64,
    per_step: usize,
) -> f64 {
    let t0 = Instant::now();
    for (round, chunk) in items.chunks(per_step).enumerate() {
        let jobs: Vec<JobId> = (0..chunk.len())
            .map(|i| JobId(first_id + (round * per_step + i) as u64))
            .collect();
        for (job, item) in jobs.iter().zip(chunk) {
            engine.admit(*job, input(item.clone())).expect("admit");
        }
        let work: Vec<StepWork> = jobs
            .iter()
            .map(|job| StepWork {
                job: *job,
                token_budget: 1 << 20,
            })
            .collect();
        let mut finished = 0;
        engine
            .step(&work, &mut |_, ev| match ev {
                StageEvent::Finished { .. } => finished += 1,
                StageEvent::Failed(e) => panic!("encode failed: {e}"),
                _ => {}
            })
            .expect("step");
        assert_eq!(finished, jobs.len());
    }
    t0.elapsed().as_secs_f64()
}

fn report<E: MediaEncoder>(
    name: &str,
    unit: &str,
    make: impl Fn() -> E,
    warm: &MediaInput,
    items: &[MediaInput],
) {
    let n = items.len();
    let mut one = MediaEncoderEngine::new(make(), 0);
    let mut all = MediaEncoderEngine::new(make(), 1 << 30);
    // Warm both (allocator, weights in cache) on an item outside the measured set.
    run(&mut one, std::slice::from_ref(warm), 1_000_000, 1);
    run(&mut all, std::slice::from_ref(warm), 1_000_000, 1);
    let t_one = run(&mut one, items, 0, 1);
    let t_all = run(&mut all, items, 10_000, n);
    let t_cached = run(&mut all, items, 20_000, n);
    let stats = all.stats();
    println!(
        "{name}: {n} {unit}  batch 1: {:.1} {unit}/s  batch {n}: {:.1} {unit}/s  ({:.2}x)  \
         cached: {:.3} ms each ({} hits of {} lookups)",
        n as f64 / t_one,
        n as f64 / t_all,
        t_one / t_all,
        t_cached * 1e3 / n as f64,
        stats.encoder_cache_hits_total,
        stats.encoder_cache_queries_total,
    );
}

fn picture(k: usize) -> MediaInput {
    let (w, h) = (320, 240);
    let mut px = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            px.extend([
                ((x * 3 + k * 29) % 256) as u8,
                ((y * 5 + k * 13) % 256) as u8,
                (((x ^ y) + k * 7) % 256) as u8,
            ]);
        }
    }
    MediaInput::image(px, w, h).expect("image")
}

fn clip(k: usize) -> MediaInput {
    let rate = 16_000u32;
    let samples = (0..rate as usize * 5)
        .map(|i| {
            let t = i as f64 / f64::from(rate);
            (0.3 * (t * (200.0 + 40.0 * k as f64) * std::f64::consts::TAU).sin()) as f32
        })
        .collect();
    MediaInput::audio(samples, rate).expect("clip")
}

fn main() {
    let n: usize = std::env::var("ENCODER_BENCH_ITEMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let dir = tempfile::tempdir().expect("temp dir");
    let vision_dir = dir.path().join("vision");
    let vision = TinyVisionSpec {
        tower: TinyVisionTower::Clip,
        image_size: 224,
        patch_size: 16,
        hidden_size: 768,
        intermediate_size: 3072,
        num_hidden_layers: 12,
        num_attention_heads: 12,
        out_dim: 896,
        vision_feature_layer: -2,
        select_strategy: "default".into(),
    };
    write_tiny_vision(&vision_dir, &vision, 1).expect("vision checkpoint");
    let audio_dir = dir.path().join("audio");
    let whisper = TinyWhisperSpec {
        d_model: 512,
        encoder_layers: 6,
        encoder_attention_heads: 8,
        encoder_ffn_dim: 2048,
        max_source_positions: 1500,
        chunk_length: 30,
        ..TinyWhisperSpec::tiny(896)
    };
    write_tiny_whisper(&audio_dir, &whisper, 1).expect("whisper checkpoint");
    println!(
        "machine: {} threads; vision: CLIP ViT-B/16 shape at 224 px, {} rows per image; audio: \
         Whisper-base shape, 30 s windows, 5 s clips",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        vision.rows()
    );
    let images: Vec<MediaInput> = (0..n).map(picture).collect();
    report(
        "vision",
        "images",
        || VisionEncoder::load(&vision_dir, DType::F32, &Device::Cpu).expect("load vision"),
        &picture(999),
        &images,
    );
    let clips: Vec<MediaInput> = (0..n.div_ceil(2)).map(clip).collect();
    report(
        "audio",
        "clips",
        || WhisperEncoder::load(&audio_dir, DType::F32, &Device::Cpu).expect("load whisper"),
        &clip(999),
        &clips,
    );
}
