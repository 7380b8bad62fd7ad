//! Builds a router stage's engine: the model form from the router checkpoint in the stage's
//! `model`, or the rule form from its `[stage.router]` rules.

use super::{candle_device, candle_dtype, BuildError, StageWiring};
use crate::router::{RouterEngine, RouterModel};
use omnistage_stages::deploy::{RouterForm, StageSpec};
use omnistage_stages::StageEngine;

/// Loads the engine of router stage `spec`. A router reads the request itself, so `wiring`
/// only matters to the graph check that already ran.
pub fn build_router(
    spec: &StageSpec,
    wiring: &StageWiring,
) -> Result<Box<dyn StageEngine>, BuildError> {
    let _ = wiring;
    let load = |message: String| BuildError::Load {
        stage: spec.id.clone(),
        message,
    };
    let settings = spec.router.as_ref().ok_or_else(|| {
        load("a router stage needs a [stage.router] table listing its experts".into())
    })?;
    let engine = match &settings.form {
        RouterForm::Model => {
            let device = candle_device(&spec.id, spec.device)?;
            let model = RouterModel::load(&spec.model, candle_dtype(spec.dtype), &device)
                .map_err(|e| load(format!("router checkpoint: {e}")))?;
            RouterEngine::with_model(model, settings.experts.clone(), settings.k).map_err(load)?
        }
        RouterForm::Rules { rules, default } => RouterEngine::with_rules(
            rules.clone(),
            default.clone(),
            settings.experts.clone(),
            settings.k,
        )
        .map_err(load)?,
    };
    Ok(Box::new(engine))
}
