//! Mutual HMAC-SHA256 challenge–response run before any payload frame is accepted.
//!
//! | step | frame   | direction | body                                                         |
//! |------|---------|-----------|--------------------------------------------------------------|
//! | 1    | `Hello` | C → S     | client hello: nonce (32 B) · window (u32) · max frame (u32) · session id (16 B) |
//! | 2    | `Hello` | S → C     | server hello: same layout, session id all zero               |
//! | 3    | `Proof` | C → S     | `HMAC(secret, LABEL · "client" · client hello · server hello)` |
//! | 4    | `Proof` | S → C     | `HMAC(secret, LABEL · "server" · client hello · server hello)` |
//!
//! Nonces come from the OS CSPRNG, so a recorded transcript replayed later fails at step 3 or 4
//! (the other side's nonce is new); the role string stops a proof being reflected back. The
//! client proves first, so a scanner that connects to a server never obtains a tag. Tags are
//! checked with `verify_slice` (constant time). The secret itself never crosses the wire. Any
//! frame other than the expected handshake frame — a data frame in particular — fails the
//! handshake, and the caller drops the connection. The whole exchange runs under a timeout, and
//! handshake frames are read with a 64-byte body limit so an unauthenticated peer cannot make
//! this side allocate. Both sides' limits are in the transcript and must match.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::frame::{read_frame, write_frame, FrameError, FrameType};

type HmacSha256 = Hmac<Sha256>;

/// Domain-separation label mixed into every tag.
const LABEL: &[u8] = b"omnistage-tcp/1 auth";
const NONCE_LEN: usize = 32;
const SESSION_LEN: usize = 16;
const HELLO_LEN: usize = NONCE_LEN + 4 + 4 + SESSION_LEN;
const TAG_LEN: usize = 32;
/// Body limit while the peer is unauthenticated.
const HANDSHAKE_MAX_BODY: usize = 64;

/// The shared secret. Its `Debug` output never shows the bytes.
#[derive(Clone)]
pub struct Secret(Arc<[u8]>);

impl Secret {
    pub fn new(bytes: impl AsRef<[u8]>) -> Self {
        Self(Arc::from(bytes.as_ref()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// Why a handshake failed. Every variant means the connection must be dropped.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("handshake frame error: {0}")]
    Frame(#[from] FrameError),
    #[error("the shared secret is empty")]
    EmptySecret,
    #[error("handshake did not finish within {0:?}")]
    Timeout(Duration),
    #[error("peer closed the connection during the handshake")]
    Closed,
    #[error("expected a {expected:?} frame during the handshake, got {got:?}")]
    Unexpected { expected: FrameType, got: FrameType },
    #[error("malformed {0:?} frame in the handshake")]
    Malformed(FrameType),
    #[error("peer failed to prove knowledge of the shared secret")]
    BadProof,
    #[error("peer echoed this side's nonce (reflection)")]
    Reflected,
    #[error("peer's limits (window {peer_window}, max frame {peer_max_frame}) differ from ours (window {window}, max frame {max_frame})")]
    LimitsMismatch {
        window: u32,
        max_frame: u32,
        peer_window: u32,
        peer_max_frame: u32,
    },
}

/// Which end of the connection this side is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

impl Role {
    fn tag_label(self) -> &'static [u8] {
        match self {
            Role::Client => b"client",
            Role::Server => b"server",
        }
    }
}

/// What a successful handshake established.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Authenticated {
    /// The client's session id (random, stable across its reconnects); all zero on the client.
    pub peer_session: [u8; SESSION_LEN],
}

struct Hello {
    raw: [u8; HELLO_LEN],
}

impl Hello {
    fn new(window: u32, max_frame: u32, session: [u8; SESSION_LEN]) -> Self {
        let mut raw = [0u8; HELLO_LEN];
        rand::rngs::OsRng.fill_bytes(&mut raw[..NONCE_LEN]);
        raw[NONCE_LEN..NONCE_LEN + 4].copy_from_slice(&window.to_le_bytes());
        raw[NONCE_LEN + 4..NONCE_LEN + 8].copy_from_slice(&max_frame.to_le_bytes());
        raw[NONCE_LEN + 8..].copy_from_slice(&session);
        Self { raw }
    }

    fn parse(body: &[u8]) -> Result<Self, AuthError> {
        let raw = <[u8; HELLO_LEN]>::try_from(body)
            .map_err(|_| AuthError::Malformed(FrameType::Hello))?;
        Ok(Self { raw })
    }

    fn nonce(&self) -> &[u8] {
        &self.raw[..NONCE_LEN]
    }

    fn limits(&self) -> (u32, u32) {
        let w = &self.raw[NONCE_LEN..NONCE_LEN + 4];
        let m = &self.raw[NONCE_LEN + 4..NONCE_LEN + 8];
        (
            u32::from_le_bytes([w[0], w[1], w[2], w[3]]),
            u32::from_le_bytes([m[0], m[1], m[2], m[3]]),
        )
    }

    fn session(&self) -> [u8; SESSION_LEN] {
        let mut s = [0u8; SESSION_LEN];
        s.copy_from_slice(&self.raw[NONCE_LEN + 8..]);
        s
    }
}

fn transcript_mac(
    secret: &Secret,
    role: Role,
    client: &Hello,
    server: &Hello,
) -> Result<HmacSha256, AuthError> {
    // HMAC takes keys of any length, so this only fails on an empty secret, refused earlier.
    let mut mac = HmacSha256::new_from_slice(&secret.0).map_err(|_| AuthError::EmptySecret)?;
    mac.update(LABEL);
    mac.update(role.tag_label());
    mac.update(&client.raw);
    mac.update(&server.raw);
    Ok(mac)
}

async fn expect<S: AsyncRead + Unpin>(s: &mut S, kind: FrameType) -> Result<Vec<u8>, AuthError> {
    match read_frame(s, HANDSHAKE_MAX_BODY).await? {
        None => Err(AuthError::Closed),
        Some(f) if f.kind == kind => Ok(f.body),
        Some(f) => Err(AuthError::Unexpected {
            expected: kind,
            got: f.kind,
        }),
    }
}

async fn send<S: AsyncWrite + Unpin>(
    s: &mut S,
    kind: FrameType,
    body: &[u8],
) -> Result<(), AuthError> {
    write_frame(s, kind, 0, body, HANDSHAKE_MAX_BODY).await?;
    s.flush().await.map_err(FrameError::from)?;
    Ok(())
}

/// Parameters a side puts in its hello (the link fills these from its [`super::Limits`]; public so
/// tools and tests can speak the protocol on a raw stream).
#[derive(Debug, Clone, Copy)]
pub struct HelloParams {
    pub window: u32,
    pub max_frame: u32,
    pub session: [u8; SESSION_LEN],
}

/// Runs the handshake for `role` on `stream` under `timeout`.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    role: Role,
    secret: &Secret,
    params: HelloParams,
    timeout: Duration,
) -> Result<Authenticated, AuthError> {
    if secret.0.is_empty() {
        return Err(AuthError::EmptySecret);
    }
    match tokio::time::timeout(timeout, run(stream, role, secret, params)).await {
        Ok(r) => r,
        Err(_) => Err(AuthError::Timeout(timeout)),
    }
}

async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    role: Role,
    secret: &Secret,
    p: HelloParams,
) -> Result<Authenticated, AuthError> {
    let (client, server) = match role {
        Role::Client => {
            let mine = Hello::new(p.window, p.max_frame, p.session);
            send(s, FrameType::Hello, &mine.raw).await?;
            let theirs = Hello::parse(&expect(s, FrameType::Hello).await?)?;
            (mine, theirs)
        }
        Role::Server => {
            let theirs = Hello::parse(&expect(s, FrameType::Hello).await?)?;
            let mine = Hello::new(p.window, p.max_frame, [0; SESSION_LEN]);
            send(s, FrameType::Hello, &mine.raw).await?;
            (theirs, mine)
        }
    };
    if client.nonce() == server.nonce() {
        return Err(AuthError::Reflected);
    }
    let peer = match role {
        Role::Client => Role::Server,
        Role::Server => Role::Client,
    };
    let my_tag = transcript_mac(secret, role, &client, &server)?
        .finalize()
        .into_bytes();
    if role == Role::Client {
        send(s, FrameType::Proof, &my_tag).await?;
    }
    let tag = expect(s, FrameType::Proof).await?;
    if tag.len() != TAG_LEN {
        return Err(AuthError::Malformed(FrameType::Proof));
    }
    transcript_mac(secret, peer, &client, &server)?
        .verify_slice(&tag)
        .map_err(|_| AuthError::BadProof)?;
    if role == Role::Server {
        send(s, FrameType::Proof, &my_tag).await?;
    }
    let theirs = if role == Role::Client {
        &server
    } else {
        &client
    };
    let (peer_window, peer_max_frame) = theirs.limits();
    if (peer_window, peer_max_frame) != (p.window, p.max_frame) {
        return Err(AuthError::LimitsMismatch {
            window: p.window,
            max_frame: p.max_frame,
            peer_window,
            peer_max_frame,
        });
    }
    Ok(Authenticated {
        peer_session: if role == Role::Server {
            client.session()
        } else {
            [0; SESSION_LEN]
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tcp::frame::encode;

    const P: HelloParams = HelloParams {
        window: 8,
        max_frame: 1024,
        session: [7; SESSION_LEN],
    };
    const T: Duration = Duration::from_secs(5);

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    #[test]
    fn matching_secrets_authenticate_and_wrong_ones_fail_both_sides() {
        rt().block_on(async {
            let (mut a, mut b) = tokio::io::duplex(4096);
            let k = Secret::new("k");
            let (c, s) = tokio::join!(
                handshake(&mut a, Role::Client, &k, P, T),
                handshake(&mut b, Role::Server, &k, P, T)
            );
            assert_eq!(c.unwrap().peer_session, [0; SESSION_LEN]);
            assert_eq!(s.unwrap().peer_session, [7; SESSION_LEN]);

            let (mut a, mut b) = tokio::io::duplex(4096);
            let wrong = Secret::new("wrong");
            let (c, s) = tokio::join!(handshake(&mut a, Role::Client, &wrong, P, T), async {
                let r = handshake(&mut b, Role::Server, &k, P, T).await;
                drop(b); // the server drops the connection on failure
                r
            });
            assert!(matches!(s, Err(AuthError::BadProof)), "{s:?}");
            assert!(matches!(c, Err(AuthError::Closed)), "{c:?}");
        });
    }

    #[test]
    fn replayed_client_transcript_is_rejected() {
        rt().block_on(async {
            let k = Secret::new("k");
            // A genuine handshake relayed through a tap that records the client's bytes.
            let (mut a, mut b) = tokio::io::duplex(4096);
            let (mut srv_a, mut srv_b) = tokio::io::duplex(4096);
            let relay = async {
                // Forward client→server while capturing; server→client untouched.
                let mut captured = Vec::new();
                let hello = read_frame(&mut b, 64).await.unwrap().unwrap();
                captured.extend(encode(hello.kind, 0, &hello.body).unwrap());
                srv_a.write_all(&captured).await.unwrap();
                let sh = read_frame(&mut srv_a, 64).await.unwrap().unwrap();
                b.write_all(&encode(sh.kind, 0, &sh.body).unwrap())
                    .await
                    .unwrap();
                let proof = read_frame(&mut b, 64).await.unwrap().unwrap();
                let proof = encode(proof.kind, 0, &proof.body).unwrap();
                srv_a.write_all(&proof).await.unwrap();
                captured.extend(proof);
                let sp = read_frame(&mut srv_a, 64).await.unwrap().unwrap();
                b.write_all(&encode(sp.kind, 0, &sp.body).unwrap())
                    .await
                    .unwrap();
                captured
            };
            let (c, s, captured) = tokio::join!(
                handshake(&mut a, Role::Client, &k, P, T),
                handshake(&mut srv_b, Role::Server, &k, P, T),
                relay
            );
            c.unwrap();
            s.unwrap();
            // Replay the captured client bytes verbatim to a new server.
            let (mut x, mut y) = tokio::io::duplex(4096);
            x.write_all(&captured).await.unwrap();
            let s = handshake(&mut y, Role::Server, &k, P, T).await;
            assert!(matches!(s, Err(AuthError::BadProof)), "{s:?}");
        });
    }

    #[test]
    fn data_before_auth_and_silence_fail() {
        rt().block_on(async {
            let k = Secret::new("k");
            let (mut x, mut y) = tokio::io::duplex(4096);
            x.write_all(&encode(FrameType::Data, 1, b"job").unwrap())
                .await
                .unwrap();
            let s = handshake(&mut y, Role::Server, &k, P, T).await;
            assert!(
                matches!(
                    s,
                    Err(AuthError::Unexpected {
                        got: FrameType::Data,
                        ..
                    })
                ),
                "{s:?}"
            );

            let (_x, mut y) = tokio::io::duplex(4096);
            let s = handshake(&mut y, Role::Server, &k, P, Duration::from_millis(50)).await;
            assert!(matches!(s, Err(AuthError::Timeout(_))), "{s:?}");
        });
    }

    #[test]
    fn the_secret_never_crosses_the_wire() {
        rt().block_on(async {
            let secret = b"a-very-recognisable-secret-0123456789";
            // Relay both directions, capturing every byte either side sends.
            let (mut a, mut a_far) = tokio::io::duplex(4096);
            let (mut b, mut b_far) = tokio::io::duplex(4096);
            let relay = async {
                let mut wire = Vec::new();
                for from_client in [true, false, true, false] {
                    let (src, dst) = if from_client {
                        (&mut a_far, &mut b_far)
                    } else {
                        (&mut b_far, &mut a_far)
                    };
                    let f = read_frame(src, 64).await.unwrap().unwrap();
                    let bytes = encode(f.kind, f.seq, &f.body).unwrap();
                    dst.write_all(&bytes).await.unwrap();
                    wire.extend(bytes);
                }
                wire
            };
            let k = Secret::new(secret);
            let (c, s, wire) = tokio::join!(
                handshake(&mut a, Role::Client, &k, P, T),
                handshake(&mut b, Role::Server, &k, P, T),
                relay
            );
            c.unwrap();
            s.unwrap();
            assert!(!wire.windows(secret.len()).any(|w| w == secret));
            assert!(!format!("{k:?}").contains("recognisable"));
        });
    }
}
