//! The per-task flash-attention loop: packs each unit's queries, walks the task's keys in
//! blocks (gathered from the pool into scratch), runs the block kernels on every unit that sees
//! the block, and finally writes the normalised outputs.

use std::cell::RefCell;
use std::ops::Range;

use pulp::{Arch, Scalar, Simd, WithSimd};

use super::block::{block_pv, block_scores, mask_block, softmax_block, KvView, QueryDims};
use super::plan::{tile_rows, tiles, Task};
use super::scratch::{Scratch, Unit};
use super::{AttnSeq, Inputs};

/// Keys per softmax block (and per gather).
const BLOCK: usize = 64;
/// Keys per score tile when there are few queries (one SIMD vector of them).
const KT_NARROW: usize = 8;
/// Keys per score tile when there are many queries (two SIMD vectors of them).
const KT_WIDE: usize = 6;
/// Extra gathered key rows so the last score tile of a block stays in the buffer.
const KT_PAD: usize = 8;
/// Stand-in for the running max before any key: finite, so `m_old - m_new` is never `-inf - -inf`.
const NEG_BIG: f32 = -1e30;

/// Runs one task of the batch on this thread, with the instruction set of `arch`.
pub(super) fn run(inputs: &Inputs<'_>, seq: &AttnSeq<'_>, task: Task<'_>, arch: Arch) {
    with_scratch(Job { inputs, seq, task }, arch);
}

/// Runs `job` with this thread's scratch (a fresh one if it is somehow in use).
fn with_scratch(job: Job<'_, '_>, arch: Arch) {
    thread_local! {
        static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    }
    let mut job = Some(job);
    let _ = SCRATCH.try_with(|cell| {
        if let (Ok(mut scratch), Some(job)) = (cell.try_borrow_mut(), job.take()) {
            job.run(arch, &mut scratch);
        }
    });
    if let Some(job) = job {
        job.run(arch, &mut Scratch::default());
    }
}

/// A task and what it reads.
struct Job<'a, 'o> {
    inputs: &'a Inputs<'a>,
    seq: &'a AttnSeq<'a>,
    task: Task<'o>,
}

impl Job<'_, '_> {
    fn run(self, arch: Arch, scratch: &mut Scratch) {
        arch.dispatch(RunTask { job: self, scratch });
    }
}

/// Runs one task with the instruction set `pulp` picked.
struct RunTask<'a, 'o, 's> {
    job: Job<'a, 'o>,
    scratch: &'s mut Scratch,
}

impl WithSimd for RunTask<'_, '_, '_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        #[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; MSRV is 1.85
        if self.job.inputs.d % S::F32_LANES == 0 {
            run_task(simd, self);
        } else {
            run_task(Scalar, self);
        }
    }
}

/// Picks the score-tile shape: two query vectors per panel when there are enough queries.
#[inline(always)]
fn run_task<S: Simd>(simd: S, run: RunTask<'_, '_, '_>) {
    let groups = run.job.inputs.groups;
    let m = run.job.task.rows.len().min(tile_rows(groups)) * groups;
    if m > S::F32_LANES {
        run_tiled::<S, KT_WIDE, 2>(simd, run);
    } else {
        run_tiled::<S, KT_NARROW, 1>(simd, run);
    }
}

/// One task, with score tiles of `KT` keys × `NV` query vectors. Requires `d % lanes == 0`.
#[inline(always)]
fn run_tiled<S: Simd, const KT: usize, const NV: usize>(simd: S, run: RunTask<'_, '_, '_>) {
    let RunTask {
        job: Job { inputs, seq, task },
        scratch,
    } = run;
    let (d, groups, hn) = (inputs.d, inputs.groups, task.heads.len());
    let tr = tile_rows(groups);
    let width = NV * S::F32_LANES;
    let dims = |rows: usize| QueryDims::new(rows * groups, width);
    prepare_units(inputs, seq, &task, width, scratch);
    let Scratch {
        units,
        st,
        alpha,
        keys,
        values,
    } = scratch;
    let widest = dims(tr.min(task.rows.len()));
    st.reset((BLOCK + KT_PAD) * widest.mq, 0.0);
    alpha.reset(widest.mq, 0.0);
    keys.reset((BLOCK + KT_PAD) * hn * d, 0.0);
    values.reset(BLOCK * hn * d, 0.0);

    let kv_end = seq.past + task.rows.end;
    for kb0 in (0..kv_end).step_by(BLOCK) {
        let nb = BLOCK.min(kv_end - kb0);
        gather_block(
            simd,
            inputs,
            task.heads.clone(),
            &seq.slots[kb0..kb0 + nb],
            keys,
            values,
        );
        for (t, (r0, rows)) in tiles(task.rows.clone(), tr).enumerate() {
            // The tile's rows see keys before `first_pos + rows`.
            let first_pos = seq.past + r0;
            let Some(visible) = (first_pos + rows).checked_sub(kb0).filter(|&v| v > 0) else {
                continue;
            };
            let dims = dims(rows);
            for (hh, unit) in units[t * hn..(t + 1) * hn].iter_mut().enumerate() {
                let view = KvView {
                    stride: hn * d,
                    offset: hh * d,
                    nb: nb.min(visible),
                    d,
                };
                block_scores::<S, KT, NV>(simd, &unit.qt, keys, view, dims, st);
                if kb0 + view.nb - 1 > first_pos {
                    mask_block(st, dims, view.nb, kb0, first_pos, groups);
                }
                softmax_block(simd, dims, view.nb, st, unit, alpha);
                block_pv(simd, values, view, dims, st, alpha, &mut unit.acc);
            }
        }
    }
    write_out(task, tr, d, units);
}

/// Sizes every unit's buffers and packs its queries.
fn prepare_units(
    inputs: &Inputs<'_>,
    seq: &AttnSeq<'_>,
    task: &Task<'_>,
    width: usize,
    scratch: &mut Scratch,
) {
    let (d, hn) = (inputs.d, task.heads.len());
    let tr = tile_rows(inputs.groups);
    let count = task.rows.len().div_ceil(tr) * hn;
    if scratch.units.len() < count {
        scratch.units.resize_with(count, Unit::default);
    }
    let units = scratch.units.chunks_exact_mut(hn);
    for ((r0, rows), tile_units) in tiles(task.rows.clone(), tr).zip(units) {
        let dims = QueryDims::new(rows * inputs.groups, width);
        for (head, unit) in task.heads.clone().zip(tile_units) {
            unit.qt.reset(dims.mq * d, 0.0);
            unit.acc.reset(dims.mq * d, 0.0);
            unit.max.reset(dims.mq, NEG_BIG);
            unit.sum.reset(dims.mq, 0.0);
            let first = (seq.q_offset + r0) * inputs.nq + head * inputs.groups;
            pack_queries(inputs, first, dims, width, &mut unit.qt);
        }
    }
}

/// Packs a unit's queries scaled and transposed. Query `i` is row `i / groups`, head
/// `i % groups` of the group, i.e. head row `first + (i / groups) * nq + i % groups` of `q`;
/// it goes to lane `i % width` of panel `i / width`.
fn pack_queries(inputs: &Inputs<'_>, first: usize, dims: QueryDims, width: usize, qt: &mut [f32]) {
    let d = inputs.d;
    for i in 0..dims.m {
        let head_row = first + (i / inputs.groups) * inputs.nq + i % inputs.groups;
        let src = &inputs.q[head_row * d..(head_row + 1) * d];
        let panel = &mut qt[(i / width) * d * width..][..d * width];
        let lane = panel.iter_mut().skip(i % width).step_by(width);
        for (dst, &x) in lane.zip(src) {
            *dst = x * inputs.scale;
        }
    }
}

/// Copies the rows of kv heads `heads` of the block's slots into `keys` and `values`
/// (`[key][heads][d]`). The heads of a slot are one contiguous run in the pool, and one loop
/// copies both pools, so many cache misses are in flight at once.
#[inline(always)]
fn gather_block<S: Simd>(
    simd: S,
    inputs: &Inputs<'_>,
    heads: Range<usize>,
    slots: &[u32],
    keys: &mut [f32],
    values: &mut [f32],
) {
    let _ = simd;
    let dv = inputs.d / S::F32_LANES;
    let (nkv, run) = (inputs.nkv, heads.len() * dv);
    let (k, v) = (S::as_simd_f32s(inputs.k).0, S::as_simd_f32s(inputs.v).0);
    let keys = S::as_mut_simd_f32s(keys).0.chunks_exact_mut(run);
    let values = S::as_mut_simd_f32s(values).0.chunks_exact_mut(run);
    for (&slot, (k_dst, v_dst)) in slots.iter().zip(keys.zip(values)) {
        let off = (slot as usize * nkv + heads.start) * dv;
        let src = k[off..off + run].iter().zip(&v[off..off + run]);
        for ((kd, vd), (&ks, &vs)) in k_dst.iter_mut().zip(v_dst.iter_mut()).zip(src) {
            *kd = ks;
            *vd = vs;
        }
    }
}

/// Divides each real query's accumulator by its softmax sum into its piece of `out`.
fn write_out(mut task: Task<'_>, tile_rows: usize, d: usize, units: &[Unit]) {
    let hn = task.heads.len();
    let start = task.rows.start;
    for ((r0, rows), tile_units) in tiles(task.rows.clone(), tile_rows).zip(units.chunks_exact(hn))
    {
        for (hh, unit) in tile_units.iter().enumerate() {
            for r in 0..rows {
                let piece = &mut task.outs[(r0 - start + r) * hn + hh];
                // The piece is `[groups][d]`: queries `r * groups..` of the unit, in order.
                let first = r * (piece.len() / d);
                let src = unit.acc[first * d..]
                    .chunks_exact(d)
                    .zip(&unit.sum[first..]);
                for (dst, (acc, &sum)) in piece.chunks_exact_mut(d).zip(src) {
                    let inv = 1.0 / sum;
                    for (o, &a) in dst.iter_mut().zip(acc) {
                        *o = a * inv;
                    }
                }
            }
        }
    }
}
