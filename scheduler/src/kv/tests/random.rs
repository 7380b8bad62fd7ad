//! Thousands of seeded random start/reserve/commit/free operations, checking every invariant
//! (and what each hit block holds) after each one.

use super::{check_invariants, mgr, refcount, table};
use crate::kv::{BlockId, KvError, SeqKey};
use std::collections::HashMap;

/// xorshift64*: a tiny deterministic generator, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The test's model of one live sequence.
struct Live {
    hist: Vec<u32>,
    salt: u64,
    reserved: usize,
    computed: usize,
}

fn random_ops(seed: u64, block_size: usize, num_blocks: usize, prefix: bool, ops: usize) {
    let bs = block_size;
    let mut rng = Rng(seed);
    let mut m = mgr(bs, num_blocks, prefix);
    let templates: Vec<Vec<u32>> = (0..4)
        .map(|t| (0..40).map(|i| (t * 1000 + i) as u32).collect())
        .collect();
    let mut live: HashMap<u64, Live> = HashMap::new();
    // Preempted sequences' histories, to restart from (recompute).
    let mut parked: Vec<(Vec<u32>, u64)> = Vec::new();
    // What each committed full block holds: (salt, whole prefix up to its end).
    let mut content: HashMap<BlockId, (u64, Vec<u32>)> = HashMap::new();
    let mut next_key = 0u64;
    let (mut hits, mut oom) = (0usize, 0usize);
    for _ in 0..ops {
        match rng.below(10) {
            0..=2 => {
                let (prompt, salt) = if !parked.is_empty() && rng.below(3) == 0 {
                    parked.swap_remove(rng.below(parked.len()))
                } else {
                    let t = &templates[rng.below(templates.len())];
                    let mut p = t[..rng.below(t.len() + 1)].to_vec();
                    p.extend((0..rng.below(6)).map(|_| 9000 + rng.below(4) as u32));
                    (p, rng.below(2) as u64)
                };
                let key = next_key;
                next_key += 1;
                let hit = m.start_with_salt(SeqKey(key), &prompt, salt).unwrap();
                assert_eq!(hit % bs, 0);
                assert!(hit == 0 || hit < prompt.len());
                assert_eq!(hit, table(&m, key).len() * bs);
                if !prefix {
                    assert_eq!(hit, 0);
                }
                for (i, b) in table(&m, key).iter().enumerate() {
                    let want = (salt, prompt[..(i + 1) * bs].to_vec());
                    assert_eq!(content.get(b), Some(&want), "hit block content");
                }
                hits += hit;
                live.insert(
                    key,
                    Live {
                        hist: prompt,
                        salt,
                        reserved: hit,
                        computed: hit,
                    },
                );
            }
            3..=7 if !live.is_empty() => {
                let mut keys: Vec<u64> = live.keys().copied().collect();
                keys.sort();
                let key = keys[rng.below(keys.len())];
                let l = live.get_mut(&key).unwrap();
                let new_len = l.computed + 1 + rng.below(2 * bs + 2);
                let needed = m.blocks_needed(SeqKey(key), new_len);
                assert_eq!(
                    needed,
                    new_len.div_ceil(bs).saturating_sub(l.reserved.div_ceil(bs))
                );
                let can = m.can_reserve(SeqKey(key), new_len);
                let before = (table(&m, key), m.stats());
                match m.reserve(SeqKey(key), new_len) {
                    Ok(()) => {
                        assert!(can);
                        l.reserved = l.reserved.max(new_len);
                        while l.hist.len() < new_len {
                            l.hist.push(9000 + rng.below(3) as u32);
                        }
                        let old_full = l.computed / bs;
                        m.commit(SeqKey(key), &l.hist[..new_len]).unwrap();
                        l.computed = new_len;
                        let t = table(&m, key);
                        for (i, &b) in t.iter().enumerate().take(new_len / bs).skip(old_full) {
                            assert_eq!(refcount(&m, b), 1, "newly full block is private");
                            content.insert(b, (l.salt, l.hist[..(i + 1) * bs].to_vec()));
                        }
                    }
                    Err(e) => {
                        assert!(!can);
                        assert_eq!(
                            e,
                            KvError::OutOfBlocks {
                                needed,
                                free: m.available_blocks()
                            }
                        );
                        assert_eq!((table(&m, key), m.stats()), before, "all-or-nothing");
                        oom += 1;
                        // Preempt someone (maybe itself) to make room.
                        let victim = keys[rng.below(keys.len())];
                        let v = live.remove(&victim).unwrap();
                        m.free(SeqKey(victim));
                        parked.push((v.hist[..v.computed].to_vec(), v.salt));
                    }
                }
            }
            8 if !live.is_empty() => {
                let mut keys: Vec<u64> = live.keys().copied().collect();
                keys.sort();
                let key = keys[rng.below(keys.len())];
                live.remove(&key);
                m.free(SeqKey(key));
            }
            _ => {
                if rng.below(50) == 0 {
                    m.clear_cache();
                }
            }
        }
        check_invariants(&m);
        assert_eq!(m.num_seqs(), live.len());
        for (&k, l) in &live {
            assert_eq!(
                m.block_table(SeqKey(k)).unwrap().len(),
                l.reserved.div_ceil(bs)
            );
            assert_eq!(m.seq_len_capacity(SeqKey(k)), l.reserved.div_ceil(bs) * bs);
        }
        // Every registered block still holds what it was registered with.
        for (&h, &b) in &m.cached {
            assert!(
                content.contains_key(&b),
                "registered block {b:?} ({h:x}) has content"
            );
        }
    }
    assert!(oom > 0, "the test should exercise OutOfBlocks");
    if prefix {
        assert!(hits > 0, "the test should exercise prefix hits");
        assert!(m.stats().evictions > 0, "the test should exercise eviction");
    }
}

#[test]
fn randomized_ops_keep_invariants() {
    for seed in [0x9e37_79b9_7f4a_7c15, 1, 0xdead_beef, 12345] {
        random_ops(seed, 4, 24, true, 4000);
    }
    random_ops(77, 1, 16, true, 3000);
    random_ops(99, 16, 8, true, 2000);
    random_ops(5, 4, 24, false, 3000);
}
