//! Throughput of the authenticated TCP link over loopback, one direction, for 4 KiB, 1 MiB and
//! 64 MiB frames. Includes framing, CRC-32 on both ends, credit returns, and the receiver's
//! allocation per frame (the sender shares one buffer, no copy).
//!
//! `cargo run --release -p omnistage-connectors --example tcp_bench`

use std::sync::Arc;
use std::time::Instant;

use omnistage_connectors::tcp::{Limits, Secret, TcpLink};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let secret = Secret::new("bench secret");
    for (size, total) in [
        (4usize << 10, 256usize << 20),
        (1 << 20, 1 << 30),
        (64 << 20, 2 << 30),
    ] {
        let limits = Limits {
            max_frame: size,
            window: if size >= 64 << 20 { 4 } else { 16 },
            ..Limits::default()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let (client, server) = tokio::join!(
            TcpLink::connect(addr, &secret, &limits),
            TcpLink::accept(&listener, &secret, &limits)
        );
        let (client, server) = (client?, server?);
        let frames = total / size;
        let body = Arc::new(vec![0x5Au8; size]);
        let start = Instant::now();
        let sender = async {
            for _ in 0..frames {
                client.send_shared(body.clone()).await?;
            }
            Ok::<_, omnistage_connectors::tcp::LinkError>(())
        };
        let receiver = async {
            let mut bytes = 0usize;
            for _ in 0..frames {
                bytes += server.recv().await?.len();
            }
            Ok::<_, omnistage_connectors::tcp::LinkError>(bytes)
        };
        let (sent, got) = tokio::join!(sender, receiver);
        sent?;
        let bytes = got?;
        let secs = start.elapsed().as_secs_f64();
        println!(
            "frame {:>9} B  x {:>6} frames  {:>8.1} MiB/s  ({:.3} s)",
            size,
            frames,
            bytes as f64 / (1 << 20) as f64 / secs,
            secs
        );
    }
    Ok(())
}
