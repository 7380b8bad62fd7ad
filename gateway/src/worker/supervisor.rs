//! Starting a stage's worker process, watching it, and restarting it with exponential back-off
//! when its socket closes or it exits.

use super::remote::{Inner, Running};
use super::{read_frame, write_frame};
use crate::runtime::StageState;
use omnistage_connectors::remote::{decode_from_worker, encode_to_worker, FromWorker, ToWorker};
use std::io::BufReader;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a (re)started worker may take to load its stage and say `Ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Restart back-off: doubles from the first to the last.
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A worker that served this long before dying restarts after the shortest back-off again.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);
/// How long a worker gets to exit after `Shutdown` before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(1);
/// Messages waiting for the writer thread. Submits are bounded by the in-flight limit and feeds
/// by each streamed edge's credit, so this is headroom; when full, a message is refused.
const OUTBOX: usize = 4096;

/// Runs the worker until shutdown, restarting it with exponential back-off when it dies.
pub(super) fn supervise(inner: &Arc<Inner>, first: Running) {
    let mut current = Some(first);
    let mut backoff = BACKOFF_FIRST;
    loop {
        let why = match current.take() {
            Some(running) => {
                let started = Instant::now();
                let why = watch(inner, running);
                if started.elapsed() >= HEALTHY_AFTER {
                    backoff = BACKOFF_FIRST;
                }
                why
            }
            None => "could not be started".to_string(),
        };
        let Some(why) = Some(why).filter(|_| !inner.stopping()) else {
            return;
        };
        inner.restarts.fetch_add(1, Ordering::SeqCst);
        tracing::warn!(stage = %inner.launch.stage, replica = inner.launch.replica, "worker {why}; restarting in {backoff:?}");
        (inner.launch.report)(StageState::Restarting(format!("worker {why}")));
        if inner.sleep_or_stop(backoff) {
            return;
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
        match start_once(inner) {
            Ok(running) => {
                tracing::info!(stage = %inner.launch.stage, "worker restarted");
                (inner.launch.report)(StageState::Ready);
                current = Some(running);
            }
            Err(e) => {
                tracing::warn!(stage = %inner.launch.stage, "worker restart failed: {e}");
            }
        }
    }
}

/// Waits until the worker dies or shutdown is asked, then tears it down; returns what happened.
fn watch(inner: &Inner, mut running: Running) -> String {
    let why = loop {
        if inner.stopping() {
            if let Some(tx) = inner.conn().tx.clone() {
                let _ = tx.try_send(ToWorker::Shutdown);
            }
            let deadline = Instant::now() + EXIT_GRACE;
            while Instant::now() < deadline && matches!(running.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(10));
            }
            break "was shut down".to_string();
        }
        match running.child.try_wait() {
            Ok(Some(status)) => break format!("exited ({status})"),
            Ok(None) => {}
            Err(e) => break format!("cannot be waited for: {e}"),
        }
        if !inner.connected(running.generation) {
            break "closed its connection".to_string();
        }
        inner.sleep_or_stop(Duration::from_millis(50));
    };
    // Kill (SIGKILL) if still alive, and reap it: no zombies, no orphans.
    let _ = running.child.kill();
    let _ = running.child.wait();
    inner.pid.store(0, Ordering::SeqCst);
    inner.connection_lost(running.generation, &why);
    let _ = running.stream.shutdown(std::net::Shutdown::Both);
    for t in running.threads {
        let _ = t.join();
    }
    why
}

/// Spawns the worker, accepts its connection, waits for `Ready` and starts the connection's
/// reader and writer threads.
pub(super) fn start_once(inner: &Arc<Inner>) -> Result<Running, String> {
    let l = &inner.launch;
    let socket = l
        .socket_dir
        .join(format!("stage-{}-{}.sock", l.index, l.replica));
    let _ = std::fs::remove_file(&socket);
    let listener =
        UnixListener::bind(&socket).map_err(|e| format!("binding {}: {e}", socket.display()))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(&l.exe);
    cmd.arg("worker")
        .arg("--deploy")
        .arg(&l.deploy_file)
        .arg("--base-dir")
        .arg(&l.base_dir)
        .arg("--stage")
        .arg(&l.stage)
        .arg("--replica")
        .arg(l.replica.to_string())
        .arg("--socket")
        .arg(&socket)
        .stdin(Stdio::null());
    if l.monolithic {
        cmd.arg("--monolithic");
    }
    // The worker applies exactly the overrides the gateway applied.
    for (k, _) in std::env::vars_os() {
        if k.to_str()
            .is_some_and(|k| k.to_ascii_uppercase().starts_with("OMNISTAGE_"))
        {
            cmd.env_remove(k);
        }
    }
    cmd.envs(l.env.iter().map(|(k, v)| (k, v)));
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("spawning {}: {e}", l.exe.display()))?;
    let fail = |child: &mut Child, e: String| {
        let _ = child.kill();
        let _ = child.wait();
        Err(e)
    };
    let deadline = Instant::now() + READY_TIMEOUT;
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return fail(&mut child, format!("accepting the worker: {e}")),
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the worker exited before connecting ({status})"));
        }
        if Instant::now() >= deadline {
            return fail(
                &mut child,
                format!("no worker connected within {READY_TIMEOUT:?}"),
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    drop(listener);
    let _ = std::fs::remove_file(&socket);
    let ready = (|| -> Result<(), String> {
        stream.set_nonblocking(false).map_err(|e| e.to_string())?;
        let left = deadline.saturating_duration_since(Instant::now());
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .map_err(|e| e.to_string())?;
        let frame = read_frame(&mut &stream)
            .map_err(|e| format!("waiting for Ready: {e}"))?
            .ok_or("the worker closed its connection before Ready")?;
        match decode_from_worker(&frame).map_err(|e| e.to_string())? {
            FromWorker::Ready { .. } => {}
            other => return Err(format!("expected Ready, got {other:?}")),
        }
        stream.set_read_timeout(None).map_err(|e| e.to_string())
    })();
    if let Err(e) = ready {
        return fail(&mut child, e);
    }
    let threads = match connect(inner, &stream) {
        Ok(t) => t,
        Err(e) => return fail(&mut child, e),
    };
    inner.pid.store(child.id(), Ordering::SeqCst);
    let generation = inner.conn().generation;
    Ok(Running {
        child,
        stream,
        generation,
        threads,
    })
}

/// Starts the reader and writer threads of a new connection and publishes it.
fn connect(inner: &Arc<Inner>, stream: &UnixStream) -> Result<Vec<JoinHandle<()>>, String> {
    let (tx, rx) = crossbeam_channel::bounded::<ToWorker>(OUTBOX);
    let generation = {
        let mut conn = inner.conn();
        conn.generation += 1;
        conn.tx = Some(tx);
        conn.generation
    };
    let name = format!("{}-{}", inner.launch.stage, inner.launch.replica);
    let mut write_half = stream.try_clone().map_err(|e| e.to_string())?;
    let w_inner = inner.clone();
    let writer = std::thread::Builder::new()
        .name(format!("worker-tx-{name}"))
        .spawn(move || {
            for msg in rx {
                let sent = encode_to_worker(&msg)
                    .map_err(|e| e.to_string())
                    .and_then(|b| write_frame(&mut write_half, &b).map_err(|e| e.to_string()));
                if let Err(e) = sent {
                    w_inner.connection_lost(generation, &format!("could not be written to ({e})"));
                    let _ = write_half.shutdown(std::net::Shutdown::Both);
                    return;
                }
            }
        })
        .map_err(|e| e.to_string())?;
    let read_half = stream.try_clone().map_err(|e| e.to_string())?;
    let r_inner = inner.clone();
    let reader = std::thread::Builder::new()
        .name(format!("worker-rx-{name}"))
        .spawn(move || {
            let mut r = BufReader::new(read_half);
            let why = loop {
                match read_frame(&mut r) {
                    Ok(Some(frame)) => match decode_from_worker(&frame) {
                        Ok(msg) => r_inner.on_message(msg),
                        Err(e) => break format!("sent a bad message ({e})"),
                    },
                    Ok(None) => break "closed its connection".to_string(),
                    Err(e) => break format!("connection failed ({e})"),
                }
            };
            r_inner.connection_lost(generation, &why);
        })
        .map_err(|e| e.to_string())?;
    Ok(vec![writer, reader])
}
