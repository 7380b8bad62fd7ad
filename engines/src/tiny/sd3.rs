//! Seeded random-weight SD3 denoisers (`SD3Transformer2DModel`) in diffusers' `transformer/`
//! layout: `config.json` and `diffusion_pytorch_model.safetensors`.
//!
//! Weights are scaled so activations stay near unit size through any depth and the timestep
//! visibly changes the output: projections are N(0, 1/fan_in), adaLN modulation linears
//! N(0, 0.25/fan_in) (small, as after training, but not zero as at SD3's init, which would
//! make every block an identity), biases N(0, 0.02²), q/k norm scales 1.

use super::llm::{normal_bytes, tensor_seed, write_json};
use super::TinyError;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Shape of a tiny SD3 transformer. `joint_attention_dim` and `pooled_projection_dim` must
/// match the text encoders the pipeline pairs it with; [`TinySd3Spec::with_text_dims`] sets
/// them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TinySd3Spec {
    /// `sample_size` written to the config (informational).
    pub sample_size: usize,
    /// Latent patch side (at least 2).
    pub patch_size: usize,
    /// Latent channels, written as both `in_channels` and `out_channels`.
    pub latent_channels: usize,
    /// Joint blocks.
    pub num_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Width of one head; hidden width = heads × head width.
    pub attention_head_dim: usize,
    /// Width of the text-token rows (the text encoders' joint width).
    pub joint_attention_dim: usize,
    /// Width of the pooled text vector.
    pub pooled_projection_dim: usize,
    /// Side of the position table, in patches.
    pub pos_embed_max_size: usize,
    /// Write SD3.5-style per-head q/k RMSNorm scales (`qk_norm: "rms_norm"`).
    pub qk_norm: bool,
    /// Blocks with an MMDiT-X second self-attention.
    pub dual_attention_layers: Vec<usize>,
}

impl TinySd3Spec {
    /// 2 layers of 2 heads × 16 (hidden 32), 4 latent channels, patch 2, a 32×32-patch
    /// position table; text widths 32 (tokens) and 64 (pooled) until
    /// [`TinySd3Spec::with_text_dims`] sets the real ones.
    pub fn tiny() -> Self {
        Self {
            sample_size: 32,
            patch_size: 2,
            latent_channels: 4,
            num_layers: 2,
            num_attention_heads: 2,
            attention_head_dim: 16,
            joint_attention_dim: 32,
            pooled_projection_dim: 64,
            pos_embed_max_size: 32,
            qk_norm: false,
            dual_attention_layers: Vec::new(),
        }
    }

    /// The same spec reading `joint_attention_dim`-wide text tokens and a
    /// `pooled_projection_dim`-wide pooled vector.
    pub fn with_text_dims(self, joint_attention_dim: usize, pooled_projection_dim: usize) -> Self {
        Self {
            joint_attention_dim,
            pooled_projection_dim,
            ..self
        }
    }

    /// Hidden width of both streams.
    pub fn hidden_size(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    fn validate(&self) -> Result<(), TinyError> {
        let bad = |m: String| Err(TinyError::InvalidSpec(m));
        let dims = [
            ("sample_size", self.sample_size),
            ("latent_channels", self.latent_channels),
            ("num_layers", self.num_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("attention_head_dim", self.attention_head_dim),
            ("joint_attention_dim", self.joint_attention_dim),
            ("pooled_projection_dim", self.pooled_projection_dim),
            ("pos_embed_max_size", self.pos_embed_max_size),
        ];
        if let Some((name, _)) = dims.iter().find(|(_, v)| *v == 0) {
            return bad(format!("{name} must be positive"));
        }
        if self.patch_size < 2 {
            return bad(format!(
                "patch_size must be at least 2, got {}",
                self.patch_size
            ));
        }
        if let Some(l) = self
            .dual_attention_layers
            .iter()
            .find(|&&l| l >= self.num_layers)
        {
            return bad(format!(
                "dual attention layer {l} is out of range for {} layers",
                self.num_layers
            ));
        }
        Ok(())
    }
}

/// How a tensor is filled.
#[derive(Debug, Clone, Copy)]
enum Fill {
    /// Seeded N(0, std²).
    Normal(f32),
    /// All ones (norm scales).
    Ones,
}

/// Std of a bias.
const BIAS_STD: f32 = 0.02;
/// Std of a position-table entry (comparable to a patch embedding, so positions matter).
const POS_STD: f32 = 0.5;
/// Gain of adaLN modulation weights relative to `1/sqrt(fan_in)`.
const MODULATION_GAIN: f32 = 0.5;

/// Every tensor of the checkpoint in diffusers' names, with its shape and fill.
fn tensor_specs(spec: &TinySd3Spec) -> Vec<(String, Vec<usize>, Fill)> {
    let d = spec.hidden_size();
    let (p, c, hd) = (
        spec.patch_size,
        spec.latent_channels,
        spec.attention_head_dim,
    );
    let mut out = Vec::new();
    let mut linear = |name: &str, rows: usize, cols: usize, gain: f32| {
        let std = gain / (cols as f32).sqrt();
        out.push((
            format!("{name}.weight"),
            vec![rows, cols],
            Fill::Normal(std),
        ));
        out.push((format!("{name}.bias"), vec![rows], Fill::Normal(BIAS_STD)));
    };
    linear("context_embedder", d, spec.joint_attention_dim, 1.0);
    let tte = "time_text_embed";
    linear(&format!("{tte}.timestep_embedder.linear_1"), d, 256, 1.0);
    linear(&format!("{tte}.timestep_embedder.linear_2"), d, d, 1.0);
    linear(
        &format!("{tte}.text_embedder.linear_1"),
        d,
        spec.pooled_projection_dim,
        1.0,
    );
    linear(&format!("{tte}.text_embedder.linear_2"), d, d, 1.0);
    let last = spec.num_layers - 1;
    let mut norms = Vec::new();
    for i in 0..spec.num_layers {
        let b = format!("transformer_blocks.{i}");
        let dual = spec.dual_attention_layers.contains(&i);
        let mut attn = vec![
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "add_q_proj",
            "add_k_proj",
            "add_v_proj",
        ];
        if i != last {
            attn.push("to_add_out");
        }
        for proj in attn {
            linear(&format!("{b}.attn.{proj}"), d, d, 1.0);
        }
        if dual {
            for proj in ["to_q", "to_k", "to_v", "to_out.0"] {
                linear(&format!("{b}.attn2.{proj}"), d, d, 1.0);
            }
        }
        if spec.qk_norm {
            for n in ["norm_q", "norm_k", "norm_added_q", "norm_added_k"] {
                norms.push(format!("{b}.attn.{n}.weight"));
            }
            if dual {
                norms.push(format!("{b}.attn2.norm_q.weight"));
                norms.push(format!("{b}.attn2.norm_k.weight"));
            }
        }
        let chunks = if dual { 9 } else { 6 };
        linear(&format!("{b}.norm1.linear"), chunks * d, d, MODULATION_GAIN);
        let context_chunks = if i == last { 2 } else { 6 };
        linear(
            &format!("{b}.norm1_context.linear"),
            context_chunks * d,
            d,
            MODULATION_GAIN,
        );
        let ffs: &[&str] = if i == last {
            &["ff"]
        } else {
            &["ff", "ff_context"]
        };
        for ff in ffs {
            linear(&format!("{b}.{ff}.net.0.proj"), 4 * d, d, 1.0);
            linear(&format!("{b}.{ff}.net.2"), d, 4 * d, 1.0);
        }
    }
    linear("norm_out.linear", 2 * d, d, MODULATION_GAIN);
    linear("proj_out", p * p * c, d, 1.0);
    let m = spec.pos_embed_max_size;
    out.push((
        "pos_embed.pos_embed".into(),
        vec![1, m * m, d],
        Fill::Normal(POS_STD),
    ));
    let conv_std = 1.0 / ((c * p * p) as f32).sqrt();
    out.push((
        "pos_embed.proj.weight".into(),
        vec![d, c, p, p],
        Fill::Normal(conv_std),
    ));
    out.push((
        "pos_embed.proj.bias".into(),
        vec![d],
        Fill::Normal(BIAS_STD),
    ));
    out.extend(norms.into_iter().map(|n| (n, vec![hd], Fill::Ones)));
    out
}

/// `config.json` as diffusers writes it (keys sorted).
fn config_json(spec: &TinySd3Spec) -> Value {
    json!({
        "_class_name": "SD3Transformer2DModel",
        "_diffusers_version": "0.31.0",
        "attention_head_dim": spec.attention_head_dim,
        "caption_projection_dim": spec.hidden_size(),
        "dual_attention_layers": spec.dual_attention_layers,
        "in_channels": spec.latent_channels,
        "joint_attention_dim": spec.joint_attention_dim,
        "num_attention_heads": spec.num_attention_heads,
        "num_layers": spec.num_layers,
        "out_channels": spec.latent_channels,
        "patch_size": spec.patch_size,
        "pooled_projection_dim": spec.pooled_projection_dim,
        "pos_embed_max_size": spec.pos_embed_max_size,
        "qk_norm": if spec.qk_norm { Value::from("rms_norm") } else { Value::Null },
        "sample_size": spec.sample_size,
    })
}

/// Writes `diffusion_pytorch_model.safetensors` (f32, `{"format": "pt"}` metadata).
fn write_weights(path: &Path, spec: &TinySd3Spec, seed: u64) -> Result<(), TinyError> {
    let specs = tensor_specs(spec);
    let data: Vec<Vec<u8>> = specs
        .iter()
        .map(|(name, shape, fill)| {
            let n = shape.iter().product::<usize>();
            match *fill {
                Fill::Normal(std) => normal_bytes(tensor_seed(seed, name), n, std),
                Fill::Ones => 1.0f32.to_le_bytes().repeat(n),
            }
        })
        .collect();
    let safetensors_err = |source| TinyError::Safetensors {
        path: path.to_path_buf(),
        source,
    };
    let mut views = Vec::with_capacity(specs.len());
    for ((name, shape, _), bytes) in specs.iter().zip(&data) {
        let view = TensorView::new(Dtype::F32, shape.clone(), bytes).map_err(safetensors_err)?;
        views.push((name.clone(), view));
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(safetensors_err)
}

/// Writes a seeded random-weight SD3 transformer of `spec` into `dir` (created if missing):
/// `config.json` and `diffusion_pytorch_model.safetensors`, returned in that order.
///
/// The same `(spec, seed)` always gives byte-identical files; another seed gives other
/// weights.
pub fn write_tiny_sd3_transformer(
    dir: &Path,
    spec: &TinySd3Spec,
    seed: u64,
) -> Result<Vec<PathBuf>, TinyError> {
    spec.validate()?;
    std::fs::create_dir_all(dir).map_err(|source| TinyError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let config = write_json(&dir.join("config.json"), &config_json(spec))?;
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    write_weights(&weights, spec, seed)?;
    Ok(vec![config, weights])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::model::{DenoiseInput, Denoiser};
    use crate::diffusion::sd3::Sd3Transformer;
    use candle_core::{DType, Device, Tensor};

    fn run(dir: &Path, sigma: f32) -> Tensor {
        let model = Sd3Transformer::load(dir, DType::F32, &Device::Cpu).unwrap();
        let dev = Device::Cpu;
        let latents = Tensor::randn(0f32, 1.0, (1, 4, 8, 6), &dev).unwrap();
        let (latents, context, pooled) = (
            latents,
            Tensor::ones((1, 3, 24), DType::F32, &dev).unwrap(),
            Tensor::ones((1, 40), DType::F32, &dev).unwrap(),
        );
        let sigmas = Tensor::new(&[sigma], &dev).unwrap();
        let input = DenoiseInput {
            latents: &latents,
            sigmas: &sigmas,
            context: &context,
            pooled: &pooled,
            guidance: None,
        };
        model.forward(&input).unwrap()
    }

    #[test]
    fn same_seed_same_bytes_and_the_checkpoint_runs() {
        let spec = TinySd3Spec::tiny().with_text_dims(24, 40);
        let (a, b, c) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let fa = write_tiny_sd3_transformer(a.path(), &spec, 3).unwrap();
        let fb = write_tiny_sd3_transformer(b.path(), &spec, 3).unwrap();
        write_tiny_sd3_transformer(c.path(), &spec, 4).unwrap();
        for (x, y) in fa.iter().zip(&fb) {
            assert_eq!(
                std::fs::read(x).unwrap(),
                std::fs::read(y).unwrap(),
                "{x:?}"
            );
        }
        let weights =
            |d: &Path| std::fs::read(d.join("diffusion_pytorch_model.safetensors")).unwrap();
        assert_ne!(weights(a.path()), weights(c.path()));

        let out = run(a.path(), 0.9);
        assert_eq!(out.dims(), &[1, 4, 8, 6]);
        let std = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let rms = (std.iter().map(|v| v * v).sum::<f32>() / std.len() as f32).sqrt();
        assert!(rms.is_finite() && (0.05..20.0).contains(&rms), "{rms}");
        let other = run(a.path(), 0.1);
        let moved = (&out - &other).unwrap().abs().unwrap().max_all().unwrap();
        assert!(
            moved.to_scalar::<f32>().unwrap() > 1e-2,
            "timestep has no effect"
        );
    }

    #[test]
    fn sd3_5_style_spec_loads() {
        let spec = TinySd3Spec {
            qk_norm: true,
            dual_attention_layers: vec![0],
            num_layers: 3,
            ..TinySd3Spec::tiny().with_text_dims(24, 40)
        };
        let dir = tempfile::tempdir().unwrap();
        write_tiny_sd3_transformer(dir.path(), &spec, 1).unwrap();
        assert_eq!(run(dir.path(), 0.5).dims(), &[1, 4, 8, 6]);
        let text = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
        assert!(text.find("\"_class_name\"") < text.find("\"attention_head_dim\""));
    }

    #[test]
    fn invalid_specs_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let spec = TinySd3Spec {
            patch_size: 1,
            ..TinySd3Spec::tiny()
        };
        assert!(write_tiny_sd3_transformer(dir.path(), &spec, 0).is_err());
        let spec = TinySd3Spec {
            dual_attention_layers: vec![2],
            ..TinySd3Spec::tiny()
        };
        assert!(write_tiny_sd3_transformer(dir.path(), &spec, 0).is_err());
    }
}
