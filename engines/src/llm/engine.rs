//! The LLM stage engine: continuous batching over [`LlmModel`], one KV cache, sampler, detokenizer
//! and stop matcher per sequence.

use super::chat_template::ChatTemplate;
use super::generation_config::GenerationConfig;
use super::model::{LlmModel, SeqChunk, SeqKvCache};
use super::sampling::{ResolvedSampling, Sampler};
use super::stop::{StopCheck, StopMatcher};
use super::tokenizer::{StreamDecoder, TextTokenizer};
use candle_core::{DType, Device, Tensor};
use omnistage_stages::{
    ChatMessage, EngineError, FinishReason, HiddenStates, JobId, Payload, Prompt, SamplingParams,
    StageEngine, StageEvent, StageInput, StepWork, Usage,
};
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// Stage-level settings of an LLM engine (from the deployment file).
#[derive(Debug, Clone, Default)]
pub struct LlmEngineSettings {
    /// Longest prompt + generation accepted; `None` = the model's `max_position_embeddings`.
    pub max_model_len: Option<usize>,
    /// The stage's default sampling (requests override field by field).
    pub sampling: SamplingParams,
    /// Emit final-layer hidden states as `Payload::Hidden` for downstream stages.
    pub emit_hidden: bool,
}

/// Why an LLM engine could not be built.
#[derive(Debug, thiserror::Error)]
pub enum LlmEngineError {
    #[error("loading model from {dir}: {message}")]
    Load { dir: String, message: String },
}

/// One sequence in the running batch.
struct Sequence {
    prompt: Vec<u32>,
    prefilled: usize,
    generated: Vec<u32>,
    cache: SeqKvCache,
    sampler: Sampler,
    decoder: StreamDecoder,
    stops: StopMatcher,
    stop_ids: HashSet<u32>,
    max_tokens: usize,
}

impl Sequence {
    fn pending_prefill(&self) -> usize {
        self.prompt.len() - self.prefilled
    }
}

/// A batched LLM stage engine.
pub struct LlmEngine {
    model: LlmModel,
    tokenizer: TextTokenizer,
    template: Option<ChatTemplate>,
    defaults: SamplingParams,
    eos_ids: Vec<u32>,
    max_model_len: usize,
    emit_hidden: bool,
    seqs: HashMap<JobId, Sequence>,
}

impl LlmEngine {
    /// Loads model, tokenizer, chat template and generation config from a checkpoint directory.
    pub fn load(
        dir: &Path,
        dtype: DType,
        device: &Device,
        settings: LlmEngineSettings,
    ) -> Result<Self, LlmEngineError> {
        let load_err = |message: String| LlmEngineError::Load {
            dir: dir.display().to_string(),
            message,
        };
        let model = LlmModel::load(dir, dtype, device).map_err(|e| load_err(e.to_string()))?;
        let tokenizer = TextTokenizer::load(dir).map_err(|e| load_err(e.to_string()))?;
        let template = ChatTemplate::load(dir).map_err(|e| load_err(e.to_string()))?;
        let generation = GenerationConfig::load(dir).map_err(|e| load_err(e.to_string()))?;
        Ok(Self::new(model, tokenizer, template, generation, settings))
    }

    /// Assembles an engine from loaded parts.
    pub fn new(
        model: LlmModel,
        tokenizer: TextTokenizer,
        template: Option<ChatTemplate>,
        generation: GenerationConfig,
        settings: LlmEngineSettings,
    ) -> Self {
        let checkpoint_defaults = SamplingParams {
            temperature: generation.temperature,
            top_p: generation.top_p,
            top_k: generation.top_k,
            repetition_penalty: generation.repetition_penalty,
            max_tokens: generation.max_new_tokens,
            ..Default::default()
        };
        let mut eos_ids = generation.eos_token_ids.clone();
        if let Some(ids) = &model.config().eos_token_ids {
            eos_ids.extend(ids.iter().copied());
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        let model_limit = model.config().max_position_embeddings;
        let max_model_len = settings
            .max_model_len
            .map_or(model_limit, |l| l.min(model_limit));
        Self {
            defaults: settings.sampling.or(&checkpoint_defaults),
            model,
            tokenizer,
            template,
            eos_ids,
            max_model_len,
            emit_hidden: settings.emit_hidden,
            seqs: HashMap::new(),
        }
    }

    pub fn model(&self) -> &LlmModel {
        &self.model
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// Number of sequences currently holding state.
    pub fn active_sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Renders chat messages with the checkpoint's template.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        let template = self.template.as_ref().ok_or_else(|| {
            EngineError::InvalidInput("this model has no chat template; use /v1/completions".into())
        })?;
        template
            .render(messages, true)
            .map_err(|e| EngineError::InvalidInput(format!("chat template: {e}")))
    }

    /// Token ids of the job's prompt: upstream tokens, upstream text (as a user turn), or the
    /// request's own prompt.
    fn prompt_tokens(&self, input: &StageInput) -> Result<Vec<u32>, EngineError> {
        let encode = |text: &str, specials: bool| {
            self.tokenizer
                .encode(text, specials)
                .map_err(|e| EngineError::InvalidInput(format!("tokenizer: {e}")))
        };
        if let Some(Payload::Tokens(ids)) = input
            .upstream
            .iter()
            .find(|p| matches!(p, Payload::Tokens(_)))
        {
            return Ok(ids.to_vec());
        }
        if let Some(Payload::Text(text)) = input
            .upstream
            .iter()
            .find(|p| matches!(p, Payload::Text(_)))
        {
            let messages = [ChatMessage {
                role: "user".into(),
                content: text.to_string(),
            }];
            return match self.template {
                Some(_) => encode(&self.render_chat(&messages)?, false),
                None => encode(text, true),
            };
        }
        match &input.request.prompt {
            Prompt::Chat(messages) => encode(&self.render_chat(messages)?, false),
            Prompt::Completion(text) => encode(text, true),
        }
    }

    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }

    /// Samples the next token of a sequence whose prompt is fully prefilled and reports it.
    /// Returns the finish reason when the sequence is done.
    fn advance(
        seq: &mut Sequence,
        logits: &Tensor,
        tokenizer: &TextTokenizer,
        max_model_len: usize,
        out: &mut Vec<Payload>,
    ) -> Result<Option<FinishReason>, EngineError> {
        let compute = |e: candle_core::Error| EngineError::Compute(e.to_string());
        let context: Vec<u32> = seq
            .prompt
            .iter()
            .chain(seq.generated.iter())
            .copied()
            .collect();
        let token = seq.sampler.sample(logits, &context).map_err(compute)?;
        if seq.stop_ids.contains(&token) {
            let tail = seq.stops.flush();
            if !tail.is_empty() {
                out.push(Payload::Text(tail.into()));
            }
            return Ok(Some(FinishReason::Stop));
        }
        seq.generated.push(token);
        out.push(Payload::Tokens(vec![token].into()));
        let piece = seq
            .decoder
            .push(tokenizer, token)
            .map_err(|e| EngineError::Compute(format!("detokenize: {e}")))?
            .unwrap_or_default();
        match seq.stops.push(&piece) {
            StopCheck::Stopped(text) => {
                if !text.is_empty() {
                    out.push(Payload::Text(text.into()));
                }
                return Ok(Some(FinishReason::Stop));
            }
            StopCheck::Continue(text) => {
                if !text.is_empty() {
                    out.push(Payload::Text(text.into()));
                }
            }
        }
        let at_length = seq.generated.len() >= seq.max_tokens
            || seq.prompt.len() + seq.generated.len() >= max_model_len;
        if at_length {
            let mut tail = seq
                .decoder
                .flush(tokenizer)
                .ok()
                .flatten()
                .unwrap_or_default();
            tail = match seq.stops.push(&tail) {
                StopCheck::Stopped(t) => t,
                StopCheck::Continue(t) => t + &seq.stops.flush(),
            };
            if !tail.is_empty() {
                out.push(Payload::Text(tail.into()));
            }
            return Ok(Some(FinishReason::Length));
        }
        Ok(None)
    }
}

impl StageEngine for LlmEngine {
    fn admit(&mut self, job: JobId, input: StageInput) -> Result<usize, EngineError> {
        let prompt = self.prompt_tokens(&input)?;
        if prompt.is_empty() {
            return Err(EngineError::InvalidInput("the prompt is empty".into()));
        }
        if let Some(bad) = prompt.iter().find(|t| **t as usize >= self.vocab_size()) {
            return Err(EngineError::InvalidInput(format!(
                "token id {bad} is outside the model's vocabulary of {}",
                self.vocab_size()
            )));
        }
        if prompt.len() >= self.max_model_len {
            return Err(EngineError::InvalidInput(format!(
                "the prompt has {} tokens; this model accepts at most {} tokens of prompt and completion",
                prompt.len(),
                self.max_model_len
            )));
        }
        let params = input.sampling().or(&self.defaults);
        let room = self.max_model_len - prompt.len();
        let max_tokens = params.max_tokens.unwrap_or(room).min(room);
        if max_tokens == 0 {
            return Err(EngineError::InvalidInput(
                "max_tokens must be at least 1".into(),
            ));
        }
        let mut stop_ids: HashSet<u32> = params.stop_token_ids.iter().copied().collect();
        if !params.ignore_eos {
            stop_ids.extend(self.eos_ids.iter().copied());
        }
        let prefill = prompt.len();
        let seq = Sequence {
            prompt,
            prefilled: 0,
            generated: Vec::new(),
            cache: self.model.new_cache(),
            sampler: Sampler::new(ResolvedSampling::from_params(&params)),
            decoder: StreamDecoder::new(),
            stops: StopMatcher::new(params.stop.clone()),
            stop_ids,
            max_tokens,
        };
        self.seqs.insert(job, seq);
        Ok(prefill)
    }

    fn pending_input(&self, job: JobId) -> usize {
        self.seqs.get(&job).map_or(0, Sequence::pending_prefill)
    }

    fn step(
        &mut self,
        work: &[StepWork],
        emit: &mut dyn FnMut(JobId, StageEvent),
    ) -> Result<(), EngineError> {
        // Take the stepping sequences out of the map so each can lend its cache mutably.
        let mut active: Vec<(JobId, Sequence, Vec<u32>)> = Vec::with_capacity(work.len());
        for w in work {
            let Some(seq) = self.seqs.remove(&w.job) else {
                continue;
            };
            let tokens = match seq.pending_prefill() {
                0 => vec![*seq.generated.last().or(seq.prompt.last()).unwrap_or(&0)],
                pending => {
                    let take = pending.min(w.token_budget.max(1));
                    seq.prompt[seq.prefilled..seq.prefilled + take].to_vec()
                }
            };
            active.push((w.job, seq, tokens));
        }
        if active.is_empty() {
            return Ok(());
        }
        let forward = {
            let mut chunks: Vec<SeqChunk<'_>> = active
                .iter_mut()
                .map(|(_, seq, tokens)| SeqChunk {
                    tokens,
                    cache: &mut seq.cache,
                    want_hidden: self.emit_hidden,
                })
                .collect();
            self.model.forward(&mut chunks)
        };
        let output = match forward {
            Ok(o) => o,
            Err(e) => {
                // Put the sequences back; the scheduler releases every job of a failed step.
                for (job, seq, _) in active {
                    self.seqs.insert(job, seq);
                }
                return Err(EngineError::Compute(e.to_string()));
            }
        };
        for (row, (job, mut seq, tokens)) in active.into_iter().enumerate() {
            let mut out = Vec::new();
            if let Some(Some(hidden)) = output.hidden.get(row) {
                match hidden_rows(hidden) {
                    Ok(h) => out.push(Payload::Hidden(h)),
                    Err(e) => {
                        emit(job, StageEvent::Failed(EngineError::Compute(e.to_string())));
                        continue;
                    }
                }
            }
            let was_prefilling = seq.pending_prefill() > 0;
            if was_prefilling {
                seq.prefilled += tokens.len();
            }
            let mut finished = None;
            if seq.pending_prefill() == 0 {
                let logits = output
                    .logits
                    .get(row)
                    .map_err(|e| EngineError::Compute(e.to_string()));
                match logits.and_then(|l| {
                    Self::advance(&mut seq, &l, &self.tokenizer, self.max_model_len, &mut out)
                }) {
                    Ok(f) => finished = f,
                    Err(e) => {
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
                        prompt_tokens: seq.prompt.len(),
                        completion_tokens: seq.generated.len(),
                    };
                    drop(seq);
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
        self.seqs.remove(&job);
    }

    fn state_bytes(&self) -> usize {
        self.seqs.values().map(|s| s.cache.bytes()).sum()
    }
}

fn hidden_rows(hidden: &Tensor) -> candle_core::Result<HiddenStates> {
    let hidden = hidden.to_dtype(DType::F32)?;
    let (_, dim) = hidden.dims2()?;
    Ok(HiddenStates::new(
        hidden.flatten_all()?.to_vec1::<f32>()?,
        dim,
    ))
}
