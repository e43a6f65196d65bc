//! `chatfleet mock-llm --upstream`: the relay in front of a mock model, read by chatfleet's own
//! model client over real HTTP. What reaches the client must be what the upstream said: the same
//! chunks, the same end, the same class of error.

mod common;

use std::time::Duration;

use chatfleet_llm::mock_reply::reply_tokens;
use chatfleet_llm::mock_server::listen;
use chatfleet_llm::openai::{OpenAiModel, OpenAiSettings, install_crypto_provider};
use chatfleet_llm::{ChatChunk, ChatModel, LlmError, relay};
use common::{MODEL, MockServer, drain, quick_settings, user_request};
use schemas::FinishReason;
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// A relay on a free port in front of `upstream`, stopped when dropped.
struct Relay {
    base_url: String,
    _shutdown: oneshot::Sender<()>,
}

impl Relay {
    async fn start(upstream: &MockServer) -> Self {
        let model = patient_model_at(&upstream.base_url);
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(relay::serve(listener, model, MODEL.to_owned(), async move {
            let _ = rx.await;
        }));
        Self { base_url: format!("http://{addr}/v1"), _shutdown: tx }
    }

    /// chatfleet's model client, pointed at the relay.
    fn client(&self) -> OpenAiModel {
        patient_model_at(&self.base_url)
    }
}

/// chatfleet's model client for the endpoint at `base_url`, with timeouts a healthy test never meets.
fn patient_model_at(base_url: &str) -> OpenAiModel {
    OpenAiModel::new(OpenAiSettings {
        base_url: base_url.to_owned(),
        api_key: None,
        model: MODEL.to_owned(),
        first_token_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(10),
        max_tokens: None,
    })
    .unwrap()
}

#[tokio::test]
async fn a_relayed_reply_is_the_upstream_reply_chunk_for_chunk_with_its_finish_and_usage() {
    let upstream = MockServer::start(quick_settings()).await;
    let relay = Relay::start(&upstream).await;
    let text = "Relay this, please.";

    let drained = drain(relay.client().stream(user_request(text)).await.unwrap()).await;

    let expected = reply_tokens(text, &quick_settings());
    assert_eq!(drained.deltas, expected);
    let Some(Ok(ChatChunk::Finished { finish_reason, usage })) = drained.end else {
        panic!("the relayed reply did not finish: {:?}", drained.end);
    };
    assert_eq!(finish_reason, FinishReason::Stop);
    assert_eq!(usage.expect("usage was asked for").completion_tokens, u32::try_from(expected.len()).unwrap());
}

#[tokio::test]
async fn a_token_limit_reaches_the_upstream_and_its_length_finish_comes_back() {
    let upstream = MockServer::start(quick_settings()).await;
    let relay = Relay::start(&upstream).await;
    let mut request = user_request("Say a lot.");
    request.max_tokens = Some(3);

    let drained = drain(relay.client().stream(request).await.unwrap()).await;

    assert_eq!(drained.deltas.len(), 3);
    assert!(
        matches!(drained.end, Some(Ok(ChatChunk::Finished { finish_reason: FinishReason::Length, .. }))),
        "{:?}",
        drained.end
    );
}

#[tokio::test]
async fn upstream_errors_before_the_first_chunk_keep_their_class_and_wait() {
    let upstream = MockServer::start(quick_settings()).await;
    let relay = Relay::start(&upstream).await;
    let client = relay.client();

    let busy = client.stream(user_request("busy [mock:status=429,retry_after_ms=120]")).await.err();
    let refused = client.stream(user_request("refuse [mock:status=401]")).await.err();

    assert!(
        matches!(busy, Some(LlmError::Transient { retry_after: Some(wait), .. }) if wait == Duration::from_millis(120)),
        "{busy:?}"
    );
    assert!(
        matches!(&refused, Some(LlmError::Permanent { code, .. }) if code.as_str() == "model_unauthorized"),
        "{refused:?}"
    );
}

#[tokio::test]
async fn an_upstream_cut_mid_reply_cuts_the_relayed_stream_after_the_same_chunks() {
    let upstream = MockServer::start(quick_settings()).await;
    let relay = Relay::start(&upstream).await;
    let text = "cut me off [mock:cut=3]";

    let drained = drain(relay.client().stream(user_request(text)).await.unwrap()).await;

    assert_eq!(drained.deltas, reply_tokens(text, &quick_settings())[..3]);
    assert!(matches!(drained.end, Some(Err(LlmError::Transient { .. }))), "{:?}", drained.end);
}

#[tokio::test]
async fn a_request_the_relay_cannot_serve_gets_an_openai_shaped_400() {
    let upstream = MockServer::start(quick_settings()).await;
    let relay = Relay::start(&upstream).await;
    install_crypto_provider();
    let http = reqwest::Client::new();
    let url = format!("{}/chat/completions", relay.base_url);

    let whole = http
        .post(&url)
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let malformed = http.post(&url).header("content-type", "application/json").body("{").send().await.unwrap();

    for response in [whole, malformed] {
        assert_eq!(response.status(), 400);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    }
}

#[tokio::test]
async fn the_models_endpoint_lists_the_relayed_model() {
    let upstream = MockServer::start(quick_settings()).await;
    let relay = Relay::start(&upstream).await;
    install_crypto_provider();

    let body: Value = reqwest::get(format!("{}/models", relay.base_url))
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();

    assert_eq!(body["data"][0]["id"], MODEL);
}
