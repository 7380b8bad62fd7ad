//! Paged KV-cache accounting with prefix caching, model-agnostic (vLLM-style).
//!
//! The KV cache of an LLM stage is a pool of `num_blocks` fixed-size blocks of `block_size` token
//! slots each. Every sequence owns a *block table* (the list of its blocks, in token order);
//! growing a sequence only appends blocks, never copies old ones. A block that is full is
//! identified by a hash chain over its content — `hash(parent block's hash, this block's tokens)`
//! — so sequences sharing a prompt prefix share the same physical blocks, reference-counted.
//!
//! Every block is in exactly one of three states:
//! - **free**: holds nothing useful, on the free list;
//! - **referenced** (used): in at least one block table (`ref_count > 0`);
//! - **cached**: unreferenced but still holding a registered full block of some prefix; it can be
//!   reused by a later [`BlockManager::start`] with the same prefix, or evicted —
//!   least-recently-released first — when a fresh block is needed and the free list is empty.
//!
//! Only full blocks are ever registered, and a full block is never written again, so shared blocks
//! are immutable; a sequence only appends into its own last, partially-filled block, which is never
//! shared.
//!
//! Hashes are 64-bit SipHash values ([`DefaultHasher::new`] has fixed keys, so they are stable
//! within a process). Two different prefixes colliding is possible in principle (odds around
//! `n² / 2⁶⁵` for `n` distinct blocks) and would make one sequence read another's KV; at realistic
//! pool sizes the odds are negligible, as in vLLM.
//!
//! This module knows no model, tensor or device: it hands out [`BlockId`]s; the engine maps them
//! to slices of its KV tensors.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hasher};

#[cfg(test)]
mod tests;

/// Index of one KV block in the pool (`0..num_blocks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

/// Who owns a block table (the engine uses `JobId.0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqKey(pub u64);

/// Shape of a block pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvConfig {
    /// Token slots per block (at least 1).
    pub block_size: usize,
    /// Blocks in the pool (at most `u32::MAX`).
    pub num_blocks: usize,
    /// Whether full blocks are registered and reused across sequences sharing a prefix.
    pub enable_prefix_cache: bool,
}

impl KvConfig {
    /// As many blocks as fit in `budget_bytes` (each `bytes_per_block` bytes, e.g.
    /// `2 * layers * kv_heads * head_dim * block_size * dtype_size`), prefix caching on.
    /// Errors when `block_size` or `bytes_per_block` is 0, or the budget holds no whole block.
    pub fn from_budget(
        budget_bytes: usize,
        bytes_per_block: usize,
        block_size: usize,
    ) -> Result<KvConfig, KvError> {
        if block_size == 0 {
            return Err(KvError::InvalidConfig("block_size must be at least 1"));
        }
        if bytes_per_block == 0 {
            return Err(KvError::InvalidConfig("bytes_per_block must be at least 1"));
        }
        let num_blocks = (budget_bytes / bytes_per_block).min(u32::MAX as usize);
        if num_blocks == 0 {
            return Err(KvError::BudgetTooSmall {
                budget_bytes,
                bytes_per_block,
            });
        }
        Ok(KvConfig {
            block_size,
            num_blocks,
            enable_prefix_cache: true,
        })
    }
}

/// Why a block-manager operation failed (nothing changed when it did).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    /// Not enough blocks: `needed` fresh blocks asked, only `free` available (free + evictable).
    #[error("out of KV blocks: {needed} needed, {free} available")]
    OutOfBlocks {
        /// Fresh blocks the operation needed.
        needed: usize,
        /// Blocks available at the time (free list plus evictable cached blocks).
        free: usize,
    },
    /// The sequence has no block table (never started, or already freed).
    #[error("unknown KV sequence {0:?}")]
    UnknownSeq(SeqKey),
    /// [`BlockManager::start`] on a sequence that already has a block table.
    #[error("KV sequence {0:?} already has a block table")]
    AlreadyAllocated(SeqKey),
    /// The memory budget holds not even one block.
    #[error("KV budget of {budget_bytes} bytes is below one block ({bytes_per_block} bytes)")]
    BudgetTooSmall {
        /// The budget given.
        budget_bytes: usize,
        /// Size of one block.
        bytes_per_block: usize,
    },
    /// A configuration value that can never work.
    #[error("invalid KV config: {0}")]
    InvalidConfig(&'static str),
}

/// A snapshot of the pool and of the prefix cache's effectiveness.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvStats {
    /// Blocks in the pool.
    pub total_blocks: usize,
    /// Blocks in at least one block table.
    pub used_blocks: usize,
    /// Unreferenced blocks still holding a cached prefix block (evictable).
    pub cached_blocks: usize,
    /// Blocks on the free list. `used + cached + free == total`.
    pub free_blocks: usize,
    /// Prompt tokens found in the prefix cache by [`BlockManager::start`], summed.
    pub prefix_hit_tokens: u64,
    /// Prompt tokens passed to [`BlockManager::start`], summed (hit rate = hit / query).
    pub prefix_query_tokens: u64,
    /// Full blocks found in the prefix cache by `start`, summed.
    pub prefix_hit_blocks: u64,
    /// Full blocks `start` looked up at most (the prompt's cacheable blocks), summed.
    pub prefix_query_blocks: u64,
    /// Cached blocks evicted to make room for fresh ones.
    pub evictions: u64,
}

impl KvStats {
    /// `prefix_hit_tokens / prefix_query_tokens`, 0 before any query.
    pub fn prefix_hit_rate(&self) -> f64 {
        if self.prefix_query_tokens == 0 {
            0.0
        } else {
            self.prefix_hit_tokens as f64 / self.prefix_query_tokens as f64
        }
    }
}

/// Per-block bookkeeping.
#[derive(Debug, Clone, Copy, Default)]
struct BlockMeta {
    /// Block tables containing this block.
    ref_count: u32,
    /// `Some(h)` iff the block is registered in the prefix cache under `h` (then `cached[h]` is
    /// this block).
    hash: Option<u64>,
    /// `Some(t)` iff the block is unreferenced and evictable (then `evictable[t]` is this block).
    lru_tick: Option<u64>,
}

/// One sequence's block table and how much of it is committed.
#[derive(Debug, Clone)]
struct SeqState {
    table: Vec<BlockId>,
    /// Leading blocks of `table` that are full and committed.
    committed_blocks: usize,
    /// Hash chain of the committed blocks (empty when prefix caching is off).
    hashes: Vec<u64>,
    /// Root of the hash chain (see [`BlockManager::start_with_salt`]).
    salt: u64,
}

/// Root "parent hash" of every chain, mixed with the salt.
const ROOT_HASH: u64 = 0xcbf2_9ce4_8422_2325;

fn root_hash(salt: u64) -> u64 {
    let mut h = DefaultHasher::new();
    h.write_u64(ROOT_HASH);
    h.write_u64(salt);
    h.finish()
}

fn block_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    h.write_u64(parent);
    for &t in tokens {
        h.write_u32(t);
    }
    h.finish()
}

/// The block pool, the per-sequence block tables and the prefix cache. Pure bookkeeping: no
/// locking, no clock (LRU order is a monotonic counter of releases).
#[derive(Debug)]
pub struct BlockManager {
    cfg: KvConfig,
    blocks: Vec<BlockMeta>,
    /// Free blocks; allocation pops from the end.
    free: Vec<BlockId>,
    /// Unreferenced registered blocks, oldest release first.
    evictable: BTreeMap<u64, BlockId>,
    /// Prefix cache: hash chain value -> registered block (referenced or not).
    cached: HashMap<u64, BlockId>,
    seqs: HashMap<SeqKey, SeqState>,
    used: usize,
    tick: u64,
    stats: KvStats,
}

impl BlockManager {
    /// An empty pool of `cfg.num_blocks` free blocks (ids handed out from 0 upwards).
    ///
    /// # Panics
    /// If `cfg.block_size == 0` or `cfg.num_blocks > u32::MAX`.
    pub fn new(cfg: KvConfig) -> Self {
        assert!(
            cfg.block_size > 0,
            "KvConfig::block_size must be at least 1"
        );
        assert!(
            cfg.num_blocks <= u32::MAX as usize,
            "KvConfig::num_blocks must fit in a u32"
        );
        BlockManager {
            cfg,
            blocks: vec![BlockMeta::default(); cfg.num_blocks],
            free: (0..cfg.num_blocks as u32).rev().map(BlockId).collect(),
            evictable: BTreeMap::new(),
            cached: HashMap::new(),
            seqs: HashMap::new(),
            used: 0,
            tick: 0,
            stats: KvStats::default(),
        }
    }

    /// The configuration this pool was built with.
    pub fn config(&self) -> &KvConfig {
        &self.cfg
    }

    /// Token slots per block.
    pub fn block_size(&self) -> usize {
        self.cfg.block_size
    }

    /// Starts a sequence with its prompt, reusing the longest run of cached full blocks that
    /// matches the prompt's prefix (when prefix caching is on). Never the whole prompt: at most
    /// `prompt.len() - 1` tokens rounded down to a block are reused, so at least one token is left
    /// to compute and its logits come out. Allocates nothing else (see [`reserve`]).
    ///
    /// Returns how many prompt tokens are already in cache (a multiple of `block_size`); the
    /// sequence's table then holds exactly those blocks. Counts prefix hits and queries.
    ///
    /// [`reserve`]: BlockManager::reserve
    pub fn start(&mut self, seq: SeqKey, prompt: &[u32]) -> Result<usize, KvError> {
        self.start_with_salt(seq, prompt, 0)
    }

    /// [`start`](BlockManager::start) with the hash chain rooted at `salt`: only sequences started
    /// with the same salt share blocks. Use it when the KV depends on more than the token ids
    /// (multimodal inputs behind placeholder tokens, adapters): e.g. a hash of the images.
    pub fn start_with_salt(
        &mut self,
        seq: SeqKey,
        prompt: &[u32],
        salt: u64,
    ) -> Result<usize, KvError> {
        if self.seqs.contains_key(&seq) {
            return Err(KvError::AlreadyAllocated(seq));
        }
        let bs = self.cfg.block_size;
        let mut state = SeqState {
            table: Vec::new(),
            committed_blocks: 0,
            hashes: Vec::new(),
            salt,
        };
        self.stats.prefix_query_tokens += prompt.len() as u64;
        if self.cfg.enable_prefix_cache {
            let max_blocks = prompt.len().saturating_sub(1) / bs;
            self.stats.prefix_query_blocks += max_blocks as u64;
            let mut parent = root_hash(salt);
            for chunk in prompt.chunks_exact(bs).take(max_blocks) {
                let h = block_hash(parent, chunk);
                let Some(&id) = self.cached.get(&h) else {
                    break;
                };
                self.acquire_cached(id);
                state.table.push(id);
                state.hashes.push(h);
                parent = h;
            }
            state.committed_blocks = state.table.len();
        }
        let hit_blocks = state.table.len();
        self.stats.prefix_hit_blocks += hit_blocks as u64;
        self.stats.prefix_hit_tokens += (hit_blocks * bs) as u64;
        self.seqs.insert(seq, state);
        Ok(hit_blocks * bs)
    }

    /// Makes room for the sequence to hold `new_len` tokens in total, allocating fresh blocks from
    /// the free list, else by evicting the least-recently-released cached block. Never shrinks.
    /// All-or-nothing: on [`KvError::OutOfBlocks`] nothing changes.
    pub fn reserve(&mut self, seq: SeqKey, new_len: usize) -> Result<(), KvError> {
        let have = self
            .seqs
            .get(&seq)
            .ok_or(KvError::UnknownSeq(seq))?
            .table
            .len();
        let needed = self.cfg_blocks_for(new_len).saturating_sub(have);
        let available = self.available_blocks();
        if needed > available {
            return Err(KvError::OutOfBlocks {
                needed,
                free: available,
            });
        }
        let fresh: Vec<BlockId> = (0..needed).map(|_| self.allocate_fresh()).collect();
        self.seqs
            .get_mut(&seq)
            .expect("checked above")
            .table
            .extend(fresh);
        Ok(())
    }

    /// Fresh blocks `reserve(seq, new_len)` would allocate (0 if the table is already big enough;
    /// for an unknown sequence, as if its table were empty).
    pub fn blocks_needed(&self, seq: SeqKey, new_len: usize) -> usize {
        let have = self.seqs.get(&seq).map_or(0, |s| s.table.len());
        self.cfg_blocks_for(new_len).saturating_sub(have)
    }

    /// Whether `reserve(seq, new_len)` would succeed now (lets the caller preempt before trying).
    pub fn can_reserve(&self, seq: SeqKey, new_len: usize) -> bool {
        self.seqs.contains_key(&seq) && self.blocks_needed(seq, new_len) <= self.available_blocks()
    }

    /// Blocks a reservation can take now: free plus evictable cached blocks.
    pub fn available_blocks(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Records that the sequence's first `tokens.len()` tokens (its whole history: prompt, then
    /// generated) are computed and stored in its blocks. Every block that became full is
    /// registered in the prefix cache under its hash chain (if prefix caching is on); if an
    /// identical block is already registered (another sequence computed the same prefix
    /// concurrently), this sequence keeps its own copy unregistered. Tokens beyond the reserved
    /// capacity are ignored; a shorter history than already committed changes nothing.
    pub fn commit(&mut self, seq: SeqKey, tokens: &[u32]) -> Result<(), KvError> {
        let bs = self.cfg.block_size;
        let state = self.seqs.get_mut(&seq).ok_or(KvError::UnknownSeq(seq))?;
        let full = (tokens.len() / bs).min(state.table.len());
        if full <= state.committed_blocks {
            return Ok(());
        }
        if self.cfg.enable_prefix_cache {
            let mut parent = state
                .hashes
                .last()
                .copied()
                .unwrap_or(root_hash(state.salt));
            for i in state.committed_blocks..full {
                let h = block_hash(parent, &tokens[i * bs..(i + 1) * bs]);
                let id = state.table[i];
                if let std::collections::hash_map::Entry::Vacant(e) = self.cached.entry(h) {
                    e.insert(id);
                    let meta = &mut self.blocks[id.0 as usize];
                    debug_assert!(meta.hash.is_none() && meta.ref_count == 1);
                    meta.hash = Some(h);
                }
                state.hashes.push(h);
                parent = h;
            }
        }
        state.committed_blocks = full;
        Ok(())
    }

    /// The sequence's blocks in token order, `None` if it has no table.
    pub fn block_table(&self, seq: SeqKey) -> Option<&[BlockId]> {
        self.seqs.get(&seq).map(|s| s.table.as_slice())
    }

    /// Tokens the sequence's table can hold (`blocks * block_size`; 0 for an unknown sequence).
    pub fn seq_len_capacity(&self, seq: SeqKey) -> usize {
        self.seqs
            .get(&seq)
            .map_or(0, |s| s.table.len() * self.cfg.block_size)
    }

    /// Whether the sequence has a block table.
    pub fn contains(&self, seq: SeqKey) -> bool {
        self.seqs.contains_key(&seq)
    }

    /// Sequences holding a block table.
    pub fn num_seqs(&self) -> usize {
        self.seqs.len()
    }

    /// Releases a sequence (finish, cancel, preemption); a no-op for an unknown one. Each of its
    /// blocks loses a reference; one reaching 0 becomes evictable-cached if it is a registered
    /// full block, else goes straight back to the free list. The table is released tail first,
    /// so a prefix's last blocks are evicted before its first ones.
    pub fn free(&mut self, seq: SeqKey) {
        let Some(state) = self.seqs.remove(&seq) else {
            return;
        };
        for &id in state.table.iter().rev() {
            let meta = &mut self.blocks[id.0 as usize];
            debug_assert!(meta.ref_count > 0);
            meta.ref_count -= 1;
            if meta.ref_count > 0 {
                continue;
            }
            self.used -= 1;
            if meta.hash.is_some() {
                self.tick += 1;
                meta.lru_tick = Some(self.tick);
                self.evictable.insert(self.tick, id);
            } else {
                self.free.push(id);
            }
        }
    }

    /// Drops every unreferenced cached block back to the free list (e.g. after a weight reload
    /// makes the cached KV stale). Referenced blocks stay registered. Returns how many were freed.
    pub fn clear_cache(&mut self) -> usize {
        let n = self.evictable.len();
        while let Some((_, id)) = self.evictable.pop_first() {
            let meta = &mut self.blocks[id.0 as usize];
            meta.lru_tick = None;
            if let Some(h) = meta.hash.take() {
                self.cached.remove(&h);
            }
            self.free.push(id);
        }
        n
    }

    /// Current pool occupancy and cumulative prefix-cache counters.
    pub fn stats(&self) -> KvStats {
        KvStats {
            total_blocks: self.cfg.num_blocks,
            used_blocks: self.used,
            cached_blocks: self.evictable.len(),
            free_blocks: self.free.len(),
            ..self.stats
        }
    }

    fn cfg_blocks_for(&self, len: usize) -> usize {
        len.div_ceil(self.cfg.block_size)
    }

    /// Takes a reference on a registered block found by a prefix lookup.
    fn acquire_cached(&mut self, id: BlockId) {
        let meta = &mut self.blocks[id.0 as usize];
        if meta.ref_count == 0 {
            let tick = meta
                .lru_tick
                .take()
                .expect("unreferenced cached block is evictable");
            self.evictable.remove(&tick);
            self.used += 1;
        }
        meta.ref_count += 1;
    }

    /// One block with a single reference: from the free list, else the LRU evictable block
    /// (unregistered first). The caller checked `available_blocks() > 0`.
    fn allocate_fresh(&mut self) -> BlockId {
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                let (_, id) = self
                    .evictable
                    .pop_first()
                    .expect("caller checked availability");
                let meta = &mut self.blocks[id.0 as usize];
                meta.lru_tick = None;
                if let Some(h) = meta.hash.take() {
                    self.cached.remove(&h);
                }
                self.stats.evictions += 1;
                id
            }
        };
        let meta = &mut self.blocks[id.0 as usize];
        debug_assert!(meta.ref_count == 0 && meta.hash.is_none() && meta.lru_tick.is_none());
        meta.ref_count = 1;
        self.used += 1;
        id
    }
}
