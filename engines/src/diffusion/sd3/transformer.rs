//! [`Sd3Transformer`]: loading an SD3/SD3.5 MMDiT and running it as a [`Denoiser`].
//!
//! The forward is split as the DiT stage drives it: [`Denoiser::embed`] (patchify + cropped
//! position table, text projection, timestep + pooled conditioning), [`Denoiser::run_blocks`]
//! (the joint blocks) and [`Denoiser::head`] (final adaLN layer + unpatchify), so step caching
//! can skip the block stack for some rows of a batch.

use super::blocks::FREQUENCY_EMBEDDING_SIZE;
use super::blocks::{timestep_features, ConditioningMlp, FinalLayer, JointBlock, PatchEmbed};
use super::config::{QkNorm, Sd3Config};
use super::weights::{self, Layout};
use crate::diffusion::model::{DenoiseInput, Denoiser, DenoiserInfo};
use crate::diffusion::DiffusionError;
use crate::llm::weights::{
    classify_load_error, find_safetensors_with_stem, mmap_var_builder, WeightsError, DIFFUSERS_STEM,
};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use candle_transformers::models::mmdit::embedding::{PositionEmbedder, Unpatchifier};
use std::path::Path;

/// Prefix of the denoiser's tensors in SD3 single-file checkpoints (the layout
/// candle-transformers' `MMDiT` example reads).
pub const SINGLE_FILE_PREFIX: &str = "model.diffusion_model";

/// diffusers' SD3 pipeline passes `sigma * 1000` as the timestep.
const TIMESTEP_SCALE: f64 = 1000.0;

/// An SD3 / SD3.5 (MMDiT, MMDiT-X) denoising transformer.
pub struct Sd3Transformer {
    config: Sd3Config,
    info: DenoiserInfo,
    dtype: DType,
    device: Device,
    patch_embedder: PatchEmbed,
    pos_embedder: PositionEmbedder,
    timestep_embedder: ConditioningMlp,
    pooled_embedder: ConditioningMlp,
    context_embedder: Linear,
    blocks: Vec<JointBlock>,
    final_layer: FinalLayer,
    unpatchifier: Unpatchifier,
}

/// A batch embedded by [`Sd3Transformer`]: both streams entering the block stack and the
/// conditioning every adaLN reads. Tensors are in the model's dtype.
#[derive(Debug, Clone)]
pub struct Sd3Embedded {
    /// `[B, T, D]` patch embeddings plus positions.
    x: Tensor,
    /// `[B, L, D]` projected text tokens.
    context: Tensor,
    /// `[B, D]` `silu(timestep embedding + pooled embedding)`: every adaLN linear applies SiLU
    /// to the conditioning first, so it is done once here.
    c_silu: Tensor,
    /// Latent height and width (in latent pixels), for unpatchify.
    latent_size: (usize, usize),
}

impl Sd3Embedded {
    /// Rows in the batch.
    pub fn batch_size(&self) -> usize {
        self.x.dims().first().copied().unwrap_or(0)
    }

    /// Latent `(height, width)` the batch was embedded from.
    pub fn latent_size(&self) -> (usize, usize) {
        self.latent_size
    }
}

impl Sd3Transformer {
    /// Loads a diffusers `transformer/` folder (`config.json` +
    /// `diffusion_pytorch_model*.safetensors`), converting the weights to `dtype` on `device`.
    ///
    /// The diffusers tensors are renamed into SD3's layout (q/k/v fused, AdaLayerNormContinuous
    /// halves swapped, as the `weights` module documents); a missing one is an error naming it.
    pub fn load(
        transformer_dir: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, DiffusionError> {
        let config_path = transformer_dir.join("config.json");
        let config = Sd3Config::from_file(&config_path)?;
        let paths = find_safetensors_with_stem(transformer_dir, DIFFUSERS_STEM)?;
        let tensors = {
            let source = mmap_var_builder(paths, dtype, device)?;
            weights::check_layout(&source, &config, Layout::Diffusers, &config_path)?;
            weights::convert_diffusers(&source, &config)?
        };
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        Self::new(config.clone(), vb).map_err(|e| load_error(e, Some(&config)))
    }

    /// Loads an SD3 single-file checkpoint (tensors under `model.diffusion_model.`, as
    /// candle-transformers' `MMDiT` reads them; a file without the prefix is accepted too).
    /// Such files carry no config, so the caller supplies it.
    pub fn load_single_file(
        path: &Path,
        config: &Sd3Config,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, DiffusionError> {
        config.validate(path)?;
        let vb = mmap_var_builder(vec![path.to_path_buf()], dtype, device)?;
        let vb = if vb.contains_tensor("pos_embed") {
            vb
        } else {
            vb.pp(SINGLE_FILE_PREFIX)
        };
        weights::check_layout(&vb, config, Layout::Sd3, path)?;
        Self::new(config.clone(), vb).map_err(|e| load_error(e, None))
    }

    /// Builds the model from SD3-named tensors.
    fn new(config: Sd3Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let (d, heads, p) = (
            config.hidden_size(),
            config.num_attention_heads,
            config.patch_size,
        );
        let n = config.num_layers;
        let blocks = (0..n)
            .map(|i| {
                JointBlock::new(
                    d,
                    heads,
                    config.is_dual_attention(i),
                    i + 1 == n,
                    config.qk_norm == QkNorm::RmsNorm,
                    vb.pp(format!("joint_blocks.{i}")),
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let info = DenoiserInfo {
            architecture: "sd3",
            latent_channels: config.in_channels,
            latent_multiple: p,
            context_dim: config.joint_attention_dim,
            pooled_dim: config.pooled_projection_dim,
            guidance_embedding: false,
            max_latent_side: Some(config.pos_embed_max_size * p),
        };
        Ok(Self {
            info,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            patch_embedder: PatchEmbed::new(p, config.in_channels, d, vb.pp("x_embedder"))?,
            pos_embedder: PositionEmbedder::new(d, p, config.pos_embed_max_size, vb.clone())?,
            timestep_embedder: ConditioningMlp::new(
                FREQUENCY_EMBEDDING_SIZE,
                d,
                vb.pp("t_embedder"),
            )?,
            pooled_embedder: ConditioningMlp::new(
                config.pooled_projection_dim,
                d,
                vb.pp("y_embedder"),
            )?,
            context_embedder: candle_nn::linear(
                config.joint_attention_dim,
                d,
                vb.pp("context_embedder"),
            )?,
            blocks,
            final_layer: FinalLayer::new(d, p * p * config.out_channels, vb.pp("final_layer"))?,
            unpatchifier: Unpatchifier::new(p, config.out_channels)?,
            config,
        })
    }

    /// The model's shape.
    pub fn config(&self) -> &Sd3Config {
        &self.config
    }

    /// The dtype the weights (and intermediate tensors) are in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Checks the input shapes; returns `(batch, height, width)`.
    fn check_input(
        &self,
        input: &DenoiseInput<'_>,
    ) -> Result<(usize, usize, usize), DiffusionError> {
        let c = &self.config;
        let bad = |m: String| Err(DiffusionError::Input(m));
        let &[b, ch, h, w] = input.latents.dims() else {
            return bad(format!(
                "latents must be [B, C, H, W], got {:?}",
                input.latents.dims()
            ));
        };
        if b == 0 || ch != c.in_channels {
            return bad(format!(
                "latents {:?}: expected a non-empty batch of {} channels",
                input.latents.dims(),
                c.in_channels
            ));
        }
        let p = c.patch_size;
        #[allow(clippy::manual_is_multiple_of)] // `is_multiple_of` needs Rust 1.87; MSRV is 1.85
        let aligned = h > 0 && w > 0 && h % p == 0 && w % p == 0;
        if !aligned {
            return bad(format!(
                "latent size {h}x{w} is not a positive multiple of the patch size {p}"
            ));
        }
        let max = c.pos_embed_max_size * p;
        if h > max || w > max {
            return bad(format!(
                "latent size {h}x{w} exceeds the position table ({max}x{max} latent pixels)"
            ));
        }
        if input.sigmas.dims() != [b] {
            return bad(format!(
                "sigmas must be [{b}], got {:?}",
                input.sigmas.dims()
            ));
        }
        match input.context.dims() {
            &[cb, l, cd] if cb == b && l > 0 && cd == c.joint_attention_dim => {}
            dims => {
                return bad(format!(
                    "context must be [{b}, L > 0, {}], got {dims:?}",
                    c.joint_attention_dim
                ))
            }
        }
        if input.pooled.dims() != [b, c.pooled_projection_dim] {
            return bad(format!(
                "pooled must be [{b}, {}], got {:?}",
                c.pooled_projection_dim,
                input.pooled.dims()
            ));
        }
        Ok((b, h, w))
    }
}

/// Turns a candle error raised while building the model into a [`WeightsError`] where it is a
/// missing tensor or a shape mismatch. For a converted diffusers checkpoint (`config` given),
/// a shape mismatch also names the diffusers tensors the SD3 tensor was made from.
fn load_error(err: candle_core::Error, config: Option<&Sd3Config>) -> DiffusionError {
    match classify_load_error(err) {
        Ok(WeightsError::ShapeMismatch { msg, expected, got }) => {
            let sources = config.and_then(|c| {
                let target = msg.strip_prefix("shape mismatch for ")?;
                weights::diffusers_sources(c, target)
            });
            let msg = match sources {
                Some(sources) => format!("{msg} (from diffusers {})", sources.join(" + ")),
                None => msg,
            };
            WeightsError::ShapeMismatch { msg, expected, got }.into()
        }
        Ok(other) => other.into(),
        Err(err) => err.into(),
    }
}

impl Denoiser for Sd3Transformer {
    type Embedded = Sd3Embedded;

    fn info(&self) -> &DenoiserInfo {
        &self.info
    }

    /// `input.guidance` is ignored: SD3 uses classifier-free guidance, not a guidance
    /// embedding.
    fn embed(&self, input: &DenoiseInput<'_>) -> Result<Sd3Embedded, DiffusionError> {
        let (_, h, w) = self.check_input(input)?;
        let latents = input.latents.to_dtype(self.dtype)?;
        let pos = self.pos_embedder.get_cropped_pos_embed(h, w)?;
        let x = self.patch_embedder.forward(&latents)?.broadcast_add(&pos)?;
        // Timestep features in f32 (as diffusers computes them), then the model dtype.
        let t = (input.sigmas.to_dtype(DType::F32)? * TIMESTEP_SCALE)?;
        let t = timestep_features(&t)?.to_dtype(self.dtype)?;
        let t_emb = self.timestep_embedder.forward(&t)?;
        let y_emb = self
            .pooled_embedder
            .forward(&input.pooled.to_dtype(self.dtype)?)?;
        let context = self
            .context_embedder
            .forward(&input.context.to_dtype(self.dtype)?)?;
        Ok(Sd3Embedded {
            x,
            context,
            c_silu: (t_emb + y_emb)?.silu()?,
            latent_size: (h, w),
        })
    }

    fn select_rows(&self, e: &Sd3Embedded, rows: &[usize]) -> Result<Sd3Embedded, DiffusionError> {
        let b = e.batch_size();
        if rows.is_empty() {
            return Err(DiffusionError::Input("select_rows: no rows given".into()));
        }
        let index = rows
            .iter()
            .map(|&r| u32::try_from(r).ok().filter(|_| r < b))
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| {
                DiffusionError::Input(format!(
                    "select_rows: rows {rows:?} out of range for batch {b}"
                ))
            })?;
        let index = Tensor::from_vec(index, rows.len(), &self.device)?;
        Ok(Sd3Embedded {
            x: e.x.index_select(&index, 0)?,
            context: e.context.index_select(&index, 0)?,
            c_silu: e.c_silu.index_select(&index, 0)?,
            latent_size: e.latent_size,
        })
    }

    /// In f32 (it is only compared between steps), unlike the block-stack tensors.
    fn modulated_input(&self, e: &Sd3Embedded) -> Result<Tensor, DiffusionError> {
        let first = self
            .blocks
            .first()
            .ok_or_else(|| DiffusionError::Input("model has no blocks".into()))?;
        Ok(first
            .modulated_input(&e.x, &e.c_silu)?
            .to_dtype(DType::F32)?)
    }

    /// In the model's dtype.
    fn stack_input(&self, e: &Sd3Embedded) -> Result<Tensor, DiffusionError> {
        Ok(e.x.clone())
    }

    /// In the model's dtype.
    fn run_blocks(&self, e: &Sd3Embedded) -> Result<Tensor, DiffusionError> {
        let (mut context, mut x) = (e.context.clone(), e.x.clone());
        for block in &self.blocks {
            let (next_context, next_x) = block.forward(&context, &x, &e.c_silu)?;
            x = next_x;
            if let Some(next_context) = next_context {
                context = next_context;
            }
        }
        Ok(x)
    }

    /// `hidden` may be in any float dtype; it is cast to the model's.
    fn head(&self, e: &Sd3Embedded, hidden: &Tensor) -> Result<Tensor, DiffusionError> {
        if hidden.dims() != e.x.dims() {
            return Err(DiffusionError::Input(format!(
                "head: hidden must be {:?} like the embedded batch, got {:?}",
                e.x.dims(),
                hidden.dims()
            )));
        }
        let out = self
            .final_layer
            .forward(&hidden.to_dtype(self.dtype)?, &e.c_silu)?;
        let (h, w) = e.latent_size;
        Ok(self
            .unpatchifier
            .unpatchify(&out, h, w)?
            .to_dtype(DType::F32)?)
    }
}
