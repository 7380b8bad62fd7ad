//! Tensor names: diffusers' `SD3Transformer2DModel` layout mapped onto the original SD3
//! (Stability / ComfyUI) names that candle-transformers' MMDiT pieces and the model code use.
//!
//! The map is the inverse of diffusers' `convert_sd3_transformer_checkpoint_to_diffusers`
//! (`diffusers/loaders/single_file_utils.py`, the code behind
//! `scripts/convert_sd3_to_diffusers.py`):
//!
//! * diffusers splits each fused `qkv` projection into `to_q/to_k/to_v` (image stream) and
//!   `add_q_proj/add_k_proj/add_v_proj` (text stream); we concatenate them back along the
//!   output dimension, which is the `[3, heads, head_dim]` order candle's `split_qkv` expects;
//! * diffusers' `AdaLayerNormContinuous` (the last block's `norm1_context` and `norm_out`)
//!   emits `(scale, shift)` where SD3's adaLN emits `(shift, scale)`, so those two linears have
//!   their halves swapped back;
//! * everything else is a rename.
//!
//! It also checks the two features a config can disagree with its checkpoint about (q/k norms
//! and MMDiT-X second attentions): candle's projections silently skip a q/k norm whose tensor
//! is absent, which would run a wrong model instead of failing.

use super::config::{QkNorm, Sd3Config};
use crate::diffusion::DiffusionError;
use crate::llm::weights::WeightsError;
use candle_core::Tensor;
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::path::Path;

/// How one SD3-named tensor is made from diffusers tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// The single source, as is.
    Rename,
    /// The sources concatenated along dimension 0 (fused q/k/v).
    Concat,
    /// The single source with the two halves of dimension 0 exchanged
    /// (`(scale, shift)` → `(shift, scale)`).
    SwapHalves,
}

/// One SD3-named tensor and the diffusers tensors it is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rule {
    /// Name in the SD3 layout (without `model.diffusion_model.`).
    pub target: String,
    op: Op,
    /// Names in the diffusers layout.
    pub sources: Vec<String>,
}

/// Accumulates rules; `linear` adds the `.weight` and `.bias` pair.
#[derive(Default)]
struct Rules(Vec<Rule>);

impl Rules {
    fn tensor(&mut self, target: &str, op: Op, sources: &[&str]) {
        self.0.push(Rule {
            target: target.to_string(),
            op,
            sources: sources.iter().map(|s| s.to_string()).collect(),
        });
    }

    fn linear(&mut self, target: &str, op: Op, sources: &[&str]) {
        for suffix in ["weight", "bias"] {
            let srcs: Vec<String> = sources.iter().map(|s| format!("{s}.{suffix}")).collect();
            let srcs: Vec<&str> = srcs.iter().map(String::as_str).collect();
            self.tensor(&format!("{target}.{suffix}"), op, &srcs);
        }
    }

    /// The fused q/k/v linear of `target` from three diffusers projections under `attn`.
    fn qkv(&mut self, target: &str, attn: &str, names: [&str; 3]) {
        let srcs = names.map(|n| format!("{attn}.{n}"));
        let srcs: Vec<&str> = srcs.iter().map(String::as_str).collect();
        self.linear(target, Op::Concat, &srcs);
    }
}

/// Every SD3-named tensor the model built from `config` reads, with its diffusers sources.
pub(crate) fn diffusers_rules(config: &Sd3Config) -> Vec<Rule> {
    use Op::{Rename, SwapHalves};
    let mut r = Rules::default();
    r.tensor("pos_embed", Rename, &["pos_embed.pos_embed"]);
    r.linear("x_embedder.proj", Rename, &["pos_embed.proj"]);
    let tte = "time_text_embed";
    r.linear(
        "t_embedder.mlp.0",
        Rename,
        &[&format!("{tte}.timestep_embedder.linear_1")],
    );
    r.linear(
        "t_embedder.mlp.2",
        Rename,
        &[&format!("{tte}.timestep_embedder.linear_2")],
    );
    r.linear(
        "y_embedder.mlp.0",
        Rename,
        &[&format!("{tte}.text_embedder.linear_1")],
    );
    r.linear(
        "y_embedder.mlp.2",
        Rename,
        &[&format!("{tte}.text_embedder.linear_2")],
    );
    r.linear("context_embedder", Rename, &["context_embedder"]);
    let last = config.num_layers - 1;
    let qk = config.qk_norm == QkNorm::RmsNorm;
    for i in 0..config.num_layers {
        let (d, s) = (
            format!("transformer_blocks.{i}"),
            format!("joint_blocks.{i}"),
        );
        let (x, ctx) = (format!("{s}.x_block"), format!("{s}.context_block"));
        let attn = format!("{d}.attn");
        r.qkv(&format!("{x}.attn.qkv"), &attn, ["to_q", "to_k", "to_v"]);
        r.linear(
            &format!("{x}.attn.proj"),
            Rename,
            &[&format!("{attn}.to_out.0")],
        );
        r.qkv(
            &format!("{ctx}.attn.qkv"),
            &attn,
            ["add_q_proj", "add_k_proj", "add_v_proj"],
        );
        if qk {
            for (stream, target, source) in [
                (&x, "ln_q", "norm_q"),
                (&x, "ln_k", "norm_k"),
                (&ctx, "ln_q", "norm_added_q"),
                (&ctx, "ln_k", "norm_added_k"),
            ] {
                r.tensor(
                    &format!("{stream}.attn.{target}.weight"),
                    Rename,
                    &[&format!("{attn}.{source}.weight")],
                );
            }
        }
        r.linear(
            &format!("{x}.adaLN_modulation.1"),
            Rename,
            &[&format!("{d}.norm1.linear")],
        );
        r.linear(
            &format!("{x}.mlp.fc1"),
            Rename,
            &[&format!("{d}.ff.net.0.proj")],
        );
        r.linear(&format!("{x}.mlp.fc2"), Rename, &[&format!("{d}.ff.net.2")]);
        if config.is_dual_attention(i) {
            let attn2 = format!("{d}.attn2");
            r.qkv(&format!("{x}.attn2.qkv"), &attn2, ["to_q", "to_k", "to_v"]);
            r.linear(
                &format!("{x}.attn2.proj"),
                Rename,
                &[&format!("{attn2}.to_out.0")],
            );
            if qk {
                r.tensor(
                    &format!("{x}.attn2.ln_q.weight"),
                    Rename,
                    &[&format!("{attn2}.norm_q.weight")],
                );
                r.tensor(
                    &format!("{x}.attn2.ln_k.weight"),
                    Rename,
                    &[&format!("{attn2}.norm_k.weight")],
                );
            }
        }
        let ctx_mod = format!("{ctx}.adaLN_modulation.1");
        let norm1_ctx = format!("{d}.norm1_context.linear");
        if i == last {
            r.linear(&ctx_mod, SwapHalves, &[&norm1_ctx]);
        } else {
            r.linear(&ctx_mod, Rename, &[&norm1_ctx]);
            r.linear(
                &format!("{ctx}.attn.proj"),
                Rename,
                &[&format!("{attn}.to_add_out")],
            );
            r.linear(
                &format!("{ctx}.mlp.fc1"),
                Rename,
                &[&format!("{d}.ff_context.net.0.proj")],
            );
            r.linear(
                &format!("{ctx}.mlp.fc2"),
                Rename,
                &[&format!("{d}.ff_context.net.2")],
            );
        }
    }
    r.linear("final_layer.linear", Rename, &["proj_out"]);
    r.linear(
        "final_layer.adaLN_modulation.1",
        SwapHalves,
        &["norm_out.linear"],
    );
    r.0
}

/// Reads the diffusers tensors from `source` (already of the model's dtype and device) and
/// builds every SD3-named tensor of `config`. A missing diffusers tensor is a
/// [`WeightsError::MissingTensor`] naming it.
pub(crate) fn convert_diffusers(
    source: &VarBuilder<'_>,
    config: &Sd3Config,
) -> Result<HashMap<String, Tensor>, DiffusionError> {
    let rules = diffusers_rules(config);
    let mut out = HashMap::with_capacity(rules.len());
    for rule in rules {
        let parts = rule
            .sources
            .iter()
            .map(|name| fetch(source, name))
            .collect::<Result<Vec<_>, _>>()?;
        let tensor = apply(&rule, parts, config.hidden_size())?;
        out.insert(rule.target, tensor);
    }
    Ok(out)
}

/// Makes `rule.target` from its fetched `parts`; `half` is the hidden width, the size of each
/// half a [`Op::SwapHalves`] exchanges.
fn apply(rule: &Rule, mut parts: Vec<Tensor>, half: usize) -> Result<Tensor, DiffusionError> {
    match rule.op {
        Op::Rename => parts
            .pop()
            .ok_or_else(|| DiffusionError::Input(format!("no source for {}", rule.target))),
        Op::Concat => {
            for (name, part) in rule.sources.iter().zip(&parts).skip(1) {
                if part.dims() != parts[0].dims() {
                    return Err(WeightsError::ShapeMismatch {
                        msg: format!(
                            "{name} must have the shape of {} to be fused into {}",
                            rule.sources[0], rule.target
                        ),
                        expected: parts[0].dims().to_vec(),
                        got: part.dims().to_vec(),
                    }
                    .into());
                }
            }
            Ok(Tensor::cat(&parts, 0)?)
        }
        Op::SwapHalves => {
            let t = parts
                .pop()
                .ok_or_else(|| DiffusionError::Input(format!("no source for {}", rule.target)))?;
            if t.dims().first() != Some(&(2 * half)) {
                let mut expected = t.dims().to_vec();
                match expected.first_mut() {
                    Some(first) => *first = 2 * half,
                    None => expected.push(2 * half),
                }
                return Err(WeightsError::ShapeMismatch {
                    msg: format!("{} holds (scale, shift) halves", rule.sources[0]),
                    expected,
                    got: t.dims().to_vec(),
                }
                .into());
            }
            Ok(Tensor::cat(
                &[t.narrow(0, half, half)?, t.narrow(0, 0, half)?],
                0,
            )?)
        }
    }
}

/// The diffusers tensor `name` from `source`, or an error naming it.
fn fetch(source: &VarBuilder<'_>, name: &str) -> Result<Tensor, DiffusionError> {
    if !source.contains_tensor(name) {
        return Err(WeightsError::MissingTensor { name: name.into() }.into());
    }
    Ok(source.get_unchecked(name)?)
}

/// For an SD3 tensor name, the diffusers tensors it was made from (for error messages).
pub(crate) fn diffusers_sources(config: &Sd3Config, target: &str) -> Option<Vec<String>> {
    diffusers_rules(config)
        .into_iter()
        .find(|r| r.target == target)
        .map(|r| r.sources)
}

/// Which naming a checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// `SD3Transformer2DModel` names (`transformer_blocks.N.attn.to_q.weight`).
    Diffusers,
    /// Original SD3 names (`joint_blocks.N.x_block.attn.qkv.weight`), prefix already applied.
    Sd3,
}

impl Layout {
    /// A tensor present exactly when block `layer` has the MMDiT-X second attention.
    fn attn2_marker(self, layer: usize) -> String {
        match self {
            Layout::Diffusers => format!("transformer_blocks.{layer}.attn2.to_q.weight"),
            Layout::Sd3 => format!("joint_blocks.{layer}.x_block.attn2.qkv.weight"),
        }
    }

    /// The q/k norm scales block `layer` has when the model uses q/k norms.
    fn qk_norm_names(self, layer: usize, dual: bool) -> Vec<String> {
        let (prefix, names): (String, &[&str]) = match self {
            Layout::Diffusers => (
                format!("transformer_blocks.{layer}"),
                &[
                    "attn.norm_q",
                    "attn.norm_k",
                    "attn.norm_added_q",
                    "attn.norm_added_k",
                    "attn2.norm_q",
                    "attn2.norm_k",
                ],
            ),
            Layout::Sd3 => (
                format!("joint_blocks.{layer}"),
                &[
                    "x_block.attn.ln_q",
                    "x_block.attn.ln_k",
                    "context_block.attn.ln_q",
                    "context_block.attn.ln_k",
                    "x_block.attn2.ln_q",
                    "x_block.attn2.ln_k",
                ],
            ),
        };
        let used = if dual { names.len() } else { 4 };
        names[..used]
            .iter()
            .map(|n| format!("{prefix}.{n}.weight"))
            .collect()
    }
}

/// Checks that the checkpoint behind `vb` has q/k norms and second attentions exactly where
/// `config` says. `path` (the config file, or the single checkpoint file whose config the
/// caller supplied) is named in errors about the config.
pub(crate) fn check_layout(
    vb: &VarBuilder<'_>,
    config: &Sd3Config,
    layout: Layout,
    path: &Path,
) -> Result<(), DiffusionError> {
    for layer in 0..config.num_layers {
        let dual = config.is_dual_attention(layer);
        let marker = layout.attn2_marker(layer);
        match (dual, vb.contains_tensor(&marker)) {
            (true, false) => return Err(WeightsError::MissingTensor { name: marker }.into()),
            (false, true) => {
                return Err(DiffusionError::config(
                    path,
                    format!(
                        "dual_attention_layers: layer {layer} is not listed, but the \
                         checkpoint has {marker}"
                    ),
                ))
            }
            _ => {}
        }
        let norms = layout.qk_norm_names(layer, dual);
        match config.qk_norm {
            QkNorm::RmsNorm => {
                if let Some(name) = norms.into_iter().find(|n| !vb.contains_tensor(n)) {
                    return Err(WeightsError::MissingTensor { name }.into());
                }
            }
            QkNorm::None => {
                if let Some(name) = norms.into_iter().find(|n| vb.contains_tensor(n)) {
                    return Err(DiffusionError::config(
                        path,
                        format!("qk_norm: null, but the checkpoint has {name}"),
                    ));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(extra: serde_json::Value) -> Sd3Config {
        let mut v = json!({
            "attention_head_dim": 8, "caption_projection_dim": 16, "in_channels": 4,
            "joint_attention_dim": 12, "num_attention_heads": 2, "num_layers": 3,
            "out_channels": 4, "patch_size": 2, "pooled_projection_dim": 10,
            "pos_embed_max_size": 8,
        });
        if let (Some(v), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
            v.extend(extra.clone());
        }
        Sd3Config::from_json(&v, Path::new("config.json")).unwrap()
    }

    #[test]
    fn targets_are_unique_and_sources_used_once() {
        for cfg in [
            config(json!({})),
            config(json!({"qk_norm": "rms_norm", "dual_attention_layers": [0, 2]})),
        ] {
            let rules = diffusers_rules(&cfg);
            let mut targets: Vec<_> = rules.iter().map(|r| r.target.clone()).collect();
            let mut sources: Vec<_> = rules.iter().flat_map(|r| r.sources.clone()).collect();
            let (nt, ns) = (targets.len(), sources.len());
            targets.sort();
            targets.dedup();
            sources.sort();
            sources.dedup();
            assert_eq!((targets.len(), sources.len()), (nt, ns));
        }
    }

    #[test]
    fn last_block_context_and_norm_out_are_swapped() {
        let cfg = config(json!({}));
        let rules = diffusers_rules(&cfg);
        let op = |t: &str| rules.iter().find(|r| r.target == t).map(|r| r.op);
        assert_eq!(
            op("joint_blocks.2.context_block.adaLN_modulation.1.weight"),
            Some(Op::SwapHalves)
        );
        assert_eq!(
            op("joint_blocks.1.context_block.adaLN_modulation.1.weight"),
            Some(Op::Rename)
        );
        assert_eq!(
            op("final_layer.adaLN_modulation.1.bias"),
            Some(Op::SwapHalves)
        );
        assert_eq!(op("joint_blocks.2.context_block.attn.proj.weight"), None);
    }

    #[test]
    fn swap_halves_reorders_scale_and_shift() {
        let dev = candle_core::Device::Cpu;
        let rule = Rule {
            target: "final_layer.adaLN_modulation.1.bias".into(),
            op: Op::SwapHalves,
            sources: vec!["norm_out.linear.bias".into()],
        };
        let t = Tensor::arange(0f32, 6.0, &dev).unwrap();
        let swapped = apply(&rule, vec![t.clone()], 3).unwrap();
        assert_eq!(
            swapped.to_vec1::<f32>().unwrap(),
            [3.0, 4.0, 5.0, 0.0, 1.0, 2.0]
        );
        let err = apply(&rule, vec![t], 4).unwrap_err().to_string();
        assert!(err.contains("norm_out.linear.bias"), "{err}");
    }

    #[test]
    fn missing_source_is_named() {
        let cfg = config(json!({}));
        let dev = candle_core::Device::Cpu;
        let vb = VarBuilder::from_tensors(HashMap::new(), candle_core::DType::F32, &dev);
        let err = convert_diffusers(&vb, &cfg).unwrap_err().to_string();
        assert!(err.contains("pos_embed.pos_embed"), "{err}");
    }
}
