//! A stage's replicas, load-balanced least-loaded-first: in this process, or each in its own
//! worker process (`process = true`, see [`crate::worker`]).

use crate::worker::remote::WorkerLocation;
use crate::worker::RemoteReplica;
use omnistage_scheduler::{StageHandle, StageStats, SubmitError};
use omnistage_stages::{JobId, Payload, StageInput};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

/// One replica of a stage.
pub enum Replica {
    /// A stage thread in the gateway's process.
    Local(StageHandle),
    /// A supervised worker process.
    Remote(RemoteReplica),
}

impl Replica {
    fn submit(&self, job: JobId, input: StageInput) -> Result<(), SubmitError> {
        match self {
            Replica::Local(h) => h.submit(job, input),
            Replica::Remote(r) => r.submit(job, input),
        }
    }

    fn cancel(&self, job: JobId) {
        match self {
            Replica::Local(h) => {
                h.cancel(job);
            }
            Replica::Remote(r) => {
                r.cancel(job);
            }
        }
    }

    fn feed(&self, job: JobId, more: Vec<Payload>, last: bool) -> bool {
        match self {
            Replica::Local(h) => h.feed(job, more, last),
            Replica::Remote(r) => r.feed(job, more, last),
        }
    }

    fn hold(&self, job: JobId, held: bool) -> bool {
        match self {
            Replica::Local(h) => h.hold(job, held),
            Replica::Remote(r) => r.hold(job, held),
        }
    }

    fn stats(&self) -> StageStats {
        match self {
            Replica::Local(h) => h.stats(),
            Replica::Remote(r) => r.stats(),
        }
    }

    fn shutdown(&self) {
        match self {
            Replica::Local(h) => h.shutdown(),
            Replica::Remote(r) => r.shutdown(),
        }
    }
}

/// Replicas of one stage; each has its own engine, thread and queue. A remote stage's replicas
/// come and go as workers join and leave the cluster: each keeps the number it was added under,
/// so a job's replica stays addressable while others change.
pub struct StagePool {
    id: String,
    replicas: RwLock<BTreeMap<usize, Arc<Replica>>>,
    next: AtomicUsize,
    /// Set by [`StagePool::shutdown`]: replicas added later are shut down at once.
    closed: AtomicBool,
}

impl StagePool {
    pub fn new(id: String, replicas: Vec<StageHandle>) -> Self {
        Self::with_replicas(id, replicas.into_iter().map(Replica::Local).collect())
    }

    pub fn with_replicas(id: String, replicas: Vec<Replica>) -> Self {
        let n = replicas.len();
        Self {
            id,
            replicas: RwLock::new(replicas.into_iter().map(Arc::new).enumerate().collect()),
            next: AtomicUsize::new(n),
            closed: AtomicBool::new(false),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<usize, Arc<Replica>>> {
        self.replicas.read().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, replica: usize) -> Option<Arc<Replica>> {
        self.read().get(&replica).cloned()
    }

    /// Adds a replica (a worker that joined); returns its number.
    pub fn add(&self, replica: Replica) -> usize {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        let mut map = self.replicas.write().unwrap_or_else(|e| e.into_inner());
        if self.closed.load(Ordering::SeqCst) {
            drop(map);
            replica.shutdown();
        } else {
            map.insert(n, Arc::new(replica));
        }
        n
    }

    /// Removes the replicas `which` picks and shuts them down (their jobs fail as unavailable).
    pub fn remove_where(&self, which: impl Fn(&Replica) -> bool) -> usize {
        let gone: Vec<Arc<Replica>> = {
            let mut map = self.replicas.write().unwrap_or_else(|e| e.into_inner());
            let keys: Vec<usize> = map
                .iter()
                .filter(|(_, r)| which(r))
                .map(|(k, _)| *k)
                .collect();
            keys.iter().filter_map(|k| map.remove(k)).collect()
        };
        for r in &gone {
            r.shutdown();
        }
        gone.len()
    }

    /// Whether any replica runs in a worker process (only those can become unavailable under a
    /// job: a worker that dies or leaves).
    pub fn has_workers(&self) -> bool {
        self.any(|r| matches!(r, Replica::Remote(_)))
    }

    /// Whether `which` matches any replica.
    pub fn any(&self, which: impl Fn(&Replica) -> bool) -> bool {
        self.read().values().any(|r| which(r))
    }

    /// Submits to the replica with the fewest waiting + running jobs; returns its number. Tries
    /// the others when the first is full, so the job is refused only when every replica is
    /// (and when there is none: a remote stage with no live worker).
    pub fn submit(&self, job: JobId, input: StageInput) -> Result<usize, SubmitError> {
        let replicas: Vec<(usize, Arc<Replica>)> =
            self.read().iter().map(|(k, r)| (*k, r.clone())).collect();
        let mut order: Vec<(usize, usize, &Arc<Replica>)> = replicas
            .iter()
            .map(|(k, r)| {
                let s = r.stats();
                (s.waiting + s.running, *k, r)
            })
            .collect();
        order.sort_by_key(|(load, k, _)| (*load, *k));
        let mut last_err = None;
        for (_, k, r) in order {
            match r.submit(job, input.clone()) {
                Ok(()) => return Ok(k),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| SubmitError::Stopped {
            stage: self.id.clone(),
        }))
    }

    pub fn cancel(&self, replica: usize, job: JobId) {
        if let Some(r) = self.get(replica) {
            r.cancel(job);
        }
    }

    /// Streamed input for a job on `replica` (see [`StageHandle::feed`]).
    pub fn feed(&self, replica: usize, job: JobId, more: Vec<Payload>, last: bool) -> bool {
        self.get(replica).is_some_and(|r| r.feed(job, more, last))
    }

    /// Holds a job on `replica` back, or lets it go (see [`StageHandle::hold`]).
    pub fn hold(&self, replica: usize, job: JobId, held: bool) -> bool {
        self.get(replica).is_some_and(|r| r.hold(job, held))
    }

    /// Stats of every replica.
    pub fn stats(&self) -> Vec<StageStats> {
        self.read().values().map(|r| r.stats()).collect()
    }

    /// Where the replicas running in worker processes are (and how often each restarted or
    /// reconnected).
    pub fn workers(&self) -> Vec<(WorkerLocation, u64)> {
        self.read()
            .values()
            .filter_map(|r| match &**r {
                Replica::Local(_) => None,
                Replica::Remote(r) => Some((r.location(), r.restarts())),
            })
            .collect()
    }

    pub fn shutdown(&self) {
        let all: Vec<Arc<Replica>> = {
            let map = self.replicas.write().unwrap_or_else(|e| e.into_inner());
            self.closed.store(true, Ordering::SeqCst);
            map.values().cloned().collect()
        };
        for r in all {
            r.shutdown();
        }
    }
}
