//! The router stage (`kind = "router"`): decides which expert stages a request runs on.
//!
//! Two forms, as the stage's `[stage.router]` table says:
//!
//! - **Model form** (the stage names a `model`): a BERT-family sentence encoder
//!   (`candle_transformers::models::bert::BertModel`) reads the request's prompt text, its last
//!   hidden states are mean-pooled over the real (non-pad) tokens, and an MLP scores the experts;
//!   the softmax of the scores is reported for every expert and the `k` most probable are
//!   selected, the most probable first (the primary). All jobs of a step run in one padded
//!   forward with an attention mask, so a prompt scores the same alone or in a batch. The
//!   encoder runs in the stage's `dtype`, except that f16/bf16 fall back to f32 (candle's
//!   `BertModel` mask is NaN in half precision; see [`RouterModel::load`]).
//! - **Rule form** (no `model`): the first rule whose condition holds picks the one expert, else
//!   the `default`; no scores.
//!
//! # The text the model form scores
//!
//! - `Prompt::Chat`: the text of the **user** messages (media parts left out, see
//!   `MessageContent::text`), joined with `\n`. System prompts are deployment boilerplate and
//!   earlier assistant turns are the model's own words; the user's words say what is asked.
//! - `Prompt::Completion` and `Prompt::Speak`: their text.
//! - `Prompt::Tokens`: refused (`InvalidInput`): token ids of another vocabulary carry no text
//!   the router could read.
//!
//! The text is tokenized with the encoder's `tokenizer.json` (its post-processor adds
//! `[CLS]`/`[SEP]` for a BERT tokenizer) and truncated to `max_length` tokens. A text with no
//! tokens is refused.
//!
//! # Checkpoint folder (the stage's `model`)
//!
//! ```text
//! router_config.json
//!     {"model_type": "mot_router",
//!      "experts": ["small", "medium", "large"],  // the head's outputs, in order
//!      "hidden_size": 32,                        // H, the MLP's hidden width
//!      "activation": "gelu",                     // "gelu" (erf form, nn.GELU) or "relu"
//!      "max_length": 64,                         // tokens read at most
//!      "pooling": "mean"}                        // the only pooling
//! encoder/config.json          candle_transformers::models::bert::Config (HF BertConfig)
//! encoder/model.safetensors    BertModel weights, with or without a `bert.` prefix
//! encoder/tokenizer.json       Hugging Face tokenizers file
//! head.safetensors             mlp.0.weight [H, d], mlp.0.bias [H],
//!                              mlp.2.weight [M, H], mlp.2.bias [M]
//! ```
//!
//! `d` is the encoder's `hidden_size` and `M` the number of experts. The deployment's
//! `[stage.router] experts` lists the expert *stage ids* in the head's output order; the engine
//! checks only that the counts agree (the names in `router_config.json` are the checkpoint's own,
//! e.g. a Mixture-of-Thoughts set's expert names). `crate::tiny::write_tiny_router` writes a
//! tiny one.

mod engine;
mod model;
mod rules;

pub use engine::RouterEngine;
pub use model::{Activation, RouterConfig, RouterModel};
pub use rules::{match_rules, RuleMatch};

use omnistage_stages::{EngineError, Prompt};
use std::path::PathBuf;

/// The router's own config file inside its checkpoint folder.
pub const ROUTER_CONFIG_FILE: &str = "router_config.json";
/// The folder of the BERT encoder inside the router checkpoint.
pub const ENCODER_DIR: &str = "encoder";
/// The MLP head's weights inside the router checkpoint.
pub const HEAD_FILE: &str = "head.safetensors";
/// `router_config.json`'s `model_type`.
pub const ROUTER_MODEL_TYPE: &str = "mot_router";

/// Why a router checkpoint could not be loaded or run. Each names the file or setting.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: {reason}", path.display())]
    Config { path: PathBuf, reason: String },
    #[error("{}: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },
    #[error("{}: {source}", path.display())]
    Weights {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
    #[error("router forward: {0}")]
    Compute(#[from] candle_core::Error),
}

/// The text the model form scores for `prompt` (see the module docs).
pub fn prompt_text(prompt: &Prompt) -> Result<String, EngineError> {
    match prompt {
        Prompt::Chat(messages) => Ok(messages
            .iter()
            .filter(|m| m.role == "user")
            .map(|m| m.content.text())
            .collect::<Vec<_>>()
            .join("\n")),
        Prompt::Completion(text) | Prompt::Speak(text) => Ok(text.clone()),
        Prompt::Tokens(_) => Err(EngineError::InvalidInput(
            "a router scores the prompt's text; a prompt of token ids has none to route on \
             (send the prompt as text)"
                .into(),
        )),
    }
}

/// Indices of the `k` largest of `scores`, largest first; ties go to the lower index.
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order.truncate(k);
    order
}

/// The number of experts to select: the request's `k`, else the stage's; refused outside
/// `1..=experts`.
pub fn resolve_k(
    requested: Option<usize>,
    default: usize,
    experts: usize,
) -> Result<usize, EngineError> {
    let k = requested.unwrap_or(default);
    if k == 0 || k > experts {
        return Err(EngineError::InvalidInput(format!(
            "k = {k}: a router selects between 1 and its {experts} experts"
        )));
    }
    Ok(k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use omnistage_stages::{ChatMessage, ContentPart, MessageContent};

    #[test]
    fn chat_text_is_the_user_turns_joined() {
        let prompt = Prompt::Chat(vec![
            ChatMessage::text("system", "be brief"),
            ChatMessage::text("user", "hello"),
            ChatMessage::text("assistant", "hi"),
            ChatMessage {
                role: "user".into(),
                content: MessageContent::Parts(vec![
                    ContentPart::Text {
                        text: "what is ".into(),
                    },
                    ContentPart::Image,
                    ContentPart::Text {
                        text: "this".into(),
                    },
                ]),
            },
        ]);
        assert_eq!(prompt_text(&prompt).unwrap(), "hello\nwhat is this");
        assert_eq!(
            prompt_text(&Prompt::Speak("say it".into())).unwrap(),
            "say it"
        );
        assert!(matches!(
            prompt_text(&Prompt::Tokens(vec![1, 2])),
            Err(EngineError::InvalidInput(_))
        ));
    }

    #[test]
    fn top_k_orders_by_score_then_index() {
        assert_eq!(top_k(&[0.2, 0.5, 0.3], 3), [1, 2, 0]);
        assert_eq!(top_k(&[0.4, 0.2, 0.4], 2), [0, 2]);
        assert_eq!(top_k(&[0.1, 0.3], 5), [1, 0]);
    }

    #[test]
    fn k_is_checked() {
        assert_eq!(resolve_k(None, 1, 3).unwrap(), 1);
        assert_eq!(resolve_k(Some(3), 1, 3).unwrap(), 3);
        for bad in [Some(0), Some(4)] {
            let e = resolve_k(bad, 1, 3).unwrap_err();
            assert!(matches!(e, EngineError::InvalidInput(ref m) if m.contains("between 1")));
        }
    }
}
