//! Fetching an `image_url` that names an `http(s)://` address (only where the deployment turns
//! `media.fetch_urls` on).
//!
//! Unless `media.fetch_private_addresses` is on, a fetch reaches public unicast addresses only
//! (see [`is_public`]), so a client cannot point the gateway at its loopback interface, private
//! networks or a cloud metadata service. A host named by IP address is checked before the
//! request, and so is every redirect target named by IP address; a host named by DNS name goes
//! through a resolver that drops non-public addresses, and the client connects only to the
//! addresses that resolver handed it, so a name that resolves differently the second time (DNS
//! rebinding) gains nothing. That client uses no proxy: a proxy would resolve names where they
//! cannot be checked.

use super::image::image_media_type;
use super::public_address::is_public;
use image::ImageFormat;
use omnistage_stages::deploy::MediaLimits;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::redirect::{Action, Attempt, Policy};
use reqwest::{Client, ClientBuilder, Url};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Redirects followed before giving up.
const MAX_REDIRECTS: usize = 5;

/// The tail of every refusal of a non-public address.
const PRIVATE_OFF: &str = "(media.fetch_private_addresses is off)";

fn builder() -> ClientBuilder {
    Client::builder().user_agent(concat!("omnistage/", env!("CARGO_PKG_VERSION")))
}

/// The client for `media.fetch_private_addresses = true`: any address, proxies as configured.
fn permissive_client() -> &'static Client {
    static CLIENT: OnceLock<Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        builder()
            .redirect(Policy::limited(MAX_REDIRECTS))
            .build()
            .expect("an HTTP client with default TLS settings")
    })
}

/// The client for `media.fetch_private_addresses = false`: public addresses only.
fn strict_client() -> &'static Client {
    static CLIENT: OnceLock<Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        strict_builder(Arc::new(PublicResolver))
            .build()
            .expect("an HTTP client with default TLS settings")
    })
}

/// A strict client's settings, resolving names with `resolver`.
fn strict_builder<R: Resolve + 'static>(resolver: Arc<R>) -> ClientBuilder {
    builder()
        .redirect(Policy::custom(strict_redirect))
        .dns_resolver(resolver)
        .no_proxy()
}

/// A refusal to reach an address; found again in a reqwest error's causes to report it alone.
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// Resolves names with the system resolver, keeping public addresses only.
struct PublicResolver;

impl Resolve for PublicResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let public: Vec<SocketAddr> = found.filter(|a| is_public(a.ip())).collect();
            if public.is_empty() {
                return Err(Box::new(Refused(format!(
                    "the image URL's host `{host}` resolves only to non-public addresses \
                     {PRIVATE_OFF}"
                ))) as _);
            }
            Ok(Box::new(public.into_iter()) as Addrs)
        })
    }
}

/// The strict client's redirect policy: [`check_redirect`].
fn strict_redirect(attempt: Attempt) -> Action {
    match check_redirect(attempt.url(), attempt.previous().len()) {
        Ok(()) => attempt.follow(),
        Err(e) => attempt.error(Refused(e)),
    }
}

/// Whether the strict client follows a redirect to `url` after visiting `previous` URLs (the
/// first one included): at most [`MAX_REDIRECTS`] redirects, to an http(s) address whose host,
/// when named by IP address, is public (a host named by DNS name meets the resolver instead).
fn check_redirect(url: &Url, previous: usize) -> Result<(), String> {
    if previous > MAX_REDIRECTS {
        return Err(format!(
            "fetching the image took more than {MAX_REDIRECTS} redirects"
        ));
    }
    if !matches!(url.scheme(), "http" | "https") {
        return Err("fetching the image redirected to an address that is not http(s)".into());
    }
    match non_public_literal(url) {
        Some(host) => Err(format!(
            "fetching the image redirected to host {host}, which is not a public address \
             {PRIVATE_OFF}"
        )),
        None => Ok(()),
    }
}

/// The URL's host as written in it (`[...]` around an IPv6 address) when it is an IP address
/// that is not public. The URL parser has already turned every IPv4 spelling of an http(s) host
/// (`0x7f000001`, `127.1`, ...) into dotted decimal.
fn non_public_literal(url: &Url) -> Option<&str> {
    let host = url.host_str()?;
    let ip: IpAddr = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
        .parse()
        .ok()?;
    (!is_public(ip)).then_some(host)
}

/// The error of a refused address among `e`'s causes, if any.
fn refusal(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(r) = c.downcast_ref::<Refused>() {
            return Some(r.0.clone());
        }
        cause = c.source();
    }
    None
}

/// Gets the image at `url`: its bytes and, when the response's `content-type` names an image
/// type, that format (an unsupported image type is refused here; any other content type leaves
/// the format to be recognised from the bytes). The whole fetch, body included, must finish
/// within `fetch_timeout_ms`; the body is read chunk by chunk and dropped as soon as it passes
/// `max_image_bytes`.
///
/// While `media.fetch_private_addresses` is off, only public addresses are reached (see the
/// module's documentation); a refusal says so and names that setting.
pub async fn fetch_image(
    url: &str,
    limits: &MediaLimits,
) -> Result<(Vec<u8>, Option<ImageFormat>), String> {
    let client = if limits.fetch_private_addresses {
        permissive_client()
    } else {
        strict_client()
    };
    fetch_with(client, url, limits).await
}

/// [`fetch_image`] with `client`.
async fn fetch_with(
    client: &Client,
    url: &str,
    limits: &MediaLimits,
) -> Result<(Vec<u8>, Option<ImageFormat>), String> {
    let url = Url::parse(url).map_err(|e| format!("the image URL is not a valid address: {e}"))?;
    if !limits.fetch_private_addresses {
        // reqwest resolves no IP address, so the resolver never sees these.
        if let Some(host) = non_public_literal(&url) {
            return Err(format!(
                "the image URL's host {host} is not a public address {PRIVATE_OFF}"
            ));
        }
    }
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
        } else if let Some(refused) = refusal(&e) {
            refused
        } else {
            format!(
                "could not fetch the image: {}",
                error_chain(&e.without_url())
            )
        }
    };
    let fetch = async {
        let mut resp = client
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
    use axum::response::{IntoResponse, Redirect};
    use axum::routing::get;
    use axum::Router;

    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n fake png bytes";

    /// A server on a loopback port: `/cat.png`, `/blob` (an image without an image type),
    /// `/gif`, `/missing` (404), `/huge` (declares 1 MB), `/endless` (chunked, no length,
    /// 64 KiB chunks until dropped), `/slow` (answers after 2 s), `/to-loopback` (redirects to
    /// `/cat.png` at 127.0.0.1), `/to-name` (redirects to `/cat.png` at `images.test`).
    async fn serve() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let to_loopback = format!("http://{addr}/cat.png");
        let to_name = format!("http://images.test:{}/cat.png", addr.port());
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
            )
            .route(
                "/to-loopback",
                get(move || async move { Redirect::temporary(&to_loopback) }),
            )
            .route(
                "/to-name",
                get(move || async move { Redirect::temporary(&to_name) }),
            );
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    /// Limits for the loopback test server: private addresses allowed.
    fn limits() -> MediaLimits {
        MediaLimits {
            max_image_bytes: 100_000,
            fetch_urls: true,
            fetch_timeout_ms: 500,
            fetch_private_addresses: true,
            ..MediaLimits::default()
        }
    }

    /// [`limits`] with private addresses refused.
    fn strict() -> MediaLimits {
        MediaLimits {
            fetch_private_addresses: false,
            ..limits()
        }
    }

    /// A resolver that pretends every name is a public host served on the loopback address.
    struct EverythingIsLoopback;

    impl Resolve for EverythingIsLoopback {
        fn resolve(&self, _: Name) -> Resolving {
            let addr = SocketAddr::from(([127, 0, 0, 1], 0));
            Box::pin(async move { Ok(Box::new(std::iter::once(addr)) as Addrs) })
        }
    }

    #[test]
    fn redirects_are_checked() {
        let url = |u: &str| Url::parse(u).unwrap();
        check_redirect(&url("https://example.com/cat.png"), 1).unwrap();
        check_redirect(&url("http://8.8.8.8/cat.png"), MAX_REDIRECTS).unwrap();
        // DNS names are the resolver's to check.
        check_redirect(&url("http://localhost/cat.png"), 1).unwrap();
        let e = check_redirect(&url("http://example.com/"), MAX_REDIRECTS + 1).unwrap_err();
        assert!(e.contains("more than 5 redirects"), "{e}");
        let e = check_redirect(&url("file:///etc/passwd"), 1).unwrap_err();
        assert!(e.contains("not http(s)"), "{e}");
        for (target, host) in [
            ("http://127.0.0.1:8080/cat.png", "127.0.0.1"),
            (
                "http://169.254.169.254/latest/meta-data/",
                "169.254.169.254",
            ),
            ("http://[::1]/", "[::1]"),
            ("http://[::ffff:10.0.0.1]/", "[::ffff:a00:1]"),
            ("http://0x7f000001/", "127.0.0.1"),
            ("http://127.1/", "127.0.0.1"),
        ] {
            let e = check_redirect(&url(target), 1).unwrap_err();
            assert_eq!(
                e,
                format!(
                    "fetching the image redirected to host {host}, which is not a public \
                     address (media.fetch_private_addresses is off)"
                ),
                "{target}"
            );
        }
    }

    #[tokio::test]
    async fn refuses_non_public_addresses() {
        let base = serve().await;
        let port = base.rsplit(':').next().unwrap();
        let e = fetch_image(&format!("{base}/cat.png"), &strict())
            .await
            .unwrap_err();
        assert_eq!(
            e,
            "the image URL's host 127.0.0.1 is not a public address \
             (media.fetch_private_addresses is off)"
        );
        for (url, host) in [
            (format!("http://[::1]:{port}/"), "[::1]"),
            (format!("http://0x7f000001:{port}/cat.png"), "127.0.0.1"),
            (
                format!("http://[::ffff:127.0.0.1]:{port}/"),
                "[::ffff:7f00:1]",
            ),
            (
                "http://169.254.169.254/latest/meta-data/".into(),
                "169.254.169.254",
            ),
        ] {
            let e = fetch_image(&url, &strict()).await.unwrap_err();
            assert_eq!(
                e,
                format!(
                    "the image URL's host {host} is not a public address \
                     (media.fetch_private_addresses is off)"
                ),
                "{url}"
            );
        }
        // A DNS name meets the resolver.
        let e = fetch_image(&format!("http://localhost:{port}/cat.png"), &strict())
            .await
            .unwrap_err();
        assert_eq!(
            e,
            "the image URL's host `localhost` resolves only to non-public addresses \
             (media.fetch_private_addresses is off)"
        );
        // With the setting on, the same addresses are fetched.
        let (bytes, _) = fetch_image(&format!("http://localhost:{port}/cat.png"), &limits())
            .await
            .unwrap();
        assert_eq!(bytes, PNG);
    }

    #[tokio::test]
    async fn refuses_redirects_to_non_public_addresses() {
        // A strict client whose resolver takes `images.test` for a public host.
        let client = strict_builder(Arc::new(EverythingIsLoopback))
            .build()
            .unwrap();
        let base = serve().await;
        let port = base.rsplit(':').next().unwrap();
        let named = format!("http://images.test:{port}");
        let (bytes, _) = fetch_with(&client, &format!("{named}/cat.png"), &strict())
            .await
            .unwrap();
        assert_eq!(bytes, PNG);
        // A redirect to a name goes through the resolver again.
        let (bytes, _) = fetch_with(&client, &format!("{named}/to-name"), &strict())
            .await
            .unwrap();
        assert_eq!(bytes, PNG);
        let e = fetch_with(&client, &format!("{named}/to-loopback"), &strict())
            .await
            .unwrap_err();
        assert_eq!(
            e,
            "fetching the image redirected to host 127.0.0.1, which is not a public address \
             (media.fetch_private_addresses is off)"
        );
        // The permissive client follows it.
        let (bytes, _) = fetch_image(&format!("{base}/to-loopback"), &limits())
            .await
            .unwrap();
        assert_eq!(bytes, PNG);
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
