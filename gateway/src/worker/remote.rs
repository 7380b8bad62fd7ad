//! The gateway's side of a stage worker: a replica that forwards jobs over the worker's socket,
//! and the supervisor that (re)starts the worker process.

use super::supervisor::{start_once, supervise};
use super::PrivateDir;
use crate::orchestrator::EventRoutes;
use crate::runtime::StageState;
use omnistage_connectors::remote::{FromWorker, RefuseReason, ToWorker};
use omnistage_connectors::tcp::Secret;
use omnistage_scheduler::{StageStats, SubmitError};
use omnistage_stages::{EngineError, JobId, Payload, StageEvent, StageInput};
use std::collections::HashSet;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Child;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// Where a replica's worker runs (for `/health`).
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerLocation {
    Child {
        pid: Option<u32>,
    },
    Endpoint {
        instance: String,
        addr: String,
        connected: bool,
    },
}

/// Reports the stage's state (for `/health`).
pub type StateReporter = Arc<dyn Fn(StageState) + Send + Sync>;

/// One replica's worker: where it runs and how its jobs' events are routed.
pub struct Launch {
    pub stage: String,
    /// The stage's index in the graph (what its events are routed with).
    pub index: usize,
    pub replica: usize,
    /// In-flight jobs the replica takes before answering `QueueFull`.
    pub capacity: usize,
    pub routes: EventRoutes,
    pub report: StateReporter,
    pub origin: Origin,
}

/// Where a replica's worker runs.
pub enum Origin {
    /// A child process of this gateway, started (and restarted) by it.
    Child(ChildLaunch),
    /// A worker found through discovery, reached over authenticated TCP and reconnected to
    /// (with back-off) until it leaves the cluster.
    Endpoint {
        instance: String,
        addr: String,
        secret: Secret,
    },
}

/// How to start a child worker process.
pub struct ChildLaunch {
    pub exe: PathBuf,
    /// The private folder holding the socket and the deployment file.
    pub socket_dir: PathBuf,
    pub deploy_file: PathBuf,
    pub base_dir: PathBuf,
    pub env: Vec<(String, String)>,
    pub monolithic: bool,
    /// Compute threads the worker may use (`RAYON_NUM_THREADS`); `None` = its default.
    pub threads: Option<usize>,
}

/// One replica of a stage running in a worker process (see the [module docs](super)).
pub struct RemoteReplica {
    inner: Arc<Inner>,
    supervisor: Mutex<Option<JoinHandle<()>>>,
}

pub(super) struct Inner {
    pub(super) launch: Launch,
    /// This replica's hold on the socket folder, let go on shutdown (the folder is removed when
    /// the last replica using it lets go).
    dir: Mutex<Option<Arc<PrivateDir>>>,
    pub(super) conn: Mutex<Conn>,
    pub(super) stats: Mutex<StageStats>,
    pub(super) pid: AtomicU32,
    pub(super) restarts: AtomicU64,
    pub(super) stop: Mutex<bool>,
    pub(super) stop_cv: Condvar,
}

#[derive(Default)]
pub(super) struct Conn {
    /// The writer thread's queue; `None` while no worker is connected.
    pub(super) tx: Option<crossbeam_channel::Sender<ToWorker>>,
    /// Jobs submitted and not yet finished, failed or cancelled.
    pub(super) inflight: HashSet<JobId>,
    /// Bumped per connection, so a stale reader cannot tear down its successor.
    pub(super) generation: u64,
}

/// A started (or reached) worker and its connection threads.
pub(super) struct Running {
    /// `None` for a worker this gateway did not start.
    pub(super) child: Option<Child>,
    pub(super) stream: Stream,
    pub(super) generation: u64,
    pub(super) threads: Vec<JoinHandle<()>>,
}

/// The connection, kept to shut it down.
pub(super) enum Stream {
    /// The two control sockets of a shared-memory link.
    Shm(UnixStream, UnixStream),
    Tcp(std::net::TcpStream),
}

impl Stream {
    pub(super) fn shutdown(&self) {
        let both = std::net::Shutdown::Both;
        match self {
            Stream::Shm(a, b) => {
                let _ = a.shutdown(both);
                let _ = b.shutdown(both);
            }
            Stream::Tcp(s) => {
                let _ = s.shutdown(both);
            }
        }
    }
}

impl RemoteReplica {
    /// Starts the worker, waits for `Ready`, and hands it to a supervisor thread that restarts
    /// it when it dies.
    /// `dir` (a child's `socket_dir`) is removed once every replica holding it has shut down.
    pub fn start(launch: Launch, dir: Option<Arc<PrivateDir>>) -> Result<RemoteReplica, String> {
        let inner = Arc::new(Inner {
            dir: Mutex::new(dir),
            launch,
            conn: Mutex::new(Conn::default()),
            stats: Mutex::new(StageStats::default()),
            pid: AtomicU32::new(0),
            restarts: AtomicU64::new(0),
            stop: Mutex::new(false),
            stop_cv: Condvar::new(),
        });
        // A child that cannot start is a start-up error; a discovered worker that cannot be
        // reached yet is retried with back-off (it may still be starting).
        let running = match (&inner.launch.origin, start_once(&inner)) {
            (_, Ok(r)) => Some(r),
            (Origin::Child(_), Err(e)) => return Err(e),
            (Origin::Endpoint { addr, .. }, Err(e)) => {
                tracing::warn!(stage = %inner.launch.stage, %addr, "worker not reachable yet: {e}");
                None
            }
        };
        let sup = inner.clone();
        let supervisor = std::thread::Builder::new()
            .name(format!(
                "supervise-{}-{}",
                sup.launch.stage, sup.launch.replica
            ))
            .spawn(move || supervise(&sup, running))
            .map_err(|e| format!("cannot start the supervisor thread: {e}"))?;
        Ok(RemoteReplica {
            inner,
            supervisor: Mutex::new(Some(supervisor)),
        })
    }

    /// Where the worker runs: its process id (a child; `None` while none runs) or its
    /// discovered instance and address.
    pub fn location(&self) -> WorkerLocation {
        match &self.inner.launch.origin {
            Origin::Child(_) => WorkerLocation::Child { pid: self.pid() },
            Origin::Endpoint { instance, addr, .. } => WorkerLocation::Endpoint {
                instance: instance.clone(),
                addr: addr.clone(),
                connected: self.inner.conn().tx.is_some(),
            },
        }
    }

    /// The discovered instance this replica reaches (`None` for a child worker).
    pub fn instance(&self) -> Option<&str> {
        match &self.inner.launch.origin {
            Origin::Child(_) => None,
            Origin::Endpoint { instance, .. } => Some(instance),
        }
    }

    /// The worker's process id (`None` while none runs).
    pub fn pid(&self) -> Option<u32> {
        Some(self.inner.pid.load(Ordering::SeqCst)).filter(|p| *p != 0)
    }

    /// Times the worker was restarted.
    pub fn restarts(&self) -> u64 {
        self.inner.restarts.load(Ordering::SeqCst)
    }

    /// Sends the job to the worker; refused when `capacity` jobs are in flight or no worker is
    /// connected.
    pub fn submit(&self, job: JobId, input: StageInput) -> Result<(), SubmitError> {
        let stage = || self.inner.launch.stage.clone();
        let capacity = self.inner.launch.capacity;
        let mut conn = self.inner.conn();
        let Some(tx) = conn.tx.clone() else {
            return Err(SubmitError::Stopped { stage: stage() });
        };
        if conn.inflight.len() >= capacity {
            return Err(SubmitError::QueueFull {
                stage: stage(),
                capacity,
            });
        }
        match tx.try_send(ToWorker::Submit { job, input }) {
            Ok(()) => {
                conn.inflight.insert(job);
                Ok(())
            }
            Err(crossbeam_channel::TrySendError::Full(_)) => Err(SubmitError::QueueFull {
                stage: stage(),
                capacity,
            }),
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => {
                Err(SubmitError::Stopped { stage: stage() })
            }
        }
    }

    pub fn cancel(&self, job: JobId) -> bool {
        let mut conn = self.inner.conn();
        if !conn.inflight.remove(&job) {
            return false;
        }
        conn.tx
            .as_ref()
            .is_some_and(|tx| tx.try_send(ToWorker::Cancel { job }).is_ok())
    }

    pub fn feed(&self, job: JobId, payloads: Vec<Payload>, last: bool) -> bool {
        self.send_for(
            job,
            ToWorker::Feed {
                job,
                payloads,
                last,
            },
        )
    }

    pub fn hold(&self, job: JobId, held: bool) -> bool {
        self.send_for(job, ToWorker::Hold { job, held })
    }

    fn send_for(&self, job: JobId, msg: ToWorker) -> bool {
        let conn = self.inner.conn();
        conn.inflight.contains(&job) && conn.tx.as_ref().is_some_and(|tx| tx.try_send(msg).is_ok())
    }

    /// The worker's last reported figures, with the load counted here (asks for fresh ones).
    pub fn stats(&self) -> StageStats {
        let inflight = {
            let conn = self.inner.conn();
            if let Some(tx) = &conn.tx {
                let _ = tx.try_send(ToWorker::StatsRequest);
            }
            conn.inflight.len()
        };
        let mut s = *self.inner.stats.lock().unwrap_or_else(|e| e.into_inner());
        s.running = s.running.min(inflight);
        s.waiting = inflight - s.running;
        s
    }

    /// Stops the supervisor: the worker is asked to exit, then killed; every job in flight fails.
    pub fn shutdown(&self) {
        *self.inner.stop.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.inner.stop_cv.notify_all();
        let handle = self
            .supervisor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(h) = handle {
            let _ = h.join();
        }
        self.inner
            .dir
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }
}

impl Drop for RemoteReplica {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Inner {
    pub(super) fn conn(&self) -> MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn stopping(&self) -> bool {
        *self.stop.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sleeps up to `d`, waking early on shutdown; returns whether shutdown was asked.
    pub(super) fn sleep_or_stop(&self, d: Duration) -> bool {
        let guard = self.stop.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = self
            .stop_cv
            .wait_timeout_while(guard, d, |stop| !*stop)
            .unwrap_or_else(|e| e.into_inner());
        *guard
    }

    pub(super) fn connected(&self, generation: u64) -> bool {
        let conn = self.conn();
        conn.generation == generation && conn.tx.is_some()
    }

    /// Disconnects connection `generation` (once) and fails every job in flight on it.
    pub(super) fn connection_lost(&self, generation: u64, why: &str) {
        let jobs: Vec<JobId> = {
            let mut conn = self.conn();
            if conn.generation != generation || conn.tx.is_none() {
                return;
            }
            conn.tx = None;
            conn.inflight.drain().collect()
        };
        for job in jobs {
            self.route(
                job,
                StageEvent::Failed(EngineError::Unavailable(format!(
                    "the worker of stage `{}` {why}",
                    self.launch.stage
                ))),
            );
        }
    }

    fn route(&self, job: JobId, event: StageEvent) {
        if let Some(tx) = self.launch.routes.get(&job) {
            // The job's task may have just ended; then nobody wants the event.
            let _ = tx.send((self.launch.index, event));
        }
    }

    pub(super) fn on_message(&self, msg: FromWorker) {
        match msg {
            FromWorker::Event { job, event } => {
                if matches!(event, StageEvent::Finished { .. } | StageEvent::Failed(_)) {
                    self.conn().inflight.remove(&job);
                }
                self.route(job, event);
            }
            FromWorker::Refused { job, reason } => {
                if self.conn().inflight.remove(&job) {
                    let why = match reason {
                        RefuseReason::QueueFull { capacity } => {
                            format!("its queue is full ({capacity} jobs waiting)")
                        }
                        RefuseReason::Stopped => "it is stopping".to_string(),
                    };
                    self.route(
                        job,
                        StageEvent::Failed(EngineError::Unavailable(format!(
                            "the worker of stage `{}` refused the job: {why}",
                            self.launch.stage
                        ))),
                    );
                }
            }
            FromWorker::Stats(w) => {
                *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = StageStats {
                    waiting: w.waiting,
                    running: w.running,
                    state_bytes: w.state_bytes,
                    engine: w.engine,
                    steps_total: w.steps_total,
                };
            }
            FromWorker::Ready { .. } => {}
        }
    }
}
