//! A worker's side of its gateway connections. A worker serves one gateway over a Unix socket
//! (a child worker) or any number of gateways over TCP (a remote worker; every gateway replica
//! connects to every worker). Gateways number their jobs independently, so each session's job
//! ids are mapped to ids unique within this worker before they reach the stage, and the stage's
//! events are mapped back and sent to the session that submitted the job.

use super::link::{LinkReader, LinkWriter};
use omnistage_connectors::remote::{
    decode_to_worker, encode_from_worker, FromWorker, RefuseReason, ToWorker, WorkerStats,
};
use omnistage_scheduler::{StageHandle, SubmitError};
use omnistage_stages::{JobId, StageEvent};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Stage events waiting for a session's writer thread; the stage thread blocks when it is full
/// (the connection is the back-pressure).
const OUTBOX: usize = 1024;

type SessionId = u64;

#[derive(Default)]
struct Table {
    next_job: u64,
    next_session: SessionId,
    /// This worker's job id → (session, the session's job id).
    jobs: HashMap<JobId, (SessionId, JobId)>,
    /// (session, the session's job id) → this worker's job id.
    by_session: HashMap<(SessionId, JobId), JobId>,
    outboxes: HashMap<SessionId, crossbeam_channel::Sender<FromWorker>>,
}

/// Every session of this worker and the jobs each holds.
#[derive(Default, Clone)]
pub struct Sessions {
    table: Arc<Mutex<Table>>,
}

impl Sessions {
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stage's event sink: sends `event` to the session holding `job` (dropped when that
    /// session has gone).
    pub fn deliver(&self, job: JobId, event: StageEvent) {
        let done = matches!(event, StageEvent::Finished { .. } | StageEvent::Failed(_));
        let target = {
            let mut t = self.lock();
            let Some(&(session, theirs)) = t.jobs.get(&job) else {
                return;
            };
            if done {
                t.jobs.remove(&job);
                t.by_session.remove(&(session, theirs));
            }
            t.outboxes.get(&session).cloned().map(|tx| (tx, theirs))
        };
        if let Some((tx, theirs)) = target {
            // Blocks while the session's outbox is full; fails only once its writer is gone.
            let _ = tx.send(FromWorker::Event { job: theirs, event });
        }
    }

    fn open(&self, tx: crossbeam_channel::Sender<FromWorker>) -> SessionId {
        let mut t = self.lock();
        t.next_session += 1;
        let id = t.next_session;
        t.outboxes.insert(id, tx);
        id
    }

    /// Ends a session: its jobs are dropped from the map (the caller cancels them).
    fn close(&self, session: SessionId) -> Vec<JobId> {
        let mut t = self.lock();
        t.outboxes.remove(&session);
        let ours: Vec<JobId> = t
            .jobs
            .iter()
            .filter(|(_, (s, _))| *s == session)
            .map(|(ours, _)| *ours)
            .collect();
        for j in &ours {
            if let Some((s, theirs)) = t.jobs.remove(j) {
                t.by_session.remove(&(s, theirs));
            }
        }
        ours
    }

    fn admit(&self, session: SessionId, theirs: JobId) -> JobId {
        let mut t = self.lock();
        if let Some(&ours) = t.by_session.get(&(session, theirs)) {
            return ours;
        }
        t.next_job += 1;
        let ours = JobId(t.next_job);
        t.jobs.insert(ours, (session, theirs));
        t.by_session.insert((session, theirs), ours);
        ours
    }

    fn forget(&self, ours: JobId) {
        let mut t = self.lock();
        if let Some((s, theirs)) = t.jobs.remove(&ours) {
            t.by_session.remove(&(s, theirs));
        }
    }

    fn ours(&self, session: SessionId, theirs: JobId) -> Option<JobId> {
        self.lock().by_session.get(&(session, theirs)).copied()
    }

    /// Sessions open now.
    pub fn open_sessions(&self) -> usize {
        self.lock().outboxes.len()
    }
}

/// Serves one gateway connection until it closes or sends `Shutdown` (returns `true` then):
/// announces `Ready`, runs its messages against `handle`, and cancels what it left behind.
pub fn serve(
    sessions: &Sessions,
    handle: &StageHandle,
    ready: FromWorker,
    mut writer: LinkWriter,
    mut reader: LinkReader,
) -> Result<bool, String> {
    let (out_tx, out_rx) = crossbeam_channel::bounded::<FromWorker>(OUTBOX);
    let session = sessions.open(out_tx.clone());
    let writer_thread = std::thread::Builder::new()
        .name("worker-writer".into())
        .spawn(move || {
            for msg in out_rx {
                let sent = encode_from_worker(&msg)
                    .map_err(|e| e.to_string())
                    .and_then(|bytes| writer.send(&bytes));
                if let Err(e) = sent {
                    tracing::warn!("worker: sending to the gateway failed: {e}");
                    writer.shutdown();
                    return;
                }
            }
            writer.shutdown();
        })
        .map_err(|e| e.to_string())?;
    let _ = out_tx.send(ready);
    let result = run(sessions, session, handle, &out_tx, &mut reader);
    for ours in sessions.close(session) {
        handle.cancel(ours);
    }
    drop(out_tx);
    let _ = writer_thread.join();
    result
}

fn run(
    sessions: &Sessions,
    session: SessionId,
    handle: &StageHandle,
    out: &crossbeam_channel::Sender<FromWorker>,
    reader: &mut LinkReader,
) -> Result<bool, String> {
    let send = |msg| {
        out.send(msg)
            .map_err(|_| "the connection to the gateway is closed".to_string())
    };
    loop {
        let Some(msg) = reader.recv_with(None, decode_to_worker)? else {
            return Ok(false);
        };
        let msg = msg.map_err(|e| format!("bad message: {e}"))?;
        match msg {
            ToWorker::Submit { job, input } => {
                let ours = sessions.admit(session, job);
                if let Err(e) = handle.submit(ours, input) {
                    sessions.forget(ours);
                    let reason = match e {
                        SubmitError::QueueFull { capacity, .. } => {
                            RefuseReason::QueueFull { capacity }
                        }
                        SubmitError::Stopped { .. } => RefuseReason::Stopped,
                    };
                    send(FromWorker::Refused { job, reason })?;
                }
            }
            ToWorker::Feed {
                job,
                payloads,
                last,
            } => {
                if let Some(ours) = sessions.ours(session, job) {
                    handle.feed(ours, payloads, last);
                }
            }
            ToWorker::Cancel { job } => {
                if let Some(ours) = sessions.ours(session, job) {
                    sessions.forget(ours);
                    handle.cancel(ours);
                }
            }
            ToWorker::Hold { job, held } => {
                if let Some(ours) = sessions.ours(session, job) {
                    handle.hold(ours, held);
                }
            }
            ToWorker::StatsRequest => {
                let s = handle.stats();
                send(FromWorker::Stats(WorkerStats {
                    waiting: s.waiting,
                    running: s.running,
                    state_bytes: s.state_bytes,
                    engine: s.engine,
                    steps_total: s.steps_total,
                }))?;
            }
            ToWorker::Shutdown => return Ok(true),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_keep_job_ids_apart_and_close_returns_what_was_left() {
        let s = Sessions::default();
        let (tx1, rx1) = crossbeam_channel::bounded(8);
        let (tx2, rx2) = crossbeam_channel::bounded(8);
        let a = s.open(tx1);
        let b = s.open(tx2);
        // Both gateways call their first job 1.
        let a1 = s.admit(a, JobId(1));
        let b1 = s.admit(b, JobId(1));
        assert_ne!(a1, b1);
        assert_eq!(
            s.admit(a, JobId(1)),
            a1,
            "a repeated submit maps to the same job"
        );
        s.deliver(
            b1,
            StageEvent::Failed(omnistage_stages::EngineError::Unavailable("x".into())),
        );
        match rx2.try_recv().unwrap() {
            FromWorker::Event { job, .. } => assert_eq!(job, JobId(1)),
            other => panic!("{other:?}"),
        }
        assert!(rx1.try_recv().is_err());
        // Finished/failed jobs leave the map; later events for them are dropped.
        assert_eq!(s.ours(b, JobId(1)), None);
        assert_eq!(s.close(a), vec![a1]);
        assert_eq!(s.open_sessions(), 1);
        s.deliver(
            a1,
            StageEvent::Failed(omnistage_stages::EngineError::Unavailable("x".into())),
        );
        assert!(rx1.try_recv().is_err());
    }
}
