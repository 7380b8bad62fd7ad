//! Decode throughput of the LLM stage over the real HTTP path, at several concurrencies.
//!
//! Starts an in-process server on each model in turn — the embedded default's tiny thinker and a
//! ~100M-parameter Qwen3-layout checkpoint made by make-tiny (or only `OMNISTAGE_BENCH_MODEL=DIR`) —
//! then for
//! each concurrency C runs C closed-loop clients, each sending chat requests for exactly
//! `OMNISTAGE_BENCH_TOKENS` (default 64) tokens, for `OMNISTAGE_BENCH_REQUESTS` (default 2 × C, at
//! least 4) requests in all. Reports generated tokens per second and the ratio to concurrency 1.
//!
//! For the ~100M checkpoint (or `OMNISTAGE_BENCH_MODEL`), HF Transformers' raw batched decode
//! on the same checkpoint runs next, in the same process run: `benches/hf_baseline.py
//! --raw-decode` times one `generate` call of the same number of new tokens per batch size
//! (prefill included, as ours is), with the Python named by `OMNISTAGE_HF_PYTHON` (default
//! `python3`; skipped, and said so, when it cannot run).
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
    let mut last = Vec::new();
    for dir in &model_dirs {
        last = rt.block_on(bench_model(dir));
    }
    if let Some(dir) = model_dirs.last() {
        compare_with_hf(dir, &last);
    }
}

/// Runs HF Transformers' raw batched decode on `model` and prints it next to `ours`
/// (`(concurrency, tokens/s)`).
fn compare_with_hf(model: &Path, ours: &[(usize, f64)]) {
    let python = std::env::var("OMNISTAGE_HF_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("hf_baseline.py");
    let out = tempfile::NamedTempFile::new().expect("temp file");
    let batches: Vec<String> = ours.iter().map(|(c, _)| c.to_string()).collect();
    let tokens = env_usize("OMNISTAGE_BENCH_TOKENS", 64);
    let status = std::process::Command::new(&python)
        .arg(&script)
        .args(["--raw-decode", &batches.join(",")])
        .arg("--model")
        .arg(model)
        .args([
            "--new-tokens",
            &tokens.to_string(),
            "--prompt-len",
            "24",
            "--threads",
        ])
        .arg(candle_core::utils::get_num_threads().to_string())
        .arg("--out")
        .arg(out.path())
        .status();
    let hf: serde_json::Value = match status {
        Ok(s) if s.success() => std::fs::read_to_string(out.path())
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default(),
        Ok(s) => {
            println!(
                "\nHF Transformers side skipped: {python} {} exited with {s}",
                script.display()
            );
            return;
        }
        Err(e) => {
            println!("\nHF Transformers side skipped: cannot run {python}: {e}");
            return;
        }
    };
    println!("\nraw batched decode, {tokens} new tokens per request, same checkpoint, same run");
    println!("HF side: {}", hf["engine"].as_str().unwrap_or("?"));
    println!(
        "{:>11} {:>14} {:>14} {:>8}",
        "concurrency", "omnistage tok/s", "HF tok/s", "ratio"
    );
    for (c, rate) in ours {
        let hf_rate = hf["batches"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["batch"].as_u64() == Some(*c as u64)))
            .and_then(|r| r["tokens_per_s"].as_f64());
        match hf_rate {
            Some(h) => println!("{c:>11} {rate:>14.1} {h:>14.1} {:>7.2}x", rate / h),
            None => println!("{c:>11} {rate:>14.1} {:>14}", "-"),
        }
    }
}

/// Serves `model_dir` and measures every concurrency level; returns `(concurrency, tokens/s)`.
async fn bench_model(model_dir: &Path) -> Vec<(usize, f64)> {
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
    let mut rates = Vec::new();
    for c in [1usize, 8, 32, 64] {
        let requests = env_usize("OMNISTAGE_BENCH_REQUESTS", (2 * c).max(4));
        let (total, elapsed) = run_level(&client, &url, c, requests, tokens).await;
        let rate = total as f64 / elapsed.as_secs_f64();
        let ratio = base.map_or(1.0, |b: f64| rate / b);
        rates.push((c, rate));
        base.get_or_insert(rate);
        println!(
            "{c:>11} {requests:>9} {total:>10} {:>10.2} {rate:>12.1}  ({ratio:.2}x of concurrency 1)",
            elapsed.as_secs_f64()
        );
    }
    server.abort();
    rates
}
