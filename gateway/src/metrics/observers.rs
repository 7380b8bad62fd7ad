//! The metrics as the orchestrator's and stage threads' observers.

use super::{Metrics, StageMetrics};
use crate::orchestrator::JobObserver;
use omnistage_scheduler::StageObserver;
use omnistage_stages::RouteDecision;
use std::time::Duration;

impl StageObserver for StageMetrics {
    fn step_done(&self, batch_size: usize, tokens: usize, elapsed: Duration) {
        let l = [self.stage.as_str(), self.replica.as_str()];
        self.metrics
            .occupancy
            .with_label_values(&l)
            .observe(batch_size as f64 / self.max_batch_size as f64);
        self.metrics
            .step_batch
            .with_label_values(&l)
            .observe(batch_size as f64);
        self.metrics
            .step_seconds
            .with_label_values(&l)
            .observe(elapsed.as_secs_f64());
        self.metrics
            .step_tokens
            .with_label_values(&l)
            .inc_by(tokens as u64);
    }

    fn queue_changed(&self, waiting: usize, running: usize) {
        let l = [self.stage.as_str(), self.replica.as_str()];
        self.metrics
            .queue_depth
            .with_label_values(&l)
            .set(waiting as i64);
        self.metrics
            .running
            .with_label_values(&l)
            .set(running as i64);
    }

    fn job_failed(&self, reason: &str) {
        self.metrics
            .stage_failures
            .with_label_values(&[self.stage.as_str(), self.replica.as_str(), reason])
            .inc();
    }
}

impl JobObserver for Metrics {
    fn first_output(&self, since_start: Duration) {
        self.ttft
            .with_label_values::<&str>(&[])
            .observe(since_start.as_secs_f64());
    }

    fn first_audio(&self, since_start: Duration) {
        self.ttfp
            .with_label_values::<&str>(&[])
            .observe(since_start.as_secs_f64());
    }

    fn audio_done(&self, audio_seconds: f64, real_time_factor: Option<f64>) {
        self.audio_seconds.inc_by(audio_seconds.max(0.0));
        if let Some(rtf) = real_time_factor {
            self.rtf.with_label_values::<&str>(&[]).observe(rtf);
        }
    }

    fn finished(&self, outcome: &str, since_start: Duration) {
        self.request_seconds
            .with_label_values(&[outcome])
            .observe(since_start.as_secs_f64());
        self.requests.with_label_values(&[outcome]).inc();
    }

    fn transfer(&self, edge: &str, bytes: usize, seconds: f64) {
        self.connector_bytes
            .with_label_values(&[edge])
            .inc_by(bytes as u64);
        self.connector_seconds
            .with_label_values(&[edge])
            .observe(seconds);
        self.connector_chunks.with_label_values(&[edge]).inc();
    }

    fn held(&self, edge: &str) {
        self.edge_holds.with_label_values(&[edge]).inc();
    }

    fn retried(&self, stage: &str) {
        self.stage_retries.with_label_values(&[stage]).inc();
    }

    fn routed(&self, router: &str, decision: &RouteDecision) {
        for (i, expert) in decision.selected.iter().enumerate() {
            let role = if i == 0 { "primary" } else { "peer" };
            self.router_selections
                .with_label_values(&[router, expert.as_str(), role])
                .inc();
        }
    }
}
