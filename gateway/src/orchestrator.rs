//! Tracks each request across the stage graph: submits it to the stages it needs, forwards
//! payloads along edges, streams final outputs to the client, and owns cancellation, deadlines and
//! failure.
//!
//! Every job is one tokio task. Stage threads push events into that job's channel; the channel is
//! bounded in practice by the job's own output (`max_tokens`), so a slow client never blocks a
//! stage's batch.

use crate::pool::StagePool;
use crate::trace::{TraceBuilder, TraceStore};
use dashmap::DashMap;
use omnistage_connectors::Connector;
use omnistage_stages::deploy::DeployGraph;
use omnistage_stages::{
    EngineError, FinishReason, JobId, JobRequest, Modality, Payload, PayloadKind, RgbImages,
    StageEvent, StageInput, Usage,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// What the client side of a job receives.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    /// New text of the text output (already stop-string safe), with the token ids that produced
    /// it.
    Text { delta: String, token_ids: Vec<u32> },
    /// Generated images of the image output.
    Images(RgbImages),
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
    fn finished(&self, outcome: &str, since_start: std::time::Duration);
    fn transfer(&self, edge: &str, bytes: usize, seconds: f64);
}

/// One edge as the runtime uses it.
pub struct RuntimeEdge {
    pub from: usize,
    pub to: usize,
    pub carries: PayloadKind,
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

    /// Stages the request needs: every ancestor of the stages producing its requested outputs.
    fn plan(&self, outputs: &[Modality]) -> Result<JobPlan, JobError> {
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
        let mut needed = BTreeSet::new();
        let mut todo: Vec<usize> = output_stage.values().copied().collect();
        while let Some(s) = todo.pop() {
            if needed.insert(s) {
                todo.extend(self.edges.iter().filter(|e| e.to == s).map(|e| e.from));
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
        let plan = self.plan(&request.outputs)?;
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

struct JobPlan {
    output_stage: BTreeMap<Modality, usize>,
    needed: BTreeSet<usize>,
    /// Indices of the edges between needed stages.
    edges: Vec<usize>,
}

/// One job's progress through the graph.
struct JobRun {
    orch: Arc<Orchestrator>,
    request: Arc<JobRequest>,
    plan: JobPlan,
    started: Instant,
    /// Stage index → replica holding the job, while it runs there.
    active: HashMap<usize, usize>,
    done: BTreeSet<usize>,
    /// Edge index → pieces gathered from its producer.
    gathered: HashMap<usize, Vec<Payload>>,
    /// Stage index → inputs delivered so far, by edge.
    inbox: HashMap<usize, Vec<(usize, Payload)>>,
    first_output_seen: bool,
    usage: Usage,
    reason: Option<FinishReason>,
    trace: TraceBuilder,
}

impl JobRun {
    fn new(orch: Arc<Orchestrator>, request: Arc<JobRequest>, plan: JobPlan) -> Self {
        let started = Instant::now();
        let outputs = request.outputs.iter().map(|m| m.to_string()).collect();
        Self {
            trace: TraceBuilder::new(request.id.0, outputs, started),
            orch,
            request,
            plan,
            started,
            active: HashMap::new(),
            done: BTreeSet::new(),
            gathered: HashMap::new(),
            inbox: HashMap::new(),
            first_output_seen: false,
            usage: Usage::default(),
            reason: None,
        }
    }

    fn stage_name(&self, s: usize) -> String {
        self.orch.stages[s].id().to_string()
    }

    /// Starts the job at the stages it needs that have no inbound edge.
    fn start_entries(&mut self) -> Result<(), JobError> {
        let entries: Vec<usize> = self
            .plan
            .needed
            .iter()
            .copied()
            .filter(|s| !self.plan.edges.iter().any(|e| self.orch.edges[*e].to == *s))
            .collect();
        for s in entries {
            self.start_stage(s, Vec::new())?;
        }
        Ok(())
    }

    fn start_stage(&mut self, s: usize, upstream: Vec<Payload>) -> Result<(), JobError> {
        self.trace.submitted(self.orch.stages[s].id());
        let client_facing = self.plan.output_stage.values().any(|o| *o == s);
        let input = StageInput {
            request: self.request.clone(),
            upstream,
            client_facing,
            streaming: false,
        };
        let replica = self.orch.stages[s]
            .submit(self.request.id, input)
            .map_err(|e| JobError::Overloaded {
                stage: self.stage_name(s),
                message: e.to_string(),
            })?;
        self.active.insert(s, replica);
        Ok(())
    }

    fn cancel_all(&mut self) {
        for (s, replica) in self.active.drain() {
            self.orch.stages[s].cancel(replica, self.request.id);
        }
    }

    async fn drive(
        mut self,
        mut events: mpsc::UnboundedReceiver<(usize, StageEvent)>,
        client: mpsc::Sender<JobEvent>,
    ) {
        let deadline = tokio::time::Instant::from_std(self.request.deadline);
        // The job's last event goes to the client only after its trace is stored, so a client
        // that asks for the trace as soon as it has the answer finds it.
        let (outcome, last) = loop {
            tokio::select! {
                ev = events.recv() => {
                    let Some((stage, ev)) = ev else { break ("internal", None) };
                    match self.on_event(stage, ev, &client).await {
                        Ok(false) => continue,
                        Ok(true) => {
                            let reason = self.reason.unwrap_or(FinishReason::Stop);
                            break ("ok", Some(JobEvent::Finished { reason, usage: self.usage }));
                        }
                        Err(err) => {
                            let outcome = outcome_label(&err);
                            self.cancel_all();
                            break (outcome, Some(JobEvent::Failed(err)));
                        }
                    }
                }
                _ = client.closed() => {
                    self.cancel_all();
                    break ("cancelled", None);
                }
                _ = tokio::time::sleep_until(deadline) => {
                    self.cancel_all();
                    let budget = self.request.deadline.saturating_duration_since(self.started).as_secs_f64();
                    break ("deadline", Some(JobEvent::Failed(JobError::DeadlineExceeded(budget))));
                }
            }
        };
        self.orch.routes.remove(&self.request.id);
        self.orch.observer.finished(outcome, self.started.elapsed());
        self.orch.traces.insert(self.trace.finish(outcome));
        if let Some(event) = last {
            // A closed client is fine: nobody is waiting any more.
            let _ = client.send(event).await;
        }
    }

    /// Handles one stage event; `Ok(true)` when the job is complete.
    async fn on_event(
        &mut self,
        s: usize,
        ev: StageEvent,
        client: &mpsc::Sender<JobEvent>,
    ) -> Result<bool, JobError> {
        let stage_id = self.orch.stages[s].id().to_string();
        match ev {
            StageEvent::Admitted => {
                self.trace.admitted(&stage_id);
                Ok(false)
            }
            StageEvent::Consumed(_) => Ok(false),
            StageEvent::Output(payloads) => {
                self.trace.output(&stage_id);
                let text_stage = self.plan.output_stage.get(&Modality::Text).copied();
                let image_stage = self.plan.output_stage.get(&Modality::Image).copied();
                let token_ids: Vec<u32> = payloads
                    .iter()
                    .flat_map(|p| match p {
                        Payload::Tokens(t) => t.to_vec(),
                        _ => Vec::new(),
                    })
                    .collect();
                let mut text = String::new();
                for p in payloads {
                    for e in self
                        .plan
                        .edges
                        .iter()
                        .copied()
                        .filter(|e| self.orch.edges[*e].from == s)
                    {
                        if self.orch.edges[e].carries == p.kind() {
                            self.gathered.entry(e).or_default().push(p.clone());
                        }
                    }
                    match (&p, text_stage, image_stage) {
                        (Payload::Text(t), Some(ts), _) if ts == s => text.push_str(t),
                        (Payload::Image(images), _, Some(is)) if is == s => {
                            if !self.first_output_seen {
                                self.first_output_seen = true;
                                self.orch.observer.first_output(self.started.elapsed());
                            }
                            self.trace.client_output();
                            let _ = client.send(JobEvent::Images(images.clone())).await;
                        }
                        _ => {}
                    }
                }
                if text_stage == Some(s) && (!text.is_empty() || !token_ids.is_empty()) {
                    if !self.first_output_seen && !text.is_empty() {
                        self.first_output_seen = true;
                        self.orch.observer.first_output(self.started.elapsed());
                    }
                    if !text.is_empty() {
                        self.trace.client_output();
                    }
                    // A closed client is noticed by the select loop.
                    let _ = client
                        .send(JobEvent::Text {
                            delta: text,
                            token_ids,
                        })
                        .await;
                }
                Ok(false)
            }
            StageEvent::Finished { reason, usage } => {
                self.trace.finished(&stage_id);
                self.active.remove(&s);
                self.done.insert(s);
                if self.plan.output_stage.values().any(|o| *o == s) {
                    self.usage.completion_tokens += usage.completion_tokens;
                    self.reason = Some(match (self.reason, reason) {
                        (Some(FinishReason::Length), _) | (_, FinishReason::Length) => {
                            FinishReason::Length
                        }
                        _ => reason,
                    });
                }
                if !self.plan.edges.iter().any(|e| self.orch.edges[*e].to == s) {
                    self.usage.prompt_tokens += usage.prompt_tokens;
                }
                self.forward_from(s)?;
                let complete = self
                    .plan
                    .output_stage
                    .values()
                    .all(|o| self.done.contains(o));
                Ok(complete)
            }
            StageEvent::Failed(err) => {
                self.active.remove(&s);
                let stage = self.stage_name(s);
                Err(match err {
                    EngineError::InvalidInput(m) => {
                        JobError::InvalidInput(format!("stage `{stage}`: {m}"))
                    }
                    EngineError::Compute(message) => JobError::StageFailed { stage, message },
                })
            }
        }
    }

    /// Delivers a finished stage's gathered outputs along its edges and starts every consumer
    /// whose inputs are now complete.
    fn forward_from(&mut self, s: usize) -> Result<(), JobError> {
        let outgoing: Vec<usize> = self
            .plan
            .edges
            .iter()
            .copied()
            .filter(|e| self.orch.edges[*e].from == s)
            .collect();
        for e in outgoing {
            let edge = &self.orch.edges[e];
            let parts = self.gathered.remove(&e).unwrap_or_default();
            // A stage may legitimately finish with nothing (an LLM that stops at once): that is
            // empty text or no tokens, not a failure.
            let whole = match (parts.is_empty(), edge.carries) {
                (true, PayloadKind::Text) => Some(Payload::Text("".into())),
                (true, PayloadKind::Tokens) => Some(Payload::Tokens(Vec::new().into())),
                _ => Payload::concat(&parts),
            };
            let Some(whole) = whole else {
                return Err(JobError::StageFailed {
                    stage: self.stage_name(s),
                    message: format!("produced no {} for edge {}", edge.carries, edge.label),
                });
            };
            let bytes = whole.byte_len();
            let t0 = Instant::now();
            let delivered = edge
                .connector
                .deliver(whole)
                .map_err(|err| JobError::StageFailed {
                    stage: self.stage_name(edge.to),
                    message: err.to_string(),
                })?;
            let seconds = t0.elapsed().as_secs_f64();
            self.orch.observer.transfer(&edge.label, bytes, seconds);
            self.trace.transfer(&edge.label, bytes, seconds);
            let to = edge.to;
            self.inbox.entry(to).or_default().push((e, delivered));
            let expected = self
                .plan
                .edges
                .iter()
                .filter(|x| self.orch.edges[**x].to == to)
                .count();
            if self.inbox.get(&to).map_or(0, Vec::len) == expected {
                let mut inputs = self.inbox.remove(&to).unwrap_or_default();
                inputs.sort_by_key(|(edge, _)| *edge);
                self.start_stage(to, inputs.into_iter().map(|(_, p)| p).collect())?;
            }
        }
        Ok(())
    }
}

fn outcome_label(err: &JobError) -> &'static str {
    match err {
        JobError::InvalidInput(_) | JobError::UnsupportedOutput(_) => "invalid_input",
        JobError::Overloaded { .. } => "overloaded",
        JobError::StageFailed { .. } => "stage_failed",
        JobError::DeadlineExceeded(_) => "deadline",
    }
}
