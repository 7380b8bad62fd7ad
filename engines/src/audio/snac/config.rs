//! SNAC's `config.json`, validated against what our decoder implements, and the facts derived
//! from it: the frame layout of codes and the decoder's receptive field.

use crate::audio::codec::{CodecError, CodecInfo};
use serde::Deserialize;
use std::path::Path;

/// Most codebook levels accepted (real SNAC models have 3 or 4).
const MAX_LEVELS: usize = 8;
/// Most decoder blocks accepted (real SNAC models have 4).
const MAX_RATES: usize = 8;
/// Largest stride or rate accepted; bounds every product below far from overflow.
const MAX_FACTOR: usize = 64;

/// Absent fields take the defaults of the Python `SNAC.__init__` (the 44.1 kHz model), as
/// `SNAC.from_config` does.
mod defaults {
    pub fn sampling_rate() -> usize {
        44100
    }
    pub fn encoder_dim() -> usize {
        64
    }
    pub fn encoder_rates() -> Vec<usize> {
        vec![3, 3, 7, 7]
    }
    pub fn decoder_dim() -> usize {
        1536
    }
    pub fn decoder_rates() -> Vec<usize> {
        vec![7, 7, 3, 3]
    }
    pub fn attn_window_size() -> Option<usize> {
        Some(32)
    }
    pub fn codebook_size() -> usize {
        4096
    }
    pub fn codebook_dim() -> usize {
        8
    }
    pub fn vq_strides() -> Vec<usize> {
        vec![8, 4, 2, 1]
    }
    pub fn yes() -> bool {
        true
    }
}

/// A SNAC `config.json` (hubertsiuzdak/snac). The 24 kHz model (Orpheus' codec) is
/// `{"sampling_rate": 24000, "encoder_dim": 48, "encoder_rates": [2, 4, 8, 8],
/// "decoder_dim": 1024, "decoder_rates": [8, 8, 4, 2], "attn_window_size": null,
/// "codebook_size": 4096, "codebook_dim": 8, "vq_strides": [4, 2, 1], "noise": true,
/// "depthwise": true}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SnacConfig {
    /// Output sample rate in Hz.
    #[serde(default = "defaults::sampling_rate")]
    pub sampling_rate: usize,
    /// Encoder base width; with `encoder_rates` it fixes the latent width.
    #[serde(default = "defaults::encoder_dim")]
    pub encoder_dim: usize,
    /// Encoder downsampling rates (only their count matters to the decoder).
    #[serde(default = "defaults::encoder_rates")]
    pub encoder_rates: Vec<usize>,
    /// Latent width; `None` means `encoder_dim × 2^len(encoder_rates)`.
    #[serde(default)]
    pub latent_dim: Option<usize>,
    /// Width of the decoder after its input convolution; halved by every block.
    #[serde(default = "defaults::decoder_dim")]
    pub decoder_dim: usize,
    /// Upsampling factor of each decoder block; their product is the hop length.
    #[serde(default = "defaults::decoder_rates")]
    pub decoder_rates: Vec<usize>,
    /// Local attention window; must be `null` here (see [`SnacConfig::validate`]).
    #[serde(default = "defaults::attn_window_size")]
    pub attn_window_size: Option<usize>,
    /// Entries per codebook.
    #[serde(default = "defaults::codebook_size")]
    pub codebook_size: usize,
    /// Width of a codebook entry.
    #[serde(default = "defaults::codebook_dim")]
    pub codebook_dim: usize,
    /// Latent steps per code of each level, coarsest first.
    #[serde(default = "defaults::vq_strides")]
    pub vq_strides: Vec<usize>,
    /// Whether the decoder blocks inject noise.
    #[serde(default = "defaults::yes")]
    pub noise: bool,
    /// Depthwise input and residual convolutions.
    #[serde(default = "defaults::yes")]
    pub depthwise: bool,
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl SnacConfig {
    /// The 24 kHz model's config (`hubertsiuzdak/snac_24khz`).
    pub fn snac_24khz() -> Self {
        Self {
            sampling_rate: 24000,
            encoder_dim: 48,
            encoder_rates: vec![2, 4, 8, 8],
            latent_dim: None,
            decoder_dim: 1024,
            decoder_rates: vec![8, 8, 4, 2],
            attn_window_size: None,
            codebook_size: 4096,
            codebook_dim: 8,
            vq_strides: vec![4, 2, 1],
            noise: true,
            depthwise: true,
        }
    }

    /// Reads and validates `path`.
    pub fn from_file(path: &Path) -> Result<Self, CodecError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CodecError::Load(format!("{}: {e}", path.display())))?;
        let config: Self = serde_json::from_str(&text)
            .map_err(|e| CodecError::Load(format!("{}: {e}", path.display())))?;
        config
            .validate()
            .map_err(|e| CodecError::Load(format!("{}: {e}", path.display())))?;
        Ok(config)
    }

    /// Checks every setting the decoder depends on; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.attn_window_size.is_some() {
            return Err(
                "attn_window_size: local attention is not supported (the 24 kHz model \
                 has none); only configs with `null` load"
                    .into(),
            );
        }
        let positive = [
            ("sampling_rate", self.sampling_rate),
            ("decoder_dim", self.decoder_dim),
            ("codebook_size", self.codebook_size),
            ("codebook_dim", self.codebook_dim),
            ("latent_dim", self.latent_dim()),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
        }
        if self.codebook_size > u32::MAX as usize {
            return Err(format!("codebook_size {} is too large", self.codebook_size));
        }
        for (name, list, max_len) in [
            ("decoder_rates", &self.decoder_rates, MAX_RATES),
            ("vq_strides", &self.vq_strides, MAX_LEVELS),
        ] {
            if list.is_empty() || list.len() > max_len {
                return Err(format!("{name} needs 1 to {max_len} entries, got {list:?}"));
            }
            if list.iter().any(|&v| v == 0 || v > MAX_FACTOR) {
                return Err(format!(
                    "{name} entries must be in 1..={MAX_FACTOR}: {list:?}"
                ));
            }
        }
        let halvings = 1usize << self.decoder_rates.len();
        if self.decoder_dim % halvings != 0 {
            return Err(format!(
                "decoder_dim {} is not divisible by 2^{} (one halving per decoder rate)",
                self.decoder_dim,
                self.decoder_rates.len()
            ));
        }
        Ok(())
    }

    /// Width of the quantizer's output and the decoder's input.
    pub fn latent_dim(&self) -> usize {
        self.latent_dim.unwrap_or_else(|| {
            self.encoder_dim.saturating_mul(
                1usize
                    .checked_shl(self.encoder_rates.len() as u32)
                    .unwrap_or(0),
            )
        })
    }

    /// Output samples per latent step: the product of `decoder_rates`.
    pub fn hop_length(&self) -> usize {
        self.decoder_rates.iter().product()
    }

    /// Latent steps per frame: the least common multiple of `vq_strides` (the largest stride
    /// for SNAC's power-of-two strides), so each frame holds whole codes of every level.
    pub fn frame_latents(&self) -> usize {
        self.vq_strides.iter().fold(1, |a, &s| a / gcd(a, s) * s)
    }

    /// Codes of each level in one frame.
    pub fn codes_per_level(&self) -> Vec<usize> {
        let m = self.frame_latents();
        self.vq_strides.iter().map(|s| m / s).collect()
    }

    /// The canonical frame layout and output facts.
    pub fn codec_info(&self) -> CodecInfo {
        let levels: Vec<usize> = self
            .codes_per_level()
            .iter()
            .enumerate()
            .flat_map(|(level, &n)| std::iter::repeat_n(level, n))
            .collect();
        CodecInfo {
            sample_rate: self.sampling_rate as u32,
            codes_per_frame: levels.len(),
            levels,
            codebook_size: self.codebook_size,
            samples_per_frame: self.frame_latents() * self.hop_length(),
        }
    }

    /// The decoder's receptive field (see [`ReceptiveField`]).
    pub fn receptive_field(&self) -> ReceptiveField {
        ReceptiveField::of(self)
    }
}

/// One layer of the decoder as far as dependencies go; point-wise layers (snake, 1×1 convs,
/// noise, tanh, residual additions) are left out.
#[derive(Debug, Clone, Copy)]
enum Reach {
    /// A stride-1 convolution: `y[n] = Σ_j x[n - pad + j·dilation]`, `j < kernel`.
    Conv {
        kernel: i64,
        dilation: i64,
        pad: i64,
    },
    /// A transposed convolution: `y[n] = Σ x[m]·w[k]` over `n = m·stride - pad + k`.
    Up { stride: i64, kernel: i64, pad: i64 },
}

/// How many latent steps and frames of context a window needs on each side so that the
/// samples of its inner frames equal those of a decode of the whole stream.
///
/// Computed by walking one frame's output samples back through every layer to the latent
/// input: at each layer the interval of values the frame depends on must lie inside the
/// window (outside it the window decode sees zero padding where the whole decode sees data).
/// The same walk bounds every frame, since the decoder is shift-invariant by one latent step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceptiveField {
    /// Latent steps needed before a frame's first latent step.
    pub left_latents: usize,
    /// Latent steps needed after a frame's last latent step.
    pub right_latents: usize,
    /// Whole frames of left context (`ceil(left_latents / frame_latents)`).
    pub left_frames: usize,
    /// Whole frames of right context: a frame is final once this many later frames arrived.
    pub right_frames: usize,
}

impl ReceptiveField {
    fn of(cfg: &SnacConfig) -> Self {
        // The decoder's layers from input to output, each with its input resolution
        // (output samples per latent step).
        let mut layers: Vec<(Reach, i64)> = Vec::new();
        let conv7 = |dilation: i64| Reach::Conv {
            kernel: 7,
            dilation,
            pad: 3 * dilation,
        };
        let mut res = 1i64;
        layers.push((conv7(1), res));
        for &rate in &cfg.decoder_rates {
            let s = rate as i64;
            let up = Reach::Up {
                stride: s,
                kernel: 2 * s,
                pad: (s + 1) / 2,
            };
            layers.push((up, res));
            res *= s;
            for d in [1, 3, 9] {
                layers.push((conv7(d), res));
            }
        }
        layers.push((conv7(1), res));

        // One frame's samples, far from the stream start so no interval goes negative.
        let m = cfg.frame_latents() as i64;
        let first_latent = 16 * m;
        let (mut a, mut b) = (first_latent * res, (first_latent + m) * res);
        let (mut lo, mut hi) = (first_latent, first_latent + m);
        for &(layer, r) in layers.iter().rev() {
            (a, b) = match layer {
                Reach::Conv {
                    kernel,
                    dilation,
                    pad,
                } => (a - pad, b - pad + (kernel - 1) * dilation),
                Reach::Up {
                    stride,
                    kernel,
                    pad,
                } => (
                    (a + pad - kernel + 1).div_euclid(stride)
                        + i64::from((a + pad - kernel + 1).rem_euclid(stride) != 0),
                    (b - 1 + pad).div_euclid(stride) + 1,
                ),
            };
            lo = lo.min(a.div_euclid(r));
            hi = hi.max(b.div_euclid(r) + i64::from(b.rem_euclid(r) != 0));
        }
        let left = (first_latent - lo).max(0) as usize;
        let right = (hi - first_latent - m).max(0) as usize;
        let m = m as usize;
        Self {
            left_latents: left,
            right_latents: right,
            left_frames: left.div_ceil(m),
            right_frames: right.div_ceil(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_of_the_24khz_model() {
        let cfg = SnacConfig::snac_24khz();
        cfg.validate().unwrap();
        assert_eq!(cfg.latent_dim(), 768);
        let info = cfg.codec_info();
        assert_eq!(info.levels, vec![0, 1, 1, 2, 2, 2, 2]);
        assert_eq!(info.samples_per_frame, 2048);
        assert_eq!(info.sample_rate, 24000);
    }

    #[test]
    fn json_defaults_follow_python() {
        let cfg: SnacConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(cfg.attn_window_size, Some(32));
        assert!(cfg.validate().unwrap_err().contains("attn_window_size"));
        let cfg: SnacConfig = serde_json::from_str(r#"{"attn_window_size": null}"#).unwrap();
        assert_eq!(cfg.frame_latents(), 8);
        assert_eq!(cfg.codec_info().codes_per_frame, 15);
    }

    #[test]
    fn bad_configs_name_the_field() {
        let mut cfg = SnacConfig::snac_24khz();
        cfg.decoder_dim = 1000;
        assert!(cfg.validate().unwrap_err().contains("decoder_dim"));
        let mut cfg = SnacConfig::snac_24khz();
        cfg.vq_strides = vec![4, 0];
        assert!(cfg.validate().unwrap_err().contains("vq_strides"));
    }
}
