//! SNAC's decode path restated on candle: codes → latents (`ResidualVectorQuantize.from_codes`)
//! → `Decoder`, with noise drawn from a counter-based hash instead of a global RNG.
//!
//! candle-transformers' `snac::Decoder` cannot be used as is: its noise blocks call
//! `Tensor::randn`, so a window of a stream could never draw the noise the one-shot decode
//! draws there, and it leaves out the decoder's final `tanh` that the Python model applies.

use super::config::SnacConfig;
use super::layers::{weight_norm, Conv, ConvSpec, DecoderBlock, Snake};
use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::VarBuilder;

/// SplitMix64's increment.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's finalizer.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The key of one noise block's stream of draws.
fn block_key(seed: u64, block: usize) -> u64 {
    mix64(seed ^ mix64((block as u64 + 1).wrapping_mul(GAMMA)))
}

/// Output `i` of the SplitMix64 sequence that starts at state `key`.
fn draw(key: u64, i: u64) -> u64 {
    mix64(key.wrapping_add(i.wrapping_add(1).wrapping_mul(GAMMA)))
}

/// A standard normal draw (Box–Muller on two SplitMix64 outputs) keyed by `key` and the
/// sample's absolute position.
fn gaussian(key: u64, position: u64) -> f32 {
    let h1 = draw(key, position.wrapping_mul(2));
    let h2 = draw(key, position.wrapping_mul(2).wrapping_add(1));
    let scale = 1.0 / (1u64 << 53) as f64;
    let u1 = ((h1 >> 11) + 1) as f64 * scale; // (0, 1]
    let u2 = (h2 >> 11) as f64 * scale; // [0, 1)
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

/// The standard normal value SNAC's noise block `block` (0 = first decoder block) multiplies
/// into the sample at absolute `position` of its output (at that block's resolution) for a
/// stream seeded `seed`. A pure function: a window of a stream draws exactly the values the
/// one-shot decode draws at the same positions.
pub fn snac_noise(seed: u64, block: usize, position: u64) -> f32 {
    gaussian(block_key(seed, block), position)
}

/// Where one batch element of a decode sits in its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoiseOrigin {
    /// The stream's noise seed.
    pub seed: u64,
    /// Absolute latent step of the element's first latent.
    pub first_latent: u64,
}

/// The input convolution(s): depthwise 7 + pointwise 1, or one dense 7.
#[derive(Debug, Clone)]
enum InputConv {
    Depthwise(Conv, Conv),
    Dense(Conv),
}

/// The decode side of a SNAC checkpoint: per-level code → latent tables and the decoder.
#[derive(Debug, Clone)]
pub struct SnacDecoder {
    /// Per level, `out_proj(codebook)ᵀ`: `(codebook_size, latent_dim)`. A 1×1 conv is a
    /// per-step linear map, so projecting the codebook once equals projecting looked-up codes.
    tables: Vec<Tensor>,
    strides: Vec<usize>,
    input: InputConv,
    blocks: Vec<DecoderBlock>,
    /// Upsampling factor of each block.
    rates: Vec<usize>,
    /// Output resolution (samples per latent step) of each block.
    block_res: Vec<u64>,
    snake: Snake,
    output: Conv,
    dtype: DType,
    device: Device,
}

impl SnacDecoder {
    /// Builds the decoder from a checkpoint's `quantizer.*` and `decoder.*` tensors (encoder
    /// tensors are not read). `vb` must read f32; weights are cast to `dtype`.
    pub fn load(cfg: &SnacConfig, dtype: DType, vb: VarBuilder) -> Result<Self> {
        let latent = cfg.latent_dim();
        let qvb = vb.pp("quantizer").pp("quantizers");
        let mut tables = Vec::with_capacity(cfg.vq_strides.len());
        for i in 0..cfg.vq_strides.len() {
            let q = qvb.pp(i);
            let codebook = q.get((cfg.codebook_size, cfg.codebook_dim), "codebook.weight")?;
            let out = q.pp("out_proj");
            let w = weight_norm(&out, (latent, cfg.codebook_dim, 1))?.squeeze(2)?;
            let b = out.get(latent, "bias")?;
            let table = codebook.matmul(&w.t()?)?.broadcast_add(&b.unsqueeze(0)?)?;
            tables.push(table.to_dtype(dtype)?);
        }

        let dvb = vb.pp("decoder").pp("model");
        let channels = cfg.decoder_dim;
        let mut idx = 0;
        let input = if cfg.depthwise {
            let dw = ConvSpec {
                depthwise: true,
                ..ConvSpec::new(latent, latent, 7)
            };
            let dw = Conv::load(dw, dtype, dvb.pp(0))?;
            let pw = Conv::load(ConvSpec::new(latent, channels, 1), dtype, dvb.pp(1))?;
            idx += 2;
            InputConv::Depthwise(dw, pw)
        } else {
            idx += 1;
            InputConv::Dense(Conv::load(
                ConvSpec::new(latent, channels, 7),
                dtype,
                dvb.pp(0),
            )?)
        };
        let mut blocks = Vec::with_capacity(cfg.decoder_rates.len());
        let mut block_res = Vec::with_capacity(cfg.decoder_rates.len());
        let (mut dim, mut res) = (channels, 1u64);
        for &rate in &cfg.decoder_rates {
            blocks.push(DecoderBlock::load(
                dim,
                dim / 2,
                rate,
                cfg.noise,
                cfg.depthwise,
                dtype,
                dvb.pp(idx),
            )?);
            idx += 1;
            dim /= 2;
            res *= rate as u64;
            block_res.push(res);
        }
        let snake = Snake::load(dim, dtype, dvb.pp(idx))?;
        let output = Conv::load(ConvSpec::new(dim, 1, 7), dtype, dvb.pp(idx + 1))?;
        Ok(Self {
            tables,
            strides: cfg.vq_strides.clone(),
            input,
            blocks,
            rates: cfg.decoder_rates.clone(),
            block_res,
            snake,
            output,
            dtype,
            device: vb.device().clone(),
        })
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `ResidualVectorQuantize.from_codes`: `codes[i]` is `(B, T_i)` u32 with
    /// `T_i · vq_strides[i]` equal for every level; returns `(B, latent_dim, T)` latents.
    pub fn latents(&self, codes: &[Tensor]) -> Result<Tensor> {
        if codes.len() != self.tables.len() {
            candle_core::bail!(
                "expected codes for {} levels, got {}",
                self.tables.len(),
                codes.len()
            );
        }
        let mut sum: Option<Tensor> = None;
        for ((table, codes), &stride) in self.tables.iter().zip(codes).zip(&self.strides) {
            let (b, t) = codes.dims2()?;
            let rows = table.index_select(&codes.flatten_all()?, 0)?; // (B·T_i, latent)
            let latent = rows.dim(1)?;
            let rows = rows.reshape((b, t, 1, latent))?;
            let rows =
                rows.broadcast_as((b, t, stride, latent))?
                    .reshape((b, t * stride, latent))?;
            sum = Some(match sum {
                None => rows,
                Some(s) => {
                    if s.dims() != rows.dims() {
                        candle_core::bail!(
                            "code levels cover different lengths: {:?} vs {:?}",
                            s.dims(),
                            rows.dims()
                        );
                    }
                    (s + rows)?
                }
            });
        }
        match sum {
            Some(s) => s.transpose(1, 2)?.contiguous(),
            None => candle_core::bail!("no code levels"),
        }
    }

    /// The noise of block `block` for every batch element: `(B, 1, len)`.
    fn noise(&self, block: usize, len: usize, origins: &[NoiseOrigin]) -> Result<Tensor> {
        let res = self.block_res[block];
        let mut values = Vec::with_capacity(origins.len() * len);
        for o in origins {
            let key = block_key(o.seed, block);
            let start = o.first_latent.wrapping_mul(res);
            values.extend((0..len as u64).map(|t| gaussian(key, start.wrapping_add(t))));
        }
        Tensor::from_vec(values, (origins.len(), 1, len), &self.device)?.to_dtype(self.dtype)
    }

    /// `Decoder.forward` on `(B, latent_dim, T)` latents: `(B, 1, T · hop)` samples in
    /// `[-1, 1]`. `origins` (one per batch element) places each element in its stream for the
    /// noise; it is ignored when the model has no noise blocks.
    pub fn forward(&self, latents: &Tensor, origins: &[NoiseOrigin]) -> Result<Tensor> {
        let mut xs = match &self.input {
            InputConv::Depthwise(dw, pw) => latents.apply(dw)?.apply(pw)?,
            InputConv::Dense(c) => latents.apply(c)?,
        };
        for (i, block) in self.blocks.iter().enumerate() {
            let noise = if block.has_noise() {
                if origins.len() != xs.dim(0)? {
                    candle_core::bail!(
                        "{} noise origins for a batch of {}",
                        origins.len(),
                        xs.dim(0)?
                    );
                }
                let len = xs.dim(D::Minus1)? * self.rates[i];
                Some(self.noise(i, len, origins)?)
            } else {
                None
            };
            xs = block.forward(&xs, noise.as_ref())?;
        }
        xs.apply(&self.snake)?.apply(&self.output)?.tanh()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_is_a_pure_function_and_roughly_standard() {
        assert_eq!(snac_noise(7, 2, 12345), snac_noise(7, 2, 12345));
        assert_ne!(snac_noise(7, 2, 12345), snac_noise(8, 2, 12345));
        assert_ne!(snac_noise(7, 2, 12345), snac_noise(7, 3, 12345));
        let n = 100_000;
        let xs: Vec<f64> = (0..n).map(|p| f64::from(snac_noise(1, 0, p))).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 1.0).abs() < 0.03, "variance {var}");
    }
}
