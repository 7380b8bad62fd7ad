//! One sequence of the LLM engine: its tokens, how many of them are in the KV pool, and the
//! per-request sampler, detokenizer and stop matcher that turn logits into streamed output.

use super::generation::Generation;
use super::kv::KvSeq;
use super::splice::SpliceSpan;
use super::tokenizer::TextTokenizer;
use candle_core::Tensor;
use omnistage_stages::{EngineError, FinishReason, Payload};

/// One sequence in the running batch.
pub(crate) struct Sequence {
    /// Admission order: older sequences are never preempted for younger ones.
    pub arrival: u64,
    pub prompt_len: usize,
    /// Prompt followed by every generated token.
    pub tokens: Vec<u32>,
    /// Leading tokens whose K/V are in the pool (0 after a preemption).
    pub computed: usize,
    /// Sampling, stops, the completion limit and detokenizing (or forced output).
    pub gen: Generation,
    /// Media rows spliced into the prompt, by prompt position.
    pub media: Vec<SpliceSpan>,
    /// Prefix-cache salt: 0 without media, else a mix of the media digests.
    pub salt: u64,
}

impl Sequence {
    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Input tokens still to run through the model before decoding resumes, as the scheduler
    /// budgets them: the prompt (or, after a preemption, everything but the newest token).
    pub fn pending_prefill(&self) -> usize {
        let to_feed = self.tokens.len() - self.computed;
        if self.generated().is_empty() {
            to_feed
        } else {
            to_feed.saturating_sub(1)
        }
    }

    /// Tokens to feed this step under `budget`.
    pub fn next_chunk_len(&self, budget: usize) -> usize {
        match self.pending_prefill() {
            0 => (self.tokens.len() - self.computed).max(1),
            pending => pending.min(budget.max(1)),
        }
    }

    /// Samples the next token from the logits of the newest token and reports it into `out`.
    /// Returns the finish reason when the sequence is done.
    pub fn advance(
        &mut self,
        logits: &Tensor,
        tokenizer: &TextTokenizer,
        out: &mut Vec<Payload>,
    ) -> Result<Option<FinishReason>, EngineError> {
        self.gen
            .advance(logits, &mut self.tokens, self.prompt_len, tokenizer, out)
    }
}

impl KvSeq for Sequence {
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
        self.salt
    }
}
