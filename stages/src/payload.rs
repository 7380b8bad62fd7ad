//! Typed payloads carried on edges between stages.
//!
//! Every payload is cheap to clone: bulk data sits behind an `Arc`, so an in-process handover moves a
//! pointer, never the bytes.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

/// What an edge carries; the graph validator checks producers and consumers against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum PayloadKind {
    /// UTF-8 text.
    Text,
    /// Token ids of the producing stage's vocabulary.
    Tokens,
    /// Final-layer hidden states, one row per token.
    Hidden,
    /// Conditioning embeddings (encoder outputs).
    Embeddings,
    /// Diffusion latents.
    Latents,
    /// Decoded RGB image.
    Image,
    /// Audio codec codes.
    Codes,
    /// PCM audio samples.
    Pcm,
}

impl PayloadKind {
    pub const ALL: [PayloadKind; 8] = [
        PayloadKind::Text,
        PayloadKind::Tokens,
        PayloadKind::Hidden,
        PayloadKind::Embeddings,
        PayloadKind::Latents,
        PayloadKind::Image,
        PayloadKind::Codes,
        PayloadKind::Pcm,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PayloadKind::Text => "text",
            PayloadKind::Tokens => "tokens",
            PayloadKind::Hidden => "hidden",
            PayloadKind::Embeddings => "embeddings",
            PayloadKind::Latents => "latents",
            PayloadKind::Image => "image",
            PayloadKind::Codes => "codes",
            PayloadKind::Pcm => "pcm",
        }
    }
}

impl fmt::Display for PayloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Rows of f32 activations (`rows × dim`, row-major), e.g. one row per generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct HiddenStates {
    pub data: Arc<[f32]>,
    pub rows: usize,
    pub dim: usize,
}

impl HiddenStates {
    pub fn new(data: Vec<f32>, dim: usize) -> Self {
        let rows = data.len().checked_div(dim).unwrap_or(0);
        Self {
            data: data.into(),
            rows,
            dim,
        }
    }

    /// Concatenates row blocks of the same width (used to gather a non-streamed edge's output).
    pub fn concat(parts: &[HiddenStates]) -> Option<HiddenStates> {
        let dim = parts.first()?.dim;
        if parts.iter().any(|p| p.dim != dim) {
            return None;
        }
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
        for p in parts {
            data.extend_from_slice(&p.data);
        }
        Some(HiddenStates::new(data, dim))
    }
}

/// One typed value travelling on an edge (or to the client).
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    Text(Arc<str>),
    Tokens(Arc<[u32]>),
    Hidden(HiddenStates),
}

impl Payload {
    pub fn kind(&self) -> PayloadKind {
        match self {
            Payload::Text(_) => PayloadKind::Text,
            Payload::Tokens(_) => PayloadKind::Tokens,
            Payload::Hidden(_) => PayloadKind::Hidden,
        }
    }

    /// Size of the payload's bulk data in bytes (for transfer metrics and budgets).
    pub fn byte_len(&self) -> usize {
        match self {
            Payload::Text(t) => t.len(),
            Payload::Tokens(t) => t.len() * 4,
            Payload::Hidden(h) => h.data.len() * 4,
        }
    }

    /// Joins the streamed pieces of one kind into the whole value a non-streamed edge delivers.
    /// Returns `None` when `parts` is empty or mixes kinds/shapes.
    pub fn concat(parts: &[Payload]) -> Option<Payload> {
        let kind = parts.first()?.kind();
        if parts.iter().any(|p| p.kind() != kind) {
            return None;
        }
        Some(match kind {
            PayloadKind::Text => {
                let mut s = String::new();
                for p in parts {
                    if let Payload::Text(t) = p {
                        s.push_str(t);
                    }
                }
                Payload::Text(s.into())
            }
            PayloadKind::Tokens => {
                let mut v = Vec::new();
                for p in parts {
                    if let Payload::Tokens(t) = p {
                        v.extend_from_slice(t);
                    }
                }
                Payload::Tokens(v.into())
            }
            PayloadKind::Hidden => {
                let hs: Vec<HiddenStates> = parts
                    .iter()
                    .filter_map(|p| match p {
                        Payload::Hidden(h) => Some(h.clone()),
                        _ => None,
                    })
                    .collect();
                Payload::Hidden(HiddenStates::concat(&hs)?)
            }
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concat_joins_text_tokens_and_hidden_rows() {
        let t = Payload::concat(&[Payload::Text("ab".into()), Payload::Text("c".into())]).unwrap();
        assert_eq!(t, Payload::Text("abc".into()));
        let k = Payload::concat(&[
            Payload::Tokens(vec![1, 2].into()),
            Payload::Tokens(vec![3].into()),
        ])
        .unwrap();
        assert_eq!(k, Payload::Tokens(vec![1, 2, 3].into()));
        let h = Payload::concat(&[
            Payload::Hidden(HiddenStates::new(vec![1.0, 2.0], 2)),
            Payload::Hidden(HiddenStates::new(vec![3.0, 4.0, 5.0, 6.0], 2)),
        ])
        .unwrap();
        match h {
            Payload::Hidden(h) => {
                assert_eq!(h.rows, 3);
                assert_eq!(&h.data[..], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
            }
            other => panic!("expected hidden, got {other:?}"),
        }
    }

    #[test]
    fn concat_rejects_mixed_kinds_and_widths() {
        assert!(
            Payload::concat(&[Payload::Text("a".into()), Payload::Tokens(vec![1].into())])
                .is_none()
        );
        assert!(Payload::concat(&[
            Payload::Hidden(HiddenStates::new(vec![1.0, 2.0], 2)),
            Payload::Hidden(HiddenStates::new(vec![1.0, 2.0, 3.0], 3)),
        ])
        .is_none());
        assert!(Payload::concat(&[]).is_none());
    }

    #[test]
    fn in_process_clone_shares_the_buffer() {
        let h = HiddenStates::new(vec![0.0; 1024], 16);
        let p = Payload::Hidden(h.clone());
        let q = p.clone();
        match (&p, &q) {
            (Payload::Hidden(a), Payload::Hidden(b)) => assert!(Arc::ptr_eq(&a.data, &b.data)),
            _ => unreachable!(),
        }
    }
}
