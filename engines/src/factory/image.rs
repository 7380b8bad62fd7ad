//! Engines of the text-to-image stages. Each stage's `model` is a diffusers pipeline folder
//! (`model_index.json`, `text_encoder/`, `tokenizer/`, `transformer/`, `scheduler/`, `vae/`);
//! each stage loads the component it runs. An encoder or VAE stage may also point straight at the
//! component's own folder.

use super::{candle_device, candle_dtype, BuildError, StageWiring};
use crate::diffusion::flux::FluxTransformer;
use crate::diffusion::model::Denoiser;
use crate::diffusion::scheduler::{FlowMatchScheduler, ScheduleStyle};
use crate::diffusion::sd3::Sd3Transformer;
use crate::diffusion::stage::{DitEngine, DitSettings, TextEncoderEngine, VaeEngine};
use crate::diffusion::text::llm::LlmPromptEncoder;
use crate::diffusion::text::sd3::Sd3TextEncoders;
use crate::diffusion::vae::{Vae, VaeConfig};
use crate::diffusion::{read_json, DiffusionError};
use omnistage_stages::deploy::StageSpec;
use omnistage_stages::{PayloadKind, StageEngine};
use std::path::{Path, PathBuf};

fn load_err(spec: &StageSpec) -> impl Fn(DiffusionError) -> BuildError + '_ {
    move |e| BuildError::Load {
        stage: spec.id.clone(),
        message: e.to_string(),
    }
}

fn needs_input(
    spec: &StageSpec,
    wiring: &StageWiring,
    kind: PayloadKind,
) -> Result<(), BuildError> {
    if wiring.received.contains(&kind) {
        return Ok(());
    }
    Err(BuildError::Load {
        stage: spec.id.clone(),
        message: format!(
            "a {} stage needs an inbound edge carrying `{kind}`",
            spec.kind.as_str()
        ),
    })
}

/// `root/name` when it exists, else `root` itself (a stage pointed at the component folder).
fn component(root: &Path, name: &str) -> PathBuf {
    let sub = root.join(name);
    if sub.is_dir() {
        sub
    } else {
        root.to_path_buf()
    }
}

/// The `_class_name` of a diffusers component config.
fn class_name(config: &Path) -> Result<String, DiffusionError> {
    let json: serde_json::Value = read_json(config)?;
    json.get("_class_name")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .ok_or_else(|| DiffusionError::config(config, "no `_class_name`"))
}

pub(super) fn build_text_encoder(
    spec: &StageSpec,
    _wiring: &StageWiring,
) -> Result<Box<dyn StageEngine>, BuildError> {
    let device = candle_device(&spec.id, spec.device)?;
    let dir = component(&spec.model, "text_encoder");
    let config: serde_json::Value = read_json(&dir.join("config.json")).map_err(load_err(spec))?;
    let architectures: Vec<&str> = config
        .get("architectures")
        .and_then(|a| a.as_array())
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    // A CLIP text encoder is SD3's CLIP-L: the pipeline root also holds CLIP-G and T5, and the
    // three encode together.
    if architectures.iter().any(|a| a.starts_with("CLIP")) {
        // `model` is the pipeline root, or (pointed at the component) `text_encoder/` itself.
        let root = if dir == spec.model {
            dir.parent().unwrap_or(&dir)
        } else {
            spec.model.as_path()
        };
        let encoder = Sd3TextEncoders::load(
            root,
            spec.image.max_text_tokens,
            candle_dtype(spec.dtype),
            &device,
        )
        .map_err(load_err(spec))?;
        return Ok(Box::new(TextEncoderEngine::new(encoder)));
    }
    if architectures.iter().any(|a| a.starts_with("T5")) {
        return Err(BuildError::Load {
            stage: spec.id.clone(),
            message: format!(
                "{}: a T5 text encoder on its own ({}) is not supported; SD3 pipelines \
                 (text_encoder/ = CLIP, text_encoder_3/ = T5) and LLM text encoders are",
                dir.display(),
                architectures.join(", ")
            ),
        });
    }
    let tokenizer_dir = [spec.model.join("tokenizer"), dir.clone()]
        .into_iter()
        .find(|d| d.join("tokenizer.json").is_file())
        .unwrap_or_else(|| dir.clone());
    let encoder = LlmPromptEncoder::load(
        &dir,
        &tokenizer_dir,
        spec.image.max_text_tokens,
        candle_dtype(spec.dtype),
        &device,
    )
    .map_err(load_err(spec))?;
    Ok(Box::new(TextEncoderEngine::new(encoder)))
}

/// The denoiser stage. `model` is a diffusers pipeline folder, or a single SD3/FLUX checkpoint
/// file (`*.safetensors`), whose architecture and config are inferred from its tensors
/// ([`SingleFileDit`](crate::diffusion::single_file::SingleFileDit)). A single file carries no
/// scheduler or VAE config: `scheduler_config.json` beside it, else the family's released
/// default; `vae/config.json` or `vae_config.json` beside it, else a latent scale of 8 (the SD3
/// and FLUX.1 VAEs both downscale by 8 into 16 latent channels).
pub(super) fn build_dit(
    spec: &StageSpec,
    wiring: &StageWiring,
) -> Result<Box<dyn StageEngine>, BuildError> {
    needs_input(spec, wiring, PayloadKind::Embeddings)?;
    let device = candle_device(&spec.id, spec.device)?;
    let dtype = candle_dtype(spec.dtype);
    let root = &spec.model;
    if crate::diffusion::single_file::is_single_file(root) {
        use crate::diffusion::single_file::{SingleFileDenoiser, SingleFileDit};
        let file = SingleFileDit::resolve(root).map_err(load_err(spec))?;
        let settings = DitSettings {
            scheduler: file.scheduler.clone(),
            style: file.denoiser.schedule_style(),
            vae_scale: file.vae_scale(),
            limits: spec.image.clone(),
        };
        return match &file.denoiser {
            SingleFileDenoiser::Sd3(config) => {
                let model = Sd3Transformer::load_single_file(root, config, dtype, &device)
                    .map_err(load_err(spec))?;
                Ok(Box::new(DitEngine::new(model, settings, device)))
            }
            SingleFileDenoiser::Flux(config) => {
                let model = FluxTransformer::load_single_file(root, config, dtype, &device)
                    .map_err(load_err(spec))?;
                Ok(Box::new(DitEngine::new(model, settings, device)))
            }
        };
    }
    let transformer = root.join("transformer");
    let scheduler = FlowMatchScheduler::load(&root.join("scheduler/scheduler_config.json"))
        .map_err(load_err(spec))?;
    let vae = VaeConfig::from_file(&root.join("vae/config.json")).map_err(load_err(spec))?;
    let class = class_name(&transformer.join("config.json")).map_err(load_err(spec))?;
    let settings = |style| DitSettings {
        scheduler: scheduler.clone(),
        style,
        vae_scale: vae.downscale_factor(),
        limits: spec.image.clone(),
    };
    match class.as_str() {
        "SD3Transformer2DModel" => {
            let model = Sd3Transformer::load(&transformer, dtype, &device).map_err(load_err(spec))?;
            check_latents(spec, &model, &vae)?;
            Ok(Box::new(DitEngine::new(
                model,
                settings(ScheduleStyle::TrainingRange),
                device,
            )))
        }
        "FluxTransformer2DModel" => {
            let model =
                FluxTransformer::load(&transformer, dtype, &device).map_err(load_err(spec))?;
            check_latents(spec, &model, &vae)?;
            Ok(Box::new(DitEngine::new(
                model,
                settings(ScheduleStyle::Linear),
                device,
            )))
        }
        other => Err(BuildError::Load {
            stage: spec.id.clone(),
            message: format!(
                "{}: transformer class `{other}` is not supported (SD3Transformer2DModel, FluxTransformer2DModel)",
                transformer.display()
            ),
        }),
    }
}

/// The denoiser and the VAE must agree on the latent space.
fn check_latents(
    spec: &StageSpec,
    model: &impl Denoiser,
    vae: &VaeConfig,
) -> Result<(), BuildError> {
    let info = model.info();
    if info.latent_channels != vae.latent_channels {
        return Err(BuildError::Load {
            stage: spec.id.clone(),
            message: format!(
                "the transformer takes {} latent channels but vae/config.json has {}",
                info.latent_channels, vae.latent_channels
            ),
        });
    }
    Ok(())
}

pub(super) fn build_vae(
    spec: &StageSpec,
    wiring: &StageWiring,
) -> Result<Box<dyn StageEngine>, BuildError> {
    needs_input(spec, wiring, PayloadKind::Latents)?;
    let device = candle_device(&spec.id, spec.device)?;
    let dir = component(&spec.model, "vae");
    let vae = Vae::load(&dir, candle_dtype(spec.dtype), &device).map_err(load_err(spec))?;
    Ok(Box::new(VaeEngine::new(vae, device)))
}
