//! Latency against offered load: a sweep runs the same workload at each load and keeps one
//! point per load (`sweep.json`); `bench plot` puts several sweeps — e.g. `serve` and
//! `serve --monolithic` — on one chart and tabulates the mean-JCT reduction.

use super::plot::{self, Chart, Series};
use super::report::{KindSummary, Latency};
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
}

impl SweepPoint {
    pub fn from_summaries(offered: f64, wall_s: f64, summaries: Vec<KindSummary>) -> Self {
        let all = summaries
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
            wall_s,
            kinds: summaries,
        }
    }
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
    out
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
}
