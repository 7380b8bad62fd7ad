//! A remote worker: accepts gateways on TCP (each must prove the cluster secret), registers its
//! endpoint in etcd under a lease for as long as it runs, and serves its own `/health` and
//! `/metrics` for probes and scrapers. SIGTERM or Ctrl-C revokes the registration (the key goes
//! at once) and exits; a crash leaves the key to expire with the lease.

use super::child::{LoadedStage, WorkerArgs};
use super::session::serve;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use omnistage_connectors::discovery::{EtcdConfig, Member, Registration};
use omnistage_connectors::remote::FromWorker;
use omnistage_connectors::tcp::{blocking, Limits, Secret};
use serde_json::json;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The limits of a gateway ↔ worker TCP link (both ends use these; the handshake checks it).
pub fn link_limits() -> Limits {
    Limits {
        max_frame: super::MAX_FRAME,
        ..Limits::default()
    }
}

/// What the worker's `/health` reports.
struct Health {
    stage: String,
    instance: String,
    endpoint: String,
    registered: AtomicBool,
    loaded: Arc<LoadedShared>,
}

/// The parts of the loaded stage the HTTP handlers read.
struct LoadedShared {
    handle: omnistage_scheduler::StageHandle,
    sessions: super::session::Sessions,
    metrics: Arc<crate::metrics::Metrics>,
    replica: usize,
}

/// Serves gateways until SIGTERM / Ctrl-C.
pub fn run(args: &WorkerArgs, stage: &LoadedStage) -> Result<(), String> {
    let listen = args.listen.as_deref().unwrap_or("127.0.0.1:0");
    let cluster = stage.graph.cluster.as_ref().ok_or_else(|| {
        format!(
            "{}: `--listen` workers register through etcd: the deployment needs a [cluster] table",
            args.deploy.display()
        )
    })?;
    let secret = Secret::new(cluster.secret().map_err(|e| e.to_string())?);
    let listener = TcpListener::bind(listen).map_err(|e| format!("listening on {listen}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    let endpoint = match &args.advertise {
        Some(a) => a.clone(),
        None if bound.ip().is_unspecified() => {
            return Err(format!(
                "listening on {bound} (every address): give --advertise HOST:PORT, the address \
                 gateways reach this worker at"
            ))
        }
        None => bound.to_string(),
    };
    let instance = args.instance.clone().unwrap_or_else(default_instance);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let health = Arc::new(Health {
        stage: stage.spec.id.clone(),
        instance: instance.clone(),
        endpoint: endpoint.clone(),
        registered: AtomicBool::new(false),
        loaded: Arc::new(LoadedShared {
            handle: stage.handle.clone(),
            sessions: stage.sessions.clone(),
            metrics: stage.metrics.clone(),
            replica: args.replica,
        }),
    });
    if let Some(addr) = &args.http {
        let http = rt
            .block_on(tokio::net::TcpListener::bind(addr))
            .map_err(|e| format!("binding --http {addr}: {e}"))?;
        let app = Router::new()
            .route("/health", get(health_route))
            .route("/metrics", get(metrics_route))
            .with_state(health.clone());
        rt.spawn(async move {
            if let Err(e) = axum::serve(http, app).await {
                tracing::error!("worker http server failed: {e}");
            }
        });
    }
    spawn_acceptor(listener, secret, stage, args.replica)?;
    let etcd = EtcdConfig {
        endpoints: cluster.etcd.clone(),
        prefix: cluster.prefix.clone(),
        lease_ttl: cluster.lease_ttl,
    };
    let member = Member {
        stage: stage.spec.id.clone(),
        instance: instance.clone(),
        endpoint: endpoint.clone(),
    };
    let registration = Registration::register(&etcd, member).map_err(|e| e.to_string())?;
    health.registered.store(true, Ordering::SeqCst);
    tracing::info!(stage = %stage.spec.id, %instance, %endpoint, "worker registered; serving gateways");
    rt.block_on(crate::app::shutdown_signal());
    health.registered.store(false, Ordering::SeqCst);
    if let Err(e) = registration.close() {
        tracing::warn!("revoking the registration failed (it expires with its lease): {e}");
    }
    Ok(())
}

/// Accepts gateways on their own threads; a peer that fails the handshake is dropped.
fn spawn_acceptor(
    listener: TcpListener,
    secret: Secret,
    stage: &LoadedStage,
    replica: usize,
) -> Result<(), String> {
    let sessions = stage.sessions.clone();
    let handle = stage.handle.clone();
    let id = stage.spec.id.clone();
    std::thread::Builder::new()
        .name("worker-accept".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let peer = conn
                    .peer_addr()
                    .map_or_else(|_| "?".into(), |a| a.to_string());
                let (secret, sessions, handle, id) =
                    (secret.clone(), sessions.clone(), handle.clone(), id.clone());
                let spawned = std::thread::Builder::new()
                    .name("worker-session".into())
                    .spawn(move || {
                        let stream = match blocking::accept(conn, &secret, &link_limits()) {
                            Ok((s, _)) => s,
                            Err(e) => {
                                tracing::warn!(%peer, "refused a connection: {e}");
                                return;
                            }
                        };
                        let Ok((writer, reader)) = super::link::tcp(stream) else {
                            return;
                        };
                        tracing::info!(%peer, "gateway connected");
                        let ready = FromWorker::Ready { stage: id, replica };
                        match serve(&sessions, &handle, ready, writer, reader) {
                            Ok(_) => tracing::info!(%peer, "gateway disconnected"),
                            Err(e) => tracing::warn!(%peer, "gateway session ended: {e}"),
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!("cannot start a session thread: {e}");
                }
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn default_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let host = if host.is_empty() {
        "worker".into()
    } else {
        host
    };
    format!("{host}-{}", std::process::id())
}

async fn health_route(State(h): State<Arc<Health>>) -> Response {
    let registered = h.registered.load(Ordering::SeqCst);
    let stats = h.loaded.handle.stats();
    let status = if registered {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if registered { "ready" } else { "not_ready" },
        "stage": h.stage,
        "instance": h.instance,
        "endpoint": h.endpoint,
        "gateways": h.loaded.sessions.open_sessions(),
        "waiting": stats.waiting,
        "running": stats.running,
    });
    (status, Json(body)).into_response()
}

async fn metrics_route(State(h): State<Arc<Health>>) -> Response {
    let l = &h.loaded;
    l.metrics
        .record_engine(&h.stage, l.replica, &l.handle.stats().engine);
    l.metrics.response()
}
