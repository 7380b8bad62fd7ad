//! One request over HTTP, timed from the client's side, and its server trace.
//!
//! JCT is measured to the last byte of the answer (the end of the SSE stream for streamed
//! kinds), TTFT to the first streamed chunk carrying content (text or an image part): what a
//! user of the API waits for, which the server's own trace cannot see (it excludes HTTP and the
//! client's read).

use super::workload::{ImageShape, Kind, Planned, Workload};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// One stage's part of a job, as `GET /v1/requests/{id}/trace` reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StageTrace {
    pub stage: String,
    pub submitted_ms: f64,
    pub admitted_ms: Option<f64>,
    pub first_output_ms: Option<f64>,
    pub finished_ms: Option<f64>,
    pub queue_wait_ms: Option<f64>,
    pub compute_ms: Option<f64>,
}

/// One edge delivery of a job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EdgeTrace {
    pub edge: String,
    /// Deliveries: 1 for a plain edge, the chunk count for a streamed one.
    pub chunks: u64,
    /// Times the producer was held back on the edge's buffer bound.
    pub holds: u64,
    pub bytes: u64,
    pub transfer_ms: f64,
}

/// A job's server-side trace (a mirror of the server's `JobTrace`; every field defaulted so a
/// server that adds or drops fields still parses).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Trace {
    pub id: u64,
    pub started_unix_ms: f64,
    pub outputs: Vec<String>,
    pub outcome: String,
    pub graph_wait_ms: f64,
    pub jct_ms: f64,
    pub first_output_ms: Option<f64>,
    pub first_audio_ms: Option<f64>,
    pub audio_seconds: Option<f64>,
    pub real_time_factor: Option<f64>,
    pub stages: Vec<StageTrace>,
    pub edges: Vec<EdgeTrace>,
}

/// How a request ended, from the client's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    /// 429 or 503: the server shed load.
    Refused,
    /// Any other failure: a 4xx/5xx, an error inside the stream, a transport error or timeout.
    Error,
}

/// Everything measured for one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub index: u64,
    pub kind: Kind,
    pub outcome: Outcome,
    /// HTTP status; 0 when no response came.
    pub status: u16,
    pub error: Option<String>,
    /// When it was sent, in seconds after the run started.
    pub sent_s: f64,
    /// Poisson: when it was due, in seconds after the run started.
    pub due_s: Option<f64>,
    /// How late it was sent after it was due: timer and scheduling lag, plus any wait for the
    /// in-flight cap (then `held_by_cap`).
    pub client_wait_ms: f64,
    /// The in-flight cap was full when it was due, so it waited for a slot.
    pub held_by_cap: bool,
    /// Job completion time: from when the request was due (Poisson) or sent (closed loop) to the
    /// answer's last byte. Counting from the due time keeps time spent behind the in-flight cap
    /// in the JCT, so a saturated client cannot hide the server's latency (coordinated omission).
    pub jct_ms: f64,
    /// Time to the first streamed content chunk (text and omni).
    pub ttft_ms: Option<f64>,
    /// Time to the first streamed audio packet (speech).
    pub ttfp_ms: Option<f64>,
    /// Real-time factor of the generated audio (server job time ÷ audio seconds, from the
    /// trace).
    pub rtf: Option<f64>,
    pub prompt_words: u64,
    pub max_tokens: u64,
    pub output_tokens: Option<u64>,
    pub images: u64,
    pub request_id: Option<u64>,
    pub trace: Option<Trace>,
    pub trace_error: Option<String>,
}

/// The route and JSON body of a planned request.
pub fn request_body(p: &Planned, wl: &Workload, model: Option<&str>) -> (&'static str, Value) {
    let image = |shape: &ImageShape| json!({"size": shape.size, "steps": shape.steps, "n": shape.n, "seed": p.seed});
    let chat = |modalities: &[&str]| {
        let mut body = json!({
            "messages": [{"role": "user", "content": p.prompt}],
            "max_tokens": p.max_tokens,
            "ignore_eos": wl.ignore_eos,
            "seed": p.seed,
            "stream": true,
            "stream_options": {"include_usage": true},
            "modalities": modalities,
        });
        if modalities.contains(&"image") {
            body["image"] = image(&wl.image);
        }
        for (k, v) in &wl.extra_body {
            body[k] = v.clone();
        }
        body
    };
    let (path, mut body) = match p.kind {
        Kind::Text => ("/v1/chat/completions", chat(&["text"])),
        Kind::Omni => ("/v1/chat/completions", chat(&["text", "image"])),
        Kind::Speech => {
            let mut body = chat(&["text", "audio"]);
            body["audio"] = json!({"voice": "default", "format": "pcm16"});
            ("/v1/chat/completions", body)
        }
        Kind::Image => {
            let mut body = image(&wl.image);
            body["prompt"] = json!(p.prompt);
            ("/v1/images/generations", body)
        }
    };
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    (path, body)
}

/// Longest error text kept per request.
const MAX_ERROR_CHARS: usize = 300;

fn clip(s: &str) -> String {
    match s.char_indices().nth(MAX_ERROR_CHARS) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Sends one request and measures it. `due` is when it should have been sent (JCT counts from
/// there); `run_start` anchors `sent_s`.
pub async fn execute(
    client: &reqwest::Client,
    base: &str,
    wl: &Workload,
    model: Option<&str>,
    p: &Planned,
    run_start: Instant,
    due: Instant,
) -> Record {
    let sent = Instant::now();
    let mut rec = Record {
        index: p.index,
        kind: p.kind,
        outcome: Outcome::Error,
        status: 0,
        error: None,
        sent_s: sent.duration_since(run_start).as_secs_f64(),
        due_s: p.at_s,
        client_wait_ms: sent.saturating_duration_since(due).as_secs_f64() * 1e3,
        held_by_cap: false,
        jct_ms: 0.0,
        ttft_ms: None,
        ttfp_ms: None,
        rtf: None,
        prompt_words: p.prompt_words,
        max_tokens: p.max_tokens,
        output_tokens: None,
        images: 0,
        request_id: None,
        trace: None,
        trace_error: None,
    };
    let (path, body) = request_body(p, wl, model);
    let result = send(client, base, path, &body, due, &mut rec).await;
    rec.jct_ms = due.elapsed().as_secs_f64() * 1e3;
    match result {
        Ok(()) => rec.outcome = Outcome::Ok,
        Err(e) => {
            rec.outcome = if matches!(rec.status, 429 | 503) {
                Outcome::Refused
            } else {
                Outcome::Error
            };
            rec.error = Some(clip(&e));
        }
    }
    rec
}

async fn send(
    client: &reqwest::Client,
    base: &str,
    path: &str,
    body: &Value,
    due: Instant,
    rec: &mut Record,
) -> Result<(), String> {
    let resp = client
        .post(format!("{base}{path}"))
        .json(body)
        .send()
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    rec.status = resp.status().as_u16();
    rec.request_id = resp
        .headers()
        .get(crate::server::REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    if !resp.status().is_success() {
        let status = rec.status;
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or(text);
        return Err(format!("HTTP {status}: {message}"));
    }
    let streamed = body["stream"] == json!(true);
    if !streamed {
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?;
        let v: Value =
            serde_json::from_slice(&bytes).map_err(|e| format!("the answer is not JSON: {e}"))?;
        rec.images = v["data"].as_array().map_or(0, |d| d.len() as u64);
        rec.output_tokens = v["usage"]["output_tokens"]
            .as_u64()
            .filter(|_| rec.kind != Kind::Image);
        return Ok(());
    }
    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut chunks = 0u64;
    let mut done = false;
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|e| format!("reading the stream: {e}"))?;
        buf.extend_from_slice(&piece);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let Some(data) = line.strip_prefix(b"data:") else {
                continue;
            };
            let data = String::from_utf8_lossy(data);
            let data = data.trim();
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let v: Value = serde_json::from_str(data)
                .map_err(|e| format!("a streamed chunk is not JSON: {e}"))?;
            if let Some(err) = v.get("error") {
                let message = err["message"].as_str().unwrap_or("error");
                return Err(format!("error in the stream: {message}"));
            }
            if let Some(t) = v["usage"]["completion_tokens"].as_u64() {
                rec.output_tokens = Some(t);
            }
            let delta = &v["choices"][0]["delta"];
            if delta["audio"]["data"]
                .as_str()
                .is_some_and(|d| !d.is_empty())
                && rec.ttfp_ms.is_none()
            {
                rec.ttfp_ms = Some(due.elapsed().as_secs_f64() * 1e3);
            }
            // With audio, the text streams as the audio's transcript.
            let content = match &delta["audio"]["transcript"] {
                Value::String(_) => &delta["audio"]["transcript"],
                _ => &delta["content"],
            };
            let has_content = match content {
                Value::String(s) => {
                    chunks += 1;
                    !s.is_empty()
                }
                Value::Array(parts) => {
                    rec.images += parts.iter().filter(|p| p["type"] == "image_url").count() as u64;
                    !parts.is_empty()
                }
                _ => false,
            };
            if has_content && rec.ttft_ms.is_none() {
                rec.ttft_ms = Some(due.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    if !done {
        return Err("the stream ended without [DONE]".into());
    }
    if rec.output_tokens.is_none() && chunks > 0 {
        rec.output_tokens = Some(chunks);
    }
    Ok(())
}

/// Attempts to fetch a trace: the server stores it just after the answer's last byte, so the
/// first try can miss it.
const TRACE_TRIES: u32 = 8;

/// Fetches a finished job's trace, retrying briefly while the server has not stored it yet.
pub async fn fetch_trace(client: &reqwest::Client, base: &str, id: u64) -> Result<Trace, String> {
    let url = format!("{base}/v1/requests/{id}/trace");
    let mut wait = Duration::from_millis(5);
    let mut last = String::new();
    for _ in 0..TRACE_TRIES {
        match client.get(&url).send().await {
            Ok(resp) if resp.status().is_success() => {
                let bytes = resp
                    .bytes()
                    .await
                    .map_err(|e| format!("reading the trace: {e}"))?;
                return serde_json::from_slice(&bytes)
                    .map_err(|e| format!("the trace is not JSON: {e}"));
            }
            Ok(resp) => last = format!("HTTP {}", resp.status().as_u16()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_millis(500));
    }
    Err(format!("no trace for request {id}: {last}"))
}
