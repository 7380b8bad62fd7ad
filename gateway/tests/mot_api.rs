//! Router stages through the gateway: the tiny Mixture-of-Thoughts graph (a model router picks
//! the top-k of three experts; peers stream their projected states to the primary at every stack
//! boundary) answers chat requests, in one process and with peers in worker processes; and a
//! rule router whose unselected branch never runs, joined downstream (conditional fan-in).

mod common;

use omnistage::runtime::ExecutionMode;
use serde_json::{json, Value};
use std::time::Duration;

const MOT_TOML: &str = include_str!("../../deploy/tiny-mot.toml");

async fn start_mot(env: &[(String, String)]) -> common::TestServer {
    common::start_with_models(
        MOT_TOML,
        Duration::from_secs(120),
        ExecutionMode::Pipelined,
        env,
        |dir| {
            omnistage_engines::tiny::write_mot(&dir.join("tiny-mot"), 0).expect("tiny MoT set");
        },
    )
    .await
}

fn chat(content: &str, k: Option<usize>) -> Value {
    let mut body = json!({
        "model": "tiny-mot",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 6,
        "temperature": 0,
        "ignore_eos": true,
        "return_token_ids": true,
    });
    if let Some(k) = k {
        body["router_k"] = json!(k);
    }
    body
}

async fn trace(server: &common::TestServer, id: u64) -> Value {
    let (status, text) = server.get_text(&format!("/v1/requests/{id}/trace")).await;
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).expect("trace JSON")
}

fn token_ids(body: &Value) -> Vec<u64> {
    body["choices"][0]["token_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("no token ids in {body}"))
        .iter()
        .filter_map(Value::as_u64)
        .collect()
}

/// Answers for a fixed set of prompts at k = 1, 2, 3, with their traces' selections.
async fn answers(server: &common::TestServer) -> Vec<(Vec<u64>, Vec<String>)> {
    let mut out = Vec::new();
    for (prompt, k) in [
        ("Prove that there are infinitely many primes.", Some(2)),
        ("Write a haiku about rust.", Some(3)),
        ("hello", Some(1)),
    ] {
        let (status, id, body) = server
            .post_with_id("/v1/chat/completions", chat(prompt, k))
            .await;
        assert_eq!(status, 200, "{body}");
        let t = trace(server, id.expect("request id")).await;
        let selected: Vec<String> = t["route"]["selected"]
            .as_array()
            .unwrap_or_else(|| panic!("no route in {t}"))
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert_eq!(selected.len(), k.unwrap(), "{t}");
        out.push((token_ids(&body), selected));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mot_chat_is_routed_traced_and_counted() {
    let server = start_mot(&[]).await;

    // The router's k (2): the primary answers, one peer collaborates.
    let (status, id, body) = server
        .post_with_id("/v1/chat/completions", chat("What is two plus two?", None))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 6, "{body}");
    assert_eq!(token_ids(&body).len(), 6);
    let prompt_tokens = body["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 0, "{body}");
    let t = trace(&server, id.unwrap()).await;
    let route = &t["route"];
    assert_eq!(route["router"], "router");
    assert_eq!(route["reason"], "model");
    assert_eq!(route["selected"].as_array().unwrap().len(), 2, "{t}");
    let scores = route["scores"].as_array().unwrap();
    assert_eq!(scores.len(), 3, "{t}");
    let total: f64 = scores.iter().map(|s| s[1].as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-4, "scores are probabilities: {t}");
    // Only the selected experts ran; the peers' states reached the primary once per stack.
    let ran: Vec<&str> = t["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(ran.len(), 3, "router + two experts: {t}");
    for e in route["selected"].as_array().unwrap() {
        assert!(ran.contains(&e.as_str().unwrap()), "{t}");
    }
    let exchange = t["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["edge"].as_str().unwrap().contains("=>"))
        .unwrap_or_else(|| panic!("no peer exchange in {t}"));
    assert_eq!(
        exchange["chunks"], 2,
        "one chunk per stack boundary (Q = 2): {t}"
    );

    // Routing alone (k = 1) counts the same prompt once, from the primary.
    let (status, id, body) = server
        .post_with_id(
            "/v1/chat/completions",
            chat("What is two plus two?", Some(1)),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["prompt_tokens"].as_u64(), Some(prompt_tokens));
    let t = trace(&server, id.unwrap()).await;
    assert_eq!(t["route"]["selected"].as_array().unwrap().len(), 1, "{t}");

    // Streamed: text deltas, then [DONE].
    let mut body = chat("Stream me something.", Some(3));
    body["stream"] = json!(true);
    let events = server.stream("/v1/chat/completions", body).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(events.len() >= 3, "{events:?}");

    // Eight at once, mixed k: batched together on the expert stages, every one answered.
    let bodies: Vec<Value> = (0..8)
        .map(|i| chat(&format!("question number {i}"), Some(1 + i % 3)))
        .collect();
    let replies = futures::future::join_all(
        bodies
            .into_iter()
            .map(|b| server.post("/v1/chat/completions", b)),
    )
    .await;
    for (status, body) in replies {
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["usage"]["completion_tokens"], 6, "{body}");
    }

    // Bad k: 0 is refused by the gateway, 4 (> 3 experts) by the router.
    for k in [0, 4] {
        let (status, body) = server
            .post("/v1/chat/completions", chat("hi", Some(k)))
            .await;
        assert_eq!(status, 400, "k = {k}: {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    }

    let (_, metrics) = server.get_text("/metrics").await;
    let selections = server
        .metric_sum("omnistage_router_selections_total{")
        .await;
    // 1 + 1 + 3 selections above, then 8 requests selecting 1 + 2 + 3 + 1 + 2 + 3 + 1 + 2.
    assert_eq!(selections, (2 + 1 + 3 + 15) as f64, "{metrics}");
    assert!(
        server.metric_sum("omnistage_mot_boundaries_total{").await > 0.0,
        "{metrics}"
    );
    assert!(
        metrics.contains("omnistage_mot_boundary_wait_seconds_total"),
        "{metrics}"
    );
    // Nothing is held once every request is done.
    let (_, health) = server.get_text("/health").await;
    assert!(
        server.metric_sum("omnistage_stage_state_bytes{").await == 0.0,
        "{health}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peers_in_worker_processes_give_the_same_answers() {
    let in_process = start_mot(&[]).await;
    let expected = answers(&in_process).await;
    drop(in_process);
    // Every expert in its own worker process: peer states cross the shared-memory links.
    let env: Vec<(String, String)> = ["SMALL", "MEDIUM", "LARGE"]
        .iter()
        .map(|s| (format!("OMNISTAGE_STAGE__{s}__PROCESS"), "true".to_string()))
        .collect();
    let workers = start_mot(&env).await;
    for stage in ["small", "medium", "large"] {
        assert_eq!(
            workers.server.worker_pids(stage).len(),
            1,
            "{stage} runs in a worker"
        );
    }
    let got = answers(&workers).await;
    assert_eq!(got, expected);
}

/// A rule router choosing between two plain LLM stages, both feeding a third that answers.
const FAN_TOML: &str = r#"
name = "fan"

[[stage]]
id = "router"
kind = "router"

[stage.router]
experts = ["fast", "careful"]
rules = ["model:fast -> fast", "input:image -> careful"]
default = "careful"

[[stage]]
id = "fast"
kind = "llm"
model = "tiny-omni/thinker"

[stage.sampling]
max_tokens = 4

[[stage]]
id = "careful"
kind = "llm"
model = "tiny-omni/thinker"

[stage.sampling]
max_tokens = 4

[[stage]]
id = "join"
kind = "llm"
model = "tiny-omni/thinker"

[[edge]]
from = "router"
to = "fast"
carries = "route"

[[edge]]
from = "router"
to = "careful"
carries = "route"

[[edge]]
from = "fast"
to = "join"
carries = "text"

[[edge]]
from = "careful"
to = "join"
carries = "text"

[outputs]
text = "join"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_router_runs_only_the_chosen_branch_and_the_join_does_not_wait_for_the_other() {
    let server = common::start(FAN_TOML).await;
    for (model, chosen, other, reason) in [
        ("fast", "fast", "careful", "model:fast -> fast"),
        ("fan", "careful", "fast", "default"),
    ] {
        let body = json!({
            "model": model,
            "messages": [{"role": "user", "content": "Which way?"}],
            "max_tokens": 3,
            "temperature": 0,
            "ignore_eos": true,
        });
        let (status, id, reply) = server.post_with_id("/v1/chat/completions", body).await;
        assert_eq!(status, 200, "{reply}");
        let t = trace(&server, id.unwrap()).await;
        assert_eq!(t["route"]["selected"], json!([chosen]), "{t}");
        assert_eq!(t["route"]["reason"], reason, "{t}");
        let ran: Vec<&str> = t["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["stage"].as_str().unwrap())
            .collect();
        assert!(ran.contains(&chosen) && ran.contains(&"join"), "{t}");
        assert!(!ran.contains(&other), "the unselected branch ran: {t}");
    }
    // A name no rule knows and the server does not serve.
    let (status, _) = server
        .post(
            "/v1/chat/completions",
            json!({"model": "slow", "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    assert_eq!(status, 404);
    // router_k on a rule router asking for two: refused by the router.
    let (status, body) = server
        .post(
            "/v1/chat/completions",
            json!({"model": "fan", "router_k": 2, "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
}
