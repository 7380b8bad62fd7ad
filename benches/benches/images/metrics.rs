//! The image stages' figures from `/metrics`, differenced over a benchmark phase.

use std::collections::BTreeMap;

/// Differences of the stages' `/metrics` series over a phase (`None` where absent).
#[derive(Default, Clone, Copy)]
pub(crate) struct DitStats {
    pub(crate) steps: Option<f64>,
    pub(crate) jobs_per_step: Option<f64>,
    pub(crate) rows_per_forward: Option<f64>,
    pub(crate) cached_fraction: Option<f64>,
    /// Seconds spent in engine steps by the encoder, dit and vae stages.
    pub(crate) busy: [Option<f64>; 3],
}

/// Stage ids of the benchmark graph, in pipeline order.
pub(crate) const STAGES: [&str; 3] = ["image-encoder", "dit", "vae"];

/// The `/metrics` series of the stages, `name{labels}` → value (histogram buckets left out).
pub(crate) async fn stage_series(client: &reqwest::Client, base: &str) -> BTreeMap<String, f64> {
    let Ok(resp) = client.get(format!("{base}/metrics")).send().await else {
        return BTreeMap::new();
    };
    let text = resp.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| !l.starts_with('#') && l.contains("stage=\""))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let name = series.split('{').next()?;
            if name.ends_with("_bucket") {
                return None;
            }
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// Sum over replicas of stage `stage`'s series whose metric name contains `needle` and ends
/// with `suffix`.
pub(crate) fn metric(
    m: &BTreeMap<String, f64>,
    stage: &str,
    needle: &str,
    suffix: &str,
) -> Option<f64> {
    let label = format!("stage=\"{stage}\"");
    let hits: Vec<f64> = m
        .iter()
        .filter(|(k, _)| {
            let name = k.split('{').next().unwrap_or("");
            name.contains(needle) && name.ends_with(suffix) && k.contains(&label)
        })
        .map(|(_, v)| *v)
        .collect();
    (!hits.is_empty()).then(|| hits.iter().sum())
}

pub(crate) fn dit_stats(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> DitStats {
    let delta_of = |stage: &str, needle: &str, suffix: &str| -> Option<f64> {
        Some(
            metric(after, stage, needle, suffix)?
                - metric(before, stage, needle, suffix).unwrap_or(0.0),
        )
    };
    let delta = |needle: &str, suffix: &str| delta_of("dit", needle, suffix);
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let steps = delta("step_batch_size", "_count");
    let image_steps = delta("denoise_steps", "_total");
    // A counter that was never incremented is not exported: none cached when the server
    // exports the image-step counter but not the cached one.
    let cached = delta("denoise_cached_steps", "_total").or(image_steps.map(|_| 0.0));
    DitStats {
        steps,
        jobs_per_step: ratio(delta("step_batch_size", "_sum"), steps),
        rows_per_forward: ratio(
            delta("denoise_rows", "_total"),
            delta("denoise_forwards", "_total"),
        ),
        cached_fraction: ratio(cached, image_steps),
        busy: STAGES.map(|stage| delta_of(stage, "step_seconds", "_sum")),
    }
}
