//! Paged KV: one pool of fixed-size blocks per stage, and the LLM forward over block tables.
//!
//! A [`PagedKvPool`] holds, per layer, a K and a V tensor of `num_blocks * block_size` token
//! slots (`[slots, kv_heads, head_dim]`). A sequence's keys and values live in the blocks listed
//! in its block table: position `p` sits in slot `table[p / block_size] * block_size +
//! p % block_size`. Which blocks a sequence gets is decided elsewhere (the scheduler's block
//! manager); here block ids are plain `u32`. Full blocks of a shared prefix may appear in several
//! tables, read-only.
//!
//! [`LlmModel::forward_paged`] runs the same forward as [`LlmModel::forward`]. On the CPU in f32
//! each layer writes the step's new keys and values into their slots in place and runs one
//! attention kernel for the whole batch, reading every sequence's positions straight from the
//! pool ([`crate::kernels::attention`]). Elsewhere the new rows are written with `slice_set`
//! (one copy per run of consecutive slots) and each sequence's attention gathers its slots
//! (`index_select`) into a contiguous `[past + n, kv_heads, head_dim]` tensor.
//!
//! [`LlmModel::forward_paged_extra`] also adds an optional extra embedding per chunk to its token
//! embeddings (a talker's projected thinker states).

use std::collections::{HashMap, HashSet};

use candle_core::{DType, Device, Tensor};

use super::config::{LlmConfig, LlmError};
use super::model::{BatchOutput, KvAccess, LlmModel, SeqInput};
use super::paged_ops::{PoolAttention, WriteSlots};
use crate::kernels::attention::{AttnSeq, AttnShape};

/// Per-layer K and V pools for one stage: `[num_blocks * block_size, kv_heads, head_dim]` each
/// (one row per token slot), in the model dtype, on the model device.
#[derive(Debug)]
pub struct PagedKvPool {
    /// Per layer, the K and the V pool (contiguous, never reallocated: writes go in place).
    layers: Vec<(Tensor, Tensor)>,
    num_blocks: usize,
    block_size: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
}

impl PagedKvPool {
    /// A zeroed pool of `num_blocks` blocks of `block_size` tokens for every layer of `cfg`.
    pub fn new(
        cfg: &LlmConfig,
        num_blocks: usize,
        block_size: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, LlmError> {
        if num_blocks == 0 || block_size == 0 {
            return Err(LlmError::Input(format!(
                "paged kv pool needs at least one block of at least one token \
                 (num_blocks {num_blocks}, block_size {block_size})"
            )));
        }
        let slots = num_blocks
            .checked_mul(block_size)
            .filter(|&s| s <= u32::MAX as usize)
            .ok_or_else(|| {
                LlmError::Input(format!(
                    "paged kv pool of {num_blocks} blocks of {block_size} tokens has more \
                     slots than u32 indices can address"
                ))
            })?;
        let (kv_heads, head_dim) = (cfg.num_key_value_heads, cfg.head_dim);
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| {
                let k = Tensor::zeros((slots, kv_heads, head_dim), dtype, device)?;
                let v = Tensor::zeros((slots, kv_heads, head_dim), dtype, device)?;
                Ok((k, v))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            num_blocks,
            block_size,
            kv_heads,
            head_dim,
            dtype,
            device: device.clone(),
        })
    }

    /// Bytes one block takes over all layers: `2 (K, V) * layers * block_size * kv_heads *
    /// head_dim * dtype size`.
    pub fn bytes_per_block(cfg: &LlmConfig, block_size: usize, dtype: DType) -> usize {
        2 * cfg.num_hidden_layers
            * block_size
            * cfg.num_key_value_heads
            * cfg.head_dim
            * dtype.size_in_bytes()
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Number of blocks.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Bytes held by the pool's K and V tensors.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * self.dtype.size_in_bytes())
            .sum()
    }

    /// The dtype of the pool.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The K and V pools of `layer` (`[num_blocks * block_size, kv_heads, head_dim]`), for
    /// inspection. They share storage with the pool: read them, do not write them.
    pub fn layer(&self, layer: usize) -> Option<(&Tensor, &Tensor)> {
        self.layers.get(layer).map(|(k, v)| (k, v))
    }
}

/// One sequence's part of a paged forward.
#[derive(Debug, Clone, Copy)]
pub struct PagedChunk<'a> {
    /// New tokens: a prefill chunk or one decode token. Non-empty.
    pub tokens: &'a [u32],
    /// Tokens already in the pool for this sequence (positions `0..past`), i.e. the position
    /// of `tokens[0]`.
    pub past: usize,
    /// Block ids holding positions `0..past + tokens.len()` (at least that many blocks; extra
    /// trailing entries are ignored).
    pub block_table: &'a [u32],
    /// Whether to return the final hidden states of the new tokens.
    pub want_hidden: bool,
    /// Embedding rows that replace the new tokens' own at some positions: `(start, rows)`
    /// covers chunk positions `start..start + rows.dim(0)` (ascending and disjoint; `rows`
    /// `[len, hidden_size]` on the model's device). Media encoders' outputs enter this way.
    pub splice: &'a [(usize, Tensor)],
}

/// One sequence's slot plan for a step.
struct SeqPlan {
    /// `(row in the chunk, first slot, rows)` per run of consecutive slots to write.
    writes: Vec<(usize, usize, usize)>,
    /// Slots of positions `0..past + n`.
    slots: Vec<u32>,
    /// `slots` as a tensor on the pool device, made by the first layer that gathers.
    gather: Option<Tensor>,
    /// Positions already cached and new tokens.
    past: usize,
    n: usize,
}

/// [`KvAccess`] over a pool: the fused CPU kernel, or per sequence: writes each run of new
/// rows in place and gathers the context.
struct PagedKv<'p> {
    pool: &'p PagedKvPool,
    plans: Vec<SeqPlan>,
}

impl PagedKv<'_> {
    /// Whether the fused CPU kernels apply (f32 pool on the CPU).
    fn fused(&self) -> bool {
        self.pool.device.is_cpu() && self.pool.dtype == DType::F32
    }
}

impl KvAccess for PagedKv<'_> {
    fn store_and_load(
        &mut self,
        layer: usize,
        seq: usize,
        _past: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (pk, pv) = &self.pool.layers[layer];
        let plan = &mut self.plans[seq];
        let gather = match &plan.gather {
            Some(g) => g.clone(),
            None => {
                let g = Tensor::new(plan.slots.as_slice(), &self.pool.device)?;
                plan.gather = Some(g.clone());
                g
            }
        };
        for &(row, slot, len) in &plan.writes {
            // slice_set copies into the pool's own storage (checked contiguous, no realloc).
            pk.slice_set(&k.narrow(0, row, len)?.contiguous()?, 0, slot)?;
            pv.slice_set(&v.narrow(0, row, len)?.contiguous()?, 0, slot)?;
        }
        // [len, kv_heads, d] -> [kv_heads, len, d]. The CPU matmul takes the strided view as
        // is; cuBLAS needs unit-stride rows of length d, so copy there.
        let load = |pool: &Tensor| -> candle_core::Result<Tensor> {
            let t = pool.index_select(&gather, 0)?.transpose(0, 1)?;
            if self.pool.device.is_cpu() {
                Ok(t)
            } else {
                t.contiguous()
            }
        };
        Ok((load(pk)?, load(pv)?))
    }

    fn attend_all(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f32,
    ) -> Option<candle_core::Result<Tensor>> {
        if !self.fused() {
            return None;
        }
        let (pk, pv) = &self.pool.layers[layer];
        let new_slots: Vec<u32> = self
            .plans
            .iter()
            .flat_map(|p| p.slots[p.past..].iter().copied())
            .collect();
        let mut q_offset = 0;
        let seqs = self
            .plans
            .iter()
            .map(|p| {
                let s = AttnSeq {
                    q_offset,
                    n: p.n,
                    past: p.past,
                    slots: &p.slots,
                };
                q_offset += p.n;
                s
            })
            .collect();
        let op = PoolAttention {
            shape: AttnShape {
                nq: q.dim(1).ok()?,
                nkv: self.pool.kv_heads,
                head_dim: self.pool.head_dim,
                scale,
            },
            seqs,
        };
        let write = WriteSlots { slots: &new_slots };
        Some(
            pk.inplace_op2(k, &write)
                .and_then(|()| pv.inplace_op2(v, &write))
                .and_then(|()| q.apply_op3_no_bwd(pk, pv, &op)),
        )
    }
}

/// Checks every chunk's table against the pool and the other chunks, and plans its writes and
/// gather. Nothing is written: on error the pool is untouched.
fn plan(pool: &PagedKvPool, batch: &[PagedChunk<'_>]) -> Result<Vec<SeqPlan>, LlmError> {
    let bs = pool.block_size;
    let input = |msg: String| Err(LlmError::Input(msg));
    // Block -> (writing sequence, first offset written in it).
    let mut writers: HashMap<u32, (usize, usize)> = HashMap::new();
    let mut seen = HashSet::new();
    for (i, c) in batch.iter().enumerate() {
        let n = c.tokens.len();
        let Some(end) = c.past.checked_add(n).filter(|&e| e <= u32::MAX as usize) else {
            return input(format!(
                "sequence {i}: past {} + {n} tokens overflows",
                c.past
            ));
        };
        let used = end.div_ceil(bs);
        if c.block_table.len() < used {
            return input(format!(
                "sequence {i}: block table has {} blocks, {used} needed for {end} tokens \
                 in blocks of {bs}",
                c.block_table.len()
            ));
        }
        seen.clear();
        for &b in &c.block_table[..used] {
            if b as usize >= pool.num_blocks {
                return input(format!(
                    "sequence {i}: block id {b} >= pool size {} blocks",
                    pool.num_blocks
                ));
            }
            if !seen.insert(b) {
                return input(format!(
                    "sequence {i}: block {b} appears twice in its table"
                ));
            }
        }
        for j in c.past / bs..used {
            let b = c.block_table[j];
            let lo = if j == c.past / bs { c.past % bs } else { 0 };
            if let Some((w, _)) = writers.insert(b, (i, lo)) {
                return input(format!(
                    "sequences {w} and {i} both write block {b} in one step"
                ));
            }
        }
    }
    // A block written this step must not be read by another sequence below the written rows
    // (shared prefix blocks are read-only; the result would depend on write order).
    for (i, c) in batch.iter().enumerate() {
        let end = c.past + c.tokens.len();
        for (j, b) in c.block_table[..end.div_ceil(bs)].iter().enumerate() {
            if let Some(&(w, lo)) = writers.get(b) {
                if w != i && lo < (end - j * bs).min(bs) {
                    return input(format!(
                        "sequence {i} reads rows of block {b} that sequence {w} writes \
                         in this step"
                    ));
                }
            }
        }
    }
    batch
        .iter()
        .map(|c| {
            let slot = |p: usize| c.block_table[p / bs] as usize * bs + p % bs;
            let end = c.past + c.tokens.len();
            let mut writes: Vec<(usize, usize, usize)> = Vec::new();
            for p in c.past..end {
                let s = slot(p);
                match writes.last_mut() {
                    Some((_, first, len)) if *first + *len == s => *len += 1,
                    _ => writes.push((p - c.past, s, 1)),
                }
            }
            let slots: Vec<u32> = (0..end).map(|p| slot(p) as u32).collect();
            Ok(SeqPlan {
                writes,
                slots,
                gather: None,
                past: c.past,
                n: c.tokens.len(),
            })
        })
        .collect()
}

impl LlmModel {
    /// The per-chunk extra embeddings as one `[T_total, hidden]` tensor (zeros for chunks
    /// without any).
    pub(crate) fn extra_embeddings(&self, seqs: &[SeqInput<'_>]) -> candle_core::Result<Tensor> {
        let h = self.config().hidden_size;
        let parts = seqs
            .iter()
            .map(|s| match s.extra {
                Some(e) => e.to_dtype(self.dtype()),
                None => Tensor::zeros((s.tokens.len(), h), self.dtype(), self.device()),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)
    }

    /// Like [`LlmModel::forward`], with keys and values in `pool` instead of per-sequence
    /// caches: the new tokens' keys and values are written at their slots (position `p` of a
    /// chunk goes to `block_table[p / bs] * bs + p % bs`), and attention reads positions
    /// `0..past + n` through the block table.
    ///
    /// Chunks are validated before anything is written (`LlmError::Input`, pool untouched):
    /// non-empty tokens in the vocabulary, a table covering `past + n` tokens with distinct
    /// in-range block ids, and no block written by one chunk while another chunk writes it or
    /// reads the rows being written. A later tensor error can leave new rows partly written;
    /// they are past every sequence's valid length and are overwritten by the retry.
    pub fn forward_paged(
        &self,
        pool: &mut PagedKvPool,
        batch: &[PagedChunk<'_>],
    ) -> Result<BatchOutput, LlmError> {
        self.forward_paged_extra(pool, batch, &[])
    }

    /// [`LlmModel::forward_paged`] with an optional extra input embedding per chunk: `extra[i]`,
    /// when given, is a `[batch[i].tokens.len(), hidden_size]` tensor (any float dtype, on the
    /// model device) added to chunk `i`'s token embeddings row by row (a talker's projected
    /// thinker states). `extra` may be shorter than `batch` (missing entries are `None`).
    pub fn forward_paged_extra(
        &self,
        pool: &mut PagedKvPool,
        batch: &[PagedChunk<'_>],
        extra: &[Option<&Tensor>],
    ) -> Result<BatchOutput, LlmError> {
        if batch.is_empty() {
            return Err(LlmError::Input("empty batch".into()));
        }
        let cfg = self.config();
        if pool.layers.len() != self.num_layers()
            || pool.kv_heads != cfg.num_key_value_heads
            || pool.head_dim != cfg.head_dim
        {
            return Err(LlmError::Input(format!(
                "pool of {} layers x {} kv heads x head_dim {} does not fit a model of \
                 {} x {} x {}",
                pool.layers.len(),
                pool.kv_heads,
                pool.head_dim,
                self.num_layers(),
                cfg.num_key_value_heads,
                cfg.head_dim
            )));
        }
        if pool.dtype != self.dtype() || !pool.device.same_device(self.device()) {
            return Err(LlmError::Input(format!(
                "pool is {:?} on {:?}, model is {:?} on {:?}",
                pool.dtype,
                pool.device.location(),
                self.dtype(),
                self.device().location()
            )));
        }
        for (i, c) in batch.iter().enumerate() {
            if c.tokens.is_empty() {
                return Err(LlmError::Input(format!("sequence {i} has no new tokens")));
            }
            self.check_token_ids(i, c.tokens)?;
        }
        if extra.len() > batch.len() {
            return Err(LlmError::Input(format!(
                "{} extra embeddings for a batch of {} sequences",
                extra.len(),
                batch.len()
            )));
        }
        for (i, (c, e)) in batch.iter().zip(extra).enumerate() {
            let Some(e) = e else { continue };
            let want = (c.tokens.len(), cfg.hidden_size);
            if e.dims2().ok() != Some(want) || !e.device().same_device(self.device()) {
                return Err(LlmError::Input(format!(
                    "sequence {i}: extra embeddings are {:?} on {:?}, expected {want:?} on {:?}",
                    e.dims(),
                    e.device().location(),
                    self.device().location()
                )));
            }
        }
        for (i, c) in batch.iter().enumerate() {
            let mut end = 0;
            for (start, rows) in c.splice {
                let len = rows
                    .dims2()
                    .ok()
                    .filter(|(_, h)| *h == cfg.hidden_size)
                    .map(|d| d.0);
                let fits = len.is_some_and(|len| *start >= end && start + len <= c.tokens.len());
                if !fits || !rows.device().same_device(self.device()) {
                    return Err(LlmError::Input(format!(
                        "sequence {i}: splice rows {:?} at {start} do not fit a chunk of {} \
                         tokens of width {} (after position {end})",
                        rows.dims(),
                        c.tokens.len(),
                        cfg.hidden_size
                    )));
                }
                end = start + len.unwrap_or(0);
            }
        }
        let plans = plan(pool, batch)?;
        let seqs: Vec<SeqInput<'_>> = batch
            .iter()
            .enumerate()
            .map(|(i, c)| SeqInput {
                tokens: c.tokens,
                past: c.past,
                want_hidden: c.want_hidden,
                extra: extra.get(i).copied().flatten(),
                splice: c.splice,
            })
            .collect();
        self.forward_core(&seqs, &mut PagedKv { pool, plans })
    }
}
