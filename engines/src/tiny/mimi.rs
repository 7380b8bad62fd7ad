//! Seeded random-weight Mimi codec checkpoints, in Transformers' `MimiModel` layout
//! (`config.json` + `model.safetensors`, like `kyutai/mimi`) or the original moshi single-file
//! layout (like `tokenizer-e351c8d8-checkpoint125.safetensors`).
//!
//! The tensor list mirrors Transformers' `MimiModel` state dict (encoder and decoder SEANets,
//! both transformers, down/upsampling, the split RVQ with every quantizer), so candle's
//! `mimi::Model::new` builds from the file and our decoder loads it. Both layouts hold the same
//! values for a seed: the moshi file is the Transformers one renamed back, with q/k/v fused and
//! q/k returned to moshi's interleaved RoPE order.

use super::llm::{normal_bytes, tensor_seed, write_json};
use super::TinyError;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Name of the weights file of [`TinyMimiLayout::Moshi`].
const MOSHI_FILE: &str = "tokenizer-tiny-checkpoint.safetensors";

/// Which tensor-name layout [`write_tiny_mimi`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyMimiLayout {
    /// `model.safetensors` with Transformers' `MimiModel` names.
    Transformers,
    /// The moshi names, in `tokenizer-tiny-checkpoint.safetensors`.
    Moshi,
}

/// Shape of a tiny Mimi (fields named as in Transformers' `MimiConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct TinyMimiSpec {
    pub sampling_rate: u32,
    pub hidden_size: usize,
    pub num_filters: usize,
    pub upsampling_ratios: Vec<usize>,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    /// Attention window in transformer positions (2 per frame).
    pub sliding_window: usize,
    pub codebook_size: usize,
    pub codebook_dim: usize,
    pub num_quantizers: usize,
    /// Value of every layer-scale entry (real checkpoints start from 0.01; the tiny default
    /// is larger so the transformer visibly shapes the output).
    pub layer_scale: f32,
    pub layout: TinyMimiLayout,
}

impl TinyMimiSpec {
    /// 24 kHz, ratios `[4, 4, 2]` (64 samples per frame, 375 Hz), width 16, 4 filters, 2
    /// layers of 2 heads, a window of 8 positions (4 frames), 8 codebooks of 64 × 8.
    pub fn tiny() -> Self {
        Self {
            sampling_rate: 24_000,
            hidden_size: 16,
            num_filters: 4,
            upsampling_ratios: vec![4, 4, 2],
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 32,
            sliding_window: 8,
            codebook_size: 64,
            codebook_dim: 8,
            num_quantizers: 8,
            layer_scale: 0.5,
            layout: TinyMimiLayout::Transformers,
        }
    }

    /// PCM samples per frame.
    pub fn samples_per_frame(&self) -> usize {
        self.upsampling_ratios.iter().product::<usize>() * 2
    }

    fn validate(&self) -> Result<(), TinyError> {
        let bad = |m: String| Err(TinyError::InvalidSpec(m));
        let dims = [
            ("hidden_size", self.hidden_size),
            ("num_filters", self.num_filters),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("sliding_window", self.sliding_window),
            ("codebook_size", self.codebook_size),
            ("codebook_dim", self.codebook_dim),
        ];
        if let Some((name, _)) = dims.iter().find(|(_, v)| *v == 0) {
            return bad(format!("{name} must be positive"));
        }
        if self.upsampling_ratios.is_empty() || self.upsampling_ratios.contains(&0) {
            return bad("upsampling_ratios must be non-empty and positive".into());
        }
        let hd = self.hidden_size / self.num_attention_heads;
        if self.hidden_size % self.num_attention_heads != 0 || hd % 2 != 0 {
            return bad("hidden_size must split into even head dims".into());
        }
        if self.num_filters % 2 != 0 || self.hidden_size % 2 != 0 {
            return bad("num_filters and hidden_size must be even (compress 2)".into());
        }
        if self.num_quantizers < 2 {
            return bad("num_quantizers must be at least 2".into());
        }
        if self.sampling_rate == 0 || self.sampling_rate as usize % self.samples_per_frame() != 0 {
            return bad("sampling_rate must be a multiple of samples per frame".into());
        }
        if !self.layer_scale.is_finite() {
            return bad("layer_scale must be finite".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum Init {
    Normal(f32),
    Const(f32),
}

/// One tensor: its Transformers name, its moshi name (`None` for q/k/v, fused on write).
struct TensorSpec {
    name: String,
    moshi: Option<String>,
    shape: Vec<usize>,
    init: Init,
}

const KERNEL: usize = 7;
const LAST_KERNEL: usize = 3;
const RES_KERNEL: usize = 3;
const BIAS_STD: f32 = 0.02;

struct Specs(Vec<TensorSpec>);

impl Specs {
    /// A tensor named `{hf}.{h}` (Transformers) and `{moshi}.{m}` (moshi).
    fn add(
        &mut self,
        (hf, moshi): (&str, &str),
        (h, m): (&str, &str),
        shape: Vec<usize>,
        init: Init,
    ) {
        self.0.push(TensorSpec {
            name: format!("{hf}.{h}"),
            moshi: Some(format!("{moshi}.{m}")),
            shape,
            init,
        });
    }

    /// A SEANet conv (`tr` = transposed, weight `[cin, cout, k]`) at `{side}.layers.{idx}{sub}`
    /// (moshi: `{side}.model.{idx}{sub}`).
    #[allow(clippy::too_many_arguments)]
    fn conv(
        &mut self,
        side: &str,
        idx: usize,
        sub: &str,
        cin: usize,
        cout: usize,
        k: usize,
        tr: bool,
    ) {
        let (shape, fan_in, inner) = if tr {
            (vec![cin, cout, k], cin * 2, "convtr.convtr")
        } else {
            (vec![cout, cin, k], cin * k, "conv.conv")
        };
        let hf = format!("{side}.layers.{idx}{sub}.conv");
        let mo = format!("{side}.model.{idx}{sub}.{inner}");
        let std = 1.0 / (fan_in as f32).sqrt();
        self.add((&hf, &mo), ("weight", "weight"), shape, Init::Normal(std));
        self.add(
            (&hf, &mo),
            ("bias", "bias"),
            vec![cout],
            Init::Normal(BIAS_STD),
        );
    }

    fn resnet(&mut self, side: &str, idx: usize, dim: usize) {
        self.conv(side, idx, ".block.1", dim, dim / 2, RES_KERNEL, false);
        self.conv(side, idx, ".block.3", dim / 2, dim, 1, false);
    }

    fn transformer(&mut self, which: &str, s: &TinyMimiSpec) {
        let (d, ff) = (s.hidden_size, s.intermediate_size);
        let lin = (1.0 / d as f32).sqrt();
        for l in 0..s.num_hidden_layers {
            let hf = format!("{which}_transformer.layers.{l}");
            let mo = format!("{which}_transformer.transformer.layers.{l}");
            for p in ["q_proj", "k_proj", "v_proj"] {
                self.0.push(TensorSpec {
                    name: format!("{hf}.self_attn.{p}.weight"),
                    moshi: None,
                    shape: vec![d, d],
                    init: Init::Normal(lin),
                });
            }
            let (w, w2) = (Init::Normal(lin), Init::Normal((1.0 / ff as f32).sqrt()));
            let (one, b, ls) = (
                Init::Const(1.0),
                Init::Normal(BIAS_STD),
                Init::Const(s.layer_scale),
            );
            let table = [
                (
                    "self_attn.o_proj.weight",
                    "self_attn.out_proj.weight",
                    vec![d, d],
                    w,
                ),
                ("mlp.fc1.weight", "linear1.weight", vec![ff, d], w),
                ("mlp.fc2.weight", "linear2.weight", vec![d, ff], w2),
                ("input_layernorm.weight", "norm1.weight", vec![d], one),
                ("input_layernorm.bias", "norm1.bias", vec![d], b),
                (
                    "post_attention_layernorm.weight",
                    "norm2.weight",
                    vec![d],
                    one,
                ),
                ("post_attention_layernorm.bias", "norm2.bias", vec![d], b),
                (
                    "self_attn_layer_scale.scale",
                    "layer_scale_1.scale",
                    vec![d],
                    ls,
                ),
                ("mlp_layer_scale.scale", "layer_scale_2.scale", vec![d], ls),
            ];
            for (h, m, shape, init) in table {
                self.add((&hf, &mo), (h, m), shape, init);
            }
        }
    }

    fn rvq(&mut self, hf: &str, moshi: &str, layers: usize, s: &TinyMimiSpec) {
        let (d, q, n) = (s.hidden_size, s.codebook_dim, s.codebook_size);
        let proj = |n: usize| Init::Normal((1.0 / n as f32).sqrt());
        self.add(
            (hf, moshi),
            ("input_proj.weight", "input_proj.weight"),
            vec![q, d, 1],
            proj(d),
        );
        self.add(
            (hf, moshi),
            ("output_proj.weight", "output_proj.weight"),
            vec![d, q, 1],
            proj(q),
        );
        for i in 0..layers {
            let h = format!("{hf}.layers.{i}.codebook");
            let m = format!("{moshi}.vq.layers.{i}._codebook");
            let table = [
                ("initialized", "_initialized", vec![1], Init::Const(1.0)),
                ("cluster_usage", "cluster_usage", vec![n], Init::Const(1.0)),
                ("embed_sum", "embedding_sum", vec![n, q], Init::Normal(1.0)),
            ];
            for (hn, mn, shape, init) in table {
                self.add((&h, &m), (hn, mn), shape, init);
            }
        }
    }
}

/// Every tensor of Transformers' `MimiModel` for `s`, in module order.
fn tensor_specs(s: &TinyMimiSpec) -> Vec<TensorSpec> {
    let mut t = Specs(Vec::new());
    let (nf, d) = (s.num_filters, s.hidden_size);
    // Encoder: conv, then per ratio (reversed) a resnet, ELU, strided conv; ELU, conv.
    t.conv("encoder", 0, "", 1, nf, KERNEL, false);
    let (mut idx, mut mult) = (1, 1);
    for &r in s.upsampling_ratios.iter().rev() {
        t.resnet("encoder", idx, mult * nf);
        t.conv(
            "encoder",
            idx + 2,
            "",
            mult * nf,
            mult * nf * 2,
            2 * r,
            false,
        );
        idx += 3;
        mult *= 2;
    }
    t.conv("encoder", idx + 1, "", mult * nf, d, LAST_KERNEL, false);
    t.transformer("encoder", s);
    let down = Init::Normal((1.0 / (4 * d) as f32).sqrt());
    t.add(
        ("downsample", "downsample"),
        ("conv.weight", "conv.conv.conv.weight"),
        vec![d, d, 4],
        down,
    );
    let up = Init::Normal(0.5f32.sqrt());
    t.add(
        ("upsample", "upsample"),
        ("conv.weight", "convtr.convtr.convtr.weight"),
        vec![d, 1, 4],
        up,
    );
    t.transformer("decoder", s);
    // Decoder: conv, then per ratio ELU, transposed conv, resnet; ELU, conv.
    t.conv("decoder", 0, "", d, mult * nf, KERNEL, false);
    let mut idx = 1;
    for &r in &s.upsampling_ratios {
        t.conv(
            "decoder",
            idx + 1,
            "",
            mult * nf,
            mult * nf / 2,
            2 * r,
            true,
        );
        t.resnet("decoder", idx + 2, mult * nf / 2);
        idx += 3;
        mult /= 2;
    }
    t.conv("decoder", idx + 1, "", nf, 1, LAST_KERNEL, false);
    let first = "quantizer.semantic_residual_vector_quantizer";
    t.rvq(first, "quantizer.rvq_first", 1, s);
    let rest = "quantizer.acoustic_residual_vector_quantizer";
    t.rvq(rest, "quantizer.rvq_rest", s.num_quantizers - 1, s);
    t.0
}

/// `config.json` as Transformers writes a `MimiConfig` (keys sorted).
fn config_json(s: &TinyMimiSpec) -> Value {
    json!({
        "architectures": ["MimiModel"],
        "attention_bias": false,
        "attention_dropout": 0.0,
        "audio_channels": 1,
        "codebook_dim": s.codebook_dim,
        "codebook_size": s.codebook_size,
        "compress": 2,
        "dilation_growth_rate": 2,
        "frame_rate": f64::from(s.sampling_rate) / s.samples_per_frame() as f64,
        "head_dim": s.hidden_size / s.num_attention_heads,
        "hidden_act": "gelu",
        "hidden_size": s.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": s.intermediate_size,
        "kernel_size": KERNEL,
        "last_kernel_size": LAST_KERNEL,
        "layer_scale_initial_scale": 0.01,
        "max_position_embeddings": 8000,
        "model_type": "mimi",
        "norm_eps": 1e-05,
        "num_attention_heads": s.num_attention_heads,
        "num_filters": s.num_filters,
        "num_hidden_layers": s.num_hidden_layers,
        "num_key_value_heads": s.num_attention_heads,
        "num_quantizers": s.num_quantizers,
        "num_residual_layers": 1,
        "num_semantic_quantizers": 1,
        "pad_mode": "constant",
        "residual_kernel_size": RES_KERNEL,
        "rope_theta": 10000.0,
        "sampling_rate": s.sampling_rate,
        "sliding_window": s.sliding_window,
        "torch_dtype": "float32",
        "transformers_version": "4.46.0",
        "trim_right_ratio": 1.0,
        "upsample_groups": s.hidden_size,
        "upsampling_ratios": s.upsampling_ratios,
        "use_cache": false,
        "use_causal_conv": true,
        "use_conv_shortcut": false,
        "vector_quantization_hidden_dimension": s.codebook_dim,
    })
}

/// Rows of one q/k weight (`[heads·hd, cols]`, f32 LE bytes) from the rotate-half order back to
/// moshi's interleaved pairs: `moshi[h·hd + 2i + j] = hf[h·hd + j·hd/2 + i]`.
fn unpermute_rope(bytes: &[u8], rows: usize, cols: usize, heads: usize) -> Vec<u8> {
    let hd = rows / heads;
    let row = cols * 4;
    let mut out = Vec::with_capacity(bytes.len());
    for h in 0..heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let src = h * hd + j * (hd / 2) + i;
                out.extend_from_slice(&bytes[src * row..(src + 1) * row]);
            }
        }
    }
    out
}

/// The (name, shape, bytes) list of the file for `layout`.
fn tensors(s: &TinyMimiSpec, seed: u64) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    let specs = tensor_specs(s);
    let data: HashMap<&str, Vec<u8>> = specs
        .iter()
        .map(|t| {
            let n = t.shape.iter().product::<usize>();
            let bytes = match t.init {
                Init::Normal(std) => normal_bytes(tensor_seed(seed, &t.name), n, std),
                Init::Const(v) => v.to_le_bytes().repeat(n),
            };
            (t.name.as_str(), bytes)
        })
        .collect();
    let mut out = Vec::with_capacity(specs.len());
    for t in &specs {
        match (s.layout, &t.moshi) {
            (TinyMimiLayout::Transformers, _) => {
                out.push((
                    t.name.clone(),
                    t.shape.clone(),
                    data[t.name.as_str()].clone(),
                ));
            }
            (TinyMimiLayout::Moshi, Some(m)) => {
                out.push((m.clone(), t.shape.clone(), data[t.name.as_str()].clone()));
            }
            (TinyMimiLayout::Moshi, None) => {
                // Fuse at q; skip k and v.
                let Some(stem) = t.name.strip_suffix("q_proj.weight") else {
                    continue;
                };
                let d = s.hidden_size;
                let heads = s.num_attention_heads;
                let get = |p: &str| &data[format!("{stem}{p}_proj.weight").as_str()];
                let mut fused = unpermute_rope(get("q"), d, d, heads);
                fused.extend(unpermute_rope(get("k"), d, d, heads));
                fused.extend_from_slice(get("v"));
                let mo = stem.replacen("_transformer.", "_transformer.transformer.", 1);
                out.push((format!("{mo}in_proj_weight"), vec![3 * d, d], fused));
            }
        }
    }
    out
}

fn write_weights(path: &Path, s: &TinyMimiSpec, seed: u64) -> Result<(), TinyError> {
    let list = tensors(s, seed);
    let err = |source| TinyError::Safetensors {
        path: path.to_path_buf(),
        source,
    };
    let mut views = Vec::with_capacity(list.len());
    for (name, shape, bytes) in &list {
        views.push((
            name.clone(),
            TensorView::new(Dtype::F32, shape.clone(), bytes).map_err(err)?,
        ));
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(err)
}

/// Writes a seeded random-weight Mimi into `dir` (created if missing): `config.json` and the
/// weights (`model.safetensors`, or `tokenizer-tiny-checkpoint.safetensors` for the moshi
/// layout), returned in that order. Same `(spec, seed)` ⇒ byte-identical files; both layouts
/// hold the same network for a seed.
pub fn write_tiny_mimi(
    dir: &Path,
    spec: &TinyMimiSpec,
    seed: u64,
) -> Result<Vec<PathBuf>, TinyError> {
    spec.validate()?;
    std::fs::create_dir_all(dir).map_err(|source| TinyError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let config = write_json(&dir.join("config.json"), &config_json(spec))?;
    let weights = dir.join(match spec.layout {
        TinyMimiLayout::Transformers => "model.safetensors",
        TinyMimiLayout::Moshi => MOSHI_FILE,
    });
    write_weights(&weights, spec, seed)?;
    Ok(vec![config, weights])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_layouts_agree() {
        let s = TinyMimiSpec::tiny();
        let names: Vec<String> = tensor_specs(&s).into_iter().map(|t| t.name).collect();
        let unique: std::collections::BTreeSet<&String> = names.iter().collect();
        assert_eq!(unique.len(), names.len());
        let moshi = TinyMimiSpec {
            layout: TinyMimiLayout::Moshi,
            ..s.clone()
        };
        for (name, _, _) in tensors(&moshi, 0) {
            let hf = crate::audio::mimi::moshi_to_transformers_name(&name);
            assert!(
                hf.ends_with("in_proj_weight") || unique.contains(&hf),
                "{name} → {hf}"
            );
        }
    }

    #[test]
    fn invalid_specs_are_rejected() {
        let cases: [fn(&mut TinyMimiSpec); 4] = [
            |s| s.upsampling_ratios.clear(),
            |s| s.num_attention_heads = 3,
            |s| s.num_quantizers = 1,
            |s| s.sampling_rate = 1000,
        ];
        for change in cases {
            let mut s = TinyMimiSpec::tiny();
            change(&mut s);
            assert!(
                matches!(s.validate(), Err(TinyError::InvalidSpec(_))),
                "{s:?}"
            );
        }
    }
}
