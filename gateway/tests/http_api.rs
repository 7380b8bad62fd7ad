//! The OpenAI-compatible API end to end, against a real server on the tiny checkpoints.

mod common;

use common::{chat_body, single_stage_toml, start};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completion_returns_text_and_usage() {
    let s = start(&single_stage_toml("")).await;
    let (status, body) = s
        .post("/v1/chat/completions", chat_body("Hello there", 10, false))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "tiny-test");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert!(body["choices"][0]["message"]["content"].is_string());
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 10);
    let prompt_tokens = body["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 2);
    assert_eq!(
        body["usage"]["total_tokens"].as_u64().unwrap(),
        prompt_tokens + 10
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_chat_matches_unstreamed_and_ends_with_done() {
    let s = start(&single_stage_toml("")).await;
    let (_, whole) = s
        .post(
            "/v1/chat/completions",
            chat_body("Tell me a story", 16, false),
        )
        .await;
    let events = s
        .stream(
            "/v1/chat/completions",
            chat_body("Tell me a story", 16, true),
        )
        .await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut text = String::new();
    let mut finish = None;
    for c in &chunks {
        if let Some(choice) = c["choices"].get(0) {
            if let Some(t) = choice["delta"]["content"].as_str() {
                text.push_str(t);
            }
            if let Some(f) = choice["finish_reason"].as_str() {
                finish = Some(f.to_string());
            }
        }
    }
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 16);
    assert_eq!(finish.as_deref(), Some("length"));
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_completion_and_seeded_sampling_are_reproducible() {
    let s = start(&single_stage_toml("")).await;
    let body = json!({"model": "tiny-test", "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0.9, "seed": 42, "ignore_eos": true});
    let (status, a) = s.post("/v1/completions", body.clone()).await;
    assert_eq!(status, 200, "{a}");
    assert_eq!(a["object"], "text_completion");
    let (_, b) = s.post("/v1/completions", body).await;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    assert_eq!(a["usage"]["completion_tokens"], 12);
    // Legacy completions default to 16 tokens.
    let (_, c) = s
        .post(
            "/v1/completions",
            json!({"prompt": "x", "ignore_eos": true}),
        )
        .await;
    assert_eq!(c["usage"]["completion_tokens"], 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_and_stop_tokens_end_generation() {
    let s = start(&single_stage_toml("")).await;
    let (_, whole) = s
        .post(
            "/v1/completions",
            json!({"prompt": "abc", "max_tokens": 24, "temperature": 0, "ignore_eos": true}),
        )
        .await;
    let text = whole["choices"][0]["text"].as_str().unwrap().to_string();
    // Stop on a piece of text the greedy continuation is known to contain.
    let chars: Vec<char> = text.chars().collect();
    assert!(
        chars.len() >= 6,
        "tiny model produced too little text: {text:?}"
    );
    let stop: String = chars[3..5].iter().collect();
    let (_, cut) = s
        .post("/v1/completions", json!({"prompt": "abc", "max_tokens": 24, "temperature": 0, "ignore_eos": true, "stop": [stop.clone()]}))
        .await;
    let cut_text = cut["choices"][0]["text"].as_str().unwrap();
    assert_eq!(cut["choices"][0]["finish_reason"], "stop");
    assert_eq!(cut_text, &text[..text.find(&stop).unwrap()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_and_health_describe_the_deployment() {
    let s = start(&single_stage_toml("")).await;
    let (status, models) = s.get_text("/v1/models").await;
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["id"], "tiny-test");
    let (status, health) = s.get_text("/health").await;
    assert_eq!(status, 200);
    let health: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["status"], "ready");
    assert_eq!(health["stages"]["thinker"]["state"], "ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_shaped_errors() {
    let s = start(&single_stage_toml("")).await;
    let url = format!("{}/v1/chat/completions", s.base);
    // Malformed JSON.
    let resp = s
        .client
        .post(&url)
        .body("{not json")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(body["error"]["message"].as_str().unwrap().contains("JSON"));
    // Wrong types, missing fields, out-of-range values.
    for bad in [
        json!({"messages": "hi"}),
        json!({"model": "tiny-test"}),
        json!({"messages": [{"role": "user", "content": "x"}], "temperature": -1}),
        json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
        json!({"messages": [{"role": "user", "content": "x"}], "n": 3}),
        json!({"messages": [{"role": "user", "content": "x"}], "modalities": ["image"]}),
        json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
    ] {
        let (status, body) = s.post("/v1/chat/completions", bad.clone()).await;
        assert_eq!(status, 400, "{bad} -> {body}");
        assert!(body["error"]["message"].is_string(), "{body}");
    }
    // Unknown model.
    let (status, body) = s
        .post(
            "/v1/chat/completions",
            json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["param"], "model");
    // A prompt longer than the model accepts.
    let long = "word ".repeat(5000);
    let (status, body) = s.post("/v1/completions", json!({"prompt": long})).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("at most"));
    // Oversized body.
    let huge = "x".repeat(33 << 20);
    let resp = s
        .client
        .post(&url)
        .body(huge)
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 413);
    // Unknown route.
    let (status, _) = s.get_text("/v1/nothing").await;
    assert_eq!(status, 404);
    // The server still serves.
    let (status, _) = s
        .post("/v1/chat/completions", chat_body("still alive?", 4, false))
        .await;
    assert_eq!(status, 200);
    assert!(
        s.metric_sum("omnistage_errors_total{reason=\"bad_request\"}")
            .await
            >= 8.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_id_prompts_and_returned_token_ids() {
    let s = start(&single_stage_toml("")).await;
    // Generated ids come back with the completion when asked for.
    let by_text = json!({"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "ignore_eos": true, "return_token_ids": true});
    let (status, a) = s.post("/v1/completions", by_text).await;
    assert_eq!(status, 200, "{a}");
    let ids: Vec<u64> = a["choices"][0]["token_ids"]
        .as_array()
        .expect("token_ids")
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(ids.len(), 6);
    // A prompt of ids, bare or as a one-element list, is used as is.
    let prompt_ids: Vec<u32> = vec![46, 110, 99, 101, 32, 117, 112, 111, 110];
    let mut outs = Vec::new();
    for prompt in [json!(prompt_ids), json!([prompt_ids])] {
        let body = json!({"prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": true, "return_token_ids": true});
        let (status, b) = s.post("/v1/completions", body).await;
        assert_eq!(status, 200, "{b}");
        assert_eq!(b["usage"]["prompt_tokens"], prompt_ids.len());
        outs.push(b["choices"][0]["token_ids"].clone());
    }
    assert_eq!(outs[0], outs[1]);
    assert_eq!(outs[0].as_array().unwrap().len(), 6);
    // Without the flag there are no ids.
    let (_, c) = s
        .post(
            "/v1/completions",
            json!({"prompt": [5, 6, 7], "max_tokens": 2}),
        )
        .await;
    assert!(c["choices"][0].get("token_ids").is_none());
    // An empty list or an id outside the vocabulary is a 400.
    for bad in [json!([]), json!([[]]), json!([1, 2, 99_999_999])] {
        let (status, body) = s
            .post("/v1/completions", json!({"prompt": bad, "max_tokens": 2}))
            .await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
}
