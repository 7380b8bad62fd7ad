//! Reading one field of the deployment file: typed parsing of a table with errors that name the
//! field, enumerations, byte sizes with units, and positive counts.

use super::{join, DeployError, Site};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// How an environment override's string value is parsed for a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FieldTy {
    Str,
    UInt,
    Float,
    Bool,
    /// A list of strings: a JSON array or a comma-separated list.
    CsvList,
    /// A list of strings: a JSON array or a single string.
    StrList,
    /// A list of unsigned integers: a JSON array or a comma-separated list.
    UIntList,
    /// A sub-table (not overridable as a whole).
    Table,
}

/// Deserializes `map` into `T`, first checking each key against `fields` (unknown field) and
/// deserializing it alone (so a type error names its field).
pub(super) fn parse_table<T: DeserializeOwned>(
    map: &Map<String, Value>,
    file: &str,
    site: &Site,
    prefix: &str,
    fields: &[&str],
) -> Result<T, DeployError> {
    for (key, value) in map {
        let field = format!("{prefix}{key}");
        if !fields.contains(&key.as_str()) {
            return Err(DeployError::UnknownField {
                file: file.to_string(),
                site: Box::new(site.clone()),
                field,
                allowed: join(fields),
            });
        }
        let mut one = Map::new();
        one.insert(key.clone(), value.clone());
        if let Err(e) = serde_json::from_value::<T>(Value::Object(one)) {
            return Err(bad(file, site, &field, &e.to_string()));
        }
    }
    serde_json::from_value(Value::Object(map.clone())).map_err(|e| {
        let field = prefix.trim_end_matches('.');
        bad(
            file,
            site,
            if field.is_empty() { "?" } else { field },
            &e.to_string(),
        )
    })
}

pub(super) fn names(fields: &[(&'static str, FieldTy)]) -> Vec<&'static str> {
    fields.iter().map(|(n, _)| *n).collect()
}

pub(super) fn bad(file: &str, site: &Site, field: &str, message: &str) -> DeployError {
    DeployError::BadValue {
        file: file.to_string(),
        site: Box::new(site.clone()),
        field: field.to_string(),
        message: message.to_string(),
    }
}

pub(super) fn required<T>(
    v: Option<T>,
    file: &str,
    site: &Site,
    field: &str,
) -> Result<T, DeployError> {
    v.ok_or_else(|| DeployError::MissingField {
        file: file.to_string(),
        site: Box::new(site.clone()),
        field: field.to_string(),
    })
}

pub(super) fn one_of<T: Copy>(
    value: &str,
    all: &[T],
    name: impl Fn(T) -> &'static str,
    file: &str,
    site: &Site,
    field: &str,
) -> Result<T, DeployError> {
    all.iter()
        .copied()
        .find(|t| name(*t) == value)
        .ok_or_else(|| DeployError::UnknownValue {
            file: file.to_string(),
            site: Box::new(site.clone()),
            field: field.to_string(),
            value: value.to_string(),
            allowed: join(all.iter().map(|t| name(*t))),
        })
}

/// Reads a byte count: a positive integer, or a string with an optional unit (B, KB, MB, GB,
/// KiB, MiB, GiB, TiB; case-insensitive; `k`/`m`/`g` alone mean the binary units).
pub(super) fn byte_size(v: &Value) -> Result<u64, String> {
    let text = match v {
        Value::Number(n) => {
            return n
                .as_u64()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("must be a positive byte count, got {n}"))
        }
        Value::String(s) => s.trim().to_string(),
        other => {
            return Err(format!(
                "must be a byte count like 268435456 or \"256MiB\", got {other}"
            ))
        }
    };
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a byte count like \"256MiB\""))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tib" => 1024.0f64.powi(4),
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{text}`; use B, KB, MB, GB, KiB, MiB or GiB"
            ))
        }
    };
    let bytes = number * scale;
    if !(bytes >= 1.0 && bytes.is_finite()) {
        return Err(format!("`{text}` must be at least one byte"));
    }
    Ok(bytes as u64)
}

pub(super) fn at_least_one(
    v: usize,
    file: &str,
    site: &Site,
    field: &str,
) -> Result<usize, DeployError> {
    if v >= 1 {
        return Ok(v);
    }
    Err(DeployError::OutOfRange {
        file: file.to_string(),
        site: Box::new(site.clone()),
        field: field.to_string(),
        value: v.to_string(),
        rule: ">= 1",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn byte_sizes_with_units() {
        assert_eq!(byte_size(&Value::from(1024u64)), Ok(1024));
        assert_eq!(byte_size(&Value::from("256MiB")), Ok(256 << 20));
        assert_eq!(byte_size(&Value::from("2 GiB")), Ok(2 << 30));
        assert_eq!(byte_size(&Value::from("500MB")), Ok(500_000_000));
        assert_eq!(byte_size(&Value::from("1.5k")), Ok(1536));
        assert!(byte_size(&Value::from("12 parsecs")).is_err());
        assert!(byte_size(&Value::from("MiB")).is_err());
        assert!(byte_size(&Value::from(0u64)).is_err());
        assert!(byte_size(&Value::from(true)).is_err());
    }
}
