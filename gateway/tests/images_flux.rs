//! A FLUX-family text-to-image graph through the gateway: a diffusers pipeline folder whose
//! transformer is a `FluxTransformer2DModel` with a guidance embedding, scheduled with FLUX's
//! resolution-dependent shift.

mod common;

use omnistage_engines::tiny::{
    write_tiny_flux_transformer, write_tiny_image_pipeline, TinyFluxSpec,
};
use serde_json::json;

fn flux_pipeline(dir: &std::path::Path) {
    write_tiny_image_pipeline(dir, 5).unwrap();
    std::fs::remove_dir_all(dir.join("transformer")).unwrap();
    let spec = TinyFluxSpec {
        joint_attention_dim: 64,
        pooled_projection_dim: 64,
        ..TinyFluxSpec::tiny()
    };
    write_tiny_flux_transformer(&dir.join("transformer"), &spec, 5).unwrap();
    std::fs::write(
        dir.join("scheduler/scheduler_config.json"),
        r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0,
            "use_dynamic_shifting": true, "base_shift": 0.5, "max_shift": 1.15,
            "base_image_seq_len": 256, "max_image_seq_len": 4096}"#,
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flux_pipeline_serves_seeded_images() {
    let models = tempfile::tempdir().unwrap();
    let flux = models.path().join("flux");
    flux_pipeline(&flux);
    let toml = format!(
        r#"
name = "tiny-flux"
[[stage]]
id = "encoder"
kind = "encoder"
model = "{0}"
[stage.image]
max_text_tokens = 8
[[stage]]
id = "dit"
kind = "dit"
model = "{0}"
max_batch_size = 4
max_batched_tokens = 64
[stage.image]
min_size = 16
max_size = 128
default_width = 32
default_height = 32
default_steps = 4
default_guidance_scale = 3.5
[[stage]]
id = "vae"
kind = "vae"
model = "{0}"
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
        flux.display()
    );
    let server = common::start(&toml).await;
    let body = |seed: u64, cache: bool| {
        json!({"prompt": "a lighthouse", "size": "48x32", "seed": seed, "step_cache": cache,
               "steps": 6})
    };
    let (status, a) = server.post("/v1/images/generations", body(1, false)).await;
    assert_eq!(status, 200, "{a}");
    let (_, b) = server.post("/v1/images/generations", body(1, false)).await;
    assert_eq!(a["data"], b["data"], "seeded");
    let (_, c) = server.post("/v1/images/generations", body(2, false)).await;
    assert_ne!(a["data"], c["data"]);
    let (status, cached) = server.post("/v1/images/generations", body(1, true)).await;
    assert_eq!(status, 200, "{cached}");
    // Distilled guidance: no classifier-free rows, so one row per image per step.
    let rows = server
        .metric_sum("omnistage_stage_denoise_rows_total")
        .await;
    let steps = server
        .metric_sum("omnistage_stage_denoise_steps_total")
        .await;
    assert_eq!(rows, steps, "FLUX-dev runs one row per image step");
}
