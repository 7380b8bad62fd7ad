//! The candle SD3/SD3.5 denoiser against diffusers' `SD3Transformer2DModel` on the tiny
//! fixtures written by `tests/fixtures/make_sd3_fixture.py` (see its docstring for what each
//! folder holds and how to rerun it).

use candle_core::{DType, Device, Tensor};
use omnistage_engines::diffusion::model::{DenoiseInput, Denoiser};
use omnistage_engines::diffusion::sd3::{Sd3Config, Sd3Transformer};
use omnistage_engines::diffusion::DiffusionError;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Largest allowed |candle - diffusers| on the f32 velocity (values are O(1)).
const TOLERANCE: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn io(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn input(io: &HashMap<String, Tensor>) -> DenoiseInput<'_> {
    DenoiseInput {
        latents: &io["latents"],
        sigmas: &io["sigmas"],
        context: &io["context"],
        pooled: &io["pooled"],
        guidance: None,
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .unwrap_or(f32::INFINITY)
}

fn load(name: &str) -> Sd3Transformer {
    Sd3Transformer::load(&fixture(name), DType::F32, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn check_parity(name: &str, model: &Sd3Transformer, io_dir: &Path) -> f32 {
    let io = io(io_dir);
    let out = model.forward(&input(&io)).unwrap();
    assert_eq!(out.dtype(), DType::F32);
    let diff = max_abs_diff(&out, &io["sample"]);
    println!("{name}: max |candle - diffusers| = {diff:e}");
    assert!(
        diff <= TOLERANCE,
        "{name}: max abs diff {diff} > {TOLERANCE}"
    );
    diff
}

#[test]
fn sd3_matches_diffusers() {
    let model = load("sd3_tiny");
    let info = model.info();
    assert_eq!(info.architecture, "sd3");
    assert_eq!(
        (
            info.latent_channels,
            info.latent_multiple,
            info.context_dim,
            info.pooled_dim
        ),
        (4, 2, 12, 10)
    );
    assert_eq!(info.max_latent_side, Some(16));
    assert!(!info.guidance_embedding);
    check_parity("sd3_tiny", &model, &fixture("sd3_tiny"));
}

#[test]
fn sd3_5_qk_norm_and_dual_attention_match_diffusers() {
    let model = load("sd3_tiny_qknorm");
    check_parity("sd3_tiny_qknorm", &model, &fixture("sd3_tiny_qknorm"));
}

#[test]
fn single_file_layout_matches_diffusers() {
    let dir = fixture("sd3_tiny_qknorm");
    let config = Sd3Config::from_file(&dir.join("config.json")).unwrap();
    let path = fixture("sd3_tiny_single").join("sd3_tiny_qknorm.safetensors");
    let model = Sd3Transformer::load_single_file(&path, &config, DType::F32, &Device::Cpu).unwrap();
    check_parity("sd3_tiny_single", &model, &dir);

    // The file's config must agree with its tensors.
    let wrong = Sd3Config {
        dual_attention_layers: vec![0],
        ..config
    };
    let err = Sd3Transformer::load_single_file(&path, &wrong, DType::F32, &Device::Cpu)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("dual_attention_layers") && err.contains("joint_blocks.2.x_block.attn2"),
        "{err}"
    );
}

#[test]
fn split_forward_and_row_selection_match_the_full_forward() {
    let model = load("sd3_tiny_qknorm");
    let io = io(&fixture("sd3_tiny_qknorm"));
    let input = input(&io);
    let full = model.forward(&input).unwrap();
    let embedded = model.embed(&input).unwrap();

    // [B, T, D]: 2 rows, (6/2) * (12/2) patches, 2 heads * 8.
    let modulated = model.modulated_input(&embedded).unwrap();
    assert_eq!(modulated.dims(), &[2, 18, 16]);
    assert_eq!(modulated.dtype(), DType::F32);
    assert_eq!(model.stack_input(&embedded).unwrap().dims(), &[2, 18, 16]);

    for rows in [vec![1], vec![1, 0], vec![0, 0]] {
        let picked = model.select_rows(&embedded, &rows).unwrap();
        let hidden = model.run_blocks(&picked).unwrap();
        assert_eq!(hidden.dims(), &[rows.len(), 18, 16]);
        let out = model.head(&picked, &hidden).unwrap();
        let index = Tensor::new(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            &Device::Cpu,
        )
        .unwrap();
        let expected = full.index_select(&index, 0).unwrap();
        let diff = max_abs_diff(&out, &expected);
        assert!(diff <= 1e-5, "rows {rows:?}: {diff}");
    }
    assert!(model.select_rows(&embedded, &[2]).is_err());
    assert!(model.select_rows(&embedded, &[]).is_err());
}

#[test]
fn bad_inputs_are_rejected() {
    let model = load("sd3_tiny");
    let io = io(&fixture("sd3_tiny"));
    let dev = Device::Cpu;
    let odd = Tensor::zeros((2, 4, 7, 12), DType::F32, &dev).unwrap();
    let too_big = Tensor::zeros((2, 4, 18, 12), DType::F32, &dev).unwrap();
    let wrong_channels = Tensor::zeros((2, 3, 6, 12), DType::F32, &dev).unwrap();
    for latents in [&odd, &too_big, &wrong_channels] {
        let input = DenoiseInput {
            latents,
            ..input(&io)
        };
        assert!(
            matches!(model.embed(&input), Err(DiffusionError::Input(_))),
            "{:?}",
            latents.dims()
        );
    }
    let pooled = Tensor::zeros((2, 9), DType::F32, &dev).unwrap();
    let input = DenoiseInput {
        pooled: &pooled,
        ..input(&io)
    };
    assert!(matches!(model.embed(&input), Err(DiffusionError::Input(_))));
}

/// Copies a fixture folder into a temporary directory for editing.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for file in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(fixture(name).join(file), dir.path().join(file)).unwrap();
    }
    dir
}

fn edit_config(dir: &Path, key: &str, value: serde_json::Value) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config[key] = value;
    std::fs::write(&path, config.to_string()).unwrap();
}

fn load_error(dir: &Path) -> String {
    match Sd3Transformer::load(dir, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn config_errors_name_the_field_and_file() {
    for (key, value, field) in [
        ("qk_norm", serde_json::json!("layer_norm"), "qk_norm"),
        (
            "num_attention_heads",
            serde_json::json!(4),
            "caption_projection_dim",
        ),
        ("num_layers", serde_json::json!(-1), "num_layers"),
    ] {
        let dir = copy_fixture("sd3_tiny");
        edit_config(dir.path(), key, value);
        let err = load_error(dir.path());
        assert!(err.contains(field) && err.contains("config.json"), "{err}");
    }
    // A config that disagrees with the checkpoint is caught, not run wrongly.
    let dir = copy_fixture("sd3_tiny_qknorm");
    edit_config(dir.path(), "qk_norm", serde_json::Value::Null);
    let err = load_error(dir.path());
    assert!(err.contains("qk_norm") && err.contains("norm_q"), "{err}");
}

#[test]
fn missing_tensor_is_named_in_diffusers_terms() {
    for name in [
        "transformer_blocks.1.attn.to_k.weight",
        "transformer_blocks.2.norm1_context.linear.bias",
        "transformer_blocks.0.attn2.norm_k.weight",
    ] {
        let dir = copy_fixture("sd3_tiny_qknorm");
        let path = dir.path().join("diffusion_pytorch_model.safetensors");
        let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        assert!(tensors.remove(name).is_some(), "{name}");
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let err = load_error(dir.path());
        assert!(err.contains(name), "{err}");
    }
}

#[test]
fn wrong_shape_names_the_diffusers_tensors() {
    let dir = copy_fixture("sd3_tiny");
    let path = dir.path().join("diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let bad = Tensor::zeros((16, 8), DType::F32, &Device::Cpu).unwrap();
    tensors.insert("transformer_blocks.1.ff.net.2.weight".into(), bad);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains("transformer_blocks.1.ff.net.2.weight"),
        "{err}"
    );
}

#[test]
fn half_precision_stays_close_to_diffusers() {
    let dir = fixture("sd3_tiny_qknorm");
    let io = io(&dir);
    for dtype in [DType::BF16, DType::F16] {
        let model = Sd3Transformer::load(&dir, dtype, &Device::Cpu).unwrap();
        assert_eq!(model.dtype(), dtype);
        let out = model.forward(&input(&io)).unwrap();
        assert_eq!(out.dtype(), DType::F32);
        let diff = max_abs_diff(&out, &io["sample"]);
        println!("sd3_tiny_qknorm {dtype:?}: max |candle - diffusers f32| = {diff:e}");
        assert!(diff < 0.1, "{dtype:?}: {diff}");
    }
}
