//! Seeded random-weight LLM checkpoints (Llama / Qwen2 / Qwen3) in the Hugging Face layout.

use super::bpe::{self, TinyTokenizer, ENDOFTEXT, IM_END, IM_START};
use super::{write_file, TinyError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The ChatML chat template written into tiny checkpoints (Qwen style, no default system
/// prompt, no tools).
pub const TINY_CHAT_TEMPLATE: &str = "{%- for message in messages %}\n    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n";

/// Architecture family of a tiny LLM checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TinyFamily {
    /// `model_type: "llama"`: no biases, no q/k norm, `head_dim` written explicitly.
    Llama,
    /// `model_type: "qwen2"`: q/k/v biases; `head_dim` must equal `hidden_size / heads`.
    Qwen2,
    /// `model_type: "qwen3"`: per-head q/k RMSNorm, explicit `head_dim`.
    Qwen3,
}

impl TinyFamily {
    /// The `model_type` string.
    pub fn model_type(self) -> &'static str {
        match self {
            TinyFamily::Llama => "llama",
            TinyFamily::Qwen2 => "qwen2",
            TinyFamily::Qwen3 => "qwen3",
        }
    }

    /// The `architectures` entry.
    pub fn architecture(self) -> &'static str {
        match self {
            TinyFamily::Llama => "LlamaForCausalLM",
            TinyFamily::Qwen2 => "Qwen2ForCausalLM",
            TinyFamily::Qwen3 => "Qwen3ForCausalLM",
        }
    }
}

/// Shape of a tiny LLM checkpoint. The tokenizer is always the tiny ChatML byte-level BPE
/// (512 ids), whatever the family.
#[derive(Debug, Clone, PartialEq)]
pub struct TinyLlmSpec {
    /// Architecture family.
    pub family: TinyFamily,
    /// Residual width.
    pub hidden_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (must divide `num_attention_heads`).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Context length written to the config.
    pub max_position_embeddings: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Share the embedding with `lm_head` (then `lm_head.weight` is not written).
    pub tie_word_embeddings: bool,
    /// Pad the embedding / `lm_head` rows to this size (at least the tokenizer's 512 ids), like
    /// real checkpoints whose `vocab_size` exceeds the tokenizer; `None` = the tokenizer's size.
    pub vocab_size: Option<usize>,
    /// Standard deviation of the seeded normal init of projections and embeddings. `lm_head`
    /// uses `max(init_std, 1/sqrt(hidden_size))` so logits have a standard deviation near 1.
    pub init_std: f32,
}

impl TinyLlmSpec {
    /// The tiny-omni thinker: Qwen3, hidden 64, 2 layers, 4 heads, 2 kv heads, head_dim 16,
    /// intermediate 128, rope_theta 1e6, eps 1e-6, untied, 2048 positions (~0.14M parameters).
    pub fn tiny_qwen3() -> Self {
        Self {
            family: TinyFamily::Qwen3,
            hidden_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            intermediate_size: 128,
            max_position_embeddings: 2048,
            rope_theta: 1_000_000.0,
            rms_norm_eps: 1e-6,
            tie_word_embeddings: false,
            vocab_size: None,
            init_std: 0.05,
        }
    }

    /// The same tiny dimensions for another family (Llama uses rope_theta 5e5 and eps 1e-5).
    pub fn tiny(family: TinyFamily) -> Self {
        let base = Self::tiny_qwen3();
        match family {
            TinyFamily::Llama => Self {
                family,
                rope_theta: 500_000.0,
                rms_norm_eps: 1e-5,
                ..base
            },
            _ => Self { family, ..base },
        }
    }

    /// A ~100M-parameter model for benchmarks: hidden 768, 12 layers, 12 heads, 4 kv heads,
    /// head_dim 64, intermediate 3072, 4096 positions.
    pub fn bench_100m(family: TinyFamily) -> Self {
        Self {
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_key_value_heads: 4,
            head_dim: 64,
            intermediate_size: 3072,
            max_position_embeddings: 4096,
            init_std: 0.02,
            ..Self::tiny(family)
        }
    }

    /// Number of parameters for a vocabulary of `vocab_size` rows.
    pub fn num_parameters(&self, vocab_size: usize) -> usize {
        tensor_specs(self, vocab_size)
            .iter()
            .map(|t| t.shape.iter().product::<usize>())
            .sum()
    }

    fn validate(&self, tokenizer_vocab: usize) -> Result<usize, TinyError> {
        let bad = |m: String| Err(TinyError::InvalidSpec(m));
        let dims = [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((name, _)) = dims.iter().find(|(_, v)| *v == 0) {
            return bad(format!("{name} must be positive"));
        }
        #[allow(clippy::manual_is_multiple_of)] // `is_multiple_of` needs Rust 1.87; MSRV is 1.85
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return bad(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.family == TinyFamily::Qwen2
            && self.head_dim * self.num_attention_heads != self.hidden_size
        {
            return bad(format!(
                "qwen2 has no head_dim field: head_dim ({}) x heads ({}) must equal hidden_size ({})",
                self.head_dim, self.num_attention_heads, self.hidden_size
            ));
        }
        if !(self.init_std.is_finite() && self.init_std > 0.0) {
            return bad(format!("init_std must be positive, got {}", self.init_std));
        }
        if !(self.rope_theta.is_finite()
            && self.rope_theta > 0.0
            && self.rms_norm_eps.is_finite()
            && self.rms_norm_eps > 0.0)
        {
            return bad("rope_theta and rms_norm_eps must be positive".into());
        }
        let vocab = self.vocab_size.unwrap_or(tokenizer_vocab);
        if vocab < tokenizer_vocab {
            return bad(format!(
                "vocab_size ({vocab}) is smaller than the tokenizer ({tokenizer_vocab} ids)"
            ));
        }
        Ok(vocab)
    }
}

/// One tensor to write: name, shape, and how to fill it.
struct TensorSpec {
    name: String,
    shape: Vec<usize>,
    /// `None`: all ones (norm weights); `Some(std)`: seeded normal.
    std: Option<f32>,
}

/// Every tensor of the checkpoint, in the Hugging Face names.
fn tensor_specs(spec: &TinyLlmSpec, vocab: usize) -> Vec<TensorSpec> {
    let (h, hd, i) = (spec.hidden_size, spec.head_dim, spec.intermediate_size);
    let (q, kv) = (spec.num_attention_heads * hd, spec.num_key_value_heads * hd);
    let std = spec.init_std;
    let mut out = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, std: Option<f32>| {
        out.push(TensorSpec { name, shape, std })
    };
    push(
        "model.embed_tokens.weight".into(),
        vec![vocab, h],
        Some(std),
    );
    for l in 0..spec.num_hidden_layers {
        let p = format!("model.layers.{l}");
        push(format!("{p}.input_layernorm.weight"), vec![h], None);
        push(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            None,
        );
        push(
            format!("{p}.self_attn.q_proj.weight"),
            vec![q, h],
            Some(std),
        );
        push(
            format!("{p}.self_attn.k_proj.weight"),
            vec![kv, h],
            Some(std),
        );
        push(
            format!("{p}.self_attn.v_proj.weight"),
            vec![kv, h],
            Some(std),
        );
        push(
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, q],
            Some(std),
        );
        if spec.family == TinyFamily::Qwen2 {
            push(format!("{p}.self_attn.q_proj.bias"), vec![q], Some(std));
            push(format!("{p}.self_attn.k_proj.bias"), vec![kv], Some(std));
            push(format!("{p}.self_attn.v_proj.bias"), vec![kv], Some(std));
        }
        if spec.family == TinyFamily::Qwen3 {
            push(format!("{p}.self_attn.q_norm.weight"), vec![hd], None);
            push(format!("{p}.self_attn.k_norm.weight"), vec![hd], None);
        }
        push(format!("{p}.mlp.gate_proj.weight"), vec![i, h], Some(std));
        push(format!("{p}.mlp.up_proj.weight"), vec![i, h], Some(std));
        push(format!("{p}.mlp.down_proj.weight"), vec![h, i], Some(std));
    }
    push("model.norm.weight".into(), vec![h], None);
    if !spec.tie_word_embeddings {
        let head_std = std.max(1.0 / (h as f32).sqrt());
        push("lm_head.weight".into(), vec![vocab, h], Some(head_std));
    }
    out
}

/// SplitMix64 finalizer: spreads a 64-bit value over all bits.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A per-tensor seed from the checkpoint seed and the tensor name (FNV-1a), so each tensor's
/// values depend only on (seed, name, shape).
pub(crate) fn tensor_seed(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix64(seed ^ mix64(h))
}

/// Little-endian f32 bytes of `n` seeded normal(0, std) values (Box–Muller on `StdRng`).
pub(crate) fn normal_bytes(seed: u64, n: usize, std: f32) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n * 4);
    let mut i = 0;
    while i < n {
        let u1: f64 = 1.0 - rng.gen::<f64>(); // (0, 1]
        let u2: f64 = rng.gen::<f64>();
        let r = (-2.0 * u1.ln()).sqrt() * f64::from(std);
        let theta = std::f64::consts::TAU * u2;
        for v in [r * theta.cos(), r * theta.sin()] {
            if i < n {
                out.extend_from_slice(&(v as f32).to_le_bytes());
                i += 1;
            }
        }
    }
    out
}

/// Writes `model.safetensors` (f32, `{"format": "pt"}` metadata).
fn write_weights(
    path: &Path,
    spec: &TinyLlmSpec,
    vocab: usize,
    seed: u64,
) -> Result<(), TinyError> {
    let specs = tensor_specs(spec, vocab);
    let data: Vec<Vec<u8>> = specs
        .iter()
        .map(|t| {
            let n = t.shape.iter().product::<usize>();
            match t.std {
                Some(std) => normal_bytes(tensor_seed(seed, &t.name), n, std),
                None => 1.0f32.to_le_bytes().repeat(n),
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

/// `config.json` as `transformers` writes it for the family (keys sorted).
fn config_json(spec: &TinyLlmSpec, vocab: usize, tok: &TinyTokenizer) -> Value {
    let mut c = json!({
        "architectures": [spec.family.architecture()],
        "attention_dropout": 0.0,
        "bos_token_id": tok.endoftext(),
        "eos_token_id": tok.im_end(),
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "model_type": spec.family.model_type(),
        "num_attention_heads": spec.num_attention_heads,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_key_value_heads": spec.num_key_value_heads,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_scaling": null,
        "rope_theta": spec.rope_theta,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "torch_dtype": "float32",
        "use_cache": true,
        "vocab_size": vocab,
    });
    let extra = match spec.family {
        TinyFamily::Qwen3 => json!({
            "attention_bias": false,
            "head_dim": spec.head_dim,
            "max_window_layers": spec.num_hidden_layers,
            "sliding_window": null,
            "transformers_version": "4.51.0",
            "use_sliding_window": false,
        }),
        TinyFamily::Qwen2 => json!({
            "max_window_layers": spec.num_hidden_layers,
            "sliding_window": spec.max_position_embeddings,
            "transformers_version": "4.43.1",
            "use_sliding_window": false,
        }),
        TinyFamily::Llama => json!({
            "attention_bias": false,
            "head_dim": spec.head_dim,
            "mlp_bias": false,
            "pretraining_tp": 1,
            "transformers_version": "4.45.0",
        }),
    };
    if let (Some(c), Value::Object(extra)) = (c.as_object_mut(), extra) {
        c.extend(extra);
    }
    c
}

/// An `AddedToken` as `tokenizer_config.json` / `special_tokens_map.json` write it.
fn added_token(content: &str, special: Option<bool>) -> Value {
    let mut v = json!({
        "content": content,
        "lstrip": false,
        "normalized": false,
        "rstrip": false,
        "single_word": false,
    });
    if let (Some(special), Some(obj)) = (special, v.as_object_mut()) {
        obj.insert("special".into(), Value::Bool(special));
    }
    v
}

/// `tokenizer_config.json` in the Qwen2 tokenizer layout, with the ChatML template.
fn tokenizer_config_json(spec: &TinyLlmSpec, tok: &TinyTokenizer) -> Value {
    let mut decoder = serde_json::Map::new();
    for (id, token) in tok.special_ids.iter().zip(bpe::SPECIAL_TOKENS) {
        decoder.insert(id.to_string(), added_token(token, Some(true)));
    }
    json!({
        "add_bos_token": false,
        "add_prefix_space": false,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": null,
        "chat_template": TINY_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": spec.max_position_embeddings,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": false,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": null,
    })
}

/// Writes a seeded random-weight checkpoint of `spec` into `dir` (created if missing): the
/// files `config.json`, `generation_config.json`, `model.safetensors`, `special_tokens_map.json`,
/// `tokenizer.json` and `tokenizer_config.json`. Returns the written paths in that order.
///
/// The same `(spec, seed)` always gives byte-identical files; another seed gives other weights
/// (the tokenizer does not depend on the seed).
pub fn write_tiny_llm(
    dir: &Path,
    spec: &TinyLlmSpec,
    seed: u64,
) -> Result<Vec<PathBuf>, TinyError> {
    let tok = bpe::build_tiny_tokenizer()?;
    let vocab = spec.validate(tok.vocab_size())?;
    std::fs::create_dir_all(dir).map_err(|source| TinyError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let generation = json!({
        "bos_token_id": tok.endoftext(),
        "do_sample": true,
        "eos_token_id": [tok.im_end(), tok.endoftext()],
        "pad_token_id": tok.endoftext(),
        "temperature": 0.7,
        "top_p": 0.8,
        "transformers_version": "4.51.0",
    });
    let special_map = json!({
        "additional_special_tokens": [IM_START, IM_END],
        "eos_token": added_token(IM_END, None),
        "pad_token": added_token(ENDOFTEXT, None),
    });
    let weights = dir.join("model.safetensors");
    write_weights(&weights, spec, vocab, seed)?;
    let tokenizer = dir.join("tokenizer.json");
    write_file(&tokenizer, bpe::tokenizer_json(&tok)?.as_bytes())?;
    Ok(vec![
        write_json(&dir.join("config.json"), &config_json(spec, vocab, &tok))?,
        write_json(&dir.join("generation_config.json"), &generation)?,
        weights,
        write_json(&dir.join("special_tokens_map.json"), &special_map)?,
        tokenizer,
        write_json(
            &dir.join("tokenizer_config.json"),
            &tokenizer_config_json(spec, &tok),
        )?,
    ])
}

/// Writes pretty JSON with a trailing newline (as `transformers` does); returns the path.
pub(crate) fn write_json(path: &Path, value: &Value) -> Result<PathBuf, TinyError> {
    let mut text = serde_json::to_string_pretty(value).map_err(|source| TinyError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    text.push('\n');
    write_file(path, text.as_bytes())?;
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_qwen3_parameter_count() {
        let spec = TinyLlmSpec::tiny_qwen3();
        // embed + lm_head = 2 * 512 * 64; per layer: q 64x64, k/v 32x64, o 64x64, mlp 3x128x64,
        // norms 2x64 + q/k norm 2x16.
        let per_layer = 64 * 64 * 2 + 32 * 64 * 2 + 3 * 128 * 64 + 2 * 64 + 2 * 16;
        assert_eq!(spec.num_parameters(512), 2 * 512 * 64 + 2 * per_layer + 64);
    }

    #[test]
    fn bench_model_is_about_100m() {
        let n = TinyLlmSpec::bench_100m(TinyFamily::Qwen3).num_parameters(512);
        assert!((90_000_000..120_000_000).contains(&n), "{n}");
    }

    #[test]
    fn normal_bytes_are_seeded() {
        assert_eq!(normal_bytes(1, 7, 0.1), normal_bytes(1, 7, 0.1));
        assert_ne!(normal_bytes(1, 7, 0.1), normal_bytes(2, 7, 0.1));
        let vals: Vec<f32> = normal_bytes(3, 10_000, 0.05)
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let mean = vals.iter().sum::<f32>() / vals.len() as f32;
        let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / vals.len() as f32;
        assert!(mean.abs() < 0.005, "{mean}");
        assert!((var.sqrt() - 0.05).abs() < 0.005, "{}", var.sqrt());
    }

    #[test]
    fn invalid_specs_are_rejected() {
        let mut s = TinyLlmSpec::tiny(TinyFamily::Qwen2);
        s.head_dim = 32;
        assert!(matches!(s.validate(512), Err(TinyError::InvalidSpec(_))));
        let mut s = TinyLlmSpec::tiny_qwen3();
        s.num_key_value_heads = 3;
        assert!(matches!(s.validate(512), Err(TinyError::InvalidSpec(_))));
        s = TinyLlmSpec::tiny_qwen3();
        s.vocab_size = Some(100);
        assert!(matches!(s.validate(512), Err(TinyError::InvalidSpec(_))));
    }
}
