//! Helpers shared by the llm integration tests: a mock model server on a free port, quick
//! mock settings, and ways to drain a reply stream.

#![allow(dead_code)] // Each test binary uses a different subset of these helpers.

use std::time::Duration;

use chatfleet_llm::mock_reply::MockSettings;
use chatfleet_llm::mock_server::{MockServerConfig, listen, serve};
use chatfleet_llm::openai::{OpenAiModel, OpenAiSettings};
use chatfleet_llm::{ChatChunk, ChatMessage, ChatRequest, ChatRole, ChunkStream, LlmError};
use futures::StreamExt;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const MODEL: &str = "mock-model";

/// Settings that keep tests fast while still exercising the waits.
pub fn quick_settings() -> MockSettings {
    MockSettings {
        first_token_delay: Duration::from_millis(5),
        token_delay: Duration::from_millis(1),
        reply_tokens: 12,
        echo_chars: 48,
    }
}

/// A mock model server on 127.0.0.1 and a free port, shut down when dropped.
pub struct MockServer {
    pub base_url: String,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl MockServer {
    pub async fn start(settings: MockSettings) -> Self {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let config = MockServerConfig { settings, model: MODEL.to_owned() };
        let task = tokio::spawn(serve(listener, config, async move {
            let _ = rx.await;
        }));
        Self { base_url: format!("http://{addr}/v1"), shutdown: Some(tx), task: Some(task) }
    }

    /// Asks the server to stop and waits for it to finish.
    pub async fn stop(mut self) -> std::io::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.take().unwrap().await.unwrap()
    }

    pub fn model(&self, first_token_timeout: Duration, idle_timeout: Duration) -> OpenAiModel {
        OpenAiModel::new(OpenAiSettings {
            base_url: self.base_url.clone(),
            api_key: Some("test-key".to_owned()),
            model: MODEL.to_owned(),
            first_token_timeout,
            idle_timeout,
            max_tokens: None,
        })
        .unwrap()
    }

    /// A model with timeouts generous enough never to fire in a healthy test.
    pub fn patient_model(&self) -> OpenAiModel {
        self.model(Duration::from_secs(10), Duration::from_secs(10))
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub fn user_request(text: &str) -> ChatRequest {
    ChatRequest {
        messages: vec![
            ChatMessage { role: ChatRole::System, content: "Be brief.".to_owned() },
            ChatMessage { role: ChatRole::User, content: text.to_owned() },
        ],
        max_tokens: None,
    }
}

/// Everything a stream yielded: its deltas, then how it ended.
#[derive(Debug)]
pub struct Drained {
    pub deltas: Vec<String>,
    pub end: Option<Result<ChatChunk, LlmError>>,
}

impl Drained {
    pub fn text(&self) -> String {
        self.deltas.concat()
    }
}

/// Reads a stream to its end, stopping at the first item that is not a delta.
pub async fn drain(mut stream: ChunkStream) -> Drained {
    let mut deltas = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(ChatChunk::Delta(text)) => deltas.push(text),
            other => {
                let end = Some(other);
                assert!(stream.next().await.is_none(), "the stream went on after its end");
                return Drained { deltas, end };
            }
        }
    }
    Drained { deltas, end: None }
}
