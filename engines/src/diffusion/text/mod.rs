//! Text encoders that condition a diffusion transformer: each turns a batch of prompts into
//! per-token rows of one fixed length plus a pooled vector.

pub mod llm;
pub mod sd3;

use super::DiffusionError;
use omnistage_stages::TextEmbedding;

/// A text encoder as the encoder stage drives it.
pub trait PromptEncoder: Send + 'static {
    /// Architecture name for logs and `omnistage check`.
    fn name(&self) -> &'static str;

    /// Encodes `prompts` in one batch. Every result has the same number of token rows (prompts
    /// are padded or truncated to the encoder's length), so results batch together downstream
    /// and do not depend on which prompts shared the batch.
    fn encode(&self, prompts: &[&str]) -> Result<Vec<TextEmbedding>, DiffusionError>;

    /// Token count of `prompt` before padding or truncation (for usage accounting).
    fn count_tokens(&self, prompt: &str) -> Result<usize, DiffusionError>;
}
