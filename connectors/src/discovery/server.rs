//! A throwaway etcd for tests and benchmarks.

use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::DiscoveryError;

/// How long a fresh etcd may take to answer its health check.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How often a fresh port pair is tried when etcd cannot bind (another process took a port).
const START_ATTEMPTS: usize = 3;

/// A throwaway single-member etcd for tests and benchmarks.
///
/// Runs `etcd` from `$OMNISTAGE_ETCD_BIN` or `PATH` (Debian's `etcd-server` package) on two
/// free loopback ports with its data in a temporary directory; its output goes to `etcd.log`
/// there. Dropping it kills etcd and removes the directory.
#[derive(Debug)]
pub struct EtcdServer {
    bin: PathBuf,
    child: Child,
    client_port: u16,
    peer_port: u16,
    /// Another local address clients may use besides loopback (another network namespace's
    /// view of this host).
    also: Option<IpAddr>,
    dir: tempfile::TempDir,
}

impl EtcdServer {
    /// Starts etcd and waits (up to 20 s) until it reports itself healthy.
    pub fn start() -> Result<EtcdServer, DiscoveryError> {
        Self::start_also_on(None)
    }

    /// As [`EtcdServer::start`], also serving clients on `also` (a local address, e.g. the host
    /// end of a veth pair leading to another network namespace), same port.
    pub fn start_also_on(also: Option<IpAddr>) -> Result<EtcdServer, DiscoveryError> {
        let bin = find_etcd()?;
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            match Self::start_once(&bin, also) {
                Ok(server) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| DiscoveryError::Server("etcd did not start".to_string())))
    }

    fn start_once(bin: &Path, also: Option<IpAddr>) -> Result<EtcdServer, DiscoveryError> {
        let dir = tempfile::Builder::new()
            .prefix("omnistage-etcd-")
            .tempdir()
            .map_err(|e| DiscoveryError::Server(format!("could not create a temp dir: {e}")))?;
        let (client_port, peer_port) = free_ports()?;
        let child = spawn(bin, dir.path(), client_port, peer_port, also)?;
        let mut server = EtcdServer {
            bin: bin.to_path_buf(),
            child,
            client_port,
            peer_port,
            also,
            dir,
        };
        server.wait_healthy()?;
        Ok(server)
    }

    /// Kills etcd and starts it again on the same ports and data, as an operator's restart
    /// would: clients see their connections break, keys and leases survive.
    pub fn restart(&mut self) -> Result<(), DiscoveryError> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(
            &self.bin,
            self.dir.path(),
            self.client_port,
            self.peer_port,
            self.also,
        )?;
        self.wait_healthy()
    }

    /// The client URL, e.g. `http://127.0.0.1:41234`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The client URL on the extra address given to [`EtcdServer::start_also_on`].
    pub fn endpoint_on_also(&self) -> Option<String> {
        self.also
            .map(|ip| format!("http://{}", std::net::SocketAddr::new(ip, self.client_port)))
    }

    /// The temporary directory holding the data and `etcd.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn wait_healthy(&mut self) -> Result<(), DiscoveryError> {
        let log_path = self.dir.path().join("etcd.log");
        let log_path = log_path.as_path();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(DiscoveryError::Server(format!(
                    "etcd exited with {status} while starting; log tail:\n{}",
                    log_tail(log_path)
                )));
            }
            if healthy(self.client_port) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(DiscoveryError::Server(format!(
                    "etcd did not become healthy within {} s; log tail:\n{}",
                    START_TIMEOUT.as_secs(),
                    log_tail(log_path)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // `dir` is removed when its field drops.
    }
}

/// Runs etcd on the given ports with its data under `dir`, appending its output to `etcd.log`.
fn spawn(
    bin: &Path,
    dir: &Path,
    client_port: u16,
    peer_port: u16,
    also: Option<IpAddr>,
) -> Result<Child, DiscoveryError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("etcd.log"))
        .map_err(|e| DiscoveryError::Server(format!("could not open etcd.log: {e}")))?;
    let log_err = log
        .try_clone()
        .map_err(|e| DiscoveryError::Server(format!("could not share etcd.log: {e}")))?;
    let client_url = format!("http://127.0.0.1:{client_port}");
    let listen_urls = match also {
        Some(ip) => format!(
            "{client_url},http://{}",
            std::net::SocketAddr::new(ip, client_port)
        ),
        None => client_url.clone(),
    };
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    Command::new(bin)
        .arg("--name")
        .arg("t")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--listen-client-urls")
        .arg(&listen_urls)
        .arg("--advertise-client-urls")
        .arg(&client_url)
        .arg("--listen-peer-urls")
        .arg(&peer_url)
        .arg("--initial-advertise-peer-urls")
        .arg(&peer_url)
        .arg("--initial-cluster")
        .arg(format!("t={peer_url}"))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|e| DiscoveryError::Server(format!("could not run {}: {e}", bin.display())))
}

/// `$OMNISTAGE_ETCD_BIN`, else the first `etcd` on `PATH`.
fn find_etcd() -> Result<PathBuf, DiscoveryError> {
    if let Some(bin) = std::env::var_os("OMNISTAGE_ETCD_BIN") {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(DiscoveryError::EtcdNotFound(format!(
                "OMNISTAGE_ETCD_BIN={} is not a file",
                bin.display()
            )))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcd"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| DiscoveryError::EtcdNotFound("no `etcd` on PATH".to_string()))
}

/// Two loopback ports that were free a moment ago.
fn free_ports() -> Result<(u16, u16), DiscoveryError> {
    let bind = || {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr().map(|a| (l, a.port())))
            .map_err(|e| DiscoveryError::Server(format!("could not find a free port: {e}")))
    };
    // Hold both listeners until both ports are known, so they differ.
    let (_a, client) = bind()?;
    let (_b, peer) = bind()?;
    Ok((client, peer))
}

/// Whether etcd's `/health` says it has a leader and serves requests.
fn healthy(port: u16) -> bool {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let request = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200") && response.contains("\"health\":\"true\"")
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
