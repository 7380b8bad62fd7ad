//! The TCP link over 127.0.0.1: round trips, authentication, framing errors, bounds, reconnects.

use std::collections::BTreeSet;
use std::time::Duration;

use omnistage_connectors::tcp::auth::{handshake, HelloParams, Role};
use omnistage_connectors::tcp::frame::{encode, FrameType, HEADER_LEN};
use omnistage_connectors::tcp::{AuthError, Backoff, Limits, LinkError, Secret, TcpLink};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

const T: Duration = Duration::from_secs(10);

fn limits() -> Limits {
    Limits {
        max_frame: 2 << 20,
        window: 4,
        handshake_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(5),
        reconnect: Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(200),
            max_attempts: 20,
        },
    }
}

async fn listener() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    (l, addr)
}

async fn pair(secret: &Secret, lim: &Limits) -> (TcpLink, TcpLink, TcpListener) {
    let (l, addr) = listener().await;
    let (c, s) = tokio::join!(
        TcpLink::connect(addr, secret, lim),
        TcpLink::accept(&l, secret, lim)
    );
    (c.unwrap(), s.unwrap(), l)
}

/// A raw client that authenticates correctly, for sending hand-made frames.
async fn raw_authenticated(addr: &str, secret: &Secret, lim: &Limits) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let p = HelloParams {
        window: lim.window,
        max_frame: lim.max_frame as u32,
        session: [1; 16],
    };
    handshake(&mut s, Role::Client, secret, p, T).await.unwrap();
    s
}

#[tokio::test]
async fn round_trips_0_b_4_kib_1_mib_both_ways() {
    let k = Secret::new("shared secret");
    let (c, s, _l) = pair(&k, &limits()).await;
    for len in [0usize, 4 << 10, 1 << 20] {
        let body: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        c.send(body.clone()).await.unwrap();
        assert_eq!(timeout(T, s.recv()).await.unwrap().unwrap(), body);
        s.send(body.clone()).await.unwrap();
        assert_eq!(timeout(T, c.recv()).await.unwrap().unwrap(), body);
    }
    // Many more frames than the window: credits come back as frames are consumed.
    let n = 100u64;
    let sender = async {
        for i in 0..n {
            c.send(i.to_le_bytes().to_vec()).await.unwrap();
        }
    };
    let receiver = async {
        for i in 0..n {
            assert_eq!(s.recv().await.unwrap(), i.to_le_bytes());
        }
    };
    timeout(T, async { tokio::join!(sender, receiver) })
        .await
        .unwrap();
}

#[tokio::test]
async fn wrong_secret_is_rejected_on_both_sides() {
    let lim = limits();
    let (l, addr) = listener().await;
    let (client_secret, server_secret) =
        (Secret::new("client thinks"), Secret::new("server knows"));
    let (c, s) = tokio::join!(
        TcpLink::connect(addr, &client_secret, &lim),
        TcpLink::accept(&l, &server_secret, &lim)
    );
    assert!(
        matches!(s, Err(LinkError::Auth(AuthError::BadProof))),
        "{:?}",
        s.err()
    );
    assert!(matches!(c, Err(LinkError::Auth(_))), "{:?}", c.err());

    // A client facing a server that has the wrong secret (client proves first, then the
    // server's proof fails on the client).
    let mut raw = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let lim2 = lim.clone();
    let srv = tokio::spawn(async move {
        let (mut st, _) = l.accept().await.unwrap();
        let p = HelloParams {
            window: lim2.window,
            max_frame: lim2.max_frame as u32,
            session: [0; 16],
        };
        // The server answers with its own (wrong) secret without checking the client.
        let _ = handshake(&mut st, Role::Server, &Secret::new("imposter"), p, T).await;
    });
    let p = HelloParams {
        window: lim.window,
        max_frame: lim.max_frame as u32,
        session: [2; 16],
    };
    let r = handshake(&mut raw, Role::Client, &Secret::new("real"), p, T).await;
    assert!(
        matches!(r, Err(AuthError::BadProof | AuthError::Closed)),
        "{r:?}"
    );
    srv.await.unwrap();
}

#[tokio::test]
async fn unauthenticated_data_frame_is_dropped() {
    let k = Secret::new("k");
    let (l, addr) = listener().await;
    let mut raw = TcpStream::connect(&addr).await.unwrap();
    raw.write_all(&encode(FrameType::Data, 1, b"inject a job").unwrap())
        .await
        .unwrap();
    let s = TcpLink::accept(&l, &k, &limits()).await;
    assert!(
        matches!(
            s,
            Err(LinkError::Auth(AuthError::Unexpected {
                got: FrameType::Data,
                ..
            }))
        ),
        "{:?}",
        s.err()
    );
    // The server hung up: the raw peer sees end of stream (or a reset), never a reply.
    let mut buf = [0u8; 64];
    match timeout(T, raw.read(&mut buf)).await.unwrap() {
        Ok(n) => assert_eq!(n, 0),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
    }
}

#[tokio::test]
async fn corrupted_checksum_is_detected() {
    let (k, lim) = (Secret::new("k"), limits());
    let (l, addr) = listener().await;
    let (raw, s) = tokio::join!(
        raw_authenticated(&addr, &k, &lim),
        TcpLink::accept(&l, &k, &lim)
    );
    let (mut raw, s) = (raw, s.unwrap());
    let mut frame = encode(FrameType::Data, 1, b"good payload").unwrap();
    frame[HEADER_LEN + 3] ^= 0x40;
    raw.write_all(&frame).await.unwrap();
    let err = timeout(T, s.recv()).await.unwrap().unwrap_err();
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
    assert!(
        s.send(vec![1]).await.is_err(),
        "a failed link refuses sends"
    );
}

#[tokio::test]
async fn oversize_is_refused_locally_and_from_the_peer() {
    let (k, lim) = (Secret::new("k"), limits());
    let (c, _s, l) = pair(&k, &lim).await;
    let err = c.send(vec![0; lim.max_frame + 1]).await.unwrap_err();
    assert!(matches!(err, LinkError::TooLarge { .. }), "{err}");

    // A peer announcing a 4 GiB body: refused from the header, nothing allocated.
    let addr = l.local_addr().unwrap().to_string();
    let (raw, s) = tokio::join!(
        raw_authenticated(&addr, &k, &lim),
        TcpLink::accept(&l, &k, &lim)
    );
    let (mut raw, s) = (raw, s.unwrap());
    let mut header = encode(FrameType::Data, 1, b"").unwrap();
    header[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    raw.write_all(&header[..HEADER_LEN]).await.unwrap();
    let err = timeout(T, s.recv()).await.unwrap().unwrap_err();
    assert!(err.to_string().contains("exceeds the limit"), "{err}");
}

#[tokio::test]
async fn bounded_window_holds_the_sender() {
    let (k, lim) = (Secret::new("k"), limits());
    let (c, s, _l) = pair(&k, &lim).await;
    for i in 0..lim.window {
        timeout(T, c.send(vec![i as u8; 1024]))
            .await
            .unwrap()
            .unwrap();
    }
    // The server does not read: the next send must wait.
    assert!(timeout(Duration::from_millis(300), c.send(vec![9]))
        .await
        .is_err());
    assert_eq!(c.unacknowledged().len(), lim.window as usize);
    // One frame consumed → one credit back → the waiting send goes through.
    assert_eq!(s.recv().await.unwrap()[0], 0);
    timeout(T, c.send(vec![9])).await.unwrap().unwrap();
}

#[tokio::test]
async fn client_reconnects_and_resends_after_the_server_drops() {
    let (k, lim) = (Secret::new("k"), limits());
    let n = 200u64;
    let (c, s1, l) = pair(&k, &lim).await;
    let session = s1.peer_session();
    let sender = tokio::spawn(async move {
        for i in 1..=n {
            let seq = c.send(i.to_le_bytes().to_vec()).await.unwrap();
            assert_eq!(seq, i);
        }
        c // keep the link alive until the test is done
    });
    // Consume part of the stream, then kill the server side mid-stream.
    let mut seen = BTreeSet::new();
    for _ in 0..37 {
        let (seq, body) = timeout(T, s1.recv_frame()).await.unwrap().unwrap();
        assert_eq!(body, seq.to_le_bytes());
        seen.insert(seq);
    }
    drop(s1);
    // The client comes back on its own, same session; frames not acknowledged are resent.
    let s2 = timeout(T, TcpLink::accept(&l, &k, &lim))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s2.peer_session(), session);
    let mut last = 0;
    while seen.len() < n as usize {
        let (seq, body) = timeout(T, s2.recv_frame()).await.unwrap().unwrap();
        assert_eq!(body, seq.to_le_bytes());
        assert!(seq > last, "in order on one connection");
        last = seq;
        // At-least-once: anything new is fresh; a duplicate can only be one s1 already had.
        seen.insert(seq);
    }
    assert_eq!(seen, (1..=n).collect());
    let c = timeout(T, sender).await.unwrap().unwrap();
    assert!(c.reconnects() >= 1);
}

#[tokio::test]
async fn client_gives_up_after_max_attempts() {
    let (k, mut lim) = (Secret::new("k"), limits());
    lim.reconnect.max_attempts = 3;
    let (c, s, l) = pair(&k, &lim).await;
    drop(l);
    drop(s);
    // The waiting send sees the link fail once the attempts are spent.
    for _ in 0..lim.window {
        let _ = c.send(vec![1]).await;
    }
    let err = timeout(T, c.send(vec![1])).await.unwrap().unwrap_err();
    assert!(err.to_string().contains("gave up reconnecting"), "{err}");
}
