//! RabbitMQ for tests, in two forms. [`RabbitMqServer`] is a private node, one per test, for the
//! tests that kill and restart the broker; it takes a few seconds to boot. [`RabbitVhost`] is an
//! isolated virtual host on the machine's shared broker (which `scripts/test.sh` starts), for all
//! other tests: creating one takes a fraction of a second.

use std::collections::hash_map::RandomState;
use std::ffi::OsString;
use std::hash::BuildHasher;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use reqwest::{Method, StatusCode, Url};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::process::ServerProcess;

/// A node boots in about four seconds on an idle machine (Erlang, Mnesia, the quorum-queue log),
/// and tests run in parallel on two cores, so allow for a very busy one.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long one readiness probe, or one connection to the shared broker, may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the management API may take to answer; deleting a vhost closes its connections and
/// queues first.
const API_TIMEOUT: Duration = Duration::from_secs(30);

/// Where Debian puts `rabbitmq-server`, which a user's `PATH` often lacks.
const SYSTEM_SBIN: &str = "/usr/sbin";

const NOT_FOUND: &str = "rabbitmq-server is neither on PATH nor in /usr/sbin: run `scripts/test.sh` (it \
                         installs it with `apt-get install rabbitmq-server`) or set CHATFLEET_RABBITMQ_SERVER";

/// The first bytes a client sends on an AMQP 0-9-1 connection.
const AMQP_PROTOCOL_HEADER: &[u8] = b"AMQP\x00\x00\x09\x01";

const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672";
const DEFAULT_API_URL: &str = "http://127.0.0.1:15672";

const HOW_TO_START: &str = "run `scripts/test.sh`, which installs RabbitMQ, starts the shared broker and \
                            enables its management plugin";

/// The script that starts a RabbitMQ node in the foreground: `$CHATFLEET_RABBITMQ_SERVER` if set,
/// else the `rabbitmq-server` found on `PATH` or in `/usr/sbin`, as `scripts/test.sh` finds it,
/// with its links followed to RabbitMQ's own script. Panics if there is none.
///
/// The script must end by `exec`ing the Erlang VM (as the one in RabbitMQ's own `sbin/` does
/// when `RABBITMQ_ALLOW_INPUT` is set), so that the child process is the broker itself. A
/// wrapper that switches user would leave the broker running when the test kills it: Debian's
/// `/usr/sbin/rabbitmq-server` is a link to such a wrapper, which sits beside a link to the real
/// script of the same name, and that is the one taken.
pub fn rabbitmq_server_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(find_rabbitmq_server).clone()
}

fn find_rabbitmq_server() -> PathBuf {
    if let Some(path) = std::env::var_os("CHATFLEET_RABBITMQ_SERVER") {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "CHATFLEET_RABBITMQ_SERVER is set to {}, which is not a file", path.display());
        return path;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain([PathBuf::from(SYSTEM_SBIN)])
        .map(|dir| dir.join("rabbitmq-server"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("{NOT_FOUND}"));
    let canonical = |path: &Path| {
        path.canonicalize().unwrap_or_else(|e| panic!("cannot resolve {} ({e}): {NOT_FOUND}", path.display()))
    };
    // The file the command is (a wrapper, on Debian), then the `rabbitmq-server` beside it: the
    // file itself if it is RabbitMQ's script, else the real script's link next to the wrapper.
    let command = canonical(&found);
    canonical(&command.with_file_name("rabbitmq-server"))
}

/// A private RabbitMQ node, killed on drop, with its data in a temporary directory that survives
/// [`RabbitMqServer::restart`]: durable queues and their persistent messages come back.
///
/// The node shares nothing with the machine's broker but the Erlang port mapper (epmd, which the
/// first Erlang node on the machine starts): it has its own node name, AMQP and distribution
/// ports, configuration, plugins (none) and data. Its log goes to `rabbitmq.log` in
/// [`RabbitMqServer::work_dir`], which is also its `HOME`, so that `HOME=<work_dir> <dir>/rabbitmqctl
/// -n <node_name> ...`, with the `rabbitmqctl` beside [`rabbitmq_server_binary`], reaches it with
/// its Erlang cookie (not Debian's `/usr/sbin/rabbitmqctl`, which, run as root, switches to the
/// `rabbitmq` user's home).
///
/// A crash test must let a new quorum queue settle before [`RabbitMqServer::stop`]: RabbitMQ
/// 3.10 (Ra 2.2) writes the queue's entry in its on-disk directory of Ra servers only after the
/// directory has been idle for 500 ms, and a node killed before that comes back with the queue
/// declared but empty and without a leader (every operation on it times out), even though its
/// messages had been confirmed. A second between declaring the queues and the crash is enough;
/// messages published later are safe once confirmed.
pub struct RabbitMqServer {
    // Declared before the directory so that the node is killed before its data is removed.
    process: ServerProcess,
    node_name: String,
    work_dir: TempDir,
    /// The TLS listener's port, for nodes started by [`RabbitMqServer::start_with_tls`].
    tls_port: Option<u16>,
}

impl RabbitMqServer {
    /// Starts a node on a free port and waits until it answers the AMQP handshake (a node opens
    /// its port only at the end of booting, but the handshake is what the tests need). Panics,
    /// with the node's log, if it cannot be started.
    pub async fn start() -> RabbitMqServer {
        Self::start_node(None, None).await
    }

    /// Starts a node that also listens for `amqps://` with the server certificate `server` of
    /// `pki`, and requires clients to present a certificate signed by `pki`'s CA.
    pub async fn start_with_tls(pki: &crate::TestPki, server: &str) -> RabbitMqServer {
        Self::start_node(None, Some((pki, server))).await
    }

    /// The TLS URL as the `guest` user, `amqps://guest:guest@127.0.0.1:<tls port>/%2f`.
    pub fn tls_url(&self) -> String {
        let port = self.tls_port.expect("the node was started with start_with_tls");
        format!("amqps://guest:guest@127.0.0.1:{port}/%2f")
    }

    /// Starts a node whose Erlang cookie is `cookie`, if given: nodes that share a cookie may
    /// form a cluster.
    async fn start_node(cookie: Option<&str>, tls: Option<(&crate::TestPki, &str)>) -> RabbitMqServer {
        let work_dir = tempfile::Builder::new()
            .prefix("chatfleet-rabbitmq-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a directory for rabbitmq-server: {e}"));
        let dir = work_dir.path();
        let port = crate::free_port();
        // The distribution port defaults to the AMQP port + 20000, which may be taken or above
        // 65535; the shared broker's is 25672.
        let dist_port = loop {
            let candidate = crate::free_port();
            if candidate != port {
                break candidate;
            }
        };
        // Unique on the machine, since the AMQP port is; epmd refuses a second node of that name.
        let node_name = format!("chatfleet-{port}@localhost");

        // Explicit files for everything the node would otherwise read from /etc/rabbitmq, where
        // the shared broker's settings (its node name, and its listener on port 5672) live.
        let config = dir.join("rabbitmq.conf");
        let mut config_text = format!("listeners.tcp.local = 127.0.0.1:{port}\n");
        let tls_port = tls.map(|(pki, server)| {
            let tls_port = crate::free_port();
            config_text.push_str(&format!(
                "listeners.ssl.default = 127.0.0.1:{tls_port}\n\
                 ssl_options.cacertfile = {}\n\
                 ssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n\
                 ssl_options.verify = verify_peer\n\
                 ssl_options.fail_if_no_peer_cert = true\n",
                pki.cert("ca").display(),
                pki.cert(server).display(),
                pki.key_of(server).display(),
            ));
            tls_port
        });
        write_file(&config, &config_text);
        let env_file = dir.join("rabbitmq-env.conf");
        write_file(&env_file, "");
        let plugins = dir.join("enabled_plugins");
        write_file(&plugins, "[].\n");
        if let Some(cookie) = cookie {
            write_cookie(dir, cookie);
        }

        let path = |name: &str| dir.join(name).into_os_string();
        let env: Vec<(String, OsString)> = vec![
            // Where Erlang keeps the node's cookie (creating it on the first start), rather than
            // the test user's home.
            ("HOME".into(), dir.as_os_str().to_owned()),
            // Makes the script `exec` the VM instead of running it as a child of a shell that
            // would survive a kill; `-noinput` (below) still keeps the Erlang shell off.
            ("RABBITMQ_ALLOW_INPUT".into(), "true".into()),
            ("RABBITMQ_CONF_ENV_FILE".into(), env_file.into_os_string()),
            ("RABBITMQ_CONFIG_FILE".into(), config.into_os_string()),
            ("RABBITMQ_ADVANCED_CONFIG_FILE".into(), path("advanced.config")),
            ("RABBITMQ_ENABLED_PLUGINS_FILE".into(), plugins.into_os_string()),
            ("RABBITMQ_MNESIA_BASE".into(), path("mnesia")),
            ("RABBITMQ_LOG_BASE".into(), path("log")),
            ("RABBITMQ_LOGS".into(), "-".into()),
            ("RABBITMQ_NODENAME".into(), node_name.clone().into()),
            ("RABBITMQ_DIST_PORT".into(), dist_port.to_string().into()),
            ("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS".into(), "-kernel inet_dist_use_interface {127,0,0,1}".into()),
            // Only used if this node is the first on the machine and so starts epmd.
            ("ERL_EPMD_ADDRESS".into(), "127.0.0.1".into()),
            // A node that fails to boot writes a crash dump, by default into the working directory.
            ("ERL_CRASH_DUMP".into(), path("erl_crash.dump")),
        ];
        let process = ServerProcess::new(
            "rabbitmq-server",
            rabbitmq_server_binary(),
            vec!["-noinput".to_owned()],
            port,
            dir.join("rabbitmq.log"),
        )
        .with_env(env)
        .with_ready_probe(answers_amqp);
        let mut server = RabbitMqServer { process, node_name, work_dir, tls_port };
        server.process.start(READY_TIMEOUT).await;
        server
    }

    /// The client URL for the default vhost as the `guest` user, which RabbitMQ lets in from
    /// localhost only: `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port())
    }

    pub fn port(&self) -> u16 {
        self.process.port()
    }

    /// The Erlang node name, `chatfleet-<port>@localhost`, for `rabbitmqctl -n`.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    crate::process::server_controls!();
}

/// Three private RabbitMQ nodes joined into one cluster, each with its own node name, ports and
/// data; a single node can be killed and restarted (it rejoins by itself). Killed on drop.
pub struct RabbitMqCluster {
    nodes: Vec<RabbitMqServer>,
}

impl RabbitMqCluster {
    /// Boots three nodes sharing a cookie and joins the second and third to the first.
    pub async fn start() -> RabbitMqCluster {
        let cookie = format!("CHATFLEETTEST{}", crate::free_port());
        let (a, b, c) = futures::join!(
            RabbitMqServer::start_node(Some(&cookie), None),
            RabbitMqServer::start_node(Some(&cookie), None),
            RabbitMqServer::start_node(Some(&cookie), None)
        );
        let cluster = RabbitMqCluster { nodes: vec![a, b, c] };
        let seed = cluster.nodes[0].node_name.clone();
        for node in &cluster.nodes[1..] {
            rabbitmqctl(node, &["stop_app"]).await;
            rabbitmqctl(node, &["join_cluster", &seed]).await;
            rabbitmqctl(node, &["start_app"]).await;
            wait_amqp(node).await;
        }
        cluster
    }

    /// Every node's client URL for the default vhost, comma-separated, as chatfleet's `--bus`
    /// takes it.
    pub fn url(&self) -> String {
        self.nodes.iter().map(RabbitMqServer::url).collect::<Vec<_>>().join(",")
    }

    pub fn nodes(&self) -> &[RabbitMqServer] {
        &self.nodes
    }

    /// Kills one node, as a crash would; its data is kept.
    pub async fn stop_node(&mut self, index: usize) {
        self.nodes[index].stop().await;
    }

    /// The nodes holding a copy of a quorum queue, as the first running node reports them.
    pub async fn queue_members(&mut self, queue: &str) -> Vec<String> {
        let node = self.nodes.iter_mut().position(|n| n.is_running()).expect("a running node");
        let listed =
            rabbitmqctl(&self.nodes[node], &["list_queues", "-q", "--formatter", "json", "name", "members"]).await;
        let queues: serde_json::Value = serde_json::from_str(&listed)
            .unwrap_or_else(|e| panic!("rabbitmqctl list_queues printed no JSON ({e}): {listed}"));
        let entry = queues.as_array().into_iter().flatten().find(|q| q["name"] == queue);
        let members = entry.and_then(|q| q["members"].as_array()).cloned().unwrap_or_default();
        members.iter().filter_map(|m| m.as_str().map(str::to_owned)).collect()
    }

    /// Each queue's ready and unacknowledged messages and its consumers, then each consumer as
    /// its channel registered it, as the first running node reports them (`rabbitmqctl
    /// list_queues`, `list_consumers`), for a failing test to print; what went wrong instead if
    /// the node does not answer.
    pub async fn queue_counts(&mut self) -> String {
        let Some(node) = self.nodes.iter_mut().position(|n| n.is_running()) else { return "no node runs".into() };
        let queues = ["list_queues", "-q", "name", "messages_ready", "messages_unacknowledged", "consumers"];
        let consumers = ["list_consumers", "-q", "queue_name", "consumer_tag", "active", "activity_status"];
        let mut out = String::new();
        for args in [&queues[..], &consumers[..]] {
            match try_rabbitmqctl(&self.nodes[node], args).await {
                // rabbitmqctl separates columns with tabs; aligned spaces survive a test's output.
                Ok(table) => {
                    for line in table.lines() {
                        let cells: String = line.split('\t').map(|cell| format!("{cell:<30}  ")).collect();
                        out.push_str(cells.trim_end());
                        out.push('\n');
                    }
                }
                Err(e) => out.push_str(&format!("{e}\n")),
            }
        }
        out
    }

    /// Starts a stopped node again; it rejoins the cluster from its data.
    pub async fn restart_node(&mut self, index: usize) {
        self.nodes[index].restart().await;
    }
}

/// Runs `rabbitmqctl` against a node (with the node's cookie, found through its `HOME`) and
/// returns its output; panics with it if it fails.
async fn rabbitmqctl(node: &RabbitMqServer, args: &[&str]) -> String {
    try_rabbitmqctl(node, args).await.unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `rabbitmqctl` against a node and returns its output, or what went wrong.
async fn try_rabbitmqctl(node: &RabbitMqServer, args: &[&str]) -> Result<String, String> {
    let ctl = rabbitmq_server_binary().with_file_name("rabbitmqctl");
    let mut command = std::process::Command::new(&ctl);
    command.args(["-n", node.node_name()]).args(args).env("HOME", node.work_dir());
    let what = format!("rabbitmqctl -n {} {}", node.node_name(), args.join(" "));
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .map_err(|e| format!("{what} did not run: {e}"))?
        .map_err(|e| format!("cannot run {}: {e}", ctl.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Waits until a node answers the AMQP handshake again.
async fn wait_amqp(node: &RabbitMqServer) {
    let address = SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, node.port());
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    while !answers_amqp(address).await {
        assert!(std::time::Instant::now() < deadline, "{} did not answer within {READY_TIMEOUT:?}", node.node_name());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes the Erlang cookie where a node whose `HOME` is `dir` (and `rabbitmqctl`) read it;
/// Erlang refuses a cookie file others can read.
fn write_cookie(dir: &std::path::Path, cookie: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(".erlang.cookie");
    write_file(&path, cookie);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400))
        .unwrap_or_else(|e| panic!("cannot protect {}: {e}", path.display()));
}

fn write_file(path: &std::path::Path, contents: &str) {
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// The readiness probe of [`RabbitMqServer`].
fn answers_amqp(address: SocketAddrV4) -> BoxFuture<'static, bool> {
    Box::pin(amqp_handshake(SocketAddr::V4(address)))
}

/// Whether a broker at `address` answers the AMQP protocol header with a Connection.Start
/// method frame, as it does once it can take connections. Gives up after [`PROBE_TIMEOUT`].
async fn amqp_handshake(address: SocketAddr) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
        stream.write_all(AMQP_PROTOCOL_HEADER).await.ok()?;
        // Frame type 1 (method) on channel 0, a four-byte size, then class 10 (connection)
        // method 10 (start).
        let mut frame = [0u8; 11];
        stream.read_exact(&mut frame).await.ok()?;
        Some(frame[..3] == [1, 0, 0] && frame[7..] == [0, 10, 0, 10])
    };
    matches!(tokio::time::timeout(PROBE_TIMEOUT, attempt).await, Ok(Some(true)))
}

/// A virtual host of its own on the machine's shared RabbitMQ broker, so that tests share the
/// broker but none of its queues, exchanges or messages. Deleted, with everything in it, on drop.
///
/// The broker is `$CHATFLEET_TEST_AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672`; any
/// path is ignored), managed through its HTTP API at `$CHATFLEET_TEST_RABBITMQ_API` (default
/// `http://127.0.0.1:15672`; credentials in that URL win over the AMQP URL's, which win over
/// `guest:guest`). The AMQP URL's user gets full permissions on the vhost.
///
/// For tests that stop or restart the broker, use a [`RabbitMqServer`] instead.
pub struct RabbitVhost {
    name: String,
    broker: SharedBroker,
}

impl RabbitVhost {
    /// Creates a vhost with a fresh name, `chatfleet-test-<16 hex digits>`, and grants the broker
    /// URL's user full permissions on it. Panics, saying what to do, if the shared broker or its
    /// management API does not answer.
    pub async fn create() -> RabbitVhost {
        let broker = SharedBroker::from_env();
        broker.check_amqp_reachable().await;
        let name = unique_vhost_name();
        broker.api.expect(&format!("create the vhost {name}"), Method::PUT, &["vhosts", &name], None).await;
        // From here on, a panic drops the value, which deletes the vhost.
        let vhost = RabbitVhost { name, broker };
        let (api, user) = (&vhost.broker.api, &vhost.broker.user);
        let everything = serde_json::json!({ "configure": ".*", "write": ".*", "read": ".*" });
        let what = format!("grant {user} permissions on the vhost {}", vhost.name);
        api.expect(&what, Method::PUT, &["permissions", &vhost.name, user], Some(everything)).await;
        vhost
    }

    /// The vhost's name (not percent-encoded).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The AMQP URL of the vhost: the broker URL with the percent-encoded name as its path, e.g.
    /// `amqp://guest:guest@127.0.0.1:5672/chatfleet-test-0123456789abcdef`.
    pub fn url(&self) -> String {
        let mut url = self.broker.amqp_base.clone();
        url.path_segments_mut().expect("a URL with a host has a path").clear().push(&self.name);
        url.into()
    }

    /// The management API as KEDA's `rabbitmq` trigger takes it in `host` with `protocol: http`:
    /// `http://user:password@host:port/<percent-encoded vhost>`, the vhost as the last path
    /// segment.
    pub fn management_url(&self) -> String {
        let api = &self.broker.api;
        let mut url = api.base.clone();
        url.set_username(&api.user).and_then(|()| url.set_password(Some(&api.password))).expect("an http URL");
        url.path_segments_mut().expect("a URL with a host has a path").pop_if_empty().push(&self.name);
        url.into()
    }

    /// `GET /api/<what>/<this vhost>` on the management API (`what`: `queues`, `bindings`,
    /// `exchanges`, ...), parsed. Panics if the API does not answer 200 with JSON.
    pub async fn api_get(&self, what: &str) -> serde_json::Value {
        let api = &self.broker.api;
        match api.request(Method::GET, &[what, &self.name], None).await {
            Ok((StatusCode::OK, body)) => serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("GET /api/{what} on the RabbitMQ management API is not JSON ({e}): {body}")),
            Ok((status, body)) => panic!("GET /api/{what} on the RabbitMQ management API answered {status}: {body}"),
            Err(e) => panic!("{e}"),
        }
    }

    /// Whether the shared broker has a vhost called `name`, as its management API says; for
    /// checking that a dropped [`RabbitVhost`] is gone. Panics if the API does not answer.
    pub async fn exists(name: &str) -> bool {
        let broker = SharedBroker::from_env();
        match broker.api.request(Method::GET, &["vhosts", name], None).await {
            Ok((StatusCode::OK, _)) => true,
            Ok((StatusCode::NOT_FOUND, _)) => false,
            Ok((status, body)) => {
                panic!("GET /api/vhosts/{name} on the RabbitMQ management API answered {status}: {body}")
            }
            Err(e) => panic!("{e}"),
        }
    }
}

impl Drop for RabbitVhost {
    fn drop(&mut self) {
        // On a thread with a runtime of its own, waited for, so that it works inside or outside a
        // runtime and while a failing test unwinds. Never panics: a vhost left behind is not
        // worth aborting the test process.
        let (api, name) = (self.broker.api.clone(), self.name.clone());
        let deleted = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start a runtime: {e}"))?;
            runtime.block_on(api.request(Method::DELETE, &["vhosts", &name], None))
        })
        .join();
        match deleted {
            Ok(Ok((status, _))) if status.is_success() || status == StatusCode::NOT_FOUND => {}
            Ok(Ok((status, body))) => {
                eprintln!("warning: could not delete the RabbitMQ vhost {}: {status} {body}", self.name)
            }
            Ok(Err(e)) => eprintln!("warning: could not delete the RabbitMQ vhost {}: {e}", self.name),
            Err(_) => eprintln!("warning: deleting the RabbitMQ vhost {} panicked", self.name),
        }
    }
}

/// `chatfleet-test-` and 64 random bits: unique across the test processes running now and any
/// vhost an earlier, killed run left behind.
fn unique_vhost_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
    // A `RandomState` is seeded randomly for each process.
    let bits = RandomState::new().hash_one((std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed), nanos));
    format!("chatfleet-test-{bits:016x}")
}

/// The shared broker, as the environment names it.
struct SharedBroker {
    /// `amqp://user:password@host:port`, without a path: a vhost's URL is this and its name.
    amqp_base: Url,
    /// `host:port` of the AMQP listener, for the reachability check.
    amqp_address: String,
    /// The AMQP URL's user (percent-decoded), who is given permissions on each vhost.
    user: String,
    api: ManagementApi,
}

impl SharedBroker {
    fn from_env() -> SharedBroker {
        let amqp = std::env::var("CHATFLEET_TEST_AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.to_owned());
        let api = std::env::var("CHATFLEET_TEST_RABBITMQ_API").unwrap_or_else(|_| DEFAULT_API_URL.to_owned());
        SharedBroker::new(
            parse_url(&amqp, "CHATFLEET_TEST_AMQP_URL", &["amqp", "amqps"]),
            parse_url(&api, "CHATFLEET_TEST_RABBITMQ_API", &["http"]),
        )
    }

    fn new(mut amqp: Url, mut api: Url) -> SharedBroker {
        let default_port = if amqp.scheme() == "amqps" { 5671 } else { 5672 };
        let host = amqp.host_str().expect("parse_url checks for a host");
        let amqp_address = format!("{host}:{}", amqp.port().unwrap_or(default_port));
        let user = Some(decode(amqp.username())).filter(|user| !user.is_empty()).unwrap_or_else(|| "guest".to_owned());
        let credentials = [&api, &amqp]
            .into_iter()
            .find(|url| !url.username().is_empty())
            .map(|url| (decode(url.username()), url.password().map(decode).unwrap_or_default()))
            .unwrap_or_else(|| ("guest".to_owned(), "guest".to_owned()));
        amqp.set_path("");
        for url in [&mut amqp, &mut api] {
            url.set_query(None);
            url.set_fragment(None);
        }
        // Sent as a header instead: reqwest would also take them from the URL, but error messages
        // show the URL.
        api.set_username("").and_then(|()| api.set_password(None)).expect("an http URL can lose its credentials");
        SharedBroker { amqp_base: amqp, amqp_address, user, api: ManagementApi::new(api, credentials) }
    }

    async fn check_amqp_reachable(&self) {
        let address = &self.amqp_address;
        match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(address)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("the shared RabbitMQ broker at {address} does not answer ({e}): {HOW_TO_START}"),
            Err(_) => panic!(
                "the shared RabbitMQ broker at {address} does not answer within {PROBE_TIMEOUT:?}: {HOW_TO_START}"
            ),
        }
    }
}

/// `url`, parsed; panics, naming the variable it came from, unless it is an absolute URL of one
/// of `schemes` with a host.
fn parse_url(url: &str, variable: &str, schemes: &[&str]) -> Url {
    let parsed = Url::parse(url).unwrap_or_else(|e| panic!("{variable} is {url:?}, which is not a URL: {e}"));
    assert!(schemes.contains(&parsed.scheme()), "{variable} is {url:?}, whose scheme is not one of {schemes:?}");
    assert!(parsed.host_str().is_some_and(|host| !host.is_empty()), "{variable} is {url:?}, which names no host");
    parsed
}

/// A URL's user or password as written, percent-decoded.
fn decode(userinfo: &str) -> String {
    percent_encoding::percent_decode_str(userinfo).decode_utf8_lossy().into_owned()
}

/// RabbitMQ's management API, a few calls per test.
#[derive(Clone)]
struct ManagementApi {
    http: reqwest::Client,
    /// The API's URL without credentials; calls go to `<base>/api/...`.
    base: Url,
    user: String,
    password: String,
}

impl ManagementApi {
    fn new(base: Url, (user, password): (String, String)) -> ManagementApi {
        // reqwest is built without a default TLS provider; plain HTTP needs one all the same.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(PROBE_TIMEOUT)
            .timeout(API_TIMEOUT)
            // A connection per call: a pooled connection belongs to the runtime that opened it,
            // and the client is also used from the runtime `RabbitVhost::drop` starts.
            .pool_max_idle_per_host(0)
            // The broker is this machine's or the one the environment names, never behind a proxy.
            .no_proxy()
            .build()
            .unwrap_or_else(|e| panic!("cannot build an HTTP client for the RabbitMQ management API: {e}"));
        ManagementApi { http, base, user, password }
    }

    /// `<base>/api/<segments>`, each segment percent-encoded (`/` is the default vhost's name).
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut().expect("an http URL has a path").pop_if_empty().push("api").extend(segments);
        url
    }

    /// Sends a request and panics unless the answer is a success.
    async fn expect(&self, what: &str, method: Method, segments: &[&str], body: Option<serde_json::Value>) {
        match self.request(method, segments, body).await {
            Ok((status, _)) if status.is_success() => {}
            Ok((status, body)) => panic!("cannot {what}: the RabbitMQ management API answered {status}: {body}"),
            Err(e) => panic!("cannot {what}: {e}"),
        }
    }

    /// The status and body of the answer to one request, or why there is none.
    async fn request(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<serde_json::Value>,
    ) -> Result<(StatusCode, String), String> {
        let url = self.url(segments);
        let mut request = self.http.request(method.clone(), url.clone()).basic_auth(&self.user, Some(&self.password));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let failed = |e: reqwest::Error| match e.is_connect() {
            true => format!(
                "the RabbitMQ management API at {} does not answer ({e}): {HOW_TO_START}, or set \
                 CHATFLEET_TEST_RABBITMQ_API",
                self.base
            ),
            false => format!("{method} {url} failed: {e}"),
        };
        let response = request.send().await.map_err(failed)?;
        let status = response.status();
        let body = response.text().await.map_err(failed)?;
        Ok((status, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broker(amqp: &str, api: &str) -> SharedBroker {
        SharedBroker::new(parse_url(amqp, "AMQP", &["amqp", "amqps"]), parse_url(api, "API", &["http"]))
    }

    #[test]
    fn the_default_shared_broker_is_guest_on_localhost() {
        let broker = broker(DEFAULT_AMQP_URL, DEFAULT_API_URL);

        assert_eq!(broker.amqp_base.as_str(), "amqp://guest:guest@127.0.0.1:5672");
        assert_eq!(broker.amqp_address, "127.0.0.1:5672");
        assert_eq!(broker.user, "guest");
        assert_eq!((broker.api.user.as_str(), broker.api.password.as_str()), ("guest", "guest"));
        assert_eq!(broker.api.url(&["vhosts", "v"]).as_str(), "http://127.0.0.1:15672/api/vhosts/v");
    }

    #[test]
    fn broker_urls_are_cut_into_their_parts_and_decoded() {
        let broker = broker("amqps://us%40r:p%3Aw@[::1]/%2f?heartbeat=5", "http://admin:s%20cret@rabbit:8080/mgmt/");

        assert_eq!(broker.amqp_base.as_str(), "amqps://us%40r:p%3Aw@[::1]");
        assert_eq!(broker.amqp_address, "[::1]:5671");
        assert_eq!(broker.user, "us@r");
        assert_eq!((broker.api.user.as_str(), broker.api.password.as_str()), ("admin", "s cret"));
        assert_eq!(
            broker.api.url(&["permissions", "/", "us@r"]).as_str(),
            "http://rabbit:8080/mgmt/api/permissions/%2F/us@r"
        );
    }

    #[test]
    fn the_api_borrows_the_amqp_credentials_when_its_url_has_none() {
        let broker = broker("amqp://app:secret@broker:5673", "http://broker:15672");

        assert_eq!(broker.amqp_address, "broker:5673");
        assert_eq!((broker.api.user.as_str(), broker.api.password.as_str()), ("app", "secret"));
    }

    #[test]
    fn a_vhost_url_is_the_broker_url_with_the_encoded_name_as_its_path() {
        let vhost = RabbitVhost { name: "a b/c".to_owned(), broker: broker("amqp://g:g@h:1/old", DEFAULT_API_URL) };

        let url = vhost.url();
        std::mem::forget(vhost); // (dropping it would ask the API to delete the vhost)

        assert_eq!(url, "amqp://g:g@h:1/a%20b%2Fc");
    }

    #[test]
    fn vhost_names_differ() {
        let (a, b) = (unique_vhost_name(), unique_vhost_name());

        assert_ne!(a, b);
        assert!(a.starts_with("chatfleet-test-") && a.len() == "chatfleet-test-".len() + 16, "{a}");
    }
}
