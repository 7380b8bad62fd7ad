//! Layer-by-layer access to one sequence's forward: embed, run a contiguous range of decoder
//! layers, and the final norm + `lm_head` over every row.
//!
//! This is what a model built from several decoders needs when it changes the residual stream
//! between layers (Mixture of Thoughts' interaction layers, see `crate::mot`). Running
//! [`LlmModel::embed`], then [`LlmModel::forward_layers`] over `0..a`, `a..b`, ..., `..L`, then
//! [`LlmModel::final_logits`] computes the same numbers as [`LlmModel::forward`] with the same
//! layer code (`run_layer`), only one sequence at a time and with logits for every row.

use std::ops::Range;

use candle_core::{DType, Module, Tensor};

use super::{CacheKv, LlmError, LlmModel, SeqChunk, SeqKvCache, Span};

impl LlmModel {
    /// The token embeddings `[tokens.len(), hidden_size]` (model dtype) of one sequence's new
    /// tokens: the residual stream before layer 0.
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor, LlmError> {
        if tokens.is_empty() {
            return Err(LlmError::Input("no tokens to embed".into()));
        }
        self.check_token_ids(0, tokens)?;
        let ids = Tensor::from_slice(tokens, tokens.len(), &self.device)?;
        Ok(self.embed_tokens.forward(&ids)?)
    }

    /// Runs decoder layers `layers` over one sequence's new tokens, whose residual stream is
    /// `xs` (`[n, hidden_size]`, converted to the model dtype), and returns the residual stream
    /// after the last of them (before the final norm).
    ///
    /// The tokens sit at positions `cache.len()..cache.len() + n`; their keys and values for
    /// these layers are appended to `cache`. The cache length advances by `n` only when the
    /// range ends at the last layer, so a forward split into consecutive ranges
    /// (`0..a`, `a..b`, ..., `..num_layers`) sees the same positions in every range.
    pub fn forward_layers(
        &self,
        xs: &Tensor,
        layers: Range<usize>,
        cache: &mut SeqKvCache,
    ) -> Result<Tensor, LlmError> {
        let num_layers = self.layers.len();
        if layers.start >= layers.end || layers.end > num_layers {
            return Err(LlmError::Input(format!(
                "layer range {layers:?} is empty or exceeds the model's {num_layers} layers"
            )));
        }
        if cache.layers.len() != num_layers {
            return Err(LlmError::Input(format!(
                "cache has {} layers, model has {num_layers}",
                cache.layers.len()
            )));
        }
        let (n, hidden) = xs.dims2()?;
        if n == 0 || hidden != self.cfg.hidden_size {
            return Err(LlmError::Input(format!(
                "hidden states are [{n}, {hidden}], expected [n > 0, {}]",
                self.cfg.hidden_size
            )));
        }
        let past = cache.len;
        let span = Span {
            offset: 0,
            len: n,
            past,
        };
        let positions: Vec<f32> = (past..past + n).map(|p| p as f32).collect();
        let positions = Tensor::from_vec(positions, (n, 1), &self.device)?;
        let freqs = positions.broadcast_mul(&self.inv_freq)?;
        let cos = freqs.cos()?.to_dtype(self.dtype)?.contiguous()?;
        let sin = freqs.sin()?.to_dtype(self.dtype)?.contiguous()?;
        let masks = [self.causal_mask(&span)?];
        let spans = [span];
        // `CacheKv` reads only `cache`; the chunk's tokens are not used by `store_and_load`.
        let mut chunk = [SeqChunk {
            tokens: &[],
            cache,
            want_hidden: false,
        }];
        let mut kv = CacheKv(&mut chunk);
        let mut xs = xs.to_dtype(self.dtype)?;
        for li in layers.clone() {
            xs = self.run_layer(li, &xs, &cos, &sin, &mut kv, &spans, &masks)?;
        }
        if layers.end == num_layers {
            chunk[0].cache.len = past + n;
        }
        Ok(xs)
    }

    /// The final norm and `lm_head` over every row of a residual stream `xs`
    /// (`[n, hidden_size]`): `[n, vocab_size]` f32 logits.
    pub fn final_logits(&self, xs: &Tensor) -> Result<Tensor, LlmError> {
        let (_, hidden) = xs.dims2()?;
        if hidden != self.cfg.hidden_size {
            return Err(LlmError::Input(format!(
                "hidden states have width {hidden}, expected {}",
                self.cfg.hidden_size
            )));
        }
        let xs = self.norm.forward(&xs.to_dtype(self.dtype)?)?;
        Ok(xs.apply(&self.lm_head)?.to_dtype(DType::F32)?)
    }
}
