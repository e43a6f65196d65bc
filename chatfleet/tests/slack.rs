//! Slack end to end, with Slack's own SDK (`slack_sdk` from PyPI, driven by
//! `tests/channels/slack_peer.py`) on the other side: its `SignatureVerifier` signs the events,
//! and a local fake of the Web API records chatfleet's calls, checked against what the SDK's
//! `WebClient` sends to it. On `dev`, NATS and RabbitMQ.

#[macro_use]
mod support;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Backend, Options, TestApp, echo_of};

on_every_backend!(
    a_signed_mention_gets_one_threaded_reply_at_the_slack_api_as_slack_sdk_would_post_it,
    forged_and_stale_events_get_401_bots_and_edits_are_ignored_and_direct_messages_answered,
    a_rate_limited_post_is_retried_after_retry_after_and_posted_once,
);

const SIGNING_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";

fn python() -> PathBuf {
    support::test_python("slack_sdk")
}

fn peer_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/channels/slack_peer.py")
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// The `X-Slack-Signature` slack_sdk's `SignatureVerifier` computes.
fn sign(secret: &str, timestamp: i64, body: &str) -> String {
    let mut child = Command::new(python())
        .arg(peer_script())
        .args(["sign", secret, &timestamp.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python starts");
    child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "signing failed");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// The fake Slack Web API.
struct FakeSlack {
    child: Child,
    port: u16,
    http: reqwest::Client,
}

impl Drop for FakeSlack {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl FakeSlack {
    async fn start() -> FakeSlack {
        llm::install_crypto_provider();
        let port = testkit::free_port();
        let child = Command::new(python()).arg(peer_script()).args(["api", &port.to_string()]).spawn().unwrap();
        let fake = FakeSlack { child, port, http: reqwest::Client::new() };
        let deadline = Instant::now() + Duration::from_secs(10);
        while fake.http.get(fake.url("/calls")).send().await.is_err() {
            assert!(Instant::now() < deadline, "the fake Slack API did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        fake
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn calls(&self) -> Vec<Value> {
        self.http.get(self.url("/calls")).send().await.unwrap().json().await.unwrap()
    }

    async fn rate_limit_next(&self, n: u32) {
        self.http.post(self.url("/control")).json(&json!({"rate_limit": n})).send().await.unwrap();
    }

    /// What slack_sdk's WebClient sends for a `chat.postMessage`, as this fake records it.
    async fn call_of_the_sdk(&self) -> Value {
        let status =
            Command::new(python()).arg(peer_script()).args(["client", &self.port.to_string()]).status().unwrap();
        assert!(status.success());
        self.calls().await.into_iter().find(|c| c["body"]["channel"] == "C-SDK").expect("the SDK's call")
    }

    async fn wait_for_posts(&self, n: usize, within: Duration) -> Vec<Value> {
        let deadline = Instant::now() + within;
        loop {
            let posts: Vec<Value> =
                self.calls().await.into_iter().filter(|c| c["body"]["channel"] != "C-SDK").collect();
            if posts.len() >= n {
                return posts;
            }
            assert!(Instant::now() < deadline, "{n} calls within {within:?}; seen {posts:#?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn spawn_with_slack(backend: Backend, fake: &FakeSlack, dir: &tempfile::TempDir) -> TestApp {
    let path = dir.path().join("channels.toml");
    let text = format!(
        "[slack]\nsigning_secret = \"{SIGNING_SECRET}\"\nbot_token = \"xoxb-test\"\napi_url = \"{}\"\n\n[delivery]\nretry_schedule = [\"200ms\", \"300ms\", \"500ms\", \"500ms\", \"500ms\"]\n",
        fake.url("/api/")
    );
    std::fs::write(&path, text).unwrap();
    TestApp::spawn_with(backend, Options { channels: Some(path), ..Options::default() }).await
}

async fn post_event(
    app: &TestApp,
    body: &Value,
    secret: &str,
    timestamp: i64,
    retry: Option<u32>,
) -> reqwest::Response {
    signed(app, body, secret, timestamp, retry).send().await.unwrap()
}

/// The request Slack would send, signed by slack_sdk, ready to send.
fn signed(app: &TestApp, body: &Value, secret: &str, timestamp: i64, retry: Option<u32>) -> reqwest::RequestBuilder {
    let body = body.to_string();
    let mut request = app
        .http
        .post(app.url("/v1/channels/slack/events"))
        .header("content-type", "application/json")
        .header("x-slack-request-timestamp", timestamp.to_string())
        .header("x-slack-signature", sign(secret, timestamp, &body));
    if let Some(n) = retry {
        request = request.header("x-slack-retry-num", n.to_string()).header("x-slack-retry-reason", "http_timeout");
    }
    request.body(body)
}

fn callback(event_id: &str, event: Value) -> Value {
    json!({"type": "event_callback", "team_id": "T1", "api_app_id": "A1", "event_id": event_id, "event_time": now(), "event": event})
}

fn unique(label: &str) -> String {
    format!("Ev{label}{:012x}", rand::random::<u64>() >> 16)
}

async fn a_signed_mention_gets_one_threaded_reply_at_the_slack_api_as_slack_sdk_would_post_it(backend: Backend) {
    let fake = FakeSlack::start().await;
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_with_slack(backend, &fake, &dir).await;
    let sdk = fake.call_of_the_sdk().await;
    let challenge = json!({"type": "url_verification", "token": "t", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"});
    let event_id = unique("mention");
    let mention = callback(
        &event_id,
        json!({"type": "app_mention", "user": "U1", "text": "<@UBOT> what is the weather", "ts": "1700000000.000100", "channel": "C1", "event_ts": "1700000000.000100"}),
    );

    let verified: Value = post_event(&app, &challenge, SIGNING_SECRET, now(), None).await.json().await.unwrap();
    let request = signed(&app, &mention, SIGNING_SECRET, now(), None);
    let started = Instant::now();
    let acked = request.send().await.unwrap();
    let ack_time = started.elapsed();
    fake.wait_for_posts(1, Duration::from_secs(20)).await;
    // Slack retries an event whose acknowledgement it missed, possibly at another replica.
    let retried = post_event(&app, &mention, SIGNING_SECRET, now(), Some(1)).await;

    assert_eq!(verified["challenge"], challenge["challenge"]);
    assert_eq!(acked.status(), 200);
    assert!(ack_time < Duration::from_secs(3), "acknowledged after {ack_time:?}");
    assert_eq!(retried.status(), 200);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let posts: Vec<Value> = fake.calls().await.into_iter().filter(|c| c["body"]["channel"] == "C1").collect();
    assert_eq!(posts.len(), 1, "one answer, however often Slack retries: {posts:#?}");
    let post = &posts[0];
    assert_eq!(post["path"], "/api/chat.postMessage");
    assert_eq!(post["authorization"], "Bearer xoxb-test");
    assert_eq!(post["body"]["thread_ts"], "1700000000.000100", "answered in the mention's thread");
    assert!(post["body"]["text"].as_str().unwrap().starts_with(&echo_of("what is the weather")), "{post}");
    // The same call as Slack's own client makes: method path, JSON body, bearer token.
    assert_eq!(post["path"], sdk["path"]);
    assert_eq!(post["content_type"], sdk["content_type"]);
    assert_eq!(sdk["authorization"], "Bearer xoxb-sdk");
    let keys = |v: &Value| v["body"].as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(post), keys(&sdk));
    app.shutdown().await;
}

async fn forged_and_stale_events_get_401_bots_and_edits_are_ignored_and_direct_messages_answered(backend: Backend) {
    let fake = FakeSlack::start().await;
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_with_slack(backend, &fake, &dir).await;
    let dm = |id: &str, extra: Value| {
        let mut event = json!({"type": "message", "channel_type": "im", "user": "U1", "text": "hello bot", "ts": "1700000001.000200", "channel": "D1"});
        event.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        callback(id, event)
    };

    let forged = post_event(&app, &dm(&unique("forged"), json!({})), "not-the-secret", now(), None).await;
    let stale = post_event(&app, &dm(&unique("stale"), json!({})), SIGNING_SECRET, now() - 6 * 60, None).await;
    let bot = post_event(&app, &dm(&unique("bot"), json!({"bot_id": "B1"})), SIGNING_SECRET, now(), None).await;
    let edit =
        post_event(&app, &dm(&unique("edit"), json!({"subtype": "message_changed"})), SIGNING_SECRET, now(), None)
            .await;
    let good =
        post_event(&app, &dm(&unique("good"), json!({"text": "the real question"})), SIGNING_SECRET, now(), None).await;

    assert_eq!((forged.status().as_u16(), stale.status().as_u16()), (401, 401));
    assert_eq!((bot.status().as_u16(), edit.status().as_u16(), good.status().as_u16()), (200, 200, 200));
    fake.wait_for_posts(1, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let posts = fake.wait_for_posts(1, Duration::ZERO).await;
    assert_eq!(posts.len(), 1, "only the real question is answered: {posts:#?}");
    assert_eq!(posts[0]["body"]["channel"], "D1");
    assert!(posts[0]["body"].get("thread_ts").is_none(), "a direct message is answered in the conversation");
    assert!(posts[0]["body"]["text"].as_str().unwrap().starts_with(&echo_of("the real question")));
    app.shutdown().await;
}

async fn a_rate_limited_post_is_retried_after_retry_after_and_posted_once(backend: Backend) {
    let fake = FakeSlack::start().await;
    fake.rate_limit_next(1).await;
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_with_slack(backend, &fake, &dir).await;
    let mention = callback(
        &unique("limited"),
        json!({"type": "app_mention", "user": "U1", "text": "<@UBOT> hi", "ts": "1700000002.000300", "channel": "C2"}),
    );

    assert_eq!(post_event(&app, &mention, SIGNING_SECRET, now(), None).await.status(), 200);
    let calls = fake.wait_for_posts(2, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let calls = [calls, Vec::new()].concat();
    let statuses: Vec<&Value> = calls.iter().map(|c| &c["status"]).collect();
    assert_eq!(statuses, [429, 200], "{calls:#?}");
    let waited = calls[1]["at"].as_f64().unwrap() - calls[0]["at"].as_f64().unwrap();
    assert!(waited >= 0.95, "Retry-After: 1 honoured, waited {waited:.2} s");
    assert_eq!(fake.wait_for_posts(2, Duration::ZERO).await.len(), 2, "posted once after the 429");
    app.shutdown().await;
}
