//! The diffusers side of the benchmark: runs `benches/diffusers_baseline.py` on the same
//! pipeline folder and reads its rows and its end-to-end check image.

use crate::table::Row;
use crate::{Request, Shape};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

pub(crate) fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The diffusers side: its rows, the engine line, and the end-to-end check's PNG.
pub(crate) struct Diffusers {
    pub(crate) engine: String,
    pub(crate) rows: Vec<Row>,
    pub(crate) check_png: Option<PathBuf>,
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn run_diffusers(
    python: &str,
    pipeline: &Path,
    shape: &Shape,
    reqs: &[Request],
    text_tokens: usize,
    out_dir: &Path,
    check_latents: &Path,
    repeats: usize,
) -> Result<Diffusers, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("diffusers_baseline.py");
    let req_path = out_dir.join("requests.json");
    let out_path = out_dir.join("diffusers.json");
    let check_png = out_dir.join("diffusers_check.png");
    let spec = json!({
        "pipeline": pipeline.canonicalize().unwrap_or(pipeline.to_path_buf()),
        "width": shape.size, "height": shape.size, "steps": shape.steps,
        "guidance_scale": shape.guidance, "negative_prompt": shape.negative,
        "max_text_tokens": text_tokens,
        "requests": reqs.iter().enumerate()
            .map(|(i, r)| json!({"id": i, "prompt": r.prompt, "seed": r.seed}))
            .collect::<Vec<_>>(),
    });
    std::fs::write(&req_path, spec.to_string()).map_err(|e| e.to_string())?;
    let status = std::process::Command::new(python)
        .arg(&script)
        .arg("--requests")
        .arg(&req_path)
        .arg("--out")
        .arg(&out_path)
        .args([
            "--batch-sizes",
            "8,all",
            "--repeats",
            &repeats.to_string(),
            "--threads",
        ])
        .arg(candle_core::utils::get_num_threads().to_string())
        .arg("--check-latents")
        .arg(check_latents)
        .arg("--check-prompt")
        .arg(&reqs[0].prompt)
        .arg("--check-out")
        .arg(&check_png)
        .status()
        .map_err(|e| format!("cannot run {python}: {e}"))?;
    if !status.success() {
        return Err(format!(
            "{python} {} exited with {status} (it needs torch, transformers and diffusers: \
             benches/hf_requirements.txt)",
            script.display()
        ));
    }
    let v = read_json(&out_path);
    let rows = v["modes"]
        .as_array()
        .ok_or("no modes in the diffusers result")?
        .iter()
        .map(|m| Row {
            name: format!("diffusers {}", m["mode"].as_str().unwrap_or("?")),
            images: reqs.len(),
            makespan: m["makespan_s"].as_f64().unwrap_or(f64::NAN),
            jct: m["jct_s"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default(),
            rates: m["images_per_s_runs"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default(),
            dit: None,
        })
        .collect();
    Ok(Diffusers {
        engine: v["engine"].as_str().unwrap_or("diffusers").to_string(),
        rows,
        check_png: check_png.is_file().then_some(check_png),
    })
}
