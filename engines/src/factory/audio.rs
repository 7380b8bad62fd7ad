//! Codec stages: which codec a checkpoint holds (SNAC or Mimi, from its `config.json`), loaded
//! behind the codec stage engine and checked against the frame layout its talker writes.

use super::{candle_device, candle_dtype, BuildError, StageWiring};
use crate::audio::codec::Codec;
use crate::audio::mimi::{MimiCodec, MimiSettings};
use crate::audio::snac::SnacCodec;
use crate::audio::stage::CodecEngine;
use omnistage_stages::deploy::StageSpec;
use omnistage_stages::StageEngine;
use std::path::Path;

/// The codec families a codec stage can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodecFamily {
    Snac,
    Mimi,
}

/// Tells SNAC from Mimi by the checkpoint's `config.json` (SNAC's has `vq_strides`; Mimi's is
/// Transformers' `MimiConfig`, or absent beside a moshi-layout safetensors file).
pub fn codec_family(path: &Path) -> Result<CodecFamily, String> {
    if path.is_file() {
        return Ok(CodecFamily::Mimi);
    }
    let config = path.join("config.json");
    let Ok(text) = std::fs::read_to_string(&config) else {
        return Ok(CodecFamily::Mimi);
    };
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("{}: invalid JSON: {e}", config.display()))?;
    if json.get("vq_strides").is_some() {
        return Ok(CodecFamily::Snac);
    }
    match json.get("model_type").and_then(|v| v.as_str()) {
        Some("mimi") | None => Ok(CodecFamily::Mimi),
        Some(other) => Err(format!(
            "{}: model_type `{other}` is not a codec this build runs (SNAC or Mimi)",
            config.display()
        )),
    }
}

/// Loads a codec stage's engine.
pub fn build_codec(
    spec: &StageSpec,
    wiring: &StageWiring,
) -> Result<Box<dyn StageEngine>, BuildError> {
    let load = |message: String| BuildError::Load {
        stage: spec.id.clone(),
        message,
    };
    let device = candle_device(&spec.id, spec.device)?;
    let dtype = candle_dtype(spec.dtype);
    let family = codec_family(&spec.model).map_err(load)?;
    let engine: Box<dyn StageEngine> = match family {
        CodecFamily::Snac => {
            let codec =
                SnacCodec::load(&spec.model, dtype, &device).map_err(|e| load(e.to_string()))?;
            check_layout(&codec, wiring).map_err(load)?;
            Box::new(CodecEngine::new(codec))
        }
        CodecFamily::Mimi => {
            let settings = MimiSettings {
                num_codebooks: wiring.codec_levels.as_ref().map(Vec::len),
                dtype,
                ..MimiSettings::default()
            };
            let codec = MimiCodec::load(&spec.model, &settings, &device)
                .map_err(|e| load(e.to_string()))?;
            check_layout(&codec, wiring).map_err(load)?;
            Box::new(CodecEngine::new(codec))
        }
    };
    Ok(engine)
}

/// The talker upstream must write frames in this codec's layout and codebook size.
fn check_layout<C: Codec>(codec: &C, wiring: &StageWiring) -> Result<(), String> {
    let info = codec.info();
    if let Some(levels) = &wiring.codec_levels {
        if *levels != info.levels {
            return Err(format!(
                "the talker writes frames with codebook levels {levels:?} (canonical order), but this codec's frames are {:?}; fix [stage.talker] frame_layout",
                info.levels
            ));
        }
    }
    if let Some(size) = wiring.codebook_size {
        if size != info.codebook_size {
            return Err(format!(
                "the talker's codebook_size is {size}, this codec's codebooks hold {} codes",
                info.codebook_size
            ));
        }
    }
    Ok(())
}
