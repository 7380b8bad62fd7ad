//! Throughput and latency of payload handover: in-process (`Arc` move), shared memory across two
//! processes (this binary re-runs itself as the consumer), shared memory within one thread
//! (`ShmConnector`), and authenticated TCP over loopback (the gateway ↔ remote worker frames: encode,
//! frame + CRC-32, send, check, decode, 8-byte reply), against a plain memcpy of the same bytes,
//! all in the same run.
//!
//! ```sh
//! cargo run --release -p omnistage-connectors --example connector_bench
//! ```
//!
//! Every shm transfer is: encode into the ring (one copy) → descriptor over the socket → consumer
//! decodes into a fresh `Arc<[f32]>` (one copy) → acknowledgement. The consumer process decodes
//! and drops each payload, so it pays the allocation the receiving stage would pay.

use omnistage_connectors::shm::{ShmConnector, ShmError, ShmReceiver, ShmSender};
use omnistage_connectors::tcp::blocking::{self, FrameReader, FrameWriter};
use omnistage_connectors::tcp::{Limits, Secret};
use omnistage_connectors::{wire, Connector, InprocConnector};
use omnistage_stages::payload::PcmAudio;
use omnistage_stages::Payload;
use std::hint::black_box;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;
use std::time::{Duration, Instant};

const SIZES: [(usize, &str, usize); 3] = [
    (4 << 10, "4 KiB", 20_000),
    (1 << 20, "1 MiB", 400),
    (64 << 20, "64 MiB", 12),
];
const RING: usize = 160 << 20;

fn pcm(bytes: usize) -> Payload {
    Payload::Pcm(PcmAudio {
        samples: (0..bytes / 4).map(|i| (i % 1000) as f32 * 1e-3).collect(),
        sample_rate: 24_000,
    })
}

fn consumer(path: &str) -> Result<(), ShmError> {
    let sock = UnixStream::connect(path).map_err(|e| ShmError::Io {
        op: "connect",
        source: e,
    })?;
    let mut rx = ShmReceiver::over(sock)?;
    loop {
        match rx.recv() {
            Ok(p) => {
                black_box(&p);
            }
            Err(ShmError::Disconnected) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

const TCP_MAX_FRAME: usize = 80 << 20;

/// A TCP peer on loopback: accepts one authenticated connection, decodes every payload it is sent
/// and answers each with an 8-byte frame.
fn tcp_peer(secret: Secret) -> std::io::Result<(String, std::thread::JoinHandle<()>)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let handle = std::thread::spawn(move || {
        let limits = Limits {
            max_frame: TCP_MAX_FRAME,
            ..Limits::default()
        };
        let Ok((conn, _)) = listener.accept() else {
            return;
        };
        let Ok((conn, _)) = blocking::accept(conn, &secret, &limits) else {
            return;
        };
        let Ok(read) = conn.try_clone() else { return };
        let mut r = FrameReader::new(read, TCP_MAX_FRAME);
        let mut w = FrameWriter::new(conn, TCP_MAX_FRAME);
        while let Ok(Some(body)) = r.recv() {
            black_box(wire::decode(&body).ok());
            if w.send(&[0u8; 8]).is_err() {
                return;
            }
        }
    });
    Ok((addr, handle))
}

/// Seconds per transfer of `f`, run `iters` times after 2 warm-up calls.
fn time(iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    f();
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    t.elapsed().as_secs_f64() / iters as f64
}

struct Row {
    size: &'static str,
    path: &'static str,
    bytes: usize,
    secs: f64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, path] = args.as_slice() {
        if flag == "--consumer" {
            return Ok(consumer(path)?);
        }
    }

    let path = std::env::temp_dir().join(format!("omnistage-bench-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--consumer")
        .arg(&path)
        .spawn()?;
    let (sock, _) = listener.accept()?;
    std::fs::remove_file(&path)?;
    let mut tx = ShmSender::over(sock, RING)?;
    let local = ShmConnector::new(RING)?;
    let secret = Secret::new("connector bench secret");
    let (tcp_addr, tcp_thread) = tcp_peer(secret.clone())?;
    let limits = Limits {
        max_frame: TCP_MAX_FRAME,
        ..Limits::default()
    };
    let tcp = blocking::connect(&tcp_addr, &secret, &limits)?;
    let mut tcp_r = FrameReader::new(tcp.try_clone()?, TCP_MAX_FRAME);
    let mut tcp_w = FrameWriter::new(tcp, TCP_MAX_FRAME);

    let mut rows = Vec::new();
    for (bytes, size, iters) in SIZES {
        let p = pcm(bytes);
        let src = wire::encode(&p)?;
        let mut dst = vec![0u8; src.len()];
        let memcpy = time(iters, || {
            dst.copy_from_slice(black_box(&src));
            black_box(&dst);
        });
        let memcpy_alloc = time(iters, || {
            black_box(black_box(&src).to_vec());
        });
        let mut ring_slot = vec![0u8; src.len()];
        let encode = time(iters, || {
            black_box(wire::encode_into(black_box(&p), &mut ring_slot).ok());
        });
        let decode = time(iters, || {
            black_box(wire::decode(black_box(&src)).ok());
        });
        let inproc = time(iters, || {
            black_box(InprocConnector.deliver(p.clone()).ok());
        });
        let mut err = None;
        let shm_pipelined = time(iters, || {
            if let Err(e) = tx.send(&p) {
                err.get_or_insert(e);
            }
        });
        // Count the consumer's tail: wait for the last acknowledgement, spread over the run.
        let t = Instant::now();
        tx.flush(Some(Duration::from_secs(60)))?;
        let shm_pipelined = shm_pipelined + t.elapsed().as_secs_f64() / iters as f64;
        let shm_sequential = time(iters.min(200), || {
            if let Err(e) = tx
                .send(&p)
                .and_then(|_| tx.flush(Some(Duration::from_secs(60))))
            {
                err.get_or_insert(e);
            }
        });
        let shm_local = time(iters, || {
            black_box(local.deliver(p.clone()).ok());
        });
        let mut tcp_err = None;
        let tcp_sequential = time(iters.min(200), || {
            let sent = wire::encode(&p)
                .map_err(|e| e.to_string())
                .and_then(|b| tcp_w.send(&b).map_err(|e| e.to_string()))
                .and_then(|()| tcp_r.recv().map_err(|e| e.to_string()));
            if let Err(e) = sent {
                tcp_err.get_or_insert(e);
            }
        });
        if let Some(e) = err {
            return Err(e.into());
        }
        if let Some(e) = tcp_err {
            return Err(e.into());
        }
        for (path, secs) in [
            ("memcpy (preallocated dst)", memcpy),
            ("memcpy (fresh Vec)", memcpy_alloc),
            ("wire encode only (into slot)", encode),
            ("wire decode only (fresh Arc)", decode),
            ("inproc (Arc handover)", inproc),
            ("shm 2 procs, pipelined", shm_pipelined),
            ("shm 2 procs, one at a time", shm_sequential),
            ("shm 1 thread (ShmConnector)", shm_local),
            ("tcp loopback, one at a time", tcp_sequential),
        ] {
            rows.push(Row {
                size,
                path,
                bytes,
                secs,
            });
        }
    }
    drop(tx);
    tcp_w.shutdown();
    let _ = tcp_thread.join();
    let status = child.wait()?;
    if !status.success() {
        return Err(format!("consumer process failed: {status}").into());
    }

    println!(
        "{:<7} {:<29} {:>12} {:>14} {:>10}",
        "size", "path", "MiB/s", "µs/transfer", "÷ memcpy"
    );
    for chunk in rows.chunks(9) {
        let memcpy = chunk[0].secs;
        for r in chunk {
            let mibs = r.bytes as f64 / (1 << 20) as f64 / r.secs;
            println!(
                "{:<7} {:<29} {:>12.0} {:>14.2} {:>9.0}%",
                r.size,
                r.path,
                mibs,
                r.secs * 1e6,
                100.0 * memcpy / r.secs
            );
        }
    }
    Ok(())
}
