//! Turning one sequence's logits into streamed output: sampling (or teacher-forced tokens),
//! stop tokens and stop strings, the completion limit, and incremental detokenizing. Shared by
//! the LLM engine's sequences and Mixture-of-Thoughts primaries.

use super::sampling::{ResolvedSampling, Sampler};
use super::stop::{StopCheck, StopMatcher};
use super::tokenizer::{StreamDecoder, TextTokenizer};
use candle_core::Tensor;
use omnistage_stages::{EngineError, FinishReason, Payload, SamplingParams};
use std::collections::HashSet;

/// A sequence's generation state.
pub(crate) struct Generation {
    sampler: Sampler,
    decoder: StreamDecoder,
    stops: StopMatcher,
    stop_ids: HashSet<u32>,
    /// Completion tokens allowed (bounded so prompt + completion fit the model).
    max_tokens: usize,
    /// Teacher-forced output (speaking a given text): emitted in place of sampled tokens, then
    /// the sequence stops. Empty = sample.
    forced: Vec<u32>,
}

impl Generation {
    /// Settings for a job whose prompt leaves `room` tokens in the model: `params` (already
    /// resolved against the stage defaults), the model's end-of-sequence ids (unless
    /// `ignore_eos`), and `forced` tokens to say instead of sampling (empty: sample).
    pub fn new(
        params: &SamplingParams,
        eos_ids: &[u32],
        room: usize,
        forced: Vec<u32>,
    ) -> Result<Self, EngineError> {
        let max_tokens = params.max_tokens.unwrap_or(room).min(room);
        if max_tokens == 0 {
            return Err(EngineError::InvalidInput(
                "max_tokens must be at least 1".into(),
            ));
        }
        if forced.len() > room {
            return Err(EngineError::InvalidInput(format!(
                "the text to speak has {} tokens; this model has room for {room} after its prompt",
                forced.len()
            )));
        }
        let mut stop_ids: HashSet<u32> = params.stop_token_ids.iter().copied().collect();
        if !params.ignore_eos {
            stop_ids.extend(eos_ids.iter().copied());
        }
        let (max_tokens, stops) = if forced.is_empty() {
            (max_tokens, params.stop.clone())
        } else {
            // Forced text is said whole: stop strings do not cut it.
            (forced.len(), Vec::new())
        };
        Ok(Self {
            sampler: Sampler::new(ResolvedSampling::from_params(params)),
            decoder: StreamDecoder::new(),
            stops: StopMatcher::new(stops),
            stop_ids,
            max_tokens,
            forced,
        })
    }

    /// Samples the next token from `logits` (those of the newest of `tokens`, whose first
    /// `prompt_len` are the prompt), appends it to `tokens` and reports it into `out`:
    /// `Payload::Tokens` with the one id, then `Payload::Text` when it completes text (held back
    /// while it may start a stop string). Returns the finish reason when the sequence is done.
    pub fn advance(
        &mut self,
        logits: &Tensor,
        tokens: &mut Vec<u32>,
        prompt_len: usize,
        tokenizer: &TextTokenizer,
        out: &mut Vec<Payload>,
    ) -> Result<Option<FinishReason>, EngineError> {
        let forced = self
            .forced
            .get(tokens.len().saturating_sub(prompt_len))
            .copied();
        let token = match forced {
            Some(t) => t,
            None => self
                .sampler
                .sample(logits, tokens)
                .map_err(|e| EngineError::Compute(e.to_string()))?,
        };
        if forced.is_none() && self.stop_ids.contains(&token) {
            push_text(out, self.stops.flush());
            return Ok(Some(FinishReason::Stop));
        }
        tokens.push(token);
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
        if tokens.len() - prompt_len >= self.max_tokens {
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

fn push_text(out: &mut Vec<Payload>, text: String) {
    if !text.is_empty() {
        out.push(Payload::Text(text.into()));
    }
}
