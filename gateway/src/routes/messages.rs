//! Messages and reply streams: `POST` and `GET /v1/sessions/{id}/messages` and
//! `GET /v1/sessions/{id}/events` (resumed from a `Last-Event-ID` by `resume.rs`).

use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use schemas::{ClientMessageId, DoubleTexting, MessageId, ReplyEvent, SessionId, UserMessage};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use store::{ReplyClaim, Role, SessionRecord};

use crate::extract::{Path, Query};
use crate::quotas::StreamSlot;
use crate::{AppState, auth, body, error::ApiError, sse::to_sse, telemetry};

/// Longest accepted message text, in bytes.
pub(crate) const MAX_TEXT_BYTES: usize = 16 * 1024;
/// Largest accepted request body: the longest text, even fully escaped, fits.
const MAX_BODY_BYTES: usize = 128 * 1024;
/// How long a session's reply-in-progress marker may name a message that no worker has taken up
/// before a new message may take it over (`double_texting: reject`). The marker is set before
/// the message is enqueued, so a gateway that crashed in between, or a store write reported
/// failed that had in fact been applied, leaves a marker whose message never arrives; without
/// this the session would refuse every message from then on. Workers take a message up within
/// milliseconds unless the fleet is down or far behind, and then letting one more message
/// through costs only the order of answering that enqueue would have had anyway.
const ABANDONED_MARKER_AFTER: Duration = Duration::from_secs(120);

#[derive(Debug, Deserialize)]
pub(crate) struct TokenQuery {
    pub(crate) access_token: Option<String>,
}

#[derive(Debug, Deserialize)]
struct NewMessage {
    text: Option<String>,
    client_message_id: Option<ClientMessageId>,
}

/// Reads a JSON body of at most `limit` bytes, within the body read timeout. An empty body is
/// `None` when `optional`.
pub(crate) async fn read_json<T: DeserializeOwned>(
    state: &AppState,
    request_body: Body,
    limit: usize,
    optional: bool,
) -> Result<Option<T>, ApiError> {
    let bytes = body::read(request_body, limit, state.config.http.body_read_timeout).await?;
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

/// Checks the token and that the session exists; returns the session as stored. The session
/// cache answers when it can (see `session_cache` for how stale that may be); otherwise the
/// store does, and a session found there is cached. An absence is never cached, so a session
/// just created through another replica is usable at once.
pub(crate) async fn open_session(
    state: &AppState,
    session_id: &SessionId,
    headers: &HeaderMap,
    query: &TokenQuery,
) -> Result<SessionRecord, ApiError> {
    let session = auth::authorize_session(
        &state.tokens,
        auth::bearer(headers, query.access_token.as_deref()),
        session_id.as_str(),
    )?;
    let record = match state.sessions.get(&session) {
        Some(record) => record,
        None => {
            let record = state.store.session(&session).await?.ok_or(ApiError::SessionNotFound)?;
            state.sessions.insert(record.clone());
            record
        }
    };
    // A session whose API key was revoked is closed to its token too.
    state.quotas.check_session(&record)?;
    Ok(record)
}

fn wants_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.split(',').any(|part| part.trim().starts_with("text/event-stream")))
}

#[tracing::instrument(name = "post_message", skip_all, fields(otel.kind = "server", session_id = %session_id, message_id, trace_id = tracing::field::Empty))]
pub(crate) async fn post(
    State(state): State<AppState>,
    Path(session_id): Path<SessionId>,
    Query(query): Query<TokenQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    continue_client_trace(&headers);
    let record = open_session(&state, &session_id, &headers, &query).await?;
    let session = record.id.clone();
    let request: NewMessage = read_json(&state, body, MAX_BODY_BYTES, false)
        .await?
        .unwrap_or(NewMessage { text: None, client_message_id: None });
    let text = request.text.ok_or_else(|| ApiError::Invalid("text is required".into()))?;
    let message = user_message(&record, text, request.client_message_id.as_ref())?;
    let message_id = message.message_id.clone();
    tracing::Span::current().record("message_id", tracing::field::display(&message_id));
    let repeatable = request.client_message_id.is_some();
    state.quotas.admit_message(&record).await?;

    if !wants_event_stream(&headers) {
        let admission = admit(&state, &message, repeatable).await?;
        enqueue_admitted(&state, &message, admission).await?;
        let body = serde_json::json!({"session_id": session, "message_id": message_id});
        return Ok((StatusCode::ACCEPTED, Json(body)).into_response());
    }

    let slot = state.quotas.open_stream(&record).await?;
    let reply = send_and_follow(&state, &message, repeatable).await?;
    Ok(sse_response(&state, slot, reply.map(|e| Ok::<_, Infallible>(to_sse(&e)))))
}

/// The envelope of a new message of `record`'s session, its id from the client's idempotency
/// key if it gave one; refuses an empty or too long text.
pub(crate) fn user_message(
    record: &SessionRecord,
    text: String,
    client_message_id: Option<&ClientMessageId>,
) -> Result<UserMessage, ApiError> {
    if text.trim().is_empty() {
        return Err(ApiError::Invalid("text must not be empty".into()));
    }
    if text.len() > MAX_TEXT_BYTES {
        return Err(ApiError::PayloadTooLarge(format!(
            "text is {} bytes; at most {MAX_TEXT_BYTES} are allowed",
            text.len()
        )));
    }
    let message_id = match client_message_id {
        Some(key) => MessageId::for_client_key(&record.id, key),
        None => MessageId::generate(),
    };
    Ok(UserMessage {
        v: schemas::ENVELOPE_VERSION,
        session_id: record.id.clone(),
        message_id,
        text,
        accepted_at: time::OffsetDateTime::now_utc(),
        double_texting: Some(record.double_texting),
        channel: None,
        cancel: None,
    })
}

/// Sends `message` and returns its reply's events, ending after its `done` or `error`.
/// `repeatable`: its id comes from a client's idempotency key, so it may have been answered
/// before, and then the stored outcome is the whole reply.
pub(crate) async fn send_and_follow(
    state: &AppState,
    message: &UserMessage,
    repeatable: bool,
) -> Result<futures::stream::BoxStream<'static, ReplyEvent>, ApiError> {
    let (session, message_id) = (&message.session_id, &message.message_id);
    // Listen before publishing, so that no event of the reply can be missed however fast a
    // worker answers.
    let events = state.bus.subscribe_events(session).await?;
    if repeatable && let Some(outcome) = state.store.outcome(session, message_id).await? {
        // A repeat of a message that was already answered: replay its outcome.
        tracing::info!(event = "replayed_outcome", "message answered before; replaying its outcome");
        return Ok(futures::stream::iter([outcome.terminal_event(session, message_id)]).boxed());
    }
    let admission = admit(state, message, repeatable).await?;
    enqueue_admitted(state, message, admission).await?;
    Ok(reply_stream(state.clone(), session.clone(), events, message_id.clone()).boxed())
}

/// What admitting a message under its session's policy did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    /// Nothing to undo: the policy sets no marker, or the message held it already, or it is a
    /// repeat of a message accepted before.
    Unmarked,
    /// This request made the message the session's reply in progress; undone if the message
    /// cannot be enqueued, or the session would wait for a reply that never comes.
    Marked,
}

/// Lets the message in under its session's double-texting policy. Only `reject` has anything
/// to check: the session's reply-in-progress marker must be free or name this message.
/// `repeatable` says the message id comes from a client's idempotency key, so the message may
/// have been accepted before.
async fn admit(state: &AppState, message: &UserMessage, repeatable: bool) -> Result<Admission, ApiError> {
    if message.policy() != DoubleTexting::Reject {
        return Ok(Admission::Unmarked);
    }
    let (session, message_id) = (&message.session_id, &message.message_id);
    // The second round follows releasing a stale marker; if someone else took it meanwhile,
    // theirs is fresh and this message is refused.
    for _ in 0..2 {
        match state.store.begin_reply(session, message_id).await? {
            ReplyClaim::Taken => return Ok(Admission::Marked),
            ReplyClaim::AlreadyHeld => return Ok(Admission::Unmarked),
            ReplyClaim::NoSession => return Err(ApiError::SessionNotFound),
            ReplyClaim::HeldBy { message: holder, since } => {
                // Idempotency wins over the policy: a repeat of a message that was accepted
                // (a worker recorded it) gets the same answer as before.
                if repeatable && state.store.message(session, message_id.as_str()).await?.is_some() {
                    return Ok(Admission::Unmarked);
                }
                if !marker_is_stale(state, session, &holder, since).await? {
                    tracing::info!(event = "reply_in_progress", holder = %holder, "refused: an earlier message is still being answered");
                    return Err(ApiError::ReplyInProgress);
                }
                tracing::warn!(event = "reply_marker_released", holder = %holder, since = %since, "releasing a stale reply-in-progress marker");
                state.store.end_reply(session, &holder).await?;
            }
        }
    }
    Err(ApiError::ReplyInProgress)
}

/// Whether the marker naming `holder` since `since` no longer stands for a reply in progress:
/// the holder has its outcome (the worker that stored it stopped before clearing the marker),
/// or no worker has taken the holder up for longer than [`ABANDONED_MARKER_AFTER`].
async fn marker_is_stale(
    state: &AppState,
    session: &SessionId,
    holder: &MessageId,
    since: time::OffsetDateTime,
) -> Result<bool, ApiError> {
    if state.store.outcome(session, holder).await?.is_some() {
        return Ok(true);
    }
    let age = time::OffsetDateTime::now_utc() - since;
    if age < ABANDONED_MARKER_AFTER {
        return Ok(false);
    }
    Ok(state.store.message(session, holder.as_str()).await?.is_none())
}

/// Enqueues an admitted message. If that fails, a marker this request set is cleared again, so
/// that the session does not wait for a message the bus may never have had; the client's resend
/// with the same `client_message_id` marks it again.
async fn enqueue_admitted(state: &AppState, message: &UserMessage, admission: Admission) -> Result<(), ApiError> {
    let result = enqueue(state, message).await;
    if result.is_err()
        && admission == Admission::Marked
        && let Err(e) = state.store.end_reply(&message.session_id, &message.message_id).await
    {
        tracing::warn!(event = "reply_marker_not_released", error = %e, "could not clear the reply-in-progress marker");
    }
    result
}

async fn enqueue(state: &AppState, message: &UserMessage) -> Result<(), ApiError> {
    let started = Instant::now();
    let enqueued = state.bus.enqueue(message).await?;
    telemetry::message_accepted(enqueued.duplicate, started.elapsed().as_secs_f64());
    tracing::info!(event = "message_accepted", duplicate = enqueued.duplicate, "message enqueued");
    Ok(())
}

/// The events of one message's reply, ending after its `done` or `error`.
///
/// Reply events travel best-effort (a broker blip may lose one), while the outcome is stored
/// before it is announced. So whenever the reply goes quiet for `reply_check`, the stream asks
/// the store: a stored outcome ends it with the terminal event that was lost (under the same
/// terminal id, so a client that got it after all sees it once); otherwise it waits on.
fn reply_stream(
    state: AppState,
    session: SessionId,
    events: bus::EventStream,
    message_id: MessageId,
) -> impl Stream<Item = ReplyEvent> + Send {
    let wanted = message_id.clone();
    let mine = events.filter(move |e| futures::future::ready(e.message_id == wanted)).boxed();
    // Everything the stream needs travels through it by move: nothing is cloned per event.
    let follow = Follow { state, session, message_id, events: mine, finished: false };
    futures::stream::unfold(follow, |mut follow| async move {
        if follow.finished {
            return None;
        }
        let event = loop {
            match tokio::time::timeout(follow.state.config.reply_check, follow.events.next()).await {
                Ok(event) => break event?,
                Err(_quiet) => {
                    if let Some(event) = stored_outcome(&follow.state, &follow.session, &follow.message_id).await {
                        break event;
                    }
                }
            }
        };
        // End right after the terminal event rather than when the next event arrives.
        follow.finished = event.kind.is_terminal();
        Some((event, follow))
    })
}

/// The state of one [`reply_stream`] between its events.
struct Follow {
    state: AppState,
    session: SessionId,
    message_id: MessageId,
    events: futures::stream::BoxStream<'static, ReplyEvent>,
    finished: bool,
}

/// The terminal event of a message whose outcome is stored, if it is.
async fn stored_outcome(state: &AppState, session: &SessionId, message_id: &MessageId) -> Option<ReplyEvent> {
    match state.store.outcome(session, message_id).await {
        Ok(Some(outcome)) => {
            tracing::warn!(event = "terminal_event_recovered", session_id = %session, message_id = %message_id, "the reply went quiet and its outcome was stored: ending the stream from the store");
            telemetry::terminal_event_recovered();
            Some(outcome.terminal_event(session, message_id))
        }
        Ok(None) => None,
        Err(e) => {
            tracing::debug!(event = "reply_check_failed", error = %e);
            None
        }
    }
}

/// A reply stream as Server-Sent Events, holding `slot` (its place within the open-stream
/// limits) for as long as the client listens.
pub(crate) fn sse_response(
    state: &AppState,
    slot: StreamSlot,
    events: impl Stream<Item = Result<Event, Infallible>> + Send + 'static,
) -> Response {
    let guard = telemetry::StreamGuard::open();
    let events = events
        .map(move |e| {
            let _ = (&guard, &slot);
            e
        })
        .take_until(state.closing.clone().cancelled_owned());
    Sse::new(events).keep_alive(KeepAlive::new().interval(state.config.keep_alive).text("keep-alive")).into_response()
}

/// Starts the request's trace, or continues the client's if it sent a W3C `traceparent`; the
/// trace then runs through the bus to the worker (`bus::trace_context`). Free when tracing is off.
fn continue_client_trace(headers: &HeaderMap) {
    let span = tracing::Span::current();
    let mut trace = bus::trace_context::TraceHeaders::new();
    for name in bus::trace_context::header_names() {
        if let Some(value) = headers.get(name.as_str()).and_then(|v| v.to_str().ok()) {
            trace.insert(name, value.to_owned());
        }
    }
    bus::trace_context::continue_trace(&span, &trace);
    bus::trace_context::record_trace_id(&span);
}

#[derive(Debug, Deserialize)]
pub(crate) struct EventsQuery {
    access_token: Option<String>,
    /// For clients that cannot set the `Last-Event-ID` header.
    last_event_id: Option<String>,
}

#[tracing::instrument(name = "session_events", skip_all, fields(session_id = %session_id))]
pub(crate) async fn events(
    State(state): State<AppState>,
    Path(session_id): Path<SessionId>,
    Query(query): Query<EventsQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let token = TokenQuery { access_token: query.access_token };
    let record = open_session(&state, &session_id, &headers, &token).await?;
    let session = record.id.clone();
    let cursor = super::resume::cursor(&headers, query.last_event_id.as_deref())?;
    let slot = state.quotas.open_stream(&record).await?;
    match cursor {
        None => {
            let events = state.bus.subscribe_events(&session).await?;
            Ok(sse_response(&state, slot, events.map(|e| Ok::<_, Infallible>(to_sse(&e)))))
        }
        Some(cursor) => {
            let events = super::resume::events_after(&state, &session, cursor).await?;
            Ok(sse_response(&state, slot, events.map(|e| Ok::<_, Infallible>(to_sse(&e)))))
        }
    }
}

#[tracing::instrument(name = "history", skip_all, fields(session_id = %session_id))]
pub(crate) async fn history(
    State(state): State<AppState>,
    Path(session_id): Path<SessionId>,
    Query(query): Query<TokenQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let session = open_session(&state, &session_id, &headers, &query).await?.id;
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
