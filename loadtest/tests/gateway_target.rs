//! Runs the gateway target against a small stand-in gateway served in-process: it speaks the
//! client API of docs/http-api.md (sessions, reply events with a reset, history) and can be
//! told to misbehave, so that each check is seen to catch what it is for.
//!
//! The real fleet end to end is exercised from the chatfleet package, which can start it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chatfleet_loadtest::plan::{Scenario, Target, TargetKind};
use chatfleet_loadtest::{RunConfig, run};
use futures::StreamExt;
use llm::mock_reply::{MockSettings, reply_tokens};
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// How the stand-in gateway behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    /// As the API says; each session's first reply is restarted once with a reset.
    Honest,
    /// Answers each message with the echo of the previous message from another session.
    CrossTalk,
    /// Keeps the user messages in the history but not the replies.
    ForgetsReplies,
    /// Sends a `done.text` that the deltas do not add up to.
    WrongDone,
}

#[derive(Default)]
struct FakeSession {
    token: String,
    history: Vec<Value>,
}

struct Fake {
    behaviour: Behaviour,
    api_key: Option<String>,
    sessions: Mutex<HashMap<String, FakeSession>>,
    last_text: Mutex<Option<(String, String)>>,
}

type Shared = Arc<Fake>;

fn api_error(status: StatusCode, code: &str) -> Response {
    (status, Json(json!({ "error": { "code": code, "message": code } }))).into_response()
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")
}

async fn create_session(State(fake): State<Shared>, headers: HeaderMap) -> Response {
    if let Some(key) = &fake.api_key
        && bearer(&headers) != Some(key.as_str())
    {
        return api_error(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    let mut sessions = fake.sessions.lock().unwrap();
    let id = format!("s_{}", sessions.len());
    let token = format!("token-{id}");
    sessions.insert(id.clone(), FakeSession { token: token.clone(), history: Vec::new() });
    (StatusCode::CREATED, Json(json!({ "session_id": id, "token": token }))).into_response()
}

fn event(kind: &str, data: &Value) -> String {
    format!("event: {kind}\nid: x\ndata: {data}\n\n")
}

async fn send_message(
    State(fake): State<Shared>,
    Path(session_id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let text = body["text"].as_str().unwrap_or_default().to_owned();
    let message_id = format!("m_{}", body["client_message_id"].as_str().unwrap_or("none"));
    let accepts_events = headers.get(header::ACCEPT).is_some_and(|accept| accept == "text/event-stream");
    let first_turn = {
        let sessions = fake.sessions.lock().unwrap();
        let Some(session) = sessions.get(&session_id) else {
            return api_error(StatusCode::NOT_FOUND, "session_not_found");
        };
        if bearer(&headers) != Some(session.token.as_str()) {
            return api_error(StatusCode::FORBIDDEN, "forbidden");
        }
        session.history.is_empty()
    };
    if !accepts_events {
        return api_error(StatusCode::NOT_ACCEPTABLE, "this stand-in only streams");
    }

    let echoed = match fake.behaviour {
        Behaviour::CrossTalk => {
            let mut last = fake.last_text.lock().unwrap();
            let other = last.as_ref().filter(|(from, _)| *from != session_id).map(|(_, text)| text.clone());
            *last = Some((session_id.clone(), text.clone()));
            other.unwrap_or_else(|| text.clone())
        }
        _ => text.clone(),
    };
    let settings = MockSettings { reply_tokens: 12, ..MockSettings::default() };
    let tokens = reply_tokens(&echoed, &settings);
    let reply: String = tokens.concat();

    let mut frames = vec![": keep-alive\n\n".to_owned()];
    let ids = json!({ "session_id": session_id, "message_id": message_id });
    let delta = |index: usize, text: &str| {
        let mut data = ids.clone();
        data["index"] = json!(index);
        data["text"] = json!(text);
        event("delta", &data)
    };
    if first_turn && fake.behaviour == Behaviour::Honest {
        // A reply restarted part-way: what came before the reset must be thrown away.
        frames.push(delta(0, "void "));
        frames.push(delta(1, "words "));
        let mut reset = ids.clone();
        reset["reason"] = json!("retry");
        frames.push(event("reset", &reset));
    }
    if text.contains("[fail]") {
        let mut error = ids.clone();
        error["code"] = json!("model_unavailable");
        error["message"] = json!("the model kept failing");
        frames.push(event("error", &error));
    } else {
        frames.extend(tokens.iter().enumerate().map(|(index, token)| delta(index, token)));
        let mut done = ids.clone();
        done["reply_id"] = json!(format!("a_{message_id}"));
        done["text"] =
            json!(if fake.behaviour == Behaviour::WrongDone { format!("{reply} and more") } else { reply.clone() });
        done["finish_reason"] = json!("stop");
        frames.push(event("done", &done));

        let mut sessions = fake.sessions.lock().unwrap();
        let history = &mut sessions.get_mut(&session_id).unwrap().history;
        history.push(json!({ "message_id": message_id, "role": "user", "text": text, "created_at": "x" }));
        if fake.behaviour != Behaviour::ForgetsReplies {
            history.push(json!({
                "message_id": format!("a_{message_id}"), "role": "assistant", "text": reply,
                "created_at": "x", "reply_to": message_id,
            }));
        }
    }

    let body = futures::stream::iter(frames).then(|frame| async move {
        tokio::time::sleep(Duration::from_millis(1)).await;
        Ok::<_, Infallible>(Bytes::from(frame))
    });
    ([(header::CONTENT_TYPE, "text/event-stream")], Body::from_stream(body)).into_response()
}

async fn history(State(fake): State<Shared>, Path(session_id): Path<String>, headers: HeaderMap) -> Response {
    let sessions = fake.sessions.lock().unwrap();
    let Some(session) = sessions.get(&session_id) else {
        return api_error(StatusCode::NOT_FOUND, "session_not_found");
    };
    if bearer(&headers) != Some(session.token.as_str()) {
        return api_error(StatusCode::FORBIDDEN, "forbidden");
    }
    Json(json!({ "session_id": session_id, "messages": session.history })).into_response()
}

/// A stand-in gateway on a free port, shut down when dropped.
struct Gateway {
    url: String,
    _stop: oneshot::Sender<()>,
}

async fn gateway(behaviour: Behaviour, api_key: Option<&str>) -> Gateway {
    let fake = Arc::new(Fake {
        behaviour,
        api_key: api_key.map(str::to_owned),
        sessions: Mutex::default(),
        last_text: Mutex::default(),
    });
    let router = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/sessions", post(create_session))
        .route("/v1/sessions/{id}/messages", post(send_message).get(history))
        .with_state(fake);
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
    });
    Gateway { url, _stop: stop }
}

fn config(url: &str, scenario: Scenario) -> RunConfig {
    RunConfig {
        target: Target { kind: TargetKind::Gateway, url: url.to_owned(), api_key: None, model: "unused".into() },
        scenario,
        run_id: "g0".into(),
        words: "hello fleet".into(),
        echo_chars: 48,
        timeout: Duration::from_secs(20),
        progress: false,
    }
}

fn conversation(users: u64, turns: u32) -> Scenario {
    Scenario::Conversation { users, turns, think: Duration::from_millis(5) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_conversation_passes_every_check_and_honours_resets() {
    let gateway = gateway(Behaviour::Honest, None).await;

    let report = run(&config(&gateway.url, conversation(20, 3)), std::future::pending()).await.unwrap();

    let summary = report.summary_table();
    assert_eq!(report.counts.answered, 60, "{summary}");
    assert_eq!(report.counts.resets, 20, "one reset in each session's first reply");
    assert_eq!(report.stream_problems.count, 0, "{summary}");
    assert_eq!(report.isolation.total(), 0, "{summary}");
    assert_eq!(report.latency.session_create.count, 20);
    assert!(report.history.applies);
    assert_eq!((report.history.checked, report.history.problems.count), (20, 0), "{summary}");
    assert!(report.passed, "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_crossing_between_sessions_are_isolation_violations() {
    let gateway = gateway(Behaviour::CrossTalk, None).await;

    let report = run(&config(&gateway.url, Scenario::Burst { users: 10 }), std::future::pending()).await.unwrap();

    assert!(report.isolation.wrong_echo >= 1, "{}", report.summary_table());
    assert!(report.isolation.foreign_marker >= 1, "{}", report.summary_table());
    assert!(!report.passed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_missing_its_replies_is_a_history_problem() {
    let gateway = gateway(Behaviour::ForgetsReplies, None).await;

    let report = run(&config(&gateway.url, conversation(3, 2)), std::future::pending()).await.unwrap();

    assert_eq!(report.counts.answered, 6);
    assert_eq!(report.history.problems.count, 3, "{}", report.summary_table());
    assert!(report.history.problems.examples[0].contains("2 messages where 4 were expected"));
    assert!(!report.passed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deltas_that_do_not_add_up_to_done_are_stream_problems() {
    let gateway = gateway(Behaviour::WrongDone, None).await;

    let report = run(&config(&gateway.url, Scenario::Burst { users: 4 }), std::future::pending()).await.unwrap();

    assert_eq!(report.stream_problems.count, 4, "{}", report.summary_table());
    assert!(!report.passed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_events_are_counted_by_code_and_the_conversation_goes_on() {
    let gateway = gateway(Behaviour::Honest, None).await;
    let mut config = config(&gateway.url, conversation(2, 2));
    config.words = "[fail]".into();

    let report = run(&config, std::future::pending()).await.unwrap();

    assert_eq!(report.errors.get("error event model_unavailable"), Some(&4), "{:?}", report.errors);
    assert_eq!(report.history.skipped, 2, "histories of sessions with errors are not judged");
    assert!(!report.passed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_created_with_the_api_key_and_refused_without_it() {
    let gateway = gateway(Behaviour::Honest, Some("k1")).await;
    let mut with_key = config(&gateway.url, Scenario::Burst { users: 2 });
    with_key.target.api_key = Some("k1".into());
    let without_key = config(&gateway.url, conversation(2, 3));

    let accepted = run(&with_key, std::future::pending()).await.unwrap();
    let refused = run(&without_key, std::future::pending()).await.unwrap();

    assert!(accepted.passed, "{}", accepted.summary_table());
    assert_eq!(refused.errors.get("create session: http 401 unauthorized"), Some(&2), "{:?}", refused.errors);
    assert_eq!(refused.counts.not_sent, 4, "the later turns of a user without a session are never sent");
    assert!(!refused.passed);
}

#[tokio::test]
async fn a_server_that_is_not_a_gateway_is_refused_before_any_load() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, Router::new()).await });

    let error = run(&config(&url, Scenario::Burst { users: 1 }), std::future::pending()).await.unwrap_err();

    assert_eq!(
        error.to_string(),
        format!("{url} does not look like a chatfleet gateway: GET /healthz answered 404 Not Found")
    );
}
