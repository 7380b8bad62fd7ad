//! Mixture of Thoughts (MoT, arXiv 2509.21164): latent-level collaboration of heterogeneous,
//! frozen decoder LLMs ("experts"). A router (`crate::router`) picks the top-K experts for a
//! prompt and designates one of them the *primary*; the primary's logits are the output. Each
//! expert's `L_m` decoder layers are split uniformly into `Q` stacks; after every stack an
//! *interaction layer* lets the primary read the active peers' hidden states through a shared
//! latent space.
//!
//! # The interaction layer (stack `q`)
//!
//! With `H_m ∈ R^{T×d_m}` expert `m`'s residual stream after its stack `q`:
//!
//! ```text
//! S_m   = LayerNorm_{m,q}(H_m) · W_in_{m,q}ᵀ + b_in_{m,q}                 ∈ R^{T×d_s}
//! Q     = S_p · W_Qᵀ + b_Q,   K = [S_j]_j · W_Kᵀ + b_K,   V = [S_j]_j · W_Vᵀ + b_V
//! C     = concat_h softmax(Q_h K_hᵀ / √(d_s/heads) + M) V_h ·  W_Oᵀ + b_O    ∈ R^{T×d_s}
//! H_p  ← H_p + α · (C · W_out_{p,q}ᵀ + b_out_{p,q})                        ∈ R^{T×d_p}
//! ```
//!
//! where `p` is the primary, `[S_j]_j` the row-concatenation of the active peers' projected
//! states (`j ≠ p`), `W_Q, W_K, W_V, W_O` the cross-attention shared by all experts (one per
//! stack), and LayerNorm / `W_in` / `W_out` per expert and stack. Only the primary's stream
//! changes; peers run their own layers unchanged and only *send* `S_j`.
//!
//! # Choices where the paper leaves room (ours, documented here)
//!
//! - **Per-stack parameters.** Every one of the `Q` interaction layers has its own adapters and
//!   cross-attention (`stacks.{q}.…` in `interaction.safetensors`); "shared" means shared across
//!   experts, not across depth.
//! - **Placement.** One interaction layer after each stack, the last one included (before the
//!   final norm). Stack `q` of an `L`-layer expert is layers `⌊qL/Q⌋..⌊(q+1)L/Q⌋`
//!   ([`config::stack_layers`]).
//! - **Keys/values are the peers only**, not the primary itself: the primary already has its
//!   own stream through the residual. With no peers (`K = 1`) the layer is the identity.
//! - **Causal cross-attention**, `M`: primary position `t` attends to peer rows `j ≤ t` of every
//!   peer. Without it a prompt's logits at `t` would depend on later tokens, and a decode step
//!   (see [`interaction::Interaction::interact_at`]) would not reproduce the prefill. The
//!   peers are concatenated along the key axis without positional encoding, so the result does
//!   not depend on the order the peers are given in (up to float summation order).
//! - **Biases** on every projection and an affine LayerNorm (PyTorch `nn.Linear` /
//!   `nn.LayerNorm` defaults); `α` is a fixed config scalar.
//! - **Different tokenizers.** Peer states are aligned to the primary's positions by
//!   [`interaction::resample_tokens`]: linear interpolation along the token axis, end points
//!   aligned. It is a whole-prompt operation: exact alignment for decode holds only when the
//!   token counts match (same tokenizer), where resampling is the identity.
//!
//! # Layout
//!
//! A MoT checkpoint is a folder with `mot_config.json` ([`config`]), `interaction.safetensors`
//! ([`interaction`] lists the tensor names) and the experts' HF checkpoint folders it points
//! to. `crate::tiny::write_mot` writes a tiny one, its router in `router/`.
//!
//! [`engine`] serves one expert of such a checkpoint as a stage of a deployment graph (peers
//! send their projected states to the primary's stage after every stack);
//! [`reference`](mod@reference) is the single-process forward it is checked against.

pub mod config;
pub mod engine;
pub mod interaction;
pub mod reference;

use std::path::PathBuf;

pub use config::{stack_layers, ExpertEntry, MotConfig, INTERACTION_FILE, MOT_CONFIG_FILE};
pub use engine::MotExpertEngine;
pub use interaction::{resample_tokens, Interaction, InteractionSpec, PeerKv};
pub use reference::{ExpertInput, MotModel};

use crate::llm::model::LlmError;
use crate::llm::weights::WeightsError;

/// Everything that can go wrong loading or running a MoT checkpoint. Each names the file, the
/// expert or the bad value.
#[derive(Debug, thiserror::Error)]
pub enum MotError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `mot_config.json` is not valid JSON or has a field of the wrong type.
    #[error("parsing {path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// `mot_config.json` holds inconsistent values.
    #[error("invalid MoT config {path}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An expert's checkpoint could not be loaded.
    #[error("expert {name:?} ({path}): {source}")]
    Expert {
        /// The expert's name.
        name: String,
        /// Its checkpoint directory.
        path: PathBuf,
        /// The underlying error (boxed: `LlmError` is large).
        #[source]
        source: Box<LlmError>,
    },
    /// `interaction.safetensors` is missing, unreadable, or lacks / misshapes a tensor.
    #[error("{path}: {source}")]
    Weights {
        /// The file.
        path: PathBuf,
        /// The underlying error (names the tensor where one is at fault; boxed: it is large).
        #[source]
        source: Box<WeightsError>,
    },
    /// A call was given bad input (unknown expert, wrong shapes, primary not selected).
    #[error("invalid MoT input: {0}")]
    Input(String),
    /// An expert's forward failed (boxed: `LlmError` is large).
    #[error(transparent)]
    Llm(Box<LlmError>),
    /// A tensor operation failed.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

impl From<LlmError> for MotError {
    fn from(e: LlmError) -> Self {
        MotError::Llm(Box::new(e))
    }
}
