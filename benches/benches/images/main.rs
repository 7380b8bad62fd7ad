//! Text-to-image serving: step-level continuous batching against one-at-a-time, step caching,
//! and diffusers, side by side in one run.
//!
//! An in-process server runs an image graph (LLM text encoder → SD3-style MMDiT → VAE) over a
//! freshly made tiny diffusers pipeline (`make-tiny`'s `tiny-omni/image/`), with
//! `max_batch_size = 8` at the dit and vae stages. Every request asks for one square image with
//! the same steps, guidance > 1 and a negative prompt (so classifier-free guidance is on), a
//! distinct prompt and a distinct seed. Measured over HTTP (`POST /v1/images/generations`),
//! each phase on the same request list:
//!
//! - (a) sequential: the next request is sent when the previous one has finished;
//! - (b) closed-loop concurrency C (default 1, 4, 8): C clients, each sending its next request
//!   when its last one returns;
//! - (c) step caching: concurrency 4 with `step_cache: false`, then `true`; the speed-up, and how
//!   far each cached image drifts from its uncached one (PSNR over RGB bytes, mean and min). The
//!   cache's threshold is a stage setting, so each threshold tried gets its own server (the
//!   default graph's 0.1 reuses almost no step of the tiny random model; 0.5 reuses about half).
//!
//! Each phase runs `OMNISTAGE_BENCH_REPEATS` times back to back (the two halves of (c)
//! alternating) and reports the run with the median makespan, with every run's images/s as a
//! range: on a small shared machine one run of a few seconds is noisy.
//!
//! Reported per phase: images/s over the makespan, mean / p50 / p90 job completion time, both
//! against (a), and from the server's `/metrics` (differences over the phase, where the series
//! exist): dit engine steps and jobs per step, rows per denoiser forward, cached steps. Every
//! batched phase's images are compared with (a)'s (a request's image should not depend on what
//! it was batched with). Afterwards the dit stage's series in `/metrics` are printed as they are.
//!
//! diffusers side (when `OMNISTAGE_DIFFUSERS_PYTHON` names a Python with torch, transformers and
//! diffusers, see `benches/hf_requirements.txt`; skipped and said so otherwise):
//! `benches/diffusers_baseline.py` runs `StableDiffusion3Pipeline` over the same folder, with
//! prompts encoded as our LLM encoder does, one request at a time and in static batches (8, and
//! all requests at once), with as many torch threads as candle uses. Its numbers are printed in
//! the same table with the ratios of ours against them. It also runs an end-to-end check: request
//! 0 with the initial latents our DiT stage drew for it (`diffusion::noise::gaussian`), whose
//! image must match (a)'s PNG to within a level or two per channel.
//!
//! Settings (environment): `OMNISTAGE_BENCH_REQUESTS` (24), `OMNISTAGE_BENCH_STEPS` (12),
//! `OMNISTAGE_BENCH_SIZE` (image side, 64), `OMNISTAGE_BENCH_GUIDANCE` (4),
//! `OMNISTAGE_BENCH_CONCURRENCY` (`1,4,8`), `OMNISTAGE_BENCH_CACHE_CONCURRENCY` (4),
//! `OMNISTAGE_BENCH_CACHE_THRESHOLDS` (the dit stage's `step_cache_threshold`s to try, each on
//! its own server: `0.1,0.5`; 0.1 is the embedded default graph's), `OMNISTAGE_BENCH_SEED` (7),
//! `OMNISTAGE_BENCH_REPEATS` (3), `OMNISTAGE_BENCH_PIPELINE` (a diffusers SD3-layout folder with
//! an LLM text encoder to use instead of a fresh tiny one), `OMNISTAGE_BENCH_TEXT_TOKENS` (16),
//! `OMNISTAGE_BENCH_OUT` (a directory for requests.json, diffusers.json and the check images;
//! default a temporary one), `OMNISTAGE_DIFFUSERS_PYTHON`. Stage settings can be overridden as in
//! any deployment (`OMNISTAGE_STAGE__DIT__MAX_BATCH_SIZE=1`, …).
//!
//! Run: `cargo bench -p omnistage-benches --bench images`

mod diffusers;
mod metrics;
mod pixels;
mod table;

use diffusers::{read_json, run_diffusers};
use table::{phase_row, print_table, Row};

use base64::Engine as _;
use metrics::{dit_stats, stage_series, DitStats};
use pixels::{pixel_diff, psnr, rgb, write_npy};

use omnistage::app::{ServeOptions, Server};
use omnistage_stages::deploy::DeployGraph;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Everything about the workload that is the same for every request.
#[derive(Clone)]
struct Shape {
    size: usize,
    steps: usize,
    guidance: f64,
    negative: String,
    /// The dit stage's `step_cache_threshold`.
    cache_threshold: f64,
}

#[derive(Clone)]
struct Request {
    prompt: String,
    seed: u64,
}

const NEGATIVE_PROMPT: &str = "blurry, low quality, distorted";

fn requests(n: usize, seed: u64) -> Vec<Request> {
    const SUBJECTS: [&str; 12] = [
        "a red fox",
        "a lighthouse",
        "an old bicycle",
        "a bowl of ramen",
        "a snowy mountain",
        "a paper boat",
        "a busy city street",
        "a sleeping cat",
        "a hot air balloon",
        "a wooden cabin",
        "a koi pond",
        "a small robot",
    ];
    const PLACES: [&str; 6] = [
        "at dusk",
        "in the rain",
        "under a starry sky",
        "in morning fog",
        "at noon",
        "by the sea",
    ];
    const STYLES: [&str; 5] = [
        "watercolor",
        "oil painting",
        "pixel art",
        "photograph",
        "ink sketch",
    ];
    (0..n)
        .map(|i| {
            let mut prompt = format!(
                "{} {}, {}",
                SUBJECTS[i % SUBJECTS.len()],
                PLACES[(i / SUBJECTS.len() + i) % PLACES.len()],
                STYLES[(i * 7) % STYLES.len()]
            );
            // The pairs above repeat after 72 requests.
            if i >= 72 {
                prompt.push_str(&format!(", variation {}", i / 72));
            }
            Request {
                prompt,
                seed: seed * 1000 + i as u64,
            }
        })
        .collect()
}

/// The image graph over the pipeline folder `pipeline`, as a deployment file's text.
fn graph_toml(pipeline: &Path, shape: &Shape, text_tokens: usize) -> String {
    let model = pipeline.display().to_string().replace('\\', "\\\\");
    format!(
        r#"name = "images-bench"

[[stage]]
id = "image-encoder"
kind = "encoder"
model = "{model}"
max_batch_size = 16
max_batched_tokens = 2048
max_queue = 1024

[stage.image]
max_text_tokens = {text_tokens}

[[stage]]
id = "dit"
kind = "dit"
model = "{model}"
max_batch_size = 8
max_batched_tokens = 64
max_queue = 1024

[stage.image]
min_size = 16
max_size = 256
default_width = {size}
default_height = {size}
max_n = 4
default_steps = {steps}
max_steps = 50
default_guidance_scale = {guidance}
step_cache = false
step_cache_threshold = {threshold}

[[stage]]
id = "vae"
kind = "vae"
model = "{model}"
max_batch_size = 8
max_batched_tokens = 64
max_queue = 1024

[[edge]]
from = "image-encoder"
to = "dit"
carries = "embeddings"

[[edge]]
from = "dit"
to = "vae"
carries = "latents"

[outputs]
image = "vae"
"#,
        size = shape.size,
        steps = shape.steps,
        guidance = shape.guidance,
        threshold = shape.cache_threshold,
    )
}

async fn serve(dir: &Path, name: &str, toml: &str) -> Server {
    let file = dir.join(name);
    std::fs::write(&file, toml).expect("write the deployment file");
    let graph =
        DeployGraph::from_toml_str(toml, &file, dir, &omnistage_stages::deploy::omnistage_env())
            .expect("benchmark graph");
    graph.check_models().expect("pipeline folder");
    let options = ServeOptions {
        addr: "127.0.0.1:0".parse().expect("loopback address"),
        request_timeout: Duration::from_secs(3600),
    };
    let server = Server::start(graph, options).await.expect("server starts");
    server
        .wait_ready(Duration::from_secs(600))
        .await
        .expect("stages load");
    server
}

/// One image request; returns its PNG bytes.
async fn generate(
    client: &reqwest::Client,
    url: &str,
    r: &Request,
    shape: &Shape,
    step_cache: bool,
) -> Vec<u8> {
    let body = json!({
        "prompt": r.prompt,
        "n": 1,
        "size": format!("{0}x{0}", shape.size),
        "response_format": "b64_json",
        "steps": shape.steps,
        "guidance_scale": shape.guidance,
        "negative_prompt": shape.negative,
        "seed": r.seed,
        "step_cache": step_cache,
    });
    let resp = client.post(url).json(&body).send().await.expect("send");
    let status = resp.status();
    let v: Value = resp.json().await.expect("json response");
    assert!(status.is_success(), "request failed ({status}): {v}");
    let b64 = v["data"][0]["b64_json"]
        .as_str()
        .unwrap_or_else(|| panic!("no image in {v}"));
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("the server sends valid base64")
}

/// One timed phase over the whole request list.
struct Phase {
    name: String,
    /// Per request, in request order.
    jct: Vec<f64>,
    pngs: Vec<Vec<u8>>,
    makespan: f64,
    /// Images/s of every repetition.
    rates: Vec<f64>,
    dit: DitStats,
}

/// The server under test.
struct Endpoint {
    client: reqwest::Client,
    base: String,
}

/// Runs every request with `concurrency` closed-loop clients, `repeats` times back to back;
/// keeps the run with the median makespan (and every run's images/s).
async fn run_phase(
    name: String,
    server: &Endpoint,
    reqs: &Arc<Vec<Request>>,
    shape: &Shape,
    concurrency: usize,
    step_cache: bool,
    repeats: usize,
) -> Phase {
    let mut runs = Vec::new();
    for _ in 0..repeats.max(1) {
        runs.push(run_once(name.clone(), server, reqs, shape, concurrency, step_cache).await);
    }
    median(runs)
}

/// The run with the median makespan, with every run's images/s.
fn median(mut runs: Vec<Phase>) -> Phase {
    let rates: Vec<f64> = runs
        .iter()
        .map(|p| p.jct.len() as f64 / p.makespan)
        .collect();
    runs.sort_by(|a, b| a.makespan.total_cmp(&b.makespan));
    let mut phase = runs.swap_remove(runs.len() / 2);
    phase.rates = rates;
    phase
}

/// One run of every request with `concurrency` closed-loop clients.
async fn run_once(
    name: String,
    server: &Endpoint,
    reqs: &Arc<Vec<Request>>,
    shape: &Shape,
    concurrency: usize,
    step_cache: bool,
) -> Phase {
    let Endpoint { client, base } = server;
    let url = format!("{base}/v1/images/generations");
    let before = stage_series(client, base).await;
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (client, url, next, reqs, shape) = (
            client.clone(),
            url.clone(),
            next.clone(),
            reqs.clone(),
            shape.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= reqs.len() {
                    return done;
                }
                let t0 = Instant::now();
                let png = generate(&client, &url, &reqs[i], &shape, step_cache).await;
                done.push((i, t0.elapsed().as_secs_f64(), png));
            }
        }));
    }
    let mut jct = vec![0.0; reqs.len()];
    let mut pngs = vec![Vec::new(); reqs.len()];
    for t in tasks {
        for (i, secs, png) in t.await.expect("client task") {
            jct[i] = secs;
            pngs[i] = png;
        }
    }
    let makespan = start.elapsed().as_secs_f64();
    let after = stage_series(client, base).await;
    Phase {
        name,
        jct,
        pngs,
        makespan,
        rates: vec![reqs.len() as f64 / makespan],
        dit: dit_stats(&before, &after),
    }
}

fn main() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let n = env_or("OMNISTAGE_BENCH_REQUESTS", 24usize).max(1);
    let shape = Shape {
        size: env_or("OMNISTAGE_BENCH_SIZE", 64usize),
        steps: env_or("OMNISTAGE_BENCH_STEPS", 12usize),
        guidance: env_or("OMNISTAGE_BENCH_GUIDANCE", 4.0f64),
        negative: NEGATIVE_PROMPT.to_string(),
        cache_threshold: 0.1,
    };
    let levels: Vec<usize> = std::env::var("OMNISTAGE_BENCH_CONCURRENCY")
        .unwrap_or_else(|_| "1,4,8".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .filter(|&c| c > 0)
        .collect();
    let cache_level = env_or("OMNISTAGE_BENCH_CACHE_CONCURRENCY", 4usize).max(1);
    let mut thresholds: Vec<f64> = std::env::var("OMNISTAGE_BENCH_CACHE_THRESHOLDS")
        .unwrap_or_else(|_| "0.1,0.5".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .filter(|t: &f64| t.is_finite() && *t >= 0.0)
        .collect();
    if thresholds.is_empty() {
        thresholds.push(0.1);
    }
    let seed = env_or("OMNISTAGE_BENCH_SEED", 7u64);
    let repeats = env_or("OMNISTAGE_BENCH_REPEATS", 3usize).max(1);
    let text_tokens = env_or("OMNISTAGE_BENCH_TEXT_TOKENS", 16usize);
    let pipeline: PathBuf = match std::env::var_os("OMNISTAGE_BENCH_PIPELINE") {
        Some(dir) => dir.into(),
        None => {
            let manifest =
                omnistage_engines::tiny::make_tiny(tmp.path(), 0).expect("make tiny checkpoints");
            manifest
                .checkpoint("image")
                .expect("image pipeline")
                .dir
                .clone()
        }
    };
    let out_dir: PathBuf = std::env::var_os("OMNISTAGE_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().join("results"));
    std::fs::create_dir_all(&out_dir).expect("results dir");
    let reqs = Arc::new(requests(n, seed));
    println!(
        "workload: {n} requests, {0}x{0}, {1} steps, guidance {2} with negative prompt {3:?} (CFG on), \
         distinct prompts and seeds; pipeline {4}; dit/vae max_batch_size 8; {5} threads",
        shape.size,
        shape.steps,
        shape.guidance,
        shape.negative,
        pipeline.display(),
        candle_core::utils::get_num_threads()
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // (threshold, index of the uncached phase, index of the cached one)
    let mut cache_pairs = Vec::new();
    let (phases, series) = rt.block_on(async {
        let mut phases = Vec::new();
        let mut series = BTreeMap::new();
        // One server per step-cache threshold (a stage setting); the first also runs (a) and (b).
        for (k, &threshold) in thresholds.iter().enumerate() {
            let shape = Shape {
                cache_threshold: threshold,
                ..shape.clone()
            };
            let toml = graph_toml(&pipeline, &shape, text_tokens);
            let server = serve(tmp.path(), &format!("images-bench-{k}.toml"), &toml).await;
            let end = Endpoint {
                client: reqwest::Client::new(),
                base: format!("http://{}", server.addr),
            };
            // Warm-up, uncounted: both code paths (with and without the step cache).
            let warm = Arc::new(requests(2, seed + 1));
            run_once("warm-up".into(), &end, &warm, &shape, 2, false).await;
            run_once("warm-up".into(), &end, &warm, &shape, 2, true).await;
            if k == 0 {
                let name = "(a) sequential".to_string();
                phases.push(run_phase(name, &end, &reqs, &shape, 1, false, repeats).await);
                for &c in &levels {
                    let name = format!("(b) concurrency {c}");
                    phases.push(run_phase(name, &end, &reqs, &shape, c, false, repeats).await);
                }
            }
            // Off and on alternate, so drifting background load biases neither.
            let (mut off, mut on) = (Vec::new(), Vec::new());
            for _ in 0..repeats {
                for (cache, runs) in [(false, &mut off), (true, &mut on)] {
                    let name = format!(
                        "(c) c={cache_level} cache {} t={threshold}",
                        if cache { "on" } else { "off" }
                    );
                    runs.push(run_once(name, &end, &reqs, &shape, cache_level, cache).await);
                }
            }
            phases.push(median(off));
            phases.push(median(on));
            cache_pairs.push((threshold, phases.len() - 2, phases.len() - 1));
            if k == 0 {
                series = stage_series(&end.client, &end.base).await;
            }
            server.abort();
        }
        (phases, series)
    });

    // Initial latents of request 0 exactly as the DiT stage draws them, for the diffusers check.
    let transformer = read_json(&pipeline.join("transformer/config.json"));
    let vae = read_json(&pipeline.join("vae/config.json"));
    let channels = transformer["in_channels"].as_u64().unwrap_or(16) as usize;
    let levels_vae = vae["block_out_channels"].as_array().map_or(4, Vec::len);
    let side = shape.size >> levels_vae.saturating_sub(1);
    let latents =
        omnistage_engines::diffusion::noise::gaussian(reqs[0].seed, 0, channels * side * side);
    let latents_path = out_dir.join("check_latents.npy");
    write_npy(&latents_path, &[1, channels, side, side], &latents);
    std::fs::write(out_dir.join("omnistage_check.png"), &phases[0].pngs[0]).expect("write png");

    let diffusers = match std::env::var("OMNISTAGE_DIFFUSERS_PYTHON") {
        Ok(python) => run_diffusers(
            &python,
            &pipeline,
            &shape,
            &reqs,
            text_tokens,
            &out_dir,
            &latents_path,
            repeats,
        ),
        Err(_) => Err(
            "set OMNISTAGE_DIFFUSERS_PYTHON to a Python with torch, transformers and \
                       diffusers (benches/hf_requirements.txt) to run it"
                .into(),
        ),
    };

    println!();
    let mut rows: Vec<Row> = phases.iter().map(phase_row).collect();
    if let Ok(d) = &diffusers {
        println!("diffusers side: {}", d.engine);
        rows.extend(d.rows.iter().cloned());
    }
    let base = phase_row(&phases[0]);
    print_table(&rows, &base);
    println!(
        "each phase ran {repeats} times back to back: its row is the run with the median makespan, \
         (range) the images/s of all runs. x (a): images/s over (a)'s; JCT/(a): mean JCT over \
         (a)'s. From /metrics over the phase: \
         steps, jobs/st, rows/fw, cached: the dit stage's engine steps, jobs per step, rows per \
         denoiser forward (2 per job with CFG) and share of image steps served by the step cache; \
         enc/dit/vae s: seconds each stage spent in engine steps"
    );

    // Batched images against the sequential ones: a request's image should not depend on its
    // batch.
    let seq: Vec<image::RgbImage> = phases[0].pngs.iter().map(|p| rgb(p)).collect();
    println!();
    for p in phases
        .iter()
        .skip(1)
        .filter(|p| !p.name.contains("cache on"))
    {
        let (mut max, mut differing) = (0u8, 0usize);
        for (a, png) in seq.iter().zip(&p.pngs) {
            let (m, d) = pixel_diff(a, &rgb(png));
            max = max.max(m);
            differing += usize::from(d > 0);
        }
        println!(
            "{:<30} images identical to (a): {}/{n} (max channel difference {max})",
            p.name,
            n - differing
        );
    }

    // Step caching.
    let fmt_db = |v: f64| {
        if v.is_finite() {
            format!("{v:.2} dB")
        } else {
            "inf (identical)".into()
        }
    };
    println!();
    for &(threshold, off, on) in &cache_pairs {
        let (off, on) = (&phases[off], &phases[on]);
        let psnrs: Vec<f64> = off
            .pngs
            .iter()
            .zip(&on.pngs)
            .map(|(a, b)| psnr(&rgb(a), &rgb(b)))
            .collect();
        let finite: Vec<f64> = psnrs.iter().copied().filter(|v| v.is_finite()).collect();
        let identical = psnrs.len() - finite.len();
        let mean = if finite.is_empty() {
            f64::INFINITY
        } else {
            finite.iter().sum::<f64>() / finite.len() as f64
        };
        let min = psnrs.iter().copied().fold(f64::INFINITY, f64::min);
        println!(
            "step cache, concurrency {cache_level}, threshold {threshold}: {:.2}x images/s, mean JCT \
             {:.3}s -> {:.3}s, {} of image steps cached; drift vs uncached: PSNR mean {} over the \
             {} differing images ({identical} identical), min {}",
            on.jct.len() as f64 / on.makespan / (off.jct.len() as f64 / off.makespan),
            off.jct.iter().sum::<f64>() / n as f64,
            on.jct.iter().sum::<f64>() / n as f64,
            on.dit
                .cached_fraction
                .map_or("?".to_string(), |f| format!("{:.0}%", f * 100.0)),
            fmt_db(mean),
            finite.len(),
            fmt_db(min),
        );
    }

    match &diffusers {
        Ok(d) => {
            let ours_best = rows[..phases.len()]
                .iter()
                .filter(|r| r.name.starts_with("(a)") || r.name.starts_with("(b)"))
                .max_by(|a, b| a.rate().total_cmp(&b.rate()))
                .expect("a phase");
            println!();
            for theirs in &d.rows {
                println!(
                    "ours / {:<20}: (a) sequential: images/s {:.2}x, mean JCT {:.2}x; \
                     best of ours ({}): images/s {:.2}x, mean JCT {:.2}x",
                    theirs.name,
                    base.rate() / theirs.rate(),
                    base.mean() / theirs.mean(),
                    ours_best.name,
                    ours_best.rate() / theirs.rate(),
                    ours_best.mean() / theirs.mean(),
                );
            }
            match &d.check_png {
                Some(path) => {
                    let theirs = rgb(&std::fs::read(path).expect("read diffusers PNG"));
                    let ours = &seq[0];
                    let (max, differing) = pixel_diff(ours, &theirs);
                    println!(
                        "\nend-to-end check, request 0 ({:?}, seed {}) with identical initial latents: \
                         max channel difference vs diffusers {max} levels, {differing} of {} \
                         channel values differ, PSNR {}",
                        reqs[0].prompt,
                        reqs[0].seed,
                        ours.as_raw().len(),
                        fmt_db(psnr(ours, &theirs)),
                    );
                }
                None => println!("\nend-to-end check skipped: the script wrote no image"),
            }
        }
        Err(e) => println!("\ndiffusers side skipped: {e}"),
    }

    // The dit stage's series as exported (LLM-only series left out).
    let dit: Vec<_> = series
        .iter()
        .filter(|(k, _)| k.contains("stage=\"dit\""))
        .filter(|(k, _)| {
            !["kv_blocks", "prefix_cache", "preemptions"]
                .iter()
                .any(|s| k.contains(s))
        })
        .collect();
    if dit.is_empty() {
        println!("\n/metrics: no dit stage series");
    } else {
        println!("\n/metrics, dit stage, after the run (warm-up included):");
        for (k, v) in dit {
            println!("  {k} {v}");
        }
    }
    println!("results in {}", out_dir.display());
}
