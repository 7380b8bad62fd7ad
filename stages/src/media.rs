//! Images and audio clips a request carries as input, decoded by the gateway and encoded by the
//! graph's media encoder stages.
//!
//! Each item has a content digest (SHA-256 over its decoded content and shape), so identical media
//! sent twice, in any file format, are recognised by encoder caches.

use crate::job::Modality;
use crate::payload::{PcmAudio, RgbImages};
use sha2::{Digest, Sha256};
use std::fmt;
use std::sync::Arc;

/// SHA-256 of an item's decoded content.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MediaDigest(pub [u8; 32]);

impl fmt::Debug for MediaDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("…")
    }
}

impl MediaDigest {
    /// The first eight bytes as a number (a hash-chain salt for prefix caches).
    pub fn low_u64(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[..8]);
        u64::from_le_bytes(b)
    }
}

/// The decoded content of one item.
#[derive(Debug, Clone, PartialEq)]
pub enum MediaData {
    /// One RGB image (`n == 1`).
    Image(RgbImages),
    /// Mono audio at its source sample rate (encoders resample to their own).
    Audio(PcmAudio),
}

/// One image or audio clip of a request, in the order it appears in the prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct MediaInput {
    pub data: MediaData,
    pub digest: MediaDigest,
}

impl MediaInput {
    /// An image from `width × height × 3` RGB bytes; `None` when the sizes disagree or are 0.
    pub fn image(pixels: Vec<u8>, width: usize, height: usize) -> Option<Self> {
        if width == 0 || height == 0 || pixels.len() != width * height * 3 {
            return None;
        }
        let mut h = Sha256::new();
        h.update(b"image");
        h.update((width as u64).to_le_bytes());
        h.update((height as u64).to_le_bytes());
        h.update(&pixels);
        Some(Self {
            data: MediaData::Image(RgbImages {
                pixels: pixels.into(),
                n: 1,
                height,
                width,
            }),
            digest: MediaDigest(h.finalize().into()),
        })
    }

    /// A mono clip of f32 samples; `None` when it is empty or the rate is 0.
    pub fn audio(samples: Vec<f32>, sample_rate: u32) -> Option<Self> {
        if samples.is_empty() || sample_rate == 0 {
            return None;
        }
        let mut h = Sha256::new();
        h.update(b"audio");
        h.update(sample_rate.to_le_bytes());
        // The same bytes as hashing sample by sample, fed a block at a time (a 30 s clip is
        // over a million samples).
        let mut block = Vec::with_capacity(4096 * 4);
        for chunk in samples.chunks(4096) {
            block.clear();
            block.extend(chunk.iter().flat_map(|s| s.to_le_bytes()));
            h.update(&block);
        }
        Some(Self {
            data: MediaData::Audio(PcmAudio {
                samples: Arc::from(samples),
                sample_rate,
            }),
            digest: MediaDigest(h.finalize().into()),
        })
    }

    /// `Image` or `Audio`.
    pub fn modality(&self) -> Modality {
        match self.data {
            MediaData::Image(_) => Modality::Image,
            MediaData::Audio(_) => Modality::Audio,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_follow_content_and_shape() {
        let a = MediaInput::image(vec![1; 12], 2, 2).unwrap();
        let b = MediaInput::image(vec![1; 12], 2, 2).unwrap();
        let c = MediaInput::image(vec![1; 12], 4, 1).unwrap();
        assert_eq!(a.digest, b.digest);
        assert_ne!(a.digest, c.digest);
        assert!(MediaInput::image(vec![1; 11], 2, 2).is_none());
        let s = MediaInput::audio(vec![0.5; 4], 16_000).unwrap();
        let t = MediaInput::audio(vec![0.5; 4], 24_000).unwrap();
        assert_ne!(s.digest, t.digest);
        assert_eq!(s.modality(), Modality::Audio);
        assert!(MediaInput::audio(Vec::new(), 16_000).is_none());
    }
}
