//! `omnistage bench` end to end against an in-process server on the embedded default graph, and
//! its CLI's error and `bench plot` paths. No assertion here is about time.

mod common;

use omnistage::bench::client::Outcome;
use omnistage::bench::run::RunOptions;
use omnistage::bench::workload::{Arrival, Dist, Kind, Sweep, Workload};
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

const DEFAULT_TOML: &str = include_str!("../../deploy/tiny-omni.toml");

fn options(base: &str) -> RunOptions {
    RunOptions {
        url: base.to_string(),
        model: None,
        timeout: Duration::from_secs(120),
        warmup: 0,
        progress: false,
    }
}

/// Small and quick: a few words in, a few tokens out, 32×32 images in 2 steps.
fn tiny_workload(count: u64, mix: [f64; 4]) -> Workload {
    let mut wl = Workload {
        seed: 3,
        count: Some(count),
        arrival: Arrival::Closed { concurrency: 2 },
        mix,
        prompt_words: Dist::Uniform { min: 2, max: 6 },
        max_tokens: Dist::Uniform { min: 2, max: 5 },
        ..Workload::default()
    };
    wl.image.size = "32x32".into();
    wl.image.steps = 2;
    wl
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_loop_run_records_jct_and_traces_for_every_request() {
    let server = common::start(DEFAULT_TOML).await;
    let out = tempfile::tempdir().unwrap();
    let wl = tiny_workload(8, [1.0, 1.0, 0.0, 0.0]);
    let text = omnistage::bench::bench(&options(&server.base), &wl, Some(out.path()))
        .await
        .expect("the run completes");
    assert!(
        text.contains("jct p50") && text.contains("thinker"),
        "{text}"
    );

    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("results.json")).unwrap())
            .expect("results.json parses");
    let requests = results["requests"].as_array().unwrap();
    assert_eq!(requests.len(), 8);
    let mut kinds = Vec::new();
    for r in requests {
        assert_eq!(r["outcome"], "ok", "{r}");
        assert!(r["jct_ms"].as_f64().unwrap() > 0.0, "{r}");
        let stages: Vec<&str> = r["trace"]["stages"]
            .as_array()
            .unwrap_or_else(|| panic!("no trace: {r}"))
            .iter()
            .map(|s| s["stage"].as_str().unwrap())
            .collect();
        for s in r["trace"]["stages"].as_array().unwrap() {
            assert!(s["queue_wait_ms"].as_f64().is_some() && s["compute_ms"].as_f64().is_some());
        }
        match r["kind"].as_str().unwrap() {
            "text" => {
                assert_eq!(stages, ["thinker"]);
                assert!(r["ttft_ms"].as_f64().is_some(), "streamed: {r}");
                assert!(r["output_tokens"].as_u64().unwrap() >= 1);
            }
            "image" => {
                assert_eq!(stages, ["image-encoder", "dit", "vae"]);
                assert_eq!(r["images"], 1);
                assert_eq!(r["trace"]["edges"].as_array().unwrap().len(), 2);
            }
            k => panic!("unexpected kind {k}"),
        }
        kinds.push(r["kind"].as_str().unwrap().to_string());
    }
    assert!(
        kinds.contains(&"text".into()) && kinds.contains(&"image".into()),
        "{kinds:?}"
    );
    let summary = results["summary"].as_array().unwrap();
    let all = summary.iter().find(|k| k["kind"] == "all").unwrap();
    assert_eq!(
        (all["count"].as_u64(), all["ok"].as_u64()),
        (Some(8), Some(8))
    );
    assert!(all["jct_ms"]["p99"].as_f64().is_some());
    for png in ["jct_cdf.png", "jct_over_time.png"] {
        let bytes = std::fs::read(out.path().join(png)).unwrap();
        assert_eq!(&bytes[1..4], b"PNG", "{png}");
    }

    // Speech (text + audio out through thinker → talker → codec): TTFP and RTF per request.
    let wl = tiny_workload(2, [0.0, 0.0, 0.0, 1.0]);
    let result = omnistage::bench::run::run(&options(&server.base), &wl)
        .await
        .unwrap();
    assert_eq!(result.records.len(), 2);
    for r in &result.records {
        assert_eq!((r.kind, r.outcome), (Kind::Speech, Outcome::Ok), "{r:?}");
        let ttfp = r.ttfp_ms.expect("time to first audio packet");
        assert!(ttfp > 0.0 && ttfp <= r.jct_ms, "{r:?}");
        assert!(r.rtf.is_some_and(|x| x > 0.0), "{r:?}");
        assert!(r.ttft_ms.is_some(), "the transcript streams: {r:?}");
    }

    // A two-point sweep writes sweep.json, which `bench plot` reads.
    let sweep_dir = out.path().join("sweep");
    let wl = Workload {
        sweep: Some(Sweep::Rates(vec![20.0, 40.0])),
        label: Some("tiny".into()),
        arrival: Arrival::Poisson { rate: 1.0 },
        ..tiny_workload(3, [1.0, 0.0, 0.0, 0.0])
    };
    omnistage::bench::bench(&options(&server.base), &wl, Some(&sweep_dir))
        .await
        .unwrap();
    let sweep = sweep_dir.join("sweep.json");
    let plotted = out.path().join("plot");
    let output = Command::new(env!("CARGO_BIN_EXE_omnistage"))
        .args(["bench", "plot", "--out"])
        .arg(&plotted)
        .arg(&sweep)
        .arg(&sweep)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("0.0%"), "a sweep against itself: {stdout}");
    assert!(plotted.join("sweep_compare.png").is_file());
}

#[test]
fn the_cli_names_the_workload_file_and_field_of_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("load.toml");
    std::fs::write(&file, "[arrival]\nprocess = \"poisson\"\nrate = -2\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_omnistage"))
        .args(["bench", "--url", "http://127.0.0.1:9", "--workload"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("load.toml") && stderr.contains("arrival.rate"),
        "{stderr}"
    );
    let output = Command::new(env!("CARGO_BIN_EXE_omnistage"))
        .args(["bench", "--mix", "text=1,video=2"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("video"),
        "{stderr}"
    );
}
