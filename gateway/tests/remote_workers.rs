//! `remote = true`: the codec stage of the default graph served by `omnistage worker --listen`
//! processes found through etcd (a real etcd, started by the test) over authenticated TCP on
//! loopback — the same answers as in process, load spread over the replicas, a SIGKILLed worker
//! failing only its jobs (503) and dropping out when its lease expires, a restarted one
//! rejoining, and no key left behind after the workers stop.

mod common;

use base64::Engine as _;
use omnistage::runtime::ExecutionMode;
use omnistage_connectors::discovery::{EtcdConfig, EtcdServer, Membership};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DEFAULT_TOML: &str = include_str!("../../deploy/tiny-omni.toml");
const PREFIX: &str = "/omnistage/remote-test";

struct Cluster {
    etcd: EtcdServer,
    dir: tempfile::TempDir,
    deploy: PathBuf,
    toml: String,
}

fn env() -> Vec<(String, String)> {
    vec![
        ("OMNISTAGE_STAGE__CODEC__REMOTE".into(), "true".into()),
        (
            "OMNISTAGE_STAGE__TALKER__SAMPLING__MAX_TOKENS".into(),
            "1120".into(),
        ),
    ]
}

fn cluster() -> Cluster {
    let etcd = EtcdServer::start().expect("etcd starts (Debian package etcd-server)");
    let dir = tempfile::tempdir().expect("temp dir");
    omnistage_engines::tiny::make_tiny(dir.path(), 0).expect("tiny checkpoints");
    let secret = dir.path().join("cluster.secret");
    std::fs::write(&secret, "a-test-secret-of-more-than-16-bytes\n").unwrap();
    let toml = format!(
        "{DEFAULT_TOML}\n[cluster]\netcd = [\"{}\"]\nprefix = \"{PREFIX}\"\nsecret_file = \"{}\"\nlease_ttl_s = 2\n",
        etcd.endpoint(),
        secret.display()
    );
    let deploy = dir.path().join("deploy.toml");
    std::fs::write(&deploy, &toml).unwrap();
    Cluster {
        etcd,
        dir,
        deploy,
        toml,
    }
}

/// Runs blocking set-up (etcd, discovery: synchronous APIs with their own runtimes) on a
/// plain thread, outside the test's async runtime.
fn sync<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| s.spawn(f).join().expect("set-up thread"))
}

fn etcd_config(c: &Cluster) -> EtcdConfig {
    EtcdConfig {
        endpoints: vec![c.etcd.endpoint()],
        prefix: PREFIX.into(),
        lease_ttl: Duration::from_secs(2),
    }
}

fn spawn_worker(c: &Cluster, instance: &str) -> Child {
    spawn_worker_with(c, instance, &[])
}

fn spawn_worker_with(c: &Cluster, instance: &str, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_omnistage"))
        .args(["worker", "--deploy"])
        .arg(&c.deploy)
        .args([
            "--stage",
            "codec",
            "--listen",
            "127.0.0.1:0",
            "--instance",
            instance,
        ])
        .args(extra)
        .envs(env())
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn worker")
}

/// Waits until etcd lists exactly `instances` for the codec.
fn wait_members(m: &Membership, instances: &[&str], within: Duration) {
    let start = Instant::now();
    loop {
        let now: Vec<String> = m.members("codec").into_iter().map(|m| m.instance).collect();
        if now == instances {
            return;
        }
        assert!(
            start.elapsed() < within,
            "codec members {now:?}, want {instances:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn codec_health(server: &common::TestServer) -> Value {
    let (_, text) = server.get_text("/health").await;
    let h: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    h["stages"]["codec"].clone()
}

/// Waits until the gateway has `n` connected codec workers.
async fn wait_connected(server: &common::TestServer, n: usize) -> Value {
    let start = Instant::now();
    loop {
        let h = codec_health(server).await;
        let connected = h["workers"]
            .as_array()
            .map_or(0, |w| w.iter().filter(|w| w["connected"] == true).count());
        let listed = h["workers"].as_array().map_or(0, Vec::len);
        if connected == n && listed == n {
            return h;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "want {n} connected codec workers: {h}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn speech(seed: u64) -> Value {
    json!({
        "messages": [{"role": "user", "content": "Say something nice."}],
        "modalities": ["text", "audio"],
        "audio": {"voice": "default", "format": "wav"},
        "max_tokens": 12,
        "seed": seed,
    })
}

fn audio_bytes(body: &Value) -> Vec<u8> {
    let data = body["choices"][0]["message"]["audio"]["data"]
        .as_str()
        .unwrap_or_else(|| panic!("no audio in {body}"));
    base64::engine::general_purpose::STANDARD
        .decode(data)
        .expect("valid base64")
}

fn kill(child: &mut Child, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    let _ = child.wait();
}

async fn start_gateway(c: &Cluster) -> common::TestServer {
    common::start_with_env(
        &c.toml,
        Duration::from_secs(60),
        ExecutionMode::Pipelined,
        &env(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_workers_join_serve_fail_alone_and_leave_nothing_behind() {
    let c = sync(cluster);
    let watch = sync(|| Membership::watch(&etcd_config(&c)).expect("watch etcd"));
    let mut w1 = spawn_worker(&c, "w1");
    let http = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let mut w2 = spawn_worker_with(&c, "w2", &["--http", &http]);
    sync(|| wait_members(&watch, &["w1", "w2"], Duration::from_secs(60)));

    // The worker's own probes and metrics.
    let probe = reqwest::Client::new();
    let wh: Value = probe
        .get(format!("http://{http}/health"))
        .send()
        .await
        .expect("worker /health")
        .json()
        .await
        .unwrap();
    assert_eq!(wh["status"], "ready", "{wh}");
    assert_eq!(wh["stage"], "codec", "{wh}");
    assert_eq!(wh["instance"], "w2", "{wh}");

    let server = start_gateway(&c).await;
    let h = wait_connected(&server, 2).await;
    assert_eq!(h["state"], "ready", "{h}");
    assert!(
        server.server.worker_pids("codec").is_empty(),
        "no child workers: {h}"
    );

    // Same seeded audio as the all-in-process graph.
    let (status, body) = server.post("/v1/chat/completions", speech(7)).await;
    assert_eq!(status, 200, "{body}");
    let remote_audio = audio_bytes(&body);
    let local = common::start_with_env(
        DEFAULT_TOML,
        Duration::from_secs(60),
        ExecutionMode::Pipelined,
        &env()[1..],
    )
    .await;
    let (status, body) = local.post("/v1/chat/completions", speech(7)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(audio_bytes(&body), remote_audio, "same seed, same audio");
    local.server.abort();

    let metrics = probe
        .get(format!("http://{http}/metrics"))
        .send()
        .await
        .expect("worker /metrics")
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("omnistage_"), "{metrics}");
    let wh: Value = probe
        .get(format!("http://{http}/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(wh["gateways"], 1, "one gateway holds a session: {wh}");

    // Concurrent requests spread over both workers.
    let burst: Vec<_> = (0..4)
        .map(|i| {
            let client = server.client.clone();
            let url = format!("{}/v1/chat/completions", server.base);
            tokio::spawn(async move {
                let resp = client
                    .post(url)
                    .json(&speech(i))
                    .send()
                    .await
                    .expect("sent");
                (
                    resp.status().as_u16(),
                    resp.text().await.unwrap_or_default(),
                )
            })
        })
        .collect();
    // SIGKILL w1 while the burst runs: its jobs fail with 503, the others complete.
    let start = Instant::now();
    loop {
        let h = codec_health(&server).await;
        let load = h["waiting"].as_u64().unwrap_or(0) + h["running"].as_u64().unwrap_or(0);
        if load >= 2 || start.elapsed() > Duration::from_secs(20) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    kill(&mut w1, "-KILL");
    let (mut ok, mut unavailable) = (0, 0);
    for task in burst {
        let (status, text) = task.await.expect("request task");
        match status {
            200 => ok += 1,
            503 => {
                assert!(text.contains("service_unavailable"), "{text}");
                unavailable += 1;
            }
            other => panic!("unexpected {other}: {text}"),
        }
    }
    eprintln!("burst while w1 was killed: {ok} answered, {unavailable} failed with 503");
    assert!(ok >= 1, "the surviving worker served its share");
    // The dead worker's lease expires; the gateway drops it and serves on w2.
    sync(|| wait_members(&watch, &["w2"], Duration::from_secs(20)));
    wait_connected(&server, 1).await;
    let (status, body) = server.post("/v1/chat/completions", speech(3)).await;
    assert_eq!(status, 200, "{body}");

    // A restarted w1 rejoins (a new address) and takes work again.
    let mut w1 = spawn_worker(&c, "w1");
    sync(|| wait_members(&watch, &["w1", "w2"], Duration::from_secs(60)));
    let h = wait_connected(&server, 2).await;
    assert!(
        h["workers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["instance"] == "w1"),
        "{h}"
    );

    // Clean exits revoke the leases: the keys go at once, nothing is left behind.
    server.server.abort();
    kill(&mut w1, "-TERM");
    kill(&mut w2, "-TERM");
    sync(|| wait_members(&watch, &[], Duration::from_secs(2)));
    assert!(watch.all().is_empty());
    sync(move || drop((watch, c)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_stage_without_workers_is_not_ready_and_answers_503() {
    let c = sync(cluster);
    let models = c.dir.path();
    let graph = omnistage_stages::deploy::DeployGraph::from_toml_str(
        &c.toml,
        Path::new("test.toml"),
        models,
        &env(),
    )
    .expect("valid graph");
    let options = omnistage::app::ServeOptions {
        addr: "127.0.0.1:0".parse().unwrap(),
        request_timeout: Duration::from_secs(30),
    };
    let server = omnistage::app::Server::start_with_workers(
        graph,
        options,
        ExecutionMode::Pipelined,
        omnistage::worker::WorkerOptions::default(),
    )
    .await
    .expect("server starts");
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::new();
    // Text still works (the thinker is local); speech has no codec worker.
    let start = Instant::now();
    let h: Value = loop {
        let resp = client.get(format!("{base}/health")).send().await.unwrap();
        let status = resp.status().as_u16();
        let h: Value = resp.json().await.unwrap();
        // Stages load in parallel: wait until the local ones are ready and the remote codec
        // has left `loading` (it then waits for workers that never come).
        let loaded = |id: &str| !matches!(h["stages"][id]["state"].as_str(), Some("loading"));
        if h["stages"]["thinker"]["state"] == "ready" && loaded("codec") {
            assert_eq!(status, 503, "{h}");
            break h;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{h}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(h["stages"]["codec"]["state"], "waiting", "{h}");
    let resp = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&speech(1))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("codec"),
        "{body}"
    );
    server.abort();
    sync(move || drop(c));
}
