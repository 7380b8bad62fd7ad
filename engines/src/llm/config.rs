//! Model configuration of the Llama / Qwen2 / Qwen3 family, parsed from a Hugging Face
//! `config.json`, and the error type shared by the LLM loading and forward code.
//!
//! Parsing is tolerant: unknown fields are ignored, optional fields take the defaults of the
//! matching `transformers` config class, and both the old (`torch_dtype`, `rope_theta`,
//! `rope_scaling`) and the newest (`dtype`, `rope_parameters`) layouts are understood.

use std::path::{Path, PathBuf};

use candle_nn::Activation;
use serde::Deserialize;
use serde_json::Value;

use super::weights::WeightsError;

/// Everything that can go wrong loading or running an LLM.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is not valid JSON or has a field of the wrong type.
    #[error("parsing {what}: {source}")]
    Json {
        /// What was being parsed (usually a path).
        what: String,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// The config's `model_type` is not one this code implements.
    #[error("unsupported model_type {0:?} (supported: \"llama\", \"qwen2\", \"qwen3\")")]
    UnsupportedModelType(String),
    /// The config is missing a field, or holds inconsistent or unsupported values.
    #[error("invalid model config: {0}")]
    Config(String),
    /// The checkpoint's weights could not be found or do not match the config.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// A forward call was given bad input (empty batch or chunk, token id out of range, a cache
    /// made for another model).
    #[error("invalid forward input: {0}")]
    Input(String),
    /// A tensor operation failed.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

/// The architecture family, from `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// `model_type: "llama"` (Llama 1/2/3, and many Llama-layout derivatives).
    Llama,
    /// `model_type: "qwen2"` (Qwen1.5, Qwen2, Qwen2.5): q/k/v projections always have a bias.
    Qwen2,
    /// `model_type: "qwen3"`: per-head RMSNorm on q and k before RoPE, explicit `head_dim`.
    Qwen3,
}

/// Llama 3 style RoPE frequency scaling (`rope_type: "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    /// Divisor applied to low frequencies.
    pub factor: f32,
    /// Wavelength threshold (as a fraction of the original context) below which frequencies
    /// are scaled.
    pub low_freq_factor: f32,
    /// Wavelength threshold above which frequencies are kept.
    pub high_freq_factor: f32,
    /// The context length the model was pre-trained with.
    pub original_max_position_embeddings: usize,
}

/// Token id(s) as they appear in `config.json`: a single integer or a list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// One id.
    Single(u32),
    /// Several ids (e.g. Llama 3 instruct's end-of-turn ids).
    Multiple(Vec<u32>),
}

impl TokenIds {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::Single(id) => vec![*id],
            TokenIds::Multiple(ids) => ids.clone(),
        }
    }
}

/// The resolved configuration of a Llama / Qwen2 / Qwen3 decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct LlmConfig {
    /// Architecture family.
    pub family: Family,
    /// Vocabulary size (rows of the embedding and of `lm_head`).
    pub vocab_size: usize,
    /// Residual stream width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (GQA); equals `num_attention_heads` when absent.
    pub num_key_value_heads: usize,
    /// Width of one head; `hidden_size / num_attention_heads` when absent.
    pub head_dim: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Llama 3 RoPE scaling, when the config asks for it.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Trained context length (informational: the forward does not enforce it).
    pub max_position_embeddings: usize,
    /// Whether `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Whether q/k/v projections have a bias (always true for Qwen2).
    pub qkv_bias: bool,
    /// Whether the output projection has a bias (Llama/Qwen3 `attention_bias`; never for Qwen2).
    pub o_bias: bool,
    /// Whether the MLP projections have a bias (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// Per-head RMSNorm of q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    /// MLP activation (`hidden_act`, SiLU by default).
    pub hidden_act: Activation,
    /// Beginning-of-sequence token, if the config names one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id(s) (`eos_token_id`, an int or a list), if the config names any.
    pub eos_token_ids: Option<Vec<u32>>,
    /// The checkpoint's stored dtype (`dtype` or legacy `torch_dtype`), e.g. `"bfloat16"`.
    pub dtype: Option<String>,
}

/// The raw `config.json` fields we read; everything optional so errors can be precise.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    use_sliding_window: Option<bool>,
    hidden_act: Option<Activation>,
    bos_token_id: Option<TokenIds>,
    eos_token_id: Option<TokenIds>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

fn required(v: Option<usize>, name: &str) -> Result<usize, LlmError> {
    match v {
        Some(0) => Err(LlmError::Config(format!("`{name}` must be positive"))),
        Some(v) => Ok(v),
        None => Err(LlmError::Config(format!("missing field `{name}`"))),
    }
}

fn f32_field(obj: &serde_json::Map<String, Value>, key: &str) -> Result<f32, LlmError> {
    obj.get(key)
        .and_then(Value::as_f64)
        .map(|v| v as f32)
        .ok_or_else(|| LlmError::Config(format!("llama3 rope scaling needs a numeric `{key}`")))
}

/// Reads the RoPE scaling from `rope_scaling` (or, in the newest layout, `rope_parameters`).
fn parse_rope_scaling(
    scaling: Option<&Value>,
    params: Option<&Value>,
) -> Result<Option<Llama3RopeScaling>, LlmError> {
    let obj = match scaling.or(params) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(obj)) => obj,
        Some(other) => {
            return Err(LlmError::Config(format!(
                "rope scaling must be an object, got {other}"
            )))
        }
    };
    let rope_type = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    match rope_type {
        "default" => Ok(None),
        "llama3" => {
            let original = obj
                .get("original_max_position_embeddings")
                .and_then(Value::as_u64)
                .ok_or_else(|| {
                    LlmError::Config(
                        "llama3 rope scaling needs `original_max_position_embeddings`".into(),
                    )
                })?;
            let s = Llama3RopeScaling {
                factor: f32_field(obj, "factor")?,
                low_freq_factor: f32_field(obj, "low_freq_factor")?,
                high_freq_factor: f32_field(obj, "high_freq_factor")?,
                original_max_position_embeddings: original as usize,
            };
            if s.factor <= 0.0
                || s.high_freq_factor <= s.low_freq_factor
                || s.low_freq_factor <= 0.0
            {
                return Err(LlmError::Config(format!(
                    "llama3 rope scaling needs factor > 0 and high_freq_factor > low_freq_factor > 0, got {s:?}"
                )));
            }
            Ok(Some(s))
        }
        other => Err(LlmError::Config(format!(
            "unsupported rope_type {other:?} (supported: \"default\", \"llama3\")"
        ))),
    }
}

impl LlmConfig {
    /// Reads and parses a `config.json` file.
    pub fn from_file(path: &Path) -> Result<Self, LlmError> {
        let text = std::fs::read_to_string(path).map_err(|source| LlmError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|source| LlmError::Json {
            what: path.display().to_string(),
            source,
        })?;
        Self::from_json_value(&value)
    }

    /// Parses the text of a `config.json`.
    pub fn from_json_str(text: &str) -> Result<Self, LlmError> {
        let value: Value = serde_json::from_str(text).map_err(|source| LlmError::Json {
            what: "config.json".into(),
            source,
        })?;
        Self::from_json_value(&value)
    }

    /// Parses an already-decoded `config.json` (or a nested text config of a multimodal one).
    pub fn from_json_value(value: &Value) -> Result<Self, LlmError> {
        let raw = RawConfig::deserialize(value).map_err(|source| LlmError::Json {
            what: "config.json".into(),
            source,
        })?;
        let family = match raw.model_type.as_deref() {
            Some("llama") => Family::Llama,
            Some("qwen2") => Family::Qwen2,
            Some("qwen3") => Family::Qwen3,
            Some(other) => return Err(LlmError::UnsupportedModelType(other.to_string())),
            None => return Err(LlmError::Config("missing field `model_type`".into())),
        };
        let vocab_size = required(raw.vocab_size, "vocab_size")?;
        let hidden_size = required(raw.hidden_size, "hidden_size")?;
        let intermediate_size = required(raw.intermediate_size, "intermediate_size")?;
        let num_hidden_layers = required(raw.num_hidden_layers, "num_hidden_layers")?;
        let num_attention_heads = required(raw.num_attention_heads, "num_attention_heads")?;
        let num_key_value_heads = match raw.num_key_value_heads {
            None => num_attention_heads,
            v => required(v, "num_key_value_heads")?,
        };
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(LlmError::Config(format!(
                "num_attention_heads ({num_attention_heads}) is not a multiple of num_key_value_heads ({num_key_value_heads})"
            )));
        }
        let head_dim = match raw.head_dim {
            Some(d) => required(Some(d), "head_dim")?,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(LlmError::Config(format!(
                        "hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({num_attention_heads}) and no head_dim is given"
                    )));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(LlmError::Config(format!(
                "head_dim ({head_dim}) must be even for RoPE"
            )));
        }
        if raw.use_sliding_window == Some(true) {
            return Err(LlmError::Config(
                "use_sliding_window = true is not supported".into(),
            ));
        }
        let params_theta = raw
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64);
        let rope_theta = raw.rope_theta.or(params_theta).unwrap_or(10_000.0);
        if !(rope_theta.is_finite() && rope_theta > 0.0) {
            return Err(LlmError::Config(format!(
                "rope_theta must be positive, got {rope_theta}"
            )));
        }
        let rope_scaling =
            parse_rope_scaling(raw.rope_scaling.as_ref(), raw.rope_parameters.as_ref())?;
        let rms_norm_eps = raw.rms_norm_eps.unwrap_or(1e-6);
        let default_max_pos = match family {
            Family::Llama => 2048,
            Family::Qwen2 | Family::Qwen3 => 32768,
        };
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias) = match family {
            Family::Qwen2 => (true, false),
            Family::Llama | Family::Qwen3 => (attention_bias, attention_bias),
        };
        Ok(LlmConfig {
            family,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(default_max_pos),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: family == Family::Llama && raw.mlp_bias.unwrap_or(false),
            qk_norm: family == Family::Qwen3,
            hidden_act: raw.hidden_act.unwrap_or(Activation::Silu),
            bos_token_id: raw.bos_token_id.and_then(|t| t.to_vec().first().copied()),
            eos_token_ids: raw.eos_token_id.map(|t| t.to_vec()),
            dtype: raw.dtype.or(raw.torch_dtype),
        })
    }

    /// RoPE inverse frequencies (`head_dim / 2` of them), with Llama 3 scaling applied exactly as
    /// candle-transformers' `llama.rs` does.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let dim = self.head_dim;
        let base: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1f32 / self.rope_theta.powf(i as f64 / dim as f64) as f32)
            .collect();
        let Some(s) = self.rope_scaling else {
            return base;
        };
        let original = s.original_max_position_embeddings as f32;
        let low_freq_wavelen = original / s.low_freq_factor;
        let high_freq_wavelen = original / s.high_freq_factor;
        base.into_iter()
            .map(|freq| {
                let wavelen = 2. * std::f32::consts::PI / freq;
                if wavelen < high_freq_wavelen {
                    freq
                } else if wavelen > low_freq_wavelen {
                    freq / s.factor
                } else {
                    let smooth = (original / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1. - smooth) * freq / s.factor + smooth * freq
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qwen3_and_defaults() {
        let cfg = LlmConfig::from_json_str(
            r#"{"model_type":"qwen3","vocab_size":10,"hidden_size":8,"intermediate_size":16,
                "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,
                "head_dim":6,"rope_theta":1000000,"eos_token_id":[1,2],"torch_dtype":"bfloat16",
                "some_new_field":{"x":1}}"#,
        )
        .unwrap();
        assert_eq!(cfg.family, Family::Qwen3);
        assert_eq!(cfg.head_dim, 6);
        assert!(cfg.qk_norm && !cfg.qkv_bias);
        assert_eq!(cfg.rope_theta, 1e6);
        assert_eq!(cfg.eos_token_ids, Some(vec![1, 2]));
        assert_eq!(cfg.dtype.as_deref(), Some("bfloat16"));
    }

    #[test]
    fn parses_llama3_rope_parameters_and_rejects_unknown_type() {
        let cfg = LlmConfig::from_json_str(
            r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,
                "num_hidden_layers":1,"num_attention_heads":2,"dtype":"float32",
                "rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,"factor":8.0,
                "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#,
        )
        .unwrap();
        assert_eq!(cfg.rope_theta, 500000.0);
        assert_eq!(cfg.num_key_value_heads, 2);
        assert_eq!(cfg.head_dim, 4);
        assert!(cfg.rope_scaling.is_some());
        assert_eq!(cfg.rope_inv_freq().len(), 2);
        let err = LlmConfig::from_json_str(r#"{"model_type":"mistral"}"#).unwrap_err();
        assert!(err.to_string().contains("mistral"), "{err}");
    }
}
