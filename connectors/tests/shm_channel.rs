//! The shared-memory channel: in one process, across two processes (the test binary re-runs
//! itself as the consumer), backpressure, timeouts, refusals and cleanup.

use omnistage_connectors::shm::{channel, Backing, ShmError, ShmReceiver, ShmSender};
use omnistage_connectors::wire;
use omnistage_stages::payload::{
    CodecFrames, Conditioning, HiddenStates, Latents, MediaEmbedding, PcmAudio, RgbImages,
    TextEmbedding,
};
use omnistage_stages::Payload;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

const CHILD_ENV: &str = "OMNISTAGE_SHM_TEST_SOCKET";
const BIG_COUNT: usize = 40;
const BIG_SAMPLES: usize = 64 * 1024; // 256 KiB of f32 per message, through a 1 MiB ring

fn f(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| seed + i as f32 * 0.5).collect()
}

fn every_kind() -> Vec<Payload> {
    let emb = |seed| TextEmbedding {
        tokens: HiddenStates::new(f(8, seed), 4),
        pooled: f(4, seed).into(),
    };
    vec![
        Payload::Text("grüß dich".into()),
        Payload::Tokens(vec![7, 8, 9].into()),
        Payload::Hidden(HiddenStates::new(f(32, 1.0), 8)),
        Payload::Embeddings(Arc::new(Conditioning {
            positive: emb(1.0),
            negative: Some(emb(2.0)),
        })),
        Payload::MediaEmbeddings(
            vec![MediaEmbedding {
                media: 2,
                rows: HiddenStates::new(f(6, 3.0), 3),
            }]
            .into(),
        ),
        Payload::Latents(Latents {
            data: f(16, 0.0).into(),
            n: 1,
            channels: 4,
            height: 2,
            width: 2,
        }),
        Payload::Image(RgbImages {
            pixels: vec![9; 12].into(),
            n: 1,
            height: 2,
            width: 2,
        }),
        Payload::Codes(CodecFrames::new(vec![1, 2, 3, 4], 2).unwrap()),
        Payload::Pcm(PcmAudio {
            samples: f(10, -1.0).into(),
            sample_rate: 16_000,
        }),
    ]
}

fn big(i: usize) -> Payload {
    Payload::Pcm(PcmAudio {
        samples: f(BIG_SAMPLES, i as f32).into(),
        sample_rate: 24_000,
    })
}

fn dev_shm_files() -> Vec<String> {
    let prefix = format!("omnistage-{}-", std::process::id());
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_kind_round_trips_in_process() {
    let (mut tx, mut rx) = channel(1 << 16).unwrap();
    assert_eq!(tx.capacity(), 1 << 16);
    for p in every_kind() {
        tx.send(&p).unwrap();
        assert_eq!(rx.recv().unwrap(), p);
    }
    tx.flush(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(tx.in_flight(), 0);
}

#[test]
fn full_ring_blocks_the_producer_until_the_consumer_frees_space() {
    let (mut tx, mut rx) = channel(1 << 20).unwrap();
    // 1 MiB ring, 256 KiB messages: three fit (the fourth needs the wasted tail back).
    let mut sent = 0;
    loop {
        match tx.send_timeout(&big(sent), Duration::from_millis(50)) {
            Ok(_) => sent += 1,
            Err(ShmError::Timeout) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!((2..=4).contains(&sent), "sent {sent} before blocking");
    // A consumer thread drains; the blocked producer carries on (blocking send, no timeout).
    let consumer = std::thread::spawn(move || {
        for i in 0..BIG_COUNT {
            assert_eq!(rx.recv().unwrap(), big(i), "message {i}");
        }
        rx
    });
    for i in sent..BIG_COUNT {
        tx.send(&big(i)).unwrap();
    }
    tx.flush(Some(Duration::from_secs(30))).unwrap();
    let mut rx = consumer.join().unwrap();
    drop(tx);
    assert!(matches!(rx.recv(), Err(ShmError::Disconnected)));
}

#[test]
fn oversized_payloads_are_refused_not_chunked() {
    let (mut tx, _rx) = channel(4096).unwrap();
    let err = tx
        .send(&Payload::Pcm(PcmAudio {
            samples: vec![0.0; 2048].into(),
            sample_rate: 1,
        }))
        .unwrap_err();
    assert!(matches!(err, ShmError::TooLarge { .. }), "{err}");
    assert!(err.to_string().contains("not chunked"));
    assert_eq!(tx.in_flight(), 0);
}

#[test]
fn recv_times_out_and_sees_hangup() {
    let (tx, mut rx) = channel(4096).unwrap();
    let t = std::time::Instant::now();
    assert!(matches!(
        rx.recv_timeout(Duration::from_millis(30)),
        Err(ShmError::Timeout)
    ));
    assert!(t.elapsed() >= Duration::from_millis(30));
    drop(tx);
    assert!(matches!(
        rx.recv_timeout(Duration::from_secs(5)),
        Err(ShmError::Disconnected)
    ));
}

#[test]
fn corrupt_bytes_in_the_ring_are_a_typed_error_and_free_their_space() {
    let (mut tx, mut rx) = channel(4096).unwrap();
    tx.send(&Payload::Text("ok".into())).unwrap();
    // Decode with a consumer-supplied parser that rejects the bytes: space is still freed.
    let r: Result<(), ShmError> = rx.recv_with(None, |b| {
        let mut bad = b.to_vec();
        bad[0] ^= 0xff;
        wire::decode(&bad).map(|_| ()).map_err(ShmError::from)
    });
    assert!(matches!(r, Err(ShmError::Wire(wire::WireError::BadMagic))));
    tx.flush(Some(Duration::from_secs(5))).unwrap();
}

#[test]
fn dev_shm_fallback_leaves_no_file_behind() {
    let before = dev_shm_files();
    let (a, b) = UnixStream::pair().unwrap();
    let mut tx = ShmSender::over_with(a, 1 << 16, Backing::DevShm).unwrap();
    // Unlinked right after creation, before the peer even received it.
    assert_eq!(dev_shm_files(), before);
    let mut rx = ShmReceiver::over(b).unwrap();
    assert_eq!(
        (tx.backing(), rx.backing()),
        (Backing::DevShm, Backing::DevShm)
    );
    for p in every_kind() {
        tx.send(&p).unwrap();
        assert_eq!(rx.recv().unwrap(), p);
    }
    drop((tx, rx));
    assert_eq!(dev_shm_files(), before);
    let (tx, rx) = channel(4096).unwrap();
    assert_eq!(
        (tx.backing(), rx.backing()),
        (Backing::Memfd, Backing::Memfd)
    );
}

/// The consumer half of `across_processes`; does nothing unless started by it.
#[test]
fn child_consumer() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let sock = UnixStream::connect(&path).unwrap();
    let mut rx = ShmReceiver::over(sock).unwrap();
    assert_eq!(rx.backing(), Backing::Memfd);
    for p in every_kind() {
        assert_eq!(rx.recv().unwrap(), p);
    }
    for i in 0..BIG_COUNT {
        assert_eq!(rx.recv().unwrap(), big(i), "message {i}");
    }
    assert!(matches!(rx.recv(), Err(ShmError::Disconnected)));
    println!("child consumer received everything");
}

#[test]
fn across_processes() {
    let path = std::env::temp_dir().join(format!("omnistage-shm-test-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "child_consumer",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (sock, _) = listener.accept().unwrap();
    std::fs::remove_file(&path).unwrap();
    let mut tx = ShmSender::over(sock, 1 << 20).unwrap();
    for p in every_kind() {
        tx.send(&p).unwrap();
    }
    // 40 × 256 KiB through a 1 MiB ring: wraps many times, held back by the child.
    for i in 0..BIG_COUNT {
        tx.send_timeout(&big(i), Duration::from_secs(30)).unwrap();
    }
    tx.flush(Some(Duration::from_secs(30))).unwrap();
    drop(tx);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "child consumer failed: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
