//! diffusers' FLUX tensor names → Black Forest Labs' names: diffusers'
//! `scripts/convert_flux_to_diffusers.py` read backwards.
//!
//! diffusers splits the fused projections BFL trains with (`qkv`, the single block's `linear1` =
//! qkv + MLP input) into separate linears and stores the final adaLN as (scale, shift) where BFL
//! has (shift, scale). Loading concatenates the pieces back along the output dimension and swaps
//! the halves, so one network implementation serves both layouts.
//!
//! The rule list is driven by the config, not by the file: every tensor the model needs is
//! looked up by its diffusers name, so a missing or mis-shaped tensor is reported under the name
//! the checkpoint should have had.

use super::config::{FluxConfig, TIME_FEATURES};
use crate::diffusion::DiffusionError;
use crate::llm::weights::{classify_load_error, WeightsError};
use candle_core::Tensor;
use candle_nn::VarBuilder;
use std::collections::HashMap;

/// One BFL tensor and the diffusers tensors it is made of.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Rule {
    /// BFL name, as the network reads it.
    pub bfl: String,
    /// diffusers names and shapes, concatenated along dim 0 in this order.
    pub parts: Vec<(String, Vec<usize>)>,
    /// Swap the two halves along dim 0 (diffusers' `norm_out` is (scale, shift)).
    pub swap_halves: bool,
}

struct Rules(Vec<Rule>);

impl Rules {
    /// A linear layer: `weight` `[Σ out, in]` and `bias` `[Σ out]` from the given diffusers
    /// linears (prefix, out width).
    fn linear(&mut self, bfl: &str, parts: &[(String, usize)], in_dim: usize) {
        self.linear_swapped(bfl, parts, in_dim, false)
    }

    fn linear_swapped(&mut self, bfl: &str, parts: &[(String, usize)], in_dim: usize, swap: bool) {
        for (suffix, with_in) in [("weight", true), ("bias", false)] {
            self.0.push(Rule {
                bfl: format!("{bfl}.{suffix}"),
                parts: parts
                    .iter()
                    .map(|(p, out)| {
                        let shape = if with_in {
                            vec![*out, in_dim]
                        } else {
                            vec![*out]
                        };
                        (format!("{p}.{suffix}"), shape)
                    })
                    .collect(),
                swap_halves: swap,
            });
        }
    }

    /// A renamed tensor of shape `[dim]` (RMSNorm scales).
    fn vector(&mut self, bfl: String, diffusers: String, dim: usize) {
        self.0.push(Rule {
            bfl,
            parts: vec![(diffusers, vec![dim])],
            swap_halves: false,
        });
    }
}

/// Every BFL tensor of a FLUX model with `cfg`'s shape and where it comes from in diffusers.
pub(crate) fn rules(cfg: &FluxConfig) -> Vec<Rule> {
    let (h, hd, mlp) = (cfg.hidden_size(), cfg.attention_head_dim, cfg.mlp_hidden());
    let one = |p: &str, out: usize| vec![(p.to_string(), out)];
    let mut r = Rules(Vec::new());
    r.linear("img_in", &one("x_embedder", h), cfg.in_channels);
    r.linear(
        "txt_in",
        &one("context_embedder", h),
        cfg.joint_attention_dim,
    );
    let tte = "time_text_embed";
    let mut embedder = |bfl: &str, diffusers: &str, in_dim: usize| {
        r.linear(
            &format!("{bfl}.in_layer"),
            &one(&format!("{tte}.{diffusers}.linear_1"), h),
            in_dim,
        );
        r.linear(
            &format!("{bfl}.out_layer"),
            &one(&format!("{tte}.{diffusers}.linear_2"), h),
            h,
        );
    };
    embedder("time_in", "timestep_embedder", TIME_FEATURES);
    embedder("vector_in", "text_embedder", cfg.pooled_projection_dim);
    if cfg.guidance_embeds {
        embedder("guidance_in", "guidance_embedder", TIME_FEATURES);
    }
    for i in 0..cfg.num_layers {
        let (b, d) = (
            format!("double_blocks.{i}"),
            format!("transformer_blocks.{i}"),
        );
        let proj = |names: &[&str], out: usize| -> Vec<(String, usize)> {
            names.iter().map(|n| (format!("{d}.{n}"), out)).collect()
        };
        r.linear(
            &format!("{b}.img_mod.lin"),
            &proj(&["norm1.linear"], 6 * h),
            h,
        );
        r.linear(
            &format!("{b}.txt_mod.lin"),
            &proj(&["norm1_context.linear"], 6 * h),
            h,
        );
        let qkv = ["attn.to_q", "attn.to_k", "attn.to_v"];
        r.linear(&format!("{b}.img_attn.qkv"), &proj(&qkv, h), h);
        let add_qkv = ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"];
        r.linear(&format!("{b}.txt_attn.qkv"), &proj(&add_qkv, h), h);
        r.linear(
            &format!("{b}.img_attn.proj"),
            &proj(&["attn.to_out.0"], h),
            h,
        );
        r.linear(
            &format!("{b}.txt_attn.proj"),
            &proj(&["attn.to_add_out"], h),
            h,
        );
        r.linear(&format!("{b}.img_mlp.0"), &proj(&["ff.net.0.proj"], mlp), h);
        r.linear(&format!("{b}.img_mlp.2"), &proj(&["ff.net.2"], h), mlp);
        r.linear(
            &format!("{b}.txt_mlp.0"),
            &proj(&["ff_context.net.0.proj"], mlp),
            h,
        );
        r.linear(
            &format!("{b}.txt_mlp.2"),
            &proj(&["ff_context.net.2"], h),
            mlp,
        );
        for (stream, q, k) in [
            ("img", "norm_q", "norm_k"),
            ("txt", "norm_added_q", "norm_added_k"),
        ] {
            let norm = format!("{b}.{stream}_attn.norm");
            r.vector(
                format!("{norm}.query_norm.scale"),
                format!("{d}.attn.{q}.weight"),
                hd,
            );
            r.vector(
                format!("{norm}.key_norm.scale"),
                format!("{d}.attn.{k}.weight"),
                hd,
            );
        }
    }
    for i in 0..cfg.num_single_layers {
        let (b, d) = (
            format!("single_blocks.{i}"),
            format!("single_transformer_blocks.{i}"),
        );
        r.linear(
            &format!("{b}.modulation.lin"),
            &one(&format!("{d}.norm.linear"), 3 * h),
            h,
        );
        let linear1 = [
            (format!("{d}.attn.to_q"), h),
            (format!("{d}.attn.to_k"), h),
            (format!("{d}.attn.to_v"), h),
            (format!("{d}.proj_mlp"), mlp),
        ];
        r.linear(&format!("{b}.linear1"), &linear1, h);
        r.linear(
            &format!("{b}.linear2"),
            &one(&format!("{d}.proj_out"), h),
            h + mlp,
        );
        r.vector(
            format!("{b}.norm.query_norm.scale"),
            format!("{d}.attn.norm_q.weight"),
            hd,
        );
        r.vector(
            format!("{b}.norm.key_norm.scale"),
            format!("{d}.attn.norm_k.weight"),
            hd,
        );
    }
    r.linear("final_layer.linear", &one("proj_out", cfg.in_channels), h);
    r.linear_swapped(
        "final_layer.adaLN_modulation.1",
        &one("norm_out.linear", 2 * h),
        h,
        true,
    );
    r.0
}

/// Every diffusers tensor a FLUX model with `cfg`'s shape has, with its shape, sorted by name.
pub(crate) fn diffusers_tensor_shapes(cfg: &FluxConfig) -> Vec<(String, Vec<usize>)> {
    let mut all: Vec<_> = rules(cfg).into_iter().flat_map(|r| r.parts).collect();
    all.sort();
    all
}

/// A candle error from a [`VarBuilder`] read, as a weights error when it is one.
pub(crate) fn load_error(err: candle_core::Error) -> DiffusionError {
    match classify_load_error(err) {
        Ok(w) => DiffusionError::Weights(w),
        Err(e) => DiffusionError::Candle(e),
    }
}

/// Reads every tensor `cfg` needs from the diffusers checkpoint behind `src` and returns them
/// under their BFL names (fused and reordered), in `src`'s dtype and device.
pub(crate) fn bfl_tensors(
    cfg: &FluxConfig,
    src: &VarBuilder,
) -> Result<HashMap<String, Tensor>, DiffusionError> {
    let mut out = HashMap::new();
    for rule in rules(cfg) {
        let mut parts = Vec::with_capacity(rule.parts.len());
        for (name, shape) in &rule.parts {
            if !src.contains_tensor(name) {
                return Err(WeightsError::MissingTensor { name: name.clone() }.into());
            }
            parts.push(src.get(shape.as_slice(), name).map_err(load_error)?);
        }
        let mut t = if parts.len() == 1 {
            parts.swap_remove(0)
        } else {
            Tensor::cat(&parts, 0)?
        };
        if rule.swap_halves {
            let half = t.dim(0)? / 2;
            t = Tensor::cat(&[t.narrow(0, half, half)?, t.narrow(0, 0, half)?], 0)?;
        }
        out.insert(rule.bfl, t);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flux_dev_has_the_published_tensor_count() {
        // FLUX.1-dev's diffusers transformer: 19 double blocks x 32 tensors, 38 single x 14,
        // 12 for the time/guidance/text embedders, 4 for x/context embedders, 4 for the output.
        let shapes = diffusers_tensor_shapes(&FluxConfig::dev());
        assert_eq!(shapes.len(), 19 * 32 + 38 * 14 + 12 + 4 + 4);
        let params: usize = shapes
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        // 11.9B parameters.
        assert!(
            (11_800_000_000..12_000_000_000).contains(&params),
            "{params}"
        );
    }

    #[test]
    fn bfl_names_are_unique() {
        let rules = rules(&FluxConfig::dev());
        let names: std::collections::BTreeSet<_> = rules.iter().map(|r| &r.bfl).collect();
        assert_eq!(names.len(), rules.len());
    }
}
