//! Builds the engine a stage of the deployment file asks for.

pub mod audio;
mod image;
mod media;
mod mot;
mod router;
mod talker;

use crate::llm::engine::{LlmEngine, LlmEngineSettings};
use omnistage_stages::deploy::{DType, DeviceSpec, StageKind, StageSpec};
use omnistage_stages::{Modality, PayloadKind, StageEngine};

/// Why a stage's engine could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("stage `{stage}`: device {device}: {message}")]
    Device {
        stage: String,
        device: String,
        message: String,
    },
    #[error("stage `{stage}`: {message}")]
    Load { stage: String, message: String },
}

/// The candle device for a stage's device setting.
pub fn candle_device(stage: &str, spec: DeviceSpec) -> Result<candle_core::Device, BuildError> {
    match spec {
        DeviceSpec::Cpu => Ok(candle_core::Device::Cpu),
        DeviceSpec::Cuda(n) => candle_core::Device::new_cuda(n).map_err(|e| BuildError::Device {
            stage: stage.to_string(),
            device: format!("cuda:{n}"),
            message: e.to_string(),
        }),
    }
}

pub fn candle_dtype(dtype: DType) -> candle_core::DType {
    match dtype {
        DType::F32 => candle_core::DType::F32,
        DType::Bf16 => candle_core::DType::BF16,
        DType::F16 => candle_core::DType::F16,
    }
}

/// How a stage is wired into its graph: what its inbound edges bring and what its outbound edges
/// take from it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StageWiring {
    /// Payload kinds arriving on inbound edges.
    pub received: Vec<PayloadKind>,
    /// Payload kinds downstream stages take from it, so costly outputs (hidden states) are only
    /// computed when someone reads them.
    pub consumed: Vec<PayloadKind>,
    /// For a codec stage: the codebook level of each canonical slot of the frames its talker
    /// writes, and the talker's codebook size (checked against the codec at start-up).
    pub codec_levels: Option<Vec<usize>>,
    pub codebook_size: Option<usize>,
    /// For a media encoder: the checkpoint folders of the LLM stages its `media_embeddings`
    /// feed (their hidden size must be the encoder's output width; checked at start-up).
    pub media_consumers: Vec<std::path::PathBuf>,
}

/// Payload kinds an LLM stage can turn into a prompt today (media embeddings are spliced in at
/// the prompt's placeholders; a router's decision only starts the stage, which then reads the
/// request's own prompt).
const LLM_PROMPT_INPUTS: [PayloadKind; 4] = [
    PayloadKind::Text,
    PayloadKind::Tokens,
    PayloadKind::MediaEmbeddings,
    PayloadKind::Route,
];

/// Loads the engine for one replica of `spec`.
pub fn build_engine(
    spec: &StageSpec,
    wiring: &StageWiring,
) -> Result<Box<dyn StageEngine>, BuildError> {
    match spec.kind {
        StageKind::Llm if spec.mot.is_some() => mot::build_mot_expert(spec, wiring),
        StageKind::Router => router::build_router(spec, wiring),
        StageKind::Llm => {
            if let Some(talker) = &spec.talker {
                return talker::build_talker(spec, talker, wiring);
            }
            if let Some(kind) = wiring
                .received
                .iter()
                .find(|k| !LLM_PROMPT_INPUTS.contains(k))
            {
                // Hidden states condition a talker (an `llm` stage with a [stage.talker] table);
                // a text LLM takes text or tokens: refuse at start-up, not per request.
                return Err(BuildError::Load {
                    stage: spec.id.clone(),
                    message: format!(
                        "an inbound edge carries `{kind}`, which a text LLM stage cannot take as input (it takes text or tokens; add a [stage.talker] table for a talker conditioned on hidden states)"
                    ),
                });
            }
            let device = candle_device(&spec.id, spec.device)?;
            let settings = LlmEngineSettings {
                max_model_len: spec.max_model_len,
                sampling: spec.sampling.clone(),
                emit_hidden: wiring.consumed.contains(&PayloadKind::Hidden),
                kv_cache_bytes: spec.kv_cache_bytes,
                kv_block_size: spec.kv_block_size,
                prefix_caching: spec.prefix_caching,
                max_batch_size: spec.max_batch_size,
            };
            let engine = LlmEngine::load(&spec.model, candle_dtype(spec.dtype), &device, settings)
                .map_err(|e| BuildError::Load {
                    stage: spec.id.clone(),
                    message: e.to_string(),
                })?;
            Ok(Box::new(engine))
        }
        StageKind::Encoder if spec.encoder.encodes != Modality::Text => {
            media::build_media_encoder(spec, wiring)
        }
        StageKind::Encoder => image::build_text_encoder(spec, wiring),
        StageKind::Dit => image::build_dit(spec, wiring),
        StageKind::Vae => image::build_vae(spec, wiring),
        StageKind::Codec => audio::build_codec(spec, wiring),
    }
}
