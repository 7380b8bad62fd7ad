//! Image and audio content parts of chat requests: checked against the deployment, fetched when
//! they name a URL, decoded to RGB pixels or mono PCM, and handed to the job as
//! [`MediaInput`]s in order of appearance.
//!
//! Checks run in a fixed order, so a client learns the cheapest reason first: the JSON shape
//! (in [`crate::openai`]), then whether the deployment takes the modality at all, then
//! `media.max_items`, then where the bytes come from (`data:` URI, or `http(s)://` when
//! `media.fetch_urls` is on, reaching public addresses only unless
//! `media.fetch_private_addresses` is on), then sizes and decoding. Decoding runs on tokio's
//! blocking pool, off the executor threads that serve every other request, and a decoder that
//! panics on hostile input fails only its own request.

mod audio;
mod fetch;
mod image;
mod public_address;

pub use self::audio::{decode_audio, AudioFormat};
pub use self::fetch::fetch_image;
pub use self::image::{decode_image, image_media_type};

use crate::openai::BadRequest;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use omnistage_stages::deploy::{DeployGraph, MediaLimits};
use omnistage_stages::{MediaInput, Modality};

/// Where one media part's bytes are, as the client sent them: shape checked, nothing decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum MediaSource {
    /// `image_url.url`: a `data:` URI or an address.
    ImageUrl(String),
    /// `input_audio`: base64 data in a format.
    Audio { data: String, format: AudioFormat },
}

/// One image or audio part of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct MediaPart {
    /// Where the part is, e.g. `messages[1].content[2]`; errors name it or one of its fields.
    pub at: String,
    pub source: MediaSource,
}

impl MediaPart {
    pub fn modality(&self) -> Modality {
        match self.source {
            MediaSource::ImageUrl(_) => Modality::Image,
            MediaSource::Audio { .. } => Modality::Audio,
        }
    }

    /// The field holding the part's bytes (or their address).
    fn data_param(&self) -> String {
        match self.source {
            MediaSource::ImageUrl(_) => format!("{}.image_url.url", self.at),
            MediaSource::Audio { .. } => format!("{}.input_audio.data", self.at),
        }
    }
}

/// Checks the parts against the deployment and decodes them, in order.
pub async fn resolve(
    parts: Vec<MediaPart>,
    graph: &DeployGraph,
) -> Result<Vec<MediaInput>, BadRequest> {
    check_parts(&parts, &graph.media, |m| graph.takes_media(m))?;
    let mut out = Vec::with_capacity(parts.len());
    for part in parts {
        out.push(decode_part(part, &graph.media).await?);
    }
    Ok(out)
}

/// The checks that need no decoding, over all parts before any is decoded: the modality is
/// taken, the count is within `max_items`, and each image address is one this deployment reads.
pub fn check_parts(
    parts: &[MediaPart],
    limits: &MediaLimits,
    takes: impl Fn(Modality) -> bool,
) -> Result<(), BadRequest> {
    for p in parts {
        let m = p.modality();
        if !takes(m) {
            return Err(BadRequest::new(
                &p.at,
                format!("this deployment takes no {} input", m.as_str()),
            ));
        }
    }
    if parts.len() > limits.max_items {
        return Err(BadRequest::new(
            &parts[limits.max_items].at,
            format!(
                "a request may carry at most {} images and audio clips \
                 (media.max_items); this one carries {}",
                limits.max_items,
                parts.len()
            ),
        ));
    }
    for p in parts {
        if let MediaSource::ImageUrl(url) = &p.source {
            match url_scheme(url).as_deref() {
                Some("data") => {}
                Some("http" | "https") if limits.fetch_urls => {}
                Some("http" | "https") => {
                    return Err(BadRequest::new(
                        &p.data_param(),
                        "URL fetching is off in this deployment (media.fetch_urls); \
                         send the image inline as a data: URI (data:image/png;base64,...)",
                    ))
                }
                _ => {
                    return Err(BadRequest::new(
                        &p.data_param(),
                        "the image URL must be a data: URI (data:image/png;base64,...) \
                         or an http(s):// address",
                    ))
                }
            }
        }
    }
    Ok(())
}

/// A URL's scheme, lowercased.
fn url_scheme(url: &str) -> Option<String> {
    let (scheme, _) = url.split_once(':')?;
    let ok = !scheme.is_empty()
        && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    ok.then(|| scheme.to_ascii_lowercase())
}

/// Fetches (for an address) and decodes one part already through [`check_parts`].
async fn decode_part(part: MediaPart, limits: &MediaLimits) -> Result<MediaInput, BadRequest> {
    let param = part.data_param();
    let bad = |m: String| BadRequest::new(&param, m);
    let limits = limits.clone();
    let job: Box<dyn FnOnce() -> Result<MediaInput, String> + Send> = match part.source {
        MediaSource::ImageUrl(url) if url_scheme(&url).as_deref() == Some("data") => {
            let (media_type, payload) = parse_data_uri(&url).map_err(bad)?;
            // `application/octet-stream` says nothing: the format is read from the bytes.
            let declared = media_type
                .as_deref()
                .filter(|t| *t != "application/octet-stream")
                .map(image_media_type)
                .transpose()
                .map_err(bad)?;
            // The payload is the URI's tail: moved along with it rather than copied.
            let start = url.len() - payload.len();
            Box::new(move || {
                let bytes = base64_bytes(&url[start..], limits.max_image_bytes, "image")?;
                decode_image(&bytes, declared, &limits)
            })
        }
        MediaSource::ImageUrl(url) => {
            let (bytes, declared) = fetch_image(&url, &limits).await.map_err(bad)?;
            Box::new(move || decode_image(&bytes, declared, &limits))
        }
        MediaSource::Audio { data, format } => Box::new(move || {
            let bytes = base64_bytes(&data, limits.max_audio_bytes, "audio clip")?;
            decode_audio(bytes, format, &limits)
        }),
    };
    match tokio::task::spawn_blocking(job).await {
        Ok(r) => r.map_err(bad),
        Err(e) => {
            tracing::warn!(param = %param, error = %e, "media decoder failed");
            Err(bad("the media could not be decoded".into()))
        }
    }
}

/// Splits `data:[<media type>][;param...];base64,<data>` into its media type (lowercased, `None`
/// when left out) and its base64 payload.
pub fn parse_data_uri(url: &str) -> Result<(Option<String>, &str), String> {
    let rest = match url.get(..5) {
        Some(s) if s.eq_ignore_ascii_case("data:") => &url[5..],
        _ => return Err("not a data: URI".into()),
    };
    let Some((header, payload)) = rest.split_once(',') else {
        return Err("the data: URI has no `,` before its data".into());
    };
    let mut fields = header.split(';');
    let media_type = fields.next().unwrap_or("").trim().to_ascii_lowercase();
    if !fields.any(|f| f.trim().eq_ignore_ascii_case("base64")) {
        return Err("only base64 data: URIs are supported (data:image/png;base64,...)".into());
    }
    Ok(((!media_type.is_empty()).then_some(media_type), payload))
}

/// Decodes base64 (standard alphabet, padding optional, whitespace ignored), refusing a payload
/// whose decoded size would pass `max_bytes` before decoding it.
pub fn base64_bytes(data: &str, max_bytes: u64, what: &str) -> Result<Vec<u8>, String> {
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let data = data.trim();
    let spaces = data.bytes().filter(u8::is_ascii_whitespace).count();
    // At least this many bytes come out (padding makes up to 2 fewer).
    let least = ((data.len() - spaces) as u64 / 4 * 3).saturating_sub(2);
    if least > max_bytes {
        return Err(too_many_bytes(what, least, max_bytes));
    }
    let decoded = if spaces > 0 {
        let compact: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        LENIENT.decode(compact)
    } else {
        LENIENT.decode(data)
    };
    let bytes = decoded.map_err(|e| format!("the {what} is not valid base64: {e}"))?;
    if bytes.is_empty() {
        return Err(format!("the {what} data is empty"));
    }
    if bytes.len() as u64 > max_bytes {
        return Err(too_many_bytes(what, bytes.len() as u64, max_bytes));
    }
    Ok(bytes)
}

fn too_many_bytes(what: &str, n: u64, max: u64) -> String {
    let field = if what == "image" {
        "media.max_image_bytes"
    } else {
        "media.max_audio_bytes"
    };
    format!("the {what} is {n} bytes or more, over this deployment's limit of {max} ({field})")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_part(at: &str, url: &str) -> MediaPart {
        MediaPart {
            at: at.into(),
            source: MediaSource::ImageUrl(url.into()),
        }
    }

    fn audio_part(at: &str) -> MediaPart {
        MediaPart {
            at: at.into(),
            source: MediaSource::Audio {
                data: "AAAA".into(),
                format: AudioFormat::Wav,
            },
        }
    }

    #[test]
    fn checks_modality_then_count_then_address() {
        let limits = MediaLimits {
            max_items: 2,
            ..MediaLimits::default()
        };
        let parts = vec![
            image_part("messages[0].content[0]", "data:image/png;base64,AAAA"),
            audio_part("messages[0].content[1]"),
            image_part("messages[1].content[0]", "ftp://example/x.png"),
        ];
        let only_images = |m: Modality| m == Modality::Image;
        let e = check_parts(&parts, &limits, only_images).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content[1]"));
        assert_eq!(e.message, "this deployment takes no audio input");

        let e = check_parts(&parts, &limits, |_| true).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[1].content[0]"));
        assert!(e.message.contains("at most 2"), "{}", e.message);

        let e = check_parts(&parts[..], &MediaLimits::default(), |_| true).unwrap_err();
        assert_eq!(
            e.param.as_deref(),
            Some("messages[1].content[0].image_url.url")
        );
        assert!(e.message.contains("data: URI"), "{}", e.message);

        let web = [image_part("m", "https://example.com/cat.png")];
        let e = check_parts(&web, &MediaLimits::default(), |_| true).unwrap_err();
        assert!(e.message.contains("URL fetching is off"), "{}", e.message);
        let on = MediaLimits {
            fetch_urls: true,
            ..MediaLimits::default()
        };
        check_parts(&web, &on, |_| true).unwrap();
        assert!(check_parts(&[image_part("m", "cat.png")], &on, |_| true).is_err());
    }

    #[test]
    fn parses_data_uris() {
        assert_eq!(
            parse_data_uri("data:image/PNG;base64,QUJD").unwrap(),
            (Some("image/png".to_string()), "QUJD")
        );
        assert_eq!(parse_data_uri("DATA:;base64,QQ").unwrap(), (None, "QQ"));
        assert!(parse_data_uri("data:image/png,rawbytes")
            .unwrap_err()
            .contains("base64"));
        assert!(parse_data_uri("data:image/png;base64").is_err());
    }

    #[test]
    fn base64_is_lenient_but_bounded() {
        assert_eq!(base64_bytes("QUJD", 10, "image").unwrap(), b"ABC");
        assert_eq!(base64_bytes("QUI", 10, "image").unwrap(), b"AB");
        assert_eq!(base64_bytes("QU\nJD\r\n", 10, "image").unwrap(), b"ABC");
        let e = base64_bytes("QUJD*!", 10, "image").unwrap_err();
        assert!(e.contains("not valid base64"), "{e}");
        let e = base64_bytes("", 10, "audio clip").unwrap_err();
        assert!(e.contains("empty"), "{e}");
        // 4000 base64 chars is ~3000 bytes: refused before decoding.
        let e = base64_bytes(&"A".repeat(4000), 100, "image").unwrap_err();
        assert!(e.contains("media.max_image_bytes"), "{e}");
        let e = base64_bytes("QUJDRA==", 3, "audio clip").unwrap_err();
        assert!(e.contains("media.max_audio_bytes"), "{e}");
    }
}
