//! Seeded random-weight LLaVA vision encoders (a CLIP or SigLIP tower and the projector) in the
//! `LlavaForConditionalGeneration` layout: `config.json`, `preprocessor_config.json` and
//! `model.safetensors` holding `vision_tower.vision_model.*` and `multi_modal_projector.*` (no
//! LLM: that is another stage's checkpoint).

use super::llm::{normal_bytes, tensor_seed, write_json};
use super::TinyError;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

/// Which tower a tiny vision encoder has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyVisionTower {
    /// `clip_vision_model` with a class token, quick-GELU, `CLIPImageProcessor` (bicubic
    /// shortest-edge resize, center crop, OpenAI mean/std).
    Clip,
    /// `siglip_vision_model`, tanh GELU, `SiglipImageProcessor` (bilinear resize to the square,
    /// mean/std 0.5).
    Siglip,
}

/// Shape of a tiny vision encoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TinyVisionSpec {
    pub tower: TinyVisionTower,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// `text_config.hidden_size`: the width of the rows written.
    pub out_dim: usize,
    /// Written as `vision_feature_layer`.
    pub vision_feature_layer: i64,
    /// Written as `vision_feature_select_strategy` (`"default"` drops the class token).
    pub select_strategy: String,
}

impl TinyVisionSpec {
    /// A CLIP tower on 32×32 images in 8×8 patches (16 rows per image after dropping the class
    /// token), width 32, 2 layers of 4 heads, MLP 64, reading layer −2 (the first layer's
    /// output), projecting to `out_dim`.
    pub fn tiny(out_dim: usize) -> Self {
        Self {
            tower: TinyVisionTower::Clip,
            image_size: 32,
            patch_size: 8,
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            out_dim,
            vision_feature_layer: -2,
            select_strategy: "default".into(),
        }
    }

    /// Rows written per image.
    pub fn rows(&self) -> usize {
        let patches = (self.image_size / self.patch_size).pow(2);
        let tokens = patches + usize::from(self.tower == TinyVisionTower::Clip);
        tokens - usize::from(self.select_strategy == "default")
    }

    fn validate(&self) -> Result<(), TinyError> {
        let bad = |m: String| Err(TinyError::InvalidSpec(m));
        let sizes = [
            self.image_size,
            self.patch_size,
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            self.out_dim,
        ];
        if sizes.contains(&0) {
            return bad(format!("every size must be positive: {self:?}"));
        }
        if self.image_size % self.patch_size != 0 {
            return bad("patch_size must divide image_size".into());
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return bad("num_attention_heads must divide hidden_size".into());
        }
        let states = self.num_hidden_layers as i64 + 1;
        let idx = if self.vision_feature_layer < 0 {
            states + self.vision_feature_layer
        } else {
            self.vision_feature_layer
        };
        if !(0..states).contains(&idx) {
            return bad(format!(
                "vision_feature_layer {} is outside the {states} hidden states",
                self.vision_feature_layer
            ));
        }
        if !matches!(self.select_strategy.as_str(), "default" | "full") || self.rows() == 0 {
            return bad(format!(
                "select_strategy {:?} must be \"default\" or \"full\" and leave rows",
                self.select_strategy
            ));
        }
        Ok(())
    }
}

/// One tensor: name, shape, mean and std of its seeded normal values.
struct TensorSpec {
    name: String,
    shape: Vec<usize>,
    mean: f32,
    std: f32,
}

fn tensor_specs(spec: &TinyVisionSpec) -> Vec<TensorSpec> {
    let mut out = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, mean: f32, std: f32| {
        out.push(TensorSpec {
            name,
            shape,
            mean,
            std,
        })
    };
    let h = spec.hidden_size;
    let clip = spec.tower == TinyVisionTower::Clip;
    let patches = (spec.image_size / spec.patch_size).pow(2);
    let fan = |n: usize| 1.0 / (n as f32).sqrt();
    let t = "vision_tower.vision_model";
    let p = spec.patch_size;
    push(
        format!("{t}.embeddings.patch_embedding.weight"),
        vec![h, 3, p, p],
        0.0,
        fan(3 * p * p),
    );
    if clip {
        push(format!("{t}.embeddings.class_embedding"), vec![h], 0.0, 0.5);
        push(format!("{t}.pre_layrnorm.weight"), vec![h], 1.0, 0.1);
        push(format!("{t}.pre_layrnorm.bias"), vec![h], 0.0, 0.1);
    } else {
        push(
            format!("{t}.embeddings.patch_embedding.bias"),
            vec![h],
            0.0,
            0.1,
        );
    }
    push(
        format!("{t}.embeddings.position_embedding.weight"),
        vec![patches + usize::from(clip), h],
        0.0,
        0.5,
    );
    let m = spec.intermediate_size;
    for i in 0..spec.num_hidden_layers {
        let l = format!("{t}.encoder.layers.{i}");
        for n in ["layer_norm1", "layer_norm2"] {
            push(format!("{l}.{n}.weight"), vec![h], 1.0, 0.1);
            push(format!("{l}.{n}.bias"), vec![h], 0.0, 0.1);
        }
        for n in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            push(format!("{l}.self_attn.{n}.weight"), vec![h, h], 0.0, fan(h));
            push(format!("{l}.self_attn.{n}.bias"), vec![h], 0.0, 0.05);
        }
        push(format!("{l}.mlp.fc1.weight"), vec![m, h], 0.0, fan(h));
        push(format!("{l}.mlp.fc1.bias"), vec![m], 0.0, 0.05);
        push(format!("{l}.mlp.fc2.weight"), vec![h, m], 0.0, fan(m));
        push(format!("{l}.mlp.fc2.bias"), vec![h], 0.0, 0.05);
    }
    push(format!("{t}.post_layernorm.weight"), vec![h], 1.0, 0.1);
    push(format!("{t}.post_layernorm.bias"), vec![h], 0.0, 0.1);
    let o = spec.out_dim;
    push(
        "multi_modal_projector.linear_1.weight".into(),
        vec![o, h],
        0.0,
        fan(h),
    );
    push(
        "multi_modal_projector.linear_1.bias".into(),
        vec![o],
        0.0,
        0.05,
    );
    push(
        "multi_modal_projector.linear_2.weight".into(),
        vec![o, o],
        0.0,
        fan(o),
    );
    push(
        "multi_modal_projector.linear_2.bias".into(),
        vec![o],
        0.0,
        0.05,
    );
    out
}

fn config_json(spec: &TinyVisionSpec) -> Value {
    let (model_type, act, eps) = match spec.tower {
        TinyVisionTower::Clip => ("clip_vision_model", "quick_gelu", 1e-5),
        TinyVisionTower::Siglip => ("siglip_vision_model", "gelu_pytorch_tanh", 1e-6),
    };
    json!({
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "multimodal_projector_bias": true,
        "projector_hidden_act": "gelu",
        "text_config": { "hidden_size": spec.out_dim },
        "vision_config": {
            "hidden_act": act,
            "hidden_size": spec.hidden_size,
            "image_size": spec.image_size,
            "intermediate_size": spec.intermediate_size,
            "layer_norm_eps": eps,
            "model_type": model_type,
            "num_attention_heads": spec.num_attention_heads,
            "num_channels": 3,
            "num_hidden_layers": spec.num_hidden_layers,
            "patch_size": spec.patch_size,
        },
        "vision_feature_layer": spec.vision_feature_layer,
        "vision_feature_select_strategy": spec.select_strategy,
    })
}

fn preprocessor_json(spec: &TinyVisionSpec) -> Value {
    let s = spec.image_size;
    match spec.tower {
        TinyVisionTower::Clip => json!({
            "crop_size": { "height": s, "width": s },
            "do_center_crop": true,
            "do_convert_rgb": true,
            "do_normalize": true,
            "do_rescale": true,
            "do_resize": true,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_processor_type": "CLIPImageProcessor",
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "resample": 3,
            "rescale_factor": 1.0 / 255.0,
            "size": { "shortest_edge": s },
        }),
        TinyVisionTower::Siglip => json!({
            "do_normalize": true,
            "do_rescale": true,
            "do_resize": true,
            "image_mean": [0.5, 0.5, 0.5],
            "image_processor_type": "SiglipImageProcessor",
            "image_std": [0.5, 0.5, 0.5],
            "resample": 2,
            "rescale_factor": 1.0 / 255.0,
            "size": { "height": s, "width": s },
        }),
    }
}

fn write_weights(path: &Path, spec: &TinyVisionSpec, seed: u64) -> Result<(), TinyError> {
    let specs = tensor_specs(spec);
    let data: Vec<Vec<u8>> = specs
        .iter()
        .map(|t| {
            let n = t.shape.iter().product::<usize>();
            let bytes = normal_bytes(tensor_seed(seed, &t.name), n, t.std);
            if t.mean == 0.0 {
                return bytes;
            }
            bytes
                .chunks_exact(4)
                .flat_map(|b| (f32::from_le_bytes([b[0], b[1], b[2], b[3]]) + t.mean).to_le_bytes())
                .collect()
        })
        .collect();
    let err = |source| TinyError::Safetensors {
        path: path.to_path_buf(),
        source,
    };
    let mut views = Vec::with_capacity(specs.len());
    for (t, bytes) in specs.iter().zip(&data) {
        views.push((
            t.name.clone(),
            TensorView::new(Dtype::F32, t.shape.clone(), bytes).map_err(err)?,
        ));
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(err)
}

/// Writes a seeded random-weight LLaVA vision encoder into `dir` (created if missing):
/// `config.json`, `preprocessor_config.json` and `model.safetensors`, loadable by
/// `media::vision::VisionEncoder` and by Transformers (`LlavaForConditionalGeneration` with a
/// text model added).
///
/// The same `(spec, seed)` always gives byte-identical files; another seed gives other weights.
pub fn write_tiny_vision(dir: &Path, spec: &TinyVisionSpec, seed: u64) -> Result<(), TinyError> {
    spec.validate()?;
    std::fs::create_dir_all(dir).map_err(|source| TinyError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    write_json(&dir.join("config.json"), &config_json(spec))?;
    write_json(
        &dir.join("preprocessor_config.json"),
        &preprocessor_json(spec),
    )?;
    write_weights(&dir.join("model.safetensors"), spec, seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_spec_is_valid_and_rows_follow_the_strategy() {
        let mut s = TinyVisionSpec::tiny(24);
        s.validate().unwrap();
        assert_eq!(s.rows(), 16);
        s.select_strategy = "full".into();
        assert_eq!(s.rows(), 17);
        s.tower = TinyVisionTower::Siglip;
        assert_eq!(s.rows(), 16);
        s.vision_feature_layer = 3;
        assert!(matches!(s.validate(), Err(TinyError::InvalidSpec(_))));
        let mut s = TinyVisionSpec::tiny(24);
        s.patch_size = 5;
        assert!(matches!(s.validate(), Err(TinyError::InvalidSpec(_))));
    }
}
