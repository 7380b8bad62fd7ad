//! `thinker_to_talker_proj`: the linear map from a thinker's hidden states to the talker's
//! embedding width (Qwen2.5-Omni's name), and the per-step extra embeddings built with it.

use super::super::linear::Proj;
use super::seq::ChunkRows;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder};

/// The weight's name in the checkpoint (`.weight` `[talker_hidden, thinker_hidden]`, `.bias`).
pub const THINKER_PROJ: &str = "thinker_to_talker_proj";

/// The projection of thinker rows into the talker's embedding space.
pub(crate) struct ThinkerProj {
    proj: Proj,
    /// Thinker hidden size (the rows' width).
    in_dim: usize,
    dtype: DType,
    device: Device,
}

impl ThinkerProj {
    /// Loads the projection from the checkpoint's top level; `None` when it has none.
    pub fn load(vb: &VarBuilder, talker_hidden: usize) -> candle_core::Result<Option<Self>> {
        let vb = vb.pp(THINKER_PROJ);
        if !vb.contains_tensor("weight") {
            return Ok(None);
        }
        let weight = vb.get_unchecked("weight")?;
        let (out, in_dim) = weight.dims2()?;
        if out != talker_hidden || in_dim == 0 {
            candle_core::bail!(
                "{THINKER_PROJ}.weight is [{out}, {in_dim}], expected \
                 [{talker_hidden}, thinker hidden size]"
            );
        }
        let bias = if vb.contains_tensor("bias") {
            Some(vb.get(talker_hidden, "bias")?)
        } else {
            None
        };
        Ok(Some(Self {
            proj: Proj::new(Linear::new(weight, bias))?,
            in_dim,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        }))
    }

    /// Width of the thinker rows it takes.
    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// Projects each chunk's rows in one matmul; rows whose mask is 0 give zeros (not the bias).
    pub fn project(
        &self,
        chunks: &[Option<ChunkRows>],
    ) -> candle_core::Result<Vec<Option<Tensor>>> {
        let total: usize = chunks.iter().flatten().map(|c| c.mask.len()).sum();
        if total == 0 {
            return Ok(chunks.iter().map(|_| None).collect());
        }
        let mut data = Vec::with_capacity(total * self.in_dim);
        let mut mask = Vec::with_capacity(total);
        for c in chunks.iter().flatten() {
            data.extend_from_slice(&c.data);
            mask.extend_from_slice(&c.mask);
        }
        let xs =
            Tensor::from_vec(data, (total, self.in_dim), &self.device)?.to_dtype(self.dtype)?;
        let mask = Tensor::from_vec(mask, (total, 1), &self.device)?.to_dtype(self.dtype)?;
        let ys = self.proj.forward(&xs)?.broadcast_mul(&mask)?;
        let mut offset = 0;
        chunks
            .iter()
            .map(|c| match c {
                Some(c) => {
                    let n = c.mask.len();
                    let y = ys.narrow(0, offset, n)?;
                    offset += n;
                    Ok(Some(y))
                }
                None => Ok(None),
            })
            .collect()
    }
}
