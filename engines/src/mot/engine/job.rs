//! Per-job state of a staged MoT expert: a peer's prompt pass, and a primary's prompt pass
//! (gated on its peers' states) and decode, whose sampling / stop / detokenizing is the LLM
//! engine's own (`crate::llm::generation`).

use candle_core::Tensor;
use omnistage_stages::{EngineError, HiddenStates, Payload};

use crate::llm::generation::Generation;
use crate::llm::model::SeqKvCache;
use crate::mot::PeerKv;

/// One job at this stage.
pub(super) enum Job {
    /// Runs the prompt pass only and sends its projected states after every stack.
    Peer(PeerJob),
    /// Reads the peers' states after every stack, then decodes (boxed: it is the larger one).
    Primary(Box<PrimaryJob>),
}

impl Job {
    /// Prompt tokens still to run through the stacks, as the scheduler budgets them (0 once a
    /// primary decodes).
    pub fn pending(&self, num_stacks: usize) -> usize {
        let (tokens, next) = match self {
            Job::Peer(p) => (p.tokens.len(), p.next_stack),
            Job::Primary(p) => (p.prompt_len, p.next_stack),
        };
        let left = num_stacks.saturating_sub(next);
        (tokens * left).div_ceil(num_stacks.max(1))
    }

    /// Bytes held: KV cache, the residual stream between stacks, kept peer keys/values, peer
    /// states not yet used and the newest logits.
    pub fn bytes(&self) -> usize {
        let tensor = |t: &Option<Tensor>| {
            t.as_ref()
                .map_or(0, |t| t.elem_count() * t.dtype().size_in_bytes())
        };
        match self {
            Job::Peer(p) => p.cache.bytes() + tensor(&p.hidden),
            Job::Primary(p) => {
                p.cache.bytes()
                    + tensor(&p.hidden)
                    + tensor(&p.last_logits)
                    + p.kv.iter().map(PeerKv::bytes).sum::<usize>()
                    + p.inbox
                        .iter()
                        .flatten()
                        .map(|(_, s)| s.data.len() * 4)
                        .sum::<usize>()
            }
        }
    }
}

/// A peer's prompt pass.
pub(super) struct PeerJob {
    /// The prompt in this expert's tokenization.
    pub tokens: Vec<u32>,
    pub cache: SeqKvCache,
    /// The residual stream after stack `next_stack − 1` (`None` before stack 0).
    pub hidden: Option<Tensor>,
    /// The next stack to run.
    pub next_stack: usize,
}

/// A primary: prompt pass, then decode.
pub(super) struct PrimaryJob {
    pub prompt_len: usize,
    /// Prompt, then every generated token.
    pub tokens: Vec<u32>,
    pub cache: SeqKvCache,
    /// The residual stream after stack `next_stack − 1` during the prompt pass.
    pub hidden: Option<Tensor>,
    /// The next stack of the prompt pass; `num_stacks` once decoding.
    pub next_stack: usize,
    /// Peer chunks expected per stack (`RouteDecision::peers().len()`).
    pub peers: usize,
    /// Per stack: the peers' states received and not yet used, as `(expert, states)`.
    pub inbox: Vec<Vec<(usize, HiddenStates)>>,
    /// Rows fed and not yet reported with `StageEvent::Consumed`.
    pub unreported: usize,
    /// The peers' stream ended (`feed(.., last = true)`).
    pub closed: bool,
    /// Per finished stack: the peers' cross-attention keys/values, kept for decode.
    pub kv: Vec<PeerKv>,
    pub gen: Generation,
    /// Logits `[vocab]` of the newest position run (the one that produced the newest token).
    pub last_logits: Option<Tensor>,
    /// The layers of stack `next_stack` have run; its interaction waits for the peers.
    pub layers_done: bool,
    /// Since when the prompt pass has been blocked at the boundary of `next_stack` (its layers
    /// done) for the peers' states.
    pub blocked_since: Option<std::time::Instant>,
    /// Boundaries passed and microseconds blocked at them, not yet added to the engine's
    /// counters.
    pub boundaries: u64,
    pub blocked_us: u64,
}

impl PrimaryJob {
    /// Whether every peer's states for stack `stack` are here.
    pub fn stack_ready(&self, stack: usize) -> bool {
        self.inbox.get(stack).is_some_and(|s| s.len() >= self.peers)
    }

    /// Whether the job can do nothing until more peer states arrive.
    pub fn awaiting(&self, num_stacks: usize) -> bool {
        self.next_stack < num_stacks
            && self.layers_done
            && self.unreported == 0
            && !self.closed
            && !self.stack_ready(self.next_stack)
    }

    /// Checks one fed payload against what this job expects.
    pub fn check(
        &self,
        p: &Payload,
        own: usize,
        num_experts: usize,
        shared_dim: usize,
    ) -> Result<(), EngineError> {
        let bad = |m: String| Err(EngineError::InvalidInput(m));
        let Payload::MotStates(m) = p else {
            return bad(format!(
                "a MoT primary takes streamed `mot_states` from its peers, not `{}`",
                p.kind()
            ));
        };
        let num_stacks = self.inbox.len();
        if m.stack >= num_stacks {
            return bad(format!(
                "peer states for stack {}, but the checkpoint has {num_stacks} stacks",
                m.stack
            ));
        }
        if m.expert >= num_experts || m.expert == own {
            return bad(format!(
                "peer states from expert {}, which is not a peer of expert {own} ({num_experts} \
                 experts)",
                m.expert
            ));
        }
        let s = &m.states;
        if s.dim != shared_dim || s.rows == 0 || s.rows * s.dim != s.data.len() {
            return bad(format!(
                "peer states of expert {} at stack {} are {} rows × {} ({} values); expected \
                 rows × {shared_dim}",
                m.expert,
                m.stack,
                s.rows,
                s.dim,
                s.data.len()
            ));
        }
        let inbox = &self.inbox[m.stack];
        if m.stack < self.next_stack || inbox.iter().any(|(e, _)| *e == m.expert) {
            return bad(format!(
                "expert {} sent its states for stack {} twice",
                m.expert, m.stack
            ));
        }
        if inbox.len() >= self.peers {
            return bad(format!(
                "more than the {} expected peers sent states for stack {}",
                self.peers, m.stack
            ));
        }
        Ok(())
    }
}
