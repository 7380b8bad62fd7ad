//! The ViT vision tower (CLIP or SigLIP, Transformers' tensor names) and the LLaVA projector.
//!
//! candle-transformers 0.11.1 has both towers, but its CLIP returns per-layer states without the
//! embeddings' (so Transformers' `hidden_states[k]` indexing is off by one), hard-codes
//! `layer_norm_eps = 1e-5` and quick-GELU, and its SigLIP only returns the post-normed last
//! state. LLaVA reads an inner layer (usually the second to last) before `post_layernorm`, so
//! the stack is written here on candle-nn pieces and only runs the layers the selection needs.
//! The unit tests check it against candle-transformers' towers where both apply.

use super::config::{Act, TowerConfig, TowerKind, VisionConfig};
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{LayerNorm, Linear, VarBuilder};

fn act(a: Act, xs: &Tensor) -> Result<Tensor> {
    match a {
        Act::Gelu => xs.gelu_erf(),
        Act::GeluTanh => xs.gelu(),
        Act::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702f64)?)?,
        Act::Relu => xs.relu(),
        Act::Silu => xs.silu(),
    }
}

#[derive(Debug, Clone)]
struct Embeddings {
    /// The patch conv (kernel = stride = patch) as a linear map on flattened
    /// `(channel, row, column)` patches: `[hidden, C·p·p]`. (candle's CPU conv2d has no bf16.)
    patch: Linear,
    patch_size: usize,
    /// `[1, 1, hidden]` (CLIP).
    class: Option<Tensor>,
    /// `[1, tokens, hidden]`.
    position: Tensor,
    /// `pre_layrnorm` (CLIP).
    pre_norm: Option<LayerNorm>,
}

impl Embeddings {
    fn load(c: &TowerConfig, vb: VarBuilder) -> Result<Self> {
        let vbe = vb.pp("embeddings");
        let (h, ch, p) = (c.hidden_size, c.num_channels, c.patch_size);
        let vbp = vbe.pp("patch_embedding");
        let weight = vbp.get((h, ch, p, p), "weight")?.reshape((h, ch * p * p))?;
        let (bias, class, pre_norm) = match c.kind {
            TowerKind::Clip => (
                None,
                Some(vbe.get(h, "class_embedding")?.reshape((1, 1, h))?),
                Some(candle_nn::layer_norm(
                    h,
                    c.layer_norm_eps,
                    vb.pp("pre_layrnorm"),
                )?),
            ),
            TowerKind::Siglip => (Some(vbp.get(h, "bias")?), None, None),
        };
        let position = vbe
            .pp("position_embedding")
            .get((c.num_tokens(), h), "weight")?
            .unsqueeze(0)?;
        Ok(Self {
            patch: Linear::new(weight, bias),
            patch_size: p,
            class,
            position,
            pre_norm,
        })
    }

    /// `[B, C, H, W]` → `[B, patches, C·p·p]`, patches in row-major order.
    fn patchify(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixels.dims4()?;
        let p = self.patch_size;
        let (gh, gw) = (h / p, w / p);
        pixels
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, gh * gw, c * p * p))
    }

    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let b = pixels.dim(0)?;
        let x = self.patch.forward(&self.patchify(pixels)?)?;
        let x = match &self.class {
            Some(cls) => {
                let hidden = cls.dim(D::Minus1)?;
                Tensor::cat(&[cls.expand((b, 1, hidden))?, x], 1)?
            }
            None => x,
        };
        let x = x.broadcast_add(&self.position)?;
        match &self.pre_norm {
            Some(n) => n.forward(&x),
            None => Ok(x),
        }
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    norm1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Act,
    heads: usize,
    head_dim: usize,
}

impl EncoderLayer {
    fn load(c: &TowerConfig, vb: VarBuilder) -> Result<Self> {
        let h = c.hidden_size;
        let eps = c.layer_norm_eps;
        let att = vb.pp("self_attn");
        let mlp = vb.pp("mlp");
        Ok(Self {
            norm1: candle_nn::layer_norm(h, eps, vb.pp("layer_norm1"))?,
            q: candle_nn::linear(h, h, att.pp("q_proj"))?,
            k: candle_nn::linear(h, h, att.pp("k_proj"))?,
            v: candle_nn::linear(h, h, att.pp("v_proj"))?,
            out: candle_nn::linear(h, h, att.pp("out_proj"))?,
            norm2: candle_nn::layer_norm(h, eps, vb.pp("layer_norm2"))?,
            fc1: candle_nn::linear(h, c.intermediate_size, mlp.pp("fc1"))?,
            fc2: candle_nn::linear(c.intermediate_size, h, mlp.pp("fc2"))?,
            act: c.hidden_act,
            heads: c.num_attention_heads,
            head_dim: h / c.num_attention_heads,
        })
    }

    fn attention(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let split = |lin: &Linear| -> Result<Tensor> {
            lin.forward(x)?
                .reshape((b, t, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (split(&self.q)?, split(&self.k)?, split(&self.v)?);
        let scale = (self.head_dim as f64).powf(-0.5);
        let scores = (q.matmul(&k.t()?)? * scale)?;
        // Softmax in f32 whatever the model dtype, as Transformers does.
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
        let o = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h))?;
        self.out.forward(&o)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (x + self.attention(&self.norm1.forward(x)?)?)?;
        let m = self.fc1.forward(&self.norm2.forward(&x)?)?;
        let m = self.fc2.forward(&act(self.act, &m)?)?;
        x + m
    }
}

/// The vision tower, holding only the layers the feature selection reads.
#[derive(Debug, Clone)]
pub struct VisionTower {
    embeddings: Embeddings,
    layers: Vec<EncoderLayer>,
}

impl VisionTower {
    /// Loads the embeddings and the first `layers` encoder layers from `vb`
    /// (`…vision_tower.vision_model`).
    pub fn load(c: &TowerConfig, layers: usize, vb: VarBuilder) -> Result<Self> {
        let embeddings = Embeddings::load(c, vb.clone())?;
        let vbl = vb.pp("encoder").pp("layers");
        let layers = (0..layers.min(c.num_hidden_layers))
            .map(|i| EncoderLayer::load(c, vbl.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { embeddings, layers })
    }

    /// Transformers' `hidden_states` (index 0 the embeddings' output, `k` after layer `k`) at
    /// each of `indices` (each at most the number of loaded layers), `[B, tokens, hidden]`.
    pub fn hidden_states(&self, pixels: &Tensor, indices: &[usize]) -> Result<Vec<Tensor>> {
        let deepest = indices.iter().copied().max().unwrap_or(0);
        if deepest > self.layers.len() {
            candle_core::bail!(
                "hidden state {deepest} asked of a tower with {} layers loaded",
                self.layers.len()
            );
        }
        let mut states = vec![self.embeddings.forward(pixels)?];
        for layer in &self.layers[..deepest] {
            let next = layer.forward(states.last().expect("states is never empty"))?;
            states.push(next);
        }
        Ok(indices.iter().map(|&i| states[i].clone()).collect())
    }
}

/// `LlavaMultiModalProjector`: `linear_2(act(linear_1(x)))`.
#[derive(Debug, Clone)]
pub struct Projector {
    linear_1: Linear,
    linear_2: Linear,
    act: Act,
}

impl Projector {
    /// Loads `…multi_modal_projector` mapping `in_dim` to `out_dim`.
    pub fn load(in_dim: usize, out_dim: usize, cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let b = cfg.projector_bias;
        Ok(Self {
            linear_1: candle_nn::linear_b(in_dim, out_dim, b, vb.pp("linear_1"))?,
            linear_2: candle_nn::linear_b(out_dim, out_dim, b, vb.pp("linear_2"))?,
            act: cfg.projector_act,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.linear_1.forward(x)?;
        self.linear_2.forward(&act(self.act, &x)?)
    }
}

/// Tower, selection and projector: pixels `[B, 3, H, W]` → features `[B, rows, out_dim]`.
#[derive(Debug, Clone)]
pub struct VisionModel {
    pub tower: VisionTower,
    pub projector: Projector,
    pub feature_layers: Vec<usize>,
    pub drop_first_token: bool,
}

impl VisionModel {
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let states = self.tower.hidden_states(pixels, &self.feature_layers)?;
        let states = states
            .into_iter()
            .map(|s| {
                if self.drop_first_token {
                    let t = s.dim(1)?;
                    s.narrow(1, 1, t - 1)
                } else {
                    Ok(s)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let x = if states.len() == 1 {
            states.into_iter().next().expect("one state")
        } else {
            Tensor::cat(&states, D::Minus1)?
        };
        self.projector.forward(&x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;
    use candle_transformers::models::{clip, siglip};

    fn tower_cfg(kind: TowerKind, act: Act, eps: f64) -> TowerConfig {
        TowerConfig {
            kind,
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            image_size: 16,
            patch_size: 4,
            num_channels: 3,
            layer_norm_eps: eps,
            hidden_act: act,
        }
    }

    /// Random tensors for every name the tower asks for (VarMap initialises them).
    fn random_vb(dev: &Device) -> (VarMap, VarBuilder<'static>) {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, dev);
        (vm, vb)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn clip_tower_matches_candle_transformers() {
        let dev = Device::Cpu;
        let c = tower_cfg(TowerKind::Clip, Act::QuickGelu, 1e-5);
        let (vm, vb) = random_vb(&dev);
        let ours = VisionTower::load(&c, 2, vb.clone()).unwrap();
        // Layer norms start at weight 1 / bias 0 in a VarMap; perturb every variable so the
        // comparison exercises them.
        for var in vm.all_vars() {
            let noise = Tensor::randn(0f32, 0.3, var.shape(), &dev).unwrap();
            var.set(&(var.as_tensor() + noise).unwrap()).unwrap();
        }
        let theirs = clip::vision_model::ClipVisionTransformer::new(
            vb.clone(),
            &clip::vision_model::ClipVisionConfig {
                embed_dim: 16,
                activation: clip::text_model::Activation::QuickGelu,
                intermediate_size: 24,
                num_hidden_layers: 2,
                num_attention_heads: 2,
                projection_dim: 16,
                num_channels: 3,
                image_size: 16,
                patch_size: 4,
            },
        )
        .unwrap();
        let pixels = Tensor::randn(0f32, 1.0, (2, 3, 16, 16), &dev).unwrap();
        let theirs = theirs.output_hidden_states(&pixels).unwrap();
        let ours = ours.hidden_states(&pixels, &[1, 2]).unwrap();
        // Theirs lists the states after each layer (no embeddings entry), then the pooled one.
        assert_eq!(ours[0].dims(), &[2, 17, 16]);
        for i in 0..2 {
            let scale = max_diff(&ours[i], &ours[i].zeros_like().unwrap()).max(1.0);
            let d = max_diff(&ours[i], &theirs[i]);
            // candle-transformers scales q before q·kᵀ, we scale the scores: f32 rounding only.
            assert!(d < 5e-5 * scale, "state {i}: {d} (scale {scale})");
        }
    }

    #[test]
    fn siglip_tower_matches_candle_transformers() {
        let dev = Device::Cpu;
        let c = tower_cfg(TowerKind::Siglip, Act::GeluTanh, 1e-6);
        let (vm, vb) = random_vb(&dev);
        let ours = VisionTower::load(&c, 2, vb.clone()).unwrap();
        let post = candle_nn::layer_norm(16, 1e-6, vb.pp("post_layernorm")).unwrap();
        for var in vm.all_vars() {
            let noise = Tensor::randn(0f32, 0.3, var.shape(), &dev).unwrap();
            var.set(&(var.as_tensor() + noise).unwrap()).unwrap();
        }
        let cfg: siglip::VisionConfig = serde_json::from_value(serde_json::json!({
            "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_channels": 3, "image_size": 16, "patch_size": 4,
            "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6
        }))
        .unwrap();
        let theirs = siglip::VisionModel::new(&cfg, false, vb.clone()).unwrap();
        let pixels = Tensor::randn(0f32, 1.0, (2, 3, 16, 16), &dev).unwrap();
        let theirs = theirs.forward(&pixels).unwrap();
        let ours = ours.hidden_states(&pixels, &[2]).unwrap();
        let ours = post.forward(&ours[0]).unwrap();
        assert_eq!(ours.dims(), &[2, 16, 16]);
        let scale = max_diff(&ours, &ours.zeros_like().unwrap()).max(1.0);
        let d = max_diff(&ours, &theirs);
        // Unseeded random weights: the same f32 rounding bound as the CLIP test, relative to
        // the largest activation (an absolute 1e-5 failed once in CI on a large draw).
        assert!(d < 5e-5 * scale, "{d} (scale {scale})");
    }
}
