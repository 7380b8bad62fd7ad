//! `transformer/config.json` of a diffusers `FluxTransformer2DModel`.

use crate::diffusion::{read_json, DiffusionError};
use serde_json::{json, Map, Value};
use std::path::Path;

/// The diffusers class this config must describe.
pub const FLUX_CLASS_NAME: &str = "FluxTransformer2DModel";

/// Width of the sinusoidal timestep / guidance features fed to `time_in` / `guidance_in`
/// (fixed by the architecture, not in the config).
pub(crate) const TIME_FEATURES: usize = 256;

/// Ratio of the MLP width to the residual width (fixed by the architecture).
pub(crate) const MLP_RATIO: usize = 4;

/// Largest width accepted for any layer (see [`FluxConfig::validate`]).
const MAX_WIDTH: usize = 1 << 24;

/// Most blocks of either kind accepted (FLUX.1 has 19 + 38); bounds what a config can make the
/// loader enumerate.
const MAX_LAYERS: usize = 4096;

/// Base of the rotary frequencies (diffusers' `FluxPosEmbed(theta=10000)`).
pub(crate) const ROPE_THETA: usize = 10_000;

/// The shape of a FLUX transformer, as diffusers' `FluxTransformer2DModel` config gives it.
///
/// Fields missing from a config file take diffusers' constructor defaults (FLUX.1 sizes), as
/// `from_pretrained` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FluxConfig {
    /// Width of a packed latent token: 4 × the latent channels (2×2 patches).
    pub in_channels: usize,
    /// Double-stream (separate text/image weights) blocks.
    pub num_layers: usize,
    /// Single-stream (joint) blocks.
    pub num_single_layers: usize,
    /// Width of one attention head.
    pub attention_head_dim: usize,
    /// Attention heads; residual width = heads × head width.
    pub num_attention_heads: usize,
    /// Width of the text-token (T5) conditioning.
    pub joint_attention_dim: usize,
    /// Width of the pooled (CLIP) conditioning.
    pub pooled_projection_dim: usize,
    /// Whether the model embeds a distilled guidance scale (FLUX-dev) or not (FLUX-schnell).
    pub guidance_embeds: bool,
    /// Rotary dimensions per position axis (text/frame, row, column); they sum to the head width.
    pub axes_dims_rope: Vec<usize>,
}

impl FluxConfig {
    /// FLUX.1-dev (and diffusers' defaults with guidance): 19 double + 38 single blocks, 24 heads
    /// of 128, T5-XXL context (4096), CLIP-L pooled (768), 16 latent channels.
    pub fn dev() -> Self {
        Self {
            in_channels: 64,
            num_layers: 19,
            num_single_layers: 38,
            attention_head_dim: 128,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            pooled_projection_dim: 768,
            guidance_embeds: true,
            axes_dims_rope: vec![16, 56, 56],
        }
    }

    /// FLUX.1-schnell: FLUX.1-dev without the guidance embedding.
    pub fn schnell() -> Self {
        Self {
            guidance_embeds: false,
            ..Self::dev()
        }
    }

    /// Reads and validates `path` (a diffusers `transformer/config.json`). A field of the wrong
    /// type or an unsupported value is a [`DiffusionError::Config`] naming the file and field.
    pub fn from_file(path: &Path) -> Result<Self, DiffusionError> {
        let value: Value = read_json(path)?;
        Self::from_value(&value).map_err(|m| DiffusionError::config(path, m))
    }

    /// Parses and validates a config already read as JSON; the error names the bad field.
    pub fn from_value(value: &Value) -> Result<Self, String> {
        let obj = value
            .as_object()
            .ok_or_else(|| "expected a JSON object".to_string())?;
        if let Some(class) = obj.get("_class_name") {
            if class.as_str() != Some(FLUX_CLASS_NAME) {
                return Err(format!(
                    "field `_class_name`: {class} is not a {FLUX_CLASS_NAME} config"
                ));
            }
        }
        let d = Self::schnell();
        let patch_size = usize_field(obj, "patch_size", 1)?;
        if patch_size != 1 {
            return Err(format!(
                "field `patch_size`: {patch_size} is unsupported; FLUX packs 2x2 latent patches \
                 outside the transformer and needs patch_size 1"
            ));
        }
        let cfg = Self {
            in_channels: usize_field(obj, "in_channels", d.in_channels)?,
            num_layers: usize_field(obj, "num_layers", d.num_layers)?,
            num_single_layers: usize_field(obj, "num_single_layers", d.num_single_layers)?,
            attention_head_dim: usize_field(obj, "attention_head_dim", d.attention_head_dim)?,
            num_attention_heads: usize_field(obj, "num_attention_heads", d.num_attention_heads)?,
            joint_attention_dim: usize_field(obj, "joint_attention_dim", d.joint_attention_dim)?,
            pooled_projection_dim: usize_field(
                obj,
                "pooled_projection_dim",
                d.pooled_projection_dim,
            )?,
            guidance_embeds: bool_field(obj, "guidance_embeds", d.guidance_embeds)?,
            axes_dims_rope: usize_list_field(obj, "axes_dims_rope", &d.axes_dims_rope)?,
        };
        match obj.get("out_channels") {
            None | Some(Value::Null) => {}
            Some(v) if v.as_u64() == Some(cfg.in_channels as u64) => {}
            Some(v) => {
                // FLUX Fill / Kontext-style checkpoints take extra conditioning channels in and
                // predict fewer out; the denoiser interface maps latents to same-shape velocity.
                return Err(format!(
                    "field `out_channels`: {v} differs from in_channels ({}); checkpoints that \
                     take extra conditioning channels are not supported",
                    cfg.in_channels
                ));
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the sizes are consistent; the error names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("in_channels", self.in_channels),
            ("attention_head_dim", self.attention_head_dim),
            ("num_attention_heads", self.num_attention_heads),
            ("joint_attention_dim", self.joint_attention_dim),
            ("pooled_projection_dim", self.pooled_projection_dim),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("field `{name}`: must be positive"));
        }
        #[allow(clippy::manual_is_multiple_of)] // `is_multiple_of` needs Rust 1.87; MSRV is 1.85
        if self.in_channels % 4 != 0 {
            return Err(format!(
                "field `in_channels`: {} is not a multiple of 4 (2x2 packed latent channels)",
                self.in_channels
            ));
        }
        if self.num_layers == 0 && self.num_single_layers == 0 {
            return Err("fields `num_layers`, `num_single_layers`: the model has no blocks".into());
        }
        for (name, v) in [
            ("num_layers", self.num_layers),
            ("num_single_layers", self.num_single_layers),
        ] {
            if v > MAX_LAYERS {
                return Err(format!("field `{name}`: {v} exceeds {MAX_LAYERS}"));
            }
        }
        // Widths far beyond any real model (FLUX.1: 3072 wide, 4096 context) would only overflow
        // shape arithmetic; bounding each keeps every weight's element count within usize.
        let hidden = self
            .num_attention_heads
            .saturating_mul(self.attention_head_dim);
        let widths = [
            ("in_channels", self.in_channels),
            ("joint_attention_dim", self.joint_attention_dim),
            ("pooled_projection_dim", self.pooled_projection_dim),
            ("num_attention_heads` x `attention_head_dim", hidden),
        ];
        if let Some((name, v)) = widths.iter().find(|(_, v)| *v > MAX_WIDTH) {
            return Err(format!("field `{name}`: {v} exceeds {MAX_WIDTH}"));
        }
        #[allow(clippy::manual_is_multiple_of)]
        if self.axes_dims_rope.is_empty() || self.axes_dims_rope.iter().any(|d| d % 2 != 0) {
            return Err(format!(
                "field `axes_dims_rope`: {:?} must be non-empty even sizes (rotary pairs)",
                self.axes_dims_rope
            ));
        }
        let sum: usize = self.axes_dims_rope.iter().sum();
        if sum != self.attention_head_dim {
            return Err(format!(
                "field `axes_dims_rope`: {:?} sums to {sum}, but the rotary embedding must cover \
                 attention_head_dim ({})",
                self.axes_dims_rope, self.attention_head_dim
            ));
        }
        if self.axes_dims_rope.len() != 3 {
            return Err(format!(
                "field `axes_dims_rope`: {:?} must have 3 axes (text/frame, row, column)",
                self.axes_dims_rope
            ));
        }
        Ok(())
    }

    /// Residual width: heads × head width.
    pub fn hidden_size(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Latent channels the model denoises (`in_channels / 4`).
    pub fn latent_channels(&self) -> usize {
        self.in_channels / 4
    }

    /// MLP inner width of both block kinds.
    pub fn mlp_hidden(&self) -> usize {
        self.hidden_size() * MLP_RATIO
    }

    /// The config as diffusers' `save_pretrained` writes it (keys sorted).
    pub fn to_diffusers_json(&self) -> Value {
        json!({
            "_class_name": FLUX_CLASS_NAME,
            "_diffusers_version": "0.42.1",
            "attention_head_dim": self.attention_head_dim,
            "axes_dims_rope": self.axes_dims_rope,
            "guidance_embeds": self.guidance_embeds,
            "in_channels": self.in_channels,
            "joint_attention_dim": self.joint_attention_dim,
            "num_attention_heads": self.num_attention_heads,
            "num_layers": self.num_layers,
            "num_single_layers": self.num_single_layers,
            "out_channels": null,
            "patch_size": 1,
            "pooled_projection_dim": self.pooled_projection_dim,
        })
    }
}

fn usize_of(name: &str, v: &Value) -> Result<usize, String> {
    v.as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| format!("field `{name}`: expected a non-negative integer, got {v}"))
}

fn usize_field(obj: &Map<String, Value>, name: &str, default: usize) -> Result<usize, String> {
    obj.get(name).map_or(Ok(default), |v| usize_of(name, v))
}

fn bool_field(obj: &Map<String, Value>, name: &str, default: bool) -> Result<bool, String> {
    match obj.get(name) {
        None => Ok(default),
        Some(v) => v
            .as_bool()
            .ok_or_else(|| format!("field `{name}`: expected true or false, got {v}")),
    }
}

fn usize_list_field(
    obj: &Map<String, Value>,
    name: &str,
    default: &[usize],
) -> Result<Vec<usize>, String> {
    match obj.get(name) {
        None => Ok(default.to_vec()),
        Some(Value::Array(items)) => items.iter().map(|v| usize_of(name, v)).collect(),
        Some(v) => Err(format!(
            "field `{name}`: expected a list of integers, got {v}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<FluxConfig, String> {
        FluxConfig::from_value(&serde_json::from_str(text).map_err(|e| e.to_string())?)
    }

    #[test]
    fn defaults_are_flux1_and_roundtrip() {
        assert_eq!(parse("{}").unwrap(), FluxConfig::schnell());
        let dev = FluxConfig::dev();
        assert_eq!(
            FluxConfig::from_value(&dev.to_diffusers_json()).unwrap(),
            dev
        );
        assert_eq!(dev.hidden_size(), 3072);
        assert_eq!(dev.latent_channels(), 16);
    }

    #[test]
    fn bad_fields_are_named() {
        for (text, field) in [
            (r#"{"patch_size": 2}"#, "patch_size"),
            (r#"{"in_channels": 10}"#, "in_channels"),
            (r#"{"in_channels": -4}"#, "in_channels"),
            (r#"{"out_channels": 32}"#, "out_channels"),
            (r#"{"guidance_embeds": "yes"}"#, "guidance_embeds"),
            (r#"{"axes_dims_rope": [16, 56]}"#, "axes_dims_rope"),
            (r#"{"axes_dims_rope": [15, 57, 56]}"#, "axes_dims_rope"),
            (r#"{"axes_dims_rope": 3}"#, "axes_dims_rope"),
            (r#"{"num_attention_heads": 0}"#, "num_attention_heads"),
            (r#"{"joint_attention_dim": 1e30}"#, "joint_attention_dim"),
            (r#"{"num_single_layers": 100000000}"#, "num_single_layers"),
            (
                r#"{"attention_head_dim": 4294967296}"#,
                "attention_head_dim",
            ),
            (r#"{"_class_name": "SD3Transformer2DModel"}"#, "_class_name"),
            (r#"{"num_layers": 0, "num_single_layers": 0}"#, "num_layers"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(field), "{text}: {err}");
        }
    }
}
