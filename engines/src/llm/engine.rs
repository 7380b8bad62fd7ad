//! The LLM stage engine: continuous batching over [`LlmModel`] with a paged KV pool.
//!
//! The pool's blocks are managed by the scheduler crate's block manager (see [`super::kv`]):
//! sequences that share a prompt prefix share its blocks, and when blocks run out the youngest
//! sequence is preempted and recomputed later, so a full pool delays work but never fails or
//! corrupts a request.
//!
//! With `emit_hidden`, each generated token comes with one `Payload::Hidden` row in the same
//! output event: the final-norm hidden state of the position whose logits produced it (the last
//! prompt position for the first token, then each decode position). Prompt rows are not sent.

use super::chat_template::ChatTemplate;
use super::generation::Generation;
use super::generation_config::GenerationConfig;
use super::kv::{checkpoint_sampling, hidden_rows, KvState};
use super::model::LlmModel;
use super::paged::PagedChunk;
use super::sequence::Sequence;
use super::splice::{chunk_splice, splice_prompt, MediaPlaceholders};
use super::tokenizer::TextTokenizer;
use candle_core::{DType, Device};
use omnistage_stages::{
    ChatMessage, EngineError, EngineStats, JobId, Payload, Prompt, SamplingParams, StageEngine,
    StageEvent, StageInput, StepWork, Usage,
};
use std::collections::HashMap;
use std::path::Path;

/// Stage-level settings of an LLM engine (from the deployment file).
#[derive(Debug, Clone)]
pub struct LlmEngineSettings {
    /// Longest prompt + generation accepted; `None` = the model's `max_position_embeddings`.
    pub max_model_len: Option<usize>,
    /// The stage's default sampling (requests override field by field).
    pub sampling: SamplingParams,
    /// Emit final-layer hidden states as `Payload::Hidden` for downstream stages: one row per
    /// generated token, in the output event of that token.
    pub emit_hidden: bool,
    /// Bytes for the paged KV pool; `None` = sized for `max_batch_size` full-length sequences
    /// (at most 2 GiB).
    pub kv_cache_bytes: Option<u64>,
    /// Tokens per KV block.
    pub kv_block_size: usize,
    /// Share KV blocks of identical prompt prefixes between requests.
    pub prefix_caching: bool,
    /// The stage's batch size, for sizing the default pool.
    pub max_batch_size: usize,
}

impl Default for LlmEngineSettings {
    fn default() -> Self {
        Self {
            max_model_len: None,
            sampling: SamplingParams::default(),
            emit_hidden: false,
            kv_cache_bytes: None,
            kv_block_size: 16,
            prefix_caching: true,
            max_batch_size: 32,
        }
    }
}

/// Why an LLM engine could not be built.
#[derive(Debug, thiserror::Error)]
pub enum LlmEngineError {
    #[error("loading model from {dir}: {message}")]
    Load { dir: String, message: String },
    #[error("kv cache: {0}")]
    KvCache(String),
    /// The `[stage.talker]` settings do not fit the checkpoint.
    #[error("talker settings: {0}")]
    Talker(String),
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
    kv: KvState,
    seqs: HashMap<JobId, Sequence>,
    next_arrival: u64,
    placeholders: MediaPlaceholders,
}

impl LlmEngine {
    /// Loads model, tokenizer, chat template and generation config from a checkpoint directory
    /// and allocates the KV pool.
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
        let placeholders = MediaPlaceholders::load(dir).map_err(load_err)?;
        Ok(Self::new(model, tokenizer, template, generation, settings)?
            .with_media_placeholders(placeholders))
    }

    /// Sets the token ids that stand for images and audio in prompts (read from `config.json`
    /// by [`Self::load`]).
    pub fn with_media_placeholders(mut self, placeholders: MediaPlaceholders) -> Self {
        self.placeholders = placeholders;
        self
    }

    /// The token ids that stand for images and audio in prompts.
    pub fn media_placeholders(&self) -> MediaPlaceholders {
        self.placeholders
    }

    /// Assembles an engine from loaded parts and allocates its KV pool.
    pub fn new(
        model: LlmModel,
        tokenizer: TextTokenizer,
        template: Option<ChatTemplate>,
        generation: GenerationConfig,
        settings: LlmEngineSettings,
    ) -> Result<Self, LlmEngineError> {
        let checkpoint_defaults = checkpoint_sampling(&generation);
        let mut eos_ids = generation.eos_token_ids.clone();
        if let Some(ids) = &model.config().eos_token_ids {
            eos_ids.extend(ids.iter().copied());
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        let (kv, max_model_len) = KvState::new(&model, &settings)?;
        Ok(Self {
            defaults: settings.sampling.or(&checkpoint_defaults),
            model,
            tokenizer,
            template,
            eos_ids,
            max_model_len,
            emit_hidden: settings.emit_hidden,
            kv,
            seqs: HashMap::new(),
            next_arrival: 0,
            placeholders: MediaPlaceholders::default(),
        })
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

    /// Longest prompt + completion a sequence may reach (model limit, deployment limit and pool).
    pub fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    /// Renders chat messages with the checkpoint's template.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        super::prompt::render_chat(self.template.as_ref(), messages)
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
            let messages = [ChatMessage::text("user", text)];
            return match self.template {
                Some(_) => encode(&self.render_chat(&messages)?, false),
                None => encode(text, true),
            };
        }
        match &input.request.prompt {
            Prompt::Chat(messages) => encode(&self.render_chat(messages)?, false),
            Prompt::Completion(text) => encode(text, true),
            // The context for speaking: the text as a user turn; the forced output is the text.
            Prompt::Speak(text) => match self.template {
                Some(_) => {
                    let messages = [ChatMessage::text("user", text)];
                    encode(&self.render_chat(&messages)?, false)
                }
                None => encode(text, true),
            },
            Prompt::Tokens(ids) => match ids.iter().find(|&&t| t as usize >= self.vocab_size()) {
                Some(t) => Err(EngineError::InvalidInput(format!(
                    "prompt token id {t} is outside the vocabulary of {} tokens",
                    self.vocab_size()
                ))),
                None => Ok(ids.clone()),
            },
        }
    }

    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }
}

impl StageEngine for LlmEngine {
    fn admit(&mut self, job: JobId, input: StageInput) -> Result<usize, EngineError> {
        let embedded: Vec<_> = input
            .upstream
            .iter()
            .flat_map(|p| match p {
                Payload::MediaEmbeddings(items) => items.to_vec(),
                _ => Vec::new(),
            })
            .collect();
        let spliced = splice_prompt(
            self.prompt_tokens(&input)?,
            &self.placeholders,
            &input.request.media,
            &embedded,
            self.model.config().hidden_size,
            self.model.dtype(),
            self.model.device(),
        )?;
        let prompt = spliced.tokens;
        super::prompt::check_prompt(&prompt, self.vocab_size(), self.max_model_len)?;
        let params = input.sampling().or(&self.defaults);
        let room = self.max_model_len - prompt.len();
        // Speaking: the output is the text itself, token by token, whatever the logits say.
        let forced = match (&input.request.prompt, input.upstream.is_empty()) {
            (Prompt::Speak(text), true) => self
                .tokenizer
                .encode(text, false)
                .map_err(|e| EngineError::InvalidInput(format!("tokenizer: {e}")))?,
            _ => Vec::new(),
        };
        let gen = Generation::new(&params, &self.eos_ids, room, forced)?;
        let cached = self.kv.start(job, &prompt, spliced.salt)?;
        let seq = Sequence {
            gen,
            arrival: self.next_arrival,
            prompt_len: prompt.len(),
            tokens: prompt,
            computed: cached,
            media: spliced.spans,
            salt: spliced.salt,
        };
        self.next_arrival += 1;
        let pending = seq.pending_prefill();
        self.seqs.insert(job, seq);
        Ok(pending)
    }

    fn pending_input(&self, job: JobId) -> usize {
        self.seqs.get(&job).map_or(0, Sequence::pending_prefill)
    }

    fn step(
        &mut self,
        work: &[StepWork],
        emit: &mut dyn FnMut(JobId, StageEvent),
    ) -> Result<(), EngineError> {
        let plan: Vec<(JobId, usize)> = work
            .iter()
            .filter_map(|w| Some((w.job, self.seqs.get(&w.job)?.next_chunk_len(w.token_budget))))
            .collect();
        let runnable = self.kv.reserve(&mut self.seqs, plan);
        if runnable.is_empty() {
            return Ok(());
        }
        let tables = self.kv.tables(&runnable);
        let splices = runnable
            .iter()
            .map(|(job, n)| {
                let seq = &self.seqs[job];
                chunk_splice(&seq.media, seq.computed, *n)
            })
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(|e| EngineError::Compute(e.to_string()))?;
        let chunks: Vec<PagedChunk<'_>> = runnable
            .iter()
            .zip(&tables)
            .zip(&splices)
            .map(|(((job, n), table), splice)| {
                let seq = &self.seqs[job];
                PagedChunk {
                    splice,
                    tokens: &seq.tokens[seq.computed..seq.computed + n],
                    past: seq.computed,
                    block_table: table,
                    // Only the chunk that ends at the newest token yields a row (its logits
                    // produce the next token).
                    want_hidden: self.emit_hidden && seq.computed + n == seq.tokens.len(),
                }
            })
            .collect();
        let output = self
            .model
            .forward_paged(&mut self.kv.pool, &chunks)
            .map_err(|e| EngineError::Compute(e.to_string()))?;
        drop(chunks);
        for (row, (job, n)) in runnable.into_iter().enumerate() {
            let Some(mut seq) = self.seqs.remove(&job) else {
                continue;
            };
            seq.computed += n;
            self.kv.commit(job, &seq.tokens[..seq.computed]);
            let mut out = Vec::new();
            let mut finished = None;
            if seq.computed == seq.tokens.len() {
                let logits = output
                    .logits
                    .get(row)
                    .map_err(|e| EngineError::Compute(e.to_string()));
                let advanced = logits.and_then(|l| seq.advance(&l, &self.tokenizer, &mut out));
                let hidden = match (&advanced, output.hidden.get(row)) {
                    // A row only for a token that was emitted (not for a stop token).
                    (Ok(_), Some(Some(h)))
                        if out.iter().any(|p| matches!(p, Payload::Tokens(_))) =>
                    {
                        h.narrow(0, n - 1, 1)
                            .and_then(|h| hidden_rows(&h))
                            .map(Some)
                            .map_err(|e| EngineError::Compute(e.to_string()))
                    }
                    _ => Ok(None),
                };
                match advanced.and_then(|f| Ok((f, hidden?))) {
                    Ok((f, h)) => {
                        finished = f;
                        out.extend(h.map(Payload::Hidden));
                    }
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
