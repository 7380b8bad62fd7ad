//! Media input settings in the deployment file: media encoder stages (`[stage.encoder]`) and the
//! top-level `[media]` limits, with errors that name the stage and field.

use omnistage_stages::deploy::{DeployGraph, MediaLimits, StageKind};
use omnistage_stages::{Modality, PayloadKind};
use std::path::Path;

const BASE: &str = r#"
[[stage]]
id = "thinker"
kind = "llm"
model = "m/thinker"

[[stage]]
id = "eyes"
kind = "encoder"
model = "m/vision"
[stage.encoder]
encodes = "image"
cache_bytes = "8MiB"

[[stage]]
id = "ears"
kind = "encoder"
model = "m/audio"
[stage.encoder]
encodes = "audio"

[[edge]]
from = "eyes"
to = "thinker"
carries = "media_embeddings"

[[edge]]
from = "ears"
to = "thinker"
carries = "media_embeddings"

[outputs]
text = "thinker"
"#;

fn load(text: &str) -> Result<DeployGraph, String> {
    DeployGraph::from_toml_str(text, Path::new("d.toml"), Path::new("/srv"), &[])
        .map_err(|e| e.to_string())
}

#[test]
fn media_encoders_load_with_their_settings_and_defaults() {
    let g = load(BASE).unwrap();
    let eyes = g.stage("eyes").unwrap();
    assert_eq!(eyes.kind, StageKind::Encoder);
    assert_eq!(eyes.encoder.encodes, Modality::Image);
    assert_eq!(eyes.encoder.cache_bytes, 8 << 20);
    assert_eq!(eyes.outputs, vec![PayloadKind::MediaEmbeddings]);
    let ears = g.stage("ears").unwrap();
    assert_eq!(ears.encoder.encodes, Modality::Audio);
    assert_eq!(ears.encoder.cache_bytes, 64 << 20);
    assert!(g.takes_media(Modality::Image) && g.takes_media(Modality::Audio));
    assert_eq!(g.media, MediaLimits::default());
    let text = g.to_text();
    assert!(
        text.contains("encodes:  the request's image input"),
        "{text}"
    );
    assert!(text.contains("media inputs: image, audio"), "{text}");
}

#[test]
fn media_limits_parse_with_units() {
    let g = load(&format!(
        "{BASE}\n[media]\nmax_image_bytes = \"2MiB\"\nmax_audio_seconds = 2.5\nmax_items = 3\nfetch_urls = true\n"
    ))
    .unwrap();
    assert_eq!(g.media.max_image_bytes, 2 << 20);
    assert_eq!(g.media.max_audio_seconds, 2.5);
    assert_eq!(g.media.max_items, 3);
    assert!(g.media.fetch_urls);
    assert_eq!(
        g.media.fetch_timeout_ms,
        MediaLimits::default().fetch_timeout_ms
    );
}

#[test]
fn bad_media_settings_name_the_field() {
    let cases = [
        (
            BASE.replace("encodes = \"image\"", "encodes = \"smell\""),
            "stage `eyes`, field `encoder.encodes`: unknown value `smell`",
        ),
        (
            BASE.replace("cache_bytes = \"8MiB\"", "cache_bytes = \"8 parsecs\""),
            "stage `eyes`, field `encoder.cache_bytes`",
        ),
        (
            BASE.replace("encodes = \"image\"", "encodes = \"image\"\nwindow = 3"),
            "stage `eyes`, field `encoder.window`: unknown field",
        ),
        (
            BASE.replace(
                "model = \"m/thinker\"",
                "model = \"m/thinker\"\n[stage.encoder]\nencodes = \"image\"",
            ),
            "only encoder stages take an [stage.encoder] table",
        ),
        (
            BASE.replace("encodes = \"audio\"", "encodes = \"audio\"\n")
                .replace(
                    "model = \"m/audio\"",
                    "model = \"m/audio\"\noutputs = [\"embeddings\"]",
                ),
            "an encoder of audio produces only `media_embeddings`",
        ),
        (
            format!("{BASE}\n[media]\nmax_audio_seconds = -1\n"),
            "field `media.max_audio_seconds`",
        ),
        (
            format!("{BASE}\n[media]\nmax_pixels = 5\n"),
            "field `media.max_pixels`: unknown field",
        ),
    ];
    for (text, want) in cases {
        let err = load(&text).unwrap_err();
        assert!(err.contains(want), "wanted `{want}` in: {err}");
        assert!(err.starts_with("d.toml: "), "{err}");
    }
}

#[test]
fn a_text_encoder_cannot_make_media_embeddings() {
    let text = r#"
[[stage]]
id = "enc"
kind = "encoder"
model = "m/enc"
outputs = ["media_embeddings"]

[[stage]]
id = "thinker"
kind = "llm"
model = "m/thinker"

[[edge]]
from = "enc"
to = "thinker"
carries = "media_embeddings"

[outputs]
text = "thinker"
"#;
    let err = load(text).unwrap_err();
    assert!(err.contains("come from an image or audio encoder"), "{err}");
}
