//! Whisper's encoder as Transformers' `WhisperEncoder` computes it, then the audio projector.
//!
//! candle-transformers' `whisper::model::AudioEncoder` is not reused: its `load` is private
//! (only `Whisper::load`, which also needs the decoder, reaches it), its MLP width is hard-coded
//! to `4 × d_model` (ignoring `encoder_ffn_dim`), it uses the tanh approximation of GELU where
//! Whisper uses the exact one (an error of ~1e-3 per activation), and it recomputes the
//! positional table instead of reading `embed_positions.weight`. This module reads the same
//! tensor names and follows the Python module line by line.

use candle_core::{DType, Module, Tensor};
use candle_nn::{Conv1d, Conv1dConfig, LayerNorm, Linear, VarBuilder};

use super::config::{Activation, EncoderConfig};

/// LayerNorm epsilon of every norm (`nn.LayerNorm`'s default).
const LN_EPS: f64 = 1e-5;

/// Self-attention with Whisper's biases (`k_proj` has none).
#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
}

impl Attention {
    fn load(d: usize, heads: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            q: candle_nn::linear(d, d, vb.pp("q_proj"))?,
            k: candle_nn::linear_no_bias(d, d, vb.pp("k_proj"))?,
            v: candle_nn::linear(d, d, vb.pp("v_proj"))?,
            o: candle_nn::linear(d, d, vb.pp("out_proj"))?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let hd = d / self.heads;
        let split = |y: Tensor| -> candle_core::Result<Tensor> {
            y.reshape((b, t, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q.forward(x)?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        let scale = (hd as f64).powf(-0.5);
        let scores = (q.matmul(&k.t()?)? * scale)?;
        // Softmax in f32 whatever the weights' dtype.
        let w =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
        let y = w.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        self.o.forward(&y)
    }
}

/// One pre-norm encoder layer.
#[derive(Debug, Clone)]
struct Layer {
    attn_ln: LayerNorm,
    attn: Attention,
    mlp_ln: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl Layer {
    fn load(cfg: &EncoderConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.d_model;
        Ok(Self {
            attn_ln: candle_nn::layer_norm(d, LN_EPS, vb.pp("self_attn_layer_norm"))?,
            attn: Attention::load(d, cfg.heads, vb.pp("self_attn"))?,
            mlp_ln: candle_nn::layer_norm(d, LN_EPS, vb.pp("final_layer_norm"))?,
            fc1: candle_nn::linear(d, cfg.ffn_dim, vb.pp("fc1"))?,
            fc2: candle_nn::linear(cfg.ffn_dim, d, vb.pp("fc2"))?,
            act: cfg.activation,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x + self.attn.forward(&self.attn_ln.forward(x)?)?)?;
        let h = activate(self.act, &self.fc1.forward(&self.mlp_ln.forward(&x)?)?)?;
        x + self.fc2.forward(&h)?
    }
}

fn activate(act: Activation, x: &Tensor) -> candle_core::Result<Tensor> {
    match act {
        Activation::Gelu => x.gelu_erf(),
        Activation::GeluTanh => x.gelu(),
        Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        Activation::Relu => x.relu(),
        Activation::Silu => x.silu(),
    }
}

/// Whisper's sinusoidal position table (`sinusoids` in Transformers and openai/whisper), used
/// when a checkpoint has no `embed_positions.weight`.
pub(crate) fn sinusoids(length: usize, channels: usize) -> Vec<f32> {
    let half = channels / 2;
    let inc = 10000f64.ln() / (half - 1) as f64;
    let mut out = vec![0f32; length * channels];
    for t in 0..length {
        for i in 0..half {
            let a = t as f64 * (-inc * i as f64).exp();
            out[t * channels + i] = a.sin() as f32;
            out[t * channels + half + i] = a.cos() as f32;
        }
    }
    out
}

/// Encoder plus projector, loaded from `model.encoder.*` and `multi_modal_projector.*`.
#[derive(Debug, Clone)]
pub struct AudioTower {
    conv1: Conv1d,
    conv2: Conv1d,
    /// `[max_source_positions, d_model]`.
    positions: Tensor,
    layers: Vec<Layer>,
    ln_post: LayerNorm,
    pool: usize,
    projector: Option<Linear>,
    dtype: DType,
}

impl AudioTower {
    /// Loads the tower; `vb` is rooted at the checkpoint (names as in the safetensors file).
    pub fn load(cfg: &EncoderConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let enc = vb.pp("model").pp("encoder");
        let d = cfg.d_model;
        let c1 = Conv1dConfig {
            padding: 1,
            ..Default::default()
        };
        let c2 = Conv1dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        let conv1 = candle_nn::conv1d(cfg.num_mel_bins, d, 3, c1, enc.pp("conv1"))?;
        let conv2 = candle_nn::conv1d(d, d, 3, c2, enc.pp("conv2"))?;
        let positions = if enc.contains_tensor("embed_positions.weight") {
            enc.get((cfg.max_source_positions, d), "embed_positions.weight")?
        } else {
            Tensor::from_vec(
                sinusoids(cfg.max_source_positions, d),
                (cfg.max_source_positions, d),
                vb.device(),
            )?
            .to_dtype(vb.dtype())?
        };
        let layers = (0..cfg.layers)
            .map(|i| Layer::load(cfg, enc.pp("layers").pp(i)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let ln_post = candle_nn::layer_norm(d, LN_EPS, enc.pp("layer_norm"))?;
        let projector = match cfg.projector {
            None => None,
            Some(p) => {
                let pvb = vb.pp("multi_modal_projector").pp("linear");
                Some(if p.bias {
                    candle_nn::linear(d, p.out_dim, pvb)?
                } else {
                    candle_nn::linear_no_bias(d, p.out_dim, pvb)?
                })
            }
        };
        Ok(Self {
            conv1,
            conv2,
            positions,
            layers,
            ln_post,
            pool: cfg.pool(),
            projector,
            dtype: vb.dtype(),
        })
    }

    /// The dtype of the weights (inputs are cast to it).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The encoder alone: `[B, num_mel_bins, 2·max_source_positions]` features to
    /// `[B, max_source_positions, d_model]`, in the weights' dtype.
    pub fn encode(&self, features: &Tensor) -> candle_core::Result<Tensor> {
        let x = features.to_dtype(self.dtype)?;
        let x = self.conv1.forward(&x)?.gelu_erf()?;
        let x = self.conv2.forward(&x)?.gelu_erf()?;
        let x = x.transpose(1, 2)?;
        let t = x.dim(1)?;
        let mut x = x.broadcast_add(&self.positions.narrow(0, 0, t)?)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        self.ln_post.forward(&x)
    }

    /// Encoder, average pooling over time (stride and kernel `pool`, a trailing remainder
    /// dropped, as `nn.AvgPool1d`), then the projector: `[B, max_source_positions / pool,
    /// output_dim]`, in f32.
    pub fn forward(&self, features: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.encode(features)?;
        let x = if self.pool > 1 {
            let (b, t, d) = x.dims3()?;
            let n = t / self.pool;
            x.narrow(1, 0, n * self.pool)?
                .reshape((b, n, self.pool, d))?
                .to_dtype(DType::F32)?
                .mean(2)?
                .to_dtype(self.dtype)?
        } else {
            x
        };
        let x = match &self.projector {
            Some(p) => p.forward(&x)?,
            None => x,
        };
        x.to_dtype(DType::F32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinusoids_match_whisper_layout() {
        let s = sinusoids(3, 8);
        // Position 0: sin half all 0, cos half all 1.
        assert_eq!(&s[..8], &[0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
        // Position 1, channel 0: sin(1); channel 3 (last of the half): sin(1e-4).
        assert!((s[8] - 1f32.sin()).abs() < 1e-7);
        assert!((s[11] - 1e-4f32.sin()).abs() < 1e-7);
    }
}
