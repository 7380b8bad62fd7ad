//! The Whisper audio encoder against Hugging Face transformers (fixture written by
//! tests/fixtures/make_whisper_fixture.py: a toy Whisper with a 4 s window, a 1 s test clip at
//! 22.05 kHz and 16 kHz, WhisperFeatureExtractor's features and the encoder + pooling +
//! projector output), plus batching, the tiny writer, and error handling.

use candle_core::{DType, Device, Tensor};
use omnistage_engines::media::whisper::{resample, WhisperEncoder, WhisperError};
use omnistage_engines::media::{MediaEncoder, PreparedMedia};
use omnistage_engines::tiny::{write_tiny_whisper, TinyWhisperSpec};
use omnistage_stages::{EngineError, HiddenStates, MediaData, PcmAudio, RgbImages};
use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Measured 1.6e-5 (f64 here vs the extractor's f32 torch path, which differs from the
/// extractor's own numpy path by the same 1.6e-5).
const FEATURE_TOL: f32 = 1e-4;
/// Measured 1.2e-6 (same features, f32 both sides; outputs of magnitude ~1).
const TOWER_TOL: f32 = 1e-5;
/// Measured 1.1e-6: our features' error passed through the model.
const END_TO_END_TOL: f32 = 1e-5;
/// Our resampler (rubato's FFT resampler) against the fixture's windowed-sinc reference on a
/// signal band-limited to 5 kHz (peak 0.55), the reference quantised to 16 bits: measured
/// 2.1e-5 max abs, below one quantisation step (3.1e-5).
const RESAMPLE_TOL: f32 = 1e-4;
/// End to end from the 22.05 kHz clip against transformers on the reference-resampled clip:
/// measured 3.0e-5.
const RESAMPLED_END_TO_END_TOL: f32 = 2e-4;
/// Items encoded together against alone (f32).
const BATCH_TOL: f32 = 1e-5;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/whisper_tiny")
}

struct Io {
    pcm_22k: Vec<f32>,
    pcm_16k: Vec<f32>,
    /// `[80, 400]` row-major.
    features: Vec<f32>,
    out: Vec<f32>,
}

const OUT_ROWS: usize = 25;
const OUT_DIM: usize = 48;
const MELS: usize = 80;
const FRAMES: usize = 400;

fn io() -> Io {
    let bytes = std::fs::read(fixture().join("io.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let f32s = |name: &str| -> Vec<f32> {
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        t.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let pcm = |name: &str| -> Vec<f32> {
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), Dtype::I16, "{name}");
        t.data()
            .chunks_exact(2)
            .map(|c| f32::from(i16::from_le_bytes([c[0], c[1]])) / 32768.0)
            .collect()
    };
    let head = f32s("features_head");
    let floor = f32s("features_floor")[0];
    let head_frames = head.len() / MELS;
    let mut features = vec![floor; MELS * FRAMES];
    for m in 0..MELS {
        features[m * FRAMES..m * FRAMES + head_frames]
            .copy_from_slice(&head[m * head_frames..(m + 1) * head_frames]);
    }
    let out = f32s("out");
    assert_eq!(out.len(), OUT_ROWS * OUT_DIM);
    Io {
        pcm_22k: pcm("pcm_22k"),
        pcm_16k: pcm("pcm_16k"),
        features,
        out,
    }
}

fn load(dir: &Path) -> WhisperEncoder {
    WhisperEncoder::load(dir, DType::F32, &Device::Cpu).unwrap()
}

fn audio(samples: &[f32], rate: u32) -> MediaData {
    MediaData::Audio(PcmAudio {
        samples: Arc::from(samples),
        sample_rate: rate,
    })
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn encode_one(enc: &mut WhisperEncoder, media: &MediaData) -> HiddenStates {
    let p = enc.prepare(media).unwrap();
    let mut out = enc.encode(&[&p]).unwrap();
    assert_eq!(out.len(), 1);
    out.pop().unwrap()
}

#[test]
fn log_mel_matches_the_feature_extractor() {
    let enc = load(&fixture());
    let io = io();
    let ours = enc.log_mel().compute(&io.pcm_16k);
    let err = max_abs_diff(&ours, &io.features);
    println!("log-mel vs WhisperFeatureExtractor: max abs {err:.3e}");
    assert!(err < FEATURE_TOL, "{err}");
}

/// candle-transformers' `pcm_to_mel` (whisper.cpp's algorithm) with the extractor's filters:
/// uncentred frames and a doubled power spectrum put it far from the extractor (measured
/// 1.45 max abs on this clip), which is why `LogMel` exists.
#[test]
fn candle_pcm_to_mel_is_not_the_extractor() {
    use candle_transformers::models::whisper::{audio::pcm_to_mel, Config};
    let enc = load(&fixture());
    let io = io();
    let filters: Vec<f32> = enc
        .log_mel()
        .filters()
        .iter()
        .flatten()
        .map(|&w| w as f32)
        .collect();
    let cfg = Config {
        num_mel_bins: MELS,
        max_source_positions: 200,
        d_model: 32,
        encoder_attention_heads: 4,
        encoder_layers: 2,
        vocab_size: 16,
        max_target_positions: 8,
        decoder_attention_heads: 4,
        decoder_layers: 1,
        suppress_tokens: vec![],
    };
    let mut padded = io.pcm_16k.clone();
    padded.resize(64000, 0.0);
    let mel = pcm_to_mel(&cfg, &padded, &filters);
    let n_len = mel.len() / MELS;
    assert!(n_len >= FRAMES);
    let mut window = Vec::with_capacity(MELS * FRAMES);
    for m in 0..MELS {
        window.extend_from_slice(&mel[m * n_len..m * n_len + FRAMES]);
    }
    let err = max_abs_diff(&window, &io.features);
    println!("candle pcm_to_mel vs WhisperFeatureExtractor: max abs {err:.3e}");
    assert!(err > 0.05, "{err}");
}

#[test]
fn tower_matches_transformers_on_its_features() {
    let enc = load(&fixture());
    let io = io();
    let x = Tensor::from_vec(io.features.clone(), (1, MELS, FRAMES), &Device::Cpu).unwrap();
    let y = enc.tower().forward(&x).unwrap();
    assert_eq!(y.dims(), &[1, 100, OUT_DIM]);
    let y: Vec<f32> = y
        .narrow(1, 0, OUT_ROWS)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let err = max_abs_diff(&y, &io.out);
    println!("encoder + projector vs transformers: max abs {err:.3e}");
    assert!(err < TOWER_TOL, "{err}");
}

#[test]
fn end_to_end_from_16k_pcm() {
    let mut enc = load(&fixture());
    assert_eq!(enc.output_dim(), OUT_DIM);
    let io = io();
    let p = enc.prepare(&audio(&io.pcm_16k, 16000)).unwrap();
    assert_eq!(p.rows, OUT_ROWS);
    assert_eq!(p.input.dims(), &[1, MELS, FRAMES]);
    let h = enc.encode(&[&p]).unwrap().pop().unwrap();
    assert_eq!((h.rows, h.dim), (OUT_ROWS, OUT_DIM));
    let err = max_abs_diff(&h.data, &io.out);
    println!("16 kHz PCM end to end vs transformers: max abs {err:.3e}");
    assert!(err < END_TO_END_TOL, "{err}");
}

#[test]
fn resampled_22k_clip_matches_the_reference() {
    let mut enc = load(&fixture());
    let io = io();
    let ours = resample(&io.pcm_22k, 22050, 16000).unwrap();
    assert_eq!(ours.len(), io.pcm_16k.len());
    let err = max_abs_diff(&ours, &io.pcm_16k);
    println!("rubato 22.05 -> 16 kHz vs windowed-sinc reference: max abs {err:.3e}");
    assert!(err < RESAMPLE_TOL, "{err}");

    let h = encode_one(&mut enc, &audio(&io.pcm_22k, 22050));
    assert_eq!((h.rows, h.dim), (OUT_ROWS, OUT_DIM));
    let err = max_abs_diff(&h.data, &io.out);
    println!("22.05 kHz PCM end to end vs transformers on the reference resample: {err:.3e}");
    assert!(err < RESAMPLED_END_TO_END_TOL, "{err}");
}

/// Rows by Qwen2-Audio's formula for `samples` at 16 kHz (one window, hop 160, pool 2).
fn expected_rows(samples: usize) -> usize {
    let frames = samples.div_ceil(160);
    let enc_rows = (frames - 1) / 2 + 1;
    (enc_rows - 2) / 2 + 1
}

#[test]
fn a_batch_equals_each_item_alone() {
    let mut enc = load(&fixture());
    let io = io();
    let clips = [
        audio(&io.pcm_16k[..4800], 16000),
        audio(&io.pcm_22k[..15435], 22050),
        audio(&io.pcm_16k, 16000),
    ];
    let prepared: Vec<PreparedMedia> = clips.iter().map(|c| enc.prepare(c).unwrap()).collect();
    // 0.3 s and 0.7 s (11200 samples after resampling) and 1 s.
    let rows: Vec<usize> = prepared.iter().map(|p| p.rows).collect();
    assert_eq!(
        rows,
        vec![
            expected_rows(4800),
            expected_rows(11200),
            expected_rows(16000)
        ]
    );
    assert_eq!(rows, vec![7, 17, 25]);
    let refs: Vec<&PreparedMedia> = prepared.iter().collect();
    let together = enc.encode(&refs).unwrap();
    assert_eq!(together.len(), 3);
    for (i, p) in prepared.iter().enumerate() {
        let alone = enc.encode(&[p]).unwrap().pop().unwrap();
        assert_eq!((together[i].rows, together[i].dim), (rows[i], OUT_DIM));
        let err = max_abs_diff(&together[i].data, &alone.data);
        assert!(err <= BATCH_TOL, "item {i}: {err}");
    }
    assert!(enc.encode(&[]).unwrap().is_empty());
}

#[test]
fn a_long_clip_spans_windows() {
    let mut enc = load(&fixture());
    let io = io();
    // 6 s at 16 kHz: a full 4 s window and 2 s more.
    let long: Vec<f32> = (0..96000)
        .map(|i| io.pcm_16k[i % 16000] * (1.0 - i as f32 / 192000.0))
        .collect();
    let p = enc.prepare(&audio(&long, 16000)).unwrap();
    assert_eq!(p.input.dims(), &[2, MELS, FRAMES]);
    assert_eq!(p.rows, 100 + expected_rows(32000));
    assert_eq!(enc.rows_for_samples(96000), p.rows);
    let first = encode_one(&mut enc, &audio(&long[..64000], 16000));
    let rest = encode_one(&mut enc, &audio(&long[64000..], 16000));
    let short = enc.prepare(&audio(&io.pcm_16k, 16000)).unwrap();
    // A two-window item batched with a one-window item.
    let both = enc.encode(&[&p, &short]).unwrap();
    let joined = HiddenStates::concat(&[first, rest]).unwrap();
    assert_eq!(both[0].rows, joined.rows);
    assert!(max_abs_diff(&both[0].data, &joined.data) <= BATCH_TOL);
    assert!(max_abs_diff(&both[1].data, &io.out) < END_TO_END_TOL);
    // A trailing window too short for a row is dropped: 4 s + 2 samples.
    let p = enc.prepare(&audio(&long[..64002], 16000)).unwrap();
    assert_eq!((p.input.dims()[0], p.rows), (1, 100));
}

#[test]
fn tiny_writer_checkpoint_loads_and_encodes() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    let spec = TinyWhisperSpec::tiny(64);
    write_tiny_whisper(&a, &spec, 7).unwrap();
    write_tiny_whisper(&b, &spec, 7).unwrap();
    write_tiny_whisper(&c, &spec, 8).unwrap();
    for f in [
        "config.json",
        "preprocessor_config.json",
        "model.safetensors",
    ] {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap()
        );
    }
    assert_ne!(
        std::fs::read(a.join("model.safetensors")).unwrap(),
        std::fs::read(c.join("model.safetensors")).unwrap()
    );
    let mut enc = load(&a);
    assert_eq!(enc.output_dim(), 64);
    assert_eq!(enc.max_seconds(), 16.0);
    enc.set_max_windows(2);
    assert_eq!(enc.max_seconds(), 8.0);
    let io = io();
    let h = encode_one(&mut enc, &audio(&io.pcm_22k, 22050));
    assert_eq!((h.rows, h.dim), (25, 64));
    assert!(h.data.iter().all(|v| v.is_finite()));
    let spread = h.data.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(spread > 0.1, "{spread}");
    // Other seeds give other outputs.
    let h2 = encode_one(&mut load(&c), &audio(&io.pcm_22k, 22050));
    assert!(max_abs_diff(&h.data, &h2.data) > 1e-3);
    // bf16 weights load and run too.
    let mut half = WhisperEncoder::load(&a, DType::BF16, &Device::Cpu).unwrap();
    let h3 = encode_one(&mut half, &audio(&io.pcm_22k, 22050));
    assert!(max_abs_diff(&h.data, &h3.data) < 0.5);
}

/// Copies the fixture into a temp dir and lets `edit` change it.
fn edited(edit: impl FnOnce(&Path)) -> (tempfile::TempDir, String) {
    let tmp = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "preprocessor_config.json",
        "model.safetensors",
    ] {
        std::fs::copy(fixture().join(f), tmp.path().join(f)).unwrap();
    }
    edit(tmp.path());
    let err = WhisperEncoder::load(tmp.path(), DType::F32, &Device::Cpu).unwrap_err();
    (tmp, err.to_string())
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn drop_tensor(dir: &Path, name: &str) {
    let path = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    assert!(tensors.remove(name).is_some(), "{name}");
    candle_core::safetensors::save(&tensors, &path).unwrap();
}

/// A change to a checkpoint folder, and the words its load error must contain.
type BreakCase<'a> = (Box<dyn FnOnce(&Path)>, Vec<&'a str>);

#[test]
fn bad_checkpoints_name_the_field_or_tensor() {
    let cases: Vec<BreakCase> = vec![
        (
            Box::new(|d: &Path| {
                edit_json(&d.join("config.json"), |v| {
                    v["encoder_attention_heads"] = 5.into()
                })
            }),
            vec!["config.json", "encoder_attention_heads"],
        ),
        (
            Box::new(|d: &Path| {
                edit_json(&d.join("config.json"), |v| {
                    v.as_object_mut().unwrap().remove("d_model");
                })
            }),
            vec!["config.json", "d_model"],
        ),
        (
            Box::new(|d: &Path| {
                edit_json(&d.join("config.json"), |v| {
                    v["projector"]["pool"] = 0.into()
                })
            }),
            vec!["config.json", "projector.pool"],
        ),
        (
            Box::new(|d: &Path| {
                edit_json(&d.join("config.json"), |v| {
                    v["activation_function"] = "swiglu".into()
                })
            }),
            vec!["config.json", "activation_function"],
        ),
        (
            Box::new(|d: &Path| {
                edit_json(&d.join("preprocessor_config.json"), |v| {
                    v["nb_max_frames"] = 3000.into()
                })
            }),
            vec!["preprocessor_config.json", "nb_max_frames"],
        ),
        (
            Box::new(|d: &Path| {
                edit_json(&d.join("preprocessor_config.json"), |v| {
                    v["feature_size"] = 128.into()
                })
            }),
            vec!["preprocessor_config.json", "feature_size", "num_mel_bins"],
        ),
        (
            Box::new(|d: &Path| drop_tensor(d, "model.encoder.layers.1.fc2.weight")),
            vec!["model.encoder.layers.1.fc2.weight"],
        ),
        (
            Box::new(|d: &Path| drop_tensor(d, "multi_modal_projector.linear.bias")),
            vec!["multi_modal_projector.linear.bias"],
        ),
        (
            Box::new(|d: &Path| std::fs::remove_file(d.join("preprocessor_config.json")).unwrap()),
            vec!["preprocessor_config.json"],
        ),
        (
            Box::new(|d: &Path| std::fs::remove_file(d.join("model.safetensors")).unwrap()),
            vec!["model.safetensors"],
        ),
    ];
    for (edit, needles) in cases {
        let (_tmp, msg) = edited(edit);
        for n in needles {
            assert!(msg.contains(n), "{msg:?} does not name {n:?}");
        }
    }
    assert!(matches!(
        WhisperEncoder::load(&fixture(), DType::U8, &Device::Cpu),
        Err(WhisperError::Dtype(DType::U8))
    ));
}

#[test]
fn without_a_projector_the_encoder_rows_are_written() {
    let tmp = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "preprocessor_config.json",
        "model.safetensors",
    ] {
        std::fs::copy(fixture().join(f), tmp.path().join(f)).unwrap();
    }
    edit_json(&tmp.path().join("config.json"), |v| {
        v.as_object_mut().unwrap().remove("projector");
    });
    // And without the stored position table (it is then computed).
    drop_tensor(tmp.path(), "model.encoder.embed_positions.weight");
    let mut enc = load(tmp.path());
    assert_eq!(enc.output_dim(), 32);
    let h = encode_one(&mut enc, &audio(&io().pcm_16k, 16000));
    assert_eq!((h.rows, h.dim), (50, 32));
    // The computed table equals the stored one closely: same rows as the full model's encoder.
    let full = load(&fixture());
    let x = Tensor::from_vec(io().features, (1, MELS, FRAMES), &Device::Cpu).unwrap();
    let a: Vec<f32> = full
        .tower()
        .encode(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = enc
        .tower()
        .encode(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-4);
}

fn invalid(r: Result<PreparedMedia, EngineError>) -> String {
    match r {
        Err(EngineError::InvalidInput(m)) => m,
        other => panic!("expected InvalidInput, got {other:?}"),
    }
}

#[test]
fn unusable_items_are_invalid_input() {
    let enc = load(&fixture());
    let image = MediaData::Image(RgbImages {
        pixels: Arc::from(vec![0u8; 12]),
        n: 1,
        height: 2,
        width: 2,
    });
    assert!(invalid(enc.prepare(&image)).contains("image"));
    assert!(invalid(enc.prepare(&audio(&[], 16000))).contains("empty"));
    // max_seconds is 4 windows of 4 s.
    assert_eq!(enc.max_seconds(), 16.0);
    let long = vec![0.1f32; 16 * 22050 + 1];
    let msg = invalid(enc.prepare(&audio(&long, 22050)));
    assert!(msg.contains("16.00 s"), "{msg}");
    assert!(enc.prepare(&audio(&long[..16 * 22050], 22050)).is_ok());
    // A clip too short for a row is padded with silence to one row, not refused.
    let blip = enc.prepare(&audio(&[0.1; 300], 16000)).unwrap();
    assert_eq!(blip.rows, 1);
    assert_eq!(enc.rows_for_samples(300), 1);
    let blip24k = enc.prepare(&audio(&[0.1; 128], 24000)).unwrap();
    assert_eq!(blip24k.rows, 1);
    assert!(invalid(enc.prepare(&audio(&[0.1; 1000], 0))).contains("sample rate"));
    assert!(invalid(enc.prepare(&audio(&[0.1, f32::NAN, 0.2], 16000))).contains("non-finite"));
    assert_eq!(enc.modality(), omnistage_stages::Modality::Audio);
}
