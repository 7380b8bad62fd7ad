//! The results table: one row per phase, ratios against the sequential phase.

use crate::metrics::DitStats;
use crate::Phase;

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// A row of the results table.
#[derive(Clone)]
pub(crate) struct Row {
    pub(crate) name: String,
    pub(crate) images: usize,
    pub(crate) makespan: f64,
    pub(crate) jct: Vec<f64>,
    /// Images/s of every repetition (the other fields are the median one's).
    pub(crate) rates: Vec<f64>,
    pub(crate) dit: Option<DitStats>,
}

impl Row {
    pub(crate) fn rate(&self) -> f64 {
        self.images as f64 / self.makespan
    }
    pub(crate) fn mean(&self) -> f64 {
        self.jct.iter().sum::<f64>() / self.jct.len().max(1) as f64
    }
}

pub(crate) fn print_table(rows: &[Row], base: &Row) {
    println!(
        "{:<26} {:>8} {:>8} {:>11} {:>8} {:>8} {:>8} {:>7} {:>7} | {:>5} {:>7} {:>7} {:>6} | {:>5} {:>5} {:>5}",
        "phase",
        "makespan",
        "images/s",
        "(range)",
        "mean JCT",
        "p50 JCT",
        "p90 JCT",
        "x (a)",
        "JCT/(a)",
        "steps",
        "jobs/st",
        "rows/fw",
        "cached",
        "enc s",
        "dit s",
        "vae s",
    );
    let opt = |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |v| format!("{v:.prec$}"));
    for r in rows {
        let mut jct = r.jct.clone();
        jct.sort_by(f64::total_cmp);
        let d = r.dit.unwrap_or_default();
        let range = if r.rates.len() > 1 {
            let lo = r.rates.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = r.rates.iter().copied().fold(0.0, f64::max);
            format!("{lo:.1}-{hi:.1}")
        } else {
            "-".to_string()
        };
        let cached = d
            .cached_fraction
            .map_or("-".to_string(), |f| format!("{:.0}%", f * 100.0));
        println!(
            "{:<26} {:>7.2}s {:>8.2} {:>11} {:>7.3}s {:>7.3}s {:>7.3}s {:>6.2}x {:>6.2}x | {:>5} {:>7} {:>7} {:>6} | {:>5} {:>5} {:>5}",
            r.name,
            r.makespan,
            r.rate(),
            range,
            r.mean(),
            percentile(&jct, 0.5),
            percentile(&jct, 0.9),
            r.rate() / base.rate(),
            r.mean() / base.mean(),
            opt(d.steps, 0),
            opt(d.jobs_per_step, 2),
            opt(d.rows_per_forward, 2),
            cached,
            opt(d.busy[0], 2),
            opt(d.busy[1], 2),
            opt(d.busy[2], 2),
        );
    }
}

pub(crate) fn phase_row(p: &Phase) -> Row {
    Row {
        name: p.name.clone(),
        images: p.jct.len(),
        makespan: p.makespan,
        jct: p.jct.clone(),
        rates: p.rates.clone(),
        dit: Some(p.dit),
    }
}
