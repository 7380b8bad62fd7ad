//! The SNAC codec decoder: one-shot parity with candle-transformers' `snac::Model` and with the
//! Python `snac` package, streamed decodes against one-shot ones at many chunkings (one stream
//! and several stepped together), seeded noise, weight-norm layouts, and invalid codes.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use omnistage_engines::audio::codec::{Codec, CodecError, CodecStream};
use omnistage_engines::audio::snac::{NoiseOrigin, SnacCodec, SnacConfig, SnacStream};
use omnistage_engines::tiny::{write_tiny_snac, TinySnacSpec};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn tiny_spec(noise: bool) -> TinySnacSpec {
    TinySnacSpec {
        noise,
        ..TinySnacSpec::tiny()
    }
}

fn write(dir: &Path, spec: &TinySnacSpec, seed: u64) {
    write_tiny_snac(dir, spec, seed).unwrap();
}

fn load(dir: &Path) -> SnacCodec {
    SnacCodec::load(dir, DType::F32, &Device::Cpu).unwrap()
}

/// `frames` frames of seeded pseudo-random codes in the canonical layout.
fn codes(codec: &SnacCodec, frames: usize, seed: u64) -> Vec<u32> {
    let info = codec.info();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..frames * info.codes_per_frame)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % info.codebook_size as u64) as u32
        })
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn rms(a: &[f32]) -> f32 {
    (a.iter().map(|x| x * x).sum::<f32>() / a.len() as f32).sqrt()
}

#[test]
fn one_shot_matches_candle_transformers_snac() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &tiny_spec(false), 11);
    let codec = load(dir.path());
    let frames = 9;
    let codes = codes(&codec, frames, 3);
    let ours = codec.decode(&codes, 0).unwrap();
    assert_eq!(ours.len(), frames * codec.info().samples_per_frame);

    // candle-transformers reads the same two files.
    let text = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    let cfg: candle_transformers::models::snac::Config = serde_json::from_str(&text).unwrap();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.path().join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let model = candle_transformers::models::snac::Model::new(&cfg, vb).unwrap();
    let level_codes = codec.level_codes(&[&codes]).unwrap();
    let refs: Vec<&Tensor> = level_codes.iter().collect();
    // candle's decoder stops before the final `nn.Tanh()` of the Python decoder.
    let theirs = model.decode(&refs).unwrap().tanh().unwrap();
    assert_eq!(theirs.dims(), &[1, 1, ours.len()]);
    let theirs = theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let diff = max_abs_diff(&ours, &theirs);
    println!(
        "one-shot vs candle-transformers snac: max |diff| = {diff:e} (output rms {})",
        rms(&ours)
    );
    assert!(diff <= 1e-4, "differs from candle by {diff}");
    assert!(rms(&ours) > 0.05, "the tiny model decodes to near silence");
}

/// Streams `codes` in chunks of `chunk` frames, stepping after each push; checks that samples
/// come out only once their right context has arrived.
fn stream_all(codec: &SnacCodec, codes: &[u32], chunk: usize, seed: u64) -> Vec<f32> {
    let info = codec.info().clone();
    let right = codec.receptive_field().right_frames;
    let mut stream = codec.open(seed);
    let mut out = Vec::new();
    let chunks: Vec<&[u32]> = codes.chunks(chunk * info.codes_per_frame).collect();
    for (i, c) in chunks.iter().enumerate() {
        let last = i + 1 == chunks.len();
        stream.push(c, last).unwrap();
        let mut samples = codec.step(&mut [&mut stream]).unwrap();
        out.append(&mut samples[0]);
        assert!(!stream.has_work(), "one step decodes everything ready");
        let expected = if last {
            stream.frames_pushed()
        } else {
            stream.frames_pushed().saturating_sub(right)
        };
        assert_eq!(stream.samples_emitted(), expected * info.samples_per_frame);
        assert_eq!(out.len(), stream.samples_emitted());
    }
    assert!(stream.is_done());
    out
}

#[test]
fn streamed_decode_equals_one_shot_at_every_chunking() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &tiny_spec(true), 5);
    let codec = load(dir.path());
    let field = codec.receptive_field();
    println!("tiny receptive field: {field:?}");
    let frames = 23;
    let codes = codes(&codec, frames, 9);
    let seed = 1234;
    let one_shot = codec.decode(&codes, seed).unwrap();
    assert_eq!(one_shot.len(), frames * codec.info().samples_per_frame);
    for chunk in [1, 2, 3, 5, 7, frames] {
        let streamed = stream_all(&codec, &codes, chunk, seed);
        assert_eq!(streamed.len(), one_shot.len(), "chunk {chunk}");
        let diff = max_abs_diff(&streamed, &one_shot);
        println!("chunk {chunk}: streamed vs one-shot max |diff| = {diff:e}");
        assert!(diff <= 1e-4, "chunk {chunk}: differs by {diff}");
    }
}

#[test]
fn streams_stepped_together_equal_their_one_shot_decodes() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &tiny_spec(true), 6);
    let codec = load(dir.path());
    let cpf = codec.info().codes_per_frame;
    // (frames, chunk, seed): two streams share a chunking so their windows batch together.
    let plan = [
        (17, 2, 1u64),
        (17, 2, 2),
        (12, 3, 3),
        (20, 5, 4),
        (9, 1, 5),
        (14, 7, 6),
    ];
    let all_codes: Vec<Vec<u32>> = plan
        .iter()
        .enumerate()
        .map(|(i, &(frames, _, _))| codes(&codec, frames, 100 + i as u64))
        .collect();
    let mut streams: Vec<SnacStream> = plan.iter().map(|&(_, _, s)| codec.open(s)).collect();
    let mut outs = vec![Vec::new(); plan.len()];
    let mut round = 0;
    while streams.iter().any(|s| !s.is_done()) {
        for (i, stream) in streams.iter_mut().enumerate() {
            let (frames, chunk, _) = plan[i];
            let from = round * chunk;
            if from < frames {
                let to = (from + chunk).min(frames);
                let c = &all_codes[i][from * cpf..to * cpf];
                stream.push(c, to == frames).unwrap();
            }
        }
        let mut refs: Vec<&mut SnacStream> = streams.iter_mut().collect();
        let new = codec.step(&mut refs).unwrap();
        assert_eq!(new.len(), plan.len());
        for (out, mut samples) in outs.iter_mut().zip(new) {
            out.append(&mut samples);
        }
        round += 1;
        assert!(round < 100, "streams never finish");
    }
    for (i, &(frames, chunk, seed)) in plan.iter().enumerate() {
        let one_shot = codec.decode(&all_codes[i], seed).unwrap();
        assert_eq!(outs[i].len(), frames * codec.info().samples_per_frame);
        let diff = max_abs_diff(&outs[i], &one_shot);
        println!("stream {i} (chunk {chunk}, seed {seed}): max |diff| = {diff:e}");
        assert!(diff <= 1e-4, "stream {i} differs by {diff}");
    }
}

#[test]
fn seeds_select_the_noise() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &tiny_spec(true), 7);
    let codec = load(dir.path());
    let codes = codes(&codec, 6, 1);
    let a = codec.decode(&codes, 1).unwrap();
    let b = codec.decode(&codes, 2).unwrap();
    assert_eq!(
        a,
        codec.decode(&codes, 1).unwrap(),
        "same seed, same samples"
    );
    let diff = max_abs_diff(&a, &b);
    println!("seed 1 vs seed 2: max |diff| = {diff:e}");
    assert!(diff > 1e-3, "different seeds draw the same noise");

    let quiet = tempfile::tempdir().unwrap();
    write(quiet.path(), &tiny_spec(false), 7);
    let codec = load(quiet.path());
    assert_eq!(
        codec.decode(&codes, 1).unwrap(),
        codec.decode(&codes, 2).unwrap()
    );
}

#[test]
fn invalid_codes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &tiny_spec(true), 8);
    let codec = load(dir.path());
    let info = codec.info().clone();
    assert_eq!(info.levels, vec![0, 1, 1, 2, 2, 2, 2]);
    assert_eq!(info.samples_per_frame, 128);
    fn invalid<T>(r: Result<T, CodecError>) -> bool {
        matches!(r, Err(CodecError::InvalidCodes(_)))
    }

    let mut good = codes(&codec, 2, 4);
    assert!(codec.decode(&[], 0).unwrap().is_empty());
    assert!(invalid(codec.decode(&good[..5], 0)), "partial frame");
    good[3] = info.codebook_size as u32;
    assert!(invalid(codec.decode(&good, 0)), "code outside the codebook");
    good[3] = 0;

    let mut stream = codec.open(0);
    assert!(invalid(stream.push(&good[..6], false)));
    good[9] = u32::MAX;
    assert!(invalid(stream.push(&good, false)));
    good[9] = 1;
    assert_eq!(stream.frames_pushed(), 0, "refused pushes change nothing");
    stream.push(&good, true).unwrap();
    assert!(invalid(stream.push(&good, false)), "push after last");
    assert!(invalid(stream.push(&[], true)), "push after last");
    let out = codec.step(&mut [&mut stream]).unwrap();
    assert_eq!(out[0].len(), 2 * info.samples_per_frame);
    assert!(stream.is_done() && !stream.has_work());
    assert!(codec.step(&mut [&mut stream]).unwrap()[0].is_empty());
}

/// Rewrites `model.safetensors` with every `parametrizations.weight.original0/1` pair renamed
/// to `weight_g`/`weight_v` (`folded == false`) or folded into `weight`.
fn rewrite_weight_norm(from: &Path, to: &Path, folded: bool) {
    std::fs::create_dir_all(to).unwrap();
    std::fs::copy(from.join("config.json"), to.join("config.json")).unwrap();
    let tensors =
        candle_core::safetensors::load(from.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut out: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in &tensors {
        if let Some(p) = name.strip_suffix(".parametrizations.weight.original1") {
            let g = &tensors[&format!("{p}.parametrizations.weight.original0")];
            if folded {
                let norm = t
                    .sqr()
                    .unwrap()
                    .sum_keepdim((1, 2))
                    .unwrap()
                    .sqrt()
                    .unwrap();
                let w = t.broadcast_mul(g).unwrap().broadcast_div(&norm).unwrap();
                out.insert(format!("{p}.weight"), w);
            } else {
                out.insert(format!("{p}.weight_v"), t.clone());
                out.insert(format!("{p}.weight_g"), g.clone());
            }
        } else if !name.ends_with(".parametrizations.weight.original0") {
            out.insert(name.clone(), t.clone());
        }
    }
    candle_core::safetensors::save(&out, to.join("model.safetensors")).unwrap();
}

#[test]
fn every_weight_norm_layout_loads_alike() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    write(&base, &tiny_spec(true), 9);
    let codec = load(&base);
    let codes = codes(&codec, 5, 2);
    let reference = codec.decode(&codes, 3).unwrap();
    for folded in [false, true] {
        let other = dir.path().join(format!("folded-{folded}"));
        rewrite_weight_norm(&base, &other, folded);
        let decoded = load(&other).decode(&codes, 3).unwrap();
        let diff = max_abs_diff(&decoded, &reference);
        assert!(diff <= 1e-5, "folded {folded}: differs by {diff}");
    }
}

#[test]
fn tiny_writer_is_deterministic_and_loads_refuse_bad_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySnacSpec::tiny();
    let read = |p: &Path| -> Vec<Vec<u8>> {
        ["config.json", "model.safetensors"]
            .iter()
            .map(|f| std::fs::read(p.join(f)).unwrap())
            .collect()
    };
    let (a, b, c) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    let files = write_tiny_snac(&a, &spec, 1).unwrap();
    assert_eq!(
        files,
        vec![a.join("config.json"), a.join("model.safetensors")]
    );
    write(&b, &spec, 1);
    write(&c, &spec, 2);
    assert_eq!(read(&a), read(&b));
    assert_ne!(read(&a)[1], read(&c)[1]);
    println!("tiny SNAC: {} parameters", spec.num_parameters());

    // No weights, or a config with attention: a load error, not a panic.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::copy(a.join("config.json"), empty.join("config.json")).unwrap();
    let err = SnacCodec::load(&empty, DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(err, CodecError::Load(_)), "{err}");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("config.json")).unwrap()).unwrap();
    cfg["attn_window_size"] = 32.into();
    std::fs::write(a.join("config.json"), cfg.to_string()).unwrap();
    let err = SnacCodec::load(&a, DType::F32, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("attn_window_size"), "{err}");
}

#[test]
fn half_precision_decodes_close_to_f32() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &tiny_spec(true), 13);
    let f32_codec = load(dir.path());
    let codes = codes(&f32_codec, 8, 6);
    let reference = f32_codec.decode(&codes, 5).unwrap();
    for dtype in [DType::BF16, DType::F16] {
        let codec = SnacCodec::load(dir.path(), dtype, &Device::Cpu).unwrap();
        let out = codec.decode(&codes, 5).unwrap();
        let err: Vec<f32> = out.iter().zip(&reference).map(|(a, b)| a - b).collect();
        println!(
            "{dtype:?}: rms error {} (signal rms {})",
            rms(&err),
            rms(&reference)
        );
        assert!(
            rms(&err) < 0.1 * rms(&reference),
            "{dtype:?} strays from f32"
        );
    }
    let err = SnacCodec::load(dir.path(), DType::U8, &Device::Cpu).unwrap_err();
    assert!(matches!(err, CodecError::Load(_)));
}

#[test]
fn receptive_fields() {
    let tiny = TinySnacSpec::tiny().config().receptive_field();
    let real = SnacConfig::snac_24khz().receptive_field();
    println!("tiny: {tiny:?}\n24 kHz: {real:?}");
    assert_eq!((tiny.left_latents, tiny.right_latents), (18, 18));
    assert_eq!((tiny.left_frames, tiny.right_frames), (5, 5));
    assert_eq!((real.left_latents, real.right_latents), (10, 10));
    assert_eq!((real.left_frames, real.right_frames), (3, 3));
}

/// Decodes frames `start..end` of `codes` as one window placed at `start` in its stream and
/// returns the samples of frame `frame`.
fn window_frame(
    codec: &SnacCodec,
    codes: &[u32],
    seed: u64,
    (start, end): (usize, usize),
    frame: usize,
) -> Vec<f32> {
    let cpf = codec.info().codes_per_frame;
    let spf = codec.info().samples_per_frame;
    let level_codes = codec
        .level_codes(&[&codes[start * cpf..end * cpf]])
        .unwrap();
    let latents = codec.decoder().latents(&level_codes).unwrap();
    let origin = NoiseOrigin {
        seed,
        first_latent: (start * codec.config().frame_latents()) as u64,
    };
    let audio = codec.decoder().forward(&latents, &[origin]).unwrap();
    let audio = audio.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    audio[(frame - start) * spf..(frame - start + 1) * spf].to_vec()
}

/// The context the receptive field asks for is enough, and one frame less on either side is
/// not: the computed field is tight at frame granularity.
#[test]
fn receptive_field_is_sufficient_and_tight() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &tiny_spec(true), 12);
    let codec = load(dir.path());
    let field = codec.receptive_field();
    let (l, r) = (field.left_frames, field.right_frames);
    let codes = codes(&codec, 20, 5);
    let spf = codec.info().samples_per_frame;
    let one_shot = codec.decode(&codes, 77).unwrap();
    let f = 10;
    let target = &one_shot[f * spf..(f + 1) * spf];
    let exact = window_frame(&codec, &codes, 77, (f - l, f + 1 + r), f);
    let de = max_abs_diff(&exact, target);
    assert!(de <= 1e-5);
    let short_left = window_frame(&codec, &codes, 77, (f - l + 1, f + 1 + r), f);
    let short_right = window_frame(&codec, &codes, 77, (f - l, f + r), f);
    let (dl, dr) = (
        max_abs_diff(&short_left, target),
        max_abs_diff(&short_right, target),
    );
    println!(
        "frame {f}: full context max |diff| = {de:e}; one frame less: left {dl:e}, right {dr:e}"
    );
    // The outermost taps reach the frame only faintly, but measurably.
    assert!(dl > 0.0 && dr > 0.0 && dl > 10.0 * de && dr > 10.0 * de);
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// `tests/fixtures/snac_tiny` was written by `make_snac_fixture.py` with the Python `snac`
/// 1.2.1 package: a tiny SNAC (noise off; decoder-side tensors only) and `io.safetensors`
/// with codes and `SNAC.decode`'s output.
#[test]
fn one_shot_matches_python_snac() {
    let dir = fixture("snac_tiny");
    let codec = load(&dir);
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu).unwrap();
    let levels: Vec<Vec<u32>> = (0..3)
        .map(|i| {
            io[&format!("codes.{i}")]
                .flatten_all()
                .unwrap()
                .to_dtype(DType::U32)
                .unwrap()
                .to_vec1::<u32>()
                .unwrap()
        })
        .collect();
    // Back to the canonical layout: per frame, 1 + 2 + 4 codes.
    let frames = levels[0].len();
    let mut canonical = Vec::new();
    for f in 0..frames {
        canonical.push(levels[0][f]);
        canonical.extend_from_slice(&levels[1][2 * f..2 * f + 2]);
        canonical.extend_from_slice(&levels[2][4 * f..4 * f + 4]);
    }
    let ours = codec.decode(&canonical, 0).unwrap();
    let theirs = io["audio"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let diff = max_abs_diff(&ours, &theirs);
    println!(
        "one-shot vs Python snac: max |diff| = {diff:e} (rms {})",
        rms(&theirs)
    );
    assert!(diff <= 1e-4, "differs from Python snac by {diff}");
}
