//! The LLM's linear layers: candle's `Linear`, plus on the CPU in f32 a copy of the weight
//! packed for [`crate::kernels::matmul`], used when a call has few rows (a decode step).
//!
//! The packed copy doubles the memory of CPU f32 weights; it is what makes batched decode run at
//! the machine's arithmetic rate instead of re-packing every weight on every step (see the
//! kernel's module doc and `benches/examples/linear_rows.rs`). Other devices and dtypes use
//! candle's matmul alone.

use std::sync::Arc;

use candle_core::{DType, Module, Tensor};
use candle_nn::Linear;

use crate::kernels::matmul::{PackedLinearOp, PackedWeight};

/// Up to this many rows the packed kernel is used (it is faster there; candle's GEMM is faster
/// on prefill-sized inputs).
const SMALL_ROWS: usize = 64;

/// A linear layer with an optional packed CPU copy of its weight.
#[derive(Debug, Clone)]
pub(crate) struct Proj {
    linear: Linear,
    packed: Option<PackedLinearOp>,
}

impl Proj {
    /// Wraps `linear`, packing its weight when it lives on the CPU in f32.
    pub(crate) fn new(linear: Linear) -> candle_core::Result<Self> {
        let w = linear.weight();
        let packed = if w.device().is_cpu() && w.dtype() == DType::F32 {
            let packed = PackedWeight::from_tensors(w, linear.bias())?;
            Some(PackedLinearOp(Arc::new(packed)))
        } else {
            None
        };
        Ok(Self { linear, packed })
    }
}

impl Module for Proj {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match &self.packed {
            Some(op) if xs.elem_count() / xs.dim(candle_core::D::Minus1)? <= SMALL_ROWS => {
                xs.contiguous()?.apply_op1_no_bwd(op)
            }
            _ => self.linear.forward(xs),
        }
    }
}
