//! The tiny omni graph sees and hears: chat requests with an image, with audio, and with both are
//! answered in text and speech; the encoder stages run only for requests that carry their media,
//! and an image seen before comes from the encoder cache.

mod common;

use base64::Engine as _;
use common::{start, TestServer};
use serde_json::{json, Value};
use std::io::Cursor;

const DEFAULT_TOML: &str = include_str!("../../deploy/tiny-omni.toml");

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A 20×14 PNG with a pattern set by `k`.
fn png(k: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(20, 14, |x, y| {
        let k = u32::from(k);
        image::Rgb([
            ((x * 12 + k) % 256) as u8,
            ((y * 17) % 256) as u8,
            (((x ^ y) * 9 + k) % 256) as u8,
        ])
    });
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// 0.5 s of a 16-bit mono WAV tone at 22.05 kHz (the audio encoder resamples to 16 kHz).
fn wav() -> Vec<u8> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 22_050,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut out = Cursor::new(Vec::new());
    let mut w = hound::WavWriter::new(&mut out, spec).unwrap();
    for i in 0..11_025 {
        w.write_sample(((i as f32 * 0.09).sin() * 9_000.0) as i16)
            .unwrap();
    }
    w.finalize().unwrap();
    out.into_inner()
}

fn image_part(k: u8) -> Value {
    json!({"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", b64(&png(k)))}})
}

fn audio_part() -> Value {
    json!({"type": "input_audio", "input_audio": {"data": b64(&wav()), "format": "wav"}})
}

fn chat(text: &str, parts: Vec<Value>, speak: bool) -> Value {
    let mut content = vec![json!({"type": "text", "text": text})];
    content.extend(parts);
    let mut body = json!({
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 6,
        "temperature": 0,
        "seed": 7,
    });
    if speak {
        body["modalities"] = json!(["text", "audio"]);
        body["audio"] = json!({"voice": "default", "format": "wav"});
    }
    body
}

/// The stages a request's trace lists.
async fn stages_of(s: &TestServer, id: u64) -> Vec<String> {
    let (status, text) = s.get_text(&format!("/v1/requests/{id}/trace")).await;
    assert_eq!(status, 200, "{text}");
    let t: Value = serde_json::from_str(&text).unwrap();
    t["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|st| st["stage"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_and_audio_in_text_and_speech_out() {
    let s = start(DEFAULT_TOML).await;
    let (status, id, plain) = s
        .post_with_id("/v1/chat/completions", chat("What is this?", vec![], true))
        .await;
    assert_eq!(status, 200, "{plain}");
    let plain_stages = stages_of(&s, id.unwrap()).await;
    assert!(
        !plain_stages
            .iter()
            .any(|st| st.ends_with("-encoder") && st != "image-encoder"),
        "a text-only chat skips the media encoders: {plain_stages:?}"
    );
    let prompt = |v: &Value| v["usage"]["prompt_tokens"].as_u64().unwrap();

    let cases = [
        ("image", vec![image_part(1)], vec!["vision-encoder"]),
        ("audio", vec![audio_part()], vec!["audio-encoder"]),
        (
            "both",
            vec![image_part(1), audio_part()],
            vec!["vision-encoder", "audio-encoder"],
        ),
    ];
    let mut prompts = Vec::new();
    for (name, parts, encoders) in cases {
        let (status, id, resp) = s
            .post_with_id("/v1/chat/completions", chat("What is this?", parts, true))
            .await;
        assert_eq!(status, 200, "{name}: {resp}");
        let message = &resp["choices"][0]["message"];
        let audio = message["audio"]["data"].as_str().unwrap_or_default();
        assert!(audio.len() > 100, "{name}: spoken answer: {resp}");
        assert!(message["audio"]["transcript"].is_string(), "{name}");
        assert!(
            prompt(&resp) > prompt(&plain),
            "{name}: media take prompt places"
        );
        prompts.push(prompt(&resp));
        let stages = stages_of(&s, id.unwrap()).await;
        for e in encoders {
            assert!(stages.contains(&e.to_string()), "{name}: {stages:?}");
        }
        for st in ["thinker", "talker", "codec"] {
            assert!(stages.contains(&st.to_string()), "{name}: {stages:?}");
        }
    }
    // Both media take the places each takes alone.
    let extra = |p: u64| p - prompt(&plain);
    assert_eq!(extra(prompts[2]), extra(prompts[0]) + extra(prompts[1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seen_image_comes_from_the_encoder_cache_and_answers_the_same() {
    let s = start(DEFAULT_TOML).await;
    let body = chat("Describe it.", vec![image_part(3)], false);
    let (status, first) = s.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{first}");
    let (status, second) = s.post("/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(
        first["choices"][0]["message"]["content"], second["choices"][0]["message"]["content"],
        "greedy answers to the same image"
    );
    let encoded = s
        .metric_sum("omnistage_media_encoded_total{replica=\"0\",stage=\"vision-encoder\"}")
        .await;
    let hits = s
        .metric_sum("omnistage_encoder_cache_hits_total{replica=\"0\",stage=\"vision-encoder\"}")
        .await;
    assert_eq!(
        (encoded, hits),
        (1.0, 1.0),
        "encoded once, then a cache hit"
    );

    // Streamed, with another image: text deltas arrive.
    let mut body = chat("Describe it.", vec![image_part(4)], false);
    body["stream"] = json!(true);
    let lines = s.stream("/v1/chat/completions", body).await;
    assert!(lines.iter().any(|l| l.contains("\"content\"")), "{lines:?}");
    assert_eq!(lines.last().map(String::as_str), Some("[DONE]"));
}
