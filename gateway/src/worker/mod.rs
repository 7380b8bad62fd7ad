//! Stages in their own processes.
//!
//! - `process = true`: each replica runs in a supervised child, `omnistage worker --socket`,
//!   linked to the gateway by shared memory ([`link`]: message bytes in a memfd ring, small
//!   descriptors on a private Unix socket). The supervisor restarts a dead child with back-off.
//! - `remote = true`: replicas are `omnistage worker --listen` processes started elsewhere
//!   ([`listen`]), registered in etcd; the gateway follows them ([`discover`]) and reaches each
//!   over authenticated TCP, reconnecting while it stays registered.
//!
//! **Protocol.** Every message is one [`ToWorker`](omnistage_connectors::remote::ToWorker) /
//! [`FromWorker`](omnistage_connectors::remote::FromWorker) control message of at most
//! [`MAX_FRAME`] bytes. The worker sends `Ready` once its engine is loaded, then one `Event` per
//! stage event, in the stage's order. A worker serves any number of gateways ([`session`]).
//!
//! **Threads.** Gateway side, per connection: a writer thread draining a bounded queue of
//! outgoing messages and a reader thread routing events to the jobs' channels; per replica, a
//! supervisor thread that (re)starts or reconnects it. Worker side, per gateway: a reader (the
//! session) and a writer thread.

pub mod child;
pub mod discover;
pub mod link;
pub mod listen;
pub mod remote;
pub mod session;
mod supervisor;

use omnistage_stages::deploy::DeployGraph;
use std::path::{Path, PathBuf};

pub use remote::RemoteReplica;

/// Largest control message either side accepts (with its payloads).
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
