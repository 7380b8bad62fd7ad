//! Image and audio content parts of chat completions over HTTP: the shape checks, the
//! deployment's media settings (which modalities it takes, `max_items`, URL fetching) and
//! decoding errors, each a 400 in OpenAI's shape naming the part.
//!
//! The tests on `deploy/tiny-omni.toml` need its image and audio encoder stages (the
//! `media_on_tiny_omni_*` tests); the others run on a text-only deployment.

mod common;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use base64::Engine as _;
use common::{single_stage_toml, start, TestServer};
use serde_json::{json, Value};
use std::io::Cursor;

const DEFAULT_TOML: &str = include_str!("../../deploy/tiny-omni.toml");
const MP3: &[u8] = include_bytes!("fixtures/tone-16k-mono.mp3");

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// An 8×6 PNG of a colour ramp.
fn png() -> Vec<u8> {
    let img = image::RgbImage::from_fn(8, 6, |x, y| image::Rgb([x as u8 * 30, y as u8 * 40, 90]));
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// 0.1 s of 16-bit stereo WAV at 16 kHz.
fn wav() -> Vec<u8> {
    let spec = hound::WavSpec {
        channels: 2,
        sample_rate: 16_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut out = Cursor::new(Vec::new());
    let mut w = hound::WavWriter::new(&mut out, spec).unwrap();
    for i in 0..1_600 {
        let s = ((i as f32 * 0.07).sin() * 8_000.0) as i16;
        w.write_sample(s).unwrap();
        w.write_sample(-s).unwrap();
    }
    w.finalize().unwrap();
    out.into_inner()
}

fn image_part(url: &str) -> Value {
    json!({"type": "image_url", "image_url": {"url": url}})
}

fn png_part() -> Value {
    image_part(&format!("data:image/png;base64,{}", b64(&png())))
}

fn audio_part(bytes: &[u8], format: &str) -> Value {
    json!({"type": "input_audio", "input_audio": {"data": b64(bytes), "format": format}})
}

/// A one-turn chat whose user message is a text part then `parts`.
fn chat(parts: Vec<Value>) -> Value {
    let mut content = vec![json!({"type": "text", "text": "Describe this."})];
    content.extend(parts);
    json!({
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 4,
        "temperature": 0,
    })
}

/// Posts a chat that must be refused: the error's param and message.
async fn refused(s: &TestServer, body: Value) -> (String, String) {
    let (status, resp) = s.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 400, "{body} -> {resp}");
    assert_eq!(resp["error"]["type"], "invalid_request_error", "{resp}");
    (
        resp["error"]["param"].as_str().unwrap_or("").to_string(),
        resp["error"]["message"].as_str().unwrap_or("").to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_parts_need_an_encoder_and_a_good_shape() {
    let s = start(&single_stage_toml("")).await;

    // Text parts alone still make one string, as before.
    let (status, body) = s
        .post(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                   "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // No image or audio encoder in this deployment.
    let (param, message) = refused(&s, chat(vec![png_part()])).await;
    assert_eq!(param, "messages[0].content[1]");
    assert_eq!(message, "this deployment takes no image input");
    let (param, message) = refused(&s, chat(vec![audio_part(&wav(), "wav")])).await;
    assert_eq!(param, "messages[0].content[1]");
    assert_eq!(message, "this deployment takes no audio input");

    // Malformed parts: the shape is checked before the deployment's media settings.
    let malformed = [
        (
            json!({"type": "image_url", "image_url": {"detail": "auto"}}),
            "messages[0].content[1].image_url.url",
            "image_url.url",
        ),
        (
            json!({"type": "input_audio", "input_audio": {"data": "AAAA"}}),
            "messages[0].content[1].input_audio.format",
            "wav or mp3",
        ),
        (
            json!({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "flac"}}),
            "messages[0].content[1].input_audio.format",
            "unsupported audio format `flac`; use wav or mp3",
        ),
        (
            json!({"type": "video_url", "video_url": {"url": "x"}}),
            "messages[0].content[1].type",
            "content part type `video_url` is not supported",
        ),
    ];
    for (part, want_param, want_message) in malformed {
        let (param, message) = refused(&s, chat(vec![part])).await;
        assert_eq!(param, want_param);
        assert!(message.contains(want_message), "{message}");
    }
    // A good image part in the first message and a malformed part in the second: the shape
    // error wins.
    let body = json!({"messages": [
        {"role": "user", "content": [png_part()]},
        {"role": "user", "content": [{"type": "input_audio", "input_audio": {"format": "wav"}}]},
    ]});
    let (param, _) = refused(&s, body).await;
    assert_eq!(param, "messages[1].content[0].input_audio.data");
}

/// A local server for the fetch tests: `/cat.png`, `/missing` (404), `/big.png` (1 MiB).
async fn image_server() -> String {
    let cat = png();
    let app = Router::new()
        .route(
            "/cat.png",
            get(move || async move { ([(header::CONTENT_TYPE, "image/png")], cat) }),
        )
        .route(
            "/big.png",
            get(|| async {
                let mut big = png();
                big.resize(1 << 20, 0);
                ([(header::CONTENT_TYPE, "image/png")], big).into_response()
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// `deploy/tiny-omni.toml` with `[media]` fields set.
fn tiny_omni_with_media(fields: &[(&str, toml::Value)]) -> String {
    let mut doc: toml::Table = toml::from_str(DEFAULT_TOML).expect("tiny-omni.toml parses");
    let media = doc
        .entry("media")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .expect("[media] is a table");
    for (k, v) in fields {
        media.insert(k.to_string(), v.clone());
    }
    toml::to_string(&doc).unwrap()
}

// Needs tiny-omni's image and audio encoder stages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_on_tiny_omni_reaches_the_model() {
    let s = start(DEFAULT_TOML).await;
    let (status, plain) = s.post("/v1/chat/completions", chat(vec![])).await;
    assert_eq!(status, 200, "{plain}");

    let body = chat(vec![
        png_part(),
        audio_part(&wav(), "wav"),
        audio_part(MP3, "mp3"),
    ]);
    let (status, resp) = s.post("/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{resp}");
    assert!(
        resp["choices"][0]["message"]["content"].is_string(),
        "{resp}"
    );
    // The media took places in the prompt.
    let tokens = |v: &Value| v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(tokens(&resp) > tokens(&plain), "{resp} vs {plain}");

    // Decoding errors name the part's data field.
    let corrupt = image_part(&format!(
        "data:image/png;base64,{}",
        b64(b"\x89PNG\r\n\x1a\nnope")
    ));
    let (param, message) = refused(&s, chat(vec![corrupt])).await;
    assert_eq!(param, "messages[0].content[1].image_url.url");
    assert!(message.starts_with("the PNG image is corrupt"), "{message}");
    let mislabelled = image_part(&format!("data:image/jpeg;base64,{}", b64(&png())));
    let (_, message) = refused(&s, chat(vec![mislabelled])).await;
    assert_eq!(
        message,
        "the data is a PNG image but its media type says image/jpeg"
    );
    let gif = image_part("data:image/gif;base64,R0lGODlhAQABAAAAACw=");
    let (_, message) = refused(&s, chat(vec![gif])).await;
    assert!(
        message.contains("`image/gif` are not supported"),
        "{message}"
    );
    let (param, message) = refused(&s, chat(vec![audio_part(b"not audio", "wav")])).await;
    assert_eq!(param, "messages[0].content[1].input_audio.data");
    assert!(
        message.starts_with("the audio is not a valid WAV file"),
        "{message}"
    );
    let bad_b64 = json!({"type": "input_audio", "input_audio": {"data": "%%%", "format": "mp3"}});
    let (_, message) = refused(&s, chat(vec![bad_b64])).await;
    assert!(message.contains("not valid base64"), "{message}");

    // URL fetching is off by default; other schemes are never read.
    let (param, message) = refused(&s, chat(vec![image_part("https://example.com/cat.png")])).await;
    assert_eq!(param, "messages[0].content[1].image_url.url");
    assert!(message.contains("URL fetching is off"), "{message}");
    let (_, message) = refused(&s, chat(vec![image_part("file:///etc/passwd")])).await;
    assert!(message.contains("data: URI"), "{message}");
}

// Needs tiny-omni's image encoder stage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_on_tiny_omni_fetches_urls_when_allowed() {
    let images = image_server().await;
    let toml = tiny_omni_with_media(&[
        ("fetch_urls", toml::Value::Boolean(true)),
        // The image server is on the loopback address.
        ("fetch_private_addresses", toml::Value::Boolean(true)),
        ("max_image_bytes", toml::Value::Integer(64 << 10)),
        ("fetch_timeout_ms", toml::Value::Integer(5_000)),
        ("max_items", toml::Value::Integer(3)),
    ]);
    let s = start(&toml).await;

    let (status, resp) = s
        .post(
            "/v1/chat/completions",
            chat(vec![image_part(&format!("{images}/cat.png"))]),
        )
        .await;
    assert_eq!(status, 200, "{resp}");

    let (param, message) = refused(&s, chat(vec![image_part(&format!("{images}/missing"))])).await;
    assert_eq!(param, "messages[0].content[1].image_url.url");
    assert_eq!(message, "fetching the image answered HTTP 404 Not Found");

    let (_, message) = refused(&s, chat(vec![image_part(&format!("{images}/big.png"))])).await;
    assert!(message.contains("media.max_image_bytes"), "{message}");

    // At most `max_items` images and clips (the first one over is named), checked before
    // anything is fetched or decoded.
    let mut parts = vec![png_part(); 3];
    parts.push(image_part(&format!("{images}/missing")));
    let (param, message) = refused(&s, chat(parts)).await;
    assert_eq!(param, "messages[0].content[4]");
    assert!(message.contains("at most 3"), "{message}");
}

// Needs tiny-omni's image encoder stage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_on_tiny_omni_fetches_no_private_addresses_by_default() {
    let images = image_server().await;
    let port = images.rsplit(':').next().unwrap();
    let toml = tiny_omni_with_media(&[("fetch_urls", toml::Value::Boolean(true))]);
    let s = start(&toml).await;

    let (param, message) = refused(&s, chat(vec![image_part(&format!("{images}/cat.png"))])).await;
    assert_eq!(param, "messages[0].content[1].image_url.url");
    assert_eq!(
        message,
        "the image URL's host 127.0.0.1 is not a public address \
         (media.fetch_private_addresses is off)"
    );
    let localhost = image_part(&format!("http://localhost:{port}/cat.png"));
    let (param, message) = refused(&s, chat(vec![localhost])).await;
    assert_eq!(param, "messages[0].content[1].image_url.url");
    assert!(
        message.contains("resolves only to non-public addresses")
            && message.contains("media.fetch_private_addresses"),
        "{message}"
    );
}
