//! The tiny omni thinker: a [`write_tiny_llm`] checkpoint that also hears and sees. Its
//! vocabulary gains the media placeholders `<|IMAGE|>` and `<|AUDIO|>` (Qwen2.5-Omni's names),
//! `config.json` names them (`image_token_id`, `audio_token_id`), and its chat template writes
//! one placeholder per image or audio part of a turn whose content is a list of parts (plain
//! string turns render exactly as [`TINY_CHAT_TEMPLATE`](super::TINY_CHAT_TEMPLATE) does).

use super::bpe;
use super::llm::write_json;
use super::{write_file, write_tiny_llm, TinyError, TinyLlmSpec, BPE_VOCAB_SIZE};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tokenizers::AddedToken;

/// The image placeholder token.
pub const TINY_IMAGE_TOKEN: &str = "<|IMAGE|>";
/// The audio placeholder token.
pub const TINY_AUDIO_TOKEN: &str = "<|AUDIO|>";
/// Their ids: right after the three ChatML special tokens.
pub const TINY_IMAGE_TOKEN_ID: u32 = BPE_VOCAB_SIZE as u32 + 3;
pub const TINY_AUDIO_TOKEN_ID: u32 = BPE_VOCAB_SIZE as u32 + 4;

/// ChatML, with content parts: text as is, a placeholder per image or audio part.
pub const TINY_OMNI_CHAT_TEMPLATE: &str = "{%- for message in messages %}\n    {{- '<|im_start|>' + message['role'] + '\\n' }}\n    {%- if message['content'] is string %}\n        {{- message['content'] }}\n    {%- else %}\n        {%- for part in message['content'] %}\n            {%- if part['type'] == 'text' %}\n                {{- part['text'] }}\n            {%- elif part['type'] == 'image' %}\n                {{- '<|IMAGE|>' }}\n            {%- elif part['type'] == 'audio' %}\n                {{- '<|AUDIO|>' }}\n            {%- endif %}\n        {%- endfor %}\n    {%- endif %}\n    {{- '<|im_end|>' + '\\n' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n";

/// Writes a tiny thinker of `spec` into `dir`: the files of [`write_tiny_llm`] with two more
/// vocabulary rows, the placeholders in `tokenizer.json`, their ids in `config.json` and the
/// parts-aware chat template in `tokenizer_config.json`. Same `(spec, seed)` ⇒ same bytes.
pub fn write_tiny_thinker(
    dir: &Path,
    spec: &TinyLlmSpec,
    seed: u64,
) -> Result<Vec<PathBuf>, TinyError> {
    let spec = TinyLlmSpec {
        vocab_size: Some(BPE_VOCAB_SIZE + 5),
        ..spec.clone()
    };
    let files = write_tiny_llm(dir, &spec, seed)?;

    let mut tok = bpe::build_tiny_tokenizer()?;
    tok.tokenizer.add_special_tokens(&[
        AddedToken::from(TINY_IMAGE_TOKEN, true),
        AddedToken::from(TINY_AUDIO_TOKEN, true),
    ]);
    let ids = [TINY_IMAGE_TOKEN, TINY_AUDIO_TOKEN].map(|t| tok.tokenizer.token_to_id(t));
    if ids != [Some(TINY_IMAGE_TOKEN_ID), Some(TINY_AUDIO_TOKEN_ID)] {
        return Err(TinyError::Tokenizer(format!(
            "media placeholders got ids {ids:?}, expected {TINY_IMAGE_TOKEN_ID} and \
             {TINY_AUDIO_TOKEN_ID}"
        )));
    }
    write_file(
        &dir.join("tokenizer.json"),
        bpe::tokenizer_json(&tok)?.as_bytes(),
    )?;
    patch_json(&dir.join("config.json"), |config| {
        config.insert("image_token_id".into(), TINY_IMAGE_TOKEN_ID.into());
        config.insert("audio_token_id".into(), TINY_AUDIO_TOKEN_ID.into());
    })?;
    patch_json(&dir.join("tokenizer_config.json"), |config| {
        config.insert("chat_template".into(), TINY_OMNI_CHAT_TEMPLATE.into());
    })?;
    Ok(files)
}

/// Reads a JSON object file, changes it, and writes it back (keys sorted, as every tiny file).
fn patch_json(
    path: &Path,
    change: impl FnOnce(&mut serde_json::Map<String, Value>),
) -> Result<(), TinyError> {
    let text = std::fs::read_to_string(path).map_err(|source| TinyError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut value: Value = serde_json::from_str(&text).map_err(|source| TinyError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    let Some(map) = value.as_object_mut() else {
        return Err(TinyError::InvalidSpec(format!(
            "{} is not a JSON object",
            path.display()
        )));
    };
    change(map);
    write_json(path, &value).map(|_| ())
}
