//! Transformers' `CLIPTextModelWithProjection`, returning what SD3 reads from it: the
//! penultimate hidden state and the projected pooled (EOS) row.
//!
//! Written out here rather than taken from candle-transformers: candle's `models::clip` text
//! model always uses quick-GELU (CLIP-G needs exact GELU) and `stable_diffusion::clip` can only be
//! configured from its built-in presets, while this must follow the checkpoint's `config.json`.

use super::{architectures, var_builder, weights_error};
use crate::diffusion::{read_json, DiffusionError};
use candle_core::{DType, Device, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, Module, VarBuilder};
use serde::Deserialize;
use std::path::Path;

/// The fields of Transformers' `CLIPTextConfig` the forward needs, with its defaults.
#[derive(Deserialize)]
struct ClipConfig {
    #[serde(default = "defaults::vocab")]
    vocab_size: usize,
    #[serde(default = "defaults::hidden")]
    hidden_size: usize,
    #[serde(default = "defaults::intermediate")]
    intermediate_size: usize,
    #[serde(default = "defaults::hidden")]
    projection_dim: usize,
    #[serde(default = "defaults::layers")]
    num_hidden_layers: usize,
    #[serde(default = "defaults::heads")]
    num_attention_heads: usize,
    #[serde(default = "defaults::positions")]
    max_position_embeddings: usize,
    #[serde(default = "defaults::act")]
    hidden_act: String,
    #[serde(default = "defaults::eps")]
    layer_norm_eps: f64,
    #[serde(default = "defaults::eos")]
    eos_token_id: u32,
}

mod defaults {
    pub fn vocab() -> usize {
        49408
    }
    pub fn hidden() -> usize {
        512
    }
    pub fn intermediate() -> usize {
        2048
    }
    pub fn layers() -> usize {
        12
    }
    pub fn heads() -> usize {
        8
    }
    pub fn positions() -> usize {
        77
    }
    pub fn act() -> String {
        "quick_gelu".into()
    }
    pub fn eps() -> f64 {
        1e-5
    }
    pub fn eos() -> u32 {
        49407
    }
}

#[derive(Clone, Copy)]
enum Act {
    QuickGelu,
    GeluErf,
    GeluTanh,
}

impl Act {
    fn forward(self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Act::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702f64)?)?,
            Act::GeluErf => xs.gelu_erf(),
            Act::GeluTanh => xs.gelu(),
        }
    }
}

struct ClipLayer {
    norm1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// Transformers' `CLIPTextModelWithProjection`, returning what SD3 reads from it.
pub(super) struct ClipText {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<ClipLayer>,
    final_norm: LayerNorm,
    projection: Linear,
    heads: usize,
    act: Act,
    /// Transformers' legacy rule: with `eos_token_id == 2` the pooled row is at the largest id.
    eos: Option<u32>,
    pub(super) max_positions: usize,
    pub(super) vocab_size: usize,
    pub(super) projection_dim: usize,
    pub(super) dir_name: String,
}

impl ClipText {
    pub(super) fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self, DiffusionError> {
        let path = dir.join("config.json");
        let json: serde_json::Value = read_json(&path)?;
        let arch = architectures(&json);
        if !arch.iter().any(|a| a == "CLIPTextModelWithProjection") {
            return Err(DiffusionError::config(
                &path,
                format!(
                    "SD3 needs a CLIPTextModelWithProjection here, found architectures {arch:?}"
                ),
            ));
        }
        let c: ClipConfig = serde_json::from_value(json)
            .map_err(|e| DiffusionError::config(&path, format!("not a CLIP text config: {e}")))?;
        let act = match c.hidden_act.as_str() {
            "quick_gelu" => Act::QuickGelu,
            "gelu" => Act::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" => Act::GeluTanh,
            other => {
                return Err(DiffusionError::config(
                    &path,
                    format!("hidden_act {other:?} is not supported"),
                ))
            }
        };
        let (h, heads) = (c.hidden_size, c.num_attention_heads);
        if h == 0 || heads == 0 || h % heads != 0 || c.num_hidden_layers == 0 {
            return Err(DiffusionError::config(
                &path,
                format!(
                    "hidden_size {h} must be a positive multiple of num_attention_heads {heads}, \
                     with at least one layer"
                ),
            ));
        }
        let vb = var_builder(dir, dtype, device)?;
        let built = (|| -> candle_core::Result<Self> {
            let tm = vb.pp("text_model");
            let emb = tm.pp("embeddings");
            let norm = |vb: VarBuilder| candle_nn::layer_norm(h, c.layer_norm_eps, vb);
            let layers = (0..c.num_hidden_layers)
                .map(|i| {
                    let l = tm.pp(format!("encoder.layers.{i}"));
                    let a = l.pp("self_attn");
                    Ok(ClipLayer {
                        norm1: norm(l.pp("layer_norm1"))?,
                        q: candle_nn::linear(h, h, a.pp("q_proj"))?,
                        k: candle_nn::linear(h, h, a.pp("k_proj"))?,
                        v: candle_nn::linear(h, h, a.pp("v_proj"))?,
                        out: candle_nn::linear(h, h, a.pp("out_proj"))?,
                        norm2: norm(l.pp("layer_norm2"))?,
                        fc1: candle_nn::linear(h, c.intermediate_size, l.pp("mlp.fc1"))?,
                        fc2: candle_nn::linear(c.intermediate_size, h, l.pp("mlp.fc2"))?,
                    })
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(Self {
                token_embedding: candle_nn::embedding(c.vocab_size, h, emb.pp("token_embedding"))?,
                position_embedding: emb
                    .pp("position_embedding")
                    .get((c.max_position_embeddings, h), "weight")?,
                layers,
                final_norm: norm(tm.pp("final_layer_norm"))?,
                projection: candle_nn::linear_no_bias(
                    h,
                    c.projection_dim,
                    vb.pp("text_projection"),
                )?,
                heads,
                act,
                eos: (c.eos_token_id != 2).then_some(c.eos_token_id),
                max_positions: c.max_position_embeddings,
                vocab_size: c.vocab_size,
                projection_dim: c.projection_dim,
                dir_name: dir.file_name().map_or_else(
                    || dir.display().to_string(),
                    |n| n.to_string_lossy().into_owned(),
                ),
            })
        })();
        built.map_err(weights_error(dir))
    }

    /// Runs `ids` [B, S] and returns `hidden_states[-2]` [B, S, H] and the projected pooled
    /// output (`text_embeds`) [B, P].
    pub(super) fn forward(&self, ids: &Tensor) -> Result<(Tensor, Tensor), DiffusionError> {
        let (b, s) = ids.dims2()?;
        if s > self.max_positions {
            return Err(DiffusionError::Input(format!(
                "{s} tokens exceed {}'s {} positions",
                self.dir_name, self.max_positions
            )));
        }
        let pos = self.position_embedding.narrow(0, 0, s)?;
        let mut xs = self.token_embedding.forward(ids)?.broadcast_add(&pos)?;
        let mask: Vec<f32> = (0..s)
            .flat_map(|i| (0..s).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (s, s), ids.device())?;
        let mut penultimate = xs.clone();
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            if i == last {
                penultimate = xs.clone();
            }
            xs = self.layer(layer, &xs, &mask)?;
        }
        // The pooled row: the EOS position of each prompt, found on the host from the ids.
        let rows: Vec<Vec<u32>> = ids.to_vec2()?;
        let picked = rows
            .iter()
            .enumerate()
            .map(|(i, r)| xs.get(i)?.get(eos_position(r, self.eos)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let pooled = self.final_norm.forward(&Tensor::stack(&picked, 0)?)?;
        debug_assert_eq!(pooled.dim(0)?, b);
        Ok((penultimate, self.projection.forward(&pooled)?))
    }

    fn layer(&self, l: &ClipLayer, xs: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, s, h) = xs.dims3()?;
        let hd = h / self.heads;
        let n = l.norm1.forward(xs)?;
        let split = |t: Tensor| {
            t.reshape((b, s, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()?
                .to_dtype(DType::F32)
        };
        let q = (split(l.q.forward(&n)?)? * (hd as f64).powf(-0.5))?;
        let k = split(l.k.forward(&n)?)?;
        let v = split(l.v.forward(&n)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let attn = probs
            .matmul(&v)?
            .to_dtype(xs.dtype())?
            .transpose(1, 2)?
            .reshape((b, s, h))?;
        let xs = (xs + l.out.forward(&attn)?)?;
        let n = l.norm2.forward(&xs)?;
        let mlp = l.fc2.forward(&self.act.forward(&l.fc1.forward(&n)?)?)?;
        xs + mlp
    }
}

/// Where Transformers' CLIP takes the pooled row: the first `eos` id, or with the legacy config
/// (`eos == None`) the first largest id; position 0 when neither is found (as `argmax` of all
/// zeros gives).
fn eos_position(ids: &[u32], eos: Option<u32>) -> usize {
    match eos {
        Some(eos) => ids.iter().position(|&t| t == eos).unwrap_or(0),
        None => {
            let max = ids.iter().copied().max().unwrap_or(0);
            ids.iter().position(|&t| t == max).unwrap_or(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::eos_position;

    #[test]
    fn eos_rules() {
        assert_eq!(eos_position(&[5, 9, 3, 9, 9], None), 1);
        assert_eq!(eos_position(&[5, 9, 3, 7, 7], Some(7)), 3);
        assert_eq!(eos_position(&[5, 9, 3], Some(7)), 0);
        assert_eq!(eos_position(&[], None), 0);
    }
}
