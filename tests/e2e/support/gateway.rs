//! [`TestGateway`]: the real `weir` binary, started on a free loopback port with a config
//! written to a temporary directory, and killed when dropped.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tempfile::TempDir;

use super::client::Client;

/// The `weir` binary cargo built for this test run.
pub const WEIR: &str = env!("CARGO_BIN_EXE_weir");

/// How long the gateway gets to answer `/readyz` after it is spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Port collisions (another process took the port between our probe and the bind) are
/// retried this many times.
const START_ATTEMPTS: usize = 4;

/// A running gateway.
pub struct TestGateway {
    child: Child,
    addr: SocketAddr,
    logs: Arc<Mutex<String>>,
    _dir: TempDir,
    /// An HTTP client pointed at this gateway.
    pub client: Client,
}

impl TestGateway {
    /// Starts `weir serve` with this config text and waits until it is ready.
    pub async fn start(config: &str) -> TestGateway {
        TestGateway::start_with_env(config, &[]).await
    }

    /// Like [`TestGateway::start`], with extra environment variables for the process.
    pub async fn start_with_env(config: &str, env: &[(&str, &str)]) -> TestGateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("weir.toml");
        std::fs::write(&config_path, config).expect("write config");
        let mut last_logs = String::new();
        for _ in 0..START_ATTEMPTS {
            let addr = free_addr();
            let logs = Arc::new(Mutex::new(String::new()));
            let mut child = Command::new(WEIR)
                .arg("serve")
                .arg("--config")
                .arg(&config_path)
                .arg("--listen")
                .arg(addr.to_string())
                .env_remove("RUST_LOG")
                .env("NO_COLOR", "1")
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn weir");
            collect(child.stdout.take().expect("stdout"), logs.clone());
            collect(child.stderr.take().expect("stderr"), logs.clone());
            let client = Client::new(format!("http://{addr}"));
            match wait_ready(&mut child, &client).await {
                Ok(()) => {
                    return TestGateway {
                        child,
                        addr,
                        logs,
                        _dir: dir,
                        client,
                    };
                }
                Err(exited) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_logs = logs.lock().unwrap().clone();
                    let port_taken = exited && last_logs.to_lowercase().contains("in use");
                    if !port_taken {
                        panic!("weir did not become ready on {addr}. Its output:\n{last_logs}");
                    }
                }
            }
        }
        panic!(
            "weir could not bind a free port in {START_ATTEMPTS} attempts. Last output:\n{last_logs}"
        );
    }

    /// The address the gateway listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// Whether the gateway process itself still holds a listening socket on its port. Read
    /// from `/proc` (Linux) so that another process taking the port number after the gateway
    /// released it cannot fool the check.
    pub fn is_listening(&self) -> bool {
        let port = format!(":{:04X}", self.addr.port());
        let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
        let inodes: Vec<String> = table
            .lines()
            .skip(1)
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let listening = f.get(1)?.ends_with(&port) && *f.get(3)? == "0A";
                listening.then(|| format!("socket:[{}]", f.get(9).copied().unwrap_or_default()))
            })
            .collect();
        let Ok(fds) = std::fs::read_dir(format!("/proc/{}/fd", self.child.id())) else {
            return false;
        };
        fds.filter_map(Result::ok)
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .any(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
    }

    /// Sends SIGTERM (graceful shutdown).
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits for the process to exit, up to `timeout`; `None` if it is still running.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- weir output ({}) ----\n{}", self.addr, self.logs());
        }
    }
}

/// Appends everything `pipe` produces to `logs`, from a thread.
fn collect(pipe: impl Read + Send + 'static, logs: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        while reader
            .read_until(b'\n', &mut line)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            logs.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&line));
            line.clear();
        }
    });
}

/// Polls `/readyz` until it answers 200. `Err(true)` if the process exited, `Err(false)` on
/// timeout.
async fn wait_ready(child: &mut Child, client: &Client) -> Result<(), bool> {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    while tokio::time::Instant::now() < deadline {
        if child.try_wait().expect("try_wait").is_some() {
            return Err(true);
        }
        if let Ok(Ok(resp)) = tokio::time::timeout(
            Duration::from_secs(2),
            client.http().get(client.url("/readyz")).send(),
        )
        .await
            && resp.status() == 200
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Err(false)
}

/// A loopback address whose port the OS just handed out (and we released).
pub fn free_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind probe");
    listener.local_addr().expect("probe address")
}

/// A loopback port that refuses connections: bound (so nobody else gets it) but not
/// listening. Keep the socket alive for as long as the port must refuse.
pub fn refusing_port() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let addr = socket.local_addr().expect("local addr");
    (socket, addr)
}

/// The result of `weir check`.
pub struct CheckRun {
    /// Exit status and output.
    pub output: Output,
    /// The config file checked.
    pub path: PathBuf,
    _dir: TempDir,
}

impl CheckRun {
    /// stdout and stderr together.
    pub fn text(&self) -> String {
        format!(
            "{}{}",
            String::from_utf8_lossy(&self.output.stdout),
            String::from_utf8_lossy(&self.output.stderr)
        )
    }
}

/// Runs `weir check --config PATH` on this config text (bounded to 30 s).
pub async fn check(config: &str) -> CheckRun {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("weir.toml");
    std::fs::write(&path, config).expect("write config");
    let run = tokio::process::Command::new(WEIR)
        .arg("check")
        .arg("--config")
        .arg(&path)
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("weir check did not finish in 30 s")
        .expect("run weir check");
    CheckRun {
        output,
        path,
        _dir: dir,
    }
}
