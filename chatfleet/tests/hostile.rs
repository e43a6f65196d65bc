//! Hostile clients against a running fleet (`dev`, and a fleet on NATS and on RabbitMQ):
//! - isolation: an intruder holding a session of its own tries to reach another session's data
//!   by every route (ids, tokens, cursors, cancel, history, the AI SDK endpoints, idempotency
//!   keys, channel conversation ids) and gets 401/403/404 each time, or only its own data;
//! - injection: every client value that could reach a NATS subject or a RabbitMQ routing key,
//!   made of `.`, `*`, `>`, `#`, spaces, control characters, Unicode or too long, is refused
//!   at the edge or only ever reaches the bus hashed into an id; on NATS a subscriber on every
//!   subject of the deployment checks what was actually published;
//! - fuzzing: generated malformed requests, sent from raw sockets for a bounded time from a
//!   seeded generator (the seed is printed; `CHATFLEET_FUZZ_SEED` replays it), get no 5xx, no
//!   hang and no crash, every error is the JSON error body, and nothing stored changes.

#[macro_use]
mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use base64::Engine;
use futures::StreamExt;
use hmac::{Hmac, Mac};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use sha2::Sha256;
use support::{Backend, Options, Session, TestApp, s};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

on_every_backend!(
    another_sessions_data_is_out_of_reach_by_every_route,
    injection_attempts_in_every_client_value_are_refused_or_hashed_before_the_bus,
);

mod fuzzing {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn generated_malformed_requests_to_dev_get_no_5xx_no_hang_and_change_nothing() {
        super::fuzz(super::Backend::Dev).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn generated_malformed_requests_to_a_nats_fleet_get_no_5xx_no_hang_and_change_nothing() {
        super::fuzz(super::Backend::NatsMongo).await
    }
}

/// The integration's secret of the channels file these tests use.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Values made to break a subject or routing key, or a log line.
const INJECTIONS: &[&str] = &[
    ".",
    "a.b",
    "*",
    ">",
    "#",
    "s_1.>",
    "chatfleet.in.0.x",
    "a b",
    " ",
    "tab\there",
    "new\nline",
    "nul\0",
    "ü",
    "\u{ff0e}",
    "🙂",
    "..",
    "a/b",
];

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_else(|| panic!("not an error body: {body}"))
}

/// Every byte outside `[A-Za-z0-9_-]` as `%XX`, so the value arrives as one path segment.
fn encode_segment(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A channels file with the webhook integration `acme`, delivering to a port nobody listens
/// on (these tests never look at deliveries).
fn channels_file(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let path = dir.path().join("channels.toml");
    let text = format!(
        "[webhooks.acme]\nsecret = \"{SECRET}\"\nurl = \"http://127.0.0.1:9/hook\"\n\n[delivery]\nretry_schedule = [\"1s\"]\nattempt_timeout = \"1s\"\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Signs a webhook as Standard Webhooks does.
fn sign(id: &str, timestamp: i64, body: &str) -> String {
    let key = base64::engine::general_purpose::STANDARD.decode(SECRET.strip_prefix("whsec_").unwrap()).unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

async fn post_webhook(app: &TestApp, id: &str, body: &Value) -> reqwest::Response {
    let body = body.to_string();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    app.http
        .post(app.url("/v1/channels/webhooks/acme"))
        .header("content-type", "application/json")
        .header("webhook-id", id)
        .header("webhook-timestamp", now.to_string())
        .header("webhook-signature", sign(id, now, &body))
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn spawn_with_webhooks(backend: Backend, dir: &tempfile::TempDir) -> TestApp {
    TestApp::spawn_with(backend, Options { channels: Some(channels_file(dir)), ..Options::default() }).await
}

async fn another_sessions_data_is_out_of_reach_by_every_route(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_with_webhooks(backend, &dir).await;
    let victim = app.create_session().await;
    let intruder = app.create_session().await;
    let secret_text = "the victim's secret plan";
    let events = app.send_streaming(&victim, json!({"text": secret_text, "client_message_id": "k-1"})).await;
    let victim_message = events.last().unwrap().data["message_id"].as_str().unwrap().to_owned();
    let victim_cursor = events.last().unwrap().id.clone();
    let before = app.history(&victim).await;
    let v = &victim.id;
    let stolen_signature = intruder.token.rsplit('.').next().unwrap();
    let forged = format!("v1.{v}.{stolen_signature}");
    let http = &app.http;
    let ai_sdk_body = json!({"id": v, "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}], "trigger": "submit-message"});

    // Arrange the attempts: every route of the victim's session with the intruder's token (as a
    // header and as a parameter), a forged token, and paths that try to climb out of the
    // intruder's own session.
    let attempts: Vec<(&str, reqwest::RequestBuilder, &[u16])> = vec![
        ("history", http.get(app.url(&format!("/v1/sessions/{v}/messages"))).bearer_auth(&intruder.token), &[403]),
        (
            "history, token as parameter",
            http.get(app.url(&format!("/v1/sessions/{v}/messages?access_token={}", intruder.token))),
            &[403],
        ),
        ("events", http.get(app.url(&format!("/v1/sessions/{v}/events"))).bearer_auth(&intruder.token), &[403]),
        (
            "events resumed from the start",
            http.get(app.url(&format!("/v1/sessions/{v}/events")))
                .bearer_auth(&intruder.token)
                .header("last-event-id", "0000000000-000-000000"),
            &[403],
        ),
        (
            "events resumed, cursor as parameter",
            http.get(app.url(&format!(
                "/v1/sessions/{v}/events?last_event_id=0000000000-000-000000&access_token={}",
                intruder.token
            ))),
            &[403],
        ),
        (
            "post a message",
            http.post(app.url(&format!("/v1/sessions/{v}/messages")))
                .bearer_auth(&intruder.token)
                .json(&json!({"text": "sneaky"})),
            &[403],
        ),
        ("delete", http.delete(app.url(&format!("/v1/sessions/{v}"))).bearer_auth(&intruder.token), &[403]),
        (
            "cancel the victim's message",
            http.post(app.url(&format!("/v1/sessions/{v}/messages/{victim_message}/cancel")))
                .bearer_auth(&intruder.token),
            &[403],
        ),
        (
            "AI SDK resume",
            http.get(app.url(&format!("/v1/ai-sdk/chat/{v}/stream"))).bearer_auth(&intruder.token),
            &[403],
        ),
        ("AI SDK chat", http.post(app.url("/v1/ai-sdk/chat")).bearer_auth(&intruder.token).json(&ai_sdk_body), &[403]),
        (
            "forged token: the victim's id with the intruder's signature",
            http.get(app.url(&format!("/v1/sessions/{v}/messages"))).bearer_auth(&forged),
            &[401],
        ),
        (
            "forged token on the AI SDK",
            http.post(app.url("/v1/ai-sdk/chat")).bearer_auth(&forged).json(&ai_sdk_body),
            &[401],
        ),
        (
            "a path climbing out of the intruder's session",
            http.get(app.url(&format!("/v1/sessions/{}%2F..%2F{v}/messages", intruder.id)))
                .bearer_auth(&intruder.token),
            &[404],
        ),
        (
            "a session id with the victim's appended",
            http.get(app.url(&format!("/v1/sessions/{}.{v}/messages", intruder.id))).bearer_auth(&intruder.token),
            &[404],
        ),
        (
            "a channel conversation's session",
            http.get(app.url(&format!("/v1/sessions/ch_{}/messages", "0".repeat(32)))).bearer_auth(&intruder.token),
            &[403],
        ),
    ];

    // Act and assert: each is refused with the JSON error body, and says nothing of the victim.
    for (what, request, allowed) in attempts {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let body = response.text().await.unwrap();
        assert!(allowed.contains(&status), "{what}: {status} {body}");
        let parsed: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{what}: not JSON: {body}"));
        assert!(!error_code(&parsed).is_empty());
        assert!(!body.contains(secret_text), "{what} leaked the victim's text: {body}");
    }

    // The intruder's own routes, given the victim's ids, reach only the intruder's own data.
    let cancel = http
        .post(app.url(&format!("/v1/sessions/{}/messages/{victim_message}/cancel", intruder.id)))
        .bearer_auth(&intruder.token)
        .send()
        .await
        .unwrap();
    // A cancel names a message of the caller's own session: the victim's message id is looked
    // for there, where no message can have it (ids are random or derived from their session).
    assert_eq!(cancel.status(), 202, "{}", cancel.text().await.unwrap_or_default());
    let same_key = app.post_message(&intruder, json!({"text": "mine", "client_message_id": "k-1"})).await;
    let same_key: Value = same_key.json().await.unwrap();
    assert_ne!(same_key["message_id"], victim_message.as_str(), "an idempotency key is per session");
    let ai_sdk_same_key = http
        .post(app.url("/v1/ai-sdk/chat"))
        .bearer_auth(&intruder.token)
        .json(&json!({"id": intruder.id, "messages": [{"id": "k-1", "role": "user", "parts": [{"type": "text", "text": "mine too"}]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(ai_sdk_same_key.status(), 200);
    let ai_sdk_text = ai_sdk_same_key.text().await.unwrap();
    assert!(!ai_sdk_text.contains(secret_text), "the AI SDK replayed the victim's reply: {ai_sdk_text}");
    let webhook = post_webhook(&app, "msg_isolation_1", &json!({"conversation_id": v, "text": "from a channel"})).await;
    assert_eq!(webhook.status(), 202);
    let webhook: Value = webhook.json().await.unwrap();
    assert_ne!(webhook["session_id"], v.as_str(), "a conversation id is never taken as a session id");
    assert!(webhook["session_id"].as_str().unwrap().starts_with("ch_"));

    // Nothing of the victim's changed, and its reply was not cancelled.
    let after = app.history(&victim).await;
    assert_eq!(before, after);
    assert_eq!(after.len(), 2);
    assert!(after[1]["text"].as_str().unwrap().contains("the victim"), "{after:#?}");

    // The intruder's event stream, resumed from the victim's cursor, carries none of the
    // victim's events, even while the victim is being answered.
    let resumed = http
        .get(app.url(&format!("/v1/sessions/{}/events", intruder.id)))
        .bearer_auth(&intruder.token)
        .header("last-event-id", &victim_cursor)
        .send()
        .await
        .unwrap();
    assert!([200, 410].contains(&resumed.status().as_u16()), "{}", resumed.status());
    let ai_sdk_resume =
        http.get(app.url(&format!("/v1/ai-sdk/chat/{}/stream", intruder.id))).bearer_auth(&intruder.token);
    let (seen, ()) = tokio::join!(events_for(resumed, Duration::from_secs(2)), async {
        let _ = app.send_streaming(&victim, json!({"text": "another secret"})).await;
    });
    let ai_sdk_resume = ai_sdk_resume.send().await.unwrap();
    assert!(seen.iter().all(|e| e.data["session_id"] == intruder.id.as_str()), "{seen:#?}");
    assert!(!seen.iter().any(|e| e.data.to_string().contains("secret")), "{seen:#?}");
    assert!([200, 204].contains(&ai_sdk_resume.status().as_u16()));
    assert!(!ai_sdk_resume.text().await.unwrap().contains("secret"));
}

/// The events an endless stream (`GET …/events`) carries within `within`; the stream is then
/// dropped.
async fn events_for(response: reqwest::Response, within: Duration) -> Vec<support::SseEvent> {
    use eventsource_stream::Eventsource;
    let mut stream = response.bytes_stream().eventsource();
    let mut events = Vec::new();
    let _ = tokio::time::timeout(within, async {
        while let Some(Ok(e)) = stream.next().await {
            let data = serde_json::from_str(&e.data).unwrap_or(Value::String(e.data.clone()));
            events.push(support::SseEvent { event: e.event, id: e.id, data });
        }
    })
    .await;
    events
}

/// Collects the subjects published on the fleet's NATS server under the deployment's prefix.
struct SubjectWatch {
    subscriber: async_nats::Subscriber,
}

impl SubjectWatch {
    async fn start(app: &TestApp) -> Option<SubjectWatch> {
        if app.backend != Backend::NatsMongo {
            return None;
        }
        let client = async_nats::connect(app.bus_url()).await.expect("the fleet's NATS server");
        let subscriber = client.subscribe("chatfleet.>").await.unwrap();
        client.flush().await.unwrap();
        Some(SubjectWatch { subscriber })
    }

    async fn seen(mut self, within: Duration) -> BTreeSet<String> {
        let mut subjects = BTreeSet::new();
        let deadline = tokio::time::Instant::now() + within;
        while let Ok(Some(message)) = tokio::time::timeout_at(deadline, self.subscriber.next()).await {
            subjects.insert(message.subject.to_string());
        }
        subjects
    }
}

async fn injection_attempts_in_every_client_value_are_refused_or_hashed_before_the_bus(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_with_webhooks(backend, &dir).await;
    let watch = SubjectWatch::start(&app).await;
    let session = app.create_session().await;
    let long = "a".repeat(65);
    let very_long = "b".repeat(300);
    let attempts = INJECTIONS.iter().copied().chain([long.as_str(), very_long.as_str()]);
    let http = &app.http;
    let mut sent = 0;

    for attempt in attempts {
        let segment = encode_segment(attempt);
        // As a session id, in every route's path, with a valid token of another session. (An
        // HTTP client resolves the dot segments `.` and `..`, even percent-encoded, before it
        // sends a path: those two never reach a server as a segment.)
        let dot_segment = attempt == "." || attempt == "..";
        for path in [
            format!("/v1/sessions/{segment}"),
            format!("/v1/sessions/{segment}/messages"),
            format!("/v1/sessions/{segment}/events"),
            format!("/v1/sessions/{segment}/messages/m_1/cancel"),
            format!("/v1/ai-sdk/chat/{segment}/stream"),
        ] {
            if dot_segment {
                continue;
            }
            for method in [reqwest::Method::GET, reqwest::Method::POST, reqwest::Method::DELETE] {
                let response = http
                    .request(method.clone(), app.url(&path))
                    .bearer_auth(&session.token)
                    .json(&json!({"text": "x"}))
                    .send()
                    .await
                    .unwrap();
                let status = response.status().as_u16();
                assert!([404, 405].contains(&status), "{method} {path}: {status}");
                let body: Value = response.json().await.unwrap();
                assert!(["not_found", "method_not_allowed"].contains(&error_code(&body)), "{method} {path}: {body}");
            }
        }
        // As a message id to cancel.
        let cancel = http
            .post(app.url(&format!("/v1/sessions/{}/messages/{segment}/cancel", session.id)))
            .bearer_auth(&session.token)
            .send()
            .await
            .unwrap();
        assert_eq!(cancel.status(), 404, "cancel {attempt:?}");
        // As the AI SDK chat id.
        let chat = http
            .post(app.url("/v1/ai-sdk/chat"))
            .bearer_auth(&session.token)
            .json(&json!({"id": attempt, "messages": [{"role": "user", "parts": [{"type": "text", "text": "hi"}]}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(chat.status(), 404, "AI SDK chat id {attempt:?}");
        // As a webhook integration's name.
        let hook = http.post(app.url(&format!("/v1/channels/webhooks/{segment}"))).body("{}").send().await.unwrap();
        assert_eq!(hook.status(), 404, "webhook name {attempt:?}");
        // As a cursor (blank is no cursor at all, as `EventSource` sends before its first id).
        if let Ok(value) = reqwest::header::HeaderValue::from_str(attempt)
            && !attempt.trim().is_empty()
        {
            let resume = http
                .get(app.url(&format!("/v1/sessions/{}/events", session.id)))
                .bearer_auth(&session.token)
                .header("last-event-id", value)
                .send()
                .await
                .unwrap();
            assert_eq!(resume.status(), 422, "Last-Event-ID {attempt:?}");
        }
        // As an idempotency key: accepted (any printable text up to 64 characters), and on the
        // bus only as the id derived from it.
        let keyed = app.post_message(&session, json!({"text": "keyed", "client_message_id": attempt})).await;
        let printable = attempt.chars().count() <= 64 && !attempt.chars().any(char::is_control);
        if printable {
            assert_eq!(keyed.status(), 202, "client_message_id {attempt:?}");
            let body: Value = keyed.json().await.unwrap();
            let id = body["message_id"].as_str().unwrap();
            assert!(id.starts_with("c_") && schemas::MessageId::parse(id).is_ok(), "{id}");
            sent += 1;
        } else {
            assert_eq!(keyed.status(), 422, "client_message_id {attempt:?}");
        }
        // As a channel conversation id and user: hashed into a `ch_` session, or refused when
        // longer than 128 characters.
        let id = format!("msg_inject_{sent}_{}", rand::random::<u32>());
        let hooked =
            post_webhook(&app, &id, &json!({"conversation_id": attempt, "user": attempt, "text": "hooked"})).await;
        if attempt.chars().count() <= 128 {
            assert_eq!(hooked.status(), 202, "conversation_id {attempt:?}");
            let body: Value = hooked.json().await.unwrap();
            let session_id = body["session_id"].as_str().unwrap();
            assert!(session_id.starts_with("ch_") && schemas::SessionId::parse(session_id).is_ok(), "{session_id}");
        } else {
            assert_eq!(hooked.status(), 422, "conversation_id of {} characters", attempt.chars().count());
        }
        // As the session's user.
        let created = http.post(app.url("/v1/sessions")).json(&json!({"user": attempt})).send().await.unwrap();
        assert!([201, 422].contains(&created.status().as_u16()));
    }

    app.wait_for_replies(&session, sent, Duration::from_secs(30)).await;
    if let Some(watch) = watch {
        let subjects = watch.seen(Duration::from_millis(500)).await;
        assert!(!subjects.is_empty(), "the watch saw the fleet's own traffic");
        for subject in &subjects {
            assert!(
                subject
                    .split('.')
                    .all(|t| !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')),
                "a subject shaped by a client: {subject:?}"
            );
        }
    }
}

/// One generated request, as bytes on the wire, and what the test knows of it.
struct Generated {
    bytes: Vec<u8>,
    head: bool,
    /// Its request line is not HTTP/1.0 or HTTP/1.1, which hyper answers 505.
    bad_version: bool,
    /// It names the victim's session (never with a valid token of it).
    targets_victim: bool,
    /// It asks for `/readyz`, whose 503 reports a slow bus or store, not an error of the request.
    readiness: bool,
}

fn pick<'a, T: ?Sized>(rng: &mut StdRng, items: &[&'a T]) -> &'a T {
    items[rng.random_range(0..items.len())]
}

fn random_bytes(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let n = rng.random_range(0..=max);
    (0..n).map(|_| rng.random()).collect()
}

fn random_visible(rng: &mut StdRng, max: usize) -> String {
    let n = rng.random_range(0..=max);
    (0..n).map(|_| rng.random_range(0x21u8..0x7f) as char).collect()
}

/// A malformed (or, sometimes, well-formed) request aimed at the gateway's routes.
fn generate(rng: &mut StdRng, victim: &Session, intruder: &Session) -> Generated {
    let method =
        pick(rng, &["GET", "POST", "DELETE", "PUT", "PATCH", "OPTIONS", "HEAD", "get", "FOO", "CONNECT", "TRACE"])
            .to_owned();
    let hostile = |rng: &mut StdRng| -> String {
        match rng.random_range(0..8) {
            0 => victim.id.clone(),
            1 => intruder.id.clone(),
            2 => encode_segment(pick(rng, INJECTIONS)),
            3 => "%FF%FE".to_owned(),
            4 => "x".repeat(rng.random_range(60..3000)),
            5 => random_visible(rng, 20).replace(['/', '?', '#'], "_"),
            6 => String::new(),
            _ => "m_1".to_owned(),
        }
    };
    let (a, b) = (hostile(rng), hostile(rng));
    let path = match rng.random_range(0..16) {
        0 => "/".to_owned(),
        1 => "/v1/sessions".to_owned(),
        2 => format!("/v1/sessions/{a}"),
        3 => format!("/v1/sessions/{a}/messages"),
        4 => format!("/v1/sessions/{a}/events"),
        5 => format!("/v1/sessions/{a}/messages/{b}/cancel"),
        6 => "/v1/ai-sdk/chat".to_owned(),
        7 => format!("/v1/ai-sdk/chat/{a}/stream"),
        8 => format!("/v1/channels/webhooks/{a}"),
        9 => "/v1/channels/slack/events".to_owned(),
        10 => "/v1/channels/teams/messages".to_owned(),
        11 => pick(rng, &["/healthz", "/readyz", "/metrics", "/favicon.ico"]).to_owned(),
        12 => format!("/{}", random_visible(rng, 40).replace(['?', '#'], "")),
        13 => "*".to_owned(),
        14 => format!("http://gateway/v1/sessions/{a}/messages"),
        _ => format!("/v1/sessions/{a}/messages/{b}"),
    };
    let query = match rng.random_range(0..9) {
        0 => format!("?access_token={}", intruder.token),
        1 => "?access_token=a&access_token=b".to_owned(),
        2 => format!("?last_event_id={}", random_visible(rng, 30).replace(['&', '#'], "")),
        3 => "?%".to_owned(),
        4 => "?access_token=%FF%FE".to_owned(),
        5 => "?last_event_id=0000000000-000-000000&last_event_id=x".to_owned(),
        6 => format!("?{}", random_visible(rng, 40).replace('#', "")),
        _ => String::new(),
    };
    let version = pick(rng, &["HTTP/1.1", "HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.2", "HTTP/9", "FOO"]);
    let bad_version = !["HTTP/1.1", "HTTP/1.0"].contains(&version);
    let mut bytes = format!("{method} {path}{query} {version}\r\nHost: gateway\r\nConnection: close\r\n").into_bytes();
    let forged = format!("v1.{}.{}", victim.id, intruder.token.rsplit('.').next().unwrap());
    match rng.random_range(0..7) {
        0 => bytes.extend(format!("Authorization: Bearer {}\r\n", intruder.token).as_bytes()),
        1 => bytes.extend(format!("Authorization: Bearer {forged}\r\n").as_bytes()),
        2 => bytes.extend(format!("Authorization: Bearer {}\r\n", "t".repeat(rng.random_range(1..6000))).as_bytes()),
        3 => bytes.extend(format!("Authorization: Basic {}\r\n", random_visible(rng, 30)).as_bytes()),
        4 => {
            bytes.extend(b"Authorization: Bearer v1.");
            bytes.extend(random_bytes(rng, 30).into_iter().filter(|b| *b != b'\r' && *b != b'\n'));
            bytes.extend(b"\r\n");
        }
        _ => {}
    }
    for _ in 0..rng.random_range(0..4) {
        match rng.random_range(0..8) {
            0 => bytes.extend(b"Accept: text/event-stream\r\n"),
            1 => bytes.extend(format!("Last-Event-ID: {}\r\n", random_visible(rng, 30)).as_bytes()),
            2 => bytes.extend(b"Content-Type: application/json\r\n"),
            3 => bytes.extend(format!("X-{}: {}\r\n", random_visible(rng, 10), random_visible(rng, 100)).as_bytes()),
            4 => bytes.extend(b"X-Folded: a\r\n  folded\r\n"),
            5 => {
                bytes.extend(b"X-Bytes: ");
                bytes.extend(random_bytes(rng, 20).into_iter().filter(|b| *b != b'\r' && *b != b'\n'));
                bytes.extend(b"\r\n");
            }
            6 => bytes.extend(b"Transfer-Encoding: chunked\r\n"),
            _ => bytes
                .extend(b"webhook-id: x\r\nwebhook-timestamp: -9223372036854775808\r\nwebhook-signature: v1,AAAA\r\n"),
        }
    }
    let body: Vec<u8> = match rng.random_range(0..10) {
        0 => Vec::new(),
        1 => random_bytes(rng, 200),
        2 => b"{\"text\": ".to_vec(),
        3 => json!({"text": 5, "client_message_id": ["x"]}).to_string().into_bytes(),
        4 => "[".repeat(rng.random_range(10..5000)).into_bytes(),
        5 => json!({"id": victim.id, "messages": [{"role": "user", "parts": [{"type": "text", "text": "hi"}]}]})
            .to_string()
            .into_bytes(),
        6 => json!({"user": "u".repeat(200), "metadata": {"k": 1}}).to_string().into_bytes(),
        7 => json!({"type": "url_verification", "challenge": "c"}).to_string().into_bytes(),
        _ => json!({"text": "hello"}).to_string().into_bytes(),
    };
    match rng.random_range(0..6) {
        // A length shorter than the body, or longer (the gateway waits for the rest until its
        // body read timeout), or far beyond every limit.
        0 => bytes.extend(format!("Content-Length: {}\r\n", body.len() / 2).as_bytes()),
        1 => bytes.extend(format!("Content-Length: {}\r\n", body.len() + 10).as_bytes()),
        2 => bytes.extend(b"Content-Length: 99999999999\r\n"),
        3 => bytes.extend(format!("Content-Length: {}\r\nContent-Length: 3\r\n", body.len()).as_bytes()),
        4 => bytes.extend(b"Content-Length: -1\r\n"),
        _ => bytes.extend(format!("Content-Length: {}\r\n", body.len()).as_bytes()),
    }
    bytes.extend(b"\r\n");
    let victims_id = victim.id.as_bytes();
    // The victim's id where a path names the session (`a`). As a message id (`b`), in a path of
    // the intruder's own session, it names nothing of the victim's: cancelling an unknown message
    // id of one's own session is `202` and does nothing (docs/http-api.md).
    let targets_victim = (a == victim.id && path.contains(&a))
        || (path.ends_with("/v1/ai-sdk/chat") && body.windows(victims_id.len()).any(|w| w == victims_id));
    bytes.extend(body);
    Generated { bytes, head: method == "HEAD", bad_version, targets_victim, readiness: path == "/readyz" }
}

/// What became of one request.
enum Outcome {
    /// The status and, unless the answer streams or is to a HEAD, the body.
    Answered { status: u16, content_type: String, body: Vec<u8> },
    /// Closed before any answer.
    Closed,
}

/// Sends `request` on a connection of its own and reads the answer's head, then its body (by
/// its length, or to the close); a stream is not followed past its head. Panics if either
/// takes longer than `bound`.
async fn exchange(address: &str, request: &Generated, bound: Duration) -> Outcome {
    let mut socket = tokio::net::TcpStream::connect(address).await.expect("the gateway accepts connections");
    let _ = socket.write_all(&request.bytes).await;
    let mut answer = Vec::new();
    let mut buffer = vec![0u8; 16 * 1024];
    let head_end = loop {
        if let Some(at) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        match tokio::time::timeout(bound, socket.read(&mut buffer)).await {
            Err(_) => panic!("no answer within {bound:?} to {:?}", String::from_utf8_lossy(&request.bytes)),
            Ok(Ok(0)) | Ok(Err(_)) => return Outcome::Closed,
            Ok(Ok(n)) => answer.extend_from_slice(&buffer[..n]),
        }
    };
    let head = String::from_utf8_lossy(&answer[..head_end]).to_lowercase();
    let status: u16 = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status line");
    let header =
        |name: &str| head.lines().find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::trim).map(str::to_owned));
    let content_type = header("content-type").unwrap_or_default();
    let mut body = answer[head_end..].to_vec();
    if request.head || content_type.starts_with("text/event-stream") || status == 204 || status == 304 {
        return Outcome::Answered { status, content_type, body: Vec::new() };
    }
    let length: Option<usize> = header("content-length").and_then(|v| v.parse().ok());
    let deadline = tokio::time::Instant::now() + bound;
    while length.is_none_or(|n| body.len() < n) {
        match tokio::time::timeout_at(deadline, socket.read(&mut buffer)).await {
            Err(_) => panic!("the answer's body did not end within {bound:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => body.extend_from_slice(&buffer[..n]),
        }
    }
    if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        body = dechunk(&body);
    }
    Outcome::Answered { status, content_type, body }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    while let Some(line_end) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&raw[..line_end]).trim(), 16).unwrap_or(0);
        if size == 0 || raw.len() < line_end + 2 + size {
            break;
        }
        body.extend_from_slice(&raw[line_end + 2..line_end + 2 + size]);
        raw = &raw[(line_end + 4 + size).min(raw.len())..];
    }
    body
}

/// hyper answers a request it cannot parse by itself, with an empty body: 400 (malformed), 414
/// (URI too long), 431 (headers too large), 505 (an HTTP version it does not speak). The
/// gateway never sees those requests (SECURITY.md, "Hostile input").
const HYPER_OWN: [u16; 4] = [400, 414, 431, 505];

async fn fuzz(backend: Backend) {
    let seed: u64 = std::env::var("CHATFLEET_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    let secs: u64 = std::env::var("CHATFLEET_FUZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    eprintln!("fuzzing {backend:?} for {secs} s with seed {seed} (CHATFLEET_FUZZ_SEED={seed} replays it)");
    let options = Options { extra_gateway_args: vec![s("--body-read-timeout-secs"), s("2")], ..Options::default() };
    let app = TestApp::spawn_with(backend, options).await;
    let victim = app.create_session().await;
    let intruder = app.create_session().await;
    app.send_streaming(&victim, json!({"text": "the victim's words"})).await;
    let before = app.history(&victim).await;
    let address = app.base.strip_prefix("http://").unwrap().to_owned();
    let mut rng = StdRng::seed_from_u64(seed);
    let (started, mut sent, mut closed, mut not_ready) = (Instant::now(), 0u64, 0u64, 0u64);
    let mut statuses = std::collections::BTreeMap::<u16, u64>::new();

    while started.elapsed() < Duration::from_secs(secs) {
        let request = generate(&mut rng, &victim, &intruder);
        let shown = String::from_utf8_lossy(&request.bytes[..request.bytes.len().min(300)]).into_owned();
        let context = format!("seed {seed}, request {sent}: {shown:?}");
        match exchange(&address, &request, Duration::from_secs(8)).await {
            Outcome::Closed => closed += 1,
            Outcome::Answered { status, content_type, body } => {
                *statuses.entry(status).or_default() += 1;
                if status == 503 && request.readiness {
                    // The probe waits 1 s for the bus and for the store; on a busy machine the
                    // store can take longer. Its report says which (a HEAD has no body).
                    let report: Value = serde_json::from_slice(&body).unwrap_or_default();
                    assert!(
                        request.head || report["bus"] == "unavailable" || report["store"] == "unavailable",
                        "{report}; {context}"
                    );
                    not_ready += 1;
                    sent += 1;
                    continue;
                }
                assert!(status < 500 || (status == 505 && request.bad_version), "{status}; {context}");
                if request.targets_victim {
                    assert!(!(200..300).contains(&status), "{status} for the victim's session; {context}");
                }
                if status >= 400 && !body.is_empty() {
                    let parsed: Value = serde_json::from_slice(&body)
                        .unwrap_or_else(|_| panic!("not JSON: {:?}; {context}", String::from_utf8_lossy(&body)));
                    assert!(content_type.starts_with("application/json"), "{content_type}; {context}");
                    assert!(
                        parsed["error"]["code"].is_string() && parsed["error"]["message"].is_string(),
                        "{parsed}; {context}"
                    );
                } else if status >= 400 && !request.head {
                    assert!(HYPER_OWN.contains(&status), "{status} with an empty body; {context}");
                }
            }
        }
        sent += 1;
    }
    eprintln!(
        "{sent} requests, {closed} closed without an answer, {not_ready} readiness probes not ready; statuses {statuses:?}"
    );

    // Still serving, and nothing stored changed.
    let health = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(app.history(&victim).await, before, "seed {seed}");
    assert!(sent > 100, "only {sent} requests in {secs} s");
    assert_eq!(closed, 0, "connections closed without an answer (seed {seed})");
}
