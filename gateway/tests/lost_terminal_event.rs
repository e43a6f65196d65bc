//! A streamed reply whose terminal event is lost on the bus still ends: once the reply has been
//! quiet for the gateway's reply check, the gateway finds the stored outcome and ends the stream
//! with its `done` or `error`. A reply that is merely slow is not cut short.
//!
//! The worker here is the test itself, consuming the in-process bus and writing the store as a
//! worker does, and dropping the terminal event as a broker blip would.

use std::sync::Arc;
use std::time::Duration;

use bus::{Bus, MemoryBus};
use chatfleet_gateway::{Gateway, GatewayConfig};
use futures::StreamExt;
use schemas::{EventId, FinishReason, PartitionCount, ReplyEvent, ReplyEventKind, ReplyId, SessionId, UserMessage};
use serde_json::{Value, json};
use store::{EmbeddedStore, Failure, Role, Store, StoredMessage};
use tokio_util::sync::CancellationToken;

/// How long a reply may be quiet before the gateway checks the store, in these tests.
const REPLY_CHECK: Duration = Duration::from_millis(300);

struct TestGateway {
    base: String,
    http: reqwest::Client,
    bus: Arc<MemoryBus>,
    store: Arc<EmbeddedStore>,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

/// What the stand-in worker does with the one message it takes.
enum Answer {
    /// Stores this reply and announces one delta, but its `done` is lost.
    ReplyLosingDone(&'static str),
    /// Stores a failure; its `error` event is lost.
    FailureLosingError,
    /// Takes this long, then announces a delta and `done` as usual.
    SlowReply(Duration, &'static str),
}

impl TestGateway {
    async fn spawn() -> TestGateway {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("store.redb")).unwrap());
        let bus = Arc::new(MemoryBus::new(PartitionCount::new(2).unwrap()));
        let config = GatewayConfig { reply_check: REPLY_CHECK, ..GatewayConfig::default() };
        let gateway = Gateway::build(bus.clone(), store.clone(), config, None).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        tokio::spawn(gateway.serve(listener, stop.clone().cancelled_owned()));
        TestGateway { base, http: reqwest::Client::new(), bus, store, stop, _dir: dir }
    }

    async fn create_session(&self) -> (SessionId, String) {
        let r = self.http.post(format!("{}/v1/sessions", self.base)).send().await.unwrap();
        assert_eq!(r.status(), 201);
        let body: Value = r.json().await.unwrap();
        (SessionId::parse(body["session_id"].as_str().unwrap()).unwrap(), body["token"].as_str().unwrap().into())
    }

    /// Posts a message asking for the streamed reply, and returns the stream's events once it
    /// ends (failing if it has not ended within 10 s).
    async fn post_streamed(&self, session: &SessionId, token: &str) -> Vec<(String, String, Value)> {
        let url = format!("{}/v1/sessions/{session}/messages", self.base);
        let response = self
            .http
            .post(url)
            .bearer_auth(token)
            .header("Accept", "text/event-stream")
            .json(&json!({"text": "hello"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body = tokio::time::timeout(Duration::from_secs(10), response.text())
            .await
            .expect("the reply stream ended within 10 s")
            .unwrap();
        parse_sse(&body)
    }

    /// Acts as the worker for one message of the session.
    fn answer_one(&self, session: &SessionId, answer: Answer) -> tokio::task::JoinHandle<()> {
        let (bus, store) = (self.bus.clone(), self.store.clone());
        let partition = bus.partitions().of(session);
        tokio::spawn(async move {
            let mut deliveries = bus.consume(partition).await.unwrap();
            let delivery = deliveries.next().await.unwrap();
            let message = delivery.message.clone().unwrap();
            store.insert_message(&stored(&message, Role::User, &message.text)).await.unwrap();
            match answer {
                Answer::ReplyLosingDone(text) => {
                    bus.publish_event(&delta(&message, text)).await.unwrap();
                    store.insert_message(&stored(&message, Role::Assistant, text)).await.unwrap();
                }
                Answer::FailureLosingError => {
                    let failure = Failure { code: "model_unavailable".into(), message: "the model gave up".into() };
                    store.mark_failed(&message.session_id, &message.message_id, &failure).await.unwrap();
                }
                Answer::SlowReply(after, text) => {
                    tokio::time::sleep(after).await;
                    bus.publish_event(&delta(&message, text)).await.unwrap();
                    store.insert_message(&stored(&message, Role::Assistant, text)).await.unwrap();
                    bus.publish_event(&done(&message, text)).await.unwrap();
                }
            }
            delivery.acker.ack().await.unwrap();
        })
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn stored(message: &UserMessage, role: Role, text: &str) -> StoredMessage {
    let assistant = role == Role::Assistant;
    StoredMessage {
        id: if assistant {
            ReplyId::for_message(&message.message_id).as_str().to_owned()
        } else {
            message.message_id.as_str().to_owned()
        },
        session_id: message.session_id.clone(),
        turn: 1,
        role,
        text: text.to_owned(),
        created_at: time::OffsetDateTime::now_utc(),
        reply_to: assistant.then(|| message.message_id.clone()),
        finish_reason: assistant.then_some(FinishReason::Stop),
        usage: None,
        failure: None,
        starts: u32::from(!assistant),
    }
}

fn event(message: &UserMessage, event_id: EventId, kind: ReplyEventKind) -> ReplyEvent {
    ReplyEvent {
        v: schemas::ENVELOPE_VERSION,
        event_id,
        session_id: message.session_id.clone(),
        message_id: message.message_id.clone(),
        kind,
    }
}

fn delta(message: &UserMessage, text: &str) -> ReplyEvent {
    event(message, EventId::new(1, 1, 0), ReplyEventKind::Delta { index: 0, text: text.to_owned() })
}

fn done(message: &UserMessage, text: &str) -> ReplyEvent {
    let kind = ReplyEventKind::Done {
        reply_id: ReplyId::for_message(&message.message_id),
        text: text.to_owned(),
        finish_reason: FinishReason::Stop,
        usage: None,
    };
    event(message, EventId::terminal(1), kind)
}

/// The events of an SSE body: (event, id, data), keep-alive comments left out.
fn parse_sse(body: &str) -> Vec<(String, String, Value)> {
    let mut events = Vec::new();
    for block in body.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let (mut name, mut id, mut data) = (String::new(), String::new(), String::new());
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                name = v.trim().to_owned();
            } else if let Some(v) = line.strip_prefix("id:") {
                id = v.trim().to_owned();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.trim_start());
            }
        }
        if !name.is_empty() {
            events.push((name, id, serde_json::from_str(&data).unwrap()));
        }
    }
    events
}

fn names(events: &[(String, String, Value)]) -> Vec<&str> {
    events.iter().map(|(name, _, _)| name.as_str()).collect()
}

#[tokio::test]
async fn a_streamed_reply_whose_done_is_lost_ends_with_the_stored_reply() {
    let gateway = TestGateway::spawn().await;
    let (session, token) = gateway.create_session().await;
    let worker = gateway.answer_one(&session, Answer::ReplyLosingDone("hello back"));

    let events = gateway.post_streamed(&session, &token).await;

    worker.await.unwrap();
    assert_eq!(names(&events), ["delta", "done"], "{events:?}");
    let (_, id, data) = &events[1];
    assert_eq!(data["text"], "hello back");
    assert_eq!(id, &EventId::terminal(1).to_string(), "the terminal id a worker would have used");
}

#[tokio::test]
async fn a_streamed_reply_whose_error_is_lost_ends_with_the_stored_failure() {
    let gateway = TestGateway::spawn().await;
    let (session, token) = gateway.create_session().await;
    let worker = gateway.answer_one(&session, Answer::FailureLosingError);

    let events = gateway.post_streamed(&session, &token).await;

    worker.await.unwrap();
    assert_eq!(names(&events), ["error"], "{events:?}");
    assert_eq!(events[0].2["code"], "model_unavailable");
}

#[tokio::test]
async fn a_reply_quiet_for_several_checks_without_an_outcome_is_not_cut_short() {
    let gateway = TestGateway::spawn().await;
    let (session, token) = gateway.create_session().await;
    let worker = gateway.answer_one(&session, Answer::SlowReply(REPLY_CHECK * 4, "late but whole"));

    let events = gateway.post_streamed(&session, &token).await;

    worker.await.unwrap();
    assert_eq!(names(&events), ["delta", "done"], "exactly one done, from the worker: {events:?}");
    assert_eq!(events[1].2["text"], "late but whole");
}
