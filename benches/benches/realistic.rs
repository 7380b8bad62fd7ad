//! omnistage against HF Transformers on a realistic workload, side by side in one run.
//!
//! The workload is seeded and uneven, as traffic is: prompt lengths 16–512 and output lengths
//! 8–256 tokens drawn from log-normal distributions (many short, a long tail), arriving as a
//! Poisson process. Prompts are token ids, so both engines see exactly the same input; every
//! request is greedy with EOS ignored, so each produces exactly its `max_tokens`.
//!
//! 1. omnistage serves the workload over HTTP (`/v1/completions` with token-id prompts and
//!    `return_token_ids`), each request sent at its arrival time.
//! 2. `benches/hf_baseline.py` serves the same workload file with `transformers` `generate` in
//!    static padded batches of up to 32, the way its users serve (see its docstring; it needs
//!    a Python with torch and transformers: `OMNISTAGE_HF_PYTHON`, default `python3`; without
//!    one this part is skipped and said so).
//! 3. Reported: generated tokens per second over the makespan, mean / p50 / p99 job completion
//!    time for both, their ratio, and how many requests got identical greedy tokens (with the
//!    first differing position where they do not).
//!
//! Settings (environment): `OMNISTAGE_BENCH_MODEL` (default: the ~100M Qwen3-layout checkpoint
//! make-tiny writes), `OMNISTAGE_BENCH_REQUESTS` (32), `OMNISTAGE_BENCH_RATE` (requests/s, 0.5),
//! `OMNISTAGE_BENCH_SEED` (7), `OMNISTAGE_BENCH_OUT` (a directory for workload.json,
//! omnistage.json and hf.json; default a temporary one).
//!
//! Run: `cargo bench -p omnistage-benches --bench realistic`

use omnistage_benches::serve_llm;
use omnistage_engines::tiny::{TinyFamily, TinyLlmSpec};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One request of the workload.
#[derive(Clone)]
struct Request {
    id: usize,
    arrival: f64,
    prompt: Vec<u32>,
    max_tokens: usize,
}

/// A log-normal draw with the given median and log-space spread, clamped to `[lo, hi]`.
fn log_normal(rng: &mut impl Rng, median: f64, sigma: f64, lo: usize, hi: usize) -> usize {
    // Box-Muller from two uniforms.
    let (u1, u2): (f64, f64) = (rng.gen_range(1e-12..1.0), rng.gen());
    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    ((median * (sigma * z).exp()).round() as usize).clamp(lo, hi)
}

fn workload(n: usize, rate: f64, seed: u64, vocab: usize) -> Vec<Request> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut t = 0.0;
    (0..n)
        .map(|id| {
            if id > 0 {
                t += -rng.gen_range(1e-12..1.0f64).ln() / rate;
            }
            let len = log_normal(&mut rng, 128.0, 0.8, 16, 512);
            // Ordinary ids only: the checkpoint's special tokens sit at the top of the vocabulary.
            let prompt = (0..len)
                .map(|_| rng.gen_range(0..vocab as u32 - 16))
                .collect();
            Request {
                id,
                arrival: t,
                prompt,
                max_tokens: log_normal(&mut rng, 64.0, 0.9, 8, 256),
            }
        })
        .collect()
}

/// Per-engine result: output ids and JCT per request id, and the makespan.
struct Outcome {
    ids: Vec<Vec<u64>>,
    jct: Vec<f64>,
    makespan: f64,
}

async fn run_omnistage(model: &Path, requests: &[Request]) -> Outcome {
    let server = serve_llm(model, "max_batch_size = 64\nmax_queue = 1024").await;
    let url = format!("http://{}/v1/completions", server.addr);
    let client = reqwest::Client::new();
    // Warm-up, as the HF side warms up before its clock starts.
    let warm = json!({"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0});
    client.post(&url).json(&warm).send().await.expect("warm-up");
    let start = Instant::now();
    let tasks: Vec<_> = requests
        .iter()
        .cloned()
        .map(|r| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                tokio::time::sleep_until((start + Duration::from_secs_f64(r.arrival)).into()).await;
                let body = json!({"prompt": r.prompt, "max_tokens": r.max_tokens, "temperature": 0,
                    "ignore_eos": true, "return_token_ids": true});
                let resp: Value = client
                    .post(&url)
                    .json(&body)
                    .send()
                    .await
                    .expect("send")
                    .json()
                    .await
                    .expect("json");
                let done = start.elapsed().as_secs_f64();
                let ids: Vec<u64> = resp["choices"][0]["token_ids"]
                    .as_array()
                    .unwrap_or_else(|| panic!("request {}: no token ids in {resp}", r.id))
                    .iter()
                    .filter_map(Value::as_u64)
                    .collect();
                (ids, done - r.arrival, done)
            })
        })
        .collect();
    let mut out = Outcome {
        ids: Vec::new(),
        jct: Vec::new(),
        makespan: 0.0,
    };
    for t in tasks {
        let (ids, jct, done) = t.await.expect("request task");
        out.ids.push(ids);
        out.jct.push(jct);
        out.makespan = out.makespan.max(done);
    }
    out.makespan -= requests[0].arrival;
    server.abort();
    out
}

fn run_hf(workload: &Path, out: &Path) -> Result<(Outcome, String), String> {
    let python = std::env::var("OMNISTAGE_HF_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("hf_baseline.py");
    let status = std::process::Command::new(&python)
        .arg(&script)
        .args(["--workload".as_ref(), workload.as_os_str()])
        .args(["--out".as_ref(), out.as_os_str()])
        .args(["--max-batch", "32", "--threads"])
        .arg(candle_core::utils::get_num_threads().to_string())
        .status()
        .map_err(|e| format!("cannot run {python}: {e}"))?;
    if !status.success() {
        return Err(format!(
            "{python} {} failed ({status}); install it with the commands in its docstring",
            script.display()
        ));
    }
    let text = std::fs::read_to_string(out).map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let reqs = v["requests"].as_array().ok_or("no requests in HF result")?;
    let mut ids = vec![Vec::new(); reqs.len()];
    let mut jct = vec![0.0; reqs.len()];
    for r in reqs {
        let i = r["id"].as_u64().ok_or("request without id")? as usize;
        ids[i] = r["output_ids"]
            .as_array()
            .ok_or("no output_ids")?
            .iter()
            .filter_map(Value::as_u64)
            .collect();
        jct[i] = r["jct_s"].as_f64().unwrap_or(f64::NAN);
    }
    let engine = v["engine"]
        .as_str()
        .unwrap_or("hf-transformers")
        .to_string();
    let makespan = v["makespan_s"].as_f64().ok_or("no makespan")?;
    Ok((Outcome { ids, jct, makespan }, engine))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn summary(name: &str, o: &Outcome, tokens: usize) -> f64 {
    let mut jct = o.jct.clone();
    jct.sort_by(f64::total_cmp);
    let mean = jct.iter().sum::<f64>() / jct.len() as f64;
    let rate = tokens as f64 / o.makespan;
    println!(
        "{name:<16} {:>9.1} {rate:>9.1} {mean:>9.2} {:>9.2} {:>9.2}",
        o.makespan,
        percentile(&jct, 0.5),
        percentile(&jct, 0.99)
    );
    rate
}

fn main() {
    let models = tempfile::tempdir().expect("temp dir");
    let model: PathBuf = match std::env::var_os("OMNISTAGE_BENCH_MODEL") {
        Some(dir) => dir.into(),
        None => {
            let dir = models.path().join("qwen3-100m");
            let spec = TinyLlmSpec::bench_100m(TinyFamily::Qwen3);
            omnistage_engines::tiny::write_tiny_llm(&dir, &spec, 0).expect("make checkpoint");
            dir
        }
    };
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(model.join("config.json")).expect("config.json"),
    )
    .expect("config json");
    let vocab = config["vocab_size"].as_u64().expect("vocab_size") as usize;
    let (n, rate, seed) = (
        env_or("OMNISTAGE_BENCH_REQUESTS", 32usize),
        env_or("OMNISTAGE_BENCH_RATE", 0.5f64),
        env_or("OMNISTAGE_BENCH_SEED", 7u64),
    );
    let requests = workload(n, rate, seed, vocab);
    let out_dir: PathBuf = std::env::var_os("OMNISTAGE_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| models.path().join("results"));
    std::fs::create_dir_all(&out_dir).expect("results dir");
    let wl_path = out_dir.join("workload.json");
    let wl = json!({
        "model": model.canonicalize().unwrap_or(model.clone()),
        "seed": seed,
        "requests": requests.iter().map(|r| json!({"id": r.id, "arrival_s": r.arrival,
            "prompt_ids": r.prompt, "max_tokens": r.max_tokens})).collect::<Vec<_>>(),
    });
    std::fs::write(&wl_path, wl.to_string()).expect("write workload");
    let prompt_tokens: usize = requests.iter().map(|r| r.prompt.len()).sum();
    let tokens: usize = requests.iter().map(|r| r.max_tokens).sum();
    println!(
        "workload: {n} requests, Poisson at {rate}/s over {:.1} s, {prompt_tokens} prompt tokens, \
         {tokens} output tokens (seed {seed}); model {} ({} threads)",
        requests.last().map_or(0.0, |r| r.arrival),
        model.display(),
        candle_core::utils::get_num_threads()
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ours = rt.block_on(run_omnistage(&model, &requests));
    std::fs::write(
        out_dir.join("omnistage.json"),
        json!({"makespan_s": ours.makespan, "jct_s": ours.jct, "output_ids": ours.ids}).to_string(),
    )
    .expect("write omnistage result");
    let hf = run_hf(&wl_path, &out_dir.join("hf.json"));

    println!();
    println!(
        "{:<16} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "engine", "makespan", "tok/s", "mean JCT", "p50 JCT", "p99 JCT"
    );
    let our_rate = summary("omnistage", &ours, tokens);
    match hf {
        Ok((hf, engine)) => {
            println!("(HF side: {engine})");
            let hf_rate = summary("HF Transformers", &hf, tokens);
            println!(
                "omnistage / HF: {:.2}x tokens/s, {:.2}x lower mean JCT",
                our_rate / hf_rate,
                hf.jct.iter().sum::<f64>() / ours.jct.iter().sum::<f64>()
            );
            let mut same = 0;
            for (i, (a, b)) in ours.ids.iter().zip(&hf.ids).enumerate() {
                match a.iter().zip(b).position(|(x, y)| x != y) {
                    None if a.len() == b.len() => same += 1,
                    None => println!("request {i}: {} vs {} tokens", a.len(), b.len()),
                    Some(p) => println!(
                        "request {i}: greedy tokens differ from position {p} of {}",
                        a.len()
                    ),
                }
            }
            println!("greedy outputs identical for {same} of {n} requests");
        }
        Err(e) => println!("HF Transformers side skipped: {e}"),
    }
    println!("results in {}", out_dir.display());
}
