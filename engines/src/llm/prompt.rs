//! Prompt rules every text-generating engine applies alike: rendering chat messages with the
//! checkpoint's template, and the checks a prompt must pass before it is admitted.

use super::chat_template::ChatTemplate;
use omnistage_stages::{ChatMessage, EngineError};

/// Renders chat messages with `template` (with the generation prompt appended); a model
/// without a template takes completions only.
pub(crate) fn render_chat(
    template: Option<&ChatTemplate>,
    messages: &[ChatMessage],
) -> Result<String, EngineError> {
    let template = template.ok_or_else(|| {
        EngineError::InvalidInput("this model has no chat template; use /v1/completions".into())
    })?;
    template
        .render(messages, true)
        .map_err(|e| EngineError::InvalidInput(format!("chat template: {e}")))
}

/// Refuses an empty prompt, token ids outside the vocabulary, and a prompt that leaves no room
/// for a completion within `max_model_len`.
pub(crate) fn check_prompt(
    prompt: &[u32],
    vocab_size: usize,
    max_model_len: usize,
) -> Result<(), EngineError> {
    if prompt.is_empty() {
        return Err(EngineError::InvalidInput("the prompt is empty".into()));
    }
    if let Some(bad) = prompt.iter().find(|t| **t as usize >= vocab_size) {
        return Err(EngineError::InvalidInput(format!(
            "token id {bad} is outside the model's vocabulary of {vocab_size}"
        )));
    }
    if prompt.len() >= max_model_len {
        return Err(EngineError::InvalidInput(format!(
            "the prompt has {} tokens; this model accepts at most {max_model_len} tokens of prompt and completion",
            prompt.len(),
        )));
    }
    Ok(())
}
