//! `OpenAiModel` against `chatfleet mock-llm` over real HTTP: streaming, the non-streaming
//! endpoint, fault directives, timeouts and many concurrent streams.

mod common;

use std::time::Duration;

use async_openai::types::chat::{CreateChatCompletionResponse, CreateChatCompletionStreamResponse};
use chatfleet_llm::mock_reply::{MockSettings, reply_tokens};
use chatfleet_llm::openai::install_crypto_provider;
use chatfleet_llm::{ChatChunk, ChatModel, LlmError};
use common::{MODEL, MockServer, drain, quick_settings, user_request};
use schemas::{FinishReason, Usage};
use serde_json::{Value, json};

fn raw_client() -> reqwest::Client {
    install_crypto_provider();
    reqwest::Client::new()
}

#[tokio::test]
async fn a_streamed_reply_begins_with_the_echo_and_finishes_with_stop_and_usage() {
    let server = MockServer::start(quick_settings()).await;
    let model = server.patient_model();
    let text = "Hello   there,\nfleet! How are you?";

    let stream = model.stream(user_request(text)).await.unwrap();
    let drained = drain(stream).await;

    let expected = reply_tokens(text, &quick_settings());
    assert!(drained.text().starts_with("You said: \"Hello there, fleet! How are you?\". "));
    assert_eq!(drained.deltas, expected);
    let Some(Ok(ChatChunk::Finished { finish_reason, usage })) = drained.end else {
        panic!("the reply did not finish: {:?}", drained.end);
    };
    assert_eq!(finish_reason, FinishReason::Stop);
    let usage = usage.expect("usage was asked for");
    assert_eq!(usage.completion_tokens, u32::try_from(expected.len()).unwrap());
    assert!(usage.prompt_tokens > 0);
}

#[tokio::test]
async fn the_request_token_limit_cuts_the_reply_with_finish_length() {
    let server = MockServer::start(quick_settings()).await;
    let model = server.patient_model();
    let mut request = user_request("count to many");
    request.max_tokens = Some(4);

    let drained = drain(model.stream(request).await.unwrap()).await;

    assert_eq!(drained.deltas.len(), 4);
    assert!(matches!(
        drained.end,
        Some(Ok(ChatChunk::Finished {
            finish_reason: FinishReason::Length,
            usage: Some(Usage { completion_tokens: 4, .. })
        }))
    ));
}

#[tokio::test]
async fn the_non_streaming_endpoint_returns_a_whole_chat_completion() {
    let server = MockServer::start(quick_settings()).await;
    let text = "no stream please";

    let response = raw_client()
        .post(format!("{}/chat/completions", server.base_url))
        .json(&json!({ "model": "any-name", "messages": [{ "role": "user", "content": text }] }))
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    let completion: CreateChatCompletionResponse = response.json().await.unwrap();
    assert_eq!(completion.object, "chat.completion");
    assert_eq!(completion.model, "any-name");
    let expected = reply_tokens(text, &quick_settings());
    assert_eq!(completion.choices[0].message.content.as_deref(), Some(expected.concat().as_str()));
    assert_eq!(completion.choices[0].finish_reason, Some(async_openai::types::chat::FinishReason::Stop));
    let usage = completion.usage.unwrap();
    assert_eq!(usage.completion_tokens, u32::try_from(expected.len()).unwrap());
    assert_eq!(usage.total_tokens, usage.prompt_tokens + usage.completion_tokens);
}

#[tokio::test]
async fn a_raw_stream_is_shaped_like_openai_chunks_and_ends_with_done() {
    let server = MockServer::start(quick_settings()).await;

    let body = raw_client()
        .post(format!("{}/chat/completions", server.base_url))
        .json(&json!({
            "model": MODEL,
            "stream": true,
            "stream_options": { "include_usage": true },
            "messages": [{ "role": "user", "content": "shape check" }],
        }))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    let events: Vec<&str> = body
        .split("\n\n")
        .filter(|event| !event.is_empty())
        .map(|event| event.strip_prefix("data: ").expect("every event is a data line"))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> =
        events[..events.len() - 1].iter().map(|event| serde_json::from_str(event).unwrap()).collect();
    for chunk in &chunks {
        serde_json::from_value::<CreateChatCompletionStreamResponse>(chunk.clone()).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk");
    }
    let first = &chunks[0];
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(first["choices"][0]["finish_reason"], Value::Null);
    assert_eq!(first["usage"], Value::Null);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], quick_settings().reply_tokens);
    let content: String = chunks.iter().filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(content, reply_tokens("shape check", &quick_settings()).concat());
}

#[tokio::test]
async fn the_models_endpoint_lists_the_configured_model() {
    let server = MockServer::start(quick_settings()).await;

    let listing: Value =
        raw_client().get(format!("{}/models", server.base_url)).send().await.unwrap().json().await.unwrap();

    assert_eq!(listing["object"], "list");
    assert_eq!(listing["data"][0]["id"], MODEL);
}

#[tokio::test]
async fn a_malformed_request_gets_an_openai_shaped_error() {
    let server = MockServer::start(quick_settings()).await;

    let response = raw_client()
        .post(format!("{}/chat/completions", server.base_url))
        .header("content-type", "application/json")
        .body("{\"model\": \"m\"}")
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(body["error"].as_object().unwrap().contains_key("param"));
    assert!(body["error"].as_object().unwrap().contains_key("code"));
}

#[tokio::test]
async fn a_503_fault_fails_the_first_call_as_transient_and_the_second_succeeds() {
    let server = MockServer::start(quick_settings()).await;
    let model = server.patient_model();
    let text = "try twice [mock:status=503,times=1]";

    let first = model.stream(user_request(text)).await.err();
    let second = drain(model.stream(user_request(text)).await.unwrap()).await;

    assert!(matches!(first, Some(LlmError::Transient { .. })), "{first:?}");
    assert!(second.text().starts_with("You said: \"try twice [mock:status=503,times=1]\"."));
    assert!(matches!(second.end, Some(Ok(ChatChunk::Finished { finish_reason: FinishReason::Stop, .. }))));
}

#[tokio::test]
async fn a_429_fault_is_transient_and_carries_the_wait_the_server_asked_for() {
    let server = MockServer::start(quick_settings()).await;
    let model = server.patient_model();

    let error = model.stream(user_request("busy [mock:status=429,retry_after_ms=120]")).await.err();

    assert!(
        matches!(error, Some(LlmError::Transient { retry_after: Some(wait), .. }) if wait == Duration::from_millis(120)),
        "{error:?}"
    );
}

#[tokio::test]
async fn client_error_faults_are_permanent_with_a_code_naming_the_cause() {
    let server = MockServer::start(quick_settings()).await;
    let model = server.patient_model();

    let mut codes = Vec::new();
    for status in [400, 401, 403, 404, 422] {
        let text = format!("refuse [mock:status={status},times=1]");
        match model.stream(user_request(&text)).await {
            Err(LlmError::Permanent { code, .. }) => codes.push(code),
            other => panic!("status {status} gave {:?}", other.map(|_| "a stream")),
        }
    }

    assert_eq!(
        codes,
        ["model_bad_request", "model_unauthorized", "model_forbidden", "model_not_found", "model_bad_request"]
    );
}

#[tokio::test]
async fn a_cut_stream_gives_three_deltas_then_a_transient_error_and_the_retry_is_clean() {
    let server = MockServer::start(quick_settings()).await;
    let model = server.patient_model();
    let text = "cut me off [mock:cut=3,times=1]";

    let cut = drain(model.stream(user_request(text)).await.unwrap()).await;
    let retry = drain(model.stream(user_request(text)).await.unwrap()).await;

    let expected = reply_tokens(text, &quick_settings());
    assert_eq!(cut.deltas, expected[..3]);
    assert!(matches!(cut.end, Some(Err(LlmError::Transient { .. }))), "{:?}", cut.end);
    assert_eq!(retry.deltas, expected);
    assert!(matches!(retry.end, Some(Ok(ChatChunk::Finished { finish_reason: FinishReason::Stop, .. }))));
}

#[tokio::test]
async fn a_stall_beyond_the_first_token_timeout_is_transient() {
    let server = MockServer::start(quick_settings()).await;
    let model = server.model(Duration::from_millis(100), Duration::from_secs(10));
    let text = "slow start [mock:stall=400,times=1]";

    let started = tokio::time::Instant::now();
    let outcome = match model.stream(user_request(text)).await {
        Ok(stream) => drain(stream).await.end,
        Err(error) => Some(Err(error)),
    };
    let waited = started.elapsed();
    let retry = drain(model.stream(user_request(text)).await.unwrap()).await;

    assert!(matches!(outcome, Some(Err(LlmError::Transient { .. }))), "{outcome:?}");
    assert!(waited < Duration::from_millis(350), "gave up only after {waited:?}");
    assert!(matches!(retry.end, Some(Ok(ChatChunk::Finished { .. }))));
}

#[tokio::test]
async fn a_gap_between_tokens_longer_than_the_idle_timeout_is_transient() {
    let slow_tokens = MockSettings { token_delay: Duration::from_millis(300), ..quick_settings() };
    let server = MockServer::start(slow_tokens).await;
    let model = server.model(Duration::from_secs(10), Duration::from_millis(60));

    let drained = drain(model.stream(user_request("drip feed")).await.unwrap()).await;

    assert_eq!(drained.deltas.len(), 1);
    assert!(matches!(drained.end, Some(Err(LlmError::Transient { .. }))), "{:?}", drained.end);
}

#[tokio::test]
async fn an_endpoint_nobody_listens_on_is_transient() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let model = chatfleet_llm::openai::OpenAiModel::new(chatfleet_llm::openai::OpenAiSettings {
        base_url: format!("http://{addr}/v1"),
        api_key: None,
        model: MODEL.to_owned(),
        first_token_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(5),
        max_tokens: None,
    })
    .unwrap();

    let error = model.stream(user_request("anyone there?")).await.err();

    assert!(matches!(error, Some(LlmError::Transient { .. })), "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_streams_each_get_their_own_echo() {
    let server = MockServer::start(quick_settings()).await;
    let model = std::sync::Arc::new(server.patient_model());

    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let model = std::sync::Arc::clone(&model);
            tokio::spawn(async move {
                let text = format!("user number {i} says hi");
                let drained = drain(model.stream(user_request(&text)).await.unwrap()).await;
                (text, drained)
            })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }

    for (text, drained) in results {
        assert!(drained.text().starts_with(&format!("You said: \"{text}\". ")), "{}", drained.text());
        assert!(matches!(drained.end, Some(Ok(ChatChunk::Finished { finish_reason: FinishReason::Stop, .. }))));
    }
}

#[tokio::test]
async fn the_server_stops_cleanly_when_asked() {
    let server = MockServer::start(quick_settings()).await;
    let model = server.patient_model();
    drain(model.stream(user_request("before shutdown")).await.unwrap()).await;

    let stopped = tokio::time::timeout(Duration::from_secs(5), server.stop()).await;

    assert!(matches!(stopped, Ok(Ok(()))), "{stopped:?}");
}
