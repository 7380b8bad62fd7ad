//! Media input settings: the top-level `[media]` table (what the gateway accepts as image and
//! audio content parts) and a media encoder stage's `[stage.encoder]` table.

use super::fields::{bad, byte_size, parse_table, FieldTy};
use super::{DeployError, Site};
use crate::job::Modality;
use serde::Deserialize;
use serde_json::{Map, Value};

/// The keys of the top-level `[media]` table and their types.
pub(super) const MEDIA_FIELDS: &[&str] = &[
    "max_image_bytes",
    "max_image_pixels",
    "max_audio_bytes",
    "max_audio_seconds",
    "max_items",
    "fetch_urls",
    "fetch_timeout_ms",
    "fetch_private_addresses",
];

/// The keys of a `[stage.encoder]` table and their types.
pub(super) const ENCODER_FIELDS: &[(&str, FieldTy)] =
    &[("encodes", FieldTy::Str), ("cache_bytes", FieldTy::Str)];

/// What a chat request may carry as image and audio content parts.
#[derive(Debug, Clone, PartialEq)]
pub struct MediaLimits {
    /// Largest encoded image (PNG/JPEG/WebP bytes, after base64 decoding or fetching).
    pub max_image_bytes: u64,
    /// Largest decoded image, width × height.
    pub max_image_pixels: u64,
    /// Largest encoded audio clip (WAV/MP3 bytes).
    pub max_audio_bytes: u64,
    /// Longest decoded audio clip.
    pub max_audio_seconds: f64,
    /// Most images and clips in one request.
    pub max_items: usize,
    /// Whether `image_url` may name an `http(s)://` address the gateway fetches (off by default:
    /// a gateway that fetches what clients name can be pointed at internal services).
    pub fetch_urls: bool,
    /// Time limit of one fetch.
    pub fetch_timeout_ms: u64,
    /// Whether a fetch may reach addresses that are not public unicast ones: loopback, private
    /// networks, link-local (cloud metadata services), CGNAT, multicast, reserved and
    /// documentation ranges. Off by default, so a client cannot point the gateway at internal
    /// services; turn it on only where images are served from such a network.
    pub fetch_private_addresses: bool,
}

impl Default for MediaLimits {
    fn default() -> Self {
        Self {
            max_image_bytes: 20 << 20,
            max_image_pixels: 4096 * 4096,
            max_audio_bytes: 25 << 20,
            max_audio_seconds: 30.0,
            max_items: 16,
            fetch_urls: false,
            fetch_timeout_ms: 10_000,
            fetch_private_addresses: false,
        }
    }
}

/// A media encoder stage's settings (`[stage.encoder]`; encoder stages only).
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderSettings {
    /// What the stage encodes: `text` (a diffusion text encoder, the default), `image` or
    /// `audio` (the request's media items, for an LLM to splice in).
    pub encodes: Modality,
    /// Memory for embeddings of recently seen media (by content digest), reused when the same
    /// image or clip comes again.
    pub cache_bytes: u64,
}

impl Default for EncoderSettings {
    fn default() -> Self {
        Self {
            encodes: Modality::Text,
            cache_bytes: 64 << 20,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMedia {
    max_image_bytes: Option<Value>,
    max_image_pixels: Option<u64>,
    max_audio_bytes: Option<Value>,
    max_audio_seconds: Option<f64>,
    max_items: Option<usize>,
    fetch_urls: Option<bool>,
    fetch_timeout_ms: Option<u64>,
    fetch_private_addresses: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEncoder {
    encodes: Option<String>,
    cache_bytes: Option<Value>,
}

/// Parses the top-level `[media]` table.
pub(super) fn parse_limits(
    map: &Map<String, Value>,
    file: &str,
) -> Result<MediaLimits, DeployError> {
    let site = Site::Top;
    let r: RawMedia = parse_table(map, file, &site, "media.", MEDIA_FIELDS)?;
    let d = MediaLimits::default();
    let bytes = |v: Option<Value>, field: &str, default: u64| {
        v.map(|v| byte_size(&v).map_err(|m| bad(file, &site, field, &m)))
            .transpose()
            .map(|b| b.unwrap_or(default))
    };
    let positive = |v: Option<u64>, field: &str, default: u64| match v {
        Some(0) => Err(bad(file, &site, field, "must be at least 1")),
        Some(v) => Ok(v),
        None => Ok(default),
    };
    let seconds = r.max_audio_seconds.unwrap_or(d.max_audio_seconds);
    if !(seconds.is_finite() && seconds > 0.0) {
        return Err(bad(
            file,
            &site,
            "media.max_audio_seconds",
            "must be a positive number of seconds",
        ));
    }
    Ok(MediaLimits {
        max_image_bytes: bytes(
            r.max_image_bytes,
            "media.max_image_bytes",
            d.max_image_bytes,
        )?,
        max_image_pixels: positive(
            r.max_image_pixels,
            "media.max_image_pixels",
            d.max_image_pixels,
        )?,
        max_audio_bytes: bytes(
            r.max_audio_bytes,
            "media.max_audio_bytes",
            d.max_audio_bytes,
        )?,
        max_audio_seconds: seconds,
        max_items: positive(
            r.max_items.map(|v| v as u64),
            "media.max_items",
            d.max_items as u64,
        )? as usize,
        fetch_urls: r.fetch_urls.unwrap_or(d.fetch_urls),
        fetch_timeout_ms: positive(
            r.fetch_timeout_ms,
            "media.fetch_timeout_ms",
            d.fetch_timeout_ms,
        )?,
        fetch_private_addresses: r
            .fetch_private_addresses
            .unwrap_or(d.fetch_private_addresses),
    })
}

/// Parses a stage's `[stage.encoder]` table.
pub(super) fn parse_encoder(
    map: &Map<String, Value>,
    file: &str,
    site: &Site,
) -> Result<EncoderSettings, DeployError> {
    let names: Vec<&str> = ENCODER_FIELDS.iter().map(|(n, _)| *n).collect();
    let r: RawEncoder = parse_table(map, file, site, "encoder.", &names)?;
    let d = EncoderSettings::default();
    let encodes = match r.encodes.as_deref() {
        None => d.encodes,
        Some("text") => Modality::Text,
        Some("image") => Modality::Image,
        Some("audio") => Modality::Audio,
        Some(other) => {
            return Err(DeployError::UnknownValue {
                file: file.to_string(),
                site: Box::new(site.clone()),
                field: "encoder.encodes".into(),
                value: other.to_string(),
                allowed: "text, image, audio".into(),
            })
        }
    };
    let cache_bytes = match r.cache_bytes {
        // 0 turns the cache off.
        Some(Value::Number(n)) if n.as_u64() == Some(0) => 0,
        Some(v) => byte_size(&v).map_err(|m| bad(file, site, "encoder.cache_bytes", &m))?,
        None => d.cache_bytes,
    };
    Ok(EncoderSettings {
        encodes,
        cache_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(table: Value) -> Result<MediaLimits, DeployError> {
        parse_limits(table.as_object().unwrap(), "d.toml")
    }

    #[test]
    fn fetch_private_addresses_parses_and_defaults_to_off() {
        let d = parse(json!({})).unwrap();
        assert!(!d.fetch_private_addresses);
        assert_eq!(d, MediaLimits::default());
        let on = parse(json!({"fetch_urls": true, "fetch_private_addresses": true})).unwrap();
        assert!(on.fetch_urls && on.fetch_private_addresses);
        let off = parse(json!({"fetch_private_addresses": false})).unwrap();
        assert!(!off.fetch_private_addresses);
        let e = parse(json!({"fetch_private_addresses": "yes"})).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("d.toml") && e.contains("media.fetch_private_addresses"),
            "{e}"
        );
    }
}
