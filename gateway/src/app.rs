//! Serving a deployment: the embedded default, its tiny checkpoints, and the server's lifecycle.

use crate::metrics::Metrics;
use crate::runtime::{self, ExecutionMode, RuntimeSlot};
use crate::server::{router, AppState};
use crate::worker::remote::WorkerLocation;
use crate::worker::{DeploySource, WorkerOptions};
use axum::serve::ListenerExt;
use omnistage_stages::deploy::{DeployError, DeployGraph};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The embedded default deployment, served when `omnistage serve` gets no file.
pub const DEFAULT_DEPLOY_TOML: &str = include_str!("../../deploy/tiny-omni.toml");

/// Bumped whenever make-tiny's output changes, so a stale cache is rebuilt.
const TINY_CACHE_VERSION: &str = "4";

/// Why serving could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Deploy(#[from] DeployError),
    #[error("making the tiny checkpoints in {dir}: {message}")]
    MakeTiny { dir: String, message: String },
    #[error("binding {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
    #[error("a stage failed to load: {0}")]
    Load(String),
}

/// Where the embedded default keeps its tiny checkpoints: `$OMNISTAGE_CACHE`, else
/// `$XDG_CACHE_HOME/omnistage`, else `~/.cache/omnistage`, else `./.omnistage-cache`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("OMNISTAGE_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("omnistage");
    }
    if let Some(home) = std::env::var_os("HOME") {
        return PathBuf::from(home).join(".cache").join("omnistage");
    }
    PathBuf::from(".omnistage-cache")
}

/// Makes the embedded default's tiny checkpoints under `cache` unless a current set is there,
/// showing a progress bar.
pub fn ensure_tiny_checkpoints(cache: &Path) -> Result<(), ServeError> {
    let stamp = cache.join("tiny-omni").join(".make-tiny-version");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(TINY_CACHE_VERSION) {
        return Ok(());
    }
    let err = |message: String| ServeError::MakeTiny {
        dir: cache.display().to_string(),
        message,
    };
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.set_message(format!("making tiny checkpoints in {}", cache.display()));
    bar.enable_steady_tick(Duration::from_millis(100));
    let manifest = omnistage_engines::tiny::make_tiny(cache, 0).map_err(|e| err(e.to_string()))?;
    std::fs::write(&stamp, TINY_CACHE_VERSION).map_err(|e| err(e.to_string()))?;
    bar.finish_with_message(format!(
        "made {} tiny checkpoint files in {}",
        manifest.files().count(),
        cache.display()
    ));
    Ok(())
}

/// Reads a deployment file, or the embedded default (making its checkpoints first), and checks
/// that every stage's model is there.
pub fn load_deployment(file: Option<&Path>) -> Result<DeployGraph, ServeError> {
    Ok(load_deployment_with_source(file)?.0)
}

/// [`load_deployment`], also returning what `omnistage worker` processes need to load the same
/// graph.
pub fn load_deployment_with_source(
    file: Option<&Path>,
) -> Result<(DeployGraph, DeploySource), ServeError> {
    let (graph, source) = match file {
        Some(path) => {
            let graph = DeployGraph::load(path)?;
            let toml = std::fs::read_to_string(path)?;
            let base_dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let env = omnistage_stages::deploy::omnistage_env();
            (
                graph,
                DeploySource {
                    toml,
                    base_dir,
                    env,
                },
            )
        }
        None => {
            let cache = default_cache_dir();
            ensure_tiny_checkpoints(&cache)?;
            let all: Vec<(String, String)> = std::env::vars().collect();
            let graph = DeployGraph::from_toml_str(
                DEFAULT_DEPLOY_TOML,
                Path::new("<embedded>/tiny-omni.toml"),
                &cache,
                &all,
            )?;
            let env = omnistage_stages::deploy::omnistage_env();
            let source = DeploySource {
                toml: DEFAULT_DEPLOY_TOML.to_string(),
                base_dir: cache,
                env,
            };
            (graph, source)
        }
    };
    graph.check_models()?;
    Ok((graph, source))
}

/// Settings of one server.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub addr: SocketAddr,
    pub request_timeout: Duration,
}

/// A running server (used by `serve` and by tests).
pub struct Server {
    pub addr: SocketAddr,
    pub state: AppState,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    /// Reports a stage that failed to load (then the server has nothing to serve).
    load_failure: tokio::sync::oneshot::Receiver<String>,
}

impl Server {
    /// Binds, starts loading the stages in the background (`/health` says when ready) and serves.
    pub async fn start(graph: DeployGraph, options: ServeOptions) -> Result<Server, ServeError> {
        Self::start_with_mode(graph, options, ExecutionMode::Pipelined).await
    }

    /// [`Server::start`] with the graph executing in `mode` (`serve --monolithic`).
    pub async fn start_with_mode(
        graph: DeployGraph,
        options: ServeOptions,
        mode: ExecutionMode,
    ) -> Result<Server, ServeError> {
        Self::start_with_workers(graph, options, mode, WorkerOptions::default()).await
    }

    /// [`Server::start_with_mode`], with what `process = true` stages need to start their worker
    /// processes (without a deployment source they run in this process).
    pub async fn start_with_workers(
        graph: DeployGraph,
        options: ServeOptions,
        mode: ExecutionMode,
        workers: WorkerOptions,
    ) -> Result<Server, ServeError> {
        let metrics = Arc::new(Metrics::new());
        let slot = Arc::new(RuntimeSlot::new(&graph));
        let state = AppState {
            model_name: graph.name.clone(),
            runtime: slot.clone(),
            metrics: metrics.clone(),
            request_timeout: options.request_timeout,
        };
        let listener = tokio::net::TcpListener::bind(options.addr)
            .await
            .map_err(|source| ServeError::Bind {
                addr: options.addr.to_string(),
                source,
            })?;
        let addr = listener.local_addr()?;
        let loader_slot = slot.clone();
        let (failed_tx, load_failure) = tokio::sync::oneshot::channel();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = runtime::start(graph, metrics, &loader_slot, mode, &workers) {
                tracing::error!("stages failed to start: {e}");
                let _ = failed_tx.send(e.to_string());
            }
        });
        let app = router(state.clone());
        let task = tokio::spawn(async move {
            // Streamed tokens are small writes: without TCP_NODELAY, Nagle's algorithm holds one
            // back until the client's delayed ACK (~40 ms on Linux), adding that to TTFT.
            let listener = listener.tap_io(|tcp| {
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!("cannot set TCP_NODELAY: {e}");
                }
            });
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown_signal())
                .await
        });
        Ok(Server {
            addr,
            state,
            task,
            load_failure,
        })
    }

    /// Waits until every stage is loaded (or one failed).
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), String> {
        let start = std::time::Instant::now();
        loop {
            let (ready, stages) = self.state.runtime.health();
            if ready {
                return Ok(());
            }
            if stages
                .as_object()
                .is_some_and(|m| m.values().any(|s| s["state"] == "failed"))
            {
                return Err(format!("a stage failed to load: {stages}"));
            }
            if start.elapsed() > timeout {
                return Err(format!("stages not ready after {timeout:?}: {stages}"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Serves until Ctrl-C / SIGTERM, or fails when a stage cannot load.
    pub async fn run(self) -> Result<(), ServeError> {
        let Server {
            task,
            load_failure,
            state,
            ..
        } = self;
        let load_failed = async {
            match load_failure.await {
                Ok(message) => message,
                // The loader succeeded (and dropped its sender): nothing to report, ever.
                Err(_) => std::future::pending().await,
            }
        };
        let stop_stages = |state: &AppState| {
            // Stops stage threads and worker processes (children are killed, never orphaned).
            if let Some(orch) = state.runtime.orchestrator() {
                for pool in orch.stages() {
                    pool.shutdown();
                }
            }
        };
        tokio::select! {
            served = task => {
                let state = state.clone();
                let _ = tokio::task::spawn_blocking(move || stop_stages(&state)).await;
                match served {
                Ok(r) => Ok(r?),
                Err(e) => Err(ServeError::Io(std::io::Error::other(e.to_string()))),
            }},
            message = load_failed => {
                drop(state);
                Err(ServeError::Load(message))
            }
        }
    }

    /// The process ids of stage `id`'s worker processes (empty when it runs in this process).
    pub fn worker_pids(&self, id: &str) -> Vec<u32> {
        self.state
            .runtime
            .orchestrator()
            .and_then(|o| {
                let pool = o.stages().iter().find(|p| p.id() == id)?;
                Some(
                    pool.workers()
                        .into_iter()
                        .filter_map(|(at, _)| match at {
                            WorkerLocation::Child { pid } => pid,
                            WorkerLocation::Endpoint { .. } => None,
                        })
                        .collect(),
                )
            })
            .unwrap_or_default()
    }

    /// Stops accepting requests (tests).
    pub fn abort(&self) {
        self.task.abort();
        if let Some(orch) = self.state.runtime.orchestrator() {
            for pool in orch.stages() {
                pool.shutdown();
            }
        }
    }
}

pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}
