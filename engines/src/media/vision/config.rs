//! The two JSON files of a LLaVA-layout checkpoint the vision encoder reads: `config.json`
//! (`LlavaConfig`: the vision tower, the projector and which hidden states feed it) and
//! `preprocessor_config.json` (`CLIPImageProcessor` / `SiglipImageProcessor`).
//!
//! Fields Transformers gives a default are optional here with the same default (per tower kind
//! where the classes differ); the structural sizes of the tower are required. Every error names
//! the file and the field.

use super::json::{read_json, Json};
use super::VisionError;
use serde_json::Value;
use std::path::Path;

/// Which vision tower the checkpoint holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TowerKind {
    /// `CLIPVisionModel`: class token, `pre_layrnorm`, bias-free patch conv.
    Clip,
    /// `SiglipVisionModel`: no class token, no pre-norm, patch conv with bias.
    Siglip,
}

/// An activation function named by a Transformers config (`ACT2FN` keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// `gelu`: exact (erf) GELU.
    Gelu,
    /// `gelu_pytorch_tanh`, `gelu_new`, `gelu_fast`: tanh approximation.
    GeluTanh,
    /// `quick_gelu`: `x · σ(1.702 x)`.
    QuickGelu,
    /// `relu`.
    Relu,
    /// `silu` / `swish`.
    Silu,
}

impl Act {
    pub(super) fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "gelu" => Act::Gelu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Act::GeluTanh,
            "quick_gelu" => Act::QuickGelu,
            "relu" => Act::Relu,
            "silu" | "swish" => Act::Silu,
            _ => return None,
        })
    }
}

/// The vision tower's shape (`vision_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct TowerConfig {
    pub kind: TowerKind,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: Act,
}

impl TowerConfig {
    /// Patches per side of the (square) input image.
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Tokens the tower writes per image (patches, plus the class token for CLIP).
    pub fn num_tokens(&self) -> usize {
        let patches = self.patches_per_side().pow(2);
        match self.kind {
            TowerKind::Clip => patches + 1,
            TowerKind::Siglip => patches,
        }
    }
}

/// Everything `config.json` says about the encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub tower: TowerConfig,
    /// `text_config.hidden_size`: the projector's output width. `None` when the config leaves it
    /// to the text model's default; the width is then read off the projector's weights.
    pub text_hidden_size: Option<usize>,
    pub projector_act: Act,
    pub projector_bias: bool,
    /// Indices into the tower's hidden-state list (0 = embeddings output, `k` = after layer `k`),
    /// already resolved from `vision_feature_layer` (negative counts from the end); several are
    /// concatenated along the width.
    pub feature_layers: Vec<usize>,
    /// `vision_feature_select_strategy == "default"`: drop each selected state's first token.
    pub drop_first_token: bool,
}

impl VisionConfig {
    /// Rows per image after selection.
    pub fn rows(&self) -> usize {
        self.tower.num_tokens() - usize::from(self.drop_first_token)
    }

    /// Layers that must run (the deepest selected hidden state).
    pub fn layers_needed(&self) -> usize {
        self.feature_layers.iter().copied().max().unwrap_or(0)
    }

    /// Reads and validates `path` (a LLaVA `config.json`).
    pub fn from_file(path: &Path) -> Result<Self, VisionError> {
        let root = read_json(path)?;
        let j = Json { path, prefix: "" };
        let obj = j.object(&root, "")?;
        let model_type = j.opt_str(obj, "model_type")?;
        if model_type.as_deref() != Some("llava") {
            return Err(j.bad(
                "model_type",
                format!("must be \"llava\", not {model_type:?}"),
            ));
        }
        let vobj = j.object(j.required(obj, "vision_config")?, "vision_config")?;
        let vj = Json {
            path,
            prefix: "vision_config.",
        };
        let kind = match vj.opt_str(vobj, "model_type")?.as_deref() {
            None | Some("clip_vision_model") => TowerKind::Clip,
            Some("siglip_vision_model") => TowerKind::Siglip,
            Some(other) => {
                return Err(vj.bad(
                    "model_type",
                    format!(
                        "{other:?} is not supported (clip_vision_model or siglip_vision_model)"
                    ),
                ))
            }
        };
        let (eps_default, act_default) = match kind {
            TowerKind::Clip => (1e-5, Act::QuickGelu),
            TowerKind::Siglip => (1e-6, Act::GeluTanh),
        };
        let tower = TowerConfig {
            kind,
            hidden_size: vj.usize(vobj, "hidden_size")?,
            intermediate_size: vj.usize(vobj, "intermediate_size")?,
            num_hidden_layers: vj.usize(vobj, "num_hidden_layers")?,
            num_attention_heads: vj.usize(vobj, "num_attention_heads")?,
            image_size: vj.usize(vobj, "image_size")?,
            patch_size: vj.usize(vobj, "patch_size")?,
            num_channels: vj.opt_usize(vobj, "num_channels")?.unwrap_or(3),
            layer_norm_eps: vj.opt_f64(vobj, "layer_norm_eps")?.unwrap_or(eps_default),
            hidden_act: vj.opt_act(vobj, "hidden_act")?.unwrap_or(act_default),
        };
        vj.check_tower(&tower)?;

        let text_hidden_size = match obj.get("text_config") {
            None | Some(Value::Null) => None,
            Some(t) => {
                let tj = Json {
                    path,
                    prefix: "text_config.",
                };
                tj.opt_usize(tj.object(t, "")?, "hidden_size")?
            }
        };
        if text_hidden_size == Some(0) {
            return Err(j.bad("text_config.hidden_size", "must be positive".into()));
        }
        let projector_act = j.opt_act(obj, "projector_hidden_act")?.unwrap_or(Act::Gelu);
        let projector_bias = match obj.get("multimodal_projector_bias") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(v) => return Err(j.bad("multimodal_projector_bias", format!("{v} is not a bool"))),
        };
        let n_states = tower.num_hidden_layers + 1;
        let resolve = |v: &Value| -> Result<usize, VisionError> {
            let i = v
                .as_i64()
                .ok_or_else(|| j.bad("vision_feature_layer", format!("{v} is not an integer")))?;
            let idx = if i < 0 { n_states as i64 + i } else { i };
            if idx < 0 || idx >= n_states as i64 {
                return Err(j.bad(
                    "vision_feature_layer",
                    format!("{i} is outside the {n_states} hidden states of the tower"),
                ));
            }
            Ok(idx as usize)
        };
        let feature_layers = match obj.get("vision_feature_layer") {
            None | Some(Value::Null) => vec![resolve(&Value::from(-2))?],
            Some(Value::Array(a)) if !a.is_empty() => {
                a.iter().map(resolve).collect::<Result<Vec<_>, _>>()?
            }
            Some(v @ Value::Number(_)) => vec![resolve(v)?],
            Some(v) => {
                return Err(j.bad(
                    "vision_feature_layer",
                    format!("{v} is not an integer or a non-empty list of integers"),
                ))
            }
        };
        let drop_first_token = match j.opt_str(obj, "vision_feature_select_strategy")?.as_deref() {
            None | Some("default") => true,
            Some("full") => false,
            Some(other) => {
                return Err(j.bad(
                    "vision_feature_select_strategy",
                    format!("{other:?} is not \"default\" or \"full\""),
                ))
            }
        };
        if drop_first_token && tower.num_tokens() < 2 {
            return Err(j.bad(
                "vision_feature_select_strategy",
                "\"default\" drops the first token, which leaves no rows".into(),
            ));
        }
        Ok(Self {
            tower,
            text_hidden_size,
            projector_act,
            projector_bias,
            feature_layers,
            drop_first_token,
        })
    }
}

/// How the processor resizes (`size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTo {
    /// `{"shortest_edge": n}`: the short side becomes `n`, the long side keeps the aspect ratio.
    ShortestEdge(usize),
    /// `{"height", "width"}`: exactly this size.
    Exact { height: usize, width: usize },
}

/// PIL's resampling filters (`resample`), by PIL's numeric code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    /// 1.
    Lanczos,
    /// 2.
    Bilinear,
    /// 3.
    Bicubic,
    /// 4.
    Box,
    /// 5.
    Hamming,
}

/// `preprocessor_config.json`, with the image processor class's defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessConfig {
    /// `None` when `do_resize` is false.
    pub resize: Option<ResizeTo>,
    pub resample: Resample,
    /// `(height, width)`; `None` when `do_center_crop` is false.
    pub crop: Option<(usize, usize)>,
    /// `None` when `do_rescale` is false.
    pub rescale: Option<f64>,
    /// Per-channel `(mean, std)`; `None` when `do_normalize` is false.
    pub normalize: Option<([f32; 3], [f32; 3])>,
}

const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

impl PreprocessConfig {
    /// The `(height, width)` every image comes out at, if it is fixed.
    pub fn output_size(&self) -> Option<(usize, usize)> {
        match (self.crop, self.resize) {
            (Some(c), _) => Some(c),
            (None, Some(ResizeTo::Exact { height, width })) => Some((height, width)),
            _ => None,
        }
    }

    /// Reads `path`, defaulting fields as the processor class of `kind` does.
    pub fn from_file(path: &Path, kind: TowerKind) -> Result<Self, VisionError> {
        let root = read_json(path)?;
        let j = Json { path, prefix: "" };
        let obj = j.object(&root, "")?;
        let kind = match j.opt_str(obj, "image_processor_type")?.as_deref() {
            Some(t) if t.starts_with("Siglip") => TowerKind::Siglip,
            Some(t) if t.starts_with("CLIP") => TowerKind::Clip,
            _ => kind,
        };
        let flag = |name: &str, default: bool| -> Result<bool, VisionError> {
            match obj.get(name) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Bool(b)) => Ok(*b),
                Some(v) => Err(j.bad(name, format!("{v} is not a bool"))),
            }
        };
        let is_clip = kind == TowerKind::Clip;
        let resize = if flag("do_resize", true)? {
            Some(match obj.get("size") {
                None | Some(Value::Null) if is_clip => ResizeTo::ShortestEdge(224),
                None | Some(Value::Null) => ResizeTo::Exact {
                    height: 224,
                    width: 224,
                },
                Some(Value::Number(_)) => {
                    let n = j.usize(obj, "size")?;
                    if is_clip {
                        ResizeTo::ShortestEdge(n)
                    } else {
                        ResizeTo::Exact {
                            height: n,
                            width: n,
                        }
                    }
                }
                Some(v) => {
                    let sj = Json {
                        path,
                        prefix: "size.",
                    };
                    let s = sj.object(v, "")?;
                    if s.contains_key("longest_edge") || s.contains_key("max_height") {
                        return Err(j.bad(
                            "size",
                            "only {\"shortest_edge\"} or {\"height\", \"width\"} are supported"
                                .into(),
                        ));
                    }
                    match sj.opt_usize(s, "shortest_edge")? {
                        Some(n) => ResizeTo::ShortestEdge(n),
                        None => ResizeTo::Exact {
                            height: sj.usize(s, "height")?,
                            width: sj.usize(s, "width")?,
                        },
                    }
                }
            })
        } else {
            None
        };
        let resample = match obj.get("resample") {
            None | Some(Value::Null) if is_clip => Resample::Bicubic,
            None | Some(Value::Null) => Resample::Bilinear,
            Some(v) => match v.as_u64() {
                Some(1) => Resample::Lanczos,
                Some(2) => Resample::Bilinear,
                Some(3) => Resample::Bicubic,
                Some(4) => Resample::Box,
                Some(5) => Resample::Hamming,
                _ => {
                    return Err(j.bad(
                        "resample",
                        format!("{v} is not a supported PIL filter (1 to 5; 0, nearest, is not)"),
                    ))
                }
            },
        };
        let crop = if flag("do_center_crop", is_clip)? {
            Some(match obj.get("crop_size") {
                None | Some(Value::Null) => (224, 224),
                Some(Value::Number(_)) => {
                    let n = j.usize(obj, "crop_size")?;
                    (n, n)
                }
                Some(v) => {
                    let cj = Json {
                        path,
                        prefix: "crop_size.",
                    };
                    let c = cj.object(v, "")?;
                    (cj.usize(c, "height")?, cj.usize(c, "width")?)
                }
            })
        } else {
            None
        };
        let rescale = if flag("do_rescale", true)? {
            Some(j.opt_f64(obj, "rescale_factor")?.unwrap_or(1.0 / 255.0))
        } else {
            None
        };
        let normalize = if flag("do_normalize", true)? {
            let (dm, ds) = if is_clip {
                (CLIP_MEAN, CLIP_STD)
            } else {
                ([0.5; 3], [0.5; 3])
            };
            let mean = j.opt_triple(obj, "image_mean")?.unwrap_or(dm);
            let std = j.opt_triple(obj, "image_std")?.unwrap_or(ds);
            if std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
                return Err(j.bad("image_std", format!("{std:?} must be finite and non-zero")));
            }
            Some((mean, std))
        } else {
            None
        };
        Ok(Self {
            resize,
            resample,
            crop,
            rescale,
            normalize,
        })
    }
}
