//! A tiny Mixture of Thoughts checkpoint set (see `crate::mot`): three seeded experts of
//! different families, widths and depths, and seeded interaction weights.
//!
//! ```text
//! dir/mot_config.json
//! dir/interaction.safetensors
//! dir/experts/small/    Llama, hidden 32, 2 layers   (write_tiny_llm layout)
//! dir/experts/medium/   Qwen2, hidden 48, 3 layers
//! dir/experts/large/    Qwen3, hidden 64, 4 layers
//! dir/router/           tiny router (write_tiny_router layout)
//! ```
//!
//! All three experts use the same tiny byte-level BPE tokenizer (512 ids), so their token
//! counts match and resampling is the identity; the different-tokenizer path is covered by
//! `crate::mot::resample_tokens` on its own. `dir/router/` holds a tiny router checkpoint
//! (BERT prompt encoder + MLP, see `crate::router`) scoring the three experts in id order;
//! `mot_config.json`'s `"router"` names that folder.
//!
//! Not part of [`make_tiny`](super::make_tiny)'s default set: the default graph and its cache
//! versions are unchanged.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::json;

use super::llm::{normal_bytes, tensor_seed, write_json};
use super::{write_tiny_llm, TinyError, TinyFamily, TinyLlmSpec};
use crate::mot::{INTERACTION_FILE, MOT_CONFIG_FILE};

/// Names of the tiny experts, in id order.
pub const TINY_MOT_EXPERTS: [&str; 3] = ["small", "medium", "large"];
/// `d_s` of the tiny set.
pub const TINY_MOT_SHARED_DIM: usize = 32;
/// Cross-attention heads of the tiny set.
pub const TINY_MOT_HEADS: usize = 4;
/// `Q` of the tiny set.
pub const TINY_MOT_STACKS: usize = 2;
/// `α` of the tiny set.
pub const TINY_MOT_ALPHA: f64 = 1.0;
/// The router checkpoint's folder inside the tiny set (`mot_config.json`'s `router`).
pub const TINY_MOT_ROUTER_DIR: &str = "router";

/// The tiny experts' specs, in [`TINY_MOT_EXPERTS`] order.
pub fn tiny_mot_expert_specs() -> [TinyLlmSpec; 3] {
    let base = |family, hidden, layers, head_dim| TinyLlmSpec {
        hidden_size: hidden,
        num_hidden_layers: layers,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim,
        intermediate_size: 2 * hidden,
        ..TinyLlmSpec::tiny(family)
    };
    [
        base(TinyFamily::Llama, 32, 2, 8),
        base(TinyFamily::Qwen2, 48, 3, 12),
        base(TinyFamily::Qwen3, 64, 4, 16),
    ]
}

/// The shape of a MoT set: its three experts (in [`TINY_MOT_EXPERTS`] order) and the shared
/// space.
#[derive(Debug, Clone)]
pub struct MotSetSpec {
    pub experts: [TinyLlmSpec; 3],
    /// `d_s`.
    pub shared_dim: usize,
    /// Cross-attention heads (divides `shared_dim`).
    pub heads: usize,
    /// `Q`.
    pub stacks: usize,
}

impl MotSetSpec {
    /// The tiny set the tests and `deploy/tiny-mot.toml` use.
    pub fn tiny() -> Self {
        Self {
            experts: tiny_mot_expert_specs(),
            shared_dim: TINY_MOT_SHARED_DIM,
            heads: TINY_MOT_HEADS,
            stacks: TINY_MOT_STACKS,
        }
    }

    /// A benchmark set with experts large enough that their own compute, not per-operation
    /// overhead, dominates a CPU step: Llama 256 wide × 4 layers, Qwen2 384 × 6, Qwen3 512 × 8
    /// (7, 17 and 34 M parameters with the 512-id vocabulary), shared space 128 wide, 4 heads,
    /// 2 stacks.
    pub fn bench() -> Self {
        let base = |family, hidden: usize, layers| TinyLlmSpec {
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: 8,
            num_key_value_heads: 4,
            head_dim: hidden / 8,
            intermediate_size: 4 * hidden,
            max_position_embeddings: 2048,
            init_std: 0.02,
            ..TinyLlmSpec::tiny(family)
        };
        Self {
            experts: [
                base(TinyFamily::Llama, 256, 4),
                base(TinyFamily::Qwen2, 384, 6),
                base(TinyFamily::Qwen3, 512, 8),
            ],
            shared_dim: 128,
            heads: 4,
            stacks: 2,
        }
    }
}

/// Writes the tiny MoT set into `dir` (created if missing); returns every written file. Same
/// `seed` ⇒ byte-identical files; each expert's weights come from its own seed derived from
/// `seed` and its name.
pub fn write_mot(dir: &Path, seed: u64) -> Result<Vec<PathBuf>, TinyError> {
    write_mot_set(dir, &MotSetSpec::tiny(), seed)
}

/// Writes a MoT set of shape `set` into `dir` (see [`write_mot`]).
pub fn write_mot_set(dir: &Path, set: &MotSetSpec, seed: u64) -> Result<Vec<PathBuf>, TinyError> {
    std::fs::create_dir_all(dir).map_err(|source| TinyError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    if set.heads == 0 || set.shared_dim % set.heads != 0 || set.stacks == 0 {
        return Err(TinyError::InvalidSpec(format!(
            "MoT set: shared_dim {} must be a multiple of heads {} and stacks {} at least 1",
            set.shared_dim, set.heads, set.stacks
        )));
    }
    let specs = &set.experts;
    let mut files = Vec::new();
    let mut experts = Vec::new();
    for (name, spec) in TINY_MOT_EXPERTS.iter().zip(specs) {
        let rel = format!("experts/{name}");
        let expert_seed = tensor_seed(seed, &rel);
        files.extend(write_tiny_llm(&dir.join(&rel), spec, expert_seed)?);
        experts.push(json!({"name": name, "path": rel}));
    }
    let config = json!({
        "model_type": "mot",
        "experts": experts,
        "shared_dim": set.shared_dim,
        "num_heads": set.heads,
        "num_stacks": set.stacks,
        "alpha": TINY_MOT_ALPHA,
        "layer_norm_eps": 1e-5,
        "router": TINY_MOT_ROUTER_DIR,
    });
    files.push(write_json(&dir.join(MOT_CONFIG_FILE), &config)?);
    // The router scoring the experts (in id order) for the prompt: `dir/router/`.
    files.extend(super::write_tiny_router(
        &dir.join(TINY_MOT_ROUTER_DIR),
        &TINY_MOT_EXPERTS,
        tensor_seed(seed, TINY_MOT_ROUTER_DIR),
    )?);
    let dims: Vec<usize> = specs.iter().map(|s| s.hidden_size).collect();
    let weights = dir.join(INTERACTION_FILE);
    write_interaction(&weights, &dims, set, seed)?;
    files.push(weights);
    Ok(files)
}

/// How a tensor is filled.
enum Fill {
    Ones,
    Zeros,
    Normal(f32),
}

/// Every interaction tensor (names and shapes as in `crate::mot::interaction`).
fn interaction_specs(dims: &[usize], set: &MotSetSpec) -> Vec<(String, Vec<usize>, Fill)> {
    let ds = set.shared_dim;
    let inv_sqrt = |n: usize| 1.0 / (n as f32).sqrt();
    let mut out = Vec::new();
    for q in 0..set.stacks {
        for (i, &d) in dims.iter().enumerate() {
            let p = format!("stacks.{q}.experts.{i}");
            out.push((format!("{p}.norm.weight"), vec![d], Fill::Ones));
            out.push((format!("{p}.norm.bias"), vec![d], Fill::Zeros));
            let w_in = Fill::Normal(inv_sqrt(d));
            out.push((format!("{p}.in_proj.weight"), vec![ds, d], w_in));
            out.push((format!("{p}.in_proj.bias"), vec![ds], Fill::Normal(0.02)));
            // Small back-projection: the update is of the order of the tiny residual stream.
            out.push((
                format!("{p}.out_proj.weight"),
                vec![d, ds],
                Fill::Normal(0.02),
            ));
            out.push((format!("{p}.out_proj.bias"), vec![d], Fill::Normal(0.02)));
        }
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            let p = format!("stacks.{q}.attn.{proj}");
            out.push((
                format!("{p}.weight"),
                vec![ds, ds],
                Fill::Normal(inv_sqrt(ds)),
            ));
            out.push((format!("{p}.bias"), vec![ds], Fill::Normal(0.02)));
        }
    }
    out
}

/// Writes `interaction.safetensors` (f32, `{"format": "pt"}` metadata).
fn write_interaction(
    path: &Path,
    dims: &[usize],
    set: &MotSetSpec,
    seed: u64,
) -> Result<(), TinyError> {
    let specs = interaction_specs(dims, set);
    let data: Vec<Vec<u8>> = specs
        .iter()
        .map(|(name, shape, fill)| {
            let n = shape.iter().product::<usize>();
            match fill {
                Fill::Ones => 1.0f32.to_le_bytes().repeat(n),
                Fill::Zeros => vec![0u8; n * 4],
                Fill::Normal(std) => normal_bytes(tensor_seed(seed, name), n, *std),
            }
        })
        .collect();
    let st_err = |source| TinyError::Safetensors {
        path: path.to_path_buf(),
        source,
    };
    let mut views = Vec::with_capacity(specs.len());
    for ((name, shape, _), bytes) in specs.iter().zip(&data) {
        views.push((
            name.clone(),
            TensorView::new(Dtype::F32, shape.clone(), bytes).map_err(st_err)?,
        ));
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(st_err)
}
