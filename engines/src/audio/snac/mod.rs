//! The SNAC audio codec decoder (hubertsiuzdak/snac; Orpheus TTS speaks through the 24 kHz
//! model), one-shot and streamed.
//!
//! - [`config`]: `config.json`, the frame layout and the decoder's receptive field.
//! - `layers` and `decoder`: the decode path on candle, reading the checkpoint's own tensor
//!   names (weight norm in any saved form), with position-keyed noise ([`snac_noise`]).
//! - `stream`: per-stream state; [`SnacCodec::step`](crate::audio::codec::Codec::step) decodes
//!   windows with exactly enough context on both sides that the streamed samples equal the
//!   one-shot decode, batching streams whose windows have the same length.
//!
//! Checkpoints: `config.json` plus `model.safetensors` holding the tensors of the published
//! `pytorch_model.bin` under the same names (convert with `safetensors.torch.save_file(
//! torch.load("pytorch_model.bin"), "model.safetensors")`). Only `quantizer.quantizers.*`
//! (codebooks and `out_proj`) and `decoder.*` are read; encoder tensors may be present.

pub mod config;
mod decoder;
mod layers;
mod stream;

pub use config::{ReceptiveField, SnacConfig};
pub use decoder::{snac_noise, NoiseOrigin, SnacDecoder};
pub use stream::SnacStream;

use crate::audio::codec::{check_frames, Codec, CodecError, CodecInfo};
use crate::llm::weights::{find_safetensors, mmap_var_builder};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::collections::BTreeMap;
use std::path::Path;

/// A loaded SNAC decoder implementing [`Codec`].
#[derive(Debug, Clone)]
pub struct SnacCodec {
    config: SnacConfig,
    info: CodecInfo,
    field: ReceptiveField,
    /// `(first slot, slots)` of each level in a canonical frame.
    level_slots: Vec<(usize, usize)>,
    decoder: SnacDecoder,
}

impl SnacCodec {
    /// Loads `dir/config.json` and `dir/model*.safetensors`, computing in `dtype` (f32, f16 or
    /// bf16; weight norm is folded in f32 first) on `device`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self, CodecError> {
        let config = SnacConfig::from_file(&dir.join("config.json"))?;
        let files = find_safetensors(dir).map_err(|e| {
            CodecError::Load(format!(
                "{e} (convert pytorch_model.bin to model.safetensors with the same tensor names)"
            ))
        })?;
        let vb = mmap_var_builder(files, DType::F32, device)
            .map_err(|e| CodecError::Load(e.to_string()))?;
        Self::from_var_builder(config, dtype, vb)
    }

    /// Builds the codec from `config` and the checkpoint's tensors (`vb` must read f32).
    pub fn from_var_builder(
        config: SnacConfig,
        dtype: DType,
        vb: VarBuilder,
    ) -> Result<Self, CodecError> {
        config.validate().map_err(CodecError::Load)?;
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(CodecError::Load(format!(
                "SNAC dtype must be f32, f16 or bf16, not {dtype:?}"
            )));
        }
        let decoder = SnacDecoder::load(&config, dtype, vb)
            .map_err(|e| CodecError::Load(format!("SNAC weights: {e}")))?;
        let mut level_slots = Vec::new();
        let mut first = 0;
        for n in config.codes_per_level() {
            level_slots.push((first, n));
            first += n;
        }
        Ok(Self {
            info: config.codec_info(),
            field: config.receptive_field(),
            config,
            level_slots,
            decoder,
        })
    }

    /// The validated config.
    pub fn config(&self) -> &SnacConfig {
        &self.config
    }

    /// Context frames a streamed window carries on each side.
    pub fn receptive_field(&self) -> ReceptiveField {
        self.field
    }

    /// The decode network.
    pub fn decoder(&self) -> &SnacDecoder {
        &self.decoder
    }

    /// Splits equally long runs of canonical frames (one per batch element, already checked)
    /// into per-level `(B, frames · slots)` code tensors, as `SNAC.decode` takes them.
    pub fn level_codes(&self, windows: &[&[u32]]) -> Result<Vec<Tensor>, CodecError> {
        let cpf = self.info.codes_per_frame;
        let frames = windows.first().map_or(0, |w| w.len() / cpf);
        if windows.iter().any(|w| w.len() != frames * cpf) {
            return Err(CodecError::InvalidCodes(
                "batched windows must hold the same whole number of frames".into(),
            ));
        }
        let device = self.decoder.device();
        self.level_slots
            .iter()
            .map(|&(first, n)| {
                let mut level = Vec::with_capacity(windows.len() * frames * n);
                for w in windows {
                    for frame in w.chunks_exact(cpf) {
                        level.extend_from_slice(&frame[first..first + n]);
                    }
                }
                Ok(Tensor::from_vec(
                    level,
                    (windows.len(), frames * n),
                    device,
                )?)
            })
            .collect()
    }

    /// Decodes equally long windows as one batch; returns each window's samples.
    fn decode_windows(
        &self,
        windows: &[&[u32]],
        origins: &[NoiseOrigin],
    ) -> Result<Vec<Vec<f32>>, CodecError> {
        let codes = self.level_codes(windows)?;
        let latents = self.decoder.latents(&codes)?;
        let audio = self.decoder.forward(&latents, origins)?;
        let (b, _, len) = audio.dims3()?;
        let all = audio
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        debug_assert_eq!(all.len(), b * len);
        Ok(all.chunks_exact(len.max(1)).map(<[f32]>::to_vec).collect())
    }
}

impl Codec for SnacCodec {
    type Stream = SnacStream;

    fn info(&self) -> &CodecInfo {
        &self.info
    }

    fn decode(&self, codes: &[u32], seed: u64) -> Result<Vec<f32>, CodecError> {
        if check_frames(&self.info, codes)? == 0 {
            return Ok(Vec::new());
        }
        let origin = NoiseOrigin {
            seed,
            first_latent: 0,
        };
        let mut out = self.decode_windows(&[codes], &[origin])?;
        Ok(out.pop().unwrap_or_default())
    }

    fn open(&self, seed: u64) -> SnacStream {
        SnacStream::new(seed, self.info.clone(), self.field)
    }

    fn step(&self, streams: &mut [&mut SnacStream]) -> Result<Vec<Vec<f32>>, CodecError> {
        let windows: Vec<_> = streams.iter().map(|s| s.window()).collect();
        // Streams whose windows have the same length share one forward.
        let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, w) in windows.iter().enumerate() {
            if let Some(w) = w {
                groups.entry(w.frames()).or_default().push(i);
            }
        }
        let spf = self.info.samples_per_frame;
        let latents_per_frame = self.config.frame_latents() as u64;
        let mut out = vec![Vec::new(); streams.len()];
        for members in groups.values() {
            let mut codes = Vec::with_capacity(members.len());
            let mut origins = Vec::with_capacity(members.len());
            for &i in members {
                let (s, w) = (&*streams[i], windows[i].as_ref().expect("grouped"));
                codes.push(s.window_codes(w));
                origins.push(NoiseOrigin {
                    seed: s.seed(),
                    first_latent: w.start as u64 * latents_per_frame,
                });
            }
            let decoded = self.decode_windows(&codes, &origins)?;
            for (&i, samples) in members.iter().zip(decoded) {
                let w = windows[i].as_ref().expect("grouped");
                let from = (w.keep_from - w.start) * spf;
                let to = (w.keep_to - w.start) * spf;
                out[i] = samples[from..to].to_vec();
            }
        }
        // Only now that every window decoded does any stream move on.
        for (stream, w) in streams.iter_mut().zip(&windows) {
            if let Some(w) = w {
                stream.advance(w);
            }
        }
        Ok(out)
    }
}
