//! Every flow and error case of `http-api.md`, run against both `chatfleet dev` (in-process
//! bus, embedded store) and a fleet on NATS JetStream and a MongoDB-wire server.

#[macro_use]
mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Backend, Options, TestApp, assembled_text, echo_of, read_until_terminals};

on_every_backend!(
    creating_a_session_returns_an_id_and_a_token,
    session_creation_validates_user_and_metadata,
    api_keys_guard_session_creation_when_configured,
    a_streamed_reply_concatenates_to_the_done_text,
    an_accepted_message_gets_202_and_its_reply_lands_in_history,
    history_lists_messages_in_conversation_order,
    rapid_messages_in_one_session_are_answered_in_order,
    the_events_endpoint_streams_every_reply_of_the_session,
    a_repeated_client_message_id_gets_the_same_id_and_one_reply,
    a_repeated_client_message_id_on_a_stream_replays_the_reply,
    calls_without_a_token_get_401_and_with_a_foreign_token_403,
    the_token_may_come_as_an_access_token_parameter,
    deleting_a_session_removes_it_and_its_history,
    bad_message_bodies_get_clear_errors,
    transient_model_errors_are_retried_until_a_reply,
    a_stream_cut_midway_is_reset_and_retried,
    a_model_that_keeps_failing_ends_in_an_error_event_once,
    idle_streams_get_keep_alive_comments,
    operational_endpoints_answer,
    hundreds_of_sessions_streaming_at_once_each_get_their_own_reply,
);

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_else(|| panic!("not an error body: {body}"))
}

async fn creating_a_session_returns_an_id_and_a_token(backend: Backend) {
    let app = TestApp::spawn(backend).await;

    let r = app.http.post(app.url("/v1/sessions")).send().await.unwrap();

    assert_eq!(r.status(), 201);
    let body: Value = r.json().await.unwrap();
    let id = body["session_id"].as_str().unwrap();
    assert!(!id.is_empty() && id.len() <= 64);
    assert!(id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'));
    assert!(body["token"].as_str().unwrap().len() > 20);
}

async fn session_creation_validates_user_and_metadata(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let post = |body: String| {
        app.http.post(app.url("/v1/sessions")).header("content-type", "application/json").body(body).send()
    };

    let ok = post(json!({"user": "u-1", "metadata": {"plan": "pro"}}).to_string()).await.unwrap();
    let long_user = post(json!({"user": "x".repeat(129)}).to_string()).await.unwrap();
    let big_metadata = post(json!({"metadata": {"k": "v".repeat(4097)}}).to_string()).await.unwrap();
    let non_string_metadata = post(json!({"metadata": {"k": 1}}).to_string()).await.unwrap();
    let malformed = post("{not json".into()).await.unwrap();

    assert_eq!(ok.status(), 201);
    assert_eq!(long_user.status(), 422);
    assert_eq!(error_code(&long_user.json().await.unwrap()), "invalid_request");
    assert_eq!(big_metadata.status(), 422);
    assert_eq!(non_string_metadata.status(), 422);
    assert_eq!(malformed.status(), 400);
    assert_eq!(error_code(&malformed.json().await.unwrap()), "invalid_json");
}

async fn api_keys_guard_session_creation_when_configured(backend: Backend) {
    let app = TestApp::spawn_with(
        backend,
        Options { api_keys: vec!["key-one".into(), "key-two".into()], ..Options::default() },
    )
    .await;

    let none = app.http.post(app.url("/v1/sessions")).send().await.unwrap();
    let wrong = app.http.post(app.url("/v1/sessions")).bearer_auth("key-three").send().await.unwrap();
    let right = app.http.post(app.url("/v1/sessions")).bearer_auth("key-two").send().await.unwrap();

    assert_eq!(none.status(), 401);
    assert_eq!(error_code(&none.json().await.unwrap()), "unauthorized");
    assert_eq!(wrong.status(), 401);
    assert_eq!(right.status(), 201);
}

async fn a_streamed_reply_concatenates_to_the_done_text(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let session = app.create_session().await;

    let events = app.send_streaming(&session, json!({"text": "what is a fleet?"})).await;

    let done = events.last().expect("some events");
    assert_eq!(done.event, "done");
    assert!(events[..events.len() - 1].iter().all(|e| e.event == "delta"), "{events:#?}");
    assert!(events.len() > 2, "the reply streamed in several deltas");
    let text = done.data["text"].as_str().unwrap();
    assert_eq!(assembled_text(&events), text);
    assert!(text.starts_with(&echo_of("what is a fleet?")), "{text}");
    assert_eq!(done.data["session_id"], session.id.as_str());
    assert_eq!(done.data["finish_reason"], "stop");
    assert!(done.data["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    let message_id = done.data["message_id"].as_str().unwrap();
    assert!(events.iter().all(|e| e.data["message_id"] == message_id));
    assert!(done.data["reply_id"].as_str().is_some_and(|r| !r.is_empty()));
    let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "event ids increase: {ids:?}");
}

async fn an_accepted_message_gets_202_and_its_reply_lands_in_history(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let session = app.create_session().await;

    let r = app.post_message(&session, json!({"text": "hello"})).await;

    assert_eq!(r.status(), 202);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["session_id"], session.id.as_str());
    let message_id = body["message_id"].as_str().unwrap().to_owned();
    let history = app.wait_for_replies(&session, 1, Duration::from_secs(30)).await;
    assert_eq!(history.len(), 2);
    assert_eq!(history[0]["message_id"], message_id.as_str());
    assert_eq!(history[1]["reply_to"], message_id.as_str());
    assert!(history[1]["text"].as_str().unwrap().starts_with(&echo_of("hello")));
}

async fn history_lists_messages_in_conversation_order(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let session = app.create_session().await;

    for text in ["first", "second"] {
        app.send_streaming(&session, json!({"text": text})).await;
    }
    let history = app.history(&session).await;

    let roles: Vec<&str> = history.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
    assert_eq!(history[0]["text"], "first");
    assert_eq!(history[2]["text"], "second");
    assert_eq!(history[1]["reply_to"], history[0]["message_id"]);
    assert_eq!(history[3]["reply_to"], history[2]["message_id"]);
    assert!(history[0].get("reply_to").is_none());
    for m in &history {
        let created = m["created_at"].as_str().unwrap();
        time::OffsetDateTime::parse(created, &time::format_description::well_known::Rfc3339).expect("RFC 3339");
    }
}

async fn rapid_messages_in_one_session_are_answered_in_order(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let session = app.create_session().await;
    let texts: Vec<String> = (0..8).map(|i| format!("message number {i}")).collect();

    for text in &texts {
        assert_eq!(app.post_message(&session, json!({"text": text})).await.status(), 202);
    }
    let history = app.wait_for_replies(&session, texts.len(), Duration::from_secs(60)).await;

    assert_eq!(history.len(), texts.len() * 2);
    for (i, text) in texts.iter().enumerate() {
        let (user, reply) = (&history[2 * i], &history[2 * i + 1]);
        assert_eq!(user["role"], "user");
        assert_eq!(user["text"], text.as_str());
        assert_eq!(reply["reply_to"], user["message_id"]);
        assert!(reply["text"].as_str().unwrap().starts_with(&echo_of(text)), "reply {i} answers its own message");
    }
}

async fn the_events_endpoint_streams_every_reply_of_the_session(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let session = app.create_session().await;
    let listener = app.open_events(&session).await;

    let a = app.post_message(&session, json!({"text": "one"})).await.json::<Value>().await.unwrap();
    let b = app.post_message(&session, json!({"text": "two"})).await.json::<Value>().await.unwrap();
    let events = read_until_terminals(listener, 2, Duration::from_secs(30)).await;

    let dones: Vec<&support::SseEvent> = events.iter().filter(|e| e.event == "done").collect();
    assert_eq!(dones.len(), 2);
    assert_eq!(dones[0].data["message_id"], a["message_id"]);
    assert_eq!(dones[1].data["message_id"], b["message_id"]);
    let first: Vec<_> = events.iter().filter(|e| e.data["message_id"] == a["message_id"]).cloned().collect();
    assert_eq!(assembled_text(&first), dones[0].data["text"].as_str().unwrap());
}

async fn a_repeated_client_message_id_gets_the_same_id_and_one_reply(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let session = app.create_session().await;
    let body = json!({"text": "only once please", "client_message_id": "req-42"});

    let first: Value = app.post_message(&session, body.clone()).await.json().await.unwrap();
    let second: Value = app.post_message(&session, body.clone()).await.json().await.unwrap();
    app.wait_for_replies(&session, 1, Duration::from_secs(30)).await;
    let third: Value = app.post_message(&session, body).await.json().await.unwrap();
    // A later message proves the worker has gone past anything the repeats could have caused.
    app.send_streaming(&session, json!({"text": "after"})).await;
    let history = app.history(&session).await;

    assert_eq!(first["message_id"], second["message_id"]);
    assert_eq!(first["message_id"], third["message_id"]);
    let answers = history.iter().filter(|m| m["reply_to"] == first["message_id"]).count();
    assert_eq!(answers, 1, "{history:#?}");
    assert_eq!(history.len(), 4);
}

async fn a_repeated_client_message_id_on_a_stream_replays_the_reply(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let session = app.create_session().await;
    let body = json!({"text": "stream me once", "client_message_id": "k1"});

    let first = app.send_streaming(&session, body.clone()).await;
    let again = app.send_streaming(&session, body).await;

    assert_eq!(again.len(), 1);
    assert_eq!(again[0].event, "done");
    assert_eq!(again[0].data["text"], first.last().unwrap().data["text"]);
    assert_eq!(app.history(&session).await.len(), 2);
}

async fn calls_without_a_token_get_401_and_with_a_foreign_token_403(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mine = app.create_session().await;
    let theirs = app.create_session().await;
    let history_url = app.url(&format!("/v1/sessions/{}/messages", mine.id));

    let none = app.http.get(&history_url).send().await.unwrap();
    let garbage = app.http.get(&history_url).bearer_auth("v1.nope.nope").send().await.unwrap();
    let foreign = app.http.get(&history_url).bearer_auth(&theirs.token).send().await.unwrap();
    let foreign_post =
        app.http.post(&history_url).bearer_auth(&theirs.token).json(&json!({"text": "sneaky"})).send().await.unwrap();
    let foreign_events = app
        .http
        .get(app.url(&format!("/v1/sessions/{}/events", mine.id)))
        .bearer_auth(&theirs.token)
        .send()
        .await
        .unwrap();
    let foreign_delete =
        app.http.delete(app.url(&format!("/v1/sessions/{}", mine.id))).bearer_auth(&theirs.token).send().await.unwrap();

    assert_eq!(none.status(), 401);
    assert_eq!(error_code(&none.json().await.unwrap()), "unauthorized");
    assert_eq!(garbage.status(), 401);
    assert_eq!(foreign.status(), 403);
    assert_eq!(error_code(&foreign.json().await.unwrap()), "forbidden");
    assert_eq!(foreign_post.status(), 403);
    assert_eq!(foreign_events.status(), 403);
    assert_eq!(foreign_delete.status(), 403);
    assert!(app.history(&mine).await.is_empty(), "nothing was posted to the session");
}

async fn the_token_may_come_as_an_access_token_parameter(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let session = app.create_session().await;

    let r = app
        .http
        .get(app.url(&format!("/v1/sessions/{}/messages?access_token={}", session.id, session.token)))
        .send()
        .await
        .unwrap();

    assert_eq!(r.status(), 200);
}

async fn deleting_a_session_removes_it_and_its_history(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let session = app.create_session().await;
    app.send_streaming(&session, json!({"text": "remember me"})).await;
    let url = app.url(&format!("/v1/sessions/{}", session.id));

    let deleted = app.http.delete(&url).bearer_auth(&session.token).send().await.unwrap();
    let history = app.http.get(format!("{url}/messages")).bearer_auth(&session.token).send().await.unwrap();
    let post = app.post_message(&session, json!({"text": "still there?"})).await;
    let again = app.http.delete(&url).bearer_auth(&session.token).send().await.unwrap();

    assert_eq!(deleted.status(), 204);
    assert_eq!(history.status(), 404);
    assert_eq!(error_code(&history.json().await.unwrap()), "session_not_found");
    assert_eq!(post.status(), 404);
    assert_eq!(again.status(), 404);
}

async fn bad_message_bodies_get_clear_errors(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let session = app.create_session().await;
    let url = app.url(&format!("/v1/sessions/{}/messages", session.id));
    // A connection per request: the gateway refuses an oversized body without reading it and
    // then closes the connection (as HTTP servers do), and a pooled client could send the next
    // request on that connection before it learns of the close.
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let raw = |body: String| {
        http.post(&url).bearer_auth(&session.token).header("content-type", "application/json").body(body).send()
    };

    let cases = [
        ("{not json".to_owned(), 400, "invalid_json"),
        ("".to_owned(), 400, "invalid_json"),
        ("[1,2]".to_owned(), 400, "invalid_json"),
        (json!({}).to_string(), 422, "invalid_request"),
        (json!({"text": ""}).to_string(), 422, "invalid_request"),
        (json!({"text": 5}).to_string(), 422, "invalid_request"),
        (json!({"text": "hi", "client_message_id": "x".repeat(65)}).to_string(), 422, "invalid_request"),
        (json!({"text": "é".repeat(8193)}).to_string(), 413, "payload_too_large"),
        (json!({"text": "a".repeat(300_000)}).to_string(), 413, "payload_too_large"),
    ];
    for (body, status, code) in cases {
        let shown: String = body.chars().take(40).collect();
        let r = raw(body).await.unwrap();
        assert_eq!(r.status(), status, "body {shown}");
        let parsed: Value = r.json().await.unwrap();
        assert_eq!(error_code(&parsed), code, "body {shown}");
        assert!(!parsed["error"]["message"].as_str().unwrap().is_empty());
    }
    let exactly_max = raw(json!({"text": "a".repeat(16384)}).to_string()).await.unwrap();
    assert_eq!(exactly_max.status(), 202);
    let unknown = app
        .post_message(
            &support::Session { id: "no-such-session".into(), token: session.token.clone() },
            json!({"text": "x"}),
        )
        .await;
    assert_eq!(unknown.status(), 403, "a token names its own session only");
}

async fn transient_model_errors_are_retried_until_a_reply(backend: Backend) {
    let app = TestApp::spawn_with(backend, Options { llm_max_attempts: 4, ..Options::default() }).await;
    let session = app.create_session().await;
    let text = "flaky [mock:status=503,times=2]";

    let events = app.send_streaming(&session, json!({"text": text})).await;

    let done = events.last().unwrap();
    assert_eq!(done.event, "done", "{events:#?}");
    assert!(done.data["text"].as_str().unwrap().starts_with(&echo_of(text)));
    assert_eq!(app.history(&session).await.len(), 2);
}

async fn a_stream_cut_midway_is_reset_and_retried(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let session = app.create_session().await;
    let text = "cut me [mock:cut=3,times=1]";

    let events = app.send_streaming(&session, json!({"text": text})).await;

    let reset = events.iter().position(|e| e.event == "reset").expect("a reset event");
    assert!(events[..reset].iter().filter(|e| e.event == "delta").count() >= 1, "deltas before the cut");
    let done = events.last().unwrap();
    assert_eq!(done.event, "done");
    assert_eq!(assembled_text(&events), done.data["text"].as_str().unwrap());
    assert_eq!(events.iter().filter(|e| e.event == "done").count(), 1);
}

async fn a_model_that_keeps_failing_ends_in_an_error_event_once(backend: Backend) {
    let app = TestApp::spawn_with(backend, Options { llm_max_attempts: 2, ..Options::default() }).await;
    let session = app.create_session().await;

    let events = app.send_streaming(&session, json!({"text": "doomed [mock:status=500,times=1000]"})).await;
    let next = app.send_streaming(&session, json!({"text": "but this works"})).await;

    let last = events.last().unwrap();
    assert_eq!(last.event, "error", "{events:#?}");
    assert_eq!(last.data["code"], "model_unavailable");
    assert!(!last.data["message"].as_str().unwrap().is_empty());
    assert_eq!(next.last().unwrap().event, "done");
    let history = app.history(&session).await;
    assert_eq!(history.len(), 3, "the failed message, the next one and its reply: {history:#?}");
    assert_eq!(history[0]["error"]["code"], "model_unavailable");
}

async fn idle_streams_get_keep_alive_comments(backend: Backend) {
    let app = TestApp::spawn_with(backend, Options { keep_alive_secs: 1, ..Options::default() }).await;
    let session = app.create_session().await;
    let mut r = app.open_events(&session).await;

    let mut seen = String::new();
    let read = async {
        while !seen.contains(": keep-alive") {
            let chunk = r.chunk().await.unwrap().expect("the stream stays open");
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read).await.expect("a keep-alive within 5 s");
}

async fn operational_endpoints_answer(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let session = app.create_session().await;
    app.send_streaming(&session, json!({"text": "count me"})).await;

    let health = app.http.get(app.url("/healthz")).send().await.unwrap();
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
    let metrics = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let page = app.http.get(app.url("/")).send().await.unwrap();
    let missing = app.http.get(app.url("/nope")).send().await.unwrap();
    let wrong_method = app.http.put(app.url("/v1/sessions")).send().await.unwrap();

    assert_eq!(health.status(), 200);
    assert_eq!(ready.status(), 200);
    assert!(metrics.contains("chatfleet_gateway_messages_accepted_total"), "{metrics}");
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("/v1/sessions"));
    assert_eq!(missing.status(), 404);
    assert_eq!(error_code(&missing.json().await.unwrap()), "not_found");
    assert_eq!(wrong_method.status(), 405);
    assert_eq!(wrong_method.headers()["allow"], "POST");
    assert_eq!(error_code(&wrong_method.json().await.unwrap()), "method_not_allowed");
}

async fn hundreds_of_sessions_streaming_at_once_each_get_their_own_reply(backend: Backend) {
    // Replies of about a second: sessions answered side by side overlap by far, sessions
    // answered one after another would not overlap at all.
    let options = Options { first_token_ms: 50, token_ms: 20, reply_tokens: 40, ..Options::default() };
    let app = TestApp::spawn_with(backend, options).await;
    let sessions = futures::future::join_all((0..300).map(|_| app.create_session())).await;

    let replies = futures::future::join_all(sessions.iter().enumerate().map(|(i, session)| {
        let app = &app;
        async move {
            let text = format!("user {i} asks {}", session.id);
            let timed = app.send_streaming_timed(session, json!({"text": text})).await;
            (text, timed)
        }
    }))
    .await;

    let mut streaming = Vec::new();
    for ((text, timed), session) in replies.iter().zip(&sessions) {
        let events: Vec<support::SseEvent> = timed.iter().map(|(_, e)| e.clone()).collect();
        let done = events.last().unwrap();
        assert_eq!(done.event, "done");
        let reply = done.data["text"].as_str().unwrap();
        assert!(reply.starts_with(&echo_of(text)), "session {} got someone else's reply: {reply}", session.id);
        assert_eq!(assembled_text(&events), reply);
        assert!(events.iter().all(|e| e.data["session_id"] == session.id.as_str()));
        // From the first event to `done`, the reply was being generated.
        streaming.push((timed.first().unwrap().0, timed.last().unwrap().0));
    }
    let most = support::most_at_once(&streaming);
    assert!(most >= 100, "at most {most} of the 300 replies were streaming at one instant");
}
