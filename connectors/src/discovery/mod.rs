//! Finding stage workers through etcd.
//!
//! Each worker process [`Registration::register`]s itself under
//! `{prefix}/stages/{stage}/{instance}` with a JSON value
//! `{"stage": "...", "instance": "...", "endpoint": "host:port", "pid": 123}` attached to a
//! lease, and keeps the lease alive from a background thread. A worker that exits cleanly
//! revokes its lease, so its key disappears at once; one that dies stops renewing, so its key
//! expires after the lease TTL. Routers and gateways follow the workers with
//! [`Membership::watch`]: a live map of members plus a stream of [`MemberEvent`]s.
//!
//! The API is synchronous: every object owns one thread running a current-thread tokio runtime,
//! so callers can be plain threads. Losing etcd (restart, lost lease, broken watch) is repaired
//! in the background with back-off, and logged with `tracing`.
//!
//! [`EtcdServer`] starts a throwaway etcd for tests and benchmarks.

mod membership;
mod registration;
mod server;

use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use serde::{Deserialize, Serialize};

pub use membership::{MemberEvent, Membership};
pub use registration::Registration;
pub use server::EtcdServer;

/// How long connecting to etcd (and each request on the way) may take before it is an error.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest pause between two attempts to recover a lost lease or a broken watch.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// First pause before retrying after a failure.
const MIN_BACKOFF: Duration = Duration::from_millis(200);

/// Where etcd is and which part of its key space this deployment uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs such as `http://127.0.0.1:2379` (or bare `host:port`).
    pub endpoints: Vec<String>,
    /// Key prefix without a trailing slash, e.g. `/omnistage/tiny-omni`.
    pub prefix: String,
    /// Time to live of a worker's lease: how long a dead worker stays listed. etcd rounds it up
    /// to whole seconds and to its own minimum (about 2 s with default settings).
    pub lease_ttl: Duration,
}

impl EtcdConfig {
    /// The prefix every member key lives under: `{prefix}/stages/`.
    pub fn stages_prefix(&self) -> String {
        format!("{}/stages/", self.prefix.trim_end_matches('/'))
    }

    /// The key of one member: `{prefix}/stages/{stage}/{instance}`.
    pub fn member_key(&self, stage: &str, instance: &str) -> String {
        format!("{}{stage}/{instance}", self.stages_prefix())
    }

    fn validate(&self) -> Result<(), DiscoveryError> {
        if self.endpoints.is_empty() {
            return Err(DiscoveryError::InvalidConfig(
                "no etcd endpoints given".to_string(),
            ));
        }
        if self.lease_ttl.is_zero() {
            return Err(DiscoveryError::InvalidConfig(
                "lease_ttl must be longer than zero".to_string(),
            ));
        }
        Ok(())
    }
}

/// One running instance of a stage, as found in etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub stage: String,
    pub instance: String,
    /// Where the instance accepts connections, `host:port`.
    pub endpoint: String,
}

impl Member {
    fn validate(&self) -> Result<(), DiscoveryError> {
        for (what, value) in [("stage", &self.stage), ("instance", &self.instance)] {
            if value.is_empty() || value.contains('/') {
                return Err(DiscoveryError::InvalidMember(format!(
                    "{what} `{value}` must be non-empty and contain no `/`"
                )));
            }
        }
        if self.endpoint.is_empty() {
            return Err(DiscoveryError::InvalidMember(format!(
                "member {}/{} has an empty endpoint",
                self.stage, self.instance
            )));
        }
        Ok(())
    }
}

/// Why discovery could not start, or could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscoveryError {
    #[error("invalid etcd config: {0}")]
    InvalidConfig(String),
    #[error("invalid member: {0}")]
    InvalidMember(String),
    #[error("could not reach etcd at {endpoints}: {reason}")]
    Connect { endpoints: String, reason: String },
    #[error("etcd {op} failed: {reason}")]
    Request { op: &'static str, reason: String },
    #[error("discovery background thread failed: {0}")]
    Thread(String),
    #[error("etcd binary not found ({0}); install Debian's `etcd-server` package (apt-get install etcd-server) or set OMNISTAGE_ETCD_BIN")]
    EtcdNotFound(String),
    #[error("test etcd server failed: {0}")]
    Server(String),
}

/// The JSON value stored under a member key.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    stage: String,
    instance: String,
    endpoint: String,
    #[serde(default)]
    pid: Option<u32>,
}

fn encode_member(member: &Member) -> String {
    let record = Record {
        stage: member.stage.clone(),
        instance: member.instance.clone(),
        endpoint: member.endpoint.clone(),
        pid: Some(std::process::id()),
    };
    // A struct of strings and an integer always serialises.
    serde_json::to_string(&record).unwrap_or_default()
}

/// Reads a member from one key and value under `stages_prefix`; `Err` says why it is not one.
fn decode_member(stages_prefix: &str, key: &[u8], value: &[u8]) -> Result<Member, String> {
    let (stage, instance) = split_key(stages_prefix, key)?;
    let record: Record =
        serde_json::from_slice(value).map_err(|e| format!("value is not a member record: {e}"))?;
    if record.stage != stage || record.instance != instance {
        return Err(format!(
            "value names {}/{} but the key names {stage}/{instance}",
            record.stage, record.instance
        ));
    }
    let member = Member {
        stage,
        instance,
        endpoint: record.endpoint,
    };
    member.validate().map_err(|e| e.to_string())?;
    Ok(member)
}

/// Splits `{stages_prefix}{stage}/{instance}` into its stage and instance.
fn split_key(stages_prefix: &str, key: &[u8]) -> Result<(String, String), String> {
    let key = std::str::from_utf8(key).map_err(|_| "key is not UTF-8".to_string())?;
    let rest = key
        .strip_prefix(stages_prefix)
        .ok_or_else(|| format!("key `{key}` is outside `{stages_prefix}`"))?;
    match rest.split_once('/') {
        Some((stage, instance))
            if !stage.is_empty() && !instance.is_empty() && !instance.contains('/') =>
        {
            Ok((stage.to_string(), instance.to_string()))
        }
        _ => Err(format!(
            "key `{key}` is not `{stages_prefix}{{stage}}/{{instance}}`"
        )),
    }
}

/// Connects to etcd and checks that it answers, within [`CONNECT_TIMEOUT`].
async fn connect(cfg: &EtcdConfig) -> Result<Client, DiscoveryError> {
    let endpoints = cfg.endpoints.join(", ");
    let fail = |reason: String| DiscoveryError::Connect {
        endpoints: endpoints.clone(),
        reason,
    };
    let options = ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
    let attempt = async {
        let mut client = Client::connect(&cfg.endpoints, Some(options))
            .await
            .map_err(|e| fail(e.to_string()))?;
        client.status().await.map_err(|e| fail(e.to_string()))?;
        Ok(client)
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(result) => result,
        Err(_) => Err(fail(format!(
            "no answer within {} s",
            CONNECT_TIMEOUT.as_secs()
        ))),
    }
}

/// Runs one etcd request with a deadline, so a dead server fails it instead of hanging.
async fn request<T>(
    op: &'static str,
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, DiscoveryError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, fut).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(DiscoveryError::Request {
            op,
            reason: e.to_string(),
        }),
        Err(_) => Err(DiscoveryError::Request {
            op,
            reason: format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
        }),
    }
}

/// A current-thread runtime for one background thread.
fn runtime() -> Result<tokio::runtime::Runtime, DiscoveryError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| DiscoveryError::Thread(format!("could not build a tokio runtime: {e}")))
}

/// Doubles a back-off pause up to [`MAX_BACKOFF`].
fn next_backoff(current: Duration) -> Duration {
    (current * 2).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_into_stage_and_instance() {
        let prefix = "/o/t/stages/";
        assert_eq!(
            split_key(prefix, b"/o/t/stages/thinker/a1"),
            Ok(("thinker".to_string(), "a1".to_string()))
        );
        for bad in [
            &b"/o/t/stages/thinker"[..],
            b"/o/t/stages/thinker/",
            b"/o/t/stages//a1",
            b"/o/t/stages/thinker/a1/x",
            b"/o/u/stages/thinker/a1",
            b"/o/t/stages/\xff/a1",
        ] {
            assert!(split_key(prefix, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn records_round_trip_and_bad_ones_are_refused() {
        let cfg = EtcdConfig {
            endpoints: vec!["127.0.0.1:2379".into()],
            prefix: "/o/t/".into(),
            lease_ttl: Duration::from_secs(2),
        };
        let member = Member {
            stage: "talker".into(),
            instance: "w0".into(),
            endpoint: "127.0.0.1:9000".into(),
        };
        let key = cfg.member_key("talker", "w0");
        assert_eq!(key, "/o/t/stages/talker/w0");
        let value = encode_member(&member);
        let prefix = cfg.stages_prefix();
        assert_eq!(
            decode_member(&prefix, key.as_bytes(), value.as_bytes()),
            Ok(member)
        );
        assert!(decode_member(&prefix, key.as_bytes(), b"{not json").is_err());
        let other = br#"{"stage":"talker","instance":"w9","endpoint":"h:1"}"#;
        assert!(decode_member(&prefix, key.as_bytes(), other).is_err());
        let empty = br#"{"stage":"talker","instance":"w0","endpoint":""}"#;
        assert!(decode_member(&prefix, key.as_bytes(), empty).is_err());
    }
}
