//! candle ops over the paged KV pool on the CPU in f32: writing a step's new keys and values
//! into their slots in place, and attention of the whole batch read straight from the pool
//! ([`crate::kernels::attention`]). Three ops per layer, instead of a gather and a dozen small
//! tensor ops per sequence.

use candle_core::{CpuStorage, CustomOp3, InplaceOp2, Layout, Shape};

use crate::kernels::attention::{paged_attention, AttnSeq, AttnShape};

fn msg(m: String) -> candle_core::Error {
    candle_core::Error::Msg(m)
}

/// The contiguous f32 values a layout covers.
fn values<'s>(
    storage: &'s CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'s [f32]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| msg(format!("{what} must be contiguous")))?;
    Ok(&storage.as_slice::<f32>()?[start..end])
}

/// Copies row `t` of the source (`[rows, ..]`) into row `slots[t]` of the pool it is applied to.
pub(crate) struct WriteSlots<'a> {
    pub slots: &'a [u32],
}

impl InplaceOp2 for WriteSlots<'_> {
    fn name(&self) -> &'static str {
        "paged-kv-write"
    }

    fn cpu_fwd(
        &self,
        pool: &mut CpuStorage,
        pool_layout: &Layout,
        src: &CpuStorage,
        src_layout: &Layout,
    ) -> candle_core::Result<()> {
        let src = values(src, src_layout, "new keys/values")?;
        let (start, end) = pool_layout
            .contiguous_offsets()
            .ok_or_else(|| msg("kv pool must be contiguous".into()))?;
        let CpuStorage::F32(pool) = pool else {
            return Err(msg("kv pool must be f32 for the cpu kernel".into()));
        };
        let pool = &mut pool[start..end];
        let row: usize = pool_layout.shape().dims()[1..].iter().product();
        if row == 0 || src.len() != self.slots.len() * row {
            return Err(msg(format!(
                "{} new values are not {} rows of {row}",
                src.len(),
                self.slots.len()
            )));
        }
        let num_slots = pool.len() / row;
        for (t, &slot) in self.slots.iter().enumerate() {
            let slot = slot as usize;
            if slot >= num_slots {
                return Err(msg(format!("slot {slot} >= pool size {num_slots}")));
            }
            pool[slot * row..][..row].copy_from_slice(&src[t * row..][..row]);
        }
        Ok(())
    }
}

/// Attention of `q` (`[T, nq, d]`) over the K and V pools for the sequences `seqs`.
pub(crate) struct PoolAttention<'a> {
    pub shape: AttnShape,
    pub seqs: Vec<AttnSeq<'a>>,
}

impl CustomOp3 for PoolAttention<'_> {
    fn name(&self) -> &'static str {
        "paged-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let q_vals = values(q, q_layout, "queries")?;
        let k = values(k, k_layout, "k pool")?;
        let v = values(v, v_layout, "v pool")?;
        let mut out = vec![0f32; q_vals.len()];
        paged_attention(q_vals, k, v, self.shape, &self.seqs, &mut out)
            .map_err(|e| msg(e.to_string()))?;
        Ok((CpuStorage::F32(out), q_layout.shape().clone()))
    }
}
