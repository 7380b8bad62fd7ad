//! Task planning: how a batch is cut into parallel tasks (whole sequences, or pieces of long
//! ones by kv heads and row ranges of about equal causal work), and which pieces of `out` each
//! task writes.

use std::ops::Range;

use super::{AttnSeq, Inputs};

/// Queries (rows × group heads) per row tile: enough to amortise each key and value row read,
/// few enough that a tile's scores and accumulators stay in L1.
const TILE_QUERIES: usize = 64;

/// One unit of parallel work: rows `rows` of sequence `seq`, for the kv heads `heads`.
pub(super) struct Task<'o> {
    pub(super) seq: usize,
    pub(super) heads: Range<usize>,
    pub(super) rows: Range<usize>,
    /// Per row, then per kv head of `heads`: the `[groups, d]` piece of `out` that holds the
    /// row's query heads of that kv head.
    pub(super) outs: Vec<&'o mut [f32]>,
    /// Estimated cost (query-key pairs), to start the big tasks first.
    work: u64,
}

/// Rows per row tile.
pub(super) fn tile_rows(groups: usize) -> usize {
    (TILE_QUERIES / groups).max(1)
}

/// The row tiles `(first row, rows)` of a row range.
pub(super) fn tiles(rows: Range<usize>, tile_rows: usize) -> impl Iterator<Item = (usize, usize)> {
    let end = rows.end;
    rows.step_by(tile_rows)
        .map(move |r0| (r0, tile_rows.min(end - r0)))
}

/// Query-key pairs (per query head) of `n` rows starting at position `first_pos`.
fn work(first_pos: usize, n: usize) -> u64 {
    (n as u64).saturating_mul((first_pos as u64).saturating_add((n as u64).div_ceil(2)))
}

/// Cuts the batch into tasks and hands each the pieces of `out` it writes. A sequence is one
/// task (all kv heads: each slot's keys are read as one contiguous row) unless it holds more
/// than its share of the work, in which case it is split by kv heads, then by row tiles.
pub(super) fn plan_tasks<'o>(
    inputs: &Inputs<'_>,
    seqs: &[AttnSeq<'_>],
    rows: usize,
    out: &'o mut [f32],
    wanted: usize,
) -> Vec<Task<'o>> {
    let (nkv, groups) = (inputs.nkv, inputs.groups);
    let tr = tile_rows(groups);
    let total = seqs
        .iter()
        .map(|s| work(s.past, s.n))
        .fold(0, u64::saturating_add);
    let share = (total / wanted.max(1) as u64).max(1);
    let mut tasks = Vec::new();
    // Row of q -> (first task of its row range, kv heads per task).
    let mut owner: Vec<Option<(usize, usize)>> = vec![None; rows];
    for (si, s) in seqs.iter().enumerate().filter(|(_, s)| s.n > 0) {
        let units = nkv * s.n.div_ceil(tr);
        let pieces = work(s.past, s.n).div_ceil(share).clamp(1, units as u64) as usize;
        let (head_groups, row_groups) = if pieces <= nkv {
            (pieces, 1)
        } else {
            (nkv, pieces.div_ceil(nkv))
        };
        let per_task = nkv.div_ceil(head_groups);
        for rows in split_rows(s.past, s.n, tr, row_groups) {
            let first = tasks.len();
            owner[s.q_offset + rows.start..s.q_offset + rows.end].fill(Some((first, per_task)));
            for h0 in (0..nkv).step_by(per_task) {
                let heads = h0..nkv.min(h0 + per_task);
                tasks.push(Task {
                    seq: si,
                    work: work(s.past + rows.start, rows.len()).saturating_mul(heads.len() as u64),
                    outs: Vec::with_capacity(rows.len() * heads.len()),
                    heads,
                    rows: rows.clone(),
                });
            }
        }
    }
    // Pieces come in (row, kv head) order, which is each task's `outs` order.
    for (i, piece) in out.chunks_exact_mut(groups * inputs.d).enumerate() {
        if let Some((first, per_task)) = owner[i / nkv] {
            tasks[first + (i % nkv) / per_task].outs.push(piece);
        }
    }
    tasks.sort_by_key(|t| std::cmp::Reverse(t.work));
    tasks
}

/// Splits rows `0..n` (the first at position `past`) into at most `groups` ranges of whole
/// tiles with about equal work.
pub(super) fn split_rows(
    past: usize,
    n: usize,
    tile_rows: usize,
    groups: usize,
) -> Vec<Range<usize>> {
    let tile_work = |(r0, rows): (usize, usize)| work(past + r0, rows) as u128;
    let total: u128 = tiles(0..n, tile_rows).map(tile_work).sum();
    let groups = groups.max(1) as u128;
    let mut ranges = Vec::new();
    let (mut start, mut done) = (0, 0u128);
    for tile in tiles(0..n, tile_rows) {
        done += tile_work(tile);
        let end = tile.0 + tile.1;
        if end < n && done * groups >= total * (ranges.len() as u128 + 1) {
            ranges.push(start..end);
            start = end;
        }
    }
    ranges.push(start..n);
    ranges
}
