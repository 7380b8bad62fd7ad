//! The LLaVA vision encoder: a CLIP or SigLIP ViT tower and the LLaVA projector, turning one
//! image into rows of an LLM's embedding width.
//!
//! **Checkpoint layout** (a `LlavaForConditionalGeneration` folder; only the tower and the
//! projector need be present, the LLM being another stage):
//! - `config.json`: `model_type: "llava"`, `vision_config` (`clip_vision_model` or
//!   `siglip_vision_model`), `text_config.hidden_size` (the output width; read off the projector
//!   when absent), `projector_hidden_act`, `vision_feature_layer` (an index into Transformers'
//!   `hidden_states`, 0 being the embeddings' output, negative from the end; or a list, whose
//!   states are concatenated), `vision_feature_select_strategy` (`"default"` drops the first
//!   token of each selected state, as Transformers does; `"full"` keeps all),
//!   `multimodal_projector_bias`;
//! - `model.safetensors` (or an index with shards): `vision_tower.vision_model.*` (llava-hf's
//!   names) or `vision_tower.*` (what Transformers 5 saves), and
//!   `multi_modal_projector.linear_{1,2}.*`; any of them may carry a `model.` prefix;
//! - `preprocessor_config.json`: `CLIPImageProcessor` / `SiglipImageProcessor` fields. Its output
//!   must be a fixed `image_size × image_size` (a center crop, or an exact resize).
//!
//! Only the encoder layers up to the deepest selected state are loaded and run.

pub mod config;
mod json;
pub mod model;
pub mod preprocess;

use crate::llm::weights::{classify_load_error, find_safetensors, mmap_var_builder, WeightsError};
use crate::media::{MediaEncoder, PreparedMedia};
use candle_core::{DType, Device, Tensor};
use config::{PreprocessConfig, VisionConfig};
use model::{Projector, VisionModel, VisionTower};
use omnistage_stages::{EngineError, HiddenStates, MediaData, Modality};
use preprocess::Rgb8;
use std::path::{Path, PathBuf};

pub use config::{Act, TowerKind};

/// Largest image side accepted from a request.
pub const MAX_IMAGE_SIDE: usize = 16_384;

/// Largest image (in pixels) the resize may produce before cropping; bounds the work an extreme
/// aspect ratio can cause.
const MAX_RESIZED_PIXELS: usize = 1 << 26;

/// Why a vision checkpoint could not be loaded. Each names the file and the field or tensor.
#[derive(Debug, thiserror::Error)]
pub enum VisionError {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file is invalid, misses a field or has a value we cannot use.
    #[error("{}: {}{reason}", file.display(), if field.is_empty() { String::new() } else { format!("{field}: ") })]
    Config {
        /// The file (`config.json`, `preprocessor_config.json`).
        file: PathBuf,
        /// The dotted field path (`vision_config.patch_size`); empty for the whole file.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// The weights are missing, unreadable, lack a tensor or have one of the wrong shape.
    #[error("{}: {source}", path.display())]
    Weights {
        /// The checkpoint directory or its (first) safetensors file.
        path: PathBuf,
        /// What is wrong, naming the tensor.
        #[source]
        source: Box<WeightsError>,
    },
    /// The requested compute dtype is not supported.
    #[error("vision encoder dtype must be f32, f16 or bf16, not {0:?}")]
    Dtype(DType),
    /// Building the model failed for another reason.
    #[error("{}: {message}", path.display())]
    Model {
        /// The checkpoint directory.
        path: PathBuf,
        /// candle's message.
        message: String,
    },
}

/// A loaded vision tower + projector implementing [`MediaEncoder`] for images.
#[derive(Debug, Clone)]
pub struct VisionEncoder {
    config: VisionConfig,
    preprocess: PreprocessConfig,
    model: VisionModel,
    out_dim: usize,
    dtype: DType,
    device: Device,
}

impl VisionEncoder {
    /// Loads the LLaVA-layout checkpoint in `dir` (see the module docs), computing in `dtype`
    /// (f32, f16 or bf16) on `device`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self, VisionError> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(VisionError::Dtype(dtype));
        }
        let config = VisionConfig::from_file(&dir.join("config.json"))?;
        let pp_path = dir.join("preprocessor_config.json");
        let preprocess = PreprocessConfig::from_file(&pp_path, config.tower.kind)?;
        let s = config.tower.image_size;
        match preprocess.output_size() {
            Some(size) if size == (s, s) => {}
            other => {
                let field = if preprocess.crop.is_some() {
                    "crop_size"
                } else {
                    "size"
                };
                return Err(VisionError::Config {
                    file: pp_path,
                    field: field.into(),
                    reason: format!(
                        "the processor's output size {other:?} is not the tower's fixed \
                         image_size {s}×{s}"
                    ),
                });
            }
        }

        let files = find_safetensors(dir).map_err(|source| VisionError::Weights {
            path: dir.to_path_buf(),
            source: Box::new(source),
        })?;
        let first = files[0].clone();
        let vb = mmap_var_builder(files, dtype, device).map_err(|source| VisionError::Weights {
            path: first.clone(),
            source: Box::new(source),
        })?;
        let weights_err = |e: candle_core::Error| match classify_load_error(e) {
            Ok(source) => VisionError::Weights {
                path: first.clone(),
                source: Box::new(source),
            },
            Err(e) => VisionError::Model {
                path: dir.to_path_buf(),
                message: e.to_string(),
            },
        };
        // llava-hf checkpoints name the tower `vision_tower.vision_model.*`; Transformers 5's
        // `save_pretrained` writes `vision_tower.*`; either may sit under `model.`.
        let probe = "embeddings.patch_embedding.weight";
        let (prefix, tower) = ["", "model."]
            .iter()
            .flat_map(|p| {
                ["vision_tower.vision_model", "vision_tower"].map(|t| (*p, format!("{p}{t}")))
            })
            .find(|(_, t)| vb.contains_tensor(&format!("{t}.{probe}")))
            .unwrap_or(("", "vision_tower.vision_model".to_string()));
        let tower_vb = vb.pp(tower);
        let tower = VisionTower::load(&config.tower, config.layers_needed(), tower_vb)
            .map_err(weights_err)?;
        let proj_vb = vb.pp(format!("{prefix}multi_modal_projector"));
        let in_dim = config.tower.hidden_size * config.feature_layers.len();
        let out_dim = match config.text_hidden_size {
            Some(d) => d,
            None => proj_vb
                .pp("linear_1")
                .get_unchecked("weight")
                .and_then(|w| w.dim(0))
                .map_err(weights_err)?,
        };
        if out_dim == 0 {
            return Err(VisionError::Config {
                file: dir.join("config.json"),
                field: "text_config.hidden_size".into(),
                reason: "the projector's output width is 0".into(),
            });
        }
        let projector = Projector::load(in_dim, out_dim, &config, proj_vb).map_err(weights_err)?;
        let model = VisionModel {
            tower,
            projector,
            feature_layers: config.feature_layers.clone(),
            drop_first_token: config.drop_first_token,
        };
        Ok(Self {
            config,
            preprocess,
            model,
            out_dim,
            dtype,
            device: device.clone(),
        })
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &VisionConfig {
        &self.config
    }

    /// The parsed `preprocessor_config.json`.
    pub fn preprocess_config(&self) -> &PreprocessConfig {
        &self.preprocess
    }

    /// Rows written per image (placeholder tokens the LLM reserves for it).
    pub fn rows(&self) -> usize {
        self.config.rows()
    }

    /// Side of the square model input.
    pub fn image_size(&self) -> usize {
        self.config.tower.image_size
    }

    fn compute(e: candle_core::Error) -> EngineError {
        EngineError::Compute(format!("vision encoder: {e}"))
    }
}

impl MediaEncoder for VisionEncoder {
    fn modality(&self) -> Modality {
        Modality::Image
    }

    fn output_dim(&self) -> usize {
        self.out_dim
    }

    fn prepare(&self, media: &MediaData) -> Result<PreparedMedia, EngineError> {
        let img = match media {
            MediaData::Image(img) => img,
            MediaData::Audio(_) => {
                return Err(EngineError::InvalidInput(
                    "the vision encoder takes images, not audio".into(),
                ))
            }
        };
        if img.n != 1 {
            return Err(EngineError::InvalidInput(format!(
                "one image per item expected, got {}",
                img.n
            )));
        }
        let (w, h) = (img.width, img.height);
        if w == 0 || h == 0 {
            return Err(EngineError::InvalidInput(format!(
                "the image is empty ({w}×{h})"
            )));
        }
        if w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE {
            return Err(EngineError::InvalidInput(format!(
                "the image ({w}×{h}) exceeds {MAX_IMAGE_SIDE} pixels on a side"
            )));
        }
        if img.pixels.len() != w * h * 3 {
            return Err(EngineError::InvalidInput(format!(
                "the image holds {} bytes, not {w}×{h}×3",
                img.pixels.len()
            )));
        }
        if let Some(config::ResizeTo::ShortestEdge(n)) = self.preprocess.resize {
            let (rh, rw) = preprocess::shortest_edge_size(h, w, n);
            if rh.saturating_mul(rw) > MAX_RESIZED_PIXELS {
                return Err(EngineError::InvalidInput(format!(
                    "the image's aspect ratio ({w}×{h}) is too extreme"
                )));
            }
        }
        let rgb = Rgb8 {
            width: w,
            height: h,
            pixels: img.pixels.to_vec(),
        };
        let (values, (oh, ow)) = preprocess::preprocess(&self.preprocess, &rgb);
        let s = self.image_size();
        if (oh, ow) != (s, s) {
            return Err(EngineError::Compute(format!(
                "vision encoder: preprocessing gave {ow}×{oh}, not {s}×{s}"
            )));
        }
        let input = Tensor::from_vec(values, (3, s, s), &self.device)
            .and_then(|t| t.to_dtype(self.dtype))
            .map_err(Self::compute)?;
        Ok(PreparedMedia {
            input,
            rows: self.rows(),
        })
    }

    fn encode(&mut self, batch: &[&PreparedMedia]) -> Result<Vec<HiddenStates>, EngineError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let s = self.image_size();
        let inputs = batch
            .iter()
            .map(|p| {
                if p.input.dims() != [3, s, s] {
                    return Err(EngineError::InvalidInput(format!(
                        "vision encoder input has shape {:?}, not [3, {s}, {s}]",
                        p.input.dims()
                    )));
                }
                p.input
                    .to_device(&self.device)
                    .and_then(|t| t.to_dtype(self.dtype))
                    .map_err(Self::compute)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let pixels = Tensor::stack(&inputs, 0).map_err(Self::compute)?;
        let out = self.model.forward(&pixels).map_err(Self::compute)?;
        let (b, rows, dim) = out.dims3().map_err(Self::compute)?;
        if b != batch.len() || dim != self.out_dim || rows == 0 {
            return Err(EngineError::Compute(format!(
                "vision encoder: output {b}×{rows}×{dim} for {} items of width {}",
                batch.len(),
                self.out_dim
            )));
        }
        let data: Vec<f32> = out
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .map_err(Self::compute)?;
        Ok(data
            .chunks_exact(rows * dim)
            .map(|c| HiddenStates::new(c.to_vec(), dim))
            .collect())
    }
}
