//! Unit tests: the kernel against a plain f64 reference over batch shapes, head geometries,
//! slot layouts and cuts into tasks, the row split, and the rejection of inputs that do not fit.

use super::plan::split_rows;
use super::*;

/// Deterministic values in [-1, 1) (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn vec(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.next()).collect()
    }

    fn below(&mut self, n: usize) -> usize {
        ((self.next() + 1.0) * 0.5 * n as f32) as usize % n
    }
}

fn shape(nq: usize, nkv: usize, head_dim: usize) -> AttnShape {
    AttnShape {
        nq,
        nkv,
        head_dim,
        scale: 1.0 / (head_dim as f32).sqrt(),
    }
}

/// Plain softmax attention in f64, one query row and head at a time.
fn reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    sh: AttnShape,
    seqs: &[AttnSeq<'_>],
    out: &mut [f32],
) {
    let (nq, nkv, d) = (sh.nq, sh.nkv, sh.head_dim);
    for s in seqs {
        for i in 0..s.n {
            let t = s.q_offset + i;
            for h in 0..nq {
                let kvh = h / (nq / nkv);
                let qv = &q[(t * nq + h) * d..][..d];
                let row = |pool: &[f32], p: usize| {
                    pool[(s.slots[p] as usize * nkv + kvh) * d..][..d].to_vec()
                };
                let scores: Vec<f64> = (0..=s.past + i)
                    .map(|p| {
                        let kv = row(k, p);
                        let dot: f64 = qv.iter().zip(&kv).map(|(&a, &b)| a as f64 * b as f64).sum();
                        dot * sh.scale as f64
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let probs: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = probs.iter().sum();
                let dst = &mut out[(t * nq + h) * d..][..d];
                for (c, o) in dst.iter_mut().enumerate() {
                    let acc: f64 = probs
                        .iter()
                        .enumerate()
                        .map(|(p, w)| w * row(v, p)[c] as f64)
                        .sum();
                    *o = (acc / total) as f32;
                }
            }
        }
    }
}

/// A batch of sequences `(n, past)` with random q/k/v, rows in order, slots shuffled over a
/// pool with spare slots (or handed out in order when `!scattered`).
struct Case {
    sh: AttnShape,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    offsets: Vec<usize>,
    specs: Vec<(usize, usize)>,
    slots: Vec<Vec<u32>>,
}

impl Case {
    fn new(sh: AttnShape, specs: &[(usize, usize)], scattered: bool, seed: u64) -> Self {
        let mut rng = Rng(seed);
        let rows: usize = specs.iter().map(|&(n, _)| n).sum();
        let ctx: usize = specs.iter().map(|&(n, past)| n + past).sum();
        let num_slots = ctx + 7;
        let mut pool_order: Vec<u32> = (0..num_slots as u32).collect();
        if scattered {
            for i in (1..num_slots).rev() {
                pool_order.swap(i, rng.below(i + 1));
            }
        }
        let mut next = 0;
        let slots = specs
            .iter()
            .map(|&(n, past)| {
                next += n + past;
                pool_order[next - n - past..next].to_vec()
            })
            .collect();
        let offsets = specs
            .iter()
            .scan(0, |acc, &(n, _)| {
                *acc += n;
                Some(*acc - n)
            })
            .collect();
        let kv_len = num_slots * sh.nkv * sh.head_dim;
        Self {
            sh,
            q: rng.vec(rows * sh.nq * sh.head_dim),
            k: rng.vec(kv_len),
            v: rng.vec(kv_len),
            offsets,
            specs: specs.to_vec(),
            slots,
        }
    }

    fn seqs(&self) -> Vec<AttnSeq<'_>> {
        self.specs
            .iter()
            .zip(&self.offsets)
            .zip(&self.slots)
            .map(|((&(n, past), &q_offset), slots)| AttnSeq {
                q_offset,
                n,
                past,
                slots,
            })
            .collect()
    }

    fn run(&self) -> Result<Vec<f32>, AttentionError> {
        let mut out = vec![f32::NAN; self.q.len()];
        paged_attention(&self.q, &self.k, &self.v, self.sh, &self.seqs(), &mut out)?;
        Ok(out)
    }

    fn expected(&self) -> Vec<f32> {
        let mut out = vec![f32::NAN; self.q.len()];
        reference(&self.q, &self.k, &self.v, self.sh, &self.seqs(), &mut out);
        out
    }

    /// Kernel vs reference, max abs diff.
    fn check(&self) {
        let (got, want) = (self.run().unwrap(), self.expected());
        let diff = max_diff(&got, &want);
        assert!(diff <= 1e-5, "max abs diff {diff}");
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            if x.is_nan() || y.is_nan() {
                f32::INFINITY
            } else {
                (x - y).abs()
            }
        })
        .fold(0.0, f32::max)
}

#[test]
fn decode_rows_of_sequences_with_different_lengths() {
    let specs = [(1, 0), (1, 5), (1, 63), (1, 64), (1, 130), (1, 300)];
    Case::new(shape(4, 4, 64), &specs, true, 1).check();
    Case::new(shape(12, 4, 64), &specs, true, 2).check();
}

#[test]
fn prefill_chunk_after_past_is_causal() {
    Case::new(shape(12, 4, 64), &[(100, 70)], true, 3).check();
    Case::new(shape(4, 2, 64), &[(37, 0)], true, 4).check();
}

#[test]
fn gqa_with_groups_1_and_3() {
    for (nq, nkv) in [(6, 6), (6, 2)] {
        Case::new(shape(nq, nkv, 64), &[(9, 20), (1, 40)], true, 5).check();
    }
}

#[test]
fn large_groups_and_long_row_blocks() {
    // groups 8 (8 rows a task) and groups 1 (64 rows a task, several tasks a sequence).
    Case::new(shape(16, 2, 64), &[(20, 50), (1, 9)], true, 6).check();
    Case::new(shape(2, 2, 64), &[(150, 33)], true, 7).check();
}

#[test]
fn scattered_and_contiguous_slots_agree_with_reference() {
    Case::new(shape(8, 4, 64), &[(5, 90), (3, 0)], true, 8).check();
    Case::new(shape(8, 4, 64), &[(5, 90), (3, 0)], false, 8).check();
}

#[test]
fn mixed_prefill_and_decode_batch() {
    let specs = [(1, 200), (48, 17), (1, 3), (70, 0), (1, 64), (2, 127)];
    Case::new(shape(12, 4, 64), &specs, true, 9).check();
}

#[test]
fn other_head_dims_including_non_multiples_of_the_vector_width() {
    for d in [128, 80, 72, 20, 7] {
        Case::new(shape(6, 2, d), &[(13, 40), (1, 66)], true, 10 + d as u64).check();
    }
}

#[test]
fn peaked_scores_stay_stable() {
    let mut case = Case::new(shape(4, 2, 64), &[(10, 100), (1, 50)], true, 11);
    case.sh.scale = 4.0; // scores of order +-30: exp would overflow without the max shift
    case.check();
}

#[test]
fn rows_owned_by_no_sequence_are_untouched_and_empty_sequences_are_fine() {
    let case = Case::new(shape(4, 2, 16), &[(3, 5), (2, 4)], true, 12);
    let d_row = 4 * 16;
    let mut seqs = case.seqs();
    seqs[0].n = 2; // row 2 now belongs to no sequence
    seqs.push(AttnSeq {
        q_offset: 1,
        n: 0,
        past: 0,
        slots: &[],
    });
    let mut out = vec![7.0; case.q.len()];
    paged_attention(&case.q, &case.k, &case.v, case.sh, &seqs, &mut out).unwrap();
    let mut want = vec![7.0; case.q.len()];
    reference(&case.q, &case.k, &case.v, case.sh, &seqs, &mut want);
    assert!(out[2 * d_row..3 * d_row].iter().all(|&x| x == 7.0));
    assert!(max_diff(&out, &want) <= 1e-5);
}

#[test]
fn every_cut_into_tasks_gives_the_same_result() {
    let specs = [(1, 200), (150, 17), (1, 3), (70, 0), (2, 127)];
    for (nq, nkv) in [(12, 4), (3, 3)] {
        let case = Case::new(shape(nq, nkv, 64), &specs, true, 16);
        let want = case.expected();
        for wanted in [1, 2, 3, 7, 16, 1000] {
            let mut out = vec![f32::NAN; case.q.len()];
            let seqs = case.seqs();
            attention_in_tasks(&case.q, &case.k, &case.v, case.sh, &seqs, &mut out, wanted)
                .unwrap();
            let diff = max_diff(&out, &want);
            assert!(
                diff <= 1e-5,
                "{nq}/{nkv} heads, {wanted} tasks: max abs diff {diff}"
            );
        }
    }
}

#[test]
fn split_rows_covers_the_rows_in_whole_tiles() {
    let cases = [
        (0, 100, 21, 3),
        (2048, 256, 21, 2),
        (5, 7, 21, 4),
        (0, 64, 64, 1),
        (10, 200, 8, 50),
    ];
    for (past, n, tile, groups) in cases {
        let ranges = split_rows(past, n, tile, groups);
        assert!(!ranges.is_empty() && ranges.len() <= groups, "{ranges:?}");
        assert_eq!((ranges[0].start, ranges[ranges.len() - 1].end), (0, n));
        assert!(ranges.iter().all(|r| !r.is_empty()), "{ranges:?}");
        for pair in ranges.windows(2) {
            assert_eq!(pair[0].end, pair[1].start);
            assert_eq!(pair[0].end % tile, 0);
        }
    }
    // Causal work grows along the rows: the later ranges are shorter.
    let ranges = split_rows(0, 256, 16, 2);
    assert!(ranges[0].len() > ranges[1].len(), "{ranges:?}");
}

fn run_err(case: &Case, sh: AttnShape, seqs: &[AttnSeq<'_>], out_len: usize) -> AttentionError {
    let mut out = vec![0.0; out_len];
    paged_attention(&case.q, &case.k, &case.v, sh, seqs, &mut out).unwrap_err()
}

#[test]
fn rejects_bad_head_shapes() {
    let case = Case::new(shape(4, 2, 8), &[(2, 3)], true, 13);
    let seqs = case.seqs();
    for (nq, nkv, head_dim) in [
        (0, 2, 8),
        (4, 0, 8),
        (4, 2, 0),
        (4, 3, 8),
        (usize::MAX, 1, 2),
    ] {
        let sh = AttnShape {
            nq,
            nkv,
            head_dim,
            scale: 1.0,
        };
        let err = run_err(&case, sh, &seqs, case.q.len());
        assert_eq!(err, AttentionError::HeadShape { nq, nkv, head_dim });
    }
}

#[test]
fn rejects_bad_lengths() {
    let mut case = Case::new(shape(4, 2, 8), &[(2, 3)], true, 14);
    let seqs = case.seqs();
    let err = run_err(&case, case.sh, &seqs, case.q.len() + 1);
    assert_eq!(
        err,
        AttentionError::OutLength {
            out: case.q.len() + 1,
            q: case.q.len()
        }
    );
    let mut short = case.k.clone();
    short.pop();
    let mut out = vec![0.0; case.q.len()];
    let err = paged_attention(&case.q, &short, &short, case.sh, &seqs, &mut out).unwrap_err();
    assert!(matches!(err, AttentionError::PoolLength { .. }), "{err}");
    let err = paged_attention(&case.q, &case.k, &short, case.sh, &seqs, &mut out).unwrap_err();
    assert!(matches!(err, AttentionError::PoolLength { .. }), "{err}");
    let seqs: Vec<AttnSeq<'_>> = Vec::new();
    case.q.pop();
    let err = run_err(&case, case.sh, &seqs, case.q.len());
    assert_eq!(
        err,
        AttentionError::QLength {
            len: case.q.len(),
            row: 32
        }
    );
}

#[test]
fn rejects_bad_sequences() {
    let case = Case::new(shape(4, 2, 8), &[(2, 3), (1, 4)], true, 15);
    let len = case.q.len();
    let base = case.seqs();
    let with = |i: usize, f: &dyn Fn(&mut AttnSeq<'_>)| {
        let mut seqs = base.clone();
        f(&mut seqs[i]);
        run_err(&case, case.sh, &seqs, len)
    };
    let err = with(1, &|s| s.q_offset = 3);
    assert_eq!(
        err,
        AttentionError::RowsOutOfRange {
            seq: 1,
            q_offset: 3,
            n: 1,
            rows: 3
        }
    );
    let err = with(0, &|s| s.q_offset = usize::MAX);
    assert!(
        matches!(err, AttentionError::RowsOutOfRange { seq: 0, .. }),
        "{err}"
    );
    let err = with(0, &|s| s.past = 4);
    assert_eq!(
        err,
        AttentionError::SlotsTooShort {
            seq: 0,
            slots: 5,
            past: 4,
            n: 2
        }
    );
    let err = with(0, &|s| s.past = usize::MAX);
    assert!(
        matches!(err, AttentionError::SlotsTooShort { seq: 0, .. }),
        "{err}"
    );
    let err = with(1, &|s| s.q_offset = 1);
    assert_eq!(
        err,
        AttentionError::OverlappingRows {
            first: 0,
            second: 1,
            row: 1
        }
    );
    let num_slots = case.k.len() / 16;
    let bad = [0, 1, num_slots as u32, 2, 3];
    let mut seqs = base.clone();
    seqs[1].slots = &bad;
    let err = run_err(&case, case.sh, &seqs, len);
    assert_eq!(
        err,
        AttentionError::SlotOutOfRange {
            seq: 1,
            position: 2,
            slot: num_slots as u32,
            num_slots
        }
    );
}
