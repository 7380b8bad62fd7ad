//! A checkpoint's `generation_config.json`: end-of-sequence ids and the model author's default
//! sampling settings.

use serde::Deserialize;
use serde_json::Value as Json;
use std::path::{Path, PathBuf};

/// File name of the generation config inside a checkpoint directory.
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// Errors from reading `generation_config.json`.
#[derive(Debug, thiserror::Error)]
pub enum GenerationConfigError {
    /// The file exists but could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid JSON or a field has the wrong type.
    #[error("{}: invalid generation config: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A token id field is neither an id, a list of ids, nor null.
    #[error("{}: \"{field}\" must be a token id, a list of token ids or null", path.display())]
    TokenId {
        /// The file.
        path: PathBuf,
        /// The field.
        field: &'static str,
    },
}

/// Generation defaults of a checkpoint. Every field is optional in the file; a missing file
/// gives [`GenerationConfig::default`] (no end-of-sequence ids, no sampling defaults).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    /// Ids that end a sequence (`eos_token_id`, an int or a list in the file).
    pub eos_token_ids: Vec<u32>,
    /// `bos_token_id`.
    pub bos_token_id: Option<u32>,
    /// `pad_token_id`.
    pub pad_token_id: Option<u32>,
    /// `do_sample`: `Some(false)` means greedy decoding by default.
    pub do_sample: Option<bool>,
    /// `temperature`.
    pub temperature: Option<f64>,
    /// `top_p`.
    pub top_p: Option<f64>,
    /// `top_k`.
    pub top_k: Option<usize>,
    /// `repetition_penalty`.
    pub repetition_penalty: Option<f32>,
    /// `max_new_tokens`.
    pub max_new_tokens: Option<usize>,
    /// `max_length` (prompt + generation).
    pub max_length: Option<usize>,
}

/// The file's fields as they may appear.
#[derive(Deserialize)]
struct RawGenerationConfig {
    #[serde(default)]
    eos_token_id: Json,
    #[serde(default)]
    bos_token_id: Json,
    #[serde(default)]
    pad_token_id: Json,
    do_sample: Option<bool>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<usize>,
    repetition_penalty: Option<f32>,
    max_new_tokens: Option<usize>,
    max_length: Option<usize>,
}

impl GenerationConfig {
    /// Reads `dir/generation_config.json`; a missing file gives the default.
    pub fn load(dir: &Path) -> Result<Self, GenerationConfigError> {
        let path = dir.join(GENERATION_CONFIG_FILE);
        if !path.is_file() {
            return Ok(Self::default());
        }
        Self::from_file(&path)
    }

    /// Reads a generation config file at an explicit path.
    pub fn from_file(path: &Path) -> Result<Self, GenerationConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| GenerationConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text, path)
    }

    /// Parses generation config JSON; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self, GenerationConfigError> {
        let raw: RawGenerationConfig =
            serde_json::from_str(text).map_err(|source| GenerationConfigError::Json {
                path: path.to_path_buf(),
                source,
            })?;
        let ids = |value: &Json, field: &'static str| {
            token_ids(value).ok_or_else(|| GenerationConfigError::TokenId {
                path: path.to_path_buf(),
                field,
            })
        };
        let single = |value: &Json, field: &'static str| match value {
            Json::Null => Ok(None),
            other => match token_id(other) {
                Some(id) => Ok(Some(id)),
                None => Err(GenerationConfigError::TokenId {
                    path: path.to_path_buf(),
                    field,
                }),
            },
        };
        Ok(Self {
            eos_token_ids: ids(&raw.eos_token_id, "eos_token_id")?,
            bos_token_id: single(&raw.bos_token_id, "bos_token_id")?,
            pad_token_id: single(&raw.pad_token_id, "pad_token_id")?,
            do_sample: raw.do_sample,
            temperature: raw.temperature,
            top_p: raw.top_p,
            top_k: raw.top_k,
            repetition_penalty: raw.repetition_penalty,
            max_new_tokens: raw.max_new_tokens,
            max_length: raw.max_length,
        })
    }

    /// Whether `id` ends a sequence.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_token_ids.contains(&id)
    }
}

/// A token id that fits `u32`.
fn token_id(value: &Json) -> Option<u32> {
    value.as_u64().and_then(|id| u32::try_from(id).ok())
}

/// `null` → `[]`, an id → `[id]`, a list of ids → the ids (duplicates dropped, order kept).
fn token_ids(value: &Json) -> Option<Vec<u32>> {
    match value {
        Json::Null => Some(Vec::new()),
        Json::Array(items) => {
            let mut ids = Vec::with_capacity(items.len());
            for item in items {
                let id = token_id(item)?;
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
            Some(ids)
        }
        other => token_id(other).map(|id| vec![id]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<GenerationConfig, GenerationConfigError> {
        GenerationConfig::from_json_str(text, Path::new("generation_config.json"))
    }

    #[test]
    fn qwen_style_list() {
        let g = parse(
            r#"{"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": true,
                "eos_token_id": [151645, 151643], "repetition_penalty": 1.05,
                "temperature": 0.7, "top_p": 0.8, "top_k": 20, "transformers_version": "4.37.0"}"#,
        )
        .unwrap();
        assert_eq!(g.eos_token_ids, vec![151645, 151643]);
        assert_eq!(g.bos_token_id, Some(151643));
        assert_eq!(g.do_sample, Some(true));
        assert_eq!(g.temperature, Some(0.7));
        assert_eq!(g.top_p, Some(0.8));
        assert_eq!(g.top_k, Some(20));
        assert_eq!(g.repetition_penalty, Some(1.05));
        assert!(g.is_eos(151643));
    }

    #[test]
    fn single_int_and_nulls() {
        let g = parse(r#"{"eos_token_id": 2, "bos_token_id": null, "temperature": 1, "max_new_tokens": null}"#).unwrap();
        assert_eq!(g.eos_token_ids, vec![2]);
        assert_eq!(g.bos_token_id, None);
        assert_eq!(g.temperature, Some(1.0));
        assert_eq!(g.max_new_tokens, None);
        assert_eq!(parse("{}").unwrap(), GenerationConfig::default());
    }

    #[test]
    fn bad_values_are_typed_errors() {
        let err = parse(r#"{"eos_token_id": "x"}"#).unwrap_err();
        assert!(matches!(
            err,
            GenerationConfigError::TokenId {
                field: "eos_token_id",
                ..
            }
        ));
        assert!(matches!(
            parse(r#"{"eos_token_id": [-1]}"#),
            Err(GenerationConfigError::TokenId { .. })
        ));
        assert!(matches!(
            parse(r#"{"top_k": 1.5}"#),
            Err(GenerationConfigError::Json { .. })
        ));
        assert!(matches!(
            parse("not json"),
            Err(GenerationConfigError::Json { .. })
        ));
    }

    #[test]
    fn missing_file_is_default() {
        assert_eq!(
            GenerationConfig::load(Path::new("/nonexistent")).unwrap(),
            GenerationConfig::default()
        );
    }
}
