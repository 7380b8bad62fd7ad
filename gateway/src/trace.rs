//! Per-request traces: when each stage received, admitted, first answered and finished a job, and
//! what each edge moved — the per-stage breakdown (queue wait, compute, transfer) that
//! `omnistage bench` and operators read at `GET /v1/requests/{id}/trace`.
//!
//! The store keeps the most recent traces only (a fixed capacity, oldest dropped first), so it
//! never grows with traffic.

use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Instant;

/// Traces kept by a server.
pub const TRACE_CAPACITY: usize = 10_000;

/// One stage's part of a job; times in milliseconds since the job started.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StageTrace {
    pub stage: String,
    pub submitted_ms: f64,
    pub admitted_ms: Option<f64>,
    pub first_output_ms: Option<f64>,
    pub finished_ms: Option<f64>,
    /// `admitted − submitted`: time spent in the stage's queue.
    pub queue_wait_ms: Option<f64>,
    /// `finished − admitted`: time in the stage's running batch.
    pub compute_ms: Option<f64>,
    /// Why this attempt ended without finishing when the job was then retried on another
    /// replica (the next entry for the same stage is the retry).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retried_after: Option<String>,
}

/// What one edge moved for a job: one delivery, or every chunk of a streamed edge summed.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EdgeTrace {
    pub edge: String,
    pub chunks: usize,
    /// Times the producer was held back because the consumer had a full buffer unconsumed.
    pub holds: usize,
    pub bytes: usize,
    pub transfer_ms: f64,
}

/// A router's decision for the job.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RouteTrace {
    pub router: String,
    /// Selected expert stages, primary first.
    pub selected: Vec<String>,
    /// The router's score per expert (model form; empty for rules).
    pub scores: Vec<(String, f32)>,
    /// `model`, or the rule that matched.
    pub reason: String,
}

/// A finished job's trace.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct JobTrace {
    pub id: u64,
    /// When the job arrived, in milliseconds since the Unix epoch.
    pub started_unix_ms: f64,
    pub outputs: Vec<String>,
    /// `ok`, `invalid_input`, `overloaded`, `stage_failed`, `deadline`, `cancelled`, ...
    pub outcome: String,
    /// Time the job waited for admission to the whole graph (`serve --monolithic` runs one job
    /// at a time); 0 otherwise.
    pub graph_wait_ms: f64,
    /// Job completion time.
    pub jct_ms: f64,
    /// First client-visible output (text token, image or audio).
    pub first_output_ms: Option<f64>,
    /// First audio packet (time to first packet, TTFP).
    pub first_audio_ms: Option<f64>,
    /// Seconds of audio produced, and job time ÷ audio duration (real-time factor).
    pub audio_seconds: Option<f64>,
    pub real_time_factor: Option<f64>,
    pub stages: Vec<StageTrace>,
    pub edges: Vec<EdgeTrace>,
    /// Which experts ran the job, where a router chose them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<RouteTrace>,
}

/// Builds a job's trace while it runs.
pub struct TraceBuilder {
    started: Instant,
    trace: JobTrace,
}

impl TraceBuilder {
    pub fn new(id: u64, outputs: Vec<String>, started: Instant) -> Self {
        Self {
            started,
            trace: JobTrace {
                id,
                started_unix_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64() * 1e3),
                outputs,
                outcome: String::new(),
                graph_wait_ms: 0.0,
                jct_ms: 0.0,
                first_output_ms: None,
                first_audio_ms: None,
                audio_seconds: None,
                real_time_factor: None,
                stages: Vec::new(),
                edges: Vec::new(),
                route: None,
            },
        }
    }

    fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1e3
    }

    fn stage(&mut self, stage: &str) -> Option<&mut StageTrace> {
        self.trace
            .stages
            .iter_mut()
            .rev()
            .find(|s| s.stage == stage)
    }

    pub fn routed(&mut self, router: &str, decision: &omnistage_stages::RouteDecision) {
        self.trace.route = Some(RouteTrace {
            router: router.to_string(),
            selected: decision.selected.clone(),
            scores: decision.scores.clone(),
            reason: decision.reason.clone(),
        });
    }

    pub fn graph_admitted(&mut self) {
        self.trace.graph_wait_ms = self.now();
    }

    pub fn submitted(&mut self, stage: &str) {
        let now = self.now();
        self.trace.stages.push(StageTrace {
            stage: stage.to_string(),
            submitted_ms: now,
            admitted_ms: None,
            first_output_ms: None,
            finished_ms: None,
            queue_wait_ms: None,
            compute_ms: None,
            retried_after: None,
        });
    }

    /// The stage's current attempt ended with `why`; a retry follows ([`TraceBuilder::submitted`]).
    pub fn retried(&mut self, stage: &str, why: &str) {
        if let Some(s) = self.stage(stage) {
            s.retried_after = Some(why.to_string());
        }
    }

    pub fn admitted(&mut self, stage: &str) {
        let now = self.now();
        if let Some(s) = self.stage(stage) {
            s.admitted_ms.get_or_insert(now);
            s.queue_wait_ms = Some(now - s.submitted_ms);
        }
    }

    pub fn output(&mut self, stage: &str) {
        let now = self.now();
        if let Some(s) = self.stage(stage) {
            s.first_output_ms.get_or_insert(now);
        }
    }

    pub fn client_output(&mut self) {
        let now = self.now();
        self.trace.first_output_ms.get_or_insert(now);
    }

    pub fn finished(&mut self, stage: &str) {
        let now = self.now();
        if let Some(s) = self.stage(stage) {
            s.finished_ms = Some(now);
            s.compute_ms = s.admitted_ms.map(|a| now - a);
        }
    }

    pub fn first_audio(&mut self) {
        let now = self.now();
        self.trace.first_audio_ms.get_or_insert(now);
    }

    pub fn audio(&mut self, seconds: f64, real_time_factor: Option<f64>) {
        self.trace.audio_seconds = Some(seconds);
        self.trace.real_time_factor = real_time_factor;
    }

    fn edge(&mut self, edge: &str) -> &mut EdgeTrace {
        let at = match self.trace.edges.iter().position(|e| e.edge == edge) {
            Some(at) => at,
            None => {
                self.trace.edges.push(EdgeTrace {
                    edge: edge.to_string(),
                    chunks: 0,
                    holds: 0,
                    bytes: 0,
                    transfer_ms: 0.0,
                });
                self.trace.edges.len() - 1
            }
        };
        &mut self.trace.edges[at]
    }

    pub fn transfer(&mut self, edge: &str, bytes: usize, seconds: f64) {
        let e = self.edge(edge);
        e.chunks += 1;
        e.bytes += bytes;
        e.transfer_ms += seconds * 1e3;
    }

    pub fn held(&mut self, edge: &str) {
        self.edge(edge).holds += 1;
    }

    pub fn finish(mut self, outcome: &str) -> JobTrace {
        self.trace.outcome = outcome.to_string();
        self.trace.jct_ms = self.now();
        self.trace
    }
}

/// The most recent traces, by job id.
#[derive(Default)]
pub struct TraceStore {
    inner: Mutex<(HashMap<u64, JobTrace>, VecDeque<u64>)>,
}

impl TraceStore {
    pub fn insert(&self, trace: JobTrace) {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (map, order) = &mut *guard;
        if map.insert(trace.id, trace.clone()).is_none() {
            order.push_back(trace.id);
        }
        while order.len() > TRACE_CAPACITY {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
    }

    pub fn get(&self, id: u64) -> Option<JobTrace> {
        let guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        guard.0.get(&id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breakdown_and_bounded_store() {
        let mut b = TraceBuilder::new(7, vec!["text".into()], Instant::now());
        b.submitted("a");
        b.admitted("a");
        b.output("a");
        b.finished("a");
        b.transfer("a->b", 12, 0.001);
        let t = b.finish("ok");
        let s = &t.stages[0];
        assert!(s.queue_wait_ms.unwrap() >= 0.0 && s.compute_ms.unwrap() >= 0.0);
        assert_eq!((t.edges[0].bytes, t.outcome.as_str()), (12, "ok"));
        let store = TraceStore::default();
        for id in 0..(TRACE_CAPACITY as u64 + 5) {
            store.insert(JobTrace { id, ..t.clone() });
        }
        assert!(store.get(0).is_none(), "oldest dropped");
        assert_eq!(
            store.get(TRACE_CAPACITY as u64 + 4).map(|t| t.id),
            Some(TRACE_CAPACITY as u64 + 4)
        );
    }
}
