//! Store faults: the MongoDB-wire server killed and restarted while users chat. Every accepted
//! message is answered exactly once and in order, every listener sees one `done` per message,
//! the gateway's and the workers' `/readyz` follow the store down and back up, and the fleet
//! recovers within the bound ARCHITECTURE.md states. The outage's moment and length are random
//! from a printed seed (`CHATFLEET_CHAOS_SEED=<seed>` replays it). Runs on NATS and on RabbitMQ,
//! with worker processes of the real binary.

#[macro_use]
mod support;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use support::{Backend, Options, Session, TestApp, echo_of};
use tokio_util::sync::CancellationToken;

on_every_broker!(killing_the_store_mid_load_loses_nothing_answers_once_and_readiness_follows_it);

/// How soon after the store dies every `/readyz` must say 503: the readiness probe's own
/// timeout (1 s) plus a slow machine's margin.
const NOT_READY_BOUND: Duration = Duration::from_secs(5);

/// How soon after the store is back every `/readyz` must say 200 and the first held message be
/// answered: the bound ARCHITECTURE.md states (measured: under a second; a worker's store
/// retries back off to at most 5 s).
const RECOVERY_BOUND: Duration = Duration::from_secs(5);

/// How soon after the store is back every message held by the outage must be answered: about
/// 500 of them here, accepted while the gateway still knew their sessions (measured: 5.4 to 8.4 s).
const BACKLOG_BOUND: Duration = Duration::from_secs(20);

/// The longest a refused request may take: the driver's 2 s server-selection timeout and a
/// margin for a busy machine.
const REFUSAL_BOUND: Duration = Duration::from_secs(4);

/// The random source of the test, from `CHATFLEET_CHAOS_SEED` or a fresh seed; the seed is
/// printed, so that a failure shows how to replay it.
fn chaos_rng(test: &str) -> StdRng {
    let seed = std::env::var("CHATFLEET_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random::<u64>());
    println!("{test}: chaos seed {seed} (replay with CHATFLEET_CHAOS_SEED={seed})");
    StdRng::seed_from_u64(seed)
}

/// A worker process of the real binary, with its operational endpoints on a known port;
/// killed when dropped.
struct WorkerProc {
    ops: String,
    log: std::path::PathBuf,
    child: Child,
}

impl WorkerProc {
    fn start(app: &TestApp, id: &str, log_dir: &std::path::Path) -> WorkerProc {
        let port = testkit::free_port();
        let log = log_dir.join(format!("{id}.log"));
        let file = std::fs::File::create(&log).expect("a worker log file");
        let child = Command::new(env!("CARGO_BIN_EXE_chatfleet"))
            .args(["worker", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--bus", &app.bus_url()])
            .args(["--store", &app.mongo.as_ref().unwrap().url_for_db("chatfleet_test")])
            .args(["--partitions", &app.options.partitions.to_string()])
            .args(["--llm-base-url", &app.mock.base_url, "--model", "mock"])
            .args(["--worker-id", id])
            .env("RUST_LOG", std::env::var("CHATFLEET_TEST_WORKER_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::from(file.try_clone().expect("the worker log can be shared")))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("the worker starts");
        WorkerProc { ops: format!("http://127.0.0.1:{port}"), log, child }
    }

    /// The lines of the worker's log that mention any of `words`, for a failure message.
    fn log_mentioning(&self, words: &[String]) -> Vec<String> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines().filter(|l| words.iter().any(|w| l.contains(w.as_str()))).map(str::to_owned).collect()
    }

    /// The last lines of the worker's log, for a failure message.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `/readyz` status of the gateway and of every worker: `Some(code)` each, `None` where no
/// answer came.
async fn readiness(app: &TestApp, workers: &[WorkerProc]) -> Vec<Option<u16>> {
    let urls = std::iter::once(app.url("/readyz")).chain(workers.iter().map(|w| format!("{}/readyz", w.ops)));
    let probes = urls.map(|url| async move {
        let r = app.http.get(url).timeout(Duration::from_secs(3)).send().await;
        r.ok().map(|r| r.status().as_u16())
    });
    futures::future::join_all(probes).await
}

/// Polls every `/readyz` until each answers `want`; returns how long that took.
async fn wait_readiness(app: &TestApp, workers: &[WorkerProc], want: u16, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let codes = readiness(app, workers).await;
        if codes.iter().all(|c| *c == Some(want)) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "/readyz (gateway, then workers) not all {want} within {within:?}: {codes:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One message the gateway accepted.
#[derive(Debug, Clone)]
struct Accepted {
    message_id: String,
    text: String,
    at: Instant,
}

/// One `done` event a listener received.
#[derive(Debug, Clone)]
struct Done {
    message_id: String,
    event_id: String,
    text: String,
    at: Instant,
}

/// What the users of one session saw.
#[derive(Default)]
struct Seen {
    accepted: Vec<Accepted>,
    dones: Vec<Done>,
}

type Record = Arc<Mutex<HashMap<String, Seen>>>;

/// Users chatting, each with a listener on its session's events: every session sends numbered
/// messages one after another, resending with the same `client_message_id` when the gateway
/// answers 503, and records what was accepted, what was refused and how fast, and every `done`.
struct Load {
    /// Stops the users' sending.
    stop: CancellationToken,
    /// Stops the listeners, once every `done` has arrived.
    quiet: CancellationToken,
    senders: Vec<tokio::task::JoinHandle<()>>,
    listeners: Vec<tokio::task::JoinHandle<()>>,
    record: Record,
    /// Each refusal: its error code and how long the gateway took to answer.
    refusals: Arc<Mutex<Vec<(String, Duration)>>>,
    sessions: Vec<Session>,
}

impl Load {
    async fn start(app: &TestApp, sessions: usize, think: Duration) -> Load {
        let (stop, quiet) = (CancellationToken::new(), CancellationToken::new());
        let record: Record = Arc::default();
        let refusals = Arc::default();
        let sessions: Vec<Session> = futures::future::join_all((0..sessions).map(|_| app.create_session())).await;
        let mut listeners = Vec::new();
        for session in &sessions {
            let events = app.open_events(session).await;
            listeners.push(tokio::spawn(listen(events, session.id.clone(), record.clone(), quiet.clone())));
        }
        let mut load = Load { stop, quiet, senders: Vec::new(), listeners, record, refusals, sessions };
        for (i, session) in load.sessions.clone().into_iter().enumerate() {
            let user = load.chat(app, i, session, think);
            load.senders.push(tokio::spawn(user));
        }
        load
    }

    /// One user's conversation, until the load stops.
    fn chat(&self, app: &TestApp, user: usize, session: Session, think: Duration) -> impl Future<Output = ()> + use<> {
        let (http, base, stop) = (app.http.clone(), app.base.clone(), self.stop.clone());
        let (record, refusals) = (self.record.clone(), self.refusals.clone());
        async move {
            let mut n = 0;
            while !stop.is_cancelled() {
                let text = format!("user {user} message {n}");
                let body = json!({"text": text, "client_message_id": format!("m{n}")});
                let url = format!("{base}/v1/sessions/{}/messages", session.id);
                // Once sent, a message is resent until it is accepted, so that "accepted" is
                // never in doubt when the test checks.
                let deadline = Instant::now() + Duration::from_secs(60);
                let message_id = loop {
                    let sent = Instant::now();
                    let r = http.post(&url).bearer_auth(&session.token).json(&body).send().await.unwrap();
                    let took = sent.elapsed();
                    let status = r.status();
                    let v: Value = r.json().await.unwrap();
                    if status == 202 {
                        break v["message_id"].as_str().unwrap().to_owned();
                    }
                    assert_eq!(status, 503, "only the outage may refuse a message: {v}");
                    let code = v["error"]["code"].as_str().unwrap_or_default().to_owned();
                    refusals.lock().unwrap().push((code, took));
                    assert!(Instant::now() < deadline, "a message was refused for 60 s");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                };
                let accepted = Accepted { message_id, text, at: Instant::now() };
                record.lock().unwrap().entry(session.id.clone()).or_default().accepted.push(accepted);
                n += 1;
                tokio::time::sleep(think).await;
            }
        }
    }

    fn accepted_so_far(&self) -> usize {
        self.record.lock().unwrap().values().map(|s| s.accepted.len()).sum()
    }

    /// Waits until the gateway has accepted `more` messages beyond `since`: the fleet serves.
    async fn wait_accepted_beyond(&self, since: usize, more: usize, within: Duration) {
        let started = Instant::now();
        while self.accepted_so_far() < since + more {
            assert!(started.elapsed() < within, "fewer than {more} messages accepted within {within:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops sending and waits until every accepted message has a `done` at its listener.
    async fn stop_and_wait_for_dones(&mut self, within: Duration, workers: &[WorkerProc]) {
        self.stop.cancel();
        for task in self.senders.drain(..) {
            task.await.expect("a user's task failed");
        }
        let started = Instant::now();
        loop {
            let missing = self.unanswered();
            if missing.is_empty() {
                break;
            }
            if started.elapsed() > within {
                let lines: Vec<String> = workers.iter().flat_map(|w| w.log_mentioning(&missing)).collect();
                panic!("no done within {within:?} for {missing:?}; the workers' logs of them:\n{}", lines.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.quiet.cancel();
        for task in self.listeners.drain(..) {
            task.await.expect("a listener failed");
        }
    }

    /// The accepted messages no listener has seen a `done` for.
    fn unanswered(&self) -> Vec<String> {
        let record = self.record.lock().unwrap();
        record
            .values()
            .flat_map(|seen| {
                seen.accepted
                    .iter()
                    .filter(|a| !seen.dones.iter().any(|d| d.message_id == a.message_id))
                    .map(|a| a.message_id.clone())
            })
            .collect()
    }

    /// How many messages accepted before `moment` had no `done` until after it, and when the
    /// first `done` after it arrived.
    fn held_at(&self, moment: Instant) -> (usize, Option<Instant>) {
        let record = self.record.lock().unwrap();
        let first_after = record.values().flat_map(|seen| &seen.dones).map(|d| d.at).filter(|&at| at > moment).min();
        let held = record
            .values()
            .map(|seen| {
                let answered_before =
                    |a: &&Accepted| seen.dones.iter().any(|d| d.message_id == a.message_id && d.at <= moment);
                seen.accepted.iter().filter(|a| a.at < moment).filter(|a| !answered_before(a)).count()
            })
            .sum();
        (held, first_after)
    }

    /// When the last `done` of the messages accepted before `moment` arrived.
    fn last_done_of_accepted_before(&self, moment: Instant) -> Option<Instant> {
        let record = self.record.lock().unwrap();
        let mut last = None;
        for seen in record.values() {
            for a in seen.accepted.iter().filter(|a| a.at < moment) {
                let first_done = seen.dones.iter().filter(|d| d.message_id == a.message_id).map(|d| d.at).min();
                last = last.max(first_done);
            }
        }
        last
    }

    /// Checks every promise against the histories and what the listeners saw; returns how many
    /// messages were answered.
    async fn verify(&self, app: &TestApp) -> usize {
        let mut total = 0;
        for session in &self.sessions {
            let (sent, dones) = {
                let record = self.record.lock().unwrap();
                let seen = record.get(&session.id);
                (
                    seen.map(|s| s.accepted.clone()).unwrap_or_default(),
                    seen.map(|s| s.dones.clone()).unwrap_or_default(),
                )
            };
            total += sent.len();
            let history = app.wait_for_replies(session, sent.len(), Duration::from_secs(60)).await;
            verify_session(session, &sent, &dones, &history);
        }
        total
    }
}

/// Every accepted message of one session once in the history, in order, right before its one
/// reply; and one `done` per message at the listener (repeats keep the terminal event id),
/// carrying the stored reply.
fn verify_session(session: &Session, sent: &[Accepted], dones: &[Done], history: &[Value]) {
    let ids: Vec<&str> = sent.iter().map(|a| a.message_id.as_str()).collect();
    let users: Vec<&str> =
        history.iter().filter(|m| m["role"] == "user").map(|m| m["message_id"].as_str().unwrap()).collect();
    assert_eq!(users, ids, "session {}: every accepted message once, in order", session.id);
    assert_eq!(history.len(), sent.len() * 2, "session {}: {history:#?}", session.id);
    for (i, accepted) in sent.iter().enumerate() {
        let (user, reply) = (&history[2 * i], &history[2 * i + 1]);
        assert_eq!(user["text"], accepted.text.as_str());
        assert_eq!(reply["role"], "assistant");
        assert_eq!(reply["reply_to"], user["message_id"], "exactly one reply, right after its message");
        let reply_text = reply["text"].as_str().unwrap();
        assert!(reply_text.starts_with(&echo_of(&accepted.text)), "the reply answers its own message");
        let mine: Vec<&Done> = dones.iter().filter(|d| d.message_id == accepted.message_id).collect();
        assert!(!mine.is_empty(), "session {}: no done for {}", session.id, accepted.message_id);
        assert!(
            mine.iter().all(|d| d.event_id == mine[0].event_id && d.text == reply_text),
            "session {}: one done per message, the stored reply: {mine:#?}",
            session.id
        );
    }
    let strays: Vec<&Done> = dones.iter().filter(|d| !ids.contains(&d.message_id.as_str())).collect();
    assert!(strays.is_empty(), "session {}: done for messages never accepted: {strays:#?}", session.id);
}

/// Records every `done` on one session's event stream until `quiet` is cancelled; the stream
/// must stay open until then and carry no `error`.
async fn listen(events: reqwest::Response, session: String, record: Record, quiet: CancellationToken) {
    let mut stream = events.bytes_stream().eventsource();
    loop {
        let item = tokio::select! {
            item = stream.next() => item,
            _ = quiet.cancelled() => return,
        };
        let e = match item {
            Some(Ok(e)) => e,
            other => panic!("session {session}: the event stream broke or ended: {other:?}"),
        };
        assert_ne!(e.event, "error", "session {session}: an error event: {}", e.data);
        if e.event != "done" {
            continue;
        }
        let data: Value = serde_json::from_str(&e.data).expect("JSON data");
        let done = Done {
            message_id: data["message_id"].as_str().unwrap().to_owned(),
            event_id: e.id,
            text: data["text"].as_str().unwrap().to_owned(),
            at: Instant::now(),
        };
        record.lock().unwrap().entry(session.clone()).or_default().dones.push(done);
    }
}

async fn killing_the_store_mid_load_loses_nothing_answers_once_and_readiness_follows_it(backend: Backend) {
    let mut rng = chaos_rng("killing_the_store_mid_load");
    let options = Options { workers: 0, store_on_disk: true, first_token_ms: 20, token_ms: 10, ..Options::default() };
    let mut app = TestApp::spawn_with(backend, options).await;
    let log_dir = tempfile::tempdir().expect("a directory for worker logs");
    let workers: Vec<WorkerProc> = (0..2).map(|i| WorkerProc::start(&app, &format!("w{i}"), log_dir.path())).collect();
    wait_readiness(&app, &workers, 200, Duration::from_secs(30)).await;
    let mut load = Load::start(&app, 16, Duration::from_millis(50)).await;
    load.wait_accepted_beyond(0, 30, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(rng.random_range(0..=1000))).await;

    app.mongo_mut().stop().await;
    let not_ready = wait_readiness(&app, &workers, 503, NOT_READY_BOUND).await;
    tokio::time::sleep(Duration::from_millis(rng.random_range(3000..=5000))).await;
    let during = readiness(&app, &workers).await;
    app.mongo_mut().restart().await;
    let back = Instant::now();
    let ready = wait_readiness(&app, &workers, 200, RECOVERY_BOUND).await;
    let accepted = load.accepted_so_far();
    load.wait_accepted_beyond(accepted, 20, RECOVERY_BOUND).await;
    let serving = back.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    load.stop_and_wait_for_dones(Duration::from_secs(30), &workers).await;
    let caught_up = load.last_done_of_accepted_before(back).map(|t| t.saturating_duration_since(back));
    let (held, first_answer) = load.held_at(back);
    let first_answer = first_answer.map(|t| t.saturating_duration_since(back));
    let answered = load.verify(&app).await;

    let refusals = load.refusals.lock().unwrap().clone();
    let slowest_refusal = refusals.iter().map(|(_, took)| *took).max();
    println!(
        "store killed and restarted: every /readyz 503 {not_ready:?} after the kill; after the restart every /readyz \
         200 in {ready:?}, 20 more messages accepted in {serving:?}, the first reply {first_answer:?} after it and \
         all {held} messages held by the outage {caught_up:?} after it; {} refusals (slowest \
         {slowest_refusal:?}); {answered} messages answered once each",
        refusals.len()
    );
    let logs = || workers.iter().map(WorkerProc::log_tail).collect::<Vec<_>>().join("\n----\n");
    assert!(during.iter().all(|c| *c == Some(503)), "/readyz during the outage: {during:?}");
    assert!(!refusals.is_empty(), "some users were refused during the outage");
    assert!(refusals.iter().all(|(code, _)| code == "store_unavailable"), "{refusals:?}");
    assert!(slowest_refusal.unwrap() < REFUSAL_BOUND, "a refusal took {slowest_refusal:?}");
    let first_answer = first_answer.expect("messages were answered after the store came back");
    assert!(first_answer < RECOVERY_BOUND, "the first reply came {first_answer:?} after; logs:\n{}", logs());
    let caught_up = caught_up.expect("messages were accepted before the store came back");
    assert!(caught_up < BACKLOG_BOUND, "the held messages were answered {caught_up:?} after; logs:\n{}", logs());
    assert!(answered > 100, "the load ran: {answered}");
}
