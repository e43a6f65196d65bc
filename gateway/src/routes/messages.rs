//! Messages and reply streams: `POST` and `GET /v1/sessions/{id}/messages` and
//! `GET /v1/sessions/{id}/events`.

use std::convert::Infallible;
use std::time::Instant;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use schemas::{ClientMessageId, MessageId, ReplyEvent, SessionId, UserMessage};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use store::Role;

use crate::{AppState, auth, error::ApiError, sse::to_sse, telemetry};

/// Longest accepted message text, in bytes.
pub(crate) const MAX_TEXT_BYTES: usize = 16 * 1024;
/// Largest accepted request body: the longest text, even fully escaped, fits.
const MAX_BODY_BYTES: usize = 128 * 1024;

#[derive(Debug, Deserialize)]
pub(crate) struct TokenQuery {
    pub(crate) access_token: Option<String>,
}

#[derive(Debug, Deserialize)]
struct NewMessage {
    text: Option<String>,
    client_message_id: Option<ClientMessageId>,
}

/// Reads a JSON body of at most `limit` bytes. An empty body is `None` when `optional`.
pub(crate) async fn read_json<T: DeserializeOwned>(
    body: Body,
    limit: usize,
    optional: bool,
) -> Result<Option<T>, ApiError> {
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::PayloadTooLarge(format!("the request body is larger than {limit} bytes")))?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return if optional {
            Ok(None)
        } else {
            Err(ApiError::InvalidJson("the request body is empty; expected a JSON object".into()))
        };
    }
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::InvalidJson(format!("the request body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::InvalidJson("the request body must be a JSON object".into()));
    }
    serde_json::from_value(value).map(Some).map_err(|e| ApiError::Invalid(format!("invalid request: {e}")))
}

/// Checks the token and that the session exists.
async fn open_session(
    state: &AppState,
    session_id: &str,
    headers: &HeaderMap,
    query: &TokenQuery,
) -> Result<SessionId, ApiError> {
    let session =
        auth::authorize_session(&state.tokens, auth::bearer(headers, query.access_token.as_deref()), session_id)?;
    if state.store.session(&session).await?.is_none() {
        return Err(ApiError::SessionNotFound);
    }
    Ok(session)
}

fn wants_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.split(',').any(|part| part.trim().starts_with("text/event-stream")))
}

#[tracing::instrument(name = "post_message", skip_all, fields(session_id = %session_id, message_id))]
pub(crate) async fn post(
    State(state): State<AppState>,
    Path(session_id): Path<String>,
    Query(query): Query<TokenQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let session = open_session(&state, &session_id, &headers, &query).await?;
    let request: NewMessage =
        read_json(body, MAX_BODY_BYTES, false).await?.unwrap_or(NewMessage { text: None, client_message_id: None });
    let text = request.text.ok_or_else(|| ApiError::Invalid("text is required".into()))?;
    if text.trim().is_empty() {
        return Err(ApiError::Invalid("text must not be empty".into()));
    }
    if text.len() > MAX_TEXT_BYTES {
        return Err(ApiError::PayloadTooLarge(format!(
            "text is {} bytes; at most {MAX_TEXT_BYTES} are allowed",
            text.len()
        )));
    }
    let message_id = match &request.client_message_id {
        Some(key) => MessageId::for_client_key(&session, key),
        None => MessageId::generate(),
    };
    tracing::Span::current().record("message_id", tracing::field::display(&message_id));
    let message = UserMessage {
        v: schemas::ENVELOPE_VERSION,
        session_id: session.clone(),
        message_id: message_id.clone(),
        text,
        accepted_at: time::OffsetDateTime::now_utc(),
    };

    if !wants_event_stream(&headers) {
        enqueue(&state, &message).await?;
        let body = serde_json::json!({"session_id": session, "message_id": message_id});
        return Ok((StatusCode::ACCEPTED, Json(body)).into_response());
    }

    // Listen before publishing, so that no event of the reply can be missed however fast a
    // worker answers.
    let events = state.bus.subscribe_events(&session).await?;
    if request.client_message_id.is_some()
        && let Some(outcome) = state.store.outcome(&session, &message_id).await?
    {
        // A repeat of a message that was already answered: replay its outcome.
        tracing::info!(event = "replayed_outcome", "message answered before; replaying its outcome");
        let event = outcome.terminal_event(&session, &message_id);
        let stream = futures::stream::once(async move { Ok::<_, Infallible>(to_sse(&event)) });
        return Ok(sse_response(&state, stream));
    }
    enqueue(&state, &message).await?;
    let reply = reply_stream(events, message_id);
    Ok(sse_response(&state, reply.map(|e| Ok::<_, Infallible>(to_sse(&e)))))
}

async fn enqueue(state: &AppState, message: &UserMessage) -> Result<(), ApiError> {
    let started = Instant::now();
    let enqueued = state.bus.enqueue(message).await?;
    telemetry::message_accepted(enqueued.duplicate, started.elapsed().as_secs_f64());
    tracing::info!(event = "message_accepted", duplicate = enqueued.duplicate, "message enqueued");
    Ok(())
}

/// The events of one message's reply, ending after its `done` or `error`.
fn reply_stream(events: bus::EventStream, message_id: MessageId) -> impl Stream<Item = ReplyEvent> + Send {
    let mine = events.filter(move |e| futures::future::ready(e.message_id == message_id));
    // End right after the terminal event rather than when the next event arrives.
    futures::stream::unfold((mine, false), |(mut events, finished)| async move {
        if finished {
            return None;
        }
        let event = events.next().await?;
        let finished = event.kind.is_terminal();
        Some((event, (events, finished)))
    })
}

fn sse_response(state: &AppState, events: impl Stream<Item = Result<Event, Infallible>> + Send + 'static) -> Response {
    let guard = telemetry::StreamGuard::open();
    let events = events
        .map(move |e| {
            let _ = &guard;
            e
        })
        .take_until(state.closing.clone().cancelled_owned());
    Sse::new(events).keep_alive(KeepAlive::new().interval(state.config.keep_alive).text("keep-alive")).into_response()
}

#[tracing::instrument(name = "session_events", skip_all, fields(session_id = %session_id))]
pub(crate) async fn events(
    State(state): State<AppState>,
    Path(session_id): Path<String>,
    Query(query): Query<TokenQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let session = open_session(&state, &session_id, &headers, &query).await?;
    let events = state.bus.subscribe_events(&session).await?;
    Ok(sse_response(&state, events.map(|e| Ok::<_, Infallible>(to_sse(&e)))))
}

#[tracing::instrument(name = "history", skip_all, fields(session_id = %session_id))]
pub(crate) async fn history(
    State(state): State<AppState>,
    Path(session_id): Path<String>,
    Query(query): Query<TokenQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let session = open_session(&state, &session_id, &headers, &query).await?;
    let messages = state.store.history(&session).await?;
    let messages: Vec<_> = messages
        .into_iter()
        .map(|m| {
            let mut item = serde_json::json!({
                "message_id": m.id,
                "role": match m.role { Role::User => "user", Role::Assistant => "assistant" },
                "text": m.text,
                "created_at": m.created_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
            });
            if let Some(reply_to) = m.reply_to {
                item["reply_to"] = reply_to.as_str().into();
            }
            if let Some(failure) = m.failure {
                item["error"] = serde_json::json!({"code": failure.code, "message": failure.message});
            }
            item
        })
        .collect();
    Ok(Json(serde_json::json!({"session_id": session, "messages": messages})).into_response())
}
