//! Stages on another "host": the talker and codec of the default graph run as
//! `omnistage worker --listen` processes inside a network namespace of their own, joined to this
//! one by a veth pair (made with `ip netns` + `ip link`), registered in an etcd on this side; the
//! gateway here finds them through etcd and streams to them over authenticated TCP. Where
//! namespaces cannot be made (no privilege), the same test runs with the workers on loopback and
//! says so. Also: a peer without the cluster secret cannot open a link to a worker.

mod common;

use omnistage::runtime::ExecutionMode;
use omnistage_connectors::discovery::{EtcdConfig, EtcdServer, Membership};
use omnistage_connectors::tcp::{blocking, Limits, Secret};
use serde_json::{json, Value};
use std::net::IpAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DEFAULT_TOML: &str = include_str!("../../deploy/tiny-omni.toml");
const SECRET: &str = "netns-test-secret-0123456789";

/// A network namespace with a veth pair to this one; removed (with its end of the pair) on drop.
struct Host {
    ns: String,
    here: IpAddr,
    there: IpAddr,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Host {
    fn make() -> Result<Host, String> {
        let pid = std::process::id();
        let ns = format!("omni-{pid}");
        let (h, w) = (format!("vh{pid}"), format!("vw{pid}"));
        let net = format!("10.{}.{}", 100 + (pid >> 8) % 100, pid % 250);
        ip(&["netns", "add", &ns])?;
        let host = Host {
            ns: ns.clone(),
            here: format!("{net}.1").parse().unwrap(),
            there: format!("{net}.2").parse().unwrap(),
        };
        ip(&["link", "add", &h, "type", "veth", "peer", "name", &w])?;
        ip(&["link", "set", &w, "netns", &ns])?;
        ip(&["addr", "add", &format!("{net}.1/24"), "dev", &h])?;
        ip(&["link", "set", &h, "up"])?;
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns, "ip"];
            all.extend_from_slice(args);
            ip(&all)
        };
        inside(&["addr", "add", &format!("{net}.2/24"), "dev", &w])?;
        inside(&["link", "set", &w, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        Ok(host)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair with it.
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

fn env() -> Vec<(String, String)> {
    vec![
        ("OMNISTAGE_STAGE__TALKER__REMOTE".into(), "true".into()),
        ("OMNISTAGE_STAGE__CODEC__REMOTE".into(), "true".into()),
    ]
}

fn sync<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| s.spawn(f).join().expect("set-up thread"))
}

struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stages_on_another_network_namespace_serve_through_etcd_and_tcp() {
    let host = match Host::make() {
        Ok(h) => Some(h),
        Err(e) => {
            eprintln!("network namespaces unavailable ({e}); the workers run on loopback");
            None
        }
    };
    let (etcd_ip, worker_ip) = match &host {
        Some(h) => (Some(h.here), h.there.to_string()),
        None => (None, "127.0.0.1".to_string()),
    };
    let etcd = sync(|| EtcdServer::start_also_on(etcd_ip).expect("etcd starts"));
    let etcd_url = etcd.endpoint_on_also().unwrap_or_else(|| etcd.endpoint());
    let dir = tempfile::tempdir().unwrap();
    omnistage_engines::tiny::make_tiny(dir.path(), 0).unwrap();
    let secret_file = dir.path().join("cluster.secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let toml = format!(
        "{DEFAULT_TOML}\n[cluster]\netcd = [\"{etcd_url}\"]\nprefix = \"/omnistage/netns\"\nsecret_file = \"{}\"\nlease_ttl_s = 2\n",
        secret_file.display()
    );
    let deploy = dir.path().join("deploy.toml");
    std::fs::write(&deploy, &toml).unwrap();

    let mut workers = Workers(Vec::new());
    for stage in ["talker", "codec"] {
        let mut cmd = match &host {
            Some(h) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &h.ns, env!("CARGO_BIN_EXE_omnistage")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_omnistage")),
        };
        cmd.args(["worker", "--deploy"])
            .arg(&deploy)
            .args(["--stage", stage, "--instance", &format!("{stage}-far")])
            .args(["--listen", &format!("{worker_ip}:0")])
            .envs(env())
            .stdin(Stdio::null());
        workers.0.push(cmd.spawn().expect("spawn worker"));
    }
    let cfg = EtcdConfig {
        endpoints: vec![etcd_url.clone()],
        prefix: "/omnistage/netns".into(),
        lease_ttl: Duration::from_secs(2),
    };
    let watch = sync(|| Membership::watch(&cfg).expect("watch"));
    let endpoints: Vec<String> = sync(|| {
        let start = Instant::now();
        loop {
            let all = watch.all();
            if all.len() == 2 {
                return all.into_iter().map(|m| m.endpoint).collect();
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "workers: {all:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    for e in &endpoints {
        assert!(e.starts_with(&worker_ip), "{e} is not on the other host");
    }

    // Nobody without the secret gets a link.
    let limits = Limits {
        max_frame: omnistage::worker::MAX_FRAME,
        ..Limits::default()
    };
    let intruder = sync(|| {
        blocking::connect(
            &endpoints[0],
            &Secret::new("a-wrong-secret-0123456789"),
            &limits,
        )
    });
    assert!(intruder.is_err(), "a wrong secret must be refused");

    let server = common::start_with_env(
        &toml,
        Duration::from_secs(60),
        ExecutionMode::Pipelined,
        &env(),
    )
    .await;
    let (_, text) = server.get_text("/health").await;
    let h: Value = serde_json::from_str(&text).unwrap();
    for stage in ["talker", "codec"] {
        let w = &h["stages"][stage]["workers"][0];
        assert_eq!(w["connected"], true, "{h}");
        assert!(
            w["endpoint"].as_str().unwrap().starts_with(&worker_ip),
            "{h}"
        );
    }
    // Speech crosses to the other host twice (thinker → talker → codec) and comes back.
    let (status, body) = server
        .post(
            "/v1/chat/completions",
            json!({
                "messages": [{"role": "user", "content": "Say something nice."}],
                "modalities": ["text", "audio"],
                "audio": {"voice": "default", "format": "wav"},
                "max_tokens": 12,
                "seed": 5,
            }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["choices"][0]["message"]["audio"]["data"]
        .as_str()
        .is_some_and(|a| a.len() > 100));
    let streamed = server
        .stream(
            "/v1/chat/completions",
            json!({
                "messages": [{"role": "user", "content": "Hello"}],
                "modalities": ["text", "audio"],
                "audio": {"voice": "default", "format": "pcm16"},
                "max_tokens": 8,
                "stream": true,
            }),
        )
        .await;
    assert!(
        streamed.iter().any(|e| e.contains("\"audio\"")),
        "{streamed:?}"
    );
    server.server.abort();
    drop(workers);
    sync(move || {
        let start = Instant::now();
        while !watch.all().is_empty() {
            assert!(start.elapsed() < Duration::from_secs(5), "keys left behind");
            std::thread::sleep(Duration::from_millis(20));
        }
        drop((watch, etcd, host));
    });
}
