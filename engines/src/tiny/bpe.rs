//! A deterministic byte-level BPE tokenizer in Qwen2's `tokenizer.json` layout.
//!
//! The vocabulary is the 256 byte tokens (GPT-2 byte-to-unicode mapping, id = byte value)
//! followed by merges learned from [`super::corpus::CORPUS`] with ordered tie-breaking, so the
//! same inputs always give the same merges; `tokenizers`' own trainer is not used because its
//! hash-map iteration order is not guaranteed.

use super::TinyError;
use std::collections::{BTreeMap, HashMap};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{
    AddedToken, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer,
    SplitDelimiterBehavior, Tokenizer,
};

/// Qwen2's pre-tokenization regex (GPT-4 style, digits split one by one).
pub(crate) const QWEN2_SPLIT_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `<|endoftext|>`: padding and document separator.
pub const ENDOFTEXT: &str = "<|endoftext|>";
/// `<|im_start|>`: opens a ChatML turn.
pub const IM_START: &str = "<|im_start|>";
/// `<|im_end|>`: closes a ChatML turn (the chat end-of-sequence token).
pub const IM_END: &str = "<|im_end|>";
/// The special tokens, in id order after the BPE vocabulary.
pub const SPECIAL_TOKENS: [&str; 3] = [ENDOFTEXT, IM_START, IM_END];

/// Size of the BPE vocabulary (bytes + merges) before the special tokens.
pub const BPE_VOCAB_SIZE: usize = 509;

/// The tiny tokenizer and the ids of its special tokens.
pub(crate) struct TinyTokenizer {
    pub tokenizer: Tokenizer,
    /// Ids of [`SPECIAL_TOKENS`], same order.
    pub special_ids: [u32; 3],
}

impl TinyTokenizer {
    /// Id of `<|endoftext|>`.
    pub fn endoftext(&self) -> u32 {
        self.special_ids[0]
    }
    /// Id of `<|im_end|>`.
    pub fn im_end(&self) -> u32 {
        self.special_ids[2]
    }
    /// Total vocabulary size, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }
}

/// GPT-2's reversible byte → printable char mapping used by byte-level BPE.
pub(crate) fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(256 + extra).unwrap_or('\u{100}');
            extra += 1;
            c
        };
    }
    table
}

fn tok_err(what: &str, e: impl std::fmt::Display) -> TinyError {
    TinyError::Tokenizer(format!("{what}: {e}"))
}

/// Qwen2's pre-tokenizer: regex split, then byte-level mapping (no prefix space).
fn pre_tokenizer() -> Result<Sequence, TinyError> {
    let split = Split::new(
        SplitPattern::Regex(QWEN2_SPLIT_PATTERN.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| tok_err("split regex", e))?;
    Ok(Sequence::new(vec![
        split.into(),
        ByteLevel::new(false, false, false).into(),
    ]))
}

/// Learns `BPE_VOCAB_SIZE - 256` merges from the corpus. Returns the vocabulary (id order) and
/// the merges (rank order).
fn learn_merges(pre: &Sequence, corpus: &str) -> Result<(Vec<String>, Merges), TinyError> {
    let table = bytes_to_unicode();
    let char_to_byte: HashMap<char, u32> = table
        .iter()
        .enumerate()
        .map(|(b, &c)| (c, b as u32))
        .collect();

    let mut pts = PreTokenizedString::from(corpus);
    pre.pre_tokenize(&mut pts)
        .map_err(|e| tok_err("pre-tokenize corpus", e))?;
    let mut word_counts: BTreeMap<String, u64> = BTreeMap::new();
    for (piece, _, _) in pts.get_splits(OffsetReferential::Original, OffsetType::Byte) {
        *word_counts.entry(piece.to_string()).or_default() += 1;
    }
    let mut words: Vec<(Vec<u32>, u64)> = Vec::with_capacity(word_counts.len());
    for (word, count) in word_counts {
        let ids = word
            .chars()
            .map(|c| {
                char_to_byte
                    .get(&c)
                    .copied()
                    .ok_or_else(|| tok_err("byte-level mapping", c))
            })
            .collect::<Result<Vec<u32>, _>>()?;
        words.push((ids, count));
    }

    let mut vocab: Vec<String> = table.iter().map(|c| c.to_string()).collect();
    let mut ids: HashMap<String, u32> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let mut merges = Vec::new();
    // Each round adds at most one token; bound the rounds in case merges keep re-creating
    // existing tokens.
    for _ in 0..BPE_VOCAB_SIZE * 4 {
        if vocab.len() >= BPE_VOCAB_SIZE {
            break;
        }
        let mut pairs: HashMap<(u32, u32), u64> = HashMap::new();
        for (symbols, count) in &words {
            for w in symbols.windows(2) {
                *pairs.entry((w[0], w[1])).or_default() += count;
            }
        }
        // Highest count; ties go to the smallest pair of ids (iteration order does not matter).
        let Some((&(a, b), _)) = pairs
            .iter()
            .max_by(|(pa, ca), (pb, cb)| ca.cmp(cb).then_with(|| pb.cmp(pa)))
        else {
            break;
        };
        let merged = format!("{}{}", vocab[a as usize], vocab[b as usize]);
        let new_id = match ids.get(&merged) {
            Some(&id) => id,
            None => {
                let id = vocab.len() as u32;
                vocab.push(merged.clone());
                ids.insert(merged, id);
                id
            }
        };
        merges.push((vocab[a as usize].clone(), vocab[b as usize].clone()));
        for (symbols, _) in &mut words {
            let mut i = 0;
            while i + 1 < symbols.len() {
                if symbols[i] == a && symbols[i + 1] == b {
                    symbols[i] = new_id;
                    symbols.remove(i + 1);
                }
                i += 1;
            }
        }
    }
    Ok((vocab, merges))
}

/// Builds the tiny tokenizer: NFC normalizer, Qwen2 pre-tokenizer, byte-level BPE learned from
/// the embedded corpus, byte-level post-processor and decoder, and the ChatML special tokens.
pub(crate) fn build_tiny_tokenizer() -> Result<TinyTokenizer, TinyError> {
    let pre = pre_tokenizer()?;
    let (vocab, merges) = learn_merges(&pre, super::corpus::CORPUS)?;
    let vocab_map: Vocab = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab_map, merges)
        .build()
        .map_err(|e| tok_err("build BPE", e))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_normalizer(Some(NFC));
    tokenizer.with_pre_tokenizer(Some(pre));
    tokenizer.with_post_processor(Some(PostProcessorWrapper::ByteLevel(ByteLevel::new(
        false, false, false,
    ))));
    tokenizer.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::new(
        false, false, false,
    ))));
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    tokenizer.add_special_tokens(&specials);
    let mut special_ids = [0u32; 3];
    for (slot, token) in special_ids.iter_mut().zip(SPECIAL_TOKENS) {
        *slot = tokenizer
            .token_to_id(token)
            .ok_or_else(|| tok_err("special token missing after adding", token))?;
    }
    Ok(TinyTokenizer {
        tokenizer,
        special_ids,
    })
}

/// `tokenizer.json` text (pretty JSON, trailing newline).
pub(crate) fn tokenizer_json(tok: &TinyTokenizer) -> Result<String, TinyError> {
    let mut text = tok
        .tokenizer
        .to_string(true)
        .map_err(|e| tok_err("serialize tokenizer", e))?;
    text.push('\n');
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_bijection() {
        let table = bytes_to_unicode();
        let distinct: std::collections::BTreeSet<char> = table.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'\n' as usize], 'Ċ');
        assert_eq!(table[b'a' as usize], 'a');
    }

    #[test]
    fn vocab_has_expected_size_and_specials() {
        let tok = build_tiny_tokenizer().unwrap();
        assert_eq!(tok.vocab_size(), BPE_VOCAB_SIZE + 3);
        assert_eq!(tok.special_ids, [509, 510, 511]);
        let ids = tok.tokenizer.encode("the station", false).unwrap();
        assert!(
            ids.get_ids().len() < "the station".len(),
            "merges should apply"
        );
    }
}
