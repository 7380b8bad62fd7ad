//! Multi-host settings: the top-level `[cluster]` table (where workers register and how they
//! prove they belong) for stages marked `remote = true`.
//!
//! ```toml
//! [cluster]
//! etcd = ["http://etcd:2379"]     # discovery: workers register here under a lease
//! prefix = "/omnistage/tiny-omni" # default: /omnistage/<name>
//! secret_file = "cluster.secret"  # shared secret of every TCP link (relative to this file);
//!                                 # else the OMNISTAGE_CLUSTER_SECRET environment variable
//! lease_ttl_s = 5                 # a dead worker drops out this long after its last keep-alive
//! ```

use super::fields::{bad, parse_table};
use super::{DeployError, Site};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The keys of the top-level `[cluster]` table.
pub(super) const CLUSTER_FIELDS: &[&str] = &["etcd", "prefix", "secret_file", "lease_ttl_s"];

/// The environment variable that holds the cluster secret when `secret_file` is not set.
pub const SECRET_ENV: &str = "OMNISTAGE_CLUSTER_SECRET";

/// Where remote stage workers register and how links between hosts are authenticated.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSettings {
    /// etcd client endpoints (`http://host:port`).
    pub etcd: Vec<String>,
    /// Key prefix under which this deployment's workers register (no trailing `/`).
    pub prefix: String,
    /// File holding the shared secret (resolved against the deployment's folder); `None` = read
    /// [`SECRET_ENV`].
    pub secret_file: Option<PathBuf>,
    /// Lease time-to-live of a worker's registration.
    pub lease_ttl: Duration,
}

/// Why the cluster secret cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("reading the cluster secret {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the cluster secret {where_} is shorter than 16 bytes")]
    TooShort { where_: String },
    #[error(
        "no cluster secret: set [cluster] secret_file or the {SECRET_ENV} environment variable"
    )]
    Missing,
}

impl ClusterSettings {
    /// The shared secret: `secret_file`'s bytes (surrounding whitespace trimmed), else the
    /// environment variable's value. At least 16 bytes.
    pub fn secret(&self) -> Result<Vec<u8>, SecretError> {
        let (bytes, where_) = match &self.secret_file {
            Some(path) => {
                let raw = std::fs::read(path).map_err(|source| SecretError::Read {
                    path: path.clone(),
                    source,
                })?;
                (trim(&raw).to_vec(), path.display().to_string())
            }
            None => match std::env::var(SECRET_ENV) {
                Ok(v) if !v.trim().is_empty() => {
                    (v.trim().as_bytes().to_vec(), format!("in {SECRET_ENV}"))
                }
                _ => return Err(SecretError::Missing),
            },
        };
        if bytes.len() < 16 {
            return Err(SecretError::TooShort { where_ });
        }
        Ok(bytes)
    }
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    etcd: Option<Vec<String>>,
    prefix: Option<String>,
    secret_file: Option<String>,
    lease_ttl_s: Option<u64>,
}

/// Parses the top-level `[cluster]` table; `name` is the deployment's name (for the default
/// prefix).
pub(super) fn parse_cluster(
    map: &Map<String, Value>,
    file: &str,
    base_dir: &Path,
    name: &str,
) -> Result<ClusterSettings, DeployError> {
    let site = Site::Top;
    let r: RawCluster = parse_table(map, file, &site, "cluster.", CLUSTER_FIELDS)?;
    let etcd = r.etcd.unwrap_or_default();
    if etcd.is_empty() {
        return Err(bad(
            file,
            &site,
            "cluster.etcd",
            "list at least one etcd endpoint, e.g. [\"http://127.0.0.1:2379\"]",
        ));
    }
    for url in &etcd {
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"));
        if rest.is_none_or(|r| r.is_empty() || r.contains('/')) {
            return Err(bad(
                file,
                &site,
                "cluster.etcd",
                &format!("`{url}` is not an endpoint like http://host:2379"),
            ));
        }
    }
    let default_prefix = if name.is_empty() {
        "/omnistage".to_string()
    } else {
        format!("/omnistage/{name}")
    };
    let prefix = r.prefix.unwrap_or(default_prefix);
    if !prefix.starts_with('/') || prefix.len() < 2 || prefix.ends_with('/') {
        return Err(bad(
            file,
            &site,
            "cluster.prefix",
            &format!("`{prefix}` must start with `/` and not end with one"),
        ));
    }
    let lease = r.lease_ttl_s.unwrap_or(5);
    if !(1..=3600).contains(&lease) {
        return Err(bad(
            file,
            &site,
            "cluster.lease_ttl_s",
            "must be from 1 to 3600 seconds",
        ));
    }
    Ok(ClusterSettings {
        etcd,
        prefix,
        secret_file: r.secret_file.map(|f| base_dir.join(f)),
        lease_ttl: Duration::from_secs(lease),
    })
}
