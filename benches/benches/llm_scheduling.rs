//! How the LLM stage's scheduling shapes latency, on a ~100M-parameter Qwen3-layout checkpoint
//! (made by make-tiny; or `OMNISTAGE_BENCH_MODEL=DIR`), over the real HTTP path:
//!
//! 1. **Chunked prefill.** Eight streams are decoding when a ~2k-token prompt arrives. Reported:
//!    the running streams' largest gap between tokens while it is prefilled, and the long
//!    request's time to first token — with a 256-token step budget (chunked) and with a budget
//!    that swallows the prompt in one step (unchunked).
//! 2. **Prefix caching.** Sixteen requests share a ~1k-token system prompt, sent one after another.
//!    Reported: prefix-cache hit rate (from `/metrics`) and mean time to first token, with prefix
//!    caching on and off.
//!
//! Run: `cargo bench -p omnistage-benches --bench llm_scheduling`

use futures::StreamExt;
use omnistage::app::Server;
use omnistage_benches::serve_llm;
use omnistage_engines::tiny::{TinyFamily, TinyLlmSpec};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Token arrival times of one streamed completion, from the moment it was sent.
async fn stream_times(
    client: &reqwest::Client,
    url: &str,
    prompt: String,
    max_tokens: usize,
) -> Vec<Duration> {
    let body = json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true, "stream": true});
    let start = Instant::now();
    let resp = client.post(url).json(&body).send().await.expect("send");
    let mut stream = resp.bytes_stream();
    let mut times = Vec::new();
    let mut buf = String::new();
    while let Some(chunk) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            if let Some(data) = event.trim().strip_prefix("data: ") {
                if data != "[DONE]" {
                    times.push(start.elapsed());
                }
            }
        }
    }
    times
}

async fn start(model: &Path, extra: &str) -> Server {
    serve_llm(model, &format!("max_batch_size = 32\n{extra}")).await
}

fn words(n: usize, salt: usize) -> String {
    (0..n)
        .map(|i| format!("w{} ", (i * 7919 + salt * 104_729) % 1000))
        .collect()
}

async fn chunked_prefill(model: &Path, budget: usize) -> (Duration, Duration, usize) {
    let server = start(model, &format!("max_batched_tokens = {budget}")).await;
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/completions", server.addr);
    let mut streams = Vec::new();
    for i in 0..8 {
        let (client, url) = (client.clone(), url.clone());
        streams.push(tokio::spawn(async move {
            stream_times(&client, &url, words(16, i), 96).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let long_prompt = words(1000, 99);
    let long = stream_times(&client, &url, long_prompt, 4).await;
    let long_ttft = long.first().copied().unwrap_or_default();
    let mut worst_gap = Duration::ZERO;
    for s in streams {
        let times = s.await.expect("stream");
        worst_gap = worst_gap.max(
            times
                .windows(2)
                .map(|w| w[1] - w[0])
                .max()
                .unwrap_or_default(),
        );
    }
    let prompt_tokens = {
        let body = json!({"prompt": words(1000, 99), "max_tokens": 1, "ignore_eos": true});
        let r: Value = client
            .post(&url)
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        r["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as usize
    };
    server.abort();
    (worst_gap, long_ttft, prompt_tokens)
}

async fn prefix_cache(model: &Path, on: bool) -> (f64, Duration) {
    let server = start(model, &format!("prefix_caching = {on}")).await;
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/chat/completions", server.addr);
    let system = words(500, 7);
    let mut total = Duration::ZERO;
    let n = 16;
    for i in 0..n {
        let body = json!({
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": format!("question {i}")}],
            "max_tokens": 1, "temperature": 0, "ignore_eos": true,
        });
        let t = Instant::now();
        let r: Value = client
            .post(&url)
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(r["usage"]["completion_tokens"], 1);
        total += t.elapsed();
    }
    let metrics = client
        .get(format!("http://{}/metrics", server.addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let hits = value("omnistage_stage_prefix_cache_hit_tokens_total");
    let queries = value("omnistage_stage_prefix_cache_query_tokens_total");
    server.abort();
    (if queries > 0.0 { hits / queries } else { 0.0 }, total / n)
}

fn main() {
    let models = tempfile::tempdir().expect("temp dir");
    let model: PathBuf = match std::env::var_os("OMNISTAGE_BENCH_MODEL") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let dir = models.path().join("qwen3-100m");
            omnistage_engines::tiny::write_tiny_llm(
                &dir,
                &TinyLlmSpec::bench_100m(TinyFamily::Qwen3),
                0,
            )
            .expect("make checkpoint");
            dir
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        println!("model: {}", model.display());
        println!("\n1. a long prompt arrives while 8 streams decode");
        println!(
            "{:>28} {:>22} {:>20}",
            "step token budget", "worst gap in streams", "long prompt TTFT"
        );
        let mut rows = Vec::new();
        for budget in [256usize, 4096] {
            let (gap, ttft, prompt_tokens) = chunked_prefill(&model, budget).await;
            let label = if budget >= prompt_tokens {
                format!("{budget} (unchunked)")
            } else {
                format!("{budget} (chunked)")
            };
            println!(
                "{label:>28} {:>20.0}ms {:>18.0}ms   (prompt: {prompt_tokens} tokens)",
                gap.as_secs_f64() * 1e3,
                ttft.as_secs_f64() * 1e3
            );
            rows.push(gap);
        }
        println!(
            "   chunked / unchunked worst gap: {:.2}x",
            rows[0].as_secs_f64() / rows[1].as_secs_f64().max(1e-9)
        );
        println!("\n2. sixteen requests share a ~1k-token system prompt");
        println!(
            "{:>16} {:>10} {:>12}",
            "prefix caching", "hit rate", "mean TTFT"
        );
        let mut ttfts = Vec::new();
        for on in [true, false] {
            let (rate, ttft) = prefix_cache(&model, on).await;
            println!(
                "{:>16} {:>9.1}% {:>10.0}ms",
                if on { "on" } else { "off" },
                rate * 100.0,
                ttft.as_secs_f64() * 1e3
            );
            ttfts.push(ttft);
        }
        println!(
            "   TTFT off / on: {:.2}x",
            ttfts[1].as_secs_f64() / ttfts[0].as_secs_f64().max(1e-9)
        );
    });
}
