//! Embeddings of recently encoded media, by content digest, within a byte budget: the same image
//! or clip sent again (in another request, another file format, or twice in one request) is not
//! encoded again. Least recently used entries go first.

use omnistage_stages::{HiddenStates, MediaDigest};
use std::collections::{BTreeMap, HashMap};

/// An LRU map from media digest to its embedding rows, bounded in bytes.
#[derive(Debug)]
pub struct EmbeddingCache {
    budget: usize,
    used: usize,
    tick: u64,
    entries: HashMap<MediaDigest, (HiddenStates, u64)>,
    /// Last-use tick → digest, oldest first.
    order: BTreeMap<u64, MediaDigest>,
    queries: u64,
    hits: u64,
}

fn bytes_of(rows: &HiddenStates) -> usize {
    rows.data.len() * std::mem::size_of::<f32>()
}

impl EmbeddingCache {
    /// A cache holding at most `budget` bytes of embeddings (0: caches nothing).
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            used: 0,
            tick: 0,
            entries: HashMap::new(),
            order: BTreeMap::new(),
            queries: 0,
            hits: 0,
        }
    }

    /// The embedding of `digest`, if cached (counts a query, and a hit when found).
    pub fn get(&mut self, digest: &MediaDigest) -> Option<HiddenStates> {
        self.queries += 1;
        self.tick += 1;
        let tick = self.tick;
        let (rows, last) = self.entries.get_mut(digest)?;
        self.order.remove(last);
        *last = tick;
        self.order.insert(tick, *digest);
        self.hits += 1;
        Some(rows.clone())
    }

    /// Keeps `rows` for `digest`, evicting the least recently used entries to stay within the
    /// budget; an embedding larger than the whole budget is not kept.
    pub fn insert(&mut self, digest: MediaDigest, rows: HiddenStates) {
        let size = bytes_of(&rows);
        if size > self.budget {
            return;
        }
        if let Some((old, last)) = self.entries.remove(&digest) {
            self.used -= bytes_of(&old);
            self.order.remove(&last);
        }
        while self.used + size > self.budget {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some((old, _)) = self.entries.remove(&oldest) {
                self.used -= bytes_of(&old);
            }
        }
        self.tick += 1;
        self.order.insert(self.tick, digest);
        self.entries.insert(digest, (rows, self.tick));
        self.used += size;
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.used
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Lookups so far, and how many found their embedding.
    pub fn queries(&self) -> u64 {
        self.queries
    }

    pub fn hits(&self) -> u64 {
        self.hits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> MediaDigest {
        MediaDigest([n; 32])
    }

    fn rows(n: usize) -> HiddenStates {
        HiddenStates::new(vec![n as f32; n * 2], 2)
    }

    #[test]
    fn keeps_within_budget_and_evicts_least_recently_used() {
        // Each entry of 2 rows × 2 floats is 16 bytes; room for three.
        let mut c = EmbeddingCache::new(48);
        c.insert(digest(1), rows(2));
        c.insert(digest(2), rows(2));
        c.insert(digest(3), rows(2));
        assert_eq!(c.bytes(), 48);
        assert!(c.get(&digest(1)).is_some()); // 1 is now the most recent
        c.insert(digest(4), rows(2)); // evicts 2, the least recently used
        assert!(c.get(&digest(2)).is_none());
        assert!(c.get(&digest(1)).is_some());
        assert!(c.get(&digest(3)).is_some());
        assert!(c.get(&digest(4)).is_some());
        assert_eq!((c.queries(), c.hits()), (5, 4));
        assert_eq!(c.len(), 3);
        assert!(c.bytes() <= 48);
    }

    #[test]
    fn too_large_or_zero_budget_keeps_nothing_and_reinsert_replaces() {
        let mut c = EmbeddingCache::new(0);
        c.insert(digest(1), rows(1));
        assert!(c.is_empty());
        let mut c = EmbeddingCache::new(64);
        c.insert(digest(1), rows(10)); // 80 bytes > 64
        assert!(c.is_empty());
        c.insert(digest(1), rows(2));
        c.insert(digest(1), rows(3));
        assert_eq!(c.len(), 1);
        assert_eq!(c.bytes(), 24);
        assert_eq!(c.get(&digest(1)).unwrap().rows, 3);
    }
}
