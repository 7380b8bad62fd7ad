//! The AutoencoderKL decoder that turns the denoiser's latents into RGB images, in the diffusers
//! `vae/` layout (SD 1.x/2.x, SDXL, SD3/SD3.5 and FLUX all ship this class).
//!
//! The network itself is candle-transformers' `stable_diffusion::vae::AutoEncoderKL`, which reads
//! diffusers' tensor names as they are. What this module adds is what the diffusers pipelines do
//! around it, so the bytes we serve match theirs:
//! - the latent scaling undone exactly as SD3's and FLUX's pipelines do
//!   (`latents / scaling_factor + shift_factor`) before decoding;
//! - the `[-1, 1]` → `u8` conversion of `VaeImageProcessor.postprocess` + `numpy_to_pil`
//!   (`(x * 0.5 + 0.5).clamp(0, 1)`, then `(x * 255).round()` with numpy's round-half-to-even);
//! - a config reader that refuses every setting candle's network would silently get wrong.

use super::{read_json, DiffusionError};
use crate::llm::weights::{
    classify_load_error, find_safetensors_with_stem, mmap_var_builder, DIFFUSERS_STEM,
};
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};
use omnistage_stages::RgbImages;
use serde_json::{Map, Value};
use std::path::Path;

/// The diffusers `_class_name` this module implements.
pub const VAE_CLASS_NAME: &str = "AutoencoderKL";

/// Most resolution levels accepted; real VAEs have 4. Bounds the `2^(levels-1)` downscale
/// factor so it cannot overflow.
const MAX_LEVELS: usize = 8;

/// A diffusers `AutoencoderKL` config (`vae/config.json`), validated against what the candle
/// network implements. Absent fields take diffusers' defaults, as `from_pretrained` does.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    /// Image channels the encoder takes.
    pub in_channels: usize,
    /// Image channels the decoder produces; always 3 (RGB) here.
    pub out_channels: usize,
    /// Channels of the latent space (4 for SD/SDXL, 16 for SD3 and FLUX).
    pub latent_channels: usize,
    /// Channel width of each resolution level, finest first.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder level (the decoder has one more per level).
    pub layers_per_block: usize,
    /// GroupNorm groups; divides every entry of `block_out_channels`.
    pub norm_num_groups: usize,
    /// The training resolution (informational; tiling is not implemented).
    pub sample_size: usize,
    /// The denoiser's latents are `(vae_latents - shift_factor) * scaling_factor`.
    pub scaling_factor: f64,
    /// See `scaling_factor`; `null` or absent in the config means 0.
    pub shift_factor: f64,
    /// A 1×1 conv after the encoder (SD/SDXL have it, SD3/FLUX do not).
    pub use_quant_conv: bool,
    /// A 1×1 conv before the decoder (SD/SDXL have it, SD3/FLUX do not).
    pub use_post_quant_conv: bool,
    /// diffusers runs the VAE in f32 when set (SDXL's VAE overflows in f16); callers choosing
    /// the load dtype should honour it.
    pub force_upcast: bool,
}

/// Typed access to the config's JSON object, naming the field in every error.
struct Fields<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn err(&self, field: &str, message: impl std::fmt::Display) -> DiffusionError {
        DiffusionError::config(self.path, format!("field `{field}`: {message}"))
    }

    /// The value of `field`, `None` when absent or `null`.
    fn get(&self, field: &str) -> Option<&Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    fn positive(&self, field: &str, default: usize) -> Result<usize, DiffusionError> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => as_positive(v)
                .ok_or_else(|| self.err(field, format!("expected a positive integer, got {v}"))),
        }
    }

    fn boolean(&self, field: &str, default: bool) -> Result<bool, DiffusionError> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(field, format!("expected true or false, got {v}"))),
        }
    }

    fn finite(&self, field: &str, default: f64) -> Result<f64, DiffusionError> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| self.err(field, format!("expected a finite number, got {v}"))),
        }
    }

    /// A list of block type names that must all be `expected` (the only block candle builds).
    fn block_types(
        &self,
        field: &str,
        levels: usize,
        expected: &str,
    ) -> Result<(), DiffusionError> {
        let Some(v) = self.get(field) else {
            // diffusers' default is a single level.
            return if levels == 1 {
                Ok(())
            } else {
                Err(self.err(
                    field,
                    format!("absent, but block_out_channels has {levels} levels"),
                ))
            };
        };
        let list = v
            .as_array()
            .ok_or_else(|| self.err(field, format!("expected a list, got {v}")))?;
        if list.len() != levels {
            return Err(self.err(
                field,
                format!(
                    "has {} entries, block_out_channels has {levels}",
                    list.len()
                ),
            ));
        }
        match list.iter().find(|t| t.as_str() != Some(expected)) {
            Some(t) => Err(self.err(field, format!("unsupported block {t}; only {expected:?}"))),
            None => Ok(()),
        }
    }
}

fn as_positive(v: &Value) -> Option<usize> {
    v.as_u64()
        .filter(|&n| n > 0)
        .and_then(|n| usize::try_from(n).ok())
}

impl VaeConfig {
    /// Reads and validates `vae/config.json`. Every error names the file and the field.
    pub fn from_file(path: &Path) -> Result<Self, DiffusionError> {
        Self::from_value(path, &read_json::<Value>(path)?)
    }

    /// Validates an already-parsed config; `path` is only used in error messages.
    pub fn from_value(path: &Path, json: &Value) -> Result<Self, DiffusionError> {
        let obj = json
            .as_object()
            .ok_or_else(|| DiffusionError::config(path, "expected a JSON object"))?;
        let f = Fields { path, obj };
        if let Some(class) = f.get("_class_name") {
            if class.as_str() != Some(VAE_CLASS_NAME) {
                return Err(f.err(
                    "_class_name",
                    format!("{class} is not supported; only {VAE_CLASS_NAME:?}"),
                ));
            }
        }
        let block_out_channels = match f.get("block_out_channels") {
            None => vec![64],
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(as_positive).collect::<Option<Vec<_>>>())
                .filter(|a| (1..=MAX_LEVELS).contains(&a.len()))
                .ok_or_else(|| {
                    f.err(
                        "block_out_channels",
                        format!("expected 1 to {MAX_LEVELS} positive integers, got {v}"),
                    )
                })?,
        };
        let levels = block_out_channels.len();
        f.block_types("down_block_types", levels, "DownEncoderBlock2D")?;
        f.block_types("up_block_types", levels, "UpDecoderBlock2D")?;
        if let Some(act) = f.get("act_fn") {
            if act.as_str() != Some("silu") {
                return Err(f.err("act_fn", format!("{act} is not supported; only \"silu\"")));
            }
        }
        if !f.boolean("mid_block_add_attention", true)? {
            return Err(f.err("mid_block_add_attention", "false is not supported"));
        }
        // SDXL-style per-channel latent statistics change the un-scaling formula; refusing them
        // beats decoding every image slightly wrong.
        for field in ["latents_mean", "latents_std"] {
            if f.get(field).is_some() {
                return Err(f.err(field, "per-channel latent statistics are not supported"));
            }
        }
        let norm_num_groups = f.positive("norm_num_groups", 32)?;
        if let Some(c) = block_out_channels
            .iter()
            .find(|&&c| c % norm_num_groups != 0)
        {
            return Err(f.err(
                "norm_num_groups",
                format!("{norm_num_groups} does not divide block_out_channels entry {c}"),
            ));
        }
        let out_channels = f.positive("out_channels", 3)?;
        if out_channels != 3 {
            return Err(f.err("out_channels", format!("{out_channels}; only 3 (RGB)")));
        }
        let sample_size = match f.get("sample_size") {
            None => 32,
            // diffusers accepts `[h, w]` and uses the first entry.
            Some(Value::Array(a)) => a.first().and_then(as_positive).ok_or_else(|| {
                f.err(
                    "sample_size",
                    "expected a positive integer or a list of them",
                )
            })?,
            Some(_) => f.positive("sample_size", 32)?,
        };
        let scaling_factor = f.finite("scaling_factor", 0.18215)?;
        if scaling_factor == 0.0 {
            return Err(f.err("scaling_factor", "must not be 0"));
        }
        Ok(Self {
            in_channels: f.positive("in_channels", 3)?,
            out_channels,
            latent_channels: f.positive("latent_channels", 4)?,
            layers_per_block: f.positive("layers_per_block", 1)?,
            norm_num_groups,
            sample_size,
            scaling_factor,
            shift_factor: f.finite("shift_factor", 0.0)?,
            use_quant_conv: f.boolean("use_quant_conv", true)?,
            use_post_quant_conv: f.boolean("use_post_quant_conv", true)?,
            force_upcast: f.boolean("force_upcast", true)?,
            block_out_channels,
        })
    }

    /// Image pixels per latent pixel along each side: one 2× upsample per level but the last.
    pub fn downscale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}

/// A loaded AutoencoderKL, used for decoding.
#[derive(Debug)]
pub struct Vae {
    model: AutoEncoderKL,
    config: VaeConfig,
    dtype: DType,
    device: Device,
}

/// Turns a candle error raised while building the network into a weights error naming the
/// missing or misshapen tensor when it is one.
fn load_error(err: candle_core::Error) -> DiffusionError {
    match classify_load_error(err) {
        Ok(weights) => DiffusionError::Weights(weights),
        Err(other) => DiffusionError::Candle(other),
    }
}

impl Vae {
    /// Loads `vae_dir/config.json` and `vae_dir/diffusion_pytorch_model*.safetensors` with
    /// weights of `dtype` (f32, f16 or bf16) on `device`. The encoder's weights are loaded too
    /// (candle builds the whole autoencoder), so the checkpoint must be complete.
    pub fn load(vae_dir: &Path, dtype: DType, device: &Device) -> Result<Self, DiffusionError> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(DiffusionError::Input(format!(
                "VAE dtype must be f32, f16 or bf16, not {dtype:?}"
            )));
        }
        let config = VaeConfig::from_file(&vae_dir.join("config.json"))?;
        let files = find_safetensors_with_stem(vae_dir, DIFFUSERS_STEM)?;
        let vb = mmap_var_builder(files, dtype, device)?;
        let kl = AutoEncoderKLConfig {
            block_out_channels: config.block_out_channels.clone(),
            layers_per_block: config.layers_per_block,
            latent_channels: config.latent_channels,
            norm_num_groups: config.norm_num_groups,
            use_quant_conv: config.use_quant_conv,
            use_post_quant_conv: config.use_post_quant_conv,
        };
        let model = AutoEncoderKL::new(vb, config.in_channels, config.out_channels, kl)
            .map_err(load_error)?;
        Ok(Self {
            model,
            config,
            dtype,
            device: device.clone(),
        })
    }

    /// The validated config.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Channels of the latents [`Vae::decode`] takes.
    pub fn latent_channels(&self) -> usize {
        self.config.latent_channels
    }

    /// Image pixels per latent pixel along each side.
    pub fn downscale_factor(&self) -> usize {
        self.config.downscale_factor()
    }

    /// The dtype the weights were loaded in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Decodes `[B, latent_channels, h, w]` f32 latents in the denoiser's space into
    /// `[B, 3, h·f, w·f]` f32 images in `[-1, 1]` (values may overshoot; [`to_rgb_images`]
    /// clamps), `f` = [`Vae::downscale_factor`].
    ///
    /// The pipeline's scaling is undone in f32 first, `latents / scaling_factor +
    /// shift_factor`, as two separate f32 operations like diffusers' SD3 and FLUX pipelines,
    /// then the result is cast to the weights' dtype.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor, DiffusionError> {
        let (b, c, h, w) = latents.dims4().map_err(|_| {
            DiffusionError::Input(format!(
                "VAE latents must be [batch, channels, height, width], got {:?}",
                latents.dims()
            ))
        })?;
        if c != self.config.latent_channels {
            return Err(DiffusionError::Input(format!(
                "VAE latents have {c} channels, the VAE takes {}",
                self.config.latent_channels
            )));
        }
        if b == 0 || h == 0 || w == 0 {
            return Err(DiffusionError::Input(format!(
                "VAE latents are empty: {:?}",
                latents.dims()
            )));
        }
        if latents.dtype() != DType::F32 {
            return Err(DiffusionError::Input(format!(
                "VAE latents must be f32, got {:?}",
                latents.dtype()
            )));
        }
        let latents = latents.to_device(&self.device)?;
        // Scalar tensors, not `Tensor / f64` (which multiplies by the reciprocal), so the
        // division rounds exactly like torch's `latents / scaling_factor`.
        let scale = Tensor::new(self.config.scaling_factor as f32, &self.device)?;
        let shift = Tensor::new(self.config.shift_factor as f32, &self.device)?;
        let z = latents.broadcast_div(&scale)?.broadcast_add(&shift)?;
        let z = z.to_dtype(self.dtype)?;
        let image = if self.device.is_cpu() && b > 1 {
            // candle 0.11.1's CPU matmul folds a batched lhs into one `(b·m, k)` matrix when the
            // rhs is batch-invariant, which is wrong when the lhs is a transposed view: exactly
            // the mid-block attention's `Linear` on `[B, H·W, C]`. Every row after the first
            // comes out wrong, so on CPU each image is decoded alone (bit-identical to a batch
            // of one). CUDA and Metal use strided batched GEMMs and take the whole batch.
            let rows = (0..b)
                .map(|i| self.model.decode(&z.narrow(0, i, 1)?))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&rows, 0)?
        } else {
            self.model.decode(&z)?
        };
        Ok(image.to_dtype(DType::F32)?)
    }
}

/// Converts a decoded `[N, 3, H, W]` batch (values nominally in `[-1, 1]`) into `N` RGB images
/// of `H × W × 3` bytes, exactly as diffusers' `VaeImageProcessor.postprocess` followed by
/// `numpy_to_pil`: `v = (x * 0.5 + 0.5).clamp(0, 1)` in f32, then `(v * 255).round()` with
/// numpy's round-half-to-even, then a cast to `u8`. A NaN pixel becomes 0.
pub fn to_rgb_images(decoded: &Tensor) -> Result<RgbImages, DiffusionError> {
    let (n, c, height, width) = decoded.dims4().map_err(|_| {
        DiffusionError::Input(format!(
            "decoded images must be [n, 3, height, width], got {:?}",
            decoded.dims()
        ))
    })?;
    if c != 3 {
        return Err(DiffusionError::Input(format!(
            "decoded images must have 3 channels, got {c}"
        )));
    }
    let hwc = decoded
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .permute((0, 2, 3, 1))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let pixels: Vec<u8> = hwc.into_iter().map(to_byte).collect();
    Ok(RgbImages {
        pixels: pixels.into(),
        n,
        height,
        width,
    })
}

/// One channel value in `[-1, 1]` to a byte, with diffusers' arithmetic (see [`to_rgb_images`]).
fn to_byte(x: f32) -> u8 {
    // Two roundings, as torch does them (`images * 0.5 + 0.5`); no fused multiply-add.
    let v = (x * 0.5 + 0.5).clamp(0.0, 1.0);
    // `as` saturates (and maps NaN to 0), like numpy's cast of an in-range value.
    (v * 255.0).round_ties_even() as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<VaeConfig, DiffusionError> {
        VaeConfig::from_value(Path::new("vae/config.json"), &v)
    }

    #[test]
    fn defaults_match_diffusers() {
        let c = parse(json!({})).unwrap();
        assert_eq!(c.block_out_channels, vec![64]);
        assert_eq!(
            (c.latent_channels, c.norm_num_groups, c.sample_size),
            (4, 32, 32)
        );
        assert_eq!((c.scaling_factor, c.shift_factor), (0.18215, 0.0));
        assert!(c.use_quant_conv && c.use_post_quant_conv && c.force_upcast);
        assert_eq!(c.downscale_factor(), 1);
        let c = parse(json!({
            "block_out_channels": [128, 256, 512, 512],
            "down_block_types": vec!["DownEncoderBlock2D"; 4],
            "up_block_types": vec!["UpDecoderBlock2D"; 4],
            "shift_factor": null, "sample_size": [1024, 1024],
        }))
        .unwrap();
        assert_eq!(
            (c.downscale_factor(), c.shift_factor, c.sample_size),
            (8, 0.0, 1024)
        );
    }

    #[test]
    fn unsupported_values_name_the_field() {
        let cases = [
            (json!({"_class_name": "AutoencoderTiny"}), "_class_name"),
            (json!({"block_out_channels": []}), "block_out_channels"),
            (json!({"block_out_channels": [8, 16]}), "down_block_types"),
            (json!({"up_block_types": ["UpBlock2D"]}), "up_block_types"),
            (json!({"act_fn": "gelu"}), "act_fn"),
            (json!({"norm_num_groups": 5}), "norm_num_groups"),
            (json!({"latent_channels": 0}), "latent_channels"),
            (json!({"out_channels": 1}), "out_channels"),
            (json!({"scaling_factor": 0}), "scaling_factor"),
            (json!({"shift_factor": "x"}), "shift_factor"),
            (json!({"latents_mean": [0.0]}), "latents_mean"),
            (json!({"use_quant_conv": 1}), "use_quant_conv"),
            (
                json!({"mid_block_add_attention": false}),
                "mid_block_add_attention",
            ),
        ];
        for (config, field) in cases {
            let err = parse(config.clone()).unwrap_err().to_string();
            assert!(err.contains(&format!("`{field}`")), "{config}: {err}");
            assert!(err.contains("vae/config.json"), "{err}");
        }
    }

    #[test]
    fn bytes_round_like_numpy() {
        assert_eq!(to_byte(-1.0), 0);
        assert_eq!(to_byte(1.0), 255);
        assert_eq!(to_byte(-7.0), 0);
        assert_eq!(to_byte(3.0), 255);
        assert_eq!(to_byte(f32::NAN), 0);
        // 0.5 * 255 = 127.5 exactly: numpy rounds half to even.
        assert_eq!(to_byte(0.0), 128);
        assert_eq!(to_byte(-0.5), 64); // 63.75
        assert_eq!(to_byte(0.5), 191); // 191.25
    }
}
