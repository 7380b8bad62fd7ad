//! Media encoders: models that turn a request's images or audio clips into embedding rows in an
//! LLM's width, which the LLM splices into its prompt in place of placeholder tokens.
//!
//! - [`MediaEncoder`]: the model side (preprocess one item, encode a batch of equal-shaped items);
//! - [`stage::MediaEncoderEngine`]: the stage engine over any encoder (batching, cache);
//! - `vision`: ViT (CLIP or SigLIP vision tower) + projector, LLaVA layout;
//! - `whisper`: Whisper's encoder on log-mel features + projector.

pub mod cache;
pub mod stage;
pub mod vision;
pub mod whisper;

use candle_core::Tensor;
use omnistage_stages::{EngineError, HiddenStates, MediaData, Modality};

/// One item after preprocessing, ready for the encoder.
#[derive(Debug, Clone)]
pub struct PreparedMedia {
    /// The model input of this one item, without a batch dimension (e.g. `[3, H, W]` pixels or
    /// `[n_mels, frames]` features). Items whose inputs have equal shapes are encoded together.
    pub input: Tensor,
    /// Rows the encoder writes for this item (the placeholder tokens it fills).
    pub rows: usize,
}

/// A model encoding one kind of media into rows of an LLM's embedding width.
pub trait MediaEncoder: Send + 'static {
    /// `Image` or `Audio`.
    fn modality(&self) -> Modality;

    /// Width of the rows it writes (the LLM's hidden size, after the projector).
    fn output_dim(&self) -> usize;

    /// Preprocesses one item: resize and normalise an image, resample an audio clip and compute
    /// its features. Fails with `InvalidInput` on media of the other kind or that it cannot take.
    fn prepare(&self, media: &MediaData) -> Result<PreparedMedia, EngineError>;

    /// Encodes items whose inputs share one shape in one forward; returns each item's
    /// `rows × output_dim` embedding, in order.
    fn encode(&mut self, batch: &[&PreparedMedia]) -> Result<Vec<HiddenStates>, EngineError>;
}
