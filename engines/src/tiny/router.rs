//! A tiny router checkpoint (see `crate::router` for the layout): a seeded 2-layer BERT
//! sentence encoder over the tiny byte-level BPE tokenizer, and a seeded MLP head scoring the
//! given experts.
//!
//! ```text
//! dir/router_config.json      {"model_type": "mot_router", "experts": [...], ...}
//! dir/encoder/config.json     BERT, hidden 32, 2 layers, 2 heads, intermediate 64
//! dir/encoder/model.safetensors
//! dir/encoder/tokenizer.json  the tiny BPE tokenizer (512 ids)
//! dir/head.safetensors        mlp.0 (32 -> 32), GELU, mlp.2 (32 -> experts)
//! ```
//!
//! The initialisation favours variety over realism: word embeddings are large next to the
//! position and token-type embeddings and the feed-forward outputs are scaled down (their GELU
//! mean would otherwise add the same direction to every token), so the mean-pooled vector
//! follows the words of the prompt; the head's output layer is wide enough that different
//! prompts pick different experts with visibly different (but not saturated) probabilities.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::json;

use super::bpe;
use super::llm::{normal_bytes, tensor_seed, write_json};
use super::{write_file, TinyError};
use crate::router::{ENCODER_DIR, HEAD_FILE, ROUTER_CONFIG_FILE, ROUTER_MODEL_TYPE};

/// Width of the tiny router's encoder.
pub const TINY_ROUTER_HIDDEN: usize = 32;
/// Width of the tiny router's MLP hidden layer.
pub const TINY_ROUTER_MLP_HIDDEN: usize = 32;
/// Tokens the tiny router reads at most.
pub const TINY_ROUTER_MAX_LENGTH: usize = 64;

const LAYERS: usize = 2;
const HEADS: usize = 2;
const INTERMEDIATE: usize = 64;
const MAX_POSITIONS: usize = 128;
const TYPE_VOCAB: usize = 2;
/// Scale of the feed-forward output projections (see the module docs).
const FFN_GAIN: f32 = 0.1;

/// How a tensor is filled.
enum Fill {
    Ones,
    Zeros,
    Normal(f32),
}

type TensorList = Vec<(String, Vec<usize>, Fill)>;

/// The BERT encoder's tensors, named as a `BertModel` checkpoint without a `bert.` prefix
/// (sentence-transformers' layout).
fn encoder_tensors(vocab: usize) -> TensorList {
    let (d, i) = (TINY_ROUTER_HIDDEN, INTERMEDIATE);
    let w = 1.0 / (d as f32).sqrt();
    let mut out: TensorList = vec![
        (
            "embeddings.word_embeddings.weight".into(),
            vec![vocab, d],
            Fill::Normal(1.0),
        ),
        (
            "embeddings.position_embeddings.weight".into(),
            vec![MAX_POSITIONS, d],
            Fill::Normal(0.02),
        ),
        (
            "embeddings.token_type_embeddings.weight".into(),
            vec![TYPE_VOCAB, d],
            Fill::Normal(0.02),
        ),
        ("embeddings.LayerNorm.weight".into(), vec![d], Fill::Ones),
        ("embeddings.LayerNorm.bias".into(), vec![d], Fill::Zeros),
    ];
    for l in 0..LAYERS {
        let p = format!("encoder.layer.{l}");
        for proj in ["query", "key", "value"] {
            out.push((
                format!("{p}.attention.self.{proj}.weight"),
                vec![d, d],
                Fill::Normal(w),
            ));
            out.push((
                format!("{p}.attention.self.{proj}.bias"),
                vec![d],
                Fill::Normal(0.02),
            ));
        }
        let dense =
            |name: &str, rows: usize, cols: usize, gain: f32| -> [(String, Vec<usize>, Fill); 2] {
                [
                    (
                        format!("{p}.{name}.weight"),
                        vec![rows, cols],
                        Fill::Normal(gain / (cols as f32).sqrt()),
                    ),
                    (format!("{p}.{name}.bias"), vec![rows], Fill::Normal(0.02)),
                ]
            };
        out.extend(dense("attention.output.dense", d, d, 1.0));
        out.push((
            format!("{p}.attention.output.LayerNorm.weight"),
            vec![d],
            Fill::Ones,
        ));
        out.push((
            format!("{p}.attention.output.LayerNorm.bias"),
            vec![d],
            Fill::Zeros,
        ));
        out.extend(dense("intermediate.dense", i, d, 1.0));
        out.extend(dense("output.dense", d, i, FFN_GAIN));
        out.push((format!("{p}.output.LayerNorm.weight"), vec![d], Fill::Ones));
        out.push((format!("{p}.output.LayerNorm.bias"), vec![d], Fill::Zeros));
    }
    out
}

/// The MLP head's tensors (`mlp.0` and `mlp.2`, as an `nn.Sequential(Linear, GELU, Linear)`).
fn head_tensors(experts: usize) -> TensorList {
    let (d, h) = (TINY_ROUTER_HIDDEN, TINY_ROUTER_MLP_HIDDEN);
    vec![
        (
            "mlp.0.weight".into(),
            vec![h, d],
            Fill::Normal(2.0 / (d as f32).sqrt()),
        ),
        ("mlp.0.bias".into(), vec![h], Fill::Zeros),
        (
            "mlp.2.weight".into(),
            vec![experts, h],
            Fill::Normal(2.0 / (h as f32).sqrt()),
        ),
        ("mlp.2.bias".into(), vec![experts], Fill::Zeros),
    ]
}

/// Writes `tensors` as f32 safetensors with `{"format": "pt"}` metadata; each normal tensor's
/// values come from `seed` and its `prefix`ed name.
fn write_tensors(
    path: &Path,
    tensors: &TensorList,
    prefix: &str,
    seed: u64,
) -> Result<(), TinyError> {
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(name, shape, fill)| {
            let n = shape.iter().product::<usize>();
            match fill {
                Fill::Ones => 1.0f32.to_le_bytes().repeat(n),
                Fill::Zeros => vec![0u8; n * 4],
                Fill::Normal(std) => {
                    normal_bytes(tensor_seed(seed, &format!("{prefix}{name}")), n, *std)
                }
            }
        })
        .collect();
    let st_err = |source| TinyError::Safetensors {
        path: path.to_path_buf(),
        source,
    };
    let mut views = Vec::with_capacity(tensors.len());
    for ((name, shape, _), bytes) in tensors.iter().zip(&data) {
        views.push((
            name.clone(),
            TensorView::new(Dtype::F32, shape.clone(), bytes).map_err(st_err)?,
        ));
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(st_err)
}

/// Writes a tiny router checkpoint scoring `experts` (their names, in score order) into `dir`
/// (created if missing); returns every written file. Same `seed` ⇒ byte-identical files.
pub fn write_tiny_router(
    dir: &Path,
    experts: &[&str],
    seed: u64,
) -> Result<Vec<PathBuf>, TinyError> {
    if experts.is_empty() {
        return Err(TinyError::InvalidSpec(
            "a router needs at least one expert".into(),
        ));
    }
    if let Some(dup) = experts
        .iter()
        .enumerate()
        .find_map(|(i, e)| experts[..i].contains(e).then_some(e))
    {
        return Err(TinyError::InvalidSpec(format!(
            "router expert `{dup}` is listed twice"
        )));
    }
    let tok = bpe::build_tiny_tokenizer()?;
    let vocab = tok.vocab_size();
    let encoder = dir.join(ENCODER_DIR);
    std::fs::create_dir_all(&encoder).map_err(|source| TinyError::Io {
        path: encoder.clone(),
        source,
    })?;
    let config = json!({
        "model_type": ROUTER_MODEL_TYPE,
        "experts": experts,
        "hidden_size": TINY_ROUTER_MLP_HIDDEN,
        "activation": "gelu",
        "max_length": TINY_ROUTER_MAX_LENGTH,
        "pooling": "mean",
    });
    let bert = json!({
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "classifier_dropout": null,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": TINY_ROUTER_HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": MAX_POSITIONS,
        "model_type": "bert",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "pad_token_id": tok.endoftext(),
        "position_embedding_type": "absolute",
        "torch_dtype": "float32",
        "transformers_version": "4.51.0",
        "type_vocab_size": TYPE_VOCAB,
        "use_cache": true,
        "vocab_size": vocab,
    });
    let mut files = vec![write_json(&dir.join(ROUTER_CONFIG_FILE), &config)?];
    files.push(write_json(&encoder.join("config.json"), &bert)?);
    let weights = encoder.join("model.safetensors");
    write_tensors(&weights, &encoder_tensors(vocab), "encoder.", seed)?;
    files.push(weights);
    let tokenizer = encoder.join("tokenizer.json");
    write_file(&tokenizer, bpe::tokenizer_json(&tok)?.as_bytes())?;
    files.push(tokenizer);
    let head = dir.join(HEAD_FILE);
    write_tensors(&head, &head_tensors(experts.len()), "head.", seed)?;
    files.push(head);
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(files: &[PathBuf], root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        files
            .iter()
            .map(|f| {
                (
                    f.strip_prefix(root).unwrap().to_path_buf(),
                    std::fs::read(f).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn tiny_router_is_byte_deterministic_and_seeded() {
        let (a, b, c) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let experts = ["small", "medium", "large"];
        let fa = write_tiny_router(a.path(), &experts, 7).unwrap();
        let fb = write_tiny_router(b.path(), &experts, 7).unwrap();
        let fc = write_tiny_router(c.path(), &experts, 8).unwrap();
        assert_eq!(fa.len(), 5);
        assert_eq!(bytes(&fa, a.path()), bytes(&fb, b.path()));
        let (ba, bc) = (bytes(&fa, a.path()), bytes(&fc, c.path()));
        // Same config and tokenizer, other weights.
        let differs: Vec<bool> = ba.iter().zip(&bc).map(|(x, y)| x.1 != y.1).collect();
        assert_eq!(differs, [false, false, true, false, true]);
    }

    #[test]
    fn bad_expert_lists_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            write_tiny_router(dir.path(), &[], 1),
            Err(TinyError::InvalidSpec(_))
        ));
        assert!(matches!(
            write_tiny_router(dir.path(), &["a", "a"], 1),
            Err(TinyError::InvalidSpec(_))
        ));
    }
}
