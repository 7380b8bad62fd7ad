//! A shared-memory segment: a `memfd` (or, where that is missing, an unlinked 0600 file in
//! `/dev/shm`) mapped `MAP_SHARED` into this process.

use super::ShmError;
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::{MemfdFlags, Mode, OFlags, SealFlags};
use rustix::mm::{MapFlags, ProtFlags};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

/// Where a segment's memory comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// `memfd_create`: anonymous, never has a name in any filesystem. Sealed against resizing.
    Memfd,
    /// A file in `/dev/shm`, created 0600 with `O_EXCL` under a unique name and unlinked right
    /// after this process opened it (the peer receives the descriptor, never the name).
    DevShm,
}

/// One mapped segment. Unmapped (and the descriptor closed) on drop.
#[derive(Debug)]
pub struct Segment {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    len: usize,
    backing: Backing,
}

// SAFETY: the segment owns its mapping and descriptor; the raw pointer is only dereferenced through
// `bytes`/`bytes_mut`, whose callers uphold the ownership protocol, so moving the owner to another
// thread is as sound as moving a `Vec<u8>`.
unsafe impl Send for Segment {}

static NEXT_NAME: AtomicU64 = AtomicU64::new(0);

fn io(op: &'static str) -> impl FnOnce(rustix::io::Errno) -> ShmError {
    move |e| ShmError::Io {
        op,
        source: e.into(),
    }
}

impl Segment {
    /// A new zero-filled segment of `len` bytes: memfd when the kernel has it, else `/dev/shm`.
    pub fn create(len: usize) -> Result<Self, ShmError> {
        Self::create_with(len, Backing::Memfd).or_else(|_| Self::create_with(len, Backing::DevShm))
    }

    /// A new segment of `len` bytes from exactly `backing` (no fallback).
    pub fn create_with(len: usize, backing: Backing) -> Result<Self, ShmError> {
        if len == 0 {
            return Err(ShmError::ZeroCapacity);
        }
        let fd = match backing {
            Backing::Memfd => {
                let fd = rustix::fs::memfd_create(
                    "omnistage-shm",
                    MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
                )
                .map_err(io("memfd_create"))?;
                rustix::fs::ftruncate(&fd, len as u64).map_err(io("ftruncate"))?;
                // Neither end can shrink the segment under the other's mapping (SIGBUS).
                rustix::fs::fcntl_add_seals(
                    &fd,
                    SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL,
                )
                .map_err(io("fcntl(F_ADD_SEALS)"))?;
                fd
            }
            Backing::DevShm => {
                let path = format!(
                    "/dev/shm/omnistage-{}-{}-{:x}",
                    std::process::id(),
                    NEXT_NAME.fetch_add(1, Ordering::Relaxed),
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos())
                );
                let fd = rustix::fs::open(
                    path.as_str(),
                    OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(io("open /dev/shm file"))?;
                // Unlink before anything else can fail: no name is ever left behind.
                rustix::fs::unlink(path.as_str()).map_err(io("unlink /dev/shm file"))?;
                rustix::fs::ftruncate(&fd, len as u64).map_err(io("ftruncate"))?;
                fd
            }
        };
        Self::map(fd, len, backing)
    }

    /// Maps a segment received from the peer; its size is read from the descriptor.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, ShmError> {
        let st = rustix::fs::fstat(&fd).map_err(io("fstat"))?;
        let len = usize::try_from(st.st_size)
            .map_err(|_| ShmError::Protocol(format!("segment size {} is invalid", st.st_size)))?;
        if len == 0 {
            return Err(ShmError::ZeroCapacity);
        }
        // Our memfds are sealed against resizing; a /dev/shm file cannot be (the producer is
        // trusted not to truncate it under the mapping).
        let backing = match rustix::fs::fcntl_get_seals(&fd) {
            Ok(seals) if seals.contains(SealFlags::SHRINK) => Backing::Memfd,
            _ => Backing::DevShm,
        };
        Self::map(fd, len, backing)
    }

    fn map(fd: OwnedFd, len: usize, backing: Backing) -> Result<Self, ShmError> {
        // SAFETY: a fresh shared mapping at an address the kernel picks, of a descriptor we own,
        // whose size is at least `len` (set by ftruncate above or read by fstat); it aliases no
        // Rust object.
        let raw = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &fd,
                0,
            )
        }
        .map_err(io("mmap"))?;
        let ptr = NonNull::new(raw.cast::<u8>())
            .ok_or_else(|| ShmError::Protocol("mmap returned null".into()))?;
        Ok(Self {
            fd,
            ptr,
            len,
            backing,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// The descriptor, to pass to the peer.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), ShmError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(ShmError::Protocol(format!(
                "region {offset}+{len} lies outside the {}-byte segment",
                self.len
            ))),
        }
    }

    /// The bytes at `offset..offset + len` (bounds-checked).
    ///
    /// # Safety
    /// For as long as the slice lives, nothing (in this or the peer process) may write the region:
    /// the channel protocol hands a region to the consumer only after the producer finished
    /// writing it, and the producer reuses it only after the consumer's acknowledgement.
    pub(crate) unsafe fn bytes(&self, offset: usize, len: usize) -> Result<&[u8], ShmError> {
        self.check(offset, len)?;
        // SAFETY: in bounds of the live mapping (checked above); exclusivity per this fn's contract.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(offset), len) })
    }

    /// The bytes at `offset..offset + len` for writing (bounds-checked).
    ///
    /// # Safety
    /// For as long as the slice lives, nothing else (in this or the peer process) may read or
    /// write the region: the producer only writes regions the consumer has acknowledged (or never
    /// received).
    pub(crate) unsafe fn bytes_mut(
        &mut self,
        offset: usize,
        len: usize,
    ) -> Result<&mut [u8], ShmError> {
        self.check(offset, len)?;
        // SAFETY: in bounds of the live mapping (checked above); `&mut self` excludes other
        // borrows in this process; the peer is excluded per this fn's contract.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(offset), len) })
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `map`; no slice into it outlives
        // `self` (they borrow it).
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
