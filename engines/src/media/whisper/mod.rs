//! The audio encoder: Whisper's encoder on log-mel features, average pooling over time and a
//! linear projector into an LLM's width (the Qwen2-Audio recipe), as a [`MediaEncoder`].
//!
//! # Checkpoint folder
//!
//! - `config.json`: a Hugging Face `WhisperConfig` (`model_type` `"whisper"`). Read: `d_model`,
//!   `encoder_layers`, `encoder_attention_heads`, `encoder_ffn_dim`, `num_mel_bins`,
//!   `max_source_positions`, `activation_function` (default `"gelu"`), and our key
//!   `"projector": {"pool": P, "out_dim": N, "bias": true}` (`pool` default 1, `bias` default
//!   true). Without `projector`, the encoder's own rows are written (`d_model` wide, no pooling).
//! - `preprocessor_config.json`: a `WhisperFeatureExtractor` (`feature_size`, `sampling_rate`,
//!   `hop_length`, `n_fft`, `chunk_length`, `n_samples`, `nb_max_frames`, `padding_value`;
//!   absent fields take the extractor's defaults; `dither` is ignored: features are
//!   deterministic). `nb_max_frames` must be `2 × max_source_positions` and `feature_size` must
//!   be `num_mel_bins`.
//! - `model.safetensors` (or a sharded `model.safetensors.index.json`): the encoder under
//!   Transformers' `WhisperForConditionalGeneration` names, `model.encoder.{conv1,conv2,
//!   embed_positions,layers.N.*,layer_norm}` (`embed_positions.weight` may be absent: the
//!   sinusoidal table is then computed), and the projector as
//!   `multi_modal_projector.linear.{weight,bias}` (`[out_dim, d_model]`, `[out_dim]`). Anything
//!   else (the decoder, `proj_out`) is ignored, so a full Whisper checkpoint loads as is.
//!
//! # What a clip becomes
//!
//! [`MediaEncoder::prepare`] resamples the clip to `sampling_rate` ([`resample`]), splits it
//! into consecutive windows of `n_samples` samples (at most [`WhisperEncoder::max_windows`]),
//! and computes each window's log-mel over the whole padded window ([`LogMel`], matching the
//! extractor). The input is `[windows, num_mel_bins, nb_max_frames]`: clips with the same number
//! of windows have the same shape (every clip up to one window long shares one), and
//! [`MediaEncoder::encode`] concatenates all windows of all items along the batch axis, so
//! items with any window counts can also be encoded together. Every window is encoded whole, as
//! Whisper always is (no attention mask), and only its valid rows are kept: a window holding
//! `s` samples fills `L = ceil(s / hop_length)` mel frames, `E = (L - 1) / 2 + 1` encoder rows
//! after the stride-2 conv, and `(E - pool) / pool + 1` pooled rows (Qwen2-Audio's
//! `_get_feat_extract_output_lengths`); a full window gives `max_source_positions / pool`.
//! An item's rows are its windows' rows in order. A trailing window too short to give a row
//! is dropped; a clip too short for any row (a few milliseconds) is padded with silence to the
//! shortest length that gives one, as Whisper pads every window, so it is heard, not refused.
//!
//! Per item, pooling is `nn.AvgPool1d(pool, pool)` over the encoder's output (after its final
//! LayerNorm), then `multi_modal_projector.linear`.

mod config;
mod features;
mod model;

pub use config::{Activation, EncoderConfig, FeatureConfig, ProjectorConfig};
pub use features::{mel_filter_bank, resample, LogMel};
pub(crate) use model::sinusoids;
pub use model::AudioTower;

use super::{MediaEncoder, PreparedMedia};
use crate::llm::weights::{classify_load_error, find_safetensors, mmap_var_builder, WeightsError};
use candle_core::{DType, Device, Tensor};
use omnistage_stages::{EngineError, HiddenStates, MediaData, Modality};
use std::path::{Path, PathBuf};

/// The model config file.
pub const CONFIG_FILE: &str = "config.json";
/// The feature extractor config file.
pub const PREPROCESSOR_FILE: &str = "preprocessor_config.json";
/// Windows a clip may span unless [`WhisperEncoder::set_max_windows`] says otherwise (two
/// minutes for Whisper's 30 s window).
pub const DEFAULT_MAX_WINDOWS: usize = 4;
/// Most windows run through the encoder in one forward; larger batches run in several, so a
/// batch's activation memory is bounded whatever the stage batches.
pub const MAX_FORWARD_WINDOWS: usize = 8;
/// Source sample rates accepted, in Hz.
pub const MIN_SOURCE_RATE: u32 = 4_000;
/// See [`MIN_SOURCE_RATE`].
pub const MAX_SOURCE_RATE: u32 = 384_000;

/// Errors loading a Whisper checkpoint. Each names the file, and the field or tensor.
#[derive(Debug, thiserror::Error)]
pub enum WhisperError {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file is malformed or lacks a required field (serde's message names it).
    #[error("{}: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A config field has a value the encoder does not support.
    #[error("{}: `{field}`: {reason}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// The field (`encoder_attention_heads`, `projector.pool`, ...).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The weights are missing, unreadable, or a tensor is absent or misshapen.
    #[error("{}: {source}", dir.display())]
    Weights {
        /// The checkpoint folder.
        dir: PathBuf,
        /// The error, naming the tensor where there is one.
        #[source]
        source: Box<WeightsError>,
    },
    /// The requested dtype is not a float type.
    #[error("the Whisper encoder runs in f32, f64, f16 or bf16, not {0:?}")]
    Dtype(DType),
    /// Any other candle failure while loading.
    #[error("{}: loading weights: {source}", dir.display())]
    Candle {
        /// The checkpoint folder.
        dir: PathBuf,
        /// The error.
        #[source]
        source: candle_core::Error,
    },
}

/// Whisper encoder + projector, implementing [`MediaEncoder`] for audio clips.
#[derive(Debug)]
pub struct WhisperEncoder {
    cfg: EncoderConfig,
    features: FeatureConfig,
    log_mel: LogMel,
    tower: AudioTower,
    device: Device,
    max_windows: usize,
}

impl WhisperEncoder {
    /// Loads the checkpoint in `dir` (see the module documentation) in `dtype` on `device`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self, WhisperError> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F64) {
            return Err(WhisperError::Dtype(dtype));
        }
        let cfg = EncoderConfig::from_file(&dir.join(CONFIG_FILE))?;
        let pre_path = dir.join(PREPROCESSOR_FILE);
        let features = FeatureConfig::from_file(&pre_path)?;
        features.check_against(&cfg, &pre_path)?;
        let weights_err = |source| WhisperError::Weights {
            dir: dir.to_path_buf(),
            source: Box::new(source),
        };
        let paths = find_safetensors(dir).map_err(weights_err)?;
        let vb = mmap_var_builder(paths, dtype, device).map_err(weights_err)?;
        let tower = AudioTower::load(&cfg, vb).map_err(|e| match classify_load_error(e) {
            Ok(w) => weights_err(w),
            Err(source) => WhisperError::Candle {
                dir: dir.to_path_buf(),
                source,
            },
        })?;
        Ok(Self {
            log_mel: LogMel::new(&features),
            cfg,
            features,
            tower,
            device: device.clone(),
            max_windows: DEFAULT_MAX_WINDOWS,
        })
    }

    /// The longest clip accepted, in seconds.
    pub fn max_seconds(&self) -> f64 {
        (self.max_windows * self.features.n_samples) as f64 / self.features.sampling_rate as f64
    }

    /// Windows of `n_samples` a clip may span.
    pub fn max_windows(&self) -> usize {
        self.max_windows
    }

    /// Sets how many windows a clip may span (at least 1).
    pub fn set_max_windows(&mut self, windows: usize) {
        self.max_windows = windows.max(1);
    }

    /// The encoder's `config.json`.
    pub fn config(&self) -> &EncoderConfig {
        &self.cfg
    }

    /// The `preprocessor_config.json`.
    pub fn feature_config(&self) -> &FeatureConfig {
        &self.features
    }

    /// The log-mel front end.
    pub fn log_mel(&self) -> &LogMel {
        &self.log_mel
    }

    /// The encoder and projector (to run on features computed elsewhere).
    pub fn tower(&self) -> &AudioTower {
        &self.tower
    }

    /// Rows written for a window holding `samples` samples (at `sampling_rate`).
    /// The fewest samples (at `sampling_rate`) whose window gives one pooled row.
    fn shortest_clip(&self) -> usize {
        (2 * self.cfg.pool() - 2) * self.features.hop_length + 1
    }

    fn window_rows(&self, samples: usize) -> usize {
        let frames = self.features.valid_frames(samples);
        if frames == 0 {
            return 0;
        }
        let encoder_rows = (frames - 1) / 2 + 1;
        let pool = self.cfg.pool();
        if encoder_rows < pool {
            0
        } else {
            (encoder_rows - pool) / pool + 1
        }
    }

    /// Rows written for a clip of `samples` samples at `sampling_rate` (any length; windows
    /// beyond [`WhisperEncoder::max_windows`] included; a non-empty clip shorter than one row
    /// is padded to one).
    pub fn rows_for_samples(&self, samples: usize) -> usize {
        let n = self.features.n_samples;
        let samples = if samples == 0 {
            0
        } else {
            samples.max(self.shortest_clip())
        };
        (samples / n) * self.window_rows(n) + self.window_rows(samples % n)
    }

    fn compute_err(e: candle_core::Error) -> EngineError {
        EngineError::Compute(format!("whisper encoder: {e}"))
    }
}

impl MediaEncoder for WhisperEncoder {
    fn modality(&self) -> Modality {
        Modality::Audio
    }

    fn output_dim(&self) -> usize {
        self.cfg.output_dim()
    }

    fn prepare(&self, media: &MediaData) -> Result<PreparedMedia, EngineError> {
        let pcm = match media {
            MediaData::Audio(pcm) => pcm,
            MediaData::Image(_) => {
                return Err(EngineError::InvalidInput(
                    "the audio encoder takes audio clips, not images".into(),
                ))
            }
        };
        if pcm.samples.is_empty() {
            return Err(EngineError::InvalidInput("the audio clip is empty".into()));
        }
        let rate = pcm.sample_rate;
        if !(MIN_SOURCE_RATE..=MAX_SOURCE_RATE).contains(&rate) {
            return Err(EngineError::InvalidInput(format!(
                "audio sample rate {rate} Hz is outside {MIN_SOURCE_RATE}..={MAX_SOURCE_RATE} Hz"
            )));
        }
        if pcm.samples.iter().any(|s| !s.is_finite()) {
            return Err(EngineError::InvalidInput(
                "the audio clip has non-finite samples".into(),
            ));
        }
        let target = self.features.sampling_rate;
        let window = self.features.n_samples;
        // samples / rate > max_windows · window / target, in integers.
        if pcm.samples.len() as u128 * target as u128
            > (self.max_windows * window) as u128 * u128::from(rate)
        {
            return Err(EngineError::InvalidInput(format!(
                "audio clip of {:.2} s is longer than the {:.2} s this encoder accepts",
                pcm.seconds(),
                self.max_seconds()
            )));
        }
        let target_u32 = u32::try_from(target)
            .map_err(|_| EngineError::Compute("sampling_rate out of range".into()))?;
        let mut samples = resample(&pcm.samples, rate, target_u32).map_err(EngineError::Compute)?;
        let shortest = self.shortest_clip();
        if samples.len() < shortest {
            samples.resize(shortest, 0.0);
        }
        let mut data = Vec::new();
        let (mut windows, mut rows) = (0usize, 0usize);
        for chunk in samples.chunks(window) {
            let r = self.window_rows(chunk.len());
            if r == 0 {
                continue;
            }
            data.extend(self.log_mel.compute(chunk));
            windows += 1;
            rows += r;
        }
        if rows == 0 {
            return Err(EngineError::Compute(format!(
                "whisper encoder: a clip padded to {shortest} samples gave no rows"
            )));
        }
        let shape = (
            windows,
            self.features.feature_size,
            self.features.nb_max_frames,
        );
        let input = Tensor::from_vec(data, shape, &self.device).map_err(Self::compute_err)?;
        Ok(PreparedMedia { input, rows })
    }

    fn encode(&mut self, batch: &[&PreparedMedia]) -> Result<Vec<HiddenStates>, EngineError> {
        let (mels, frames) = (self.features.feature_size, self.features.nb_max_frames);
        let full = self.cfg.rows_per_window();
        let mut plan = Vec::with_capacity(batch.len());
        let mut inputs = Vec::with_capacity(batch.len());
        for item in batch {
            let dims = item.input.dims();
            let windows = match *dims {
                [w, m, f] if w > 0 && m == mels && f == frames => w,
                _ => {
                    return Err(EngineError::Compute(format!(
                        "whisper encoder: prepared input has shape {dims:?}, expected \
                         [windows, {mels}, {frames}]"
                    )))
                }
            };
            if item.rows <= (windows - 1) * full || item.rows > windows * full {
                return Err(EngineError::Compute(format!(
                    "whisper encoder: {} rows do not fit {windows} windows of {full} rows",
                    item.rows
                )));
            }
            plan.push((windows, item.rows));
            inputs.push(
                item.input
                    .to_device(&self.device)
                    .map_err(Self::compute_err)?,
            );
        }
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let all = Tensor::cat(&inputs, 0).map_err(Self::compute_err)?;
        let total = all.dim(0).map_err(Self::compute_err)?;
        let dim = self.cfg.output_dim();
        let mut out: Vec<f32> = Vec::with_capacity(total * full * dim);
        let mut start = 0;
        while start < total {
            let n = MAX_FORWARD_WINDOWS.min(total - start);
            let y = all
                .narrow(0, start, n)
                .and_then(|x| self.tower.forward(&x))
                .and_then(|y| y.flatten_all())
                .and_then(|y| y.to_vec1::<f32>())
                .map_err(Self::compute_err)?;
            if y.len() != n * full * dim {
                return Err(EngineError::Compute(format!(
                    "whisper encoder: forward gave {} values for {n} windows of {full} × {dim}",
                    y.len()
                )));
            }
            out.extend(y);
            start += n;
        }
        let per_window = full * dim;
        let mut window = 0;
        Ok(plan
            .into_iter()
            .map(|(windows, rows)| {
                let mut data = Vec::with_capacity(rows * dim);
                let mut left = rows;
                for _ in 0..windows {
                    let r = left.min(full);
                    let base = window * per_window;
                    data.extend_from_slice(&out[base..base + r * dim]);
                    left -= r;
                    window += 1;
                }
                HiddenStates::new(data, dim)
            })
            .collect())
    }
}
