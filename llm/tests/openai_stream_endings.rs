//! How `OpenAiModel` ends a reply when an endpoint ends its stream in unusual ways, served by a
//! tiny fixed-body server instead of the mock model.

mod common;

use std::time::Duration;

use axum::Router;
use axum::http::header;
use axum::routing::post;
use chatfleet_llm::openai::{OpenAiModel, OpenAiSettings};
use chatfleet_llm::{ChatChunk, ChatModel, LlmError};
use common::{drain, user_request};
use schemas::FinishReason;

const ROLE: &str = r#"data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#;
const HELLO: &str = r#"data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"hello"},"finish_reason":null}]}"#;

/// Serves `body` as the SSE answer to every chat completion and returns a model pointed at it.
async fn model_served(body: String) -> OpenAiModel {
    let router = Router::new().route(
        "/v1/chat/completions",
        post(move || {
            let body = body.clone();
            async move { ([(header::CONTENT_TYPE, "text/event-stream")], body) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    OpenAiModel::new(OpenAiSettings {
        base_url: format!("http://{addr}/v1"),
        api_key: None,
        model: "m".to_owned(),
        first_token_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(5),
        max_tokens: None,
    })
    .unwrap()
}

#[tokio::test]
async fn a_stream_that_says_done_without_a_finish_reason_finishes_with_stop() {
    let model = model_served(format!("{ROLE}\n\n{HELLO}\n\ndata: [DONE]\n\n")).await;

    let drained = drain(model.stream(user_request("hi")).await.unwrap()).await;

    assert_eq!(drained.deltas, ["hello"]);
    assert_eq!(drained.end, Some(Ok(ChatChunk::Finished { finish_reason: FinishReason::Stop, usage: None })));
}

#[tokio::test]
async fn a_stream_that_closes_without_done_or_a_finish_reason_is_transient() {
    let model = model_served(format!("{ROLE}\n\n{HELLO}\n\n")).await;

    let drained = drain(model.stream(user_request("hi")).await.unwrap()).await;

    assert_eq!(drained.deltas, ["hello"]);
    assert!(matches!(drained.end, Some(Err(LlmError::Transient { .. }))), "{:?}", drained.end);
}

#[tokio::test]
async fn an_error_object_in_place_of_a_chunk_is_transient() {
    let error = r#"data: {"error":{"message":"overloaded","type":"server_error","param":null,"code":null}}"#;
    let model = model_served(format!("{ROLE}\n\n{HELLO}\n\n{error}\n\n")).await;

    let drained = drain(model.stream(user_request("hi")).await.unwrap()).await;

    assert_eq!(drained.deltas, ["hello"]);
    assert!(
        matches!(&drained.end, Some(Err(LlmError::Transient { message, .. })) if message.contains("overloaded")),
        "{:?}",
        drained.end
    );
}

#[tokio::test]
async fn a_finish_reason_without_usage_or_done_still_finishes_the_reply() {
    let finish = r#"data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"length"}]}"#;
    let model = model_served(format!("{ROLE}\n\n{HELLO}\n\n{finish}\n\n")).await;

    let drained = drain(model.stream(user_request("hi")).await.unwrap()).await;

    assert_eq!(drained.end, Some(Ok(ChatChunk::Finished { finish_reason: FinishReason::Length, usage: None })));
}
