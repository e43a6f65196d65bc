//! Double texting: what a message sent while the session's previous one is still being answered
//! does, under each policy (`enqueue`, `reject`, `interrupt`), chosen per session or by the
//! deployment's `--double-texting`. Run against both `chatfleet dev` and a fleet on NATS
//! JetStream and a MongoDB-wire server.

#[macro_use]
mod support;

use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{Value, json};
use store::{MongoStore, ReplyClaim, Store};
use support::{Backend, Options, Session, SseEvent, TestApp, assembled_text, echo_of};
use tokio::sync::mpsc;
use tokio::time::Instant;

on_every_backend!(
    session_creation_takes_a_policy_echoes_the_effective_one_and_refuses_unknown_ones,
    under_reject_a_message_sent_during_a_reply_is_refused_until_that_reply_is_done,
    under_reject_a_message_that_could_not_be_answered_frees_the_session_for_the_next,
    under_interrupt_a_new_message_cuts_the_reply_in_progress_short_and_is_answered_in_full,
    under_interrupt_every_unanswered_message_before_the_newest_is_cut_short,
    under_enqueue_a_message_sent_during_a_reply_is_answered_in_full_after_it,
    the_deployment_default_applies_to_sessions_created_without_a_policy,
);

/// A model slow enough that a second message arrives while the first reply streams: about two
/// seconds a reply.
fn slow_model() -> Options {
    Options { first_token_ms: 50, token_ms: 30, reply_tokens: 60, ..Options::default() }
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_else(|| panic!("not an error body: {body}"))
}

/// `POST /v1/sessions` with `body`: the response's status and body.
async fn post_session(app: &TestApp, body: Value) -> (u16, Value) {
    let r = app.http.post(app.url("/v1/sessions")).json(&body).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Creates a session with `body` and returns it with the policy the gateway says it has.
async fn create_session(app: &TestApp, body: Value) -> (Session, String) {
    let (status, created) = post_session(app, body).await;
    assert_eq!(status, 201, "creating a session: {created}");
    let session = Session {
        id: created["session_id"].as_str().unwrap().to_owned(),
        token: created["token"].as_str().unwrap().to_owned(),
    };
    (session, created["double_texting"].as_str().unwrap_or_else(|| panic!("no policy in {created}")).to_owned())
}

/// `POST .../messages` asking for JSON: the status and body.
async fn post(app: &TestApp, session: &Session, body: Value) -> (u16, Value) {
    let r = app.post_message(session, body).await;
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Posts a message that must be accepted; returns its message id.
async fn accepted(app: &TestApp, session: &Session, body: Value) -> String {
    let (status, answer) = post(app, session, body).await;
    assert_eq!(status, 202, "{answer}");
    answer["message_id"].as_str().unwrap().to_owned()
}

/// A session's `GET .../events` stream, read step by step; what was read is kept. A task reads
/// the stream as events arrive and notes when each came, so a test can tell what had arrived at
/// a given moment even if it only looks later.
struct Events {
    arrivals: mpsc::UnboundedReceiver<(Instant, SseEvent)>,
    seen: Vec<SseEvent>,
    /// When each event of `seen` arrived, at the same index.
    arrived: Vec<Instant>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Events {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Events {
    /// Opens the stream; the gateway subscribes before it answers, so nothing sent after this
    /// returns can be missed.
    async fn open(app: &TestApp, session: &Session) -> Events {
        let r = app.open_events(session).await;
        let mut stream = r.bytes_stream().eventsource();
        let (send, arrivals) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            while let Some(item) = stream.next().await {
                let e = item.expect("a well-formed event stream");
                let event =
                    SseEvent { event: e.event, id: e.id, data: serde_json::from_str(&e.data).expect("JSON data") };
                if send.send((Instant::now(), event)).is_err() {
                    return;
                }
            }
        });
        Events { arrivals, seen: Vec::new(), arrived: Vec::new(), reader }
    }

    /// Reads until `enough` holds for what has been read (or fails after 30 s).
    async fn read_until(&mut self, what: &str, enough: impl Fn(&Events) -> bool) {
        let read = async {
            while !enough(self) {
                let (at, event) = self.arrivals.recv().await.expect("the event stream stays open");
                self.seen.push(event);
                self.arrived.push(at);
            }
        };
        if tokio::time::timeout(Duration::from_secs(30), read).await.is_err() {
            panic!("waited 30 s for {what}; read {:#?}", self.seen);
        }
    }

    /// When the `done` of the reply to `message_id` arrived, if it has been read.
    fn done_arrived_at(&self, message_id: &str) -> Option<Instant> {
        let index = self.seen.iter().position(|e| e.event == "done" && e.data["message_id"] == message_id)?;
        Some(self.arrived[index])
    }

    /// The events read so far of the reply to `message_id`.
    fn of(&self, message_id: &str) -> Vec<SseEvent> {
        self.seen.iter().filter(|e| e.data["message_id"] == message_id).cloned().collect()
    }

    fn deltas_of(&self, message_id: &str) -> usize {
        self.of(message_id).iter().filter(|e| e.event == "delta").count()
    }

    /// The `done` of the reply to `message_id`, if it has been read.
    fn done_of(&self, message_id: &str) -> Option<SseEvent> {
        self.of(message_id).into_iter().find(|e| e.event == "done")
    }

    /// The messages whose `done` or `error` has been read, in the order they came.
    fn finished(&self) -> Vec<String> {
        let terminal = self.seen.iter().filter(|e| e.event == "done" || e.event == "error");
        terminal.map(|e| e.data["message_id"].as_str().unwrap().to_owned()).collect()
    }
}

async fn session_creation_takes_a_policy_echoes_the_effective_one_and_refuses_unknown_ones(backend: Backend) {
    let app = TestApp::spawn(backend).await;

    let mut chosen = Vec::new();
    for policy in ["enqueue", "reject", "interrupt"] {
        chosen.push(create_session(&app, json!({"double_texting": policy})).await.1);
    }
    let (_, unspecified) = create_session(&app, json!({"user": "u-1"})).await;
    let (_, null) = create_session(&app, json!({"double_texting": null})).await;
    let (unknown_status, unknown) = post_session(&app, json!({"double_texting": "later"})).await;
    let (mistyped_status, mistyped) = post_session(&app, json!({"double_texting": 1})).await;

    assert_eq!(chosen, ["enqueue", "reject", "interrupt"]);
    assert_eq!(unspecified, "enqueue", "the deployment's default when none is asked for");
    assert_eq!(null, "enqueue");
    assert_eq!(unknown_status, 422);
    assert_eq!(error_code(&unknown), "invalid_request");
    let message = unknown["error"]["message"].as_str().unwrap();
    assert!(message.contains("double_texting") && message.contains("enqueue, reject, interrupt"), "{message}");
    assert_eq!(mistyped_status, 422);
    assert_eq!(error_code(&mistyped), "invalid_request");
}

async fn under_reject_a_message_sent_during_a_reply_is_refused_until_that_reply_is_done(backend: Backend) {
    let app = TestApp::spawn_with(backend, slow_model()).await;
    let (session, policy) = create_session(&app, json!({"double_texting": "reject"})).await;
    let mut events = Events::open(&app, &session).await;
    let first = json!({"text": "first question", "client_message_id": "first"});
    let second = json!({"text": "second question", "client_message_id": "second"});

    let first_id = accepted(&app, &session, first.clone()).await;
    let (refused_status, refused) = post(&app, &session, second.clone()).await;
    let (repeat_status, repeat) = post(&app, &session, first.clone()).await;
    let streamed_refusal = app
        .http
        .post(app.url(&format!("/v1/sessions/{}/messages", session.id)))
        .bearer_auth(&session.token)
        .header("Accept", "text/event-stream")
        .json(&second)
        .send()
        .await
        .unwrap();
    let (streamed_status, streamed) = (streamed_refusal.status(), streamed_refusal.json::<Value>().await.unwrap());
    let refusals_answered = Instant::now();
    events.read_until("the first reply", |e| e.done_of(&first_id).is_some()).await;
    let second_id = accepted(&app, &session, second).await;
    events.read_until("the second reply", |e| e.done_of(&second_id).is_some()).await;
    let history = app.history(&session).await;

    assert_eq!(policy, "reject");
    let first_done = events.done_arrived_at(&first_id).unwrap();
    assert!(first_done > refusals_answered, "the refusals came while the first reply was still streaming");
    assert_eq!(refused_status, 409, "{refused}");
    assert_eq!(error_code(&refused), "reply_in_progress");
    assert!(!refused["error"]["message"].as_str().unwrap().is_empty());
    assert_eq!(repeat_status, 202, "a repeat of the message in progress is not refused: {repeat}");
    assert_eq!(repeat["message_id"], first_id.as_str());
    assert_eq!(streamed_status, 409, "{streamed}");
    assert_eq!(error_code(&streamed), "reply_in_progress");
    assert_eq!(events.finished(), [first_id.clone(), second_id.clone()], "each answered once, in order");
    let texts: Vec<&str> = history.iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(history.len(), 4, "{history:#?}");
    assert_eq!(texts[0], "first question");
    assert_eq!(history[1]["reply_to"], first_id.as_str());
    assert_eq!(texts[2], "second question");
    assert_eq!(history[3]["reply_to"], second_id.as_str());
}

async fn under_reject_a_message_that_could_not_be_answered_frees_the_session_for_the_next(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (session, _) = create_session(&app, json!({"double_texting": "reject"})).await;

    // The model refuses this one for good: the outcome is a recorded failure.
    let refused = app.send_streaming(&session, json!({"text": "[mock:status=400] refuse me"})).await;
    let (next_status, next) = post(&app, &session, json!({"text": "and this?"})).await;

    assert_eq!(refused.last().unwrap().event, "error", "{refused:#?}");
    assert_eq!(next_status, 202, "{next}");
    app.wait_for_replies(&session, 1, Duration::from_secs(30)).await;
}

async fn under_interrupt_a_new_message_cuts_the_reply_in_progress_short_and_is_answered_in_full(backend: Backend) {
    let app = TestApp::spawn_with(backend, slow_model()).await;
    let (session, policy) = create_session(&app, json!({"double_texting": "interrupt"})).await;
    let mut events = Events::open(&app, &session).await;
    let (first_text, second_text) = ("tell me a long story", "no, a short one");

    let first_id = accepted(&app, &session, json!({"text": first_text})).await;
    events.read_until("the first reply's first deltas", |e| e.deltas_of(&first_id) >= 3).await;
    let second_id = accepted(&app, &session, json!({"text": second_text})).await;
    events.read_until("the second reply", |e| e.done_of(&second_id).is_some()).await;
    let history = app.history(&session).await;

    assert_eq!(policy, "interrupt");
    assert_eq!(events.finished(), [first_id.clone(), second_id.clone()]);
    let cut = events.done_of(&first_id).unwrap();
    let cut_text = cut.data["text"].as_str().unwrap();
    assert_eq!(cut.data["finish_reason"], "interrupted", "{cut:#?}");
    assert_eq!(assembled_text(&events.of(&first_id)), cut_text, "the deltas add up to the kept text");
    assert!(!cut_text.is_empty());
    assert!(cut.data.get("usage").is_none(), "{cut:#?}");
    let full = events.done_of(&second_id).unwrap();
    let full_text = full.data["text"].as_str().unwrap();
    assert_eq!(full.data["finish_reason"], "stop");
    assert!(full_text.starts_with(&echo_of(second_text)), "{full_text}");
    assert_eq!(assembled_text(&events.of(&second_id)), full_text);
    assert!(cut_text.len() < full_text.len(), "cut short: {cut_text:?} against a full {full_text:?}");
    let roles: Vec<&str> = history.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"], "{history:#?}");
    assert_eq!(history[0]["text"], first_text);
    assert_eq!(history[1]["reply_to"], first_id.as_str());
    assert_eq!(history[1]["text"], cut_text, "the partial reply is what is stored");
    assert_eq!(history[2]["text"], second_text);
    assert_eq!(history[3]["reply_to"], second_id.as_str());
    assert_eq!(history[3]["text"], full_text);
}

async fn under_interrupt_every_unanswered_message_before_the_newest_is_cut_short(backend: Backend) {
    let app = TestApp::spawn_with(backend, slow_model()).await;
    let (session, _) = create_session(&app, json!({"double_texting": "interrupt"})).await;
    let mut events = Events::open(&app, &session).await;

    let first_id = accepted(&app, &session, json!({"text": "one"})).await;
    events.read_until("the first reply's first delta", |e| e.deltas_of(&first_id) >= 1).await;
    let second_id = accepted(&app, &session, json!({"text": "two"})).await;
    let third_id = accepted(&app, &session, json!({"text": "three"})).await;
    events.read_until("the third reply", |e| e.done_of(&third_id).is_some()).await;
    let history = app.history(&session).await;

    assert_eq!(events.finished(), [first_id.clone(), second_id.clone(), third_id.clone()]);
    // The second was still waiting, or had only just begun, when the third arrived: its reply
    // ends where it was, perhaps before its first word.
    for id in [&first_id, &second_id] {
        let done = events.done_of(id).unwrap();
        assert_eq!(done.data["finish_reason"], "interrupted", "{done:#?}");
        assert_eq!(assembled_text(&events.of(id)), done.data["text"].as_str().unwrap());
    }
    let last = events.done_of(&third_id).unwrap();
    assert_eq!(last.data["finish_reason"], "stop");
    assert!(last.data["text"].as_str().unwrap().starts_with(&echo_of("three")));
    let replied_to: Vec<&str> = history.iter().filter_map(|m| m["reply_to"].as_str()).collect();
    assert_eq!(replied_to, [first_id.as_str(), second_id.as_str(), third_id.as_str()], "{history:#?}");
}

async fn under_enqueue_a_message_sent_during_a_reply_is_answered_in_full_after_it(backend: Backend) {
    let app = TestApp::spawn_with(backend, slow_model()).await;
    let (session, policy) = create_session(&app, json!({})).await;
    let mut events = Events::open(&app, &session).await;
    let texts = ["what is a fleet?", "and a partition?"];

    let first_id = accepted(&app, &session, json!({"text": texts[0]})).await;
    events.read_until("the first reply's first delta", |e| e.deltas_of(&first_id) >= 1).await;
    let second_id = accepted(&app, &session, json!({"text": texts[1]})).await;
    events.read_until("both replies", |e| e.finished().len() >= 2).await;
    let history = app.history(&session).await;

    assert_eq!(policy, "enqueue");
    assert_eq!(events.finished(), [first_id.clone(), second_id.clone()]);
    for (id, text) in [(&first_id, texts[0]), (&second_id, texts[1])] {
        let done = events.done_of(id).unwrap();
        let reply = done.data["text"].as_str().unwrap();
        assert_eq!(done.data["finish_reason"], "stop", "{done:#?}");
        assert!(reply.starts_with(&echo_of(text)), "{reply}");
        assert_eq!(assembled_text(&events.of(id)), reply);
    }
    assert_eq!(history.len(), 4, "{history:#?}");
    assert_eq!(history[0]["text"], texts[0]);
    assert_eq!(history[1]["reply_to"], first_id.as_str());
    assert_eq!(history[2]["text"], texts[1]);
    assert_eq!(history[3]["reply_to"], second_id.as_str());
}

async fn the_deployment_default_applies_to_sessions_created_without_a_policy(backend: Backend) {
    let app = TestApp::spawn_with(backend, Options { double_texting: Some("reject"), ..slow_model() }).await;
    let (defaulted, defaulted_policy) = create_session(&app, json!({})).await;
    let (chosen, chosen_policy) = create_session(&app, json!({"double_texting": "enqueue"})).await;

    accepted(&app, &defaulted, json!({"text": "one"})).await;
    let (refused_status, refused) = post(&app, &defaulted, json!({"text": "two"})).await;
    accepted(&app, &chosen, json!({"text": "one"})).await;
    let (queued_status, queued) = post(&app, &chosen, json!({"text": "two"})).await;

    assert_eq!(defaulted_policy, "reject");
    assert_eq!(refused_status, 409, "{refused}");
    assert_eq!(error_code(&refused), "reply_in_progress");
    assert_eq!(chosen_policy, "enqueue", "a session's own choice wins over the default");
    assert_eq!(queued_status, 202, "{queued}");
    app.wait_for_replies(&chosen, 2, Duration::from_secs(30)).await;
}

/// A reply-in-progress marker whose message will never get a reply must not hold a `reject`
/// session forever. The marker is reached directly in MongoDB, so this runs on that backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_reject_a_stale_reply_marker_gives_way_and_a_live_one_does_not() {
    let app = TestApp::spawn(Backend::NatsMongo).await;
    let (session, _) = create_session(&app, json!({"double_texting": "reject"})).await;
    let mongo_url = app.mongo.as_ref().unwrap().url_for_db("chatfleet_test");
    let mongo = MongoStore::connect(&mongo_url).await.unwrap();
    let session_id = schemas::SessionId::parse(&session.id).unwrap();
    let ghost = schemas::MessageId::parse("m_never_enqueued").unwrap();
    // As if a gateway had marked a message and stopped before enqueueing it.
    assert_eq!(mongo.begin_reply(&session_id, &ghost).await.unwrap(), ReplyClaim::Taken);

    let (fresh_status, fresh) = post(&app, &session, json!({"text": "blocked?"})).await;
    // Two hours later, nobody has taken the message up.
    let aged = json!({
        "update": "sessions",
        "updates": [{"q": {"_id": session.id}, "u": {"$set": {"busy_since": {"$date": {"$numberLong": "0"}}}}}],
    });
    // The `run_command` argument is the driver's document type, inferred here, so this test
    // needs no direct dependency on the driver.
    let database = mongo.client().database(mongo.database_name());
    database.run_command(serde_json::from_value(aged).unwrap()).await.unwrap();
    let after_abandoned = accepted(&app, &session, json!({"text": "after an abandoned marker"})).await;
    app.wait_for_replies(&session, 1, Duration::from_secs(30)).await;
    // As if the worker that stored the reply had stopped before clearing the marker. The worker
    // clears its marker just after storing the reply, so wait for that before setting it again.
    let answered = schemas::MessageId::parse(&after_abandoned).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match mongo.begin_reply(&session_id, &answered).await.unwrap() {
            ReplyClaim::Taken => break,
            claim => assert!(tokio::time::Instant::now() < deadline, "the worker never cleared its marker: {claim:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after_answered = accepted(&app, &session, json!({"text": "after an answered marker"})).await;
    let history = app.wait_for_replies(&session, 2, Duration::from_secs(30)).await;

    assert_eq!(fresh_status, 409, "a marker only just set stands: {fresh}");
    assert_eq!(error_code(&fresh), "reply_in_progress");
    let replied_to: Vec<&str> = history.iter().filter_map(|m| m["reply_to"].as_str()).collect();
    assert_eq!(replied_to, [after_abandoned.as_str(), after_answered.as_str()]);
}
