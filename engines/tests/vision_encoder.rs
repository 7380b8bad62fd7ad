//! The LLaVA vision encoder against Transformers: fixture made by
//! `tests/fixtures/make_vision_fixture.py` (tiny CLIP tower with the "default" strategy and
//! llava-hf tensor names; tiny SigLIP tower with "full" and Transformers 5's names).

use candle_core::{DType, Device, Tensor};
use omnistage_engines::media::vision::VisionEncoder;
use omnistage_engines::media::{MediaEncoder, PreparedMedia};
use omnistage_engines::tiny::{write_tiny_vision, TinyVisionSpec, TinyVisionTower};
use omnistage_stages::{EngineError, HiddenStates, MediaData, PcmAudio, RgbImages};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/vision_tiny")
        .join(name)
}

fn io(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("io.safetensors"), &Device::Cpu).unwrap()
}

fn load(dir: &Path) -> VisionEncoder {
    VisionEncoder::load(dir, DType::F32, &Device::Cpu).unwrap()
}

fn rgb(width: usize, height: usize, pixels: Vec<u8>) -> MediaData {
    MediaData::Image(RgbImages {
        pixels: pixels.into(),
        n: 1,
        height,
        width,
    })
}

/// The fixture's test image, decoded from its PNG.
fn test_image() -> MediaData {
    let img = image::open(fixture("image.png")).unwrap().to_rgb8();
    let (w, h) = img.dimensions();
    rgb(w as usize, h as usize, img.into_raw())
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn encode_one(enc: &mut VisionEncoder, p: &PreparedMedia) -> HiddenStates {
    enc.encode(&[p]).unwrap().remove(0)
}

/// (1) Transformers' pixel_values through our tower and projector give its features.
#[test]
fn hf_pixel_values_give_hf_features() {
    for name in ["clip", "siglip"] {
        let io = io(name);
        let mut enc = load(&fixture(name));
        let want = &io["features"];
        let (_, rows, dim) = want.dims3().unwrap();
        assert_eq!((enc.rows(), enc.output_dim()), (rows, dim), "{name}");
        let input = io["pixel_values"].squeeze(0).unwrap();
        let out = encode_one(&mut enc, &PreparedMedia { input, rows });
        assert_eq!((out.rows, out.dim), (rows, dim));
        let d = max_abs(&out.data, &flat(want));
        println!("{name}: features from HF pixel_values, max |diff| = {d:.3e}");
        assert!(d <= 1e-4, "{name}: {d}");
    }
}

/// (2) Our preprocessing (a port of Pillow's resampling) against Transformers' PIL-backend image
/// processors, and end to end. The `image` crate's Catmull-Rom resize (what a naive port would
/// use) is measured alongside: it differs from Pillow's bicubic by whole 8-bit levels.
#[test]
fn our_preprocessing_matches_hf() {
    // Pillow computes 8-bit fixed point exactly like our port, so the pixels agree up to f32
    // rounding of the normalisation; allow 1e-5 (one 8-bit level is 1/255/0.26 ≈ 0.015).
    const PIXEL_TOL: f32 = 1e-5;
    // With pixels that close, the features agree as closely as in test (1).
    const FEATURE_TOL: f32 = 1e-4;
    for name in ["clip", "siglip"] {
        let io = io(name);
        let mut enc = load(&fixture(name));
        let p = enc.prepare(&test_image()).unwrap();
        let hf = io["pixel_values"].squeeze(0).unwrap();
        assert_eq!(p.input.dims(), hf.dims());
        let dp = max_abs(&flat(&p.input), &flat(&hf));
        let out = encode_one(&mut enc, &p);
        let df = max_abs(&out.data, &flat(&io["features"]));
        println!("{name}: our pixels vs HF max |diff| = {dp:.3e}; features {df:.3e}");
        assert!(dp <= PIXEL_TOL, "{name}: pixels differ by {dp}");
        assert!(df <= FEATURE_TOL, "{name}: features differ by {df}");
    }

    // The CLIP processor with the `image` crate's resize instead: 40×28 → 45×32 Catmull-Rom,
    // crop 32×32 at x = 6, OpenAI mean/std.
    let img = image::open(fixture("image.png")).unwrap().to_rgb8();
    let resized = image::imageops::resize(&img, 45, 32, image::imageops::FilterType::CatmullRom);
    let mean = [0.481_454_66f32, 0.457_827_5, 0.408_210_73];
    let std = [0.268_629_54f32, 0.261_302_6, 0.275_777_1];
    let mut crate_px = vec![0f32; 3 * 32 * 32];
    for y in 0..32 {
        for x in 0..32 {
            let px = resized.get_pixel(x as u32 + 6, y as u32);
            for c in 0..3 {
                let v = (f64::from(px[c]) / 255.0) as f32;
                crate_px[c * 1024 + y * 32 + x] = (v - mean[c]) / std[c];
            }
        }
    }
    let hf = flat(&io("clip")["pixel_values"]);
    let d_crate = max_abs(&crate_px, &hf);
    println!(
        "clip: image crate CatmullRom vs HF max |diff| = {d_crate:.3e} (≈ {:.1} 8-bit levels)",
        d_crate * 0.2686 * 255.0
    );
    assert!(
        d_crate > PIXEL_TOL,
        "the image crate unexpectedly matches Pillow"
    );
}

/// (3) A batch of three images in one forward equals each alone.
#[test]
fn batched_encode_equals_one_at_a_time() {
    for name in ["clip", "siglip"] {
        let mut enc = load(&fixture(name));
        let a = test_image();
        let MediaData::Image(img) = &a else {
            unreachable!()
        };
        let flipped: Vec<u8> = img
            .pixels
            .chunks_exact(img.width * 3)
            .rev()
            .flatten()
            .copied()
            .collect();
        let b = rgb(img.width, img.height, flipped);
        let c = rgb(
            23,
            57,
            (0..23 * 57 * 3).map(|i| ((i * 7919) % 256) as u8).collect(),
        );
        let prepared: Vec<PreparedMedia> =
            [a, b, c].iter().map(|m| enc.prepare(m).unwrap()).collect();
        let refs: Vec<&PreparedMedia> = prepared.iter().collect();
        let batched = enc.encode(&refs).unwrap();
        assert_eq!(batched.len(), 3);
        let mut worst = 0f32;
        for (p, got) in prepared.iter().zip(&batched) {
            let alone = encode_one(&mut enc, p);
            assert_eq!((got.rows, got.dim), (alone.rows, alone.dim));
            worst = worst.max(max_abs(&got.data, &alone.data));
        }
        // The three images really differ.
        assert!(max_abs(&batched[0].data, &batched[1].data) > 1e-2);
        println!("{name}: batch of 3 vs alone max |diff| = {worst:.3e}");
        assert!(worst <= 1e-5, "{name}: {worst}");
        assert!(enc.encode(&[]).unwrap().is_empty());
    }
}

/// (4) The tiny writer's checkpoints load and encode to `rows × output_dim`; same seed, same
/// bytes.
#[test]
fn tiny_checkpoint_loads_and_encodes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut siglip = TinyVisionSpec::tiny(48);
    siglip.tower = TinyVisionTower::Siglip;
    siglip.select_strategy = "full".into();
    siglip.vision_feature_layer = -1;
    for (i, spec) in [TinyVisionSpec::tiny(24), siglip].into_iter().enumerate() {
        let dir = tmp.path().join(format!("v{i}"));
        write_tiny_vision(&dir, &spec, 7).unwrap();
        let mut enc = load(&dir);
        assert_eq!(enc.output_dim(), spec.out_dim);
        assert_eq!(enc.rows(), spec.rows());
        assert_eq!(enc.modality(), omnistage_stages::Modality::Image);
        let img = rgb(50, 30, (0..50 * 30 * 3).map(|i| (i % 253) as u8).collect());
        let p = enc.prepare(&img).unwrap();
        assert_eq!(p.input.dims(), &[3, 32, 32]);
        assert_eq!(p.rows, spec.rows());
        let out = encode_one(&mut enc, &p);
        assert_eq!((out.rows, out.dim), (spec.rows(), spec.out_dim));
        assert_eq!(out.data.len(), out.rows * out.dim);
        assert!(out.data.iter().all(|v| v.is_finite()));
        let spread = out.data.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(spread > 1e-3, "{spread}");

        // Deterministic files.
        let again = tmp.path().join(format!("again{i}"));
        write_tiny_vision(&again, &spec, 7).unwrap();
        for f in [
            "config.json",
            "preprocessor_config.json",
            "model.safetensors",
        ] {
            assert_eq!(
                std::fs::read(dir.join(f)).unwrap(),
                std::fs::read(again.join(f)).unwrap(),
                "{f}"
            );
        }
    }
    // bf16 loads and encodes close to f32.
    let dir = tmp.path().join("v0");
    let mut f32_enc = load(&dir);
    let mut bf16 = VisionEncoder::load(&dir, DType::BF16, &Device::Cpu).unwrap();
    let img = test_image();
    let pa = f32_enc.prepare(&img).unwrap();
    let pb = bf16.prepare(&img).unwrap();
    assert_eq!(pb.input.dtype(), DType::BF16);
    let a = encode_one(&mut f32_enc, &pa);
    let b = encode_one(&mut bf16, &pb);
    let scale = a.data.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(max_abs(&a.data, &b.data) <= 0.05 * scale.max(1.0));
}

fn copy_fixture(to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in [
        "config.json",
        "preprocessor_config.json",
        "model.safetensors",
    ] {
        std::fs::copy(fixture("clip").join(f), to.join(f)).unwrap();
    }
}

fn load_err(dir: &Path) -> String {
    VisionEncoder::load(dir, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string()
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string(&v).unwrap()).unwrap();
}

/// (5) A missing field or tensor is named in the error.
#[test]
fn load_errors_name_the_field_or_tensor() {
    let tmp = tempfile::tempdir().unwrap();

    let dir = tmp.path().join("no_field");
    copy_fixture(&dir);
    edit_json(&dir.join("config.json"), |v| {
        v["vision_config"]
            .as_object_mut()
            .unwrap()
            .remove("patch_size");
    });
    let e = load_err(&dir);
    println!("{e}");
    assert!(
        e.contains("config.json") && e.contains("vision_config.patch_size"),
        "{e}"
    );

    let dir = tmp.path().join("bad_strategy");
    copy_fixture(&dir);
    edit_json(&dir.join("config.json"), |v| {
        v["vision_feature_select_strategy"] = "cls".into();
    });
    let e = load_err(&dir);
    assert!(e.contains("vision_feature_select_strategy"), "{e}");

    let dir = tmp.path().join("bad_layer");
    copy_fixture(&dir);
    edit_json(&dir.join("config.json"), |v| {
        v["vision_feature_layer"] = (-9).into()
    });
    let e = load_err(&dir);
    assert!(e.contains("vision_feature_layer"), "{e}");

    let dir = tmp.path().join("crop");
    copy_fixture(&dir);
    edit_json(&dir.join("preprocessor_config.json"), |v| {
        v["crop_size"] = serde_json::json!({"height": 30, "width": 32});
    });
    let e = load_err(&dir);
    assert!(
        e.contains("preprocessor_config.json") && e.contains("crop_size"),
        "{e}"
    );

    let dir = tmp.path().join("no_tensor");
    copy_fixture(&dir);
    let path = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let missing = "vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight";
    assert!(tensors.remove(missing).is_some());
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let e = load_err(&dir);
    println!("{e}");
    assert!(
        e.contains("model.safetensors") && e.contains(missing),
        "{e}"
    );

    // Layer 2's tensors are never read with vision_feature_layer −2 of 3 layers.
    let dir = tmp.path().join("unused_layer");
    copy_fixture(&dir);
    let path = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    tensors.retain(|k, _| !k.contains("encoder.layers.2."));
    candle_core::safetensors::save(&tensors, &path).unwrap();
    load(&dir);

    let dir = tmp.path().join("bad_shape");
    copy_fixture(&dir);
    let path = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let name = "multi_modal_projector.linear_2.weight";
    tensors.insert(
        name.into(),
        Tensor::zeros((24, 23), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let e = load_err(&dir);
    assert!(e.contains(name), "{e}");

    let e = load_err(&tmp.path().join("absent"));
    assert!(e.contains("config.json"), "{e}");
}

/// (6) Media the encoder cannot take is a client error, never a panic.
#[test]
fn unusable_media_is_invalid_input() {
    let enc = load(&fixture("clip"));
    let invalid = |m: MediaData| {
        assert!(
            matches!(enc.prepare(&m), Err(EngineError::InvalidInput(_))),
            "{m:?}"
        )
    };
    invalid(MediaData::Audio(PcmAudio {
        samples: vec![0.1; 160].into(),
        sample_rate: 16_000,
    }));
    invalid(rgb(0, 0, Vec::new()));
    invalid(rgb(0, 5, Vec::new()));
    invalid(rgb(4, 4, vec![0; 10]));
    invalid(MediaData::Image(RgbImages {
        pixels: vec![0; 2 * 4 * 4 * 3].into(),
        n: 2,
        height: 4,
        width: 4,
    }));
    invalid(rgb(usize::MAX / 2, 3, Vec::new()));
    // Larger than MAX_IMAGE_SIDE on a side.
    invalid(rgb(20_000, 1, vec![0; 20_000 * 3]));
    // Tiny images are fine (upscaled).
    let p = enc.prepare(&rgb(1, 1, vec![9, 99, 199])).unwrap();
    assert_eq!(p.input.dims(), &[3, 32, 32]);
    // A wrongly shaped input handed to encode is refused, not a panic.
    let mut enc = enc;
    let bad = PreparedMedia {
        input: Tensor::zeros((3, 8, 8), DType::F32, &Device::Cpu).unwrap(),
        rows: 16,
    };
    assert!(matches!(
        enc.encode(&[&bad]),
        Err(EngineError::InvalidInput(_))
    ));
}
