//! One talker sequence: its tokens, the thinker rows that condition it, and the sampler that
//! writes one codec token per step.
//!
//! Positions and rows: with a prompt of `P` tokens, the logits of position `P - 1 + t` produce
//! codec token `t`, and that position's input embedding gets the projected thinker row `t` added
//! (lock-step conditioning). Once the thinker's stream is closed and its rows are used up, the
//! extra term is zero. A position whose row has not arrived yet (stream still open) cannot run:
//! it is the sequence's *barrier*.

use super::super::kv::KvSeq;
use super::super::sampling::Sampler;
use super::layout::CodecLayout;
use candle_core::Tensor;
use omnistage_stages::{EngineError, FinishReason, HiddenStates};

/// Salt of the prefix-cache hash chain of sequences conditioned on thinker rows, so they never
/// share blocks with text-prompted ones (their K/V depend on more than the token ids).
const CONDITIONED_SALT: u64 = 0x7461_6c6b_6572_0001;

/// Thinker rows a sequence has received.
pub(crate) struct Conditioning {
    /// Rows so far, row-major, `dim` wide.
    rows: Vec<f32>,
    dim: usize,
    /// No more rows follow.
    pub closed: bool,
    /// Rows already reported as used (`StageEvent::Consumed`).
    consumed: usize,
    /// Whether the rows arrive on a streamed edge (then their use is reported).
    pub streaming: bool,
}

impl Conditioning {
    pub fn new(dim: usize, streaming: bool) -> Self {
        Self {
            rows: Vec::new(),
            dim,
            closed: !streaming,
            consumed: 0,
            streaming,
        }
    }

    /// Rows received so far.
    pub fn available(&self) -> usize {
        self.rows.len() / self.dim.max(1)
    }

    /// Checks that `h` fits these rows (same width, whole rows).
    pub fn check(&self, h: &HiddenStates) -> Result<(), EngineError> {
        if h.dim != self.dim || h.data.len() != h.rows * h.dim {
            return Err(EngineError::InvalidInput(format!(
                "hidden rows are {} wide ({} values for {} rows); this talker's projection takes \
                 rows of {}",
                h.dim,
                h.data.len(),
                h.rows,
                self.dim
            )));
        }
        Ok(())
    }

    /// Appends checked rows.
    pub fn push(&mut self, h: &HiddenStates) {
        self.rows.extend_from_slice(&h.data);
    }

    fn row(&self, t: usize) -> Option<&[f32]> {
        self.rows.get(t * self.dim..(t + 1) * self.dim)
    }
}

/// Thinker rows for one chunk, before projection: `n × dim` values (zeros where a position has
/// no row) and a `n`-long mask (1 where it has one).
pub(crate) struct ChunkRows {
    pub data: Vec<f32>,
    pub mask: Vec<f32>,
}

/// What one sampled token did to a sequence.
pub(crate) struct Advance {
    pub finished: Option<FinishReason>,
    /// A frame that completed: its raw tokens (talker order) and canonical codes.
    pub frame: Option<(Vec<u32>, Vec<u32>)>,
}

/// One talker sequence in the running batch.
pub(crate) struct TalkerSeq {
    pub arrival: u64,
    pub prompt_len: usize,
    /// Prompt followed by every generated codec token.
    pub tokens: Vec<u32>,
    /// Leading tokens whose K/V are in the pool (0 after a preemption).
    pub computed: usize,
    pub sampler: Sampler,
    /// Codec tokens allowed; admission caps it so prompt + completion fit the model.
    pub max_tokens: usize,
    /// Whether end tokens may be sampled (not with `ignore_eos`).
    pub allow_end: bool,
    /// Thinker rows, for a sequence driven by hidden states.
    pub cond: Option<Conditioning>,
}

impl TalkerSeq {
    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// The first conditioned position (the last prompt position).
    fn cond_start(&self) -> usize {
        self.prompt_len - 1
    }

    /// First position that needs a row that has not arrived (`usize::MAX` when none does).
    fn barrier(&self) -> usize {
        match &self.cond {
            Some(c) if !c.closed => self.cond_start() + c.available(),
            _ => usize::MAX,
        }
    }

    /// Whether the next forward needs a row that has not arrived while the stream is open.
    pub fn awaiting(&self) -> bool {
        self.barrier() <= self.computed
    }

    /// Input tokens still to run before decoding resumes (the prompt, or after a preemption
    /// everything but the newest token).
    pub fn pending_prefill(&self) -> usize {
        let to_feed = self.tokens.len() - self.computed;
        if self.generated().is_empty() {
            to_feed
        } else {
            to_feed.saturating_sub(1)
        }
    }

    /// Tokens to feed this step under `budget`; 0 when the sequence waits for a row.
    pub fn next_chunk_len(&self, budget: usize) -> usize {
        let n = match self.pending_prefill() {
            0 => (self.tokens.len() - self.computed).max(1),
            pending => pending.min(budget.max(1)),
        };
        self.clamp_chunk(n)
    }

    /// Leading tokens whose K/V depend on the token ids alone (registrable in the prefix cache).
    pub fn cacheable_len(&self) -> usize {
        match self.cond {
            Some(_) => self.computed.min(self.cond_start()),
            None => self.computed,
        }
    }

    /// The rows conditioning positions `past..past + n`, or `None` when none of them has one.
    pub fn chunk_rows(&self, past: usize, n: usize) -> Option<ChunkRows> {
        let cond = self.cond.as_ref()?;
        let start = self.cond_start();
        let rows = |p: usize| p.checked_sub(start).and_then(|t| cond.row(t));
        if (past..past + n).all(|p| rows(p).is_none()) {
            return None;
        }
        let mut data = Vec::with_capacity(n * cond.dim);
        let mut mask = Vec::with_capacity(n);
        for p in past..past + n {
            match rows(p) {
                Some(r) => {
                    data.extend_from_slice(r);
                    mask.push(1.0);
                }
                None => {
                    data.resize(data.len() + cond.dim, 0.0);
                    mask.push(0.0);
                }
            }
        }
        Some(ChunkRows { data, mask })
    }

    /// Records that positions up to `self.computed` ran; returns how many rows became used for
    /// the first time (reported as `Consumed` on a streamed edge).
    pub fn mark_consumed(&mut self) -> usize {
        let start = self.cond_start();
        let computed = self.computed;
        let Some(cond) = self.cond.as_mut() else {
            return 0;
        };
        let used = computed.saturating_sub(start).min(cond.available());
        let new = used.saturating_sub(cond.consumed);
        cond.consumed = cond.consumed.max(used);
        new
    }

    /// Samples the next codec token from the newest position's logits, masked to what the frame
    /// slot allows.
    pub fn advance(
        &mut self,
        logits: &Tensor,
        layout: &CodecLayout,
    ) -> Result<Advance, EngineError> {
        let compute = |e: candle_core::Error| EngineError::Compute(e.to_string());
        let generated = self.generated().len();
        let masked = (logits + layout.mask(generated, self.allow_end)).map_err(compute)?;
        let token = self
            .sampler
            .sample(&masked, &self.tokens)
            .map_err(compute)?;
        if layout.is_end(token) {
            return Ok(Advance {
                finished: Some(FinishReason::Stop),
                frame: None,
            });
        }
        self.tokens.push(token);
        let generated = self.generated();
        let f = layout.frame_len();
        let frame = if generated.len() % f == 0 {
            let raw = generated[generated.len() - f..].to_vec();
            let codes = layout.frame_codes(&raw)?;
            Some((raw, codes))
        } else {
            None
        };
        let finished = (generated.len() >= self.max_tokens).then_some(FinishReason::Length);
        Ok(Advance { finished, frame })
    }
}

impl KvSeq for TalkerSeq {
    fn arrival(&self) -> u64 {
        self.arrival
    }

    fn computed(&self) -> usize {
        self.computed
    }

    fn set_computed(&mut self, computed: usize) {
        self.computed = computed;
    }

    fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    fn salt(&self) -> u64 {
        if self.cond.is_some() {
            CONDITIONED_SALT
        } else {
            0
        }
    }

    fn clamp_chunk(&self, n: usize) -> usize {
        n.min(self.tokens.len() - self.computed)
            .min(self.barrier().saturating_sub(self.computed))
    }
}
