//! Starting a stage's worker process, watching it, and restarting it with exponential back-off
//! when its socket closes or it exits.

use super::link::{self, LinkReader, LinkWriter};
use super::listen::link_limits;
use super::remote::{ChildLaunch, Inner, Origin, Running, Stream};
use crate::runtime::StageState;
use omnistage_connectors::remote::{decode_from_worker, encode_to_worker, FromWorker, ToWorker};
use omnistage_connectors::tcp::blocking;
use std::os::unix::net::UnixListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a (re)started worker may take to load its stage and say `Ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a discovered worker may take to accept, authenticate and say `Ready`.
const ENDPOINT_TIMEOUT: Duration = Duration::from_secs(10);
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
pub(super) fn supervise(inner: &Arc<Inner>, first: Option<Running>) {
    let mut current = first;
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

/// Waits until the worker dies (or its connection drops) or shutdown is asked, then tears it
/// down; returns what happened.
fn watch(inner: &Inner, mut running: Running) -> String {
    let why = loop {
        if inner.stopping() {
            if let Some(tx) = inner.conn().tx.clone() {
                let _ = tx.try_send(ToWorker::Shutdown);
            }
            if let Some(child) = running.child.as_mut() {
                let deadline = Instant::now() + EXIT_GRACE;
                while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            break "was shut down".to_string();
        }
        if let Some(child) = running.child.as_mut() {
            match child.try_wait() {
                Ok(Some(status)) => break format!("exited ({status})"),
                Ok(None) => {}
                Err(e) => break format!("cannot be waited for: {e}"),
            }
        }
        if !inner.connected(running.generation) {
            break "closed its connection".to_string();
        }
        inner.sleep_or_stop(Duration::from_millis(50));
    };
    if let Some(child) = running.child.as_mut() {
        // Kill (SIGKILL) if still alive, and reap it: no zombies, no orphans.
        let _ = child.kill();
        let _ = child.wait();
    }
    inner.pid.store(0, Ordering::SeqCst);
    inner.connection_lost(running.generation, &why);
    running.stream.shutdown();
    for t in running.threads {
        let _ = t.join();
    }
    why
}

/// Starts (a child) or reaches (an endpoint) the worker, waits for `Ready` and starts the
/// connection's reader and writer threads.
pub(super) fn start_once(inner: &Arc<Inner>) -> Result<Running, String> {
    match &inner.launch.origin {
        Origin::Child(c) => start_child(inner, c),
        Origin::Endpoint { addr, secret, .. } => {
            let deadline = Instant::now() + ENDPOINT_TIMEOUT;
            let stream = blocking::connect(addr, secret, &link_limits())
                .map_err(|e| format!("connecting to {addr}: {e}"))?;
            let keep = stream.try_clone().map_err(|e| e.to_string())?;
            let (writer, mut reader) = link::tcp(stream).map_err(|e| e.to_string())?;
            await_ready(&mut reader, deadline)?;
            let threads = connect(inner, writer, reader)?;
            Ok(Running {
                child: None,
                stream: Stream::Tcp(keep),
                generation: inner.conn().generation,
                threads,
            })
        }
    }
}

fn start_child(inner: &Arc<Inner>, c: &ChildLaunch) -> Result<Running, String> {
    let l = &inner.launch;
    let socket = c
        .socket_dir
        .join(format!("stage-{}-{}.sock", l.index, l.replica));
    let _ = std::fs::remove_file(&socket);
    let listener =
        UnixListener::bind(&socket).map_err(|e| format!("binding {}: {e}", socket.display()))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(&c.exe);
    cmd.arg("worker")
        .arg("--deploy")
        .arg(&c.deploy_file)
        .arg("--base-dir")
        .arg(&c.base_dir)
        .arg("--stage")
        .arg(&l.stage)
        .arg("--replica")
        .arg(l.replica.to_string())
        .arg("--socket")
        .arg(&socket)
        .stdin(Stdio::null());
    if c.monolithic {
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
    cmd.envs(c.env.iter().map(|(k, v)| (k, v)));
    if let Some(n) = c.threads {
        cmd.env("RAYON_NUM_THREADS", n.to_string());
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("spawning {}: {e}", c.exe.display()))?;
    let fail = |child: &mut Child, e: String| {
        let _ = child.kill();
        let _ = child.wait();
        Err(e)
    };
    let deadline = Instant::now() + READY_TIMEOUT;
    // The worker connects twice: gateway → worker, then worker → gateway.
    let mut streams = Vec::with_capacity(2);
    while streams.len() < 2 {
        match listener.accept() {
            Ok((s, _)) => {
                streams.push(s);
                continue;
            }
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
    }
    drop(listener);
    let _ = std::fs::remove_file(&socket);
    let from_worker = streams.pop().expect("two connections");
    let to_worker = streams.pop().expect("two connections");
    let started = (|| {
        for s in [&to_worker, &from_worker] {
            s.set_nonblocking(false).map_err(|e| e.to_string())?;
        }
        let keep = Stream::Shm(
            to_worker.try_clone().map_err(|e| e.to_string())?,
            from_worker.try_clone().map_err(|e| e.to_string())?,
        );
        let (writer, mut reader) = link::shm_gateway(to_worker, from_worker)?;
        await_ready(&mut reader, deadline)?;
        Ok::<_, String>((keep, connect(inner, writer, reader)?))
    })();
    let (keep, threads) = match started {
        Ok(t) => t,
        Err(e) => return fail(&mut child, e),
    };
    inner.pid.store(child.id(), Ordering::SeqCst);
    Ok(Running {
        child: Some(child),
        stream: keep,
        generation: inner.conn().generation,
        threads,
    })
}

/// Reads the worker's first message, which must be `Ready`, before `deadline`.
fn await_ready(reader: &mut LinkReader, deadline: Instant) -> Result<(), String> {
    let msg = reader
        .recv_with(Some(deadline), decode_from_worker)
        .map_err(|e| format!("waiting for Ready: {e}"))?
        .ok_or("the worker closed its connection before Ready")?;
    match msg.map_err(|e| e.to_string())? {
        FromWorker::Ready { .. } => Ok(()),
        other => Err(format!("expected Ready, got {other:?}")),
    }
}

/// Starts the reader and writer threads of a new connection and publishes it.
fn connect(
    inner: &Arc<Inner>,
    mut writer: LinkWriter,
    mut reader: LinkReader,
) -> Result<Vec<JoinHandle<()>>, String> {
    let (tx, rx) = crossbeam_channel::bounded::<ToWorker>(OUTBOX);
    let generation = {
        let mut conn = inner.conn();
        conn.generation += 1;
        conn.tx = Some(tx);
        conn.generation
    };
    let name = format!("{}-{}", inner.launch.stage, inner.launch.replica);
    let w_inner = inner.clone();
    let writer = std::thread::Builder::new()
        .name(format!("worker-tx-{name}"))
        .spawn(move || {
            for msg in rx {
                let sent = encode_to_worker(&msg)
                    .map_err(|e| e.to_string())
                    .and_then(|b| writer.send(&b));
                if let Err(e) = sent {
                    w_inner.connection_lost(generation, &format!("could not be written to ({e})"));
                    writer.shutdown();
                    return;
                }
            }
        })
        .map_err(|e| e.to_string())?;
    let r_inner = inner.clone();
    let reader = std::thread::Builder::new()
        .name(format!("worker-rx-{name}"))
        .spawn(move || {
            let why = loop {
                match reader.recv_with(None, decode_from_worker) {
                    Ok(Some(Ok(msg))) => r_inner.on_message(msg),
                    Ok(Some(Err(e))) => break format!("sent a bad message ({e})"),
                    Ok(None) => break "closed its connection".to_string(),
                    Err(e) => break format!("connection failed ({e})"),
                }
            };
            r_inner.connection_lost(generation, &why);
        })
        .map_err(|e| e.to_string())?;
    Ok(vec![writer, reader])
}
