//! The FLUX.1 denoising transformer (dev / schnell) as a [`Denoiser`].
//!
//! Loads diffusers' `transformer/` folder (renaming its tensors into the Black Forest Labs
//! layout, the reverse of diffusers' `convert_flux_to_diffusers.py`) or a BFL single file, and
//! runs the network in three pieces so step caching (TeaCache) can skip the block stack for rows
//! whose input barely changed:
//! * [`Denoiser::embed`]: 2×2-pack the latents into tokens, embed image and text streams, build
//!   the rotary table of the joint sequence and the conditioning vector;
//! * [`Denoiser::run_blocks`]: double-stream blocks, then single-stream blocks over `[txt; img]`;
//! * [`Denoiser::head`]: final adaLN + projection, unpacked to `[B, C, H, W]`.
//!
//! Timestep conventions follow diffusers' `FluxPipeline`: the pipeline passes `t / 1000` = sigma,
//! the transformer embeds `sigma · 1000` (and `guidance · 1000`).

mod blocks;
mod config;
mod convert;

pub use config::{FluxConfig, FLUX_CLASS_NAME};
pub(crate) use convert::diffusers_tensor_shapes;

use super::model::{DenoiseInput, Denoiser, DenoiserInfo};
use super::DiffusionError;
use crate::llm::weights::{find_safetensors_with_stem, mmap_var_builder, DIFFUSERS_STEM};
use blocks::{timestep_features, FluxModel, Rope};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::path::Path;

/// Prefix some single-file FLUX checkpoints (ComfyUI exports) put before the BFL names.
const COMFY_PREFIX: &str = "model.diffusion_model";

/// A loaded FLUX transformer.
#[derive(Debug, Clone)]
pub struct FluxTransformer {
    model: FluxModel,
    config: FluxConfig,
    info: DenoiserInfo,
    dtype: DType,
    device: Device,
}

/// One embedded batch: everything the block stack and head need, per row except the rotary
/// table (all rows share latent size and text length).
#[derive(Debug, Clone)]
pub struct FluxEmbedded {
    /// `[B, T, D]` image tokens, model dtype.
    img: Tensor,
    /// `[B, L, D]` text tokens, model dtype.
    txt: Tensor,
    /// `[B, D]` conditioning vector (timestep + guidance + pooled text), model dtype.
    vec: Tensor,
    /// Rotary table of the `L + T` joint sequence.
    rope: Rope,
    /// Latent height and width (twice the token grid).
    height: usize,
    width: usize,
}

impl FluxEmbedded {
    /// Rows in the batch.
    pub fn batch_size(&self) -> usize {
        self.img.dims().first().copied().unwrap_or(0)
    }
}

impl FluxTransformer {
    /// Loads a diffusers `transformer/` folder: `config.json` and
    /// `diffusion_pytorch_model*.safetensors` (single file or sharded), converting the weights to
    /// `dtype` on `device`. A missing tensor is reported under its diffusers name.
    pub fn load(
        transformer_dir: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, DiffusionError> {
        let config = FluxConfig::from_file(&transformer_dir.join("config.json"))?;
        let paths = find_safetensors_with_stem(transformer_dir, DIFFUSERS_STEM)?;
        let src = mmap_var_builder(paths, dtype, device)?;
        let tensors = convert::bfl_tensors(&config, &src)?;
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        Self::from_var_builder(config, vb)
    }

    /// Loads a Black Forest Labs single-file checkpoint (`flux1-dev.safetensors`, the names
    /// candle-transformers reads; a `model.diffusion_model.` prefix is accepted too). The file
    /// carries no config, so the caller gives it (e.g. [`FluxConfig::dev`]).
    pub fn load_single_file(
        path: &Path,
        config: &FluxConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, DiffusionError> {
        config
            .validate()
            .map_err(|m| DiffusionError::config(path, m))?;
        let vb = mmap_var_builder(vec![path.to_path_buf()], dtype, device)?;
        let vb = if !vb.contains_tensor("img_in.weight")
            && vb.contains_tensor(&format!("{COMFY_PREFIX}.img_in.weight"))
        {
            vb.pp(COMFY_PREFIX)
        } else {
            vb
        };
        Self::from_var_builder(config.clone(), vb)
    }

    fn from_var_builder(config: FluxConfig, vb: VarBuilder) -> Result<Self, DiffusionError> {
        let (dtype, device) = (vb.dtype(), vb.device().clone());
        let model = FluxModel::new(&config, vb).map_err(convert::load_error)?;
        let info = DenoiserInfo {
            architecture: "flux",
            latent_channels: config.latent_channels(),
            latent_multiple: 2,
            context_dim: config.joint_attention_dim,
            pooled_dim: config.pooled_projection_dim,
            guidance_embedding: config.guidance_embeds,
            max_latent_side: None,
        };
        Ok(Self {
            model,
            config,
            info,
            dtype,
            device,
        })
    }

    /// The model's config.
    pub fn config(&self) -> &FluxConfig {
        &self.config
    }

    /// The dtype weights and activations are held in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Checks the input shapes against each other and the model; returns (B, H, W, L).
    fn check_input(&self, input: &DenoiseInput<'_>) -> Result<[usize; 4], DiffusionError> {
        let bad = |m: String| Err(DiffusionError::Input(m));
        let info = &self.info;
        let Ok((b, c, h, w)) = input.latents.dims4() else {
            return bad(format!(
                "latents must be [B, C, H, W], got {:?}",
                input.latents.dims()
            ));
        };
        #[allow(clippy::manual_is_multiple_of)] // `is_multiple_of` needs Rust 1.87; MSRV is 1.85
        if b == 0 || c != info.latent_channels || h == 0 || w == 0 || h % 2 != 0 || w % 2 != 0 {
            return bad(format!(
                "latents {:?}: expected a non-empty batch of {} channels with even, non-zero \
                 height and width",
                input.latents.dims(),
                info.latent_channels
            ));
        }
        if input.sigmas.dims() != [b] {
            return bad(format!("sigmas {:?}: expected [{b}]", input.sigmas.dims()));
        }
        let l = match input.context.dims() {
            &[cb, l, cd] if cb == b && l > 0 && cd == info.context_dim => l,
            d => {
                return bad(format!(
                    "context {d:?}: expected [{b}, L > 0, {}]",
                    info.context_dim
                ))
            }
        };
        if input.pooled.dims() != [b, info.pooled_dim] {
            return bad(format!(
                "pooled {:?}: expected [{b}, {}]",
                input.pooled.dims(),
                info.pooled_dim
            ));
        }
        match (info.guidance_embedding, input.guidance) {
            (true, None) => {
                return bad(
                    "this FLUX model embeds a guidance scale; input.guidance is required".into(),
                )
            }
            (true, Some(g)) if g.dims() != [b] => {
                return bad(format!("guidance {:?}: expected [{b}]", g.dims()))
            }
            _ => {}
        }
        Ok([b, h, w, l])
    }

    /// `[1, L + T, 3]` position ids: zeros for text, `(0, row, col)` for each 2×2 patch.
    fn position_ids(
        &self,
        txt_len: usize,
        rows: usize,
        cols: usize,
    ) -> candle_core::Result<Tensor> {
        let mut ids = vec![0f32; 3 * txt_len];
        ids.reserve(3 * rows * cols);
        for r in 0..rows {
            for c in 0..cols {
                ids.extend_from_slice(&[0.0, r as f32, c as f32]);
            }
        }
        Tensor::from_vec(ids, (1, txt_len + rows * cols, 3), &self.device)
    }

    /// `[B]` sigmas or guidance scales → sinusoidal features of `x · 1000`. The value is rounded
    /// to the model dtype before scaling, as diffusers (`timestep.to(hidden_states.dtype) * 1000`)
    /// and the BFL sampler (`torch.full(..., dtype=img.dtype)`) do, so bf16 runs embed the same
    /// timestep the model was trained with.
    fn scaled_features(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let t = (x.to_dtype(self.dtype)? * 1000.0)?;
        timestep_features(&t, self.dtype)
    }
}

/// `[B, C, H, W]` → `[B, HW/4, 4C]`: each 2×2 patch becomes one token, channels outermost
/// (diffusers' `_pack_latents`).
fn pack_latents(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h / 2, 2, w / 2, 2))?
        .permute([0, 2, 4, 1, 3, 5])?
        .reshape((b, (h / 2) * (w / 2), c * 4))
}

/// Inverse of [`pack_latents`] (diffusers' `_unpack_latents`).
fn unpack_latents(x: &Tensor, h: usize, w: usize) -> candle_core::Result<Tensor> {
    let (b, _, d) = x.dims3()?;
    let c = d / 4;
    x.reshape((b, h / 2, w / 2, c, 2, 2))?
        .permute([0, 3, 1, 4, 2, 5])?
        .reshape((b, c, h, w))
}

impl Denoiser for FluxTransformer {
    type Embedded = FluxEmbedded;

    fn info(&self) -> &DenoiserInfo {
        &self.info
    }

    fn embed(&self, input: &DenoiseInput<'_>) -> Result<FluxEmbedded, DiffusionError> {
        let [_, height, width, txt_len] = self.check_input(input)?;
        let packed = pack_latents(&input.latents.to_dtype(self.dtype)?)?;
        let context = input.context.to_dtype(self.dtype)?;
        let (img, txt) = self.model.embed_streams(&packed, &context)?;
        let time = self.scaled_features(input.sigmas)?;
        let guidance = match (self.info.guidance_embedding, input.guidance) {
            (true, Some(g)) => Some(self.scaled_features(g)?),
            _ => None,
        };
        let pooled = input.pooled.to_dtype(self.dtype)?;
        let vec = self.model.embed_vec(&time, guidance.as_ref(), &pooled)?;
        let ids = self.position_ids(txt_len, height / 2, width / 2)?;
        let rope = Rope::new(&self.model.pe_embedder, &ids)?;
        Ok(FluxEmbedded {
            img,
            txt,
            vec,
            rope,
            height,
            width,
        })
    }

    fn select_rows(
        &self,
        embedded: &FluxEmbedded,
        rows: &[usize],
    ) -> Result<FluxEmbedded, DiffusionError> {
        let batch = embedded.batch_size();
        if rows.is_empty() {
            return Err(DiffusionError::Input(
                "select_rows: no rows selected".into(),
            ));
        }
        let idx = rows
            .iter()
            .map(|&r| u32::try_from(r).ok().filter(|_| r < batch))
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| {
                DiffusionError::Input(format!(
                    "select_rows: rows {rows:?} out of a batch of {batch}"
                ))
            })?;
        let idx = Tensor::new(idx.as_slice(), &self.device)?;
        Ok(FluxEmbedded {
            img: embedded.img.index_select(&idx, 0)?,
            txt: embedded.txt.index_select(&idx, 0)?,
            vec: embedded.vec.index_select(&idx, 0)?,
            rope: embedded.rope.clone(),
            height: embedded.height,
            width: embedded.width,
        })
    }

    fn modulated_input(&self, embedded: &FluxEmbedded) -> Result<Tensor, DiffusionError> {
        Ok(self.model.modulated_input(&embedded.img, &embedded.vec)?)
    }

    fn stack_input(&self, embedded: &FluxEmbedded) -> Result<Tensor, DiffusionError> {
        Ok(embedded.img.clone())
    }

    fn run_blocks(&self, embedded: &FluxEmbedded) -> Result<Tensor, DiffusionError> {
        let e = embedded;
        Ok(self.model.run_blocks(&e.img, &e.txt, &e.vec, &e.rope)?)
    }

    fn head(&self, embedded: &FluxEmbedded, hidden: &Tensor) -> Result<Tensor, DiffusionError> {
        if hidden.dims() != embedded.img.dims() {
            return Err(DiffusionError::Input(format!(
                "head: hidden {:?} does not match the embedded image stream {:?}",
                hidden.dims(),
                embedded.img.dims()
            )));
        }
        let hidden = hidden.to_dtype(self.dtype)?;
        let out = self
            .model
            .head(&hidden, &embedded.vec)?
            .to_dtype(DType::F32)?;
        Ok(unpack_latents(&out, embedded.height, embedded.width)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn pack_roundtrips_and_orders_like_diffusers() {
        // [1, 2, 2, 4]: values encode (c, y, x) so the token layout can be checked directly.
        let v: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let x = Tensor::from_vec(v, (1, 2, 2, 4), &Device::Cpu).unwrap();
        let p = pack_latents(&x).unwrap();
        assert_eq!(p.dims(), &[1, 2, 8]);
        // Token 1 = patch at column 1: channel 0 rows (0,1) cols (2,3), then channel 1.
        let t1: Vec<f32> = p.get(0).unwrap().get(1).unwrap().to_vec1().unwrap();
        assert_eq!(t1, [2.0, 3.0, 6.0, 7.0, 10.0, 11.0, 14.0, 15.0]);
        let back = unpack_latents(&p, 2, 4).unwrap();
        let diff = (back - &x).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }

    /// The BFL single-file path reads the same network: the diffusers fixture, converted and
    /// saved under BFL names (bare and with ComfyUI's prefix), gives diffusers' output.
    #[test]
    fn single_file_layout_matches_diffusers() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flux_tiny");
        let dev = Device::Cpu;
        let config = FluxConfig::from_file(&dir.join("config.json")).unwrap();
        let paths = find_safetensors_with_stem(&dir, DIFFUSERS_STEM).unwrap();
        let src = mmap_var_builder(paths, DType::F32, &dev).unwrap();
        let bfl = convert::bfl_tensors(&config, &src).unwrap();
        let io = candle_core::safetensors::load(dir.join("io.safetensors"), &dev).unwrap();
        let input = DenoiseInput {
            latents: &io["latents"],
            sigmas: &io["sigmas"],
            context: &io["context"],
            pooled: &io["pooled"],
            guidance: io.get("guidance"),
        };
        let tmp = tempfile::tempdir().unwrap();
        for prefix in ["", "model.diffusion_model."] {
            let file = tmp.path().join("flux1-tiny.safetensors");
            let named: HashMap<String, Tensor> = bfl
                .iter()
                .map(|(k, v)| (format!("{prefix}{k}"), v.clone()))
                .collect();
            candle_core::safetensors::save(&named, &file).unwrap();
            let model =
                FluxTransformer::load_single_file(&file, &config, DType::F32, &dev).unwrap();
            let out = model.forward(&input).unwrap();
            let diff = (out - &io["output"])
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert!(
                diff.to_scalar::<f32>().unwrap() <= 1e-4,
                "prefix {prefix:?}"
            );
        }
        let file = tmp.path().join("flux1-tiny.safetensors");
        let mut missing = bfl.clone();
        missing.remove("single_blocks.0.linear1.weight");
        candle_core::safetensors::save(&missing, &file).unwrap();
        let err = FluxTransformer::load_single_file(&file, &config, DType::F32, &dev).unwrap_err();
        assert!(
            err.to_string().contains("single_blocks.0.linear1.weight"),
            "{err}"
        );
    }
}
