//! Summaries of a run: percentiles, per-kind tables with the per-stage breakdown, and
//! `results.json`.

use super::client::{Outcome, Record};
use super::run::RunResult;
use super::workload::{Kind, Workload};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// The `q`-th percentile (0–100) by linear interpolation between the closest ranks (numpy's
/// default), so small samples give stable, comparable numbers. `None` for no values; NaNs are
/// ignored.
pub fn percentile(values: &[f64], q: f64) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = (q.clamp(0.0, 100.0) / 100.0) * (v.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    Some(v[lo] + (v[hi] - v[lo]) * (rank - lo as f64))
}

pub fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// Mean, p50, p90 and p99 of a latency, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub mean: Option<f64>,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
}

impl Latency {
    pub fn of(values: &[f64]) -> Self {
        Latency {
            mean: mean(values),
            p50: percentile(values, 50.0),
            p90: percentile(values, 90.0),
            p99: percentile(values, 99.0),
        }
    }
}

/// Mean time a request spent in one stage (or on one edge), over the requests whose trace has it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageMean {
    pub stage: String,
    pub requests: u64,
    pub queue_wait_ms: Option<f64>,
    pub compute_ms: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EdgeMean {
    pub edge: String,
    pub requests: u64,
    pub transfer_ms: f64,
    pub bytes: f64,
}

/// One kind's line of the report (or `all`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KindSummary {
    pub kind: String,
    pub count: u64,
    pub ok: u64,
    /// Failures other than refusals.
    pub errors: u64,
    /// 429/503 answers.
    pub refused: u64,
    /// Successful requests per second of the run's makespan.
    pub throughput_rps: f64,
    pub output_tokens_per_s: f64,
    pub images_per_s: f64,
    /// Over successful requests.
    pub jct_ms: Latency,
    pub ttft_ms: Latency,
    /// Time to first audio packet and real-time factor (speech).
    pub ttfp_ms: Latency,
    pub rtf: Latency,
    /// Mean time waiting for the whole graph (`serve --monolithic`).
    pub graph_wait_ms: Option<f64>,
    pub stages: Vec<StageMean>,
    pub edges: Vec<EdgeMean>,
    /// Requests the in-flight cap held back past their due time.
    pub held_by_cap: u64,
    pub traced: u64,
    /// Mean of client JCT (less any wait for the in-flight cap) minus the server's own JCT:
    /// HTTP, encoding and socket time the server's trace cannot see. A large value points at
    /// the transport (e.g. Nagle/delayed-ACK stalls on streamed answers), not the stages.
    pub client_minus_server_ms: Option<f64>,
}

/// Summarizes the records of one kind (`None`: all of them).
pub fn summarize(records: &[Record], kind: Option<Kind>, wall_s: f64) -> KindSummary {
    let rs: Vec<&Record> = records
        .iter()
        .filter(|r| kind.is_none_or(|k| r.kind == k))
        .collect();
    let ok: Vec<&Record> = rs
        .iter()
        .copied()
        .filter(|r| r.outcome == Outcome::Ok)
        .collect();
    let per_s = |n: f64| if wall_s > 0.0 { n / wall_s } else { 0.0 };
    let jct: Vec<f64> = ok.iter().map(|r| r.jct_ms).collect();
    let ttft: Vec<f64> = ok.iter().filter_map(|r| r.ttft_ms).collect();
    let ttfp: Vec<f64> = ok.iter().filter_map(|r| r.ttfp_ms).collect();
    let rtf: Vec<f64> = ok.iter().filter_map(|r| r.rtf).collect();
    let traces: Vec<_> = ok.iter().filter_map(|r| r.trace.as_ref()).collect();
    // Stages in first-seen order (graph order), means over the traces that include them.
    let mut stage_order: Vec<String> = Vec::new();
    let mut stage_vals: BTreeMap<String, (Vec<f64>, Vec<f64>, u64)> = BTreeMap::new();
    let mut edge_order: Vec<String> = Vec::new();
    let mut edge_vals: BTreeMap<String, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    for t in &traces {
        for s in &t.stages {
            if !stage_order.contains(&s.stage) {
                stage_order.push(s.stage.clone());
            }
            let e = stage_vals.entry(s.stage.clone()).or_default();
            e.0.extend(s.queue_wait_ms);
            e.1.extend(s.compute_ms);
            e.2 += 1;
        }
        for ed in &t.edges {
            if !edge_order.contains(&ed.edge) {
                edge_order.push(ed.edge.clone());
            }
            let e = edge_vals.entry(ed.edge.clone()).or_default();
            e.0.push(ed.transfer_ms);
            e.1.push(ed.bytes as f64);
        }
    }
    let graph_wait: Vec<f64> = traces.iter().map(|t| t.graph_wait_ms).collect();
    let overhead: Vec<f64> = ok
        .iter()
        .filter_map(|r| Some(r.jct_ms - r.client_wait_ms - r.trace.as_ref()?.jct_ms))
        .collect();
    KindSummary {
        kind: kind.map_or("all", Kind::name).to_string(),
        count: rs.len() as u64,
        ok: ok.len() as u64,
        errors: rs.iter().filter(|r| r.outcome == Outcome::Error).count() as u64,
        refused: rs.iter().filter(|r| r.outcome == Outcome::Refused).count() as u64,
        throughput_rps: per_s(ok.len() as f64),
        output_tokens_per_s: per_s(ok.iter().filter_map(|r| r.output_tokens).sum::<u64>() as f64),
        images_per_s: per_s(ok.iter().map(|r| r.images).sum::<u64>() as f64),
        jct_ms: Latency::of(&jct),
        ttft_ms: Latency::of(&ttft),
        ttfp_ms: Latency::of(&ttfp),
        rtf: Latency::of(&rtf),
        graph_wait_ms: mean(&graph_wait),
        stages: stage_order
            .iter()
            .map(|s| {
                let (q, c, n) = &stage_vals[s];
                StageMean {
                    stage: s.clone(),
                    requests: *n,
                    queue_wait_ms: mean(q),
                    compute_ms: mean(c),
                }
            })
            .collect(),
        edges: edge_order
            .iter()
            .map(|e| {
                let (t, b) = &edge_vals[e];
                EdgeMean {
                    edge: e.clone(),
                    requests: t.len() as u64,
                    transfer_ms: mean(t).unwrap_or(0.0),
                    bytes: mean(b).unwrap_or(0.0),
                }
            })
            .collect(),
        held_by_cap: rs.iter().filter(|r| r.held_by_cap).count() as u64,
        traced: traces.len() as u64,
        client_minus_server_ms: mean(&overhead),
    }
}

/// Per-kind summaries (kinds present in the run, in a fixed order), then `all`.
pub fn summaries(result: &RunResult) -> Vec<KindSummary> {
    let mut out: Vec<KindSummary> = Kind::ALL
        .into_iter()
        .filter(|k| result.records.iter().any(|r| r.kind == *k))
        .map(|k| summarize(&result.records, Some(k), result.wall_s))
        .collect();
    out.push(summarize(&result.records, None, result.wall_s));
    out
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}"))
}

/// The report's tables, as text.
pub fn table(summaries: &[KindSummary], wall_s: f64) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "makespan {wall_s:.2} s");
    let _ = writeln!(
        s,
        "{:<7} {:>5} {:>4} {:>4} {:>7} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "kind",
        "count",
        "err",
        "429",
        "req/s",
        "tok/s",
        "img/s",
        "jct mean",
        "jct p50",
        "jct p90",
        "jct p99",
        "ttft p50",
        "ttft p99"
    );
    for k in summaries {
        let _ = writeln!(
            s,
            "{:<7} {:>5} {:>4} {:>4} {:>7.2} {:>9.1} {:>8.2} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            k.kind,
            k.count,
            k.errors,
            k.refused,
            k.throughput_rps,
            k.output_tokens_per_s,
            k.images_per_s,
            ms(k.jct_ms.mean),
            ms(k.jct_ms.p50),
            ms(k.jct_ms.p90),
            ms(k.jct_ms.p99),
            ms(k.ttft_ms.p50),
            ms(k.ttft_ms.p99),
        );
    }
    let _ = writeln!(
        s,
        "(latencies in ms over successful requests; err excludes 429/503, counted apart)"
    );
    let speech: Vec<&KindSummary> = summaries
        .iter()
        .filter(|k| k.ttfp_ms.p50.is_some())
        .collect();
    if !speech.is_empty() {
        let _ = writeln!(
            s,
            "\n{:<7} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "kind", "ttfp mean", "ttfp p50", "ttfp p99", "rtf mean", "rtf p99"
        );
        for k in speech {
            let _ = writeln!(
                s,
                "{:<7} {:>9} {:>9} {:>9} {:>9} {:>9}",
                k.kind,
                ms(k.ttfp_ms.mean),
                ms(k.ttfp_ms.p50),
                ms(k.ttfp_ms.p99),
                k.rtf.mean.map_or("-".into(), |v| format!("{v:.3}")),
                k.rtf.p99.map_or("-".into(), |v| format!("{v:.3}")),
            );
        }
    }
    let per_kind: Vec<&KindSummary> = summaries.iter().filter(|k| k.kind != "all").collect();
    if per_kind.iter().any(|k| !k.stages.is_empty()) {
        let _ = writeln!(s, "\nmean per-stage breakdown (server traces)");
        let _ = writeln!(
            s,
            "{:<7} {:<22} {:>6} {:>11} {:>11}",
            "kind", "stage / edge", "reqs", "queue ms", "compute ms"
        );
        for k in per_kind {
            if let Some(g) = k.graph_wait_ms.filter(|g| *g > 0.0) {
                let _ = writeln!(
                    s,
                    "{:<7} {:<22} {:>6} {:>11.1} {:>11}",
                    k.kind, "(graph admission)", k.traced, g, "-"
                );
            }
            if let Some(o) = k.client_minus_server_ms {
                let _ = writeln!(
                    s,
                    "{:<7} {:<22} {:>6} {:>11} {:>11}   client JCT − server JCT {o:.1} ms",
                    k.kind, "(http)", k.traced, "-", "-"
                );
            }
            for st in &k.stages {
                let _ = writeln!(
                    s,
                    "{:<7} {:<22} {:>6} {:>11} {:>11}",
                    k.kind,
                    st.stage,
                    st.requests,
                    ms(st.queue_wait_ms),
                    ms(st.compute_ms)
                );
            }
            for e in &k.edges {
                let _ = writeln!(
                    s,
                    "{:<7} {:<22} {:>6} {:>11} {:>11}   transfer {:.3} ms, {:.0} B",
                    k.kind, e.edge, e.requests, "-", "-", e.transfer_ms, e.bytes
                );
            }
        }
    }
    let held: u64 = summaries
        .iter()
        .filter(|k| k.kind == "all")
        .map(|k| k.held_by_cap)
        .sum();
    if held > 0 {
        let _ = writeln!(
            s,
            "\nwarning: the in-flight cap held back {held} requests past their due time (their JCT \
             includes that wait); raise --max-in-flight or lower the rate"
        );
    }
    s
}

/// `results.json`: the settings, the summaries and every request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub label: Option<String>,
    pub url: String,
    pub workload: Workload,
    pub started_unix_ms: f64,
    pub wall_s: f64,
    pub summary: Vec<KindSummary>,
    pub requests: Vec<Record>,
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), String> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| format!("cannot serialize {}: {e}", path.display()))?;
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-9);
        assert!(close(percentile(&v, 50.0), 50.5));
        assert!(close(percentile(&v, 99.0), 99.01));
        assert!(close(percentile(&v, 0.0), 1.0));
        assert!(close(percentile(&v, 100.0), 100.0));
        assert!(
            close(percentile(&[3.0, 1.0, 2.0], 50.0), 2.0),
            "unsorted input"
        );
        assert!(close(percentile(&[7.0], 99.0), 7.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert!(close(percentile(&[f64::NAN, 4.0], 50.0), 4.0));
        assert!(close(mean(&[1.0, 2.0, 6.0]), 3.0));
    }
}
