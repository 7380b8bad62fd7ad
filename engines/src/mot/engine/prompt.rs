//! A job's prompt in this expert's own tokenization, its checks, and a primary's generation
//! settings.

use omnistage_stages::{ChatMessage, EngineError, Payload, Prompt, StageInput};

use super::job::PrimaryJob;
use super::MotExpertEngine;
use crate::llm::generation::Generation;
use crate::llm::prompt;

impl MotExpertEngine {
    pub(super) fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        prompt::render_chat(self.template.as_ref(), messages)
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
    pub(super) fn check_prompt(&self, tokens: &[u32]) -> Result<(), EngineError> {
        prompt::check_prompt(tokens, self.vocab_size(), self.max_model_len)
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
        let gen = Generation::new(&params, &self.eos_ids, room, Vec::new())?;
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
            gen,
            last_logits: None,
            layers_done: false,
            blocked_since: None,
            boundaries: 0,
            blocked_us: 0,
        })
    }
}
