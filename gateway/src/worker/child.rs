//! `omnistage worker`: one replica of one stage in its own process, serving the gateway over a
//! Unix socket (see the [module docs](super)).

use super::{read_frame, write_frame, DeploySource};
use crate::runtime::{batch_limits, monolithic_graph, stage_wiring};
use omnistage_connectors::remote::{
    decode_to_worker, encode_from_worker, FromWorker, RefuseReason, ToWorker, WorkerStats,
};
use omnistage_scheduler::{spawn_stage, NoopObserver, StageHandle, SubmitError};
use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Stage events waiting for the writer thread; the stage thread blocks when it is full (the
/// socket is the back-pressure).
const OUTBOX: usize = 1024;

/// What `omnistage worker` is told.
#[derive(Debug, Clone)]
pub struct WorkerArgs {
    pub deploy: PathBuf,
    /// Folder relative model paths resolve against (default: the deployment file's folder).
    pub base_dir: Option<PathBuf>,
    pub stage: String,
    pub replica: usize,
    pub socket: PathBuf,
    pub monolithic: bool,
}

/// Loads the stage, connects, announces `Ready` and serves until the socket closes or the
/// gateway sends `Shutdown`.
pub fn run(args: WorkerArgs) -> Result<(), String> {
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
    let stream = connect(&args.socket)?;
    let (out_tx, out_rx) = crossbeam_channel::bounded::<FromWorker>(OUTBOX);
    let events = out_tx.clone();
    let sink = Arc::new(move |job, event| {
        // Fails only once the writer is gone (the gateway went away): nothing to deliver to.
        let _ = events.send(FromWorker::Event { job, event });
    });
    let name = format!("stage-{}-{}", spec.id, args.replica);
    let handle = spawn_stage(
        name,
        engine,
        batch_limits(&spec),
        Arc::new(NoopObserver),
        sink,
    );
    let mut write_half = stream.try_clone().map_err(|e| e.to_string())?;
    let writer = std::thread::Builder::new()
        .name("worker-writer".into())
        .spawn(move || {
            for msg in out_rx {
                let sent = encode_from_worker(&msg)
                    .map_err(|e| e.to_string())
                    .and_then(|bytes| {
                        write_frame(&mut write_half, &bytes).map_err(|e| e.to_string())
                    });
                if let Err(e) = sent {
                    tracing::warn!("worker: sending to the gateway failed: {e}");
                    let _ = write_half.shutdown(std::net::Shutdown::Both);
                    break;
                }
            }
        })
        .map_err(|e| e.to_string())?;
    let _ = out_tx.send(FromWorker::Ready {
        stage: spec.id.clone(),
        replica: args.replica,
    });
    let result = serve(&stream, &handle, &out_tx);
    handle.shutdown();
    drop(handle);
    drop(out_tx);
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let _ = writer.join();
    result
}

fn connect(socket: &Path) -> Result<UnixStream, String> {
    UnixStream::connect(socket).map_err(|e| format!("connecting to {}: {e}", socket.display()))
}

/// Reads the gateway's messages until the socket closes or `Shutdown`.
fn serve(
    stream: &UnixStream,
    handle: &StageHandle,
    out: &crossbeam_channel::Sender<FromWorker>,
) -> Result<(), String> {
    let mut reader = BufReader::new(stream);
    loop {
        let Some(frame) = read_frame(&mut reader).map_err(|e| e.to_string())? else {
            return Ok(());
        };
        let msg = decode_to_worker(&frame).map_err(|e| format!("bad message: {e}"))?;
        match msg {
            ToWorker::Submit { job, input } => {
                if let Err(e) = handle.submit(job, input) {
                    let reason = match e {
                        SubmitError::QueueFull { capacity, .. } => {
                            RefuseReason::QueueFull { capacity }
                        }
                        SubmitError::Stopped { .. } => RefuseReason::Stopped,
                    };
                    send(out, FromWorker::Refused { job, reason })?;
                }
            }
            ToWorker::Feed {
                job,
                payloads,
                last,
            } => {
                handle.feed(job, payloads, last);
            }
            ToWorker::Cancel { job } => {
                handle.cancel(job);
            }
            ToWorker::Hold { job, held } => {
                handle.hold(job, held);
            }
            ToWorker::StatsRequest => {
                let s = handle.stats();
                send(
                    out,
                    FromWorker::Stats(WorkerStats {
                        waiting: s.waiting,
                        running: s.running,
                        state_bytes: s.state_bytes,
                        engine: s.engine,
                        steps_total: s.steps_total,
                    }),
                )?;
            }
            ToWorker::Shutdown => return Ok(()),
        }
    }
}

fn send(out: &crossbeam_channel::Sender<FromWorker>, msg: FromWorker) -> Result<(), String> {
    out.send(msg)
        .map_err(|_| "the connection to the gateway is closed".to_string())
}
