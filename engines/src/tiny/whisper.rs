//! Seeded random-weight Whisper audio encoders with a projector, in the layout
//! `media::whisper::WhisperEncoder::load` reads: `config.json` (a `WhisperConfig` with our
//! `projector` key), `preprocessor_config.json` (a `WhisperFeatureExtractor`) and
//! `model.safetensors` with `model.encoder.*` (Transformers' `WhisperForConditionalGeneration`
//! names; no decoder) and `multi_modal_projector.linear.*`.

use super::llm::{normal_bytes, tensor_seed, write_json};
use super::TinyError;
use crate::media::whisper::sinusoids;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

/// Biases: small, so they matter without dominating.
const BIAS_STD: f32 = 0.02;

/// Shape of a tiny Whisper encoder, its feature extractor and projector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TinyWhisperSpec {
    /// Encoder width.
    pub d_model: usize,
    /// Encoder layers.
    pub encoder_layers: usize,
    /// Attention heads; must divide `d_model`.
    pub encoder_attention_heads: usize,
    /// Feed-forward width.
    pub encoder_ffn_dim: usize,
    /// Mel bins (also the extractor's `feature_size`).
    pub num_mel_bins: usize,
    /// Encoder positions: a window is `2 × max_source_positions` mel frames.
    pub max_source_positions: usize,
    /// The extractor's `sampling_rate`.
    pub sampling_rate: usize,
    /// The extractor's `hop_length`.
    pub hop_length: usize,
    /// The extractor's `n_fft`.
    pub n_fft: usize,
    /// Window length in seconds (`chunk_length`); `chunk_length × sampling_rate / hop_length`
    /// must be `2 × max_source_positions`.
    pub chunk_length: usize,
    /// Average-pooling stride of the projector.
    pub pool: usize,
    /// Projector output width (the LLM's hidden size).
    pub out_dim: usize,
}

impl TinyWhisperSpec {
    /// d_model 32, 2 layers of 4 heads, ffn 64, 80 mel bins, a 4 s window at 16 kHz (hop 160,
    /// n_fft 400: 400 mel frames, 200 positions), pool 2 (100 rows per window), `out_dim` wide.
    pub fn tiny(out_dim: usize) -> Self {
        Self {
            d_model: 32,
            encoder_layers: 2,
            encoder_attention_heads: 4,
            encoder_ffn_dim: 64,
            num_mel_bins: 80,
            max_source_positions: 200,
            sampling_rate: 16000,
            hop_length: 160,
            n_fft: 400,
            chunk_length: 4,
            pool: 2,
            out_dim,
        }
    }

    /// Samples of one window.
    pub fn n_samples(&self) -> usize {
        self.chunk_length * self.sampling_rate
    }

    /// Number of parameters (encoder and projector; the position table included).
    pub fn num_parameters(&self) -> usize {
        tensor_specs(self)
            .iter()
            .map(|t| t.shape.iter().product::<usize>())
            .sum()
    }

    fn validate(&self) -> Result<(), TinyError> {
        let bad = |m: String| Err(TinyError::InvalidSpec(m));
        let dims = [
            self.d_model,
            self.encoder_layers,
            self.encoder_attention_heads,
            self.encoder_ffn_dim,
            self.num_mel_bins,
            self.max_source_positions,
            self.sampling_rate,
            self.hop_length,
            self.n_fft,
            self.chunk_length,
            self.pool,
            self.out_dim,
        ];
        if dims.iter().any(|&d| d == 0 || d > 1 << 20) {
            return bad(format!("every size must be in 1..=2^20: {self:?}"));
        }
        if self.d_model < 4 || self.d_model % 2 != 0 {
            return bad(format!("d_model {} must be even and >= 4", self.d_model));
        }
        if self.d_model % self.encoder_attention_heads != 0 {
            return bad(format!(
                "{} heads do not divide d_model {}",
                self.encoder_attention_heads, self.d_model
            ));
        }
        if self.pool > self.max_source_positions {
            return bad(format!(
                "pool {} exceeds max_source_positions {}",
                self.pool, self.max_source_positions
            ));
        }
        let frames = self.n_samples() / self.hop_length;
        if frames != 2 * self.max_source_positions || self.hop_length > self.n_fft {
            return bad(format!(
                "chunk_length × sampling_rate / hop_length = {frames} must be 2 × \
                 max_source_positions = {}, with hop_length <= n_fft",
                2 * self.max_source_positions
            ));
        }
        Ok(())
    }
}

/// How a tensor is initialised.
#[derive(Debug, Clone)]
enum Init {
    /// Seeded normal(0, std).
    Normal(f32),
    /// Every element this value.
    Const(f32),
    /// The sinusoidal position table.
    Positions,
}

/// One tensor of the checkpoint.
#[derive(Debug)]
struct TensorSpec {
    name: String,
    shape: Vec<usize>,
    init: Init,
}

struct Specs(Vec<TensorSpec>);

impl Specs {
    fn push(&mut self, name: String, shape: Vec<usize>, init: Init) {
        self.0.push(TensorSpec { name, shape, init });
    }

    /// A linear (`k == 0`) or conv1d layer with weights of std `1 / sqrt(fan_in)`.
    fn layer(&mut self, p: &str, cout: usize, cin: usize, k: usize, bias: bool) {
        let shape = if k == 0 {
            vec![cout, cin]
        } else {
            vec![cout, cin, k]
        };
        let fan_in = (cin * k.max(1)) as f32;
        self.push(
            format!("{p}.weight"),
            shape,
            Init::Normal(1.0 / fan_in.sqrt()),
        );
        if bias {
            self.push(format!("{p}.bias"), vec![cout], Init::Normal(BIAS_STD));
        }
    }

    fn norm(&mut self, p: &str, c: usize) {
        self.push(format!("{p}.weight"), vec![c], Init::Const(1.0));
        self.push(format!("{p}.bias"), vec![c], Init::Normal(BIAS_STD));
    }
}

/// Every tensor, in module order.
fn tensor_specs(spec: &TinyWhisperSpec) -> Vec<TensorSpec> {
    let d = spec.d_model;
    let mut s = Specs(Vec::new());
    let e = "model.encoder";
    s.layer(&format!("{e}.conv1"), d, spec.num_mel_bins, 3, true);
    s.layer(&format!("{e}.conv2"), d, d, 3, true);
    s.push(
        format!("{e}.embed_positions.weight"),
        vec![spec.max_source_positions, d],
        Init::Positions,
    );
    for i in 0..spec.encoder_layers {
        let l = format!("{e}.layers.{i}");
        s.layer(&format!("{l}.self_attn.k_proj"), d, d, 0, false);
        s.layer(&format!("{l}.self_attn.v_proj"), d, d, 0, true);
        s.layer(&format!("{l}.self_attn.q_proj"), d, d, 0, true);
        s.layer(&format!("{l}.self_attn.out_proj"), d, d, 0, true);
        s.norm(&format!("{l}.self_attn_layer_norm"), d);
        s.layer(&format!("{l}.fc1"), spec.encoder_ffn_dim, d, 0, true);
        s.layer(&format!("{l}.fc2"), d, spec.encoder_ffn_dim, 0, true);
        s.norm(&format!("{l}.final_layer_norm"), d);
    }
    s.norm(&format!("{e}.layer_norm"), d);
    s.layer("multi_modal_projector.linear", spec.out_dim, d, 0, true);
    s.0
}

fn config_json(spec: &TinyWhisperSpec) -> Value {
    json!({
        "activation_function": "gelu",
        "architectures": ["WhisperForConditionalGeneration"],
        "d_model": spec.d_model,
        "dtype": "float32",
        "encoder_attention_heads": spec.encoder_attention_heads,
        "encoder_ffn_dim": spec.encoder_ffn_dim,
        "encoder_layers": spec.encoder_layers,
        "max_source_positions": spec.max_source_positions,
        "model_type": "whisper",
        "num_mel_bins": spec.num_mel_bins,
        "projector": {"out_dim": spec.out_dim, "pool": spec.pool},
        "scale_embedding": false,
    })
}

fn preprocessor_json(spec: &TinyWhisperSpec) -> Value {
    json!({
        "chunk_length": spec.chunk_length,
        "dither": 0.0,
        "feature_extractor_type": "WhisperFeatureExtractor",
        "feature_size": spec.num_mel_bins,
        "hop_length": spec.hop_length,
        "n_fft": spec.n_fft,
        "n_samples": spec.n_samples(),
        "nb_max_frames": spec.n_samples() / spec.hop_length,
        "padding_side": "right",
        "padding_value": 0.0,
        "return_attention_mask": false,
        "sampling_rate": spec.sampling_rate,
    })
}

/// Writes `model.safetensors` (f32, `{"format": "pt"}` metadata).
fn write_weights(path: &Path, spec: &TinyWhisperSpec, seed: u64) -> Result<(), TinyError> {
    let specs = tensor_specs(spec);
    let data: Vec<Vec<u8>> = specs
        .iter()
        .map(|t| {
            let n = t.shape.iter().product::<usize>();
            match t.init {
                Init::Normal(std) => normal_bytes(tensor_seed(seed, &t.name), n, std),
                Init::Const(v) => v.to_le_bytes().repeat(n),
                Init::Positions => sinusoids(spec.max_source_positions, spec.d_model)
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            }
        })
        .collect();
    let safetensors_err = |source| TinyError::Safetensors {
        path: path.to_path_buf(),
        source,
    };
    let mut views = Vec::with_capacity(specs.len());
    for (t, bytes) in specs.iter().zip(&data) {
        let view = TensorView::new(Dtype::F32, t.shape.clone(), bytes).map_err(safetensors_err)?;
        views.push((t.name.clone(), view));
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(safetensors_err)
}

/// Writes a seeded random-weight Whisper encoder + projector into `dir` (created if missing):
/// `config.json`, `preprocessor_config.json` and `model.safetensors`.
///
/// The same `(spec, seed)` always gives byte-identical files; another seed gives other weights.
pub fn write_tiny_whisper(dir: &Path, spec: &TinyWhisperSpec, seed: u64) -> Result<(), TinyError> {
    spec.validate()?;
    std::fs::create_dir_all(dir).map_err(|source| TinyError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    write_json(&dir.join("config.json"), &config_json(spec))?;
    write_json(
        &dir.join("preprocessor_config.json"),
        &preprocessor_json(spec),
    )?;
    write_weights(&dir.join("model.safetensors"), spec, seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_spec_is_valid_and_small() {
        let spec = TinyWhisperSpec::tiny(64);
        spec.validate().unwrap();
        // conv1 80·32·3+32, conv2 32·32·3+32, positions 200·32, per layer 4·1024+3·32 +
        // 2·(32·64)+64+32 + 2·64 norms, final norm 64, projector 32·64+64.
        let per_layer = 4 * 1024 + 3 * 32 + 2 * 32 * 64 + 64 + 32 + 2 * 64;
        let want =
            80 * 32 * 3 + 32 + 32 * 32 * 3 + 32 + 200 * 32 + 2 * per_layer + 64 + 32 * 64 + 64;
        assert_eq!(spec.num_parameters(), want);
    }

    #[test]
    fn invalid_specs_are_rejected() {
        let mut s = TinyWhisperSpec::tiny(64);
        s.encoder_attention_heads = 5;
        assert!(matches!(s.validate(), Err(TinyError::InvalidSpec(_))));
        let mut s = TinyWhisperSpec::tiny(64);
        s.chunk_length = 3;
        assert!(matches!(s.validate(), Err(TinyError::InvalidSpec(_))));
        let mut s = TinyWhisperSpec::tiny(64);
        s.out_dim = 0;
        assert!(matches!(s.validate(), Err(TinyError::InvalidSpec(_))));
    }
}
