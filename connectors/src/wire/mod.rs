//! The payload wire format: how a [`Payload`] is laid out as bytes when it leaves the process.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! header (16 bytes): magic "OSPW" | version u16 | kind u8 | reserved u8 (0) | body length u64
//! body:              the kind's shape fields (u64 each), then its raw little-endian bulk data
//! ```
//!
//! Bodies per kind (`n` is always an element count, checked against the shape):
//!
//! - text: `len`, UTF-8 bytes
//! - tokens: `n`, `u32 × n`
//! - hidden: `rows, dim, n` (`n == rows × dim`), `f32 × n`
//! - embeddings: positive text embedding, `has_negative u8`, negative text embedding when present;
//!   a text embedding is a hidden block followed by `pooled_n, f32 × pooled_n`
//! - media_embeddings: `count`, then per item `media` and a hidden block
//! - latents: `n, channels, height, width, len` (`len == n × c × h × w`), `f32 × len`
//! - image: `n, height, width, len` (`len == n × h × w × 3`), `u8 × len`
//! - codes: `frames, codes_per_frame, n` (`n == frames × codes_per_frame`), `u32 × n`
//! - pcm: `sample_rate u32, n`, `f32 × n`
//! - route: `selected` (a string list), then `count` and per score a string and an `f32`, then
//!   `reason` (a string); a string is `len`, UTF-8 bytes
//! - mot_states: `stack, expert`, a hidden block
//!
//! Decoding validates every length, shape, the UTF-8 of text, the kind and the header, and returns
//! a [`WireError`]; it never panics and never allocates more than the buffer could hold.

use omnistage_stages::payload::{
    CodecFrames, Conditioning, HiddenStates, Latents, MediaEmbedding, PcmAudio, RgbImages,
    TextEmbedding,
};
use omnistage_stages::{MotStates, Payload, PayloadKind, RouteDecision};
use std::sync::Arc;

/// First four bytes of every encoded payload.
pub const MAGIC: [u8; 4] = *b"OSPW";
/// The format version this build writes and reads.
pub const VERSION: u16 = 1;
/// Size of the fixed header in bytes.
pub const HEADER_LEN: usize = 16;

/// Why bytes could not be decoded (or a payload could not be encoded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("not an omnistage payload (bad magic bytes)")]
    BadMagic,
    #[error("payload wire format version {0} is not supported (this build reads {VERSION})")]
    UnsupportedVersion(u16),
    #[error("unknown payload kind tag {0}")]
    UnknownKind(u8),
    #[error("reserved header byte is {0}, expected 0")]
    Reserved(u8),
    #[error("buffer truncated: needed {needed} more bytes, {available} left")]
    Truncated { needed: u64, available: usize },
    #[error("header declares a {declared}-byte body but {actual} bytes follow it")]
    BodyLength { declared: u64, actual: usize },
    #[error("{0} bytes left over after the payload")]
    TrailingBytes(usize),
    #[error("{kind} shape {shape} does not match its {len} elements")]
    Shape {
        kind: PayloadKind,
        shape: String,
        len: u64,
    },
    #[error("a size field overflows ({0})")]
    Overflow(&'static str),
    #[error("text is not valid UTF-8")]
    InvalidUtf8,
    #[error("invalid flag byte {0} (expected 0 or 1)")]
    BadFlag(u8),
    #[error("output buffer too small: {needed} bytes needed, {available} given")]
    BufferTooSmall { needed: usize, available: usize },
}

fn tag(kind: PayloadKind) -> u8 {
    match kind {
        PayloadKind::Text => 1,
        PayloadKind::Tokens => 2,
        PayloadKind::Hidden => 3,
        PayloadKind::Embeddings => 4,
        PayloadKind::MediaEmbeddings => 5,
        PayloadKind::Latents => 6,
        PayloadKind::Image => 7,
        PayloadKind::Codes => 8,
        PayloadKind::Pcm => 9,
        PayloadKind::Route => 10,
        PayloadKind::MotStates => 11,
    }
}

fn kind_of(tag: u8) -> Result<PayloadKind, WireError> {
    PayloadKind::ALL
        .into_iter()
        .find(|k| self::tag(*k) == tag)
        .ok_or(WireError::UnknownKind(tag))
}

fn shape_err(kind: PayloadKind, shape: &[usize], len: usize) -> WireError {
    WireError::Shape {
        kind,
        shape: format!("{shape:?}"),
        len: len as u64,
    }
}

fn product(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |acc, d| acc.checked_mul(*d))
}

/// Checks that `len == product(shape)` (encode side: refuses inconsistent structs).
fn check_shape(kind: PayloadKind, shape: &[usize], len: usize) -> Result<(), WireError> {
    match product(shape) {
        Some(p) if p == len => Ok(()),
        _ => Err(shape_err(kind, shape, len)),
    }
}

fn hidden_len(h: &HiddenStates) -> usize {
    24 + h.data.len() * 4
}

fn text_embedding_len(e: &TextEmbedding) -> usize {
    hidden_len(&e.tokens) + 8 + e.pooled.len() * 4
}

/// Exact number of bytes [`encode_into`] writes for `payload` (header included).
pub fn encoded_len(payload: &Payload) -> usize {
    HEADER_LEN
        + match payload {
            Payload::Text(t) => 8 + t.len(),
            Payload::Tokens(t) => 8 + t.len() * 4,
            Payload::Hidden(h) => hidden_len(h),
            Payload::Embeddings(c) => {
                text_embedding_len(&c.positive)
                    + 1
                    + c.negative.as_ref().map_or(0, text_embedding_len)
            }
            Payload::MediaEmbeddings(m) => {
                8 + m.iter().map(|e| 8 + hidden_len(&e.rows)).sum::<usize>()
            }
            Payload::Latents(l) => 40 + l.data.len() * 4,
            Payload::Image(i) => 32 + i.pixels.len(),
            Payload::Codes(c) => 24 + c.codes.len() * 4,
            Payload::Pcm(p) => 12 + p.samples.len() * 4,
            Payload::Route(r) => {
                8 + r.selected.iter().map(|s| 8 + s.len()).sum::<usize>()
                    + 8
                    + r.scores.iter().map(|(s, _)| 12 + s.len()).sum::<usize>()
                    + 8
                    + r.reason.len()
            }
            Payload::MotStates(m) => 16 + hidden_len(&m.states),
        }
}

/// Encodes `payload` into a new buffer.
pub fn encode(payload: &Payload) -> Result<Vec<u8>, WireError> {
    let mut buf = vec![0u8; encoded_len(payload)];
    let n = encode_into(payload, &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

/// Encodes `payload` into the front of `out` (e.g. straight into a shared-memory slot) and returns
/// the number of bytes written ([`encoded_len`]). Fails when `out` is too small or the payload's
/// shape fields disagree with its data.
pub fn encode_into(payload: &Payload, out: &mut [u8]) -> Result<usize, WireError> {
    let needed = encoded_len(payload);
    if out.len() < needed {
        return Err(WireError::BufferTooSmall {
            needed,
            available: out.len(),
        });
    }
    let mut w = Writer {
        buf: &mut out[..needed],
        pos: 0,
    };
    w.bytes(&MAGIC);
    w.bytes(&VERSION.to_le_bytes());
    w.bytes(&[tag(payload.kind()), 0]);
    w.u64((needed - HEADER_LEN) as u64);
    match payload {
        Payload::Text(t) => {
            w.u64(t.len() as u64);
            w.bytes(t.as_bytes());
        }
        Payload::Tokens(t) => {
            w.u64(t.len() as u64);
            w.u32s(t);
        }
        Payload::Hidden(h) => w.hidden(PayloadKind::Hidden, h)?,
        Payload::Embeddings(c) => {
            w.text_embedding(&c.positive)?;
            w.bytes(&[u8::from(c.negative.is_some())]);
            if let Some(neg) = &c.negative {
                w.text_embedding(neg)?;
            }
        }
        Payload::MediaEmbeddings(m) => {
            w.u64(m.len() as u64);
            for e in m.iter() {
                w.u64(e.media as u64);
                w.hidden(PayloadKind::MediaEmbeddings, &e.rows)?;
            }
        }
        Payload::Latents(l) => {
            let shape = [l.n, l.channels, l.height, l.width];
            check_shape(PayloadKind::Latents, &shape, l.data.len())?;
            for d in shape {
                w.u64(d as u64);
            }
            w.u64(l.data.len() as u64);
            w.f32s(&l.data);
        }
        Payload::Image(i) => {
            let shape = [i.n, i.height, i.width, 3];
            check_shape(PayloadKind::Image, &shape, i.pixels.len())?;
            for d in &shape[..3] {
                w.u64(*d as u64);
            }
            w.u64(i.pixels.len() as u64);
            w.bytes(&i.pixels);
        }
        Payload::Codes(c) => {
            let shape = [c.frames, c.codes_per_frame];
            check_shape(PayloadKind::Codes, &shape, c.codes.len())?;
            w.u64(c.frames as u64);
            w.u64(c.codes_per_frame as u64);
            w.u64(c.codes.len() as u64);
            w.u32s(&c.codes);
        }
        Payload::Pcm(p) => {
            w.bytes(&p.sample_rate.to_le_bytes());
            w.u64(p.samples.len() as u64);
            w.f32s(&p.samples);
        }
        Payload::Route(r) => {
            w.u64(r.selected.len() as u64);
            r.selected.iter().for_each(|s| w.str(s));
            w.u64(r.scores.len() as u64);
            for (s, score) in &r.scores {
                w.str(s);
                w.f32s(&[*score]);
            }
            w.str(&r.reason);
        }
        Payload::MotStates(m) => {
            w.u64(m.stack as u64);
            w.u64(m.expert as u64);
            w.hidden(PayloadKind::MotStates, &m.states)?;
        }
    }
    debug_assert_eq!(w.pos, needed);
    Ok(needed)
}

/// Writes into a buffer sized by [`encoded_len`]; every write fits by construction.
struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl Writer<'_> {
    fn bytes(&mut self, b: &[u8]) {
        self.buf[self.pos..self.pos + b.len()].copy_from_slice(b);
        self.pos += b.len();
    }

    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }

    fn f32s(&mut self, v: &[f32]) {
        let dst = &mut self.buf[self.pos..self.pos + v.len() * 4];
        for (d, s) in dst.chunks_exact_mut(4).zip(v) {
            d.copy_from_slice(&s.to_le_bytes());
        }
        self.pos += v.len() * 4;
    }

    fn str(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.bytes(s.as_bytes());
    }

    fn u32s(&mut self, v: &[u32]) {
        let dst = &mut self.buf[self.pos..self.pos + v.len() * 4];
        for (d, s) in dst.chunks_exact_mut(4).zip(v) {
            d.copy_from_slice(&s.to_le_bytes());
        }
        self.pos += v.len() * 4;
    }

    fn hidden(&mut self, kind: PayloadKind, h: &HiddenStates) -> Result<(), WireError> {
        check_shape(kind, &[h.rows, h.dim], h.data.len())?;
        self.u64(h.rows as u64);
        self.u64(h.dim as u64);
        self.u64(h.data.len() as u64);
        self.f32s(&h.data);
        Ok(())
    }

    fn text_embedding(&mut self, e: &TextEmbedding) -> Result<(), WireError> {
        self.hidden(PayloadKind::Embeddings, &e.tokens)?;
        self.u64(e.pooled.len() as u64);
        self.f32s(&e.pooled);
        Ok(())
    }
}

/// Reads the kind named in an encoded payload's header without decoding the body.
pub fn peek_kind(buf: &[u8]) -> Result<PayloadKind, WireError> {
    let (kind, _) = header(buf)?;
    Ok(kind)
}

/// Validates the header; returns the kind and the body.
fn header(buf: &[u8]) -> Result<(PayloadKind, &[u8]), WireError> {
    let mut r = Reader { buf, pos: 0 };
    let head = r.take(HEADER_LEN)?;
    if head[0..4] != MAGIC {
        return Err(WireError::BadMagic);
    }
    let version = u16::from_le_bytes([head[4], head[5]]);
    if version != VERSION {
        return Err(WireError::UnsupportedVersion(version));
    }
    let kind = kind_of(head[6])?;
    if head[7] != 0 {
        return Err(WireError::Reserved(head[7]));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&head[8..16]);
    let declared = u64::from_le_bytes(len);
    let body = &buf[HEADER_LEN..];
    if declared != body.len() as u64 {
        return Err(WireError::BodyLength {
            declared,
            actual: body.len(),
        });
    }
    Ok((kind, body))
}

/// Decodes one payload; `buf` must hold exactly one encoded payload.
pub fn decode(buf: &[u8]) -> Result<Payload, WireError> {
    let (kind, body) = header(buf)?;
    let mut r = Reader { buf: body, pos: 0 };
    let payload = match kind {
        PayloadKind::Text => {
            let n = r.count(1)?;
            let bytes = r.take(n)?;
            let s = std::str::from_utf8(bytes).map_err(|_| WireError::InvalidUtf8)?;
            Payload::Text(Arc::from(s))
        }
        PayloadKind::Tokens => {
            let n = r.count(4)?;
            Payload::Tokens(r.u32s(n)?)
        }
        PayloadKind::Hidden => Payload::Hidden(r.hidden(kind)?),
        PayloadKind::Embeddings => {
            let positive = r.text_embedding()?;
            let negative = match r.take(1)?[0] {
                0 => None,
                1 => Some(r.text_embedding()?),
                other => return Err(WireError::BadFlag(other)),
            };
            Payload::Embeddings(Arc::new(Conditioning { positive, negative }))
        }
        PayloadKind::MediaEmbeddings => {
            // Each item needs at least 32 bytes, so `count` is bounded by what is left.
            let count = r.count(32)?;
            let mut items = Vec::with_capacity(count);
            for _ in 0..count {
                let media = r.usize()?;
                let rows = r.hidden(kind)?;
                items.push(MediaEmbedding { media, rows });
            }
            Payload::MediaEmbeddings(items.into())
        }
        PayloadKind::Latents => {
            let shape = [r.usize()?, r.usize()?, r.usize()?, r.usize()?];
            let len = r.count(4)?;
            r.check(kind, &shape, len)?;
            Payload::Latents(Latents {
                data: r.f32s(len)?,
                n: shape[0],
                channels: shape[1],
                height: shape[2],
                width: shape[3],
            })
        }
        PayloadKind::Image => {
            let (n, height, width) = (r.usize()?, r.usize()?, r.usize()?);
            let len = r.count(1)?;
            r.check(kind, &[n, height, width, 3], len)?;
            Payload::Image(RgbImages {
                pixels: Arc::from(r.take(len)?),
                n,
                height,
                width,
            })
        }
        PayloadKind::Codes => {
            let (frames, codes_per_frame) = (r.usize()?, r.usize()?);
            let len = r.count(4)?;
            r.check(kind, &[frames, codes_per_frame], len)?;
            Payload::Codes(CodecFrames {
                codes: r.u32s(len)?,
                frames,
                codes_per_frame,
            })
        }
        PayloadKind::Pcm => {
            let b = r.take(4)?;
            let sample_rate = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            let n = r.count(4)?;
            Payload::Pcm(PcmAudio {
                samples: r.f32s(n)?,
                sample_rate,
            })
        }
        PayloadKind::Route => {
            // Every string takes at least its 8-byte length; every score 12 bytes.
            let n = r.count(8)?;
            let selected = (0..n).map(|_| r.string()).collect::<Result<_, _>>()?;
            let n = r.count(12)?;
            let mut scores = Vec::with_capacity(n);
            for _ in 0..n {
                let name = r.string()?;
                let b = r.take(4)?;
                scores.push((name, f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
            }
            let reason = r.string()?;
            Payload::Route(Arc::new(RouteDecision {
                selected,
                scores,
                reason,
            }))
        }
        PayloadKind::MotStates => {
            let (stack, expert) = (r.usize()?, r.usize()?);
            Payload::MotStates(MotStates {
                stack,
                expert,
                states: r.hidden(kind)?,
            })
        }
    };
    let left = body.len() - r.pos;
    if left != 0 {
        return Err(WireError::TrailingBytes(left));
    }
    Ok(payload)
}

/// Bounds-checked cursor over untrusted bytes.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let available = self.remaining();
        if n > available {
            return Err(WireError::Truncated {
                needed: n as u64,
                available,
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn string(&mut self) -> Result<String, WireError> {
        let n = self.count(1)?;
        let bytes = self.take(n)?;
        std::str::from_utf8(bytes)
            .map(str::to_string)
            .map_err(|_| WireError::InvalidUtf8)
    }

    fn usize(&mut self) -> Result<usize, WireError> {
        usize::try_from(self.u64()?).map_err(|_| WireError::Overflow("value exceeds usize"))
    }

    /// An element count whose elements of `elem` bytes each must fit in what is left.
    fn count(&mut self, elem: usize) -> Result<usize, WireError> {
        let n = self.u64()?;
        let available = self.remaining();
        let bytes = n
            .checked_mul(elem as u64)
            .ok_or(WireError::Overflow("count"))?;
        if bytes > available as u64 {
            return Err(WireError::Truncated {
                needed: bytes,
                available,
            });
        }
        // Fits in the buffer, hence in usize.
        Ok(n as usize)
    }

    fn check(&self, kind: PayloadKind, shape: &[usize], len: usize) -> Result<(), WireError> {
        match product(shape) {
            Some(p) if p == len => Ok(()),
            _ => Err(shape_err(kind, shape, len)),
        }
    }

    fn f32s(&mut self, n: usize) -> Result<Arc<[f32]>, WireError> {
        let bytes = n.checked_mul(4).ok_or(WireError::Overflow("f32 count"))?;
        Ok(words_into_arc(self.take(bytes)?, f32::from_le_bytes))
    }

    fn u32s(&mut self, n: usize) -> Result<Arc<[u32]>, WireError> {
        let bytes = n.checked_mul(4).ok_or(WireError::Overflow("u32 count"))?;
        Ok(words_into_arc(self.take(bytes)?, u32::from_le_bytes))
    }

    fn hidden(&mut self, kind: PayloadKind) -> Result<HiddenStates, WireError> {
        let (rows, dim) = (self.usize()?, self.usize()?);
        let n = self.count(4)?;
        self.check(kind, &[rows, dim], n)?;
        Ok(HiddenStates {
            data: self.f32s(n)?,
            rows,
            dim,
        })
    }

    fn text_embedding(&mut self) -> Result<TextEmbedding, WireError> {
        let tokens = self.hidden(PayloadKind::Embeddings)?;
        let n = self.count(4)?;
        Ok(TextEmbedding {
            tokens,
            pooled: self.f32s(n)?,
        })
    }
}

/// Decodes little-endian 4-byte words straight into a shared slice: one pass, one allocation
/// (collecting into `Arc<[T]>` would fill a `Vec` first and copy it).
fn words_into_arc<T>(b: &[u8], word: impl Fn([u8; 4]) -> T) -> Arc<[T]> {
    let n = b.len() / 4;
    let mut out = Arc::<[T]>::new_uninit_slice(n);
    let Some(slots) = Arc::get_mut(&mut out) else {
        // Unreachable (a fresh Arc has one owner); the slow path keeps it sound regardless.
        return b
            .chunks_exact(4)
            .map(|c| word([c[0], c[1], c[2], c[3]]))
            .collect();
    };
    for (slot, c) in slots.iter_mut().zip(b.chunks_exact(4)) {
        slot.write(word([c[0], c[1], c[2], c[3]]));
    }
    // SAFETY: `slots` are all `n` elements of `out`, and `b` holds at least `4·n` bytes, so the
    // loop wrote every one of them.
    unsafe { out.assume_init() }
}

#[cfg(test)]
mod tests;
