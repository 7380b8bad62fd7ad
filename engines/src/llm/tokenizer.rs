//! Text tokenization for LLM stages: a checkpoint's `tokenizer.json` (Hugging Face `tokenizers`
//! format) and an incremental detokenizer for streaming output.

use std::path::{Path, PathBuf};

/// File name of a Hugging Face fast tokenizer inside a checkpoint directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Errors from loading or running a tokenizer. Every variant names the tokenizer file.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The checkpoint has no `tokenizer.json`.
    #[error("{}: tokenizer file not found", path.display())]
    NotFound {
        /// The path that was looked for.
        path: PathBuf,
    },
    /// The file exists but could not be read or parsed.
    #[error("{}: cannot load tokenizer: {source}", path.display())]
    Load {
        /// The tokenizer file.
        path: PathBuf,
        /// What the `tokenizers` crate reported.
        #[source]
        source: tokenizers::Error,
    },
    /// Encoding text failed.
    #[error("{}: cannot encode text: {source}", path.display())]
    Encode {
        /// The tokenizer file.
        path: PathBuf,
        /// What the `tokenizers` crate reported.
        #[source]
        source: tokenizers::Error,
    },
    /// Decoding token ids failed.
    #[error("{}: cannot decode token ids: {source}", path.display())]
    Decode {
        /// The tokenizer file.
        path: PathBuf,
        /// What the `tokenizers` crate reported.
        #[source]
        source: tokenizers::Error,
    },
}

/// A checkpoint's text tokenizer (`tokenizer.json`).
///
/// Cheap to share behind an `Arc`; all methods take `&self`.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl TextTokenizer {
    /// Loads `dir/tokenizer.json`.
    pub fn load(dir: &Path) -> Result<Self, TokenizerError> {
        Self::from_file(&dir.join(TOKENIZER_FILE))
    }

    /// Loads a `tokenizer.json` file at an explicit path.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        if !path.is_file() {
            return Err(TokenizerError::NotFound {
                path: path.to_path_buf(),
            });
        }
        let inner =
            tokenizers::Tokenizer::from_file(path).map_err(|source| TokenizerError::Load {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            inner,
            path: path.to_path_buf(),
        })
    }

    /// Wraps an already built tokenizer; `path` is only used in error messages.
    pub fn from_tokenizer(inner: tokenizers::Tokenizer, path: PathBuf) -> Self {
        Self { inner, path }
    }

    /// The file this tokenizer was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The wrapped `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Encodes `text` to token ids. `add_special_tokens` applies the tokenizer's post-processor
    /// (e.g. Llama 3 prepends `<|begin_of_text|>`); pass `false` for text rendered by a chat
    /// template, which already contains its special tokens as text.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|source| TokenizerError::Encode {
                path: self.path.clone(),
                source,
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes token ids to text; `skip_special` drops special added tokens (`<|im_end|>`, ...).
    /// Ids outside the vocabulary are ignored.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|source| TokenizerError::Decode {
                path: self.path.clone(),
                source,
            })
    }

    /// The id of a token (regular or added), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id, if the vocabulary has it.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Incremental detokenizer for one sequence, for streaming text as tokens are generated.
///
/// Uses the prefix-offset method: each step decodes a small window of recent tokens twice (with
/// and without the new token) and emits the difference, holding text back while it ends in an
/// incomplete UTF-8 character (byte-level BPE splits multi-byte characters across tokens). Special
/// tokens are skipped. The concatenation of every [`push`](Self::push) output followed by
/// [`flush`](Self::flush) equals `decode(all tokens, true)`.
#[derive(Debug, Clone, Default)]
pub struct StreamDecoder {
    /// The decoding window: tokens already emitted as text (`..read_offset`, kept as context so
    /// the decoder sees word boundaries) followed by tokens not yet emitted.
    tokens: Vec<u32>,
    /// End of the already emitted part of `tokens`.
    read_offset: usize,
}

impl StreamDecoder {
    /// A decoder for a new sequence.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a generated token; returns the text it completes, if any.
    pub fn push(
        &mut self,
        tok: &TextTokenizer,
        token: u32,
    ) -> Result<Option<String>, TokenizerError> {
        self.tokens.push(token);
        let prefix = tok.decode(&self.tokens[..self.read_offset], true)?;
        let full = tok.decode(&self.tokens, true)?;
        if full.len() <= prefix.len() || full.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(None);
        }
        let new_text = suffix_after(&full, &prefix);
        // Drop tokens before the new window so memory stays bounded on long generations.
        self.tokens.drain(..self.read_offset);
        self.read_offset = self.tokens.len();
        Ok(if new_text.is_empty() {
            None
        } else {
            Some(new_text.to_string())
        })
    }

    /// Returns the text still held back, if any (an incomplete trailing character decodes to
    /// U+FFFD, as in `decode`), and resets the decoder for reuse.
    pub fn flush(&mut self, tok: &TextTokenizer) -> Result<Option<String>, TokenizerError> {
        let prefix = tok.decode(&self.tokens[..self.read_offset], true)?;
        let full = tok.decode(&self.tokens, true)?;
        *self = Self::default();
        let rest = suffix_after(&full, &prefix);
        Ok((!rest.is_empty()).then(|| rest.to_string()))
    }
}

/// The part of `full` after `prefix`. When `full` does not start with `prefix` (a decoder that
/// rewrites earlier text), falls back to the longest common prefix, on a char boundary.
fn suffix_after<'a>(full: &'a str, prefix: &str) -> &'a str {
    if let Some(rest) = full.strip_prefix(prefix) {
        return rest;
    }
    let common = full
        .char_indices()
        .zip(prefix.chars())
        .take_while(|((_, a), b)| a == b)
        .last()
        .map_or(0, |((i, c), _)| i + c.len_utf8());
    &full[common..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffix_after_handles_mismatch() {
        assert_eq!(suffix_after("hello world", "hello"), " world");
        assert_eq!(suffix_after("héllo", "hé"), "llo");
        assert_eq!(suffix_after("héllo", "hx"), "éllo");
        assert_eq!(suffix_after("abc", ""), "abc");
        assert_eq!(suffix_after("ab", "abc"), "");
    }

    #[test]
    fn missing_file_is_typed_error() {
        let err = TextTokenizer::load(Path::new("/nonexistent/ckpt")).unwrap_err();
        assert!(matches!(err, TokenizerError::NotFound { .. }));
        assert!(err.to_string().contains("/nonexistent/ckpt/tokenizer.json"));
    }
}
