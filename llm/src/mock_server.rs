//! `chatfleet mock-llm`: a local OpenAI-compatible chat completions server that answers with the
//! shared mock reply (see `mock_reply.rs`), streamed or whole, and obeys fault directives.
//!
//! Routes: `POST /v1/chat/completions` (also `/chat/completions`) and `GET /v1/models` (also
//! `/models`). Any model name is accepted and echoed back; no key is checked. Waits are tokio
//! sleeps inside the response body stream, so ten thousand concurrent streams cost ten thousand
//! small futures, not threads.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_openai::types::chat::{
    ChatCompletionRequestAssistantMessageContent, ChatCompletionRequestAssistantMessageContentPart,
    ChatCompletionRequestDeveloperMessageContent, ChatCompletionRequestDeveloperMessageContentPart,
    ChatCompletionRequestMessage, ChatCompletionRequestSystemMessageContent,
    ChatCompletionRequestSystemMessageContentPart, ChatCompletionRequestToolMessageContent,
    ChatCompletionRequestToolMessageContentPart, ChatCompletionRequestUserMessageContent,
    ChatCompletionRequestUserMessageContentPart, CreateChatCompletionRequest,
};
use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use axum::serve::ListenerExt;
use bytes::Bytes;
use futures::StreamExt;
use schemas::{FinishReason, Usage};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::TcpSocket;

use crate::mock_reply::{FaultBook, MockSettings, ReplyPlan, StatusFault, estimate_prompt_tokens};

/// How `chatfleet mock-llm` behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockServerConfig {
    pub settings: MockSettings,
    /// The model name `GET /v1/models` lists.
    pub model: String,
}

impl Default for MockServerConfig {
    fn default() -> Self {
        Self { settings: MockSettings::default(), model: "chatfleet-mock".to_owned() }
    }
}

/// The accept queue length [`listen`] asks for (the kernel caps it at `net.core.somaxconn`).
pub const LISTEN_BACKLOG: u32 = 8192;

/// Binds a listener fit for thousands of clients connecting at once. With tokio's default
/// backlog of 1024, a burst of several thousand connections overflows the accept queue and
/// some clients time out before they are ever served.
pub fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    // Lets a restarted server take the port back while old connections linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serves the mock model on `listener` until `shutdown` completes, then lets streams in flight
/// finish. Bind the listener with [`listen`] to take bursts of thousands of connections.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: MockServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, model = %config.model, "mock model server listening");
    }
    serve_router(listener, router(config), shutdown).await
}

/// Serves `router` with TCP_NODELAY on every connection until `shutdown` completes. Tokens are
/// tiny writes; without it Nagle's algorithm would hold them back and distort the timing.
pub(crate) async fn serve_router(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = listener.tap_io(|stream| {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY on a connection");
        }
    });
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}

/// The mock model's routes, for embedding in another server or a test.
pub fn router(config: MockServerConfig) -> Router {
    let state = Arc::new(ServerState {
        settings: config.settings,
        model: config.model,
        faults: FaultBook::new(),
        next_id: AtomicU64::new(1),
    });
    openai_routes(post(chat_completions), get(list_models)).with_state(state)
}

/// The routes of an OpenAI-compatible server: chat completions and the model list, with and
/// without `/v1`, and an OpenAI-shaped 404 for any other path.
pub(crate) fn openai_routes<S: Clone + Send + Sync + 'static>(
    chat_completions: MethodRouter<S>,
    list_models: MethodRouter<S>,
) -> Router<S> {
    Router::new()
        .route("/v1/chat/completions", chat_completions.clone())
        .route("/chat/completions", chat_completions)
        .route("/v1/models", list_models.clone())
        .route("/models", list_models)
        .fallback(not_found)
}

struct ServerState {
    settings: MockSettings,
    model: String,
    faults: FaultBook,
    next_id: AtomicU64,
}

async fn list_models(State(state): State<Arc<ServerState>>) -> Json<Value> {
    models_list(&state.model)
}

/// `GET /v1/models`: a list of the one model `name`.
pub(crate) fn models_list(name: &str) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": name,
            "object": "model",
            "created": unix_now(),
            "owned_by": "chatfleet",
        }],
    }))
}

async fn not_found() -> Response {
    error_response(StatusCode::NOT_FOUND, "Unknown route.", None)
}

async fn chat_completions(
    State(state): State<Arc<ServerState>>,
    body: Result<Json<CreateChatCompletionRequest>, JsonRejection>,
) -> Response {
    let request = match read_request(body) {
        Ok(request) => request,
        Err(refused) => return *refused,
    };

    let texts: Vec<String> = request.messages.iter().map(message_text).collect();
    let last_user_text = request
        .messages
        .iter()
        .zip(&texts)
        .rev()
        .find(|(message, _)| matches!(message, ChatCompletionRequestMessage::User(_)))
        .map_or("", |(_, text)| text.as_str());

    let faults = state.faults.record(last_user_text);
    if let Some(fault) = faults.status {
        return fault_response(fault);
    }

    #[allow(deprecated)]
    // Older clients still send `max_tokens`; honour it when it is the only limit.
    let max_tokens = request.max_completion_tokens.or(request.max_tokens);
    let prompt_tokens = estimate_prompt_tokens(texts.iter().map(String::as_str));
    let plan = ReplyPlan::new(last_user_text, prompt_tokens, max_tokens, &faults, &state.settings);

    let reply = ReplyContext {
        id: format!("chatcmpl-mock-{}", state.next_id.fetch_add(1, Ordering::Relaxed)),
        created: unix_now(),
        model: request.model,
        include_usage: request.stream_options.and_then(|options| options.include_usage).unwrap_or(false),
    };
    if request.stream.unwrap_or(false) { stream_reply(reply, plan) } else { whole_reply(reply, plan).await }
}

/// A chat completion request with at least one message, or the 400 that says what is wrong.
pub(crate) fn read_request(
    body: Result<Json<CreateChatCompletionRequest>, JsonRejection>,
) -> Result<CreateChatCompletionRequest, Box<Response>> {
    let request = match body {
        Ok(Json(request)) => request,
        Err(rejection) => return Err(Box::new(error_response(StatusCode::BAD_REQUEST, &rejection.body_text(), None))),
    };
    if request.messages.is_empty() {
        return Err(Box::new(error_response(StatusCode::BAD_REQUEST, "[] is too short - 'messages'", None)));
    }
    Ok(request)
}

/// The text of a message: its string content, or its text parts joined with newlines.
pub(crate) fn message_text(message: &ChatCompletionRequestMessage) -> String {
    fn join<'a>(parts: impl Iterator<Item = Option<&'a str>>) -> String {
        parts.flatten().collect::<Vec<_>>().join("\n")
    }
    match message {
        ChatCompletionRequestMessage::Developer(m) => match &m.content {
            ChatCompletionRequestDeveloperMessageContent::Text(text) => text.clone(),
            ChatCompletionRequestDeveloperMessageContent::Array(parts) => join(
                parts.iter().map(|ChatCompletionRequestDeveloperMessageContentPart::Text(p)| Some(p.text.as_str())),
            ),
        },
        ChatCompletionRequestMessage::System(m) => match &m.content {
            ChatCompletionRequestSystemMessageContent::Text(text) => text.clone(),
            ChatCompletionRequestSystemMessageContent::Array(parts) => {
                join(parts.iter().map(|ChatCompletionRequestSystemMessageContentPart::Text(p)| Some(p.text.as_str())))
            }
        },
        ChatCompletionRequestMessage::User(m) => match &m.content {
            ChatCompletionRequestUserMessageContent::Text(text) => text.clone(),
            ChatCompletionRequestUserMessageContent::Array(parts) => join(parts.iter().map(|part| match part {
                ChatCompletionRequestUserMessageContentPart::Text(p) => Some(p.text.as_str()),
                _ => None,
            })),
        },
        ChatCompletionRequestMessage::Assistant(m) => match &m.content {
            None => String::new(),
            Some(ChatCompletionRequestAssistantMessageContent::Text(text)) => text.clone(),
            Some(ChatCompletionRequestAssistantMessageContent::Array(parts)) => {
                join(parts.iter().map(|part| match part {
                    ChatCompletionRequestAssistantMessageContentPart::Text(p) => Some(p.text.as_str()),
                    ChatCompletionRequestAssistantMessageContentPart::Refusal(p) => Some(p.refusal.as_str()),
                }))
            }
        },
        ChatCompletionRequestMessage::Tool(m) => match &m.content {
            ChatCompletionRequestToolMessageContent::Text(text) => text.clone(),
            ChatCompletionRequestToolMessageContent::Array(parts) => {
                join(parts.iter().map(|ChatCompletionRequestToolMessageContentPart::Text(p)| Some(p.text.as_str())))
            }
        },
        ChatCompletionRequestMessage::Function(m) => m.content.clone().unwrap_or_default(),
    }
}

/// What every chunk of one reply shares.
pub(crate) struct ReplyContext {
    pub(crate) id: String,
    pub(crate) created: u64,
    pub(crate) model: String,
    pub(crate) include_usage: bool,
}

/// A fixed fingerprint, so clients that log it see something stable.
const FINGERPRINT: &str = "fp_chatfleet_mock";

impl ReplyContext {
    /// One `chat.completion.chunk` with the given choices, as an SSE event.
    pub(crate) fn chunk_event(&self, choices: &[ChoiceJson<'_>], usage: Option<&Usage>) -> std::io::Result<Bytes> {
        let chunk = ChunkJson {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            service_tier: "default",
            system_fingerprint: FINGERPRINT,
            choices,
            usage: self.include_usage.then(|| usage.map(usage_json)),
        };
        let mut event = Vec::with_capacity(320);
        event.extend_from_slice(b"data: ");
        serde_json::to_writer(&mut event, &chunk)?;
        event.extend_from_slice(b"\n\n");
        Ok(Bytes::from(event))
    }

    /// A chunk with a single choice carrying `delta`.
    pub(crate) fn delta_event(
        &self,
        delta: DeltaJson<'_>,
        finish_reason: Option<&FinishReason>,
    ) -> std::io::Result<Bytes> {
        let choice =
            ChoiceJson { index: 0, delta, logprobs: None, finish_reason: finish_reason.map(finish_reason_str) };
        self.chunk_event(&[choice], None)
    }
}

/// A `chat.completion.chunk`, serialized straight from borrowed fields: this runs once per token
/// of every stream, so it avoids building a `serde_json::Value` each time.
#[derive(Serialize)]
struct ChunkJson<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    service_tier: &'static str,
    system_fingerprint: &'static str,
    choices: &'a [ChoiceJson<'a>],
    /// Like OpenAI: absent unless the client asked for usage, then null until the last chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<Value>>,
}

#[derive(Serialize)]
pub(crate) struct ChoiceJson<'a> {
    index: u32,
    delta: DeltaJson<'a>,
    /// Always null; logprobs are not offered.
    logprobs: Option<()>,
    finish_reason: Option<&'a str>,
}

#[derive(Serialize, Default)]
pub(crate) struct DeltaJson<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) content: Option<&'a str>,
    /// Present, as null, only in the opening chunk, as OpenAI sends it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) refusal: Option<Option<&'a str>>,
}

fn usage_json(usage: &Usage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens.saturating_add(usage.completion_tokens),
        "prompt_tokens_details": { "cached_tokens": 0, "audio_tokens": 0 },
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    })
}

fn finish_reason_str(reason: &FinishReason) -> &str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::ContentFilter => "content_filter",
        FinishReason::Other(other) => other,
    }
}

/// One step of a streamed reply, sent after its delay.
enum Frame {
    /// The opening chunk: `delta.role = "assistant"` and empty content, as OpenAI sends it.
    Role,
    Token(String),
    /// The chunk with an empty delta and the finish reason.
    Finish,
    /// The usage chunk with no choices, when the client asked for it.
    Usage,
    Done,
    /// Drop the connection.
    Cut,
}

fn stream_reply(reply: ReplyContext, plan: ReplyPlan) -> Response {
    let ReplyPlan { tokens, finish_reason, usage, first_token_delay, token_delay, cut_after } = plan;
    let mut frames: Vec<(Duration, Frame)> = Vec::with_capacity(tokens.len() + 4);
    frames.push((first_token_delay, Frame::Role));
    let keep = cut_after.map_or(tokens.len(), |k| k.min(tokens.len()));
    for (i, token) in tokens.into_iter().take(keep).enumerate() {
        let delay = if i == 0 { Duration::ZERO } else { token_delay };
        frames.push((delay, Frame::Token(token)));
    }
    if cut_after.is_some() {
        // The cut comes when the next token would have. The wait is never zero: hyper drops
        // unflushed output when a body fails, and only a pending body lets it flush the last
        // token first.
        frames.push((token_delay.max(Duration::from_millis(1)), Frame::Cut));
    } else {
        frames.push((Duration::ZERO, Frame::Finish));
        if reply.include_usage {
            frames.push((Duration::ZERO, Frame::Usage));
        }
        frames.push((Duration::ZERO, Frame::Done));
    }

    let reply = Arc::new(reply);
    let finish_reason = Arc::new(finish_reason);
    let body = futures::stream::iter(frames).then(move |(delay, frame)| {
        let reply = Arc::clone(&reply);
        let finish_reason = Arc::clone(&finish_reason);
        async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            match frame {
                Frame::Role => reply
                    .delta_event(DeltaJson { role: Some("assistant"), content: Some(""), refusal: Some(None) }, None),
                Frame::Token(token) => {
                    reply.delta_event(DeltaJson { content: Some(&token), ..DeltaJson::default() }, None)
                }
                Frame::Finish => reply.delta_event(DeltaJson::default(), Some(&finish_reason)),
                Frame::Usage => reply.chunk_event(&[], Some(&usage)),
                Frame::Done => Ok(Bytes::from_static(b"data: [DONE]\n\n")),
                // A body error makes hyper abort the connection without ending the chunked
                // body, which is what a client sees when a real model's connection drops.
                Frame::Cut => Err(std::io::Error::other("mock fault: connection cut")),
            }
        }
    });

    let mut response = Body::from_stream(body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

async fn whole_reply(reply: ReplyContext, plan: ReplyPlan) -> Response {
    if let Some(cut_after) = plan.cut_after {
        // Wait as long as generating the first tokens would take, then drop the connection
        // after the headers, before any body.
        let tokens_sent = u32::try_from(cut_after).unwrap_or(u32::MAX);
        tokio::time::sleep(plan.first_token_delay + plan.token_delay.saturating_mul(tokens_sent)).await;
        let body =
            futures::stream::once(async { Err::<Bytes, _>(std::io::Error::other("mock fault: connection cut")) });
        let mut response = Body::from_stream(body).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        return response;
    }

    tokio::time::sleep(plan.total_delay()).await;
    Json(json!({
        "id": reply.id,
        "object": "chat.completion",
        "created": reply.created,
        "model": reply.model,
        "choices": [{
            "index": 0,
            "message": {
                "role": "assistant",
                "content": plan.text(),
                "refusal": null,
                "annotations": [],
            },
            "logprobs": null,
            "finish_reason": finish_reason_str(&plan.finish_reason),
        }],
        "usage": usage_json(&plan.usage),
        "service_tier": "default",
        "system_fingerprint": FINGERPRINT,
    }))
    .into_response()
}

/// The response a `[mock:status=...]` directive asks for.
fn fault_response(fault: StatusFault) -> Response {
    let status = StatusCode::from_u16(fault.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let message = format!("Mock fault: HTTP {} on request.", status.as_u16());
    let retry_after = matches!(status.as_u16(), 429 | 503).then_some(fault.retry_after);
    error_response(status, &message, retry_after)
}

/// An error in OpenAI's shape, `{"error":{"message","type","param","code"}}`, with retry
/// headers when `retry_after` is given: `retry-after-ms` in milliseconds and the standard
/// `Retry-After` in whole seconds, rounded up.
pub(crate) fn error_response(status: StatusCode, message: &str, retry_after: Option<Duration>) -> Response {
    let (kind, code) = match status.as_u16() {
        401 => ("invalid_request_error", Some("invalid_api_key")),
        403 => ("permission_error", Some("permission_denied")),
        404 => ("invalid_request_error", Some("model_not_found")),
        429 => ("requests", Some("rate_limit_exceeded")),
        400..=499 => ("invalid_request_error", None),
        _ => ("server_error", None),
    };
    let body = json!({
        "error": { "message": message, "type": kind, "param": null, "code": code },
    });
    let mut response = (status, Json(body)).into_response();
    if let Some(wait) = retry_after {
        let headers = response.headers_mut();
        headers.insert("retry-after-ms", HeaderValue::from(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)));
        let seconds = wait.as_millis().div_ceil(1000);
        headers.insert(header::RETRY_AFTER, HeaderValue::from(u64::try_from(seconds).unwrap_or(u64::MAX)));
    }
    response
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs())
}
