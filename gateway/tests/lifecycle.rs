//! Batching, cancellation, deadlines, overload and multi-stage forwarding, end to end.

mod common;

use common::{chat_body, single_stage_toml, start, start_with_timeout};
use futures::StreamExt;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_concurrent_streams_finish_batched_with_exact_lengths() {
    let s = std::sync::Arc::new(start(&single_stage_toml("")).await);
    let mut tasks = Vec::new();
    for i in 0..32usize {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let n = 8 + i % 9;
            let events = s
                .stream(
                    "/v1/chat/completions",
                    chat_body(&format!("request number {i}"), n, true),
                )
                .await;
            assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
            let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
            (
                n,
                usage["usage"]["completion_tokens"].as_u64().unwrap() as usize,
            )
        }));
    }
    for t in tasks {
        let (asked, got) = t.await.unwrap();
        assert_eq!(asked, got);
    }
    let steps = s.metric_sum("omnistage_stage_step_batch_size_count{").await;
    let jobs_in_steps = s.metric_sum("omnistage_stage_step_batch_size_sum{").await;
    let single_steps = s
        .metric_sum(
            "omnistage_stage_step_batch_size_bucket{replica=\"0\",stage=\"thinker\",le=\"1\"}",
        )
        .await;
    assert!(steps > 0.0);
    assert!(
        jobs_in_steps / steps > 2.0,
        "mean batch {} over {steps} steps",
        jobs_in_steps / steps
    );
    assert!(single_steps < steps, "every step ran one job");
    assert!(s.metric_sum("omnistage_generated_tokens_total").await >= (32 * 8) as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_frees_the_sequence() {
    let s = start(&single_stage_toml("")).await;
    let resp = s
        .client
        .post(format!("{}/v1/chat/completions", s.base))
        .json(&chat_body("a long answer please", 1500, true))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let first = body.next().await.expect("a first chunk").unwrap();
    assert!(!first.is_empty());
    let (_, health) = s.get_text("/health").await;
    let health: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["stages"]["thinker"]["running"], 1, "{health}");
    assert!(s.metric_sum("omnistage_stage_state_bytes{").await > 0.0);
    drop(body);
    let start = Instant::now();
    loop {
        let (_, health) = s.get_text("/health").await;
        let health: Value = serde_json::from_str(&health).unwrap();
        let bytes = s.metric_sum("omnistage_stage_state_bytes{").await;
        if health["stages"]["thinker"]["running"] == 0 && bytes == 0.0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "sequence still held: {health} state_bytes={bytes}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        s.metric_sum("omnistage_requests_total{outcome=\"cancelled\"}")
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_fails_the_request_and_frees_it() {
    let s = start_with_timeout(&single_stage_toml(""), Duration::from_millis(150)).await;
    let (status, body) = s
        .post(
            "/v1/chat/completions",
            chat_body("take your time", 2000, false),
        )
        .await;
    assert_eq!(status, 504, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("deadline"));
    let start = Instant::now();
    while s.metric_sum("omnistage_stage_state_bytes{").await > 0.0 {
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_answers_429_and_the_rest_complete() {
    let s =
        std::sync::Arc::new(start(&single_stage_toml("max_queue = 1\nmax_batch_size = 1")).await);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.post(
                "/v1/chat/completions",
                chat_body(&format!("job {i}"), 300, false),
            )
            .await
        }));
    }
    let mut codes = Vec::new();
    for t in tasks {
        let (status, body) = t.await.unwrap();
        if status == 429 {
            assert_eq!(body["error"]["type"], "server_overloaded");
            assert!(body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("thinker"));
        }
        codes.push(status);
    }
    assert!(codes.contains(&429), "{codes:?}");
    assert!(codes.contains(&200), "{codes:?}");
    assert!(codes.iter().all(|c| *c == 200 || *c == 429), "{codes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_flows_along_an_edge_into_a_second_stage() {
    let toml = r#"
name = "tiny-test"
[[stage]]
id = "drafter"
kind = "llm"
model = "tiny-omni/thinker"
outputs = ["text"]
[stage.sampling]
max_tokens = 6
ignore_eos = true
temperature = 0
[[stage]]
id = "answerer"
kind = "llm"
model = "tiny-omni/thinker"
[[edge]]
from = "drafter"
to = "answerer"
carries = "text"
[outputs]
text = "answerer"
"#;
    let s = start(toml).await;
    let (status, body) = s.post("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "draft this"}], "max_tokens": 5, "temperature": 0, "ignore_eos": true})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 5);
    // The answerer's prompt is the drafter's text in a chat turn, not the client's prompt.
    assert!(
        s.metric_sum("omnistage_connector_bytes_total{edge=\"drafter->answerer\"}")
            .await
            > 0.0
    );
    let (_, health) = s.get_text("/health").await;
    assert!(health.contains("drafter") && health.contains("answerer"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_share_the_load() {
    let s =
        std::sync::Arc::new(start(&single_stage_toml("replicas = 2\nmax_batch_size = 2")).await);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.post(
                "/v1/chat/completions",
                chat_body(&format!("job {i}"), 24, false),
            )
            .await
        }));
    }
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["usage"]["completion_tokens"], 24);
    }
    for replica in ["0", "1"] {
        let steps = s
            .metric_sum(&format!(
                "omnistage_stage_step_batch_size_count{{replica=\"{replica}\",stage=\"thinker\"}}"
            ))
            .await;
        assert!(steps > 0.0, "replica {replica} never stepped");
    }
    let (_, health) = s.get_text("/health").await;
    let health: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["stages"]["thinker"]["replicas"], 2);
}
