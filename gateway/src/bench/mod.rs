//! `omnistage bench`: a load generator that measures job completion time (JCT) against a
//! running server, the way a user of its HTTP API sees it, and explains it with the server's
//! per-request traces (queue wait, compute and transfer per stage).
//!
//! - [`workload`] / [`file`]: what to send (mix, arrivals, lengths), from a TOML file and flags;
//!   seeded, so a seed names one request list.
//! - [`run`] / [`client`]: sending it with a bounded number of requests in flight.
//! - [`report`]: percentiles, per-kind tables, `results.json`.
//! - [`sweep`]: latency against offered load, and `bench plot` to compare sweeps.
//! - [`plot`] / [`charts`]: PNG charts.

pub mod charts;
pub mod client;
pub mod file;
pub mod plot;
pub mod report;
pub mod rng;
pub mod run;
pub mod sweep;
pub mod workload;

use std::path::{Path, PathBuf};
use std::time::Duration;
use workload::{Arrival, Dist, Kind, Sweep, Workload};

/// `omnistage bench [FLAGS]` or `omnistage bench plot ...`.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: Option<BenchCommand>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Draw several sweep.json files on one chart (p50 and p99 JCT against offered load) and
    /// print them side by side; the first file is the system measured, the others baselines.
    Plot {
        /// Folder for sweep_compare.png.
        #[arg(long)]
        out: PathBuf,
        /// sweep.json files written by `omnistage bench --sweep ... --out DIR`.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// Flags of a run. Each one overrides the workload file, which overrides the defaults.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunArgs {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// Workload TOML: seed, count, duration_s, max_in_flight, label; [arrival] process
    /// (poisson|closed), rate, concurrency; [mix] text, image, omni, speech; [text] prompt_words,
    /// max_tokens (a number or {dist = "fixed"|"uniform"|"lognormal", ...}), ignore_eos;
    /// [image] size, steps, n; [sweep] rates or concurrency.
    #[arg(long)]
    pub workload: Option<PathBuf>,
    /// Names the run in results and plots (e.g. pipelined, monolithic).
    #[arg(long)]
    pub label: Option<String>,
    /// A JSON object merged into every chat request's body, e.g. '{"router_k": 2}'.
    #[arg(long)]
    pub extra_body: Option<String>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Requests to send.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop sending after this many seconds (with --count too: whichever ends first).
    #[arg(long)]
    pub duration_s: Option<f64>,
    /// Open loop: Poisson arrivals at this many requests per second.
    #[arg(long, conflicts_with = "concurrency")]
    pub rate: Option<f64>,
    /// Closed loop: keep this many requests in flight.
    #[arg(long)]
    pub concurrency: Option<u64>,
    /// Request mix as weights, e.g. `text=3,image=1` (kinds: text, image, omni, speech).
    #[arg(long)]
    pub mix: Option<String>,
    /// Prompt length in words: N, uniform:MIN:MAX or lognormal:MEAN:SIGMA[:MIN:MAX].
    #[arg(long)]
    pub prompt_words: Option<String>,
    /// Output tokens of text requests, in the same forms as --prompt-words.
    #[arg(long)]
    pub max_tokens: Option<String>,
    /// Image size, WIDTHxHEIGHT.
    #[arg(long)]
    pub image_size: Option<String>,
    #[arg(long)]
    pub image_steps: Option<u64>,
    /// Images per image request.
    #[arg(long)]
    pub image_n: Option<u64>,
    /// Requests in flight at most (an overloaded open loop waits for a slot; the wait counts
    /// in JCT). Default 256.
    #[arg(long)]
    pub max_in_flight: Option<u64>,
    /// Offered loads to sweep: rates=R1,R2,... (Poisson) or concurrency=C1,C2,... (closed).
    #[arg(long)]
    pub sweep: Option<String>,
    /// Folder for results.json and PNG plots (a sweep: sweep.json, its plot, and one folder
    /// per load).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Model name to send; default none (the server's only model answers).
    #[arg(long)]
    pub model: Option<String>,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 600.0)]
    pub timeout_s: f64,
    /// Unrecorded requests of each kind sent one at a time before measuring.
    #[arg(long, default_value_t = 1)]
    pub warmup: u64,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Parses `text=3,image=1` into weights.
pub fn parse_mix(s: &str) -> Result<[f64; 4], String> {
    let mut mix = [0.0; 4];
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, w) = part.split_once('=').unwrap_or((part, "1"));
        let kind = Kind::parse(k.trim())
            .and_then(|k| Kind::ALL.iter().position(|x| *x == k))
            .ok_or_else(|| {
                format!("--mix `{s}`: unknown kind `{k}`; use text, image, omni or speech")
            })?;
        let w: f64 = w
            .trim()
            .parse()
            .ok()
            .filter(|w: &f64| w.is_finite() && *w >= 0.0)
            .ok_or_else(|| format!("--mix `{s}`: the weight of `{k}` must be a number ≥ 0"))?;
        mix[kind] = w;
    }
    if mix.iter().sum::<f64>() <= 0.0 {
        return Err(format!("--mix `{s}`: at least one weight must be > 0"));
    }
    Ok(mix)
}

/// The workload: defaults, then the file, then the flags.
pub fn workload(args: &RunArgs) -> Result<Workload, String> {
    let mut wl = match &args.workload {
        Some(path) => file::load(path)?,
        None => Workload::default(),
    };
    if let Some(v) = args.seed {
        wl.seed = v;
    }
    if let Some(v) = args.count {
        if v == 0 {
            return Err("--count must be ≥ 1".into());
        }
        wl.count = Some(v);
    }
    if let Some(v) = args.duration_s {
        if !(v.is_finite() && v > 0.0) {
            return Err(format!("--duration-s must be > 0, got {v}"));
        }
        wl.duration_s = Some(v);
    }
    match (args.rate, args.concurrency) {
        (Some(rate), _) if !(rate.is_finite() && rate > 0.0) => {
            return Err(format!("--rate must be > 0, got {rate}"))
        }
        (Some(rate), _) => wl.arrival = Arrival::Poisson { rate },
        (None, Some(0)) => return Err("--concurrency must be ≥ 1".into()),
        (None, Some(concurrency)) => wl.arrival = Arrival::Closed { concurrency },
        (None, None) => {}
    }
    if let Some(m) = &args.mix {
        wl.mix = parse_mix(m)?;
    }
    if let Some(d) = &args.prompt_words {
        wl.prompt_words = Dist::parse_flag(d).map_err(|e| format!("--prompt-words {e}"))?;
    }
    if let Some(d) = &args.max_tokens {
        wl.max_tokens = Dist::parse_flag(d).map_err(|e| format!("--max-tokens {e}"))?;
    }
    if let Some(s) = &args.image_size {
        file::check_size(s).map_err(|e| format!("--image-size {e}"))?;
        wl.image.size = s.clone();
    }
    for (flag, v, slot) in [
        ("--image-steps", args.image_steps, &mut wl.image.steps),
        ("--image-n", args.image_n, &mut wl.image.n),
        ("--max-in-flight", args.max_in_flight, &mut wl.max_in_flight),
    ] {
        match v {
            Some(0) => return Err(format!("{flag} must be ≥ 1")),
            Some(v) => *slot = v,
            None => {}
        }
    }
    if let Some(s) = &args.sweep {
        wl.sweep = Some(Sweep::parse_flag(s)?);
    }
    if args.label.is_some() {
        wl.label = args.label.clone();
    }
    if let Some(extra) = &args.extra_body {
        match serde_json::from_str(extra) {
            Ok(serde_json::Value::Object(fields)) => wl.extra_body = fields,
            _ => return Err(format!("--extra-body must be a JSON object, got `{extra}`")),
        }
    }
    Ok(wl)
}

/// Runs `omnistage bench`.
pub fn main(args: BenchArgs) -> Result<(), String> {
    if let Some(BenchCommand::Plot { out, files }) = args.command {
        println!("{}", sweep::plot_command(&out, &files)?);
        return Ok(());
    }
    let a = args.run;
    let wl = workload(&a)?;
    if !(a.timeout_s.is_finite() && a.timeout_s > 0.0) {
        return Err(format!("--timeout-s must be > 0, got {}", a.timeout_s));
    }
    let opts = run::RunOptions {
        url: a.url.trim_end_matches('/').to_string(),
        model: a.model.clone(),
        timeout: Duration::from_secs_f64(a.timeout_s),
        warmup: a.warmup,
        progress: !a.quiet,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let text = runtime.block_on(bench(&opts, &wl, a.out.as_deref()))?;
    print!("{text}");
    Ok(())
}

/// A run, or a sweep when the workload has one; writes into `out` when given and returns the
/// report text.
pub async fn bench(
    opts: &run::RunOptions,
    wl: &Workload,
    out: Option<&Path>,
) -> Result<String, String> {
    if let Some(out) = out {
        std::fs::create_dir_all(out)
            .map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    }
    let Some(sw) = wl.sweep.clone() else {
        let (results, text) = single(opts, wl, out).await?;
        drop(results);
        return Ok(text);
    };
    let label = wl.label.clone().unwrap_or_else(|| "run".into());
    let mut report = String::new();
    let mut points = Vec::new();
    for (offered, point_wl) in sw.points(wl) {
        eprintln!("sweep `{label}`: {} = {offered}", sw.axis());
        let dir = out.map(|o| o.join(format!("{}_{offered}", sw.axis())));
        if let Some(d) = &dir {
            std::fs::create_dir_all(d)
                .map_err(|e| format!("cannot create {}: {e}", d.display()))?;
        }
        let (results, text) = single(opts, &point_wl, dir.as_deref()).await?;
        report.push_str(&format!("\n== {} = {offered} ==\n{text}", sw.axis()));
        points.push(sweep::SweepPoint::from_results(offered, &results));
    }
    let file = sweep::SweepFile {
        label,
        url: opts.url.clone(),
        axis: sw.axis().into(),
        workload: wl.clone(),
        points,
    };
    report.push('\n');
    report.push_str(&sweep::table(&file));
    if let Some(out) = out {
        let path = out.join("sweep.json");
        report::write_json(&path, &file)?;
        let png = out.join("sweep.png");
        plot::draw(
            &png,
            &sweep::chart(std::slice::from_ref(&file)),
            plot::fonts(),
        )?;
        report.push_str(&format!("wrote {} and {}\n", path.display(), png.display()));
    }
    Ok(report)
}

/// One run: the report text, and `results.json` plus plots when `out` is given.
async fn single(
    opts: &run::RunOptions,
    wl: &Workload,
    out: Option<&Path>,
) -> Result<(report::Results, String), String> {
    let result = run::run(opts, wl).await?;
    let summary = report::summaries(&result);
    let mut text = report::table(&summary, result.wall_s);
    let results = report::Results {
        label: wl.label.clone(),
        url: opts.url.clone(),
        workload: wl.clone(),
        started_unix_ms: result.started_unix_ms,
        wall_s: result.wall_s,
        summary,
        requests: result.records,
    };
    if let Some(out) = out {
        let path = out.join("results.json");
        report::write_json(&path, &results)?;
        let pngs = charts::run_charts(out, &results, plot::fonts())?;
        text.push_str(&format!("wrote {}", path.display()));
        for p in pngs {
            text.push_str(&format!(", {}", p.display()));
        }
        text.push('\n');
    }
    Ok((results, text))
}
