//! How the LLM stage's scheduling shapes latency, on a ~100M-parameter Qwen3-layout checkpoint
//! (made by make-tiny; or `OMNISTAGE_BENCH_MODEL=DIR`), over the real HTTP path:
//!
//! 1. **Chunked prefill.** Eight streams are decoding when a 2048-token prompt arrives, and a
//!    short request right after it. Reported for step token budgets from one that swallows the
//!    prompt in one step (unchunked) down to 12 (or `OMNISTAGE_BENCH_BUDGETS`, comma-separated): the running streams' mean gap between tokens
//!    before the long prompt arrived and while it is prefilled, the short request's time to
//!    first token alone and behind the long prompt, and the long prompt's own TTFT.
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

/// Token arrival times of one streamed completion, measured from `epoch`.
async fn stream_times(
    client: &reqwest::Client,
    url: &str,
    prompt: Value,
    max_tokens: usize,
    epoch: Instant,
) -> Vec<Duration> {
    let body = json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true, "stream": true});
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
                    times.push(epoch.elapsed());
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

/// A prompt of exactly `n` ordinary token ids (distinct per `salt`).
fn token_prompt(n: usize, salt: usize) -> Value {
    json!((0..n)
        .map(|i| ((i * 7919 + salt * 104_729) % 480) as u32)
        .collect::<Vec<_>>())
}

/// What one run of the long-prompt scenario measured.
struct Interference {
    /// Running streams' mean gap between tokens before the long prompt arrived...
    gap_before: Duration,
    /// ...and while it was being prefilled (arrival to its first token).
    gap_during: Duration,
    /// Time to first token of a short request sent alone, and of one sent while the long prompt
    /// is being prefilled.
    short_ttft_alone: Duration,
    short_ttft_during: Duration,
    long_ttft: Duration,
}

fn mean(d: &[Duration]) -> Duration {
    d.iter().sum::<Duration>() / d.len().max(1) as u32
}

/// Eight streams decode; a `LONG_PROMPT`-token prompt arrives; shortly after, a short request
/// arrives too.
async fn chunked_prefill(model: &Path, budget: usize) -> Interference {
    // Room for the 8 streams, the long prompt and the short request; the budget may go down
    // to that many tokens (every running job needs one per step).
    let settings = format!("max_batch_size = 12\nmax_batched_tokens = {budget}");
    let server = serve_llm(model, &settings).await;
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/completions", server.addr);
    let epoch = Instant::now();
    let short_alone = stream_times(&client, &url, token_prompt(32, 500), 1, epoch).await[0];
    let mut streams = Vec::new();
    for i in 0..8 {
        let (client, url) = (client.clone(), url.clone());
        streams.push(tokio::spawn(async move {
            stream_times(&client, &url, token_prompt(16, i), 160, epoch).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let arrival = epoch.elapsed();
    let long = {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move {
            stream_times(&client, &url, token_prompt(LONG_PROMPT, 99), 1, epoch).await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let short_sent = epoch.elapsed();
    let short = stream_times(&client, &url, token_prompt(32, 501), 1, epoch).await[0];
    let long_first = long.await.expect("long")[0];
    let (mut before, mut during) = (Vec::new(), Vec::new());
    for s in streams {
        for w in s.await.expect("stream").windows(2) {
            let gap = w[1] - w[0];
            // Skip the streams' own prefill: gaps from one second in.
            if w[1] < arrival && w[0] > Duration::from_secs(1) {
                before.push(gap);
            } else if w[0] >= arrival && w[1] <= long_first {
                during.push(gap);
            }
        }
    }
    server.abort();
    Interference {
        gap_before: mean(&before),
        gap_during: mean(&during),
        short_ttft_alone: short_alone,
        short_ttft_during: short - short_sent,
        long_ttft: long_first - arrival,
    }
}

/// Tokens of the long prompt of scenario 1.
const LONG_PROMPT: usize = 2048;

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
    // `RUST_LOG=omnistage_scheduler=trace` shows every step's jobs, tokens and time.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
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
        println!("\n1. a {LONG_PROMPT}-token prompt arrives while 8 streams decode");
        println!(
            "{:>18} {:>24} {:>26} {:>17}",
            "step token budget",
            "streams' token gap",
            "short request TTFT",
            "long prompt TTFT"
        );
        println!(
            "{:>18} {:>24} {:>26}",
            "", "before -> during (x)", "alone -> during (x)"
        );
        let budgets: Vec<usize> = std::env::var("OMNISTAGE_BENCH_BUDGETS")
            .ok()
            .map(|v| v.split(',').filter_map(|b| b.trim().parse().ok()).collect())
            .unwrap_or_else(|| vec![4096, 256, 64, 32, 12]);
        for budget in budgets {
            let r = chunked_prefill(&model, budget).await;
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            let label = if budget >= LONG_PROMPT {
                format!("{budget} (unchunked)")
            } else {
                budget.to_string()
            };
            println!(
                "{label:>18} {:>7.0} -> {:>5.0}ms ({:>4.2}x) {:>8.0} -> {:>5.0}ms ({:>5.2}x) {:>15.0}ms",
                ms(r.gap_before),
                ms(r.gap_during),
                ms(r.gap_during) / ms(r.gap_before).max(1e-9),
                ms(r.short_ttft_alone),
                ms(r.short_ttft_during),
                ms(r.short_ttft_during) / ms(r.short_ttft_alone).max(1e-9),
                ms(r.long_ttft)
            );
        }
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
