//! Builds the engine of an `llm` stage with a `[stage.mot]` table: one expert of a
//! Mixture-of-Thoughts checkpoint (`crate::mot::engine`).

use super::{candle_device, BuildError, StageWiring};
use crate::mot::engine::{MotExpertEngine, MotExpertSettings};
use omnistage_stages::deploy::{DType, StageSpec};
use omnistage_stages::{PayloadKind, StageEngine};

/// Payload kinds a MoT expert takes: the router's decision, its peers' projected states, and
/// text to answer (as a user turn).
const MOT_INPUTS: [PayloadKind; 3] = [
    PayloadKind::Route,
    PayloadKind::MotStates,
    PayloadKind::Text,
];

/// Loads the MoT expert engine for one replica of `spec`: `spec.model` is the MoT checkpoint
/// folder and `spec.mot.expert` names the expert in its `mot_config.json`. Refuses a dtype
/// other than f32 and an inbound edge of a kind an expert cannot take.
pub fn build_mot_expert(
    spec: &StageSpec,
    wiring: &StageWiring,
) -> Result<Box<dyn StageEngine>, BuildError> {
    let load = |message: String| BuildError::Load {
        stage: spec.id.clone(),
        message,
    };
    let Some(mot) = &spec.mot else {
        return Err(load(
            "not a Mixture-of-Thoughts expert: the stage has no [stage.mot] table".into(),
        ));
    };
    if spec.dtype != DType::F32 {
        return Err(load(format!(
            "Mixture-of-Thoughts experts run in f32 only; set `dtype = \"f32\"` (the stage asks \
             for `{}`)",
            spec.dtype
        )));
    }
    if let Some(kind) = wiring.received.iter().find(|k| !MOT_INPUTS.contains(k)) {
        return Err(load(format!(
            "an inbound edge carries `{kind}`; a Mixture-of-Thoughts expert takes the router's \
             `route`, its peers' `mot_states` and `text`"
        )));
    }
    let device = candle_device(&spec.id, spec.device)?;
    let settings = MotExpertSettings {
        max_model_len: spec.max_model_len,
        sampling: spec.sampling.clone(),
    };
    let engine = MotExpertEngine::load(&spec.model, &mot.expert, &spec.id, &device, settings)
        .map_err(|e| load(e.to_string()))?;
    Ok(Box::new(engine))
}
