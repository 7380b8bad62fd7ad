//! How a talker's vocabulary carries codec codes: which tokens each frame slot may take (as
//! additive logit masks), how a finished frame maps to canonical codec codes, and how the
//! talker's prompt text is filled in.

use candle_core::{Device, Tensor};
use omnistage_stages::deploy::TalkerSettings;
use omnistage_stages::EngineError;

/// A talker's codec-token layout, checked against the model's vocabulary, with one logit mask
/// per frame slot on the model device.
pub(crate) struct CodecLayout {
    settings: TalkerSettings,
    /// Canonical slot of each of the talker's frame slots.
    canonical: Vec<usize>,
    /// Per frame slot: `[vocab]` f32, 0 on the slot's code tokens, -inf elsewhere.
    masks: Vec<Tensor>,
    /// Slot 0's mask with the end tokens allowed too (a frame boundary).
    first_or_end: Tensor,
}

impl CodecLayout {
    /// Checks `settings` against a vocabulary of `vocab` ids and builds the masks.
    pub fn new(settings: TalkerSettings, vocab: usize, device: &Device) -> Result<Self, String> {
        let (cb, slots) = (settings.codebook_size, settings.frame_layout.len());
        if cb == 0 || slots == 0 {
            return Err("codebook_size and frame_layout must be non-empty".into());
        }
        let offset = settings.codec_token_offset as usize;
        let codec_end = slots
            .checked_mul(cb)
            .and_then(|n| n.checked_add(offset))
            .ok_or("codec tokens overflow")?;
        if codec_end > vocab {
            return Err(format!(
                "codec tokens {offset}..{codec_end} ({slots} slots x {cb} codes) run past the \
                 model's vocabulary of {vocab}"
            ));
        }
        if settings.end_token_ids.is_empty() {
            return Err("end_token_ids must list at least one token".into());
        }
        let specials = settings
            .end_token_ids
            .iter()
            .chain(&settings.prompt_prefix_ids)
            .chain(&settings.prompt_suffix_ids);
        for &t in specials {
            if t as usize >= vocab {
                return Err(format!(
                    "token id {t} is outside the model's vocabulary of {vocab}"
                ));
            }
        }
        if let Some(t) = settings
            .end_token_ids
            .iter()
            .find(|t| (offset..codec_end).contains(&(**t as usize)))
        {
            return Err(format!(
                "end token {t} lies among the codec tokens {offset}..{codec_end}"
            ));
        }
        let canonical = settings.canonical_slots();
        let mask = |slot: usize, with_end: bool| -> candle_core::Result<Tensor> {
            let mut m = vec![f32::NEG_INFINITY; vocab];
            let lo = offset + slot * cb;
            m[lo..lo + cb].fill(0.0);
            if with_end {
                for &t in &settings.end_token_ids {
                    m[t as usize] = 0.0;
                }
            }
            Tensor::from_vec(m, vocab, device)
        };
        let build = || -> candle_core::Result<(Vec<Tensor>, Tensor)> {
            let masks = (0..slots)
                .map(|s| mask(s, false))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok((masks, mask(0, true)?))
        };
        let (masks, first_or_end) = build().map_err(|e| format!("codec masks: {e}"))?;
        Ok(Self {
            settings,
            canonical,
            masks,
            first_or_end,
        })
    }

    pub fn settings(&self) -> &TalkerSettings {
        &self.settings
    }

    /// Tokens per frame.
    pub fn frame_len(&self) -> usize {
        self.settings.frame_layout.len()
    }

    /// The logit mask for the next token when `generated` codec tokens were written so far;
    /// end tokens are allowed at frame boundaries when `allow_end`.
    pub fn mask(&self, generated: usize, allow_end: bool) -> &Tensor {
        let slot = generated % self.frame_len();
        if slot == 0 && allow_end {
            &self.first_or_end
        } else {
            &self.masks[slot]
        }
    }

    pub fn is_end(&self, token: u32) -> bool {
        self.settings.end_token_ids.contains(&token)
    }

    /// One finished frame of raw talker tokens (talker slot order) as codes in the canonical
    /// layout.
    pub fn frame_codes(&self, raw: &[u32]) -> Result<Vec<u32>, EngineError> {
        let cb = self.settings.codebook_size;
        let mut codes = vec![0u32; self.frame_len()];
        if raw.len() != codes.len() {
            return Err(EngineError::Compute(format!(
                "a frame of {} tokens, expected {}",
                raw.len(),
                codes.len()
            )));
        }
        for (p, (&token, &slot)) in raw.iter().zip(&self.canonical).enumerate() {
            let lo = self.settings.codec_token_offset as usize + p * cb;
            let code = (token as usize)
                .checked_sub(lo)
                .filter(|c| *c < cb)
                .ok_or_else(|| {
                    EngineError::Compute(format!(
                        "token {token} in frame slot {p} is not one of its codec tokens \
                         {lo}..{}",
                        lo + cb
                    ))
                })?;
            codes[slot] = code as u32;
        }
        Ok(codes)
    }
}

/// Fills `{voice}` and `{text}` in `format` in one pass (substituted text is not scanned again).
pub(crate) fn fill_prompt(format: &str, voice: &str, text: &str) -> String {
    let mut out = String::with_capacity(format.len() + voice.len() + text.len());
    let mut rest = format;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(r) = tail.strip_prefix("{voice}") {
            out.push_str(voice);
            rest = r;
        } else if let Some(r) = tail.strip_prefix("{text}") {
            out.push_str(text);
            rest = r;
        } else {
            out.push('{');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn settings() -> TalkerSettings {
        TalkerSettings {
            codec_token_offset: 10,
            codebook_size: 4,
            frame_layout: vec![0, 1, 2, 2, 1, 2, 2],
            end_token_ids: vec![3],
            prompt_prefix_ids: vec![1],
            prompt_suffix_ids: vec![2],
            prompt_format: "{voice}: {text}".into(),
            voices: BTreeMap::from([("default".into(), "tara".into())]),
        }
    }

    #[test]
    fn frames_reorder_to_canonical_codes() {
        let l = CodecLayout::new(settings(), 38, &Device::Cpu).unwrap();
        // Slot p code c is token 10 + 4p + c; codes 0..7 in talker order.
        let raw: Vec<u32> = (0..7).map(|p| 10 + 4 * p + (p % 4)).collect();
        let codes = l.frame_codes(&raw).unwrap();
        // canonical slots [0, 1, 3, 4, 2, 5, 6]
        assert_eq!(codes, vec![0, 1, 0, 2, 3, 1, 2]);
        assert!(l.frame_codes(&[10, 10, 18, 22, 26, 30, 34]).is_err());
        let m: Vec<f32> = l.mask(7, true).to_vec1().unwrap();
        assert_eq!(m[3], 0.0);
        assert_eq!(m[10..14], [0.0; 4]);
        assert!(m[14].is_infinite());
        let m: Vec<f32> = l.mask(8, true).to_vec1().unwrap();
        assert!(m[3].is_infinite() && m[13].is_infinite());
        assert_eq!(m[14..18], [0.0; 4]);
        assert!(CodecLayout::new(settings(), 37, &Device::Cpu).is_err());
    }

    #[test]
    fn prompt_fills_each_placeholder_once() {
        assert_eq!(fill_prompt("{voice}: {text}", "{text}", "hi"), "{text}: hi");
        assert_eq!(fill_prompt("a{b}{voice}", "v", ""), "a{b}v");
    }
}
