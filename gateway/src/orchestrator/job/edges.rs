//! Moving a job's payloads along its edges: whole deliveries, chunks of streamed edges with
//! their credit, and starting each consumer once its inputs are here.

use super::JobRun;
use crate::orchestrator::JobError;
use omnistage_stages::{CodecFrames, Payload, PayloadKind};
use std::time::Instant;

impl JobRun {
    /// Moves one payload across edge `e` through its connector, with transfer metrics.
    pub(super) fn transfer(&mut self, e: usize, whole: Payload) -> Result<Payload, JobError> {
        let edge = &self.orch.edges[e];
        let bytes = whole.byte_len();
        let t0 = Instant::now();
        let delivered = edge
            .connector
            .deliver(whole)
            .map_err(|err| JobError::StageFailed {
                stage: self.orch.stages[edge.to].id().to_string(),
                message: err.to_string(),
            })?;
        let seconds = t0.elapsed().as_secs_f64();
        self.orch.observer.transfer(&edge.label, bytes, seconds);
        self.trace.transfer(&edge.label, bytes, seconds);
        Ok(delivered)
    }

    /// Sends every whole chunk gathered on streamed edge `e` (and the close, once its producer
    /// finished): fed to a running consumer, or kept for its start.
    pub(super) fn send_chunks(&mut self, e: usize) -> Result<(), JobError> {
        let to = self.orch.edges[e].to;
        loop {
            let Some(flow) = self.flows.get_mut(&e) else {
                return Ok(());
            };
            let chunk = flow.take_chunk();
            let closing = flow.closed && !flow.close_sent;
            let Some(pieces) = chunk.or_else(|| closing.then(Vec::new)) else {
                break;
            };
            let last = flow.closed;
            if last {
                flow.close_sent = true;
            }
            let delivered = match Payload::concat(&pieces) {
                Some(whole) => vec![self.transfer(e, whole)?],
                None if pieces.is_empty() => Vec::new(),
                None => {
                    return Err(JobError::StageFailed {
                        stage: self.stage_name(self.orch.edges[e].from),
                        message: format!(
                            "produced pieces that do not join on edge {}",
                            self.orch.edges[e].label
                        ),
                    })
                }
            };
            if let Some(&replica) = self.active.get(&to) {
                self.note_fed(to, &delivered, last);
                self.orch.stages[to].feed(replica, self.request.id, delivered, last);
            } else if !self.done.contains(&to) {
                self.deliver_to_inbox(e, delivered)?;
            }
            if last {
                break;
            }
        }
        self.apply_credit(e);
        Ok(())
    }

    /// Keeps input for a stage that has not started; starts it once every inbound edge has
    /// delivered (a streamed edge counts once its first chunk is here).
    pub(super) fn deliver_to_inbox(
        &mut self,
        e: usize,
        delivered: Vec<Payload>,
    ) -> Result<(), JobError> {
        let to = self.orch.edges[e].to;
        let inbox = self.inbox.entry(to).or_default();
        for p in delivered {
            match inbox.iter_mut().find(|(edge, _)| *edge == e) {
                Some((_, held)) => {
                    if let Some(joined) = Payload::concat(&[held.clone(), p]) {
                        *held = joined;
                    }
                }
                None => inbox.push((e, p)),
            }
        }
        let into = self.edges_into(to);
        let inbox = self.inbox.get(&to).map_or(&[][..], Vec::as_slice);
        let all_here = into.iter().all(|x| inbox.iter().any(|(edge, _)| edge == x));
        if !all_here {
            return Ok(());
        }
        let mut inputs = self.inbox.remove(&to).unwrap_or_default();
        inputs.sort_by_key(|(edge, _)| *edge);
        let streaming = self.is_mot_primary(to)
            || into
                .iter()
                .any(|x| self.flows.get(x).is_some_and(|f| !f.close_sent));
        self.start_stage(to, inputs.into_iter().map(|(_, p)| p).collect(), streaming)
    }

    /// Holds or releases the producer of streamed edge `e` on the edge's credit.
    pub(super) fn apply_credit(&mut self, e: usize) {
        let from = self.orch.edges[e].from;
        let to = self.orch.edges[e].to;
        let Some(flow) = self.flows.get_mut(&e) else {
            return;
        };
        let hold = flow.over_budget() && !self.done.contains(&to);
        if hold == flow.holding {
            return;
        }
        flow.holding = hold;
        if hold {
            let label = &self.orch.edges[e].label;
            self.trace.held(label);
            self.orch.observer.held(label);
        }
        if let Some(&replica) = self.active.get(&from) {
            self.orch.stages[from].hold(replica, self.request.id, hold);
        }
    }

    /// Credits what consumer `s` used to its streamed inbound edge.
    pub(super) fn on_consumed(&mut self, s: usize, units: usize) {
        let Some(e) = self
            .edges_into(s)
            .into_iter()
            .find(|e| self.flows.contains_key(e))
        else {
            return;
        };
        if let Some(flow) = self.flows.get_mut(&e) {
            flow.consumed(units);
        }
        self.apply_credit(e);
    }

    /// A consumer that finished needs nothing more: release producers held on its credit.
    pub(super) fn release_producers_of(&mut self, s: usize) {
        for e in self.edges_into(s) {
            self.apply_credit(e);
        }
    }

    /// Delivers a finished stage's outputs: whole payloads on plain edges, the last chunk and
    /// the close on streamed ones; starts every consumer whose inputs are now complete.
    pub(super) fn forward_from(&mut self, s: usize) -> Result<(), JobError> {
        for e in self.edges_from(s) {
            if let Some(flow) = self.flows.get_mut(&e) {
                flow.closed = true;
                if flow.sent_any() || !self.inbox_lacks(e) {
                    self.send_chunks(e)?;
                    continue;
                }
                // Nothing was streamed: deliver as a plain edge would.
            }
            let edge = &self.orch.edges[e];
            let parts = match self.flows.get_mut(&e) {
                Some(flow) => {
                    flow.close_sent = true;
                    flow.take_chunk().unwrap_or_default()
                }
                None => self.gathered.remove(&e).unwrap_or_default(),
            };
            // A stage may legitimately finish with nothing (an LLM that stops at once, a talker
            // that ends before a whole frame): empty text, tokens or codes, not a failure.
            let whole = match (parts.is_empty(), edge.carries) {
                (true, PayloadKind::Text) => Some(Payload::Text("".into())),
                (true, PayloadKind::Tokens) => Some(Payload::Tokens(Vec::new().into())),
                (true, PayloadKind::Codes) => Some(Payload::Codes(CodecFrames {
                    codes: Vec::new().into(),
                    frames: 0,
                    codes_per_frame: 0,
                })),
                _ => Payload::concat(&parts),
            };
            let Some(whole) = whole else {
                return Err(JobError::StageFailed {
                    stage: self.stage_name(s),
                    message: format!("produced no {} for edge {}", edge.carries, edge.label),
                });
            };
            let delivered = self.transfer(e, whole)?;
            self.deliver_to_inbox(e, vec![delivered])?;
        }
        Ok(())
    }

    /// Whether edge `e`'s consumer has nothing from it yet.
    pub(super) fn inbox_lacks(&self, e: usize) -> bool {
        let to = self.orch.edges[e].to;
        !self
            .inbox
            .get(&to)
            .is_some_and(|i| i.iter().any(|(edge, _)| *edge == e))
    }
}
