//! Stage engines of the text-to-image path: text encoder → DiT → VAE.

pub mod dit;
pub mod step_cache;
pub mod text_encoder;
pub mod vae;

pub use dit::{DitCounters, DitEngine, DitSettings};
pub use text_encoder::TextEncoderEngine;
pub use vae::VaeEngine;
