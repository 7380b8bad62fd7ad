//! CPU paged attention: softmax(q·kᵀ·scale)·v for a batch of sequences, reading keys and values
//! straight from one layer's paged KV pool (no gathered copies of a sequence's context, no
//! per-sequence tensor ops).
//!
//! # Layout
//!
//! * `q`: `[T, nq, d]` f32, row-major, RoPE applied. `T` is the number of new tokens of the whole
//!   batch; a sequence owns the rows `q_offset..q_offset + n`.
//! * `k_pool`, `v_pool`: `[num_slots, nkv, d]` f32, row-major. The new tokens' keys and values
//!   are already in their slots; `slots[p]` is the slot of absolute position `p` of a sequence.
//! * `out`: `[T, nq, d]` f32, same rows as `q`. Rows no sequence owns are left untouched.
//!
//! All four are plain contiguous slices in exactly these layouts (e.g. a contiguous candle
//! tensor's storage); nothing is checked about them beyond their lengths.
//!
//! Query head `h` reads kv head `h / (nq / nkv)` (grouped-query attention). Row `i` of a sequence
//! sits at position `past + i` and attends to positions `0..=past + i`.
//!
//! # Algorithm
//!
//! Flash-attention style, per task, with nothing materialised beyond one block of scores:
//!
//! * **Tasks** (run in parallel on rayon): a sequence is one task covering all its kv heads, so
//!   each slot's keys for all heads are read as one contiguous run of the pool. A sequence with
//!   more than its share of the batch's work (long prefill chunks, or few sequences) is split
//!   by kv heads, then into row ranges of about equal causal work. Each task writes its own
//!   `[groups, d]` pieces of `out`, handed out as disjoint `&mut` slices up front.
//! * **Units**: within a task, each row tile (up to `64 / groups` rows) and kv head
//!   is a unit of `M = rows × groups` queries — all query heads of the group, so every key and
//!   value row read serves all of them. Its queries are pre-scaled and packed transposed
//!   (`[d][lanes]` panels) once.
//! * **Key blocks**: the task walks positions in blocks of 64. It copies the block's key
//!   and value rows into contiguous scratch (one pass, many cache misses in flight), then, for
//!   every unit that sees any of these keys:
//!   1. scores `Sᵀ[key][query]` from a register-tiled kernel (one broadcast key element times a
//!      SIMD vector of queries, `KT` keys × 1–2 vectors per tile);
//!   2. the causal mask (`-inf`) where a key is after a row's position;
//!   3. an online softmax update, vectorised over queries: running max and sum, and the factor
//!      `alpha = exp(m_old - m_new)` rescaling what was accumulated so far (vectorised Cephes
//!      `expf`);
//!   4. `acc = acc * alpha + P·V`, tiled over 4 queries × 2 SIMD vectors of the head.
//!
//! A gathered block serves every unit of the task (all its row tiles and kv heads), so a task
//! reads its part of the pool once. At the end each accumulator is divided by its softmax
//! sum. All arithmetic is f32.
//!
//! SIMD code is written against `pulp`'s portable [`Simd`](pulp::Simd) trait and dispatched at
//! runtime (AVX2+FMA on x86-64 where present, NEON, or scalar); a `head_dim` that is not a
//! multiple of the vector width runs the same code on pulp's scalar backend. Scratch buffers live
//! in a thread-local and are reused across calls. There is no `unsafe` code.
//!
//! # Modules
//!
//! This module holds the public types, [`paged_attention`] and the input validation;
//! `plan` cuts the batch into tasks, `flash` runs one task (the key-block loop), `block` holds
//! the SIMD kernels of one unit and key block (scores, mask, softmax, P·V) and `scratch` the
//! reused buffers.

mod block;
mod flash;
mod plan;
mod scratch;
#[cfg(test)]
mod tests;

use pulp::Arch;
use rayon::prelude::*;

/// One sequence of the batch.
#[derive(Debug, Clone, Copy)]
pub struct AttnSeq<'a> {
    /// First row of `q` (and `out`) holding this sequence's new tokens.
    pub q_offset: usize,
    /// Number of new tokens (rows). Zero is allowed and does nothing.
    pub n: usize,
    /// Tokens cached before the new ones: row `i` sits at position `past + i`.
    pub past: usize,
    /// Pool slot of each position `0..past + n` (extra trailing entries are ignored).
    pub slots: &'a [u32],
}

/// Head geometry and softmax scale.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    /// Query heads.
    pub nq: usize,
    /// Key/value heads; `nq` must be a multiple of it.
    pub nkv: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Multiplier of `q·k` before the softmax (usually `1 / sqrt(head_dim)`).
    pub scale: f32,
}

/// Inputs that do not fit together. Nothing is read or written when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttentionError {
    /// A zero head count or head size, `nq` not a multiple of `nkv`, or sizes that overflow.
    #[error(
        "invalid head shape: nq {nq}, nkv {nkv}, head_dim {head_dim} (all must be non-zero, \
         nq a multiple of nkv)"
    )]
    HeadShape {
        nq: usize,
        nkv: usize,
        head_dim: usize,
    },
    /// `q` is not a whole number of `[nq, head_dim]` rows.
    #[error("q has {len} values, not a multiple of nq * head_dim = {row}")]
    QLength { len: usize, row: usize },
    /// `out` and `q` differ in length.
    #[error("out has {out} values, q has {q}")]
    OutLength { out: usize, q: usize },
    /// The pools differ in length or are not a whole number of `[nkv, head_dim]` slots.
    #[error(
        "k pool has {k} values and v pool {v}; both must be the same multiple of \
         nkv * head_dim = {row}"
    )]
    PoolLength { k: usize, v: usize, row: usize },
    /// A sequence's rows run past the end of `q`.
    #[error("sequence {seq}: rows {q_offset}..{q_offset}+{n} exceed the {rows} rows of q")]
    RowsOutOfRange {
        seq: usize,
        q_offset: usize,
        n: usize,
        rows: usize,
    },
    /// A sequence's table has fewer slots than `past + n` positions (or `past + n` overflows).
    #[error("sequence {seq}: {slots} slots for past {past} + {n} new tokens")]
    SlotsTooShort {
        seq: usize,
        slots: usize,
        past: usize,
        n: usize,
    },
    /// A slot id is not in the pool.
    #[error("sequence {seq}: position {position} is in slot {slot}, the pool has {num_slots}")]
    SlotOutOfRange {
        seq: usize,
        position: usize,
        slot: u32,
        num_slots: usize,
    },
    /// Two sequences claim the same row of `q`.
    #[error("sequences {first} and {second} both own q row {row}")]
    OverlappingRows {
        first: usize,
        second: usize,
        row: usize,
    },
}

/// Tasks aimed for per rayon thread, for load balance.
const TASKS_PER_THREAD: usize = 4;

/// Attention of every sequence's new rows over its cached and new positions; see the module
/// docs for the layout. Validates everything before touching `out`.
pub fn paged_attention(
    q: &[f32],
    k_pool: &[f32],
    v_pool: &[f32],
    shape: AttnShape,
    seqs: &[AttnSeq<'_>],
    out: &mut [f32],
) -> Result<(), AttentionError> {
    let wanted = TASKS_PER_THREAD * rayon::current_num_threads();
    attention_in_tasks(q, k_pool, v_pool, shape, seqs, out, wanted)
}

/// [`paged_attention`], cut into about `wanted` parallel tasks.
fn attention_in_tasks(
    q: &[f32],
    k_pool: &[f32],
    v_pool: &[f32],
    shape: AttnShape,
    seqs: &[AttnSeq<'_>],
    out: &mut [f32],
    wanted: usize,
) -> Result<(), AttentionError> {
    let rows = validate(q, k_pool, v_pool, &shape, seqs, out)?;
    let inputs = Inputs {
        q,
        k: k_pool,
        v: v_pool,
        nq: shape.nq,
        nkv: shape.nkv,
        d: shape.head_dim,
        groups: shape.nq / shape.nkv,
        scale: shape.scale,
    };
    let tasks = plan::plan_tasks(&inputs, seqs, rows, out, wanted);
    let arch = Arch::new();
    tasks
        .into_par_iter()
        .for_each(|task| flash::run(&inputs, &seqs[task.seq], task, arch));
    Ok(())
}

/// Checks everything [`paged_attention`] relies on; returns the number of rows of `q`.
fn validate(
    q: &[f32],
    k_pool: &[f32],
    v_pool: &[f32],
    shape: &AttnShape,
    seqs: &[AttnSeq<'_>],
    out: &[f32],
) -> Result<usize, AttentionError> {
    let AttnShape {
        nq, nkv, head_dim, ..
    } = *shape;
    let bad_shape = AttentionError::HeadShape { nq, nkv, head_dim };
    #[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; MSRV is 1.85
    if nq == 0 || nkv == 0 || head_dim == 0 || nq % nkv != 0 {
        return Err(bad_shape);
    }
    let (Some(q_row), Some(kv_row)) = (nq.checked_mul(head_dim), nkv.checked_mul(head_dim)) else {
        return Err(bad_shape);
    };
    #[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; MSRV is 1.85
    if q.len() % q_row != 0 {
        return Err(AttentionError::QLength {
            len: q.len(),
            row: q_row,
        });
    }
    if out.len() != q.len() {
        return Err(AttentionError::OutLength {
            out: out.len(),
            q: q.len(),
        });
    }
    #[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; MSRV is 1.85
    if k_pool.len() != v_pool.len() || k_pool.len() % kv_row != 0 {
        return Err(AttentionError::PoolLength {
            k: k_pool.len(),
            v: v_pool.len(),
            row: kv_row,
        });
    }
    let rows = q.len() / q_row;
    let num_slots = k_pool.len() / kv_row;
    for (i, s) in seqs.iter().enumerate() {
        validate_seq(i, s, rows, num_slots)?;
    }
    check_overlap(seqs)?;
    Ok(rows)
}

/// Checks sequence `seq`'s rows against the `rows` of `q` and its slots against the pool.
fn validate_seq(
    seq: usize,
    s: &AttnSeq<'_>,
    rows: usize,
    num_slots: usize,
) -> Result<(), AttentionError> {
    if s.q_offset.checked_add(s.n).is_none_or(|end| end > rows) {
        return Err(AttentionError::RowsOutOfRange {
            seq,
            q_offset: s.q_offset,
            n: s.n,
            rows,
        });
    }
    let too_short = AttentionError::SlotsTooShort {
        seq,
        slots: s.slots.len(),
        past: s.past,
        n: s.n,
    };
    let ctx = s.past.checked_add(s.n).ok_or(too_short.clone())?;
    let used = s.slots.get(..ctx).ok_or(too_short)?;
    match used.iter().position(|&slot| slot as usize >= num_slots) {
        Some(position) => Err(AttentionError::SlotOutOfRange {
            seq,
            position,
            slot: used[position],
            num_slots,
        }),
        None => Ok(()),
    }
}

/// Errors if two sequences with rows share one (rows are already known to be in range).
fn check_overlap(seqs: &[AttnSeq<'_>]) -> Result<(), AttentionError> {
    let mut spans: Vec<(usize, usize, usize)> = seqs
        .iter()
        .enumerate()
        .filter(|(_, s)| s.n > 0)
        .map(|(i, s)| (s.q_offset, s.q_offset + s.n, i))
        .collect();
    spans.sort_unstable();
    for pair in spans.windows(2) {
        let ((_, end, first), (start, _, second)) = (pair[0], pair[1]);
        if start < end {
            return Err(AttentionError::OverlappingRows {
                first: first.min(second),
                second: first.max(second),
                row: start,
            });
        }
    }
    Ok(())
}

/// The shared, validated inputs.
struct Inputs<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    nq: usize,
    nkv: usize,
    d: usize,
    groups: usize,
    scale: f32,
}
