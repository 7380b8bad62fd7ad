//! Every Prometheus metric omnistage exports, named in one place.
//!
//! Naming rules: `omnistage_` prefix; `_seconds`, `_bytes`, `_total` suffixes for durations, sizes
//! and counters; labels `stage`, `replica`, `model`, `reason`, `outcome`, `edge`. The registry is
//! owned by the server (no global state), so tests can run several servers side by side.

mod observers;

use omnistage_stages::EngineStats;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::collections::HashMap;
use std::sync::Mutex;

pub mod names {
    pub const STAGE_QUEUE_DEPTH: &str = "omnistage_stage_queue_depth";
    pub const STAGE_RUNNING: &str = "omnistage_stage_running_batch_size";
    pub const STAGE_STEP_BATCH_SIZE: &str = "omnistage_stage_step_batch_size";
    pub const STAGE_STEP_SECONDS: &str = "omnistage_stage_step_seconds";
    pub const STAGE_STEP_TOKENS_TOTAL: &str = "omnistage_stage_step_tokens_total";
    pub const STAGE_STATE_BYTES: &str = "omnistage_stage_state_bytes";
    pub const STAGE_KV_BLOCKS_USED: &str = "omnistage_stage_kv_blocks_used";
    pub const STAGE_KV_BLOCKS_CACHED: &str = "omnistage_stage_kv_blocks_cached";
    pub const STAGE_KV_BLOCKS_TOTAL: &str = "omnistage_stage_kv_blocks_total";
    pub const STAGE_PREEMPTIONS_TOTAL: &str = "omnistage_stage_preemptions_total";
    pub const STAGE_PREFIX_QUERY_TOKENS_TOTAL: &str =
        "omnistage_stage_prefix_cache_query_tokens_total";
    pub const STAGE_PREFIX_HIT_TOKENS_TOTAL: &str = "omnistage_stage_prefix_cache_hit_tokens_total";
    pub const STAGE_BATCH_OCCUPANCY: &str = "omnistage_stage_batch_occupancy";
    pub const STAGE_DENOISE_STEPS_TOTAL: &str = "omnistage_stage_denoise_steps_total";
    pub const STAGE_DENOISE_CACHED_STEPS_TOTAL: &str = "omnistage_stage_denoise_cached_steps_total";
    pub const STAGE_DENOISE_FORWARDS_TOTAL: &str = "omnistage_stage_denoise_forwards_total";
    pub const STAGE_DENOISE_ROWS_TOTAL: &str = "omnistage_stage_denoise_rows_total";
    pub const IMAGES_GENERATED_TOTAL: &str = "omnistage_images_generated_total";
    pub const STAGE_JOB_FAILURES_TOTAL: &str = "omnistage_stage_job_failures_total";
    pub const GENERATED_TOKENS_TOTAL: &str = "omnistage_generated_tokens_total";
    pub const REQUEST_SECONDS: &str = "omnistage_request_duration_seconds";
    pub const TIME_TO_FIRST_TOKEN_SECONDS: &str = "omnistage_time_to_first_token_seconds";
    pub const REQUESTS_TOTAL: &str = "omnistage_requests_total";
    pub const ERRORS_TOTAL: &str = "omnistage_errors_total";
    pub const CONNECTOR_BYTES_TOTAL: &str = "omnistage_connector_bytes_total";
    pub const CONNECTOR_TRANSFER_SECONDS: &str = "omnistage_connector_transfer_seconds";
    pub const CONNECTOR_CHUNKS_TOTAL: &str = "omnistage_connector_chunks_total";
    pub const EDGE_HOLDS_TOTAL: &str = "omnistage_edge_producer_holds_total";
    pub const TIME_TO_FIRST_AUDIO_SECONDS: &str = "omnistage_time_to_first_audio_seconds";
    pub const AUDIO_SECONDS_TOTAL: &str = "omnistage_audio_seconds_total";
    pub const AUDIO_REAL_TIME_FACTOR: &str = "omnistage_audio_real_time_factor";
    pub const STAGE_AUDIO_SAMPLES_TOTAL: &str = "omnistage_stage_audio_samples_total";
    pub const MEDIA_ENCODED_TOTAL: &str = "omnistage_media_encoded_total";
    pub const ENCODER_CACHE_QUERIES_TOTAL: &str = "omnistage_encoder_cache_queries_total";
    pub const ENCODER_CACHE_HITS_TOTAL: &str = "omnistage_encoder_cache_hits_total";
    pub const MOT_BOUNDARIES_TOTAL: &str = "omnistage_mot_boundaries_total";
    pub const MOT_BOUNDARY_WAIT_SECONDS_TOTAL: &str = "omnistage_mot_boundary_wait_seconds_total";
    pub const ROUTER_SELECTIONS_TOTAL: &str = "omnistage_router_selections_total";
    pub const STAGE_RETRIES_TOTAL: &str = "omnistage_stage_retries_total";
}

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
const RTF_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 10.0];
const OCCUPANCY_BUCKETS: &[f64] = &[0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0];

/// The server's metrics.
pub struct Metrics {
    registry: Registry,
    queue_depth: IntGaugeVec,
    running: IntGaugeVec,
    step_batch: HistogramVec,
    step_seconds: HistogramVec,
    step_tokens: IntCounterVec,
    state_bytes: IntGaugeVec,
    kv_used: IntGaugeVec,
    kv_cached: IntGaugeVec,
    kv_total: IntGaugeVec,
    preemptions: IntCounterVec,
    prefix_queries: IntCounterVec,
    prefix_hits: IntCounterVec,
    occupancy: HistogramVec,
    denoise_steps: IntCounterVec,
    denoise_cached_steps: IntCounterVec,
    denoise_forwards: IntCounterVec,
    denoise_rows: IntCounterVec,
    images: IntCounterVec,
    audio_samples: IntCounterVec,
    media_encoded: IntCounterVec,
    encoder_cache_queries: IntCounterVec,
    encoder_cache_hits: IntCounterVec,
    mot_boundaries: IntCounterVec,
    mot_boundary_wait: prometheus::CounterVec,
    router_selections: IntCounterVec,
    /// Engine counters as last seen, so Prometheus counters advance by the difference.
    last_engine: Mutex<HashMap<(String, usize), EngineStats>>,
    stage_failures: IntCounterVec,
    pub generated_tokens: IntCounterVec,
    request_seconds: HistogramVec,
    ttft: HistogramVec,
    requests: IntCounterVec,
    pub errors: IntCounterVec,
    connector_bytes: IntCounterVec,
    connector_seconds: HistogramVec,
    connector_chunks: IntCounterVec,
    edge_holds: IntCounterVec,
    stage_retries: IntCounterVec,
    ttfp: HistogramVec,
    audio_seconds: prometheus::Counter,
    rtf: HistogramVec,
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("static metric definition");
    r.register(Box::new(g.clone()))
        .expect("metric names are unique");
    g
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition");
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("static metric definition");
    r.register(Box::new(h.clone()))
        .expect("metric names are unique");
    h
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        use names::*;
        let r = Registry::new();
        let sr = &["stage", "replica"];
        Self {
            queue_depth: gauge(
                &r,
                STAGE_QUEUE_DEPTH,
                "Jobs waiting in the stage's queue.",
                sr,
            ),
            running: gauge(&r, STAGE_RUNNING, "Jobs in the stage's running batch.", sr),
            step_batch: histogram(
                &r,
                STAGE_STEP_BATCH_SIZE,
                "Jobs per engine step.",
                sr,
                BATCH_BUCKETS,
            ),
            step_seconds: histogram(
                &r,
                STAGE_STEP_SECONDS,
                "Engine step latency.",
                sr,
                LATENCY_BUCKETS,
            ),
            step_tokens: counter(
                &r,
                STAGE_STEP_TOKENS_TOTAL,
                "Input tokens processed by engine steps.",
                sr,
            ),
            state_bytes: gauge(
                &r,
                STAGE_STATE_BYTES,
                "Bytes of per-job engine state (KV cache).",
                sr,
            ),
            kv_used: gauge(
                &r,
                STAGE_KV_BLOCKS_USED,
                "KV cache blocks referenced by live jobs.",
                sr,
            ),
            kv_cached: gauge(
                &r,
                STAGE_KV_BLOCKS_CACHED,
                "Unreferenced KV blocks kept for prefix reuse.",
                sr,
            ),
            kv_total: gauge(
                &r,
                STAGE_KV_BLOCKS_TOTAL,
                "KV cache blocks in the stage's pool.",
                sr,
            ),
            preemptions: counter(
                &r,
                STAGE_PREEMPTIONS_TOTAL,
                "Jobs whose KV cache was dropped for room and recomputed.",
                sr,
            ),
            prefix_queries: counter(
                &r,
                STAGE_PREFIX_QUERY_TOKENS_TOTAL,
                "Prompt tokens looked up in the prefix cache.",
                sr,
            ),
            prefix_hits: counter(
                &r,
                STAGE_PREFIX_HIT_TOKENS_TOTAL,
                "Prompt tokens found in the prefix cache.",
                sr,
            ),
            last_engine: Mutex::new(HashMap::new()),
            stage_failures: counter(
                &r,
                STAGE_JOB_FAILURES_TOTAL,
                "Jobs a stage failed.",
                &["stage", "replica", "reason"],
            ),
            generated_tokens: counter(
                &r,
                GENERATED_TOKENS_TOTAL,
                "Tokens generated for clients, by served model name.",
                &["model"],
            ),
            request_seconds: histogram(
                &r,
                REQUEST_SECONDS,
                "Job completion time.",
                &["outcome"],
                LATENCY_BUCKETS,
            ),
            ttft: histogram(
                &r,
                TIME_TO_FIRST_TOKEN_SECONDS,
                "Time to first output token.",
                &[],
                LATENCY_BUCKETS,
            ),
            occupancy: histogram(
                &r,
                STAGE_BATCH_OCCUPANCY,
                "Jobs per engine step as a fraction of the stage's max_batch_size.",
                sr,
                OCCUPANCY_BUCKETS,
            ),
            denoise_steps: counter(
                &r,
                STAGE_DENOISE_STEPS_TOTAL,
                "Denoising steps completed, summed over images (rate = denoise steps/s).",
                sr,
            ),
            denoise_cached_steps: counter(
                &r,
                STAGE_DENOISE_CACHED_STEPS_TOTAL,
                "Denoising steps that reused the step cache's residual.",
                sr,
            ),
            denoise_forwards: counter(
                &r,
                STAGE_DENOISE_FORWARDS_TOTAL,
                "Denoiser forwards run (one per latent-shape group per step).",
                sr,
            ),
            denoise_rows: counter(
                &r,
                STAGE_DENOISE_ROWS_TOTAL,
                "Rows carried by denoiser forwards (rows / forwards = batch occupancy).",
                sr,
            ),
            images: counter(
                &r,
                IMAGES_GENERATED_TOTAL,
                "Images decoded (rate = images/s).",
                sr,
            ),
            audio_samples: counter(
                &r,
                STAGE_AUDIO_SAMPLES_TOTAL,
                "PCM samples decoded by codec stages.",
                sr,
            ),
            media_encoded: counter(
                &r,
                MEDIA_ENCODED_TOTAL,
                "Images or audio clips run through a media encoder's model.",
                sr,
            ),
            encoder_cache_queries: counter(
                &r,
                ENCODER_CACHE_QUERIES_TOTAL,
                "Media items looked up in a media encoder's embedding cache.",
                sr,
            ),
            encoder_cache_hits: counter(
                &r,
                ENCODER_CACHE_HITS_TOTAL,
                "Media items whose embeddings were found in the encoder cache (not encoded again).",
                sr,
            ),
            mot_boundaries: counter(
                &r,
                MOT_BOUNDARIES_TOTAL,
                "Stack boundaries Mixture-of-Thoughts primaries reached in prompt passes.",
                sr,
            ),
            mot_boundary_wait: {
                let c = prometheus::CounterVec::new(
                    prometheus::Opts::new(
                        MOT_BOUNDARY_WAIT_SECONDS_TOTAL,
                        "Seconds Mixture-of-Thoughts primaries waited at stack boundaries for their peers' states.",
                    ),
                    sr,
                )
                .expect("static metric definition");
                r.register(Box::new(c.clone()))
                    .expect("metric names are unique");
                c
            },
            router_selections: counter(
                &r,
                ROUTER_SELECTIONS_TOTAL,
                "Experts a router selected, by role (primary answers; peers collaborate).",
                &["router", "expert", "role"],
            ),
            connector_chunks: counter(
                &r,
                CONNECTOR_CHUNKS_TOTAL,
                "Deliveries across edges: whole payloads, or chunks of streamed edges.",
                &["edge"],
            ),
            edge_holds: counter(
                &r,
                EDGE_HOLDS_TOTAL,
                "Times a producer was held back because its consumer had a streamed edge's buffer full.",
                &["edge"],
            ),
            stage_retries: counter(
                &r,
                STAGE_RETRIES_TOTAL,
                "Jobs resubmitted to another replica after theirs became unavailable before producing anything.",
                &["stage"],
            ),
            ttfp: histogram(
                &r,
                TIME_TO_FIRST_AUDIO_SECONDS,
                "Time to the first audio packet sent to the client (TTFP).",
                &[],
                LATENCY_BUCKETS,
            ),
            audio_seconds: {
                let c = prometheus::Counter::new(
                    AUDIO_SECONDS_TOTAL,
                    "Seconds of audio produced for clients.",
                )
                .expect("static metric definition");
                r.register(Box::new(c.clone()))
                    .expect("metric names are unique");
                c
            },
            rtf: histogram(
                &r,
                AUDIO_REAL_TIME_FACTOR,
                "Real-time factor of requests with audio: job time / audio duration.",
                &[],
                RTF_BUCKETS,
            ),
            requests: counter(&r, REQUESTS_TOTAL, "Requests by outcome.", &["outcome"]),
            errors: counter(&r, ERRORS_TOTAL, "Errors by reason.", &["reason"]),
            connector_bytes: counter(
                &r,
                CONNECTOR_BYTES_TOTAL,
                "Payload bytes moved across edges.",
                &["edge"],
            ),
            connector_seconds: histogram(
                &r,
                CONNECTOR_TRANSFER_SECONDS,
                "Edge transfer latency.",
                &["edge"],
                LATENCY_BUCKETS,
            ),
            registry: r,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            return format!("# encoding metrics failed: {e}\n");
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// `GET /metrics`'s answer: [`Self::render`] with Prometheus' text content type (the
    /// gateway and remote workers serve it alike).
    pub fn response(&self) -> axum::response::Response {
        use axum::response::IntoResponse;
        (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4",
            )],
            self.render(),
        )
            .into_response()
    }

    /// An observer for one stage replica's scheduler.
    pub fn stage_observer(
        self: &std::sync::Arc<Self>,
        stage: &str,
        replica: usize,
        max_batch_size: usize,
    ) -> StageMetrics {
        StageMetrics {
            metrics: self.clone(),
            stage: stage.to_string(),
            replica: replica.to_string(),
            max_batch_size: max_batch_size.max(1),
        }
    }

    /// Records a stage replica's engine figures (called when metrics are scraped).
    pub fn record_engine(&self, stage: &str, replica: usize, now: &EngineStats) {
        let r = replica.to_string();
        let l = [stage, r.as_str()];
        self.state_bytes
            .with_label_values(&l)
            .set(now.state_bytes as i64);
        self.kv_used
            .with_label_values(&l)
            .set(now.kv_blocks_used as i64);
        self.kv_cached
            .with_label_values(&l)
            .set(now.kv_blocks_cached as i64);
        self.kv_total
            .with_label_values(&l)
            .set(now.kv_blocks_total as i64);
        let mut last = self.last_engine.lock().unwrap_or_else(|e| e.into_inner());
        let before = last
            .insert((stage.to_string(), replica), *now)
            .unwrap_or_default();
        self.preemptions.with_label_values(&l).inc_by(
            now.preemptions_total
                .saturating_sub(before.preemptions_total),
        );
        self.prefix_queries.with_label_values(&l).inc_by(
            now.prefix_query_tokens_total
                .saturating_sub(before.prefix_query_tokens_total),
        );
        self.prefix_hits.with_label_values(&l).inc_by(
            now.prefix_hit_tokens_total
                .saturating_sub(before.prefix_hit_tokens_total),
        );
        for (counter, now, before) in [
            (
                &self.denoise_steps,
                now.denoise_image_steps_total,
                before.denoise_image_steps_total,
            ),
            (
                &self.denoise_cached_steps,
                now.denoise_cached_image_steps_total,
                before.denoise_cached_image_steps_total,
            ),
            (
                &self.denoise_forwards,
                now.denoise_forwards_total,
                before.denoise_forwards_total,
            ),
            (
                &self.denoise_rows,
                now.denoise_rows_total,
                before.denoise_rows_total,
            ),
            (&self.images, now.images_total, before.images_total),
            (
                &self.audio_samples,
                now.audio_samples_total,
                before.audio_samples_total,
            ),
            (
                &self.media_encoded,
                now.media_encoded_total,
                before.media_encoded_total,
            ),
            (
                &self.encoder_cache_queries,
                now.encoder_cache_queries_total,
                before.encoder_cache_queries_total,
            ),
            (
                &self.encoder_cache_hits,
                now.encoder_cache_hits_total,
                before.encoder_cache_hits_total,
            ),
            (
                &self.mot_boundaries,
                now.mot_boundaries_total,
                before.mot_boundaries_total,
            ),
        ] {
            if now > 0 {
                counter
                    .with_label_values(&l)
                    .inc_by(now.saturating_sub(before));
            }
        }
        let waited = now
            .mot_boundary_wait_us_total
            .saturating_sub(before.mot_boundary_wait_us_total);
        if now.mot_boundary_wait_us_total > 0 {
            self.mot_boundary_wait
                .with_label_values(&l)
                .inc_by(waited as f64 / 1e6);
        }
    }

    /// Counts an error answered to a client.
    pub fn error(&self, reason: &str) {
        self.errors.with_label_values(&[reason]).inc();
    }
}

/// Prometheus observer of one stage replica.
pub struct StageMetrics {
    metrics: std::sync::Arc<Metrics>,
    stage: String,
    replica: String,
    max_batch_size: usize,
}
