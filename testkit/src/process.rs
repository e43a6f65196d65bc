//! A server child process for tests: spawned with its output in a log file, polled until its
//! port accepts connections (or answers a server-specific probe), and killed when dropped.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;

/// How much of a log [`ServerProcess::log_tail`] returns: enough for a start-up failure,
/// short enough to read in a test report.
const LOG_TAIL_BYTES: u64 = 8 * 1024;

/// How often readiness is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Tells whether the server listening on an address is ready for the tests. It is polled, so
/// one call should give up after a short while of its own.
pub(crate) type ReadyProbe = fn(SocketAddrV4) -> BoxFuture<'static, bool>;

/// One server binary, started (and restarted) with the same command line.
pub(crate) struct ServerProcess {
    /// What the server is, for messages ("nats-server", "SecantusDB").
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
    /// Set on top of the test process's own environment.
    env: Vec<(String, OsString)>,
    ready: ReadyProbe,
    port: u16,
    log_path: PathBuf,
    child: Option<Child>,
}

impl ServerProcess {
    /// Describes a server; nothing runs until [`ServerProcess::start`].
    pub(crate) fn new(name: &'static str, program: PathBuf, args: Vec<String>, port: u16, log_path: PathBuf) -> Self {
        Self { name, program, args, env: Vec::new(), ready: accepts_tcp, port, log_path, child: None }
    }

    /// Environment variables for the server, on top of the test process's own.
    pub(crate) fn with_env(mut self, env: Vec<(String, OsString)>) -> Self {
        self.env = env;
        self
    }

    /// Replaces the readiness check, which by default is that the port accepts a TCP connection;
    /// for servers that listen before they can serve.
    pub(crate) fn with_ready_probe(mut self, probe: ReadyProbe) -> Self {
        self.ready = probe;
        self
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// Spawns the server and waits until it is ready (see [`ServerProcess::with_ready_probe`]).
    /// Panics with the server's log if it exits or is not ready within `timeout`; the caller's
    /// value is then dropped during unwinding, which kills the child.
    pub(crate) async fn start(&mut self, timeout: Duration) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        // The log is appended to, so that after a restart it still shows the earlier runs.
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("cannot open the {} log {}: {e}", self.name, self.log_path.display()));
        let stderr = log
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot share the {} log {}: {e}", self.name, self.log_path.display()));
        let child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} ({}): {e}", self.name, self.program.display()));
        self.child = Some(child);
        self.wait_ready(timeout).await;
    }

    async fn wait_ready(&mut self, timeout: Duration) {
        let address = SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.port);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                panic!("{} exited during start-up ({status}); its log:\n{}", self.name, self.log_tail());
            }
            if (self.ready)(address).await {
                return;
            }
            if Instant::now() >= deadline {
                panic!("{} was not ready on {address} within {timeout:?}; its log:\n{}", self.name, self.log_tail());
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Kills the server (SIGKILL, as a crash would) and waits until it has exited.
    pub(crate) async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // An error here means the child has already exited; the wait below reaps it.
        let _ = child.kill();
        // Polled rather than a blocking wait, so that the runtime's thread stays free.
        loop {
            match child.try_wait() {
                Ok(None) => tokio::time::sleep(Duration::from_millis(10)).await,
                Ok(Some(_)) | Err(_) => return,
            }
        }
    }

    pub(crate) fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The last few kilobytes of the server's combined stdout and stderr.
    pub(crate) fn log_tail(&self) -> String {
        read_tail(&self.log_path).unwrap_or_else(|e| format!("(cannot read {}: {e})", self.log_path.display()))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // Runs during unwinding too, so that a failing test does not leave servers behind.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The default readiness: the port accepts a TCP connection.
fn accepts_tcp(address: SocketAddrV4) -> BoxFuture<'static, bool> {
    Box::pin(async move { tokio::net::TcpStream::connect(address).await.is_ok() })
}

fn read_tail(path: &Path) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let start = len.saturating_sub(LOG_TAIL_BYTES);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    Ok(if start > 0 { format!("…{text}") } else { text })
}

/// The controls every test server offers, delegated to its [`ServerProcess`]; the server type
/// needs the fields `process: ServerProcess` and `work_dir: TempDir`.
macro_rules! server_controls {
    () => {
        /// Kills the server (as a crash would) and waits for it to exit. Its storage is kept.
        pub async fn stop(&mut self) {
            self.process.stop().await;
        }

        /// Stops the server if it runs, then starts it again on the same port with the same
        /// storage (an in-memory one comes back empty), and waits until it accepts connections.
        pub async fn restart(&mut self) {
            self.process.stop().await;
            self.process.start(READY_TIMEOUT).await;
        }

        /// Whether the server process is alive.
        pub fn is_running(&mut self) -> bool {
            self.process.is_running()
        }

        /// The end of the server's output, for failure messages.
        pub fn log_tail(&self) -> String {
            self.process.log_tail()
        }

        /// The directory holding the server's files and log.
        pub fn work_dir(&self) -> &std::path::Path {
            self.work_dir.path()
        }
    };
}
pub(crate) use server_controls;
