//! The talker stage engine: an LLM whose vocabulary carries audio codec tokens (an `llm` stage
//! with a `[stage.talker]` table), batched like the text engine over the same paged KV pool.
//!
//! **Prompt.** `prompt_prefix_ids` + tokenize(`prompt_format` with `{voice}` → the voice's
//! conditioning text and `{text}` → the text to speak) + `prompt_suffix_ids`. The text to speak
//! is an upstream `Payload::Text`, else the request's prompt (a completion's text, a chat's last
//! user message); it is empty when the talker is driven by a thinker's hidden states.
//!
//! **Hidden-state conditioning** (Qwen2.5-Omni). With an upstream `Payload::Hidden` (or a
//! streamed input), the input embedding of the last prompt position is `embed(token) +
//! proj(h_0)`, and each later input (the previous codec token) gets `proj(h_t)` added, where
//! `proj` is the checkpoint's `thinker_to_talker_proj`. Rows may stream in through
//! [`StageEngine::feed`]; a sequence whose next position needs a row that has not arrived waits
//! ([`StageEngine::awaiting_input`]). After the stream closes and its rows are used up the extra
//! term is zero. Each step reports the rows it used for the first time as
//! `StageEvent::Consumed` (streamed inputs only).
//!
//! **Codec tokens.** Logits are masked so frame slot `p` can only be a code token of slot `p`
//! (and a frame boundary an end token), so every sampled frame is valid. Each finished frame is
//! sent as `Payload::Codes` in the codec's canonical layout, with `Payload::Tokens` of its raw
//! ids, in the output event of the step that completed it. An end token finishes with `Stop`,
//! `max_tokens` with `Length` (a trailing partial frame is dropped).
//!
//! **Sampling.** Defaults come from the stage's `[stage.sampling]` over the checkpoint's
//! generation config (the request's own settings only when the talker faces the client); the
//! sampler is seeded from the request's audio seed when it has one. `ignore_eos` keeps end
//! tokens masked out.

mod layout;
mod proj;
mod seq;

pub use proj::THINKER_PROJ;

use super::engine::{LlmEngineError, LlmEngineSettings};
use super::generation_config::GenerationConfig;
use super::kv::{checkpoint_sampling, KvSeq, KvState};
use super::model::LlmModel;
use super::paged::PagedChunk;
use super::sampling::{ResolvedSampling, Sampler};
use super::tokenizer::TextTokenizer;
use super::weights::load_var_builder;
use candle_core::{DType, Device, Tensor};
use layout::{fill_prompt, CodecLayout};
use omnistage_stages::deploy::{TalkerSettings, DEFAULT_VOICE};
use omnistage_stages::{
    CodecFrames, EngineError, EngineStats, HiddenStates, JobId, Payload, Prompt, SamplingParams,
    StageEngine, StageEvent, StageInput, StepWork, Usage,
};
use proj::ThinkerProj;
use seq::{Conditioning, TalkerSeq};
use std::collections::HashMap;
use std::path::Path;

/// A batched talker stage engine.
pub struct TalkerEngine {
    model: LlmModel,
    proj: Option<ThinkerProj>,
    tokenizer: TextTokenizer,
    layout: CodecLayout,
    defaults: SamplingParams,
    max_model_len: usize,
    kv: KvState,
    seqs: HashMap<JobId, TalkerSeq>,
    next_arrival: u64,
}

impl TalkerEngine {
    /// Loads model, `thinker_to_talker_proj` (if the checkpoint has one), tokenizer and
    /// generation config from a checkpoint directory, checks `talker` against the vocabulary,
    /// and allocates the KV pool. `settings.emit_hidden` is ignored.
    pub fn load(
        dir: &Path,
        dtype: DType,
        device: &Device,
        settings: LlmEngineSettings,
        talker: TalkerSettings,
    ) -> Result<Self, LlmEngineError> {
        let load_err = |message: String| LlmEngineError::Load {
            dir: dir.display().to_string(),
            message,
        };
        let model = LlmModel::load(dir, dtype, device).map_err(|e| load_err(e.to_string()))?;
        let vb = load_var_builder(dir, dtype, device).map_err(|e| load_err(e.to_string()))?;
        let proj = ThinkerProj::load(&vb, model.config().hidden_size)
            .map_err(|e| load_err(e.to_string()))?;
        let tokenizer = TextTokenizer::load(dir).map_err(|e| load_err(e.to_string()))?;
        let generation = GenerationConfig::load(dir).map_err(|e| load_err(e.to_string()))?;
        let layout = CodecLayout::new(talker, model.config().vocab_size, model.device())
            .map_err(LlmEngineError::Talker)?;
        let (kv, max_model_len) = KvState::new(&model, &settings)?;
        Ok(Self {
            defaults: settings.sampling.or(&checkpoint_sampling(&generation)),
            model,
            proj,
            tokenizer,
            layout,
            max_model_len,
            kv,
            seqs: HashMap::new(),
            next_arrival: 0,
        })
    }

    pub fn model(&self) -> &LlmModel {
        &self.model
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// The `[stage.talker]` settings the engine runs with.
    pub fn talker_settings(&self) -> &TalkerSettings {
        self.layout.settings()
    }

    /// The thinker hidden size the checkpoint's projection takes; `None` when it has none (the
    /// talker then takes text only).
    pub fn thinker_hidden_size(&self) -> Option<usize> {
        self.proj.as_ref().map(ThinkerProj::in_dim)
    }

    /// Number of sequences currently holding state.
    pub fn active_sequences(&self) -> usize {
        self.seqs.len()
    }

    /// The prompt token ids a job with this input gets (what [`StageEngine::admit`] uses).
    pub fn prompt_ids(&self, input: &StageInput) -> Result<Vec<u32>, EngineError> {
        let driven = driven_by_hidden(input)?;
        let s = self.layout.settings();
        let voice = input
            .request
            .audio
            .as_ref()
            .map_or(DEFAULT_VOICE, |a| a.voice.as_str());
        let voice_text = s.voices.get(voice).ok_or_else(|| {
            EngineError::InvalidInput(format!(
                "unknown voice `{voice}`; this talker has: {}",
                s.voice_names()
            ))
        })?;
        let text = if driven {
            String::new()
        } else {
            text_to_speak(input)?
        };
        let filled = fill_prompt(&s.prompt_format, voice_text, &text);
        let body = self
            .tokenizer
            .encode(&filled, true)
            .map_err(|e| EngineError::InvalidInput(format!("tokenizer: {e}")))?;
        let mut ids = s.prompt_prefix_ids.clone();
        ids.extend(body);
        ids.extend_from_slice(&s.prompt_suffix_ids);
        Ok(ids)
    }

    /// Projects the runnable chunks' thinker rows (`None` for chunks without any).
    fn extras(&self, runnable: &[(JobId, usize)]) -> Result<Vec<Option<Tensor>>, EngineError> {
        let Some(proj) = &self.proj else {
            return Ok(runnable.iter().map(|_| None).collect());
        };
        let rows: Vec<_> = runnable
            .iter()
            .map(|(job, n)| {
                let seq = &self.seqs[job];
                seq.chunk_rows(seq.computed, *n)
            })
            .collect();
        proj.project(&rows)
            .map_err(|e| EngineError::Compute(format!("thinker projection: {e}")))
    }

    /// Turns the newest logits of a sequence whose input is all computed into output.
    fn sample(
        &self,
        seq: &mut TalkerSeq,
        logits: candle_core::Result<Tensor>,
        out: &mut Vec<Payload>,
    ) -> Result<Option<omnistage_stages::FinishReason>, EngineError> {
        let logits = logits.map_err(|e| EngineError::Compute(e.to_string()))?;
        let step = seq.advance(&logits, &self.layout)?;
        if let Some((raw, codes)) = step.frame {
            let frames = CodecFrames::new(codes, self.layout.frame_len())
                .ok_or_else(|| EngineError::Compute("an empty codec frame".into()))?;
            out.push(Payload::Tokens(raw.into()));
            out.push(Payload::Codes(frames));
        }
        Ok(step.finished)
    }
}

/// Whether the job's talker prompt is conditioned on thinker rows (an upstream `Hidden`, or a
/// streamed input, whose rows come later). A streamed text input is refused: the talker needs
/// its whole text before it starts.
fn driven_by_hidden(input: &StageInput) -> Result<bool, EngineError> {
    let hidden = input
        .upstream
        .iter()
        .any(|p| matches!(p, Payload::Hidden(_)));
    let text = input.upstream.iter().any(|p| matches!(p, Payload::Text(_)));
    if input.streaming && !hidden && text {
        return Err(EngineError::InvalidInput(
            "a talker takes its text whole; remove `stream` from its inbound text edge (only \
             hidden states stream into a talker)"
                .into(),
        ));
    }
    Ok(hidden || input.streaming)
}

/// The text a text-prompted talker speaks: upstream text, else the request's prompt.
fn text_to_speak(input: &StageInput) -> Result<String, EngineError> {
    if let Some(Payload::Text(t)) = input
        .upstream
        .iter()
        .find(|p| matches!(p, Payload::Text(_)))
    {
        return Ok(t.to_string());
    }
    match &input.request.prompt {
        Prompt::Completion(s) | Prompt::Speak(s) => Ok(s.clone()),
        Prompt::Chat(messages) => messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| m.content.text())
            .ok_or_else(|| {
                EngineError::InvalidInput("the chat has no user message to speak".into())
            }),
        Prompt::Tokens(_) => Err(EngineError::InvalidInput(
            "a talker speaks text; a prompt of token ids cannot be spoken".into(),
        )),
    }
}

/// The upstream hidden rows joined into one block (`None` when there are none).
fn upstream_hidden(input: &StageInput) -> Result<Option<HiddenStates>, EngineError> {
    let parts: Vec<HiddenStates> = input
        .upstream
        .iter()
        .filter_map(|p| match p {
            Payload::Hidden(h) => Some(h.clone()),
            _ => None,
        })
        .collect();
    if parts.is_empty() {
        return Ok(None);
    }
    HiddenStates::concat(&parts)
        .map(Some)
        .ok_or_else(|| EngineError::InvalidInput("upstream hidden rows differ in width".into()))
}

impl StageEngine for TalkerEngine {
    fn admit(&mut self, job: JobId, input: StageInput) -> Result<usize, EngineError> {
        let prompt = self.prompt_ids(&input)?;
        let cond = if driven_by_hidden(&input)? {
            let proj = self.proj.as_ref().ok_or_else(|| {
                EngineError::InvalidInput(format!(
                    "this talker's checkpoint has no `{THINKER_PROJ}`, so it cannot be driven by \
                     hidden states; send it text"
                ))
            })?;
            let mut cond = Conditioning::new(proj.in_dim(), input.streaming);
            if let Some(h) = upstream_hidden(&input)? {
                cond.check(&h)?;
                cond.push(&h);
            }
            Some(cond)
        } else {
            None
        };
        if prompt.is_empty() {
            return Err(EngineError::InvalidInput(
                "the talker prompt is empty".into(),
            ));
        }
        let vocab = self.model.config().vocab_size;
        if let Some(bad) = prompt.iter().find(|t| **t as usize >= vocab) {
            return Err(EngineError::InvalidInput(format!(
                "token id {bad} is outside the model's vocabulary of {vocab}"
            )));
        }
        if prompt.len() >= self.max_model_len {
            return Err(EngineError::InvalidInput(format!(
                "the talker prompt has {} tokens; this model accepts at most {} tokens of prompt \
                 and codes",
                prompt.len(),
                self.max_model_len
            )));
        }
        let mut params = input.sampling().or(&self.defaults);
        if let Some(audio) = &input.request.audio {
            params.seed = Some(audio.seed);
        }
        let room = self.max_model_len - prompt.len();
        let max_tokens = params.max_tokens.unwrap_or(room).min(room);
        if max_tokens == 0 {
            return Err(EngineError::InvalidInput(
                "max_tokens must be at least 1".into(),
            ));
        }
        let mut seq = TalkerSeq {
            arrival: self.next_arrival,
            prompt_len: prompt.len(),
            computed: 0,
            sampler: Sampler::new(ResolvedSampling::from_params(&params)),
            max_tokens,
            allow_end: !params.ignore_eos,
            cond,
            tokens: prompt,
        };
        seq.computed = self.kv.start(job, &seq.tokens, seq.salt())?;
        self.next_arrival += 1;
        let pending = seq.pending_prefill();
        self.seqs.insert(job, seq);
        Ok(pending)
    }

    fn pending_input(&self, job: JobId) -> usize {
        self.seqs.get(&job).map_or(0, TalkerSeq::pending_prefill)
    }

    /// Appends streamed thinker rows. Input for a job no longer here (finished or released) is
    /// dropped. Payloads other than hidden rows, rows of the wrong width, rows for a
    /// text-prompted job, or rows after the stream closed are refused (nothing is appended).
    fn feed(&mut self, job: JobId, more: Vec<Payload>, last: bool) -> Result<(), EngineError> {
        let Some(seq) = self.seqs.get_mut(&job) else {
            return Ok(());
        };
        let Some(cond) = seq.cond.as_mut() else {
            return Err(EngineError::InvalidInput(
                "this talker job is prompted with text; it takes no streamed input".into(),
            ));
        };
        if cond.closed && !more.is_empty() {
            return Err(EngineError::InvalidInput(
                "hidden rows arrived after their stream was closed".into(),
            ));
        }
        for p in &more {
            match p {
                Payload::Hidden(h) => cond.check(h)?,
                other => {
                    return Err(EngineError::InvalidInput(format!(
                        "a talker takes streamed `hidden` rows, not `{}`",
                        other.kind()
                    )))
                }
            }
        }
        for p in &more {
            if let Payload::Hidden(h) = p {
                cond.push(h);
            }
        }
        if last {
            cond.closed = true;
        }
        Ok(())
    }

    fn awaiting_input(&self, job: JobId) -> bool {
        self.seqs.get(&job).is_some_and(TalkerSeq::awaiting)
    }

    fn step(
        &mut self,
        work: &[StepWork],
        emit: &mut dyn FnMut(JobId, StageEvent),
    ) -> Result<(), EngineError> {
        let plan: Vec<(JobId, usize)> = work
            .iter()
            .filter_map(|w| {
                let n = self.seqs.get(&w.job)?.next_chunk_len(w.token_budget);
                (n > 0).then_some((w.job, n))
            })
            .collect();
        let runnable = self.kv.reserve(&mut self.seqs, plan);
        if runnable.is_empty() {
            return Ok(());
        }
        let tables = self.kv.tables(&runnable);
        let extras = self.extras(&runnable)?;
        let extra_refs: Vec<Option<&Tensor>> = extras.iter().map(Option::as_ref).collect();
        let chunks: Vec<PagedChunk<'_>> = runnable
            .iter()
            .zip(&tables)
            .map(|((job, n), table)| {
                let seq = &self.seqs[job];
                PagedChunk {
                    tokens: &seq.tokens[seq.computed..seq.computed + n],
                    past: seq.computed,
                    block_table: table,
                    want_hidden: false,
                    splice: &[],
                }
            })
            .collect();
        let output = self
            .model
            .forward_paged_extra(&mut self.kv.pool, &chunks, &extra_refs)
            .map_err(|e| EngineError::Compute(e.to_string()))?;
        drop(chunks);
        for (row, (job, n)) in runnable.into_iter().enumerate() {
            let Some(mut seq) = self.seqs.remove(&job) else {
                continue;
            };
            seq.computed += n;
            self.kv.commit(job, &seq.tokens[..seq.cacheable_len()]);
            let consumed = seq.mark_consumed();
            if consumed > 0 && seq.cond.as_ref().is_some_and(|c| c.streaming) {
                emit(job, StageEvent::Consumed(consumed));
            }
            let mut out = Vec::new();
            let mut finished = None;
            if seq.computed == seq.tokens.len() {
                match self.sample(&mut seq, output.logits.get(row), &mut out) {
                    Ok(f) => finished = f,
                    Err(e) => {
                        self.kv.free(job);
                        emit(job, StageEvent::Failed(e));
                        continue;
                    }
                }
            }
            if !out.is_empty() {
                emit(job, StageEvent::Output(out));
            }
            match finished {
                Some(reason) => {
                    let usage = Usage {
                        prompt_tokens: seq.prompt_len,
                        completion_tokens: seq.generated().len(),
                    };
                    self.kv.free(job);
                    emit(job, StageEvent::Finished { reason, usage });
                }
                None => {
                    self.seqs.insert(job, seq);
                }
            }
        }
        Ok(())
    }

    fn release(&mut self, job: JobId) {
        if self.seqs.remove(&job).is_some() {
            self.kv.free(job);
        }
    }

    fn state_bytes(&self) -> usize {
        self.kv.state_bytes()
    }

    fn stats(&self) -> EngineStats {
        self.kv.stats()
    }
}
