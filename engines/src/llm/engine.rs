//! The LLM stage engine: continuous batching over [`LlmModel`] with a paged KV pool.
//!
//! The pool's blocks are managed by the scheduler crate's [`BlockManager`]: sequences that share a
//! prompt prefix share its blocks, and when blocks run out the youngest sequence is preempted
//! (its blocks freed, its tokens recomputed later), so a full pool delays work but never fails or
//! corrupts a request. Older sequences are never preempted for younger ones, so the oldest always
//! makes progress.

use super::chat_template::ChatTemplate;
use super::generation_config::GenerationConfig;
use super::model::LlmModel;
use super::paged::{PagedChunk, PagedKvPool};
use super::sampling::{ResolvedSampling, Sampler};
use super::sequence::Sequence;
use super::stop::StopMatcher;
use super::tokenizer::{StreamDecoder, TextTokenizer};
use candle_core::{DType, Device, Tensor};
use omnistage_scheduler::kv::{BlockManager, KvConfig, KvError, SeqKey};
use omnistage_stages::{
    ChatMessage, EngineError, EngineStats, HiddenStates, JobId, Payload, Prompt, SamplingParams,
    StageEngine, StageEvent, StageInput, StepWork, Usage,
};
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// Pool size when the deployment names none: room for `max_batch_size` full-length sequences,
/// capped at this many bytes.
const DEFAULT_KV_CAP_BYTES: u64 = 2 << 30;

/// Stage-level settings of an LLM engine (from the deployment file).
#[derive(Debug, Clone)]
pub struct LlmEngineSettings {
    /// Longest prompt + generation accepted; `None` = the model's `max_position_embeddings`.
    pub max_model_len: Option<usize>,
    /// The stage's default sampling (requests override field by field).
    pub sampling: SamplingParams,
    /// Emit final-layer hidden states as `Payload::Hidden` for downstream stages.
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
    pool: PagedKvPool,
    blocks: BlockManager,
    bytes_per_block: usize,
    seqs: HashMap<JobId, Sequence>,
    next_arrival: u64,
    preemptions: u64,
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
        Self::new(model, tokenizer, template, generation, settings)
    }

    /// Assembles an engine from loaded parts and allocates its KV pool.
    pub fn new(
        model: LlmModel,
        tokenizer: TextTokenizer,
        template: Option<ChatTemplate>,
        generation: GenerationConfig,
        settings: LlmEngineSettings,
    ) -> Result<Self, LlmEngineError> {
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
        let block_size = settings.kv_block_size.max(1);
        let bytes_per_block =
            PagedKvPool::bytes_per_block(model.config(), block_size, model.dtype());
        let budget = settings.kv_cache_bytes.unwrap_or_else(|| {
            let blocks = settings.max_batch_size.max(1) * max_model_len.div_ceil(block_size);
            (blocks as u64 * bytes_per_block as u64).min(DEFAULT_KV_CAP_BYTES)
        });
        let mut kv = KvConfig::from_budget(budget as usize, bytes_per_block, block_size)
            .map_err(|e| LlmEngineError::KvCache(e.to_string()))?;
        kv.enable_prefix_cache = settings.prefix_caching;
        let pool = PagedKvPool::new(
            model.config(),
            kv.num_blocks,
            block_size,
            model.dtype(),
            model.device(),
        )
        .map_err(|e| LlmEngineError::KvCache(e.to_string()))?;
        // A lone sequence must always fit, so nothing may grow past the pool.
        let max_model_len = max_model_len.min(kv.num_blocks * block_size);
        Ok(Self {
            defaults: settings.sampling.or(&checkpoint_defaults),
            model,
            tokenizer,
            template,
            eos_ids,
            max_model_len,
            emit_hidden: settings.emit_hidden,
            pool,
            blocks: BlockManager::new(kv),
            bytes_per_block,
            seqs: HashMap::new(),
            next_arrival: 0,
            preemptions: 0,
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

    /// Drops a sequence's KV blocks so it is recomputed later (it keeps its tokens and sampler).
    fn preempt(&mut self, job: JobId) {
        if let Some(seq) = self.seqs.get_mut(&job) {
            self.blocks.free(SeqKey(job.0));
            seq.computed = 0;
            self.preemptions += 1;
            tracing::debug!(%job, tokens = seq.tokens.len(), "preempted: KV blocks freed for recompute");
        }
    }

    /// Reserves pool room for each planned chunk, oldest sequence first, preempting younger
    /// sequences when blocks run out. Returns the chunks that can run this step.
    fn reserve_blocks(&mut self, mut plan: Vec<(JobId, usize)>) -> Vec<(JobId, usize)> {
        plan.sort_by_key(|(job, _)| self.seqs.get(job).map_or(u64::MAX, |s| s.arrival));
        let mut runnable = Vec::with_capacity(plan.len());
        let mut preempted: HashSet<JobId> = HashSet::new();
        for (job, n) in plan {
            if preempted.contains(&job) {
                continue;
            }
            let Some(seq) = self.seqs.get(&job) else {
                continue;
            };
            let (arrival, computed) = (seq.arrival, seq.computed);
            let key = SeqKey(job.0);
            if computed == 0 && !self.blocks.contains(key) {
                // Preempted earlier: start over (its prompt prefix may still be cached).
                let tokens = self.seqs[&job].tokens.clone();
                match self.blocks.start(key, &tokens[..tokens.len() - 1]) {
                    Ok(cached) => {
                        if let Some(seq) = self.seqs.get_mut(&job) {
                            seq.computed = cached;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%job, "kv restart failed: {e}");
                        continue;
                    }
                }
            }
            let seq = &self.seqs[&job];
            let n = n.min(seq.tokens.len() - seq.computed).max(1);
            let need = seq.computed + n;
            loop {
                match self.blocks.reserve(key, need) {
                    Ok(()) => {
                        runnable.push((job, n));
                        break;
                    }
                    Err(KvError::OutOfBlocks { .. }) => {
                        let victim = self
                            .seqs
                            .iter()
                            .filter(|(j, s)| {
                                s.arrival > arrival
                                    && !preempted.contains(j)
                                    && self.blocks.contains(SeqKey(j.0))
                            })
                            .max_by_key(|(_, s)| s.arrival)
                            .map(|(j, _)| *j);
                        match victim {
                            Some(v) => {
                                self.preempt(v);
                                preempted.insert(v);
                                runnable.retain(|(j, _)| *j != v);
                            }
                            // The youngest waits for room; it keeps what it has.
                            None => break,
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%job, "kv reserve failed: {e}");
                        break;
                    }
                }
            }
        }
        runnable
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
        let cached = self
            .blocks
            .start(SeqKey(job.0), &prompt)
            .map_err(|e| EngineError::Compute(format!("kv cache: {e}")))?;
        let seq = Sequence {
            arrival: self.next_arrival,
            prompt_len: prompt.len(),
            tokens: prompt,
            computed: cached,
            sampler: Sampler::new(ResolvedSampling::from_params(&params)),
            decoder: StreamDecoder::new(),
            stops: StopMatcher::new(params.stop.clone()),
            stop_ids,
            max_tokens,
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
        let runnable = self.reserve_blocks(plan);
        if runnable.is_empty() {
            return Ok(());
        }
        let tables: Vec<Vec<u32>> = runnable
            .iter()
            .map(|(job, _)| {
                self.blocks
                    .block_table(SeqKey(job.0))
                    .map(|t| t.iter().map(|b| b.0).collect())
                    .unwrap_or_default()
            })
            .collect();
        let chunks: Vec<PagedChunk<'_>> = runnable
            .iter()
            .zip(&tables)
            .map(|((job, n), table)| {
                let seq = &self.seqs[job];
                PagedChunk {
                    tokens: &seq.tokens[seq.computed..seq.computed + n],
                    past: seq.computed,
                    block_table: table,
                    want_hidden: self.emit_hidden,
                }
            })
            .collect();
        let output = self
            .model
            .forward_paged(&mut self.pool, &chunks)
            .map_err(|e| EngineError::Compute(e.to_string()))?;
        drop(chunks);
        for (row, (job, n)) in runnable.into_iter().enumerate() {
            let Some(mut seq) = self.seqs.remove(&job) else {
                continue;
            };
            let mut out = Vec::new();
            if let Some(Some(hidden)) = output.hidden.get(row) {
                match hidden_rows(hidden) {
                    Ok(h) => out.push(Payload::Hidden(h)),
                    Err(e) => {
                        self.blocks.free(SeqKey(job.0));
                        emit(job, StageEvent::Failed(EngineError::Compute(e.to_string())));
                        continue;
                    }
                }
            }
            seq.computed += n;
            if let Err(e) = self
                .blocks
                .commit(SeqKey(job.0), &seq.tokens[..seq.computed])
            {
                tracing::warn!(%job, "kv commit failed: {e}");
            }
            let mut finished = None;
            if seq.computed == seq.tokens.len() {
                let logits = output
                    .logits
                    .get(row)
                    .map_err(|e| EngineError::Compute(e.to_string()));
                match logits.and_then(|l| seq.advance(&l, &self.tokenizer, &mut out)) {
                    Ok(f) => finished = f,
                    Err(e) => {
                        self.blocks.free(SeqKey(job.0));
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
                    self.blocks.free(SeqKey(job.0));
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
            self.blocks.free(SeqKey(job.0));
        }
    }

    fn state_bytes(&self) -> usize {
        self.blocks.stats().used_blocks * self.bytes_per_block
    }

    fn stats(&self) -> EngineStats {
        let kv = self.blocks.stats();
        EngineStats {
            state_bytes: kv.used_blocks * self.bytes_per_block,
            kv_blocks_used: kv.used_blocks,
            kv_blocks_total: kv.total_blocks,
            kv_blocks_cached: kv.cached_blocks,
            preemptions_total: self.preemptions,
            prefix_query_tokens_total: kv.prefix_query_tokens,
            prefix_hit_tokens_total: kv.prefix_hit_tokens,
            ..EngineStats::default()
        }
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
