//! Request traces (`GET /v1/requests/{id}/trace`) and `serve --monolithic`, the one-at-a-time
//! baseline.

mod common;

use omnistage::runtime::ExecutionMode;
use serde_json::{json, Value};
use std::time::Duration;

const DEFAULT_TOML: &str = include_str!("../../deploy/tiny-omni.toml");

async fn trace(server: &common::TestServer, id: u64) -> Value {
    let (status, text) = server.get_text(&format!("/v1/requests/{id}/trace")).await;
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// A greedy chat request for `n` tokens, to the default graph (model `tiny-omni`).
fn chat(n: usize) -> Value {
    let mut body = common::chat_body("hi", n, false);
    body["model"] = json!("tiny-omni");
    body
}

fn image_body(seed: u64) -> Value {
    json!({"prompt": "a red fox", "size": "32x32", "steps": 3, "seed": seed})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_has_a_trace_with_its_stage_breakdown() {
    let server = common::start(DEFAULT_TOML).await;
    let (status, id, _) = server.post_with_id("/v1/chat/completions", chat(4)).await;
    assert_eq!(status, 200);
    let t = trace(&server, id.expect("request id header")).await;
    assert_eq!(t["outcome"], "ok");
    assert_eq!(t["stages"][0]["stage"], "thinker");
    let s = &t["stages"][0];
    for field in [
        "queue_wait_ms",
        "compute_ms",
        "first_output_ms",
        "finished_ms",
    ] {
        assert!(s[field].as_f64().unwrap() >= 0.0, "{field}: {t}");
    }
    assert!(t["jct_ms"].as_f64().unwrap() >= s["finished_ms"].as_f64().unwrap());

    let (status, id, _) = server
        .post_with_id("/v1/images/generations", image_body(1))
        .await;
    assert_eq!(status, 200);
    let t = trace(&server, id.unwrap()).await;
    let stages: Vec<&str> = t["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(stages, ["image-encoder", "dit", "vae"]);
    let edges = t["edges"].as_array().unwrap();
    assert_eq!(edges.len(), 2);
    assert_eq!(edges[1]["edge"], "dit->vae");
    assert_eq!(edges[1]["bytes"], 4 * 4 * 8 * 8, "one 4×8×8 f32 latent");

    let (status, _) = server.get_text("/v1/requests/999999/trace").await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monolithic_mode_runs_one_request_at_a_time_unbatched() {
    let server = std::sync::Arc::new(
        common::start_with(
            DEFAULT_TOML,
            Duration::from_secs(120),
            ExecutionMode::Monolithic,
        )
        .await,
    );
    let mut handles = Vec::new();
    for i in 0..4u64 {
        let s = server.clone();
        handles.push(tokio::spawn(async move {
            let (status, id, body) = if i % 2 == 0 {
                s.post_with_id("/v1/images/generations", image_body(i))
                    .await
            } else {
                s.post_with_id("/v1/chat/completions", chat(6)).await
            };
            assert_eq!(status, 200, "{body}");
            id.unwrap()
        }));
    }
    let mut spans = Vec::new();
    for h in handles {
        let t = trace(&server, h.await.unwrap()).await;
        let start = t["started_unix_ms"].as_f64().unwrap();
        spans.push((
            start + t["graph_wait_ms"].as_f64().unwrap(),
            start + t["jct_ms"].as_f64().unwrap(),
        ));
    }
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    for w in spans.windows(2) {
        assert!(w[1].0 >= w[0].1 - 0.5, "jobs overlapped: {spans:?}");
    }
    // Every step of every stage ran exactly one job.
    let steps = server
        .metric_sum("omnistage_stage_step_batch_size_count")
        .await;
    assert!(steps > 0.0);
    let (_, metrics) = server.get_text("/metrics").await;
    let le1: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("omnistage_stage_step_batch_size_bucket") && l.contains("le=\"1\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(le1, steps, "a step ran more than one job");

    // Speech runs its stages one after the other: each edge delivers once, whole.
    let speech = json!({"input": "One, two.", "seed": 1, "response_format": "pcm"});
    let resp = server
        .client
        .post(format!("{}/v1/audio/speech", server.base))
        .json(&speech)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let id: u64 = resp.headers()["x-omnistage-request-id"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(!resp.bytes().await.unwrap().is_empty());
    let t = trace(&server, id).await;
    let edges = t["edges"].as_array().unwrap();
    assert_eq!(edges.len(), 2, "{t}");
    for e in edges {
        assert_eq!(e["chunks"], 1, "a monolithic edge streamed: {t}");
    }
    let stage = |name: &str| {
        t["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["stage"] == name)
            .unwrap()
            .clone()
    };
    let (thinker, talker) = (stage("thinker"), stage("talker"));
    assert!(
        talker["submitted_ms"].as_f64() >= thinker["finished_ms"].as_f64(),
        "the talker started before the thinker finished: {t}"
    );
}
