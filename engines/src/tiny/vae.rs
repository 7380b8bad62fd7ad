//! Seeded random-weight AutoencoderKL checkpoints in the diffusers `vae/` layout.
//!
//! The tensor list mirrors diffusers' `AutoencoderKL` module tree (encoder and decoder, with the
//! current `to_q`/`to_k`/`to_v`/`to_out.0` attention names), so `AutoencoderKL.from_pretrained`
//! loads the folder with no missing or unexpected keys, and our candle decoder loads the same
//! file. Weights are scaled so a decoded image spans a good part of `[-1, 1]`: tiny pipelines
//! then produce visibly varied pictures, not flat grey.

use super::llm::{normal_bytes, tensor_seed, write_json};
use super::TinyError;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The weights file diffusers writes for a component.
const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";

/// Most resolution levels accepted (the decoder reader refuses more).
const MAX_LEVELS: usize = 8;

/// Shape and latent scaling of a tiny AutoencoderKL. The decoder always produces RGB.
#[derive(Debug, Clone, PartialEq)]
pub struct TinyVaeSpec {
    /// Image channels the encoder takes.
    pub in_channels: usize,
    /// Latent channels.
    pub latent_channels: usize,
    /// Channel width of each level, finest first; `len() - 1` 2× resamplings.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder level (the decoder gets one more, as in diffusers).
    pub layers_per_block: usize,
    /// GroupNorm groups; must divide every `block_out_channels` entry.
    pub norm_num_groups: usize,
    /// Written as `scaling_factor`.
    pub scaling_factor: f64,
    /// Written as `shift_factor` (`None` writes `null`, as SD 1.x/SDXL configs have).
    pub shift_factor: Option<f64>,
    /// Add the 1×1 `quant_conv` after the encoder.
    pub use_quant_conv: bool,
    /// Add the 1×1 `post_quant_conv` before the decoder.
    pub use_post_quant_conv: bool,
    /// Written as `sample_size`.
    pub sample_size: usize,
    /// Multiplies the std of `decoder.conv_out.weight`: the decoded images' contrast.
    pub output_gain: f32,
}

impl TinyVaeSpec {
    /// 4 latent channels, levels `[16, 32, 32]` (downscale 4), 1 layer per block, 8 groups,
    /// scaling 1.5 and shift 0.1, no quant convs (like SD3's VAE); about 0.24M parameters.
    pub fn tiny() -> Self {
        Self {
            in_channels: 3,
            latent_channels: 4,
            block_out_channels: vec![16, 32, 32],
            layers_per_block: 1,
            norm_num_groups: 8,
            scaling_factor: 1.5,
            shift_factor: Some(0.1),
            use_quant_conv: false,
            use_post_quant_conv: false,
            sample_size: 32,
            output_gain: 1.5,
        }
    }

    /// Image pixels per latent pixel along each side.
    pub fn downscale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// Number of parameters (encoder and decoder).
    pub fn num_parameters(&self) -> usize {
        tensor_specs(self)
            .iter()
            .map(|t| t.shape.iter().product::<usize>())
            .sum()
    }

    fn validate(&self) -> Result<(), TinyError> {
        let bad = |m: String| Err(TinyError::InvalidSpec(m));
        let levels = self.block_out_channels.len();
        if !(1..=MAX_LEVELS).contains(&levels) {
            return bad(format!(
                "block_out_channels needs 1 to {MAX_LEVELS} levels, got {levels}"
            ));
        }
        let dims = [
            ("in_channels", self.in_channels),
            ("latent_channels", self.latent_channels),
            ("layers_per_block", self.layers_per_block),
            ("norm_num_groups", self.norm_num_groups),
            ("sample_size", self.sample_size),
        ];
        if let Some((name, _)) = dims.iter().find(|(_, v)| *v == 0) {
            return bad(format!("{name} must be positive"));
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| c == 0 || c % self.norm_num_groups != 0)
        {
            return bad(format!(
                "block_out_channels entry {c} is not a positive multiple of norm_num_groups ({})",
                self.norm_num_groups
            ));
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor != 0.0) {
            return bad(format!(
                "scaling_factor must be finite and non-zero, got {}",
                self.scaling_factor
            ));
        }
        if !self.shift_factor.unwrap_or(0.0).is_finite() {
            return bad("shift_factor must be finite".into());
        }
        if !(self.output_gain.is_finite() && self.output_gain > 0.0) {
            return bad(format!(
                "output_gain must be positive, got {}",
                self.output_gain
            ));
        }
        Ok(())
    }
}

/// How a tensor is initialised.
#[derive(Debug, Clone, Copy)]
enum Init {
    /// Seeded normal(0, std).
    Normal(f32),
    /// Every element the same value.
    Const(f32),
}

/// One tensor of the checkpoint.
#[derive(Debug)]
struct TensorSpec {
    name: String,
    shape: Vec<usize>,
    init: Init,
}

/// Collects tensors under a name prefix.
struct Specs(Vec<TensorSpec>);

/// Biases and norm shifts: small, so they matter without dominating.
const BIAS_STD: f32 = 0.02;

impl Specs {
    fn push(&mut self, name: String, shape: Vec<usize>, init: Init) {
        self.0.push(TensorSpec { name, shape, init });
    }

    /// A conv (`k×k`) or, with `k == 0`, a linear layer, with weights of std
    /// `gain / sqrt(fan_in)` so activations keep their scale through the stack.
    fn layer(&mut self, p: &str, cout: usize, cin: usize, k: usize, gain: f32) {
        let shape = if k == 0 {
            vec![cout, cin]
        } else {
            vec![cout, cin, k, k]
        };
        let fan_in = (cin * k.max(1) * k.max(1)) as f32;
        self.push(
            format!("{p}.weight"),
            shape,
            Init::Normal(gain / fan_in.sqrt()),
        );
        self.push(format!("{p}.bias"), vec![cout], Init::Normal(BIAS_STD));
    }

    fn norm(&mut self, p: &str, c: usize) {
        self.push(format!("{p}.weight"), vec![c], Init::Const(1.0));
        self.push(format!("{p}.bias"), vec![c], Init::Normal(BIAS_STD));
    }

    /// diffusers' `ResnetBlock2D` without time embedding.
    fn resnet(&mut self, p: &str, cin: usize, cout: usize) {
        self.norm(&format!("{p}.norm1"), cin);
        self.layer(&format!("{p}.conv1"), cout, cin, 3, 1.0);
        self.norm(&format!("{p}.norm2"), cout);
        self.layer(&format!("{p}.conv2"), cout, cout, 3, 1.0);
        if cin != cout {
            self.layer(&format!("{p}.conv_shortcut"), cout, cin, 1, 1.0);
        }
    }

    /// `UNetMidBlock2D`: resnet, single-head attention, resnet.
    fn mid_block(&mut self, p: &str, c: usize) {
        self.resnet(&format!("{p}.resnets.0"), c, c);
        let a = format!("{p}.attentions.0");
        self.norm(&format!("{a}.group_norm"), c);
        for proj in ["to_q", "to_k", "to_v", "to_out.0"] {
            self.layer(&format!("{a}.{proj}"), c, c, 0, 1.0);
        }
        self.resnet(&format!("{p}.resnets.1"), c, c);
    }
}

/// Every tensor of diffusers' `AutoencoderKL` for `spec`, in module order.
fn tensor_specs(spec: &TinyVaeSpec) -> Vec<TensorSpec> {
    let b = &spec.block_out_channels;
    let (Some(&first), Some(&last)) = (b.first(), b.last()) else {
        return Vec::new();
    };
    let latent = spec.latent_channels;
    let mut s = Specs(Vec::new());

    s.layer("encoder.conv_in", first, spec.in_channels, 3, 1.0);
    let mut cin = first;
    for (i, &cout) in b.iter().enumerate() {
        let p = format!("encoder.down_blocks.{i}");
        for j in 0..spec.layers_per_block {
            s.resnet(
                &format!("{p}.resnets.{j}"),
                if j == 0 { cin } else { cout },
                cout,
            );
        }
        if i + 1 < b.len() {
            s.layer(&format!("{p}.downsamplers.0.conv"), cout, cout, 3, 1.0);
        }
        cin = cout;
    }
    s.mid_block("encoder.mid_block", last);
    s.norm("encoder.conv_norm_out", last);
    s.layer("encoder.conv_out", 2 * latent, last, 3, 1.0);

    s.layer("decoder.conv_in", last, latent, 3, 1.0);
    s.mid_block("decoder.mid_block", last);
    let mut cin = last;
    for (i, &cout) in b.iter().rev().enumerate() {
        let p = format!("decoder.up_blocks.{i}");
        for j in 0..=spec.layers_per_block {
            s.resnet(
                &format!("{p}.resnets.{j}"),
                if j == 0 { cin } else { cout },
                cout,
            );
        }
        if i + 1 < b.len() {
            s.layer(&format!("{p}.upsamplers.0.conv"), cout, cout, 3, 1.0);
        }
        cin = cout;
    }
    s.norm("decoder.conv_norm_out", first);
    s.layer("decoder.conv_out", 3, first, 3, spec.output_gain);

    if spec.use_quant_conv {
        s.layer("quant_conv", 2 * latent, 2 * latent, 1, 1.0);
    }
    if spec.use_post_quant_conv {
        s.layer("post_quant_conv", latent, latent, 1, 1.0);
    }
    s.0
}

/// `config.json` as diffusers' `save_pretrained` writes it (keys sorted).
fn config_json(spec: &TinyVaeSpec) -> Value {
    let levels = spec.block_out_channels.len();
    json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.42.1",
        "act_fn": "silu",
        "block_out_channels": spec.block_out_channels,
        "down_block_types": vec!["DownEncoderBlock2D"; levels],
        "force_upcast": true,
        "in_channels": spec.in_channels,
        "latent_channels": spec.latent_channels,
        "latents_mean": null,
        "latents_std": null,
        "layers_per_block": spec.layers_per_block,
        "mid_block_add_attention": true,
        "norm_num_groups": spec.norm_num_groups,
        "out_channels": 3,
        "sample_size": spec.sample_size,
        "scaling_factor": spec.scaling_factor,
        "shift_factor": spec.shift_factor,
        "up_block_types": vec!["UpDecoderBlock2D"; levels],
        "use_post_quant_conv": spec.use_post_quant_conv,
        "use_quant_conv": spec.use_quant_conv,
    })
}

/// Writes `diffusion_pytorch_model.safetensors` (f32, `{"format": "pt"}` metadata).
fn write_weights(path: &Path, spec: &TinyVaeSpec, seed: u64) -> Result<(), TinyError> {
    let specs = tensor_specs(spec);
    let data: Vec<Vec<u8>> = specs
        .iter()
        .map(|t| {
            let n = t.shape.iter().product::<usize>();
            match t.init {
                Init::Normal(std) => normal_bytes(tensor_seed(seed, &t.name), n, std),
                Init::Const(v) => v.to_le_bytes().repeat(n),
            }
        })
        .collect();
    let safetensors_err = |source| TinyError::Safetensors {
        path: path.to_path_buf(),
        source,
    };
    let mut views = Vec::with_capacity(specs.len());
    for (t, bytes) in specs.iter().zip(&data) {
        let view = TensorView::new(Dtype::F32, t.shape.clone(), bytes).map_err(safetensors_err)?;
        views.push((t.name.clone(), view));
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(safetensors_err)
}

/// Writes a seeded random-weight AutoencoderKL into `dir` (created if missing): `config.json`
/// and `diffusion_pytorch_model.safetensors`, returned in that order. The weights cover encoder
/// and decoder, so both diffusers' `from_pretrained` and our loader accept the folder.
///
/// The same `(spec, seed)` always gives byte-identical files; another seed gives other weights.
pub fn write_tiny_vae(
    dir: &Path,
    spec: &TinyVaeSpec,
    seed: u64,
) -> Result<Vec<PathBuf>, TinyError> {
    spec.validate()?;
    std::fs::create_dir_all(dir).map_err(|source| TinyError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let config = write_json(&dir.join("config.json"), &config_json(spec))?;
    let weights = dir.join(WEIGHTS_FILE);
    write_weights(&weights, spec, seed)?;
    Ok(vec![config, weights])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_spec_shape() {
        let spec = TinyVaeSpec::tiny();
        assert_eq!(spec.downscale_factor(), 4);
        // Same count as diffusers' AutoencoderKL for this config (242_235, printed by torch).
        assert_eq!(spec.num_parameters(), 242_235);
        let names: Vec<String> = tensor_specs(&spec).into_iter().map(|t| t.name).collect();
        let unique: std::collections::BTreeSet<&String> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "duplicate tensor names");
        assert_eq!(names.len(), 148);
    }

    #[test]
    fn invalid_specs_are_rejected() {
        let cases: [fn(&mut TinyVaeSpec); 5] = [
            |s| s.block_out_channels.clear(),
            |s| s.norm_num_groups = 5,
            |s| s.latent_channels = 0,
            |s| s.scaling_factor = 0.0,
            |s| s.shift_factor = Some(f64::NAN),
        ];
        for change in cases {
            let mut s = TinyVaeSpec::tiny();
            change(&mut s);
            assert!(
                matches!(s.validate(), Err(TinyError::InvalidSpec(_))),
                "{s:?}"
            );
        }
    }
}
