//! The gateway's view of `remote = true` stages: follows the workers registered in the
//! deployment's etcd and keeps each remote stage's pool equal to its live members — a joining
//! worker becomes a replica (reached over authenticated TCP, reconnected with back-off while it
//! stays registered), a leaving one (clean exit, or its lease expired after a crash) is removed,
//! and the jobs it held fail as unavailable (503).

use super::remote::{Launch, Origin, RemoteReplica};
use crate::orchestrator::{EventRoutes, Orchestrator};
use crate::pool::Replica;
use omnistage_connectors::discovery::{EtcdConfig, Membership};
use omnistage_connectors::tcp::Secret;
use omnistage_stages::deploy::DeployGraph;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the pools are re-checked against the members even without events.
const RESYNC: Duration = Duration::from_secs(1);

/// The running discovery thread; stops when dropped.
pub struct Discovery {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// A remote stage: its index in the graph, id and per-replica capacity.
struct RemoteStage {
    index: usize,
    id: String,
    capacity: usize,
}

impl Discovery {
    /// Watches the cluster of `graph` (which has remote stages and a `[cluster]`) and keeps
    /// `orch`'s remote pools in step with it.
    pub fn start(
        graph: &DeployGraph,
        orch: Arc<Orchestrator>,
        routes: EventRoutes,
    ) -> Result<Discovery, String> {
        let cluster = graph
            .cluster
            .as_ref()
            .ok_or("remote stages need a [cluster] table")?;
        let secret = Secret::new(cluster.secret().map_err(|e| e.to_string())?);
        let cfg = EtcdConfig {
            endpoints: cluster.etcd.clone(),
            prefix: cluster.prefix.clone(),
            lease_ttl: cluster.lease_ttl,
        };
        let membership =
            Membership::watch(&cfg).map_err(|e| format!("watching the cluster: {e}"))?;
        let stages: Vec<RemoteStage> = graph
            .stages
            .iter()
            .enumerate()
            .filter(|(_, s)| s.remote)
            .map(|(index, s)| RemoteStage {
                index,
                id: s.id.clone(),
                capacity: s.max_queue + s.max_batch_size,
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("discovery".into())
            .spawn(move || {
                let events = membership.subscribe();
                let mut replica_no = 0usize;
                while !flag.load(Ordering::SeqCst) {
                    for stage in &stages {
                        sync(&membership, stage, &orch, &routes, &secret, &mut replica_no);
                    }
                    // Any event (or a quiet second) triggers a resync; drain what queued up.
                    if events.recv_timeout(RESYNC).is_ok() {
                        while events.try_recv().is_ok() {}
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(Discovery {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Makes `stage`'s pool hold exactly one replica per live member (same instance, same address).
fn sync(
    membership: &Membership,
    stage: &RemoteStage,
    orch: &Orchestrator,
    routes: &EventRoutes,
    secret: &Secret,
    replica_no: &mut usize,
) {
    let Some(pool) = orch.stages().iter().find(|p| p.id() == stage.id) else {
        return;
    };
    let members = membership.members(&stage.id);
    let is_member = |r: &Replica| match r {
        Replica::Remote(r) => match r.location() {
            super::remote::WorkerLocation::Endpoint { instance, addr, .. } => members
                .iter()
                .any(|m| m.instance == instance && m.endpoint == addr),
            _ => true,
        },
        Replica::Local(_) => true,
    };
    let gone = pool.remove_where(|r| !is_member(r));
    if gone > 0 {
        tracing::info!(stage = %stage.id, gone, "workers left the cluster");
    }
    for m in &members {
        let known = pool.any(|r| match r {
            Replica::Remote(r) => r.instance() == Some(m.instance.as_str()),
            Replica::Local(_) => false,
        });
        if known {
            continue;
        }
        *replica_no += 1;
        let launch = Launch {
            stage: stage.id.clone(),
            index: stage.index,
            replica: *replica_no,
            capacity: stage.capacity,
            routes: routes.clone(),
            // A remote stage's health is its connected replicas, not one worker's restarts.
            report: Arc::new(|_| {}),
            origin: Origin::Endpoint {
                instance: m.instance.clone(),
                addr: m.endpoint.clone(),
                secret: secret.clone(),
            },
        };
        match RemoteReplica::start(launch, None) {
            Ok(r) => {
                tracing::info!(stage = %stage.id, instance = %m.instance, endpoint = %m.endpoint, "worker joined");
                pool.add(Replica::Remote(r));
            }
            Err(e) => {
                tracing::warn!(stage = %stage.id, instance = %m.instance, "cannot reach worker: {e}")
            }
        }
    }
}
