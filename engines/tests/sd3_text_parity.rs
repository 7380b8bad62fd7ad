//! SD3's text encoders (`Sd3TextEncoders`: CLIP-L + CLIP-G + T5) against diffusers'
//! `StableDiffusion3Pipeline.encode_prompt` on the tiny fixture written by
//! `tests/fixtures/make_sd3_text_fixture.py` (see its docstring for what it holds and how to
//! rerun it).

use candle_core::{DType, Device, Tensor};
use omnistage_engines::diffusion::text::sd3::Sd3TextEncoders;
use omnistage_engines::diffusion::text::PromptEncoder;
use omnistage_engines::diffusion::DiffusionError;
use omnistage_stages::TextEmbedding;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Largest allowed |candle - diffusers| on the f32 rows and pooled vectors (values are O(1)).
const TOLERANCE: f32 = 1e-4;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd3_text_tiny")
}

struct Reference {
    prompts: Vec<String>,
    max_seq: usize,
    io: HashMap<String, Tensor>,
}

fn reference() -> Reference {
    let dir = fixture();
    let text = std::fs::read_to_string(dir.join("prompts.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let prompts = json["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    let max_seq = json["max_sequence_length"].as_u64().unwrap() as usize;
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu).unwrap();
    Reference {
        prompts,
        max_seq,
        io,
    }
}

fn load(root: &Path, max_seq: usize) -> Result<Sd3TextEncoders, DiffusionError> {
    Sd3TextEncoders::load(root, max_seq, DType::F32, &Device::Cpu)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Row `i` of a reference tensor, flattened.
fn row(t: &Tensor, i: usize) -> Vec<f32> {
    t.get(i).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn encode(enc: &Sd3TextEncoders, prompts: &[String]) -> Vec<TextEmbedding> {
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    enc.encode(&refs).unwrap()
}

/// Compares a batch's output with the reference; returns the (tokens, pooled) max diffs.
fn check(out: &[TextEmbedding], tokens: &Tensor, pooled: &Tensor, what: &str) -> (f32, f32) {
    let (_, rows, dim) = tokens.dims3().unwrap();
    let (mut dt, mut dp) = (0f32, 0f32);
    for (i, e) in out.iter().enumerate() {
        assert_eq!((e.tokens.rows, e.tokens.dim), (rows, dim), "{what}");
        dt = dt.max(max_diff(&e.tokens.data, &row(tokens, i)));
        dp = dp.max(max_diff(&e.pooled, &row(pooled, i)));
    }
    println!("{what}: max |candle - diffusers| tokens {dt:e}, pooled {dp:e}");
    assert!(dt <= TOLERANCE, "{what}: token rows differ by {dt}");
    assert!(dp <= TOLERANCE, "{what}: pooled differs by {dp}");
    (dt, dp)
}

#[test]
fn matches_diffusers_encode_prompt() {
    let r = reference();
    let enc = load(&fixture(), r.max_seq).unwrap();
    assert_eq!(enc.name(), "sd3-clip-t5");
    assert!(enc.has_t5());
    assert_eq!(
        (enc.joint_dim(), enc.token_rows(), enc.pooled_dim()),
        (64, 77 + r.max_seq, 48)
    );
    let out = encode(&enc, &r.prompts);
    assert_eq!(out.len(), 2);
    let pooled = &r.io["pooled_prompt_embeds"];
    check(&out, &r.io["prompt_embeds"], pooled, "batch of 2");

    // Each prompt alone gives what it gave in the batch.
    for (i, p) in r.prompts.iter().enumerate() {
        let alone = encode(&enc, std::slice::from_ref(p));
        let d = max_diff(&alone[0].tokens.data, &out[i].tokens.data)
            .max(max_diff(&alone[0].pooled, &out[i].pooled));
        println!("prompt {i} alone vs in the batch: {d:e}");
        assert!(d <= 1e-6, "prompt {i} depends on its batch: {d}");
    }
    // Swapping the order swaps the outputs.
    let swapped = encode(&enc, &[r.prompts[1].clone(), r.prompts[0].clone()]);
    assert!(max_diff(&swapped[0].tokens.data, &out[1].tokens.data) <= 1e-6);

    // Token counts before truncation: T5's (special tokens included), as the tokenizer gives.
    let lengths: Vec<Vec<i64>> = r.io["prompt_lengths"].to_vec2().unwrap();
    for (p, l) in r.prompts.iter().zip(&lengths) {
        assert_eq!(enc.count_tokens(p).unwrap(), l[2] as usize, "{p}");
    }
    assert!(encode(&enc, &[]).is_empty());
}

/// Copies the fixture into a temporary folder (to break it in one place).
fn copy_fixture() -> tempfile::TempDir {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.path().is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    copy(&fixture(), dir.path());
    dir
}

#[test]
fn without_t5_gives_diffusers_zeros() {
    let r = reference();
    let dir = copy_fixture();
    // Without T5 the width comes from the transformer's joint_attention_dim, as in diffusers;
    // 40 is narrower than the 48 CLIP features, which are then cropped as `F.pad` does.
    std::fs::create_dir_all(dir.path().join("transformer")).unwrap();
    std::fs::copy(
        dir.path().join("no_t5_transformer.json"),
        dir.path().join("transformer/config.json"),
    )
    .unwrap();
    // A pipeline saved with `text_encoder_3=None` lists it as [null, null]: the folder is ignored.
    let index = dir.path().join("model_index.json");
    std::fs::write(&index, r#"{"text_encoder_3": [null, null]}"#).unwrap();
    let enc = load(dir.path(), r.max_seq).unwrap();
    assert!(!enc.has_t5());
    std::fs::remove_file(&index).unwrap();
    std::fs::remove_dir_all(dir.path().join("text_encoder_3")).unwrap();
    let enc = load(dir.path(), r.max_seq).unwrap();
    assert!(!enc.has_t5());
    assert_eq!(enc.joint_dim(), 40);
    let out = encode(&enc, &r.prompts);
    let pooled = &r.io["pooled_prompt_embeds"];
    check(&out, &r.io["no_t5_prompt_embeds"], pooled, "without T5");
    for e in &out {
        assert!(e.tokens.data[77 * 40..].iter().all(|v| *v == 0.0));
    }
    // Counted with CLIP-L's tokenizer now.
    let lengths: Vec<Vec<i64>> = r.io["prompt_lengths"].to_vec2().unwrap();
    assert_eq!(
        enc.count_tokens(&r.prompts[1]).unwrap(),
        lengths[1][0] as usize
    );

    // No transformer config either: SD3's 4096.
    std::fs::remove_dir_all(dir.path().join("transformer")).unwrap();
    let enc = load(dir.path(), 8).unwrap();
    let out = encode(&enc, &r.prompts[..1]);
    assert_eq!((out[0].tokens.rows, out[0].tokens.dim), (77 + 8, 4096));
}

fn load_err(root: &Path) -> String {
    match load(root, 16) {
        Ok(_) => panic!("{} loaded", root.display()),
        Err(e) => {
            println!("{e}");
            e.to_string()
        }
    }
}

#[test]
fn broken_folders_name_the_problem() {
    let dir = copy_fixture();
    let root = dir.path();

    // A tensor missing from CLIP-G's checkpoint: the folder and the tensor are named.
    let path = root.join("text_encoder_2/model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let name = "text_model.encoder.layers.1.mlp.fc2.weight";
    tensors.remove(name).unwrap();
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let msg = load_err(root);
    assert!(
        msg.contains("text_encoder_2") && msg.contains(name),
        "{msg}"
    );
    std::fs::copy(fixture().join("text_encoder_2/model.safetensors"), &path).unwrap();

    // An unsupported activation.
    let cfg = root.join("text_encoder/config.json");
    let original = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, original.replace("quick_gelu", "swishy")).unwrap();
    let msg = load_err(root);
    assert!(
        msg.contains("config.json") && msg.contains("swishy"),
        "{msg}"
    );

    // Not a CLIP with projection (an SDXL-style CLIPTextModel).
    std::fs::write(
        &cfg,
        original.replace("CLIPTextModelWithProjection", "CLIPTextModel"),
    )
    .unwrap();
    let msg = load_err(root);
    assert!(msg.contains("CLIPTextModelWithProjection"), "{msg}");

    // Heads that do not divide the width.
    std::fs::write(
        &cfg,
        original.replace("\"num_attention_heads\": 2", "\"num_attention_heads\": 3"),
    )
    .unwrap();
    let msg = load_err(root);
    assert!(msg.contains("num_attention_heads 3"), "{msg}");
    // A config that disagrees with the checkpoint: the tensor and both shapes are named.
    std::fs::write(
        &cfg,
        original.replace("\"vocab_size\": 100", "\"vocab_size\": 90"),
    )
    .unwrap();
    let msg = load_err(root);
    assert!(
        msg.contains("token_embedding.weight") && msg.contains("[90, 16]"),
        "{msg}"
    );
    std::fs::write(&cfg, &original).unwrap();

    // A T5 config that is not one.
    let t5 = root.join("text_encoder_3/config.json");
    std::fs::write(
        &t5,
        r#"{"architectures": ["T5EncoderModel"], "d_model": 64}"#,
    )
    .unwrap();
    let msg = load_err(root);
    assert!(
        msg.contains("text_encoder_3") && msg.contains("T5 config"),
        "{msg}"
    );
    std::fs::copy(fixture().join("text_encoder_3/config.json"), &t5).unwrap();

    // A T5 tokenizer with more ids than T5 embeds.
    let tok3 = root.join("tokenizer_3/tokenizer.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tok3).unwrap()).unwrap();
    // Added tokens take the next free id, past the embedding table.
    let next = json["model"]["vocab"].as_array().unwrap().len();
    json["added_tokens"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "id": next, "content": "<extra_id_4>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }));
    std::fs::write(&tok3, json.to_string()).unwrap();
    let msg = load_err(root);
    assert!(
        msg.contains("tokenizer_3") && msg.contains(&format!("only {next} embeddings")),
        "{msg}"
    );

    // No T5 tokenizer.
    std::fs::remove_file(root.join("tokenizer_3/tokenizer.json")).unwrap();
    let msg = load_err(root);
    assert!(
        msg.contains("tokenizer_3") && msg.contains("tokenizer.json"),
        "{msg}"
    );

    // No CLIP-G at all.
    std::fs::remove_dir_all(root.join("text_encoder_2")).unwrap();
    let msg = load_err(root);
    assert!(msg.contains("text_encoder_2"), "{msg}");

    // A CLIP length beyond the position table.
    let dir = copy_fixture();
    let tok = dir.path().join("tokenizer/tokenizer_config.json");
    let text = std::fs::read_to_string(&tok).unwrap();
    std::fs::write(&tok, text.replace("77", "78")).unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("model_max_length 78"), "{msg}");
}

/// An image deployment whose encoder stage's `model` is `encoder_model`; the DiT and VAE stages
/// point at stubs (only the encoder is built here).
fn deployment(base: &Path, encoder_model: &Path) -> omnistage_stages::deploy::DeployGraph {
    for stub in ["dit", "vae"] {
        std::fs::create_dir_all(base.join(stub)).unwrap();
        std::fs::write(base.join(stub).join("config.json"), "{}").unwrap();
    }
    let text = format!(
        r#"
name = "sd3-text"

[[stage]]
id = "encoder"
kind = "encoder"
model = "{}"

[stage.image]
max_text_tokens = 24

[[stage]]
id = "dit"
kind = "dit"
model = "dit"

[[stage]]
id = "vae"
kind = "vae"
model = "vae"

[[edge]]
from = "encoder"
to = "dit"
carries = "embeddings"

[[edge]]
from = "dit"
to = "vae"
carries = "latents"

[outputs]
image = "vae"
"#,
        encoder_model.display()
    );
    omnistage_stages::deploy::DeployGraph::from_toml_str(
        &text,
        &base.join("deploy.toml"),
        base,
        &[],
    )
    .unwrap()
}

#[test]
fn factory_builds_sd3_encoders_from_a_clip_text_encoder() {
    use omnistage_engines::factory::{build_engine, StageWiring};
    let tmp = tempfile::tempdir().unwrap();
    // The pipeline root, and the `text_encoder/` component folder itself.
    for model in [fixture(), fixture().join("text_encoder")] {
        let graph = deployment(tmp.path(), &model);
        let spec = graph.stage("encoder").unwrap();
        let wiring = StageWiring {
            received: Vec::new(),
            consumed: graph.outbound("encoder").map(|e| e.carries).collect(),
            ..StageWiring::default()
        };
        if let Err(e) = build_engine(spec, &wiring) {
            panic!("{}: {e}", model.display());
        }
    }
}
