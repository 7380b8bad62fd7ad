//! The two ends of a shared-memory channel.

use super::control::{self, io_err, Descriptor, ACK_LEN, DESC_LEN};
use super::ring::Ring;
use super::segment::{Backing, Segment};
use super::ShmError;
use crate::wire;
use omnistage_stages::Payload;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// At most this many messages are in flight at once (bounds the control socket's queues too, so
/// neither end can block writing a frame while the other blocks writing its own).
pub const MAX_IN_FLIGHT: usize = 64;

/// Creates a connected producer/consumer pair in this process over a `socketpair`, with a ring of
/// `capacity` bytes (rounded up to whole pages).
pub fn channel(capacity: usize) -> Result<(ShmSender, ShmReceiver), ShmError> {
    let (a, b) = UnixStream::pair().map_err(io_err("socketpair"))?;
    let tx = ShmSender::over(a, capacity)?;
    let rx = ShmReceiver::over(b)?;
    Ok((tx, rx))
}

/// The producing end: owns the ring's accounting and writes payloads into the segment.
#[derive(Debug)]
pub struct ShmSender {
    seg: Segment,
    sock: UnixStream,
    ring: Ring,
    next_seq: u64,
}

impl ShmSender {
    /// Creates a segment of `capacity` bytes (memfd, else `/dev/shm`) and hands it to the consumer
    /// at the other end of `sock` (SCM_RIGHTS). The consumer calls [`ShmReceiver::over`].
    pub fn over(sock: UnixStream, capacity: usize) -> Result<Self, ShmError> {
        let seg = Segment::create(page_round(capacity)?)?;
        Self::with_segment(sock, seg)
    }

    /// As [`ShmSender::over`], with the segment's backing chosen exactly.
    pub fn over_with(
        sock: UnixStream,
        capacity: usize,
        backing: Backing,
    ) -> Result<Self, ShmError> {
        let seg = Segment::create_with(page_round(capacity)?, backing)?;
        Self::with_segment(sock, seg)
    }

    fn with_segment(sock: UnixStream, seg: Segment) -> Result<Self, ShmError> {
        control::send_hello(&sock, seg.fd(), seg.len() as u64)?;
        Ok(Self {
            ring: Ring::new(seg.len(), MAX_IN_FLIGHT),
            seg,
            sock,
            next_seq: 0,
        })
    }

    /// Ring size in bytes; payloads whose encoding (rounded to 64 bytes) exceeds it are refused
    /// with [`ShmError::TooLarge`] (they are never chunked).
    pub fn capacity(&self) -> usize {
        self.seg.len()
    }

    pub fn backing(&self) -> Backing {
        self.seg.backing()
    }

    /// Shuts the control socket down both ways: the consumer sees the channel end, and a send
    /// waiting for ring space fails.
    pub fn shutdown(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    /// Messages sent and not yet acknowledged by the consumer.
    pub fn in_flight(&self) -> usize {
        self.ring.in_flight()
    }

    /// Sends `payload`, blocking while the ring is full. Returns its sequence number.
    pub fn send(&mut self, payload: &Payload) -> Result<u64, ShmError> {
        self.send_until(payload, None)
    }

    /// Sends `payload`, waiting at most `timeout` for ring space ([`ShmError::Timeout`] after).
    pub fn send_timeout(&mut self, payload: &Payload, timeout: Duration) -> Result<u64, ShmError> {
        self.send_until(payload, Some(Instant::now() + timeout))
    }

    /// Sends an opaque message (`bytes` copied into the ring), blocking while the ring is full.
    /// The consumer reads it with [`ShmReceiver::recv_with`].
    pub fn send_bytes(&mut self, bytes: &[u8]) -> Result<u64, ShmError> {
        self.send_raw(bytes.len(), None, |dst| {
            dst.copy_from_slice(bytes);
            Ok(())
        })
    }

    fn send_until(
        &mut self,
        payload: &Payload,
        deadline: Option<Instant>,
    ) -> Result<u64, ShmError> {
        self.send_raw(wire::encoded_len(payload), deadline, |dst| {
            wire::encode_into(payload, dst)
                .map(|_| ())
                .map_err(ShmError::from)
        })
    }

    /// Reserves `len` bytes of the ring (waiting for space until `deadline`), lets `write` fill
    /// them, and sends their descriptor.
    fn send_raw(
        &mut self,
        len: usize,
        deadline: Option<Instant>,
        write: impl FnOnce(&mut [u8]) -> Result<(), ShmError>,
    ) -> Result<u64, ShmError> {
        if !self.ring.fits_ever(len) {
            return Err(ShmError::TooLarge {
                len,
                capacity: self.capacity(),
            });
        }
        let offset = loop {
            self.drain_acks()?;
            if let Some(off) = self.ring.find(len) {
                break off;
            }
            if !control::wait_readable(&self.sock, deadline)? {
                return Err(ShmError::Timeout);
            }
            self.read_ack()?;
        };
        // SAFETY: `ring.find` returned a region that overlaps no unacknowledged message, so the
        // consumer holds no part of it; the descriptor naming it is sent only after this borrow ends.
        let dst = unsafe { self.seg.bytes_mut(offset, len) }?;
        write(dst)?;
        let seq = self.next_seq;
        let desc = Descriptor {
            seq,
            offset: offset as u64,
            len: len as u64,
        };
        (&self.sock)
            .write_all(&desc.to_bytes())
            .map_err(io_err("write descriptor"))?;
        self.ring.push(seq, offset, len);
        self.next_seq += 1;
        Ok(seq)
    }

    /// Waits until the consumer has acknowledged every message sent (or `timeout` passes).
    pub fn flush(&mut self, timeout: Option<Duration>) -> Result<(), ShmError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        while !self.ring.is_empty() {
            if !control::wait_readable(&self.sock, deadline)? {
                return Err(ShmError::Timeout);
            }
            self.read_ack()?;
        }
        Ok(())
    }

    /// Frees every acknowledged message without blocking.
    fn drain_acks(&mut self) -> Result<(), ShmError> {
        while !self.ring.is_empty() && control::readable_now(&self.sock)? {
            self.read_ack()?;
        }
        Ok(())
    }

    /// Reads one acknowledgement (the socket is readable: a whole ack or hangup is there).
    fn read_ack(&mut self) -> Result<(), ShmError> {
        let mut b = [0u8; ACK_LEN];
        (&self.sock)
            .read_exact(&mut b)
            .map_err(io_err("read ack"))?;
        let seq = u64::from_le_bytes(b);
        self.ring.release(seq).map(|_| ()).map_err(|front| {
            ShmError::Protocol(format!(
                "acknowledgement for message {seq}, expected {front:?}"
            ))
        })
    }
}

fn page_round(capacity: usize) -> Result<usize, ShmError> {
    if capacity == 0 {
        return Err(ShmError::ZeroCapacity);
    }
    capacity
        .checked_add(4095)
        .map(|c| c / 4096 * 4096)
        .ok_or(ShmError::TooLarge {
            len: capacity,
            capacity: usize::MAX,
        })
}

/// The consuming end: woken by descriptors on the socket, reads from the segment, acknowledges.
#[derive(Debug)]
pub struct ShmReceiver {
    seg: Segment,
    sock: UnixStream,
    expected_seq: u64,
}

impl ShmReceiver {
    /// Receives the segment from the producer at the other end of `sock` and maps it.
    pub fn over(sock: UnixStream) -> Result<Self, ShmError> {
        let (fd, capacity) = control::recv_hello(&sock)?;
        let seg = Segment::from_fd(fd)?;
        if seg.len() as u64 != capacity {
            return Err(ShmError::Protocol(format!(
                "segment is {} bytes, producer announced {capacity}",
                seg.len()
            )));
        }
        Ok(Self {
            seg,
            sock,
            expected_seq: 0,
        })
    }

    pub fn capacity(&self) -> usize {
        self.seg.len()
    }

    pub fn backing(&self) -> Backing {
        self.seg.backing()
    }

    /// Blocks until a payload arrives and decodes it. [`ShmError::Disconnected`] once the producer
    /// is gone and everything it sent has been received.
    pub fn recv(&mut self) -> Result<Payload, ShmError> {
        self.recv_with(None, |b| wire::decode(b).map_err(ShmError::from))
    }

    /// As [`ShmReceiver::recv`], giving up after `timeout` with [`ShmError::Timeout`].
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Payload, ShmError> {
        self.recv_with(Some(Instant::now() + timeout), |b| {
            wire::decode(b).map_err(ShmError::from)
        })
    }

    /// Waits for the next message and runs `f` on its bytes in place (zero-copy), then frees its
    /// space. The space is freed even when `f` fails.
    pub fn recv_with<T>(
        &mut self,
        deadline: Option<Instant>,
        f: impl FnOnce(&[u8]) -> Result<T, ShmError>,
    ) -> Result<T, ShmError> {
        if deadline.is_some() && !control::wait_readable(&self.sock, deadline)? {
            return Err(ShmError::Timeout);
        }
        let mut b = [0u8; DESC_LEN];
        (&self.sock)
            .read_exact(&mut b)
            .map_err(io_err("read descriptor"))?;
        let desc = Descriptor::from_bytes(&b);
        if desc.seq != self.expected_seq {
            return Err(ShmError::Protocol(format!(
                "message {} arrived, expected {}",
                desc.seq, self.expected_seq
            )));
        }
        let (offset, len) = match (usize::try_from(desc.offset), usize::try_from(desc.len)) {
            (Ok(o), Ok(l)) => (o, l),
            _ => {
                return Err(ShmError::Protocol(format!(
                    "descriptor {desc:?} is invalid"
                )))
            }
        };
        // SAFETY: the producer finished writing this region before sending its descriptor and
        // does not touch it again until our acknowledgement below, after the slice is dropped.
        let out = unsafe { self.seg.bytes(offset, len) }.and_then(f);
        self.expected_seq += 1;
        match (&self.sock).write_all(&desc.seq.to_le_bytes()) {
            Ok(()) => {}
            // A producer that left needs no acknowledgement; what was received still counts.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            Err(e) => return Err(io_err("write ack")(e)),
        }
        out
    }
}
