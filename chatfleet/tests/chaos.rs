//! Chaos under load: worker processes killed, added, removed and stopped, and the broker
//! restarted, while users keep chatting, with the workers' default ownership settings. Every
//! test checks the same promises: every accepted message is answered exactly once, each
//! session's order is kept, and histories are consistent; crash failover and rebalancing happen
//! within the bounds the docs state. Kill moments and victims are random from a seed that each
//! test prints (`CHATFLEET_CHAOS_SEED=<seed>` replays it). Every test runs on NATS and on RabbitMQ.

#[macro_use]
mod support;

use std::collections::{BTreeMap, HashMap};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus::Bus;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{Value, json};
use support::{Backend, Options, Session, TestApp, echo_of};

on_every_broker!(
    killing_workers_at_random_loses_nothing_and_answers_once,
    a_crash_a_join_and_a_scale_in_overlapping_under_load_leave_no_partition_unowned,
    new_workers_take_over_a_fleet_whose_every_worker_crashed,
    scaling_one_to_four_to_one_worker_mid_load_keeps_every_promise,
    sigterm_during_generation_finishes_in_flight_replies_and_exits_0,
    sigterm_with_a_grace_shorter_than_the_replies_hands_them_to_the_next_owner,
    restarting_the_broker_mid_run_loses_nothing_and_answers_once,
    a_reply_cut_by_a_crash_restarts_elsewhere_with_a_reset_and_one_done,
    a_reply_cut_by_kill_9_resumes_from_its_last_event_id_on_another_gateway_with_nothing_missing_or_repeated,
);
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

const PARTITIONS: u32 = 8;

/// Crash failover at the default settings (3 s leases), from the kill until every partition
/// has a live owner: the bound ARCHITECTURE.md and the README promise.
const FAILOVER_BOUND: Duration = Duration::from_secs(5);

/// Rebalancing after a worker joins or leaves gracefully, until every live worker holds its
/// fair share: the bound ARCHITECTURE.md states.
const REBALANCE_BOUND: Duration = Duration::from_secs(10);

/// The random source of a chaos test, from `CHATFLEET_CHAOS_SEED` or a fresh seed; the seed is
/// printed, so that a failure shows how to replay it.
fn chaos_rng(test: &str) -> StdRng {
    let seed = std::env::var("CHATFLEET_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random::<u64>());
    println!("{test}: chaos seed {seed} (replay with CHATFLEET_CHAOS_SEED={seed})");
    StdRng::seed_from_u64(seed)
}

fn jitter(rng: &mut StdRng, min_ms: u64, max_ms: u64) -> Duration {
    Duration::from_millis(rng.random_range(min_ms..=max_ms))
}

/// A worker process of the real binary.
struct WorkerProc {
    id: String,
    child: Child,
}

impl WorkerProc {
    fn kill_9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit status.
    async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "worker {} did not exit within 30 s of SIGTERM", self.id);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fleet whose workers are separate processes.
struct Fleet {
    app: TestApp,
    /// The fleet's bus as an operator's `chatfleet status` sees it.
    bus: Arc<dyn Bus>,
    workers: Vec<WorkerProc>,
    next_id: usize,
    /// Every worker's log, shown when a test fails ([`Fleet::logs`]).
    log_dir: tempfile::TempDir,
}

impl Fleet {
    async fn start(backend: Backend, workers: usize, options: Options) -> Fleet {
        llm::install_crypto_provider();
        let app = TestApp::spawn_with(backend, Options { workers: 0, partitions: PARTITIONS, ..options }).await;
        let partitions = schemas::PartitionCount::new(PARTITIONS).unwrap();
        let ownership = bus::OwnershipSettings::default();
        let bus: Arc<dyn Bus> = match backend {
            Backend::NatsMongo => {
                let mut settings = bus::NatsSettings::new(app.bus_url(), partitions);
                settings.ownership = ownership;
                Arc::new(bus::NatsBus::connect(settings).await.unwrap())
            }
            Backend::RabbitMongo => {
                let mut settings = bus::AmqpSettings::new(app.bus_url(), partitions);
                settings.ownership = ownership;
                Arc::new(bus::AmqpBus::connect(settings).await.unwrap())
            }
            Backend::Dev => panic!("chaos needs worker processes and a broker"),
        };
        let log_dir = tempfile::tempdir().expect("a directory for worker logs");
        let mut fleet = Fleet { app, bus, workers: Vec::new(), next_id: 0, log_dir };
        for _ in 0..workers {
            fleet.add_worker();
        }
        if workers > 0 {
            fleet.wait_balanced(Duration::from_secs(60)).await;
        }
        fleet
    }

    fn add_worker(&mut self) -> String {
        self.add_worker_with(&[])
    }

    /// Starts a worker with the default ownership settings and these extra arguments.
    fn add_worker_with(&mut self, extra: &[&str]) -> String {
        let id = format!("w{}", self.next_id);
        self.next_id += 1;
        let log = std::fs::File::create(self.log_dir.path().join(format!("{id}.log"))).expect("a worker log file");
        let app = &self.app;
        let child = Command::new(env!("CARGO_BIN_EXE_chatfleet"))
            .args(["worker", "--listen", &format!("127.0.0.1:{}", testkit::free_port())])
            .args(["--bus", &app.bus_url()])
            .args(["--store", &app.mongo.as_ref().unwrap().url_for_db("chatfleet_test")])
            .args(["--partitions", &PARTITIONS.to_string()])
            .args(["--llm-base-url", &app.mock.base_url, "--model", "mock"])
            .args(["--worker-id", &id])
            .args(extra)
            .env("RUST_LOG", std::env::var("CHATFLEET_TEST_WORKER_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::from(log.try_clone().expect("the worker log can be shared")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("the worker starts");
        self.workers.push(WorkerProc { id: id.clone(), child });
        id
    }

    /// Whether a worker's log mentions `text`.
    fn log_mentions(&self, id: &str, text: &str) -> bool {
        std::fs::read_to_string(self.log_dir.path().join(format!("{id}.log"))).unwrap_or_default().contains(text)
    }

    /// The last lines of every worker's log, for a failure message.
    fn logs(&self) -> String {
        let mut out = String::new();
        for id in 0..self.next_id {
            let text = std::fs::read_to_string(self.log_dir.path().join(format!("w{id}.log"))).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("---- worker w{id} (last 40 lines)\n"));
            for line in &lines[lines.len().saturating_sub(40)..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    fn take_worker(&mut self, index: usize) -> WorkerProc {
        self.workers.remove(index)
    }

    fn live_ids(&self) -> Vec<String> {
        self.workers.iter().map(|w| w.id.clone()).collect()
    }

    /// Waits until every partition has a live owner among the running workers and each holds
    /// its fair share (within one); returns how long that took.
    async fn wait_balanced(&self, within: Duration) -> Duration {
        self.wait_until(within, "balanced", true).await
    }

    /// Waits until every partition has a live owner among the running workers, however
    /// balanced; returns how long that took.
    async fn wait_owned(&self, within: Duration) -> Duration {
        self.wait_until(within, "owned", false).await
    }

    async fn wait_until(&self, within: Duration, what: &str, balanced: bool) -> Duration {
        let started = Instant::now();
        let live = self.live_ids();
        loop {
            if let Ok(status) = self.bus.status().await {
                let mut load: BTreeMap<String, usize> = live.iter().map(|w| (w.clone(), 0)).collect();
                let mut all_owned = true;
                for p in &status.partitions {
                    match p.owner.as_ref().and_then(|o| load.get_mut(o)) {
                        Some(count) => *count += 1,
                        None => all_owned = false,
                    }
                }
                let fair = PARTITIONS as usize / live.len().max(1);
                if all_owned && (!balanced || load.values().all(|&l| l >= fair && l <= fair + 1)) {
                    return started.elapsed();
                }
            }
            assert!(
                started.elapsed() < within,
                "partitions not {what} over {live:?} within {within:?}; the workers' logs:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Per session, the messages the gateway accepted: (message id, text), in order.
type Accepted = Arc<Mutex<HashMap<String, Vec<(String, String)>>>>;

/// Users chatting: each session sends numbered messages one after another, resending with the
/// same `client_message_id` when the gateway answers 503, and records what was accepted.
struct Load {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    accepted: Accepted,
    sessions: Vec<Session>,
}

impl Load {
    async fn start(app: &TestApp, sessions: usize, think: Duration) -> Load {
        let stop = CancellationToken::new();
        let accepted: Accepted = Arc::default();
        let sessions: Vec<Session> = futures::future::join_all((0..sessions).map(|_| app.create_session())).await;
        let mut tasks = Vec::new();
        for (i, session) in sessions.iter().cloned().enumerate() {
            let (http, base, stop, accepted) = (app.http.clone(), app.base.clone(), stop.clone(), accepted.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = 0;
                while !stop.is_cancelled() {
                    let text = format!("user {i} message {n}");
                    let body = json!({"text": text, "client_message_id": format!("m{n}")});
                    // Once sent, a message is resent until it is accepted, so that "accepted"
                    // is never in doubt when the test checks.
                    let deadline = Instant::now() + Duration::from_secs(60);
                    let message_id = loop {
                        let r = http
                            .post(format!("{base}/v1/sessions/{}/messages", session.id))
                            .bearer_auth(&session.token)
                            .json(&body)
                            .send()
                            .await;
                        if let Ok(r) = r {
                            if r.status() == 202 {
                                let v: Value = r.json().await.unwrap();
                                break v["message_id"].as_str().unwrap().to_owned();
                            }
                            assert_eq!(r.status(), 503, "only a broker outage may refuse a message");
                        }
                        assert!(Instant::now() < deadline, "a message was refused for 60 s");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    };
                    accepted.lock().unwrap().entry(session.id.clone()).or_default().push((message_id, text));
                    n += 1;
                    tokio::time::sleep(think).await;
                }
            }));
        }
        Load { stop, tasks, accepted, sessions }
    }

    /// How many messages the gateway has accepted so far.
    fn accepted_so_far(&self) -> usize {
        self.accepted.lock().unwrap().values().map(Vec::len).sum()
    }

    /// Waits until the gateway has accepted `more` messages beyond `since`: the fleet serves.
    async fn wait_accepted_beyond(&self, since: usize, more: usize, within: Duration) {
        let started = Instant::now();
        while self.accepted_so_far() < since + more {
            assert!(started.elapsed() < within, "fewer than {more} messages accepted within {within:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops sending, waits for every accepted message's reply, and checks every promise.
    async fn finish_and_verify(self, app: &TestApp) -> usize {
        self.stop.cancel();
        for task in self.tasks {
            task.await.expect("a load task failed");
        }
        let accepted = self.accepted.lock().unwrap().clone();
        let mut total = 0;
        for session in &self.sessions {
            let sent = accepted.get(&session.id).cloned().unwrap_or_default();
            total += sent.len();
            // Users send faster than a fleet on two cores answers, so a backlog builds up whose
            // size depends on the machine: what is checked is that it drains, not how fast.
            let history = app.wait_for_replies_while_progressing(session, sent.len(), Duration::from_secs(30)).await;
            assert_eq!(history.len(), sent.len() * 2, "session {}: {history:#?}", session.id);
            for (i, (message_id, text)) in sent.iter().enumerate() {
                let (user, reply) = (&history[2 * i], &history[2 * i + 1]);
                assert_eq!(user["role"], "user");
                if user["message_id"] != message_id.as_str() {
                    let answered: Vec<&Value> =
                        history.iter().filter(|m| m["role"] == "user").map(|m| &m["message_id"]).collect();
                    let sent: Vec<&String> = sent.iter().map(|(id, _)| id).collect();
                    panic!(
                        "order broken in session {} at message {i}: sent {sent:?}, history {answered:?}",
                        session.id
                    );
                }
                assert_eq!(&user["text"], text.as_str());
                assert_eq!(reply["role"], "assistant");
                assert_eq!(reply["reply_to"], user["message_id"], "exactly one reply, right after its message");
                assert!(
                    reply["text"].as_str().unwrap().starts_with(&echo_of(text)),
                    "the reply answers its own message"
                );
            }
        }
        total
    }
}

fn quick_replies() -> Options {
    Options { first_token_ms: 20, token_ms: 10, reply_tokens: 12, ..Options::default() }
}

async fn killing_workers_at_random_loses_nothing_and_answers_once(backend: Backend) {
    let mut rng = chaos_rng("killing_workers_at_random");
    let mut fleet = Fleet::start(backend, 3, quick_replies()).await;
    // Three rounds of kill, failover and rebalance make this the longest load of the suite:
    // users pause 150 ms between messages, so that the backlog they leave stays within what the
    // test's time allows the fleet to drain.
    let load = Load::start(&fleet.app, 24, Duration::from_millis(150)).await;

    let mut failovers = Vec::new();
    for _ in 0..3 {
        tokio::time::sleep(jitter(&mut rng, 300, 2000)).await;
        let victim = rng.random_range(0..fleet.workers.len());
        let mut worker = fleet.take_worker(victim);
        worker.kill_9();
        let accepted = load.accepted_so_far();
        failovers.push(fleet.wait_owned(FAILOVER_BOUND).await);
        load.wait_accepted_beyond(accepted, 10, Duration::from_secs(30)).await;
        fleet.add_worker();
        fleet.wait_balanced(REBALANCE_BOUND).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let answered = load.finish_and_verify(&fleet.app).await;

    println!(
        "kill -9 failover (kill to every partition owned by a live worker): {failovers:?}; {answered} messages answered once each"
    );
    assert!(answered > 100, "the load ran: {answered}");
}

/// An operator's bad minute: a worker crashes, a new one is started while the crash is being
/// detected, and another is scaled in while the first two changes are still settling.
async fn a_crash_a_join_and_a_scale_in_overlapping_under_load_leave_no_partition_unowned(backend: Backend) {
    let mut rng = chaos_rng("a_crash_a_join_and_a_scale_in_overlapping");
    let mut fleet = Fleet::start(backend, 3, quick_replies()).await;
    let load = Load::start(&fleet.app, 48, Duration::from_millis(100)).await;
    tokio::time::sleep(jitter(&mut rng, 500, 1500)).await;

    let victim = rng.random_range(0..fleet.workers.len());
    fleet.take_worker(victim).kill_9();
    tokio::time::sleep(jitter(&mut rng, 1000, 2000)).await;
    fleet.add_worker();
    tokio::time::sleep(jitter(&mut rng, 1000, 2000)).await;
    let leaving = rng.random_range(0..fleet.workers.len());
    let status = fleet.take_worker(leaving).terminate().await;
    let settled = fleet.wait_balanced(REBALANCE_BOUND).await;
    let accepted = load.accepted_so_far();
    load.wait_accepted_beyond(accepted, 20, Duration::from_secs(30)).await;
    let answered = load.finish_and_verify(&fleet.app).await;

    println!("crash, join and scale-in overlapping: balanced {settled:?} after the scale-in; {answered} messages");
    assert!(status.success(), "SIGTERM exits 0: {status:?}");
    assert!(answered > 100, "the load ran: {answered}");
}

/// Every worker crashes at once and new ones start: they learn the dead workers' leases, which
/// will never change again, and take them once they expire.
async fn new_workers_take_over_a_fleet_whose_every_worker_crashed(backend: Backend) {
    let mut rng = chaos_rng("new_workers_take_over_a_fleet_whose_every_worker_crashed");
    let options = Options { first_token_ms: 50, token_ms: 20, reply_tokens: 40, ..Options::default() };
    let mut fleet = Fleet::start(backend, 2, options).await;
    let load = Load::start(&fleet.app, 24, Duration::from_millis(100)).await;
    tokio::time::sleep(jitter(&mut rng, 800, 2000)).await;

    let killed_at = Instant::now();
    while !fleet.workers.is_empty() {
        fleet.take_worker(0).kill_9();
    }
    fleet.add_worker();
    fleet.add_worker();
    fleet.wait_owned(FAILOVER_BOUND).await;
    let failover = killed_at.elapsed();
    let answered = load.finish_and_verify(&fleet.app).await;

    println!(
        "every worker killed, two new ones started: every partition owned {failover:?} after the kill; {answered} messages"
    );
    assert!(answered > 50, "the load ran: {answered}");
}

async fn scaling_one_to_four_to_one_worker_mid_load_keeps_every_promise(backend: Backend) {
    let mut fleet = Fleet::start(backend, 1, quick_replies()).await;
    let load = Load::start(&fleet.app, 24, Duration::from_millis(50)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let started = Instant::now();
    for _ in 0..3 {
        fleet.add_worker();
    }
    let scale_out = fleet.wait_balanced(REBALANCE_BOUND).await;
    let spread = started.elapsed();
    let accepted = load.accepted_so_far();
    load.wait_accepted_beyond(accepted, 20, Duration::from_secs(30)).await;
    let started = Instant::now();
    let mut exits = Vec::new();
    while fleet.workers.len() > 1 {
        exits.push(fleet.take_worker(0).terminate().await);
    }
    let scale_in = fleet.wait_balanced(REBALANCE_BOUND).await;
    let drained = started.elapsed();
    let accepted = load.accepted_so_far();
    load.wait_accepted_beyond(accepted, 20, Duration::from_secs(30)).await;
    let answered = load.finish_and_verify(&fleet.app).await;

    println!(
        "scale 1→4: balanced {:?} after the new workers started ({scale_out:?} of polling); 4→1 by SIGTERM: {drained:?} ({scale_in:?} after the last exit); {answered} messages",
        spread,
    );
    assert!(exits.iter().all(|s| s.success()), "SIGTERM exits 0: {exits:?}");
    assert!(answered > 100, "the load ran: {answered}");
}

async fn sigterm_during_generation_finishes_in_flight_replies_and_exits_0(backend: Backend) {
    let options = Options { first_token_ms: 50, token_ms: 20, reply_tokens: 100, ..Options::default() };
    let mut fleet = Fleet::start(backend, 2, options).await;
    let load = Load::start(&fleet.app, 16, Duration::from_millis(300)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let started = Instant::now();
    let status = fleet.take_worker(0).terminate().await;
    let stopped_in = started.elapsed();
    fleet.wait_balanced(REBALANCE_BOUND).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let answered = load.finish_and_verify(&fleet.app).await;

    println!("SIGTERM with replies of about 2 s in flight: exited after {stopped_in:?}; {answered} messages");
    assert!(status.success(), "{status:?}");
    assert!(answered > 20, "the load ran: {answered}");
}

/// A worker told to stop with less grace than its replies need abandons them unacknowledged;
/// the next owner of each partition answers them from the start, once.
async fn sigterm_with_a_grace_shorter_than_the_replies_hands_them_to_the_next_owner(backend: Backend) {
    let mut rng = chaos_rng("sigterm_with_a_grace_shorter_than_the_replies");
    // Replies take about 4 s; the stopping worker may take 1 s.
    let options = Options { first_token_ms: 50, token_ms: 40, reply_tokens: 100, ..Options::default() };
    let mut fleet = Fleet::start(backend, 0, options).await;
    let stopping = fleet.add_worker_with(&["--shutdown-grace", "1"]);
    let staying = fleet.add_worker();
    fleet.wait_balanced(REBALANCE_BOUND).await;
    let load = Load::start(&fleet.app, 16, Duration::from_millis(300)).await;
    tokio::time::sleep(jitter(&mut rng, 1500, 2500)).await;

    let started = Instant::now();
    let index = fleet.workers.iter().position(|w| w.id == stopping).unwrap();
    let status = fleet.take_worker(index).terminate().await;
    let stopped_in = started.elapsed();
    fleet.wait_balanced(REBALANCE_BOUND).await;
    let answered = load.finish_and_verify(&fleet.app).await;

    println!(
        "SIGTERM with 1 s of grace and replies of about 4 s in flight: exited after {stopped_in:?}; {answered} messages"
    );
    assert!(status.success(), "{status:?}");
    assert!(stopped_in < Duration::from_secs(4), "the grace bounds the stop: {stopped_in:?}");
    assert!(fleet.log_mentions(&stopping, "message_abandoned"), "replies were left unfinished:\n{}", fleet.logs());
    assert!(fleet.log_mentions(&staying, "generation_restarted"), "the next owner restarted them:\n{}", fleet.logs());
}

async fn restarting_the_broker_mid_run_loses_nothing_and_answers_once(backend: Backend) {
    let mut rng = chaos_rng("restarting_the_broker_mid_run");
    let options = Options { private_broker: true, ..quick_replies() };
    let mut fleet = Fleet::start(backend, 2, options).await;
    let load = Load::start(&fleet.app, 16, Duration::from_millis(50)).await;
    tokio::time::sleep(jitter(&mut rng, 500, 1500)).await;

    let started = Instant::now();
    fleet.app.broker_mut().stop().await;
    tokio::time::sleep(jitter(&mut rng, 500, 1500)).await;
    fleet.app.broker_mut().restart().await;
    let recovered = fleet.wait_balanced(Duration::from_secs(30)).await;
    let outage = started.elapsed();
    let accepted = load.accepted_so_far();
    load.wait_accepted_beyond(accepted, 20, Duration::from_secs(30)).await;
    let answered = load.finish_and_verify(&fleet.app).await;

    println!(
        "broker restart: partitions owned again {outage:?} after the kill ({recovered:?} after restart); {answered} messages"
    );
    assert!(answered > 50, "the load ran: {answered}");
}

async fn a_reply_cut_by_a_crash_restarts_elsewhere_with_a_reset_and_one_done(backend: Backend) {
    let options = Options { first_token_ms: 20, token_ms: 30, reply_tokens: 80, ..Options::default() };
    let mut fleet = Fleet::start(backend, 2, options).await;
    let session = fleet.app.create_session().await;
    let partition =
        schemas::PartitionCount::new(PARTITIONS).unwrap().of(&schemas::SessionId::parse(&session.id).unwrap());
    let status = fleet.bus.status().await.unwrap();
    let owner = status.partitions[partition.get() as usize].owner.clone().expect("the partition has an owner");
    let listener = fleet
        .app
        .http
        .get(fleet.app.url(&format!("/v1/sessions/{}/events", session.id)))
        .bearer_auth(&session.token)
        .send()
        .await
        .unwrap();
    let mut events = listener.bytes_stream().eventsource();
    let log_dir = fleet.log_dir.path().to_owned();
    let broker_log = match fleet.app.broker.as_ref() {
        Some(support::Broker::Nats(server)) => Some(server.work_dir().join("nats-server.log")),
        _ => None,
    };
    let mut next_event = async || {
        let Ok(e) = tokio::time::timeout(Duration::from_secs(45), events.next()).await else {
            let mut logs = String::new();
            for entry in std::fs::read_dir(&log_dir).unwrap().flatten() {
                logs.push_str(&format!(
                    "---- {}\n{}\n",
                    entry.path().display(),
                    std::fs::read_to_string(entry.path()).unwrap_or_default()
                ));
            }
            if let Some(path) = &broker_log {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                logs.push_str(&format!("---- broker log (last 40 lines, newest first)\n{}\n", tail.join("\n")));
            }
            let session_partition = partition.get();
            panic!("no event within 45 s (the session is in partition {session_partition}); the logs:\n{logs}");
        };
        let e = e.unwrap().unwrap();
        support::SseEvent { event: e.event, id: e.id, data: serde_json::from_str(&e.data).unwrap() }
    };

    let text = "a long answer please";
    assert_eq!(fleet.app.post_message(&session, json!({"text": text})).await.status(), 202);
    // Wait for the first deltas, then crash the worker generating them.
    let mut rest = vec![next_event().await];
    assert_eq!(rest[0].event, "delta");
    let victim = fleet.workers.iter().position(|w| w.id == owner).expect("the owner is one of ours");
    let killed_at = Instant::now();
    fleet.take_worker(victim).kill_9();
    while rest.last().unwrap().event != "done" {
        rest.push(next_event().await);
    }
    let restarted_after = killed_at.elapsed();

    let reset = rest.iter().position(|e| e.event == "reset").expect("a reset announces the restart");
    let done = rest.last().unwrap();
    assert_eq!(done.event, "done");
    assert_eq!(support::assembled_text(&rest[reset..]), done.data["text"].as_str().unwrap());
    assert!(done.data["text"].as_str().unwrap().starts_with(&echo_of(text)));
    let ids: Vec<&str> = rest.iter().map(|e| e.id.as_str()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "event ids keep increasing across the restart: {ids:?}");
    let history = fleet.app.history(&session).await;
    assert_eq!(history.len(), 2, "{history:#?}");
    println!("a reply cut by kill -9 was restarted and completed {restarted_after:?} after the kill");
}

/// The resume promise across a worker crash (http-api.md, "Resume"): the client's connection
/// drops, the worker generating the reply is killed with SIGKILL, and the client resumes from
/// the last id it saw on another gateway: it gets the rest of the first generation, the `reset`
/// of the restart and the new reply, with every event once.
async fn a_reply_cut_by_kill_9_resumes_from_its_last_event_id_on_another_gateway_with_nothing_missing_or_repeated(
    backend: Backend,
) {
    let options = Options { first_token_ms: 20, token_ms: 40, reply_tokens: 80, ..Options::default() };
    let mut fleet = Fleet::start(backend, 2, options).await;
    let other_gateway = fleet.app.add_gateway().await;
    let session = fleet.app.create_session().await;
    let partition =
        schemas::PartitionCount::new(PARTITIONS).unwrap().of(&schemas::SessionId::parse(&session.id).unwrap());
    let status = fleet.bus.status().await.unwrap();
    let owner = status.partitions[partition.get() as usize].owner.clone().expect("the partition has an owner");
    let text = "a reply the worker will not finish";
    let response = fleet
        .app
        .http
        .post(fleet.app.url(&format!("/v1/sessions/{}/messages", session.id)))
        .bearer_auth(&session.token)
        .header("Accept", "text/event-stream")
        .json(&json!({"text": text}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream().eventsource();
    let mut before = Vec::new();
    while before.len() < 3 {
        let e =
            tokio::time::timeout(Duration::from_secs(20), stream.next()).await.expect("deltas came").unwrap().unwrap();
        before.push(support::SseEvent { event: e.event, id: e.id, data: serde_json::from_str(&e.data).unwrap() });
    }
    assert!(before.iter().all(|e| e.event == "delta"), "{before:?}");

    drop(stream);
    let victim = fleet.workers.iter().position(|w| w.id == owner).expect("the owner is one of ours");
    fleet.take_worker(victim).kill_9();
    let resumed = fleet
        .app
        .http
        .get(format!("{other_gateway}/v1/sessions/{}/events", session.id))
        .bearer_auth(&session.token)
        .header("Last-Event-ID", &before.last().unwrap().id)
        .send()
        .await
        .unwrap();
    assert_eq!(resumed.status(), 200);
    let after = support::read_until_terminals(resumed, 1, Duration::from_secs(45)).await;

    let all: Vec<&support::SseEvent> = before.iter().chain(&after).collect();
    let ids: Vec<&str> = all.iter().map(|e| e.id.as_str()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "every event once, ids increasing: {ids:?}");
    // Each generation's deltas are 0, 1, 2, ... with no gap and no repeat.
    let generations: Vec<&[&support::SseEvent]> = all.split(|e| e.event == "reset").collect();
    assert!(generations.len() >= 2, "the restart shows as a reset: {ids:?}");
    for generation in &generations {
        let indexes: Vec<u64> =
            generation.iter().filter(|e| e.event == "delta").map(|e| e.data["index"].as_u64().unwrap()).collect();
        assert_eq!(indexes, (0..indexes.len() as u64).collect::<Vec<_>>(), "each delta once: {ids:?}");
    }
    let done = all.last().unwrap();
    assert_eq!(done.event, "done", "{ids:?}");
    let last: Vec<support::SseEvent> = generations.last().unwrap().iter().map(|e| (*e).clone()).collect();
    assert_eq!(support::assembled_text(&last), done.data["text"].as_str().unwrap(), "the new reply, whole");
    assert!(done.data["text"].as_str().unwrap().starts_with(&echo_of(text)));
    assert_eq!(fleet.app.history(&session).await.len(), 2, "one reply stored");
}
