use super::*;
use std::collections::HashSet;

mod random;

fn mgr(block_size: usize, num_blocks: usize, enable_prefix_cache: bool) -> BlockManager {
    BlockManager::new(KvConfig {
        block_size,
        num_blocks,
        enable_prefix_cache,
    })
}

/// Tokens `start..end` as ids.
fn toks(start: u32, end: u32) -> Vec<u32> {
    (start..end).collect()
}

/// Starts `seq` with `prompt`, reserves and commits the whole prompt (a finished prefill).
fn prefill(m: &mut BlockManager, seq: u64, prompt: &[u32]) -> usize {
    let hit = m.start(SeqKey(seq), prompt).unwrap();
    m.reserve(SeqKey(seq), prompt.len()).unwrap();
    m.commit(SeqKey(seq), prompt).unwrap();
    check_invariants(m);
    hit
}

fn table(m: &BlockManager, seq: u64) -> Vec<BlockId> {
    m.block_table(SeqKey(seq)).unwrap().to_vec()
}

fn refcount(m: &BlockManager, id: BlockId) -> u32 {
    m.blocks[id.0 as usize].ref_count
}

/// Checks every structural invariant of the manager.
fn check_invariants(m: &BlockManager) {
    let n = m.cfg.num_blocks;
    assert_eq!(m.blocks.len(), n);
    let mut in_tables = vec![0u32; n];
    for s in m.seqs.values() {
        for b in &s.table {
            in_tables[b.0 as usize] += 1;
        }
        assert!(s.committed_blocks <= s.table.len());
        if m.cfg.enable_prefix_cache {
            assert_eq!(s.hashes.len(), s.committed_blocks);
        }
    }
    let free: HashSet<BlockId> = m.free.iter().copied().collect();
    assert_eq!(free.len(), m.free.len(), "block twice on the free list");
    let evictable: HashSet<BlockId> = m.evictable.values().copied().collect();
    assert_eq!(evictable.len(), m.evictable.len(), "block twice in the LRU");
    for (&tick, &id) in &m.evictable {
        assert_eq!(m.blocks[id.0 as usize].lru_tick, Some(tick));
        assert!(tick <= m.tick);
    }
    let mut used = 0;
    for (i, meta) in m.blocks.iter().enumerate() {
        let id = BlockId(i as u32);
        assert_eq!(meta.ref_count, in_tables[i], "refcount of {id:?}");
        let referenced = meta.ref_count > 0;
        let is_free = free.contains(&id);
        let is_cached = evictable.contains(&id);
        assert_eq!(
            referenced as u8 + is_free as u8 + is_cached as u8,
            1,
            "{id:?} must be exactly one of referenced/free/cached: {meta:?}"
        );
        used += referenced as usize;
        assert_eq!(meta.lru_tick.is_some(), is_cached);
        if is_cached {
            assert!(meta.hash.is_some(), "evictable block without a hash");
        }
        if is_free {
            assert!(meta.hash.is_none(), "free block still registered");
        }
        if let Some(h) = meta.hash {
            assert_eq!(m.cached.get(&h), Some(&id));
        }
    }
    for (&h, &id) in &m.cached {
        assert_eq!(m.blocks[id.0 as usize].hash, Some(h));
    }
    if !m.cfg.enable_prefix_cache {
        assert!(m.cached.is_empty() && m.evictable.is_empty());
    }
    let st = m.stats();
    assert_eq!(st.used_blocks, used);
    assert_eq!(m.used, used);
    assert_eq!(st.cached_blocks, evictable.len());
    assert_eq!(st.free_blocks, free.len());
    assert_eq!(
        st.used_blocks + st.cached_blocks + st.free_blocks,
        st.total_blocks
    );
    assert_eq!(m.available_blocks(), st.free_blocks + st.cached_blocks);
}

#[test]
fn new_pool_is_all_free() {
    let m = mgr(16, 8, true);
    assert_eq!(m.block_size(), 16);
    assert_eq!(m.available_blocks(), 8);
    let st = m.stats();
    assert_eq!(
        (
            st.total_blocks,
            st.used_blocks,
            st.cached_blocks,
            st.free_blocks
        ),
        (8, 0, 0, 8)
    );
    assert_eq!(st.prefix_hit_rate(), 0.0);
    check_invariants(&m);
}

#[test]
fn reserve_grows_across_block_boundaries() {
    let mut m = mgr(4, 8, true);
    let s = SeqKey(1);
    assert_eq!(m.start(s, &toks(0, 3)).unwrap(), 0);
    assert_eq!(m.block_table(s).unwrap(), &[] as &[BlockId]);
    assert_eq!(m.seq_len_capacity(s), 0);
    for (len, blocks) in [
        (1, 1),
        (4, 1),
        (5, 2),
        (8, 2),
        (9, 3),
        (3, 3),
        (0, 3),
        (12, 3),
    ] {
        m.reserve(s, len).unwrap();
        assert_eq!(m.block_table(s).unwrap().len(), blocks, "len {len}");
        assert_eq!(m.seq_len_capacity(s), blocks * 4);
        check_invariants(&m);
    }
    // Growing appends: old blocks keep their place.
    let before = table(&m, 1);
    m.reserve(s, 13).unwrap();
    assert_eq!(&table(&m, 1)[..3], &before[..]);
    assert_eq!(
        table(&m, 1),
        vec![BlockId(0), BlockId(1), BlockId(2), BlockId(3)]
    );
    assert_eq!(m.stats().used_blocks, 4);
    assert_eq!(m.available_blocks(), 4);
}

#[test]
fn reserve_is_all_or_nothing() {
    let mut m = mgr(4, 4, true);
    m.start(SeqKey(1), &[1]).unwrap();
    m.reserve(SeqKey(1), 8).unwrap();
    m.start(SeqKey(2), &[2]).unwrap();
    let err = m.reserve(SeqKey(2), 12).unwrap_err();
    assert_eq!(err, KvError::OutOfBlocks { needed: 3, free: 2 });
    assert_eq!(m.block_table(SeqKey(2)).unwrap().len(), 0);
    assert_eq!(m.stats().free_blocks, 2);
    check_invariants(&m);
    m.reserve(SeqKey(2), 8).unwrap();
    assert_eq!(m.available_blocks(), 0);
    assert_eq!(
        m.reserve(SeqKey(1), 9),
        Err(KvError::OutOfBlocks { needed: 1, free: 0 })
    );
    assert_eq!(m.seq_len_capacity(SeqKey(1)), 8);
    // Within capacity needs nothing, even when the pool is empty.
    m.reserve(SeqKey(1), 8).unwrap();
    check_invariants(&m);
}

#[test]
fn blocks_needed_and_can_reserve() {
    let mut m = mgr(4, 3, true);
    let s = SeqKey(7);
    assert_eq!(m.blocks_needed(s, 9), 3, "unknown seq counts as empty");
    assert!(!m.can_reserve(s, 1), "unknown seq cannot reserve");
    m.start(s, &[0; 5]).unwrap();
    assert_eq!(m.blocks_needed(s, 0), 0);
    assert_eq!(m.blocks_needed(s, 5), 2);
    assert!(m.can_reserve(s, 12));
    assert!(!m.can_reserve(s, 13));
    m.reserve(s, 5).unwrap();
    assert_eq!(m.blocks_needed(s, 5), 0);
    assert_eq!(m.blocks_needed(s, 9), 1);
    assert_eq!(m.blocks_needed(s, 13), 2);
    assert!(!m.can_reserve(s, 13));
}

#[test]
fn unknown_and_duplicate_sequences() {
    let mut m = mgr(4, 4, true);
    let s = SeqKey(3);
    assert_eq!(m.reserve(s, 4), Err(KvError::UnknownSeq(s)));
    assert_eq!(m.commit(s, &[1, 2, 3, 4]), Err(KvError::UnknownSeq(s)));
    assert!(m.block_table(s).is_none());
    assert_eq!(m.seq_len_capacity(s), 0);
    m.free(s); // no-op
    m.start(s, &[1]).unwrap();
    assert!(m.contains(s));
    assert_eq!(m.num_seqs(), 1);
    assert_eq!(m.start(s, &[1]), Err(KvError::AlreadyAllocated(s)));
    m.free(s);
    m.free(s);
    assert!(!m.contains(s));
    assert_eq!(m.num_seqs(), 0);
    check_invariants(&m);
}

#[test]
fn free_returns_uncommitted_blocks_to_free_list() {
    let mut m = mgr(4, 4, true);
    m.start(SeqKey(1), &toks(0, 10)).unwrap();
    m.reserve(SeqKey(1), 10).unwrap();
    // Only 2 of its 3 blocks are full and committed.
    m.commit(SeqKey(1), &toks(0, 10)).unwrap();
    assert_eq!(m.stats().used_blocks, 3);
    m.free(SeqKey(1));
    let st = m.stats();
    assert_eq!(
        (st.used_blocks, st.cached_blocks, st.free_blocks),
        (0, 2, 2)
    );
    check_invariants(&m);
    // Nothing committed: everything goes straight back to the free list.
    m.start(SeqKey(2), &[9; 3]).unwrap();
    m.reserve(SeqKey(2), 8).unwrap();
    m.free(SeqKey(2));
    let st = m.stats();
    assert_eq!(
        (st.used_blocks, st.cached_blocks, st.free_blocks),
        (0, 2, 2)
    );
    assert_eq!(st.evictions, 0, "free blocks are used before evicting");
    check_invariants(&m);
}

#[test]
fn shared_three_block_prefix_is_reused_and_refcounted() {
    let bs = 4;
    let mut m = mgr(bs, 16, true);
    let shared = toks(100, 112); // 3 full blocks
    let a = [shared.clone(), vec![1, 2, 3]].concat();
    let b = [shared.clone(), vec![7, 8]].concat();
    assert_eq!(prefill(&mut m, 1, &a), 0);
    assert_eq!(prefill(&mut m, 2, &b), 3 * bs);
    let (ta, tb) = (table(&m, 1), table(&m, 2));
    assert_eq!(ta[..3], tb[..3]);
    assert_ne!(ta[3], tb[3], "the partial tail block is never shared");
    for &id in &ta[..3] {
        assert_eq!(refcount(&m, id), 2);
    }
    assert_eq!(refcount(&m, ta[3]), 1);
    assert_eq!(m.stats().used_blocks, 5);
    // Freeing one keeps the other's blocks referenced.
    m.free(SeqKey(1));
    check_invariants(&m);
    for &id in &tb[..3] {
        assert_eq!(refcount(&m, id), 1);
    }
    let st = m.stats();
    assert_eq!(
        (st.used_blocks, st.cached_blocks, st.free_blocks),
        (4, 0, 12)
    );
    m.free(SeqKey(2));
    let st = m.stats();
    assert_eq!(
        (st.used_blocks, st.cached_blocks, st.free_blocks),
        (0, 3, 13)
    );
    check_invariants(&m);
    // Cached blocks are found again after everyone let go.
    assert_eq!(prefill(&mut m, 3, &a), 3 * bs);
    assert_eq!(table(&m, 3)[..3], ta[..3]);
    assert_eq!(m.stats().cached_blocks, 0);
}

#[test]
fn whole_prompt_hit_is_capped_to_leave_one_token() {
    let bs = 4;
    let mut m = mgr(bs, 16, true);
    let p = toks(0, 12); // exactly 3 blocks
    assert_eq!(prefill(&mut m, 1, &p), 0);
    assert_eq!(
        m.stats().prefix_query_blocks,
        2,
        "(12 - 1) / 4 cacheable blocks"
    );
    assert_eq!(prefill(&mut m, 2, &p), 2 * bs, "last block recomputed");
    // Its third block is its own copy: the registered one stays with seq 1.
    let (t1, t2) = (table(&m, 1), table(&m, 2));
    assert_eq!(t1[..2], t2[..2]);
    assert_ne!(t1[2], t2[2]);
    // One more token and all 3 blocks are reusable.
    assert_eq!(m.start(SeqKey(3), &toks(0, 13)).unwrap(), 3 * bs);
    assert_eq!(table(&m, 3), t1);
    // A 1-token or empty prompt never hits.
    assert_eq!(m.start(SeqKey(4), &[0]).unwrap(), 0);
    assert_eq!(m.start(SeqKey(5), &[]).unwrap(), 0);
    check_invariants(&m);
}

#[test]
fn concurrent_identical_prefixes_keep_the_map_consistent() {
    let mut m = mgr(4, 16, true);
    let p = toks(0, 9);
    // Both start before either commits: no hits, two copies.
    assert_eq!(m.start(SeqKey(1), &p).unwrap(), 0);
    assert_eq!(m.start(SeqKey(2), &p).unwrap(), 0);
    for s in [1, 2] {
        m.reserve(SeqKey(s), 9).unwrap();
        m.commit(SeqKey(s), &p).unwrap();
        check_invariants(&m);
    }
    let (t1, t2) = (table(&m, 1), table(&m, 2));
    assert!(t1.iter().all(|b| !t2.contains(b)));
    assert_eq!(m.cached.len(), 2, "only the first copy is registered");
    m.free(SeqKey(1));
    m.free(SeqKey(2));
    let st = m.stats();
    assert_eq!((st.cached_blocks, st.free_blocks), (2, 14));
    check_invariants(&m);
    assert_eq!(m.start(SeqKey(3), &p).unwrap(), 8);
    assert_eq!(table(&m, 3), t1[..2]);
}

#[test]
fn decode_extends_the_chain_across_block_boundaries() {
    let bs = 4;
    let mut m = mgr(bs, 16, true);
    let mut hist = toks(0, 6);
    prefill(&mut m, 1, &hist);
    assert_eq!(m.cached.len(), 1);
    // Decode one token at a time up to 13 tokens.
    for t in 6..13 {
        hist.push(1000 + t);
        m.reserve(SeqKey(1), hist.len()).unwrap();
        m.commit(SeqKey(1), &hist).unwrap();
        check_invariants(&m);
    }
    assert_eq!(m.cached.len(), 3);
    // Re-committing a shorter history changes nothing.
    m.commit(SeqKey(1), &hist[..5]).unwrap();
    assert_eq!(m.seqs[&SeqKey(1)].committed_blocks, 3);
    // Preemption + recompute: the whole history, restarted as a prompt, hits all full blocks.
    let t1 = table(&m, 1);
    m.free(SeqKey(1));
    assert_eq!(m.start(SeqKey(1), &hist).unwrap(), 12);
    assert_eq!(table(&m, 1), t1[..3]);
    // A diverging generated suffix only shares the prompt's blocks.
    let mut other = toks(0, 6);
    other.extend([5000, 5001, 5002, 5003, 5004]);
    assert_eq!(m.start(SeqKey(2), &other).unwrap(), 4);
    check_invariants(&m);
}

#[test]
fn commit_beyond_capacity_only_registers_reserved_blocks() {
    let mut m = mgr(4, 8, true);
    m.start(SeqKey(1), &toks(0, 12)).unwrap();
    m.reserve(SeqKey(1), 4).unwrap();
    m.commit(SeqKey(1), &toks(0, 12)).unwrap();
    assert_eq!(m.cached.len(), 1);
    m.reserve(SeqKey(1), 12).unwrap();
    m.commit(SeqKey(1), &toks(0, 12)).unwrap();
    assert_eq!(m.cached.len(), 3);
    check_invariants(&m);
}

/// Prefills a 2-block prompt starting at `base` and frees it (leaving 2 cached blocks).
fn cache_prefix(m: &mut BlockManager, seq: u64, base: u32) -> Vec<BlockId> {
    let p = toks(base, base + 9);
    prefill(m, seq, &p);
    let t = table(m, seq);
    m.free(SeqKey(seq));
    check_invariants(m);
    t[..2].to_vec()
}

#[test]
fn lru_evicts_least_recently_released_prefix_first() {
    // Three 2-block cached prefixes (the 3rd block of each went back to the free list).
    let mut m = mgr(4, 9, true);
    let p1 = cache_prefix(&mut m, 1, 100);
    let p2 = cache_prefix(&mut m, 2, 200);
    let p3 = cache_prefix(&mut m, 3, 300);
    assert_eq!((m.stats().cached_blocks, m.stats().free_blocks), (6, 3));
    // Free blocks go first: no eviction.
    m.start(SeqKey(10), &[1]).unwrap();
    m.reserve(SeqKey(10), 12).unwrap();
    assert_eq!(m.stats().evictions, 0);
    assert_eq!(m.stats().cached_blocks, 6);
    // Then p1 (released first) goes, its tail block before its head.
    m.reserve(SeqKey(10), 13).unwrap();
    assert_eq!(
        table(&m, 10)[3..],
        [p1[1]],
        "a prefix's tail is evicted before its head"
    );
    m.reserve(SeqKey(10), 17).unwrap();
    assert_eq!(table(&m, 10)[3..], [p1[1], p1[0]]);
    assert_eq!(m.stats().evictions, 2);
    check_invariants(&m);
    assert_eq!(
        m.start(SeqKey(11), &toks(100, 109)).unwrap(),
        0,
        "p1 evicted"
    );
    assert_eq!(m.start(SeqKey(12), &toks(200, 209)).unwrap(), 8, "p2 kept");
    assert_eq!(table(&m, 12), p2);
    assert_eq!(m.start(SeqKey(13), &toks(300, 309)).unwrap(), 8, "p3 kept");
    assert_eq!(table(&m, 13), p3);
    check_invariants(&m);
}

#[test]
fn reused_cached_prefix_is_refreshed_in_lru() {
    let mut m = mgr(4, 9, true);
    let p1 = cache_prefix(&mut m, 1, 100);
    let p2 = cache_prefix(&mut m, 2, 200);
    let p3 = cache_prefix(&mut m, 3, 300);
    // Reuse p1, then release it: it is now the most recently used.
    assert_eq!(m.start(SeqKey(4), &toks(100, 109)).unwrap(), 8);
    assert_eq!(m.stats().cached_blocks, 4);
    m.free(SeqKey(4));
    check_invariants(&m);
    m.start(SeqKey(10), &[1]).unwrap();
    m.reserve(SeqKey(10), 12 + 8).unwrap();
    assert_eq!(
        table(&m, 10)[3..],
        [p2[1], p2[0]],
        "p2 is now the least recently used"
    );
    m.reserve(SeqKey(10), 12 + 12).unwrap();
    assert_eq!(table(&m, 10)[5..], [p3[1]], "then p3");
    assert_eq!(m.stats().evictions, 3);
    assert_eq!(m.start(SeqKey(11), &toks(200, 209)).unwrap(), 0);
    assert_eq!(m.start(SeqKey(12), &toks(100, 109)).unwrap(), 8);
    assert_eq!(table(&m, 12), p1);
    check_invariants(&m);
}

#[test]
fn referenced_blocks_are_never_evicted() {
    let mut m = mgr(4, 4, true);
    prefill(&mut m, 1, &toks(0, 9)); // 3 blocks, 2 registered, still referenced
    m.start(SeqKey(2), &[1]).unwrap();
    assert_eq!(
        m.reserve(SeqKey(2), 8),
        Err(KvError::OutOfBlocks { needed: 2, free: 1 })
    );
    assert_eq!(m.stats().evictions, 0);
    check_invariants(&m);
}

#[test]
fn prefix_stats_count_hits_and_queries() {
    let bs = 4;
    let mut m = mgr(bs, 32, true);
    let p = toks(0, 17); // 4 cacheable blocks
    prefill(&mut m, 1, &p);
    prefill(&mut m, 2, &p);
    prefill(&mut m, 3, &toks(0, 10)); // 2 cacheable, both hit
    prefill(&mut m, 4, &[[0, 1, 2, 3].as_slice(), &[9; 6]].concat()); // 1 hit of 2
    let st = m.stats();
    assert_eq!(st.prefix_query_tokens, 17 + 17 + 10 + 10);
    assert_eq!(st.prefix_hit_tokens, 16 + 8 + 4);
    assert_eq!(st.prefix_query_blocks, 4 + 4 + 2 + 2);
    assert_eq!(st.prefix_hit_blocks, 4 + 2 + 1);
    assert!((st.prefix_hit_rate() - 28.0 / 54.0).abs() < 1e-12);
}

#[test]
fn disabled_prefix_cache_never_shares_or_caches() {
    let mut m = mgr(4, 16, false);
    let p = toks(0, 13);
    assert_eq!(prefill(&mut m, 1, &p), 0);
    assert_eq!(prefill(&mut m, 2, &p), 0);
    let (t1, t2) = (table(&m, 1), table(&m, 2));
    assert!(t1.iter().all(|b| !t2.contains(b)));
    m.free(SeqKey(1));
    m.free(SeqKey(2));
    let st = m.stats();
    assert_eq!(
        (st.used_blocks, st.cached_blocks, st.free_blocks),
        (0, 0, 16)
    );
    assert_eq!(st.prefix_hit_tokens, 0);
    assert_eq!(st.prefix_query_tokens, 26);
    assert_eq!(st.prefix_query_blocks, 0);
    assert_eq!(prefill(&mut m, 3, &p), 0);
    check_invariants(&m);
}

#[test]
fn salt_separates_hash_chains() {
    let mut m = mgr(4, 16, true);
    let p = toks(0, 9);
    let s = |k| SeqKey(k);
    assert_eq!(m.start_with_salt(s(1), &p, 42).unwrap(), 0);
    m.reserve(s(1), 9).unwrap();
    m.commit(s(1), &p).unwrap();
    assert_eq!(m.start(s(2), &p).unwrap(), 0, "unsalted misses");
    assert_eq!(
        m.start_with_salt(s(3), &p, 7).unwrap(),
        0,
        "other salt misses"
    );
    assert_eq!(m.start_with_salt(s(4), &p, 42).unwrap(), 8);
    // The salted sequence's chain extends with its salt.
    m.reserve(s(4), 12).unwrap();
    let longer = toks(0, 13);
    m.commit(s(4), &longer).unwrap();
    assert_eq!(m.start_with_salt(s(5), &longer, 42).unwrap(), 12);
    check_invariants(&m);
}

#[test]
fn clear_cache_frees_unreferenced_cached_blocks() {
    let mut m = mgr(4, 8, true);
    prefill(&mut m, 1, &toks(0, 9));
    prefill(&mut m, 2, &toks(50, 59));
    m.free(SeqKey(1));
    assert_eq!(m.clear_cache(), 2);
    check_invariants(&m);
    assert_eq!(m.start(SeqKey(3), &toks(0, 9)).unwrap(), 0);
    assert_eq!(
        m.start(SeqKey(4), &toks(50, 59)).unwrap(),
        8,
        "referenced stay"
    );
    assert_eq!(m.stats().evictions, 0);
}

#[test]
fn from_budget_counts_whole_blocks() {
    let cfg = KvConfig::from_budget(10_000, 1_000, 16).unwrap();
    assert_eq!(
        cfg,
        KvConfig {
            block_size: 16,
            num_blocks: 10,
            enable_prefix_cache: true
        }
    );
    assert_eq!(
        KvConfig::from_budget(10_999, 1_000, 16).unwrap().num_blocks,
        10
    );
    assert_eq!(
        KvConfig::from_budget(1_000, 1_000, 16).unwrap().num_blocks,
        1
    );
    assert_eq!(
        KvConfig::from_budget(999, 1_000, 16),
        Err(KvError::BudgetTooSmall {
            budget_bytes: 999,
            bytes_per_block: 1_000
        })
    );
    assert!(matches!(
        KvConfig::from_budget(1_000, 0, 16),
        Err(KvError::InvalidConfig(_))
    ));
    assert!(matches!(
        KvConfig::from_budget(1_000, 10, 0),
        Err(KvError::InvalidConfig(_))
    ));
    let m = BlockManager::new(cfg);
    assert_eq!(m.stats().total_blocks, 10);
    assert_eq!(m.config(), &cfg);
}

#[test]
#[should_panic(expected = "block_size")]
fn zero_block_size_panics() {
    mgr(0, 4, true);
}
