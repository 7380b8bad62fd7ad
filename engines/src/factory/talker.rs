//! Builds the engine of an `llm` stage with a `[stage.talker]` table.

use super::{candle_device, candle_dtype, BuildError, StageWiring};
use crate::llm::engine::LlmEngineSettings;
use crate::llm::talker::{TalkerEngine, THINKER_PROJ};
use omnistage_stages::deploy::{StageSpec, TalkerSettings};
use omnistage_stages::{PayloadKind, StageEngine};

/// Payload kinds a talker takes: the text to speak, or a thinker's hidden states.
const TALKER_INPUTS: [PayloadKind; 2] = [PayloadKind::Text, PayloadKind::Hidden];

/// Loads the talker engine for one replica of `spec`. Refuses at start-up an inbound edge of a
/// kind a talker cannot take, and a `hidden` edge into a checkpoint without
/// `thinker_to_talker_proj`.
pub(super) fn build_talker(
    spec: &StageSpec,
    talker: &TalkerSettings,
    wiring: &StageWiring,
) -> Result<Box<dyn StageEngine>, BuildError> {
    let load = |message: String| BuildError::Load {
        stage: spec.id.clone(),
        message,
    };
    if let Some(kind) = wiring.received.iter().find(|k| !TALKER_INPUTS.contains(k)) {
        return Err(load(format!(
            "an inbound edge carries `{kind}`; a talker takes `text` to speak or a thinker's \
             `hidden` states"
        )));
    }
    let device = candle_device(&spec.id, spec.device)?;
    let settings = LlmEngineSettings {
        max_model_len: spec.max_model_len,
        sampling: spec.sampling.clone(),
        emit_hidden: false,
        kv_cache_bytes: spec.kv_cache_bytes,
        kv_block_size: spec.kv_block_size,
        prefix_caching: spec.prefix_caching,
        max_batch_size: spec.max_batch_size,
    };
    let engine = TalkerEngine::load(
        &spec.model,
        candle_dtype(spec.dtype),
        &device,
        settings,
        talker.clone(),
    )
    .map_err(|e| load(e.to_string()))?;
    if wiring.received.contains(&PayloadKind::Hidden) && engine.thinker_hidden_size().is_none() {
        return Err(load(format!(
            "an inbound edge carries `hidden`, but the checkpoint has no `{THINKER_PROJ}` to \
             project a thinker's states into the talker"
        )));
    }
    Ok(Box::new(engine))
}
