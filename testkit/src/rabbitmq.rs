//! RabbitMQ for tests, in two forms. [`RabbitMqServer`] is a private node, one per test, for the
//! tests that kill and restart the broker; it takes a few seconds to boot. [`RabbitVhost`] is an
//! isolated virtual host on the machine's shared broker (which `scripts/test.sh` starts), for all
//! other tests: creating one takes a fraction of a second.

use std::collections::hash_map::RandomState;
use std::ffi::OsString;
use std::hash::BuildHasher;
use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use futures::future::BoxFuture;
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

/// The script that starts a node in the foreground and `exec`s the Erlang VM, so that the child
/// process is the broker itself and killing it kills the broker. Debian's `/usr/sbin/
/// rabbitmq-server` is not usable here: run as root, it starts this script through `su
/// rabbitmq`, so a kill would reach `su` and leave the broker running.
const DEBIAN_SERVER_SCRIPT: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

const NOT_FOUND: &str = "rabbitmq-server not found: run `scripts/test.sh` (it installs it with \
                         `apt-get install rabbitmq-server`) or set CHATFLEET_RABBITMQ_SERVER";

/// The first bytes a client sends on an AMQP 0-9-1 connection.
const AMQP_PROTOCOL_HEADER: &[u8] = b"AMQP\x00\x00\x09\x01";

const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672";
const DEFAULT_API_URL: &str = "http://127.0.0.1:15672";

const HOW_TO_START: &str = "run `scripts/test.sh`, which installs RabbitMQ, starts the shared broker and \
                            enables its management plugin";

/// The script that starts a RabbitMQ node in the foreground: `$CHATFLEET_RABBITMQ_SERVER` if set,
/// else Debian's `/usr/lib/rabbitmq/bin/rabbitmq-server`. Panics if neither exists.
///
/// The script must end by `exec`ing the Erlang VM (as the one in RabbitMQ's own `sbin/` does
/// when `RABBITMQ_ALLOW_INPUT` is set); a wrapper that switches user, such as Debian's
/// `/usr/sbin/rabbitmq-server`, would leave the broker running when the test kills it.
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
    let path = PathBuf::from(DEBIAN_SERVER_SCRIPT);
    assert!(path.is_file(), "{NOT_FOUND}");
    path
}

/// A private RabbitMQ node, killed on drop, with its data in a temporary directory that survives
/// [`RabbitMqServer::restart`]: durable queues and their persistent messages come back.
///
/// The node shares nothing with the machine's broker but the Erlang port mapper (epmd, which the
/// first Erlang node on the machine starts): it has its own node name, AMQP and distribution
/// ports, configuration, plugins (none) and data. Its log goes to `rabbitmq.log` in
/// [`RabbitMqServer::work_dir`], which is also its `HOME`, so that `HOME=<work_dir>
/// /usr/lib/rabbitmq/bin/rabbitmqctl -n <node_name> ...` reaches it with its Erlang cookie (not
/// Debian's `/usr/sbin/rabbitmqctl`, which, run as root, switches to the `rabbitmq` user's home).
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
}

impl RabbitMqServer {
    /// Starts a node on a free port and waits until it answers the AMQP handshake (a node opens
    /// its port only at the end of booting, but the handshake is what the tests need). Panics,
    /// with the node's log, if it cannot be started.
    pub async fn start() -> RabbitMqServer {
        Self::start_node(None).await
    }

    /// Starts a node whose Erlang cookie is `cookie`, if given: nodes that share a cookie may
    /// form a cluster.
    async fn start_node(cookie: Option<&str>) -> RabbitMqServer {
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
        write_file(&config, &format!("listeners.tcp.local = 127.0.0.1:{port}\n"));
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
        let mut server = RabbitMqServer { process, node_name, work_dir };
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
            RabbitMqServer::start_node(Some(&cookie)),
            RabbitMqServer::start_node(Some(&cookie)),
            RabbitMqServer::start_node(Some(&cookie))
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

    /// Starts a stopped node again; it rejoins the cluster from its data.
    pub async fn restart_node(&mut self, index: usize) {
        self.nodes[index].restart().await;
    }
}

/// Runs `rabbitmqctl` against a node (with the node's cookie, found through its `HOME`) and
/// returns its output; panics with it if it fails.
async fn rabbitmqctl(node: &RabbitMqServer, args: &[&str]) -> String {
    let ctl = rabbitmq_server_binary().with_file_name("rabbitmqctl");
    let mut command = std::process::Command::new(&ctl);
    command.args(["-n", node.node_name()]).args(args).env("HOME", node.work_dir());
    let what = format!("rabbitmqctl -n {} {}", node.node_name(), args.join(" "));
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("rabbitmqctl runs")
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", ctl.display()));
    assert!(
        output.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
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
        // The management API is called through blocking sockets, which must not hold up the
        // runtime's threads.
        tokio::task::spawn_blocking(RabbitVhost::create_blocking).await.unwrap_or_else(|e| match e.try_into_panic() {
            Ok(payload) => std::panic::resume_unwind(payload),
            Err(e) => panic!("creating a RabbitMQ vhost did not finish: {e}"),
        })
    }

    fn create_blocking() -> RabbitVhost {
        let broker = SharedBroker::from_env();
        broker.check_amqp_reachable();
        let name = unique_vhost_name();
        broker.api.expect(&format!("create the vhost {name}"), "PUT", &format!("/api/vhosts/{}", encode(&name)), "");
        // From here on, a panic drops the value, which deletes the vhost.
        let vhost = RabbitVhost { name, broker };
        let permissions = format!("/api/permissions/{}/{}", encode(&vhost.name), encode(&vhost.broker.user));
        vhost.broker.api.expect(
            &format!("grant {} permissions on the vhost {}", vhost.broker.user, vhost.name),
            "PUT",
            &permissions,
            r#"{"configure":".*","write":".*","read":".*"}"#,
        );
        vhost
    }

    /// The vhost's name (not percent-encoded).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The AMQP URL of the vhost: the broker URL with the percent-encoded name as its path, e.g.
    /// `amqp://guest:guest@127.0.0.1:5672/chatfleet-test-0123456789abcdef`.
    pub fn url(&self) -> String {
        format!("{}/{}", self.broker.amqp_base, encode(&self.name))
    }

    /// `GET /api/<what>/<this vhost>` on the management API (`what`: `queues`, `bindings`,
    /// `exchanges`, ...), parsed. Panics if the API does not answer 200 with JSON.
    pub async fn api_get(&self, what: &str) -> serde_json::Value {
        let path = format!("/api/{what}/{}", encode(&self.name));
        let api = self.broker.api.clone();
        let fetch = move || match api.request("GET", &path, "") {
            Ok((200, body)) => serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("GET {path} on the RabbitMQ management API is not JSON ({e}): {body}")),
            Ok((status, body)) => panic!("GET {path} on the RabbitMQ management API answered {status}: {body}"),
            Err(e) => panic!("{e}"),
        };
        tokio::task::spawn_blocking(fetch).await.unwrap_or_else(|e| match e.try_into_panic() {
            Ok(payload) => std::panic::resume_unwind(payload),
            Err(e) => panic!("a RabbitMQ management API call did not finish: {e}"),
        })
    }

    /// Whether the shared broker has a vhost called `name`, as its management API says; for
    /// checking that a dropped [`RabbitVhost`] is gone. Panics if the API does not answer.
    pub async fn exists(name: &str) -> bool {
        let name = name.to_owned();
        let check = move || {
            let broker = SharedBroker::from_env();
            let path = format!("/api/vhosts/{}", encode(&name));
            match broker.api.request("GET", &path, "") {
                Ok((200, _)) => true,
                Ok((404, _)) => false,
                Ok((status, body)) => panic!("GET {path} on the RabbitMQ management API answered {status}: {body}"),
                Err(e) => panic!("{e}"),
            }
        };
        tokio::task::spawn_blocking(check).await.unwrap_or_else(|e| match e.try_into_panic() {
            Ok(payload) => std::panic::resume_unwind(payload),
            Err(e) => panic!("checking for a RabbitMQ vhost did not finish: {e}"),
        })
    }
}

impl Drop for RabbitVhost {
    fn drop(&mut self) {
        // Blocking, so that it works inside or outside a runtime and while a failing test
        // unwinds. Never panics: a vhost left behind is not worth aborting the test process.
        let path = format!("/api/vhosts/{}", encode(&self.name));
        match self.broker.api.request("DELETE", &path, "") {
            Ok((200..=299 | 404, _)) => {}
            Ok((status, body)) => {
                eprintln!("warning: could not delete the RabbitMQ vhost {}: {status} {body}", self.name)
            }
            Err(e) => eprintln!("warning: could not delete the RabbitMQ vhost {}: {e}", self.name),
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
    /// `amqp://user:password@host:port`, without a path.
    amqp_base: String,
    /// Where the AMQP listener is, for the reachability check.
    amqp_address: String,
    /// The AMQP URL's user, who is given permissions on each vhost.
    user: String,
    api: ManagementApi,
}

impl SharedBroker {
    fn from_env() -> SharedBroker {
        let amqp_url = std::env::var("CHATFLEET_TEST_AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.to_owned());
        let amqp = parse_url(&amqp_url, "CHATFLEET_TEST_AMQP_URL", &["amqp", "amqps"]);
        let default_port = if amqp.scheme == "amqps" { 5671 } else { 5672 };
        let api_url = std::env::var("CHATFLEET_TEST_RABBITMQ_API").unwrap_or_else(|_| DEFAULT_API_URL.to_owned());
        let api = parse_url(&api_url, "CHATFLEET_TEST_RABBITMQ_API", &["http"]);
        let credentials = api.userinfo.clone().or(amqp.userinfo.clone()).unwrap_or_else(|| "guest:guest".to_owned());
        let user = amqp.userinfo.as_deref().map_or("guest", |u| u.split(':').next().unwrap_or(u));
        SharedBroker {
            amqp_base: amqp_url[..amqp.base_len].to_owned(),
            amqp_address: with_default_port(&amqp.host_port, default_port),
            user: percent_decode(user),
            api: ManagementApi {
                address: with_default_port(&api.host_port, 80),
                host_header: api.host_port.clone(),
                prefix: api.path.trim_end_matches('/').to_owned(),
                authorization: base64::engine::general_purpose::STANDARD.encode(percent_decode(&credentials)),
                url: api_url.clone(),
            },
        }
    }

    fn check_amqp_reachable(&self) {
        match connect(&self.amqp_address) {
            Ok(_) => {}
            Err(e) => {
                panic!("the shared RabbitMQ broker at {} does not answer ({e}): {HOW_TO_START}", self.amqp_address)
            }
        }
    }
}

/// A URL cut into the parts used here.
struct Url<'a> {
    scheme: &'a str,
    userinfo: Option<String>,
    host_port: String,
    path: &'a str,
    /// The length of `scheme://authority`.
    base_len: usize,
}

fn parse_url<'a>(url: &'a str, variable: &str, schemes: &[&str]) -> Url<'a> {
    let Some((scheme, rest)) = url.split_once("://") else { panic!("{variable} is {url:?}, which is not a URL") };
    assert!(schemes.contains(&scheme), "{variable} is {url:?}, whose scheme is not one of {schemes:?}");
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_len);
    let (userinfo, host_port) = match authority.rsplit_once('@') {
        Some((userinfo, host_port)) => (Some(userinfo.to_owned()), host_port.to_owned()),
        None => (None, authority.to_owned()),
    };
    assert!(!host_port.is_empty(), "{variable} is {url:?}, which names no host");
    Url { scheme, userinfo, host_port, path, base_len: scheme.len() + 3 + authority_len }
}

fn with_default_port(host_port: &str, port: u16) -> String {
    // A port follows the last colon, unless that colon is inside an IPv6 literal.
    match host_port.rsplit_once(':') {
        Some((_, tail)) if !tail.contains(']') => host_port.to_owned(),
        _ => format!("{host_port}:{port}"),
    }
}

/// A minimal HTTP/1.1 client for RabbitMQ's management API: a request per connection over a
/// blocking socket. Enough for a few calls per test, and free of any TLS or runtime machinery.
#[derive(Clone)]
struct ManagementApi {
    /// `host:port` to connect to.
    address: String,
    /// The URL's authority, for the `Host` header.
    host_header: String,
    /// The URL's path, if the API is served below one, without a trailing slash.
    prefix: String,
    /// Base64 of `user:password`.
    authorization: String,
    /// The URL, for messages.
    url: String,
}

impl ManagementApi {
    /// Sends a request and panics unless the answer is a success.
    fn expect(&self, what: &str, method: &str, path: &str, body: &str) {
        match self.request(method, path, body) {
            Ok((200..=299, _)) => {}
            Ok((status, body)) => {
                panic!("cannot {what}: {method} {path} on the RabbitMQ management API answered {status}: {body}")
            }
            Err(e) => panic!("cannot {what}: {e}"),
        }
    }

    /// The status and body of the answer to one request, or why there is none.
    fn request(&self, method: &str, path: &str, body: &str) -> Result<(u16, String), String> {
        let unreachable = |e: std::io::Error| {
            format!(
                "the RabbitMQ management API at {} does not answer ({e}): {HOW_TO_START}, or set \
                 CHATFLEET_TEST_RABBITMQ_API",
                self.url
            )
        };
        let mut stream = connect(&self.address).map_err(unreachable)?;
        stream.set_read_timeout(Some(API_TIMEOUT)).map_err(unreachable)?;
        stream.set_write_timeout(Some(API_TIMEOUT)).map_err(unreachable)?;
        let request = format!(
            "{method} {}{path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Basic {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.prefix,
            self.host_header,
            self.authorization,
            body.len()
        );
        let failed = |e: std::io::Error| format!("{method} {}{path} on {} failed: {e}", self.prefix, self.url);
        stream.write_all(request.as_bytes()).map_err(failed)?;
        // `Connection: close`: the answer ends where the stream does.
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).map_err(failed)?;
        let answer = String::from_utf8_lossy(&answer);
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| {
            format!("{method} {}{path} on {} gave a malformed answer: {answer:?}", self.prefix, self.url)
        })?;
        Ok((status, body.to_owned()))
    }
}

/// A blocking connection to `host:port`, trying each address it resolves to for a short while.
fn connect(address: &str) -> std::io::Result<TcpStream> {
    let mut last_error = None;
    for addr in address.to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, PROBE_TIMEOUT) {
            Ok(stream) => return Ok(stream),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| std::io::Error::other(format!("{address} resolves to no address"))))
}

/// Percent-encodes everything but RFC 3986's unreserved characters, as a URL path segment needs
/// for a vhost name (`/` is the default vhost's whole name).
fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Undoes percent-encoding, as in a URL's user and password; malformed escapes are kept as they are.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_cut_into_their_parts() {
        let url = parse_url("amqp://us%40r:p@127.0.0.1:5673/%2f?heartbeat=5", "X", &["amqp"]);

        assert_eq!(url.scheme, "amqp");
        assert_eq!(url.userinfo.as_deref(), Some("us%40r:p"));
        assert_eq!(url.host_port, "127.0.0.1:5673");
        assert_eq!(url.path, "/%2f?heartbeat=5");
        assert_eq!(&"amqp://us%40r:p@127.0.0.1:5673/%2f"[..url.base_len], "amqp://us%40r:p@127.0.0.1:5673");
        assert_eq!(with_default_port("localhost", 5672), "localhost:5672");
        assert_eq!(with_default_port("[::1]", 5672), "[::1]:5672");
        assert_eq!(with_default_port("[::1]:1", 5672), "[::1]:1");
    }

    #[test]
    fn names_are_percent_encoded_and_decoded() {
        assert_eq!(encode("/"), "%2F");
        assert_eq!(encode("chatfleet-test-00ff"), "chatfleet-test-00ff");
        assert_eq!(encode("a b"), "a%20b");
        assert_eq!(percent_decode("us%40r:p%"), "us@r:p%");
    }

    #[test]
    fn vhost_names_differ() {
        let (a, b) = (unique_vhost_name(), unique_vhost_name());

        assert_ne!(a, b);
        assert!(a.starts_with("chatfleet-test-") && a.len() == "chatfleet-test-".len() + 16, "{a}");
    }

    #[test]
    fn the_default_shared_broker_is_guest_on_localhost() {
        // Only meaningful without the overrides, which a developer may have set.
        if std::env::var_os("CHATFLEET_TEST_AMQP_URL").is_some()
            || std::env::var_os("CHATFLEET_TEST_RABBITMQ_API").is_some()
        {
            return;
        }

        let broker = SharedBroker::from_env();

        assert_eq!(broker.amqp_base, "amqp://guest:guest@127.0.0.1:5672");
        assert_eq!(broker.amqp_address, "127.0.0.1:5672");
        assert_eq!(broker.user, "guest");
        assert_eq!(broker.api.address, "127.0.0.1:15672");
        assert_eq!(broker.api.prefix, "");
        assert_eq!(broker.api.authorization, "Z3Vlc3Q6Z3Vlc3Q=");
    }
}
