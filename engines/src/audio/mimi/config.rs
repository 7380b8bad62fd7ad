//! Mimi's configuration: Transformers' `MimiConfig` (`config.json` of `kyutai/mimi`) read and
//! validated against what candle's `models::mimi` network implements, and turned into candle's
//! [`mimi::Config`].

use crate::audio::codec::CodecError;
use candle_core::DType;
use candle_transformers::models::mimi;
use serde_json::{Map, Value};
use std::path::Path;

/// Transformer positions per codec frame: Mimi's encoder runs at twice the frame rate and the
/// decoder upsamples by this stride (Transformers hardcodes `stride=2`).
pub const UPSAMPLE_STRIDE: usize = 2;

/// Loading settings that are not part of the checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct MimiSettings {
    /// Codebooks per frame the talker emits (Moshi: 8, Sesame CSM: 32); `None` = every
    /// quantizer of the checkpoint. Must be between 1 and the config's `num_quantizers`.
    pub num_codebooks: Option<usize>,
    /// Longest stream, in frames, a decode accepts (sizes the rotary table); longer input is
    /// refused as invalid codes. Default 22 500 (30 minutes at 12.5 Hz).
    pub max_frames: usize,
    /// Weight and activation dtype (f32, f16 or bf16). Default f32.
    pub dtype: DType,
}

impl Default for MimiSettings {
    fn default() -> Self {
        Self {
            num_codebooks: None,
            max_frames: 22_500,
            dtype: DType::F32,
        }
    }
}

/// A validated Mimi config (the fields of Transformers' `MimiConfig` the decoder uses).
#[derive(Debug, Clone, PartialEq)]
pub struct MimiConfig {
    /// Output sample rate in Hz (`sampling_rate`).
    pub sample_rate: u32,
    /// SEANet / transformer width (`hidden_size`).
    pub hidden_size: usize,
    /// `num_filters`.
    pub num_filters: usize,
    /// `num_residual_layers`.
    pub num_residual_layers: usize,
    /// Decoder upsampling ratios, first applied first (`upsampling_ratios`).
    pub upsampling_ratios: Vec<usize>,
    /// `kernel_size` of the first convolution.
    pub kernel_size: usize,
    /// `last_kernel_size`.
    pub last_kernel_size: usize,
    /// `residual_kernel_size`.
    pub residual_kernel_size: usize,
    /// `dilation_growth_rate`.
    pub dilation_growth_rate: usize,
    /// `compress`.
    pub compress: usize,
    /// `use_conv_shortcut`.
    pub use_conv_shortcut: bool,
    /// Entries per codebook (`codebook_size`).
    pub codebook_size: usize,
    /// Codebook vector width (`codebook_dim` = `vector_quantization_hidden_dimension`).
    pub codebook_dim: usize,
    /// Quantizers in the checkpoint (`num_quantizers`; the first is the semantic one).
    pub num_quantizers: usize,
    /// `num_hidden_layers`.
    pub num_hidden_layers: usize,
    /// `num_attention_heads`.
    pub num_attention_heads: usize,
    /// `intermediate_size`.
    pub intermediate_size: usize,
    /// Attention window in transformer positions, the current one included (`sliding_window`).
    pub sliding_window: usize,
    /// `rope_theta` (or `rope_parameters.rope_theta`).
    pub rope_theta: f64,
    /// `layer_scale_initial_scale` (the checkpoint's scales are what is used).
    pub layer_scale_initial_scale: f64,
    /// `attention_bias`.
    pub attention_bias: bool,
}

impl MimiConfig {
    /// `kyutai/mimi` (Transformers' `MimiConfig()` defaults, the same network as candle's
    /// `Config::v0_1`): 24 kHz, 12.5 Hz, 32 quantizers of 2048 entries.
    pub fn kyutai_v0_1() -> Self {
        Self {
            sample_rate: 24_000,
            hidden_size: 512,
            num_filters: 64,
            num_residual_layers: 1,
            upsampling_ratios: vec![8, 6, 5, 4],
            kernel_size: 7,
            last_kernel_size: 3,
            residual_kernel_size: 3,
            dilation_growth_rate: 2,
            compress: 2,
            use_conv_shortcut: false,
            codebook_size: 2048,
            codebook_dim: 256,
            num_quantizers: 32,
            num_hidden_layers: 8,
            num_attention_heads: 8,
            intermediate_size: 2048,
            sliding_window: 250,
            rope_theta: 10_000.0,
            layer_scale_initial_scale: 0.01,
            attention_bias: false,
        }
    }

    /// Samples per SEANet step (product of the upsampling ratios).
    pub fn hop_length(&self) -> usize {
        self.upsampling_ratios.iter().product()
    }

    /// PCM samples one codec frame decodes to.
    pub fn samples_per_frame(&self) -> usize {
        self.hop_length() * UPSAMPLE_STRIDE
    }

    /// Codec frames per second.
    pub fn frame_rate(&self) -> f64 {
        f64::from(self.sample_rate) / self.samples_per_frame() as f64
    }

    /// Reads and validates `config.json`. Every error names the file and the field.
    pub fn from_file(path: &Path) -> Result<Self, CodecError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CodecError::Load(format!("{}: cannot read: {e}", path.display())))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| CodecError::Load(format!("{}: invalid JSON: {e}", path.display())))?;
        Self::from_value(path, &json)
    }

    /// Validates an already-parsed config; `path` is only used in error messages. Absent
    /// fields take Transformers' `MimiConfig` defaults.
    pub fn from_value(path: &Path, json: &Value) -> Result<Self, CodecError> {
        let obj = json.as_object().ok_or_else(|| {
            CodecError::Load(format!("{}: expected a JSON object", path.display()))
        })?;
        let f = Fields { path, obj };
        let d = Self::kyutai_v0_1();
        if let Some(t) = f.get("model_type") {
            if t.as_str() != Some("mimi") {
                return Err(f.err("model_type", format!("{t} is not \"mimi\"")));
            }
        }
        f.expect_eq(
            "audio_channels",
            &Value::from(1),
            "only mono (1) is supported",
        )?;
        f.expect_eq(
            "use_causal_conv",
            &Value::Bool(true),
            "only causal Mimi streams",
        )?;
        f.expect_eq("pad_mode", &Value::from("constant"), "only \"constant\"")?;
        f.expect_eq("hidden_act", &Value::from("gelu"), "only \"gelu\"")?;
        f.expect_eq("num_semantic_quantizers", &Value::from(1), "only 1")?;
        if let Some(v) = f.get("trim_right_ratio") {
            if v.as_f64() != Some(1.0) {
                return Err(f.err("trim_right_ratio", format!("{v}; only 1.0")));
            }
        }
        if let Some(v) = f.get("norm_eps") {
            if !v.as_f64().is_some_and(|e| (e - 1e-5).abs() < 1e-12) {
                return Err(f.err("norm_eps", format!("{v}; candle's LayerNorm uses 1e-5")));
            }
        }
        let ratios = match f.get("upsampling_ratios") {
            None => d.upsampling_ratios.clone(),
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(as_positive).collect::<Option<Vec<_>>>())
                .filter(|a| !a.is_empty())
                .ok_or_else(|| f.err("upsampling_ratios", format!("{v}: expected ratios")))?,
        };
        let heads = f.positive("num_attention_heads", d.num_attention_heads)?;
        let hidden = f.positive("hidden_size", d.hidden_size)?;
        if hidden % heads != 0 || (hidden / heads) % 2 != 0 {
            return Err(f.err(
                "num_attention_heads",
                format!("{heads} heads do not split hidden_size {hidden} into even head dims"),
            ));
        }
        if f.positive("head_dim", hidden / heads)? != hidden / heads {
            return Err(f.err("head_dim", "must be hidden_size / num_attention_heads"));
        }
        if f.positive("num_key_value_heads", heads)? != heads {
            return Err(f.err("num_key_value_heads", "must equal num_attention_heads"));
        }
        if f.positive("upsample_groups", hidden)? != hidden {
            return Err(f.err("upsample_groups", "must equal hidden_size"));
        }
        let codebook_dim = f.positive("codebook_dim", d.codebook_dim)?;
        let vq_dim = f.positive("vector_quantization_hidden_dimension", d.codebook_dim)?;
        if vq_dim != codebook_dim {
            return Err(f.err(
                "vector_quantization_hidden_dimension",
                format!("{vq_dim} differs from codebook_dim {codebook_dim}"),
            ));
        }
        let rope_theta = match f.get("rope_parameters").and_then(Value::as_object) {
            Some(rp) => {
                if let Some(t) = rp
                    .get("rope_type")
                    .filter(|t| t.as_str() != Some("default"))
                {
                    return Err(f.err("rope_parameters", format!("rope_type {t}; only default")));
                }
                rp.get("rope_theta")
                    .and_then(Value::as_f64)
                    .unwrap_or(d.rope_theta)
            }
            None => f.finite("rope_theta", d.rope_theta)?,
        };
        if f.get("rope_scaling").is_some() {
            return Err(f.err("rope_scaling", "RoPE scaling is not supported"));
        }
        let num_quantizers = f.positive("num_quantizers", d.num_quantizers)?;
        if num_quantizers < 2 {
            return Err(f.err(
                "num_quantizers",
                "needs a semantic and an acoustic quantizer",
            ));
        }
        let compress = f.positive("compress", d.compress)?;
        let num_filters = f.positive("num_filters", d.num_filters)?;
        if num_filters % compress != 0 || hidden % compress != 0 {
            return Err(f.err("compress", format!("{compress} does not divide the widths")));
        }
        let cfg = Self {
            sample_rate: f
                .positive("sampling_rate", 24_000)?
                .try_into()
                .map_err(|_| f.err("sampling_rate", "too large"))?,
            hidden_size: hidden,
            num_filters,
            num_residual_layers: f.positive("num_residual_layers", d.num_residual_layers)?,
            upsampling_ratios: ratios,
            kernel_size: f.positive("kernel_size", d.kernel_size)?,
            last_kernel_size: f.positive("last_kernel_size", d.last_kernel_size)?,
            residual_kernel_size: f.positive("residual_kernel_size", d.residual_kernel_size)?,
            dilation_growth_rate: f.positive("dilation_growth_rate", d.dilation_growth_rate)?,
            compress,
            use_conv_shortcut: f.boolean("use_conv_shortcut", false)?,
            codebook_size: f.positive("codebook_size", d.codebook_size)?,
            codebook_dim,
            num_quantizers,
            num_hidden_layers: f.positive("num_hidden_layers", d.num_hidden_layers)?,
            num_attention_heads: heads,
            intermediate_size: f.positive("intermediate_size", d.intermediate_size)?,
            sliding_window: f.positive("sliding_window", d.sliding_window)?,
            rope_theta,
            layer_scale_initial_scale: f
                .finite("layer_scale_initial_scale", d.layer_scale_initial_scale)?,
            attention_bias: f.boolean("attention_bias", false)?,
        };
        if cfg.sample_rate as usize % cfg.hop_length() != 0 {
            return Err(f.err(
                "upsampling_ratios",
                format!("hop {} does not divide sampling_rate", cfg.hop_length()),
            ));
        }
        if let Some(v) = f.get("frame_rate") {
            let want = cfg.frame_rate();
            if !v.as_f64().is_some_and(|r| (r - want).abs() < 1e-6 * want) {
                return Err(f.err(
                    "frame_rate",
                    format!("{v}, but the ratios and 2x upsampling give {want}"),
                ));
            }
        }
        Ok(cfg)
    }

    /// candle's config for this network with `n_q` codebooks and a rotary table of
    /// `max_positions` transformer positions.
    pub fn to_candle(&self, n_q: usize, max_positions: usize) -> mimi::Config {
        use mimi::{conv, seanet, transformer};
        let seanet = seanet::Config {
            dimension: self.hidden_size,
            channels: 1,
            causal: true,
            n_filters: self.num_filters,
            n_residual_layers: self.num_residual_layers,
            activation: candle_nn::Activation::Elu(1.),
            compress: self.compress,
            dilation_base: self.dilation_growth_rate,
            disable_norm_outer_blocks: 0,
            final_activation: None,
            kernel_size: self.kernel_size,
            residual_kernel_size: self.residual_kernel_size,
            last_kernel_size: self.last_kernel_size,
            lstm: 0,
            norm: conv::Norm::WeightNorm,
            pad_mode: conv::PadMode::Constant,
            ratios: self.upsampling_ratios.clone(),
            true_skip: !self.use_conv_shortcut,
        };
        let transformer = transformer::Config {
            d_model: self.hidden_size,
            num_heads: self.num_attention_heads,
            num_layers: self.num_hidden_layers,
            causal: true,
            norm_first: true,
            bias_ff: false,
            bias_attn: self.attention_bias,
            layer_scale: Some(self.layer_scale_initial_scale),
            context: self.sliding_window,
            conv_kernel_size: 5,
            use_conv_bias: true,
            use_conv_block: false,
            cross_attention: false,
            max_period: self.rope_theta as usize,
            gating: None,
            norm: mimi::NormType::LayerNorm,
            positional_embedding: transformer::PositionalEmbedding::Rope,
            dim_feedforward: self.intermediate_size,
            kv_repeat: 1,
            conv_layout: true,
            max_seq_len: max_positions,
        };
        mimi::Config {
            channels: 1,
            sample_rate: f64::from(self.sample_rate),
            frame_rate: self.frame_rate(),
            renormalize: true,
            resample_method: mimi::encodec::ResampleMethod::Conv,
            seanet,
            transformer,
            quantizer_n_q: n_q,
            quantizer_bins: self.codebook_size,
            quantizer_dim: self.codebook_dim,
        }
    }
}

/// Typed access to the config's JSON object, naming the field in every error.
struct Fields<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn err(&self, field: &str, message: impl std::fmt::Display) -> CodecError {
        CodecError::Load(format!(
            "{}: field `{field}`: {message}",
            self.path.display()
        ))
    }

    /// The value of `field`, `None` when absent or `null`.
    fn get(&self, field: &str) -> Option<&Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    fn expect_eq(&self, field: &str, want: &Value, why: &str) -> Result<(), CodecError> {
        match self.get(field) {
            Some(v) if v != want && v.as_f64().is_none_or(|x| Some(x) != want.as_f64()) => {
                Err(self.err(field, format!("{v}: {why}")))
            }
            _ => Ok(()),
        }
    }

    fn positive(&self, field: &str, default: usize) -> Result<usize, CodecError> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => as_positive(v)
                .ok_or_else(|| self.err(field, format!("expected a positive integer, got {v}"))),
        }
    }

    fn boolean(&self, field: &str, default: bool) -> Result<bool, CodecError> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(field, format!("expected true or false, got {v}"))),
        }
    }

    fn finite(&self, field: &str, default: f64) -> Result<f64, CodecError> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| self.err(field, format!("expected a finite number, got {v}"))),
        }
    }
}

fn as_positive(v: &Value) -> Option<usize> {
    v.as_u64()
        .filter(|&n| n > 0)
        .and_then(|n| usize::try_from(n).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<MimiConfig, CodecError> {
        MimiConfig::from_value(Path::new("mimi/config.json"), &v)
    }

    #[test]
    fn defaults_are_kyutai_mimi() {
        let c = parse(json!({"frame_rate": 12.5, "rope_theta": 10000.0})).unwrap();
        assert_eq!(c, MimiConfig::kyutai_v0_1());
        assert_eq!((c.samples_per_frame(), c.frame_rate()), (1920, 12.5));
        let v = c.to_candle(8, 8192);
        let r = mimi::Config::v0_1(Some(8));
        assert_eq!(v.seanet.ratios, r.seanet.ratios);
        assert_eq!(v.transformer.context, r.transformer.context);
        assert_eq!(v.transformer.dim_feedforward, r.transformer.dim_feedforward);
        assert_eq!((v.quantizer_bins, v.quantizer_dim), (2048, 256));
    }

    #[test]
    fn unsupported_values_name_the_field() {
        let cases = [
            (json!({"model_type": "encodec"}), "model_type"),
            (json!({"audio_channels": 2}), "audio_channels"),
            (json!({"use_causal_conv": false}), "use_causal_conv"),
            (json!({"num_key_value_heads": 4}), "num_key_value_heads"),
            (
                json!({"num_semantic_quantizers": 2}),
                "num_semantic_quantizers",
            ),
            (
                json!({"codebook_dim": 128}),
                "vector_quantization_hidden_dimension",
            ),
            (json!({"frame_rate": 25.0}), "frame_rate"),
            (json!({"upsampling_ratios": [7, 7]}), "upsampling_ratios"),
            (json!({"norm_eps": 1e-6}), "norm_eps"),
            (json!({"hidden_act": "silu"}), "hidden_act"),
        ];
        for (config, field) in cases {
            let err = parse(config.clone()).unwrap_err().to_string();
            assert!(err.contains(&format!("`{field}`")), "{config}: {err}");
        }
    }
}
