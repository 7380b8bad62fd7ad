//! Seeded random-weight FLUX transformers in the diffusers `transformer/` layout.
//!
//! The tensor list is the one the FLUX loader reads (`diffusion::flux`'s diffusers → BFL map,
//! itself checked against diffusers' `FluxTransformer2DModel` by the parity fixtures), so the
//! folder loads both in diffusers and here with no missing or unexpected keys.

use super::llm::{normal_bytes, tensor_seed, write_json};
use super::TinyError;
use crate::diffusion::flux::{diffusers_tensor_shapes, FluxConfig};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The weights file diffusers writes for a component.
const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";

/// Shape of a tiny FLUX transformer.
#[derive(Debug, Clone, PartialEq)]
pub struct TinyFluxSpec {
    /// Latent channels (the packed token width is 4× this).
    pub latent_channels: usize,
    /// Double-stream blocks.
    pub num_layers: usize,
    /// Single-stream blocks.
    pub num_single_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Width of one head; `axes_dims_rope` must sum to it.
    pub attention_head_dim: usize,
    /// Rotary dimensions per position axis (3 even sizes).
    pub axes_dims_rope: Vec<usize>,
    /// Width of the text-token conditioning.
    pub joint_attention_dim: usize,
    /// Width of the pooled text conditioning.
    pub pooled_projection_dim: usize,
    /// Embed a distilled guidance scale (FLUX-dev style) or not (schnell style).
    pub guidance_embeds: bool,
    /// Standard deviation of the seeded normal init of every weight and bias (qk-norm scales
    /// are ones).
    pub init_std: f32,
}

impl TinyFluxSpec {
    /// FLUX-dev shaped: 4 latent channels (as [`super::TinyVaeSpec::tiny`]), 1 double + 2 single
    /// blocks, 2 heads of 16 (rotary axes 4/6/6), 32-wide text and pooled conditioning, guidance
    /// embedding; about 0.1M parameters.
    pub fn tiny() -> Self {
        Self {
            latent_channels: 4,
            num_layers: 1,
            num_single_layers: 2,
            num_attention_heads: 2,
            attention_head_dim: 16,
            axes_dims_rope: vec![4, 6, 6],
            joint_attention_dim: 32,
            pooled_projection_dim: 32,
            guidance_embeds: true,
            init_std: 0.05,
        }
    }

    /// The diffusers config this spec writes.
    pub fn config(&self) -> FluxConfig {
        FluxConfig {
            in_channels: self.latent_channels.saturating_mul(4),
            num_layers: self.num_layers,
            num_single_layers: self.num_single_layers,
            attention_head_dim: self.attention_head_dim,
            num_attention_heads: self.num_attention_heads,
            joint_attention_dim: self.joint_attention_dim,
            pooled_projection_dim: self.pooled_projection_dim,
            guidance_embeds: self.guidance_embeds,
            axes_dims_rope: self.axes_dims_rope.clone(),
        }
    }

    /// Number of parameters.
    pub fn num_parameters(&self) -> usize {
        diffusers_tensor_shapes(&self.config())
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    fn validate(&self) -> Result<FluxConfig, TinyError> {
        let config = self.config();
        config.validate().map_err(TinyError::InvalidSpec)?;
        if !(self.init_std.is_finite() && self.init_std > 0.0) {
            return Err(TinyError::InvalidSpec(format!(
                "init_std must be positive, got {}",
                self.init_std
            )));
        }
        Ok(config)
    }
}

/// Writes `diffusion_pytorch_model.safetensors` (f32, `{"format": "pt"}` metadata).
fn write_weights(path: &Path, spec: &TinyFluxSpec, seed: u64) -> Result<(), TinyError> {
    let shapes = diffusers_tensor_shapes(&spec.config());
    let data: Vec<Vec<u8>> = shapes
        .iter()
        .map(|(name, shape)| {
            let n = shape.iter().product::<usize>();
            // RMSNorm scales start at one, as diffusers initialises them.
            if name.contains(".attn.norm_") {
                1.0f32.to_le_bytes().repeat(n)
            } else {
                normal_bytes(tensor_seed(seed, name), n, spec.init_std)
            }
        })
        .collect();
    let safetensors_err = |source| TinyError::Safetensors {
        path: path.to_path_buf(),
        source,
    };
    let mut views = Vec::with_capacity(shapes.len());
    for ((name, shape), bytes) in shapes.iter().zip(&data) {
        let view = TensorView::new(Dtype::F32, shape.clone(), bytes).map_err(safetensors_err)?;
        views.push((name.clone(), view));
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(safetensors_err)
}

/// Writes a seeded random-weight FLUX transformer into `dir` (created if missing): `config.json`
/// (diffusers' `FluxTransformer2DModel` config, keys sorted) and
/// `diffusion_pytorch_model.safetensors`, returned in that order.
///
/// The same `(spec, seed)` always gives byte-identical files; another seed gives other weights.
pub fn write_tiny_flux_transformer(
    dir: &Path,
    spec: &TinyFluxSpec,
    seed: u64,
) -> Result<Vec<PathBuf>, TinyError> {
    let config = spec.validate()?;
    std::fs::create_dir_all(dir).map_err(|source| TinyError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let config = write_json(&dir.join("config.json"), &config.to_diffusers_json())?;
    let weights = dir.join(WEIGHTS_FILE);
    write_weights(&weights, spec, seed)?;
    Ok(vec![config, weights])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_spec_is_small_and_valid() {
        let spec = TinyFluxSpec::tiny();
        assert!(spec.validate().is_ok());
        let n = spec.num_parameters();
        assert!((50_000..200_000).contains(&n), "{n}");
    }

    #[test]
    fn invalid_specs_are_rejected() {
        let mutations: [fn(&mut TinyFluxSpec); 4] = [
            |s| s.latent_channels = 0,
            |s| s.axes_dims_rope = vec![4, 4, 4],
            |s| s.num_attention_heads = 0,
            |s| s.init_std = f32::NAN,
        ];
        for mutate in mutations {
            let mut s = TinyFluxSpec::tiny();
            mutate(&mut s);
            assert!(
                matches!(s.validate(), Err(TinyError::InvalidSpec(_))),
                "{s:?}"
            );
        }
    }
}
