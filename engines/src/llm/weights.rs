//! Finding and memory-mapping a checkpoint's safetensors files into a candle [`VarBuilder`].
//!
//! Layouts understood, in this order:
//! 1. `model.safetensors.index.json` whose `weight_map` names the shards;
//! 2. a single `model.safetensors`;
//! 3. shards named `model-XXXXX-of-YYYYY.safetensors` without an index.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

/// Errors finding, opening or reading a checkpoint's weights.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The directory holds no safetensors checkpoint.
    #[error(
        "no safetensors checkpoint in {dir}: expected {stem}.safetensors, \
         {stem}.safetensors.index.json, or {stem}-*-of-*.safetensors shards"
    )]
    NotFound {
        /// The checkpoint directory.
        dir: PathBuf,
        /// The file stem looked for (`model`, `diffusion_pytorch_model`).
        stem: String,
    },
    /// The shard index names a shard that is not on disk.
    #[error("{index} references shard {shard}, which does not exist")]
    MissingShard {
        /// The index file.
        index: PathBuf,
        /// The missing shard's path.
        shard: PathBuf,
    },
    /// The shard index is not what we expect.
    #[error("invalid shard index {index}: {reason}")]
    BadIndex {
        /// The index file.
        index: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The safetensors files could not be mapped or their headers are invalid.
    #[error("opening safetensors {paths:?}: {source}")]
    Open {
        /// The files.
        paths: Vec<PathBuf>,
        /// The underlying error.
        #[source]
        source: candle_core::Error,
    },
    /// The model needs a tensor the checkpoint lacks.
    #[error("checkpoint has no tensor {name:?}")]
    MissingTensor {
        /// The HF tensor name.
        name: String,
    },
    /// A tensor has a different shape from what the config implies.
    #[error("tensor shape mismatch: {msg} (expected {expected:?}, checkpoint has {got:?})")]
    ShapeMismatch {
        /// candle's message, naming the tensor.
        msg: String,
        /// Shape implied by the config.
        expected: Vec<usize>,
        /// Shape in the checkpoint.
        got: Vec<usize>,
    },
}

/// The file stem of diffusers' component checkpoints (`vae/`, `transformer/`, ...).
pub const DIFFUSERS_STEM: &str = "diffusion_pytorch_model";

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> WeightsError + '_ {
    move |source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Lists the safetensors files of the checkpoint in `dir` (Transformers' `model*` names).
pub fn find_safetensors(dir: &Path) -> Result<Vec<PathBuf>, WeightsError> {
    find_safetensors_with_stem(dir, "model")
}

/// Lists the safetensors files of the checkpoint in `dir` whose files are named after `stem`
/// (`model` for Transformers, [`DIFFUSERS_STEM`] for diffusers): `{stem}.safetensors.index.json`,
/// `{stem}.safetensors`, or `{stem}-XXXXX-of-YYYYY.safetensors` shards.
pub fn find_safetensors_with_stem(dir: &Path, stem: &str) -> Result<Vec<PathBuf>, WeightsError> {
    let index = dir.join(format!("{stem}.safetensors.index.json"));
    if index.is_file() {
        return shards_from_index(dir, &index);
    }
    let single = dir.join(format!("{stem}.safetensors"));
    if single.is_file() {
        return Ok(vec![single]);
    }
    let shard_prefix = format!("{stem}-");
    let entries = std::fs::read_dir(dir).map_err(io_err(dir))?;
    let mut shards = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with(&shard_prefix)
            && name.ends_with(".safetensors")
            && name.contains("-of-")
            && entry.path().is_file()
        {
            shards.push(entry.path());
        }
    }
    if shards.is_empty() {
        return Err(WeightsError::NotFound {
            dir: dir.to_path_buf(),
            stem: stem.to_string(),
        });
    }
    shards.sort();
    Ok(shards)
}

fn shards_from_index(dir: &Path, index: &Path) -> Result<Vec<PathBuf>, WeightsError> {
    let bad = |reason: String| WeightsError::BadIndex {
        index: index.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(index).map_err(io_err(index))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(serde_json::Value::as_object)
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut names = BTreeSet::new();
    for (tensor, shard) in map {
        let shard = shard
            .as_str()
            .ok_or_else(|| bad(format!("shard of {tensor:?} is not a string")))?;
        // Shards live next to the index: refuse anything that could escape the directory.
        if shard.is_empty() || shard.contains(['/', '\\']) || shard == ".." || shard == "." {
            return Err(bad(format!(
                "shard name {shard:?} is not a plain file name"
            )));
        }
        names.insert(shard.to_string());
    }
    if names.is_empty() {
        return Err(bad("`weight_map` is empty".into()));
    }
    names
        .into_iter()
        .map(|name| {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(WeightsError::MissingShard {
                    index: index.to_path_buf(),
                    shard: path,
                })
            }
        })
        .collect()
}

/// Memory-maps the checkpoint in `dir` into a [`VarBuilder`] that yields tensors of `dtype` on
/// `device` (converted on load).
pub fn load_var_builder(
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, WeightsError> {
    mmap_var_builder(find_safetensors(dir)?, dtype, device)
}

/// Memory-maps the given safetensors files into a [`VarBuilder`] of `dtype` on `device`.
pub fn mmap_var_builder(
    paths: Vec<PathBuf>,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, WeightsError> {
    // SAFETY: memory-mapping is unsafe because another process could modify or truncate the
    // file while it is mapped. Checkpoint files are treated as read-only inputs: nothing in this
    // program writes to them, and operators must not rewrite a checkpoint while it is being
    // loaded. The safetensors headers are validated against the mapped length when opened.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&paths, dtype, device) };
    vb.map_err(|source| WeightsError::Open { paths, source })
}

/// Recognises candle's "tensor not found" / "shape mismatch" errors raised by a
/// [`VarBuilder`] (looking through backtrace and context wrappers) and turns them into the
/// matching [`WeightsError`]; any other error is handed back unchanged.
pub fn classify_load_error(err: candle_core::Error) -> Result<WeightsError, candle_core::Error> {
    fn find(err: &candle_core::Error) -> Option<WeightsError> {
        use candle_core::Error as E;
        match err {
            E::CannotFindTensor { path } => {
                Some(WeightsError::MissingTensor { name: path.clone() })
            }
            E::UnexpectedShape { msg, expected, got } => Some(WeightsError::ShapeMismatch {
                msg: msg.clone(),
                expected: expected.dims().to_vec(),
                got: got.dims().to_vec(),
            }),
            E::WithBacktrace { inner, .. }
            | E::Context { inner, .. }
            | E::WithPath { inner, .. } => find(inner),
            _ => None,
        }
    }
    find(&err).ok_or(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INDEX: &str = "model.safetensors.index.json";

    #[test]
    fn missing_checkpoint_and_missing_shard() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            find_safetensors(dir.path()),
            Err(WeightsError::NotFound { .. })
        ));
        std::fs::write(
            dir.path().join(INDEX),
            r#"{"weight_map":{"a":"model-00001-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let err = find_safetensors(dir.path()).unwrap_err();
        assert!(matches!(err, WeightsError::MissingShard { .. }), "{err}");
        std::fs::write(dir.path().join(INDEX), r#"{"weight_map":{"a":"../x"}}"#).unwrap();
        let err = find_safetensors(dir.path()).unwrap_err();
        assert!(matches!(err, WeightsError::BadIndex { .. }), "{err}");
    }
}
