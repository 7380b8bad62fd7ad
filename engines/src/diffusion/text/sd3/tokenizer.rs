//! SD3's three tokenizers, set up as diffusers calls them (`padding="max_length"`,
//! `truncation=True`): from `tokenizer.json`, or for CLIP from `vocab.json` + `merges.txt` the way
//! Transformers' `CLIPTokenizer` builds it.

use crate::diffusion::{read_json, DiffusionError};
use std::path::Path;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

/// Which tokenizer a folder holds, for the defaults Transformers' classes supply.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Family {
    Clip,
    T5,
}

/// A tokenizer set up as diffusers calls it: `padding="max_length"`, `truncation=True`,
/// special tokens added. `plain` is the same tokenizer without padding or truncation, for counts.
pub(super) struct PromptTokenizer {
    fixed: Tokenizer,
    plain: Tokenizer,
}

impl PromptTokenizer {
    /// Loads `dir/tokenizer.json`, or for CLIP builds it from `vocab.json` + `merges.txt` as
    /// Transformers' `CLIPTokenizer` does (real SD3 repos ship CLIP tokenizers that way).
    pub(super) fn load(dir: &Path, family: Family, length: usize) -> Result<Self, DiffusionError> {
        let json = dir.join("tokenizer.json");
        let mut plain = if json.is_file() {
            Tokenizer::from_file(&json)
                .map_err(|e| DiffusionError::config(&json, format!("cannot load tokenizer: {e}")))?
        } else if family == Family::Clip && dir.join("vocab.json").is_file() {
            clip_bpe(dir)?
        } else {
            let wanted = match family {
                Family::Clip => "tokenizer.json, or vocab.json + merges.txt",
                Family::T5 => "tokenizer.json (a sentencepiece spiece.model alone is not read)",
            };
            return Err(DiffusionError::config(
                dir,
                format!("no tokenizer: expected {wanted}"),
            ));
        };
        // Transformers pads and truncates itself; the file's own settings are not used.
        plain.with_padding(None);
        plain
            .with_truncation(None)
            .map_err(|e| DiffusionError::config(dir, e.to_string()))?;
        let default_pad = match family {
            Family::Clip => "<|endoftext|>",
            Family::T5 => "<pad>",
        };
        let pad_token = special_token(dir, "pad_token")?.unwrap_or_else(|| default_pad.into());
        let pad_id = plain.token_to_id(&pad_token).ok_or_else(|| {
            DiffusionError::config(
                dir,
                format!("pad token {pad_token:?} is not in the vocabulary"),
            )
        })?;
        let left = |key: &str| -> Result<bool, DiffusionError> {
            Ok(config_string(dir, key)?.as_deref() == Some("left"))
        };
        let mut fixed = plain.clone();
        fixed.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(length),
            direction: if left("padding_side")? {
                PaddingDirection::Left
            } else {
                PaddingDirection::Right
            },
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token,
        }));
        fixed
            .with_truncation(Some(TruncationParams {
                direction: if left("truncation_side")? {
                    TruncationDirection::Left
                } else {
                    TruncationDirection::Right
                },
                max_length: length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| DiffusionError::config(dir, e.to_string()))?;
        Ok(Self { fixed, plain })
    }

    /// One past the largest id the tokenizer can produce, added tokens included (not
    /// `get_vocab_size`, which counts distinct strings).
    pub(super) fn id_bound(&self) -> usize {
        self.plain
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&m| m as usize + 1)
    }

    /// The prompt's ids, exactly the fixed length.
    pub(super) fn fixed(&self, prompt: &str) -> Result<Vec<u32>, DiffusionError> {
        let enc = self
            .fixed
            .encode(prompt, true)
            .map_err(|e| DiffusionError::Input(format!("cannot tokenize the prompt: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    pub(super) fn count(&self, prompt: &str) -> Result<usize, DiffusionError> {
        let enc = self
            .plain
            .encode(prompt, true)
            .map_err(|e| DiffusionError::Input(format!("cannot tokenize the prompt: {e}")))?;
        Ok(enc.len())
    }
}

/// Reads `key` from `tokenizer_config.json` as a string, if the file and key exist.
fn config_string(dir: &Path, key: &str) -> Result<Option<String>, DiffusionError> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let json: serde_json::Value = read_json(&path)?;
    Ok(json.get(key).and_then(|v| v.as_str()).map(str::to_string))
}

/// A special token (`pad_token`, `eos_token`, ...) as Transformers resolves it: from
/// `tokenizer_config.json`, else `special_tokens_map.json`; a plain string or `{"content": ..}`.
fn special_token(dir: &Path, key: &str) -> Result<Option<String>, DiffusionError> {
    for file in ["tokenizer_config.json", "special_tokens_map.json"] {
        let path = dir.join(file);
        if !path.is_file() {
            continue;
        }
        let json: serde_json::Value = read_json(&path)?;
        let value = json.get(key);
        let token = value.and_then(|v| v.as_str()).or_else(|| {
            value
                .and_then(|v| v.get("content"))
                .and_then(|v| v.as_str())
        });
        if let Some(token) = token {
            return Ok(Some(token.to_string()));
        }
    }
    Ok(None)
}

/// `model_max_length` of `dir/tokenizer_config.json`, when stated as an integer.
pub(super) fn model_max_length(dir: &Path) -> Result<Option<usize>, DiffusionError> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let json: serde_json::Value = read_json(&path)?;
    Ok(json
        .get("model_max_length")
        .and_then(|v| v.as_u64())
        .and_then(|v| usize::try_from(v).ok()))
}

/// Builds CLIP's byte-level BPE from `vocab.json` + `merges.txt` with the normalizer,
/// pre-tokenizer, special tokens and post-processor Transformers' `CLIPTokenizer` sets up.
fn clip_bpe(dir: &Path) -> Result<Tokenizer, DiffusionError> {
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::models::bpe::BPE;
    use tokenizers::normalizers::replace::ReplacePattern;
    use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSeq, NFC};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::processors::roberta::RobertaProcessing;
    use tokenizers::SplitDelimiterBehavior;

    let err = |e: tokenizers::Error| {
        DiffusionError::config(dir, format!("cannot build the CLIP tokenizer: {e}"))
    };
    let path_str = |name: &str| -> Result<String, DiffusionError> {
        let p = dir.join(name);
        if !p.is_file() {
            return Err(DiffusionError::config(
                &p,
                "missing (CLIP's BPE needs vocab.json and merges.txt)",
            ));
        }
        p.to_str()
            .map(str::to_string)
            .ok_or_else(|| DiffusionError::config(&p, "path is not UTF-8"))
    };
    let special = |key: &str, default: &str| -> Result<String, DiffusionError> {
        Ok(special_token(dir, key)?.unwrap_or_else(|| default.to_string()))
    };
    let bos = special("bos_token", "<|startoftext|>")?;
    let eos = special("eos_token", "<|endoftext|>")?;
    let unk = special("unk_token", "<|endoftext|>")?;
    let pad = special("pad_token", "<|endoftext|>")?;
    let bpe = BPE::from_file(&path_str("vocab.json")?, &path_str("merges.txt")?)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".into())
        .fuse_unk(false)
        .unk_token(unk.clone())
        .build()
        .map_err(err)?;
    let mut tok = Tokenizer::new(bpe);
    let normalizer = NormSeq::new(vec![
        NFC.into(),
        Replace::new(ReplacePattern::Regex(r"\s+".into()), " ")
            .map_err(err)?
            .into(),
        Lowercase.into(),
    ]);
    tok.with_normalizer(Some(normalizer));
    let split = Split::new(
        SplitPattern::Regex(
            r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
                .into(),
        ),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(err)?;
    tok.with_pre_tokenizer(Some(PreSeq::new(vec![
        split.into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    // Transformers registers the special tokens as added tokens, so they are never split (the
    // pad token `!` of SD3's CLIP-G tokenizer included); order as its special-token attributes.
    let specials: Vec<AddedToken> = [&bos, &eos, &unk, &pad]
        .iter()
        .map(|t| AddedToken::from(t.to_string(), true))
        .collect();
    tok.add_special_tokens(&specials);
    let id = |t: &str| {
        tok.token_to_id(t)
            .ok_or_else(|| DiffusionError::config(dir, format!("{t:?} is not in the vocabulary")))
    };
    let post = RobertaProcessing::new((eos.clone(), id(&eos)?), (bos.clone(), id(&bos)?))
        .trim_offsets(false)
        .add_prefix_space(false);
    tok.with_post_processor(Some(post));
    Ok(tok)
}
