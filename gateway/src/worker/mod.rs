//! Stages in their own processes: a stage marked `process = true` runs in a supervised child,
//! `omnistage worker`, connected to the gateway over a Unix stream socket.
//!
//! **Protocol.** Each message is one [`ToWorker`](omnistage_connectors::remote::ToWorker) /
//! [`FromWorker`](omnistage_connectors::remote::FromWorker) control message, framed on the socket
//! as a `u32` little-endian byte length then the encoded message; a frame over [`MAX_FRAME`] is a
//! protocol error that closes the connection. The worker sends `Ready` once its engine is loaded,
//! then one `Event` per stage event, in the stage's order.
//!
//! **Payloads travel inline** in the socket frames for now (hidden states, codes and PCM are
//! copied through the socket). The shared-memory channel in `omnistage_connectors::shm` is the
//! follow-up that will carry large payloads out of band.
//!
//! **Threads.** Gateway side, per connection: a writer thread draining a bounded queue of
//! outgoing messages and a reader thread routing events to the jobs' channels; per replica, a
//! supervisor thread that spawns the child, waits for `Ready`, and restarts it with exponential
//! back-off when its socket closes or it exits. Worker side: the main thread reads messages, a
//! writer thread sends the stage's events.

pub mod child;
pub mod remote;
mod supervisor;

use omnistage_stages::deploy::DeployGraph;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub use remote::RemoteReplica;

/// Largest frame either side accepts (a message with its inline payloads).
pub const MAX_FRAME: usize = 256 << 20;

/// What the gateway needs to start stage workers.
#[derive(Debug, Clone, Default)]
pub struct WorkerOptions {
    /// The `omnistage` executable to run as `omnistage worker` (default: this executable).
    pub exe: Option<PathBuf>,
    /// The deployment as the gateway loaded it, so that the worker loads the same graph; without
    /// it, `process = true` stages run in the gateway's process (with a warning).
    pub source: Option<DeploySource>,
}

/// A deployment's TOML, the folder its relative model paths resolve against, and the
/// `OMNISTAGE_*` overrides applied to it.
#[derive(Debug, Clone)]
pub struct DeploySource {
    pub toml: String,
    pub base_dir: PathBuf,
    pub env: Vec<(String, String)>,
}

impl DeploySource {
    /// The graph this source describes, loaded as the gateway loads it (models checked).
    pub fn load(&self, name: &Path) -> Result<DeployGraph, String> {
        let graph = DeployGraph::from_toml_str(&self.toml, name, &self.base_dir, &self.env)
            .map_err(|e| e.to_string())?;
        graph.check_models().map_err(|e| e.to_string())?;
        Ok(graph)
    }
}

/// Writes one frame: the `u32` LE length, then `msg`.
pub fn write_frame(w: &mut impl Write, msg: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(msg.len())
        .ok()
        .filter(|l| (*l as usize) <= MAX_FRAME)
        .ok_or_else(|| std::io::Error::other(format!("frame of {} bytes is too big", msg.len())))?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(msg)?;
    w.flush()
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub fn read_frame(r: &mut impl Read) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::other(format!(
            "frame of {len} bytes exceeds the {MAX_FRAME}-byte limit"
        )));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    Ok(Some(buf))
}

/// A folder only this user may enter (mode 0700), removed when dropped.
pub struct PrivateDir {
    path: PathBuf,
}

impl PrivateDir {
    pub fn new(label: &str) -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let label: String = label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .take(24)
            .collect();
        let path = std::env::temp_dir().join(format!(
            "omnistage-{}-{label}-{n}-{nanos:x}",
            std::process::id()
        ));
        // `create` (not `create_all`) fails if the path exists: nobody else pre-made it.
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_refuse_oversized_lengths() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"hello").unwrap();
        write_frame(&mut buf, b"").unwrap();
        let mut r = std::io::Cursor::new(buf);
        assert_eq!(read_frame(&mut r).unwrap().unwrap(), b"hello");
        assert_eq!(read_frame(&mut r).unwrap().unwrap(), b"");
        assert!(read_frame(&mut r).unwrap().is_none());
        let huge = (MAX_FRAME as u32 + 1).to_le_bytes();
        assert!(read_frame(&mut std::io::Cursor::new(huge.to_vec())).is_err());
        // A truncated body is an error, not a clean end.
        let mut cut = 10u32.to_le_bytes().to_vec();
        cut.extend_from_slice(b"abc");
        assert!(read_frame(&mut std::io::Cursor::new(cut)).is_err());
    }

    #[test]
    fn private_dir_is_0700_and_removed_on_drop() {
        use std::os::unix::fs::PermissionsExt;
        let dir = PrivateDir::new("t/x").unwrap();
        let p = dir.path().to_path_buf();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        drop(dir);
        assert!(!p.exists());
    }
}
