//! The test kit of the end-to-end tests: starts a whole chatfleet (gateway and workers through
//! the same `chatfleet::run` as the binary) against real services on free ports, plus a
//! client that speaks the public API.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use chatfleet::cli::Cli;
use clap::Parser;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{Value, json};
use testkit::{MongoServer, NatsCluster, NatsServer, RabbitMqCluster, RabbitMqServer, RabbitVhost, free_port};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Runs each named test, an `async fn(Backend)`, against every backend.
#[allow(unused_macros)]
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod dev {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::Dev).await }) *
        }
        on_every_broker!($($name),*);
    };
}

/// Runs each named test, an `async fn(Backend)`, against every broker-backed fleet (the tests
/// that stop brokers or run worker processes).
#[allow(unused_macros)]
macro_rules! on_every_broker {
    ($($name:ident),* $(,)?) => {
        mod nats_mongo {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::NatsMongo).await }) *
        }
        mod rabbit_mongo {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::RabbitMongo).await }) *
        }
    };
}

/// Which bus and store the fleet runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `chatfleet dev`: the in-process bus and the embedded store.
    Dev,
    /// `chatfleet gateway` and `chatfleet worker` on NATS JetStream and a MongoDB-wire server.
    NatsMongo,
    /// `chatfleet gateway` and `chatfleet worker` on RabbitMQ and a MongoDB-wire server.
    RabbitMongo,
}

/// The broker of a fleet.
pub enum Broker {
    /// A private `nats-server`.
    Nats(NatsServer),
    /// A private three-node NATS cluster; the fleet's URL lists every node.
    NatsCluster(NatsCluster),
    /// A virtual host of its own on the machine's shared RabbitMQ.
    RabbitVhost(RabbitVhost),
    /// A private RabbitMQ node, for tests that stop or restart the broker.
    Rabbit(RabbitMqServer),
    /// Three private RabbitMQ nodes in one cluster; the fleet's URL lists every node.
    RabbitCluster(RabbitMqCluster),
}

impl Broker {
    pub async fn start(backend: Backend, private: bool) -> Option<Broker> {
        match backend {
            Backend::Dev => None,
            Backend::NatsMongo => Some(Broker::Nats(NatsServer::start().await)),
            Backend::RabbitMongo if private => Some(Broker::Rabbit(RabbitMqServer::start().await)),
            Backend::RabbitMongo => Some(Broker::RabbitVhost(RabbitVhost::create().await)),
        }
    }

    pub fn url(&self) -> String {
        match self {
            Broker::Nats(server) => server.url(),
            Broker::NatsCluster(cluster) => cluster.url(),
            Broker::RabbitVhost(vhost) => vhost.url(),
            Broker::Rabbit(server) => server.url(),
            Broker::RabbitCluster(cluster) => cluster.url(),
        }
    }

    /// Kills the broker, as a crash would; its storage is kept.
    pub async fn stop(&mut self) {
        match self {
            Broker::Nats(server) => server.stop().await,
            Broker::NatsCluster(_) | Broker::RabbitCluster(_) => panic!("stop a cluster's nodes one by one"),
            Broker::Rabbit(server) => server.stop().await,
            Broker::RabbitVhost(_) => panic!("the shared RabbitMQ is never stopped: ask for a private broker"),
        }
    }

    /// Starts the broker again on the same port with the same storage.
    pub async fn restart(&mut self) {
        match self {
            Broker::Nats(server) => server.restart().await,
            Broker::NatsCluster(_) | Broker::RabbitCluster(_) => panic!("restart a cluster's nodes one by one"),
            Broker::Rabbit(server) => server.restart().await,
            Broker::RabbitVhost(_) => panic!("the shared RabbitMQ is never restarted: ask for a private broker"),
        }
    }
}

/// How a test wants its fleet.
#[derive(Debug, Clone)]
pub struct Options {
    pub api_keys: Vec<String>,
    /// The gateway's API keys file (`--api-keys-file`).
    pub api_keys_file: Option<std::path::PathBuf>,
    pub workers: usize,
    pub llm_max_attempts: u32,
    pub keep_alive_secs: u64,
    pub first_token_ms: u64,
    pub token_ms: u64,
    pub reply_tokens: usize,
    pub partitions: u32,
    /// The gateway's `--double-texting`, if the test sets one.
    pub double_texting: Option<&'static str>,
    /// A broker of the test's own, which it may stop and restart (RabbitMQ fleets otherwise
    /// get a virtual host on the shared broker; NATS fleets always get their own server).
    pub private_broker: bool,
    /// A MongoDB-wire server that keeps its data on disk, so that a test may kill and restart
    /// it (otherwise it runs in memory and a restart would forget everything).
    pub store_on_disk: bool,
    /// A three-node cluster instead of a single server or virtual host.
    pub cluster: bool,
    /// The gateway's channels file (`--channels`).
    pub channels: Option<std::path::PathBuf>,
    /// `--event-retention-secs` of every role, if the test sets one.
    pub event_retention_secs: Option<u64>,
    /// More flags for every gateway (and `dev`), after the ones the kit sets.
    pub extra_gateway_args: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            api_keys: Vec::new(),
            api_keys_file: None,
            workers: 1,
            llm_max_attempts: 3,
            keep_alive_secs: 15,
            first_token_ms: 5,
            token_ms: 2,
            reply_tokens: 12,
            partitions: 8,
            double_texting: None,
            private_broker: false,
            store_on_disk: false,
            cluster: false,
            channels: None,
            event_retention_secs: None,
            extra_gateway_args: Vec::new(),
        }
    }
}

/// A running mock LLM.
pub struct MockLlm {
    pub base_url: String,
    stop: CancellationToken,
}

impl MockLlm {
    pub async fn start(options: &Options) -> MockLlm {
        llm::openai::install_crypto_provider();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}/v1", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let config = llm::mock_server::MockServerConfig {
            settings: llm::mock_reply::MockSettings {
                first_token_delay: Duration::from_millis(options.first_token_ms),
                token_delay: Duration::from_millis(options.token_ms),
                reply_tokens: options.reply_tokens,
                echo_chars: 48,
            },
            model: "mock".into(),
        };
        tokio::spawn(llm::mock_server::serve(listener, config, stop.clone().cancelled_owned()));
        MockLlm { base_url, stop }
    }
}

impl Drop for MockLlm {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One role running inside the test process.
struct Role {
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

fn spawn_role(args: Vec<String>) -> Role {
    let cli = Cli::try_parse_from(args).expect("test arguments parse");
    let stop = CancellationToken::new();
    let task = tokio::spawn(chatfleet::run(cli, stop.clone().cancelled_owned()));
    Role { stop, task }
}

/// A running fleet and a client for it.
pub struct TestApp {
    pub backend: Backend,
    pub base: String,
    pub http: reqwest::Client,
    pub broker: Option<Broker>,
    pub mongo: Option<MongoServer>,
    pub mock: MockLlm,
    pub options: Options,
    gateway: Option<Role>,
    /// The main gateway's command line, to start it again after a stop.
    gateway_args: Vec<String>,
    /// Gateways added by [`TestApp::add_gateway`]: their base URL and, while running, the role.
    more_gateways: Vec<(String, Vec<String>, Option<Role>)>,
    workers: Vec<Role>,
    dir: tempfile::TempDir,
}

/// A session as the API returned it.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: String,
    pub token: String,
}

/// One Server-Sent Event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub event: String,
    pub id: String,
    pub data: Value,
}

pub fn s(x: impl ToString) -> String {
    x.to_string()
}

impl TestApp {
    pub async fn spawn(backend: Backend) -> TestApp {
        Self::spawn_with(backend, Options::default()).await
    }

    pub async fn spawn_with(backend: Backend, options: Options) -> TestApp {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("chatfleet_bus=info,chatfleet_worker=info,chatfleet_gateway=info")
            .try_init(); // DIAG
        let mock = MockLlm::start(&options).await;
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        let mut app = TestApp {
            backend,
            base,
            http: reqwest::Client::builder().pool_max_idle_per_host(64).build().unwrap(),
            broker: None,
            mongo: None,
            mock,
            options,
            gateway: None,
            gateway_args: Vec::new(),
            more_gateways: Vec::new(),
            workers: Vec::new(),
            dir,
        };
        match backend {
            Backend::Dev => {
                let mut args = vec![
                    s("chatfleet"),
                    s("dev"),
                    s("--listen"),
                    format!("127.0.0.1:{port}"),
                    s("--store"),
                    app.dir.path().join("dev.redb").display().to_string(),
                    s("--workers"),
                    app.options.workers.to_string(),
                ];
                args.extend(app.model_args());
                args.extend(app.gateway_args());
                app.gateway_args = args.clone();
                app.gateway = Some(spawn_role(args));
            }
            Backend::NatsMongo | Backend::RabbitMongo => {
                let store_dir = app.dir.path().join("mongo");
                let mongo = async {
                    if app.options.store_on_disk {
                        MongoServer::start_with_storage(&store_dir).await
                    } else {
                        MongoServer::start().await
                    }
                };
                let broker = async {
                    match backend {
                        Backend::NatsMongo if app.options.cluster => {
                            Some(Broker::NatsCluster(NatsCluster::start().await))
                        }
                        Backend::RabbitMongo if app.options.cluster => {
                            Some(Broker::RabbitCluster(RabbitMqCluster::start().await))
                        }
                        _ => Broker::start(backend, app.options.private_broker).await,
                    }
                };
                let (broker, mongo) = tokio::join!(broker, mongo);
                app.broker = broker;
                app.mongo = Some(mongo);
                let mut args = vec![s("chatfleet"), s("gateway"), s("--listen"), format!("127.0.0.1:{port}")];
                args.extend(app.wiring_args());
                args.extend(app.gateway_args());
                app.gateway_args = args.clone();
                app.gateway = Some(spawn_role(args));
                for _ in 0..app.options.workers {
                    app.add_worker();
                }
            }
        }
        app.wait_ready().await;
        app
    }

    fn wiring_args(&self) -> Vec<String> {
        vec![
            s("--bus"),
            self.bus_url(),
            s("--store"),
            self.mongo.as_ref().map(|m| m.url_for_db("chatfleet_test")).unwrap_or_default(),
            s("--partitions"),
            self.options.partitions.to_string(),
        ]
    }

    fn model_args(&self) -> Vec<String> {
        vec![
            s("--llm-base-url"),
            self.mock.base_url.clone(),
            s("--model"),
            s("mock"),
            s("--llm-timeout"),
            s("5"),
            s("--llm-max-attempts"),
            self.options.llm_max_attempts.to_string(),
            s("--shutdown-grace"),
            s("5"),
        ]
    }

    fn gateway_args(&self) -> Vec<String> {
        let mut args = vec![s("--sse-keep-alive"), self.options.keep_alive_secs.to_string()];
        for key in &self.options.api_keys {
            args.push(s("--api-key"));
            args.push(key.clone());
        }
        if let Some(path) = &self.options.api_keys_file {
            args.push(s("--api-keys-file"));
            args.push(path.display().to_string());
        }
        if let Some(policy) = self.options.double_texting {
            args.push(s("--double-texting"));
            args.push(s(policy));
        }
        if let Some(path) = &self.options.channels {
            args.push(s("--channels"));
            args.push(path.display().to_string());
        }
        args.extend(self.retention_args());
        args.extend(self.options.extra_gateway_args.iter().cloned());
        args
    }

    fn retention_args(&self) -> Vec<String> {
        match self.options.event_retention_secs {
            Some(secs) => vec![s("--event-retention-secs"), secs.to_string()],
            None => Vec::new(),
        }
    }

    /// Starts one more gateway on the fleet's bus and store (broker-backed fleets only), and
    /// returns its base URL once it is ready.
    pub async fn add_gateway(&mut self) -> String {
        assert_ne!(self.backend, Backend::Dev, "`chatfleet dev` is one process; its gateway cannot be doubled");
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        let mut args = vec![s("chatfleet"), s("gateway"), s("--listen"), format!("127.0.0.1:{port}")];
        args.extend(self.wiring_args());
        args.extend(self.gateway_args());
        self.more_gateways.push((base.clone(), args.clone(), Some(spawn_role(args))));
        wait_until_ready(&self.http, &base).await;
        base
    }

    /// Stops the gateway at `base` (the main one or an added one), closing its streams, and
    /// waits until it has ended.
    pub async fn stop_gateway(&mut self, base: &str) {
        let role = if base == self.base {
            self.gateway.take()
        } else {
            self.more_gateways.iter_mut().find(|(b, _, _)| b == base).and_then(|(_, _, role)| role.take())
        };
        let role = role.expect("a running gateway at that address");
        role.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), role.task).await;
    }

    /// Starts the gateway at `base` again, on the same address with the same settings, and
    /// waits until it is ready.
    pub async fn restart_gateway(&mut self, base: &str) {
        if base == self.base {
            self.gateway = Some(spawn_role(self.gateway_args.clone()));
        } else {
            let (_, args, role) =
                self.more_gateways.iter_mut().find(|(b, _, _)| b == base).expect("a gateway added before");
            *role = Some(spawn_role(args.clone()));
        }
        wait_until_ready(&self.http, base).await;
    }

    /// Starts one more in-process worker (broker-backed fleets only).
    pub fn add_worker(&mut self) {
        let mut args = vec![s("chatfleet"), s("worker"), s("--listen"), format!("127.0.0.1:{}", free_port())];
        args.extend(self.wiring_args());
        args.extend(self.model_args());
        args.push(s("--worker-id"));
        args.push(format!("test-worker-{}", self.workers.len()));
        args.extend(self.retention_args());
        self.workers.push(spawn_role(args));
    }

    /// Waits until the gateway answers /readyz with 200.
    pub async fn wait_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = self.http.get(format!("{}/readyz", self.base)).send().await
                && r.status() == 200
            {
                return;
            }
            if let Some(role) = &self.gateway
                && role.task.is_finished()
            {
                let role = self.gateway.take().unwrap();
                panic!("the gateway stopped during start-up: {:?}", role.task.await);
            }
            assert!(tokio::time::Instant::now() < deadline, "the fleet did not become ready within 20 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn create_session(&self) -> Session {
        let r = self.http.post(self.url("/v1/sessions")).json(&json!({})).send().await.unwrap();
        assert_eq!(r.status(), 201, "creating a session");
        let body: Value = r.json().await.unwrap();
        Session {
            id: body["session_id"].as_str().unwrap().to_owned(),
            token: body["token"].as_str().unwrap().to_owned(),
        }
    }

    /// `POST .../messages` asking for JSON.
    pub async fn post_message(&self, session: &Session, body: Value) -> reqwest::Response {
        self.http
            .post(self.url(&format!("/v1/sessions/{}/messages", session.id)))
            .bearer_auth(&session.token)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// `POST .../messages` asking for the reply as a stream; returns every event until the
    /// stream ends.
    pub async fn send_streaming(&self, session: &Session, body: Value) -> Vec<SseEvent> {
        self.send_streaming_timed(session, body).await.into_iter().map(|(_, event)| event).collect()
    }

    /// Like [`TestApp::send_streaming`], with the instant each event arrived.
    pub async fn send_streaming_timed(&self, session: &Session, body: Value) -> Vec<(Instant, SseEvent)> {
        let r = self
            .http
            .post(self.url(&format!("/v1/sessions/{}/messages", session.id)))
            .bearer_auth(&session.token)
            .header("Accept", "text/event-stream")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "streaming post: {}", r.text().await.unwrap_or_default());
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        collect_timed_events(r, Duration::from_secs(60)).await
    }

    /// Opens `GET .../events` for the session and checks it answered 200.
    pub async fn open_events(&self, session: &Session) -> reqwest::Response {
        let r = self
            .http
            .get(self.url(&format!("/v1/sessions/{}/events", session.id)))
            .bearer_auth(&session.token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "opening the event stream");
        r
    }

    pub async fn history(&self, session: &Session) -> Vec<Value> {
        let r = self
            .http
            .get(self.url(&format!("/v1/sessions/{}/messages", session.id)))
            .bearer_auth(&session.token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["session_id"], session.id.as_str());
        body["messages"].as_array().unwrap().clone()
    }

    /// Waits until the session's history holds `n` replies, for as long as replies keep coming:
    /// fails once `stall` passes with no new reply. For a backlog whose size depends on the
    /// machine's speed (a load test's), where a fixed deadline would measure throughput rather
    /// than whether anything was lost.
    pub async fn wait_for_replies_while_progressing(&self, session: &Session, n: usize, stall: Duration) -> Vec<Value> {
        let mut last = (0, tokio::time::Instant::now());
        loop {
            let history = self.history(session).await;
            let replies = history.iter().filter(|m| m["role"] == "assistant").count();
            if replies >= n {
                return history;
            }
            if replies > last.0 {
                last = (replies, tokio::time::Instant::now());
            }
            assert!(
                last.1.elapsed() < stall,
                "only {replies} of {n} replies, and none new for {stall:?}: {history:#?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Polls the history until it holds `n` assistant messages (or fails after `within`).
    pub async fn wait_for_replies(&self, session: &Session, n: usize, within: Duration) -> Vec<Value> {
        self.replies_within(session, n, within).await.unwrap_or_else(|history| {
            let replies = history.iter().filter(|m| m["role"] == "assistant").count();
            panic!("only {replies} of {n} replies after {within:?}: {history:#?}")
        })
    }

    /// Polls the history until it holds `n` assistant messages; after `within`, the history as
    /// it is then, for a test that has more to print about why.
    pub async fn replies_within(
        &self,
        session: &Session,
        n: usize,
        within: Duration,
    ) -> Result<Vec<Value>, Vec<Value>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let history = self.history(session).await;
            if history.iter().filter(|m| m["role"] == "assistant").count() >= n {
                return Ok(history);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(history);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The `--bus` of the fleet's roles.
    pub fn bus_url(&self) -> String {
        self.broker.as_ref().map(|b| b.url()).unwrap_or_else(|| s("memory:"))
    }

    pub fn broker_mut(&mut self) -> &mut Broker {
        self.broker.as_mut().expect("a broker-backed fleet")
    }

    /// The fleet's MongoDB-wire server (broker-backed fleets only).
    pub fn mongo_mut(&mut self) -> &mut MongoServer {
        self.mongo.as_mut().expect("a fleet with a MongoDB-wire server")
    }

    /// Stops every role and waits for them to end.
    pub async fn shutdown(mut self) {
        let more = self.more_gateways.iter_mut().filter_map(|(_, _, role)| role.take()).collect::<Vec<_>>();
        for role in self.workers.drain(..).chain(self.gateway.take()).chain(more) {
            role.stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(10), role.task).await;
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let more = self.more_gateways.iter().filter_map(|(_, _, role)| role.as_ref());
        for role in self.workers.iter().chain(self.gateway.iter()).chain(more) {
            role.stop.cancel();
        }
    }
}

/// Waits until the gateway at `base` answers /readyz with 200 (at most 20 s).
pub async fn wait_until_ready(http: &reqwest::Client, base: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await
            && r.status() == 200
        {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the gateway at {base} was not ready within 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads a reply stream until it ends (or `within` passes).
pub async fn collect_events(response: reqwest::Response, within: Duration) -> Vec<SseEvent> {
    collect_timed_events(response, within).await.into_iter().map(|(_, event)| event).collect()
}

/// Reads a reply stream until it ends (or `within` passes), noting when each event arrived.
pub async fn collect_timed_events(response: reqwest::Response, within: Duration) -> Vec<(Instant, SseEvent)> {
    let mut stream = response.bytes_stream().eventsource();
    let mut events = Vec::new();
    let read = async {
        while let Some(item) = stream.next().await {
            let e = item.expect("a well-formed event stream");
            let event = SseEvent { event: e.event, id: e.id, data: serde_json::from_str(&e.data).expect("JSON data") };
            events.push((Instant::now(), event));
        }
    };
    tokio::time::timeout(within, read).await.expect("the reply stream ended in time");
    events
}

/// The most intervals open at one instant (an interval is open from its start to its end).
pub fn most_at_once(intervals: &[(Instant, Instant)]) -> usize {
    // At equal instants an end comes before a start, so that touching intervals do not count
    // as overlapping.
    let mut edges: Vec<(Instant, i32)> = intervals.iter().flat_map(|&(start, end)| [(start, 1), (end, -1)]).collect();
    edges.sort();
    let (mut open, mut most) = (0i32, 0i32);
    for (_, step) in edges {
        open += step;
        most = most.max(open);
    }
    most as usize
}

/// The value of one series in a Prometheus text exposition, e.g.
/// `chatfleet_worker_messages_total{outcome="replied"}`; `None` if it is absent.
pub fn metric(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().filter(|line| !line.starts_with('#')).find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().expect("a number"))
    })
}

/// Reads events from an open stream until `n` terminal events (`done`/`error`) have arrived.
pub async fn read_until_terminals(response: reqwest::Response, n: usize, within: Duration) -> Vec<SseEvent> {
    let mut stream = response.bytes_stream().eventsource();
    let mut events = Vec::new();
    let mut terminals = 0;
    let read = async {
        while terminals < n {
            let Some(item) = stream.next().await else {
                break;
            };
            let e = item.expect("a well-formed event stream");
            if e.event == "done" || e.event == "error" {
                terminals += 1;
            }
            events.push(SseEvent { event: e.event, id: e.id, data: serde_json::from_str(&e.data).expect("JSON data") });
        }
    };
    tokio::time::timeout(within, read).await.expect("the events arrived in time");
    events
}

/// Reads events until the terminal event of `message_id` (events of every message included).
pub async fn read_until_terminal_of(response: reqwest::Response, message_id: &str, within: Duration) -> Vec<SseEvent> {
    let mut stream = response.bytes_stream().eventsource();
    let mut events = Vec::new();
    let read = async {
        while let Some(item) = stream.next().await {
            let e = item.expect("a well-formed event stream");
            let event = SseEvent { event: e.event, id: e.id, data: serde_json::from_str(&e.data).expect("JSON data") };
            let last = (event.event == "done" || event.event == "error") && event.data["message_id"] == message_id;
            events.push(event);
            if last {
                break;
            }
        }
    };
    tokio::time::timeout(within, read).await.expect("the events arrived in time");
    events
}

/// The text the deltas of one reply add up to, honouring `reset` events.
pub fn assembled_text(events: &[SseEvent]) -> String {
    let mut text = String::new();
    let mut expected_index = 0;
    for e in events {
        match e.event.as_str() {
            "delta" => {
                assert_eq!(e.data["index"], expected_index, "delta indexes count 0, 1, 2, ...");
                expected_index += 1;
                text.push_str(e.data["text"].as_str().unwrap());
            }
            "reset" => {
                text.clear();
                expected_index = 0;
            }
            _ => {}
        }
    }
    text
}

/// The beginning every mock reply has for `text` (echo of at most 48 characters).
pub fn echo_of(text: &str) -> String {
    let collapsed = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let echo: String = collapsed.chars().take(48).collect();
    format!("You said: \"{}\".", echo.trim_end())
}

/// The Python of the test environment (`$CHATFLEET_TEST_VENV`, default
/// `~/.cache/chatfleet/test-venv`), checked to import `module`, which scripts/test.sh installs.
pub fn test_python(module: &str) -> std::path::PathBuf {
    use std::path::PathBuf;
    let venv = std::env::var_os("CHATFLEET_TEST_VENV").map(PathBuf::from).unwrap_or_else(|| {
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache"));
        cache.join("chatfleet/test-venv")
    });
    let python = venv.join("bin/python");
    let ok = std::process::Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "{} cannot import {module}: run scripts/test.sh, which installs it", python.display());
    python
}
