//! KEDA's view of the backlog, on running brokers: the overlays' rendered triggers are read the
//! way KEDA's scalers read them (nats-server's `/jsz` monitoring endpoint; RabbitMQ's
//! management API), against a gateway process that has accepted a backlog while no worker has
//! ever run. The figure must equal the backlog, or KEDA could not scale up from zero workers,
//! and fall to zero once a worker has answered everything.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use schemas::Partition;
use schemas::subjects::AmqpNames;
use serde_json::{Value, json};
use testkit::deploy::{object, render};

/// Messages accepted before any worker runs, over this many sessions (so over several
/// partitions).
const BACKLOG: u64 = 30;
const SESSIONS: u64 = 6;

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[String]) -> Proc {
    Proc(
        Command::new(env!("CARGO_BIN_EXE_chatfleet"))
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("the binary starts"),
    )
}

fn s(x: &str) -> String {
    x.to_owned()
}

async fn wait_http_ok(http: &reqwest::Client, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(r) = http.get(url).send().await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{url} did not answer 200 within 20 s");
}

/// A gateway process on `bus`, a store, and `chatfleet mock-llm`; a worker only when asked.
struct Fleet {
    bus: String,
    store: String,
    model: String,
    http: reqwest::Client,
    gateway: String,
    _mongo: testkit::MongoServer,
    processes: Vec<Proc>,
}

impl Fleet {
    async fn start(bus: String) -> Fleet {
        llm::install_crypto_provider();
        let mongo = testkit::MongoServer::start().await;
        let (mock_port, gateway_port) = (testkit::free_port(), testkit::free_port());
        let mut fleet = Fleet {
            store: mongo.url_for_db("fleet"),
            model: format!("http://127.0.0.1:{mock_port}/v1"),
            http: reqwest::Client::new(),
            gateway: format!("http://127.0.0.1:{gateway_port}"),
            _mongo: mongo,
            processes: Vec::new(),
            bus,
        };
        fleet.processes.push(spawn(&[s("mock-llm"), s("--listen"), format!("127.0.0.1:{mock_port}")]));
        let gateway = [s("gateway"), s("--listen"), format!("127.0.0.1:{gateway_port}")];
        fleet.processes.push(spawn(&[&gateway[..], &fleet.wiring()].concat()));
        wait_http_ok(&fleet.http, &format!("{}/models", fleet.model)).await;
        wait_http_ok(&fleet.http, &format!("{}/readyz", fleet.gateway)).await;
        fleet
    }

    fn wiring(&self) -> Vec<String> {
        vec![s("--bus"), self.bus.clone(), s("--store"), self.store.clone()]
    }

    /// Accepts [`BACKLOG`] messages over [`SESSIONS`] sessions.
    async fn send_backlog(&self) {
        for _ in 0..SESSIONS {
            let r = self.http.post(format!("{}/v1/sessions", self.gateway)).send().await.unwrap();
            assert_eq!(r.status(), 201, "creating a session");
            let session: Value = r.json().await.unwrap();
            for turn in 0..BACKLOG / SESSIONS {
                let r = self
                    .http
                    .post(format!("{}/v1/sessions/{}/messages", self.gateway, session["session_id"].as_str().unwrap()))
                    .bearer_auth(session["token"].as_str().unwrap())
                    .json(&json!({"text": format!("message {turn}")}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 202, "the gateway accepts the message");
            }
        }
    }

    async fn add_worker(&mut self) {
        let port = testkit::free_port();
        let worker = [s("worker"), s("--listen"), format!("127.0.0.1:{port}"), s("--worker-id"), s("w0")];
        let model = [s("--llm-base-url"), self.model.clone(), s("--model"), s("mock")];
        self.processes.push(spawn(&[&worker[..], &self.wiring(), &model].concat()));
        wait_http_ok(&self.http, &format!("http://127.0.0.1:{port}/readyz")).await;
    }
}

/// Polls `lag` until it equals `expected` (or fails after `within`, showing every value seen).
async fn lag_becomes<F: Future<Output = Result<u64, String>>>(
    expected: u64,
    within: Duration,
    lag: impl Fn() -> F,
) -> Vec<Result<u64, String>> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        let value = lag().await;
        let done = value == Ok(expected);
        if seen.last() != Some(&value) {
            seen.push(value);
        }
        if done {
            return seen;
        }
        assert!(Instant::now() < deadline, "KEDA's lag did not become {expected} within {within:?}; seen: {seen:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What KEDA's `nats-jetstream` scaler computes for one trigger on a single server: the named
/// consumer's `num_pending + num_ack_pending` in the named stream of the named account, from
/// `/jsz?acc=<account>&config=true&consumers=true`; a missing consumer is an error.
async fn nats_trigger_lag(http: &reqwest::Client, endpoint: &str, metadata: &Value) -> Result<u64, String> {
    let (account, stream, consumer) = (&metadata["account"], &metadata["stream"], &metadata["consumer"]);
    let url = format!("http://{endpoint}/jsz");
    let query = [("acc", account.as_str().unwrap()), ("config", "true"), ("consumers", "true")];
    let jsz: Value =
        http.get(url).query(&query).send().await.map_err(|e| e.to_string())?.json().await.map_err(|e| e.to_string())?;
    let accounts = jsz["account_details"].as_array().ok_or("no account_details")?;
    let account = accounts.iter().find(|a| &a["name"] == account || &a["id"] == account).ok_or("no such account")?;
    let streams = account["stream_detail"].as_array().ok_or("no stream_detail")?;
    let stream = streams.iter().find(|s| &s["name"] == stream).ok_or("stream not found")?;
    let consumers = stream["consumer_detail"].as_array().ok_or_else(|| format!("no consumers in {stream}"))?;
    let consumer =
        consumers.iter().find(|c| &c["name"] == consumer).ok_or_else(|| format!("consumer {consumer} not found"))?;
    Ok(consumer["num_pending"].as_u64().unwrap() + consumer["num_ack_pending"].as_u64().unwrap())
}

/// The ScaledObject's composite metric: its formula, a sum of trigger names, over each
/// trigger's metric.
async fn nats_lag(http: &reqwest::Client, endpoint: &str, scaled_object: &Value) -> Result<u64, String> {
    let triggers = scaled_object["spec"]["triggers"].as_array().unwrap();
    let formula = scaled_object["spec"]["advanced"]["scalingModifiers"]["formula"].as_str().unwrap();
    let mut total = 0;
    for term in formula.split('+').map(str::trim) {
        let trigger = triggers.iter().find(|t| t["name"] == term).unwrap_or_else(|| panic!("no trigger {term}"));
        total += nats_trigger_lag(http, endpoint, &trigger["metadata"]).await?;
    }
    Ok(total)
}

/// What KEDA's `rabbitmq` scaler computes with `protocol: http`, `useRegex` and `operation:
/// sum` in `QueueLength` mode: the sum of `messages` (ready and unacknowledged) over the queues
/// the management API matches, the vhost being the last path segment of `host`.
async fn rabbitmq_lag(http: &reqwest::Client, host: &str, metadata: &Value) -> Result<u64, String> {
    Ok(rabbitmq_queues(http, host, metadata).await?.iter().map(|(_, messages)| messages).sum())
}

/// The queues KEDA's `rabbitmq` trigger matches, each with its `messages`.
async fn rabbitmq_queues(http: &reqwest::Client, host: &str, metadata: &Value) -> Result<Vec<(String, u64)>, String> {
    assert_eq!(
        (&metadata["mode"], &metadata["useRegex"], &metadata["operation"]),
        (&json!("QueueLength"), &json!("true"), &json!("sum"))
    );
    let host = reqwest::Url::parse(host).unwrap();
    let (user, password) = (host.username().to_owned(), host.password().unwrap_or_default().to_owned());
    let vhost = host.path().rsplit('/').next().unwrap();
    let page_size = metadata["pageSize"].as_str().unwrap_or("100");
    let url = format!("http://{}:{}/api/queues/{vhost}", host.host_str().unwrap(), host.port().unwrap());
    let query = [
        ("page", "1"),
        ("use_regex", "true"),
        ("pagination", "false"),
        ("name", metadata["queueName"].as_str().unwrap()),
        ("page_size", page_size),
    ];
    let response =
        http.get(url).query(&query).basic_auth(user, Some(password)).send().await.map_err(|e| e.to_string())?;
    let page: Value = response.json().await.map_err(|e| e.to_string())?;
    if page["page_count"].as_u64() != Some(1) {
        return Err(format!("the regex matches more than one page of queues: {page}"));
    }
    let items = page["items"].as_array().ok_or("no items")?;
    Ok(items.iter().map(|q| (q["name"].as_str().unwrap().to_owned(), q["messages"].as_u64().unwrap_or(0))).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_nats_the_lag_keda_reads_equals_the_backlog_before_any_worker_ran_and_drains_to_zero() {
    let objects = render("nats");
    let scaled_object = object(&objects, "ScaledObject", "chatfleet-worker").clone();
    let nats = testkit::NatsServer::start().await;
    let endpoint = nats.monitoring_endpoint();
    let mut fleet = Fleet::start(nats.url()).await;
    let http = reqwest::Client::new();

    fleet.send_backlog().await;
    let waiting = lag_becomes(BACKLOG, Duration::from_secs(10), || nats_lag(&http, &endpoint, &scaled_object)).await;
    let per_partition = futures::future::join_all(
        scaled_object["spec"]["triggers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| nats_trigger_lag(&http, &endpoint, &t["metadata"])),
    )
    .await;
    fleet.add_worker().await;
    let drained = lag_becomes(0, Duration::from_secs(60), || nats_lag(&http, &endpoint, &scaled_object)).await;

    assert_eq!(
        waiting.first(),
        Some(&Ok(BACKLOG)),
        "the whole backlog at once, with no worker ever started: {waiting:?}"
    );
    assert!(per_partition.iter().all(Result::is_ok), "every trigger's consumer exists: {per_partition:?}");
    assert!(per_partition.iter().filter(|lag| lag.as_ref().is_ok_and(|&n| n > 0)).count() > 1, "{per_partition:?}");
    assert!(drained.iter().all(Result::is_ok), "every consumer kept its name through the worker's reset: {drained:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_rabbitmq_the_lag_keda_reads_equals_the_backlog_before_any_worker_ran_and_drains_to_zero() {
    let objects = render("rabbitmq");
    let scaled_object = object(&objects, "ScaledObject", "chatfleet-worker");
    let metadata = scaled_object["spec"]["triggers"][0]["metadata"].clone();
    let vhost = testkit::RabbitVhost::create().await;
    let host = vhost.management_url();
    let mut fleet = Fleet::start(vhost.url()).await;
    let http = reqwest::Client::new();

    fleet.send_backlog().await;
    // The management API's queue figures are refreshed every few seconds.
    let waiting = lag_becomes(BACKLOG, Duration::from_secs(30), || rabbitmq_lag(&http, &host, &metadata)).await;
    let matched = rabbitmq_queues(&http, &host, &metadata).await.unwrap();
    fleet.add_worker().await;
    let drained = lag_becomes(0, Duration::from_secs(60), || rabbitmq_lag(&http, &host, &metadata)).await;

    assert!(waiting.iter().all(|lag| lag.as_ref().is_ok_and(|&n| n <= BACKLOG)), "{waiting:?}");
    assert!(drained.iter().all(Result::is_ok), "{drained:?}");
    let mut names: Vec<&str> = matched.iter().map(|(name, _)| name.as_str()).collect();
    names.sort_by_key(|name| name.rsplit('.').next().unwrap().parse::<u32>().unwrap());
    let expected: Vec<String> = (0..16).map(|p| AmqpNames::default().partition_queue(Partition::new(p))).collect();
    assert_eq!(names, expected, "the trigger matches every partition queue and nothing else (not the dead letters)");
}
