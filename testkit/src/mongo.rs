//! A MongoDB-wire-protocol server for tests: SecantusDB (`secantusd-py`), one per test, on a
//! free port, in memory or on a directory that survives restarts.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use tempfile::TempDir;

use crate::process::ServerProcess;

/// SecantusDB takes about a second and a half to start on an idle machine; tests run in
/// parallel, so allow for a busy one.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

const PROGRAM: &str = "secantusd-py";

const NOT_FOUND: &str = "secantusd-py (SecantusDB) not found: run `scripts/test.sh` (it installs it \
                         with `pip install SecantusDB==0.7.0b3`) or set CHATFLEET_MONGO_SERVER";

/// The `secantusd-py` executable the tests run: `$CHATFLEET_MONGO_SERVER` if set, else the
/// first `secantusd-py` on `PATH` or among the pyenv shims. Panics if there is none.
pub fn mongo_server_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(find_mongo_server).clone()
}

fn find_mongo_server() -> PathBuf {
    if let Some(path) = std::env::var_os("CHATFLEET_MONGO_SERVER") {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "CHATFLEET_MONGO_SERVER is set to {}, which is not a file", path.display());
        return path;
    }
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    // pip installs under pyenv are reachable through its shims even when the test runner's
    // PATH does not include them.
    if let Some(root) = std::env::var_os("PYENV_ROOT") {
        dirs.push(PathBuf::from(root).join("shims"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".pyenv").join("shims"));
    }
    dirs.push(PathBuf::from("/root/.pyenv/shims"));
    dirs.into_iter()
        .map(|dir| dir.join(PROGRAM))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("{NOT_FOUND}"))
}

/// Where a [`MongoServer`] keeps its data.
enum Storage {
    /// SecantusDB's own throw-away directory, lost when the process ends.
    Memory,
    /// A directory the caller owns; it is neither created empty nor removed here.
    Dir(PathBuf),
}

/// A running SecantusDB server, killed on drop.
pub struct MongoServer {
    // Declared before the directory so that the server is killed before its files are removed.
    process: ServerProcess,
    storage: Storage,
    work_dir: TempDir,
}

impl MongoServer {
    /// Starts an in-memory server on a free port and waits until it accepts connections.
    /// Its data does not survive [`MongoServer::restart`].
    pub async fn start() -> MongoServer {
        Self::start_in(Storage::Memory).await
    }

    /// Starts a server whose data lives in `path` (created if missing, reopened if it holds
    /// data), so that it survives [`MongoServer::restart`] and can be reused by a new server.
    /// Every acknowledged write is synced to disk, so it also survives [`MongoServer::stop`].
    pub async fn start_with_storage(path: impl AsRef<Path>) -> MongoServer {
        Self::start_in(Storage::Dir(path.as_ref().to_path_buf())).await
    }

    /// Starts an in-memory server that accepts only TLS, with the server certificate `server` of
    /// `pki`, and requires clients to present a certificate signed by `pki`'s CA. Connect with
    /// [`MongoServer::tls_url_for_db`].
    pub async fn start_with_tls(pki: &crate::TestPki, server: &str) -> MongoServer {
        let path = |p: std::path::PathBuf| p.to_string_lossy().into_owned();
        let tls = vec![
            "--tls-cert-file".to_owned(),
            path(pki.cert(server)),
            "--tls-key-file".to_owned(),
            path(pki.key_of(server)),
            "--tls-ca-file".to_owned(),
            path(pki.cert("ca")),
            "--tls-require-client-cert".to_owned(),
        ];
        Self::start_with_args(Storage::Memory, tls).await
    }

    /// A connection string with MongoDB's TLS options: trusting `ca` and presenting
    /// `certificate_key_file` (the client certificate and its key in one PEM file).
    pub fn tls_url_for_db(&self, db: &str, ca: &Path, certificate_key_file: &Path) -> String {
        format!(
            "{}&tls=true&tlsCAFile={}&tlsCertificateKeyFile={}",
            self.url_for_db(db),
            ca.display(),
            certificate_key_file.display()
        )
    }

    async fn start_in(storage: Storage) -> MongoServer {
        Self::start_with_args(storage, Vec::new()).await
    }

    async fn start_with_args(storage: Storage, extra_args: Vec<String>) -> MongoServer {
        let work_dir = tempfile::Builder::new()
            .prefix("chatfleet-mongo-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a directory for SecantusDB: {e}"));
        // An explicit, empty configuration file: without one, SecantusDB reads whichever
        // secantusd.toml it finds in the working directory or the home directory.
        let config = work_dir.path().join("secantusd.toml");
        std::fs::write(&config, "").unwrap_or_else(|e| panic!("cannot write {}: {e}", config.display()));
        let port = crate::free_port();
        let storage_arg = match &storage {
            Storage::Memory => ":memory:".to_owned(),
            Storage::Dir(dir) => dir.to_string_lossy().into_owned(),
        };
        let mut args = vec![
            "--config".to_owned(),
            config.to_string_lossy().into_owned(),
            "--host".to_owned(),
            "127.0.0.1".to_owned(),
            "--port".to_owned(),
            port.to_string(),
            "--storage-path".to_owned(),
            storage_arg,
        ];
        if matches!(storage, Storage::Dir(_)) {
            // By default SecantusDB flushes its log about once a second, so a killed server
            // forgets writes it had acknowledged just before. A mongod loses at most its
            // 100 ms journal interval; syncing every commit makes the test server at least as
            // safe, so that a crash test finds the store's faults and not the server's.
            args.push("--sync-on-commit".to_owned());
        }
        args.extend(extra_args);
        let process =
            ServerProcess::new("SecantusDB", mongo_server_binary(), args, port, work_dir.path().join("secantusd.log"));
        let mut server = MongoServer { process, storage, work_dir };
        server.process.start(READY_TIMEOUT).await;
        server
    }

    /// A connection string for the server, with the options SecantusDB needs
    /// (`directConnection=true&retryWrites=false`).
    pub fn url(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true&retryWrites=false", self.port())
    }

    /// Like [`MongoServer::url`], naming `db` as the database.
    pub fn url_for_db(&self, db: &str) -> String {
        format!("mongodb://127.0.0.1:{}/{db}?directConnection=true&retryWrites=false", self.port())
    }

    pub fn port(&self) -> u16 {
        self.process.port()
    }

    /// The data directory given to [`MongoServer::start_with_storage`], if any.
    pub fn storage_path(&self) -> Option<&Path> {
        match &self.storage {
            Storage::Memory => None,
            Storage::Dir(dir) => Some(dir),
        }
    }

    crate::process::server_controls!();
}
