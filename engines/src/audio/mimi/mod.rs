//! Kyutai's Mimi codec decoder (used by Moshi and Sesame CSM): codes → 24 kHz PCM, one-shot and
//! streamed, on candle-transformers' `models::mimi`.
//!
//! **Frames.** One frame is `n_q` codes, one per codebook, `[c0, c1, …]` (the canonical layout
//! with levels `0..n_q`); it decodes to `sample_rate / frame_rate` samples (1920 for
//! `kyutai/mimi`: 24 kHz at 12.5 Hz). `n_q` is [`MimiSettings::num_codebooks`].
//!
//! **Exactness.** Mimi's decoder is causal and every frame's samples are final as soon as the
//! frame is decoded (the transposed convolutions' overlap is carried in the stream state), so a
//! stream emits exactly `samples_per_frame` samples per pushed frame with no delay, and the
//! concatenation equals the one-shot [`Codec::decode`] whatever the chunking. The one-shot
//! decode *is* one step over all frames on a fresh state; see [`decoder`] for the attention
//! window this keeps exact (and why candle's own `decode`/`decode_step` differ beyond the
//! window).
//!
//! **Checkpoints.** A directory with `config.json` (Transformers' `MimiConfig`; absent means
//! `kyutai/mimi`'s) and `model.safetensors`, or else its single `*.safetensors` file, or the path
//! of a safetensors file (with `kyutai/mimi`'s config). Both the Transformers layout and the
//! original moshi layout load; see [`weights`].
//!
//! **Streams** each own a clone of the decoder (weights shared, state private); [`Codec::step`]
//! decodes each stream's pending frames with its own state, one stream after another: candle's
//! streaming modules keep one position per model, so streams are not batched together.

mod config;
mod decoder;
mod weights;

pub use config::{MimiConfig, MimiSettings, UPSAMPLE_STRIDE};
pub use weights::{moshi_to_transformers_name, CheckpointLayout};

use crate::audio::codec::{check_frames, Codec, CodecError, CodecInfo, CodecStream};
use candle_core::{DType, Device, Tensor};
use decoder::MimiDecoder;
use std::path::{Path, PathBuf};

/// A loaded Mimi decoder.
#[derive(Debug)]
pub struct MimiCodec {
    info: CodecInfo,
    config: MimiConfig,
    layout: CheckpointLayout,
    /// A decoder that is never stepped: each decode and stream starts from a clone.
    template: MimiDecoder,
    device: Device,
    max_frames: usize,
}

/// The weights file(s) and config of the checkpoint at `path`.
fn locate(path: &Path) -> Result<(Vec<PathBuf>, MimiConfig), CodecError> {
    if path.is_file() {
        return Ok((vec![path.to_path_buf()], MimiConfig::kyutai_v0_1()));
    }
    if !path.is_dir() {
        return Err(CodecError::Load(format!(
            "{}: no such file or directory",
            path.display()
        )));
    }
    let config_path = path.join("config.json");
    let config = if config_path.is_file() {
        MimiConfig::from_file(&config_path)?
    } else {
        MimiConfig::kyutai_v0_1()
    };
    if let Ok(files) = crate::llm::weights::find_safetensors(path) {
        return Ok((files, config));
    }
    let read = std::fs::read_dir(path)
        .map_err(|e| CodecError::Load(format!("{}: {e}", path.display())))?;
    let mut found: Vec<PathBuf> = read
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    found.sort();
    match found.len() {
        1 => Ok((found, config)),
        0 => Err(CodecError::Load(format!(
            "{}: no model.safetensors or other safetensors file",
            path.display()
        ))),
        _ => Err(CodecError::Load(format!(
            "{}: no model.safetensors and several safetensors files: {found:?}",
            path.display()
        ))),
    }
}

impl MimiCodec {
    /// Loads the checkpoint at `path` (see the module docs) on `device`.
    pub fn load(path: &Path, settings: &MimiSettings, device: &Device) -> Result<Self, CodecError> {
        let (files, config) = locate(path)?;
        Self::load_files(files, config, settings, device)
    }

    /// Loads the given safetensors `files` with an explicit `config`.
    pub fn load_files(
        files: Vec<PathBuf>,
        config: MimiConfig,
        settings: &MimiSettings,
        device: &Device,
    ) -> Result<Self, CodecError> {
        if !matches!(settings.dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(CodecError::Load(format!(
                "dtype must be f32, f16 or bf16, not {:?}",
                settings.dtype
            )));
        }
        let n_q = settings.num_codebooks.unwrap_or(config.num_quantizers);
        if !(1..=config.num_quantizers).contains(&n_q) {
            return Err(CodecError::Load(format!(
                "num_codebooks {n_q} is not between 1 and the checkpoint's {} quantizers",
                config.num_quantizers
            )));
        }
        if settings.max_frames == 0 {
            return Err(CodecError::Load("max_frames must be positive".into()));
        }
        let max_positions = settings
            .max_frames
            .checked_mul(UPSAMPLE_STRIDE)
            .ok_or_else(|| CodecError::Load("max_frames is too large".into()))?;
        let (vb, layout) =
            weights::open(files, config.num_attention_heads, settings.dtype, device)?;
        let cfg = config.to_candle(n_q, max_positions);
        let template = MimiDecoder::new(&cfg, UPSAMPLE_STRIDE, vb).map_err(|e| {
            match crate::llm::weights::classify_load_error(e) {
                Ok(w) => CodecError::Load(w.to_string()),
                Err(e) => CodecError::Load(e.to_string()),
            }
        })?;
        let info = CodecInfo {
            sample_rate: config.sample_rate,
            codes_per_frame: n_q,
            levels: (0..n_q).collect(),
            codebook_size: config.codebook_size,
            samples_per_frame: config.samples_per_frame(),
        };
        Ok(Self {
            info,
            config,
            layout,
            template,
            device: device.clone(),
            max_frames: settings.max_frames,
        })
    }

    /// The validated checkpoint config.
    pub fn config(&self) -> &MimiConfig {
        &self.config
    }

    /// The tensor-name layout the checkpoint had.
    pub fn layout(&self) -> CheckpointLayout {
        self.layout
    }

    /// Longest stream accepted, in frames.
    pub fn max_frames(&self) -> usize {
        self.max_frames
    }

    /// Canonical frames (`frames × n_q`, frame-major) → `[1, n_q, frames]` on the device.
    fn codes_tensor(&self, codes: &[u32], frames: usize) -> Result<Tensor, CodecError> {
        let n_q = self.info.codes_per_frame;
        let t = Tensor::from_slice(codes, (frames, n_q), &self.device)?;
        Ok(t.t()?.contiguous()?.unsqueeze(0)?)
    }

    /// Decodes `frames` frames with `decoder`'s state; returns the f32 samples.
    fn run(
        &self,
        decoder: &mut MimiDecoder,
        codes: &[u32],
        frames: usize,
    ) -> Result<Vec<f32>, CodecError> {
        let pcm = decoder.step(&self.codes_tensor(codes, frames)?)?;
        let pcm = pcm.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let want = frames * self.info.samples_per_frame;
        if pcm.len() != want {
            return Err(CodecError::Compute(format!(
                "decoded {} samples for {frames} frames, expected {want}",
                pcm.len()
            )));
        }
        Ok(pcm)
    }
}

impl Codec for MimiCodec {
    type Stream = MimiStream;

    fn info(&self) -> &CodecInfo {
        &self.info
    }

    /// One step over all frames on a fresh state (Mimi draws no noise: `seed` is unused).
    fn decode(&self, codes: &[u32], _seed: u64) -> Result<Vec<f32>, CodecError> {
        let frames = check_frames(&self.info, codes)?;
        if frames > self.max_frames {
            return Err(CodecError::InvalidCodes(format!(
                "{frames} frames exceed the limit of {}",
                self.max_frames
            )));
        }
        if frames == 0 {
            return Ok(Vec::new());
        }
        let mut decoder = self.template.clone();
        decoder.reset();
        self.run(&mut decoder, codes, frames)
    }

    fn open(&self, _seed: u64) -> MimiStream {
        let mut decoder = self.template.clone();
        decoder.reset();
        MimiStream {
            decoder,
            info: self.info.clone(),
            max_frames: self.max_frames,
            pending: Vec::new(),
            frames_pushed: 0,
            samples_emitted: 0,
            closed: false,
        }
    }

    fn step(&self, streams: &mut [&mut MimiStream]) -> Result<Vec<Vec<f32>>, CodecError> {
        let mut out = Vec::with_capacity(streams.len());
        for stream in streams.iter_mut() {
            if stream.pending.is_empty() {
                out.push(Vec::new());
                continue;
            }
            let frames = stream.pending.len() / self.info.codes_per_frame;
            let pcm = self.run(&mut stream.decoder, &stream.pending, frames)?;
            stream.pending.clear();
            stream.samples_emitted += pcm.len();
            out.push(pcm);
        }
        Ok(out)
    }
}

/// One Mimi decoding stream: its own decoder state and the frames not decoded yet.
#[derive(Debug)]
pub struct MimiStream {
    decoder: MimiDecoder,
    info: CodecInfo,
    max_frames: usize,
    pending: Vec<u32>,
    frames_pushed: usize,
    samples_emitted: usize,
    closed: bool,
}

impl CodecStream for MimiStream {
    fn push(&mut self, codes: &[u32], last: bool) -> Result<(), CodecError> {
        if self.closed {
            return Err(CodecError::InvalidCodes(
                "codes pushed after the last chunk".into(),
            ));
        }
        let frames = check_frames(&self.info, codes)?;
        if self.frames_pushed + frames > self.max_frames {
            return Err(CodecError::InvalidCodes(format!(
                "the stream would exceed the limit of {} frames",
                self.max_frames
            )));
        }
        self.pending.extend_from_slice(codes);
        self.frames_pushed += frames;
        self.closed = last;
        Ok(())
    }

    fn has_work(&self) -> bool {
        !self.pending.is_empty()
    }

    fn is_done(&self) -> bool {
        self.closed && self.pending.is_empty()
    }

    fn frames_pushed(&self) -> usize {
        self.frames_pushed
    }

    fn samples_emitted(&self) -> usize {
        self.samples_emitted
    }
}
