//! Speech out over HTTP on the embedded default graph (thinker → talker → codec, with streamed
//! edges): chat completions with audio, whole and streamed, `/v1/audio/speech`, bad requests,
//! traces and metrics.

mod common;

use base64::Engine as _;
use serde_json::{json, Value};
use std::io::Cursor;

const DEFAULT_TOML: &str = include_str!("../../deploy/tiny-omni.toml");

fn b64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("valid base64")
}

/// Samples and rate of a WAV file.
fn wav_samples(bytes: &[u8]) -> (Vec<i16>, u32) {
    let mut r = hound::WavReader::new(Cursor::new(bytes)).expect("a WAV file");
    let spec = r.spec();
    assert_eq!((spec.channels, spec.bits_per_sample), (1, 16));
    let samples = r.samples::<i16>().map(Result::unwrap).collect();
    (samples, spec.sample_rate)
}

fn pcm16(bytes: &[u8]) -> Vec<i16> {
    assert_eq!(bytes.len() % 2, 0, "whole 16-bit samples");
    bytes
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect()
}

fn omni_body(stream: bool, format: &str) -> Value {
    json!({
        "messages": [{"role": "user", "content": "Say something nice."}],
        "modalities": ["text", "audio"],
        "audio": {"voice": "default", "format": format},
        "max_tokens": 12,
        "seed": 7,
        "stream": stream,
    })
}

/// Largest difference between two sample lists of equal length.
fn max_diff(a: &[i16], b: &[i16]) -> i32 {
    assert_eq!(a.len(), b.len(), "sample counts differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (i32::from(*x) - i32::from(*y)).abs())
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_audio_streamed_matches_whole_and_is_traced() {
    let server = common::start(DEFAULT_TOML).await;

    let (status, id, body) = server
        .post_with_id("/v1/chat/completions", omni_body(false, "wav"))
        .await;
    assert_eq!(status, 200, "{body}");
    let message = &body["choices"][0]["message"];
    assert!(message["content"].is_null(), "{message}");
    let transcript = message["audio"]["transcript"].as_str().expect("transcript");
    assert!(!transcript.is_empty(), "{message}");
    let (whole, rate) = wav_samples(&b64(message["audio"]["data"].as_str().unwrap()));
    assert!(rate > 0);
    assert!(!whole.is_empty(), "no audio");

    // The trace shows the first audio packet, the audio's length and chunked edges.
    let (status, trace) = server
        .get_text(&format!("/v1/requests/{}/trace", id.unwrap()))
        .await;
    assert_eq!(status, 200);
    let trace: Value = serde_json::from_str(&trace).unwrap();
    assert!(trace["first_audio_ms"].as_f64().is_some(), "{trace}");
    let seconds = trace["audio_seconds"].as_f64().unwrap();
    assert!((seconds - whole.len() as f64 / f64::from(rate)).abs() < 1e-9);
    let thinker_edge = trace["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["edge"].as_str().unwrap().starts_with("thinker"))
        .expect("thinker edge traced")
        .clone();
    assert!(thinker_edge["chunks"].as_u64().unwrap() > 1, "{trace}");

    // Streamed: audio arrives in pieces, the text as the audio's transcript; same seed, same
    // samples (PCM16 of the same f32 samples).
    let events = server
        .stream("/v1/chat/completions", omni_body(true, "pcm16"))
        .await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let mut streamed = Vec::new();
    let mut text = String::new();
    let mut audio_chunks = 0;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        let audio = &v["choices"][0]["delta"]["audio"];
        if let Some(d) = audio["data"].as_str() {
            audio_chunks += 1;
            streamed.extend(pcm16(&b64(d)));
        }
        if let Some(t) = audio["transcript"].as_str() {
            text.push_str(t);
        }
    }
    assert!(audio_chunks > 1, "audio came in one piece");
    assert_eq!(text, transcript);
    assert!(max_diff(&streamed, &whole) <= 1);

    assert!(
        server
            .metric_sum("omnistage_time_to_first_audio_seconds_count")
            .await
            >= 2.0
    );
    assert!(server.metric_sum("omnistage_audio_seconds_total").await > 0.0);
    assert!(
        server
            .metric_sum("omnistage_connector_chunks_total{edge=\"thinker->talker")
            .await
            > 2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speech_endpoint_whole_and_streamed_and_bad_requests() {
    let server = common::start(DEFAULT_TOML).await;
    let post = |body: Value| {
        let client = server.client.clone();
        let url = format!("{}/v1/audio/speech", server.base);
        async move {
            let resp = client.post(url).json(&body).send().await.unwrap();
            let status = resp.status().as_u16();
            let kind = resp
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_string());
            (status, kind, resp.bytes().await.unwrap().to_vec())
        }
    };
    let (status, kind, wav) = post(json!({"input": "Hello there.", "seed": 3})).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&wav));
    assert_eq!(kind.as_deref(), Some("audio/wav"));
    let (whole, _) = wav_samples(&wav);
    assert!(!whole.is_empty());

    let (status, kind, pcm) = post(json!({
        "input": "Hello there.", "seed": 3, "response_format": "pcm", "stream": true
    }))
    .await;
    assert_eq!(status, 200);
    assert_eq!(kind.as_deref(), Some("audio/pcm"));
    assert!(max_diff(&pcm16(&pcm), &whole) <= 1);

    // A streamed WAV: a header saying "unknown length", then the same samples.
    let (status, _, streamed_wav) =
        post(json!({"input": "Hello there.", "seed": 3, "stream": true})).await;
    assert_eq!(status, 200);
    assert_eq!(&streamed_wav[..4], b"RIFF");
    assert_eq!(&streamed_wav[4..8], &[0xFF; 4]);
    assert!(max_diff(&pcm16(&streamed_wav[44..]), &whole) <= 1);

    for (body, param, words) in [
        (
            json!({"input": "hi", "voice": "nobody"}),
            "voice",
            "default",
        ),
        (
            json!({"input": "hi", "response_format": "mp3"}),
            "response_format",
            "wav or pcm16",
        ),
        (json!({"input": "  "}), "input", "empty"),
        (json!({"input": "hi", "speed": 2.0}), "speed", "1.0"),
    ] {
        let (status, _, bytes) = post(body.clone()).await;
        assert_eq!(status, 400, "{body}");
        let err: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(err["error"]["param"], param, "{err}");
        let msg = err["error"]["message"].as_str().unwrap();
        assert!(msg.contains(words), "{body}: {msg}");
    }
    // Chat refuses unknown voices and formats the same way.
    let mut bad = omni_body(false, "flac");
    let (status, body) = server.post("/v1/chat/completions", bad.clone()).await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("audio.format"))
    );
    bad["audio"] = json!({"voice": "nobody"});
    let (status, body) = server.post("/v1/chat/completions", bad).await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("audio.voice"))
    );
}

/// The shipped Orpheus file serves speech as is, once its checkpoints and token ids are pointed
/// at the tiny talker and SNAC codec (environment overrides only, no edits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orpheus_layout_serves_speech_from_a_text_prompted_talker() {
    let toml = include_str!("../../deploy/orpheus-tts.toml");
    let env: Vec<(String, String)> = [
        ("OMNISTAGE_STAGE__TALKER__MODEL", "tiny-omni/talker"),
        ("OMNISTAGE_STAGE__TALKER__DEVICE", "cpu"),
        ("OMNISTAGE_STAGE__TALKER__DTYPE", "f32"),
        ("OMNISTAGE_STAGE__TALKER__SAMPLING__MAX_TOKENS", "70"),
        ("OMNISTAGE_STAGE__TALKER__TALKER__CODEC_TOKEN_OFFSET", "514"),
        ("OMNISTAGE_STAGE__TALKER__TALKER__CODEBOOK_SIZE", "64"),
        ("OMNISTAGE_STAGE__TALKER__TALKER__END_TOKEN_IDS", "513"),
        ("OMNISTAGE_STAGE__TALKER__TALKER__PROMPT_PREFIX_IDS", "510"),
        (
            "OMNISTAGE_STAGE__TALKER__TALKER__PROMPT_SUFFIX_IDS",
            "511,512",
        ),
        ("OMNISTAGE_STAGE__CODEC__MODEL", "tiny-omni/codec"),
        ("OMNISTAGE_STAGE__CODEC__DEVICE", "cpu"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let server = common::start_with_env(
        toml,
        std::time::Duration::from_secs(120),
        omnistage::runtime::ExecutionMode::Pipelined,
        &env,
    )
    .await;
    let speak = |voice: &str| {
        let client = server.client.clone();
        let url = format!("{}/v1/audio/speech", server.base);
        let body = json!({"input": "Hi there.", "voice": voice, "seed": 5});
        async move {
            let resp = client.post(url).json(&body).send().await.unwrap();
            (resp.status().as_u16(), resp.bytes().await.unwrap().to_vec())
        }
    };
    let (status, wav) = speak("leo").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&wav));
    let (leo, rate) = wav_samples(&wav);
    assert_eq!(rate, 24_000);
    assert!(
        !leo.is_empty() && leo.len() % 128 == 0,
        "{} samples",
        leo.len()
    );
    // Another voice is another prompt, so other speech; the same voice and seed, the same speech.
    let (_, tara) = speak("tara").await;
    assert_ne!(wav_samples(&tara).0, leo);
    let (_, again) = speak("leo").await;
    assert_eq!(wav_samples(&again).0, leo);
    let (status, body) = speak("alloy").await;
    assert_eq!(status, 400);
    let msg = String::from_utf8_lossy(&body).to_string();
    assert!(msg.contains("tara") && msg.contains("zoe"), "{msg}");
}

/// With one chunk of buffer per streamed edge, producers are held back whenever their consumer
/// has not used the last chunk yet, and the answer is still the same audio.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tight_edge_buffers_hold_producers_back_and_change_nothing() {
    let tight = DEFAULT_TOML
        .replace(
            "stream = { chunk = 1, buffer = 64 }",
            "stream = { chunk = 1, buffer = 1 }",
        )
        .replace(
            "stream = { chunk = 8, buffer = 16 }",
            "stream = { chunk = 1, buffer = 1 }",
        );
    assert_ne!(tight, DEFAULT_TOML);
    let body = json!({
        "messages": [{"role": "user", "content": "Count to five."}],
        "modalities": ["text", "audio"],
        "audio": {"voice": "leo", "format": "wav"},
        "max_tokens": 24,
        "seed": 9,
    });
    let mut answers = Vec::new();
    for toml in [DEFAULT_TOML, tight.as_str()] {
        let server = common::start(toml).await;
        let (status, id, answer) = server
            .post_with_id("/v1/chat/completions", body.clone())
            .await;
        assert_eq!(status, 200, "{answer}");
        let message = &answer["choices"][0]["message"];
        let (samples, _) = wav_samples(&b64(message["audio"]["data"].as_str().unwrap()));
        let (_, trace) = server
            .get_text(&format!("/v1/requests/{}/trace", id.unwrap()))
            .await;
        let trace: Value = serde_json::from_str(&trace).unwrap();
        let holds: u64 = trace["edges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["holds"].as_u64().unwrap())
            .sum();
        answers.push((samples, message["audio"]["transcript"].clone(), holds));
    }
    let (loose, tight) = (&answers[0], &answers[1]);
    assert_eq!(loose.1, tight.1, "the text changed");
    assert!(max_diff(&loose.0, &tight.0) <= 1, "the audio changed");
    assert!(
        tight.2 > 0,
        "no producer was ever held with one chunk of buffer"
    );
}
