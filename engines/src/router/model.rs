//! The model form's network: a BERT sentence encoder (`candle_transformers`' `BertModel`),
//! mean pooling over the real tokens, and an MLP scoring the experts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Linear, Module, VarBuilder};
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use serde::Deserialize;
use tokenizers::{Tokenizer, TruncationParams};

use super::{RouterError, ENCODER_DIR, HEAD_FILE, ROUTER_CONFIG_FILE, ROUTER_MODEL_TYPE};

/// The MLP's activation between its two layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// The exact (erf) GELU, PyTorch's `nn.GELU()`.
    Gelu,
    Relu,
}

/// The parsed `router_config.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RouterConfig {
    /// Always `"mot_router"`.
    pub model_type: String,
    /// The head's outputs, in order (the checkpoint's names for the experts).
    pub experts: Vec<String>,
    /// `H`: the MLP's hidden width.
    pub hidden_size: usize,
    pub activation: Activation,
    /// Tokens read at most (longer prompts are truncated).
    pub max_length: usize,
    /// Always `"mean"`.
    pub pooling: String,
}

impl RouterConfig {
    /// Reads and checks `path` (a `router_config.json`).
    pub fn from_file(path: &Path) -> Result<Self, RouterError> {
        let text = std::fs::read_to_string(path).map_err(|source| RouterError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg: Self = serde_json::from_str(&text).map_err(|source| RouterError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |reason: String| RouterError::Config {
            path: path.to_path_buf(),
            reason,
        };
        if cfg.model_type != ROUTER_MODEL_TYPE {
            return Err(bad(format!(
                "model_type is {:?}, expected {ROUTER_MODEL_TYPE:?}",
                cfg.model_type
            )));
        }
        if cfg.experts.is_empty() {
            return Err(bad("no experts".into()));
        }
        if cfg.hidden_size == 0 || cfg.max_length == 0 {
            return Err(bad("hidden_size and max_length must be positive".into()));
        }
        if cfg.pooling != "mean" {
            return Err(bad(format!(
                "pooling is {:?}; only \"mean\" is supported",
                cfg.pooling
            )));
        }
        Ok(cfg)
    }
}

/// A loaded router: tokenizer, encoder and head.
pub struct RouterModel {
    config: RouterConfig,
    tokenizer: Tokenizer,
    encoder: BertModel,
    pad_id: u32,
    mlp_in: Linear,
    mlp_out: Linear,
    dtype: DType,
    device: Device,
}

fn load_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>, RouterError> {
    if !path.is_file() {
        return Err(RouterError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
        });
    }
    candle_core::safetensors::load(path, device).map_err(|source| RouterError::Weights {
        path: path.to_path_buf(),
        source,
    })
}

impl RouterModel {
    /// Loads the router checkpoint folder `dir` (see the module docs for its layout) onto
    /// `device`. The encoder runs in `dtype`, except that f16 and bf16 fall back to f32:
    /// `candle_transformers`' `BertModel` builds its additive attention mask as
    /// `(1 - mask) · f32::MIN`, and `f32::MIN` rounds to `-inf` in both half types, so every
    /// kept position would get `0 · -inf = NaN`. The head always runs in f32.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self, RouterError> {
        let dtype = match dtype {
            DType::F16 | DType::BF16 => {
                tracing::warn!(
                    router = %dir.display(),
                    requested = ?dtype,
                    "the router's BERT encoder runs in f32: its attention mask overflows in half precision"
                );
                DType::F32
            }
            other => other,
        };
        let config = RouterConfig::from_file(&dir.join(ROUTER_CONFIG_FILE))?;
        let enc_dir = dir.join(ENCODER_DIR);
        let bert_path = enc_dir.join("config.json");
        let bert_text = std::fs::read_to_string(&bert_path).map_err(|source| RouterError::Io {
            path: bert_path.clone(),
            source,
        })?;
        let bert: BertConfig =
            serde_json::from_str(&bert_text).map_err(|source| RouterError::Json {
                path: bert_path.clone(),
                source,
            })?;
        if config.max_length > bert.max_position_embeddings {
            return Err(RouterError::Config {
                path: dir.join(ROUTER_CONFIG_FILE),
                reason: format!(
                    "max_length ({}) exceeds the encoder's max_position_embeddings ({})",
                    config.max_length, bert.max_position_embeddings
                ),
            });
        }
        let tok_path = enc_dir.join("tokenizer.json");
        let mut tokenizer =
            Tokenizer::from_file(&tok_path).map_err(|e| RouterError::Tokenizer {
                path: tok_path.clone(),
                message: e.to_string(),
            })?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: config.max_length,
                ..Default::default()
            }))
            .map_err(|e| RouterError::Tokenizer {
                path: tok_path.clone(),
                message: format!("cannot truncate to max_length {}: {e}", config.max_length),
            })?;
        tokenizer.with_padding(None);
        let weights_path = enc_dir.join("model.safetensors");
        let weights = load_tensors(&weights_path, &Device::Cpu)?;
        let weights_err = |source| RouterError::Weights {
            path: weights_path.clone(),
            source,
        };
        let encoder = BertModel::load(VarBuilder::from_tensors(weights, dtype, device), &bert)
            .map_err(weights_err)?;
        let head_path = dir.join(HEAD_FILE);
        let head = load_tensors(&head_path, &Device::Cpu)?;
        let vb = VarBuilder::from_tensors(head, DType::F32, device);
        let (d, h, m) = (bert.hidden_size, config.hidden_size, config.experts.len());
        let head_err = |source| RouterError::Weights {
            path: head_path.clone(),
            source,
        };
        let mlp_in = candle_nn::linear(d, h, vb.pp("mlp.0")).map_err(head_err)?;
        let mlp_out = candle_nn::linear(h, m, vb.pp("mlp.2")).map_err(head_err)?;
        let pad_id = u32::try_from(bert.pad_token_id).unwrap_or(0);
        Ok(Self {
            config,
            tokenizer,
            encoder,
            pad_id,
            mlp_in,
            mlp_out,
            dtype,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &RouterConfig {
        &self.config
    }

    /// The element type the encoder runs in (see [`RouterModel::load`]).
    pub fn encoder_dtype(&self) -> DType {
        self.dtype
    }

    /// The number of experts the head scores.
    pub fn num_experts(&self) -> usize {
        self.config.experts.len()
    }

    /// Token ids of `text` as the encoder reads them (special tokens added, truncated to
    /// `max_length`).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, RouterError> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| RouterError::Tokenizer {
                path: PathBuf::from(ENCODER_DIR).join("tokenizer.json"),
                message: e.to_string(),
            })?;
        let mut ids = enc.get_ids().to_vec();
        ids.truncate(self.config.max_length);
        Ok(ids)
    }

    /// Mean-pooled encoder states of each prompt (`prompts.len() × d`, f32), from one padded
    /// forward. Every prompt must have at least one token.
    pub fn pooled(&self, prompts: &[&[u32]]) -> Result<Tensor, RouterError> {
        let b = prompts.len();
        let t = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        if b == 0 || t == 0 || prompts.iter().any(|p| p.is_empty()) {
            return Err(RouterError::Compute(candle_core::Error::Msg(
                "every prompt needs at least one token".into(),
            )));
        }
        let mut ids = Vec::with_capacity(b * t);
        let mut mask = Vec::with_capacity(b * t);
        for p in prompts {
            ids.extend_from_slice(p);
            ids.extend(std::iter::repeat_n(self.pad_id, t - p.len()));
            mask.extend(std::iter::repeat_n(1u32, p.len()));
            mask.extend(std::iter::repeat_n(0u32, t - p.len()));
        }
        let ids = Tensor::from_vec(ids, (b, t), &self.device)?;
        let mask = Tensor::from_vec(mask, (b, t), &self.device)?;
        let types = ids.zeros_like()?;
        let hidden = self.encoder.forward(&ids, &types, Some(&mask))?;
        let hidden = if self.dtype == DType::F32 {
            hidden
        } else {
            hidden.to_dtype(DType::F32)?
        };
        let maskf = mask.to_dtype(DType::F32)?;
        let summed = hidden.broadcast_mul(&maskf.unsqueeze(2)?)?.sum(1)?;
        let counts = maskf.sum_keepdim(1)?;
        Ok(summed.broadcast_div(&counts)?)
    }

    /// The MLP's expert logits for pooled states (`b × d` → `b × M`).
    pub fn head(&self, pooled: &Tensor) -> Result<Tensor, RouterError> {
        let h = self.mlp_in.forward(pooled)?;
        let h = match self.config.activation {
            Activation::Gelu => h.gelu_erf()?,
            Activation::Relu => h.relu()?,
        };
        Ok(self.mlp_out.forward(&h)?)
    }

    /// Softmax probabilities over the experts for each prompt (one padded forward).
    pub fn score(&self, prompts: &[&[u32]]) -> Result<Vec<Vec<f32>>, RouterError> {
        let logits = self.head(&self.pooled(prompts)?)?;
        let probs = candle_nn::ops::softmax(&logits, D::Minus1)?;
        Ok(probs.to_vec2::<f32>()?)
    }
}
