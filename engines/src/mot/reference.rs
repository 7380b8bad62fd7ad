//! The plain, single-threaded Mixture of Thoughts forward: every selected expert in one
//! function, prefill of a whole prompt, f32, no scheduler, no connectors. It is the reference a
//! staged execution (one stage per expert, projected states exchanged between stages) is
//! checked against, and it is written only in terms of the blocks such a stage uses:
//! [`LlmModel::embed`], [`LlmModel::forward_layers`] over one stack, [`MotModel::project_out`],
//! [`MotModel::interact`] and [`LlmModel::final_logits`].

use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::config::{stack_layers, MotConfig, INTERACTION_FILE, MOT_CONFIG_FILE};
use super::interaction::{Interaction, InteractionSpec};
use super::MotError;
use crate::llm::model::LlmModel;

/// One selected expert's input: its id and the prompt in its own tokenization.
#[derive(Debug, Clone, Copy)]
pub struct ExpertInput<'a> {
    /// Expert id (index in `mot_config.json`'s `experts`).
    pub expert: usize,
    /// The prompt's token ids in that expert's vocabulary (non-empty).
    pub tokens: &'a [u32],
}

/// A loaded MoT checkpoint: the expert pool (f32) and the interaction layers.
#[derive(Debug)]
pub struct MotModel {
    root: PathBuf,
    config: MotConfig,
    experts: Vec<LlmModel>,
    interaction: Interaction,
}

impl MotModel {
    /// Loads `dir/mot_config.json`, every expert's checkpoint (f32 on `device`) and
    /// `dir/interaction.safetensors`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, MotError> {
        let config = MotConfig::from_file(&dir.join(MOT_CONFIG_FILE))?;
        let mut experts = Vec::with_capacity(config.experts.len());
        for (i, e) in config.experts.iter().enumerate() {
            let path = dir.join(&e.path);
            let expert_err = |source| MotError::Expert {
                name: e.name.clone(),
                path: path.clone(),
                source: Box::new(source),
            };
            let model = LlmModel::load(&path, DType::F32, device).map_err(expert_err)?;
            let layers = model.config().num_hidden_layers;
            if layers < config.num_stacks {
                return Err(MotError::Config {
                    path: dir.join(MOT_CONFIG_FILE),
                    reason: format!(
                        "expert {i} ({:?}) has {layers} layers, fewer than num_stacks ({})",
                        e.name, config.num_stacks
                    ),
                });
            }
            experts.push(model);
        }
        let spec = InteractionSpec {
            shared_dim: config.shared_dim,
            num_heads: config.num_heads,
            num_stacks: config.num_stacks,
            alpha: config.alpha,
            layer_norm_eps: config.layer_norm_eps,
            expert_dims: experts.iter().map(|m| m.config().hidden_size).collect(),
        };
        let interaction = Interaction::load(&dir.join(INTERACTION_FILE), spec, device)?;
        Ok(Self {
            root: dir.to_path_buf(),
            config,
            experts,
            interaction,
        })
    }

    /// The checkpoint folder this was loaded from.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The parsed `mot_config.json`.
    pub fn config(&self) -> &MotConfig {
        &self.config
    }

    /// Expert `i`'s decoder.
    pub fn expert(&self, i: usize) -> Option<&LlmModel> {
        self.experts.get(i)
    }

    /// The interaction layers.
    pub fn interaction(&self) -> &Interaction {
        &self.interaction
    }

    /// Decoder layers of stack `stack` of expert `expert` (empty when either is out of range).
    pub fn stack_layers(&self, expert: usize, stack: usize) -> Range<usize> {
        match self.experts.get(expert) {
            Some(m) => stack_layers(m.config().num_hidden_layers, self.config.num_stacks, stack),
            None => 0..0,
        }
    }

    /// Expert `expert`'s residual stream after stack `stack`, projected into the shared space:
    /// see [`Interaction::project_out`].
    pub fn project_out(
        &self,
        expert: usize,
        stack: usize,
        hidden: &Tensor,
    ) -> Result<Tensor, MotError> {
        self.interaction.project_out(expert, stack, hidden)
    }

    /// The primary's residual stream after the interaction layer of stack `stack`: see
    /// [`Interaction::interact`].
    pub fn interact(
        &self,
        primary: usize,
        stack: usize,
        primary_hidden: &Tensor,
        peer_states: &[Tensor],
    ) -> Result<Tensor, MotError> {
        self.interaction
            .interact(primary, stack, primary_hidden, peer_states)
    }

    /// The primary's `[n_primary_tokens, vocab]` f32 logits for a whole prompt, with the
    /// selected experts `inputs` (the primary among them; any order; each id once) collaborating
    /// through every interaction layer.
    ///
    /// For each stack `q` in order: every selected expert runs its stack-`q` layers on its own
    /// residual stream; every peer projects its stream into the shared space; the primary's
    /// stream goes through the interaction layer. Peers' streams are never changed by the
    /// interaction (only the primary reads from the others), so a peer's stack outputs do not
    /// depend on which expert is primary.
    pub fn forward(&self, inputs: &[ExpertInput<'_>], primary: usize) -> Result<Tensor, MotError> {
        self.check_selection(inputs, primary)?;
        let mut state = Vec::with_capacity(inputs.len());
        for input in inputs {
            let model = &self.experts[input.expert];
            state.push((input.expert, model.new_cache(), model.embed(input.tokens)?));
        }
        for q in 0..self.config.num_stacks {
            for (e, cache, hidden) in state.iter_mut() {
                let layers = self.stack_layers(*e, q);
                *hidden = self.experts[*e].forward_layers(hidden, layers, cache)?;
            }
            let peers = state
                .iter()
                .filter(|(e, _, _)| *e != primary)
                .map(|(e, _, hidden)| self.project_out(*e, q, hidden))
                .collect::<Result<Vec<_>, _>>()?;
            if let Some((_, _, hidden)) = state.iter_mut().find(|(e, _, _)| *e == primary) {
                *hidden = self.interact(primary, q, hidden, &peers)?;
            }
        }
        let hidden = state
            .iter()
            .find(|(e, _, _)| *e == primary)
            .map(|(_, _, h)| h)
            .ok_or_else(|| MotError::Input(format!("primary {primary} is not selected")))?;
        Ok(self.experts[primary].final_logits(hidden)?)
    }

    /// The primary's `[T + c, vocab]` f32 logits for its prompt (length `T`) followed by
    /// `continuation` (`c` tokens it generated), recomputed from scratch: what a decode step of
    /// a staged primary must reproduce.
    ///
    /// The peers run once, on the prompt only; their projected states at every stack are
    /// aligned to the primary's prompt length `T` ([`super::resample_tokens`]). Position `t`
    /// of the primary attends peer rows `j <= min(t, T − 1)`: prompt positions as in
    /// [`Self::forward`] (whose logits the first `T` rows equal), generated positions every
    /// peer row. The prompt rows go through [`Interaction::interact`], each generated row
    /// alone through [`Interaction::interact_at`] with `past = T − 1`.
    pub fn forward_continued(
        &self,
        inputs: &[ExpertInput<'_>],
        primary: usize,
        continuation: &[u32],
    ) -> Result<Tensor, MotError> {
        self.check_selection(inputs, primary)?;
        let peers = self.peer_states(inputs, primary)?;
        self.primary_logits(inputs, primary, continuation, &peers)
    }

    /// `max_new` tokens of greedy (argmax) generation by the primary with the peers' prompt
    /// states, each step recomputing the whole sequence with [`Self::forward_continued`]'s
    /// rule (peers run once). No end-of-sequence stop: exactly `max_new` tokens.
    pub fn generate_greedy(
        &self,
        inputs: &[ExpertInput<'_>],
        primary: usize,
        max_new: usize,
    ) -> Result<Vec<u32>, MotError> {
        self.check_selection(inputs, primary)?;
        let peers = self.peer_states(inputs, primary)?;
        let mut generated = Vec::with_capacity(max_new);
        for _ in 0..max_new {
            let logits = self.primary_logits(inputs, primary, &generated, &peers)?;
            let last = logits.dim(0)? - 1;
            let token = logits.get(last)?.argmax(0)?.to_scalar::<u32>()?;
            generated.push(token);
        }
        Ok(generated)
    }

    /// Every peer's projected states after each stack (`[stack][peer]`, `[T, d_s]`), aligned to
    /// the primary's prompt length `T`.
    fn peer_states(
        &self,
        inputs: &[ExpertInput<'_>],
        primary: usize,
    ) -> Result<Vec<Vec<Tensor>>, MotError> {
        let t = inputs
            .iter()
            .find(|i| i.expert == primary)
            .map(|i| i.tokens.len())
            .ok_or_else(|| MotError::Input(format!("primary {primary} is not selected")))?;
        let mut out = vec![Vec::new(); self.config.num_stacks];
        for input in inputs.iter().filter(|i| i.expert != primary) {
            let model = &self.experts[input.expert];
            let mut cache = model.new_cache();
            let mut hidden = model.embed(input.tokens)?;
            for (q, states) in out.iter_mut().enumerate() {
                let layers = self.stack_layers(input.expert, q);
                hidden = model.forward_layers(&hidden, layers, &mut cache)?;
                let s = self.project_out(input.expert, q, &hidden)?;
                states.push(super::resample_tokens(&s, t)?);
            }
        }
        Ok(out)
    }

    /// The primary's logits over prompt + `continuation` against `peers` (from
    /// [`Self::peer_states`]).
    fn primary_logits(
        &self,
        inputs: &[ExpertInput<'_>],
        primary: usize,
        continuation: &[u32],
        peers: &[Vec<Tensor>],
    ) -> Result<Tensor, MotError> {
        let prompt = inputs
            .iter()
            .find(|i| i.expert == primary)
            .map(|i| i.tokens)
            .ok_or_else(|| MotError::Input(format!("primary {primary} is not selected")))?;
        let t = prompt.len();
        let tokens: Vec<u32> = prompt.iter().chain(continuation).copied().collect();
        let model = &self.experts[primary];
        let mut cache = model.new_cache();
        let mut hidden = model.embed(&tokens)?;
        for (q, states) in peers.iter().enumerate() {
            hidden = model.forward_layers(&hidden, self.stack_layers(primary, q), &mut cache)?;
            let mut rows = vec![self.interact(primary, q, &hidden.narrow(0, 0, t)?, states)?];
            for g in t..tokens.len() {
                let row = hidden.narrow(0, g, 1)?;
                rows.push(
                    self.interaction
                        .interact_at(primary, q, &row, t - 1, states)?,
                );
            }
            hidden = Tensor::cat(&rows, 0)?;
        }
        Ok(model.final_logits(&hidden)?)
    }

    fn check_selection(&self, inputs: &[ExpertInput<'_>], primary: usize) -> Result<(), MotError> {
        let n = self.experts.len();
        for (k, input) in inputs.iter().enumerate() {
            if input.expert >= n {
                return Err(MotError::Input(format!(
                    "expert id {} out of range ({n} experts)",
                    input.expert
                )));
            }
            if inputs[..k].iter().any(|o| o.expert == input.expert) {
                return Err(MotError::Input(format!(
                    "expert {} selected twice",
                    input.expert
                )));
            }
            if input.tokens.is_empty() {
                return Err(MotError::Input(format!(
                    "expert {} has no tokens",
                    input.expert
                )));
            }
        }
        if !inputs.iter().any(|i| i.expert == primary) {
            return Err(MotError::Input(format!(
                "primary {primary} is not among the selected experts"
            )));
        }
        Ok(())
    }
}
