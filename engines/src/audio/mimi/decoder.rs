//! The decoder half of Mimi, built from candle's `models::mimi` modules, with one streaming
//! state per value.
//!
//! **Why not `mimi::Model::decode_step` as it is.** candle's decoder transformer keeps its keys
//! in a `RotatingKvCache` of `context` (= `sliding_window`) entries and masks each call's
//! queries against what that cache holds after the call. Mimi's reference semantics (moshi's
//! non-streaming forward and Transformers' sliding-window mask) are: position `p` attends to
//! positions `p - context + 1 ..= p`, exactly `context` of them. candle gets that right for a
//! call of one position, and for any call while the stream is still shorter than `context`; a
//! longer call made once the cache is full lets its earlier queries see fewer keys (the newest
//! entries evict ones they still need), and candle's one-shot `decode` of more than `context`
//! positions uses an absolute mask that lets every query see `context + 1` keys. Both then
//! depend on how the codes were chunked. [`MimiDecoder::step`] therefore feeds the transformer
//! whole runs while the stream is within `context` positions and one position per call after
//! that, which reproduces the reference window exactly and makes every chunking, the one-shot
//! decode included, compute the same thing. The convolutions are causal and stream exactly.

use candle_core::{Result, StreamTensor, StreamingModule, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::mimi;
use mimi::conv::ConvTrUpsample1d;
use mimi::quantization::SplitResidualVectorQuantizer;
use mimi::seanet::SeaNetDecoder;
use mimi::transformer::ProjectedTransformer;

/// Codes → PCM for one stream. Cloning shares every weight (candle tensors are
/// reference-counted) and copies only the streaming state.
#[derive(Debug, Clone)]
pub(crate) struct MimiDecoder {
    quantizer: SplitResidualVectorQuantizer,
    upsample: ConvTrUpsample1d,
    transformer: ProjectedTransformer,
    seanet: SeaNetDecoder,
    /// The attention window, in transformer positions.
    context: usize,
    /// Transformer positions decoded so far.
    positions: usize,
}

impl MimiDecoder {
    /// Builds the decoder modules exactly as `mimi::Model::new` does (same prefixes), without
    /// the encoder, so decoder-only checkpoints load too.
    pub(crate) fn new(cfg: &mimi::Config, upsample_stride: usize, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.seanet.dimension;
        let quantizer = SplitResidualVectorQuantizer::new(
            cfg.quantizer_dim,
            Some(dim),
            Some(dim),
            cfg.quantizer_n_q,
            cfg.quantizer_bins,
            vb.pp("quantizer"),
        )?;
        let upsample = ConvTrUpsample1d::new(upsample_stride, dim, true, true, vb.pp("upsample"))?;
        let transformer =
            ProjectedTransformer::new(dim, &[dim], &cfg.transformer, vb.pp("decoder_transformer"))?;
        let seanet = SeaNetDecoder::new(&cfg.seanet, vb.pp("decoder"))?;
        Ok(Self {
            quantizer,
            upsample,
            transformer,
            seanet,
            context: cfg.transformer.context,
            positions: 0,
        })
    }

    /// Forgets the stream: the next step starts a new one.
    pub(crate) fn reset(&mut self) {
        self.upsample.reset_state();
        self.transformer.reset_state();
        self.seanet.reset_state();
        self.positions = 0;
    }

    /// Decodes the next `T` frames of the stream, `codes` `[1, n_q, T]` (u32), into
    /// `[1, 1, T · samples_per_frame]` samples.
    pub(crate) fn step(&mut self, codes: &Tensor) -> Result<Tensor> {
        let emb = self.quantizer.decode(codes)?;
        let emb = self.upsample.step(&StreamTensor::from_tensor(emb))?;
        let Some(emb) = emb.as_option() else {
            candle_core::bail!("mimi upsampling produced nothing");
        };
        let len = emb.dim(2)?;
        let mut outs = Vec::new();
        let mut start = 0;
        while start < len {
            let run = if self.positions < self.context {
                (self.context - self.positions).min(len - start)
            } else {
                1
            };
            let x = StreamTensor::from_tensor(emb.narrow(2, start, run)?);
            match self.transformer.step(&x)?.as_option() {
                Some(y) => outs.push(y.clone()),
                None => candle_core::bail!("mimi transformer produced nothing"),
            }
            self.positions += run;
            start += run;
        }
        let hidden = Tensor::cat(&outs, 2)?;
        match self
            .seanet
            .step(&StreamTensor::from_tensor(hidden))?
            .as_option()
        {
            Some(pcm) => Ok(pcm.clone()),
            None => candle_core::bail!("mimi decoder produced no samples"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::mimi::{MimiConfig, UPSAMPLE_STRIDE};
    use candle_core::{DType, Device};

    /// `kyutai/mimi`'s real dimensions build (all-zero weights) and decode 1920 samples a frame,
    /// in one step or frame by frame.
    #[test]
    fn kyutai_dimensions_decode_exact_lengths() {
        let config = MimiConfig::kyutai_v0_1();
        let cfg = config.to_candle(8, 64);
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        let mut dec = MimiDecoder::new(&cfg, UPSAMPLE_STRIDE, vb).unwrap();
        let codes = Tensor::zeros((1, 8, 3), DType::U32, &Device::Cpu).unwrap();
        assert_eq!(dec.step(&codes).unwrap().dims(), &[1, 1, 3 * 1920]);
        dec.reset();
        for f in 0..3 {
            let pcm = dec.step(&codes.narrow(2, f, 1).unwrap()).unwrap();
            assert_eq!(pcm.dims(), &[1, 1, 1920]);
        }
    }
}
