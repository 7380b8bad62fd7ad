//! Sending a workload: the dispatcher, the in-flight cap, trace fetching and the progress bar.
//!
//! One loop serves both arrival processes: it takes the next planned request, waits for its
//! due time (Poisson only), then for a slot of a semaphore, and spawns the request. With a
//! closed loop the semaphore has `concurrency` slots, so a slot frees — and the next request
//! goes — exactly when an answer completes; with Poisson it has `max_in_flight` slots, which
//! only bind when the server falls behind, bounding tasks and sockets instead of letting an
//! overloaded run grow without limit.

use super::client::{execute, fetch_trace, Record};
use super::workload::{Arrival, Kind, Workload};
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Semaphore};

/// Trace fetches in flight at most (they are small GETs, done after the answer completes).
const TRACE_FETCHERS: usize = 16;

/// How to reach the server and what to show.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Base URL, e.g. `http://127.0.0.1:8000` (no trailing slash).
    pub url: String,
    /// Sent as `model` when set; otherwise the server's only model answers.
    pub model: Option<String>,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Requests of each kind in the mix sent one at a time, unrecorded, before the clock starts
    /// (first requests pay one-off costs: connections, allocations, caches).
    pub warmup: u64,
    pub progress: bool,
}

/// A finished run.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// Every request, by index.
    pub records: Vec<Record>,
    pub started_unix_ms: f64,
    /// From the first send to the last answer, in seconds.
    pub wall_s: f64,
}

/// An HTTP client for the bench: no idle pool limit beyond the in-flight cap, the per-request
/// timeout, no proxy (the target is a local server).
pub fn client(timeout: Duration) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .timeout(timeout)
        .no_proxy()
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// Checks that the server answers `/health` with 200, so a wrong `--url` fails at once with a
/// clear message instead of as N transport errors.
pub async fn check_server(client: &reqwest::Client, url: &str) -> Result<(), String> {
    let resp = client
        .get(format!("{url}/health"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| format!("the server at {url} does not answer: {e}"))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!(
            "the server at {url} is not ready: /health answered {}",
            resp.status()
        ))
    }
}

/// Sends the workload and collects every request's record and trace.
pub async fn run(opts: &RunOptions, wl: &Workload) -> Result<RunResult, String> {
    let client = client(opts.timeout)?;
    check_server(&client, &opts.url).await?;
    warm_up(&client, opts, wl).await;

    let total = match (wl.count, wl.duration_s) {
        (Some(c), _) => Some(c),
        (None, Some(_)) => None,
        (None, None) => Some(super::workload::DEFAULT_COUNT),
    };
    let bar = progress_bar(opts.progress, total, wl.duration_s);
    let slots = match wl.arrival {
        Arrival::Poisson { .. } => wl.max_in_flight,
        Arrival::Closed { concurrency } => concurrency.min(wl.max_in_flight),
    };
    let in_flight = Arc::new(Semaphore::new(slots.max(1) as usize));
    let tracers = Arc::new(Semaphore::new(TRACE_FETCHERS));
    let (tx, mut rx) = mpsc::unbounded_channel::<Record>();
    let collector = {
        let bar = bar.clone();
        tokio::spawn(async move {
            let mut records = Vec::new();
            let mut failed = 0u64;
            while let Some(r) = rx.recv().await {
                if r.outcome != super::client::Outcome::Ok {
                    failed += 1;
                }
                records.push(r);
                bar.inc(1);
                bar.set_message(format!("{failed} failed"));
            }
            records
        })
    };

    let start = Instant::now();
    let started_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3);
    let deadline = wl.duration_s.map(|d| start + Duration::from_secs_f64(d));
    let wl = Arc::new(wl.clone());
    for planned in wl.requests() {
        let due = match planned.at_s {
            Some(at) => start + Duration::from_secs_f64(at),
            None => Instant::now(),
        };
        tokio::time::sleep_until(due.into()).await;
        // Poisson only: a full cap means the server is behind and this request waits.
        let (permit, held) = match in_flight.clone().try_acquire_owned() {
            Ok(p) => (p, false),
            Err(_) => match in_flight.clone().acquire_owned().await {
                Ok(p) => (p, planned.at_s.is_some()),
                Err(_) => break, // never closed
            },
        };
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let due = if planned.at_s.is_some() {
            due
        } else {
            Instant::now()
        };
        let (client, opts, wl, tx, tracers) = (
            client.clone(),
            opts.clone(),
            wl.clone(),
            tx.clone(),
            tracers.clone(),
        );
        tokio::spawn(async move {
            let mut rec = execute(
                &client,
                &opts.url,
                &wl,
                opts.model.as_deref(),
                &planned,
                start,
                due,
            )
            .await;
            rec.held_by_cap = held;
            // Take a trace slot before freeing the in-flight one: live tasks stay bounded by
            // both caps together, and the next request goes as soon as this answer is in.
            let tracer = tracers.acquire_owned().await;
            drop(permit);
            if let Some(id) = rec.request_id {
                match fetch_trace(&client, &opts.url, id).await {
                    Ok(t) => {
                        rec.rtf = t.real_time_factor;
                        rec.trace = Some(t);
                    }
                    Err(e) => rec.trace_error = Some(e),
                }
            }
            drop(tracer);
            let _ = tx.send(rec);
        });
    }
    drop(tx);
    let mut records = collector
        .await
        .map_err(|e| format!("the collector failed: {e}"))?;
    bar.finish_and_clear();
    records.sort_by_key(|r| r.index);
    // The makespan ends with the last answer, not the last trace fetch; with no records, zero.
    let wall_s = records
        .iter()
        .map(|r| r.due_s.unwrap_or(r.sent_s) + r.jct_ms / 1e3)
        .fold(0.0f64, f64::max);
    Ok(RunResult {
        records,
        started_unix_ms,
        wall_s,
    })
}

fn progress_bar(show: bool, total: Option<u64>, duration_s: Option<f64>) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = match total {
        Some(n) => {
            let bar = ProgressBar::new(n);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} requests [{elapsed} / ~{eta}] {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar
        }
        None => {
            let bar = ProgressBar::new_spinner();
            let until = duration_s.map_or(String::new(), |d| format!(" (sending for {d} s)"));
            bar.set_style(
                ProgressStyle::with_template(&format!(
                    "{{spinner}} {{pos}} requests done [{{elapsed}}]{until} {{msg}}"
                ))
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        }
    };
    bar
}

/// Sends `opts.warmup` requests of each kind in the mix, one at a time; failures are ignored
/// (the measured run reports them).
async fn warm_up(client: &reqwest::Client, opts: &RunOptions, wl: &Workload) {
    if opts.warmup == 0 {
        return;
    }
    let wanted: Vec<Kind> = Kind::ALL
        .into_iter()
        .zip(wl.mix)
        .filter(|(k, w)| *w > 0.0 && *k != Kind::Speech)
        .map(|(k, _)| k)
        .collect();
    let mut sent = vec![0u64; Kind::ALL.len()];
    // Requests far past the measured list's indices, so warm-up never repeats a measured one.
    let warm = Workload {
        count: Some(64 * opts.warmup * wanted.len().max(1) as u64),
        duration_s: None,
        arrival: Arrival::Closed { concurrency: 1 },
        seed: wl.seed ^ 0x5eed_0000_7a11,
        ..wl.clone()
    };
    for p in warm.requests() {
        let slot = Kind::ALL.iter().position(|k| *k == p.kind).unwrap_or(0);
        if !wanted.contains(&p.kind) || sent[slot] >= opts.warmup {
            continue;
        }
        sent[slot] += 1;
        let now = Instant::now();
        let _ = execute(client, &opts.url, wl, opts.model.as_deref(), &p, now, now).await;
        if wanted
            .iter()
            .all(|k| sent[Kind::ALL.iter().position(|x| x == k).unwrap_or(0)] >= opts.warmup)
        {
            break;
        }
    }
}
