//! Single-file SD3 / FLUX checkpoints: the architecture and config inferred from the tensors
//! equal the diffusers configs the fixtures were made with, the inferred model reproduces
//! diffusers' output, and a deployment whose `dit` stage names the file builds an engine.
//!
//! SD3 uses `tests/fixtures/sd3_tiny_single` (the `sd3_tiny_qknorm` model saved under
//! `model.diffusion_model.` SD3 names). FLUX has no single-file fixture: the `flux_tiny*`
//! diffusers weights are renamed into Black Forest Labs' layout here, the inverse of diffusers'
//! `convert_flux_to_diffusers.py` (fused q/k/v, final adaLN halves swapped).

use candle_core::{DType, Device, Tensor};
use omnistage_engines::diffusion::flux::{FluxConfig, FluxTransformer};
use omnistage_engines::diffusion::model::{DenoiseInput, Denoiser};
use omnistage_engines::diffusion::sd3::{QkNorm, Sd3Config, Sd3Transformer};
use omnistage_engines::diffusion::single_file::{
    SingleFileDenoiser, SingleFileDit, DEFAULT_VAE_SCALE, SINGLE_FILE_PREFIX,
};
use omnistage_engines::factory::{build_engine, StageWiring};
use omnistage_stages::deploy::{DeployError, DeployGraph};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn sd3_file() -> PathBuf {
    fixture("sd3_tiny_single").join("sd3_tiny_qknorm.safetensors")
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .unwrap_or(f32::INFINITY)
}

/// Runs `model` on the fixture's inputs and compares with diffusers' output `key`.
fn check_parity(model: &impl Denoiser, io_dir: &Path, key: &str) {
    let io = load(&io_dir.join("io.safetensors"));
    let input = DenoiseInput {
        latents: &io["latents"],
        sigmas: &io["sigmas"],
        context: &io["context"],
        pooled: &io["pooled"],
        guidance: io.get("guidance"),
    };
    let out = model.forward(&input).unwrap();
    let diff = max_abs_diff(&out, &io[key]);
    assert!(diff <= 1e-4, "{}: max abs diff {diff}", io_dir.display());
}

/// The diffusers FLUX fixture `name` under BFL names (each prefixed with `prefix`).
fn flux_bfl(name: &str, prefix: &str) -> HashMap<String, Tensor> {
    let dir = fixture(name);
    let cfg = FluxConfig::from_file(&dir.join("config.json")).unwrap();
    let mut c = Bfl {
        src: load(&dir.join("diffusion_pytorch_model.safetensors")),
        out: HashMap::new(),
        prefix,
    };
    c.linear("img_in", &["x_embedder"], false);
    c.linear("txt_in", &["context_embedder"], false);
    let mut embedders = vec![
        ("time_in", "timestep_embedder"),
        ("vector_in", "text_embedder"),
    ];
    if cfg.guidance_embeds {
        embedders.push(("guidance_in", "guidance_embedder"));
    }
    for (bfl, d) in embedders {
        let tte = format!("time_text_embed.{d}");
        c.linear(
            &format!("{bfl}.in_layer"),
            &[&format!("{tte}.linear_1")],
            false,
        );
        c.linear(
            &format!("{bfl}.out_layer"),
            &[&format!("{tte}.linear_2")],
            false,
        );
    }
    for i in 0..cfg.num_layers {
        let (b, d) = (
            format!("double_blocks.{i}"),
            format!("transformer_blocks.{i}"),
        );
        let linears: [(&str, &[&str]); 10] = [
            ("img_mod.lin", &["norm1.linear"]),
            ("txt_mod.lin", &["norm1_context.linear"]),
            ("img_attn.qkv", &["attn.to_q", "attn.to_k", "attn.to_v"]),
            (
                "txt_attn.qkv",
                &["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
            ),
            ("img_attn.proj", &["attn.to_out.0"]),
            ("txt_attn.proj", &["attn.to_add_out"]),
            ("img_mlp.0", &["ff.net.0.proj"]),
            ("img_mlp.2", &["ff.net.2"]),
            ("txt_mlp.0", &["ff_context.net.0.proj"]),
            ("txt_mlp.2", &["ff_context.net.2"]),
        ];
        for (target, parts) in linears {
            let parts: Vec<String> = parts.iter().map(|p| format!("{d}.{p}")).collect();
            let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
            c.linear(&format!("{b}.{target}"), &parts, false);
        }
        for (target, src) in [
            ("img_attn.norm.query_norm", "norm_q"),
            ("img_attn.norm.key_norm", "norm_k"),
            ("txt_attn.norm.query_norm", "norm_added_q"),
            ("txt_attn.norm.key_norm", "norm_added_k"),
        ] {
            c.rename(
                &format!("{b}.{target}.scale"),
                &format!("{d}.attn.{src}.weight"),
            );
        }
    }
    for i in 0..cfg.num_single_layers {
        let (b, d) = (
            format!("single_blocks.{i}"),
            format!("single_transformer_blocks.{i}"),
        );
        c.linear(
            &format!("{b}.modulation.lin"),
            &[&format!("{d}.norm.linear")],
            false,
        );
        let linear1 =
            ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"].map(|p| format!("{d}.{p}"));
        let linear1: Vec<&str> = linear1.iter().map(String::as_str).collect();
        c.linear(&format!("{b}.linear1"), &linear1, false);
        c.linear(&format!("{b}.linear2"), &[&format!("{d}.proj_out")], false);
        c.rename(
            &format!("{b}.norm.query_norm.scale"),
            &format!("{d}.attn.norm_q.weight"),
        );
        c.rename(
            &format!("{b}.norm.key_norm.scale"),
            &format!("{d}.attn.norm_k.weight"),
        );
    }
    c.linear("final_layer.linear", &["proj_out"], false);
    c.linear("final_layer.adaLN_modulation.1", &["norm_out.linear"], true);
    c.out
}

/// diffusers → BFL tensor renaming for [`flux_bfl`].
struct Bfl<'a> {
    src: HashMap<String, Tensor>,
    out: HashMap<String, Tensor>,
    prefix: &'a str,
}

impl Bfl<'_> {
    fn rename(&mut self, bfl: &str, diffusers: &str) {
        let t = self.src[diffusers].clone();
        self.out.insert(format!("{}{bfl}", self.prefix), t);
    }

    /// `bfl.{weight,bias}` = the `parts` concatenated on dim 0, halves swapped if asked
    /// (diffusers' norm_out is (scale, shift), BFL's (shift, scale)).
    fn linear(&mut self, bfl: &str, parts: &[&str], swap: bool) {
        for suffix in ["weight", "bias"] {
            let ts: Vec<Tensor> = parts
                .iter()
                .map(|p| self.src[&format!("{p}.{suffix}")].clone())
                .collect();
            let mut t = Tensor::cat(&ts, 0).unwrap();
            if swap {
                let n = t.dim(0).unwrap() / 2;
                t = Tensor::cat(&[t.narrow(0, n, n).unwrap(), t.narrow(0, 0, n).unwrap()], 0)
                    .unwrap();
            }
            self.out.insert(format!("{}{bfl}.{suffix}", self.prefix), t);
        }
    }
}

fn save(tensors: &HashMap<String, Tensor>, path: &Path) {
    candle_core::safetensors::save(tensors, path).unwrap();
}

#[test]
fn sd3_single_file_config_is_inferred_and_runs() {
    let known = Sd3Config::from_file(&fixture("sd3_tiny_qknorm").join("config.json")).unwrap();
    let detected = SingleFileDenoiser::detect(&sd3_file()).unwrap();
    assert_eq!(detected, SingleFileDenoiser::Sd3(known.clone()));
    let model =
        Sd3Transformer::load_single_file(&sd3_file(), &known, DType::F32, &Device::Cpu).unwrap();
    check_parity(&model, &fixture("sd3_tiny_qknorm"), "sample");

    // The same tensors without the prefix infer the same config.
    let tmp = tempfile::tempdir().unwrap();
    let bare: HashMap<String, Tensor> = load(&sd3_file())
        .into_iter()
        .map(|(k, v)| (k.trim_start_matches(SINGLE_FILE_PREFIX).to_string(), v))
        .collect();
    let path = tmp.path().join("bare.safetensors");
    save(&bare, &path);
    assert_eq!(
        SingleFileDenoiser::detect(&path).unwrap(),
        SingleFileDenoiser::Sd3(known)
    );

    // Without q/k norms nothing stores the head width: SD3's 64 is assumed, which this 16-wide
    // model cannot have, and the error says so.
    let no_norm: HashMap<String, Tensor> = bare
        .into_iter()
        .filter(|(k, _)| !k.contains(".ln_q.") && !k.contains(".ln_k."))
        .collect();
    save(&no_norm, &path);
    let msg = SingleFileDenoiser::detect(&path).unwrap_err().to_string();
    assert!(
        msg.contains("bare.safetensors") && msg.contains("head width 64"),
        "{msg}"
    );
}

#[test]
fn flux_single_file_config_is_inferred_and_runs() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, prefix) in [
        ("flux_tiny", ""),
        ("flux_tiny", SINGLE_FILE_PREFIX),
        ("flux_tiny_schnell", ""),
    ] {
        let known = FluxConfig::from_file(&fixture(name).join("config.json")).unwrap();
        let path = tmp.path().join(format!("{name}.safetensors"));
        save(&flux_bfl(name, prefix), &path);
        let detected = SingleFileDenoiser::detect(&path).unwrap();
        assert_eq!(detected, SingleFileDenoiser::Flux(known.clone()), "{name}");
        let model =
            FluxTransformer::load_single_file(&path, &known, DType::F32, &Device::Cpu).unwrap();
        check_parity(&model, &fixture(name), "output");
    }
}

#[test]
fn companion_configs_and_family_defaults() {
    let tmp = tempfile::tempdir().unwrap();
    let sd3 = tmp.path().join("sd3.safetensors");
    std::fs::copy(sd3_file(), &sd3).unwrap();
    let flux_dir = tmp.path().join("flux");
    std::fs::create_dir(&flux_dir).unwrap();
    let dev = flux_dir.join("dev.safetensors");
    save(&flux_bfl("flux_tiny", ""), &dev);

    // Nothing beside the files: the families' released schedulers and a latent scale of 8.
    let s = SingleFileDit::resolve(&sd3).unwrap();
    let c = s.scheduler.config();
    assert_eq!((c.shift, c.use_dynamic_shifting), (3.0, false));
    assert_eq!((s.vae_scale(), DEFAULT_VAE_SCALE), (8, 8));
    assert!(s.vae.is_none());
    let f = SingleFileDit::resolve(&dev).unwrap();
    let c = f.scheduler.config();
    assert!(c.use_dynamic_shifting);
    assert_eq!(
        (
            c.base_shift,
            c.max_shift,
            c.base_image_seq_len,
            c.max_image_seq_len,
            c.shift
        ),
        (0.5, 1.15, 256, 4096, 3.0)
    );
    assert_eq!(f.denoiser.latent_channels(), 4);
    // FLUX.1-schnell (no guidance embedding) runs unshifted, as its released scheduler does.
    let schnell = flux_dir.join("schnell.safetensors");
    save(&flux_bfl("flux_tiny_schnell", ""), &schnell);
    let c = SingleFileDit::resolve(&schnell)
        .unwrap()
        .scheduler
        .config()
        .clone();
    assert_eq!((c.shift, c.use_dynamic_shifting), (1.0, false));

    // Configs beside the file win.
    std::fs::write(
        tmp.path().join("scheduler_config.json"),
        r#"{"shift": 2.0, "num_train_timesteps": 1000}"#,
    )
    .unwrap();
    // The tiny VAE: 4 latent channels, 3 levels (downscale 4).
    let vae = std::fs::read_to_string(fixture("vae_tiny").join("config.json")).unwrap();
    std::fs::write(tmp.path().join("vae_config.json"), &vae).unwrap();
    let s = SingleFileDit::resolve(&sd3).unwrap();
    assert_eq!(s.scheduler.config().shift, 2.0);
    assert_eq!(s.vae_scale(), 4);

    // A VAE whose latents the transformer cannot take is refused, naming both files.
    std::fs::create_dir(tmp.path().join("vae")).unwrap();
    let vae16 = vae.replace("\"latent_channels\": 4", "\"latent_channels\": 16");
    std::fs::write(tmp.path().join("vae/config.json"), vae16).unwrap();
    let msg = SingleFileDit::resolve(&sd3).unwrap_err().to_string();
    assert!(
        msg.contains("vae/config.json") && msg.contains("sd3.safetensors") && msg.contains("16"),
        "{msg}"
    );
}

/// A three-stage image deployment whose `dit` stage's model is `dit_model`; the encoder and
/// VAE point at stub folders under `base` (only the DiT is built here).
fn deployment(base: &Path, dit_model: &str) -> DeployGraph {
    for stub in ["enc", "vae"] {
        std::fs::create_dir_all(base.join(stub)).unwrap();
        std::fs::write(base.join(stub).join("config.json"), "{}").unwrap();
    }
    let text = format!(
        r#"
name = "single-file"

[[stage]]
id = "encoder"
kind = "encoder"
model = "enc"

[[stage]]
id = "dit"
kind = "dit"
model = "{dit_model}"

[stage.image]
min_size = 16
max_size = 64
default_width = 32
default_height = 32

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
"#
    );
    DeployGraph::from_toml_str(&text, &base.join("deploy.toml"), base, &[]).unwrap()
}

fn wiring(graph: &DeployGraph, id: &str) -> StageWiring {
    StageWiring {
        received: graph.inbound(id).map(|e| e.carries).collect(),
        consumed: graph.outbound(id).map(|e| e.carries).collect(),
        ..StageWiring::default()
    }
}

#[test]
fn build_engine_serves_single_files() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(sd3_file(), tmp.path().join("sd3.safetensors")).unwrap();
    save(
        &flux_bfl("flux_tiny", SINGLE_FILE_PREFIX),
        &tmp.path().join("flux1-tiny.safetensors"),
    );
    for file in ["sd3.safetensors", "flux1-tiny.safetensors"] {
        let graph = deployment(tmp.path(), file);
        graph.check_models().unwrap();
        let spec = graph.stage("dit").unwrap();
        assert_eq!(spec.model, tmp.path().join(file));
        if let Err(e) = build_engine(spec, &wiring(&graph, "dit")) {
            panic!("{file}: {e}");
        }
    }
}

#[test]
fn files_without_either_layout_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let other = tmp.path().join("unet.safetensors");
    let t = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
    save(
        &HashMap::from([(
            "model.diffusion_model.input_blocks.0.0.weight".to_string(),
            t,
        )]),
        &other,
    );
    let msg = SingleFileDenoiser::detect(&other).unwrap_err().to_string();
    assert!(
        msg.contains("unet.safetensors")
            && msg.contains("joint_blocks")
            && msg.contains("double_blocks"),
        "{msg}"
    );

    let diffusers = shapes(&[("transformer_blocks.0.attn.to_q.weight".into(), vec![4, 4])]);
    let msg = SingleFileDenoiser::from_shapes(&other, &diffusers)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("pipeline folder"), "{msg}");

    let graph = deployment(tmp.path(), "unet.safetensors");
    graph.check_models().unwrap();
    let err = build_engine(graph.stage("dit").unwrap(), &wiring(&graph, "dit"))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("stage `dit`") && err.contains("unet.safetensors"),
        "{err}"
    );

    // Not a safetensors file at all, and a truncated one.
    let garbage = tmp.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"\xff\xff\xff\xff\xff\xff\xff\xffnot json").unwrap();
    let msg = SingleFileDenoiser::detect(&garbage)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("garbage.safetensors"), "{msg}");
    let bytes = std::fs::read(sd3_file()).unwrap();
    std::fs::write(&garbage, &bytes[..bytes.len() - 4]).unwrap();
    let msg = SingleFileDenoiser::detect(&garbage)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("truncated"), "{msg}");

    // A dit stage naming a file that does not exist fails the model check, naming it.
    let graph = deployment(tmp.path(), "missing.safetensors");
    let e = graph.check_models().unwrap_err();
    assert!(matches!(e, DeployError::ModelMissing { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("stage `dit`") && msg.contains("missing.safetensors"),
        "{msg}"
    );
}

fn shapes(entries: &[(String, Vec<usize>)]) -> BTreeMap<String, Vec<usize>> {
    entries.iter().cloned().collect()
}

/// Released sizes, from the headers' shapes alone (no weights needed).
#[test]
fn released_checkpoints_infer_their_configs() {
    let path = Path::new("x.safetensors");
    let p = SINGLE_FILE_PREFIX;
    let mut sd35m = vec![
        (format!("{p}x_embedder.proj.weight"), vec![1536, 16, 2, 2]),
        (format!("{p}pos_embed"), vec![1, 384 * 384, 1536]),
        (format!("{p}context_embedder.weight"), vec![1536, 4096]),
        (format!("{p}y_embedder.mlp.0.weight"), vec![1536, 2048]),
        (format!("{p}final_layer.linear.weight"), vec![64, 1536]),
        (
            "first_stage_model.decoder.conv_in.weight".into(),
            vec![512, 16, 3, 3],
        ),
    ];
    for i in 0..24 {
        let b = format!("{p}joint_blocks.{i}");
        sd35m.push((format!("{b}.x_block.attn.ln_q.weight"), vec![64]));
        if i <= 12 {
            sd35m.push((format!("{b}.x_block.attn2.qkv.weight"), vec![4608, 1536]));
        }
    }
    let expected = Sd3Config {
        sample_size: 128,
        patch_size: 2,
        in_channels: 16,
        out_channels: 16,
        num_layers: 24,
        attention_head_dim: 64,
        num_attention_heads: 24,
        joint_attention_dim: 4096,
        caption_projection_dim: 1536,
        pooled_projection_dim: 2048,
        pos_embed_max_size: 384,
        qk_norm: QkNorm::RmsNorm,
        dual_attention_layers: (0..=12).collect(),
    };
    let got = SingleFileDenoiser::from_shapes(path, &shapes(&sd35m)).unwrap();
    assert_eq!(got, SingleFileDenoiser::Sd3(expected));

    let mut dev = vec![
        ("img_in.weight".to_string(), vec![3072, 64]),
        ("txt_in.weight".into(), vec![3072, 4096]),
        ("vector_in.in_layer.weight".into(), vec![3072, 768]),
        ("guidance_in.in_layer.weight".into(), vec![3072, 256]),
        ("final_layer.linear.weight".into(), vec![64, 3072]),
        (
            "double_blocks.0.img_attn.norm.query_norm.scale".into(),
            vec![128],
        ),
    ];
    dev.extend((0..19).map(|i| (format!("double_blocks.{i}.img_mod.lin.weight"), vec![1])));
    dev.extend((0..38).map(|i| (format!("single_blocks.{i}.linear1.weight"), vec![1])));
    let got = SingleFileDenoiser::from_shapes(path, &shapes(&dev)).unwrap();
    assert_eq!(got, SingleFileDenoiser::Flux(FluxConfig::dev()));
    dev.retain(|(k, _)| !k.starts_with("guidance_in"));
    let got = SingleFileDenoiser::from_shapes(path, &shapes(&dev)).unwrap();
    assert_eq!(got, SingleFileDenoiser::Flux(FluxConfig::schnell()));
    assert_eq!(got.default_scheduler().shift, 1.0);
}
