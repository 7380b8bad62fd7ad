//! Field access on JSON config files that names the file and the dotted field path in errors.

use super::config::{Act, TowerConfig};
use super::VisionError;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

pub(super) fn read_json(path: &Path) -> Result<Value, VisionError> {
    let text = std::fs::read_to_string(path).map_err(|source| VisionError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| VisionError::Config {
        file: path.to_path_buf(),
        field: String::new(),
        reason: format!("not valid JSON: {e}"),
    })
}

/// Field access on one JSON object that names `file` and the dotted field path in errors.
pub(super) struct Json<'a> {
    pub(super) path: &'a Path,
    pub(super) prefix: &'a str,
}

impl Json<'_> {
    pub(super) fn bad(&self, field: &str, reason: String) -> VisionError {
        VisionError::Config {
            file: PathBuf::from(self.path),
            field: format!("{}{field}", self.prefix),
            reason,
        }
    }

    pub(super) fn object<'v>(
        &self,
        v: &'v Value,
        field: &str,
    ) -> Result<&'v Map<String, Value>, VisionError> {
        v.as_object()
            .ok_or_else(|| self.bad(field, "is not a JSON object".into()))
    }

    pub(super) fn required<'v>(
        &self,
        obj: &'v Map<String, Value>,
        field: &str,
    ) -> Result<&'v Value, VisionError> {
        match obj.get(field) {
            None | Some(Value::Null) => Err(self.bad(field, "is missing".into())),
            Some(v) => Ok(v),
        }
    }

    pub(super) fn usize(
        &self,
        obj: &Map<String, Value>,
        field: &str,
    ) -> Result<usize, VisionError> {
        self.opt_usize(obj, field)?
            .ok_or_else(|| self.bad(field, "is missing".into()))
    }

    pub(super) fn opt_usize(
        &self,
        obj: &Map<String, Value>,
        field: &str,
    ) -> Result<Option<usize>, VisionError> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.bad(field, format!("{v} is not a non-negative integer"))),
        }
    }

    pub(super) fn opt_f64(
        &self,
        obj: &Map<String, Value>,
        field: &str,
    ) -> Result<Option<f64>, VisionError> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(self.bad(field, format!("{v} is not a finite number"))),
            },
        }
    }

    pub(super) fn opt_str(
        &self,
        obj: &Map<String, Value>,
        field: &str,
    ) -> Result<Option<String>, VisionError> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.bad(field, format!("{v} is not a string"))),
        }
    }

    pub(super) fn opt_act(
        &self,
        obj: &Map<String, Value>,
        field: &str,
    ) -> Result<Option<Act>, VisionError> {
        match self.opt_str(obj, field)? {
            None => Ok(None),
            Some(name) => Act::parse(&name)
                .map(Some)
                .ok_or_else(|| self.bad(field, format!("activation {name:?} is not supported"))),
        }
    }

    pub(super) fn opt_triple(
        &self,
        obj: &Map<String, Value>,
        field: &str,
    ) -> Result<Option<[f32; 3]>, VisionError> {
        let v = match obj.get(field) {
            None | Some(Value::Null) => return Ok(None),
            Some(v) => v,
        };
        let vals: Option<Vec<f64>> = match v {
            Value::Number(n) => n.as_f64().map(|x| vec![x; 3]),
            Value::Array(a) if a.len() == 3 => a.iter().map(Value::as_f64).collect(),
            _ => None,
        };
        match vals {
            Some(x) if x.iter().all(|x| x.is_finite()) => {
                Ok(Some([x[0] as f32, x[1] as f32, x[2] as f32]))
            }
            _ => Err(self.bad(field, format!("{v} is not a number or a list of 3 numbers"))),
        }
    }

    pub(super) fn check_tower(&self, t: &TowerConfig) -> Result<(), VisionError> {
        let positive = [
            ("hidden_size", t.hidden_size),
            ("intermediate_size", t.intermediate_size),
            ("num_hidden_layers", t.num_hidden_layers),
            ("num_attention_heads", t.num_attention_heads),
            ("image_size", t.image_size),
            ("patch_size", t.patch_size),
            ("num_channels", t.num_channels),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(self.bad(name, "must be positive".into()));
            }
        }
        if t.hidden_size % t.num_attention_heads != 0 {
            return Err(self.bad(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    t.num_attention_heads, t.hidden_size
                ),
            ));
        }
        if t.image_size % t.patch_size != 0 {
            return Err(self.bad(
                "patch_size",
                format!(
                    "{} does not divide image_size {}",
                    t.patch_size, t.image_size
                ),
            ));
        }
        if t.num_channels != 3 {
            return Err(self.bad("num_channels", format!("{} is not 3 (RGB)", t.num_channels)));
        }
        if t.image_size > 8192 {
            return Err(self.bad("image_size", format!("{} is too large", t.image_size)));
        }
        Ok(())
    }
}
