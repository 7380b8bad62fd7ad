//! Text-to-image model code: diffusion transformers (SD3/SD3.5 MMDiT, FLUX) in the diffusers
//! folder layout and the single-file layouts candle-transformers reads, the flow-matching
//! scheduler, the VAE, text encoders, and the stage engines that batch them.
//!
//! A diffusers pipeline folder holds one component per subfolder (`transformer/`, `vae/`,
//! `text_encoder*/`, `tokenizer*/`, `scheduler/`); every stage of an image graph points its
//! `model` at the pipeline root and reads the component it runs.

pub mod flux;
pub mod model;
pub mod noise;
pub mod png;
pub mod scheduler;
pub mod sd3;
pub mod single_file;
pub mod stage;
pub mod text;
pub mod vae;

use crate::llm::weights::WeightsError;
use std::path::{Path, PathBuf};

/// Errors loading or running a diffusion component. Each names the file or what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum DiffusionError {
    /// A config file is missing, unreadable, or holds an unusable value.
    #[error("{}: {message}", path.display())]
    Config { path: PathBuf, message: String },
    /// The component's weights could not be found or read.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// A forward was called with inconsistent inputs.
    #[error("invalid input: {0}")]
    Input(String),
    /// candle failed while computing.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl DiffusionError {
    /// A config error for `path`.
    pub fn config(path: &Path, message: impl Into<String>) -> Self {
        DiffusionError::Config {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

/// Reads and parses a JSON config file, naming the file on error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, DiffusionError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| DiffusionError::config(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| DiffusionError::config(path, format!("invalid: {e}")))
}
