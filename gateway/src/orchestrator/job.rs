//! One job's run through the graph: starts stages when their inputs are ready, moves payloads
//! along edges (whole, or chunk by chunk on streamed edges with a bounded buffer), sends final
//! outputs to the client, and ends the job on completion, failure, cancellation or deadline.

mod edges;
mod retry;
mod route;

use super::flow::EdgeFlow;
use super::{JobError, JobEvent, Orchestrator};
use crate::trace::TraceBuilder;
use omnistage_scheduler::SubmitError;
use omnistage_stages::{
    EngineError, FinishReason, JobRequest, Modality, Payload, PayloadKind, StageEvent, StageInput,
    Usage,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// The stages and edges one request needs.
pub(super) struct JobPlan {
    pub output_stage: BTreeMap<Modality, usize>,
    pub needed: BTreeSet<usize>,
    /// Indices of the edges between needed stages.
    pub edges: Vec<usize>,
}

/// One job's progress through the graph.
pub(super) struct JobRun {
    orch: Arc<Orchestrator>,
    pub request: Arc<JobRequest>,
    plan: JobPlan,
    pub started: Instant,
    /// Stage index → replica holding the job, while it runs there.
    active: HashMap<usize, usize>,
    done: BTreeSet<usize>,
    /// Non-streamed edge index → pieces gathered from its producer.
    gathered: HashMap<usize, Vec<Payload>>,
    /// Streamed edge index → its flow.
    flows: HashMap<usize, EdgeFlow>,
    /// Stage index → inputs delivered before it started, by edge.
    inbox: HashMap<usize, Vec<(usize, Payload)>>,
    first_output_seen: bool,
    first_audio_ms: Option<f64>,
    audio_samples: usize,
    audio_rate: u32,
    usage: Usage,
    reason: Option<FinishReason>,
    pub trace: TraceBuilder,
    /// A router has decided for this job.
    routed: bool,
    /// Mixture-of-Thoughts exchange, when the router selected collaborating experts.
    mot: Option<route::MotExchange>,
    /// Stage index → what it was given, while it runs in a worker process, has produced nothing
    /// and was not retried yet (see [`retry`]).
    attempts: HashMap<usize, retry::Attempt>,
}

impl JobRun {
    pub fn new(orch: Arc<Orchestrator>, request: Arc<JobRequest>, plan: JobPlan) -> Self {
        let started = Instant::now();
        let outputs = request.outputs.iter().map(|m| m.to_string()).collect();
        let flows = plan
            .edges
            .iter()
            .filter_map(|e| Some((*e, EdgeFlow::new(orch.edges[*e].stream?))))
            .collect();
        Self {
            trace: TraceBuilder::new(request.id.0, outputs, started),
            orch,
            request,
            plan,
            started,
            active: HashMap::new(),
            done: BTreeSet::new(),
            gathered: HashMap::new(),
            flows,
            inbox: HashMap::new(),
            first_output_seen: false,
            first_audio_ms: None,
            audio_samples: 0,
            audio_rate: 0,
            usage: Usage::default(),
            reason: None,
            routed: false,
            mot: None,
            attempts: HashMap::new(),
        }
    }

    fn stage_name(&self, s: usize) -> String {
        self.orch.stages[s].id().to_string()
    }

    fn edges_from(&self, s: usize) -> Vec<usize> {
        self.plan
            .edges
            .iter()
            .copied()
            .filter(|e| self.orch.edges[*e].from == s)
            .collect()
    }

    fn edges_into(&self, s: usize) -> Vec<usize> {
        self.plan
            .edges
            .iter()
            .copied()
            .filter(|e| self.orch.edges[*e].to == s)
            .collect()
    }

    /// Starts the job at the stages it needs that have no inbound edge.
    pub fn start_entries(&mut self) -> Result<(), JobError> {
        let entries: Vec<usize> = self
            .plan
            .needed
            .iter()
            .copied()
            .filter(|s| self.edges_into(*s).is_empty())
            .collect();
        for s in entries {
            self.start_stage(s, Vec::new(), false)?;
        }
        Ok(())
    }

    fn start_stage(
        &mut self,
        s: usize,
        upstream: Vec<Payload>,
        streaming: bool,
    ) -> Result<(), JobError> {
        self.trace.submitted(self.orch.stages[s].id());
        let client_facing = self.plan.output_stage.values().any(|o| *o == s);
        let input = StageInput {
            request: self.request.clone(),
            upstream,
            client_facing,
            streaming,
        };
        // Kept for a retry where the stage runs in workers (in-process replicas never vanish).
        let attempt = self.orch.stages[s]
            .has_workers()
            .then(|| retry::Attempt::new(input.clone()));
        let replica = self.orch.stages[s]
            .submit(self.request.id, input)
            .map_err(|e| match e {
                // A stopped stage (a worker being restarted) is unavailable, not overloaded.
                SubmitError::Stopped { .. } => JobError::Unavailable {
                    stage: self.stage_name(s),
                    message: e.to_string(),
                },
                SubmitError::QueueFull { .. } => JobError::Overloaded {
                    stage: self.stage_name(s),
                    message: e.to_string(),
                },
            })?;
        self.active.insert(s, replica);
        if let Some(attempt) = attempt {
            self.attempts.insert(s, attempt);
        }
        Ok(())
    }

    pub fn cancel_all(&mut self) {
        for (s, replica) in self.active.drain() {
            self.orch.stages[s].cancel(replica, self.request.id);
        }
    }

    pub async fn drive(
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
        let elapsed = self.started.elapsed();
        if outcome == "ok" && self.plan.output_stage.contains_key(&Modality::Audio) {
            let seconds = if self.audio_rate == 0 {
                0.0
            } else {
                self.audio_samples as f64 / f64::from(self.audio_rate)
            };
            let rtf = (seconds > 0.0).then(|| elapsed.as_secs_f64() / seconds);
            self.orch.observer.audio_done(seconds, rtf);
            self.trace.audio(seconds, rtf);
        }
        self.orch.observer.finished(outcome, elapsed);
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
            StageEvent::Consumed(units) => {
                self.on_consumed(s, units);
                Ok(false)
            }
            StageEvent::Output(payloads) => {
                self.trace.output(&stage_id);
                self.note_produced(s);
                self.on_output(s, payloads, client).await?;
                Ok(false)
            }
            StageEvent::Finished { reason, usage } => {
                self.trace.finished(&stage_id);
                self.active.remove(&s);
                self.note_produced(s);
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
                // The prompt is counted where it enters the graph: at stages whose only inputs
                // (if any) are encoded media, which become part of their prompt.
                // Experts a router selected read the request themselves: the primary counts.
                let entry = self.edges_into(s).iter().all(|e| {
                    matches!(
                        self.orch.edges[*e].carries,
                        PayloadKind::MediaEmbeddings | PayloadKind::Route
                    )
                });
                if entry {
                    self.usage.prompt_tokens += usage.prompt_tokens;
                }
                self.mot_peer_finished(s);
                self.release_producers_of(s);
                self.forward_from(s)?;
                let complete = self
                    .plan
                    .output_stage
                    .values()
                    .all(|o| self.done.contains(o));
                Ok(complete)
            }
            StageEvent::Failed(EngineError::Unavailable(why)) if self.may_retry(s) => {
                self.active.remove(&s);
                self.retry_unavailable(s, why)?;
                Ok(false)
            }
            StageEvent::Failed(err) => {
                self.active.remove(&s);
                self.attempts.remove(&s);
                let stage = self.stage_name(s);
                Err(match err {
                    EngineError::InvalidInput(m) => {
                        JobError::InvalidInput(format!("stage `{stage}`: {m}"))
                    }
                    EngineError::Compute(message) => JobError::StageFailed { stage, message },
                    EngineError::Unavailable(message) => JobError::Unavailable { stage, message },
                })
            }
        }
    }

    /// Routes a stage's output to its outbound edges and, for an output stage, to the client.
    async fn on_output(
        &mut self,
        s: usize,
        payloads: Vec<Payload>,
        client: &mpsc::Sender<JobEvent>,
    ) -> Result<(), JobError> {
        let mut payloads = payloads;
        if self.orch.is_router(s) {
            for p in &payloads {
                if let Payload::Route(decision) = p {
                    self.on_route(s, decision.clone())?;
                }
            }
        }
        if payloads.iter().any(|p| matches!(p, Payload::MotStates(_))) {
            let (states, rest): (Vec<_>, Vec<_>) = payloads
                .into_iter()
                .partition(|p| matches!(p, Payload::MotStates(_)));
            for p in states {
                if let Payload::MotStates(m) = p {
                    self.on_mot_states(s, m)?;
                }
            }
            payloads = rest;
        }
        let text_stage = self.plan.output_stage.get(&Modality::Text).copied();
        let image_stage = self.plan.output_stage.get(&Modality::Image).copied();
        let audio_stage = self.plan.output_stage.get(&Modality::Audio).copied();
        let token_ids: Vec<u32> = payloads
            .iter()
            .flat_map(|p| match p {
                Payload::Tokens(t) => t.to_vec(),
                _ => Vec::new(),
            })
            .collect();
        let mut text = String::new();
        let outgoing = self.edges_from(s);
        let mut streamed = Vec::new();
        for p in payloads {
            for &e in &outgoing {
                if self.orch.edges[e].carries != p.kind() {
                    continue;
                }
                match self.flows.get_mut(&e) {
                    Some(flow) => {
                        flow.gather(p.clone());
                        if !streamed.contains(&e) {
                            streamed.push(e);
                        }
                    }
                    None => self.gathered.entry(e).or_default().push(p.clone()),
                }
            }
            match p {
                Payload::Text(t) if text_stage == Some(s) => text.push_str(&t),
                Payload::Image(images) if image_stage == Some(s) => {
                    self.note_first_output();
                    let _ = client.send(JobEvent::Images(images)).await;
                }
                Payload::Pcm(pcm) if audio_stage == Some(s) => {
                    if pcm.samples.is_empty() {
                        continue;
                    }
                    if self.first_audio_ms.is_none() {
                        let since = self.started.elapsed();
                        self.first_audio_ms = Some(since.as_secs_f64() * 1e3);
                        self.orch.observer.first_audio(since);
                        self.trace.first_audio();
                    }
                    self.note_first_output();
                    self.audio_samples += pcm.samples.len();
                    self.audio_rate = pcm.sample_rate;
                    let _ = client.send(JobEvent::Audio(pcm)).await;
                }
                _ => {}
            }
        }
        for e in streamed {
            self.send_chunks(e)?;
        }
        if text_stage == Some(s) && (!text.is_empty() || !token_ids.is_empty()) {
            if !text.is_empty() {
                self.note_first_output();
            }
            // A closed client is noticed by the select loop.
            let _ = client
                .send(JobEvent::Text {
                    delta: text,
                    token_ids,
                })
                .await;
        }
        Ok(())
    }

    fn note_first_output(&mut self) {
        if !self.first_output_seen {
            self.first_output_seen = true;
            self.orch.observer.first_output(self.started.elapsed());
        }
        self.trace.client_output();
    }
}

pub(super) fn outcome_label(err: &JobError) -> &'static str {
    match err {
        JobError::InvalidInput(_) | JobError::UnsupportedOutput(_) => "invalid_input",
        JobError::Overloaded { .. } => "overloaded",
        JobError::StageFailed { .. } => "stage_failed",
        JobError::Unavailable { .. } => "unavailable",
        JobError::DeadlineExceeded(_) => "deadline",
    }
}
