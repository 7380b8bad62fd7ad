//! The SD3/SD3.5 transformer's shape, read from diffusers' `transformer/config.json`
//! (`SD3Transformer2DModel`).
//!
//! Fields are read one by one from the JSON object rather than through a derived
//! `Deserialize`, so that every error names the field (`num_layers: expected a positive
//! integer, got "x"`) and absent fields take diffusers' own defaults, exactly as
//! `SD3Transformer2DModel.from_config` would.

use crate::diffusion::DiffusionError;
use serde_json::{Map, Value};
use std::path::Path;

/// The `_class_name` diffusers writes for this model.
pub const SD3_CLASS_NAME: &str = "SD3Transformer2DModel";

/// How queries and keys are normalised per head before attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    /// No normalisation (SD3).
    None,
    /// Per-head RMSNorm with a learned scale, eps 1e-6 (SD3.5).
    RmsNorm,
}

/// Shape of an SD3/SD3.5 MMDiT, with diffusers' field names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sd3Config {
    /// Training latent side; informational only (the position table size is
    /// `pos_embed_max_size`).
    pub sample_size: usize,
    /// Side of the square latent patch turned into one token.
    pub patch_size: usize,
    /// Latent channels in.
    pub in_channels: usize,
    /// Latent channels out (diffusers' `null` means `in_channels`); must equal `in_channels`,
    /// because the denoiser predicts a velocity of the latents' shape.
    pub out_channels: usize,
    /// Joint blocks; the last one only reads the text stream ("context pre-only").
    pub num_layers: usize,
    /// Width of one attention head.
    pub attention_head_dim: usize,
    /// Attention heads; the hidden width is `num_attention_heads * attention_head_dim`.
    pub num_attention_heads: usize,
    /// Width of the text-token rows the context embedder takes (T5/CLIP joint width).
    pub joint_attention_dim: usize,
    /// Output width of the context embedder; must equal the hidden width.
    pub caption_projection_dim: usize,
    /// Width of the pooled text vector.
    pub pooled_projection_dim: usize,
    /// Side (in patches) of the learned square position table that is centre-cropped to the
    /// latent's patch grid.
    pub pos_embed_max_size: usize,
    /// Query/key normalisation.
    pub qk_norm: QkNorm,
    /// Blocks whose image stream has a second, image-only self-attention (MMDiT-X, SD3.5
    /// medium), in increasing order.
    pub dual_attention_layers: Vec<usize>,
}

impl Sd3Config {
    /// Reads and checks `config.json` at `path`.
    pub fn from_file(path: &Path) -> Result<Self, DiffusionError> {
        let value: Value = crate::diffusion::read_json(path)?;
        Self::from_json(&value, path)
    }

    /// Parses and checks a config object; `path` is only used to name the file in errors.
    pub fn from_json(value: &Value, path: &Path) -> Result<Self, DiffusionError> {
        let obj = value
            .as_object()
            .ok_or_else(|| DiffusionError::config(path, "expected a JSON object"))?;
        let fields = Fields { obj, path };
        if let Some(class) = obj.get("_class_name") {
            if class.as_str() != Some(SD3_CLASS_NAME) {
                return Err(fields.bad(
                    "_class_name",
                    &format!("expected {SD3_CLASS_NAME:?}"),
                    class,
                ));
            }
        }
        let in_channels = fields.usize_or("in_channels", 16)?;
        let out_channels = match obj.get("out_channels") {
            None | Some(Value::Null) => in_channels,
            Some(_) => fields.usize_or("out_channels", in_channels)?,
        };
        let qk_norm = match obj.get("qk_norm") {
            None | Some(Value::Null) => QkNorm::None,
            Some(Value::String(s)) if s == "rms_norm" => QkNorm::RmsNorm,
            Some(other) => {
                return Err(fields.bad(
                    "qk_norm",
                    "unsupported; expected null or \"rms_norm\"",
                    other,
                ))
            }
        };
        let pos_embed_max_size = match obj.get("pos_embed_max_size") {
            Some(Value::Null) => {
                return Err(DiffusionError::config(
                    path,
                    "pos_embed_max_size: null (a position table sized from sample_size) is \
                     not supported; SD3 checkpoints set it",
                ))
            }
            _ => fields.usize_or("pos_embed_max_size", 96)?,
        };
        let dual_attention_layers = match obj.get("dual_attention_layers") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => {
                let mut layers = Vec::with_capacity(items.len());
                for item in items {
                    let layer = item.as_u64().and_then(|v| usize::try_from(v).ok());
                    let layer = layer.ok_or_else(|| {
                        fields.bad("dual_attention_layers", "expected layer indices", item)
                    })?;
                    layers.push(layer);
                }
                layers.sort_unstable();
                layers.dedup();
                layers
            }
            Some(other) => {
                return Err(fields.bad("dual_attention_layers", "expected an array", other))
            }
        };
        let config = Self {
            sample_size: fields.usize_or("sample_size", 128)?,
            patch_size: fields.usize_or("patch_size", 2)?,
            in_channels,
            out_channels,
            num_layers: fields.usize_or("num_layers", 18)?,
            attention_head_dim: fields.usize_or("attention_head_dim", 64)?,
            num_attention_heads: fields.usize_or("num_attention_heads", 18)?,
            joint_attention_dim: fields.usize_or("joint_attention_dim", 4096)?,
            caption_projection_dim: fields.usize_or("caption_projection_dim", 1152)?,
            pooled_projection_dim: fields.usize_or("pooled_projection_dim", 2048)?,
            pos_embed_max_size,
            qk_norm,
            dual_attention_layers,
        };
        config.validate(path)?;
        Ok(config)
    }

    /// The residual width of both streams: `num_attention_heads * attention_head_dim`.
    pub fn hidden_size(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Whether block `layer` has the MMDiT-X second self-attention.
    pub fn is_dual_attention(&self, layer: usize) -> bool {
        self.dual_attention_layers.binary_search(&layer).is_ok()
    }

    /// Checks the values the model cannot run with; `path` names the config (or checkpoint)
    /// in errors. Called by [`Sd3Config::from_json`] and by the loaders, so a hand-built config
    /// is checked too.
    pub fn validate(&self, path: &Path) -> Result<(), DiffusionError> {
        let err = |field: &str, message: String| {
            DiffusionError::config(path, format!("{field}: {message}"))
        };
        let positive = [
            ("patch_size", self.patch_size),
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("num_layers", self.num_layers),
            ("attention_head_dim", self.attention_head_dim),
            ("num_attention_heads", self.num_attention_heads),
            ("joint_attention_dim", self.joint_attention_dim),
            ("caption_projection_dim", self.caption_projection_dim),
            ("pooled_projection_dim", self.pooled_projection_dim),
            ("pos_embed_max_size", self.pos_embed_max_size),
        ];
        if let Some((field, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(err(field, "must be positive, got 0".into()));
        }
        if self.patch_size < 2 {
            // candle's position crop and unpatchify compute the patch grid as `(h + 1) / p`,
            // which is only `h / p` for p >= 2; every SD3 checkpoint uses 2.
            return Err(err("patch_size", "1 is not supported".into()));
        }
        if self.out_channels != self.in_channels {
            return Err(err(
                "out_channels",
                format!(
                    "{} differs from in_channels ({}); the denoiser must predict a velocity \
                     of the latents' shape",
                    self.out_channels, self.in_channels
                ),
            ));
        }
        if self.caption_projection_dim != self.hidden_size() {
            return Err(err(
                "caption_projection_dim",
                format!(
                    "{} must equal num_attention_heads * attention_head_dim ({} * {} = {}), \
                     the width both streams share",
                    self.caption_projection_dim,
                    self.num_attention_heads,
                    self.attention_head_dim,
                    self.hidden_size()
                ),
            ));
        }
        if let Some(&layer) = self
            .dual_attention_layers
            .iter()
            .find(|&&l| l >= self.num_layers)
        {
            return Err(err(
                "dual_attention_layers",
                format!(
                    "layer {layer} is out of range for num_layers {}",
                    self.num_layers
                ),
            ));
        }
        if !self.dual_attention_layers.windows(2).all(|w| w[0] < w[1]) {
            return Err(err(
                "dual_attention_layers",
                "must be strictly increasing".into(),
            ));
        }
        Ok(())
    }
}

/// Field readers over one config object that name the field in errors.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    path: &'a Path,
}

impl Fields<'_> {
    fn bad(&self, field: &str, what: &str, got: &Value) -> DiffusionError {
        DiffusionError::config(self.path, format!("{field}: {what}, got {got}"))
    }

    /// A non-negative integer field (diffusers' default when absent). Positivity is left to
    /// [`Sd3Config::validate`].
    fn usize_or(&self, field: &str, default: usize) -> Result<usize, DiffusionError> {
        match self.obj.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| self.bad(field, "expected a non-negative integer", v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<Sd3Config, DiffusionError> {
        Sd3Config::from_json(&v, Path::new("transformer/config.json"))
    }

    #[test]
    fn sd3_5_medium_config_parses() {
        let c = parse(json!({
            "_class_name": "SD3Transformer2DModel",
            "attention_head_dim": 64, "caption_projection_dim": 1536,
            "dual_attention_layers": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
            "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 24,
            "num_layers": 24, "out_channels": 16, "patch_size": 2,
            "pooled_projection_dim": 2048, "pos_embed_max_size": 384, "qk_norm": "rms_norm",
            "sample_size": 128
        }))
        .unwrap();
        assert_eq!(c.hidden_size(), 1536);
        assert_eq!(c.qk_norm, QkNorm::RmsNorm);
        assert!(c.is_dual_attention(12) && !c.is_dual_attention(13));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (json!({"num_layers": "x"}), "num_layers"),
            (json!({"qk_norm": "layer_norm"}), "qk_norm"),
            (
                json!({"caption_projection_dim": 100}),
                "caption_projection_dim",
            ),
            (
                json!({"out_channels": 8, "caption_projection_dim": 1152}),
                "out_channels",
            ),
            (
                json!({"pos_embed_max_size": null, "caption_projection_dim": 1152}),
                "pos_embed_max_size",
            ),
            (
                json!({"dual_attention_layers": [40]}),
                "dual_attention_layers",
            ),
            (
                json!({"_class_name": "FluxTransformer2DModel"}),
                "_class_name",
            ),
            (json!({"patch_size": 0}), "patch_size"),
        ];
        for (value, field) in cases {
            let msg = parse(value).unwrap_err().to_string();
            assert!(msg.contains(field), "{msg}");
            assert!(msg.contains("transformer/config.json"), "{msg}");
        }
    }
}
