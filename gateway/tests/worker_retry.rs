//! A job whose worker process dies before the job produced anything at that stage is retried
//! once on another replica of the stage: the client gets the same answer as without the crash,
//! and the trace and `/metrics` say a retry happened. (A job that already produced output there
//! fails with a 503 instead: `workers.rs`.)

mod common;

use omnistage::runtime::ExecutionMode;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const DEFAULT_TOML: &str = include_str!("../../deploy/tiny-omni.toml");

/// The denoiser in two worker processes.
fn dit_in_two_workers() -> Vec<(String, String)> {
    vec![
        ("OMNISTAGE_STAGE__DIT__PROCESS".into(), "true".into()),
        ("OMNISTAGE_STAGE__DIT__REPLICAS".into(), "2".into()),
    ]
}

/// An image request whose denoising takes long enough (128×128, 40 steps) to be caught by a
/// kill; the denoiser emits its latents only when it finishes.
fn image_body() -> Value {
    json!({"prompt": "a red fox in the snow", "size": "128x128", "steps": 40, "seed": 11})
}

fn b64s(body: &Value) -> Vec<String> {
    body["data"]
        .as_array()
        .unwrap_or_else(|| panic!("no data list in {body}"))
        .iter()
        .map(|d| d["b64_json"].as_str().expect("b64_json").to_string())
        .collect()
}

/// The dit stage's entry in `/health` (look for the `dit` key anywhere one level down).
async fn dit_health(server: &common::TestServer) -> Value {
    let (_, text) = server.get_text("/health").await;
    let h: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    if let Some(d) = h.get("dit") {
        return d.clone();
    }
    h.as_object()
        .and_then(|m| m.values().find_map(|v| v.get("dit").cloned()))
        .unwrap_or(Value::Null)
}

fn load(h: &Value) -> u64 {
    h["waiting"].as_u64().unwrap_or(0) + h["running"].as_u64().unwrap_or(0)
}

fn kill(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -KILL {pid} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_worker_dies_before_it_produced_anything_is_retried_on_another_replica() {
    let server = common::start_with_env(
        DEFAULT_TOML,
        Duration::from_secs(120),
        ExecutionMode::Pipelined,
        &dit_in_two_workers(),
    )
    .await;
    let pids = server.server.worker_pids("dit");
    assert_eq!(pids.len(), 2, "two dit workers");

    let (status, reference) = server.post("/v1/images/generations", image_body()).await;
    assert_eq!(status, 200, "{reference}");
    let reference = b64s(&reference);

    // Both replicas idle (their load as last reported), so the next job goes to the first one:
    // replicas are tried least-loaded first, ties by number.
    let start = Instant::now();
    while load(&dit_health(&server).await) > 0 {
        assert!(start.elapsed() < Duration::from_secs(20), "dit never idle");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let post = {
        let client = server.client.clone();
        let url = format!("{}/v1/images/generations", server.base);
        tokio::spawn(async move {
            let resp = client
                .post(url)
                .json(&image_body())
                .send()
                .await
                .expect("request sent");
            let status = resp.status().as_u16();
            let id: Option<u64> = resp
                .headers()
                .get("x-omnistage-request-id")
                .and_then(|v| v.to_str().ok()?.parse().ok());
            (
                status,
                id,
                resp.json::<Value>().await.unwrap_or(Value::Null),
            )
        })
    };
    // Once the denoiser has the job, kill the worker holding it (the first).
    let start = Instant::now();
    while load(&dit_health(&server).await) == 0 {
        assert!(
            !post.is_finished(),
            "the request ended before the denoiser took it"
        );
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the denoiser never took the job"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    kill(pids[0]);

    let (status, id, body) = post.await.expect("request task");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        b64s(&body),
        reference,
        "the retried job gives the same image"
    );

    let id = id.expect("request id header");
    let (status, text) = server.get_text(&format!("/v1/requests/{id}/trace")).await;
    assert_eq!(status, 200, "{text}");
    let trace: Value = serde_json::from_str(&text).expect("trace json");
    let dit: Vec<&Value> = trace["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .filter(|s| s["stage"] == "dit")
        .collect();
    assert_eq!(dit.len(), 2, "two attempts at the dit: {trace}");
    let why = dit[0]["retried_after"].as_str().unwrap_or_default();
    assert!(why.contains("worker"), "{trace}");
    assert!(dit[0]["finished_ms"].is_null(), "{trace}");
    assert!(dit[1]["retried_after"].is_null(), "{trace}");
    assert!(dit[1]["finished_ms"].is_number(), "{trace}");
    assert_eq!(trace["outcome"], "ok", "{trace}");
    assert_eq!(
        server
            .metric_sum("omnistage_stage_retries_total{stage=\"dit\"}")
            .await,
        1.0
    );

    // The killed worker is restarted and both serve again.
    let start = Instant::now();
    loop {
        let now = server.server.worker_pids("dit");
        if now.len() == 2
            && !now.contains(&pids[0])
            && dit_health(&server).await["state"] == "ready"
        {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "worker not back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, again) = server.post("/v1/images/generations", image_body()).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(b64s(&again), reference);
}
