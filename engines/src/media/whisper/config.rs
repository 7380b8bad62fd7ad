//! The checkpoint's two JSON files, validated against what the encoder implements:
//! `config.json` (a Hugging Face `WhisperConfig` plus our `projector` key) and
//! `preprocessor_config.json` (a `WhisperFeatureExtractor`).

use super::WhisperError;
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// Largest width, layer count, head count, ... accepted: far above real Whisper models
/// (large-v3: d_model 1280, 32 layers, 20 heads, ffn 5120, 128 mels, 1500 positions), and
/// small enough that no product below overflows.
const MAX_DIM: usize = 1 << 16;
const MAX_LAYERS: usize = 256;
/// Sample rates accepted in `preprocessor_config.json`.
const MIN_RATE: usize = 1_000;
const MAX_RATE: usize = 384_000;
/// Longest window accepted: 10 minutes at 16 kHz.
const MAX_WINDOW_SAMPLES: usize = 9_600_000;

/// The feed-forward activation (`activation_function`), as Transformers' `ACT2FN` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `"gelu"`: exact (erf) GELU, what every Whisper checkpoint uses.
    Gelu,
    /// `"gelu_new"`, `"gelu_pytorch_tanh"`, `"gelu_fast"`: the tanh approximation.
    GeluTanh,
    /// `"quick_gelu"`: `x · sigmoid(1.702 x)`.
    QuickGelu,
    /// `"relu"`.
    Relu,
    /// `"silu"` or `"swish"`.
    Silu,
}

impl Activation {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "quick_gelu" => Self::QuickGelu,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            _ => return None,
        })
    }
}

/// The `projector` key of `config.json`: see the module documentation of `whisper`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectorConfig {
    /// Average-pooling stride (and kernel) over the encoder's output rows; 1 = no pooling.
    #[serde(default = "one")]
    pub pool: usize,
    /// Width of the rows written (the LLM's hidden size).
    pub out_dim: usize,
    /// Whether `multi_modal_projector.linear` has a bias (default true).
    #[serde(default = "yes")]
    pub bias: bool,
}

fn one() -> usize {
    1
}

fn yes() -> bool {
    true
}

fn default_activation() -> String {
    "gelu".into()
}

/// The fields of `config.json` the encoder reads; every other key (decoder, generation,
/// tokenizer settings) is ignored.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
struct RawConfig {
    #[serde(default)]
    model_type: Option<String>,
    d_model: usize,
    encoder_layers: usize,
    encoder_attention_heads: usize,
    encoder_ffn_dim: usize,
    num_mel_bins: usize,
    max_source_positions: usize,
    #[serde(default = "default_activation")]
    activation_function: String,
    #[serde(default)]
    projector: Option<Value>,
}

/// The encoder's shape, from `config.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncoderConfig {
    /// Width of the encoder (`d_model`).
    pub d_model: usize,
    /// Transformer layers (`encoder_layers`).
    pub layers: usize,
    /// Attention heads (`encoder_attention_heads`); divides `d_model`.
    pub heads: usize,
    /// Feed-forward width (`encoder_ffn_dim`).
    pub ffn_dim: usize,
    /// Mel bins of the input (`num_mel_bins`).
    pub num_mel_bins: usize,
    /// Encoder positions (`max_source_positions`): the window is twice as many mel frames.
    pub max_source_positions: usize,
    /// Feed-forward activation (`activation_function`).
    pub activation: Activation,
    /// Pooling and projection after the encoder; `None` writes the encoder's rows unchanged.
    pub projector: Option<ProjectorConfig>,
}

impl EncoderConfig {
    /// Reads and validates `path` (a `config.json`).
    pub fn from_file(path: &Path) -> Result<Self, WhisperError> {
        let raw: RawConfig = read_json(path)?;
        let bad = |field: &str, reason: String| WhisperError::Config {
            path: path.to_path_buf(),
            field: field.to_string(),
            reason,
        };
        if let Some(t) = raw.model_type.as_deref() {
            if t != "whisper" {
                return Err(bad("model_type", format!("{t:?} is not \"whisper\"")));
            }
        }
        for (field, v, max) in [
            ("d_model", raw.d_model, MAX_DIM),
            ("encoder_layers", raw.encoder_layers, MAX_LAYERS),
            (
                "encoder_attention_heads",
                raw.encoder_attention_heads,
                MAX_LAYERS,
            ),
            ("encoder_ffn_dim", raw.encoder_ffn_dim, MAX_DIM),
            ("num_mel_bins", raw.num_mel_bins, 1024),
            ("max_source_positions", raw.max_source_positions, MAX_DIM),
        ] {
            if v == 0 || v > max {
                return Err(bad(field, format!("{v} is not in 1..={max}")));
            }
        }
        if raw.d_model % raw.encoder_attention_heads != 0 {
            return Err(bad(
                "encoder_attention_heads",
                format!(
                    "{} heads do not divide d_model {}",
                    raw.encoder_attention_heads, raw.d_model
                ),
            ));
        }
        if raw.d_model < 4 || raw.d_model % 2 != 0 {
            return Err(bad(
                "d_model",
                format!("{} must be even and at least 4", raw.d_model),
            ));
        }
        let activation = Activation::parse(&raw.activation_function).ok_or_else(|| {
            bad(
                "activation_function",
                format!(
                    "{:?} is not one of gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, \
                     quick_gelu, relu, silu, swish",
                    raw.activation_function
                ),
            )
        })?;
        let projector = match raw.projector {
            None | Some(Value::Null) => None,
            Some(v) => {
                let p: ProjectorConfig =
                    serde_json::from_value(v).map_err(|e| bad("projector", e.to_string()))?;
                if p.pool == 0 || p.pool > raw.max_source_positions {
                    return Err(bad(
                        "projector.pool",
                        format!(
                            "{} is not in 1..=max_source_positions ({})",
                            p.pool, raw.max_source_positions
                        ),
                    ));
                }
                if p.out_dim == 0 || p.out_dim > MAX_DIM {
                    return Err(bad(
                        "projector.out_dim",
                        format!("{} is not in 1..={MAX_DIM}", p.out_dim),
                    ));
                }
                Some(p)
            }
        };
        Ok(Self {
            d_model: raw.d_model,
            layers: raw.encoder_layers,
            heads: raw.encoder_attention_heads,
            ffn_dim: raw.encoder_ffn_dim,
            num_mel_bins: raw.num_mel_bins,
            max_source_positions: raw.max_source_positions,
            activation,
            projector,
        })
    }

    /// Average-pooling stride after the encoder (1 without a projector).
    pub fn pool(&self) -> usize {
        self.projector.map_or(1, |p| p.pool)
    }

    /// Width of the rows written.
    pub fn output_dim(&self) -> usize {
        self.projector.map_or(self.d_model, |p| p.out_dim)
    }

    /// Rows a full window writes: `max_source_positions / pool`, rounded down.
    pub fn rows_per_window(&self) -> usize {
        self.max_source_positions / self.pool()
    }
}

fn hf_n_fft() -> usize {
    400
}
fn hf_hop() -> usize {
    160
}
fn hf_rate() -> usize {
    16000
}
fn hf_chunk() -> usize {
    30
}
fn hf_mels() -> usize {
    80
}

/// `preprocessor_config.json`; absent fields take `WhisperFeatureExtractor.__init__`'s defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
struct RawFeatures {
    #[serde(default = "hf_mels")]
    feature_size: usize,
    #[serde(default = "hf_rate")]
    sampling_rate: usize,
    #[serde(default = "hf_hop")]
    hop_length: usize,
    #[serde(default = "hf_n_fft")]
    n_fft: usize,
    #[serde(default = "hf_chunk")]
    chunk_length: usize,
    #[serde(default)]
    n_samples: Option<usize>,
    #[serde(default)]
    nb_max_frames: Option<usize>,
    #[serde(default)]
    padding_value: f64,
}

/// The log-mel front end, from `preprocessor_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureConfig {
    /// Mel bins (`feature_size`).
    pub feature_size: usize,
    /// Rate the model hears, in Hz (`sampling_rate`); clips are resampled to it.
    pub sampling_rate: usize,
    /// Samples between frames (`hop_length`).
    pub hop_length: usize,
    /// FFT size and window length (`n_fft`).
    pub n_fft: usize,
    /// Samples of one window (`n_samples`, `chunk_length × sampling_rate` when absent).
    pub n_samples: usize,
    /// Mel frames of one window (`nb_max_frames`, `n_samples / hop_length` when absent).
    pub nb_max_frames: usize,
    /// Value a short clip is padded with (`padding_value`).
    pub padding_value: f64,
}

impl FeatureConfig {
    /// Reads and validates `path` (a `preprocessor_config.json`).
    pub fn from_file(path: &Path) -> Result<Self, WhisperError> {
        let raw: RawFeatures = read_json(path)?;
        let bad = |field: &str, reason: String| WhisperError::Config {
            path: path.to_path_buf(),
            field: field.to_string(),
            reason,
        };
        if !(MIN_RATE..=MAX_RATE).contains(&raw.sampling_rate) {
            return Err(bad(
                "sampling_rate",
                format!("{} is not in {MIN_RATE}..={MAX_RATE}", raw.sampling_rate),
            ));
        }
        if raw.feature_size == 0 || raw.feature_size > 1024 {
            return Err(bad(
                "feature_size",
                format!("{} is not in 1..=1024", raw.feature_size),
            ));
        }
        if !(2..=16384).contains(&raw.n_fft) {
            return Err(bad("n_fft", format!("{} is not in 2..=16384", raw.n_fft)));
        }
        if raw.hop_length == 0 || raw.hop_length > raw.n_fft {
            return Err(bad(
                "hop_length",
                format!("{} is not in 1..=n_fft ({})", raw.hop_length, raw.n_fft),
            ));
        }
        let n_samples = match raw.n_samples {
            Some(n) => n,
            None => raw.chunk_length.saturating_mul(raw.sampling_rate),
        };
        if n_samples <= raw.n_fft / 2 || n_samples > MAX_WINDOW_SAMPLES {
            return Err(bad(
                "n_samples",
                format!(
                    "{n_samples} is not in {}..={MAX_WINDOW_SAMPLES}",
                    raw.n_fft / 2 + 1
                ),
            ));
        }
        let frames = n_samples / raw.hop_length;
        let nb_max_frames = raw.nb_max_frames.unwrap_or(frames);
        if nb_max_frames != frames {
            return Err(bad(
                "nb_max_frames",
                format!(
                    "{nb_max_frames} is not n_samples / hop_length = {n_samples} / {} = {frames}",
                    raw.hop_length
                ),
            ));
        }
        if !raw.padding_value.is_finite() {
            return Err(bad("padding_value", "must be finite".into()));
        }
        Ok(Self {
            feature_size: raw.feature_size,
            sampling_rate: raw.sampling_rate,
            hop_length: raw.hop_length,
            n_fft: raw.n_fft,
            n_samples,
            nb_max_frames,
            padding_value: raw.padding_value,
        })
    }

    /// Checks that the features fit the encoder; `path` names `preprocessor_config.json`.
    pub fn check_against(&self, enc: &EncoderConfig, path: &Path) -> Result<(), WhisperError> {
        let bad = |field: &str, reason: String| WhisperError::Config {
            path: path.to_path_buf(),
            field: field.to_string(),
            reason,
        };
        if self.feature_size != enc.num_mel_bins {
            return Err(bad(
                "feature_size",
                format!(
                    "{} differs from config.json's num_mel_bins {}",
                    self.feature_size, enc.num_mel_bins
                ),
            ));
        }
        if self.nb_max_frames != 2 * enc.max_source_positions {
            return Err(bad(
                "nb_max_frames",
                format!(
                    "{} is not twice config.json's max_source_positions {} (the encoder's \
                     stride-2 conv maps the window onto its positions)",
                    self.nb_max_frames, enc.max_source_positions
                ),
            ));
        }
        Ok(())
    }

    /// Mel frames that hold `samples` samples of a window (`ceil(samples / hop)`, at most the
    /// window's), as the feature extractor's attention mask counts them.
    pub fn valid_frames(&self, samples: usize) -> usize {
        samples.div_ceil(self.hop_length).min(self.nb_max_frames)
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, WhisperError> {
    let text = std::fs::read_to_string(path).map_err(|source| WhisperError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| WhisperError::Json {
        path: path.to_path_buf(),
        source,
    })
}
