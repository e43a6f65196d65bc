//! [`OpenAiModel`]: a [`ChatModel`] over any OpenAI-compatible chat completions endpoint,
//! streaming with usage reported at the end.
//!
//! The request is async-openai's `CreateChatCompletionRequest`, sent with reqwest; the answer's
//! Server-Sent Events are read in place, in the task that consumes the reply (eventsource-stream
//! over the response body), and each chunk is parsed into a small borrowed view of the fields
//! chatfleet uses. No task or channel per reply, no copy of the fields it ignores. What this
//! keeps that a general-purpose client would not:
//!
//! * each request is sent exactly once: retrying is the worker's decision;
//! * a failed request's `Retry-After` and error body are kept for the error;
//! * a stream that ends without `data: [DONE]` (and without a finish reason) is a reply whose
//!   connection was cut, not a finished one.

use schemas::redact_url;
use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use async_openai::error::{ApiError, WrappedError};
use async_openai::types::chat::{
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestAssistantMessageContent, ChatCompletionRequestMessage,
    ChatCompletionRequestSystemMessage, ChatCompletionRequestSystemMessageContent, ChatCompletionRequestUserMessage,
    ChatCompletionRequestUserMessageContent, ChatCompletionStreamOptions, CreateChatCompletionRequest,
};
use async_trait::async_trait;
use eventsource_stream::{EventStreamError, Eventsource};
use futures::StreamExt;
use futures::stream::BoxStream;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue, RETRY_AFTER};
use schemas::{ErrorCode, FinishReason, Usage};
use serde::Deserialize;
use tokio::time::Instant;

use crate::{ChatChunk, ChatMessage, ChatModel, ChatRequest, ChatRole, ChunkStream, LlmError};

/// Installs rustls' ring crypto provider for this process. reqwest is built without a default
/// provider, so this must run before any reqwest client is built; calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Where the model is and how patient to be with it.
#[derive(Clone, PartialEq, Eq)]
pub struct OpenAiSettings {
    /// The API root, including any version segment: `https://api.openai.com/v1`,
    /// `http://127.0.0.1:8080/v1`. Requests go to `<base_url>/chat/completions`.
    pub base_url: String,
    /// Sent as `Authorization: Bearer <key>`; no header at all when `None`.
    pub api_key: Option<String>,
    pub model: String,
    /// Longest wait from sending a request to the first streamed chunk.
    pub first_token_timeout: Duration,
    /// Longest wait between two streamed chunks.
    pub idle_timeout: Duration,
    /// A ceiling on every reply's length; a request's own limit can only lower it.
    pub max_tokens: Option<u32>,
}

// Written out by hand so the key never reaches a log line.
impl fmt::Debug for OpenAiSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiSettings")
            .field("base_url", &redact_url(&self.base_url))
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("model", &self.model)
            .field("first_token_timeout", &self.first_token_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_tokens", &self.max_tokens)
            .finish()
    }
}

/// A chat model behind an OpenAI-compatible HTTP endpoint. Holds one pooled HTTP client, shared
/// by every request it makes.
pub struct OpenAiModel {
    http: reqwest::Client,
    /// `<base_url>/chat/completions`.
    url: reqwest::Url,
    /// `Bearer <key>`, marked sensitive; no header at all without a key.
    authorization: Option<HeaderValue>,
    model: String,
    /// The base URL with any user name and password removed, for logs.
    shown_url: String,
    first_token_timeout: Duration,
    idle_timeout: Duration,
    max_tokens: Option<u32>,
}

impl fmt::Debug for OpenAiModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiModel")
            .field("model", &self.model)
            .field("base_url", &self.shown_url)
            .field("first_token_timeout", &self.first_token_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_tokens", &self.max_tokens)
            .finish_non_exhaustive()
    }
}

impl OpenAiModel {
    /// Checks the settings and builds the HTTP client. Fails with a permanent
    /// `model_misconfigured` error for an unusable base URL or an empty model name.
    pub fn new(settings: OpenAiSettings) -> Result<Self, LlmError> {
        install_crypto_provider();

        let misconfigured = |message: String| LlmError::Permanent { code: ErrorCode::ModelMisconfigured, message };
        let base_url = settings.base_url.trim_end_matches('/').to_owned();
        let parsed = reqwest::Url::parse(&base_url).map_err(|error| {
            misconfigured(format!("model base URL {:?} is not a URL: {error}", redact_url(&base_url)))
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(misconfigured(format!("model base URL {:?} must be http or https", redact_url(&base_url))));
        }
        if settings.model.trim().is_empty() {
            return Err(misconfigured("the model name is empty".into()));
        }
        // A key read from a file often ends in a newline, so it is trimmed; a key that still
        // cannot be a header is refused.
        let authorization = match settings.api_key.as_deref().map(str::trim) {
            None => None,
            Some(key) => {
                let mut value = HeaderValue::from_str(&format!("Bearer {key}"))
                    .map_err(|_| misconfigured("the API key has characters not allowed in a header".into()))?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        let url = reqwest::Url::parse(&format!("{base_url}/chat/completions")).map_err(|error| {
            misconfigured(format!("model base URL {:?} is not a URL: {error}", redact_url(&base_url)))
        })?;

        let http = reqwest::Client::builder()
            .user_agent(concat!("chatfleet/", env!("CARGO_PKG_VERSION")))
            .tcp_keepalive(Duration::from_secs(30))
            .build()
            .map_err(|error| misconfigured(format!("cannot build the HTTP client: {error}")))?;

        Ok(Self {
            http,
            url,
            authorization,
            model: settings.model,
            shown_url: redact_url(&base_url),
            first_token_timeout: settings.first_token_timeout,
            idle_timeout: settings.idle_timeout,
            max_tokens: settings.max_tokens,
        })
    }

    fn completion_request(&self, request: &ChatRequest) -> CreateChatCompletionRequest {
        let max_completion_tokens = match (request.max_tokens, self.max_tokens) {
            (Some(asked), Some(ceiling)) => Some(asked.min(ceiling)),
            (asked, ceiling) => asked.or(ceiling),
        };
        CreateChatCompletionRequest {
            model: self.model.clone(),
            messages: request.messages.iter().map(openai_message).collect(),
            stream: Some(true),
            stream_options: Some(ChatCompletionStreamOptions { include_usage: Some(true), include_obfuscation: None }),
            max_completion_tokens,
            ..Default::default()
        }
    }
}

#[async_trait]
impl ChatModel for OpenAiModel {
    async fn stream(&self, request: ChatRequest) -> Result<ChunkStream, LlmError> {
        let first_chunk_deadline = Instant::now() + self.first_token_timeout;
        let mut post = self.http.post(self.url.clone()).json(&self.completion_request(&request));
        if let Some(authorization) = &self.authorization {
            post = post.header(AUTHORIZATION, authorization.clone());
        }
        let opened = async {
            let response = post.send().await.map_err(|error| request_failed(&error))?;
            if !response.status().is_success() {
                return Err(failure(response).await);
            }
            Ok(response)
        };
        let response = tokio::time::timeout_at(first_chunk_deadline, opened)
            .await
            .map_err(|_| first_chunk_timeout(self.first_token_timeout))??;

        let progress = Progress {
            events: response.bytes_stream().eventsource().boxed(),
            first_chunk_deadline,
            first_token_timeout: self.first_token_timeout,
            idle_timeout: self.idle_timeout,
            seen_chunk: false,
            finish_reason: None,
            usage: None,
            ended: false,
        };
        Ok(futures::stream::unfold(progress, |mut progress| async move {
            let item = progress.next_item().await?;
            Some((item, progress))
        })
        .boxed())
    }

    fn describe(&self) -> String {
        format!("{} at {}", self.model, self.shown_url)
    }
}

fn openai_message(message: &ChatMessage) -> ChatCompletionRequestMessage {
    let text = message.content.clone();
    match message.role {
        ChatRole::System => ChatCompletionRequestMessage::System(ChatCompletionRequestSystemMessage {
            content: ChatCompletionRequestSystemMessageContent::Text(text),
            name: None,
        }),
        ChatRole::User => ChatCompletionRequestMessage::User(ChatCompletionRequestUserMessage {
            content: ChatCompletionRequestUserMessageContent::Text(text),
            name: None,
        }),
        ChatRole::Assistant => ChatCompletionRequestMessage::Assistant(ChatCompletionRequestAssistantMessage {
            content: Some(ChatCompletionRequestAssistantMessageContent::Text(text)),
            ..Default::default()
        }),
    }
}

/// The server-sent events of one reply, read straight from the response body.
type SseEvents = BoxStream<'static, Result<eventsource_stream::Event, EventStreamError<reqwest::Error>>>;

/// The state of one streamed reply as it is turned into [`ChatChunk`]s.
struct Progress {
    events: SseEvents,
    first_chunk_deadline: Instant,
    first_token_timeout: Duration,
    idle_timeout: Duration,
    seen_chunk: bool,
    /// Set when the model said why it stopped. The reply then ends at the next end of stream,
    /// which normally first brings the usage chunk.
    finish_reason: Option<FinishReason>,
    usage: Option<Usage>,
    ended: bool,
}

impl Progress {
    async fn next_item(&mut self) -> Option<Result<ChatChunk, LlmError>> {
        if self.ended {
            return None;
        }
        loop {
            let next = if self.seen_chunk {
                tokio::time::timeout(self.idle_timeout, self.events.next()).await
            } else {
                tokio::time::timeout_at(self.first_chunk_deadline, self.events.next()).await
            };
            let event = match next {
                Ok(Some(Ok(event))) => event,
                Ok(None) => {
                    self.ended = true;
                    // Without a finish reason only `[DONE]` tells a complete reply from one
                    // whose connection closed early.
                    if self.finish_reason.is_none() {
                        return Some(Err(LlmError::Transient {
                            message: "the model's stream ended before the reply was finished".into(),
                            retry_after: None,
                        }));
                    }
                    return Some(Ok(self.finished()));
                }
                Ok(Some(Err(error))) => {
                    self.ended = true;
                    // Once the finish reason is in, the reply is whole; a failure while
                    // waiting for the usage chunk costs only the usage.
                    if self.finish_reason.is_some() {
                        return Some(Ok(self.finished()));
                    }
                    return Some(Err(transient(format!("model stream failed: {error}"))));
                }
                Err(_elapsed) => {
                    self.ended = true;
                    if self.finish_reason.is_some() {
                        return Some(Ok(self.finished()));
                    }
                    if !self.seen_chunk {
                        return Some(Err(first_chunk_timeout(self.first_token_timeout)));
                    }
                    return Some(Err(LlmError::Transient {
                        message: format!("the model sent nothing for {} ms mid-reply", self.idle_timeout.as_millis()),
                        retry_after: None,
                    }));
                }
            };
            if event.data == "[DONE]" {
                self.ended = true;
                return Some(Ok(self.finished()));
            }
            if event.event == "keepalive" {
                continue;
            }

            self.seen_chunk = true;
            let chunk = match serde_json::from_str::<StreamChunk<'_>>(&event.data) {
                Ok(chunk) => chunk,
                Err(error) => {
                    self.ended = true;
                    return Some(Err(LlmError::Permanent {
                        code: ErrorCode::ModelBadResponse,
                        message: format!("the model sent something that is not a chat chunk: {error}"),
                    }));
                }
            };
            // OpenAI reports failures that happen mid-stream as an error object in place of a
            // chunk; those are the server's trouble and worth another try.
            if let Some(error) = chunk.error {
                self.ended = true;
                return Some(Err(transient(format!("model failed mid-reply: {}", error.message))));
            }
            if let Some(usage) = chunk.usage {
                self.usage =
                    Some(Usage { prompt_tokens: usage.prompt_tokens, completion_tokens: usage.completion_tokens });
            }
            // One reply is asked for, so only the first choice matters.
            if let Some(choice) = chunk.choices.into_iter().find(|choice| choice.index == 0) {
                if let Some(reason) = choice.finish_reason {
                    self.finish_reason = Some(finish_reason(&reason));
                }
                if let Some(text) = choice.delta.and_then(|delta| delta.content)
                    && !text.is_empty()
                {
                    return Some(Ok(ChatChunk::Delta(text.into_owned())));
                }
            }
        }
    }

    fn finished(&mut self) -> ChatChunk {
        ChatChunk::Finished {
            finish_reason: self.finish_reason.take().unwrap_or(FinishReason::Stop),
            usage: self.usage,
        }
    }
}

/// The fields of a `chat.completion.chunk` that chatfleet reads, borrowed from the event's
/// text where it has no escapes. Everything else in a chunk is skipped, not copied.
#[derive(Deserialize)]
struct StreamChunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<StreamChoice<'a>>,
    #[serde(default)]
    usage: Option<StreamUsage>,
    /// An error object sent in place of a chunk.
    #[serde(default)]
    error: Option<StreamFailure>,
}

#[derive(Deserialize)]
struct StreamChoice<'a> {
    #[serde(default)]
    index: u32,
    #[serde(default, borrow)]
    delta: Option<StreamDelta<'a>>,
    #[serde(default, borrow)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct StreamDelta<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct StreamUsage {
    prompt_tokens: u32,
    completion_tokens: u32,
}

#[derive(Deserialize)]
struct StreamFailure {
    #[serde(default)]
    message: String,
}

/// The finish reason as chatfleet names it; a reason it does not know is kept as it is.
fn finish_reason(reason: &str) -> FinishReason {
    match reason {
        "stop" => FinishReason::Stop,
        "length" => FinishReason::Length,
        "content_filter" => FinishReason::ContentFilter,
        other => FinishReason::Other(other.to_owned()),
    }
}

fn first_chunk_timeout(limit: Duration) -> LlmError {
    LlmError::Transient {
        message: format!("no reply from the model within {} ms", limit.as_millis()),
        retry_after: None,
    }
}

/// A request that got no answer: one that could not be built is a misconfiguration, anything
/// else (refused, reset, timed out) is worth another try.
fn request_failed(error: &reqwest::Error) -> LlmError {
    if error.is_builder() {
        return LlmError::Permanent {
            code: ErrorCode::ModelMisconfigured,
            message: format!("cannot build the model request: {error}"),
        };
    }
    transient(format!("model connection failed: {error}"))
}

fn transient(message: String) -> LlmError {
    LlmError::Transient { message, retry_after: None }
}

fn api_code(error: &ApiError) -> Option<&str> {
    error.code.as_deref().or(error.r#type.as_deref())
}

/// The error for an HTTP failure status. Shared with the stand-in model, so that both classify
/// a fault directive alike.
///
/// 408, 409, 425, 429 and 5xx are transient (except a 429 for exhausted quota); other 4xx are
/// permanent, with codes `model_bad_request` (400, 422), `model_unauthorized` (401),
/// `model_forbidden` (403), `model_not_found` (404), `model_request_too_large` (413),
/// `model_context_too_long` (a 400 saying so), `model_quota_exhausted`, or `model_rejected`.
pub(crate) fn error_for_status(
    status: u16,
    detail: &str,
    api_code: Option<&str>,
    retry_after: Option<Duration>,
) -> LlmError {
    let message = if detail.is_empty() {
        format!("the model answered HTTP {status}")
    } else {
        format!("the model answered HTTP {status}: {detail}")
    };
    if api_code == Some("insufficient_quota") {
        return LlmError::Permanent { code: ErrorCode::ModelQuotaExhausted, message };
    }
    if matches!(status, 408 | 409 | 425 | 429) || (500..=599).contains(&status) {
        return LlmError::Transient { message, retry_after };
    }
    let code = match status {
        400 if api_code == Some("context_length_exceeded") => ErrorCode::ModelContextTooLong,
        400 | 422 => ErrorCode::ModelBadRequest,
        401 => ErrorCode::ModelUnauthorized,
        403 => ErrorCode::ModelForbidden,
        404 => ErrorCode::ModelNotFound,
        413 => ErrorCode::ModelRequestTooLarge,
        _ => ErrorCode::ModelRejected,
    };
    LlmError::Permanent { code, message }
}

/// The error for a non-2xx answer: its status, the error message from its body (or the start of
/// the body), the API's error code, and the wait it asked for.
async fn failure(response: reqwest::Response) -> LlmError {
    const MAX_DETAIL_CHARS: usize = 500;
    let status = response.status().as_u16();
    let retry_after = retry_after(response.headers());
    // The status alone classifies the failure, so a body that cannot be read costs only detail.
    let body = response.bytes().await.unwrap_or_default();
    let (detail, api_code) = match serde_json::from_slice::<WrappedError>(&body) {
        Ok(wrapped) => {
            let code = api_code(&wrapped.error).map(str::to_owned);
            (wrapped.error.message, code)
        }
        Err(_) => (String::from_utf8_lossy(&body).trim().to_owned(), None),
    };
    let detail: String = detail.chars().take(MAX_DETAIL_CHARS).collect();
    error_for_status(status, &detail, api_code.as_deref(), retry_after)
}

/// The wait a failure asks for: `retry-after-ms` (OpenAI and Azure send it), else
/// `Retry-After` in seconds. The HTTP-date form of `Retry-After` is not understood.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let number = |name| {
        headers.get(name).and_then(|value| value.to_str().ok()).and_then(|value| value.trim().parse::<f64>().ok())
    };
    let from_ms = number(reqwest::header::HeaderName::from_static("retry-after-ms"))
        .and_then(|ms| Duration::try_from_secs_f64(ms / 1000.0).ok());
    from_ms.or_else(|| number(RETRY_AFTER).and_then(|s| Duration::try_from_secs_f64(s).ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_prefers_milliseconds_over_seconds() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, "2".parse().unwrap());
        let seconds_only = retry_after(&headers);
        headers.insert("retry-after-ms", "50".parse().unwrap());

        let both = retry_after(&headers);

        assert_eq!(seconds_only, Some(Duration::from_secs(2)));
        assert_eq!(both, Some(Duration::from_millis(50)));
    }

    #[test]
    fn statuses_are_sorted_into_transient_and_permanent() {
        let wait = Some(Duration::from_millis(5));

        let rate_limited = error_for_status(429, "slow down", None, wait);
        let no_quota = error_for_status(429, "no money", Some("insufficient_quota"), None);
        let unavailable = error_for_status(503, "", None, None);
        let unauthorized = error_for_status(401, "bad key", None, None);
        let too_long = error_for_status(400, "too long", Some("context_length_exceeded"), None);

        assert_eq!(
            rate_limited,
            LlmError::Transient { message: "the model answered HTTP 429: slow down".into(), retry_after: wait }
        );
        assert!(matches!(no_quota, LlmError::Permanent { code, .. } if code == "model_quota_exhausted"));
        assert!(unavailable.is_transient());
        assert!(matches!(unauthorized, LlmError::Permanent { code, .. } if code == "model_unauthorized"));
        assert!(matches!(too_long, LlmError::Permanent { code, .. } if code == "model_context_too_long"));
    }

    #[test]
    fn the_key_and_url_credentials_stay_out_of_debug_output() {
        let settings = OpenAiSettings {
            base_url: "https://user:hunter2@models.example/v1".into(),
            api_key: Some("sk-secret-value".into()),
            model: "m".into(),
            first_token_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            max_tokens: None,
        };

        let settings_debug = format!("{settings:?}");
        let model = OpenAiModel::new(settings).unwrap();
        let model_debug = format!("{model:?} {}", model.describe());

        for shown in [settings_debug, model_debug] {
            assert!(!shown.contains("sk-secret-value"), "{shown}");
            assert!(!shown.contains("hunter2"), "{shown}");
        }
    }

    #[test]
    fn an_unusable_base_url_is_a_permanent_misconfiguration() {
        let settings = OpenAiSettings {
            base_url: "ftp://models.example".into(),
            api_key: None,
            model: "m".into(),
            first_token_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            max_tokens: None,
        };

        let error = OpenAiModel::new(settings).unwrap_err();

        assert!(matches!(error, LlmError::Permanent { code, .. } if code == "model_misconfigured"));
    }
}
