//! Fetching an `image_url` that names an `http(s)://` address (only where the deployment turns
//! `media.fetch_urls` on).

use super::image::image_media_type;
use image::ImageFormat;
use omnistage_stages::deploy::MediaLimits;
use std::sync::OnceLock;
use std::time::Duration;

/// Redirects followed before giving up.
const MAX_REDIRECTS: usize = 5;

fn client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::limited(MAX_REDIRECTS))
            .user_agent(concat!("omnistage/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("an HTTP client with default TLS settings")
    })
}

/// Gets the image at `url`: its bytes and, when the response's `content-type` names an image
/// type, that format (an unsupported image type is refused here; any other content type leaves
/// the format to be recognised from the bytes). The whole fetch, body included, must finish
/// within `fetch_timeout_ms`; the body is read chunk by chunk and dropped as soon as it passes
/// `max_image_bytes`.
pub async fn fetch_image(
    url: &str,
    limits: &MediaLimits,
) -> Result<(Vec<u8>, Option<ImageFormat>), String> {
    let timeout = Duration::from_millis(limits.fetch_timeout_ms);
    let timed_out = || {
        format!(
            "fetching the image timed out after {} ms (media.fetch_timeout_ms)",
            limits.fetch_timeout_ms
        )
    };
    let failed = |e: reqwest::Error| {
        if e.is_timeout() {
            timed_out()
        } else {
            format!(
                "could not fetch the image: {}",
                error_chain(&e.without_url())
            )
        }
    };
    let fetch = async {
        let mut resp = client()
            .get(url)
            .timeout(timeout)
            .send()
            .await
            .map_err(failed)?;
        let status = resp.status();
        if !status.is_success() {
            return Err(format!("fetching the image answered HTTP {status}"));
        }
        let too_big = || {
            format!(
                "the image at the URL is over this deployment's limit of {} bytes \
                 (media.max_image_bytes)",
                limits.max_image_bytes
            )
        };
        if resp
            .content_length()
            .is_some_and(|n| n > limits.max_image_bytes)
        {
            return Err(too_big());
        }
        let declared = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|t| t.to_ascii_lowercase().starts_with("image/"))
            .map(image_media_type)
            .transpose()?;
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(failed)? {
            if (body.len() + chunk.len()) as u64 > limits.max_image_bytes {
                return Err(too_big());
            }
            body.extend_from_slice(&chunk);
        }
        Ok((body, declared))
    };
    // reqwest's timeout covers the body too; this one is a backstop for a stalled connect.
    tokio::time::timeout(timeout + Duration::from_millis(100), fetch)
        .await
        .unwrap_or_else(|_| Err(timed_out()))
}

/// An error and its causes, `: `-joined (reqwest's own message alone says little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::header;
    use axum::response::IntoResponse;
    use axum::routing::get;
    use axum::Router;

    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n fake png bytes";

    /// A server on a loopback port: `/cat.png`, `/blob` (an image without an image type),
    /// `/gif`, `/missing` (404), `/huge` (declares 1 MB), `/endless` (chunked, no length,
    /// 64 KiB chunks until dropped), `/slow` (answers after 2 s).
    async fn serve() -> String {
        let app = Router::new()
            .route(
                "/cat.png",
                get(|| async { ([(header::CONTENT_TYPE, "image/png")], PNG) }),
            )
            .route(
                "/blob",
                get(|| async { ([(header::CONTENT_TYPE, "application/octet-stream")], PNG) }),
            )
            .route(
                "/gif",
                get(|| async { ([(header::CONTENT_TYPE, "image/gif")], &b"GIF89a"[..]) }),
            )
            .route(
                "/huge",
                get(|| async { vec![0u8; 1 << 20].into_response() }),
            )
            .route(
                "/endless",
                get(|| async {
                    let chunks = futures::stream::repeat_with(|| {
                        Ok::<_, std::io::Error>(axum::body::Bytes::from(vec![0u8; 64 << 10]))
                    });
                    Body::from_stream(chunks)
                }),
            )
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    PNG
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    fn limits() -> MediaLimits {
        MediaLimits {
            max_image_bytes: 100_000,
            fetch_urls: true,
            fetch_timeout_ms: 500,
            ..MediaLimits::default()
        }
    }

    #[tokio::test]
    async fn fetches_within_the_limits() {
        let base = serve().await;
        let (bytes, format) = fetch_image(&format!("{base}/cat.png"), &limits())
            .await
            .unwrap();
        assert_eq!((bytes.as_slice(), format), (PNG, Some(ImageFormat::Png)));
        let (_, format) = fetch_image(&format!("{base}/blob"), &limits())
            .await
            .unwrap();
        assert_eq!(format, None);

        let e = fetch_image(&format!("{base}/gif"), &limits())
            .await
            .unwrap_err();
        assert!(e.contains("`image/gif` are not supported"), "{e}");
        let e = fetch_image(&format!("{base}/missing"), &limits())
            .await
            .unwrap_err();
        assert_eq!(e, "fetching the image answered HTTP 404 Not Found");
        for path in ["huge", "endless"] {
            let e = fetch_image(&format!("{base}/{path}"), &limits())
                .await
                .unwrap_err();
            assert!(e.contains("media.max_image_bytes"), "{path}: {e}");
        }
        let start = std::time::Instant::now();
        let e = fetch_image(&format!("{base}/slow"), &limits())
            .await
            .unwrap_err();
        assert!(e.contains("timed out after 500 ms"), "{e}");
        assert!(start.elapsed() < Duration::from_millis(1_500));

        // Nothing listens on port 9 of the loopback address.
        let e = fetch_image("http://127.0.0.1:9/x.png", &limits())
            .await
            .unwrap_err();
        assert!(e.starts_with("could not fetch the image"), "{e}");
    }
}
