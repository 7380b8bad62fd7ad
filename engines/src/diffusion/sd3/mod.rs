//! Stable Diffusion 3 / 3.5 denoiser: the MMDiT (and SD3.5-medium's MMDiT-X) transformer.
//!
//! * `config`: `transformer/config.json` (`SD3Transformer2DModel`), every error naming the
//!   field;
//! * `weights`: diffusers tensor names mapped onto SD3's, plus the config/checkpoint
//!   consistency checks;
//! * `blocks`: joint blocks, final layer and conditioning MLPs on candle-transformers'
//!   MMDiT projections;
//! * `transformer`: [`Sd3Transformer`], the loaders and the
//!   [`Denoiser`](crate::diffusion::model::Denoiser) implementation.
//!
//! Head count and head width come from the config (`num_attention_heads`,
//! `attention_head_dim`), unlike candle's `MMDiT::new`, which assumes heads == depth; the
//! forward is split into embed / blocks / head for step caching.

mod blocks;
pub mod config;
mod transformer;
mod weights;

pub use config::{QkNorm, Sd3Config, SD3_CLASS_NAME};
pub use transformer::{Sd3Embedded, Sd3Transformer, SINGLE_FILE_PREFIX};
