//! Stable Diffusion 3's three text encoders (CLIP-L, CLIP-G and the optional T5-XXL) as one
//! [`PromptEncoder`], reproducing diffusers' `StableDiffusion3Pipeline.encode_prompt` (with
//! `clip_skip=None`, one image per prompt):
//!
//! * each CLIP sees the prompt tokenized to `tokenizer/`'s `model_max_length` (77), padded with
//!   its own pad token and truncated, with no attention mask beyond CLIP's causal one; its token
//!   rows are `hidden_states[-2]` (the input of the last layer, before the final norm) and its
//!   pooled vector is the projected (`text_projection`) final-norm row of the EOS token;
//! * the CLIP-L and CLIP-G rows are concatenated on the feature axis and zero-padded (or, as
//!   `F.pad` does with a negative width, cropped) to the joint width, T5's `d_model`;
//! * T5 sees the prompt padded and truncated to `max_sequence_length` tokens, again with no
//!   attention mask, and its final hidden states follow the CLIP rows along the sequence; without
//!   `text_encoder_3/`, diffusers puts zeros there, `joint_attention_dim` wide (read from
//!   `transformer/config.json`);
//! * the pooled vector is CLIP-L's followed by CLIP-G's.
//!
//! Every prompt is padded to the same lengths and nothing mixes rows of a batch, so a prompt's
//! embedding does not depend on what it was batched with.
//!
//! The CLIP text model is in [`clip`] (candle-transformers' CLIP models cannot be configured
//! from a checkpoint's `config.json`); T5 is candle-transformers' `T5EncoderModel`.

mod clip;
mod tokenizer;

use super::PromptEncoder;
use crate::diffusion::{read_json, DiffusionError};
use crate::llm::weights::{classify_load_error, find_safetensors_with_stem, mmap_var_builder};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::t5;
use clip::ClipText;
use omnistage_stages::{HiddenStates, TextEmbedding};
use std::path::Path;
use tokenizer::{model_max_length, Family, PromptTokenizer};

/// CLIP's context, used when `tokenizer/` does not state `model_max_length` (diffusers' fallback).
const DEFAULT_CLIP_TOKENS: usize = 77;
/// SD3's `joint_attention_dim`, used without T5 when `transformer/config.json` is absent.
const DEFAULT_JOINT_DIM: usize = 4096;

/// SD3's CLIP-L + CLIP-G (+ T5) prompt encoder over a diffusers pipeline folder.
pub struct Sd3TextEncoders {
    clip_l: ClipText,
    clip_g: ClipText,
    tokenizer_l: PromptTokenizer,
    tokenizer_g: PromptTokenizer,
    t5: Option<(t5::T5EncoderModel, PromptTokenizer)>,
    clip_tokens: usize,
    max_sequence_length: usize,
    joint_dim: usize,
    device: Device,
}

impl Sd3TextEncoders {
    /// Loads the encoders of the SD3 pipeline at `root`: `text_encoder/` and `text_encoder_2/`
    /// (`CLIPTextModelWithProjection`), optional `text_encoder_3/` (`T5EncoderModel`; skipped
    /// when absent or set to `[null, null]` in `model_index.json`) and `tokenizer/`,
    /// `tokenizer_2/`, `tokenizer_3/`. T5 rows are `max_sequence_length` long.
    ///
    /// T5 v1.1 overflows in f16 (transformers clamps its activations, candle does not), so an
    /// f16 request runs T5 in bf16, which has f32's range at the same size.
    pub fn load(
        root: &Path,
        max_sequence_length: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, DiffusionError> {
        if max_sequence_length == 0 {
            return Err(DiffusionError::config(
                root,
                "max_text_tokens must be at least 1",
            ));
        }
        let clip_l = ClipText::load(&root.join("text_encoder"), dtype, device)?;
        let clip_g = ClipText::load(&root.join("text_encoder_2"), dtype, device)?;
        let tok_dir = root.join("tokenizer");
        let clip_tokens = model_max_length(&tok_dir)?.unwrap_or(DEFAULT_CLIP_TOKENS);
        for clip in [&clip_l, &clip_g] {
            if clip_tokens < 2 || clip_tokens > clip.max_positions {
                return Err(DiffusionError::config(
                    &tok_dir.join("tokenizer_config.json"),
                    format!(
                        "model_max_length {clip_tokens} must be in [2, {}] ({}'s \
                         max_position_embeddings)",
                        clip.max_positions, clip.dir_name
                    ),
                ));
            }
        }
        let tokenizer_l = PromptTokenizer::load(&tok_dir, Family::Clip, clip_tokens)?;
        let tokenizer_g =
            PromptTokenizer::load(&root.join("tokenizer_2"), Family::Clip, clip_tokens)?;
        check_vocab(
            root,
            "tokenizer",
            &tokenizer_l,
            "text_encoder",
            clip_l.vocab_size,
        )?;
        check_vocab(
            root,
            "tokenizer_2",
            &tokenizer_g,
            "text_encoder_2",
            clip_g.vocab_size,
        )?;
        let t5_dir = root.join("text_encoder_3");
        let (t5, joint_dim) = if t5_dir.is_dir() && !t5_disabled(root)? {
            let t5_dtype = if dtype == DType::F16 {
                DType::BF16
            } else {
                dtype
            };
            let (model, d_model, vocab) = load_t5(&t5_dir, t5_dtype, device)?;
            let tokenizer =
                PromptTokenizer::load(&root.join("tokenizer_3"), Family::T5, max_sequence_length)?;
            check_vocab(root, "tokenizer_3", &tokenizer, "text_encoder_3", vocab)?;
            (Some((model, tokenizer)), d_model)
        } else {
            (None, joint_dim_without_t5(root)?)
        };
        Ok(Self {
            clip_l,
            clip_g,
            tokenizer_l,
            tokenizer_g,
            t5,
            clip_tokens,
            max_sequence_length,
            joint_dim,
            device: device.clone(),
        })
    }

    /// Width of every token row: T5's `d_model`, or `joint_attention_dim` without T5.
    pub fn joint_dim(&self) -> usize {
        self.joint_dim
    }

    /// Token rows per prompt: the CLIP length (77) plus `max_sequence_length`.
    pub fn token_rows(&self) -> usize {
        self.clip_tokens + self.max_sequence_length
    }

    /// Width of the pooled vector: the two CLIP projection widths (768 + 1280 for SD3).
    pub fn pooled_dim(&self) -> usize {
        self.clip_l.projection_dim + self.clip_g.projection_dim
    }

    /// Whether `text_encoder_3/` was loaded (otherwise its rows are zeros).
    pub fn has_t5(&self) -> bool {
        self.t5.is_some()
    }

    fn ids(&self, tok: &PromptTokenizer, prompts: &[&str]) -> Result<Tensor, DiffusionError> {
        let rows = prompts
            .iter()
            .map(|p| tok.fixed(p))
            .collect::<Result<Vec<_>, _>>()?;
        let len = rows.first().map_or(0, Vec::len);
        let flat: Vec<u32> = rows.into_iter().flatten().collect();
        Ok(Tensor::from_vec(flat, (prompts.len(), len), &self.device)?)
    }
}

impl PromptEncoder for Sd3TextEncoders {
    fn name(&self) -> &'static str {
        "sd3-clip-t5"
    }

    fn encode(&self, prompts: &[&str]) -> Result<Vec<TextEmbedding>, DiffusionError> {
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        let b = prompts.len();
        let (rows_l, pooled_l) = self
            .clip_l
            .forward(&self.ids(&self.tokenizer_l, prompts)?)?;
        let (rows_g, pooled_g) = self
            .clip_g
            .forward(&self.ids(&self.tokenizer_g, prompts)?)?;
        let clip = Tensor::cat(
            &[rows_l.to_dtype(DType::F32)?, rows_g.to_dtype(DType::F32)?],
            2,
        )?;
        let width = clip.dim(2)?;
        // `F.pad(clip, (0, joint - width))`: zeros on the right, or a crop when negative.
        let clip = if width < self.joint_dim {
            clip.pad_with_zeros(2, 0, self.joint_dim - width)?
        } else {
            clip.narrow(2, 0, self.joint_dim)?
        };
        let t5_rows = match &self.t5 {
            Some((model, tok)) => {
                let ids = self.ids(tok, prompts)?;
                // The model keeps no state across calls (the encoder has no KV cache); cloning
                // shares the weights and only gives `forward` the `&mut` it asks for.
                model.clone().forward(&ids)?.to_dtype(DType::F32)?
            }
            None => Tensor::zeros(
                (b, self.max_sequence_length, self.joint_dim),
                DType::F32,
                &self.device,
            )?,
        };
        let tokens = Tensor::cat(&[clip, t5_rows], 1)?;
        let pooled = Tensor::cat(
            &[
                pooled_l.to_dtype(DType::F32)?,
                pooled_g.to_dtype(DType::F32)?,
            ],
            1,
        )?;
        let tokens: Vec<Vec<f32>> = tokens.flatten_from(1)?.to_vec2()?;
        let pooled: Vec<Vec<f32>> = pooled.to_vec2()?;
        Ok(tokens
            .into_iter()
            .zip(pooled)
            .map(|(rows, pooled)| TextEmbedding {
                tokens: HiddenStates::new(rows, self.joint_dim),
                pooled: pooled.into(),
            })
            .collect())
    }

    /// Counts T5's tokens (the longest context) when T5 is loaded, else CLIP-L's; special
    /// tokens included.
    fn count_tokens(&self, prompt: &str) -> Result<usize, DiffusionError> {
        match &self.t5 {
            Some((_, tok)) => tok.count(prompt),
            None => self.tokenizer_l.count(prompt),
        }
    }
}

/// Refuses a tokenizer whose ids would index past its encoder's embedding table (a mismatched
/// folder), which would otherwise fail on the first prompt using such an id.
fn check_vocab(
    root: &Path,
    tokenizer: &str,
    tok: &PromptTokenizer,
    encoder: &str,
    embeddings: usize,
) -> Result<(), DiffusionError> {
    if tok.id_bound() <= embeddings {
        return Ok(());
    }
    Err(DiffusionError::config(
        &root.join(tokenizer),
        format!(
            "the tokenizer produces ids up to {}, but {encoder}/ has only {embeddings} \
             embeddings (vocab_size)",
            tok.id_bound() - 1
        ),
    ))
}

/// Whether `model_index.json` sets `text_encoder_3` to `[null, null]`, as a pipeline saved with
/// `text_encoder_3=None` does (diffusers then loads no T5 even if the folder is there).
fn t5_disabled(root: &Path) -> Result<bool, DiffusionError> {
    let path = root.join("model_index.json");
    if !path.is_file() {
        return Ok(false);
    }
    let json: serde_json::Value = read_json(&path)?;
    Ok(json
        .get("text_encoder_3")
        .is_some_and(|v| v.is_null() || v.get(0).is_some_and(|c| c.is_null())))
}

/// `joint_attention_dim` of `root/transformer/config.json`, which diffusers uses for the zero T5
/// rows; SD3's 4096 when the pipeline folder has no transformer config.
fn joint_dim_without_t5(root: &Path) -> Result<usize, DiffusionError> {
    let path = root.join("transformer/config.json");
    if !path.is_file() {
        return Ok(DEFAULT_JOINT_DIM);
    }
    let json: serde_json::Value = read_json(&path)?;
    match json.get("joint_attention_dim") {
        None => Ok(DEFAULT_JOINT_DIM),
        Some(v) => v
            .as_u64()
            .and_then(|v| usize::try_from(v).ok())
            .filter(|v| *v > 0)
            .ok_or_else(|| DiffusionError::config(&path, "joint_attention_dim must be positive")),
    }
}

/// Maps a candle error raised while building a model from `dir` to an error naming the folder
/// and, when it is one, the missing or misshapen tensor (SD3 has three encoders; the tensor name
/// alone would not say which).
fn weights_error(dir: &Path) -> impl Fn(candle_core::Error) -> DiffusionError + '_ {
    move |e| match classify_load_error(e) {
        Ok(weights) => DiffusionError::config(dir, weights.to_string()),
        Err(other) => DiffusionError::Candle(other),
    }
}

fn var_builder(
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, DiffusionError> {
    Ok(mmap_var_builder(
        find_safetensors_with_stem(dir, "model")?,
        dtype,
        device,
    )?)
}

/// `architectures` of a Transformers `config.json`.
fn architectures(json: &serde_json::Value) -> Vec<String> {
    json.get("architectures")
        .and_then(|a| a.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn load_t5(
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(t5::T5EncoderModel, usize, usize), DiffusionError> {
    let path = dir.join("config.json");
    let json: serde_json::Value = read_json(&path)?;
    let arch = architectures(&json);
    if !arch.iter().any(|a| a.starts_with("T5")) {
        return Err(DiffusionError::config(
            &path,
            format!("expected a T5EncoderModel, found architectures {arch:?}"),
        ));
    }
    let cfg: t5::Config = serde_json::from_value(json)
        .map_err(|e| DiffusionError::config(&path, format!("not a T5 config: {e}")))?;
    if cfg.d_model == 0 || cfg.num_heads == 0 || cfg.num_layers == 0 {
        return Err(DiffusionError::config(
            &path,
            "d_model, num_heads and num_layers must be positive",
        ));
    }
    let vb = var_builder(dir, dtype, device)?;
    let model = t5::T5EncoderModel::load(vb, &cfg).map_err(weights_error(dir))?;
    Ok((model, cfg.d_model, cfg.vocab_size))
}
