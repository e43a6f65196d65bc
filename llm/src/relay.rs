//! `chatfleet mock-llm --upstream URL`: the mock server's API, answered by relaying every chat
//! completion to another OpenAI-compatible endpoint through chatfleet's own model client
//! ([`OpenAiModel`]).
//!
//! Per message it does what any server between a user and the model must: read the request,
//! call the model, read its stream chunk by chunk, and encode and write each chunk to the
//! client. It keeps nothing: no session, bus, store or retry. The benchmark runs it as the
//! `relay` target, the floor of the design on this stack (hyper on both sides, tokio, serde):
//! what chatfleet costs beyond it is what its sessions, bus and store cost.
//!
//! A model error before the first chunk becomes an error answer in OpenAI's shape (a transient
//! one 503 with the wait the model asked for, a permanent one the status its code names); a
//! model error after it cuts the connection, as a model whose connection drops would.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_openai::types::chat::{ChatCompletionRequestMessage, CreateChatCompletionRequest};
use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use schemas::ErrorCode;
use serde_json::Value;

use crate::mock_server::{
    DeltaJson, ReplyContext, error_response, message_text, models_list, openai_routes, read_request, serve_router,
    unix_now,
};
use crate::openai::OpenAiModel;
use crate::{ChatChunk, ChatMessage, ChatModel, ChatRequest, ChatRole, LlmError};

/// Serves the relay on `listener` until `shutdown` completes, then lets streams in flight
/// finish. Bind the listener with [`crate::mock_server::listen`] to take bursts of thousands of
/// connections.
pub async fn serve(
    listener: tokio::net::TcpListener,
    model: OpenAiModel,
    model_name: String,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, upstream = %model.describe(), "relay listening");
    }
    serve_router(listener, router(model, model_name), shutdown).await
}

/// The relay's routes (the mock server's): `POST /v1/chat/completions`, `GET /v1/models`, and
/// the same without `/v1`. `GET /models` lists `model_name`.
pub fn router(model: OpenAiModel, model_name: String) -> Router {
    let state = Arc::new(RelayState { model, model_name, next_id: AtomicU64::new(1) });
    openai_routes(post(chat_completions), get(list_models)).with_state(state)
}

struct RelayState {
    model: OpenAiModel,
    model_name: String,
    next_id: AtomicU64,
}

async fn list_models(State(state): State<Arc<RelayState>>) -> Json<Value> {
    models_list(&state.model_name)
}

async fn chat_completions(
    State(state): State<Arc<RelayState>>,
    body: Result<Json<CreateChatCompletionRequest>, JsonRejection>,
) -> Response {
    let request = match read_request(body) {
        Ok(request) => request,
        Err(refused) => return *refused,
    };
    if !request.stream.unwrap_or(false) {
        return error_response(StatusCode::BAD_REQUEST, "The relay answers streamed requests only.", None);
    }
    #[allow(deprecated)]
    // Older clients still send `max_tokens`; honour it when it is the only limit.
    let max_tokens = request.max_completion_tokens.or(request.max_tokens);
    let chat = ChatRequest {
        messages: request
            .messages
            .iter()
            .map(|message| ChatMessage { role: role(message), content: message_text(message) })
            .collect(),
        max_tokens,
    };
    let chunks = match state.model.stream(chat).await {
        Ok(chunks) => chunks,
        Err(error) => return model_error(&error),
    };

    let reply = ReplyContext {
        id: format!("chatcmpl-relay-{}", state.next_id.fetch_add(1, Ordering::Relaxed)),
        created: unix_now(),
        model: request.model,
        include_usage: request.stream_options.and_then(|options| options.include_usage).unwrap_or(false),
    };
    let body = chunks.map(move |chunk| match chunk {
        Ok(ChatChunk::Delta(text)) => {
            reply.delta_event(DeltaJson { content: Some(&text), ..DeltaJson::default() }, None)
        }
        Ok(ChatChunk::Finished { finish_reason, usage }) => {
            // The reply's last chunks go out in one write.
            let mut end = BytesMut::from(&reply.delta_event(DeltaJson::default(), Some(&finish_reason))?[..]);
            if reply.include_usage {
                end.extend_from_slice(&reply.chunk_event(&[], usage.as_ref())?);
            }
            end.extend_from_slice(b"data: [DONE]\n\n");
            Ok(end.freeze())
        }
        // A body error makes hyper drop the connection without ending the chunked body: what a
        // client sees of a model whose connection drops.
        Err(error) => Err::<Bytes, _>(std::io::Error::other(error)),
    });
    let mut response = Body::from_stream(body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// The chat role of a request's message; a tool's or function's result is relayed as the user's.
fn role(message: &ChatCompletionRequestMessage) -> ChatRole {
    match message {
        ChatCompletionRequestMessage::Developer(_) | ChatCompletionRequestMessage::System(_) => ChatRole::System,
        ChatCompletionRequestMessage::Assistant(_) => ChatRole::Assistant,
        ChatCompletionRequestMessage::User(_)
        | ChatCompletionRequestMessage::Tool(_)
        | ChatCompletionRequestMessage::Function(_) => ChatRole::User,
    }
}

/// The answer for a model error before the first chunk: 503 with the model's wait for a
/// transient one, the status its code stands for for a permanent one.
fn model_error(error: &LlmError) -> Response {
    match error {
        LlmError::Transient { message, retry_after } => {
            error_response(StatusCode::SERVICE_UNAVAILABLE, message, *retry_after)
        }
        LlmError::Permanent { code, message } => {
            let status = match code {
                ErrorCode::ModelBadRequest | ErrorCode::ModelContextTooLong => StatusCode::BAD_REQUEST,
                ErrorCode::ModelUnauthorized => StatusCode::UNAUTHORIZED,
                ErrorCode::ModelForbidden => StatusCode::FORBIDDEN,
                ErrorCode::ModelNotFound => StatusCode::NOT_FOUND,
                ErrorCode::ModelRequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
                _ => StatusCode::BAD_GATEWAY,
            };
            error_response(status, message, None)
        }
    }
}
