//! The tiny text-to-image pipeline in the diffusers folder layout: an LLM text encoder (as
//! Qwen-Image conditions its DiT), an SD3 MMDiT transformer, an AutoencoderKL and a flow-matching
//! scheduler config.

use super::llm::write_json;
use super::{
    write_tiny_llm, write_tiny_sd3_transformer, write_tiny_vae, TinyError, TinyLlmSpec,
    TinySd3Spec, TinyVaeSpec,
};
use serde_json::json;
use std::path::{Path, PathBuf};

/// The flow-matching shift of the tiny scheduler (SD3's value).
pub const TINY_SCHEDULER_SHIFT: f64 = 3.0;

/// Writes `dir/{model_index.json, text_encoder/, tokenizer/, transformer/, vae/, scheduler/}`;
/// returns every file written. Same seed ⇒ identical files.
pub fn write_tiny_image_pipeline(dir: &Path, seed: u64) -> Result<Vec<PathBuf>, TinyError> {
    let text = TinyLlmSpec::tiny_qwen3();
    let mut files = write_tiny_llm(&dir.join("text_encoder"), &text, seed.wrapping_add(101))?;
    // diffusers keeps the tokenizer in its own folder.
    let tokenizer_dir = dir.join("tokenizer");
    std::fs::create_dir_all(&tokenizer_dir).map_err(|source| TinyError::Io {
        path: tokenizer_dir.clone(),
        source,
    })?;
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        let (from, to) = (
            dir.join("text_encoder").join(name),
            tokenizer_dir.join(name),
        );
        if from.is_file() {
            std::fs::copy(&from, &to).map_err(|source| TinyError::Io {
                path: to.clone(),
                source,
            })?;
            files.push(to);
        }
    }
    let transformer = TinySd3Spec::tiny().with_text_dims(text.hidden_size, text.hidden_size);
    files.extend(write_tiny_sd3_transformer(
        &dir.join("transformer"),
        &transformer,
        seed.wrapping_add(102),
    )?);
    files.extend(write_tiny_vae(
        &dir.join("vae"),
        &TinyVaeSpec::tiny(),
        seed.wrapping_add(103),
    )?);
    let scheduler_dir = dir.join("scheduler");
    std::fs::create_dir_all(&scheduler_dir).map_err(|source| TinyError::Io {
        path: scheduler_dir.clone(),
        source,
    })?;
    files.push(write_json(
        &scheduler_dir.join("scheduler_config.json"),
        &json!({
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "_diffusers_version": "0.42.1",
            "num_train_timesteps": 1000,
            "shift": TINY_SCHEDULER_SHIFT,
        }),
    )?);
    files.push(write_json(
        &dir.join("model_index.json"),
        &json!({
            "_class_name": "StableDiffusion3Pipeline",
            "_diffusers_version": "0.42.1",
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Qwen3Model"],
            "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
            "transformer": ["diffusers", "SD3Transformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }),
    )?);
    Ok(files)
}
