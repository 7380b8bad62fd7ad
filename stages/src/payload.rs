//! Typed payloads carried on edges between stages.
//!
//! Every payload is cheap to clone: bulk data sits behind an `Arc`, so an in-process handover moves a
//! pointer, never the bytes.

use crate::route::{MotStates, RouteDecision};
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
    /// Conditioning embeddings (text encoder outputs for diffusion).
    Embeddings,
    /// Embeddings of the request's images or audio clips (media encoder outputs), spliced into
    /// an LLM's prompt in place of placeholder tokens.
    MediaEmbeddings,
    /// Diffusion latents.
    Latents,
    /// Decoded RGB image.
    Image,
    /// Audio codec codes.
    Codes,
    /// PCM audio samples.
    Pcm,
    /// A router's decision: which experts run and which is primary.
    Route,
    /// A Mixture-of-Thoughts peer's projected hidden states at one stack boundary.
    MotStates,
}

impl PayloadKind {
    pub const ALL: [PayloadKind; 11] = [
        PayloadKind::Text,
        PayloadKind::Tokens,
        PayloadKind::Hidden,
        PayloadKind::Embeddings,
        PayloadKind::MediaEmbeddings,
        PayloadKind::Latents,
        PayloadKind::Image,
        PayloadKind::Codes,
        PayloadKind::Pcm,
        PayloadKind::Route,
        PayloadKind::MotStates,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PayloadKind::Text => "text",
            PayloadKind::Tokens => "tokens",
            PayloadKind::Hidden => "hidden",
            PayloadKind::Embeddings => "embeddings",
            PayloadKind::MediaEmbeddings => "media_embeddings",
            PayloadKind::Latents => "latents",
            PayloadKind::Image => "image",
            PayloadKind::Codes => "codes",
            PayloadKind::Pcm => "pcm",
            PayloadKind::Route => "route",
            PayloadKind::MotStates => "mot_states",
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

/// A text encoder's output for one prompt: one row per token, plus a pooled vector (empty for
/// encoders without one).
#[derive(Debug, Clone, PartialEq)]
pub struct TextEmbedding {
    pub tokens: HiddenStates,
    pub pooled: Arc<[f32]>,
}

/// What conditions a diffusion request: the prompt's embedding and, when classifier-free guidance
/// is used, the negative (or empty) prompt's.
#[derive(Debug, Clone, PartialEq)]
pub struct Conditioning {
    pub positive: TextEmbedding,
    pub negative: Option<TextEmbedding>,
}

/// An encoder's output for one image or audio clip of the request: one row per placeholder
/// token it fills in the LLM's prompt, already in the LLM's embedding width.
#[derive(Debug, Clone, PartialEq)]
pub struct MediaEmbedding {
    /// Index of the item in the request's `media` list.
    pub media: usize,
    pub rows: HiddenStates,
}

/// `n` latent images of one shape (`n × channels × height × width`, row-major f32), in the
/// denoiser's latent space (before the VAE's scaling is undone).
#[derive(Debug, Clone, PartialEq)]
pub struct Latents {
    pub data: Arc<[f32]>,
    pub n: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

/// `n` decoded RGB images of one size (`n × height × width × 3` bytes, row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct RgbImages {
    pub pixels: Arc<[u8]>,
    pub n: usize,
    pub height: usize,
    pub width: usize,
}

impl RgbImages {
    /// The `i`-th image's pixels (`height × width × 3` bytes).
    pub fn image(&self, i: usize) -> Option<&[u8]> {
        let size = self.height * self.width * 3;
        self.pixels.get(i * size..(i + 1) * size)
    }
}

/// Whole frames of audio codec codes in the codec's canonical frame layout
/// (`frames × codes_per_frame` values; see `engines::audio::codec` for the layout).
#[derive(Debug, Clone, PartialEq)]
pub struct CodecFrames {
    pub codes: Arc<[u32]>,
    pub frames: usize,
    pub codes_per_frame: usize,
}

impl CodecFrames {
    /// Frames from `codes`; `None` when `codes` is not whole frames (or `codes_per_frame` is 0).
    pub fn new(codes: Vec<u32>, codes_per_frame: usize) -> Option<Self> {
        if codes_per_frame == 0 || codes.len() % codes_per_frame != 0 {
            return None;
        }
        Some(Self {
            frames: codes.len() / codes_per_frame,
            codes: codes.into(),
            codes_per_frame,
        })
    }
}

/// Mono PCM audio, f32 in [-1, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct PcmAudio {
    pub samples: Arc<[f32]>,
    pub sample_rate: u32,
}

impl PcmAudio {
    /// Duration in seconds.
    pub fn seconds(&self) -> f64 {
        if self.sample_rate == 0 {
            return 0.0;
        }
        self.samples.len() as f64 / f64::from(self.sample_rate)
    }
}

/// One typed value travelling on an edge (or to the client).
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    Text(Arc<str>),
    Tokens(Arc<[u32]>),
    Hidden(HiddenStates),
    Embeddings(Arc<Conditioning>),
    /// Encoded media items, ordered by their index in the request.
    MediaEmbeddings(Arc<[MediaEmbedding]>),
    Latents(Latents),
    Image(RgbImages),
    Codes(CodecFrames),
    Pcm(PcmAudio),
    Route(Arc<RouteDecision>),
    MotStates(MotStates),
}

impl Payload {
    pub fn kind(&self) -> PayloadKind {
        match self {
            Payload::Text(_) => PayloadKind::Text,
            Payload::Tokens(_) => PayloadKind::Tokens,
            Payload::Hidden(_) => PayloadKind::Hidden,
            Payload::Embeddings(_) => PayloadKind::Embeddings,
            Payload::MediaEmbeddings(_) => PayloadKind::MediaEmbeddings,
            Payload::Latents(_) => PayloadKind::Latents,
            Payload::Image(_) => PayloadKind::Image,
            Payload::Codes(_) => PayloadKind::Codes,
            Payload::Pcm(_) => PayloadKind::Pcm,
            Payload::Route(_) => PayloadKind::Route,
            Payload::MotStates(_) => PayloadKind::MotStates,
        }
    }

    /// How many streaming units the payload holds — what a streamed edge's `chunk` counts:
    /// tokens, hidden rows, codec frames, PCM samples, text bytes, images.
    pub fn units(&self) -> usize {
        match self {
            Payload::Text(t) => t.len(),
            Payload::Tokens(t) => t.len(),
            Payload::Hidden(h) => h.rows,
            Payload::Embeddings(_) => 1,
            Payload::MediaEmbeddings(m) => m.len(),
            Payload::Latents(l) => l.n,
            Payload::Image(i) => i.n,
            Payload::Codes(c) => c.frames,
            Payload::Pcm(p) => p.samples.len(),
            Payload::Route(_) => 1,
            Payload::MotStates(m) => m.states.rows,
        }
    }

    /// Size of the payload's bulk data in bytes (for transfer metrics and budgets).
    pub fn byte_len(&self) -> usize {
        match self {
            Payload::Text(t) => t.len(),
            Payload::Tokens(t) => t.len() * 4,
            Payload::Hidden(h) => h.data.len() * 4,
            Payload::Embeddings(c) => {
                let one = |e: &TextEmbedding| (e.tokens.data.len() + e.pooled.len()) * 4;
                one(&c.positive) + c.negative.as_ref().map_or(0, one)
            }
            Payload::MediaEmbeddings(m) => m.iter().map(|e| e.rows.data.len() * 4).sum(),
            Payload::Latents(l) => l.data.len() * 4,
            Payload::Image(i) => i.pixels.len(),
            Payload::Codes(c) => c.codes.len() * 4,
            Payload::Pcm(p) => p.samples.len() * 4,
            Payload::Route(r) => r.selected.iter().map(String::len).sum(),
            Payload::MotStates(m) => m.states.data.len() * 4,
        }
    }

    /// Joins the streamed pieces of one kind into the whole value a non-streamed edge delivers.
    /// Returns `None` when `parts` is empty or mixes kinds/shapes.
    pub fn concat(parts: &[Payload]) -> Option<Payload> {
        let kind = parts.first()?.kind();
        if parts.iter().any(|p| p.kind() != kind) {
            return None;
        }
        if let [one] = parts {
            return Some(one.clone());
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
            PayloadKind::Latents => {
                let ls: Vec<&Latents> = parts
                    .iter()
                    .filter_map(|p| match p {
                        Payload::Latents(l) => Some(l),
                        _ => None,
                    })
                    .collect();
                let first = ls[0];
                if ls.iter().any(|l| {
                    (l.channels, l.height, l.width) != (first.channels, first.height, first.width)
                }) {
                    return None;
                }
                let data: Vec<f32> = ls.iter().flat_map(|l| l.data.iter().copied()).collect();
                Payload::Latents(Latents {
                    data: data.into(),
                    n: ls.iter().map(|l| l.n).sum(),
                    ..first.clone()
                })
            }
            PayloadKind::Image => {
                let is: Vec<&RgbImages> = parts
                    .iter()
                    .filter_map(|p| match p {
                        Payload::Image(i) => Some(i),
                        _ => None,
                    })
                    .collect();
                let first = is[0];
                if is
                    .iter()
                    .any(|i| (i.height, i.width) != (first.height, first.width))
                {
                    return None;
                }
                let pixels: Vec<u8> = is.iter().flat_map(|i| i.pixels.iter().copied()).collect();
                Payload::Image(RgbImages {
                    pixels: pixels.into(),
                    n: is.iter().map(|i| i.n).sum(),
                    ..first.clone()
                })
            }
            PayloadKind::Codes => {
                let cs: Vec<&CodecFrames> = parts
                    .iter()
                    .filter_map(|p| match p {
                        Payload::Codes(c) => Some(c),
                        _ => None,
                    })
                    .collect();
                let width = cs[0].codes_per_frame;
                if cs.iter().any(|c| c.codes_per_frame != width) {
                    return None;
                }
                let codes: Vec<u32> = cs.iter().flat_map(|c| c.codes.iter().copied()).collect();
                Payload::Codes(CodecFrames::new(codes, width)?)
            }
            PayloadKind::Pcm => {
                let ps: Vec<&PcmAudio> = parts
                    .iter()
                    .filter_map(|p| match p {
                        Payload::Pcm(a) => Some(a),
                        _ => None,
                    })
                    .collect();
                let rate = ps[0].sample_rate;
                if ps.iter().any(|a| a.sample_rate != rate) {
                    return None;
                }
                let samples: Vec<f32> = ps.iter().flat_map(|a| a.samples.iter().copied()).collect();
                Payload::Pcm(PcmAudio {
                    samples: samples.into(),
                    sample_rate: rate,
                })
            }
            PayloadKind::MediaEmbeddings => {
                let mut items: Vec<MediaEmbedding> = parts
                    .iter()
                    .flat_map(|p| match p {
                        Payload::MediaEmbeddings(m) => m.to_vec(),
                        _ => Vec::new(),
                    })
                    .collect();
                items.sort_by_key(|e| e.media);
                Payload::MediaEmbeddings(items.into())
            }
            // One per job (a route) or one per stack boundary (MoT states): never joined.
            PayloadKind::Embeddings | PayloadKind::Route | PayloadKind::MotStates => return None,
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
    fn concat_joins_codec_frames_and_pcm_and_counts_units() {
        let a = Payload::Codes(CodecFrames::new(vec![1, 2, 3, 4], 2).unwrap());
        let b = Payload::Codes(CodecFrames::new(vec![5, 6], 2).unwrap());
        assert_eq!((a.units(), b.units()), (2, 1));
        match Payload::concat(&[a, b]).unwrap() {
            Payload::Codes(c) => {
                assert_eq!(c.frames, 3);
                assert_eq!(&c.codes[..], &[1, 2, 3, 4, 5, 6]);
            }
            other => panic!("expected codes, got {other:?}"),
        }
        assert!(CodecFrames::new(vec![1, 2, 3], 2).is_none());
        let pcm = |s: Vec<f32>, rate| {
            Payload::Pcm(PcmAudio {
                samples: s.into(),
                sample_rate: rate,
            })
        };
        let whole = Payload::concat(&[pcm(vec![0.1], 24_000), pcm(vec![0.2, 0.3], 24_000)]);
        assert_eq!(whole.as_ref().map(Payload::units), Some(3));
        assert!(Payload::concat(&[pcm(vec![0.1], 24_000), pcm(vec![0.2], 16_000)]).is_none());
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
