//! The LLM forward alone (no HTTP, no scheduler): decode steps per second over the paged KV pool
//! at several batch sizes, next to this machine's memory bandwidth measured in the same run.
//!
//! Batch-1 decode reads every weight once per token, so it cannot beat
//! `read bandwidth / weight bytes` tokens per second. The read bandwidth is taken as twice the
//! memcpy copy rate (a copy reads and writes each byte), measured here on a buffer the size of
//! the weights, so the floor and the measured rate come from one run on one machine.
//!
//! Model: a ~100M-parameter Qwen3-layout checkpoint made by make-tiny (or
//! `OMNISTAGE_BENCH_MODEL=DIR`), f32 on the CPU. Each sequence has `OMNISTAGE_BENCH_CONTEXT`
//! (default 256) tokens cached before the timed decode steps.
//!
//! Run: `cargo bench -p omnistage-benches --bench forward`

use candle_core::{DType, Device};
use omnistage_engines::llm::model::LlmModel;
use omnistage_engines::llm::paged::{PagedChunk, PagedKvPool};
use omnistage_engines::tiny::{TinyFamily, TinyLlmSpec};
use std::path::PathBuf;
use std::time::Instant;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Best-of-five memcpy copy rate in bytes/s over a buffer of `bytes`.
fn memcpy_rate(bytes: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    dst.copy_from_slice(&src); // fault the pages in
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    bytes as f64 / best
}

fn main() {
    let models = tempfile::tempdir().expect("temp dir");
    let dir = match std::env::var_os("OMNISTAGE_BENCH_MODEL") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let dir = models.path().join("qwen3-100m");
            let spec = TinyLlmSpec::bench_100m(TinyFamily::Qwen3);
            omnistage_engines::tiny::write_tiny_llm(&dir, &spec, 0).expect("make checkpoint");
            dir
        }
    };
    let model = LlmModel::load(&dir, DType::F32, &Device::Cpu).expect("load model");
    let cfg = model.config().clone();
    let weight_bytes: usize = omnistage_engines::llm::weights::find_safetensors(&dir)
        .expect("weights")
        .iter()
        .map(|f| std::fs::metadata(f).map_or(0, |m| m.len() as usize))
        .sum();
    let context = env_usize("OMNISTAGE_BENCH_CONTEXT", 256);
    let steps = env_usize("OMNISTAGE_BENCH_STEPS", 16);
    let batches: Vec<usize> = std::env::var("OMNISTAGE_BENCH_BATCHES")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 8, 32, 64]);

    let copy = memcpy_rate(weight_bytes);
    let floor = 2.0 * copy / weight_bytes as f64;
    println!(
        "model: {} ({:.1} MB of weights, f32, cpu, {} threads)",
        dir.display(),
        weight_bytes as f64 / 1e6,
        candle_core::utils::get_num_threads()
    );
    println!(
        "memcpy {:.1} GB/s -> read bandwidth {:.1} GB/s -> batch-1 floor {:.1} tokens/s",
        copy / 1e9,
        2.0 * copy / 1e9,
        floor
    );
    println!("context per sequence: {context} tokens, {steps} timed decode steps");
    println!(
        "{:>6} {:>12} {:>12} {:>14}",
        "batch", "ms/step", "tokens/s", "vs floor"
    );
    let block = 16;
    for &b in &batches {
        let per_seq = (context + steps).div_ceil(block) + 1;
        let mut pool =
            PagedKvPool::new(&cfg, b * per_seq, block, DType::F32, &Device::Cpu).expect("pool");
        let tables: Vec<Vec<u32>> = (0..b)
            .map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect())
            .collect();
        // Fill each sequence's context with one prefill (its own tokens, so no two are alike).
        let prompts: Vec<Vec<u32>> = (0..b)
            .map(|s| {
                (0..context)
                    .map(|i| ((i * 31 + s * 17) % cfg.vocab_size) as u32)
                    .collect()
            })
            .collect();
        for (s, prompt) in prompts.iter().enumerate() {
            let chunk = PagedChunk {
                tokens: prompt,
                past: 0,
                block_table: &tables[s],
                want_hidden: false,
                splice: &[],
            };
            model.forward_paged(&mut pool, &[chunk]).expect("prefill");
        }
        let tokens: Vec<[u32; 1]> = (0..b).map(|s| [(s % cfg.vocab_size) as u32]).collect();
        let mut elapsed = 0.0;
        for step in 0..=steps {
            let batch: Vec<PagedChunk<'_>> = (0..b)
                .map(|s| PagedChunk {
                    tokens: &tokens[s],
                    past: context + step,
                    block_table: &tables[s],
                    want_hidden: false,
                    splice: &[],
                })
                .collect();
            let t = Instant::now();
            model.forward_paged(&mut pool, &batch).expect("decode");
            // The first step warms caches and allocator; it is not timed.
            if step > 0 {
                elapsed += t.elapsed().as_secs_f64();
            }
        }
        let per_step = elapsed / steps as f64;
        let rate = b as f64 / per_step;
        let vs_floor = if b == 1 {
            format!("{:.0}%", 100.0 * rate / floor)
        } else {
            "-".into()
        };
        println!(
            "{b:>6} {:>12.2} {rate:>12.1} {vs_floor:>14}",
            per_step * 1e3
        );
    }
}
