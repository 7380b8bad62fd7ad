//! The paged KV state an LLM-family stage engine keeps: the pool, the block manager that hands
//! out its blocks, and the preemption policy shared by the text engine and the talker.
//!
//! Sequences that share a prompt prefix share its blocks; when blocks run out the youngest
//! sequence is preempted (its blocks freed, its tokens recomputed later), so a full pool delays
//! work but never fails or corrupts a request. Older sequences are never preempted for younger
//! ones, so the oldest always makes progress.

use super::engine::{LlmEngineError, LlmEngineSettings};
use super::generation_config::GenerationConfig;
use super::model::LlmModel;
use super::paged::PagedKvPool;
use candle_core::{DType, Tensor};
use omnistage_scheduler::kv::{BlockManager, KvConfig, KvError, SeqKey};
use omnistage_stages::{EngineError, EngineStats, HiddenStates, JobId, SamplingParams};
use std::collections::{HashMap, HashSet};

/// Pool size when the deployment names none: room for `max_batch_size` full-length sequences,
/// capped at this many bytes.
const DEFAULT_KV_CAP_BYTES: u64 = 2 << 30;

/// What the KV bookkeeping needs to know about one sequence.
pub(crate) trait KvSeq {
    /// Admission order: older sequences are never preempted for younger ones.
    fn arrival(&self) -> u64;
    /// Leading tokens whose K/V are in the pool.
    fn computed(&self) -> usize;
    fn set_computed(&mut self, computed: usize);
    /// Every token the sequence has (prompt, then generated).
    fn tokens(&self) -> &[u32];
    /// Root of the prefix-cache hash chain: only sequences with the same salt share blocks.
    fn salt(&self) -> u64 {
        0
    }
    /// Clamps a planned chunk of `n` tokens to what the sequence can run now (after a restart
    /// may have moved `computed`). 0 means it cannot run this step.
    fn clamp_chunk(&self, n: usize) -> usize {
        n.min(self.tokens().len() - self.computed()).max(1)
    }
}

/// The paged KV pool of one engine and the block manager over it.
pub(crate) struct KvState {
    pub pool: PagedKvPool,
    pub blocks: BlockManager,
    pub bytes_per_block: usize,
    pub preemptions: u64,
}

impl KvState {
    /// Sizes and allocates the pool for `model` under `settings`. Returns the state and the
    /// longest sequence it admits (model limit, deployment limit and pool size).
    pub fn new(
        model: &LlmModel,
        settings: &LlmEngineSettings,
    ) -> Result<(Self, usize), LlmEngineError> {
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
        let state = Self {
            pool,
            blocks: BlockManager::new(kv),
            bytes_per_block,
            preemptions: 0,
        };
        Ok((state, max_model_len))
    }

    /// Opens the job's block table; returns how many prompt tokens were found cached.
    pub fn start(&mut self, job: JobId, prompt: &[u32], salt: u64) -> Result<usize, EngineError> {
        self.blocks
            .start_with_salt(SeqKey(job.0), prompt, salt)
            .map_err(|e| EngineError::Compute(format!("kv cache: {e}")))
    }

    /// Records the job's first `tokens.len()` tokens as computed (registers full blocks in the
    /// prefix cache).
    pub fn commit(&mut self, job: JobId, tokens: &[u32]) {
        if let Err(e) = self.blocks.commit(SeqKey(job.0), tokens) {
            tracing::warn!(%job, "kv commit failed: {e}");
        }
    }

    /// Frees the job's blocks (a no-op for an unknown job).
    pub fn free(&mut self, job: JobId) {
        self.blocks.free(SeqKey(job.0));
    }

    /// The block ids of each job's table, in `jobs` order.
    pub fn tables(&self, jobs: &[(JobId, usize)]) -> Vec<Vec<u32>> {
        jobs.iter()
            .map(|(job, _)| {
                self.blocks
                    .block_table(SeqKey(job.0))
                    .map(|t| t.iter().map(|b| b.0).collect())
                    .unwrap_or_default()
            })
            .collect()
    }

    /// Drops a sequence's KV blocks so it is recomputed later (it keeps its tokens and sampler).
    fn preempt<S: KvSeq>(&mut self, seqs: &mut HashMap<JobId, S>, job: JobId) {
        if let Some(seq) = seqs.get_mut(&job) {
            self.blocks.free(SeqKey(job.0));
            seq.set_computed(0);
            self.preemptions += 1;
            tracing::debug!(%job, tokens = seq.tokens().len(), "preempted: KV blocks freed for recompute");
        }
    }

    /// Reserves pool room for each planned chunk, oldest sequence first, preempting younger
    /// sequences when blocks run out. Returns the chunks that can run this step.
    pub fn reserve<S: KvSeq>(
        &mut self,
        seqs: &mut HashMap<JobId, S>,
        mut plan: Vec<(JobId, usize)>,
    ) -> Vec<(JobId, usize)> {
        plan.sort_by_key(|(job, _)| seqs.get(job).map_or(u64::MAX, |s| s.arrival()));
        let mut runnable = Vec::with_capacity(plan.len());
        let mut preempted: HashSet<JobId> = HashSet::new();
        for (job, n) in plan {
            if preempted.contains(&job) {
                continue;
            }
            let Some(seq) = seqs.get(&job) else {
                continue;
            };
            let (arrival, computed) = (seq.arrival(), seq.computed());
            let key = SeqKey(job.0);
            if computed == 0 && !self.blocks.contains(key) {
                // Preempted earlier: start over (its prompt prefix may still be cached).
                let tokens = seq.tokens();
                match self
                    .blocks
                    .start_with_salt(key, &tokens[..tokens.len() - 1], seq.salt())
                {
                    Ok(cached) => {
                        if let Some(seq) = seqs.get_mut(&job) {
                            seq.set_computed(cached);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%job, "kv restart failed: {e}");
                        continue;
                    }
                }
            }
            let seq = &seqs[&job];
            let n = seq.clamp_chunk(n);
            if n == 0 {
                continue;
            }
            let need = seq.computed() + n;
            loop {
                match self.blocks.reserve(key, need) {
                    Ok(()) => {
                        runnable.push((job, n));
                        break;
                    }
                    Err(KvError::OutOfBlocks { .. }) => {
                        let victim = seqs
                            .iter()
                            .filter(|(j, s)| {
                                s.arrival() > arrival
                                    && !preempted.contains(j)
                                    && self.blocks.contains(SeqKey(j.0))
                            })
                            .max_by_key(|(_, s)| s.arrival())
                            .map(|(j, _)| *j);
                        match victim {
                            Some(v) => {
                                self.preempt(seqs, v);
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

    /// Bytes of the blocks live sequences hold.
    pub fn state_bytes(&self) -> usize {
        self.blocks.stats().used_blocks * self.bytes_per_block
    }

    /// Pool and prefix-cache figures.
    pub fn stats(&self) -> EngineStats {
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

/// The sampling defaults a checkpoint's `generation_config.json` gives.
pub(crate) fn checkpoint_sampling(generation: &GenerationConfig) -> SamplingParams {
    SamplingParams {
        temperature: generation.temperature,
        top_p: generation.top_p,
        top_k: generation.top_k,
        repetition_penalty: generation.repetition_penalty,
        max_tokens: generation.max_new_tokens,
        ..Default::default()
    }
}

/// Rows of a `[rows, dim]` hidden-state tensor as f32 host data.
pub(crate) fn hidden_rows(hidden: &Tensor) -> candle_core::Result<HiddenStates> {
    let hidden = hidden.to_dtype(DType::F32)?;
    let (_, dim) = hidden.dims2()?;
    Ok(HiddenStates::new(
        hidden.flatten_all()?.to_vec1::<f32>()?,
        dim,
    ))
}
