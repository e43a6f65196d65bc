//! The language model: one [`ChatModel`] trait over any OpenAI-compatible endpoint
//! (`openai.rs`: reqwest, eventsource-stream and async-openai's request types) and the built-in stand-in model (`stand_in.rs`), plus
//! `chatfleet mock-llm`, a local OpenAI-compatible server (`mock_server.rs`), which can relay to
//! another endpoint instead of answering itself (`relay.rs`, the benchmark's floor). The stand-in
//! and the mock server share one reply generator (`mock_reply.rs`), so they answer alike.
//!
//! Invariant: this crate knows nothing of sessions, buses or stores; it turns a list of chat
//! messages into a stream of text chunks and classifies what went wrong.

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use schemas::{FinishReason, Usage};

pub mod mock_reply;
pub mod mock_server;
pub mod openai;
pub mod relay;
pub mod stand_in;

pub use openai::install_crypto_provider;

/// Who wrote a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatRole {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: ChatRole,
    pub content: String,
}

/// One generation request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatRequest {
    /// The conversation, oldest first; the last one is the user message to answer.
    pub messages: Vec<ChatMessage>,
    /// Upper bound on the reply's length, if any.
    pub max_tokens: Option<u32>,
}

/// A piece of a streamed reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatChunk {
    /// More text.
    Delta(String),
    /// The end of the reply. Always the last item of a successful stream.
    Finished { finish_reason: FinishReason, usage: Option<Usage> },
}

/// A model error, typed by what the caller should do next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LlmError {
    /// Worth retrying: 429, 5xx, a timeout, a connection error, a stream cut mid-way.
    #[error("transient model error: {message}")]
    Transient {
        message: String,
        /// What the endpoint asked for (`Retry-After`), if it said.
        retry_after: Option<Duration>,
    },
    /// Retrying will not help: a bad request, a bad key, an unknown model.
    #[error("model error ({code}): {message}")]
    Permanent { code: schemas::ErrorCode, message: String },
}

impl LlmError {
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient { .. })
    }
}

/// A reply as it is generated. Ends with [`ChatChunk::Finished`] or an error.
pub type ChunkStream = BoxStream<'static, Result<ChatChunk, LlmError>>;

/// A chat model that streams its replies.
#[async_trait]
pub trait ChatModel: Send + Sync + 'static {
    /// Starts generating a reply.
    async fn stream(&self, request: ChatRequest) -> Result<ChunkStream, LlmError>;

    /// One line for start-up logs: which model, where (never the key).
    fn describe(&self) -> String;
}
