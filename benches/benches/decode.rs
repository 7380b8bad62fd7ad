//! Decode throughput of the LLM stage over the real HTTP path, at several concurrencies.
//!
//! Starts an in-process server on each model in turn — the embedded default's tiny thinker and a
//! ~100M-parameter Qwen3-layout checkpoint made by make-tiny (or only `OMNISTAGE_BENCH_MODEL=DIR`) —
//! then for
//! each concurrency C runs C closed-loop clients, each sending chat requests for exactly
//! `OMNISTAGE_BENCH_TOKENS` (default 64) tokens, for `OMNISTAGE_BENCH_REQUESTS` (default 2 × C, at
//! least 4) requests in all. Reports generated tokens per second and the ratio to concurrency 1.
//!
//! Run: `cargo bench -p omnistage-benches --bench decode`

use omnistage_benches::serve_llm;
use omnistage_engines::tiny::{TinyFamily, TinyLlmSpec};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn run_level(
    client: &reqwest::Client,
    url: &str,
    concurrency: usize,
    requests: usize,
    tokens: usize,
) -> (usize, Duration) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, url, next) = (client.clone(), url.to_string(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut generated = 0;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= requests {
                    return generated;
                }
                let body = json!({
                    "messages": [{"role": "user", "content": format!("benchmark request {i}: tell me something")}],
                    "max_tokens": tokens, "temperature": 0, "ignore_eos": true,
                });
                let resp: serde_json::Value = client.post(&url).json(&body).send().await.expect("send").json().await.expect("json");
                generated += resp["usage"]["completion_tokens"].as_u64().expect("usage") as usize;
            }
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("client task");
    }
    (total, start.elapsed())
}

fn main() {
    let models = tempfile::tempdir().expect("temp dir");
    let model_dirs: Vec<PathBuf> = match std::env::var_os("OMNISTAGE_BENCH_MODEL") {
        Some(dir) => vec![PathBuf::from(dir)],
        None => {
            let manifest = omnistage_engines::tiny::make_tiny(models.path(), 0).expect("make tiny");
            let tiny = manifest.checkpoint("thinker").expect("thinker").dir.clone();
            let bigger = models.path().join("qwen3-100m");
            let spec = TinyLlmSpec::bench_100m(TinyFamily::Qwen3);
            omnistage_engines::tiny::write_tiny_llm(&bigger, &spec, 0)
                .expect("make 100M checkpoint");
            vec![tiny, bigger]
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for dir in model_dirs {
        rt.block_on(bench_model(&dir));
    }
}

async fn bench_model(model_dir: &Path) {
    let tokens = env_usize("OMNISTAGE_BENCH_TOKENS", 64);
    let weight_bytes: u64 = omnistage_engines::llm::weights::find_safetensors(model_dir)
        .map(|files| {
            files
                .iter()
                .filter_map(|f| std::fs::metadata(f).ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    let server = serve_llm(model_dir, "max_batch_size = 64\nmax_queue = 1024").await;
    let url = format!("http://{}/v1/chat/completions", server.addr);
    let client = reqwest::Client::new();
    // Warm-up.
    run_level(&client, &url, 1, 1, 8).await;
    println!();
    println!(
        "model: {} ({:.1} MB of weights, cpu)",
        model_dir.display(),
        weight_bytes as f64 / 1e6
    );
    println!("tokens per request: {tokens}");
    println!(
        "{:>11} {:>9} {:>10} {:>10} {:>12}",
        "concurrency", "requests", "tokens", "seconds", "tokens/s"
    );
    let mut base = None;
    for c in [1usize, 8, 32, 64] {
        let requests = env_usize("OMNISTAGE_BENCH_REQUESTS", (2 * c).max(4));
        let (total, elapsed) = run_level(&client, &url, c, requests, tokens).await;
        let rate = total as f64 / elapsed.as_secs_f64();
        let ratio = base.map_or(1.0, |b: f64| rate / b);
        base.get_or_insert(rate);
        println!(
            "{c:>11} {requests:>9} {total:>10} {:>10.2} {rate:>12.1}  ({ratio:.2}x of concurrency 1)",
            elapsed.as_secs_f64()
        );
    }
    server.abort();
}
