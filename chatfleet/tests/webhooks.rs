//! Signed webhooks end to end, with the Standard Webhooks reference library (`standardwebhooks`
//! from PyPI, driven by `tests/channels/webhook_peer.py`) on the other side: it signs the
//! inbound requests and verifies every delivery. On `dev`, NATS and RabbitMQ; and, with
//! processes of the real binary, a gateway killed in the middle of a delivery.

#[macro_use]
mod support;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Backend, Broker, Options, TestApp, echo_of};

on_every_backend!(
    a_signed_webhook_gets_a_signed_reply_that_standardwebhooks_verifies_once_per_reply,
    bad_stale_and_missing_signatures_get_401_and_nothing_is_answered,
    a_receiver_that_fails_for_a_while_then_recovers_gets_each_reply_exactly_once,
    a_receiver_answering_410_gets_no_further_attempt,
    a_reply_failing_its_last_attempt_is_kept_as_undeliverable_and_counted,
);

/// The integration's secret in every test.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// The Python of the test environment, with `standardwebhooks` installed by scripts/test.sh.
fn python() -> PathBuf {
    let venv = std::env::var_os("CHATFLEET_TEST_VENV").map(PathBuf::from).unwrap_or_else(|| {
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache"));
        cache.join("chatfleet/test-venv")
    });
    let python = venv.join("bin/python");
    let ok = Command::new(&python)
        .args(["-c", "import standardwebhooks"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "{} cannot import standardwebhooks: run scripts/test.sh, which installs it", python.display());
    python
}

fn peer_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/channels/webhook_peer.py")
}

/// The `webhook-signature` header `standardwebhooks` computes for this request.
fn sign(secret: &str, id: &str, timestamp: i64, body: &str) -> String {
    let mut child = Command::new(python())
        .arg(peer_script())
        .args(["sign", secret, id, &timestamp.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python starts");
    child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "signing failed");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// A webhook receiver that verifies every delivery with `standardwebhooks`.
struct Receiver {
    child: Child,
    base: String,
    http: reqwest::Client,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Receiver {
    async fn start() -> Receiver {
        llm::install_crypto_provider();
        let port = testkit::free_port();
        let child = Command::new(python())
            .arg(peer_script())
            .args(["receive", SECRET, &port.to_string()])
            .spawn()
            .expect("python starts");
        let receiver = Receiver { child, base: format!("http://127.0.0.1:{port}"), http: reqwest::Client::new() };
        let deadline = Instant::now() + Duration::from_secs(10);
        while receiver.http.get(format!("{}/log", receiver.base)).send().await.is_err() {
            assert!(Instant::now() < deadline, "the webhook receiver did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        receiver
    }

    fn url(&self) -> String {
        format!("{}/hook", self.base)
    }

    async fn set_mode(&self, mode: &str) {
        let response = self.http.post(format!("{}/mode", self.base)).json(&json!({"mode": mode})).send().await.unwrap();
        assert_eq!(response.status(), 204);
    }

    async fn log(&self) -> Vec<Value> {
        self.http.get(format!("{}/log", self.base)).send().await.unwrap().json().await.unwrap()
    }

    /// The deliveries answered 200.
    async fn delivered(&self) -> Vec<Value> {
        self.log().await.into_iter().filter(|e| e["status"] == 200).collect()
    }

    /// Waits until `enough` holds for the log; returns the log.
    async fn wait_for(&self, what: &str, within: Duration, enough: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + within;
        loop {
            let log = self.log().await;
            if enough(&log) {
                return log;
            }
            assert!(Instant::now() < deadline, "{what} within {within:?}; the receiver's log: {log:#?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn delivered_ids(log: &[Value]) -> BTreeSet<String> {
    log.iter().filter(|e| e["status"] == 200).map(|e| e["webhook_id"].as_str().unwrap().to_owned()).collect()
}

/// A channels file with the integration `acme` delivering to `url`, and short retry delays.
fn channels_file(dir: &tempfile::TempDir, url: &str, retry_schedule: &str, attempt_timeout: &str) -> PathBuf {
    let path = dir.path().join("channels.toml");
    let text = format!(
        "[webhooks.acme]\nsecret = \"{SECRET}\"\nurl = \"{url}\"\n\n[delivery]\nretry_schedule = {retry_schedule}\nattempt_timeout = \"{attempt_timeout}\"\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}

async fn spawn_with_channels(backend: Backend, receiver: &Receiver, dir: &tempfile::TempDir) -> TestApp {
    let schedule = r#"["200ms", "300ms", "400ms", "500ms", "500ms", "500ms", "500ms", "500ms", "500ms", "500ms", "500ms", "500ms"]"#;
    let channels = channels_file(dir, &receiver.url(), schedule, "3s");
    TestApp::spawn_with(backend, Options { channels: Some(channels), ..Options::default() }).await
}

/// Posts a webhook signed by `standardwebhooks` with `secret`, stamped `timestamp`.
async fn post_signed(
    http: &reqwest::Client,
    base: &str,
    id: &str,
    body: &Value,
    secret: &str,
    timestamp: i64,
) -> reqwest::Response {
    let body = body.to_string();
    let signature = sign(secret, id, timestamp, &body);
    http.post(format!("{base}/v1/channels/webhooks/acme"))
        .header("content-type", "application/json")
        .header("webhook-id", id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn post_webhook(app: &TestApp, id: &str, body: &Value) -> Value {
    let response = post_signed(&app.http, &app.base, id, body, SECRET, now()).await;
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap_or_default());
    response.json().await.unwrap()
}

fn unique_id(label: &str) -> String {
    format!("msg_{label}_{:016x}", rand::random::<u64>())
}

async fn a_signed_webhook_gets_a_signed_reply_that_standardwebhooks_verifies_once_per_reply(backend: Backend) {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_with_channels(backend, &receiver, &dir).await;
    let first = json!({"conversation_id": "c-1", "text": "hello from the integration", "user": "u-7"});
    let second = json!({"conversation_id": "c-1", "text": "and a second message"});
    let (id1, id2) = (unique_id("one"), unique_id("two"));

    let accepted = post_webhook(&app, &id1, &first).await;
    let repeated = post_webhook(&app, &id1, &first).await;
    let next = post_webhook(&app, &id2, &second).await;

    assert_eq!(accepted, repeated, "a repeated webhook-id is the same message");
    assert_eq!(accepted["session_id"], next["session_id"], "one conversation, one session");
    assert_ne!(accepted["message_id"], next["message_id"]);
    let log =
        receiver.wait_for("two replies delivered", Duration::from_secs(20), |log| delivered_ids(log).len() >= 2).await;
    // Give a wrongly repeated answer the time to arrive.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let log = [log, receiver.log().await].concat();
    assert!(log.iter().all(|e| e["verified"] == true), "every delivery verifies: {log:#?}");
    let ids = delivered_ids(&log);
    assert_eq!(ids.len(), 2, "one reply per message, however often it was sent: {log:#?}");
    let reply = receiver.delivered().await.into_iter().find(|e| e["body"]["message_id"] == accepted["message_id"]);
    let reply = reply.expect("the first message's reply").clone();
    let body = &reply["body"];
    assert_eq!(body["type"], "message.reply");
    assert_eq!(body["conversation_id"], "c-1");
    assert_eq!(reply["webhook_id"], body["reply_id"], "webhook-id is the reply id");
    assert!(body["text"].as_str().unwrap().starts_with(&echo_of("hello from the integration")), "{body}");
    assert_eq!(body["finish_reason"], "stop");
    app.shutdown().await;
}

async fn bad_stale_and_missing_signatures_get_401_and_nothing_is_answered(backend: Backend) {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_with_channels(backend, &receiver, &dir).await;
    let body = json!({"conversation_id": "c-9", "text": "should never be answered"});
    let other_secret = "whsec_dGhpcyBpcyBub3QgdGhlIHJpZ2h0IGtleQ==";

    let forged = post_signed(&app.http, &app.base, &unique_id("forged"), &body, other_secret, now()).await;
    let stale = post_signed(&app.http, &app.base, &unique_id("stale"), &body, SECRET, now() - 6 * 60).await;
    let unsigned =
        app.http.post(format!("{}/v1/channels/webhooks/acme", app.base)).body(body.to_string()).send().await.unwrap();
    let unknown = app.http.post(format!("{}/v1/channels/webhooks/nobody", app.base)).body("{}").send().await.unwrap();

    assert_eq!(forged.status(), 401);
    assert_eq!(stale.status(), 401);
    assert_eq!(unsigned.status(), 401);
    assert_eq!(unknown.status(), 404);
    // A message in the same conversation is answered after anything enqueued before it: only its
    // own reply arrives.
    let good = post_webhook(&app, &unique_id("good"), &json!({"conversation_id": "c-9", "text": "the real one"})).await;
    receiver.wait_for("the real reply", Duration::from_secs(20), |log| !delivered_ids(log).is_empty()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let delivered = receiver.delivered().await;
    assert_eq!(delivered.len(), 1, "{delivered:#?}");
    assert_eq!(delivered[0]["body"]["message_id"], good["message_id"]);
    app.shutdown().await;
}

async fn a_receiver_that_fails_for_a_while_then_recovers_gets_each_reply_exactly_once(backend: Backend) {
    let receiver = Receiver::start().await;
    receiver.set_mode("fail").await;
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_with_channels(backend, &receiver, &dir).await;
    let mut messages = Vec::new();

    for i in 0..3 {
        let body = json!({"conversation_id": format!("c-{i}"), "text": format!("message {i}")});
        messages.push(post_webhook(&app, &unique_id("retry"), &body).await["message_id"].clone());
    }
    receiver
        .wait_for("two failed attempts of each reply", Duration::from_secs(20), |log| {
            let failed: Vec<&Value> = log.iter().filter(|e| e["status"] == 503).collect();
            let ids: BTreeSet<&str> = failed.iter().filter_map(|e| e["webhook_id"].as_str()).collect();
            ids.len() == 3 && ids.iter().all(|id| failed.iter().filter(|e| e["webhook_id"] == *id).count() >= 2)
        })
        .await;
    receiver.set_mode("ok").await;
    receiver.wait_for("three replies delivered", Duration::from_secs(20), |log| delivered_ids(log).len() == 3).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let delivered = receiver.delivered().await;
    assert_eq!(delivered.len(), 3, "each reply delivered exactly once: {delivered:#?}");
    let answered: BTreeSet<String> = delivered.iter().map(|e| e["body"]["message_id"].to_string()).collect();
    let sent: BTreeSet<String> = messages.iter().map(|m| m.to_string()).collect();
    assert_eq!(answered, sent);
    let log = receiver.log().await;
    for entry in delivered.iter() {
        let attempts = log.iter().filter(|e| e["webhook_id"] == entry["webhook_id"]).count();
        assert!(attempts >= 2, "the same webhook-id on every attempt: {log:#?}");
    }
    app.shutdown().await;
}

async fn a_receiver_answering_410_gets_no_further_attempt(backend: Backend) {
    let receiver = Receiver::start().await;
    receiver.set_mode("gone").await;
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_with_channels(backend, &receiver, &dir).await;

    post_webhook(&app, &unique_id("gone"), &json!({"conversation_id": "c-gone", "text": "anyone there?"})).await;
    receiver.wait_for("one attempt", Duration::from_secs(20), |log| !log.is_empty()).await;
    // The schedule would have retried three times by now.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let log = receiver.log().await;
    assert_eq!(log.len(), 1, "{log:#?}");
    assert_eq!(log[0]["status"], 410);
    app.shutdown().await;
}

async fn a_reply_failing_its_last_attempt_is_kept_as_undeliverable_and_counted(backend: Backend) {
    let receiver = Receiver::start().await;
    receiver.set_mode("fail").await;
    let dir = tempfile::tempdir().unwrap();
    let channels = channels_file(&dir, &receiver.url(), r#"["100ms", "100ms"]"#, "3s");
    let app = TestApp::spawn_with(backend, Options { channels: Some(channels), ..Options::default() }).await;

    post_webhook(&app, &unique_id("lost"), &json!({"conversation_id": "c-lost", "text": "nobody takes this"})).await;
    receiver.wait_for("three attempts", Duration::from_secs(20), |log| log.len() >= 3).await;

    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let metrics = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
        let series = r#"chatfleet_gateway_channel_undeliverable_total{channel="webhooks/acme"}"#;
        if support::metric(&metrics, series) == Some(1.0) {
            break metrics;
        }
        assert!(Instant::now() < deadline, "{series} not 1 within 10 s: {metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        metrics.contains(
            r#"chatfleet_gateway_channel_delivery_failures_total{channel="webhooks/acme",reason="http_5xx"} 3"#
        ),
        "{metrics}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.log().await.len(), 3, "no attempt after the last");
    if backend != Backend::Dev {
        let output = Command::new(env!("CARGO_BIN_EXE_chatfleet"))
            .args(["status", "--bus", &app.bus_url(), "--partitions", &app.options.partitions.to_string()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(text.contains("channel deliveries: 0 pending, 1 undeliverable"), "{text}");
    }
    app.shutdown().await;
}

/// A private broker restarted while a reply waits for its receiver (on RabbitMQ, in a wait
/// queue: ARCHITECTURE.md, "Channels").
mod broker_restart {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nats_mongo() {
        a_reply_waiting_for_its_receiver_survives_a_broker_restart(Backend::NatsMongo).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rabbit_mongo() {
        a_reply_waiting_for_its_receiver_survives_a_broker_restart(Backend::RabbitMongo).await
    }
}

async fn a_reply_waiting_for_its_receiver_survives_a_broker_restart(backend: Backend) {
    let receiver = Receiver::start().await;
    receiver.set_mode("fail").await;
    let dir = tempfile::tempdir().unwrap();
    let schedule = r#"["300ms", "500ms", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s"]"#;
    let channels = channels_file(&dir, &receiver.url(), schedule, "3s");
    let options = Options { channels: Some(channels), private_broker: true, ..Options::default() };
    let mut app = TestApp::spawn_with(backend, options).await;
    // RabbitMQ 3.10 loses a quorum queue declared less than half a second before a crash
    // (testkit's `RabbitMqServer`); a fleet's queues are declared long before any broker crash.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let accepted =
        post_webhook(&app, &unique_id("restart"), &json!({"conversation_id": "c-r", "text": "outlive the broker"}))
            .await;
    receiver.wait_for("a failed attempt", Duration::from_secs(20), |log| log.iter().any(|e| e["status"] == 503)).await;
    app.broker_mut().restart().await;
    receiver.set_mode("ok").await;

    receiver
        .wait_for("the reply delivered after the restart", Duration::from_secs(40), |log| {
            !delivered_ids(log).is_empty()
        })
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let delivered = receiver.delivered().await;
    // At least once, and exactly once as seen by a receiver that dedupes on `webhook-id`
    // (channels.md): the crash can take the confirm of a retry the broker had already kept, and
    // then the retry and the unsettled delivery both come back. Every copy is the same reply.
    assert_eq!(delivered_ids(&delivered).len(), 1, "{delivered:#?}");
    assert!(delivered.iter().all(|d| d["body"] == delivered[0]["body"]), "{delivered:#?}");
    assert_eq!(delivered[0]["webhook_id"], delivered[0]["body"]["reply_id"]);
    assert_eq!(delivered[0]["body"]["message_id"], accepted["message_id"]);
    app.shutdown().await;
}

/// Processes of the real binary: a gateway killed while its receiver holds the delivery's
/// request open; another gateway delivers the reply, once.
mod killed_mid_delivery {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nats_mongo() {
        a_gateway_killed_mid_delivery_leaves_the_reply_to_another(Backend::NatsMongo).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rabbit_mongo() {
        a_gateway_killed_mid_delivery_leaves_the_reply_to_another(Backend::RabbitMongo).await
    }
}

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

async fn wait_ready(http: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await
            && r.status() == 200
        {
            return;
        }
        assert!(Instant::now() < deadline, "{base} not ready within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn a_gateway_killed_mid_delivery_leaves_the_reply_to_another(backend: Backend) {
    llm::install_crypto_provider();
    let receiver = Receiver::start().await;
    receiver.set_mode("hang").await;
    let dir = tempfile::tempdir().unwrap();
    let channels = channels_file(&dir, &receiver.url(), r#"["200ms", "500ms", "1s", "1s", "1s"]"#, "45s");
    let (broker, mongo) = tokio::join!(Broker::start(backend, false), testkit::MongoServer::start());
    let (broker, store) = (broker.expect("a broker"), mongo.url_for_db("webhooks"));
    let http = reqwest::Client::new();
    let mock_port = testkit::free_port();
    let _mock = spawn(&["mock-llm".into(), "--listen".into(), format!("127.0.0.1:{mock_port}")]);
    let gateway = |port: u16| {
        spawn(&[
            "gateway".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--bus".into(),
            broker.url(),
            "--store".into(),
            store.clone(),
            "--channels".into(),
            channels.display().to_string(),
        ])
    };
    let first_port = testkit::free_port();
    let mut first = gateway(first_port);
    let first_base = format!("http://127.0.0.1:{first_port}");
    wait_ready(&http, &first_base).await;
    let worker_port = testkit::free_port();
    let _worker = spawn(&[
        "worker".into(),
        "--listen".into(),
        format!("127.0.0.1:{worker_port}"),
        "--bus".into(),
        broker.url(),
        "--store".into(),
        store.clone(),
        "--llm-base-url".into(),
        format!("http://127.0.0.1:{mock_port}/v1"),
        "--model".into(),
        "mock".into(),
    ]);
    wait_ready(&http, &format!("http://127.0.0.1:{worker_port}")).await;

    let id = unique_id("killed");
    let body = json!({"conversation_id": "c-kill", "text": "deliver me through a crash"});
    let response = post_signed(&http, &first_base, &id, &body, SECRET, now()).await;
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await.unwrap();
    receiver
        .wait_for("the first gateway's attempt in progress", Duration::from_secs(20), |log| {
            log.iter().any(|e| e["status"] == "hanging")
        })
        .await;
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let killed_at = Instant::now();
    receiver.set_mode("ok").await;
    let second_port = testkit::free_port();
    let _second = gateway(second_port);
    wait_ready(&http, &format!("http://127.0.0.1:{second_port}")).await;

    receiver
        .wait_for("the reply delivered by the other gateway", Duration::from_secs(30), |log| {
            !delivered_ids(log).is_empty()
        })
        .await;
    println!("delivered {:.1} s after the delivering gateway was killed", killed_at.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let delivered = receiver.delivered().await;
    assert_eq!(delivered.len(), 1, "{delivered:#?}");
    assert_eq!(delivered[0]["body"]["message_id"], accepted["message_id"]);
    assert!(delivered[0]["body"]["text"].as_str().unwrap().starts_with(&echo_of("deliver me through a crash")));
}
