//! The Llama / Qwen2 / Qwen3 decoder forward with a KV cache and position per sequence.
//!
//! candle-transformers' models keep one KV cache and one position for a whole batch. Here every
//! sequence owns a [`SeqKvCache`], so a batch can mix prefill chunks of new prompts with decode
//! tokens of running sequences, and sequences join or leave at any step (continuous batching).
//!
//! One [`LlmModel::forward`] call concatenates every sequence's new tokens into a single
//! `[T_total, hidden]` activation, so embeddings, norms, projections and the MLP run as single
//! matmuls over the whole batch. RoPE uses each token's own absolute position. Attention runs
//! per sequence over its cached K/V plus the new K/V (causal only within the new chunk), and
//! logits are computed only for each sequence's last new token.
//!
//! [`LlmModel::forward_paged`] (in [`super::paged`]) runs the same forward with keys and values
//! in a shared pool of fixed-size blocks instead of per-sequence caches.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Activation, Embedding, Linear, RmsNorm, VarBuilder};

use super::linear::Proj;

use super::config::LlmConfig;
pub use super::config::LlmError;
use super::weights::{classify_load_error, load_var_builder};

mod stack;

/// KV capacity is allocated in multiples of this many tokens.
const KV_BLOCK: usize = 16;

/// One layer's cached keys and values: `[kv_heads, capacity, head_dim]` buffers, of which the
/// first [`SeqKvCache::len`] positions are valid.
#[derive(Debug)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
}

/// The KV cache of one sequence: per layer, its keys and values for every token so far.
///
/// Buffers grow geometrically (new tokens are written in place; a regrow copies), so appending
/// one decode token does not copy the whole cache.
#[derive(Debug)]
pub struct SeqKvCache {
    layers: Vec<Option<LayerKv>>,
    len: usize,
}

impl SeqKvCache {
    fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            len: 0,
        }
    }

    /// Number of cached tokens, i.e. the position of the sequence's next token.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of device memory held by the cache buffers (allocated capacity, which is at most
    /// about 25% or 1024 tokens above [`Self::len`]).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|l| (l.k.elem_count() + l.v.elem_count()) * l.k.dtype().size_in_bytes())
            .sum()
    }

    /// Forgets every token from position `len` on (no-op when `len >= self.len()`); the memory is
    /// kept and overwritten by later tokens.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// A deep copy (e.g. to fork a sequence after a shared prompt).
    pub fn try_clone(&self) -> Result<Self, LlmError> {
        let layers = self
            .layers
            .iter()
            .map(|l| match l {
                None => Ok(None),
                Some(l) => Ok(Some(LayerKv {
                    k: l.k.copy()?,
                    v: l.v.copy()?,
                })),
            })
            .collect::<Result<Vec<_>, LlmError>>()?;
        Ok(Self {
            layers,
            len: self.len,
        })
    }

    /// Writes `k`, `v` (`[kv_heads, n, head_dim]`, contiguous) for positions `past..past + n` of
    /// `layer` and returns views of all `past + n` cached keys and values.
    fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        past: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let n = k.dim(1)?;
        let need = past + n;
        let slot = &mut self.layers[layer];
        let cap = slot.as_ref().map(|l| l.k.dim(1)).transpose()?.unwrap_or(0);
        if need > cap {
            // Regrow: copy the valid prefix and the new tokens into a bigger buffer.
            let slack = (need / 4).clamp(KV_BLOCK, 1024);
            let new_cap = (need + slack).div_ceil(KV_BLOCK) * KV_BLOCK;
            let grow = |old: Option<&Tensor>, new: &Tensor| -> candle_core::Result<Tensor> {
                let (h, _, d) = new.dims3()?;
                let pad = Tensor::zeros((h, new_cap - need, d), new.dtype(), new.device())?;
                match old {
                    Some(old) if past > 0 => Tensor::cat(&[&old.narrow(1, 0, past)?, new, &pad], 1),
                    _ => Tensor::cat(&[new, &pad], 1),
                }
            };
            let old = slot.as_ref();
            let nk = grow(old.map(|l| &l.k), k)?;
            let nv = grow(old.map(|l| &l.v), v)?;
            *slot = Some(LayerKv { k: nk, v: nv });
        } else if let Some(l) = slot.as_ref() {
            // In place: the buffers are owned by this cache alone (views handed out by earlier
            // calls are gone), and positions >= past are not valid cache content.
            l.k.slice_set(k, 1, past)?;
            l.v.slice_set(v, 1, past)?;
        }
        match slot.as_ref() {
            Some(l) => Ok((l.k.narrow(1, 0, need)?, l.v.narrow(1, 0, need)?)),
            None => candle_core::bail!("kv cache layer {layer} missing after append"),
        }
    }
}

/// One sequence's part of a batched forward.
pub struct SeqChunk<'a> {
    /// The sequence's new tokens: a prefill chunk of any length, or one decode token. Non-empty.
    pub tokens: &'a [u32],
    /// The sequence's cache; the new tokens' keys and values are appended to it.
    pub cache: &'a mut SeqKvCache,
    /// Whether to return the final hidden states of the new tokens.
    pub want_hidden: bool,
}

/// The result of a batched forward.
#[derive(Debug)]
pub struct BatchOutput {
    /// `[n_seqs, vocab]` f32 logits of each sequence's last new token, in batch order.
    pub logits: Tensor,
    /// Per sequence, `[n_new_tokens, hidden_size]` f32 final hidden states after the final norm
    /// (HF's `hidden_states[-1]`) when `want_hidden` was set, else `None`.
    pub hidden: Vec<Option<Tensor>>,
}

/// One validated sequence of a batch, as the shared forward core sees it.
pub(crate) struct SeqInput<'a> {
    /// New tokens (non-empty, ids in the vocabulary).
    pub(crate) tokens: &'a [u32],
    /// Position of `tokens[0]`: the number of tokens already cached.
    pub(crate) past: usize,
    /// Whether to return the new tokens' final hidden states.
    pub(crate) want_hidden: bool,
    /// `[tokens.len(), hidden_size]` added to the new tokens' embeddings (checked by the
    /// caller), e.g. a talker's projected thinker states.
    pub(crate) extra: Option<&'a Tensor>,
    /// Rows that replace the embeddings of runs of new tokens: `(start, rows)` puts `rows`
    /// (`[len, hidden_size]`) at chunk positions `start..start + len` (ascending, disjoint,
    /// checked by the caller), e.g. an image encoder's output in place of placeholder tokens.
    pub(crate) splice: &'a [(usize, Tensor)],
}

/// Where a forward stores each layer's new keys and values and loads a sequence's context.
pub(crate) trait KvAccess {
    /// Stores `k`, `v` (`[n, kv_heads, head_dim]`, contiguous): layer `layer` of the new tokens
    /// of sequence `seq` (positions `past..past + n`). Returns all `past + n` keys and values
    /// of that sequence as `[kv_heads, past + n, head_dim]`, laid out for `matmul`.
    fn store_and_load(
        &mut self,
        layer: usize,
        seq: usize,
        past: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)>;

    /// Where the backend has a fused kernel: stores layer `layer`'s new keys and values of every
    /// sequence and returns the whole batch's attention output `[T, nq, d]` for the queries `q`
    /// (`[T, nq, d]`; `k`, `v` `[T, kv_heads, d]`; all contiguous, sequences in batch order).
    /// `None` when there is none; the caller then goes sequence by sequence through
    /// [`KvAccess::store_and_load`].
    fn attend_all(
        &mut self,
        _layer: usize,
        _q: &Tensor,
        _k: &Tensor,
        _v: &Tensor,
        _scale: f32,
    ) -> Option<candle_core::Result<Tensor>> {
        None
    }
}

/// [`KvAccess`] over the per-sequence caches of a [`LlmModel::forward`] batch.
struct CacheKv<'s, 'a>(&'s mut [SeqChunk<'a>]);

impl KvAccess for CacheKv<'_, '_> {
    fn store_and_load(
        &mut self,
        layer: usize,
        seq: usize,
        past: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let k = k.transpose(0, 1)?.contiguous()?;
        let v = v.transpose(0, 1)?.contiguous()?;
        self.0[seq].cache.append(layer, &k, &v, past)
    }
}

#[derive(Debug)]
struct Attention {
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    o_proj: Proj,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
}

#[derive(Debug)]
struct Mlp {
    gate_proj: Proj,
    up_proj: Proj,
    down_proj: Proj,
    act: Activation,
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let gate = xs.apply(&self.gate_proj)?.apply(&self.act)?;
        (gate * xs.apply(&self.up_proj)?)?.apply(&self.down_proj)
    }
}

#[derive(Debug)]
struct Layer {
    attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

/// Where one sequence's tokens sit in the concatenated batch.
struct Span {
    offset: usize,
    len: usize,
    past: usize,
}

/// A Llama / Qwen2 / Qwen3 decoder with per-sequence KV caches.
#[derive(Debug)]
pub struct LlmModel {
    cfg: LlmConfig,
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Proj,
    /// `[1, head_dim / 2]` f32 RoPE inverse frequencies.
    inv_freq: Tensor,
    device: Device,
    dtype: DType,
}

impl LlmModel {
    /// Loads `config.json` and the safetensors weights from a checkpoint directory.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self, LlmError> {
        let cfg = LlmConfig::from_file(&dir.join("config.json"))?;
        let vb = load_var_builder(dir, dtype, device)?;
        Self::new(&cfg, vb)
    }

    /// Builds the model from a config and a [`VarBuilder`] rooted at the checkpoint's top level
    /// (tensor names as in HF: `model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`, ...).
    pub fn new(cfg: &LlmConfig, vb: VarBuilder) -> Result<Self, LlmError> {
        Self::build(cfg, vb).map_err(|e| match classify_load_error(e) {
            Ok(w) => LlmError::Weights(w),
            Err(e) => LlmError::Candle(e),
        })
    }

    fn build(cfg: &LlmConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (nq, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let vb_m = vb.pp("model");
        let embed_tokens = candle_nn::embedding(cfg.vocab_size, h, vb_m.pp("embed_tokens"))?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let vb_l = vb_m.pp("layers").pp(i);
            let vb_a = vb_l.pp("self_attn");
            let qkv =
                |out, name| Proj::new(candle_nn::linear_b(h, out, cfg.qkv_bias, vb_a.pp(name))?);
            let norm = |name| candle_nn::rms_norm(d, cfg.rms_norm_eps, vb_a.pp(name));
            let attn = Attention {
                q_proj: qkv(nq * d, "q_proj")?,
                k_proj: qkv(nkv * d, "k_proj")?,
                v_proj: qkv(nkv * d, "v_proj")?,
                o_proj: Proj::new(candle_nn::linear_b(
                    nq * d,
                    h,
                    cfg.o_bias,
                    vb_a.pp("o_proj"),
                )?)?,
                q_norm: cfg.qk_norm.then(|| norm("q_norm")).transpose()?,
                k_norm: cfg.qk_norm.then(|| norm("k_norm")).transpose()?,
            };
            let vb_mlp = vb_l.pp("mlp");
            let i_sz = cfg.intermediate_size;
            let mlp = Mlp {
                gate_proj: Proj::new(candle_nn::linear_b(
                    h,
                    i_sz,
                    cfg.mlp_bias,
                    vb_mlp.pp("gate_proj"),
                )?)?,
                up_proj: Proj::new(candle_nn::linear_b(
                    h,
                    i_sz,
                    cfg.mlp_bias,
                    vb_mlp.pp("up_proj"),
                )?)?,
                down_proj: Proj::new(candle_nn::linear_b(
                    i_sz,
                    h,
                    cfg.mlp_bias,
                    vb_mlp.pp("down_proj"),
                )?)?,
                act: cfg.hidden_act,
            };
            let ln = |name| candle_nn::rms_norm(h, cfg.rms_norm_eps, vb_l.pp(name));
            layers.push(Layer {
                attn,
                mlp,
                input_layernorm: ln("input_layernorm")?,
                post_attention_layernorm: ln("post_attention_layernorm")?,
            });
        }
        let norm = candle_nn::rms_norm(h, cfg.rms_norm_eps, vb_m.pp("norm"))?;
        let lm_head = if cfg.tie_word_embeddings || !vb.contains_tensor("lm_head.weight") {
            Linear::new(embed_tokens.embeddings().clone(), None)
        } else {
            candle_nn::linear_no_bias(h, cfg.vocab_size, vb.pp("lm_head"))?
        };
        let lm_head = Proj::new(lm_head)?;
        let inv_freq = cfg.rope_inv_freq();
        let inv_freq = Tensor::from_vec(inv_freq, (1, d / 2), vb.device())?;
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &LlmConfig {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of weights, activations and KV caches.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// An empty KV cache for a new sequence.
    pub fn new_cache(&self) -> SeqKvCache {
        SeqKvCache::new(self.layers.len())
    }

    /// One forward over several sequences: each gives its new tokens (a prefill chunk of any
    /// length, or one decode token) and its own cache, which is appended to.
    ///
    /// On error the caches' lengths are unchanged (a partly written step is simply overwritten
    /// by the next one).
    ///
    /// The serving engine uses [`LlmModel::forward_paged`]; this contiguous-cache path is the
    /// reference the paged one is tested against bit for bit, and needs no pool for one-off use.
    pub fn forward(&self, batch: &mut [SeqChunk<'_>]) -> Result<BatchOutput, LlmError> {
        if batch.is_empty() {
            return Err(LlmError::Input("empty batch".into()));
        }
        let mut seqs = Vec::with_capacity(batch.len());
        for (i, chunk) in batch.iter().enumerate() {
            if chunk.tokens.is_empty() {
                return Err(LlmError::Input(format!("sequence {i} has no new tokens")));
            }
            if chunk.cache.layers.len() != self.layers.len() {
                return Err(LlmError::Input(format!(
                    "sequence {i}: cache has {} layers, model has {}",
                    chunk.cache.layers.len(),
                    self.layers.len()
                )));
            }
            self.check_token_ids(i, chunk.tokens)?;
            seqs.push(SeqInput {
                tokens: chunk.tokens,
                past: chunk.cache.len,
                want_hidden: chunk.want_hidden,
                extra: None,
                splice: &[],
            });
        }
        let out = self.forward_core(&seqs, &mut CacheKv(batch))?;
        for (chunk, seq) in batch.iter_mut().zip(&seqs) {
            chunk.cache.len = seq.past + seq.tokens.len();
        }
        Ok(out)
    }

    /// Number of decoder layers.
    pub(crate) fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// `LlmError::Input` when sequence `i` has a token id outside the vocabulary.
    pub(crate) fn check_token_ids(&self, i: usize, tokens: &[u32]) -> Result<(), LlmError> {
        match tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            Some(t) => Err(LlmError::Input(format!(
                "sequence {i}: token id {t} >= vocab size {}",
                self.cfg.vocab_size
            ))),
            None => Ok(()),
        }
    }

    /// The forward shared by [`Self::forward`] and [`Self::forward_paged`] over validated
    /// inputs (non-empty chunks, token ids in range); `kv` stores and loads keys and values.
    pub(crate) fn forward_core(
        &self,
        seqs: &[SeqInput<'_>],
        kv: &mut dyn KvAccess,
    ) -> Result<BatchOutput, LlmError> {
        let total: usize = seqs.iter().map(|c| c.tokens.len()).sum();
        let mut ids = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        let mut spans = Vec::with_capacity(seqs.len());
        for seq in seqs {
            spans.push(Span {
                offset: ids.len(),
                len: seq.tokens.len(),
                past: seq.past,
            });
            ids.extend_from_slice(seq.tokens);
            positions.extend((seq.past..seq.past + seq.tokens.len()).map(|p| p as f32));
        }

        let ids = Tensor::from_vec(ids, total, &self.device)?;
        let mut xs = self.embed_tokens.forward(&ids)?;
        if seqs.iter().any(|s| s.extra.is_some()) {
            xs = (xs + self.extra_embeddings(seqs)?)?;
        }
        if seqs.iter().any(|s| !s.splice.is_empty()) {
            xs = self.splice_embeddings(&xs, seqs, &spans)?;
        }
        // RoPE tables for exactly the positions in this batch: pos * inv_freq in f32 (the same
        // arithmetic as a precomputed table, without holding one for the whole context).
        let positions = Tensor::from_vec(positions, (total, 1), &self.device)?;
        let freqs = positions.broadcast_mul(&self.inv_freq)?;
        let cos = freqs.cos()?.to_dtype(self.dtype)?.contiguous()?;
        let sin = freqs.sin()?.to_dtype(self.dtype)?.contiguous()?;
        let masks = spans
            .iter()
            .map(|s| self.causal_mask(s))
            .collect::<candle_core::Result<Vec<_>>>()?;

        for li in 0..self.layers.len() {
            xs = self.run_layer(li, &xs, &cos, &sin, kv, &spans, &masks)?;
        }
        let xs = self.norm.forward(&xs)?;

        let last: Vec<u32> = spans
            .iter()
            .map(|s| (s.offset + s.len - 1) as u32)
            .collect();
        let last = Tensor::from_vec(last, spans.len(), &self.device)?;
        let logits = xs
            .index_select(&last, 0)?
            .apply(&self.lm_head)?
            .to_dtype(DType::F32)?;
        let hidden = seqs
            .iter()
            .zip(&spans)
            .map(|(c, s)| {
                c.want_hidden
                    .then(|| xs.narrow(0, s.offset, s.len)?.to_dtype(DType::F32))
                    .transpose()
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(BatchOutput { logits, hidden })
    }

    /// Decoder layer `li` over the whole batch's residual stream `xs` (`[T_total, hidden]`).
    #[allow(clippy::too_many_arguments)]
    fn run_layer(
        &self,
        li: usize,
        xs: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        kv: &mut dyn KvAccess,
        spans: &[Span],
        masks: &[Option<Tensor>],
    ) -> candle_core::Result<Tensor> {
        let layer = &self.layers[li];
        let h = layer.input_layernorm.forward(xs)?;
        let attn = self.attention(li, &layer.attn, &h, cos, sin, kv, spans, masks)?;
        let xs1 = (attn + xs)?;
        let h = layer.post_attention_layernorm.forward(&xs1)?;
        layer.mlp.forward(&h)? + &xs1
    }

    /// `xs` (`[T_total, hidden]`) with each sequence's splice rows in place of its token
    /// embeddings there: the pieces are cut and joined, so kept rows are bit-identical.
    fn splice_embeddings(
        &self,
        xs: &Tensor,
        seqs: &[SeqInput<'_>],
        spans: &[Span],
    ) -> candle_core::Result<Tensor> {
        let mut pieces = Vec::new();
        for (seq, span) in seqs.iter().zip(spans) {
            let mut cursor = 0;
            for (start, rows) in seq.splice {
                if *start > cursor {
                    pieces.push(xs.narrow(0, span.offset + cursor, start - cursor)?);
                }
                pieces.push(rows.to_dtype(self.dtype)?);
                cursor = start + rows.dim(0)?;
            }
            if cursor < span.len {
                pieces.push(xs.narrow(0, span.offset + cursor, span.len - cursor)?);
            }
        }
        Tensor::cat(&pieces, 0)
    }

    /// Additive f32 causal mask `[n, past + n]` for a chunk of `n > 1` new tokens (`None` for a
    /// single token, which sees everything cached).
    fn causal_mask(&self, s: &Span) -> candle_core::Result<Option<Tensor>> {
        if s.len == 1 {
            return Ok(None);
        }
        let kv = s.past + s.len;
        let mask: Vec<f32> = (0..s.len)
            .flat_map(|i| {
                (0..kv).map(move |j| {
                    if j > s.past + i {
                        f32::NEG_INFINITY
                    } else {
                        0.
                    }
                })
            })
            .collect();
        Tensor::from_vec(mask, (s.len, kv), &self.device).map(Some)
    }

    /// Self-attention of one layer over the whole batch; returns `[T_total, hidden]`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        li: usize,
        attn: &Attention,
        xs: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        kv: &mut dyn KvAccess,
        spans: &[Span],
        masks: &[Option<Tensor>],
    ) -> candle_core::Result<Tensor> {
        let total = xs.dim(0)?;
        let d = self.cfg.head_dim;
        let (nq, nkv) = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads);
        let groups = nq / nkv;
        // [1, T, heads, head_dim]: the layout rope_thd works on directly.
        let mut q = attn.q_proj.forward(xs)?.reshape((1, total, nq, d))?;
        let mut k = attn.k_proj.forward(xs)?.reshape((1, total, nkv, d))?;
        let v = attn.v_proj.forward(xs)?.reshape((total, nkv, d))?;
        if let (Some(qn), Some(kn)) = (&attn.q_norm, &attn.k_norm) {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        let q = candle_nn::rotary_emb::rope_thd(&q.contiguous()?, cos, sin)?.squeeze(0)?;
        let k = candle_nn::rotary_emb::rope_thd(&k.contiguous()?, cos, sin)?.squeeze(0)?;
        let scale = 1f64 / (d as f64).sqrt();
        if let Some(out) = kv.attend_all(li, &q, &k, &v, scale as f32) {
            return attn.o_proj.forward(&out?.reshape((total, nq * d))?);
        }

        let mut outs = Vec::with_capacity(spans.len());
        for (si, (s, mask)) in spans.iter().zip(masks).enumerate() {
            let n = s.len;
            // [heads, n, d]; query head h uses kv head h / groups, so grouping the query heads
            // as [kv_heads, groups * n, d] lets each kv head serve its group without repeating.
            let qi = q.narrow(0, s.offset, n)?.transpose(0, 1)?.contiguous()?;
            let qi = qi.reshape((nkv, groups * n, d))?;
            let ki = k.narrow(0, s.offset, n)?;
            let vi = v.narrow(0, s.offset, n)?;
            let (k_all, v_all) = kv.store_and_load(li, si, s.past, &ki, &vi)?;
            let kv_len = s.past + n;
            let scores = qi.matmul(&k_all.t()?)?.to_dtype(DType::F32)?;
            let mut scores = (scores * scale)?;
            if let Some(mask) = mask {
                scores = scores
                    .reshape((nkv, groups, n, kv_len))?
                    .broadcast_add(mask)?
                    .reshape((nkv, groups * n, kv_len))?;
            }
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(self.dtype)?;
            let out = probs.matmul(&v_all)?; // [kv_heads, groups * n, d]
            let out = out
                .reshape((nq, n, d))?
                .transpose(0, 1)?
                .reshape((n, nq * d))?;
            outs.push(out);
        }
        let out = if outs.len() == 1 {
            outs.pop()
                .ok_or_else(|| candle_core::Error::Msg("no output".into()))?
        } else {
            Tensor::cat(&outs, 0)?
        };
        attn.o_proj.forward(&out)
    }
}
