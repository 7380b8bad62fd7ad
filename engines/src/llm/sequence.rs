//! One sequence of the LLM engine: its tokens, how many of them are in the KV pool, and the
//! per-request sampler, detokenizer and stop matcher that turn logits into streamed output.

use super::kv::KvSeq;
use super::sampling::Sampler;
use super::splice::SpliceSpan;
use super::stop::{StopCheck, StopMatcher};
use super::tokenizer::{StreamDecoder, TextTokenizer};
use candle_core::Tensor;
use omnistage_stages::{EngineError, FinishReason, Payload};
use std::collections::HashSet;

/// One sequence in the running batch.
pub(crate) struct Sequence {
    /// Admission order: older sequences are never preempted for younger ones.
    pub arrival: u64,
    pub prompt_len: usize,
    /// Prompt followed by every generated token.
    pub tokens: Vec<u32>,
    /// Leading tokens whose K/V are in the pool (0 after a preemption).
    pub computed: usize,
    pub sampler: Sampler,
    pub decoder: StreamDecoder,
    pub stops: StopMatcher,
    pub stop_ids: HashSet<u32>,
    /// Completion tokens allowed; admission caps it so prompt + completion fit the model.
    pub max_tokens: usize,
    /// Teacher-forced output (speaking a given text): emitted in place of sampled tokens, then
    /// the sequence stops. Empty = sample.
    pub forced: Vec<u32>,
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
        let forced = self.forced.get(self.generated().len()).copied();
        let token = match forced {
            Some(t) => t,
            None => self
                .sampler
                .sample(logits, &self.tokens)
                .map_err(|e| EngineError::Compute(e.to_string()))?,
        };
        if forced.is_none() && self.stop_ids.contains(&token) {
            push_text(out, self.stops.flush());
            return Ok(Some(FinishReason::Stop));
        }
        self.tokens.push(token);
        out.push(Payload::Tokens(vec![token].into()));
        let piece = self
            .decoder
            .push(tokenizer, token)
            .map_err(|e| EngineError::Compute(format!("detokenize: {e}")))?
            .unwrap_or_default();
        match self.stops.push(&piece) {
            StopCheck::Stopped(text) => {
                push_text(out, text);
                return Ok(Some(FinishReason::Stop));
            }
            StopCheck::Continue(text) => push_text(out, text),
        }
        if self.generated().len() >= self.max_tokens {
            let tail = self
                .decoder
                .flush(tokenizer)
                .ok()
                .flatten()
                .unwrap_or_default();
            let tail = match self.stops.push(&tail) {
                StopCheck::Stopped(t) => t,
                StopCheck::Continue(t) => t + &self.stops.flush(),
            };
            push_text(out, tail);
            // A forced sequence said all it had to say.
            let reason = if self.forced.is_empty() {
                FinishReason::Length
            } else {
                FinishReason::Stop
            };
            return Ok(Some(reason));
        }
        Ok(None)
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

fn push_text(out: &mut Vec<Payload>, text: String) {
    if !text.is_empty() {
        out.push(Payload::Text(text.into()));
    }
}
