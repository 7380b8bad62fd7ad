//! `OMNISTAGE_*` environment overrides, turned into `config` override keys
//! (`name`, `stage[<index>].<field>`, `stage[<index>].sampling.<field>`) with typed values.

use super::fields::FieldTy;
use super::image::IMAGE_FIELDS;
use super::raw::{SAMPLING_FIELDS, STAGE_FIELDS};
use super::talker::TALKER_FIELDS;
use super::{join, DeployError};
use config::ValueKind;
use serde_json::Value;

const PREFIX: &str = "OMNISTAGE_";

/// One override: the variable it came from, the `config` key it sets and the typed value.
pub(super) struct Override {
    pub var: String,
    pub key: String,
    pub value: config::Value,
}

/// Whether `name` starts with `OMNISTAGE_` (ASCII case-insensitive).
pub(super) fn is_omnistage_var(name: &str) -> bool {
    name.get(..PREFIX.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(PREFIX))
}

/// Turns the `OMNISTAGE_*` variables of `env` into overrides; stage ids are looked up in `tree`
/// (the file as read, before overrides). Variables without `__` other than `OMNISTAGE_NAME` are
/// left to other components; a `__` variable that names no stage or field is an error.
pub(super) fn overrides(
    tree: &Value,
    env: &[(String, String)],
    file: &str,
) -> Result<Vec<Override>, DeployError> {
    let ids: Vec<&str> = tree
        .get("stage")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|s| s.get("id").and_then(Value::as_str).unwrap_or(""))
                .collect()
        })
        .unwrap_or_default();
    let mut out = Vec::new();
    for (var, value) in env {
        if !is_omnistage_var(var) {
            continue;
        }
        let err = |message: String| DeployError::Override {
            file: file.to_string(),
            var: var.clone(),
            message,
        };
        let segs: Vec<String> = var[PREFIX.len()..]
            .split("__")
            .map(str::to_lowercase)
            .collect();
        match segs.as_slice() {
            [name] if name == "name" => {
                out.push(Override { var: var.clone(), key: "name".into(), value: value.as_str().into() });
                continue;
            }
            [_] => continue,
            [stage, ..] if stage == "stage" && segs.len() >= 3 => {}
            _ => {
                return Err(err(
                    "unknown deployment override; expected OMNISTAGE_NAME or OMNISTAGE_STAGE__<ID>__<FIELD>".into(),
                ))
            }
        }
        let (index, field_at) = find_stage(&ids, &segs).map_err(err)?;
        let path = &segs[field_at..];
        let field = match path {
            [f] => STAGE_FIELDS
                .iter()
                .find(|(n, t)| n == f && *n != "id" && *t != FieldTy::Table),
            [s, f] if s == "sampling" => SAMPLING_FIELDS.iter().find(|(n, _)| n == f),
            [s, f] if s == "image" => IMAGE_FIELDS.iter().find(|(n, _)| n == f),
            [s, f] if s == "talker" => TALKER_FIELDS
                .iter()
                .find(|(n, t)| n == f && *t != FieldTy::Table),
            _ => None,
        };
        let Some((_, ty)) = field else {
            let overridable = STAGE_FIELDS
                .iter()
                .filter(|(n, t)| *n != "id" && *t != FieldTy::Table)
                .map(|(n, _)| n.to_string())
                .chain(
                    SAMPLING_FIELDS
                        .iter()
                        .map(|(n, _)| format!("sampling__{n}")),
                )
                .chain(IMAGE_FIELDS.iter().map(|(n, _)| format!("image__{n}")))
                .chain(
                    TALKER_FIELDS
                        .iter()
                        .filter(|(_, t)| *t != FieldTy::Table)
                        .map(|(n, _)| format!("talker__{n}")),
                );
            return Err(err(format!(
                "stage `{}` has no overridable field `{}`; fields: {}",
                ids[index],
                path.join("."),
                join(overridable)
            )));
        };
        let value = parse_value(value, *ty).map_err(err)?;
        out.push(Override {
            var: var.clone(),
            key: format!("stage[{index}].{}", path.join(".")),
            value,
        });
    }
    Ok(out)
}

/// Finds the stage named by `segs[1..k]` (ids may themselves contain `__`); returns its index and
/// `k`, where the field path starts.
fn find_stage(ids: &[&str], segs: &[String]) -> Result<(usize, usize), String> {
    let norm = |s: &str| s.to_lowercase().replace('-', "_");
    for k in 2..segs.len() {
        let wanted = norm(&segs[1..k].join("__"));
        let hits: Vec<usize> = (0..ids.len()).filter(|&i| norm(ids[i]) == wanted).collect();
        match hits.as_slice() {
            [] => continue,
            [i] => return Ok((*i, k)),
            _ => {
                let names = hits.iter().map(|&i| format!("`{}`", ids[i]));
                return Err(format!(
                    "stage id `{}` is ambiguous: it matches {}",
                    segs[1..k].join("__"),
                    join(names)
                ));
            }
        }
    }
    Err(format!(
        "no stage matches `{}`; stages: {}",
        segs[1],
        join(ids.iter().map(|i| format!("`{i}`")))
    ))
}

/// Parses an override's string to the field's type.
fn parse_value(raw: &str, ty: FieldTy) -> Result<config::Value, String> {
    let s = raw.trim();
    let uint = |s: &str| {
        s.trim()
            .parse::<u64>()
            .map_err(|_| format!("expected a non-negative integer, got `{s}`"))
    };
    let kind: ValueKind = match ty {
        FieldTy::Str => raw.into(),
        FieldTy::UInt => uint(s)?.into(),
        FieldTy::Float => s
            .parse::<f64>()
            .map_err(|_| format!("expected a number, got `{s}`"))?
            .into(),
        FieldTy::Bool => match s.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => true.into(),
            "false" | "0" | "no" | "off" => false.into(),
            _ => return Err(format!("expected true or false, got `{s}`")),
        },
        FieldTy::CsvList | FieldTy::StrList if s.starts_with('[') => {
            serde_json::from_str::<Vec<String>>(s)
                .map_err(|e| format!("expected a JSON array of strings: {e}"))?
                .into()
        }
        FieldTy::CsvList => s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(String::from)
            .collect::<Vec<_>>()
            .into(),
        FieldTy::StrList => vec![raw.to_string()].into(),
        FieldTy::UIntList if s.starts_with('[') => serde_json::from_str::<Vec<u64>>(s)
            .map_err(|e| format!("expected a JSON array of non-negative integers: {e}"))?
            .into(),
        FieldTy::UIntList => s
            .split(',')
            .filter(|p| !p.trim().is_empty())
            .map(uint)
            .collect::<Result<Vec<_>, _>>()?
            .into(),
        FieldTy::Table => {
            return Err("a table cannot be overridden as a whole; name one of its fields".into())
        }
    };
    Ok(kind.into())
}
