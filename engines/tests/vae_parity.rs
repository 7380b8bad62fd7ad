//! The AutoencoderKL decoder against diffusers 0.42.1: decoded values, served bytes, batching,
//! error messages, and the tiny checkpoint writer.
//!
//! The reference folders under `tests/fixtures/` were written by `make_vae_fixture.py` (see its
//! docstring to rerun it): a diffusers-saved tiny VAE plus `io.safetensors` holding the input
//! latents, diffusers' decode, and the bytes of its `VaeImageProcessor.postprocess`.

use candle_core::{DType, Device, Tensor};
use omnistage_engines::diffusion::vae::{to_rgb_images, Vae};
use omnistage_engines::diffusion::DiffusionError;
use omnistage_engines::llm::weights::WeightsError;
use omnistage_engines::tiny::{write_tiny_vae, TinyVaeSpec};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn io(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("io.safetensors"), &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
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

/// Decodes the fixture's latents and compares values and bytes with diffusers.
fn check_parity(name: &str) {
    let io = io(name);
    let vae = Vae::load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
    assert_eq!((vae.latent_channels(), vae.downscale_factor()), (4, 4));
    let decoded = vae.decode(&io["latents"]).unwrap();
    assert_eq!(decoded.dims(), &[2, 3, 24, 40]);
    let diff = max_abs_diff(&decoded, &io["decoded"]);
    println!("{name}: decode max |candle - diffusers| = {diff:e}");
    assert!(
        diff <= 1e-4,
        "{name}: decode differs from diffusers by {diff}"
    );

    let images = to_rgb_images(&decoded).unwrap();
    assert_eq!((images.n, images.height, images.width), (2, 24, 40));
    let reference = io["images"].flatten_all().unwrap().to_vec1::<u8>().unwrap();
    assert_eq!(images.pixels.len(), reference.len());
    let differing: Vec<u8> = images
        .pixels
        .iter()
        .zip(&reference)
        .map(|(a, b)| a.abs_diff(*b))
        .filter(|&d| d > 0)
        .collect();
    println!(
        "{name}: {} of {} bytes differ from diffusers, by at most {}",
        differing.len(),
        reference.len(),
        differing.iter().max().unwrap_or(&0)
    );
    assert!(
        differing.iter().all(|&d| d <= 1),
        "{name}: a byte is off by more than 1"
    );
    // The fixture covers the whole byte range, so the mapping and the clamp are both exercised.
    assert!(reference.contains(&0) && reference.contains(&255));
}

#[test]
fn decode_matches_diffusers_without_quant_convs() {
    check_parity("vae_tiny");
}

#[test]
fn decode_matches_diffusers_with_quant_convs_and_null_shift() {
    let vae = Vae::load(&fixture("vae_tiny_quant"), DType::F32, &Device::Cpu).unwrap();
    assert!(vae.config().use_post_quant_conv);
    assert_eq!(vae.config().shift_factor, 0.0);
    check_parity("vae_tiny_quant");
}

#[test]
fn batch_of_two_equals_each_image_alone() {
    let io = io("vae_tiny");
    let vae = Vae::load(&fixture("vae_tiny"), DType::F32, &Device::Cpu).unwrap();
    let batch = vae.decode(&io["latents"]).unwrap();
    for i in 0..2 {
        let alone = vae.decode(&io["latents"].narrow(0, i, 1).unwrap()).unwrap();
        let diff = max_abs_diff(&batch.narrow(0, i, 1).unwrap(), &alone);
        println!("row {i}: max |batched - alone| = {diff:e}");
        assert!(diff <= 1e-5, "row {i}: batched decode differs by {diff}");
    }
}

/// Copies a fixture's config and weights into a temp dir to break them.
fn scratch_copy(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for file in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(fixture(name).join(file), dir.path().join(file)).unwrap();
    }
    dir
}

fn load_err(dir: &Path) -> DiffusionError {
    Vae::load(dir, DType::F32, &Device::Cpu).unwrap_err()
}

#[test]
fn bad_config_names_file_and_field() {
    let dir = scratch_copy("vae_tiny");
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    config["norm_num_groups"] = 3.into();
    std::fs::write(&path, config.to_string()).unwrap();
    let err = load_err(dir.path());
    let msg = err.to_string();
    assert!(matches!(err, DiffusionError::Config { .. }), "{msg}");
    assert!(
        msg.contains("config.json") && msg.contains("`norm_num_groups`"),
        "{msg}"
    );

    config["norm_num_groups"] = 4.into();
    config["up_block_types"][1] = "AttnUpDecoderBlock2D".into();
    std::fs::write(&path, config.to_string()).unwrap();
    let msg = load_err(dir.path()).to_string();
    assert!(
        msg.contains("`up_block_types`") && msg.contains("AttnUpDecoderBlock2D"),
        "{msg}"
    );

    std::fs::remove_file(&path).unwrap();
    let msg = load_err(dir.path()).to_string();
    assert!(
        msg.contains("config.json") && msg.contains("cannot read"),
        "{msg}"
    );
}

#[test]
fn missing_weights_and_tensors_are_named() {
    let dir = scratch_copy("vae_tiny");
    let weights = dir.path().join("diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let missing = "decoder.up_blocks.1.resnets.0.conv2.weight";
    assert!(tensors.remove(missing).is_some());
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let err = load_err(dir.path());
    let msg = err.to_string();
    assert!(
        matches!(&err, DiffusionError::Weights(WeightsError::MissingTensor { name }) if name == missing),
        "{msg}"
    );
    assert!(msg.contains(missing), "{msg}");

    std::fs::remove_file(&weights).unwrap();
    let err = load_err(dir.path());
    assert!(
        matches!(err, DiffusionError::Weights(WeightsError::NotFound { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("diffusion_pytorch_model"), "{err}");
}

#[test]
fn bad_latents_are_input_errors() {
    let vae = Vae::load(&fixture("vae_tiny"), DType::F32, &Device::Cpu).unwrap();
    let wrong_channels = Tensor::zeros((1, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let three_d = Tensor::zeros((4, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let f16 = Tensor::zeros((1, 4, 4, 4), DType::F16, &Device::Cpu).unwrap();
    for bad in [wrong_channels, three_d, f16] {
        let err = vae.decode(&bad).unwrap_err();
        assert!(matches!(err, DiffusionError::Input(_)), "{err}");
    }
}

/// Tensor names and shapes of a safetensors file, sorted by name.
fn header(path: &Path) -> BTreeMap<String, Vec<usize>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| (name, view.shape().to_vec()))
        .collect()
}

#[test]
fn tiny_writer_matches_the_diffusers_layout() {
    // The fixture's shape, written by our writer: the tensor set and config keys must be the
    // ones diffusers' save_pretrained wrote, so from_pretrained loads it without complaint.
    let spec = TinyVaeSpec {
        block_out_channels: vec![8, 16, 16],
        norm_num_groups: 4,
        scaling_factor: 0.18215,
        shift_factor: None,
        use_quant_conv: true,
        use_post_quant_conv: true,
        ..TinyVaeSpec::tiny()
    };
    let dir = tempfile::tempdir().unwrap();
    write_tiny_vae(dir.path(), &spec, 5).unwrap();
    let reference = fixture("vae_tiny_quant");
    assert_eq!(
        header(&dir.path().join("diffusion_pytorch_model.safetensors")),
        header(&reference.join("diffusion_pytorch_model.safetensors"))
    );
    let read = |p: PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let ours = read(dir.path().join("config.json"));
    let theirs = read(reference.join("config.json"));
    let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&ours), keys(&theirs));
    for (key, value) in theirs.as_object().unwrap() {
        if key != "_diffusers_version" {
            assert_eq!(&ours[key], value, "config key {key}");
        }
    }
}

#[test]
fn tiny_checkpoint_loads_decodes_and_is_reproducible() {
    let spec = TinyVaeSpec::tiny();
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let c = tempfile::tempdir().unwrap();
    let files = write_tiny_vae(a.path(), &spec, 11).unwrap();
    assert_eq!(files.len(), 2);
    write_tiny_vae(b.path(), &spec, 11).unwrap();
    write_tiny_vae(c.path(), &spec, 12).unwrap();
    for f in &files {
        let name = f.file_name().unwrap();
        let bytes = std::fs::read(f).unwrap();
        assert_eq!(
            bytes,
            std::fs::read(b.path().join(name)).unwrap(),
            "{name:?}"
        );
        if name == "diffusion_pytorch_model.safetensors" {
            assert_ne!(bytes, std::fs::read(c.path().join(name)).unwrap());
        }
    }

    let vae = Vae::load(a.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!((vae.latent_channels(), vae.downscale_factor()), (4, 4));
    let latents = Tensor::randn(0f32, 1.0, (3, 4, 6, 9), &Device::Cpu).unwrap();
    let decoded = vae.decode(&latents).unwrap();
    assert_eq!(decoded.dims(), &[3, 3, 24, 36]);
    let values = decoded.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mean = values.iter().sum::<f32>() / values.len() as f32;
    let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / values.len() as f32).sqrt();
    let images = to_rgb_images(&decoded).unwrap();
    let mut seen = [false; 256];
    images.pixels.iter().for_each(|&p| seen[p as usize] = true);
    let distinct = seen.iter().filter(|&&s| s).count();
    println!("tiny VAE decode: mean {mean:.3}, std {std:.3}, {distinct} distinct byte values");
    assert!(std > 0.3 && mean.abs() < 0.5, "mean {mean}, std {std}");
    assert!(distinct > 150, "only {distinct} distinct byte values");
}

#[test]
fn f16_weights_decode_close_to_f32() {
    let io = io("vae_tiny");
    let vae = Vae::load(&fixture("vae_tiny"), DType::F16, &Device::Cpu).unwrap();
    assert_eq!(vae.dtype(), DType::F16);
    let decoded = vae.decode(&io["latents"]).unwrap();
    assert_eq!(decoded.dtype(), DType::F32);
    let diff = max_abs_diff(&decoded, &io["decoded"]);
    println!("f16 decode max |candle - diffusers f32| = {diff:e}");
    assert!(diff < 0.1, "f16 decode differs by {diff}");
}
