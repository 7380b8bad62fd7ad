//! Latency against offered load: a sweep runs the same workload at each load and keeps one
//! point per load (`sweep.json`); `bench plot` puts several sweeps — e.g. `serve` and
//! `serve --monolithic` — on one chart and tabulates the mean-JCT reduction.

use super::client::{Outcome, Record};
use super::plot::{self, Chart, Series};
use super::report::{KindSummary, Latency, Results};
use super::workload::Workload;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One offered load's result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepPoint {
    /// Requests per second (Poisson) or requests in flight (closed loop).
    pub offered: f64,
    /// Successful requests per second achieved.
    pub achieved_rps: f64,
    pub count: u64,
    pub errors: u64,
    pub refused: u64,
    /// Over successful requests of every kind, in ms.
    pub jct_ms: Latency,
    pub ttft_ms: Latency,
    pub wall_s: f64,
    /// Per-kind summaries of this point.
    pub kinds: Vec<KindSummary>,
    /// Mean JCT of the last third of the successful requests (in the order they were due or
    /// sent) over that of the first third: about 1 when the server keeps up with the load, and
    /// growing through the run when its queue grows. `None` with fewer than 3 successes (and in
    /// sweep files written before it existed).
    #[serde(default)]
    pub jct_drift: Option<f64>,
}

/// A load counts as sustained when the server completed at least this share of the offered
/// request rate...
pub const SUSTAINED_MIN_ACHIEVED: f64 = 0.95;
/// ...and its JCT did not grow through the run by more than this factor ([`SweepPoint::jct_drift`]).
pub const SUSTAINED_MAX_DRIFT: f64 = 1.5;

impl SweepPoint {
    pub fn from_results(offered: f64, results: &Results) -> Self {
        let all = results
            .summary
            .iter()
            .find(|k| k.kind == "all")
            .cloned()
            .unwrap_or_default();
        SweepPoint {
            offered,
            achieved_rps: all.throughput_rps,
            count: all.count,
            errors: all.errors,
            refused: all.refused,
            jct_ms: all.jct_ms,
            ttft_ms: all.ttft_ms,
            wall_s: results.wall_s,
            kinds: results.summary.clone(),
            jct_drift: jct_drift(&results.requests),
        }
    }

    /// Whether the server kept up with this load: on a rate axis, it completed at least
    /// [`SUSTAINED_MIN_ACHIEVED`] of the offered rate, none of it refused or failed, and its JCT
    /// did not drift up by more than [`SUSTAINED_MAX_DRIFT`]; a closed loop (which never offers
    /// more than the server takes) counts as sustained when nothing was refused or failed.
    pub fn sustained(&self, axis: &str) -> bool {
        if self.errors > 0 || self.refused > 0 {
            return false;
        }
        if axis != "rate" {
            return true;
        }
        self.achieved_rps >= SUSTAINED_MIN_ACHIEVED * self.offered
            && self.jct_drift.is_none_or(|d| d <= SUSTAINED_MAX_DRIFT)
    }
}

/// See [`SweepPoint::jct_drift`].
fn jct_drift(records: &[Record]) -> Option<f64> {
    let mut ok: Vec<&Record> = records
        .iter()
        .filter(|r| r.outcome == Outcome::Ok)
        .collect();
    if ok.len() < 3 {
        return None;
    }
    ok.sort_by(|a, b| {
        let at = |r: &Record| r.due_s.unwrap_or(r.sent_s);
        at(a).total_cmp(&at(b))
    });
    let third = ok.len() / 3;
    let mean = |rs: &[&Record]| rs.iter().map(|r| r.jct_ms).sum::<f64>() / rs.len() as f64;
    let first = mean(&ok[..third]);
    let last = mean(&ok[ok.len() - third..]);
    (first > 0.0).then(|| last / first)
}

/// `sweep.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepFile {
    pub label: String,
    pub url: String,
    /// `rate` (req/s) or `concurrency`.
    pub axis: String,
    pub workload: Workload,
    pub points: Vec<SweepPoint>,
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}"))
}

/// The table of one sweep.
pub fn table(s: &SweepFile) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "sweep `{}` ({} at {})", s.label, s.axis, s.url);
    let _ = writeln!(
        out,
        "{:>9} {:>10} {:>6} {:>5} {:>5} {:>10} {:>10} {:>10}",
        "offered", "achieved/s", "count", "err", "429", "jct mean", "jct p50", "jct p99"
    );
    for p in &s.points {
        let _ = writeln!(
            out,
            "{:>9} {:>10.2} {:>6} {:>5} {:>5} {:>10} {:>10} {:>10}",
            p.offered,
            p.achieved_rps,
            p.count,
            p.errors,
            p.refused,
            ms(p.jct_ms.mean),
            ms(p.jct_ms.p50),
            ms(p.jct_ms.p99)
        );
    }
    out
}

pub fn load(path: &Path) -> Result<SweepFile, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: not a sweep.json: {e}", path.display()))
}

/// p50 (solid) and p99 (dashed) JCT against offered load, one color per sweep.
pub fn chart(sweeps: &[SweepFile]) -> Chart {
    let axis = sweeps.first().map_or("rate", |s| s.axis.as_str());
    let x_desc = if axis == "concurrency" {
        "offered load (requests in flight)"
    } else {
        "offered load (requests/s)"
    };
    let mut series = Vec::new();
    for (i, s) in sweeps.iter().enumerate() {
        for (q, dashed) in [("p50", false), ("p99", true)] {
            series.push(Series {
                label: format!("{} {q}", s.label),
                points: s
                    .points
                    .iter()
                    .filter_map(|p| {
                        let v = if dashed { p.jct_ms.p99 } else { p.jct_ms.p50 };
                        Some((p.offered, v?))
                    })
                    .collect(),
                color: i,
                dashed,
                markers: true,
                scatter: false,
            });
        }
    }
    Chart {
        title: "JCT vs offered load".into(),
        x_desc: x_desc.into(),
        y_desc: "job completion time (ms)".into(),
        series,
        y_range: None,
    }
}

/// Whether two offered loads are the same point (they come from the same flag values, so a
/// relative tolerance only absorbs float printing).
fn same_load(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// The side-by-side table of `bench plot`: the first sweep is the system measured, each other
/// one a baseline; the reduction is `1 − ours/baseline` of the mean JCT.
pub fn compare_table(sweeps: &[SweepFile]) -> String {
    let mut out = String::new();
    let Some((ours, baselines)) = sweeps.split_first() else {
        return out;
    };
    let mut loads: Vec<f64> = Vec::new();
    for p in sweeps.iter().flat_map(|s| &s.points) {
        if !loads.iter().any(|l| same_load(*l, p.offered)) {
            loads.push(p.offered);
        }
    }
    loads.sort_by(f64::total_cmp);
    let _ = write!(out, "{:>9}", "offered");
    for s in sweeps {
        let _ = write!(out, " | {:^38}", clip(&s.label, 38));
    }
    for b in baselines {
        let _ = write!(out, " | {:>14}", format!("vs {}", clip(&b.label, 11)));
    }
    let _ = writeln!(out);
    let _ = write!(out, "{:>9}", "");
    for _ in sweeps {
        let _ = write!(
            out,
            " | {:>8} {:>9} {:>9} {:>9}",
            "ach/s", "mean", "p50", "p99"
        );
    }
    for _ in baselines {
        let _ = write!(out, " | {:>14}", "mean-JCT red.");
    }
    let _ = writeln!(out);
    let point = |s: &SweepFile, load: f64| {
        s.points
            .iter()
            .find(|p| same_load(p.offered, load))
            .cloned()
    };
    for load in loads {
        let _ = write!(out, "{load:>9}");
        for s in sweeps {
            match point(s, load) {
                Some(p) => {
                    let _ = write!(
                        out,
                        " | {:>8.2} {:>9} {:>9} {:>9}",
                        p.achieved_rps,
                        ms(p.jct_ms.mean),
                        ms(p.jct_ms.p50),
                        ms(p.jct_ms.p99)
                    );
                }
                None => {
                    let _ = write!(out, " | {:>8} {:>9} {:>9} {:>9}", "-", "-", "-", "-");
                }
            }
        }
        let ours_mean = point(ours, load).and_then(|p| p.jct_ms.mean);
        for b in baselines {
            let red = match (ours_mean, point(b, load).and_then(|p| p.jct_ms.mean)) {
                (Some(o), Some(b)) if b > 0.0 => format!("{:.1}%", (1.0 - o / b) * 100.0),
                _ => "-".into(),
            };
            let _ = write!(out, " | {red:>14}");
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(
        out,
        "(JCT in ms; reduction = 1 − {}/baseline of the mean JCT)",
        ours.label
    );
    for b in baselines {
        let _ = writeln!(out, "{}", sustained_line(ours, b));
    }
    out
}

/// The highest load `s` sustains ([`SweepPoint::sustained`]), counting up from its lowest load
/// and stopping at the first it does not.
pub fn highest_sustained(s: &SweepFile) -> Option<&SweepPoint> {
    let mut points: Vec<&SweepPoint> = s.points.iter().collect();
    points.sort_by(|a, b| a.offered.total_cmp(&b.offered));
    points
        .into_iter()
        .take_while(|p| p.sustained(&s.axis))
        .last()
}

/// The line under the comparison that names the highest load `baseline` sustains and the
/// mean-JCT reduction `ours` has there.
fn sustained_line(ours: &SweepFile, baseline: &SweepFile) -> String {
    let drift: Vec<String> = baseline
        .points
        .iter()
        .map(|p| match p.jct_drift {
            Some(d) => format!("{} {d:.2}", p.offered),
            None => format!("{} -", p.offered),
        })
        .collect();
    let criterion = if baseline.axis == "rate" {
        format!(
            "≥ {:.0}% of the offered rate completed, JCT drift (last third ÷ first third) ≤ {}: {}",
            SUSTAINED_MIN_ACHIEVED * 100.0,
            SUSTAINED_MAX_DRIFT,
            drift.join(", ")
        )
    } else {
        "nothing refused or failed".to_string()
    };
    let Some(top) = highest_sustained(baseline) else {
        return format!(
            "{} sustains none of these loads ({criterion})",
            baseline.label
        );
    };
    let ours_mean = ours
        .points
        .iter()
        .find(|p| same_load(p.offered, top.offered))
        .and_then(|p| p.jct_ms.mean);
    let reduction = match (ours_mean, top.jct_ms.mean) {
        (Some(o), Some(b)) if b > 0.0 => format!("{:.1}%", (1.0 - o / b) * 100.0),
        _ => "not measured".to_string(),
    };
    format!(
        "{} sustains up to {} = {} ({criterion}); mean-JCT reduction there: {reduction}",
        baseline.label, baseline.axis, top.offered
    )
}

fn clip(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// `bench plot`: reads the sweeps, writes `DIR/sweep_compare.png` and returns the table.
pub fn plot_command(out: &Path, files: &[PathBuf]) -> Result<String, String> {
    if files.is_empty() {
        return Err("bench plot: give at least one sweep.json".into());
    }
    let sweeps = files
        .iter()
        .map(|f| load(f))
        .collect::<Result<Vec<_>, _>>()?;
    let axes: Vec<&str> = sweeps.iter().map(|s| s.axis.as_str()).collect();
    if axes.windows(2).any(|w| w[0] != w[1]) {
        return Err(format!(
            "bench plot: the sweeps vary different loads ({}); compare rate sweeps with rate \
             sweeps, concurrency with concurrency",
            axes.join(", ")
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let png = out.join("sweep_compare.png");
    plot::draw(&png, &chart(&sweeps), plot::fonts())?;
    Ok(format!(
        "{}\nwrote {}",
        compare_table(&sweeps),
        png.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sweep(label: &str, means: &[(f64, f64)]) -> SweepFile {
        SweepFile {
            label: label.into(),
            url: "u".into(),
            axis: "rate".into(),
            workload: Workload::default(),
            points: means
                .iter()
                .map(|&(offered, m)| SweepPoint {
                    offered,
                    achieved_rps: offered,
                    count: 1,
                    errors: 0,
                    refused: 0,
                    jct_ms: Latency {
                        mean: Some(m),
                        p50: Some(m),
                        p90: Some(m),
                        p99: Some(m),
                    },
                    ttft_ms: Latency::default(),
                    wall_s: 1.0,
                    kinds: vec![],
                    jct_drift: Some(1.0),
                })
                .collect(),
        }
    }

    #[test]
    fn comparison_gives_the_mean_jct_reduction_per_load() {
        let t = compare_table(&[
            sweep("pipelined", &[(1.0, 50.0), (2.0, 60.0)]),
            sweep("monolithic", &[(1.0, 100.0), (4.0, 400.0)]),
        ]);
        let line = |load: &str| {
            t.lines()
                .find(|l| l.trim_start().starts_with(load))
                .unwrap_or("")
        };
        assert!(line("1 ").ends_with("50.0%"), "{t}");
        assert!(line("2 ").ends_with('-'), "{t}");
        assert!(line("4 ").ends_with('-'), "{t}");
        let json = serde_json::to_string(&sweep("a", &[(1.0, 2.0)])).unwrap();
        let back: SweepFile = serde_json::from_str(&json).unwrap();
        assert_eq!(back.points[0].jct_ms.p99, Some(2.0));
    }

    #[test]
    fn the_highest_sustained_load_stops_at_the_first_the_baseline_does_not_keep_up_with() {
        let ours = sweep(
            "pipelined",
            &[(1.0, 50.0), (2.0, 60.0), (3.0, 70.0), (4.0, 80.0)],
        );
        let mut base = sweep(
            "monolithic",
            &[(1.0, 100.0), (2.0, 200.0), (3.0, 900.0), (4.0, 400.0)],
        );
        // 2: the queue grows through the run; 3: drift fine but too little completed.
        base.points[1].jct_drift = Some(1.6);
        base.points[2].achieved_rps = 2.8;
        assert_eq!(highest_sustained(&base).map(|p| p.offered), Some(1.0));
        let t = compare_table(&[ours.clone(), base.clone()]);
        assert!(
            t.contains("monolithic sustains up to rate = 1 (") && t.ends_with("there: 50.0%\n"),
            "{t}"
        );
        base.points[1].jct_drift = Some(1.4);
        base.points[2].achieved_rps = 2.85;
        assert_eq!(highest_sustained(&base).map(|p| p.offered), Some(4.0));
        assert!(compare_table(&[ours.clone(), base.clone()]).ends_with("there: 80.0%\n"));
        base.points[0].refused = 1;
        assert!(highest_sustained(&base).is_none());
        assert!(compare_table(&[ours, base]).contains("monolithic sustains none of these loads"));
    }

    #[test]
    fn drift_compares_the_last_third_of_arrivals_with_the_first() {
        let record = |due: f64, jct: f64, outcome: Outcome| Record {
            index: 0,
            kind: crate::bench::workload::Kind::Text,
            outcome,
            status: 200,
            error: None,
            sent_s: due,
            due_s: Some(due),
            client_wait_ms: 0.0,
            held_by_cap: false,
            jct_ms: jct,
            ttft_ms: None,
            ttfp_ms: None,
            rtf: None,
            prompt_words: 1,
            max_tokens: 1,
            output_tokens: None,
            images: 0,
            request_id: None,
            trace: None,
            trace_error: None,
        };
        // Out of order on purpose; the failed request is left out.
        let rs = vec![
            record(5.0, 30.0, Outcome::Ok),
            record(0.0, 10.0, Outcome::Ok),
            record(2.0, 20.0, Outcome::Ok),
            record(1.0, 10.0, Outcome::Ok),
            record(6.0, 30.0, Outcome::Ok),
            record(3.0, 20.0, Outcome::Ok),
            record(4.0, 999.0, Outcome::Error),
        ];
        assert_eq!(jct_drift(&rs), Some(3.0));
        assert_eq!(jct_drift(&rs[..2]), None);
    }
}
