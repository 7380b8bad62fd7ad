//! `omnistage worker`: one replica of one stage in its own process. A child worker of this
//! gateway connects to its private Unix socket (`--socket`); a remote worker listens for
//! gateways on TCP (`--listen`, see [`super::listen`]).

use super::session::{serve, Sessions};
use super::DeploySource;
use crate::metrics::Metrics;
use crate::runtime::{batch_limits, monolithic_graph, stage_wiring};
use omnistage_connectors::remote::FromWorker;
use omnistage_scheduler::{spawn_stage, StageHandle};
use omnistage_stages::deploy::{DeployGraph, StageSpec};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;

/// What `omnistage worker` is told.
#[derive(Debug, Clone, Default)]
pub struct WorkerArgs {
    pub deploy: PathBuf,
    /// Folder relative model paths resolve against (default: the deployment file's folder).
    pub base_dir: Option<PathBuf>,
    pub stage: String,
    pub replica: usize,
    /// The gateway's Unix socket (a child worker).
    pub socket: Option<PathBuf>,
    /// Address to accept gateways on (a remote worker), e.g. `0.0.0.0:7100`.
    pub listen: Option<String>,
    /// Address gateways reach this worker at (default: the bound `--listen` address).
    pub advertise: Option<String>,
    /// This worker's name in discovery (default: `<host>-<pid>`).
    pub instance: Option<String>,
    /// Address of the worker's own `/health` and `/metrics` (remote workers).
    pub http: Option<String>,
    pub monolithic: bool,
}

/// A loaded stage, ready to serve gateways.
pub struct LoadedStage {
    pub graph: DeployGraph,
    pub spec: StageSpec,
    pub handle: StageHandle,
    pub sessions: Sessions,
    pub metrics: Arc<Metrics>,
}

/// Loads the stage and serves the gateway(s) until told to stop.
pub fn run(args: WorkerArgs) -> Result<(), String> {
    match (&args.socket, &args.listen) {
        (Some(_), Some(_)) => return Err("give either --socket or --listen, not both".into()),
        (None, None) => return Err("give --socket (a child worker) or --listen ADDR".into()),
        _ => {}
    }
    let stage = load(&args)?;
    let result = match &args.socket {
        Some(socket) => {
            // Two connections, in this order: gateway → worker, then worker → gateway.
            let connect = || {
                UnixStream::connect(socket)
                    .map_err(|e| format!("connecting to {}: {e}", socket.display()))
            };
            let to_worker = connect()?;
            let from_worker = connect()?;
            let (writer, reader) = super::link::shm_worker(to_worker, from_worker)?;
            let ready = FromWorker::Ready {
                stage: stage.spec.id.clone(),
                replica: args.replica,
            };
            serve(&stage.sessions, &stage.handle, ready, writer, reader).map(|_| ())
        }
        None => super::listen::run(&args, &stage),
    };
    stage.handle.shutdown();
    result
}

/// Reads the deployment and starts the stage's engine thread.
fn load(args: &WorkerArgs) -> Result<LoadedStage, String> {
    let toml = std::fs::read_to_string(&args.deploy)
        .map_err(|e| format!("reading {}: {e}", args.deploy.display()))?;
    let base_dir = args
        .base_dir
        .clone()
        .unwrap_or_else(|| match args.deploy.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        });
    let source = DeploySource {
        toml,
        base_dir,
        env: omnistage_stages::deploy::omnistage_env(),
    };
    let mut graph = source.load(&args.deploy)?;
    if args.monolithic {
        graph = monolithic_graph(graph);
    }
    let spec = graph
        .stage(&args.stage)
        .ok_or_else(|| format!("the deployment has no stage `{}`", args.stage))?
        .clone();
    let wiring = stage_wiring(&graph, &spec);
    let engine =
        omnistage_engines::factory::build_engine(&spec, &wiring).map_err(|e| e.to_string())?;
    let sessions = Sessions::default();
    let deliver = sessions.clone();
    let sink = Arc::new(move |job, event| deliver.deliver(job, event));
    let metrics = Arc::new(Metrics::new());
    let observer = Arc::new(metrics.stage_observer(&spec.id, args.replica, spec.max_batch_size));
    let name = format!("stage-{}-{}", spec.id, args.replica);
    let handle = spawn_stage(name, engine, batch_limits(&spec), observer, sink);
    Ok(LoadedStage {
        graph,
        spec,
        handle,
        sessions,
        metrics,
    })
}
