//! An LLM as a diffusion text encoder (as Qwen-Image conditions its DiT on Qwen2.5-VL): the
//! prompt's final hidden states (after the final norm, HF's `hidden_states[-1]`) are the token
//! rows; their mean over the real (unpadded) tokens is the pooled vector.
//!
//! Prompts are padded at the end to a fixed length with the pad token: the model is causal, so
//! padding never changes a real token's row, and every prompt yields the same row count.

use super::PromptEncoder;
use crate::diffusion::DiffusionError;
use crate::llm::model::{LlmModel, SeqChunk};
use crate::llm::tokenizer::TextTokenizer;
use candle_core::{DType, Device};
use omnistage_stages::{HiddenStates, TextEmbedding};
use std::path::Path;

/// Pad tokens tried in order when the tokenizer names none.
const PAD_CANDIDATES: [&str; 4] = ["<|endoftext|>", "<pad>", "</s>", "<|end_of_text|>"];

/// A causal LLM encoding prompts to a fixed number of token rows.
pub struct LlmPromptEncoder {
    model: LlmModel,
    tokenizer: TextTokenizer,
    max_tokens: usize,
    pad: u32,
}

impl LlmPromptEncoder {
    /// Loads the model from `model_dir` (config.json + weights) and the tokenizer from
    /// `tokenizer_dir`; prompts become `max_tokens` rows.
    pub fn load(
        model_dir: &Path,
        tokenizer_dir: &Path,
        max_tokens: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, DiffusionError> {
        let model = LlmModel::load(model_dir, dtype, device)
            .map_err(|e| DiffusionError::config(model_dir, e.to_string()))?;
        let tokenizer = TextTokenizer::load(tokenizer_dir)
            .map_err(|e| DiffusionError::config(tokenizer_dir, e.to_string()))?;
        let pad = PAD_CANDIDATES
            .iter()
            .find_map(|t| tokenizer.token_id(t))
            .unwrap_or(0);
        if max_tokens == 0 || max_tokens > model.config().max_position_embeddings {
            return Err(DiffusionError::config(
                model_dir,
                format!(
                    "max_text_tokens {max_tokens} must be in [1, {}] (the model's context)",
                    model.config().max_position_embeddings
                ),
            ));
        }
        Ok(Self {
            model,
            tokenizer,
            max_tokens,
            pad,
        })
    }

    pub fn hidden_size(&self) -> usize {
        self.model.config().hidden_size
    }

    fn tokens(&self, prompt: &str) -> Result<Vec<u32>, DiffusionError> {
        self.tokenizer
            .encode(prompt, true)
            .map_err(|e| DiffusionError::Input(format!("cannot tokenize the prompt: {e}")))
    }
}

impl PromptEncoder for LlmPromptEncoder {
    fn name(&self) -> &'static str {
        "llm"
    }

    fn encode(&self, prompts: &[&str]) -> Result<Vec<TextEmbedding>, DiffusionError> {
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        let mut ids = Vec::with_capacity(prompts.len());
        let mut real = Vec::with_capacity(prompts.len());
        for p in prompts {
            let mut t = self.tokens(p)?;
            t.truncate(self.max_tokens);
            real.push(t.len());
            t.resize(self.max_tokens, self.pad);
            ids.push(t);
        }
        let mut caches: Vec<_> = prompts.iter().map(|_| self.model.new_cache()).collect();
        let mut batch: Vec<SeqChunk<'_>> = ids
            .iter()
            .zip(caches.iter_mut())
            .map(|(tokens, cache)| SeqChunk {
                tokens,
                cache,
                want_hidden: true,
            })
            .collect();
        let out = self
            .model
            .forward(&mut batch)
            .map_err(|e| DiffusionError::Input(e.to_string()))?;
        let dim = self.hidden_size();
        let mut result = Vec::with_capacity(prompts.len());
        for (hidden, real) in out.hidden.into_iter().zip(real) {
            let hidden = hidden.ok_or_else(|| DiffusionError::Input("no hidden states".into()))?;
            let rows: Vec<f32> = hidden.flatten_all()?.to_vec1()?;
            let mut pooled = vec![0f32; dim];
            for row in rows.chunks(dim).take(real.max(1)) {
                for (p, v) in pooled.iter_mut().zip(row) {
                    *p += v;
                }
            }
            let count = real.max(1) as f32;
            pooled.iter_mut().for_each(|p| *p /= count);
            result.push(TextEmbedding {
                tokens: HiddenStates::new(rows, dim),
                pooled: pooled.into(),
            });
        }
        Ok(result)
    }

    fn count_tokens(&self, prompt: &str) -> Result<usize, DiffusionError> {
        Ok(self.tokens(prompt)?.len())
    }
}
