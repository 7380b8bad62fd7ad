//! Single-file diffusion-transformer checkpoints (`sd3.5_medium.safetensors`,
//! `flux1-dev.safetensors`): which architecture a file holds and the config it was built with.
//!
//! Such files carry weights but no `config.json`, and the loaders
//! ([`Sd3Transformer::load_single_file`](super::sd3::Sd3Transformer::load_single_file),
//! [`FluxTransformer::load_single_file`](super::flux::FluxTransformer::load_single_file)) need
//! one. Everything the config holds is implied by the tensor names and shapes, so it is read
//! from the safetensors header alone: no tensor data is touched, and a multi-gigabyte file is
//! identified in microseconds before any weight is mapped.
//!
//! The architecture is told by the block names (`joint_blocks.N` → SD3/SD3.5 MMDiT,
//! `double_blocks.N` → FLUX.1), with or without the `model.diffusion_model.` prefix the
//! Stability and ComfyUI exports put before them. Two sizes are not stored anywhere in the file
//! and fall back to each family's constant:
//! * the attention head width — read from a per-head q/k-norm scale when the checkpoint has
//!   one (SD3.5, every FLUX), else SD3's 64;
//! * FLUX's rotary split per position axis — FLUX.1's `[16, 56, 56]` for its 128-wide heads,
//!   scaled proportionally for other widths (see [`flux_rope_axes`]).
//!
//! The file also carries no scheduler or VAE config; [`SingleFileDit::resolve`] looks for them
//! next to the file and falls back to the family's released defaults.

use super::flux::FluxConfig;
use super::scheduler::{FlowMatchConfig, FlowMatchScheduler, ScheduleStyle};
use super::sd3::{QkNorm, Sd3Config};
use super::vae::VaeConfig;
use super::DiffusionError;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Prefix the original SD3 files and ComfyUI exports put before the transformer's tensors
/// (the same file may also hold the VAE and text encoders under other prefixes).
pub const SINGLE_FILE_PREFIX: &str = "model.diffusion_model.";

/// SD3's attention head width (`hidden = 64 × heads` in every released SD3/SD3.5), used when no
/// q/k-norm scale reveals it.
pub const SD3_HEAD_DIM: usize = 64;

/// FLUX.1's attention head width, used when no q/k-norm scale reveals it.
pub const FLUX_HEAD_DIM: usize = 128;

/// Pixels per latent cell when no VAE config sits next to the file: the SD3 and FLUX.1 VAEs
/// both downscale by 8 (four levels) into 16 latent channels.
pub const DEFAULT_VAE_SCALE: usize = 8;

/// SD3's `sample_size` (training latent side). It is informational only, so it is taken as
/// `min(128, pos_embed_max_size)`: 128 for every released checkpoint (whose tables are 192 or
/// 384 wide), never more than the position table covers.
const SD3_SAMPLE_SIZE: usize = 128;

/// Largest header read, as the `safetensors` crate bounds it.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The denoiser a single file holds, with the config inferred from its tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SingleFileDenoiser {
    /// An SD3/SD3.5 MMDiT (`joint_blocks.N`).
    Sd3(Sd3Config),
    /// A FLUX.1 transformer in Black Forest Labs' layout (`double_blocks.N`).
    Flux(FluxConfig),
}

impl SingleFileDenoiser {
    /// Reads `path`'s safetensors header and infers the architecture and config; errors name
    /// the file and the tensor that is missing or misshapen.
    pub fn detect(path: &Path) -> Result<Self, DiffusionError> {
        Self::from_shapes(path, &read_tensor_shapes(path)?)
    }

    /// Infers the architecture and config from tensor names and shapes; `path` only names the
    /// file in errors.
    pub fn from_shapes(
        path: &Path,
        shapes: &BTreeMap<String, Vec<usize>>,
    ) -> Result<Self, DiffusionError> {
        let bare = View::new(path, shapes, "");
        let prefixed = View::new(path, shapes, SINGLE_FILE_PREFIX);
        let has = |stem: &str| bare.has_block(stem) || prefixed.has_block(stem);
        match (has("joint_blocks"), has("double_blocks")) {
            (true, true) => Err(DiffusionError::config(
                path,
                "holds both SD3 (`joint_blocks.N`) and FLUX (`double_blocks.N`) tensors; \
                 cannot tell which transformer to load",
            )),
            // The loaders' own prefix choice (bare names when the first tensor they read exists
            // bare), except that the names holding the blocks win when only one view has them,
            // so a missing tensor is reported under the name the file should have had.
            (true, false) => {
                let bare_wins = bare.has("pos_embed") || !prefixed.has_block("joint_blocks");
                infer_sd3(if bare_wins { &bare } else { &prefixed }).map(Self::Sd3)
            }
            (false, true) => {
                let bare_wins = bare.has("img_in.weight") || !prefixed.has_block("double_blocks");
                infer_flux(if bare_wins { &bare } else { &prefixed }).map(Self::Flux)
            }
            (false, false) => {
                let any = |part: &str| shapes.keys().any(|k| k.contains(part));
                let hint = if any("transformer_blocks.") {
                    " (its names are diffusers'; point `model` at the pipeline folder instead)"
                } else if any("input_blocks.") || any("down_blocks.") {
                    " (it looks like a UNet or a VAE, which this stage cannot serve)"
                } else {
                    ""
                };
                Err(DiffusionError::config(
                    path,
                    format!(
                        "neither an SD3 MMDiT (`joint_blocks.N`) nor a FLUX transformer \
                         (`double_blocks.N`) checkpoint, with or without the \
                         `{SINGLE_FILE_PREFIX}` prefix{hint}"
                    ),
                ))
            }
        }
    }

    /// `"sd3"` or `"flux"`.
    pub fn family(&self) -> &'static str {
        match self {
            Self::Sd3(_) => "sd3",
            Self::Flux(_) => "flux",
        }
    }

    /// Latent channels the denoiser works in (what the VAE must produce and decode).
    pub fn latent_channels(&self) -> usize {
        match self {
            Self::Sd3(c) => c.in_channels,
            Self::Flux(c) => c.latent_channels(),
        }
    }

    /// How the family's pipeline asks for its schedule (as `build_dit` does for the folders).
    pub fn schedule_style(&self) -> ScheduleStyle {
        match self {
            Self::Sd3(_) => ScheduleStyle::TrainingRange,
            Self::Flux(_) => ScheduleStyle::Linear,
        }
    }

    /// The released pipelines' `scheduler_config.json`: SD3/SD3.5 use a static shift of 3.0;
    /// FLUX.1-dev (guidance-distilled) shifts by image size (base 0.5 at 256 tokens, max 1.15
    /// at 4096); FLUX.1-schnell (no guidance embedding, timestep-distilled) runs unshifted.
    pub fn default_scheduler(&self) -> FlowMatchConfig {
        let base = FlowMatchConfig::default();
        match self {
            Self::Sd3(_) => FlowMatchConfig { shift: 3.0, ..base },
            Self::Flux(c) if c.guidance_embeds => FlowMatchConfig {
                shift: 3.0,
                use_dynamic_shifting: true,
                base_shift: 0.5,
                max_shift: 1.15,
                base_image_seq_len: 256,
                max_image_seq_len: 4096,
                ..base
            },
            Self::Flux(_) => FlowMatchConfig {
                shift: 1.0,
                use_dynamic_shifting: false,
                ..base
            },
        }
    }
}

/// Everything a DiT stage needs from a single file besides its weights.
#[derive(Debug, Clone)]
pub struct SingleFileDit {
    /// The checkpoint.
    pub path: PathBuf,
    /// Its architecture and inferred config.
    pub denoiser: SingleFileDenoiser,
    /// `scheduler_config.json` next to the file, else the family's default.
    pub scheduler: FlowMatchScheduler,
    /// The companion VAE config and where it was read, when one sits next to the file.
    pub vae: Option<(PathBuf, VaeConfig)>,
}

impl SingleFileDit {
    /// Detects the denoiser in `path` and reads the configs beside it:
    /// * scheduler: `scheduler_config.json` or `scheduler/scheduler_config.json` in the file's
    ///   folder, else [`SingleFileDenoiser::default_scheduler`];
    /// * VAE: `vae/config.json` or `vae_config.json` in the file's folder. Without one the
    ///   latent scale is [`DEFAULT_VAE_SCALE`] and the latent channels go unchecked here (the
    ///   VAE stage, loaded from its own folder, refuses latents of another channel count when
    ///   it decodes them).
    ///
    /// A companion VAE config whose latent channels differ from the denoiser's is an error
    /// naming both files.
    pub fn resolve(path: &Path) -> Result<Self, DiffusionError> {
        let denoiser = SingleFileDenoiser::detect(path)?;
        let dir = path.parent().unwrap_or_else(|| Path::new("."));
        let scheduler = match first_file(
            dir,
            &["scheduler_config.json", "scheduler/scheduler_config.json"],
        ) {
            Some(p) => FlowMatchScheduler::load(&p)?,
            None => FlowMatchScheduler::new(denoiser.default_scheduler())
                .map_err(|m| DiffusionError::config(path, format!("default scheduler: {m}")))?,
        };
        let vae = match first_file(dir, &["vae/config.json", "vae_config.json"]) {
            Some(p) => {
                let config = VaeConfig::from_file(&p)?;
                if config.latent_channels != denoiser.latent_channels() {
                    return Err(DiffusionError::config(
                        &p,
                        format!(
                            "latent_channels is {}, but the {} transformer in {} takes {}",
                            config.latent_channels,
                            denoiser.family(),
                            path.display(),
                            denoiser.latent_channels()
                        ),
                    ));
                }
                Some((p, config))
            }
            None => None,
        };
        Ok(Self {
            path: path.to_path_buf(),
            denoiser,
            scheduler,
            vae,
        })
    }

    /// Image pixels per latent cell: the companion VAE's, else [`DEFAULT_VAE_SCALE`].
    pub fn vae_scale(&self) -> usize {
        self.vae
            .as_ref()
            .map_or(DEFAULT_VAE_SCALE, |(_, c)| c.downscale_factor())
    }
}

/// Whether a stage's `model` names a single checkpoint file rather than a folder: it ends in
/// `.safetensors` (any case). Existence is left to the loader, whose error names the file.
pub fn is_single_file(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
}

fn first_file(dir: &Path, names: &[&str]) -> Option<PathBuf> {
    names.iter().map(|n| dir.join(n)).find(|p| p.is_file())
}

/// Every tensor's name and shape in a `.safetensors` file, read from its header only.
///
/// The header is checked as the `safetensors` crate checks it (offsets contiguous and sized to
/// each dtype and shape) and against the file's length, so the shapes describe data the file
/// really holds: a crafted header cannot make the inference below size anything larger than
/// the file.
pub fn read_tensor_shapes(path: &Path) -> Result<BTreeMap<String, Vec<usize>>, DiffusionError> {
    let err = |m: String| DiffusionError::config(path, m);
    let mut file = std::fs::File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
    let file_len = file
        .metadata()
        .map_err(|e| err(format!("cannot read: {e}")))?
        .len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| err(format!("not a safetensors file (no header length): {e}")))?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER_BYTES || n > file_len.saturating_sub(8) {
        return Err(err(format!(
            "not a safetensors file: header length {n} exceeds the file ({file_len} bytes) or \
             {MAX_HEADER_BYTES} bytes"
        )));
    }
    // `n` ≤ MAX_HEADER_BYTES, so it fits in usize on every supported target.
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header)
        .map_err(|e| err(format!("cannot read the safetensors header: {e}")))?;
    let metadata: safetensors::tensor::Metadata = serde_json::from_slice(&header)
        .map_err(|e| err(format!("not a safetensors file: invalid header: {e}")))?;
    let expected = (metadata.data_len() as u64).saturating_add(8 + n);
    if expected != file_len {
        return Err(err(format!(
            "safetensors file is {file_len} bytes but its header describes {expected}; is it \
             truncated?"
        )));
    }
    Ok(metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| (name, info.shape.clone()))
        .collect())
}

/// The file's tensors as seen under one prefix (stripped), with error helpers that name the
/// file and the full tensor name.
struct View<'a> {
    path: &'a Path,
    prefix: &'static str,
    shapes: BTreeMap<&'a str, &'a [usize]>,
}

impl<'a> View<'a> {
    fn new(path: &'a Path, all: &'a BTreeMap<String, Vec<usize>>, prefix: &'static str) -> Self {
        let shapes = all
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?, v.as_slice())))
            .collect();
        Self {
            path,
            prefix,
            shapes,
        }
    }

    fn has(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }

    fn has_block(&self, stem: &str) -> bool {
        !self.block_indices(stem).is_empty()
    }

    fn err(&self, message: String) -> DiffusionError {
        DiffusionError::config(self.path, message)
    }

    /// The shape of `name`, which must have `N` dimensions.
    fn dims<const N: usize>(&self, name: &str, family: &str) -> Result<[usize; N], DiffusionError> {
        let full = format!("{}{name}", self.prefix);
        let shape = self.shapes.get(name).ok_or_else(|| {
            self.err(format!(
                "tensor `{full}` is missing; a {family} checkpoint has it, and the config is \
                 inferred from its shape"
            ))
        })?;
        <[usize; N]>::try_from(*shape).map_err(|_| {
            self.err(format!(
                "tensor `{full}` has shape {shape:?}; expected {N} dimensions"
            ))
        })
    }

    /// Indices `N` of tensors named `stem.N.*`.
    fn block_indices(&self, stem: &str) -> BTreeSet<usize> {
        let dotted = format!("{stem}.");
        self.shapes
            .keys()
            .filter_map(|k| k.strip_prefix(dotted.as_str()))
            .filter_map(|rest| rest.split('.').next()?.parse().ok())
            .collect()
    }

    /// Number of `stem.N` blocks; they must be numbered `0..count` without gaps, or some
    /// block's weights are missing.
    fn block_count(&self, stem: &str) -> Result<usize, DiffusionError> {
        let indices = self.block_indices(stem);
        if let Some(gap) = (0..indices.len()).find(|i| !indices.contains(i)) {
            return Err(self.err(format!(
                "has {} `{}{stem}.N` blocks but no `{}{stem}.{gap}`; the checkpoint is incomplete",
                indices.len(),
                self.prefix,
                self.prefix
            )));
        }
        Ok(indices.len())
    }

    /// The length of the first of `names` present as a vector: a per-head norm's scale.
    fn head_dim(&self, names: &[String]) -> Option<usize> {
        names
            .iter()
            .find_map(|n| match self.shapes.get(n.as_str()) {
                Some(&&[d]) if d > 0 => Some(d),
                _ => None,
            })
    }

    /// `hidden / head_dim` heads, refusing a width the head size does not divide.
    fn heads(&self, hidden: usize, head_dim: usize, how: &str) -> Result<usize, DiffusionError> {
        #[allow(clippy::manual_is_multiple_of)] // `is_multiple_of` needs Rust 1.87; MSRV is 1.85
        if hidden == 0 || hidden % head_dim != 0 {
            return Err(self.err(format!(
                "hidden width {hidden} is not a multiple of the attention head width \
                 {head_dim} ({how}); the head count cannot be inferred"
            )));
        }
        Ok(hidden / head_dim)
    }
}

/// SD3/SD3.5: see the module docs for which tensor gives which field.
fn infer_sd3(v: &View) -> Result<Sd3Config, DiffusionError> {
    const SD3: &str = "SD3";
    let num_layers = v.block_count("joint_blocks")?;
    let [hidden, in_channels, p, p2] = v.dims::<4>("x_embedder.proj.weight", SD3)?;
    if p != p2 {
        return Err(v.err(format!(
            "tensor `{}x_embedder.proj.weight`: non-square {p}x{p2} patches are not supported",
            v.prefix
        )));
    }
    let [one, tokens, pos_width] = v.dims::<3>("pos_embed", SD3)?;
    let side = (tokens as f64).sqrt().round() as usize;
    if one != 1 || pos_width != hidden || side.checked_mul(side) != Some(tokens) {
        return Err(v.err(format!(
            "tensor `{}pos_embed` has shape [{one}, {tokens}, {pos_width}]; expected \
             [1, side², {hidden}] (a square position table as wide as x_embedder)",
            v.prefix
        )));
    }
    let [caption_projection_dim, joint_attention_dim] =
        v.dims::<2>("context_embedder.weight", SD3)?;
    let [_, pooled_projection_dim] = v.dims::<2>("y_embedder.mlp.0.weight", SD3)?;
    let [out_rows, _] = v.dims::<2>("final_layer.linear.weight", SD3)?;
    let cells = p * p;
    #[allow(clippy::manual_is_multiple_of)] // `is_multiple_of` needs Rust 1.87; MSRV is 1.85
    if cells == 0 || out_rows % cells != 0 {
        return Err(v.err(format!(
            "tensor `{}final_layer.linear.weight` has {out_rows} outputs, not a multiple of the \
             {p}x{p} patch",
            v.prefix
        )));
    }
    let qk_names = ["x_block", "context_block"]
        .map(|b| format!("joint_blocks.0.{b}.attn.ln_q.weight"))
        .to_vec();
    let qk_dim = v.head_dim(&qk_names);
    let (head_dim, how) = match qk_dim {
        Some(d) => (d, "from the q/k-norm scale"),
        None => (
            SD3_HEAD_DIM,
            "SD3's, as the file has no q/k-norm scale to read it from",
        ),
    };
    let num_attention_heads = v.heads(hidden, head_dim, how)?;
    let dual_attention_layers = (0..num_layers)
        .filter(|i| v.has(&format!("joint_blocks.{i}.x_block.attn2.qkv.weight")))
        .collect();
    let config = Sd3Config {
        sample_size: SD3_SAMPLE_SIZE.min(side),
        patch_size: p,
        in_channels,
        out_channels: out_rows / cells,
        num_layers,
        attention_head_dim: head_dim,
        num_attention_heads,
        joint_attention_dim,
        caption_projection_dim,
        pooled_projection_dim,
        pos_embed_max_size: side,
        qk_norm: if qk_dim.is_some() {
            QkNorm::RmsNorm
        } else {
            QkNorm::None
        },
        dual_attention_layers,
    };
    config.validate(v.path)?;
    Ok(config)
}

/// FLUX.1 (BFL names): see the module docs for which tensor gives which field.
fn infer_flux(v: &View) -> Result<FluxConfig, DiffusionError> {
    const FLUX: &str = "FLUX";
    let num_layers = v.block_count("double_blocks")?;
    let num_single_layers = v.block_count("single_blocks")?;
    let [hidden, in_channels] = v.dims::<2>("img_in.weight", FLUX)?;
    let [_, joint_attention_dim] = v.dims::<2>("txt_in.weight", FLUX)?;
    let [_, pooled_projection_dim] = v.dims::<2>("vector_in.in_layer.weight", FLUX)?;
    let [out_channels, _] = v.dims::<2>("final_layer.linear.weight", FLUX)?;
    if out_channels != in_channels {
        // FLUX Fill / Kontext-style checkpoints take extra conditioning channels in.
        return Err(v.err(format!(
            "`{p}img_in.weight` takes {in_channels} channels but `{p}final_layer.linear.weight` \
             predicts {out_channels}; checkpoints that take extra conditioning channels are not \
             supported",
            p = v.prefix
        )));
    }
    let qk_names = [
        "double_blocks.0.img_attn.norm.query_norm.scale".to_string(),
        "single_blocks.0.norm.query_norm.scale".to_string(),
    ];
    let (head_dim, how) = match v.head_dim(&qk_names) {
        Some(d) => (d, "from the q/k-norm scale"),
        None => (
            FLUX_HEAD_DIM,
            "FLUX.1's, as the file has no q/k-norm scale to read it from",
        ),
    };
    let config = FluxConfig {
        in_channels,
        num_layers,
        num_single_layers,
        attention_head_dim: head_dim,
        num_attention_heads: v.heads(hidden, head_dim, how)?,
        joint_attention_dim,
        pooled_projection_dim,
        guidance_embeds: v.has("guidance_in.in_layer.weight"),
        axes_dims_rope: flux_rope_axes(head_dim),
    };
    config.validate().map_err(|m| {
        v.err(format!(
            "the inferred FLUX config is unusable: {m} (read from the tensor shapes)"
        ))
    })?;
    Ok(config)
}

/// Rotary dimensions per axis (text/frame, row, column) for a FLUX head of `head_dim`. The
/// split is not stored in the weights; FLUX.1 uses `[16, 56, 56]` of 128, i.e. each spatial
/// axis takes 7/16 of the head. Other widths keep that proportion, each spatial axis rounded
/// down to an even size and the first axis taking the rest (16 → `[4, 6, 6]`, the split of
/// the tiny test models).
pub fn flux_rope_axes(head_dim: usize) -> Vec<usize> {
    let spatial = 2 * (head_dim * 7 / 32);
    vec![head_dim - 2 * spatial, spatial, spatial]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_axes_match_flux_1() {
        assert_eq!(flux_rope_axes(128), [16, 56, 56]);
        assert_eq!(flux_rope_axes(16), [4, 6, 6]);
        for d in (2..=256).step_by(2) {
            let axes = flux_rope_axes(d);
            assert_eq!(axes.iter().sum::<usize>(), d);
            assert!(axes.iter().all(|a| a % 2 == 0), "{d}: {axes:?}");
        }
    }

    #[test]
    fn missing_and_misshapen_tensors_are_named() {
        let path = Path::new("ckpt.safetensors");
        let mut shapes: BTreeMap<String, Vec<usize>> = [
            ("double_blocks.0.img_mod.lin.weight", vec![6, 1]),
            ("img_in.weight", vec![4, 4, 1]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let msg = SingleFileDenoiser::from_shapes(path, &shapes)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("ckpt.safetensors") && msg.contains("`img_in.weight`"),
            "{msg}"
        );
        shapes.insert("img_in.weight".into(), vec![32, 16]);
        let msg = SingleFileDenoiser::from_shapes(path, &shapes)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("`txt_in.weight` is missing"), "{msg}");
        shapes.insert("double_blocks.2.img_mod.lin.weight".into(), vec![6, 1]);
        let msg = SingleFileDenoiser::from_shapes(path, &shapes)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("double_blocks.1"), "{msg}");
        shapes.insert("joint_blocks.0.x_block.attn.qkv.weight".into(), vec![3, 1]);
        let msg = SingleFileDenoiser::from_shapes(path, &shapes)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("both"), "{msg}");
    }
}
