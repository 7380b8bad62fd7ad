//! The MMDiT joint blocks, final layer, patch embedding and conditioning MLPs, built on
//! candle-transformers' public MMDiT projections (`AttnProjections`, `QkvOnlyAttnProjections`,
//! `Mlp`); the position table and unpatchify are candle's `PositionEmbedder` and
//! `Unpatchifier` as they are.
//!
//! candle's own block types (`DiTBlock`, `MMDiTJointBlock`, `MMDiTXJointBlock`,
//! `ContextQkvOnlyJointBlock`, `FinalLayer`, `TimestepEmbedder`, `VectorEmbedder`) are not used
//! because:
//! * they keep their adaLN / MLP layers in `candle_nn::Sequential` (`Vec<Box<dyn Module>>`),
//!   which is neither `Send` nor `Sync`, so a model holding them cannot be a
//!   [`Denoiser`](crate::diffusion::model::Denoiser) (`Send + 'static`);
//! * `TimestepEmbedder` casts the sinusoidal features to f16, which fails against f32/bf16
//!   weights and loses precision;
//! * `ContextQkvOnlyJointBlock` drops the last block's text-stream q/k norms, which SD3.5
//!   checkpoints have (`context_block.attn.ln_q/ln_k`, diffusers' `norm_added_q/k`);
//! * `PatchEmbedder`'s convolution has no bf16 kernel on CPU (a stride-p p×p convolution is a
//!   patchify + matmul, which every backend and dtype has).
//!
//! The equivalents here follow the same SD3 tensor names and maths (ComfyUI's `mmdit.py`,
//! Stability's `mmditx.py`, diffusers' `JointTransformerBlock`), with the image and text rows
//! of the joint attention in one softmax.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{linear, Linear, RmsNorm, VarBuilder};
use candle_transformers::models::mmdit::projections::{
    AttnProjections, Mlp, Qkv, QkvOnlyAttnProjections,
};

/// Width of the sinusoidal timestep features (diffusers' `Timesteps(num_channels=256)`).
pub(crate) const FREQUENCY_EMBEDDING_SIZE: usize = 256;

/// Epsilon of every LayerNorm and q/k RMSNorm in SD3.
const NORM_EPS: f64 = 1e-6;

/// LayerNorm without scale or bias over the last dimension, computed in f32 with the mean
/// subtracted before the variance (the fused single-pass kernel loses precision on the large
/// activations of SD3's residual stream).
pub(crate) fn layer_norm(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    centred
        .broadcast_div(&(var + NORM_EPS)?.sqrt()?)?
        .to_dtype(dtype)
}

/// adaLN modulation `x * (1 + scale) + shift` with per-row `[B, D]` shift and scale.
pub(crate) fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(&(scale + 1.0)?.unsqueeze(1)?)?
        .broadcast_add(&shift.unsqueeze(1)?)
}

/// Multi-head softmax attention; `q`, `k`, `v` are `[B, T, D]` or `[B, T, H, hd]` (as candle's
/// projections return them), the result `[B, T, D]`.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t) = (q.dim(0)?, q.dim(1)?);
    let split = |x: &Tensor| -> Result<Tensor> {
        x.reshape((b, t, heads, ()))?.transpose(1, 2)?.contiguous()
    };
    let (q, k, v) = (split(q)?, split(k)?, split(v)?);
    let head_dim = q.dim(D::Minus1)?;
    let q = (q * (1.0 / (head_dim as f64).sqrt()))?;
    let weights = candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?)?;
    weights.matmul(&v)?.transpose(1, 2)?.reshape((b, t, ()))
}

/// Joint attention over the text rows followed by the image rows; returns both parts.
fn joint_attention(context: &Qkv, x: &Qkv, heads: usize) -> Result<(Tensor, Tensor)> {
    let cat = |a: &Tensor, b: &Tensor| -> Result<Tensor> {
        // Text v is [B, L, H, hd] and image v [B, T, H, hd]: join on the token dimension.
        Tensor::cat(&[a, b], 1)
    };
    let out = attention(
        &cat(&context.q, &x.q)?,
        &cat(&context.k, &x.k)?,
        &cat(&context.v, &x.v)?,
        heads,
    )?;
    let l = context.q.dim(1)?;
    let t = x.q.dim(1)?;
    Ok((out.narrow(1, 0, l)?, out.narrow(1, l, t)?))
}

/// Gates and MLP modulation a [`DitHalf`] keeps between its two halves.
pub(crate) struct Modulation {
    gate_msa: Tensor,
    shift_mlp: Tensor,
    scale_mlp: Tensor,
    gate_mlp: Tensor,
    /// MMDiT-X: gate of the second self-attention.
    gate_msa2: Option<Tensor>,
}

/// One stream of a joint block with adaLN-Zero modulation (SD3's `DismantledBlock`): the image
/// stream of every block and the text stream of all blocks but the last.
pub(crate) struct DitHalf {
    /// `silu(c) → [shift, scale, gate]_msa, [shift, scale, gate]_mlp (, [shift, scale,
    /// gate]_msa2)`.
    modulation: Linear,
    /// The first two chunks (`shift_msa`, `scale_msa`) of `modulation` alone, for
    /// [`DitHalf::modulated_input`] (a view of the same weights).
    shift_scale: Linear,
    attn: AttnProjections,
    /// MMDiT-X image-only self-attention.
    attn2: Option<AttnProjections>,
    mlp: Mlp,
}

impl DitHalf {
    fn new(hidden: usize, heads: usize, dual: bool, vb: VarBuilder) -> Result<Self> {
        let chunks = if dual { 9 } else { 6 };
        let modulation = linear(hidden, chunks * hidden, vb.pp("adaLN_modulation.1"))?;
        let bias = modulation
            .bias()
            .map(|b| b.narrow(0, 0, 2 * hidden))
            .transpose()?;
        let shift_scale = Linear::new(modulation.weight().narrow(0, 0, 2 * hidden)?, bias);
        let attn2 = if dual {
            Some(AttnProjections::new(hidden, heads, vb.pp("attn2"))?)
        } else {
            None
        };
        Ok(Self {
            modulation,
            shift_scale,
            attn: AttnProjections::new(hidden, heads, vb.pp("attn"))?,
            attn2,
            mlp: Mlp::new(hidden, 4 * hidden, vb.pp("mlp"))?,
        })
    }

    /// `norm(x) * (1 + scale_msa) + shift_msa`, the input of the first attention.
    pub(crate) fn modulated_input(&self, x: &Tensor, c_silu: &Tensor) -> Result<Tensor> {
        let m = self.shift_scale.forward(c_silu)?.chunk(2, D::Minus1)?;
        modulate(&layer_norm(x)?, &m[0], &m[1])
    }

    fn pre_attention(&self, x: &Tensor, c_silu: &Tensor) -> Result<(Qkv, Option<Qkv>, Modulation)> {
        let chunks = if self.attn2.is_some() { 9 } else { 6 };
        let m = self.modulation.forward(c_silu)?.chunk(chunks, D::Minus1)?;
        let normed = layer_norm(x)?;
        let qkv = self.attn.pre_attention(&modulate(&normed, &m[0], &m[1])?)?;
        let qkv2 = match &self.attn2 {
            Some(attn2) => Some(attn2.pre_attention(&modulate(&normed, &m[6], &m[7])?)?),
            None => None,
        };
        let modulation = Modulation {
            gate_msa: m[2].clone(),
            shift_mlp: m[3].clone(),
            scale_mlp: m[4].clone(),
            gate_mlp: m[5].clone(),
            gate_msa2: m.get(8).cloned(),
        };
        Ok((qkv, qkv2, modulation))
    }

    fn post_attention(
        &self,
        attn: &Tensor,
        attn2: Option<&Tensor>,
        x: &Tensor,
        m: &Modulation,
    ) -> Result<Tensor> {
        let gated = |y: &Tensor, gate: &Tensor| y.broadcast_mul(&gate.unsqueeze(1)?);
        let mut x = (x + gated(&self.attn.post_attention(attn)?, &m.gate_msa)?)?;
        if let (Some(proj), Some(attn2), Some(gate)) = (&self.attn2, attn2, &m.gate_msa2) {
            x = (x + gated(&proj.post_attention(attn2)?, gate)?)?;
        }
        let mlp_in = modulate(&layer_norm(&x)?, &m.shift_mlp, &m.scale_mlp)?;
        x + gated(&self.mlp.forward(&mlp_in)?, &m.gate_mlp)?
    }
}

/// The last block's text stream: it only supplies keys and values (and queries, whose output
/// is discarded) to the joint attention, modulated by `(shift, scale)` alone.
pub(crate) struct PreOnlyHalf {
    modulation: Linear,
    qkv: QkvOnlyAttnProjections,
    /// Per-head RMSNorm of q and k (SD3.5).
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    head_dim: usize,
}

impl PreOnlyHalf {
    fn new(hidden: usize, heads: usize, qk_norm: bool, vb: VarBuilder) -> Result<Self> {
        let head_dim = hidden / heads;
        let qk_norm = if qk_norm {
            let attn = vb.pp("attn");
            Some((
                candle_nn::rms_norm(head_dim, NORM_EPS, attn.pp("ln_q"))?,
                candle_nn::rms_norm(head_dim, NORM_EPS, attn.pp("ln_k"))?,
            ))
        } else {
            None
        };
        Ok(Self {
            modulation: linear(hidden, 2 * hidden, vb.pp("adaLN_modulation.1"))?,
            qkv: QkvOnlyAttnProjections::new(hidden, heads, vb.pp("attn"))?,
            qk_norm,
            head_dim,
        })
    }

    fn pre_attention(&self, context: &Tensor, c_silu: &Tensor) -> Result<Qkv> {
        let m = self.modulation.forward(c_silu)?.chunk(2, D::Minus1)?;
        let Qkv { q, k, v } =
            self.qkv
                .pre_attention(&modulate(&layer_norm(context)?, &m[0], &m[1])?)?;
        let Some((ln_q, ln_k)) = &self.qk_norm else {
            return Ok(Qkv { q, k, v });
        };
        let per_head = |x: &Tensor, norm: &RmsNorm| -> Result<Tensor> {
            let (b, l, d) = x.dims3()?;
            norm.forward(&x.reshape((b, l, d / self.head_dim, self.head_dim))?)?
                .reshape((b, l, d))
        };
        Ok(Qkv {
            q: per_head(&q, ln_q)?,
            k: per_head(&k, ln_k)?,
            v,
        })
    }
}

/// The text stream of a joint block.
enum ContextHalf {
    Full(DitHalf),
    PreOnly(PreOnlyHalf),
}

/// One MMDiT joint block (`joint_blocks.N`): both streams attend jointly, each with its own
/// projections, modulation and MLP.
pub(crate) struct JointBlock {
    x: DitHalf,
    context: ContextHalf,
    heads: usize,
}

impl JointBlock {
    /// `last`: the context-pre-only final block; `dual`: MMDiT-X image self-attention.
    pub(crate) fn new(
        hidden: usize,
        heads: usize,
        dual: bool,
        last: bool,
        qk_norm: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let x = DitHalf::new(hidden, heads, dual, vb.pp("x_block"))?;
        let vb = vb.pp("context_block");
        let context = if last {
            ContextHalf::PreOnly(PreOnlyHalf::new(hidden, heads, qk_norm, vb)?)
        } else {
            ContextHalf::Full(DitHalf::new(hidden, heads, false, vb)?)
        };
        Ok(Self { x, context, heads })
    }

    /// The image stream's first-attention input (see [`DitHalf::modulated_input`]).
    pub(crate) fn modulated_input(&self, x: &Tensor, c_silu: &Tensor) -> Result<Tensor> {
        self.x.modulated_input(x, c_silu)
    }

    /// Runs the block on `[B, L, D]` text and `[B, T, D]` image streams; returns the new text
    /// stream (`None` after the last block) and the new image stream.
    pub(crate) fn forward(
        &self,
        context: &Tensor,
        x: &Tensor,
        c_silu: &Tensor,
    ) -> Result<(Option<Tensor>, Tensor)> {
        let (x_qkv, x_qkv2, x_mod) = self.x.pre_attention(x, c_silu)?;
        let x_attn2 = match &x_qkv2 {
            Some(qkv) => Some(attention(&qkv.q, &qkv.k, &qkv.v, self.heads)?),
            None => None,
        };
        match &self.context {
            ContextHalf::Full(half) => {
                let (c_qkv, _, c_mod) = half.pre_attention(context, c_silu)?;
                let (c_attn, x_attn) = joint_attention(&c_qkv, &x_qkv, self.heads)?;
                let context = half.post_attention(&c_attn, None, context, &c_mod)?;
                let x = self
                    .x
                    .post_attention(&x_attn, x_attn2.as_ref(), x, &x_mod)?;
                Ok((Some(context), x))
            }
            ContextHalf::PreOnly(half) => {
                let c_qkv = half.pre_attention(context, c_silu)?;
                let (_, x_attn) = joint_attention(&c_qkv, &x_qkv, self.heads)?;
                let x = self
                    .x
                    .post_attention(&x_attn, x_attn2.as_ref(), x, &x_mod)?;
                Ok((None, x))
            }
        }
    }
}

/// `final_layer`: adaLN `(shift, scale)` modulation and the projection to patch pixels.
pub(crate) struct FinalLayer {
    modulation: Linear,
    linear: Linear,
}

impl FinalLayer {
    pub(crate) fn new(hidden: usize, out_features: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            modulation: linear(hidden, 2 * hidden, vb.pp("adaLN_modulation.1"))?,
            linear: linear(hidden, out_features, vb.pp("linear"))?,
        })
    }

    /// `[B, T, D]` → `[B, T, patch² · C]`.
    pub(crate) fn forward(&self, x: &Tensor, c_silu: &Tensor) -> Result<Tensor> {
        let m = self.modulation.forward(c_silu)?.chunk(2, D::Minus1)?;
        self.linear
            .forward(&modulate(&layer_norm(x)?, &m[0], &m[1])?)
    }
}

/// `x_embedder`: the stride-`p` `p×p` convolution that turns latent patches into tokens,
/// computed as patchify + one matmul (the same maths as candle's `PatchEmbedder`, whose
/// convolution has no bf16 kernel on CPU).
pub(crate) struct PatchEmbed {
    /// `[D, C·p·p]` view of the `[D, C, p, p]` kernel.
    proj: Linear,
    patch: usize,
}

impl PatchEmbed {
    pub(crate) fn new(
        patch: usize,
        in_channels: usize,
        hidden: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let vb = vb.pp("proj");
        let weight = vb.get((hidden, in_channels, patch, patch), "weight")?;
        let weight = weight.reshape((hidden, in_channels * patch * patch))?;
        let bias = vb.get(hidden, "bias")?;
        Ok(Self {
            proj: Linear::new(weight, Some(bias)),
            patch,
        })
    }

    /// `[B, C, H, W]` → `[B, (H/p)·(W/p), D]`, tokens in row-major patch order.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let p = self.patch;
        let (gh, gw) = (h / p, w / p);
        let patches = x
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b, gh * gw, c * p * p))?;
        self.proj.forward(&patches)
    }
}

/// `linear → SiLU → linear` (`t_embedder.mlp`, `y_embedder.mlp`).
pub(crate) struct ConditioningMlp {
    fc1: Linear,
    fc2: Linear,
}

impl ConditioningMlp {
    pub(crate) fn new(in_dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: linear(in_dim, hidden, vb.pp("mlp.0"))?,
            fc2: linear(hidden, hidden, vb.pp("mlp.2"))?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(x)?.silu()?)
    }
}

/// `[B]` timesteps → `[B, 256]` f32 sinusoidal features `[cos(t·f), sin(t·f)]`, with
/// `f_i = exp(-ln(10000) · i / 128)` rounded as diffusers' `get_timestep_embedding` computes
/// it in f32 (`flip_sin_to_cos=True`, `downscale_freq_shift=0`).
pub(crate) fn timestep_features(t: &Tensor) -> Result<Tensor> {
    let half = FREQUENCY_EMBEDDING_SIZE / 2;
    let log_period = -(10_000f64.ln()) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (log_period * i as f32 / half as f32).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    Tensor::cat(&[args.cos()?, args.sin()?], 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn layer_norm_matches_definition() {
        let x = Tensor::new(&[[1f32, 2.0, 3.0, 6.0]], &Device::Cpu).unwrap();
        let y = layer_norm(&x).unwrap().to_vec2::<f32>().unwrap();
        let (mean, var) = (3.0f32, 3.5f32);
        for (a, v) in y[0].iter().zip([1f32, 2.0, 3.0, 6.0]) {
            assert!((a - (v - mean) / (var + 1e-6).sqrt()).abs() < 1e-6);
        }
    }

    #[test]
    fn timestep_features_start_with_cos_of_t() {
        let t = Tensor::new(&[0f32, 500.0], &Device::Cpu).unwrap();
        let f = timestep_features(&t).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(f[0].len(), 256);
        assert_eq!((f[0][0], f[0][128]), (1.0, 0.0));
        assert!((f[1][0] - 500f32.cos()).abs() < 1e-6);
        assert!((f[1][128] - 500f32.sin()).abs() < 1e-6);
    }

    #[test]
    fn attention_rows_are_independent_of_order() {
        // Joint attention is over a set: swapping text and image order must not matter.
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 5, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, 5, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, 5, 8), &dev).unwrap();
        let part = |x: &Tensor, a, n| x.narrow(1, a, n).unwrap();
        let c = Qkv {
            q: part(&q, 0, 2),
            k: part(&k, 0, 2),
            v: part(&v, 0, 2),
        };
        let x = Qkv {
            q: part(&q, 2, 3),
            k: part(&k, 2, 3),
            v: part(&v, 2, 3),
        };
        let (ca, xa) = joint_attention(&c, &x, 2).unwrap();
        let (xb, cb) = joint_attention(&x, &c, 2).unwrap();
        let diff = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        // Unseeded inputs: allow summation-order rounding with margin.
        assert!(diff(&ca, &cb) < 1e-5 && diff(&xa, &xb) < 1e-5);
    }
}
