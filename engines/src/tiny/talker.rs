//! A seeded random-weight talker checkpoint: a tiny Qwen2-layout LLM whose vocabulary is the
//! tiny BPE tokenizer, two audio special tokens and `slots × codebook_size` codec tokens
//! (Orpheus-style, over SNAC's 7-slot frame by default), plus Qwen2.5-Omni's
//! `thinker_to_talker_proj` for a given thinker hidden size.
//!
//! Token ids: `0..512` the tiny tokenizer ([`super::BPE_VOCAB_SIZE`] BPE ids, then
//! `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`), [`TINY_TALKER_AUDIO_START`] (512),
//! [`TINY_TALKER_AUDIO_END`] (513), then codec tokens from [`TINY_TALKER_CODEC_OFFSET`] (514):
//! slot `p` code `c` is `514 + p × codebook_size + c`. [`TinyTalkerSpec::settings`] gives the
//! matching `[stage.talker]` settings.

use super::bpe::{self, BPE_VOCAB_SIZE};
use super::llm::{normal_bytes, tensor_seed, write_tiny_llm, TinyFamily, TinyLlmSpec};
use super::{write_file, TinyError};
use omnistage_stages::deploy::{TalkerSettings, DEFAULT_VOICE};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tokenizers::AddedToken;

/// `<|audio_start|>`: ends the talker prompt; codec tokens follow.
pub const TINY_TALKER_AUDIO_START_TOKEN: &str = "<|audio_start|>";
/// `<|audio_end|>`: ends the audio (the talker's end token).
pub const TINY_TALKER_AUDIO_END_TOKEN: &str = "<|audio_end|>";
/// Id of `<|audio_start|>`.
pub const TINY_TALKER_AUDIO_START: u32 = BPE_VOCAB_SIZE as u32 + 3;
/// Id of `<|audio_end|>`.
pub const TINY_TALKER_AUDIO_END: u32 = BPE_VOCAB_SIZE as u32 + 4;
/// Id of slot 0's code 0.
pub const TINY_TALKER_CODEC_OFFSET: u32 = BPE_VOCAB_SIZE as u32 + 5;
/// Id of `<|im_start|>` (the prompt prefix).
const IM_START_ID: u32 = BPE_VOCAB_SIZE as u32 + 1;
/// Id of `<|im_end|>`.
const IM_END_ID: u32 = BPE_VOCAB_SIZE as u32 + 2;

/// Shape of a tiny talker checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct TinyTalkerSpec {
    /// The decoder (its `vocab_size` is set from the codec layout).
    pub llm: TinyLlmSpec,
    /// Codes per codebook.
    pub codebook_size: usize,
    /// Codebook level of each frame slot, in the order the talker writes them.
    pub frame_layout: Vec<usize>,
    /// Width of the thinker rows `thinker_to_talker_proj` takes.
    pub thinker_hidden_size: usize,
}

impl Default for TinyTalkerSpec {
    /// [`TinyTalkerSpec::tiny`] for the tiny thinker (hidden size 64).
    fn default() -> Self {
        Self::tiny(64)
    }
}

impl TinyTalkerSpec {
    /// A tiny Qwen2 talker (hidden 64, 2 layers) over 64-entry codebooks in Orpheus' SNAC
    /// layout `[0, 1, 2, 2, 1, 2, 2]`, conditioned on thinker rows of `thinker_hidden_size`.
    pub fn tiny(thinker_hidden_size: usize) -> Self {
        Self {
            llm: TinyLlmSpec::tiny(TinyFamily::Qwen2),
            codebook_size: 64,
            frame_layout: vec![0, 1, 2, 2, 1, 2, 2],
            thinker_hidden_size,
        }
    }

    /// Vocabulary size: tokenizer, two audio tokens, the codec tokens.
    pub fn vocab_size(&self) -> usize {
        TINY_TALKER_CODEC_OFFSET as usize + self.frame_layout.len() * self.codebook_size
    }

    /// The `[stage.talker]` settings that match the checkpoint: prompt
    /// `<|im_start|>` + "{voice}: {text}" + `<|im_end|>` `<|audio_start|>`, end token
    /// `<|audio_end|>`, voices `default` ("tara") and `leo` ("leo").
    pub fn settings(&self) -> TalkerSettings {
        TalkerSettings {
            codec_token_offset: TINY_TALKER_CODEC_OFFSET,
            codebook_size: self.codebook_size,
            frame_layout: self.frame_layout.clone(),
            end_token_ids: vec![TINY_TALKER_AUDIO_END],
            prompt_prefix_ids: vec![IM_START_ID],
            prompt_suffix_ids: vec![IM_END_ID, TINY_TALKER_AUDIO_START],
            prompt_format: "{voice}: {text}".into(),
            voices: BTreeMap::from([
                (DEFAULT_VOICE.to_string(), "tara".to_string()),
                ("leo".to_string(), "leo".to_string()),
            ]),
        }
    }

    fn validate(&self) -> Result<(), TinyError> {
        let bad = |m: &str| Err(TinyError::InvalidSpec(m.into()));
        if self.codebook_size == 0 || self.frame_layout.is_empty() {
            return bad("talker codebook_size and frame_layout must be non-empty");
        }
        let levels = self.frame_layout.iter().max().map_or(0, |m| m + 1);
        if (0..levels).any(|l| !self.frame_layout.contains(&l)) {
            return bad("talker frame_layout must use levels 0..n with none skipped");
        }
        if self.thinker_hidden_size == 0 {
            return bad("thinker_hidden_size must be positive");
        }
        Ok(())
    }
}

/// What [`write_tiny_talker`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct TinyTalker {
    /// Files written into the directory (those of [`write_tiny_llm`]).
    pub files: Vec<PathBuf>,
    /// The `[stage.talker]` settings that match it ([`TinyTalkerSpec::settings`]).
    pub settings: TalkerSettings,
}

/// Writes a seeded random-weight talker checkpoint of `spec` into `dir`: the files of
/// [`write_tiny_llm`] with the talker's vocabulary, `tokenizer.json` with the two audio special
/// tokens added, and `thinker_to_talker_proj.{weight,bias}` in `model.safetensors`. The same
/// `(spec, seed)` gives byte-identical files.
pub fn write_tiny_talker(
    dir: &Path,
    spec: &TinyTalkerSpec,
    seed: u64,
) -> Result<TinyTalker, TinyError> {
    spec.validate()?;
    let llm = TinyLlmSpec {
        vocab_size: Some(spec.vocab_size()),
        ..spec.llm.clone()
    };
    let files = write_tiny_llm(dir, &llm, seed)?;

    let mut tok = bpe::build_tiny_tokenizer()?;
    tok.tokenizer.add_special_tokens(&[
        AddedToken::from(TINY_TALKER_AUDIO_START_TOKEN, true),
        AddedToken::from(TINY_TALKER_AUDIO_END_TOKEN, true),
    ]);
    let ids = [TINY_TALKER_AUDIO_START_TOKEN, TINY_TALKER_AUDIO_END_TOKEN]
        .map(|t| tok.tokenizer.token_to_id(t));
    if ids != [Some(TINY_TALKER_AUDIO_START), Some(TINY_TALKER_AUDIO_END)] {
        return Err(TinyError::Tokenizer(format!(
            "audio tokens got ids {ids:?}, expected {TINY_TALKER_AUDIO_START} and \
             {TINY_TALKER_AUDIO_END}"
        )));
    }
    write_file(
        &dir.join("tokenizer.json"),
        bpe::tokenizer_json(&tok)?.as_bytes(),
    )?;

    add_projection(&dir.join("model.safetensors"), spec, seed)?;
    Ok(TinyTalker {
        files,
        settings: spec.settings(),
    })
}

/// Rewrites `path` with `thinker_to_talker_proj.{weight,bias}` added.
fn add_projection(path: &Path, spec: &TinyTalkerSpec, seed: u64) -> Result<(), TinyError> {
    let st_err = |source| TinyError::Safetensors {
        path: path.to_path_buf(),
        source,
    };
    let bytes = std::fs::read(path).map_err(|source| TinyError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let existing = SafeTensors::deserialize(&bytes).map_err(st_err)?;
    let (out, inp) = (spec.llm.hidden_size, spec.thinker_hidden_size);
    // Rows after the thinker's final norm have components of about 1, so a 1/sqrt(in) init
    // gives a projected term of about 1 per component: it steers the talker visibly.
    let std = 1.0 / (inp as f32).sqrt();
    let weight_name = "thinker_to_talker_proj.weight";
    let bias_name = "thinker_to_talker_proj.bias";
    let weight = normal_bytes(tensor_seed(seed, weight_name), out * inp, std);
    let bias = normal_bytes(tensor_seed(seed, bias_name), out, spec.llm.init_std);
    let mut views: Vec<(String, TensorView<'_>)> = existing
        .tensors()
        .into_iter()
        .filter(|(name, _)| !name.starts_with("thinker_to_talker_proj."))
        .collect();
    views.push((
        weight_name.into(),
        TensorView::new(Dtype::F32, vec![out, inp], &weight).map_err(st_err)?,
    ));
    views.push((
        bias_name.into(),
        TensorView::new(Dtype::F32, vec![out], &bias).map_err(st_err)?,
    ));
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let data = safetensors::serialize(views, Some(metadata)).map_err(st_err)?;
    drop(existing);
    write_file(path, &data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_tokenizer() {
        assert_eq!(TINY_TALKER_AUDIO_START, 512);
        assert_eq!(TINY_TALKER_CODEC_OFFSET, 514);
        let spec = TinyTalkerSpec::default();
        assert_eq!(spec.vocab_size(), 514 + 7 * 64);
        assert_eq!(spec.settings().canonical_slots(), vec![0, 1, 3, 4, 2, 5, 6]);
    }
}
