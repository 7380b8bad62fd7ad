//! `mot_config.json`: the experts of a Mixture of Thoughts checkpoint and the shape of its
//! interaction layers.
//!
//! ```json
//! {
//!   "model_type": "mot",
//!   "experts": [
//!     {"name": "small", "path": "experts/small"},
//!     {"name": "medium", "path": "experts/medium"}
//!   ],
//!   "shared_dim": 32,
//!   "num_heads": 4,
//!   "num_stacks": 2,
//!   "alpha": 1.0,
//!   "layer_norm_eps": 1e-5,
//!   "router": "router"
//! }
//! ```
//!
//! - `experts[i].path`: the expert's Hugging Face checkpoint directory (`config.json` +
//!   safetensors, Llama / Qwen2 / Qwen3), relative to the MoT folder unless absolute. The
//!   expert's index `i` in this list is its id in `interaction.safetensors` tensor names.
//! - `shared_dim` (`d_s`): width of the shared latent space; `num_heads` must divide it.
//! - `num_stacks` (`Q`): every expert's layers are split into `Q` stacks, each followed by one
//!   interaction layer (so every expert needs at least `Q` layers).
//! - `alpha`: scale of the back-projected update added to the primary's residual stream.
//! - `layer_norm_eps`: epsilon of the per-expert LayerNorm before the projection (default 1e-5,
//!   PyTorch's `nn.LayerNorm` default).
//! - `router`: the folder of the router that picks experts for this pool (prompt encoder + MLP,
//!   `crate::router`), relative to this folder; informational here (a deployment's router
//!   stage names its folder as its `model`). Unknown fields are ignored.

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::MotError;

/// The config file name inside a MoT checkpoint folder.
pub const MOT_CONFIG_FILE: &str = "mot_config.json";
/// The interaction weights file name inside a MoT checkpoint folder.
pub const INTERACTION_FILE: &str = "interaction.safetensors";

/// One expert of the pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpertEntry {
    /// Unique name (how requests and the router refer to the expert).
    pub name: String,
    /// The expert's HF checkpoint directory, relative to the MoT folder unless absolute.
    pub path: PathBuf,
}

fn default_eps() -> f64 {
    1e-5
}

fn default_model_type() -> String {
    "mot".into()
}

/// The parsed `mot_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MotConfig {
    /// Always `"mot"`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// The expert pool, in id order.
    pub experts: Vec<ExpertEntry>,
    /// `d_s`: width of the shared latent space.
    pub shared_dim: usize,
    /// Heads of the shared cross-attention (divides `shared_dim`).
    pub num_heads: usize,
    /// `Q`: stacks per expert, one interaction layer after each.
    pub num_stacks: usize,
    /// `α`: scale of the update added to the primary's residual stream.
    pub alpha: f64,
    /// Epsilon of the per-expert LayerNorms.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

impl MotConfig {
    /// Reads and validates `path` (a `mot_config.json`).
    pub fn from_file(path: &Path) -> Result<Self, MotError> {
        let text = std::fs::read_to_string(path).map_err(|source| MotError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg: Self = serde_json::from_str(&text).map_err(|source| MotError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        cfg.validate().map_err(|reason| MotError::Config {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(cfg)
    }

    /// Checks the values that do not depend on the experts' own configs.
    pub fn validate(&self) -> Result<(), String> {
        if self.model_type != "mot" {
            return Err(format!(
                "model_type is {:?}, expected \"mot\"",
                self.model_type
            ));
        }
        if self.experts.is_empty() {
            return Err("no experts".into());
        }
        for (i, e) in self.experts.iter().enumerate() {
            if e.name.is_empty() {
                return Err(format!("expert {i} has an empty name"));
            }
            if self.experts[..i].iter().any(|o| o.name == e.name) {
                return Err(format!("expert name {:?} appears twice", e.name));
            }
        }
        if self.shared_dim == 0 || self.num_heads == 0 || self.num_stacks == 0 {
            return Err("shared_dim, num_heads and num_stacks must be positive".into());
        }
        #[allow(clippy::manual_is_multiple_of)] // `is_multiple_of` needs Rust 1.87; MSRV is 1.85
        if self.shared_dim % self.num_heads != 0 {
            return Err(format!(
                "num_heads ({}) must divide shared_dim ({})",
                self.num_heads, self.shared_dim
            ));
        }
        if !self.alpha.is_finite() {
            return Err(format!("alpha must be finite, got {}", self.alpha));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(format!(
                "layer_norm_eps must be positive, got {}",
                self.layer_norm_eps
            ));
        }
        Ok(())
    }

    /// The id of the expert called `name`.
    pub fn expert_index(&self, name: &str) -> Option<usize> {
        self.experts.iter().position(|e| e.name == name)
    }

    /// Expert `i`'s checkpoint directory, resolved against the MoT folder `root`.
    pub fn expert_dir(&self, root: &Path, i: usize) -> Option<PathBuf> {
        self.experts.get(i).map(|e| root.join(&e.path))
    }
}

/// Decoder layers `[floor(q·L/Q), floor((q+1)·L/Q))` of stack `q` of a `num_layers`-layer
/// expert split into `num_stacks` stacks: the uniform split, earlier stacks getting the smaller
/// share when `Q` does not divide `L`. Empty when `q >= Q`.
pub fn stack_layers(num_layers: usize, num_stacks: usize, q: usize) -> Range<usize> {
    if num_stacks == 0 || q >= num_stacks {
        return 0..0;
    }
    (q * num_layers / num_stacks)..((q + 1) * num_layers / num_stacks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stacks_cover_all_layers_in_order() {
        for l in 1..9 {
            for q in 1..=l {
                let ranges: Vec<_> = (0..q).map(|s| stack_layers(l, q, s)).collect();
                assert_eq!(ranges[0].start, 0);
                assert_eq!(ranges[q - 1].end, l);
                for w in ranges.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
                assert!(ranges.iter().all(|r| !r.is_empty()), "{l} {q} {ranges:?}");
            }
        }
        assert_eq!(stack_layers(3, 2, 0), 0..1);
        assert_eq!(stack_layers(3, 2, 1), 1..3);
    }
}
