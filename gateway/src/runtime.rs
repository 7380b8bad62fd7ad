//! Turns a validated deployment into running stages and an orchestrator, and reports each stage's
//! state for `/health`.

use crate::metrics::Metrics;
use crate::orchestrator::{EventRoutes, Orchestrator, RuntimeEdge};
use crate::pool::{Replica, StagePool};
use crate::worker::discover::Discovery;
use crate::worker::remote::{ChildLaunch, Launch, Origin, StateReporter, WorkerLocation};
use crate::worker::{PrivateDir, RemoteReplica, WorkerOptions};
use omnistage_connectors::connector_for;
use omnistage_engines::factory::StageWiring;
use omnistage_scheduler::{spawn_stage, BatchLimits};
use omnistage_stages::deploy::{DeployGraph, StageSpec};
use omnistage_stages::PayloadKind;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// A stage's loading state as `/health` reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum StageState {
    Loading,
    Ready,
    /// A worker process died; it is being restarted (jobs in flight on it failed).
    Restarting(String),
    Failed(String),
}

/// Why the runtime could not start.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Build(#[from] omnistage_engines::factory::BuildError),
    #[error("edge {edge}: {message}")]
    Edge { edge: String, message: String },
    #[error("stage {stage}: its worker process: {message}")]
    Worker { stage: String, message: String },
}

/// Holds the orchestrator once every stage is loaded; readable while loading.
#[derive(Default)]
pub struct RuntimeSlot {
    orchestrator: OnceLock<Arc<Orchestrator>>,
    states: Mutex<Vec<(String, StageState)>>,
    /// Follows the cluster's workers for `remote = true` stages (stopped when dropped).
    discovery: Mutex<Option<Discovery>>,
}

impl RuntimeSlot {
    pub fn new(graph: &DeployGraph) -> Self {
        let states = graph
            .stages
            .iter()
            .map(|s| (s.id.clone(), StageState::Loading))
            .collect();
        Self {
            orchestrator: OnceLock::new(),
            states: Mutex::new(states),
            discovery: Mutex::new(None),
        }
    }

    pub fn orchestrator(&self) -> Option<Arc<Orchestrator>> {
        self.orchestrator.get().cloned()
    }

    fn set_state(&self, stage: &str, state: StageState) {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = states.iter_mut().find(|(id, _)| id == stage) {
            entry.1 = state;
        }
    }

    /// Whether every stage is ready, and each stage's state with its queue figures.
    pub fn health(&self) -> (bool, Value) {
        let states = self
            .states
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let orch = self.orchestrator();
        let mut ready = orch.is_some();
        let mut out = serde_json::Map::new();
        for (id, state) in states {
            let mut entry = match &state {
                StageState::Loading => json!({"state": "loading"}),
                StageState::Ready => json!({"state": "ready"}),
                StageState::Restarting(m) => json!({"state": "restarting", "error": m}),
                StageState::Failed(m) => json!({"state": "failed", "error": m}),
            };
            let pool = orch
                .as_ref()
                .and_then(|o| o.stages().iter().find(|p| p.id() == id));
            // A remote stage is ready while at least one of its workers is connected.
            let remote = orch
                .as_ref()
                .and_then(|o| o.graph.stage(&id))
                .is_some_and(|s| s.remote);
            if let (true, Some(pool)) = (remote && state == StageState::Ready, pool) {
                let live = pool.workers().iter().any(|(at, _)| {
                    matches!(
                        at,
                        WorkerLocation::Endpoint {
                            connected: true,
                            ..
                        }
                    )
                });
                if !live {
                    entry = json!({"state": "waiting", "error": "no worker of this remote stage is connected"});
                    ready = false;
                }
            }
            ready &= state == StageState::Ready;
            if let Some(pool) = pool {
                let stats = pool.stats();
                entry["replicas"] = json!(stats.len());
                entry["waiting"] = json!(stats.iter().map(|s| s.waiting).sum::<usize>());
                entry["running"] = json!(stats.iter().map(|s| s.running).sum::<usize>());
                let workers = pool.workers();
                if !workers.is_empty() {
                    entry["workers"] = workers
                        .iter()
                        .map(|(at, restarts)| match at {
                            WorkerLocation::Child { pid } => {
                                json!({"pid": pid, "restarts": restarts})
                            }
                            WorkerLocation::Endpoint {
                                instance,
                                addr,
                                connected,
                            } => json!({
                                "instance": instance,
                                "endpoint": addr,
                                "connected": connected,
                                "reconnects": restarts,
                            }),
                        })
                        .collect();
                }
            }
            out.insert(id, entry);
        }
        (ready, Value::Object(out))
    }
}

/// Loads every stage's engines, starts their threads and publishes the orchestrator in `slot`.
/// How the graph executes requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExecutionMode {
    /// Every stage batches and stages overlap across requests (the point of omnistage).
    #[default]
    Pipelined,
    /// The baseline a single sequential Transformers/Diffusers pipeline gives: one request at a
    /// time through the whole graph, each stage running it alone (batch size 1, one replica, no
    /// chunked prefill). Same graph, same weights.
    Monolithic,
}

/// Requests that may wait their turn in monolithic mode before new ones are refused.
pub const MONOLITHIC_MAX_WAITING: usize = 4096;

/// The graph as monolithic mode runs it: each stage takes one job at a time, whole, and hands
/// its output on only when it has finished (no streamed edges: no overlap between stages).
pub fn monolithic_graph(mut graph: DeployGraph) -> DeployGraph {
    for s in &mut graph.stages {
        s.max_batch_size = 1;
        s.replicas = 1;
        s.max_wait_ms = 0;
        s.max_batched_tokens = s.max_batched_tokens.max(1 << 20);
    }
    for e in &mut graph.edges {
        e.stream = None;
    }
    graph
}

pub fn start(
    graph: DeployGraph,
    metrics: Arc<Metrics>,
    slot: &Arc<RuntimeSlot>,
    mode: ExecutionMode,
    workers: &WorkerOptions,
) -> Result<Arc<Orchestrator>, RuntimeError> {
    let launcher = WorkerLauncher::new(&graph, workers, mode)?;
    let graph = match mode {
        ExecutionMode::Pipelined => graph,
        ExecutionMode::Monolithic => monolithic_graph(graph),
    };
    let routes: EventRoutes = Arc::new(dashmap::DashMap::new());
    let mut edges = Vec::new();
    for e in &graph.edges {
        let label = format!("{}->{}", e.from, e.to);
        let connector = connector_for(e.connector).map_err(|err| RuntimeError::Edge {
            edge: label.clone(),
            message: err.to_string(),
        })?;
        let index = |id: &str| graph.stages.iter().position(|s| s.id == id);
        let (Some(from), Some(to)) = (index(&e.from), index(&e.to)) else {
            return Err(RuntimeError::Edge {
                edge: label,
                message: "names an unknown stage".into(),
            });
        };
        edges.push(RuntimeEdge {
            from,
            to,
            carries: e.carries,
            stream: e.stream,
            label,
            connector,
        });
    }
    let mut pools = Vec::new();
    for (index, spec) in graph.stages.iter().enumerate() {
        let wiring = stage_wiring(&graph, spec);
        if spec.remote {
            // Filled by discovery as the stage's workers register.
            slot.set_state(&spec.id, StageState::Ready);
            pools.push(StagePool::with_replicas(spec.id.clone(), Vec::new()));
            continue;
        }
        if spec.process {
            if let Some(launcher) = &launcher {
                let pool = launcher.start_stage(index, spec, &routes, slot)?;
                tracing::info!(stage = %spec.id, replicas = spec.replicas, "stage ready (worker processes)");
                slot.set_state(&spec.id, StageState::Ready);
                pools.push(pool);
                continue;
            }
            tracing::warn!(stage = %spec.id, "`process = true` needs the deployment's source to start workers: the stage runs in the gateway's process");
        }
        let mut replicas = Vec::new();
        for replica in 0..spec.replicas {
            let engine = match omnistage_engines::factory::build_engine(spec, &wiring) {
                Ok(e) => e,
                Err(err) => {
                    slot.set_state(&spec.id, StageState::Failed(err.to_string()));
                    return Err(err.into());
                }
            };
            let limits = batch_limits(spec);
            let routes = routes.clone();
            let sink = Arc::new(move |job, event| {
                if let Some(tx) = routes.get(&job) {
                    // The job's task may have just ended; then nobody wants the event.
                    let _ = tx.send((index, event));
                }
            });
            let observer = Arc::new(metrics.stage_observer(&spec.id, replica, spec.max_batch_size));
            let name = format!("stage-{}-{}", spec.id, replica);
            replicas.push(spawn_stage(name, engine, limits, observer, sink));
        }
        tracing::info!(stage = %spec.id, replicas = spec.replicas, "stage ready");
        slot.set_state(&spec.id, StageState::Ready);
        pools.push(StagePool::new(spec.id.clone(), replicas));
    }
    let has_remote = graph.stages.iter().any(|s| s.remote);
    let watched = has_remote.then(|| graph.clone());
    let orch = Orchestrator::new(graph, pools, edges, routes.clone(), metrics);
    let orch = Arc::new(match mode {
        ExecutionMode::Pipelined => orch,
        ExecutionMode::Monolithic => orch.one_job_at_a_time(MONOLITHIC_MAX_WAITING),
    });
    if let Some(graph) = watched {
        let discovery = Discovery::start(&graph, orch.clone(), routes).map_err(|message| {
            RuntimeError::Worker {
                stage: "remote stages".into(),
                message,
            }
        })?;
        *slot.discovery.lock().unwrap_or_else(|e| e.into_inner()) = Some(discovery);
    }
    let _ = slot.orchestrator.set(orch.clone());
    Ok(orch)
}

/// How stage `spec` is wired into `graph` (what its engine receives and hands on); the gateway
/// and `omnistage worker` compute it alike.
pub fn stage_wiring(graph: &DeployGraph, spec: &StageSpec) -> StageWiring {
    let talker = upstream_talker(graph, &spec.id);
    StageWiring {
        received: graph
            .edges
            .iter()
            .filter(|e| e.to == spec.id)
            .map(|e| e.carries)
            .collect(),
        consumed: graph
            .edges
            .iter()
            .filter(|e| e.from == spec.id)
            .map(|e| e.carries)
            .collect(),
        codec_levels: talker.map(|t| t.canonical_levels()),
        codebook_size: talker.map(|t| t.codebook_size),
        media_consumers: graph
            .edges
            .iter()
            .filter(|e| e.from == spec.id && e.carries == PayloadKind::MediaEmbeddings)
            .filter_map(|e| Some(graph.stage(&e.to)?.model.clone()))
            .collect(),
    }
}

/// The scheduler limits of stage `spec`.
pub fn batch_limits(spec: &StageSpec) -> BatchLimits {
    BatchLimits {
        max_batch_size: spec.max_batch_size,
        max_batched_tokens: spec.max_batched_tokens,
        max_wait: Duration::from_millis(spec.max_wait_ms),
        max_queue: spec.max_queue,
    }
}

/// Starts the worker processes of `process = true` stages.
struct WorkerLauncher {
    exe: std::path::PathBuf,
    dir: Arc<PrivateDir>,
    deploy_file: std::path::PathBuf,
    source: crate::worker::DeploySource,
    monolithic: bool,
    threads: Option<usize>,
}

/// Compute threads each child worker gets: the machine's cores shared among the worker
/// processes (at least one each), so that N workers with a pool of every core each do not
/// oversubscribe the CPU (measured in benches/README.md, "Stages in separate processes").
/// `None` when the operator set `RAYON_NUM_THREADS` (the children inherit it).
fn worker_threads(graph: &DeployGraph) -> Option<usize> {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return None;
    }
    let workers: usize = graph
        .stages
        .iter()
        .filter(|s| s.process)
        .map(|s| s.replicas)
        .sum();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    Some((cores / workers.max(1)).max(1))
}

impl WorkerLauncher {
    /// `None` when no stage asks for a process, or the deployment's source is unknown.
    fn new(
        graph: &DeployGraph,
        options: &WorkerOptions,
        mode: ExecutionMode,
    ) -> Result<Option<Self>, RuntimeError> {
        let (true, Some(source)) = (graph.stages.iter().any(|s| s.process), &options.source) else {
            return Ok(None);
        };
        let err = |message: String| RuntimeError::Worker {
            stage: "*".into(),
            message,
        };
        let exe = match &options.exe {
            Some(exe) => exe.clone(),
            None => {
                std::env::current_exe().map_err(|e| err(format!("finding this executable: {e}")))?
            }
        };
        let dir = PrivateDir::new(&graph.name)
            .map_err(|e| err(format!("making its socket folder: {e}")))?;
        let deploy_file = dir.path().join("deploy.toml");
        std::fs::write(&deploy_file, &source.toml)
            .map_err(|e| err(format!("writing {}: {e}", deploy_file.display())))?;
        Ok(Some(Self {
            exe,
            dir: Arc::new(dir),
            deploy_file,
            source: source.clone(),
            monolithic: mode == ExecutionMode::Monolithic,
            threads: worker_threads(graph),
        }))
    }

    fn start_stage(
        &self,
        index: usize,
        spec: &StageSpec,
        routes: &EventRoutes,
        slot: &Arc<RuntimeSlot>,
    ) -> Result<StagePool, RuntimeError> {
        let mut replicas = Vec::new();
        for replica in 0..spec.replicas {
            let reporter_slot = slot.clone();
            let id = spec.id.clone();
            let report: StateReporter = Arc::new(move |state| reporter_slot.set_state(&id, state));
            let launch = Launch {
                stage: spec.id.clone(),
                index,
                replica,
                capacity: spec.max_queue + spec.max_batch_size,
                routes: routes.clone(),
                report,
                origin: Origin::Child(ChildLaunch {
                    exe: self.exe.clone(),
                    socket_dir: self.dir.path().to_path_buf(),
                    deploy_file: self.deploy_file.clone(),
                    base_dir: self.source.base_dir.clone(),
                    env: self.source.env.clone(),
                    monolithic: self.monolithic,
                    threads: self.threads,
                }),
            };
            match RemoteReplica::start(launch, Some(self.dir.clone())) {
                Ok(r) => replicas.push(Replica::Remote(r)),
                Err(message) => {
                    slot.set_state(&spec.id, StageState::Failed(message.clone()));
                    return Err(RuntimeError::Worker {
                        stage: spec.id.clone(),
                        message,
                    });
                }
            }
        }
        Ok(StagePool::with_replicas(spec.id.clone(), replicas))
    }
}

/// The talker feeding stage `id` directly, if any.
fn upstream_talker<'g>(
    graph: &'g omnistage_stages::deploy::DeployGraph,
    id: &str,
) -> Option<&'g omnistage_stages::deploy::TalkerSettings> {
    graph
        .edges
        .iter()
        .filter(|e| e.to == id)
        .find_map(|e| graph.stage(&e.from)?.talker.as_ref())
}
