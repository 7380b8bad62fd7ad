//! The compute of one step for one job: a peer's stack, a primary's prompt stacks, and a
//! primary's sampled token (after its prompt pass, or one decode step).

use candle_core::Tensor;
use omnistage_stages::{EngineError, FinishReason, HiddenStates, MotStates, Payload, StageEvent};

use super::job::{PeerJob, PrimaryJob};
use super::MotExpertEngine;
use crate::mot::MotError;

impl MotExpertEngine {
    /// Runs a peer's next stack; returns its projected states and whether it was the last.
    pub(super) fn peer_stack(&self, p: &mut PeerJob) -> Result<(Payload, bool), MotError> {
        let q = p.next_stack;
        let Some(layers) = self.stacks.get(q).cloned() else {
            return Err(MotError::Input(format!("peer has no stack {q}")));
        };
        let hidden = match p.hidden.take() {
            Some(h) => h,
            None => self.model.embed(&p.tokens)?,
        };
        let hidden = self.model.forward_layers(&hidden, layers, &mut p.cache)?;
        let states = self.interaction.project_out(self.expert, q, &hidden)?;
        let dim = states.dim(1)?;
        let data = states.flatten_all()?.to_vec1::<f32>()?;
        p.next_stack += 1;
        let last = p.next_stack == self.num_stacks();
        p.hidden = (!last).then_some(hidden);
        let payload = Payload::MotStates(MotStates {
            stack: q,
            expert: self.expert,
            states: HiddenStates::new(data, dim),
        });
        Ok((payload, last))
    }

    /// Runs the layers of a primary's prompt stack `p.next_stack`: they need nothing from the
    /// peers, so they run while the peers compute theirs.
    pub(super) fn primary_layers(&self, p: &mut PrimaryJob) -> Result<(), MotError> {
        let q = p.next_stack;
        let Some(layers) = self.stacks.get(q).cloned() else {
            return Err(MotError::Input(format!("primary has no stack {q}")));
        };
        let hidden = match p.hidden.take() {
            Some(h) => h,
            None => self.model.embed(&p.tokens[..p.prompt_len])?,
        };
        p.hidden = Some(self.model.forward_layers(&hidden, layers, &mut p.cache)?);
        p.layers_done = true;
        Ok(())
    }

    /// The interaction layer closing a primary's prompt stack `p.next_stack` (its layers done),
    /// with the peers' states it has.
    pub(super) fn primary_interact(&self, p: &mut PrimaryJob) -> Result<(), MotError> {
        let q = p.next_stack;
        let Some(hidden) = p.hidden.take() else {
            return Err(MotError::Input(format!("stack {q}'s layers have not run")));
        };
        let mut chunks = std::mem::take(&mut p.inbox[q]);
        chunks.sort_by_key(|(e, _)| *e);
        let device = self.model.device();
        let states = chunks
            .iter()
            .map(|(_, s)| Tensor::from_slice(&s.data, (s.rows, s.dim), device))
            .collect::<Result<Vec<_>, _>>()?;
        let kv = self.interaction.peer_kv(q, &states, p.prompt_len)?;
        let hidden = self
            .interaction
            .interact_cached(self.expert, q, &hidden, 0, &kv)?;
        p.kv.push(kv);
        p.hidden = Some(hidden);
        p.layers_done = false;
        p.next_stack += 1;
        Ok(())
    }

    /// Logits `[vocab]` of the primary's next position: the last prompt row after the prompt
    /// pass, or one decode step for the newest token.
    pub(super) fn primary_logits(&self, p: &mut PrimaryJob) -> Result<Tensor, MotError> {
        let hidden = match p.hidden.take() {
            Some(h) => h,
            None => {
                let past = p.cache.len();
                let Some(&token) = p.tokens.get(past) else {
                    return Err(MotError::Input(format!(
                        "no token at position {past} to decode"
                    )));
                };
                let mut h = self.model.embed(&[token])?;
                for (q, layers) in self.stacks.iter().enumerate() {
                    h = self
                        .model
                        .forward_layers(&h, layers.clone(), &mut p.cache)?;
                    let kv = p.kv.get(q).ok_or_else(|| {
                        MotError::Input(format!("no kept peer keys/values for stack {q}"))
                    })?;
                    h = self
                        .interaction
                        .interact_cached(self.expert, q, &h, past, kv)?;
                }
                h
            }
        };
        let rows = hidden.dim(0)?;
        let Some(last) = rows.checked_sub(1) else {
            return Err(MotError::Input("no rows to take logits from".into()));
        };
        let last = hidden.narrow(0, last, 1)?;
        Ok(self.model.final_logits(&last)?.squeeze(0)?)
    }

    /// One step of a primary job: acknowledge fed states, run the ready prompt stacks, and
    /// sample a token once the prompt pass is done. Returns the job's end, if it ended.
    pub(super) fn step_primary(
        &self,
        p: &mut PrimaryJob,
        events: &mut Vec<StageEvent>,
    ) -> Result<Option<FinishReason>, EngineError> {
        if p.unreported > 0 {
            events.push(StageEvent::Consumed(std::mem::take(&mut p.unreported)));
        }
        let num_stacks = self.num_stacks();
        while p.next_stack < num_stacks {
            if !p.layers_done {
                self.primary_layers(p).map_err(compute)?;
            }
            if !p.stack_ready(p.next_stack) {
                // At the boundary, waiting for the peers' states.
                if p.blocked_since.is_none() {
                    p.blocked_since = Some(std::time::Instant::now());
                }
                break;
            }
            if p.peers > 0 {
                p.boundaries += 1;
                if let Some(since) = p.blocked_since.take() {
                    p.blocked_us += since.elapsed().as_micros() as u64;
                }
            }
            self.primary_interact(p).map_err(compute)?;
        }
        if p.next_stack < num_stacks {
            if p.closed {
                let q = p.next_stack;
                return Err(EngineError::Compute(format!(
                    "the peers' states ended with {} of {} peers' states for stack {q}",
                    p.inbox[q].len(),
                    p.peers
                )));
            }
            return Ok(None);
        }
        let logits = self.primary_logits(p).map_err(compute)?;
        let mut out = Vec::new();
        let finished = p.gen.advance(
            &logits,
            &mut p.tokens,
            p.prompt_len,
            &self.tokenizer,
            &mut out,
        );
        p.last_logits = Some(logits);
        let finished = finished?;
        if !out.is_empty() {
            events.push(StageEvent::Output(out));
        }
        Ok(finished)
    }
}

pub(super) fn compute(e: MotError) -> EngineError {
    EngineError::Compute(e.to_string())
}
