//! Builds media encoder stages (`kind = "encoder"` with `[stage.encoder] encodes = "image"` or
//! `"audio"`): a vision encoder (LLaVA layout) or a Whisper encoder, each behind the generic
//! [`MediaEncoderEngine`] with the stage's embedding cache.

use super::{candle_device, candle_dtype, BuildError, StageWiring};
use crate::llm::config::LlmConfig;
use crate::media::stage::MediaEncoderEngine;
use crate::media::vision::VisionEncoder;
use crate::media::whisper::WhisperEncoder;
use crate::media::MediaEncoder;
use omnistage_stages::deploy::StageSpec;
use omnistage_stages::{Modality, PayloadKind, StageEngine};

pub(super) fn build_media_encoder(
    spec: &StageSpec,
    wiring: &StageWiring,
) -> Result<Box<dyn StageEngine>, BuildError> {
    if let Some(kind) = wiring.received.first() {
        return Err(BuildError::Load {
            stage: spec.id.clone(),
            message: format!(
                "an inbound edge carries `{kind}`; a media encoder takes the request's {} itself \
                 and has no inbound edges",
                spec.encoder.encodes
            ),
        });
    }
    if let Some(kind) = wiring
        .consumed
        .iter()
        .find(|k| **k != PayloadKind::MediaEmbeddings)
    {
        return Err(BuildError::Load {
            stage: spec.id.clone(),
            message: format!(
                "an outbound edge takes `{kind}`; a media encoder makes only media_embeddings"
            ),
        });
    }
    let device = candle_device(&spec.id, spec.device)?;
    let dtype = candle_dtype(spec.dtype);
    let load = |message: String| BuildError::Load {
        stage: spec.id.clone(),
        message,
    };
    let cache = usize::try_from(spec.encoder.cache_bytes).unwrap_or(usize::MAX);
    match spec.encoder.encodes {
        Modality::Image => {
            let encoder = VisionEncoder::load(&spec.model, dtype, &device)
                .map_err(|e| load(e.to_string()))?;
            check_width(spec, &encoder, wiring)?;
            Ok(Box::new(MediaEncoderEngine::new(encoder, cache)))
        }
        Modality::Audio => {
            let encoder = WhisperEncoder::load(&spec.model, dtype, &device)
                .map_err(|e| load(e.to_string()))?;
            check_width(spec, &encoder, wiring)?;
            Ok(Box::new(MediaEncoderEngine::new(encoder, cache)))
        }
        Modality::Text => Err(load("a text encoder is not a media encoder".into())),
    }
}

/// The encoder must write rows as wide as the embeddings of every LLM it feeds.
fn check_width(
    spec: &StageSpec,
    encoder: &dyn MediaEncoder,
    wiring: &StageWiring,
) -> Result<(), BuildError> {
    for dir in &wiring.media_consumers {
        let path = dir.join("config.json");
        let config = LlmConfig::from_file(&path).map_err(|e| BuildError::Load {
            stage: spec.id.clone(),
            message: format!("reading the LLM it feeds: {e}"),
        })?;
        if config.hidden_size != encoder.output_dim() {
            return Err(BuildError::Load {
                stage: spec.id.clone(),
                message: format!(
                    "it writes rows of width {} but the LLM it feeds ({}) has hidden_size {}; \
                     the projector's output width must match",
                    encoder.output_dim(),
                    path.display(),
                    config.hidden_size
                ),
            });
        }
    }
    Ok(())
}
