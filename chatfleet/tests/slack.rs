//! Slack end to end, with Slack's own SDK (`slack_sdk` from PyPI, driven by
//! `tests/channels/slack_peer.py`) on the other side: its `SignatureVerifier` signs the events,
//! and a local fake of the Web API records chatfleet's calls, checked against what the SDK's
//! `WebClient` sends to it, keeps the messages as Slack would, and can answer 429. On `dev`, NATS
//! and RabbitMQ; and, with processes of the real binary, a gateway killed while it streams.

#[macro_use]
mod support;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Backend, Options, TestApp};

on_every_backend!(
    a_signed_mention_gets_one_threaded_reply_at_the_slack_api_as_slack_sdk_would_post_it,
    forged_and_stale_events_get_401_bots_and_edits_are_ignored_and_direct_messages_answered,
    a_rate_limited_post_is_retried_after_retry_after_and_posted_once,
    a_reply_is_streamed_into_one_message_with_throttled_updates_and_ends_as_the_complete_reply,
    a_rate_limited_update_holds_the_stream_for_retry_after_and_the_message_still_ends_complete,
    with_streaming_off_the_complete_reply_is_posted_once,
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

    /// Every call chatfleet made (the SDK's own calls left out), in order.
    async fn calls(&self) -> Vec<Value> {
        let calls: Vec<Value> = self.http.get(self.url("/calls")).send().await.unwrap().json().await.unwrap();
        calls.into_iter().filter(|c| c["body"]["channel"] != "C-SDK").collect()
    }

    /// The messages as Slack would show them now.
    async fn messages(&self) -> Vec<Value> {
        let messages: Vec<Value> = self.http.get(self.url("/messages")).send().await.unwrap().json().await.unwrap();
        messages.into_iter().filter(|m| m["channel"] != "C-SDK").collect()
    }

    async fn rate_limit_next(&self, n: u32, retry_after: u32) {
        let control = json!({"rate_limit": n, "retry_after": retry_after});
        self.http.post(self.url("/control")).json(&control).send().await.unwrap();
    }

    /// What slack_sdk's WebClient sends for a `chat.postMessage` and a `chat.update`, as this
    /// fake records them.
    async fn calls_of_the_sdk(&self) -> (Value, Value) {
        let status =
            Command::new(python()).arg(peer_script()).args(["client", &self.port.to_string()]).status().unwrap();
        assert!(status.success());
        let calls: Vec<Value> = self.http.get(self.url("/calls")).send().await.unwrap().json().await.unwrap();
        let sdk = |path: &str| calls.iter().find(|c| c["body"]["channel"] == "C-SDK" && c["path"] == path).cloned();
        (sdk("/api/chat.postMessage").expect("the SDK's post"), sdk("/api/chat.update").expect("the SDK's update"))
    }

    /// The calls once `enough` holds for them.
    async fn wait_for(&self, what: &str, within: Duration, enough: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + within;
        loop {
            let calls = self.calls().await;
            if enough(&calls) {
                return calls;
            }
            assert!(Instant::now() < deadline, "{what} within {within:?}; seen {calls:#?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The calls once a message in `channel` shows `text`.
    async fn wait_for_text(&self, channel: &str, text: &str, within: Duration) -> Vec<Value> {
        let deadline = Instant::now() + within;
        loop {
            if self.messages().await.iter().any(|m| m["channel"] == channel && m["text"] == text) {
                return self.calls().await;
            }
            assert!(
                Instant::now() < deadline,
                "a message showing {text:?} within {within:?}; seen {:#?}",
                self.calls().await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn posts(calls: &[Value]) -> Vec<&Value> {
    calls.iter().filter(|c| c["path"] == "/api/chat.postMessage" && c["status"] == 200).collect()
}

fn updates(calls: &[Value]) -> Vec<&Value> {
    calls.iter().filter(|c| c["path"] == "/api/chat.update" && c["status"] == 200).collect()
}

/// The complete reply of the test fleet's model to `question`.
fn reply_to(question: &str, options: &Options) -> String {
    let settings = llm::mock_reply::MockSettings {
        reply_tokens: options.reply_tokens,
        ..llm::mock_reply::MockSettings::default()
    };
    llm::mock_reply::reply_tokens(question, &settings).concat()
}

/// The channels file of a test: the fake as the Web API, `extra` lines in `[slack]`.
fn channels_file(fake: &FakeSlack, dir: &tempfile::TempDir, extra: &str) -> PathBuf {
    let path = dir.path().join("channels.toml");
    let text = format!(
        "[slack]\nsigning_secret = \"{SIGNING_SECRET}\"\nbot_token = \"xoxb-test\"\napi_url = \"{}\"\n{extra}\n[delivery]\nretry_schedule = [\"200ms\", \"300ms\", \"500ms\", \"500ms\", \"500ms\"]\n",
        fake.url("/api/")
    );
    std::fs::write(&path, text).unwrap();
    path
}

async fn spawn_with_slack(backend: Backend, fake: &FakeSlack, dir: &tempfile::TempDir) -> TestApp {
    let channels = channels_file(fake, dir, "");
    TestApp::spawn_with(backend, Options { channels: Some(channels), ..Options::default() }).await
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
    // Tokens slow enough that the reply is streamed: posted, then updated.
    let options = Options { token_ms: 20, reply_tokens: 30, ..streaming_options(channels_file(&fake, &dir, "")) };
    let app = TestApp::spawn_with(backend, options.clone()).await;
    let (sdk_post, sdk_update) = fake.calls_of_the_sdk().await;
    let challenge = json!({"type": "url_verification", "token": "t", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"});
    let event_id = unique("mention");
    let mention = callback(
        &event_id,
        json!({"type": "app_mention", "user": "U1", "text": "<@UBOT> what is the weather", "ts": "1700000000.000100", "channel": "C1", "event_ts": "1700000000.000100"}),
    );
    let reply = reply_to("what is the weather", &options);

    let verified: Value = post_event(&app, &challenge, SIGNING_SECRET, now(), None).await.json().await.unwrap();
    let request = signed(&app, &mention, SIGNING_SECRET, now(), None);
    let started = Instant::now();
    let acked = request.send().await.unwrap();
    let ack_time = started.elapsed();
    fake.wait_for_text("C1", &reply, Duration::from_secs(20)).await;
    // Slack retries an event whose acknowledgement it missed, possibly at another replica.
    let retried = post_event(&app, &mention, SIGNING_SECRET, now(), Some(1)).await;

    assert_eq!(verified["challenge"], challenge["challenge"]);
    assert_eq!(acked.status(), 200);
    assert!(ack_time < Duration::from_secs(3), "acknowledged after {ack_time:?}");
    assert_eq!(retried.status(), 200);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let calls = fake.calls().await;
    let messages = fake.messages().await;
    assert_eq!(messages.len(), 1, "one answer, however often Slack retries: {calls:#?}");
    assert_eq!(messages[0]["text"], reply.as_str(), "the message ends as the complete reply");
    assert_eq!(messages[0]["thread_ts"], "1700000000.000100", "answered in the mention's thread");
    let post = posts(&calls)[0];
    assert_eq!(post["path"], "/api/chat.postMessage");
    assert_eq!(post["authorization"], "Bearer xoxb-test");
    assert!(updates(&calls).iter().all(|u| u["body"]["ts"] == messages[0]["ts"]), "{calls:#?}");
    // The same calls as Slack's own client makes: method path, JSON body, bearer token.
    assert_eq!(sdk_post["authorization"], "Bearer xoxb-sdk");
    let keys = |v: &Value| v["body"].as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!((&post["path"], &post["content_type"]), (&sdk_post["path"], &sdk_post["content_type"]));
    assert_eq!(keys(post), keys(&sdk_post));
    let update = updates(&calls).last().copied().expect("the streamed message was finished by an update");
    assert_eq!((&update["path"], &update["content_type"]), (&sdk_update["path"], &sdk_update["content_type"]));
    assert_eq!(keys(update), keys(&sdk_update));
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
    let reply = reply_to("the real question", &Options::default());
    fake.wait_for_text("D1", &reply, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let calls = fake.calls().await;
    let messages = fake.messages().await;
    assert_eq!(messages.len(), 1, "only the real question is answered: {calls:#?}");
    assert_eq!(posts(&calls).len(), 1, "{calls:#?}");
    assert_eq!(messages[0]["channel"], "D1");
    assert!(posts(&calls)[0]["body"].get("thread_ts").is_none(), "a direct message is answered in the conversation");
    app.shutdown().await;
}

async fn a_rate_limited_post_is_retried_after_retry_after_and_posted_once(backend: Backend) {
    let fake = FakeSlack::start().await;
    fake.rate_limit_next(1, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_with_slack(backend, &fake, &dir).await;
    let mention = callback(
        &unique("limited"),
        json!({"type": "app_mention", "user": "U1", "text": "<@UBOT> hi", "ts": "1700000002.000300", "channel": "C2"}),
    );

    assert_eq!(post_event(&app, &mention, SIGNING_SECRET, now(), None).await.status(), 200);
    fake.wait_for_text("C2", &reply_to("hi", &Options::default()), Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let calls = fake.calls().await;
    assert_eq!((&calls[0]["path"], &calls[0]["status"]), (&json!("/api/chat.postMessage"), &json!(429)), "{calls:#?}");
    assert_eq!((&calls[1]["path"], &calls[1]["status"]), (&json!("/api/chat.postMessage"), &json!(200)), "{calls:#?}");
    let waited = calls[1]["at"].as_f64().unwrap() - calls[0]["at"].as_f64().unwrap();
    assert!(waited >= 0.95, "Retry-After: 1 honoured, waited {waited:.2} s");
    assert_eq!(posts(&calls).len(), 1, "posted once after the 429: {calls:#?}");
    assert_eq!(fake.messages().await.len(), 1);
    app.shutdown().await;
}

/// A slow reply (two seconds of tokens) in each of two conversations at once, with updates
/// allowed every 300 ms per message and every 250 ms across the gateway.
fn streaming_options(channels: PathBuf) -> Options {
    Options { channels: Some(channels), token_ms: 20, reply_tokens: 100, ..Options::default() }
}

async fn a_reply_is_streamed_into_one_message_with_throttled_updates_and_ends_as_the_complete_reply(backend: Backend) {
    let fake = FakeSlack::start().await;
    let dir = tempfile::tempdir().unwrap();
    let channels = channels_file(&fake, &dir, "stream_interval = \"300ms\"\nupdates_per_minute = 240\n");
    let options = streaming_options(channels);
    let app = TestApp::spawn_with(backend, options.clone()).await;
    let mention = |id: &str, channel: &str, ts: &str, text: &str| {
        callback(
            id,
            json!({"type": "app_mention", "user": "U1", "text": format!("<@UBOT> {text}"), "ts": ts, "channel": channel}),
        )
    };
    let (first, second) = ("tell me a long story", "and another one please");

    let (long, other) = (
        mention(&unique("long"), "C3", "1700000003.000100", first),
        mention(&unique("other"), "C4", "1700000003.000200", second),
    );
    let (a, b) = tokio::join!(
        post_event(&app, &long, SIGNING_SECRET, now(), None),
        post_event(&app, &other, SIGNING_SECRET, now(), None),
    );
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
    fake.wait_for_text("C3", &reply_to(first, &options), Duration::from_secs(30)).await;
    fake.wait_for_text("C4", &reply_to(second, &options), Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let calls = fake.calls().await;
    let messages = fake.messages().await;
    assert_eq!(messages.len(), 2, "one message per reply: {calls:#?}");
    for (channel, question) in [("C3", first), ("C4", second)] {
        let reply = reply_to(question, &options);
        let of_channel: Vec<Value> = calls.iter().filter(|c| c["body"]["channel"] == channel).cloned().collect();
        let (posted, updated) = (posts(&of_channel), updates(&of_channel));
        assert_eq!(posted.len(), 1, "{of_channel:#?}");
        let first_text = posted[0]["body"]["text"].as_str().unwrap();
        assert!(first_text.len() < reply.len() / 2, "posted at the first tokens, not at the end: {first_text:?}");
        assert!(reply.starts_with(first_text));
        assert!(updated.len() >= 3, "updated as the reply grew: {of_channel:#?}");
        let (last, growing) = updated.split_last().unwrap();
        let span = last["at"].as_f64().unwrap() - posted[0]["at"].as_f64().unwrap();
        let most = (span / 0.3).floor() as usize + 1;
        assert!(updated.len() <= most, "throttled: {} updates over {span:.2} s: {of_channel:#?}", updated.len());
        assert_eq!(last["body"]["text"], reply.as_str(), "the last update writes the complete reply");
        for pair in std::iter::once(posted[0]).chain(growing.iter().copied()).collect::<Vec<_>>().windows(2) {
            let gap = pair[1]["at"].as_f64().unwrap() - pair[0]["at"].as_f64().unwrap();
            assert!(gap >= 0.28, "updates of one message at least 300 ms apart, saw {gap:.3} s: {of_channel:#?}");
            let (before, after) =
                (pair[0]["body"]["text"].as_str().unwrap(), pair[1]["body"]["text"].as_str().unwrap());
            assert!(after.starts_with(before) && after.len() > before.len(), "the text only grows");
        }
    }
    let mut growing: Vec<f64> = Vec::new();
    for channel in ["C3", "C4"] {
        let of_channel: Vec<Value> = calls.iter().filter(|c| c["body"]["channel"] == channel).cloned().collect();
        let updated = updates(&of_channel);
        growing.extend(updated[..updated.len() - 1].iter().map(|u| u["at"].as_f64().unwrap()));
    }
    growing.sort_by(f64::total_cmp);
    for pair in growing.windows(2) {
        assert!(pair[1] - pair[0] >= 0.2, "updates across the gateway 250 ms apart: {growing:?}");
    }
    app.shutdown().await;
}

async fn a_rate_limited_update_holds_the_stream_for_retry_after_and_the_message_still_ends_complete(backend: Backend) {
    let fake = FakeSlack::start().await;
    let dir = tempfile::tempdir().unwrap();
    let channels = channels_file(&fake, &dir, "stream_interval = \"200ms\"\n");
    let options = streaming_options(channels);
    let app = TestApp::spawn_with(backend, options.clone()).await;
    let mention = callback(
        &unique("slowed"),
        json!({"type": "app_mention", "user": "U1", "text": "<@UBOT> slow me down", "ts": "1700000004.000100", "channel": "C5"}),
    );

    assert_eq!(post_event(&app, &mention, SIGNING_SECRET, now(), None).await.status(), 200);
    fake.wait_for("the first post", Duration::from_secs(20), |calls| !posts(calls).is_empty()).await;
    fake.rate_limit_next(1, 2).await;
    let reply = reply_to("slow me down", &options);
    let calls = fake.wait_for_text("C5", &reply, Duration::from_secs(30)).await;

    let limited = calls.iter().position(|c| c["status"] == 429).expect("a call was rate limited");
    assert_eq!(calls[limited]["path"], "/api/chat.update", "{calls:#?}");
    let next = &calls[limited + 1];
    let waited = next["at"].as_f64().unwrap() - calls[limited]["at"].as_f64().unwrap();
    assert!(waited >= 1.95, "Retry-After: 2 honoured before the next call, waited {waited:.2} s: {calls:#?}");
    assert_eq!(posts(&calls).len(), 1);
    let messages = fake.messages().await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0]["text"], reply.as_str());
    app.shutdown().await;
}

async fn with_streaming_off_the_complete_reply_is_posted_once(backend: Backend) {
    let fake = FakeSlack::start().await;
    let dir = tempfile::tempdir().unwrap();
    let options = streaming_options(channels_file(&fake, &dir, "stream = false\n"));
    let app = TestApp::spawn_with(backend, options.clone()).await;
    let mention = callback(
        &unique("whole"),
        json!({"type": "app_mention", "user": "U1", "text": "<@UBOT> all at once", "ts": "1700000005.000100", "channel": "C6"}),
    );

    assert_eq!(post_event(&app, &mention, SIGNING_SECRET, now(), None).await.status(), 200);
    let reply = reply_to("all at once", &options);
    fake.wait_for_text("C6", &reply, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let calls = fake.calls().await;
    assert_eq!(calls.len(), 1, "{calls:#?}");
    assert_eq!(posts(&calls)[0]["body"]["text"], reply.as_str());
    app.shutdown().await;
}

/// Processes of the real binary: the gateway streaming a reply is killed; the reply, delivered
/// from the durable queue by another gateway, finishes the streamed message.
mod killed_mid_stream {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nats_mongo() {
        a_gateway_killed_while_streaming_leaves_one_message_with_the_complete_reply(Backend::NatsMongo).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rabbit_mongo() {
        a_gateway_killed_while_streaming_leaves_one_message_with_the_complete_reply(Backend::RabbitMongo).await
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

async fn a_gateway_killed_while_streaming_leaves_one_message_with_the_complete_reply(backend: Backend) {
    let fake = FakeSlack::start().await;
    let dir = tempfile::tempdir().unwrap();
    let channels = channels_file(&fake, &dir, "stream_interval = \"200ms\"\n");
    let (broker, mongo) = tokio::join!(support::Broker::start(backend, false), testkit::MongoServer::start());
    let (broker, store) = (broker.expect("a broker"), mongo.url_for_db("slack"));
    let http = reqwest::Client::new();
    let mock_port = testkit::free_port();
    let _mock = spawn(&[
        "mock-llm".into(),
        "--listen".into(),
        format!("127.0.0.1:{mock_port}"),
        "--token-ms".into(),
        "50".into(),
        "--reply-tokens".into(),
        "80".into(),
    ]);
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
    let question = "stream me through a crash";
    let mention = callback(
        &unique("killed"),
        json!({"type": "app_mention", "user": "U1", "text": format!("<@UBOT> {question}"), "ts": "1700000006.000100", "channel": "C7"}),
    );
    let settings = llm::mock_reply::MockSettings { reply_tokens: 80, ..llm::mock_reply::MockSettings::default() };
    let reply = llm::mock_reply::reply_tokens(question, &settings).concat();

    let body = mention.to_string();
    let timestamp = now();
    let acked = http
        .post(format!("{first_base}/v1/channels/slack/events"))
        .header("content-type", "application/json")
        .header("x-slack-request-timestamp", timestamp.to_string())
        .header("x-slack-signature", sign(SIGNING_SECRET, timestamp, &body))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(acked.status(), 200);
    fake.wait_for("the streamed message updated", Duration::from_secs(20), |calls| !updates(calls).is_empty()).await;
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let killed_at = Instant::now();
    let second_port = testkit::free_port();
    let _second = gateway(second_port);
    wait_ready(&http, &format!("http://127.0.0.1:{second_port}")).await;

    fake.wait_for_text("C7", &reply, Duration::from_secs(40)).await;
    println!("complete {:.1} s after the streaming gateway was killed", killed_at.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let calls = fake.calls().await;
    let messages = fake.messages().await;
    assert_eq!(messages.len(), 1, "the streamed message was finished, not a second one posted: {calls:#?}");
    assert_eq!(messages[0]["text"], reply.as_str());
    assert_eq!(posts(&calls).len(), 1, "{calls:#?}");
}
