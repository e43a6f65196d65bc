//! Cancelling a message (`POST /v1/sessions/{id}/messages/{message_id}/cancel`, http-api.md
//! "Resuming, cancelling, and the AI SDK stream"), on every backend: a reply being generated
//! stops with a `done` whose finish reason is `cancelled` and whose text is what had been
//! generated (kept in the history); a message still waiting gets an empty cancelled reply and
//! the session goes on; an answered message is `409 already_answered`; repeating a cancel is
//! harmless. On the brokers the cancel goes to a second gateway, not the one streaming the reply.

#[macro_use]
mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Backend, Options, Session, SseEvent, TestApp, echo_of, read_until_terminal_of};

on_every_backend!(
    cancelling_a_reply_in_progress_ends_it_as_cancelled_with_the_text_so_far_kept_in_the_history,
    cancelling_a_waiting_message_gives_it_an_empty_cancelled_reply_and_the_session_goes_on,
    cancelling_an_answered_message_is_409_already_answered,
);

/// Replies of 40 tokens 60 ms apart: long enough to be cancelled mid-way.
fn slow_replies() -> Options {
    Options { first_token_ms: 50, token_ms: 60, reply_tokens: 40, ..Options::default() }
}

const WITHIN: Duration = Duration::from_secs(20);

/// The fleet, and the base URL cancels go to: another gateway where the backend has several.
async fn fleet(backend: Backend, options: Options) -> (TestApp, String) {
    let mut app = TestApp::spawn_with(backend, options).await;
    let canceller = match backend {
        Backend::Dev => app.base.clone(),
        _ => app.add_gateway().await,
    };
    (app, canceller)
}

async fn cancel(app: &TestApp, base: &str, session: &Session, message_id: &str) -> reqwest::Response {
    app.http
        .post(format!("{base}/v1/sessions/{}/messages/{message_id}/cancel", session.id))
        .bearer_auth(&session.token)
        .send()
        .await
        .unwrap()
}

fn done_of<'a>(events: &'a [SseEvent], message_id: &str) -> &'a SseEvent {
    events
        .iter()
        .find(|e| e.event == "done" && e.data["message_id"] == message_id)
        .unwrap_or_else(|| panic!("no done for {message_id}: {events:?}"))
}

fn deltas_of(events: &[SseEvent], message_id: &str) -> String {
    events
        .iter()
        .filter(|e| e.event == "delta" && e.data["message_id"] == message_id)
        .map(|e| e.data["text"].as_str().unwrap())
        .collect()
}

fn reply_in_history<'a>(history: &'a [Value], message_id: &str) -> &'a Value {
    history
        .iter()
        .find(|m| m["role"] == "assistant" && m["reply_to"] == message_id)
        .unwrap_or_else(|| panic!("no reply to {message_id} in {history:#?}"))
}

async fn cancelling_a_reply_in_progress_ends_it_as_cancelled_with_the_text_so_far_kept_in_the_history(
    backend: Backend,
) {
    let (app, canceller) = fleet(backend, slow_replies()).await;
    let session = app.create_session().await;
    let stream = app
        .http
        .post(app.url(&format!("/v1/sessions/{}/messages", session.id)))
        .bearer_auth(&session.token)
        .header("Accept", "text/event-stream")
        .json(&json!({"text": "tell me a long story"}))
        .send()
        .await
        .unwrap();
    let events = app.open_events(&session).await;
    let first = read_until_delta(events, 3).await;
    let message_id = first[0].data["message_id"].as_str().unwrap().to_owned();

    let cancelled = cancel(&app, &canceller, &session, &message_id).await;
    let again = cancel(&app, &canceller, &session, &message_id).await;

    assert_eq!(cancelled.status(), 202);
    let body: Value = cancelled.json().await.unwrap();
    assert_eq!(body["message_id"], message_id.as_str());
    assert_eq!(again.status(), 202, "a repeated cancel is accepted again");
    let streamed = read_until_terminal_of(stream, &message_id, WITHIN).await;
    let done = done_of(&streamed, &message_id);
    assert_eq!(done.data["finish_reason"], "cancelled");
    let text = done.data["text"].as_str().unwrap();
    assert_eq!(text, deltas_of(&streamed, &message_id), "the text is what was streamed");
    let echo = echo_of("tell me a long story");
    assert!(
        !text.is_empty() && (echo.starts_with(text) || text.starts_with(&echo)),
        "the partial reply is the start of the reply: {text:?}"
    );
    let deltas = streamed.iter().filter(|e| e.event == "delta").count();
    assert!(deltas < 40, "the reply stopped early ({deltas} of 40 tokens)");
    let history = app.history(&session).await;
    assert_eq!(reply_in_history(&history, &message_id)["text"], text, "the history keeps the partial reply");
    let after_it_ended = cancel(&app, &canceller, &session, &message_id).await;
    assert_eq!(after_it_ended.status(), 202, "cancelling a cancelled message is still accepted");
}

/// Reads an event stream until `n` deltas arrived.
async fn read_until_delta(response: reqwest::Response, n: usize) -> Vec<SseEvent> {
    use eventsource_stream::Eventsource;
    use futures::StreamExt;
    let mut stream = response.bytes_stream().eventsource();
    let mut events = Vec::new();
    let read = async {
        while events.iter().filter(|e: &&SseEvent| e.event == "delta").count() < n {
            let e = stream.next().await.expect("the stream went on").expect("a well-formed event stream");
            events.push(SseEvent { event: e.event, id: e.id, data: serde_json::from_str(&e.data).unwrap() });
        }
    };
    tokio::time::timeout(WITHIN, read).await.expect("the deltas arrived in time");
    events
}

async fn cancelling_a_waiting_message_gives_it_an_empty_cancelled_reply_and_the_session_goes_on(backend: Backend) {
    let (app, canceller) = fleet(backend, slow_replies()).await;
    let session = app.create_session().await;
    let events = app.open_events(&session).await;
    let mut ids = Vec::new();
    for text in ["answered first", "dropped while waiting"] {
        let r = app.post_message(&session, json!({"text": text})).await;
        assert_eq!(r.status(), 202);
        ids.push(r.json::<Value>().await.unwrap()["message_id"].as_str().unwrap().to_owned());
    }

    let cancelled = cancel(&app, &canceller, &session, &ids[1]).await;

    assert_eq!(cancelled.status(), 202);
    let seen = read_until_terminal_of(events, &ids[1], WITHIN).await;
    let first = done_of(&seen, &ids[0]);
    assert_eq!(first.data["finish_reason"], "stop", "the message ahead is answered in full");
    let waiting = done_of(&seen, &ids[1]);
    assert_eq!(waiting.data["finish_reason"], "cancelled");
    assert_eq!(waiting.data["text"], "", "nothing was generated for the waiting message");
    assert_eq!(deltas_of(&seen, &ids[1]), "");
    let next = app.send_streaming(&session, json!({"text": "and then this"})).await;
    assert_eq!(next.last().unwrap().data["finish_reason"], "stop", "the session goes on");
    let history = app.wait_for_replies(&session, 3, WITHIN).await;
    assert_eq!(reply_in_history(&history, &ids[1])["text"], "");
}

async fn cancelling_an_answered_message_is_409_already_answered(backend: Backend) {
    let (app, canceller) = fleet(backend, Options::default()).await;
    let session = app.create_session().await;
    let reply = app.send_streaming(&session, json!({"text": "quick"})).await;
    let message_id = reply.last().unwrap().data["message_id"].as_str().unwrap().to_owned();

    let refused = cancel(&app, &canceller, &session, &message_id).await;

    assert_eq!(refused.status(), 409);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "already_answered");
}
