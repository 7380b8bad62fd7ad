//! The `[stage.talker]` table: how an `llm` stage that speaks writes audio codec tokens, builds its
//! prompt, and which voices it knows.
//!
//! A talker's vocabulary carries codec codes: slot `p` of a frame (in the talker's own order,
//! `frame_layout`) holding code `c` is token `codec_token_offset + p × codebook_size + c`, as in
//! Orpheus TTS. The talker reorders each finished frame into the codec's canonical layout (codebook
//! level by level) before sending it on.

use super::fields::{bad, parse_table, FieldTy};
use super::{DeployError, Site};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// The keys of a `[stage.talker]` table and their types.
pub(super) const TALKER_FIELDS: &[(&str, FieldTy)] = &[
    ("codec_token_offset", FieldTy::UInt),
    ("codebook_size", FieldTy::UInt),
    ("frame_layout", FieldTy::UIntList),
    ("end_token_ids", FieldTy::UIntList),
    ("prompt_prefix_ids", FieldTy::UIntList),
    ("prompt_suffix_ids", FieldTy::UIntList),
    ("prompt_format", FieldTy::Str),
    ("voices", FieldTy::Table),
];

/// The voice every talker has.
pub const DEFAULT_VOICE: &str = "default";

/// How a talker writes codec tokens and builds its prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct TalkerSettings {
    /// Vocabulary id of slot 0's code 0.
    pub codec_token_offset: u32,
    /// Codes per codebook.
    pub codebook_size: usize,
    /// Codebook level of each token of a frame, in the order the talker writes them
    /// (Orpheus over SNAC: `[0, 1, 2, 2, 1, 2, 2]`).
    pub frame_layout: Vec<usize>,
    /// Tokens that end the audio.
    pub end_token_ids: Vec<u32>,
    /// Token ids around the tokenized prompt text.
    pub prompt_prefix_ids: Vec<u32>,
    pub prompt_suffix_ids: Vec<u32>,
    /// The prompt text: `{voice}` becomes the voice's conditioning text, `{text}` the text to
    /// speak (empty when the talker is driven by a thinker's hidden states).
    pub prompt_format: String,
    /// Voice name → conditioning text substituted for `{voice}`.
    pub voices: BTreeMap<String, String>,
}

impl TalkerSettings {
    /// Where each of the talker's frame slots goes in the canonical (level-major) layout.
    pub fn canonical_slots(&self) -> Vec<usize> {
        let levels = self.frame_layout.iter().copied().max().map_or(0, |m| m + 1);
        let mut start = vec![0; levels + 1];
        for &l in &self.frame_layout {
            start[l + 1] += 1;
        }
        for l in 0..levels {
            start[l + 1] += start[l];
        }
        let mut seen = vec![0; levels];
        self.frame_layout
            .iter()
            .map(|&l| {
                let slot = start[l] + seen[l];
                seen[l] += 1;
                slot
            })
            .collect()
    }

    /// Codebook level of each canonical slot.
    pub fn canonical_levels(&self) -> Vec<usize> {
        let mut levels = self.frame_layout.clone();
        levels.sort_unstable();
        levels
    }

    /// The voices, comma-separated, for error messages.
    pub fn voice_names(&self) -> String {
        self.voices.keys().cloned().collect::<Vec<_>>().join(", ")
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTalker {
    codec_token_offset: Option<u32>,
    codebook_size: Option<usize>,
    frame_layout: Option<Vec<usize>>,
    end_token_ids: Option<Vec<u32>>,
    prompt_prefix_ids: Option<Vec<u32>>,
    prompt_suffix_ids: Option<Vec<u32>>,
    prompt_format: Option<String>,
    voices: Option<BTreeMap<String, String>>,
}

/// Parses and checks a `[stage.talker]` table.
pub(super) fn parse(
    map: &Map<String, Value>,
    file: &str,
    site: &Site,
) -> Result<TalkerSettings, DeployError> {
    let names: Vec<&str> = TALKER_FIELDS.iter().map(|(n, _)| *n).collect();
    let r: RawTalker = parse_table(map, file, site, "talker.", &names)?;
    let missing = |field: &str| bad(file, site, &format!("talker.{field}"), "is required");
    let s = TalkerSettings {
        codec_token_offset: r
            .codec_token_offset
            .ok_or_else(|| missing("codec_token_offset"))?,
        codebook_size: r.codebook_size.ok_or_else(|| missing("codebook_size"))?,
        frame_layout: r.frame_layout.ok_or_else(|| missing("frame_layout"))?,
        end_token_ids: r.end_token_ids.ok_or_else(|| missing("end_token_ids"))?,
        prompt_prefix_ids: r.prompt_prefix_ids.unwrap_or_default(),
        prompt_suffix_ids: r.prompt_suffix_ids.unwrap_or_default(),
        prompt_format: r.prompt_format.unwrap_or_else(|| "{voice}{text}".into()),
        voices: r
            .voices
            .unwrap_or_else(|| BTreeMap::from([(DEFAULT_VOICE.to_string(), String::new())])),
    };
    let fail = |field: &str, message: &str| Err(bad(file, site, field, message));
    if s.codebook_size == 0 {
        return fail("talker.codebook_size", "must be at least 1");
    }
    if s.frame_layout.is_empty() {
        return fail(
            "talker.frame_layout",
            "must name the level of at least one slot",
        );
    }
    let levels = s.frame_layout.iter().copied().max().unwrap_or(0) + 1;
    if let Some(l) = (0..levels).find(|l| !s.frame_layout.contains(l)) {
        return fail(
            "talker.frame_layout",
            &format!("levels must be 0..{levels} with none skipped; level {l} has no slot"),
        );
    }
    let last = u64::from(s.codec_token_offset) + (s.frame_layout.len() * s.codebook_size) as u64;
    if last > u64::from(u32::MAX) {
        return fail(
            "talker.codec_token_offset",
            "codec tokens would run past the largest token id",
        );
    }
    if s.end_token_ids.is_empty() {
        return fail("talker.end_token_ids", "must list at least one token");
    }
    if !s.voices.contains_key(DEFAULT_VOICE) {
        return fail(
            "talker.voices",
            &format!("must declare the `{DEFAULT_VOICE}` voice"),
        );
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_json(json: &str) -> Result<TalkerSettings, DeployError> {
        let v: Value = serde_json::from_str(json).unwrap();
        parse(
            v.as_object().unwrap(),
            "t.toml",
            &Site::Stage("talker".into()),
        )
    }

    #[test]
    fn orpheus_layout_maps_to_level_major_slots() {
        let s = parse_json(
            r#"{"codec_token_offset": 128266, "codebook_size": 4096,
                "frame_layout": [0, 1, 2, 2, 1, 2, 2], "end_token_ids": [128258],
                "prompt_prefix_ids": [128259], "prompt_suffix_ids": [128009, 128260],
                "prompt_format": "{voice}: {text}",
                "voices": {"default": "tara", "leo": "leo"}}"#,
        )
        .unwrap();
        assert_eq!(s.canonical_slots(), vec![0, 1, 3, 4, 2, 5, 6]);
        assert_eq!(s.canonical_levels(), vec![0, 1, 1, 2, 2, 2, 2]);
        assert_eq!(s.voice_names(), "default, leo");
    }

    #[test]
    fn bad_tables_name_the_field() {
        for (json, field, words) in [
            (
                r#"{"codebook_size": 4, "frame_layout": [0], "end_token_ids": [1]}"#,
                "talker.codec_token_offset",
                "required",
            ),
            (
                r#"{"codec_token_offset": 0, "codebook_size": 4, "frame_layout": [0, 2],
                 "end_token_ids": [1]}"#,
                "talker.frame_layout",
                "level 1",
            ),
            (
                r#"{"codec_token_offset": 0, "codebook_size": 4, "frame_layout": [0],
                 "end_token_ids": []}"#,
                "talker.end_token_ids",
                "at least one",
            ),
            (
                r#"{"codec_token_offset": 0, "codebook_size": 4, "frame_layout": [0],
                 "end_token_ids": [1], "voices": {"x": ""}}"#,
                "talker.voices",
                "default",
            ),
            (
                r#"{"codec_token_offset": 0, "codebook_size": 4, "frame_layout": [0],
                 "end_token_ids": [1], "voice": {}}"#,
                "talker.voice",
                "voices",
            ),
        ] {
            let err = parse_json(json).unwrap_err().to_string();
            assert!(err.contains(field) && err.contains(words), "{json}: {err}");
        }
    }
}
