//! The charts of one run: the JCT distribution per kind (a CDF shows the whole tail at once,
//! where a table gives three numbers) and JCT against send time (a queue that builds up during
//! the run shows as a rising line, which averages hide).

use super::client::Outcome;
use super::plot::{self, Chart, Series};
use super::report::Results;
use super::workload::Kind;
use std::path::{Path, PathBuf};

/// JCT CDF, one line per kind present (successful requests).
pub fn jct_cdf(results: &Results) -> Chart {
    let series = Kind::ALL
        .into_iter()
        .enumerate()
        .filter_map(|(i, k)| {
            let mut jct: Vec<f64> = results
                .requests
                .iter()
                .filter(|r| r.kind == k && r.outcome == Outcome::Ok)
                .map(|r| r.jct_ms)
                .collect();
            if jct.is_empty() {
                return None;
            }
            jct.sort_by(f64::total_cmp);
            let n = jct.len() as f64;
            // A step function: each value rises from (i)/n to (i+1)/n.
            let mut points = vec![(jct[0], 0.0)];
            for (j, v) in jct.iter().enumerate() {
                points.push((*v, j as f64 / n));
                points.push((*v, (j + 1) as f64 / n));
            }
            Some(Series {
                label: k.name().into(),
                points,
                color: i,
                dashed: false,
                markers: false,
                scatter: false,
            })
        })
        .collect();
    Chart {
        title: title("JCT CDF", results),
        x_desc: "job completion time (ms)".into(),
        y_desc: "fraction of requests".into(),
        series,
        y_range: Some((0.0, 1.02)),
    }
}

/// JCT against send time, one marker per successful request, colored by kind.
pub fn jct_over_time(results: &Results) -> Chart {
    let series = Kind::ALL
        .into_iter()
        .enumerate()
        .filter_map(|(i, k)| {
            let mut points: Vec<(f64, f64)> = results
                .requests
                .iter()
                .filter(|r| r.kind == k && r.outcome == Outcome::Ok)
                .map(|r| (r.due_s.unwrap_or(r.sent_s), r.jct_ms))
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            (!points.is_empty()).then(|| Series {
                label: k.name().into(),
                points,
                color: i,
                dashed: false,
                markers: false,
                scatter: true,
            })
        })
        .collect();
    Chart {
        title: title("JCT over the run", results),
        x_desc: "send time (s after start)".into(),
        y_desc: "job completion time (ms)".into(),
        series,
        y_range: None,
    }
}

fn title(what: &str, results: &Results) -> String {
    match &results.label {
        Some(l) => format!("{what} — {l}"),
        None => what.to_string(),
    }
}

/// Writes `jct_cdf.png` and `jct_over_time.png` into `dir`.
pub fn run_charts(dir: &Path, results: &Results, text: bool) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    for (name, chart) in [
        ("jct_cdf.png", jct_cdf(results)),
        ("jct_over_time.png", jct_over_time(results)),
    ] {
        let path = dir.join(name);
        plot::draw(&path, &chart, text)?;
        out.push(path);
    }
    Ok(out)
}
