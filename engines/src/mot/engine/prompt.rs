//! A job's prompt in this expert's own tokenization, its checks, and a primary's generation
//! settings.

use std::collections::HashSet;

use omnistage_stages::{ChatMessage, EngineError, Payload, Prompt, StageInput};

use super::job::{Generation, PrimaryJob};
use super::MotExpertEngine;
use crate::llm::sampling::{ResolvedSampling, Sampler};
use crate::llm::stop::StopMatcher;
use crate::llm::tokenizer::StreamDecoder;

impl MotExpertEngine {
    pub(super) fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        let template = self.template.as_ref().ok_or_else(|| {
            EngineError::InvalidInput("this model has no chat template; use /v1/completions".into())
        })?;
        template
            .render(messages, true)
            .map_err(|e| EngineError::InvalidInput(format!("chat template: {e}")))
    }

    /// The prompt in this expert's tokenization: upstream text (as a user turn) or the
    /// request's own prompt.
    pub(super) fn prompt_tokens(&self, input: &StageInput) -> Result<Vec<u32>, EngineError> {
        let encode = |text: &str, specials: bool| {
            self.tokenizer
                .encode(text, specials)
                .map_err(|e| EngineError::InvalidInput(format!("tokenizer: {e}")))
        };
        let as_user_turn = |text: &str| match self.template {
            Some(_) => encode(
                &self.render_chat(&[ChatMessage::text("user", text)])?,
                false,
            ),
            None => encode(text, true),
        };
        if let Some(Payload::Text(text)) = input
            .upstream
            .iter()
            .find(|p| matches!(p, Payload::Text(_)))
        {
            return as_user_turn(text);
        }
        let tokens = match &input.request.prompt {
            Prompt::Chat(messages) => encode(&self.render_chat(messages)?, false)?,
            Prompt::Completion(text) => encode(text, true)?,
            Prompt::Tokens(ids) => ids.clone(),
            Prompt::Speak(_) => {
                return Err(EngineError::InvalidInput(
                    "a Mixture-of-Thoughts expert generates text; it cannot speak a given text"
                        .into(),
                ))
            }
        };
        Ok(tokens)
    }

    /// Checks the prompt against the vocabulary and the length limit.
    pub(super) fn check_prompt(&self, prompt: &[u32]) -> Result<(), EngineError> {
        if prompt.is_empty() {
            return Err(EngineError::InvalidInput("the prompt is empty".into()));
        }
        if let Some(bad) = prompt.iter().find(|t| **t as usize >= self.vocab_size()) {
            return Err(EngineError::InvalidInput(format!(
                "token id {bad} is outside the model's vocabulary of {}",
                self.vocab_size()
            )));
        }
        if prompt.len() >= self.max_model_len {
            return Err(EngineError::InvalidInput(format!(
                "the prompt has {} tokens; this model accepts at most {} tokens of prompt and \
                 completion",
                prompt.len(),
                self.max_model_len
            )));
        }
        Ok(())
    }

    /// Sets up a primary job: sampling, stops and the completion limit.
    pub(super) fn new_primary(
        &self,
        input: &StageInput,
        tokens: Vec<u32>,
        peers: usize,
    ) -> Result<PrimaryJob, EngineError> {
        let params = input.sampling().or(&self.defaults);
        let room = self.max_model_len - tokens.len();
        let max_tokens = params.max_tokens.unwrap_or(room).min(room);
        if max_tokens == 0 {
            return Err(EngineError::InvalidInput(
                "max_tokens must be at least 1".into(),
            ));
        }
        let mut stop_ids: HashSet<u32> = params.stop_token_ids.iter().copied().collect();
        if !params.ignore_eos {
            stop_ids.extend(self.eos_ids.iter().copied());
        }
        Ok(PrimaryJob {
            prompt_len: tokens.len(),
            tokens,
            cache: self.model.new_cache(),
            hidden: None,
            next_stack: 0,
            peers,
            inbox: vec![Vec::new(); self.num_stacks()],
            unreported: 0,
            closed: peers == 0,
            kv: Vec::with_capacity(self.num_stacks()),
            gen: Generation {
                sampler: Sampler::new(ResolvedSampling::from_params(&params)),
                decoder: StreamDecoder::new(),
                stops: StopMatcher::new(params.stop.clone()),
                stop_ids,
                max_tokens,
                generated: 0,
            },
            last_logits: None,
            layers_done: false,
            blocked_since: None,
            boundaries: 0,
            blocked_us: 0,
        })
    }
}
