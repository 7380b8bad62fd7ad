//! The control socket: a Unix stream socket carrying the segment's descriptor once (SCM_RIGHTS),
//! then fixed-size frames — descriptors producer → consumer, acknowledgements consumer → producer.
//! Every wait is a blocking syscall (`read`/`recvmsg`/`poll`) woken by the peer's write or close.

use super::ShmError;
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

const HELLO_MAGIC: [u8; 4] = *b"OSHM";
const PROTOCOL: u32 = 1;
pub(crate) const HELLO_LEN: usize = 16;
pub(crate) const DESC_LEN: usize = 24;
pub(crate) const ACK_LEN: usize = 8;

/// A message's place in the segment, sent producer → consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub seq: u64,
    pub offset: u64,
    pub len: u64,
}

impl Descriptor {
    pub fn to_bytes(self) -> [u8; DESC_LEN] {
        let mut b = [0u8; DESC_LEN];
        b[0..8].copy_from_slice(&self.seq.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; DESC_LEN]) -> Self {
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        Self {
            seq: word(0),
            offset: word(8),
            len: word(16),
        }
    }
}

pub(crate) fn io_err(op: &'static str) -> impl FnOnce(std::io::Error) -> ShmError {
    move |e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof
        | std::io::ErrorKind::BrokenPipe
        | std::io::ErrorKind::ConnectionReset => ShmError::Disconnected,
        _ => ShmError::Io { op, source: e },
    }
}

/// Sends the hello frame (segment size) with the segment's descriptor attached.
pub(crate) fn send_hello(
    sock: &UnixStream,
    fd: BorrowedFd<'_>,
    capacity: u64,
) -> Result<(), ShmError> {
    let mut hello = [0u8; HELLO_LEN];
    hello[0..4].copy_from_slice(&HELLO_MAGIC);
    hello[4..8].copy_from_slice(&PROTOCOL.to_le_bytes());
    hello[8..16].copy_from_slice(&capacity.to_le_bytes());
    let fds = [fd];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(ShmError::Protocol("no room for SCM_RIGHTS".into()));
    }
    let sent = rustix::net::sendmsg(
        sock.as_fd(),
        &[IoSlice::new(&hello)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .map_err(|e| io_err("sendmsg(SCM_RIGHTS)")(e.into()))?;
    // The descriptor went with the first byte; finish the frame if the kernel split it.
    (&*sock)
        .write_all(&hello[sent..])
        .map_err(io_err("write hello"))
}

/// Receives the hello frame and the segment descriptor; returns (descriptor, capacity).
pub(crate) fn recv_hello(sock: &UnixStream) -> Result<(OwnedFd, u64), ShmError> {
    let mut hello = [0u8; HELLO_LEN];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        sock.as_fd(),
        &mut [IoSliceMut::new(&mut hello)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| io_err("recvmsg(SCM_RIGHTS)")(e.into()))?;
    if got.bytes == 0 {
        return Err(ShmError::Disconnected);
    }
    let mut fd = None;
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = msg {
            // Keep the first; any extra descriptors are closed as the iterator drops them.
            for f in fds {
                fd.get_or_insert(f);
            }
        }
    }
    let fd = fd.ok_or_else(|| ShmError::Protocol("hello frame carried no descriptor".into()))?;
    (&*sock)
        .read_exact(&mut hello[got.bytes..])
        .map_err(io_err("read hello"))?;
    if hello[0..4] != HELLO_MAGIC {
        return Err(ShmError::Protocol(
            "peer is not an omnistage shm producer".into(),
        ));
    }
    let version = u32::from_le_bytes([hello[4], hello[5], hello[6], hello[7]]);
    if version != PROTOCOL {
        return Err(ShmError::Protocol(format!(
            "shm protocol version {version} is not supported (this build speaks {PROTOCOL})"
        )));
    }
    let mut cap = [0u8; 8];
    cap.copy_from_slice(&hello[8..16]);
    Ok((fd, u64::from_le_bytes(cap)))
}

/// Blocks until `sock` is readable (data or hangup) or `deadline` passes (`None`: forever).
/// Returns whether it is readable.
pub(crate) fn wait_readable(
    sock: &UnixStream,
    deadline: Option<Instant>,
) -> Result<bool, ShmError> {
    loop {
        let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let ts = timeout.map(|t: Duration| Timespec {
            tv_sec: t.as_secs().min(i64::MAX as u64) as i64,
            tv_nsec: i64::from(t.subsec_nanos()),
        });
        let mut fds = [PollFd::new(sock, PollFlags::IN)];
        match rustix::event::poll(&mut fds, ts.as_ref()) {
            Ok(0) => return Ok(false),
            Ok(_) => return Ok(true),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                return Err(ShmError::Io {
                    op: "poll",
                    source: e.into(),
                })
            }
        }
    }
}

/// Whether `sock` is readable right now (never blocks).
pub(crate) fn readable_now(sock: &UnixStream) -> Result<bool, ShmError> {
    wait_readable(sock, Some(Instant::now()))
}
