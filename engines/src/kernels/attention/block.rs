//! The SIMD kernels applied to one unit and key block: scores (`q·k`), the causal mask, the
//! online softmax update (with a vectorised `expf`) and `acc = acc * alpha + P·V`.

use pulp::Simd;

use super::scratch::Unit;

/// Queries per P·V register tile.
const PV_ROWS: usize = 4;

/// Sizes of one unit's query set.
#[derive(Clone, Copy)]
pub(super) struct QueryDims {
    /// Real queries: rows × group heads, row-major.
    pub(super) m: usize,
    /// Queries the P·V tiles cover (`m` rounded up to [`PV_ROWS`]).
    m_pv: usize,
    /// Stored queries per score row (`m_pv` rounded up to a whole number of panels).
    pub(super) mq: usize,
}

impl QueryDims {
    pub(super) fn new(m: usize, width: usize) -> Self {
        let m_pv = m.next_multiple_of(PV_ROWS);
        Self {
            m,
            m_pv,
            mq: m_pv.next_multiple_of(width),
        }
    }
}

/// Where one unit's keys and values sit in the gathered block.
#[derive(Clone, Copy)]
pub(super) struct KvView {
    /// Floats from one key's row to the next (`heads * d`).
    pub(super) stride: usize,
    /// Offset of the unit's kv head in a row (`head * d`).
    pub(super) offset: usize,
    /// Keys the unit uses.
    pub(super) nb: usize,
    /// Head size.
    pub(super) d: usize,
}

/// Scores of the view's keys against all of a unit's queries, into `st[key][query]`. The last
/// tile runs over rows past `nb` (stale or spare), whose scores are never read.
#[inline(always)]
pub(super) fn block_scores<S: Simd, const KT: usize, const NV: usize>(
    simd: S,
    qt: &[f32],
    keys: &[f32],
    view: KvView,
    dims: QueryDims,
    st: &mut [f32],
) {
    let d = view.d;
    let qt = S::as_simd_f32s(qt).0;
    let st = S::as_mut_simd_f32s(st).0;
    let row_vecs = dims.mq / S::F32_LANES;
    for t in 0..view.nb.div_ceil(KT) {
        let tile: [&[f32]; KT] =
            std::array::from_fn(|r| &keys[(t * KT + r) * view.stride + view.offset..][..d]);
        for (p, panel) in qt.chunks_exact(d * NV).enumerate() {
            let scores = score_tile::<S, KT, NV>(simd, panel, &tile, d);
            for (r, row) in scores.iter().enumerate() {
                st[(t * KT + r) * row_vecs + p * NV..][..NV].copy_from_slice(row);
            }
        }
    }
}

/// `KT` keys × `NV` query vectors of scores: per element `c` of the head, one broadcast key
/// element times one packed query vector, accumulated in registers.
#[inline(always)]
fn score_tile<S: Simd, const KT: usize, const NV: usize>(
    simd: S,
    panel: &[S::f32s],
    keys: &[&[f32]; KT],
    d: usize,
) -> [[S::f32s; NV]; KT] {
    let mut acc = [[simd.splat_f32s(0.0); NV]; KT];
    let keys = keys.map(|key| &key[..d]);
    for (c, qv) in (0..d).zip(panel.chunks_exact(NV)) {
        for (acc_r, key) in acc.iter_mut().zip(&keys) {
            let kb = simd.splat_f32s(key[c]);
            for (a, &q) in acc_r.iter_mut().zip(qv) {
                *a = simd.mul_add_e_f32s(kb, q, *a);
            }
        }
    }
    acc
}

/// Sets to `-inf` the scores of keys after a query's position. Key `kb0 + j` is `ahead`
/// positions after the tile's first row, so it is hidden from rows `0..ahead`, i.e. from the
/// queries `0..ahead * groups`.
pub(super) fn mask_block(
    st: &mut [f32],
    dims: QueryDims,
    nb: usize,
    kb0: usize,
    first_pos: usize,
    groups: usize,
) {
    for (j, row) in st.chunks_exact_mut(dims.mq).take(nb).enumerate() {
        let ahead = (kb0 + j).saturating_sub(first_pos);
        row[..(ahead * groups).min(dims.m)].fill(f32::NEG_INFINITY);
    }
}

/// Online softmax over the block's `nb` keys, vectorised over queries: updates the unit's
/// running max and sum, leaves the rescale factor in `alpha` and the probabilities in `st`.
#[inline(always)]
pub(super) fn softmax_block<S: Simd>(
    simd: S,
    dims: QueryDims,
    nb: usize,
    st: &mut [f32],
    unit: &mut Unit,
    alpha: &mut [f32],
) {
    let lanes = S::F32_LANES;
    let row_vecs = dims.mq / lanes;
    let st = S::as_mut_simd_f32s(&mut st[..nb * dims.mq]).0;
    let max = S::as_mut_simd_f32s(&mut unit.max).0;
    let sum = S::as_mut_simd_f32s(&mut unit.sum).0;
    let alpha = S::as_mut_simd_f32s(alpha).0;
    for v in 0..dims.m_pv.div_ceil(lanes) {
        let mut block_max = simd.splat_f32s(f32::NEG_INFINITY);
        for row in st.chunks_exact(row_vecs) {
            block_max = simd.max_f32s(block_max, row[v]);
        }
        let new_max = simd.max_f32s(max[v], block_max);
        let mut block_sum = simd.splat_f32s(0.0);
        for row in st.chunks_exact_mut(row_vecs) {
            let p = exp(simd, simd.sub_f32s(row[v], new_max));
            row[v] = p;
            block_sum = simd.add_f32s(block_sum, p);
        }
        alpha[v] = exp(simd, simd.sub_f32s(max[v], new_max));
        sum[v] = simd.mul_add_e_f32s(sum[v], alpha[v], block_sum);
        max[v] = new_max;
    }
}

/// `e^x` per lane for `x <= 0` (Cephes `expf`: round to `n * ln2 + r`, degree-6 polynomial in
/// `r`, exponent bits for `2^n`); below -87 (and for `-inf`) it returns 0.
#[inline(always)]
fn exp<S: Simd>(simd: S, x: S::f32s) -> S::f32s {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const POLY: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ];
    let floor = simd.splat_f32s(-87.0);
    let xc = simd.max_f32s(x, floor);
    let t = simd.mul_add_e_f32s(xc, simd.splat_f32s(LOG2E), simd.splat_f32s(ROUND));
    let n = simd.sub_f32s(t, simd.splat_f32s(ROUND));
    let r = simd.mul_add_e_f32s(n, simd.splat_f32s(-LN2_HI), xc);
    let r = simd.mul_add_e_f32s(n, simd.splat_f32s(-LN2_LO), r);
    let mut p = simd.splat_f32s(POLY[0]);
    for &coef in &POLY[1..] {
        p = simd.mul_add_e_f32s(p, r, simd.splat_f32s(coef));
    }
    let r2 = simd.mul_f32s(r, r);
    let y = simd.add_f32s(simd.mul_add_e_f32s(p, r2, r), simd.splat_f32s(1.0));
    // The low mantissa bits of `t` hold n (two's complement); shifted into the exponent field
    // with the bias they give 2^n (the bits above wrap out of the u32).
    let bits = simd.add_u32s(simd.transmute_u32s_f32s(t), simd.splat_u32s(127));
    let pow2 = simd.transmute_f32s_u32s(simd.wrapping_dyn_shl_u32s(bits, simd.splat_u32s(23)));
    let e = simd.mul_f32s(y, pow2);
    simd.select_f32s(simd.less_than_f32s(x, floor), simd.splat_f32s(0.0), e)
}

/// `acc = acc * alpha + P·V` over the view's keys, in tiles of [`PV_ROWS`] queries × 2
/// vectors of the head.
#[inline(always)]
pub(super) fn block_pv<S: Simd>(
    simd: S,
    values: &[f32],
    view: KvView,
    dims: QueryDims,
    probs: &[f32],
    alpha: &[f32],
    acc: &mut [f32],
) {
    let lanes = S::F32_LANES;
    let dv = view.d / lanes;
    let acc = S::as_mut_simd_f32s(acc).0;
    for i0 in (0..dims.m_pv).step_by(PV_ROWS) {
        let tile = PvTile {
            i0,
            mq: dims.mq,
            alpha: &alpha[i0..i0 + PV_ROWS],
            probs: &probs[..view.nb * dims.mq],
            values: S::as_simd_f32s(values).0,
            stride: view.stride / lanes,
            offset: view.offset / lanes,
            dv,
        };
        let rows = &mut acc[i0 * dv..(i0 + PV_ROWS) * dv];
        let mut c0 = 0;
        while c0 + 2 <= dv {
            tile.run::<S, 2>(simd, rows, c0);
            c0 += 2;
        }
        if c0 < dv {
            tile.run::<S, 1>(simd, rows, c0);
        }
    }
}

/// One row of P·V tiles: queries `i0..i0 + PV_ROWS`, over all keys of the view.
struct PvTile<'a, T> {
    i0: usize,
    mq: usize,
    alpha: &'a [f32],
    /// `[key][mq]` probabilities.
    probs: &'a [f32],
    /// `[key][heads][dv]` value vectors; the unit's head at `offset` in each `stride`.
    values: &'a [T],
    stride: usize,
    offset: usize,
    dv: usize,
}

impl<T: Copy> PvTile<'_, T> {
    /// Updates vectors `c0..c0 + NV` of the head in the tile's `rows` (`[PV_ROWS][dv]`).
    #[inline(always)]
    fn run<S: Simd<f32s = T>, const NV: usize>(&self, simd: S, rows: &mut [T], c0: usize) {
        let dv = self.dv;
        let mut acc = [[simd.splat_f32s(0.0); NV]; PV_ROWS];
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let a = simd.splat_f32s(self.alpha[r]);
            for (dst, &x) in acc_r.iter_mut().zip(&rows[r * dv + c0..][..NV]) {
                *dst = simd.mul_f32s(x, a);
            }
        }
        let keys = self.values.chunks_exact(self.stride);
        for (vrow, prow) in keys.zip(self.probs.chunks_exact(self.mq)) {
            let vrow = &vrow[self.offset + c0..][..NV];
            let p = &prow[self.i0..][..PV_ROWS];
            for (acc_r, &pr) in acc.iter_mut().zip(p) {
                let pb = simd.splat_f32s(pr);
                for (a, &x) in acc_r.iter_mut().zip(vrow) {
                    *a = simd.mul_add_e_f32s(pb, x, *a);
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            rows[r * dv + c0..][..NV].copy_from_slice(acc_r);
        }
    }
}
