//! The FLUX network in Black Forest Labs' tensor names (`double_blocks.N.img_attn.qkv`, ...),
//! the layout candle-transformers' `models::flux::model` reads.
//!
//! candle-transformers 0.11.1 exposes only `EmbedNd` and the monolithic `Flux` from that module
//! publicly: the blocks' constructors and forwards (`DoubleStreamBlock::new`, `forward`,
//! `MlpEmbedder::new`, `LastLayer`, `timestep_embedding`, ...) are private, and `Flux::forward`
//! cannot stop between embedding, block stack and head. So the pieces are re-stated here, line for
//! line after candle's (same weight names, same arithmetic), with two deliberate differences that
//! follow diffusers / the BFL reference more closely:
//! * rotary embeddings are applied in f32 whatever the model dtype (diffusers'
//!   `apply_rotary_emb` upcasts q/k), with candle's fused interleaved `rope_i` kernel;
//! * the sinusoidal timestep features take an already scaled `t` (see [`timestep_features`]).

use super::config::{FluxConfig, MLP_RATIO, ROPE_THETA, TIME_FEATURES};
use candle_core::{DType, IndexOp, Module, Result, Tensor, D};
use candle_nn::{LayerNorm, Linear, RmsNorm, VarBuilder};
use candle_transformers::models::flux::model::EmbedNd;

/// LayerNorm without affine parameters (eps 1e-6), as every FLUX norm is. Built with unit
/// weight and zero bias so candle takes its fused kernel on contiguous input.
fn layer_norm(dim: usize, vb: &VarBuilder) -> Result<LayerNorm> {
    let ones = Tensor::ones(dim, vb.dtype(), vb.device())?;
    let zeros = Tensor::zeros(dim, vb.dtype(), vb.device())?;
    Ok(LayerNorm::new(ones, zeros, 1e-6))
}

/// `[S, head_dim / 2]` f32 cos/sin tables of the joint `[txt; img]` sequence, shared by every
/// row of a batch (all rows have the same latent size and text length).
#[derive(Debug, Clone)]
pub(super) struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Tables for position ids `ids` (`[1, S, n_axes]` f32) through candle's `EmbedNd`, whose
    /// `[1, 1, S, D/2, 2, 2]` output holds the rotation matrices `[[cos, -sin], [sin, cos]]`.
    pub(super) fn new(embed: &EmbedNd, ids: &Tensor) -> Result<Self> {
        let pe = embed.forward(ids)?.i((0, 0))?; // [S, D/2, 2, 2]
        let cos = pe.i((.., .., 0, 0))?.contiguous()?;
        let sin = pe.i((.., .., 1, 0))?.contiguous()?;
        Ok(Self { cos, sin })
    }

    /// Rotates interleaved pairs of `x` (`[B, H, S, D]`), computing in f32.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        candle_nn::rotary_emb::rope_i(&x, &self.cos, &self.sin)?.to_dtype(dtype)
    }
}

/// Joint attention over `[B, H, S, D]` q/k/v with rotary positions; returns `[B, S, H·D]`.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, rope: &Rope) -> Result<Tensor> {
    let q = rope.apply(q)?;
    let k = rope.apply(k)?;
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let weights = (q.matmul(&k.t()?)? * scale)?;
    let probs = candle_nn::ops::softmax_last_dim(&weights)?;
    probs
        .matmul(&v.contiguous()?)?
        .transpose(1, 2)?
        .flatten_from(2)
}

/// Sinusoidal features `[cos(t·f), sin(t·f)]`, `f_k = 10000^(-k / half)`, of an already scaled
/// `t` (`[B]` f32, i.e. sigma·1000), in the op order of diffusers' `get_timestep_embedding` so
/// the f32 frequencies round identically (arguments reach ~1000 rad, where one ulp of a
/// frequency is visible in the output).
pub(super) fn timestep_features(t: &Tensor, dtype: DType) -> Result<Tensor> {
    let half = TIME_FEATURES / 2;
    let k = Tensor::arange(0u32, half as u32, t.device())?.to_dtype(DType::F32)?;
    let freqs = ((k * -(10_000f64.ln()))? / half as f64)?.exp()?;
    let args = t
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs.unsqueeze(0)?)?;
    Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)?.to_dtype(dtype)
}

/// `Linear → SiLU → Linear` (time, guidance and pooled-vector embedders).
#[derive(Debug, Clone)]
pub(super) struct MlpEmbedder {
    in_layer: Linear,
    out_layer: Linear,
}

impl MlpEmbedder {
    fn new(in_dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            in_layer: candle_nn::linear(in_dim, hidden, vb.pp("in_layer"))?,
            out_layer: candle_nn::linear(hidden, hidden, vb.pp("out_layer"))?,
        })
    }
}

impl Module for MlpEmbedder {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        xs.apply(&self.in_layer)?.silu()?.apply(&self.out_layer)
    }
}

/// One adaLN modulation: `x·(1 + scale) + shift`, and the residual gate; each `[B, 1, D]`.
struct ModulationOut {
    shift: Tensor,
    scale: Tensor,
    gate: Tensor,
}

impl ModulationOut {
    fn scale_shift(&self, xs: &Tensor) -> Result<Tensor> {
        xs.broadcast_mul(&(&self.scale + 1.0)?)?
            .broadcast_add(&self.shift)
    }

    fn gate(&self, xs: &Tensor) -> Result<Tensor> {
        self.gate.broadcast_mul(xs)
    }
}

/// `SiLU → Linear(D, sets·3·D)`, split into `sets` (shift, scale, gate) triples.
#[derive(Debug, Clone)]
struct Modulation {
    lin: Linear,
    sets: usize,
}

impl Modulation {
    fn new(dim: usize, sets: usize, vb: VarBuilder) -> Result<Self> {
        let lin = candle_nn::linear(dim, sets * 3 * dim, vb.pp("lin"))?;
        Ok(Self { lin, sets })
    }

    fn forward(&self, vec: &Tensor) -> Result<Vec<ModulationOut>> {
        let ys = vec
            .silu()?
            .apply(&self.lin)?
            .unsqueeze(1)?
            .chunk(3 * self.sets, D::Minus1)?;
        Ok(ys
            .chunks_exact(3)
            .map(|c| ModulationOut {
                shift: c[0].clone(),
                scale: c[1].clone(),
                gate: c[2].clone(),
            })
            .collect())
    }

    /// The first (shift, scale, gate) triple.
    fn first(&self, vec: &Tensor) -> Result<ModulationOut> {
        self.forward(vec)?
            .into_iter()
            .next()
            .ok_or_else(|| candle_core::Error::Msg("modulation produced no chunks".into()))
    }

    /// Both triples of a double block's modulation.
    fn pair(&self, vec: &Tensor) -> Result<(ModulationOut, ModulationOut)> {
        let mut it = self.forward(vec)?.into_iter();
        match (it.next(), it.next()) {
            (Some(a), Some(b)) => Ok((a, b)),
            _ => candle_core::bail!("modulation produced fewer than two chunk sets"),
        }
    }
}

/// Per-head RMSNorm of queries and keys (`norm.query_norm.scale`, `norm.key_norm.scale`).
#[derive(Debug, Clone)]
struct QkNorm {
    query: RmsNorm,
    key: RmsNorm,
}

impl QkNorm {
    fn new(head_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            query: RmsNorm::new(vb.get(head_dim, "query_norm.scale")?, 1e-6),
            key: RmsNorm::new(vb.get(head_dim, "key_norm.scale")?, 1e-6),
        })
    }
}

/// Splits a fused `[B, L, 3·H·D]` projection into normed `[B, H, L, D]` q, k and v.
fn split_qkv(qkv: &Tensor, heads: usize, norm: &QkNorm) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, l, _) = qkv.dims3()?;
    let qkv = qkv.reshape((b, l, 3, heads, ()))?;
    let part = |i: usize| qkv.i((.., .., i))?.transpose(1, 2)?.contiguous();
    let q = part(0)?.apply(&norm.query)?;
    let k = part(1)?.apply(&norm.key)?;
    Ok((q, k, part(2)?))
}

/// One stream's attention weights in a double block.
#[derive(Debug, Clone)]
struct StreamAttention {
    qkv: Linear,
    norm: QkNorm,
    proj: Linear,
}

impl StreamAttention {
    fn new(dim: usize, head_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            qkv: candle_nn::linear(dim, 3 * dim, vb.pp("qkv"))?,
            norm: QkNorm::new(head_dim, vb.pp("norm"))?,
            proj: candle_nn::linear(dim, dim, vb.pp("proj"))?,
        })
    }
}

/// `Linear → GELU(tanh) → Linear` (`*_mlp.0`, `*_mlp.2`).
#[derive(Debug, Clone)]
struct Mlp {
    lin1: Linear,
    lin2: Linear,
}

impl Mlp {
    fn new(dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            lin1: candle_nn::linear(dim, hidden, vb.pp("0"))?,
            lin2: candle_nn::linear(hidden, dim, vb.pp("2"))?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // candle's `gelu` is the tanh approximation, diffusers' `GELU(approximate="tanh")`.
        xs.apply(&self.lin1)?.gelu()?.apply(&self.lin2)
    }
}

/// A double-stream block: text and image keep their own weights and attend jointly.
#[derive(Debug, Clone)]
struct DoubleBlock {
    img_mod: Modulation,
    img_attn: StreamAttention,
    img_mlp: Mlp,
    txt_mod: Modulation,
    txt_attn: StreamAttention,
    txt_mlp: Mlp,
    norm: LayerNorm,
    heads: usize,
}

impl DoubleBlock {
    fn new(cfg: &FluxConfig, vb: VarBuilder) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size(), cfg.attention_head_dim);
        Ok(Self {
            img_mod: Modulation::new(h, 2, vb.pp("img_mod"))?,
            img_attn: StreamAttention::new(h, hd, vb.pp("img_attn"))?,
            img_mlp: Mlp::new(h, h * MLP_RATIO, vb.pp("img_mlp"))?,
            txt_mod: Modulation::new(h, 2, vb.pp("txt_mod"))?,
            txt_attn: StreamAttention::new(h, hd, vb.pp("txt_attn"))?,
            txt_mlp: Mlp::new(h, h * MLP_RATIO, vb.pp("txt_mlp"))?,
            norm: layer_norm(h, &vb)?,
            heads: cfg.num_attention_heads,
        })
    }

    /// The image stream's attention input `(1 + scale)·LN(img) + shift`.
    fn modulated_img(&self, img: &Tensor, vec: &Tensor) -> Result<Tensor> {
        self.img_mod
            .first(vec)?
            .scale_shift(&img.apply(&self.norm)?)
    }

    fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        vec: &Tensor,
        rope: &Rope,
    ) -> Result<[Tensor; 2]> {
        let (img_mod1, img_mod2) = self.img_mod.pair(vec)?;
        let (txt_mod1, txt_mod2) = self.txt_mod.pair(vec)?;
        let img_in = img_mod1.scale_shift(&img.apply(&self.norm)?)?;
        let (img_q, img_k, img_v) = split_qkv(
            &img_in.apply(&self.img_attn.qkv)?,
            self.heads,
            &self.img_attn.norm,
        )?;
        let txt_in = txt_mod1.scale_shift(&txt.apply(&self.norm)?)?;
        let (txt_q, txt_k, txt_v) = split_qkv(
            &txt_in.apply(&self.txt_attn.qkv)?,
            self.heads,
            &self.txt_attn.norm,
        )?;
        let q = Tensor::cat(&[txt_q, img_q], 2)?;
        let k = Tensor::cat(&[txt_k, img_k], 2)?;
        let v = Tensor::cat(&[txt_v, img_v], 2)?;
        let attn = attention(&q, &k, &v, rope)?;
        let txt_len = txt.dim(1)?;
        let txt_attn = attn.narrow(1, 0, txt_len)?;
        let img_attn = attn.narrow(1, txt_len, img.dim(1)?)?;

        let img = (img + img_mod1.gate(&img_attn.apply(&self.img_attn.proj)?)?)?;
        let img_ff = img_mod2
            .scale_shift(&img.apply(&self.norm)?)?
            .apply(&self.img_mlp)?;
        let img = (&img + img_mod2.gate(&img_ff)?)?;

        let txt = (txt + txt_mod1.gate(&txt_attn.apply(&self.txt_attn.proj)?)?)?;
        let txt_ff = txt_mod2
            .scale_shift(&txt.apply(&self.norm)?)?
            .apply(&self.txt_mlp)?;
        let txt = (&txt + txt_mod2.gate(&txt_ff)?)?;
        Ok([img, txt])
    }
}

/// A single-stream block over the joint `[txt; img]` sequence: fused qkv + MLP input
/// (`linear1`), fused attention-output + MLP-output projection (`linear2`).
#[derive(Debug, Clone)]
struct SingleBlock {
    linear1: Linear,
    linear2: Linear,
    norm: QkNorm,
    pre_norm: LayerNorm,
    modulation: Modulation,
    hidden: usize,
    heads: usize,
}

impl SingleBlock {
    fn new(cfg: &FluxConfig, vb: VarBuilder) -> Result<Self> {
        let (h, mlp) = (cfg.hidden_size(), cfg.mlp_hidden());
        Ok(Self {
            linear1: candle_nn::linear(h, 3 * h + mlp, vb.pp("linear1"))?,
            linear2: candle_nn::linear(h + mlp, h, vb.pp("linear2"))?,
            norm: QkNorm::new(cfg.attention_head_dim, vb.pp("norm"))?,
            pre_norm: layer_norm(h, &vb)?,
            modulation: Modulation::new(h, 1, vb.pp("modulation"))?,
            hidden: h,
            heads: cfg.num_attention_heads,
        })
    }

    /// `(1 + scale)·LN(x) + shift` of this block's modulation.
    fn modulated(&self, xs: &Tensor, vec: &Tensor) -> Result<Tensor> {
        self.modulation
            .first(vec)?
            .scale_shift(&xs.apply(&self.pre_norm)?)
    }

    fn forward(&self, xs: &Tensor, vec: &Tensor, rope: &Rope) -> Result<Tensor> {
        let m = self.modulation.first(vec)?;
        let x_mod = m
            .scale_shift(&xs.apply(&self.pre_norm)?)?
            .apply(&self.linear1)?;
        let qkv = x_mod.narrow(D::Minus1, 0, 3 * self.hidden)?;
        let mlp_width = x_mod.dim(D::Minus1)? - 3 * self.hidden;
        let mlp = x_mod.narrow(D::Minus1, 3 * self.hidden, mlp_width)?;
        let (q, k, v) = split_qkv(&qkv, self.heads, &self.norm)?;
        let attn = attention(&q, &k, &v, rope)?;
        let out = Tensor::cat(&[attn, mlp.gelu()?], 2)?.apply(&self.linear2)?;
        xs + m.gate(&out)?
    }
}

/// Final adaLN (`adaLN_modulation.1` gives shift then scale) and projection to packed latents.
#[derive(Debug, Clone)]
struct LastLayer {
    norm: LayerNorm,
    linear: Linear,
    ada_ln: Linear,
}

impl LastLayer {
    fn new(hidden: usize, out: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm: layer_norm(hidden, &vb)?,
            linear: candle_nn::linear(hidden, out, vb.pp("linear"))?,
            ada_ln: candle_nn::linear(hidden, 2 * hidden, vb.pp("adaLN_modulation.1"))?,
        })
    }

    fn forward(&self, xs: &Tensor, vec: &Tensor) -> Result<Tensor> {
        let chunks = vec.silu()?.apply(&self.ada_ln)?.chunk(2, 1)?;
        let [shift, scale] = chunks.as_slice() else {
            candle_core::bail!("final modulation did not split in two")
        };
        xs.apply(&self.norm)?
            .broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?
            .broadcast_add(&shift.unsqueeze(1)?)?
            .apply(&self.linear)
    }
}

/// The FLUX network in BFL names, split into the pieces the denoiser interface exposes.
#[derive(Debug, Clone)]
pub(super) struct FluxModel {
    img_in: Linear,
    txt_in: Linear,
    time_in: MlpEmbedder,
    vector_in: MlpEmbedder,
    guidance_in: Option<MlpEmbedder>,
    pub(super) pe_embedder: EmbedNd,
    double_blocks: Vec<DoubleBlock>,
    single_blocks: Vec<SingleBlock>,
    final_layer: LastLayer,
}

impl FluxModel {
    /// Builds the network from BFL-named weights.
    pub(super) fn new(cfg: &FluxConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size();
        let double_blocks = (0..cfg.num_layers)
            .map(|i| DoubleBlock::new(cfg, vb.pp("double_blocks").pp(i)))
            .collect::<Result<_>>()?;
        let single_blocks = (0..cfg.num_single_layers)
            .map(|i| SingleBlock::new(cfg, vb.pp("single_blocks").pp(i)))
            .collect::<Result<_>>()?;
        let guidance_in = cfg
            .guidance_embeds
            .then(|| MlpEmbedder::new(TIME_FEATURES, h, vb.pp("guidance_in")))
            .transpose()?;
        Ok(Self {
            img_in: candle_nn::linear(cfg.in_channels, h, vb.pp("img_in"))?,
            txt_in: candle_nn::linear(cfg.joint_attention_dim, h, vb.pp("txt_in"))?,
            time_in: MlpEmbedder::new(TIME_FEATURES, h, vb.pp("time_in"))?,
            vector_in: MlpEmbedder::new(cfg.pooled_projection_dim, h, vb.pp("vector_in"))?,
            guidance_in,
            pe_embedder: EmbedNd::new(
                cfg.attention_head_dim,
                ROPE_THETA,
                cfg.axes_dims_rope.clone(),
            ),
            double_blocks,
            single_blocks,
            final_layer: LastLayer::new(h, cfg.in_channels, vb.pp("final_layer"))?,
        })
    }

    /// `[B, T, in]` packed latents → image stream; `[B, L, ctx]` → text stream.
    pub(super) fn embed_streams(&self, img: &Tensor, txt: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((img.apply(&self.img_in)?, txt.apply(&self.txt_in)?))
    }

    /// The conditioning vector from `[B, 256]` timestep features, optional guidance features and
    /// the `[B, pooled]` vector.
    pub(super) fn embed_vec(
        &self,
        time: &Tensor,
        guidance: Option<&Tensor>,
        pooled: &Tensor,
    ) -> Result<Tensor> {
        let mut vec = time.apply(&self.time_in)?;
        if let (Some(g_in), Some(g)) = (&self.guidance_in, guidance) {
            vec = (vec + g.apply(g_in)?)?;
        }
        vec + pooled.apply(&self.vector_in)?
    }

    /// The first block's modulated image input (a single block's when there is no double one).
    pub(super) fn modulated_input(&self, img: &Tensor, vec: &Tensor) -> Result<Tensor> {
        match (self.double_blocks.first(), self.single_blocks.first()) {
            (Some(block), _) => block.modulated_img(img, vec),
            (None, Some(block)) => block.modulated(img, vec),
            (None, None) => candle_core::bail!("the model has no blocks"),
        }
    }

    /// Double blocks, then single blocks over `[txt; img]`; returns the image part.
    pub(super) fn run_blocks(
        &self,
        img: &Tensor,
        txt: &Tensor,
        vec: &Tensor,
        rope: &Rope,
    ) -> Result<Tensor> {
        let (mut img, mut txt) = (img.clone(), txt.clone());
        for block in &self.double_blocks {
            [img, txt] = block.forward(&img, &txt, vec, rope)?;
        }
        let txt_len = txt.dim(1)?;
        let img_len = img.dim(1)?;
        let mut joint = Tensor::cat(&[&txt, &img], 1)?;
        for block in &self.single_blocks {
            joint = block.forward(&joint, vec, rope)?;
        }
        joint.narrow(1, txt_len, img_len)
    }

    /// Final layer: `[B, T, D]` → `[B, T, in]` packed prediction.
    pub(super) fn head(&self, hidden: &Tensor, vec: &Tensor) -> Result<Tensor> {
        self.final_layer.forward(hidden, vec)
    }
}
