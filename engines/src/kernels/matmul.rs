//! `y = x · Wᵀ + b` on the CPU in f32 for the few rows of a decode step.
//!
//! candle hands `x · Wᵀ` to the `gemm` crate, which packs the whole weight into panels on every
//! call; with 1–64 rows of `x` that packing costs as much as the arithmetic, and at one row the
//! call is a matrix-vector product bound by reading the weight once. This kernel takes the
//! weight transposed once at load time, `Wᵀ` `[in, out]` row-major (the model keeps only that
//! copy; candle's matmul takes the same layout for prefill-sized inputs), and reads it in place:
//! a column panel of `NR = 2 × SIMD lanes` outputs is two vectors per reduction step.
//!
//! The micro-kernel computes up to `MR` = 6 rows × one panel: per reduction step it loads the
//! panel's two vectors, broadcasts one `x` value per row and issues 12 fused multiply-adds into
//! register accumulators (the shape that keeps an AVX2 core's FMA units busy). `x` is packed per
//! row block into row-interleaved tiles so the broadcasts stream; the reduction is split in
//! blocks of `KC` so a panel block stays in L1 while the row tiles pass over it. Panels are
//! split over rayon tasks, each writing its own column block, copied into `y` at the end (the
//! copy is `rows × out` floats, small next to `rows × out × in` multiply-adds).
//!
//! For many rows (a prefill chunk) candle's GEMM is faster; [`SMALL_ROWS`] is where the model
//! switches.
//!
//! SIMD goes through `pulp`, which detects the CPU at run time and compiles the kernel once per
//! instruction set (AVX2+FMA, or scalar elsewhere) without `unsafe` here.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use pulp::{Arch, Simd, WithSimd};
use rayon::prelude::*;

/// Up to this many rows the kernel here beats candle's matmul (measured by
/// `cargo run --release -p omnistage-benches --example linear_rows`).
pub const SMALL_ROWS: usize = 64;
/// Rows of `x` per micro-kernel tile.
const MR: usize = 6;
/// Reduction steps per block.
const KC: usize = 256;
/// Bytes of `x` rows per row block (kept in L2 while the panels stream past).
const X_BLOCK_BYTES: usize = 256 * 1024;

/// Why a matmul's operands do not fit together.
#[derive(Debug, thiserror::Error)]
pub enum MatmulError {
    #[error("weight has {got} values, expected {out_dim} x {in_dim}")]
    WeightSize {
        got: usize,
        out_dim: usize,
        in_dim: usize,
    },
    #[error("bias has {got} values, expected {out_dim}")]
    BiasSize { got: usize, out_dim: usize },
    #[error("input has {got} values, not a multiple of the {in_dim} input features")]
    InputSize { got: usize, in_dim: usize },
    #[error("output has {got} values, expected {rows} x {out_dim}")]
    OutputSize {
        got: usize,
        rows: usize,
        out_dim: usize,
    },
}

/// A weight `[out_dim, in_dim]` (and optional bias `[out_dim]`) packed into column panels:
/// panel `p` holds `Wᵀ[:, p·nr .. p·nr + nr]` as `in_dim × nr` contiguous floats (zero past
/// `out_dim`), so the kernel streams it.
#[derive(Debug)]
pub struct PackedWeight {
    panels: Vec<f32>,
    bias: Option<Vec<f32>>,
    in_dim: usize,
    out_dim: usize,
    nr: usize,
}

impl PackedWeight {
    /// Packs `weight` (`out_dim × in_dim` row-major, as in a checkpoint) and `bias`.
    pub fn new(
        weight: &[f32],
        bias: Option<&[f32]>,
        out_dim: usize,
        in_dim: usize,
    ) -> Result<Self, MatmulError> {
        if weight.len() != out_dim * in_dim {
            return Err(MatmulError::WeightSize {
                got: weight.len(),
                out_dim,
                in_dim,
            });
        }
        if let Some(b) = bias.filter(|b| b.len() != out_dim) {
            return Err(MatmulError::BiasSize {
                got: b.len(),
                out_dim,
            });
        }
        let nr = panel_width();
        let mut panels = vec![0f32; out_dim.div_ceil(nr) * in_dim * nr];
        if in_dim > 0 {
            for (p, panel) in panels.chunks_exact_mut(in_dim * nr).enumerate() {
                for c in 0..nr.min(out_dim - p * nr) {
                    let row = &weight[(p * nr + c) * in_dim..][..in_dim];
                    for (k, &w) in row.iter().enumerate() {
                        panel[k * nr + c] = w;
                    }
                }
            }
        }
        Ok(Self {
            panels,
            bias: bias.map(<[f32]>::to_vec),
            in_dim,
            out_dim,
            nr,
        })
    }

    /// Packs a candle `[out, in]` weight (and `[out]` bias), converted to f32.
    pub fn from_tensors(weight: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        let f32s = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
        let b = bias.map(f32s).transpose()?;
        Self::new(&f32s(weight)?, b.as_deref(), out_dim, in_dim)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    /// Input features.
    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// Output features.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// Bytes held by the panels and the bias.
    pub fn bytes(&self) -> usize {
        (self.panels.len() + self.bias.as_ref().map_or(0, Vec::len)) * 4
    }

    /// Reduction rows `k0 .. k0 + kc` of panel `p`.
    fn panel_rows(&self, p: usize, k0: usize, kc: usize) -> &[f32] {
        &self.panels[(p * self.in_dim + k0) * self.nr..][..kc * self.nr]
    }
}

/// `y[r, :] = x[r, :] · Wᵀ + b` for every row `r` of `x` (`rows × in_dim` row-major);
/// `y` is `rows × out_dim`.
pub fn matmul(w: &PackedWeight, x: &[f32], y: &mut [f32]) -> Result<(), MatmulError> {
    let (k, n) = (w.in_dim, w.out_dim);
    if k == 0 || x.len() % k != 0 {
        return Err(MatmulError::InputSize {
            got: x.len(),
            in_dim: k,
        });
    }
    let rows = x.len() / k;
    if y.len() != rows * n {
        return Err(MatmulError::OutputSize {
            got: y.len(),
            rows,
            out_dim: n,
        });
    }
    if rows == 0 || n == 0 {
        return Ok(());
    }
    let panels = n.div_ceil(w.nr);
    // Enough tasks to balance the threads, each at least one panel.
    let tasks = (rayon::current_num_threads() * 4).clamp(1, panels);
    let per_task = panels.div_ceil(tasks);
    let blocks: Vec<(usize, Vec<f32>)> = (0..panels)
        .step_by(per_task)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|p0| {
            (
                p0,
                column_block(w, x, rows, p0..(p0 + per_task).min(panels)),
            )
        })
        .collect();
    for (p0, block) in blocks {
        let (c0, width) = (p0 * w.nr, block.len() / rows);
        let cols = width.min(n - c0);
        for (r, src) in block.chunks_exact(width).enumerate() {
            y[r * n + c0..][..cols].copy_from_slice(&src[..cols]);
        }
    }
    Ok(())
}

/// Output columns a panel covers on this CPU: twice its f32 SIMD lanes.
pub fn panel_width() -> usize {
    struct Lanes;
    impl WithSimd for Lanes {
        type Output = usize;
        #[inline(always)]
        fn with_simd<S: Simd>(self, _simd: S) -> usize {
            S::F32_LANES
        }
    }
    2 * Arch::new().dispatch(Lanes)
}

/// Panels `panels` for every row: `rows × (panels.len() · nr)` row-major, bias added (columns
/// past `out_dim` are zero and dropped by the caller).
fn column_block(
    w: &PackedWeight,
    x: &[f32],
    rows: usize,
    panels: std::ops::Range<usize>,
) -> Vec<f32> {
    let (k, nr) = (w.in_dim, w.nr);
    let cols = panels.len() * nr;
    let mut out = vec![0f32; rows * cols];
    let mc = (X_BLOCK_BYTES / (k * 4)).max(1).div_ceil(MR) * MR;
    let mut xpack = Vec::new();
    for r0 in (0..rows).step_by(mc) {
        let r1 = (r0 + mc).min(rows);
        pack_rows(&x[r0 * k..r1 * k], k, &mut xpack);
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            for p in panels.clone() {
                let panel = w.panel_rows(p, k0, kc);
                for t0 in (r0..r1).step_by(MR) {
                    let tile = (t0 - r0) / MR;
                    Arch::new().dispatch(Tile {
                        panel,
                        x: &xpack[tile * k * MR + k0 * MR..][..kc * MR],
                        rows: MR.min(r1 - t0),
                        acc: &mut out[t0 * cols + (p - panels.start) * nr..],
                        stride: cols,
                        nr,
                    });
                }
            }
        }
    }
    if let Some(b) = &w.bias {
        let first = panels.start * nr;
        let valid = cols.min(w.out_dim - first);
        for row in out.chunks_exact_mut(cols) {
            for (d, b) in row[..valid].iter_mut().zip(&b[first..]) {
                *d += b;
            }
        }
    }
    out
}

/// Packs `x` (`rows × k`) into tiles of [`MR`] rows interleaved per reduction step
/// (`tile[kk * MR + i] = x[i][kk]`, zero rows past the end), so the micro-kernel reads its
/// broadcasts from one sequential stream.
fn pack_rows(x: &[f32], k: usize, out: &mut Vec<f32>) {
    let rows = x.len() / k;
    out.clear();
    out.resize(rows.div_ceil(MR) * k * MR, 0.0);
    for (t, tile) in out.chunks_exact_mut(k * MR).enumerate() {
        for i in 0..MR.min(rows - t * MR) {
            let row = &x[(t * MR + i) * k..][..k];
            for (kk, &v) in row.iter().enumerate() {
                tile[kk * MR + i] = v;
            }
        }
    }
}

/// One micro-kernel call: `rows ≤ MR` packed rows of `x` against `kc` reduction rows of one
/// panel (`kc × nr`), added into `acc` (row `i` at `acc[i * stride ..][..nr]`).
struct Tile<'a> {
    panel: &'a [f32],
    x: &'a [f32],
    rows: usize,
    acc: &'a mut [f32],
    stride: usize,
    nr: usize,
}

impl WithSimd for Tile<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        match self.rows {
            1 => single_row(simd, self),
            2 => tile::<S, 2>(simd, self),
            3 => tile::<S, 3>(simd, self),
            4 => tile::<S, 4>(simd, self),
            5 => tile::<S, 5>(simd, self),
            _ => tile::<S, 6>(simd, self),
        }
    }
}

/// One row × one panel: a matrix-vector product, bound by streaming the panel from memory. Four
/// independent accumulator pairs keep the loads in flight instead of waiting on each fused
/// multiply-add's latency.
#[inline(always)]
fn single_row<S: Simd>(simd: S, t: Tile<'_>) {
    let kc = t.x.len() / MR;
    let (panel, _) = S::as_simd_f32s(t.panel);
    let panel = &panel[..2 * kc];
    let x = &t.x[..kc * MR];
    let zero = simd.splat_f32s(0.0);
    let mut acc = [[zero; 2]; 4];
    let (row, _) = S::as_simd_f32s(&t.acc[..t.nr]);
    acc[0] = [row[0], row[1]];
    let unrolled = kc / 4 * 4;
    for kk in (0..unrolled).step_by(4) {
        for (u, a) in acc.iter_mut().enumerate() {
            let xv = simd.splat_f32s(x[(kk + u) * MR]);
            a[0] = simd.mul_add_f32s(panel[2 * (kk + u)], xv, a[0]);
            a[1] = simd.mul_add_f32s(panel[2 * (kk + u) + 1], xv, a[1]);
        }
    }
    for kk in unrolled..kc {
        let xv = simd.splat_f32s(x[kk * MR]);
        acc[0][0] = simd.mul_add_f32s(panel[2 * kk], xv, acc[0][0]);
        acc[0][1] = simd.mul_add_f32s(panel[2 * kk + 1], xv, acc[0][1]);
    }
    let sum = |j: usize| {
        let a = simd.add_f32s(acc[0][j], acc[1][j]);
        let b = simd.add_f32s(acc[2][j], acc[3][j]);
        simd.add_f32s(a, b)
    };
    let (row, _) = S::as_mut_simd_f32s(&mut t.acc[..t.nr]);
    row[0] = sum(0);
    row[1] = sum(1);
}

/// `M` rows × one panel (two vectors) over the block's reduction steps.
#[inline(always)]
fn tile<S: Simd, const M: usize>(simd: S, t: Tile<'_>) {
    let kc = t.x.len() / MR;
    // A panel row is exactly two vectors (nr = 2 × lanes).
    let (panel, _) = S::as_simd_f32s(t.panel);
    let panel = &panel[..2 * kc];
    let x = &t.x[..kc * MR];
    let mut acc: [[S::f32s; 2]; M] = std::array::from_fn(|i| {
        let (row, _) = S::as_simd_f32s(&t.acc[i * t.stride..][..t.nr]);
        [row[0], row[1]]
    });
    for kk in 0..kc {
        let (w0, w1) = (panel[2 * kk], panel[2 * kk + 1]);
        for (i, a) in acc.iter_mut().enumerate() {
            let xv = simd.splat_f32s(x[kk * MR + i]);
            a[0] = simd.mul_add_f32s(w0, xv, a[0]);
            a[1] = simd.mul_add_f32s(w1, xv, a[1]);
        }
    }
    for (i, a) in acc.iter().enumerate() {
        let (row, _) = S::as_mut_simd_f32s(&mut t.acc[i * t.stride..][..t.nr]);
        row[0] = a[0];
        row[1] = a[1];
    }
}

/// The candle op applying a [`PackedWeight`] to a contiguous f32 CPU tensor `[.., in_dim]`.
#[derive(Debug, Clone)]
pub struct PackedLinearOp(pub Arc<PackedWeight>);

impl CustomOp1 for PackedLinearOp {
    fn name(&self) -> &'static str {
        "packed-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = &self.0;
        let dims = layout.shape().dims();
        if dims.last() != Some(&w.in_dim) {
            return Err(candle_core::Error::Msg(format!(
                "packed linear expects [.., {}], got {dims:?}",
                w.in_dim
            )));
        }
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("packed linear needs a contiguous input".into())
        })?;
        let x = &storage.as_slice::<f32>()?[start..end];
        let mut y = vec![0f32; x.len() / w.in_dim * w.out_dim];
        matmul(w, x, &mut y).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = w.out_dim;
        }
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `x · Wᵀ + b` in f64, `w` `[n, k]` row-major.
    fn reference(w: &[f32], b: Option<&[f32]>, x: &[f32], n: usize, k: usize) -> Vec<f32> {
        let rows = x.len() / k;
        let mut y = vec![0f32; rows * n];
        for r in 0..rows {
            for o in 0..n {
                let s: f64 = (0..k)
                    .map(|i| f64::from(x[r * k + i]) * f64::from(w[o * k + i]))
                    .sum();
                y[r * n + o] = s as f32 + b.map_or(0.0, |b| b[o]);
            }
        }
        y
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32 ^ seed).wrapping_mul(2_654_435_761) >> 8;
                (h % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_reference_for_ragged_shapes() {
        // Rows that do and do not fill whole tiles and row blocks; outputs that do not fill the
        // last panel; reductions shorter than, equal to and longer than a block.
        for &(rows, n, k) in &[
            (1, 5, 3),
            (7, 40, 33),
            (13, 17, 256),
            (64, 96, 700),
            (300, 16, 300),
            (3, 1, 9),
        ] {
            let (w, b, x) = (values(n * k, 1), values(n, 2), values(rows * k, 3));
            let packed = PackedWeight::new(&w, Some(&b), n, k).unwrap();
            let mut y = vec![0f32; rows * n];
            matmul(&packed, &x, &mut y).unwrap();
            for (a, e) in y.iter().zip(&reference(&w, Some(&b), &x, n, k)) {
                assert!(
                    (a - e).abs() <= 1e-4 * (1.0 + e.abs()),
                    "{rows}x{n}x{k}: {a} vs {e}"
                );
            }
        }
    }

    #[test]
    fn bad_sizes_are_errors() {
        assert!(matches!(
            PackedWeight::new(&[0.0; 5], None, 2, 3),
            Err(MatmulError::WeightSize { .. })
        ));
        assert!(matches!(
            PackedWeight::new(&[0.0; 6], Some(&[0.0]), 2, 3),
            Err(MatmulError::BiasSize { .. })
        ));
        let w = PackedWeight::new(&[0.0; 6], None, 2, 3).unwrap();
        assert!(matches!(
            matmul(&w, &[0.0; 4], &mut [0.0; 2]),
            Err(MatmulError::InputSize { .. })
        ));
        assert!(matches!(
            matmul(&w, &[0.0; 3], &mut [0.0; 3]),
            Err(MatmulError::OutputSize { .. })
        ));
    }

    #[test]
    fn candle_op_matches_linear() {
        let dev = candle_core::Device::Cpu;
        let w = Tensor::new(values(24 * 10, 6), &dev)
            .unwrap()
            .reshape((24, 10))
            .unwrap();
        let b = Tensor::new(values(24, 7), &dev).unwrap();
        let x = Tensor::new(values(2 * 3 * 10, 8), &dev)
            .unwrap()
            .reshape((2, 3, 10))
            .unwrap();
        let op = PackedLinearOp(Arc::new(PackedWeight::from_tensors(&w, Some(&b)).unwrap()));
        let got = x.apply_op1_no_bwd(&op).unwrap();
        let want = candle_nn::Module::forward(&candle_nn::Linear::new(w, Some(b)), &x).unwrap();
        assert_eq!(got.dims(), want.dims());
        let diff = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
    }
}
