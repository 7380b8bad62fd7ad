//! `process = true`: the codec stage of the default graph in its own `omnistage worker` process —
//! same answers as in process, and a killed worker fails only its jobs (503) and is restarted.

mod common;

use base64::Engine as _;
use futures::StreamExt;
use omnistage::runtime::ExecutionMode;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const DEFAULT_TOML: &str = include_str!("../../deploy/tiny-omni.toml");

fn codec_in_worker() -> Vec<(String, String)> {
    vec![
        ("OMNISTAGE_STAGE__CODEC__PROCESS".into(), "true".into()),
        // Longer speech (160 frames), so a request is still running when its worker is killed.
        (
            "OMNISTAGE_STAGE__TALKER__SAMPLING__MAX_TOKENS".into(),
            "1120".into(),
        ),
    ]
}

async fn start(env: &[(String, String)]) -> common::TestServer {
    common::start_with_env(
        DEFAULT_TOML,
        Duration::from_secs(60),
        ExecutionMode::Pipelined,
        env,
    )
    .await
}

fn speech_body(stream: bool) -> Value {
    json!({
        "messages": [{"role": "user", "content": "Say something nice."}],
        "modalities": ["text", "audio"],
        "audio": {"voice": "default", "format": if stream { "pcm16" } else { "wav" }},
        "max_tokens": 12,
        "seed": 7,
        "stream": stream,
    })
}

fn audio_bytes(body: &Value) -> Vec<u8> {
    let data = body["choices"][0]["message"]["audio"]["data"]
        .as_str()
        .unwrap_or_else(|| panic!("no audio in {body}"));
    base64::engine::general_purpose::STANDARD
        .decode(data)
        .expect("valid base64")
}

async fn health(server: &common::TestServer) -> Value {
    let (_, text) = server.get_text("/health").await;
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// The codec stage's entry in `/health` (its layout varies: look for the `codec` key anywhere
/// one level down).
fn codec_health(h: &Value) -> Value {
    if let Some(c) = h.get("codec") {
        return c.clone();
    }
    h.as_object()
        .and_then(|m| m.values().find_map(|v| v.get("codec").cloned()))
        .unwrap_or(Value::Null)
}

async fn wait_codec_ready(server: &common::TestServer, old_pid: u32) -> u32 {
    let start = Instant::now();
    loop {
        let pids = server.server.worker_pids("codec");
        let h = codec_health(&health(server).await);
        if h["state"] == "ready" && pids.first().is_some_and(|p| *p != old_pid) {
            return pids[0];
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "codec worker not back: {h}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn kill(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -KILL {pid} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_in_a_worker_process_answers_like_one_in_process() {
    let env = codec_in_worker();
    let remote = start(&env).await;
    let h = codec_health(&health(&remote).await);
    assert_eq!(h["state"], "ready", "{h}");
    let pids = remote.server.worker_pids("codec");
    assert_eq!(pids.len(), 1, "one codec worker: {h}");
    assert_ne!(pids[0], std::process::id());
    assert_eq!(h["workers"][0]["pid"], json!(pids[0]), "{h}");
    // The other stages stay in process.
    assert!(remote.server.worker_pids("talker").is_empty());

    let (status, body) = remote
        .post("/v1/chat/completions", speech_body(false))
        .await;
    assert_eq!(status, 200, "{body}");
    let from_worker = audio_bytes(&body);
    assert!(from_worker.len() > 44, "no samples");

    let local = start(&env[1..]).await;
    assert!(local.server.worker_pids("codec").is_empty());
    let (status, body) = local.post("/v1/chat/completions", speech_body(false)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(audio_bytes(&body), from_worker, "same seed, same audio");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_fails_its_jobs_with_503_and_is_restarted() {
    let server = start(&codec_in_worker()).await;
    let mut pid = server.server.worker_pids("codec")[0];
    let mut failed_mid_stream = false;
    for _attempt in 0..3 {
        let resp = server
            .client
            .post(format!("{}/v1/chat/completions", server.base))
            .json(&speech_body(true))
            .send()
            .await
            .expect("request sent");
        assert_eq!(resp.status().as_u16(), 200);
        let mut body = resp.bytes_stream();
        let mut text = String::new();
        // Kill the worker once the first audio has come through it.
        while let Some(chunk) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.expect("stream chunk")));
            if text.contains("\"audio\"") && text.contains("\"data\"") {
                break;
            }
        }
        kill(pid);
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(c) => text.push_str(&String::from_utf8_lossy(&c)),
                Err(_) => break,
            }
        }
        // Other stages keep serving meanwhile: a text-only chat.
        let (status, answer) = server
            .post(
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
            )
            .await;
        assert_eq!(status, 200, "{answer}");
        let new_pid = wait_codec_ready(&server, pid).await;
        if text.contains("service_unavailable") {
            assert!(!text.contains("\"finish_reason\":\"stop\""), "{text}");
            failed_mid_stream = true;
            pid = new_pid;
            break;
        }
        // The request finished before the kill reached it: try again on the new worker.
        eprintln!("the streamed request finished before the kill; trying again");
        pid = new_pid;
    }
    assert!(failed_mid_stream, "no request was caught by the kill");
    let h = codec_health(&health(&server).await);
    assert!(
        h["workers"][0]["restarts"].as_u64().unwrap_or(0) >= 1,
        "{h}"
    );

    // A non-streamed request in flight when the worker dies answers 503.
    let post = {
        let client = server.client.clone();
        let url = format!("{}/v1/chat/completions", server.base);
        tokio::spawn(async move {
            let resp = client.post(url).json(&speech_body(false)).send().await;
            let resp = resp.expect("request sent");
            let status = resp.status().as_u16();
            (status, resp.text().await.unwrap_or_default())
        })
    };
    // Wait until the codec has the job, then kill its worker.
    let start = Instant::now();
    loop {
        let h = codec_health(&health(&server).await);
        let load = h["waiting"].as_u64().unwrap_or(0) + h["running"].as_u64().unwrap_or(0);
        if load > 0 || post.is_finished() || start.elapsed() > Duration::from_secs(20) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    if !post.is_finished() {
        kill(pid);
        let (status, text) = post.await.expect("request task");
        assert_eq!(status, 503, "{text}");
        eprintln!("the in-flight request answered 503: {text}");
        pid = wait_codec_ready(&server, pid).await;
    }

    // After the restart, speech is served again.
    let (status, body) = server
        .post("/v1/chat/completions", speech_body(false))
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(audio_bytes(&body).len() > 44);
    assert_eq!(server.server.worker_pids("codec"), vec![pid]);
}
