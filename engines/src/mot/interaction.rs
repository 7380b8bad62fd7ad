//! The interaction layers of a MoT checkpoint (`interaction.safetensors`) and the two blocks a
//! forward is built from: [`Interaction::project_out`] (an expert's residual stream into the
//! shared space) and [`Interaction::interact`] (the primary's cross-attention over its peers,
//! back-projected and added to its residual stream). See the [module docs](super) for the math.
//!
//! Tensor names, for stack `q` in `0..Q` and expert id `i` (its index in `mot_config.json`),
//! with `d_i` the expert's `hidden_size` and `d_s` the shared width; all f32 in the tiny files,
//! any float dtype accepted (converted on load):
//!
//! | name | shape |
//! |---|---|
//! | `stacks.{q}.experts.{i}.norm.weight`, `.norm.bias` | `[d_i]` |
//! | `stacks.{q}.experts.{i}.in_proj.weight` / `.bias` | `[d_s, d_i]` / `[d_s]` |
//! | `stacks.{q}.experts.{i}.out_proj.weight` / `.bias` | `[d_i, d_s]` / `[d_i]` |
//! | `stacks.{q}.attn.{q,k,v,o}_proj.weight` / `.bias` | `[d_s, d_s]` / `[d_s]` |
//!
//! Linear weights are `[out, in]` (PyTorch `nn.Linear`): `y = x Wᵀ + b`.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{LayerNorm, LayerNormConfig, Linear, VarBuilder};

use super::MotError;
use crate::llm::weights::{classify_load_error, mmap_var_builder, WeightsError};

/// The shape of the interaction layers: what [`Interaction::new`] expects to find.
#[derive(Debug, Clone, PartialEq)]
pub struct InteractionSpec {
    /// `d_s`: width of the shared latent space.
    pub shared_dim: usize,
    /// Heads of the cross-attention (divides `shared_dim`).
    pub num_heads: usize,
    /// `Q`: interaction layers per expert.
    pub num_stacks: usize,
    /// `α`: scale of the update added to the primary's residual stream.
    pub alpha: f64,
    /// Epsilon of the per-expert LayerNorms.
    pub layer_norm_eps: f64,
    /// `d_i`: `hidden_size` of each expert, by expert id.
    pub expert_dims: Vec<usize>,
}

/// One expert's adapters at one stack.
#[derive(Debug)]
struct ExpertAdapter {
    norm: LayerNorm,
    in_proj: Linear,
    out_proj: Linear,
}

/// The shared cross-attention of one stack.
#[derive(Debug)]
struct CrossAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
}

/// All interaction weights: per stack, the shared cross-attention and every expert's adapters.
#[derive(Debug)]
pub struct Interaction {
    spec: InteractionSpec,
    /// `[stack][expert]`.
    adapters: Vec<Vec<ExpertAdapter>>,
    /// `[stack]`.
    attn: Vec<CrossAttention>,
    device: Device,
}

impl Interaction {
    /// Memory-maps `path` (an `interaction.safetensors`) and loads every tensor of `spec` as f32
    /// on `device`. Errors name the file and, for a missing or misshapen tensor, the tensor.
    pub fn load(path: &Path, spec: InteractionSpec, device: &Device) -> Result<Self, MotError> {
        let werr = |source| MotError::Weights {
            path: path.to_path_buf(),
            source: Box::new(source),
        };
        if !path.is_file() {
            return Err(werr(WeightsError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            }));
        }
        let vb = mmap_var_builder(vec![path.to_path_buf()], DType::F32, device).map_err(werr)?;
        Self::new(spec, vb).map_err(|e| match e {
            MotError::Candle(c) => match classify_load_error(c) {
                Ok(w) => werr(w),
                Err(c) => MotError::Candle(c),
            },
            e => e,
        })
    }

    /// Builds the layers from a [`VarBuilder`] whose tensor names are those of the module docs
    /// (e.g. [`VarBuilder::from_tensors`] in tests).
    pub fn new(spec: InteractionSpec, vb: VarBuilder) -> Result<Self, MotError> {
        let ds = spec.shared_dim;
        if ds == 0 || spec.num_heads == 0 || ds % spec.num_heads != 0 || spec.num_stacks == 0 {
            return Err(MotError::Input(format!(
                "bad interaction shape: shared_dim {ds}, num_heads {}, num_stacks {}",
                spec.num_heads, spec.num_stacks
            )));
        }
        let ln_cfg = LayerNormConfig {
            eps: spec.layer_norm_eps,
            ..Default::default()
        };
        let mut adapters = Vec::with_capacity(spec.num_stacks);
        let mut attn = Vec::with_capacity(spec.num_stacks);
        for q in 0..spec.num_stacks {
            let vb_q = vb.pp("stacks").pp(q);
            let mut per_expert = Vec::with_capacity(spec.expert_dims.len());
            for (i, &d) in spec.expert_dims.iter().enumerate() {
                let vb_e = vb_q.pp("experts").pp(i);
                per_expert.push(ExpertAdapter {
                    norm: candle_nn::layer_norm(d, ln_cfg, vb_e.pp("norm"))?,
                    in_proj: candle_nn::linear(d, ds, vb_e.pp("in_proj"))?,
                    out_proj: candle_nn::linear(ds, d, vb_e.pp("out_proj"))?,
                });
            }
            adapters.push(per_expert);
            let vb_a = vb_q.pp("attn");
            let lin = |name| candle_nn::linear(ds, ds, vb_a.pp(name));
            attn.push(CrossAttention {
                q_proj: lin("q_proj")?,
                k_proj: lin("k_proj")?,
                v_proj: lin("v_proj")?,
                o_proj: lin("o_proj")?,
            });
        }
        Ok(Self {
            spec,
            adapters,
            attn,
            device: vb.device().clone(),
        })
    }

    /// The shape these weights were loaded for.
    pub fn spec(&self) -> &InteractionSpec {
        &self.spec
    }

    fn adapter(&self, expert: usize, stack: usize) -> Result<&ExpertAdapter, MotError> {
        self.adapters
            .get(stack)
            .and_then(|a| a.get(expert))
            .ok_or_else(|| {
                MotError::Input(format!(
                    "no interaction adapter for expert {expert} at stack {stack} ({} experts, \
                     {} stacks)",
                    self.spec.expert_dims.len(),
                    self.spec.num_stacks
                ))
            })
    }

    /// `S = LayerNorm_i(h) W_inᵀ + b_in`: expert `expert`'s residual stream `hidden`
    /// (`[n, d_i]`) after stack `stack`, projected into the shared space (`[n, d_s]` f32).
    ///
    /// A staged engine runs this on each peer's own stage and sends the (small) result to the
    /// primary's stage.
    pub fn project_out(
        &self,
        expert: usize,
        stack: usize,
        hidden: &Tensor,
    ) -> Result<Tensor, MotError> {
        let a = self.adapter(expert, stack)?;
        let d = self.spec.expert_dims[expert];
        let (_, width) = hidden.dims2()?;
        if width != d {
            return Err(MotError::Input(format!(
                "expert {expert}: hidden width {width}, expected {d}"
            )));
        }
        let h = hidden.to_dtype(DType::F32)?;
        Ok(a.in_proj.forward(&a.norm.forward(&h)?)?)
    }

    /// The interaction layer after stack `stack` for a prompt processed whole: returns the
    /// primary's new residual stream `h + α · CrossAttn(S_p, peers) W_outᵀ (+ b_out)` for
    /// `primary_hidden` (`[n, d_p]`, positions `0..n`).
    ///
    /// `peer_states` are the active peers' [`Self::project_out`] results (`[n_j, d_s]` each, in
    /// any order; the primary must not be among them). A peer whose token count differs from
    /// `n` (another tokenizer) is first [`resample_tokens`]-ed to `n` rows. With no peers the
    /// stream is returned unchanged (in f32).
    pub fn interact(
        &self,
        primary: usize,
        stack: usize,
        primary_hidden: &Tensor,
        peer_states: &[Tensor],
    ) -> Result<Tensor, MotError> {
        let n = primary_hidden.dim(0)?;
        let peers = peer_states
            .iter()
            .map(|s| resample_tokens(s, n))
            .collect::<Result<Vec<_>, _>>()?;
        self.interact_at(primary, stack, primary_hidden, 0, &peers)
    }

    /// [`Self::interact`] for new tokens at positions `past..past + n` (e.g. a decode step):
    /// `primary_hidden` is `[n, d_p]`, and every peer state is `[past + n, d_s]`, already aligned
    /// to the primary's positions (row `j` = position `j`). Query position `t` attends to the
    /// rows `j <= t` of every peer (the causal cross-attention of the module docs).
    pub fn interact_at(
        &self,
        primary: usize,
        stack: usize,
        primary_hidden: &Tensor,
        past: usize,
        peer_states: &[Tensor],
    ) -> Result<Tensor, MotError> {
        let a = self.adapter(primary, stack)?;
        let h = primary_hidden.to_dtype(DType::F32)?;
        let n = h.dim(0)?;
        if n == 0 {
            return Err(MotError::Input("no primary tokens".into()));
        }
        let kv_len = past + n;
        let ds = self.spec.shared_dim;
        for (j, s) in peer_states.iter().enumerate() {
            if s.dims() != [kv_len, ds] {
                return Err(MotError::Input(format!(
                    "peer state {j} has shape {:?}, expected [{kv_len}, {ds}]",
                    s.dims()
                )));
            }
        }
        let sp = self.project_out(primary, stack, &h)?;
        if peer_states.is_empty() {
            return Ok(h);
        }
        let attn = &self.attn[stack];
        let (nh, dh) = (self.spec.num_heads, ds / self.spec.num_heads);
        let p = peer_states.len();
        let peers = Tensor::cat(
            &peer_states
                .iter()
                .map(|s| s.to_dtype(DType::F32))
                .collect::<Result<Vec<_>, _>>()?,
            0,
        )?;
        // [heads, rows, dh]
        let heads = |x: Tensor, rows: usize| -> candle_core::Result<Tensor> {
            x.reshape((rows, nh, dh))?.transpose(0, 1)?.contiguous()
        };
        let qh = heads(attn.q_proj.forward(&sp)?, n)?;
        let kh = heads(attn.k_proj.forward(&peers)?, p * kv_len)?;
        let vh = heads(attn.v_proj.forward(&peers)?, p * kv_len)?;
        let scale = 1.0 / (dh as f64).sqrt();
        let scores = (qh.matmul(&kh.t()?)? * scale)?;
        let scores = scores.broadcast_add(&self.causal_peer_mask(n, past, p)?)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let ctx = probs.matmul(&vh)?.transpose(0, 1)?.reshape((n, ds))?;
        let update = a.out_proj.forward(&attn.o_proj.forward(&ctx)?)?;
        Ok((h + (update * self.spec.alpha)?)?)
    }

    /// Additive mask `[n, p · (past + n)]`: query `i` (position `past + i`) sees row `j` of each
    /// of the `p` concatenated peers iff `j <= past + i`.
    fn causal_peer_mask(&self, n: usize, past: usize, p: usize) -> candle_core::Result<Tensor> {
        let kv = past + n;
        let mask: Vec<f32> = (0..n)
            .flat_map(|i| {
                (0..p * kv).map(move |c| {
                    if c % kv > past + i {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        Tensor::from_vec(mask, (n, p * kv), &self.device)
    }
}

/// The shared cross-attention's keys and values over the active peers' states at one stack,
/// computed once per prompt ([`Interaction::peer_kv`]) and kept by a staged primary so its
/// decode steps ([`Interaction::interact_cached`]) never need the peers again.
#[derive(Debug, Clone)]
pub struct PeerKv {
    /// `(K, V)`, each `[heads, peers · rows, d_s / heads]` f32; `None` with no peers.
    kv: Option<(Tensor, Tensor)>,
    /// Rows per peer (the primary's prompt length the peers were aligned to).
    rows: usize,
}

impl PeerKv {
    /// Rows per peer (positions `0..rows` of the primary's prompt).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// How many peers' keys and values are held.
    pub fn peers(&self) -> usize {
        match &self.kv {
            Some((k, _)) => k
                .dim(1)
                .map_or(0, |r| r.checked_div(self.rows).unwrap_or(0)),
            None => 0,
        }
    }

    /// Bytes of the kept keys and values.
    pub fn bytes(&self) -> usize {
        self.kv.as_ref().map_or(0, |(k, v)| {
            (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes()
        })
    }
}

impl Interaction {
    /// The keys and values of stack `stack`'s cross-attention over `peer_states` (each peer's
    /// [`Self::project_out`] result), every peer first [`resample_tokens`]-ed to `rows` rows
    /// (the primary's prompt length). No peers gives an empty [`PeerKv`], for which
    /// [`Self::interact_cached`] is the identity.
    pub fn peer_kv(
        &self,
        stack: usize,
        peer_states: &[Tensor],
        rows: usize,
    ) -> Result<PeerKv, MotError> {
        let Some(attn) = self.attn.get(stack) else {
            return Err(MotError::Input(format!(
                "no interaction layer at stack {stack} ({} stacks)",
                self.spec.num_stacks
            )));
        };
        if rows == 0 {
            return Err(MotError::Input("no primary tokens".into()));
        }
        if peer_states.is_empty() {
            return Ok(PeerKv { kv: None, rows });
        }
        let ds = self.spec.shared_dim;
        let mut aligned = Vec::with_capacity(peer_states.len());
        for (j, s) in peer_states.iter().enumerate() {
            let (_, width) = s.dims2()?;
            if width != ds {
                return Err(MotError::Input(format!(
                    "peer state {j} has width {width}, expected {ds}"
                )));
            }
            aligned.push(resample_tokens(s, rows)?);
        }
        let peers = Tensor::cat(&aligned, 0)?;
        let (nh, dh) = (self.spec.num_heads, ds / self.spec.num_heads);
        let total = peers.dim(0)?;
        let heads = |x: Tensor| -> candle_core::Result<Tensor> {
            x.reshape((total, nh, dh))?.transpose(0, 1)?.contiguous()
        };
        let k = heads(attn.k_proj.forward(&peers)?)?;
        let v = heads(attn.v_proj.forward(&peers)?)?;
        Ok(PeerKv {
            kv: Some((k, v)),
            rows,
        })
    }

    /// The interaction layer of stack `stack` for the primary's tokens at positions
    /// `past..past + n` (`primary_hidden` is `[n, d_p]`) against keys and values kept from
    /// [`Self::peer_kv`]: query position `t` attends the rows `j <= t` of every peer, so a
    /// prompt position sees the peers' rows up to its own and a generated position (`t >=
    /// rows`) sees all of them. With no peers the stream is returned unchanged (in f32).
    pub fn interact_cached(
        &self,
        primary: usize,
        stack: usize,
        primary_hidden: &Tensor,
        past: usize,
        kv: &PeerKv,
    ) -> Result<Tensor, MotError> {
        let a = self.adapter(primary, stack)?;
        let h = primary_hidden.to_dtype(DType::F32)?;
        let n = h.dim(0)?;
        if n == 0 {
            return Err(MotError::Input("no primary tokens".into()));
        }
        let Some((kh, vh)) = &kv.kv else {
            return Ok(h);
        };
        let attn = &self.attn[stack];
        let ds = self.spec.shared_dim;
        let (nh, dh) = (self.spec.num_heads, ds / self.spec.num_heads);
        let rows = kv.rows;
        let total = kh.dim(1)?;
        if rows == 0 || total % rows != 0 || kh.dims() != [nh, total, dh] {
            return Err(MotError::Input(format!(
                "kept peer keys have shape {:?}, expected [{nh}, peers × {rows}, {dh}]",
                kh.dims()
            )));
        }
        let sp = self.project_out(primary, stack, &h)?;
        let qh = attn.q_proj.forward(&sp)?;
        let qh = qh.reshape((n, nh, dh))?.transpose(0, 1)?.contiguous()?;
        let scale = 1.0 / (dh as f64).sqrt();
        let mut scores = (qh.matmul(&kh.t()?)? * scale)?;
        // Decode steps (`past >= rows - 1`) see every peer row: no mask to build.
        if past + 1 < rows {
            let mask: Vec<f32> = (0..n)
                .flat_map(|i| {
                    (0..total).map(move |c| {
                        if c % rows > past + i {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (n, total), &self.device)?;
            scores = scores.broadcast_add(&mask)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let ctx = probs.matmul(vh)?.transpose(0, 1)?.reshape((n, ds))?;
        let update = a.out_proj.forward(&attn.o_proj.forward(&ctx)?)?;
        Ok((h + (update * self.spec.alpha)?)?)
    }
}

/// Resamples `states` (`[s, d]`) to `target` rows along the token axis by linear interpolation
/// with the end points aligned: output row `t` is the source at `x = t · (s − 1) / (target − 1)`,
/// mixing rows `⌊x⌋` and `⌈x⌉` (for `target == 1`, `x = s − 1`: the last token, which has seen
/// the whole prompt). `s == target` returns the rows unchanged (f32).
pub fn resample_tokens(states: &Tensor, target: usize) -> Result<Tensor, MotError> {
    let (s, _) = states.dims2()?;
    let states = states.to_dtype(DType::F32)?;
    if s == target {
        return Ok(states);
    }
    if s == 0 || target == 0 {
        return Err(MotError::Input(format!(
            "cannot resample {s} token states to {target}"
        )));
    }
    let mut w = vec![0f32; target * s];
    for t in 0..target {
        let x = if target == 1 {
            (s - 1) as f64
        } else {
            t as f64 * (s - 1) as f64 / (target - 1) as f64
        };
        let lo = (x.floor() as usize).min(s - 1);
        let hi = (lo + 1).min(s - 1);
        let frac = (x - lo as f64) as f32;
        w[t * s + lo] += 1.0 - frac;
        w[t * s + hi] += frac;
    }
    let w = Tensor::from_vec(w, (target, s), states.device())?;
    Ok(w.matmul(&states)?)
}
