//! The paged-KV forward against the per-sequence-cache forward.
//!
//! Seeded random tiny checkpoints (Qwen2, Qwen3, Llama) are written with `write_tiny_llm` and
//! loaded through the real loading path. Sequences join a running batch at different steps,
//! prefill in chunks that straddle block boundaries, decode greedily and finish at different
//! times; their blocks come from a shuffled free list, and blocks freed by finished sequences
//! are handed to later ones with stale rows in them. Every step runs once through
//! `LlmModel::forward` (per-sequence caches) and once through `LlmModel::forward_paged` (one
//! pool, block tables), and the logits and hidden states must agree. On the CPU in f32 the
//! paged path runs the fused attention kernel, so this also checks the kernel inside the model.

use candle_core::{DType, Device, Tensor};
use omnistage_engines::llm::model::{LlmError, LlmModel, SeqChunk, SeqKvCache};
use omnistage_engines::llm::paged::{PagedChunk, PagedKvPool};
use omnistage_engines::tiny::{write_tiny_llm, TinyFamily, TinyLlmSpec};
use rand::seq::SliceRandom;
use rand::{rngs::StdRng, Rng, SeedableRng};

const TOL_F32: f32 = 1e-5;

fn load(spec: &TinyLlmSpec, dtype: DType, seed: u64) -> (tempfile::TempDir, LlmModel) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_llm(dir.path(), spec, seed).unwrap();
    let model = LlmModel::load(dir.path(), dtype, &Device::Cpu).unwrap();
    (dir, model)
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_dtype(DType::F32).unwrap().to_vec2().unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let (a, b) = (a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn pc<'a>(tokens: &'a [u32], past: usize, table: &'a [u32], hidden: bool) -> PagedChunk<'a> {
    PagedChunk {
        tokens,
        past,
        block_table: table,
        want_hidden: hidden,
        splice: &[],
    }
}

fn sc<'a>(tokens: &'a [u32], cache: &'a mut SeqKvCache, hidden: bool) -> SeqChunk<'a> {
    SeqChunk {
        tokens,
        cache,
        want_hidden: hidden,
    }
}

/// Every K and V row of every layer, as f32 (to compare a pool before and after a call).
fn snapshot(pool: &PagedKvPool) -> Vec<Vec<f32>> {
    (0..pool.num_layers())
        .flat_map(|l| {
            let (k, v) = pool.layer(l).unwrap();
            [k, v].map(|t| {
                t.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
        })
        .collect()
}

/// A block free list in shuffled order; freed blocks are handed out again first.
struct Blocks {
    free: Vec<u32>,
    freed: Vec<u32>,
    reused: usize,
}

impl Blocks {
    fn new(num_blocks: usize, rng: &mut StdRng) -> Self {
        let mut free: Vec<u32> = (0..num_blocks as u32).collect();
        free.shuffle(rng);
        Self {
            free,
            freed: Vec::new(),
            reused: 0,
        }
    }

    /// Extends `table` to cover `tokens` tokens.
    fn grow(&mut self, table: &mut Vec<u32>, tokens: usize, bs: usize) {
        while table.len() * bs < tokens {
            let b = match self.freed.pop() {
                Some(b) => {
                    self.reused += 1;
                    b
                }
                None => self.free.pop().expect("pool exhausted"),
            };
            table.push(b);
        }
    }
}

struct Seq {
    prompt: Vec<u32>,
    join: usize,
    max_new: usize,
    fed: usize,
    generated: Vec<u32>,
    cache: SeqKvCache,
    table: Vec<u32>,
    done: bool,
}

/// Runs staggered sequences through `forward` and `forward_paged` side by side and returns the
/// largest logit and hidden-state differences seen.
fn staggered(model: &LlmModel, bs: usize, chunk: usize, seed: u64) -> (f32, f32) {
    let mut rng = StdRng::seed_from_u64(seed);
    let vocab = model.config().vocab_size as u32;
    // (prompt length, join step, new tokens): the last two join after the first ones finished.
    let shapes = [
        (3, 0, 6),
        (11, 0, 4),
        (17, 2, 8),
        (6, 3, 5),
        (9, 7, 3),
        (13, 9, 4),
    ];
    let mut seqs: Vec<Seq> = shapes
        .iter()
        .map(|&(len, join, max_new)| Seq {
            prompt: (0..len).map(|_| rng.gen_range(0..vocab)).collect(),
            join,
            max_new,
            fed: 0,
            generated: Vec::new(),
            cache: model.new_cache(),
            table: Vec::new(),
            done: false,
        })
        .collect();
    let num_blocks = 128;
    let mut pool = PagedKvPool::new(
        model.config(),
        num_blocks,
        bs,
        model.dtype(),
        model.device(),
    )
    .unwrap();
    let mut blocks = Blocks::new(num_blocks, &mut rng);
    let (mut worst_logits, mut worst_hidden) = (0f32, 0f32);
    let mut step = 0;
    while seqs.iter().any(|s| !s.done) {
        let active: Vec<usize> = (0..seqs.len())
            .filter(|&i| seqs[i].join <= step && !seqs[i].done)
            .collect();
        step += 1;
        if active.is_empty() {
            continue;
        }
        let tokens: Vec<Vec<u32>> = active
            .iter()
            .map(|&i| {
                let s = &seqs[i];
                if s.fed < s.prompt.len() {
                    s.prompt[s.fed..(s.fed + chunk).min(s.prompt.len())].to_vec()
                } else {
                    vec![*s.generated.last().unwrap()]
                }
            })
            .collect();
        for (&i, t) in active.iter().zip(&tokens) {
            let s = &mut seqs[i];
            blocks.grow(&mut s.table, s.fed + t.len(), bs);
        }
        let paged_batch: Vec<PagedChunk> = active
            .iter()
            .zip(&tokens)
            .map(|(&i, t)| pc(t, seqs[i].fed, &seqs[i].table, i % 2 == 1))
            .collect();
        let paged = model.forward_paged(&mut pool, &paged_batch).unwrap();
        let mut caches: Vec<&mut Seq> = seqs
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| active.contains(i))
            .map(|(_, s)| s)
            .collect();
        let mut batch: Vec<SeqChunk> = caches
            .iter_mut()
            .zip(&tokens)
            .zip(&active)
            .map(|((s, t), &i)| sc(t, &mut s.cache, i % 2 == 1))
            .collect();
        let reference = model.forward(&mut batch).unwrap();
        drop(batch);
        worst_logits = worst_logits.max(max_abs_diff(&paged.logits, &reference.logits));
        for (p, r) in paged.hidden.iter().zip(&reference.hidden) {
            match (p, r) {
                (Some(p), Some(r)) => worst_hidden = worst_hidden.max(max_abs_diff(p, r)),
                (None, None) => {}
                _ => panic!("want_hidden honoured by one forward only"),
            }
        }
        let logits = rows(&reference.logits);
        for ((&i, t), row) in active.iter().zip(&tokens).zip(&logits) {
            let s = &mut seqs[i];
            s.fed += t.len();
            assert_eq!(s.cache.len(), s.fed);
            if s.fed >= s.prompt.len() {
                s.generated.push(argmax(row));
                if s.generated.len() == s.max_new {
                    s.done = true;
                    blocks.freed.extend(std::mem::take(&mut s.table));
                }
            }
        }
    }
    assert!(blocks.reused > 0, "no block was reused");
    (worst_logits, worst_hidden)
}

fn staggered_family(family: TinyFamily) {
    let (_dir, model) = load(&TinyLlmSpec::tiny(family), DType::F32, 7);
    for (bs, chunk) in [(4, 5), (16, 7), (1, 3)] {
        let (logits, hidden) = staggered(&model, bs, chunk, 11 + bs as u64);
        eprintln!("{family:?} block size {bs}: max diff logits {logits:e}, hidden {hidden:e}");
        assert!(
            logits <= TOL_F32 && hidden <= TOL_F32,
            "{family:?} block size {bs}: logits differ by {logits}, hidden by {hidden}"
        );
    }
}

#[test]
fn paged_matches_forward_qwen3() {
    staggered_family(TinyFamily::Qwen3);
}

#[test]
fn paged_matches_forward_qwen2() {
    staggered_family(TinyFamily::Qwen2);
}

#[test]
fn paged_matches_forward_llama() {
    staggered_family(TinyFamily::Llama);
}

#[test]
fn paged_matches_forward_bf16() {
    let (_dir, model) = load(&TinyLlmSpec::tiny(TinyFamily::Qwen3), DType::BF16, 3);
    let pool = PagedKvPool::new(model.config(), 8, 16, DType::BF16, &Device::Cpu).unwrap();
    assert_eq!(pool.dtype(), DType::BF16);
    assert_eq!(
        pool.bytes(),
        8 * PagedKvPool::bytes_per_block(model.config(), 16, DType::BF16)
    );
    // 2 (K, V) * 2 layers * 16 tokens * 2 kv heads * head_dim 16 * 2 bytes.
    assert_eq!(
        PagedKvPool::bytes_per_block(model.config(), 16, DType::BF16),
        4096
    );
    let (logits, hidden) = staggered(&model, 4, 5, 5);
    eprintln!("bf16: max diff logits {logits:e}, hidden {hidden:e}");
    assert!(
        logits <= 1e-2 && hidden <= 1e-2,
        "bf16: logits differ by {logits}, hidden by {hidden}"
    );
}

/// A second sequence whose table starts with the first one's full blocks computes only its
/// suffix and matches computing it alone from scratch; the shared blocks stay untouched while
/// both decode in one batch.
#[test]
fn shared_prefix_blocks() {
    for family in [TinyFamily::Qwen3, TinyFamily::Qwen2] {
        let (_dir, model) = load(&TinyLlmSpec::tiny(family), DType::F32, 21);
        let bs = 4;
        let mut rng = StdRng::seed_from_u64(9);
        let vocab = model.config().vocab_size as u32;
        let mut pool = PagedKvPool::new(model.config(), 32, bs, DType::F32, &Device::Cpu).unwrap();
        let a: Vec<u32> = (0..14).map(|_| rng.gen_range(0..vocab)).collect();
        let shared = 12; // three full blocks
        let mut b = a[..shared].to_vec();
        b.extend((0..5).map(|_| rng.gen_range(0..vocab)));
        let mut table_a = vec![17, 3, 25, 8];
        let mut table_b = vec![17, 3, 25, 30, 4];

        let chunk_a = pc(&a, 0, &table_a, false);
        let out_a = model.forward_paged(&mut pool, &[chunk_a]).unwrap();
        let chunk_b = pc(&b[shared..], shared, &table_b, true);
        let out_b = model.forward_paged(&mut pool, &[chunk_b]).unwrap();

        let mut cache_a = model.new_cache();
        let mut cache_b = model.new_cache();
        let ref_a = model.forward(&mut [sc(&a, &mut cache_a, false)]).unwrap();
        let ref_b = model.forward(&mut [sc(&b, &mut cache_b, true)]).unwrap();
        assert!(max_abs_diff(&out_a.logits, &ref_a.logits) <= TOL_F32);
        assert!(max_abs_diff(&out_b.logits, &ref_b.logits) <= TOL_F32);
        let ref_hidden = ref_b.hidden[0]
            .as_ref()
            .unwrap()
            .narrow(0, shared, 5)
            .unwrap();
        assert!(max_abs_diff(out_b.hidden[0].as_ref().unwrap(), &ref_hidden) <= TOL_F32);

        // Both decode together: A writes into its own partial block 8, B into its block 4.
        let row = model.config().num_key_value_heads * model.config().head_dim;
        let shared_rows = |pool: &PagedKvPool| -> Vec<f32> {
            let blocks = [17usize, 3, 25].map(|b| b * bs * row..(b + 1) * bs * row);
            let all = snapshot(pool);
            all.iter()
                .flat_map(|t| blocks.iter().flat_map(|r| t[r.clone()].to_vec()))
                .collect()
        };
        let before = shared_rows(&pool);
        let (mut next_a, mut next_b) = (
            argmax(&rows(&ref_a.logits)[0]),
            argmax(&rows(&ref_b.logits)[0]),
        );
        let (mut len_a, mut len_b) = (a.len(), b.len());
        for _ in 0..6 {
            // Grow tables with fresh blocks as the sequences cross block boundaries.
            if len_a + 1 > table_a.len() * bs {
                table_a.push(12 + table_a.len() as u32);
            }
            if len_b + 1 > table_b.len() * bs {
                table_b.push(26 + table_b.len() as u32);
            }
            let (ta, tb) = ([next_a], [next_b]);
            let out = model
                .forward_paged(
                    &mut pool,
                    &[
                        pc(&ta, len_a, &table_a, false),
                        pc(&tb, len_b, &table_b, false),
                    ],
                )
                .unwrap();
            let reference = model
                .forward(&mut [sc(&ta, &mut cache_a, false), sc(&tb, &mut cache_b, false)])
                .unwrap();
            let diff = max_abs_diff(&out.logits, &reference.logits);
            assert!(
                diff <= TOL_F32,
                "{family:?}: decode logits differ by {diff}"
            );
            let r = rows(&reference.logits);
            (next_a, next_b) = (argmax(&r[0]), argmax(&r[1]));
            len_a += 1;
            len_b += 1;
        }
        assert_eq!(
            shared_rows(&pool),
            before,
            "shared prefix blocks were written"
        );
    }
}

#[test]
fn invalid_input_leaves_pool_unchanged() {
    let (_dir, model) = load(&TinyLlmSpec::tiny(TinyFamily::Qwen3), DType::F32, 5);
    let cfg = model.config().clone();
    let bs = 4;
    let mut pool = PagedKvPool::new(&cfg, 16, bs, DType::F32, &Device::Cpu).unwrap();
    let prompt: Vec<u32> = (0..10).collect();
    let table0 = [3u32, 7, 1];
    model
        .forward_paged(&mut pool, &[pc(&prompt, 0, &table0, false)])
        .unwrap();
    let before = snapshot(&pool);
    // A valid decode chunk (writes block 1 at offset 2) goes first in every batch, so a
    // validation that ran after writing would show in the pool.
    let good = pc(&[5], 10, &table0, false);
    let bad = |tokens, past, table| pc(tokens, past, table, false);
    let too_big = [cfg.vocab_size as u32];
    let cases: Vec<(&str, Vec<PagedChunk>)> = vec![
        ("empty batch", vec![]),
        (
            "table too short",
            vec![good, bad(&[1, 2, 3, 4, 5, 6], 0, &[2])],
        ),
        (
            "table too short for past",
            vec![good, bad(&[1], 8, &[2, 4])],
        ),
        (
            "block id out of range",
            vec![good, bad(&[1, 2, 3, 4, 5], 0, &[2, 16])],
        ),
        ("empty chunk", vec![good, bad(&[], 0, &[2])]),
        ("token id >= vocab", vec![good, bad(&too_big, 0, &[2])]),
        (
            "block twice in a table",
            vec![good, bad(&[1, 2, 3, 4, 5], 0, &[2, 2])],
        ),
        (
            "two writers of one block",
            vec![good, bad(&[1, 2, 3], 0, &[1])],
        ),
        // Reads rows 0..4 of block 1 while the good chunk writes its row 2.
        (
            "reads rows being written",
            vec![good, bad(&[1], 12, &[3, 7, 1, 5])],
        ),
        ("past overflows", vec![good, bad(&[1], usize::MAX, &[2])]),
    ];
    for (what, batch) in cases {
        match model.forward_paged(&mut pool, &batch) {
            Err(LlmError::Input(msg)) => eprintln!("{what}: {msg}"),
            other => panic!("{what}: expected an input error, got {other:?}"),
        }
        assert!(snapshot(&pool) == before, "{what}: pool changed");
    }

    // A pool for another model shape or dtype is refused.
    let mut cfg3 = cfg.clone();
    cfg3.num_hidden_layers = 3;
    for (what, mut other) in [
        (
            "layers",
            PagedKvPool::new(&cfg3, 16, bs, DType::F32, &Device::Cpu).unwrap(),
        ),
        (
            "dtype",
            PagedKvPool::new(&cfg, 16, bs, DType::BF16, &Device::Cpu).unwrap(),
        ),
    ] {
        let err = model.forward_paged(&mut other, &[good]).unwrap_err();
        assert!(matches!(err, LlmError::Input(_)), "{what}: {err:?}");
    }
    for (n, b) in [(0, 4), (4, 0)] {
        let err = PagedKvPool::new(&cfg, n, b, DType::F32, &Device::Cpu).unwrap_err();
        assert!(matches!(err, LlmError::Input(_)));
    }

    // The good chunk alone still runs and changes exactly its own row.
    model.forward_paged(&mut pool, &[good]).unwrap();
    let after = snapshot(&pool);
    let row = cfg.num_key_value_heads * cfg.head_dim;
    let slot = bs + 2; // block 1, offset 2
    for (b, a) in before.iter().zip(&after) {
        for (r, (x, y)) in b.chunks(row).zip(a.chunks(row)).enumerate() {
            assert_eq!(x == y, r != slot, "row {r}");
        }
    }
}
