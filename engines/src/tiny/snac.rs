//! Seeded random-weight SNAC checkpoints in the Hugging Face layout (`hubertsiuzdak/snac_*`):
//! `config.json` and `model.safetensors` holding the Python `SNAC` module's state dict.
//!
//! Every conv is weight-normalised and saved as `torch.nn.utils.parametrizations.weight_norm`
//! saves it (`parametrizations.weight.original0` = g, `original1` = v), which `snac` 1.2's
//! `load_state_dict` and candle-transformers' `snac::Model` both read. Encoder tensors are
//! included (they are few at tiny sizes) so both load the folder without missing keys.

use super::llm::{normal_bytes, tensor_seed, write_json};
use super::TinyError;
use crate::audio::snac::SnacConfig;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The weights file name.
const WEIGHTS_FILE: &str = "model.safetensors";

/// Shape of a tiny SNAC model (no local attention: `attn_window_size` is always `null`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TinySnacSpec {
    /// Written as `sampling_rate`.
    pub sampling_rate: usize,
    /// Encoder base width; the latent width is `encoder_dim × 2^len(encoder_rates)`.
    pub encoder_dim: usize,
    /// Encoder downsampling rates; their product must equal that of `decoder_rates`.
    pub encoder_rates: Vec<usize>,
    /// Decoder width after its input conv, halved by each block.
    pub decoder_dim: usize,
    /// Decoder upsampling rates.
    pub decoder_rates: Vec<usize>,
    /// Entries per codebook.
    pub codebook_size: usize,
    /// Width of a codebook entry.
    pub codebook_dim: usize,
    /// Latent steps per code of each level.
    pub vq_strides: Vec<usize>,
    /// Noise blocks in the decoder.
    pub noise: bool,
    /// Depthwise convs.
    pub depthwise: bool,
}

impl TinySnacSpec {
    /// The 24 kHz model's structure at toy width: encoder_dim 8 (latent 64), decoder_dim 32,
    /// rates `[4, 4, 2]` (hop 32, 128 samples per frame), 64-entry codebooks of width 4,
    /// strides `[4, 2, 1]`, noise and depthwise on; 41,422 parameters.
    pub fn tiny() -> Self {
        Self {
            sampling_rate: 24000,
            encoder_dim: 8,
            encoder_rates: vec![2, 4, 4],
            decoder_dim: 32,
            decoder_rates: vec![4, 4, 2],
            codebook_size: 64,
            codebook_dim: 4,
            vq_strides: vec![4, 2, 1],
            noise: true,
            depthwise: true,
        }
    }

    /// The config the written `config.json` holds.
    pub fn config(&self) -> SnacConfig {
        SnacConfig {
            sampling_rate: self.sampling_rate,
            encoder_dim: self.encoder_dim,
            encoder_rates: self.encoder_rates.clone(),
            latent_dim: None,
            decoder_dim: self.decoder_dim,
            decoder_rates: self.decoder_rates.clone(),
            attn_window_size: None,
            codebook_size: self.codebook_size,
            codebook_dim: self.codebook_dim,
            vq_strides: self.vq_strides.clone(),
            noise: self.noise,
            depthwise: self.depthwise,
        }
    }

    /// Number of parameters (encoder, quantizer and decoder).
    pub fn num_parameters(&self) -> usize {
        tensor_specs(self)
            .iter()
            .map(|t| t.shape.iter().product::<usize>())
            .sum()
    }

    fn validate(&self) -> Result<(), TinyError> {
        let bad = |m: String| Err(TinyError::InvalidSpec(m));
        if self.encoder_dim == 0 || self.encoder_rates.is_empty() || self.encoder_rates.len() > 8 {
            return bad("encoder_dim must be positive, with 1 to 8 encoder_rates".into());
        }
        if self.encoder_rates.iter().any(|&r| r == 0 || r > 64) {
            return bad(format!(
                "encoder_rates must be in 1..=64: {:?}",
                self.encoder_rates
            ));
        }
        self.config().validate().map_err(TinyError::InvalidSpec)?;
        let (enc, dec) = (
            self.encoder_rates.iter().product::<usize>(),
            self.decoder_rates.iter().product::<usize>(),
        );
        if enc != dec {
            return bad(format!(
                "encoder_rates multiply to {enc} but decoder_rates to {dec}"
            ));
        }
        Ok(())
    }
}

/// How a tensor is initialised.
#[derive(Debug, Clone, Copy)]
enum Init {
    /// Seeded normal(mean, std).
    Normal(f32, f32),
}

/// One tensor of the checkpoint.
#[derive(Debug)]
struct TensorSpec {
    name: String,
    shape: Vec<usize>,
    init: Init,
}

/// Collects tensors in module order.
struct Specs(Vec<TensorSpec>);

/// Gain of the decoder's output conv: decoded audio then has an rms of about 0.3, clear of
/// the final tanh's saturation.
const OUTPUT_GAIN: f32 = 0.25;

/// Biases: small, so they matter without dominating.
const BIAS_STD: f32 = 0.02;

impl Specs {
    fn push(&mut self, name: String, shape: Vec<usize>, init: Init) {
        self.0.push(TensorSpec { name, shape, init });
    }

    /// A weight-normalised conv with weight `shape` (`(out, in/groups, k)`, or
    /// `(in, out, k)` for a transposed conv): `g` near `gain` (each filter's norm, so an
    /// output keeps about its input's scale), unit-normal `v`.
    fn wn_conv(&mut self, p: &str, shape: [usize; 3], gain: f32, bias: Option<usize>) {
        if let Some(c) = bias {
            self.push(format!("{p}.bias"), vec![c], Init::Normal(0.0, BIAS_STD));
        }
        self.push(
            format!("{p}.parametrizations.weight.original0"),
            vec![shape[0], 1, 1],
            Init::Normal(gain, 0.1 * gain),
        );
        self.push(
            format!("{p}.parametrizations.weight.original1"),
            shape.to_vec(),
            Init::Normal(0.0, 1.0),
        );
    }

    fn snake(&mut self, p: &str, c: usize) {
        self.push(format!("{p}.alpha"), vec![1, c, 1], Init::Normal(1.0, 0.1));
    }

    fn residual_unit(&mut self, p: &str, dim: usize, depthwise: bool) {
        let per_group = if depthwise { 1 } else { dim };
        self.snake(&format!("{p}.block.0"), dim);
        self.wn_conv(&format!("{p}.block.1"), [dim, per_group, 7], 0.7, Some(dim));
        self.snake(&format!("{p}.block.2"), dim);
        self.wn_conv(&format!("{p}.block.3"), [dim, dim, 1], 0.3, Some(dim));
    }
}

/// Every tensor of the Python `SNAC` module for `spec`, in module order.
fn tensor_specs(spec: &TinySnacSpec) -> Vec<TensorSpec> {
    let mut s = Specs(Vec::new());
    let dw = spec.depthwise;

    // Encoder.
    let mut d = spec.encoder_dim;
    s.wn_conv("encoder.block.0", [d, 1, 7], 1.0, Some(d));
    for (i, &stride) in spec.encoder_rates.iter().enumerate() {
        let p = format!("encoder.block.{}.block", i + 1);
        for j in 0..3 {
            s.residual_unit(&format!("{p}.{j}"), d, dw);
        }
        s.snake(&format!("{p}.3"), d);
        s.wn_conv(&format!("{p}.4"), [2 * d, d, 2 * stride], 1.0, Some(2 * d));
        d *= 2;
    }
    let p = format!("encoder.block.{}", spec.encoder_rates.len() + 1);
    s.wn_conv(&p, [d, if dw { 1 } else { d }, 7], 1.0, Some(d));
    let latent = d;

    // Quantizer.
    let cb = spec.codebook_dim;
    for i in 0..spec.vq_strides.len() {
        let p = format!("quantizer.quantizers.{i}");
        s.wn_conv(&format!("{p}.in_proj"), [cb, latent, 1], 1.0, Some(cb));
        s.wn_conv(&format!("{p}.out_proj"), [latent, cb, 1], 1.0, Some(latent));
        s.push(
            format!("{p}.codebook.weight"),
            vec![spec.codebook_size, cb],
            Init::Normal(0.0, 1.0),
        );
    }

    // Decoder.
    let mut c = spec.decoder_dim;
    let mut idx = 0;
    if dw {
        s.wn_conv("decoder.model.0", [latent, 1, 7], 1.0, Some(latent));
        s.wn_conv("decoder.model.1", [c, latent, 1], 1.0, Some(c));
        idx += 2;
    } else {
        s.wn_conv("decoder.model.0", [c, latent, 7], 1.0, Some(c));
        idx += 1;
    }
    for &stride in &spec.decoder_rates {
        let p = format!("decoder.model.{idx}.block");
        let out = c / 2;
        s.snake(&format!("{p}.0"), c);
        s.wn_conv(&format!("{p}.1"), [c, out, 2 * stride], 1.0, Some(out));
        let mut j = 2;
        if spec.noise {
            s.wn_conv(&format!("{p}.2.linear"), [out, out, 1], 0.3, None);
            j += 1;
        }
        for k in 0..3 {
            s.residual_unit(&format!("{p}.{}", j + k), out, dw);
        }
        c = out;
        idx += 1;
    }
    s.snake(&format!("decoder.model.{idx}"), c);
    s.wn_conv(
        &format!("decoder.model.{}", idx + 1),
        [1, c, 7],
        OUTPUT_GAIN,
        Some(1),
    );
    s.0
}

/// `config.json` as the published checkpoints have it (keys sorted).
fn config_json(spec: &TinySnacSpec) -> Value {
    json!({
        "attn_window_size": null,
        "codebook_dim": spec.codebook_dim,
        "codebook_size": spec.codebook_size,
        "decoder_dim": spec.decoder_dim,
        "decoder_rates": spec.decoder_rates,
        "depthwise": spec.depthwise,
        "encoder_dim": spec.encoder_dim,
        "encoder_rates": spec.encoder_rates,
        "noise": spec.noise,
        "sampling_rate": spec.sampling_rate,
        "vq_strides": spec.vq_strides,
    })
}

/// Writes `model.safetensors` (f32, `{"format": "pt"}` metadata).
fn write_weights(path: &Path, spec: &TinySnacSpec, seed: u64) -> Result<(), TinyError> {
    let specs = tensor_specs(spec);
    let data: Vec<Vec<u8>> = specs
        .iter()
        .map(|t| {
            let n = t.shape.iter().product::<usize>();
            let Init::Normal(mean, std) = t.init;
            let bytes = normal_bytes(tensor_seed(seed, &t.name), n, std);
            if mean == 0.0 {
                return bytes;
            }
            bytes
                .chunks_exact(4)
                .flat_map(|b| (f32::from_le_bytes([b[0], b[1], b[2], b[3]]) + mean).to_le_bytes())
                .collect()
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

/// Writes a seeded random-weight SNAC into `dir` (created if missing): `config.json` and
/// `model.safetensors`, returned in that order.
///
/// The same `(spec, seed)` always gives byte-identical files; another seed gives other weights.
pub fn write_tiny_snac(
    dir: &Path,
    spec: &TinySnacSpec,
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
    fn tiny_spec_is_valid_and_names_are_unique() {
        let spec = TinySnacSpec::tiny();
        spec.validate().unwrap();
        let names: Vec<String> = tensor_specs(&spec).into_iter().map(|t| t.name).collect();
        let unique: std::collections::BTreeSet<&String> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "duplicate tensor names");
        assert_eq!(spec.config().latent_dim(), 64);
        // The parameter count of the Python `SNAC(**config)` state dict, which loads this
        // checkpoint with `strict=True`.
        assert_eq!(spec.num_parameters(), 41_422);
    }

    #[test]
    fn invalid_specs_are_rejected() {
        let cases: [fn(&mut TinySnacSpec); 4] = [
            |s| s.encoder_rates = vec![2, 2],
            |s| s.decoder_dim = 20,
            |s| s.vq_strides.clear(),
            |s| s.codebook_size = 0,
        ];
        for change in cases {
            let mut s = TinySnacSpec::tiny();
            change(&mut s);
            assert!(
                matches!(s.validate(), Err(TinyError::InvalidSpec(_))),
                "{s:?}"
            );
        }
    }
}
