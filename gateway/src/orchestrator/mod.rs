//! Tracks each request across the stage graph: submits it to the stages it needs, forwards
//! payloads along edges, streams final outputs to the client, and owns cancellation, deadlines and
//! failure.
//!
//! Every job is one tokio task. Stage threads push events into that job's channel; the channel is
//! bounded in practice by the job's own output (`max_tokens`), so a slow client never blocks a
//! stage's batch.

mod flow;
mod job;

use crate::pool::StagePool;
use crate::trace::TraceStore;
use dashmap::DashMap;
use job::{outcome_label, JobPlan, JobRun};
use omnistage_connectors::Connector;
use omnistage_stages::deploy::{DeployGraph, StageKind, StreamSpec};
use omnistage_stages::{
    FinishReason, JobId, JobRequest, Modality, PayloadKind, PcmAudio, RgbImages, RouteDecision,
    StageEvent, Usage,
};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

/// What the client side of a job receives.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    /// New text of the text output (already stop-string safe), with the token ids that produced
    /// it.
    Text { delta: String, token_ids: Vec<u32> },
    /// Generated images of the image output.
    Images(RgbImages),
    /// The next piece of the audio output, as the codec decodes it.
    Audio(PcmAudio),
    /// Every requested output is complete.
    Finished { reason: FinishReason, usage: Usage },
    /// The job failed; nothing more follows.
    Failed(JobError),
}

/// Why a job failed, mapped to an HTTP status by the gateway.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobError {
    #[error("{0}")]
    InvalidInput(String),
    #[error("stage `{stage}` is overloaded: {message}")]
    Overloaded { stage: String, message: String },
    #[error("stage `{stage}` failed: {message}")]
    StageFailed { stage: String, message: String },
    /// The stage could not be reached (its worker process died); retrying later may succeed.
    #[error("stage `{stage}` is unavailable: {message}")]
    Unavailable { stage: String, message: String },
    #[error("the request exceeded its deadline of {0:.1} s")]
    DeadlineExceeded(f64),
    #[error("this deployment cannot produce {0}: no stage in its [outputs] makes it")]
    UnsupportedOutput(Modality),
}

/// Where stage threads deliver events: job id → that job's channel.
pub type EventRoutes = Arc<DashMap<JobId, mpsc::UnboundedSender<(usize, StageEvent)>>>;

/// Notified of request-level facts (implemented with Prometheus by the gateway).
pub trait JobObserver: Send + Sync {
    fn first_output(&self, since_start: std::time::Duration);
    /// The first audio packet reached the client (time to first packet, TTFP).
    fn first_audio(&self, since_start: std::time::Duration);
    /// A job with an audio output finished: seconds of audio it produced and its real-time
    /// factor (job time ÷ audio duration).
    fn audio_done(&self, audio_seconds: f64, real_time_factor: Option<f64>);
    fn finished(&self, outcome: &str, since_start: std::time::Duration);
    /// One delivery (a whole payload, or one chunk of a streamed edge).
    fn transfer(&self, edge: &str, bytes: usize, seconds: f64);
    /// A producer was held back: its consumer on this streamed edge has a full buffer.
    fn held(&self, edge: &str);
    /// A job was resubmitted to another replica of `stage`: its replica became unavailable
    /// before the job produced anything there.
    fn retried(&self, stage: &str);
    /// A router decided which experts run a job.
    fn routed(&self, router: &str, decision: &RouteDecision);
}

/// One edge as the runtime uses it.
pub struct RuntimeEdge {
    pub from: usize,
    pub to: usize,
    pub carries: PayloadKind,
    /// Delivered in chunks while the producer runs (`None`: whole, when it finishes).
    pub stream: Option<StreamSpec>,
    pub label: String,
    pub connector: Box<dyn Connector>,
}

/// Admits one job at a time to the whole graph (`serve --monolithic`): the baseline of a single
/// sequential pipeline. Jobs waiting for their turn are bounded.
struct Gate {
    turn: Arc<tokio::sync::Semaphore>,
    waiting: AtomicUsize,
    max_waiting: usize,
}

/// The live graph: stage pools by index, edges, and outputs.
pub struct Orchestrator {
    pub graph: DeployGraph,
    stages: Vec<StagePool>,
    edges: Vec<RuntimeEdge>,
    routes: EventRoutes,
    observer: Arc<dyn JobObserver>,
    next_id: AtomicU64,
    gate: Option<Gate>,
    /// Traces of recent jobs.
    pub traces: TraceStore,
}

impl Orchestrator {
    pub fn new(
        graph: DeployGraph,
        stages: Vec<StagePool>,
        edges: Vec<RuntimeEdge>,
        routes: EventRoutes,
        observer: Arc<dyn JobObserver>,
    ) -> Self {
        Self {
            graph,
            stages,
            edges,
            routes,
            observer,
            next_id: AtomicU64::new(1),
            gate: None,
            traces: TraceStore::default(),
        }
    }

    /// Runs one job at a time through the graph; at most `max_waiting` more wait their turn
    /// (beyond that, submits fail as overloaded).
    pub fn one_job_at_a_time(mut self, max_waiting: usize) -> Self {
        self.gate = Some(Gate {
            turn: Arc::new(tokio::sync::Semaphore::new(1)),
            waiting: AtomicUsize::new(0),
            max_waiting,
        });
        self
    }

    pub fn stages(&self) -> &[StagePool] {
        &self.stages
    }

    /// A fresh job id.
    pub fn next_job_id(&self) -> JobId {
        JobId(self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    fn stage_index(&self, id: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.id() == id)
    }

    /// Whether stage `s` is a router.
    fn is_router(&self, s: usize) -> bool {
        self.graph
            .stage(self.stages[s].id())
            .is_some_and(|spec| spec.kind == StageKind::Router)
    }

    /// Stages the request needs: every ancestor of the stages producing its requested outputs,
    /// except media encoders with nothing of the request to encode (a text-only chat starts at
    /// the LLM).
    fn plan(&self, request: &JobRequest) -> Result<JobPlan, JobError> {
        let outputs = &request.outputs;
        let mut output_stage = BTreeMap::new();
        for m in outputs {
            let stage = self
                .graph
                .output_stage(*m)
                .ok_or(JobError::UnsupportedOutput(*m))?;
            let idx = self
                .stage_index(&stage.id)
                .ok_or(JobError::UnsupportedOutput(*m))?;
            output_stage.insert(*m, idx);
        }
        let carried: BTreeSet<Modality> = request.media.iter().map(|m| m.modality()).collect();
        let idle_encoder = |s: usize| {
            let spec = self.graph.stage(self.stages[s].id());
            spec.is_some_and(|spec| {
                spec.kind == StageKind::Encoder
                    && spec.encoder.encodes != Modality::Text
                    && !carried.contains(&spec.encoder.encodes)
            })
        };
        let mut needed = BTreeSet::new();
        let mut todo: Vec<usize> = output_stage.values().copied().collect();
        while let Some(s) = todo.pop() {
            if !idle_encoder(s) && needed.insert(s) {
                todo.extend(self.edges.iter().filter(|e| e.to == s).map(|e| e.from));
            }
        }
        for m in carried {
            let encoded = needed.iter().any(|s| {
                self.graph.stage(self.stages[*s].id()).is_some_and(|spec| {
                    spec.kind == StageKind::Encoder && spec.encoder.encodes == m
                })
            });
            if !encoded {
                return Err(JobError::InvalidInput(format!(
                    "the request carries {m} input, but no stage on the way to its outputs encodes {m}"
                )));
            }
        }
        let edges: Vec<usize> = (0..self.edges.len())
            .filter(|i| {
                needed.contains(&self.edges[*i].from) && needed.contains(&self.edges[*i].to)
            })
            .collect();
        Ok(JobPlan {
            output_stage,
            needed,
            edges,
        })
    }

    /// Starts a job. Fails at once (no task spawned) when an entry stage's queue is full or an
    /// output cannot be produced; later failures arrive as [`JobEvent::Failed`].
    pub fn submit(self: &Arc<Self>, request: JobRequest) -> Result<JobStream, JobError> {
        let plan = self.plan(&request)?;
        let request = Arc::new(request);
        let job = request.id;
        let (event_tx, event_rx) = mpsc::unbounded_channel();
        self.routes.insert(job, event_tx);
        let mut run = JobRun::new(self.clone(), request.clone(), plan);
        let (client_tx, client_rx) = mpsc::channel(64);
        let stream = JobStream {
            id: job,
            events: client_rx,
        };
        let Some(gate) = &self.gate else {
            if let Err(e) = run.start_entries() {
                run.cancel_all();
                self.routes.remove(&job);
                return Err(e);
            }
            tokio::spawn(run.drive(event_rx, client_tx));
            return Ok(stream);
        };
        if gate.waiting.fetch_add(1, Ordering::SeqCst) >= gate.max_waiting {
            gate.waiting.fetch_sub(1, Ordering::SeqCst);
            self.routes.remove(&job);
            return Err(JobError::Overloaded {
                stage: "graph".into(),
                message: format!(
                    "one job runs at a time and {} already wait their turn",
                    gate.max_waiting
                ),
            });
        }
        let turn = gate.turn.clone();
        let orch = self.clone();
        tokio::spawn(async move {
            let permit = turn.acquire_owned().await;
            if let Some(gate) = &orch.gate {
                gate.waiting.fetch_sub(1, Ordering::SeqCst);
            }
            run.trace.graph_admitted();
            if let Err(e) = run.start_entries() {
                run.cancel_all();
                orch.routes.remove(&job);
                orch.observer
                    .finished(outcome_label(&e), run.started.elapsed());
                let _ = client_tx.send(JobEvent::Failed(e)).await;
                return;
            }
            run.drive(event_rx, client_tx).await;
            drop(permit);
        });
        Ok(stream)
    }
}

/// The client's end of a job; dropping it cancels the job everywhere.
pub struct JobStream {
    pub id: JobId,
    events: mpsc::Receiver<JobEvent>,
}

impl JobStream {
    pub async fn next(&mut self) -> Option<JobEvent> {
        self.events.recv().await
    }
}
