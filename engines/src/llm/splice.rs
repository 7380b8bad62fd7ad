//! Splicing encoded media into an LLM's prompt.
//!
//! The chat template writes one placeholder token per image or audio part (`<|IMAGE|>`,
//! `<|AUDIO|>` in Qwen2.5-Omni); the k-th image placeholder stands for the k-th image of the
//! request, and so on for audio. Each placeholder is expanded to as many copies as its item's
//! encoder wrote rows, and the forward takes those rows in place of the copies' embeddings
//! (Hugging Face processors expand before tokenizing; the result is the same token sequence).
//!
//! The placeholder ids come from the checkpoint's `config.json`: `image_token_id` /
//! `image_token_index` and `audio_token_id` / `audio_token_index`, at the top level or under
//! `thinker_config` (Qwen2.5-Omni).

use candle_core::{DType, Device, Tensor};
use omnistage_stages::{EngineError, MediaEmbedding, MediaInput, Modality};
use serde_json::Value;
use std::path::Path;

/// The token ids that stand for media in a prompt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MediaPlaceholders {
    pub image: Option<u32>,
    pub audio: Option<u32>,
}

impl MediaPlaceholders {
    /// Reads the placeholder ids of the checkpoint in `dir` (none when `config.json` names none).
    pub fn load(dir: &Path) -> Result<Self, String> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| format!("{}: invalid JSON: {e}", path.display()))?;
        let find = |keys: &[&str]| -> Option<u32> {
            let roots = [Some(&json), json.get("thinker_config")];
            roots.into_iter().flatten().find_map(|root| {
                keys.iter()
                    .find_map(|k| root.get(*k)?.as_u64())
                    .and_then(|v| u32::try_from(v).ok())
            })
        };
        Ok(Self {
            image: find(&["image_token_id", "image_token_index"]),
            audio: find(&["audio_token_id", "audio_token_index"]),
        })
    }

    /// The placeholder of modality `m`.
    pub fn id(&self, m: Modality) -> Option<u32> {
        match m {
            Modality::Image => self.image,
            Modality::Audio => self.audio,
            Modality::Text => None,
        }
    }

    fn modality_of(&self, token: u32) -> Option<Modality> {
        if self.image == Some(token) {
            Some(Modality::Image)
        } else if self.audio == Some(token) {
            Some(Modality::Audio)
        } else {
            None
        }
    }
}

/// Where one media item's rows go in the expanded prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplicePosition {
    /// First prompt position of the item's run of placeholders.
    pub start: usize,
    /// Rows (placeholder copies).
    pub len: usize,
    /// Index of the item in the request's media.
    pub media: usize,
}

/// Expands each placeholder of `prompt` to `rows[i]` copies, where `i` is the media item it
/// stands for (the k-th placeholder of a modality is the k-th item of that modality in `media`).
/// Errors name the mismatch: more or fewer placeholders than items of a modality.
pub fn expand_placeholders(
    prompt: &[u32],
    placeholders: &MediaPlaceholders,
    media: &[Modality],
    rows: &[usize],
) -> Result<(Vec<u32>, Vec<SplicePosition>), String> {
    let next_of = |m: Modality, seen: &mut usize| -> Option<usize> {
        let idx = media
            .iter()
            .enumerate()
            .filter(|(_, k)| **k == m)
            .nth(*seen)
            .map(|(i, _)| i);
        *seen += 1;
        idx
    };
    let (mut images, mut audios) = (0usize, 0usize);
    let mut tokens = Vec::with_capacity(prompt.len());
    let mut positions = Vec::new();
    for &t in prompt {
        let Some(m) = placeholders.modality_of(t) else {
            tokens.push(t);
            continue;
        };
        let seen = if m == Modality::Image {
            &mut images
        } else {
            &mut audios
        };
        let Some(item) = next_of(m, seen) else {
            let carried = media.iter().filter(|k| **k == m).count();
            return Err(format!(
                "the prompt has more {m} placeholders than the request has {m} parts ({carried}); \
                 is a placeholder token written in the text?"
            ));
        };
        let len = rows.get(item).copied().unwrap_or(0);
        if len == 0 {
            return Err(format!("{m} #{} encoded to no rows", item + 1));
        }
        positions.push(SplicePosition {
            start: tokens.len(),
            len,
            media: item,
        });
        tokens.extend(std::iter::repeat_n(t, len));
    }
    for (m, used) in [(Modality::Image, images), (Modality::Audio, audios)] {
        let carried = media.iter().filter(|k| **k == m).count();
        if used < carried {
            return Err(format!(
                "the request has {carried} {m} part(s) but the chat template placed {used} {m} \
                 placeholder(s); this model's template may not support {m} input"
            ));
        }
    }
    Ok((tokens, positions))
}

/// A media item's rows at their prompt positions, on the model's device.
#[derive(Debug, Clone)]
pub struct SpliceSpan {
    pub start: usize,
    /// `[len, hidden_size]`.
    pub rows: Tensor,
}

/// The job's prompt with media spliced in: expanded tokens, rows by position, and the prefix
/// cache salt (so cached blocks are shared only between prompts with the same media).
pub struct SplicedPrompt {
    pub tokens: Vec<u32>,
    pub spans: Vec<SpliceSpan>,
    pub salt: u64,
}

/// Splices `embedded` (the encoders' outputs) into `prompt` for the request's `media`.
pub fn splice_prompt(
    prompt: Vec<u32>,
    placeholders: &MediaPlaceholders,
    media: &[MediaInput],
    embedded: &[MediaEmbedding],
    hidden_size: usize,
    dtype: DType,
    device: &Device,
) -> Result<SplicedPrompt, EngineError> {
    if media.is_empty() {
        return Ok(SplicedPrompt {
            tokens: prompt,
            spans: Vec::new(),
            salt: 0,
        });
    }
    let kinds: Vec<Modality> = media.iter().map(MediaInput::modality).collect();
    for m in [Modality::Image, Modality::Audio] {
        if kinds.contains(&m) && placeholders.id(m).is_none() {
            return Err(EngineError::InvalidInput(format!(
                "this model has no {m} placeholder token (config.json {m}_token_id), so it \
                 cannot take {m} input"
            )));
        }
    }
    let mut rows = vec![0; media.len()];
    for e in embedded {
        if e.rows.dim != hidden_size {
            return Err(EngineError::InvalidInput(format!(
                "{} #{} was encoded to rows of width {}; this model's embeddings are {hidden_size} wide",
                kinds.get(e.media).copied().unwrap_or(Modality::Image),
                e.media + 1,
                e.rows.dim
            )));
        }
        if let Some(r) = rows.get_mut(e.media) {
            *r = e.rows.rows;
        }
    }
    if let Some(missing) = rows.iter().position(|r| *r == 0) {
        return Err(EngineError::InvalidInput(format!(
            "no embedding arrived for {} #{}",
            kinds[missing],
            missing + 1
        )));
    }
    let (tokens, positions) = expand_placeholders(&prompt, placeholders, &kinds, &rows)
        .map_err(EngineError::InvalidInput)?;
    let compute = |e: candle_core::Error| EngineError::Compute(e.to_string());
    let mut spans = Vec::with_capacity(positions.len());
    let mut salt: u64 = 0x6d65_6469_615f_7361;
    for p in positions {
        let Some(e) = embedded.iter().find(|e| e.media == p.media) else {
            continue;
        };
        let rows = Tensor::from_slice(&e.rows.data, (e.rows.rows, e.rows.dim), device)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(compute)?;
        spans.push(SpliceSpan {
            start: p.start,
            rows,
        });
        // Order-sensitive mix of the items' digests (SHA-256 prefixes) and their positions.
        salt = (salt.rotate_left(17) ^ media[p.media].digest.low_u64())
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ p.start as u64;
    }
    Ok(SplicedPrompt {
        tokens,
        spans,
        salt: salt.max(1),
    })
}

/// The parts of `spans` that fall in prompt positions `from..from + n`, as chunk-relative
/// `(start, rows)` for the forward.
pub fn chunk_splice(
    spans: &[SpliceSpan],
    from: usize,
    n: usize,
) -> candle_core::Result<Vec<(usize, Tensor)>> {
    let mut out = Vec::new();
    for span in spans {
        let len = span.rows.dim(0)?;
        let lo = span.start.max(from);
        let hi = (span.start + len).min(from + n);
        if lo < hi {
            out.push((lo - from, span.rows.narrow(0, lo - span.start, hi - lo)?));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMG: u32 = 90;
    const AUD: u32 = 91;

    fn ph() -> MediaPlaceholders {
        MediaPlaceholders {
            image: Some(IMG),
            audio: Some(AUD),
        }
    }

    #[test]
    fn mixed_prompt_expands_each_placeholder_to_its_items_rows() {
        use Modality::{Audio, Image};
        // text, image #0, text, audio #1, image #2, text
        let prompt = [1, 2, IMG, 3, AUD, IMG, 4];
        let media = [Image, Audio, Image];
        let rows = [3, 2, 1];
        let (tokens, pos) = expand_placeholders(&prompt, &ph(), &media, &rows).unwrap();
        assert_eq!(tokens, vec![1, 2, IMG, IMG, IMG, 3, AUD, AUD, IMG, 4]);
        assert_eq!(
            pos,
            vec![
                SplicePosition {
                    start: 2,
                    len: 3,
                    media: 0
                },
                SplicePosition {
                    start: 6,
                    len: 2,
                    media: 1
                },
                SplicePosition {
                    start: 8,
                    len: 1,
                    media: 2
                },
            ]
        );
    }

    #[test]
    fn audio_before_image_in_the_prompt_follows_request_order_per_modality() {
        use Modality::{Audio, Image};
        // The request lists an image then an audio clip; the template may place them in any
        // order: each placeholder takes the next item of its own modality.
        let prompt = [AUD, 5, IMG];
        let (tokens, pos) = expand_placeholders(&prompt, &ph(), &[Image, Audio], &[1, 2]).unwrap();
        assert_eq!(tokens, vec![AUD, AUD, 5, IMG]);
        assert_eq!(pos[0].media, 1);
        assert_eq!(
            pos[1],
            SplicePosition {
                start: 3,
                len: 1,
                media: 0
            }
        );
    }

    #[test]
    fn placeholder_counts_must_match_the_items() {
        use Modality::Image;
        let err = expand_placeholders(&[IMG, IMG], &ph(), &[Image], &[2]).unwrap_err();
        assert!(err.contains("more image placeholders"), "{err}");
        let err = expand_placeholders(&[1, 2], &ph(), &[Image], &[2]).unwrap_err();
        assert!(err.contains("placed 0 image"), "{err}");
    }

    #[test]
    fn chunks_take_the_overlapping_rows() {
        let rows = Tensor::arange(0f32, 8.0, &Device::Cpu)
            .unwrap()
            .reshape((4, 2))
            .unwrap();
        let spans = [SpliceSpan { start: 3, rows }];
        // Chunk 0..4 holds row 0 at chunk position 3; chunk 4..10 holds rows 1..4 from 0.
        let a = chunk_splice(&spans, 0, 4).unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].0, 3);
        assert_eq!(a[0].1.to_vec2::<f32>().unwrap(), vec![vec![0.0, 1.0]]);
        let b = chunk_splice(&spans, 4, 6).unwrap();
        assert_eq!(b[0].0, 0);
        assert_eq!(b[0].1.dims(), &[3, 2]);
        assert!(chunk_splice(&spans, 7, 3).unwrap().is_empty());
    }
}
