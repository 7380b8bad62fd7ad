//! Text-to-image over HTTP on the embedded default graph (LLM text encoder → DiT → VAE).

mod common;

use base64::Engine as _;
use serde_json::{json, Value};

const DEFAULT_TOML: &str = include_str!("../../deploy/tiny-omni.toml");

/// Decodes a base64 PNG and returns its (width, height) from the IHDR chunk.
fn png_size(b64: &str) -> (u32, u32) {
    let png = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("valid base64");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert_eq!(&png[12..16], b"IHDR");
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    (be(&png[16..20]), be(&png[20..24]))
}

/// The metric's value once it reaches `expected`, or its last value after 10 s.
async fn settled_metric(server: &common::TestServer, name: &str, expected: f64) -> f64 {
    let mut value = 0.0;
    for _ in 0..200 {
        value = server.metric_sum(name).await;
        if value == expected {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    value
}

/// Largest difference of any RGB channel between two base64 PNGs of the same size.
fn max_channel_difference(a: &str, b: &str) -> u8 {
    let decode = |s: &str| {
        let png = base64::engine::general_purpose::STANDARD.decode(s).unwrap();
        image::load_from_memory(&png).unwrap().to_rgb8()
    };
    let (a, b) = (decode(a), decode(b));
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

fn b64s(body: &Value) -> Vec<String> {
    body["data"]
        .as_array()
        .expect("data list")
        .iter()
        .map(|d| d["b64_json"].as_str().expect("b64_json").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_generation_returns_seeded_pngs_of_the_requested_size() {
    let server = common::start(DEFAULT_TOML).await;
    let body = |seed: u64| {
        json!({"prompt": "a red fox in the snow", "n": 2, "size": "48x32", "seed": seed,
               "steps": 4, "response_format": "b64_json"})
    };
    let (status, a) = server.post("/v1/images/generations", body(3)).await;
    assert_eq!(status, 200, "{a}");
    let a = b64s(&a);
    assert_eq!(a.len(), 2);
    for img in &a {
        assert_eq!(png_size(img), (48, 32));
    }
    assert_ne!(a[0], a[1], "two images of one request differ");
    let (_, again) = server.post("/v1/images/generations", body(3)).await;
    assert_eq!(b64s(&again), a, "same seed, same images");
    let (_, other) = server.post("/v1/images/generations", body(4)).await;
    assert_ne!(b64s(&other)[0], a[0], "another seed, another image");

    // Concurrent requests of two shapes all complete, and equal what they give alone.
    let mut handles = Vec::new();
    let server = std::sync::Arc::new(server);
    for i in 0..6u64 {
        let s = server.clone();
        handles.push(tokio::spawn(async move {
            let size = if i % 2 == 0 { "48x32" } else { "64x64" };
            let (status, body) = s
                .post(
                    "/v1/images/generations",
                    json!({"prompt": "a red fox in the snow", "n": 2, "size": size,
                           "seed": if i == 0 { 3 } else { 100 + i }, "steps": 4}),
                )
                .await;
            assert_eq!(status, 200, "{body}");
            b64s(&body)
        }));
    }
    let mut results = Vec::new();
    for h in handles {
        results.push(h.await.unwrap());
    }
    // Batched with others, the same images as alone: the latents agree to float rounding
    // (engines/tests/dit_batching.rs bounds them by 1e-5), so a channel may round one level apart.
    for (batched, alone) in results[0].iter().zip(&a) {
        assert!(
            max_channel_difference(batched, alone) <= 1,
            "batched image differs"
        );
    }
    // Engine counters are published after the engine step that emitted the last answer, so
    // they may trail the response by a moment.
    let images = settled_metric(&server, "omnistage_images_generated_total", 2.0 * 9.0).await;
    assert_eq!(images, 2.0 * 9.0, "images counted");
    let steps = settled_metric(
        &server,
        "omnistage_stage_denoise_steps_total",
        2.0 * 9.0 * 4.0,
    )
    .await;
    assert_eq!(steps, 2.0 * 9.0 * 4.0, "denoise steps counted per image");
    assert!(
        server
            .metric_sum("omnistage_stage_denoise_forwards_total")
            .await
            >= 4.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_return_images_as_content_parts() {
    let server = common::start(DEFAULT_TOML).await;
    let chat = |modalities: Value, stream: bool| {
        json!({"messages": [{"role": "user", "content": "draw a cat"}], "modalities": modalities,
               "max_tokens": 4, "temperature": 0, "stream": stream,
               "image": {"size": "32x32", "seed": 1, "steps": 3}})
    };
    let (status, body) = server
        .post("/v1/chat/completions", chat(json!(["image"]), false))
        .await;
    assert_eq!(status, 200, "{body}");
    let parts = body["choices"][0]["message"]["content"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(parts.len(), 1);
    assert_eq!(parts[0]["type"], "image_url");
    let url = parts[0]["image_url"]["url"].as_str().unwrap();
    let b64 = url
        .strip_prefix("data:image/png;base64,")
        .expect("PNG data URL");
    assert_eq!(png_size(b64), (32, 32));

    let (status, body) = server
        .post(
            "/v1/chat/completions",
            chat(json!(["text", "image"]), false),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let parts = body["choices"][0]["message"]["content"]
        .as_array()
        .unwrap()
        .clone();
    let kinds: Vec<&str> = parts.iter().map(|p| p["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["text", "image_url"]);
    assert_eq!(
        parts[1]["image_url"]["url"].as_str().unwrap(),
        url,
        "seeded: same image"
    );

    let events = server
        .stream("/v1/chat/completions", chat(json!(["image"]), true))
        .await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let image_chunks = events
        .iter()
        .filter(|e| e.contains("\"image_url\""))
        .count();
    assert_eq!(image_chunks, 1, "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_image_requests_get_a_400_naming_the_allowed_range() {
    let server = common::start(DEFAULT_TOML).await;
    for (body, param, words) in [
        (
            json!({"prompt": "x", "size": "1024x1024"}),
            "size",
            "from 16 to 256",
        ),
        (
            json!({"prompt": "x", "size": "40x32"}),
            "size",
            "multiple of 16",
        ),
        (json!({"prompt": "x", "n": 5}), "n", "1 to 4"),
        (json!({"prompt": "x", "steps": 0}), "steps", "1 to 50"),
        (
            json!({"prompt": "x", "guidance_scale": -2}),
            "guidance_scale",
            "0 to 100",
        ),
        (
            json!({"prompt": "x", "response_format": "url"}),
            "response_format",
            "b64_json",
        ),
        (json!({"n": 1}), "prompt", "required"),
        (json!({"prompt": "  "}), "prompt", "empty"),
    ] {
        let (status, err) = server.post("/v1/images/generations", body.clone()).await;
        assert_eq!(status, 400, "{body}: {err}");
        assert_eq!(err["error"]["param"], param, "{body}: {err}");
        let message = err["error"]["message"].as_str().unwrap();
        assert!(message.contains(words), "{body}: {message}");
    }
    // The server keeps serving afterwards.
    let (status, _) = server
        .post(
            "/v1/images/generations",
            json!({"prompt": "x", "steps": 2, "size": "16x16"}),
        )
        .await;
    assert_eq!(status, 200);
}
