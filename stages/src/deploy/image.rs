//! The `[stage.image]` table: limits and defaults of text-to-image stages. A `dit` stage reads the
//! size, step, guidance, `n` and step-cache settings; an `encoder` stage reads `max_text_tokens`.

use super::fields::{bad, parse_table, FieldTy};
use super::{DeployError, Site};
use serde::Deserialize;
use serde_json::{Map, Value};

/// Image sides must be multiples of this (VAE downscale × patch size of every supported model).
pub const IMAGE_SIDE_MULTIPLE: usize = 16;

/// The keys of a `[stage.image]` table and their types.
pub(super) const IMAGE_FIELDS: &[(&str, FieldTy)] = &[
    ("min_size", FieldTy::UInt),
    ("max_size", FieldTy::UInt),
    ("default_width", FieldTy::UInt),
    ("default_height", FieldTy::UInt),
    ("max_n", FieldTy::UInt),
    ("default_steps", FieldTy::UInt),
    ("max_steps", FieldTy::UInt),
    ("default_guidance_scale", FieldTy::Float),
    ("step_cache", FieldTy::Bool),
    ("step_cache_threshold", FieldTy::Float),
    ("max_text_tokens", FieldTy::UInt),
];

/// Limits and defaults for image requests at one stage.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSettings {
    /// Smallest and largest image side in pixels (multiples of [`IMAGE_SIDE_MULTIPLE`]).
    pub min_size: usize,
    pub max_size: usize,
    /// Size used when a request names none.
    pub default_width: usize,
    pub default_height: usize,
    /// Most images one request may ask for.
    pub max_n: usize,
    pub default_steps: usize,
    pub max_steps: usize,
    /// Classifier-free guidance scale (or distilled guidance for FLUX-dev) when a request names
    /// none; at most 1 turns classifier-free guidance off.
    pub default_guidance_scale: f64,
    /// Reuse the block stack's residual between steps when the modulated input barely changed
    /// (TeaCache-style); requests may turn it on or off for themselves.
    pub step_cache: bool,
    /// Accumulated relative change below which a step reuses the cached residual.
    pub step_cache_threshold: f64,
    /// Text tokens an encoder stage pads or truncates every prompt to, so prompts of any length
    /// batch together and give the same conditioning alone or batched.
    pub max_text_tokens: usize,
}

impl Default for ImageSettings {
    fn default() -> Self {
        Self {
            min_size: 64,
            max_size: 1024,
            default_width: 1024,
            default_height: 1024,
            max_n: 4,
            default_steps: 28,
            max_steps: 100,
            default_guidance_scale: 7.0,
            step_cache: false,
            step_cache_threshold: 0.1,
            max_text_tokens: 77,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImage {
    min_size: Option<usize>,
    max_size: Option<usize>,
    default_width: Option<usize>,
    default_height: Option<usize>,
    max_n: Option<usize>,
    default_steps: Option<usize>,
    max_steps: Option<usize>,
    default_guidance_scale: Option<f64>,
    step_cache: Option<bool>,
    step_cache_threshold: Option<f64>,
    max_text_tokens: Option<usize>,
}

/// Parses and checks a `[stage.image]` table.
pub(super) fn parse(
    map: &Map<String, Value>,
    file: &str,
    site: &Site,
) -> Result<ImageSettings, DeployError> {
    let names: Vec<&str> = IMAGE_FIELDS.iter().map(|(n, _)| *n).collect();
    let r: RawImage = parse_table(map, file, site, "image.", &names)?;
    let d = ImageSettings::default();
    let max_size = r.max_size.unwrap_or(d.max_size);
    let min_size = r.min_size.unwrap_or(d.min_size.min(max_size));
    let s = ImageSettings {
        min_size,
        max_size,
        default_width: r.default_width.unwrap_or(d.default_width.min(max_size)),
        default_height: r.default_height.unwrap_or(d.default_height.min(max_size)),
        max_n: r.max_n.unwrap_or(d.max_n),
        max_steps: r.max_steps.unwrap_or(d.max_steps),
        default_steps: r
            .default_steps
            .unwrap_or(d.default_steps.min(r.max_steps.unwrap_or(d.max_steps))),
        default_guidance_scale: r.default_guidance_scale.unwrap_or(d.default_guidance_scale),
        step_cache: r.step_cache.unwrap_or(d.step_cache),
        step_cache_threshold: r.step_cache_threshold.unwrap_or(d.step_cache_threshold),
        max_text_tokens: r.max_text_tokens.unwrap_or(d.max_text_tokens),
    };
    let fail = |field: &str, message: String| Err(bad(file, site, field, &message));
    for (field, v) in [
        ("image.min_size", s.min_size),
        ("image.max_size", s.max_size),
        ("image.default_width", s.default_width),
        ("image.default_height", s.default_height),
    ] {
        if v == 0 || v % IMAGE_SIDE_MULTIPLE != 0 {
            return fail(
                field,
                format!("{v} is not a positive multiple of {IMAGE_SIDE_MULTIPLE}"),
            );
        }
    }
    if s.min_size > s.max_size {
        return fail(
            "image.min_size",
            format!("{} is larger than max_size ({})", s.min_size, s.max_size),
        );
    }
    for (field, v) in [
        ("image.default_width", s.default_width),
        ("image.default_height", s.default_height),
    ] {
        if v < s.min_size || v > s.max_size {
            return fail(
                field,
                format!(
                    "{v} is outside [min_size, max_size] = [{}, {}]",
                    s.min_size, s.max_size
                ),
            );
        }
    }
    for (field, v) in [
        ("image.max_n", s.max_n),
        ("image.max_steps", s.max_steps),
        ("image.default_steps", s.default_steps),
        ("image.max_text_tokens", s.max_text_tokens),
    ] {
        if v == 0 {
            return fail(field, "must be at least 1".into());
        }
    }
    if s.default_steps > s.max_steps {
        return fail(
            "image.default_steps",
            format!(
                "{} is larger than max_steps ({})",
                s.default_steps, s.max_steps
            ),
        );
    }
    if !(s.default_guidance_scale.is_finite() && s.default_guidance_scale >= 0.0) {
        return fail(
            "image.default_guidance_scale",
            format!("{} is not a finite number >= 0", s.default_guidance_scale),
        );
    }
    if !(s.step_cache_threshold.is_finite() && s.step_cache_threshold >= 0.0) {
        return fail(
            "image.step_cache_threshold",
            format!("{} is not a finite number >= 0", s.step_cache_threshold),
        );
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_json(json: &str) -> Result<ImageSettings, DeployError> {
        let v: Value = serde_json::from_str(json).unwrap();
        parse(v.as_object().unwrap(), "g.toml", &Site::Stage("dit".into()))
    }

    #[test]
    fn every_listed_field_parses_and_defaults_fit_small_maxima() {
        let s = parse_json(r#"{"max_size": 128}"#).unwrap();
        assert_eq!(
            (s.default_width, s.default_height, s.min_size),
            (128, 128, 64)
        );
        let all = r#"{"min_size": 16, "max_size": 256, "default_width": 64, "default_height": 32,
            "max_n": 2, "default_steps": 4, "max_steps": 8, "default_guidance_scale": 3.5,
            "step_cache": true, "step_cache_threshold": 0.2, "max_text_tokens": 16}"#;
        let s = parse_json(all).unwrap();
        assert_eq!((s.default_width, s.default_height, s.max_n), (64, 32, 2));
        assert!(s.step_cache);
        let listed: Vec<&str> = IMAGE_FIELDS.iter().map(|(n, _)| *n).collect();
        let v: Value = serde_json::from_str(all).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        for k in &listed {
            assert!(keys.contains(k), "{k} untested");
        }
    }

    #[test]
    fn bad_values_name_the_field_and_rule() {
        for (json, field, words) in [
            (r#"{"max_size": 100}"#, "image.max_size", "multiple of 16"),
            (
                r#"{"min_size": 512, "max_size": 256}"#,
                "image.min_size",
                "larger than",
            ),
            (
                r#"{"default_width": 2048}"#,
                "image.default_width",
                "outside",
            ),
            (
                r#"{"default_steps": 9, "max_steps": 8}"#,
                "image.default_steps",
                "max_steps",
            ),
            (r#"{"max_n": 0}"#, "image.max_n", "at least 1"),
            (
                r#"{"default_guidance_scale": -1}"#,
                "image.default_guidance_scale",
                ">= 0",
            ),
            (r#"{"stepcache": true}"#, "image.stepcache", "step_cache"),
        ] {
            let err = parse_json(json).unwrap_err().to_string();
            assert!(err.contains(field) && err.contains(words), "{json}: {err}");
            assert!(err.contains("g.toml") && err.contains("dit"), "{err}");
        }
    }
}
