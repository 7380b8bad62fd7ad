//! FLUX transformer against diffusers 0.42.1: fixtures from `tests/fixtures/make_flux_fixture.py`
//! (tiny seeded `FluxTransformer2DModel`s and their outputs for a two-row batch).

use candle_core::{DType, Device, Tensor};
use omnistage_engines::diffusion::flux::{FluxConfig, FluxTransformer};
use omnistage_engines::diffusion::model::{DenoiseInput, Denoiser};
use omnistage_engines::diffusion::DiffusionError;
use omnistage_engines::llm::weights::WeightsError;
use omnistage_engines::tiny::{write_tiny_flux_transformer, TinyFluxSpec};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const TOLERANCE: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn io(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu).unwrap()
}

fn input(io: &HashMap<String, Tensor>) -> DenoiseInput<'_> {
    DenoiseInput {
        latents: &io["latents"],
        sigmas: &io["sigmas"],
        context: &io["context"],
        pooled: &io["pooled"],
        guidance: io.get("guidance"),
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn max_abs(a: &Tensor) -> f32 {
    let zeros = a.zeros_like().unwrap();
    max_diff(a, &zeros)
}

/// Loads `name`, checks embed/modulation/forward against diffusers; returns the output diff.
fn check_parity(name: &str) -> f32 {
    let dir = fixture(name);
    let model = FluxTransformer::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let io = io(&dir);
    let input = input(&io);
    let embedded = model.embed(&input).unwrap();
    let d_stack = max_diff(&model.stack_input(&embedded).unwrap(), &io["stack_input"]);
    let d_mod = max_diff(
        &model.modulated_input(&embedded).unwrap(),
        &io["modulated_input"],
    );
    let out = model.forward(&input).unwrap();
    assert_eq!(out.dtype(), DType::F32);
    let d_out = max_diff(&out, &io["output"]);
    eprintln!(
        "{name}: max |Δ| stack_input {d_stack:.2e}, modulated_input {d_mod:.2e}, output \
         {d_out:.2e} (max |output| {:.3})",
        max_abs(&io["output"])
    );
    assert!(d_stack <= TOLERANCE, "{name} stack_input diff {d_stack}");
    assert!(d_mod <= TOLERANCE, "{name} modulated_input diff {d_mod}");
    assert!(d_out <= TOLERANCE, "{name} output diff {d_out}");
    d_out
}

#[test]
fn matches_diffusers_with_guidance_embedding() {
    check_parity("flux_tiny");
}

#[test]
fn matches_diffusers_without_guidance_embedding() {
    check_parity("flux_tiny_schnell");
}

#[test]
fn info_describes_the_model() {
    let model = FluxTransformer::load(&fixture("flux_tiny"), DType::F32, &Device::Cpu).unwrap();
    let info = model.info();
    assert_eq!(info.architecture, "flux");
    assert_eq!(info.latent_channels, 4);
    assert_eq!(info.latent_multiple, 2);
    assert_eq!((info.context_dim, info.pooled_dim), (24, 20));
    assert!(info.guidance_embedding);
    assert_eq!(info.max_latent_side, None);
    let schnell = FluxTransformer::load(&fixture("flux_tiny_schnell"), DType::F32, &Device::Cpu);
    assert!(!schnell.unwrap().info().guidance_embedding);
}

#[test]
fn selected_rows_match_the_full_batch() {
    let dir = fixture("flux_tiny");
    let model = FluxTransformer::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let io = io(&dir);
    let embedded = model.embed(&input(&io)).unwrap();
    let full = model
        .head(&embedded, &model.run_blocks(&embedded).unwrap())
        .unwrap();
    let one = model.select_rows(&embedded, &[1]).unwrap();
    let hidden = model.run_blocks(&one).unwrap();
    let row = model.head(&one, &hidden).unwrap();
    assert!(max_diff(&row, &full.narrow(0, 1, 1).unwrap()) <= 1e-6);
    let modulated = model.modulated_input(&one).unwrap();
    let full_mod = model.modulated_input(&embedded).unwrap();
    assert!(max_diff(&modulated, &full_mod.narrow(0, 1, 1).unwrap()) <= 1e-6);

    // Reordering and cached-residual reuse: head(stack_input + residual) is the forward.
    let swapped = model.select_rows(&embedded, &[1, 0]).unwrap();
    let residual =
        (model.run_blocks(&swapped).unwrap() - model.stack_input(&swapped).unwrap()).unwrap();
    let reused = (model.stack_input(&swapped).unwrap() + residual).unwrap();
    let out = model.head(&swapped, &reused).unwrap();
    assert!(
        max_diff(
            &out.narrow(0, 0, 1).unwrap(),
            &full.narrow(0, 1, 1).unwrap()
        ) <= 1e-5
    );

    for rows in [&[2usize][..], &[]] {
        let err = model.select_rows(&embedded, rows).unwrap_err();
        assert!(matches!(err, DiffusionError::Input(_)), "{err}");
    }
}

#[test]
fn bf16_follows_diffusers_bf16() {
    let dir = fixture("flux_tiny");
    let model = FluxTransformer::load(&dir, DType::BF16, &Device::Cpu).unwrap();
    let io = io(&dir);
    let out = model.forward(&input(&io)).unwrap();
    assert_eq!(out.dtype(), DType::F32);
    let diff = max_diff(&out, &io["output_bf16"]);
    // Against the f32 output the bf16 runs (both) differ by ~0.1, mostly because sigma is
    // rounded to bf16 before the timestep embedding; against diffusers' bf16 run much less.
    let vs_f32 = max_diff(&out, &io["output"]);
    eprintln!("flux_tiny bf16: max |Δ| vs diffusers bf16 {diff:.2e}, vs f32 {vs_f32:.2e}");
    assert!(diff < 0.03, "bf16 diff {diff}");
}

#[test]
fn bad_inputs_are_input_errors() {
    let dir = fixture("flux_tiny");
    let model = FluxTransformer::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let io = io(&dir);
    let odd = io["latents"].narrow(3, 0, 5).unwrap();
    let three = io["latents"].narrow(1, 0, 3).unwrap();
    let short_sigmas = io["sigmas"].narrow(0, 0, 1).unwrap();
    let cases = [
        DenoiseInput {
            guidance: None,
            ..input(&io)
        },
        DenoiseInput {
            latents: &odd,
            ..input(&io)
        },
        DenoiseInput {
            latents: &three,
            ..input(&io)
        },
        DenoiseInput {
            sigmas: &short_sigmas,
            ..input(&io)
        },
        DenoiseInput {
            context: &io["pooled"],
            ..input(&io)
        },
    ];
    for case in cases {
        let err = model.embed(&case).expect_err("bad input accepted");
        assert!(matches!(err, DiffusionError::Input(_)), "{err}");
    }
}

fn copy_fixture(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for file in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(fixture(name).join(file), tmp.path().join(file)).unwrap();
    }
    tmp
}

#[test]
fn bad_config_is_named() {
    let tmp = copy_fixture("flux_tiny");
    let config = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replace("\"patch_size\": 1", "\"patch_size\": 2");
    std::fs::write(&config, text).unwrap();
    let err = FluxTransformer::load(tmp.path(), DType::F32, &Device::Cpu).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DiffusionError::Config { .. }), "{msg}");
    assert!(
        msg.contains("config.json") && msg.contains("patch_size"),
        "{msg}"
    );

    std::fs::write(&config, r#"{"num_layers": "one"}"#).unwrap();
    let msg = FluxTransformer::load(tmp.path(), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("num_layers"), "{msg}");

    std::fs::remove_file(&config).unwrap();
    let err = FluxTransformer::load(tmp.path(), DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(err, DiffusionError::Config { .. }), "{err}");
}

#[test]
fn missing_and_misshapen_tensors_are_named_in_diffusers_terms() {
    let tmp = copy_fixture("flux_tiny");
    let weights = tmp.path().join("diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let name = "single_transformer_blocks.0.proj_mlp.weight";
    let removed = tensors.remove(name).unwrap();
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let err = FluxTransformer::load(tmp.path(), DType::F32, &Device::Cpu).unwrap_err();
    match &err {
        DiffusionError::Weights(WeightsError::MissingTensor { name: got }) => {
            assert_eq!(got, name)
        }
        other => panic!("expected a missing tensor, got {other}"),
    }

    tensors.insert(name.to_string(), removed.narrow(0, 0, 64).unwrap());
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let err = FluxTransformer::load(tmp.path(), DType::F32, &Device::Cpu).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            DiffusionError::Weights(WeightsError::ShapeMismatch { .. })
        ),
        "{msg}"
    );
    assert!(msg.contains(name), "{msg}");

    std::fs::remove_file(&weights).unwrap();
    let err = FluxTransformer::load(tmp.path(), DType::F32, &Device::Cpu).unwrap_err();
    assert!(
        matches!(err, DiffusionError::Weights(WeightsError::NotFound { .. })),
        "{err}"
    );
}

/// The spec of the `flux_tiny` fixture, for the writer.
fn fixture_spec() -> TinyFluxSpec {
    TinyFluxSpec {
        latent_channels: 4,
        num_layers: 1,
        num_single_layers: 1,
        num_attention_heads: 2,
        attention_head_dim: 16,
        axes_dims_rope: vec![4, 6, 6],
        joint_attention_dim: 24,
        pooled_projection_dim: 20,
        guidance_embeds: true,
        init_std: 0.05,
    }
}

fn tensor_shapes(path: &Path) -> Vec<(String, Vec<usize>)> {
    let mut v: Vec<_> = candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.dims().to_vec()))
        .collect();
    v.sort();
    v
}

#[test]
fn tiny_writer_matches_the_diffusers_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let files = write_tiny_flux_transformer(tmp.path(), &fixture_spec(), 3).unwrap();
    let weights = "diffusion_pytorch_model.safetensors";
    assert_eq!(
        tensor_shapes(&tmp.path().join(weights)),
        tensor_shapes(&fixture("flux_tiny").join(weights)),
        "tiny writer and diffusers' save_pretrained disagree on the tensor list"
    );
    let ours = FluxConfig::from_file(&files[0]).unwrap();
    let theirs = FluxConfig::from_file(&fixture("flux_tiny").join("config.json")).unwrap();
    assert_eq!(ours, theirs);
}

#[test]
fn tiny_writer_loads_runs_and_is_deterministic() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let spec = TinyFluxSpec::tiny();
    let fa = write_tiny_flux_transformer(a.path(), &spec, 7).unwrap();
    let fb = write_tiny_flux_transformer(b.path(), &spec, 7).unwrap();
    let fc = write_tiny_flux_transformer(c.path(), &spec, 8).unwrap();
    let names: Vec<_> = fa.iter().filter_map(|p| p.file_name()).collect();
    assert_eq!(
        names,
        ["config.json", "diffusion_pytorch_model.safetensors"]
    );
    for (x, y) in fa.iter().zip(&fb) {
        assert_eq!(
            std::fs::read(x).unwrap(),
            std::fs::read(y).unwrap(),
            "{x:?}"
        );
    }
    assert_eq!(
        std::fs::read(&fa[0]).unwrap(),
        std::fs::read(&fc[0]).unwrap()
    );
    assert_ne!(
        std::fs::read(&fa[1]).unwrap(),
        std::fs::read(&fc[1]).unwrap()
    );

    let model = FluxTransformer::load(a.path(), DType::F32, &Device::Cpu).unwrap();
    let info = model.info().clone();
    let dev = Device::Cpu;
    let latents = Tensor::randn(0f32, 1.0, (2, info.latent_channels, 8, 6), &dev).unwrap();
    let sigmas = Tensor::new(&[1.0f32, 0.5], &dev).unwrap();
    let context = Tensor::randn(0f32, 1.0, (2, 7, info.context_dim), &dev).unwrap();
    let pooled = Tensor::randn(0f32, 1.0, (2, info.pooled_dim), &dev).unwrap();
    let guidance = Tensor::new(&[3.5f32, 3.5], &dev).unwrap();
    let out = model
        .forward(&DenoiseInput {
            latents: &latents,
            sigmas: &sigmas,
            context: &context,
            pooled: &pooled,
            guidance: Some(&guidance),
        })
        .unwrap();
    assert_eq!(out.dims(), latents.dims());
    let values: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
    assert!(values.iter().all(|v| v.is_finite()));
    assert!(max_abs(&out) > 1e-3, "tiny model predicts all zeros");
}
