//! The fleet as operators run it: `chatfleet gateway` and `chatfleet worker` processes against
//! NATS or RabbitMQ and a MongoDB-wire server, talking to `chatfleet mock-llm`, watched through
//! the workers' `/metrics` and `chatfleet status`.

#[macro_use]
mod support;

use std::collections::BTreeMap;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Backend, Broker, Session, assembled_text, echo_of, metric, read_until_terminal_of};

on_every_broker!(
    a_gateway_and_two_worker_processes_serve_many_sessions_and_count_them_in_their_metrics,
    a_token_issued_by_one_gateway_works_on_another_and_replies_stream_to_whichever_holds_the_connection,
    status_shows_messages_waiting_for_a_worker_then_in_flight_then_drained,
);

/// The deployment's partitions: every role's default.
const PARTITIONS: u32 = 16;

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

/// Polls `check` every 200 ms until it gives a value (or fails after `within`, showing the last
/// thing `check` saw).
async fn eventually<T, F: Future<Output = Result<T, String>>>(
    what: &str,
    within: Duration,
    check: impl Fn() -> F,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(seen) if Instant::now() >= deadline => panic!("{what} within {within:?}; last seen: {seen}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// A worker process and the address of its operational endpoints.
struct WorkerProc {
    id: String,
    ops: String,
    proc: Proc,
}

/// Processes of the real binary on a broker and a MongoDB-wire server of the test's own.
struct Fleet {
    broker: Broker,
    _mongo: testkit::MongoServer,
    store: String,
    model: String,
    http: reqwest::Client,
    _mock: Proc,
    gateways: Vec<(String, Proc)>,
    workers: Vec<WorkerProc>,
}

impl Fleet {
    /// The broker, the store and `chatfleet mock-llm` (with `mock_args` added); no gateway, no
    /// worker yet.
    async fn start(backend: Backend, mock_args: &[&str]) -> Fleet {
        llm::install_crypto_provider();
        let (broker, mongo) = tokio::join!(Broker::start(backend, false), testkit::MongoServer::start());
        let mock_port = testkit::free_port();
        let mut args = vec![s("mock-llm"), s("--listen"), format!("127.0.0.1:{mock_port}")];
        args.extend(mock_args.iter().map(|a| s(a)));
        let fleet = Fleet {
            broker: broker.expect("a broker-backed fleet"),
            store: mongo.url_for_db("fleet"),
            _mongo: mongo,
            model: format!("http://127.0.0.1:{mock_port}/v1"),
            http: reqwest::Client::new(),
            _mock: spawn(&args),
            gateways: Vec::new(),
            workers: Vec::new(),
        };
        wait_http_ok(&fleet.http, &format!("{}/models", fleet.model)).await;
        fleet
    }

    /// Starts `n` gateway processes at once (they share the token key through the store) and
    /// waits until each is ready.
    async fn add_gateways(&mut self, n: usize) {
        let mut started = Vec::new();
        for _ in 0..n {
            let port = testkit::free_port();
            let listen = format!("127.0.0.1:{port}");
            let proc = spawn(&[
                s("gateway"),
                s("--listen"),
                listen,
                s("--bus"),
                self.broker.url(),
                s("--store"),
                self.store.clone(),
            ]);
            started.push((format!("http://127.0.0.1:{port}"), proc));
        }
        for (base, _) in &started {
            wait_http_ok(&self.http, &format!("{base}/readyz")).await;
        }
        self.gateways.extend(started);
    }

    fn gateway(&self, index: usize) -> &str {
        &self.gateways[index].0
    }

    /// Starts a worker process and waits until its operational endpoints say it is ready.
    async fn add_worker(&mut self, id: &str) {
        let port = testkit::free_port();
        let proc = spawn(&[
            s("worker"),
            s("--listen"),
            format!("127.0.0.1:{port}"),
            s("--bus"),
            self.broker.url(),
            s("--store"),
            self.store.clone(),
            s("--llm-base-url"),
            self.model.clone(),
            s("--model"),
            s("mock"),
            s("--worker-id"),
            s(id),
        ]);
        let ops = format!("http://127.0.0.1:{port}");
        wait_http_ok(&self.http, &format!("{ops}/readyz")).await;
        self.workers.push(WorkerProc { id: s(id), ops, proc });
    }

    /// Stops the worker as Kubernetes does, by SIGTERM, and returns its exit status.
    async fn stop_worker(&mut self, index: usize) -> ExitStatus {
        let mut worker = self.workers.remove(index);
        let pid = worker.proc.0.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = worker.proc.0.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "worker {} did not exit within 30 s of SIGTERM", worker.id);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A worker's `/metrics`.
    async fn metrics(&self, worker: usize) -> String {
        let url = format!("{}/metrics", self.workers[worker].ops);
        self.http.get(url).send().await.unwrap().text().await.unwrap()
    }

    /// `chatfleet status` with `extra` arguments, as an operator runs it: its standard output.
    async fn status_output(&self, extra: &[&str]) -> String {
        let mut args = vec![s("status"), s("--bus"), self.broker.url()];
        args.extend(extra.iter().map(|a| s(a)));
        let out = tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_chatfleet"))
                .args(args)
                .env("RUST_LOG", "off")
                .output()
                .expect("the binary runs")
        })
        .await
        .unwrap();
        assert!(out.status.success(), "chatfleet status failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// `chatfleet status --json`.
    async fn status(&self) -> Status {
        Status(serde_json::from_str(&self.status_output(&["--json"]).await).expect("status --json prints JSON"))
    }

    async fn create_session(&self, gateway: usize) -> Session {
        let r = self.http.post(format!("{}/v1/sessions", self.gateway(gateway))).send().await.unwrap();
        assert_eq!(r.status(), 201, "creating a session");
        let created: Value = r.json().await.unwrap();
        Session { id: s(created["session_id"].as_str().unwrap()), token: s(created["token"].as_str().unwrap()) }
    }

    /// `POST .../messages` on a gateway, asking for JSON: the message id of an accepted message.
    async fn post_accepted(&self, gateway: usize, session: &Session, text: &str) -> String {
        let r = self
            .http
            .post(format!("{}/v1/sessions/{}/messages", self.gateway(gateway), session.id))
            .bearer_auth(&session.token)
            .json(&json!({"text": text}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "posting {text:?}");
        s(r.json::<Value>().await.unwrap()["message_id"].as_str().unwrap())
    }

    /// `POST .../messages` on a gateway, streaming the reply: every event until it ends.
    async fn send_streaming(&self, gateway: usize, session: &Session, text: &str) -> Vec<support::SseEvent> {
        let r = self
            .http
            .post(format!("{}/v1/sessions/{}/messages", self.gateway(gateway), session.id))
            .bearer_auth(&session.token)
            .header("Accept", "text/event-stream")
            .json(&json!({"text": text}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "streaming {text:?}");
        support::collect_events(r, Duration::from_secs(60)).await
    }

    /// `GET .../events` on a gateway; checks it answered 200.
    async fn open_events(&self, gateway: usize, session: &Session) -> reqwest::Response {
        let url = format!("{}/v1/sessions/{}/events", self.gateway(gateway), session.id);
        let r = self.http.get(url).bearer_auth(&session.token).send().await.unwrap();
        assert_eq!(r.status(), 200, "gateway {gateway} accepts the session's token");
        r
    }

    async fn history(&self, gateway: usize, session: &Session) -> Vec<Value> {
        let url = format!("{}/v1/sessions/{}/messages", self.gateway(gateway), session.id);
        let r = self.http.get(url).bearer_auth(&session.token).send().await.unwrap();
        assert_eq!(r.status(), 200, "reading the history");
        r.json::<Value>().await.unwrap()["messages"].as_array().unwrap().clone()
    }
}

/// What `chatfleet status --json` printed.
struct Status(Value);

impl Status {
    fn workers(&self) -> Vec<&str> {
        self.0["workers"].as_array().unwrap().iter().map(|w| w["worker"].as_str().unwrap()).collect()
    }

    fn partitions(&self) -> &[Value] {
        self.0["partitions"].as_array().unwrap()
    }

    /// Each partition's owner, `None` where it has none.
    fn owners(&self) -> Vec<Option<&str>> {
        self.partitions().iter().map(|p| p["owner"].as_str()).collect()
    }

    /// Each partition's waiting messages, `None` where the bus does not know (on NATS, while a
    /// new owner recreates the partition's consumer).
    fn pending(&self) -> Vec<Option<u64>> {
        self.partitions().iter().map(|p| p["pending"].as_u64()).collect()
    }

    /// Whether every partition is known to have no message waiting.
    fn nothing_pending(&self) -> bool {
        self.pending().iter().all(|&n| n == Some(0))
    }

    /// Each partition's messages being answered. A partition nobody owns has none; RabbitMQ
    /// then gives no figure at all (it learns them from the owners' heartbeats).
    fn in_flight(&self) -> Vec<u64> {
        self.partitions().iter().map(|p| p["in_flight"].as_u64().unwrap_or(0)).collect()
    }
}

/// A session's partition, as the gateway computes it.
fn partition_of(session: &Session) -> usize {
    let count = schemas::PartitionCount::new(PARTITIONS).unwrap();
    count.of(&schemas::SessionId::parse(&session.id).unwrap()).get() as usize
}

async fn a_gateway_and_two_worker_processes_serve_many_sessions_and_count_them_in_their_metrics(backend: Backend) {
    let mut fleet = Fleet::start(backend, &["--first-token-ms", "20", "--token-ms", "2"]).await;
    fleet.add_gateways(1).await;
    fleet.add_worker("w0").await;
    fleet.add_worker("w1").await;
    let owned = |text: &str| metric(text, "chatfleet_worker_owned_partitions");
    // Wait for the fair split before the traffic, so that no message is answered across a
    // hand-over and the counts below are exact.
    eventually("each worker owning half the partitions", Duration::from_secs(30), || async {
        let owned = [owned(&fleet.metrics(0).await), owned(&fleet.metrics(1).await)];
        if owned == [Some(8.0), Some(8.0)] { Ok(()) } else { Err(format!("{owned:?}")) }
    })
    .await;

    let results = futures::future::join_all((0..40).map(|i| {
        let fleet = &fleet;
        async move {
            let session = fleet.create_session(0).await;
            let mut replies = Vec::new();
            for turn in 0..2 {
                let text = format!("session {i} turn {turn} {}", session.id);
                let events = fleet.send_streaming(0, &session, &text).await;
                replies.push((text, events));
            }
            (replies, fleet.history(0, &session).await)
        }
    }))
    .await;
    let metrics = [fleet.metrics(0).await, fleet.metrics(1).await];

    for (replies, messages) in results {
        assert_eq!(messages.len(), 4);
        for (turn, (text, events)) in replies.iter().enumerate() {
            let done = events.last().unwrap();
            assert_eq!(done.event, "done");
            let reply = done.data["text"].as_str().unwrap();
            assert!(reply.starts_with(&echo_of(text)), "{reply}");
            assert_eq!(assembled_text(events), reply);
            assert_eq!(messages[2 * turn]["text"], text.as_str());
            assert_eq!(messages[2 * turn + 1]["text"], reply);
        }
    }
    let replied: Vec<f64> = metrics
        .iter()
        .map(|m| metric(m, r#"chatfleet_worker_messages_total{outcome="replied"}"#).unwrap_or(0.0))
        .collect();
    assert_eq!(replied.iter().sum::<f64>(), 80.0, "every message answered once, counted by its worker: {replied:?}");
    assert!(replied.iter().all(|&n| n > 0.0), "both workers answered some of the 40 sessions: {replied:?}");
    for m in &metrics {
        assert_eq!(owned(m), Some(8.0), "{m}");
        assert_eq!(metric(m, "chatfleet_worker_running_partitions"), Some(8.0), "a runner per owned partition: {m}");
        assert_eq!(metric(m, "chatfleet_worker_inflight_generations"), Some(0.0), "nothing left running: {m}");
    }
}

/// The reply the events of one message add up to, checked against its `done`; the message is
/// `text`'s.
fn reply_of(events: &[support::SseEvent], message_id: &str, text: &str) -> String {
    let events: Vec<_> = events.iter().filter(|e| e.data["message_id"] == message_id).cloned().collect();
    let done = events.last().unwrap_or_else(|| panic!("no event of {message_id}"));
    assert_eq!(done.event, "done", "{events:#?}");
    let reply = done.data["text"].as_str().unwrap();
    assert!(reply.starts_with(&echo_of(text)), "{reply}");
    assert_eq!(assembled_text(&events), reply, "every delta reached the stream");
    reply.to_owned()
}

async fn a_token_issued_by_one_gateway_works_on_another_and_replies_stream_to_whichever_holds_the_connection(
    backend: Backend,
) {
    let mut fleet = Fleet::start(backend, &["--first-token-ms", "20", "--token-ms", "5"]).await;
    // Started together, with no CHATFLEET_TOKEN_KEY: they agree on the key through the store.
    fleet.add_gateways(2).await;
    fleet.add_worker("w0").await;
    let (a, b) = (0, 1);
    let session = fleet.create_session(a).await;
    let texts = ["posted on A, heard on B", "posted on B, heard on A", "streamed from B"];

    let listening_on_b = fleet.open_events(b, &session).await;
    let posted_on_a = fleet.post_accepted(a, &session, texts[0]).await;
    let heard_on_b = read_until_terminal_of(listening_on_b, &posted_on_a, Duration::from_secs(30)).await;
    let listening_on_a = fleet.open_events(a, &session).await;
    let posted_on_b = fleet.post_accepted(b, &session, texts[1]).await;
    let heard_on_a = read_until_terminal_of(listening_on_a, &posted_on_b, Duration::from_secs(30)).await;
    let streamed = fleet.send_streaming(b, &session, texts[2]).await;
    let history = fleet.history(a, &session).await;

    let streamed_id = streamed.last().unwrap().data["message_id"].as_str().unwrap().to_owned();
    let replies = [
        reply_of(&heard_on_b, &posted_on_a, texts[0]),
        reply_of(&heard_on_a, &posted_on_b, texts[1]),
        reply_of(&streamed, &streamed_id, texts[2]),
    ];
    let stored: Vec<&str> = history.iter().map(|m| m["text"].as_str().unwrap()).collect();
    let expected = [texts[0], &replies[0], texts[1], &replies[1], texts[2], &replies[2]];
    assert_eq!(stored, expected, "{history:#?}");
}

/// The rows of `chatfleet status`'s table, `partition owner fence pending in-flight`, by
/// partition.
fn table_rows(table: &str) -> BTreeMap<usize, Vec<&str>> {
    let cells = table.lines().map(|line| line.split_whitespace().collect::<Vec<_>>());
    let rows = cells.filter(|cells| cells.len() == 5 && cells[0].parse::<usize>().is_ok());
    rows.map(|cells| (cells[0].parse().unwrap(), cells)).collect()
}

/// A fleet whose only worker has come and gone: the deployment scaled to zero. The worker
/// leaves the partitions' consumers behind (on NATS, a partition nobody ever consumed has no
/// backlog figure). Returns the worker's exit status too.
async fn scaled_to_zero(backend: Backend) -> (Fleet, ExitStatus) {
    let mut fleet = Fleet::start(backend, &["--first-token-ms", "20", "--token-ms", "2"]).await;
    fleet.add_gateways(1).await;
    fleet.add_worker("w0").await;
    eventually("w0 owning every partition", Duration::from_secs(30), || async {
        let status = fleet.status().await;
        let owners = status.owners();
        if owners.iter().all(|o| *o == Some("w0")) { Ok(()) } else { Err(format!("{owners:?}")) }
    })
    .await;
    let exit = fleet.stop_worker(0).await;
    (fleet, exit)
}

async fn status_shows_messages_waiting_for_a_worker_then_in_flight_then_drained(backend: Backend) {
    let (mut fleet, w0_exit) = scaled_to_zero(backend).await;
    let sessions = futures::future::join_all((0..6).map(|_| fleet.create_session(0))).await;
    for session in &sessions {
        for turn in ["first", "second"] {
            fleet.post_accepted(0, session, turn).await;
        }
    }
    // Answered only after 10 s: long enough to be seen in flight (a new worker takes the
    // backlog within about a second here).
    let slow = fleet.create_session(0).await;
    fleet.post_accepted(0, &slow, "take your time [mock:stall=10000]").await;
    let mut expected = vec![0u64; PARTITIONS as usize];
    for session in &sessions {
        expected[partition_of(session)] += 2;
    }
    expected[partition_of(&slow)] += 1;

    let waiting = fleet.status().await;
    let table = fleet.status_output(&[]).await;
    fleet.add_worker("w1").await;
    let answering =
        eventually("the quick messages answered and the slow one in flight", Duration::from_secs(10), || {
            let fleet = &fleet;
            let sessions = &sessions;
            async move {
                let status = fleet.status().await;
                let mut unanswered = 0;
                for session in sessions {
                    unanswered += 4usize.saturating_sub(fleet.history(0, session).await.len());
                }
                let settled = status.nothing_pending() && status.in_flight().iter().sum::<u64>() == 1;
                if unanswered == 0 && settled {
                    Ok(status)
                } else {
                    Err(format!("{unanswered} replies missing; {}", status.0))
                }
            }
        })
        .await;
    let drained = eventually("every message answered", Duration::from_secs(30), || async {
        let status = fleet.status().await;
        let answered = fleet.history(0, &slow).await.len() == 2;
        if answered && status.nothing_pending() && status.in_flight().iter().all(|&n| n == 0) {
            Ok(status)
        } else {
            Err(format!("{}", status.0))
        }
    })
    .await;
    let w1_metrics = fleet.metrics(0).await;

    assert!(w0_exit.success(), "SIGTERM exits 0: {w0_exit}");
    assert!(waiting.workers().is_empty(), "{}", waiting.0);
    assert!(waiting.owners().iter().all(Option::is_none), "{}", waiting.0);
    assert_eq!(waiting.pending(), expected.iter().map(|&n| Some(n)).collect::<Vec<_>>(), "each partition's backlog");
    assert_eq!(waiting.in_flight(), vec![0; PARTITIONS as usize]);
    let rows = table_rows(&table);
    assert_eq!(rows.len(), PARTITIONS as usize, "{table}");
    for (partition, cells) in &rows {
        assert_eq!(cells[1], "(none)", "{table}");
        assert_eq!(cells[3], expected[*partition].to_string(), "partition {partition}'s pending figure: {table}");
    }
    let mut slow_only = vec![0u64; PARTITIONS as usize];
    slow_only[partition_of(&slow)] = 1;
    assert_eq!(answering.in_flight(), slow_only, "only the slow message is in flight, on its partition");
    assert_eq!(answering.workers(), ["w1"]);
    assert!(drained.owners().iter().all(|o| *o == Some("w1")), "{}", drained.0);
    assert_eq!(metric(&w1_metrics, r#"chatfleet_worker_messages_total{outcome="replied"}"#), Some(13.0));
    assert_eq!(metric(&w1_metrics, "chatfleet_worker_owned_partitions"), Some(16.0));
}
