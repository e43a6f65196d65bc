//! The Vercel AI SDK's UI message stream (`useChat` with `DefaultChatTransport`):
//! `POST /v1/ai-sdk/chat` sends the last user message of the body to the session named by its
//! `id` and streams the reply as UI message chunks; `GET /v1/ai-sdk/chat/{session_id}/stream`
//! replays the reply in progress from its start and follows it (`resumeStream()`), or answers
//! `204` when none is in progress.
//!
//! Only this module knows the AI SDK's wire format; underneath it is the same reply as the
//! `Accept: text/event-stream` post and the session's event stream. Mapping: a reply's deltas
//! become one text part (`text-start`, `text-delta`..., `text-end`) inside `start` ... `finish`
//! (finish reasons `stop`, `length`, `content-filter`, `interrupted`; `cancelled` and anything
//! else become `other`, with chatfleet's own reason in the message metadata); an `error` event
//! becomes an `error` chunk; the stream ends with `data: [DONE]`. A `reset` (the reply restarts)
//! cannot take text back in this format: the text so far ends as its own part and the restarted
//! reply follows as a new part. A replay for `resumeStream()` starts after the reply's last
//! reset, so it holds only the current attempt.

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use schemas::{ClientMessageId, FinishReason, MessageId, ReplyEvent, ReplyEventKind, SessionId};
use serde::Deserialize;
use serde_json::{Value, json};
use store::Role;

use super::messages::{TokenQuery, open_session, read_json, send_and_follow, user_message};
use crate::extract::Path;
use crate::quotas::StreamSlot;
use crate::{AppState, error::ApiError, telemetry};

/// Largest accepted body: `useChat` sends the whole conversation every time.
const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// What `DefaultChatTransport` posts (fields this endpoint does not use are ignored).
#[derive(Debug, Deserialize)]
struct ChatRequest {
    /// The chat id, which must be the session id.
    id: String,
    messages: Vec<UiMessage>,
    #[serde(default)]
    trigger: Option<String>,
}

#[derive(Debug, Deserialize)]
struct UiMessage {
    #[serde(default)]
    id: Option<String>,
    role: String,
    #[serde(default)]
    parts: Vec<Value>,
}

impl UiMessage {
    /// The text of its text parts, joined.
    fn text(&self) -> String {
        self.parts.iter().filter(|p| p["type"] == "text").filter_map(|p| p["text"].as_str()).collect()
    }
}

#[tracing::instrument(name = "ai_sdk_chat", skip_all, fields(session_id, message_id))]
pub(crate) async fn chat(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let request: ChatRequest = read_json(&state, body, MAX_BODY_BYTES, false)
        .await?
        .ok_or_else(|| ApiError::Invalid("the body must be what DefaultChatTransport sends".into()))?;
    // The chat id names the session: one that is no session id names nothing.
    let session = SessionId::parse(request.id.as_str())
        .map_err(|e| ApiError::NotFound(format!("the chat id names no session: {e}")))?;
    tracing::Span::current().record("session_id", session.as_str());
    let record = open_session(&state, &session, &headers, &TokenQuery { access_token: None }).await?;
    if let Some(trigger) = request.trigger.as_deref().filter(|t| *t != "submit-message") {
        return Err(ApiError::Invalid(format!(
            "trigger {trigger:?} is not supported: chatfleet keeps the history, so only new messages (submit-message) are sent"
        )));
    }
    // The server holds the history; of the body only the newest user message counts.
    let last = request
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .ok_or_else(|| ApiError::Invalid("messages holds no user message".into()))?;
    // The UI message id is the client's idempotency key: a resent request is answered once.
    let key = last.id.clone().and_then(|id| ClientMessageId::parse(id).ok());
    let message = user_message(&record, last.text(), key.as_ref())?;
    tracing::Span::current().record("message_id", tracing::field::display(&message.message_id));
    state.quotas.admit_message(&record).await?;
    let slot = state.quotas.open_stream(&record).await?;
    let reply = send_and_follow(&state, &message, key.is_some()).await?;
    Ok(ui_response(&state, slot, ui_chunks(reply)))
}

#[tracing::instrument(name = "ai_sdk_resume", skip_all, fields(session_id = %session_id))]
pub(crate) async fn resume(
    State(state): State<AppState>,
    Path(session_id): Path<SessionId>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let record = open_session(&state, &session_id, &headers, &TokenQuery { access_token: None }).await?;
    let session = record.id.clone();
    let bus::Resumed { retained, live } = state.bus.resume_events(&session).await?;
    let Some(message) = in_progress(&state, &session, &retained).await? else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let replay = current_attempt(&retained, &message);
    let cursor = replay.last().map(|e| e.event_id).unwrap_or_else(|| schemas::EventId::new(0, 0, 0));
    let wanted = message.clone();
    let live = super::resume::after(cursor, live).filter(move |e| futures::future::ready(e.message_id == wanted));
    let reply = through_terminal(futures::stream::iter(replay).chain(live).boxed());
    telemetry::stream_resumed(0);
    let slot = state.quotas.open_stream(&record).await?;
    Ok(ui_response(&state, slot, ui_chunks(reply)))
}

/// The events up to and including the first terminal one; the stream ends right after it,
/// without waiting for another event.
fn through_terminal(events: futures::stream::BoxStream<'static, ReplyEvent>) -> impl Stream<Item = ReplyEvent> + Send {
    futures::stream::unfold((events, false), |(mut events, ended)| async move {
        if ended {
            return None;
        }
        let event = events.next().await?;
        let ended = event.kind.is_terminal();
        Some((event, (events, ended)))
    })
}

/// The message whose reply is in progress: the newest retained event's, unless that reply
/// has ended; with nothing retained, the newest message of the session if it has no outcome
/// yet (it is waiting for a worker).
async fn in_progress(
    state: &AppState,
    session: &SessionId,
    retained: &[ReplyEvent],
) -> Result<Option<MessageId>, ApiError> {
    if let Some(newest) = retained.iter().max_by_key(|e| e.event_id) {
        let ended = retained.iter().any(|e| e.message_id == newest.message_id && e.kind.is_terminal());
        return Ok((!ended).then(|| newest.message_id.clone()));
    }
    let newest = state.store.recent(session, 1).await?;
    Ok(newest
        .into_iter()
        .find(|m| m.role == Role::User && m.failure.is_none())
        .and_then(|m| MessageId::parse(m.id).ok()))
}

/// The retained events of `message`'s reply since its last `reset`, in id order.
fn current_attempt(retained: &[ReplyEvent], message: &MessageId) -> Vec<ReplyEvent> {
    let mut events: Vec<ReplyEvent> = retained.iter().filter(|e| &e.message_id == message).cloned().collect();
    events.sort_by_key(|e| e.event_id);
    events.dedup_by_key(|e| e.event_id);
    match events.iter().rposition(|e| matches!(e.kind, ReplyEventKind::Reset { .. })) {
        Some(reset) => events.split_off(reset + 1),
        None => events,
    }
}

/// A reply's events as UI message chunks, ending with `[DONE]` after the terminal event.
fn ui_chunks(events: impl Stream<Item = ReplyEvent> + Send + 'static) -> impl Stream<Item = String> + Send + 'static {
    let mut mapper = UiMapper::default();
    events
        .flat_map(move |event| futures::stream::iter(mapper.map(&event)))
        .chain(futures::stream::iter(["[DONE]".to_owned()]))
}

/// Turns reply events into UI message chunks (JSON text), keeping which parts are open.
#[derive(Default)]
struct UiMapper {
    started: bool,
    /// The open text part's id, if one is open.
    open_part: Option<String>,
    /// Text parts opened so far.
    parts: u32,
}

impl UiMapper {
    fn map(&mut self, event: &ReplyEvent) -> Vec<String> {
        let mut chunks = Vec::new();
        if !self.started {
            self.started = true;
            let reply_id = schemas::ReplyId::for_message(&event.message_id);
            chunks.push(json!({"type": "start", "messageId": reply_id.as_str()}));
        }
        match &event.kind {
            ReplyEventKind::Delta { text, .. } => {
                let id = self.open(&mut chunks);
                chunks.push(json!({"type": "text-delta", "id": id, "delta": text}));
            }
            ReplyEventKind::Reset { .. } => self.close(&mut chunks),
            ReplyEventKind::Done { text, finish_reason, .. } => {
                if self.parts == 0 && !text.is_empty() {
                    // The reply's deltas were never seen here (it was answered before): its
                    // whole text as one part.
                    let id = self.open(&mut chunks);
                    chunks.push(json!({"type": "text-delta", "id": id, "delta": text}));
                }
                self.close(&mut chunks);
                chunks.push(json!({
                    "type": "finish",
                    "finishReason": ui_finish_reason(finish_reason),
                    "messageMetadata": {
                        "session_id": event.session_id,
                        "message_id": event.message_id,
                        "finish_reason": finish_reason,
                    },
                }));
            }
            ReplyEventKind::Error { code, message } => {
                self.close(&mut chunks);
                chunks.push(json!({"type": "error", "errorText": format!("{message} ({})", code.as_str())}));
            }
        }
        chunks.into_iter().map(|c| c.to_string()).collect()
    }

    fn open(&mut self, chunks: &mut Vec<Value>) -> String {
        if let Some(id) = &self.open_part {
            return id.clone();
        }
        let id = format!("text-{}", self.parts);
        self.parts += 1;
        chunks.push(json!({"type": "text-start", "id": id}));
        self.open_part = Some(id.clone());
        id
    }

    fn close(&mut self, chunks: &mut Vec<Value>) {
        if let Some(id) = self.open_part.take() {
            chunks.push(json!({"type": "text-end", "id": id}));
        }
    }
}

/// The AI SDK's finish reason for chatfleet's.
fn ui_finish_reason(reason: &FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::ContentFilter => "content-filter",
        other if other.is_interrupted() => "interrupted",
        _ => "other",
    }
}

fn ui_response(state: &AppState, slot: StreamSlot, chunks: impl Stream<Item = String> + Send + 'static) -> Response {
    let events = chunks.map(|data| Ok::<_, Infallible>(Event::default().data(data)));
    let events = events.take_until(state.closing.clone().cancelled_owned());
    let guard = telemetry::StreamGuard::open();
    let events = events.map(move |e| {
        let _ = (&guard, &slot);
        e
    });
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(state.config.keep_alive).text("keep-alive"))
        .into_response();
    let headers = response.headers_mut();
    headers.insert("x-vercel-ai-ui-message-stream", HeaderValue::from_static("v1"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::{EventId, ReplyId};

    fn event(seq: u32, kind: ReplyEventKind) -> ReplyEvent {
        ReplyEvent {
            v: schemas::ENVELOPE_VERSION,
            event_id: EventId::new(1, 1, seq),
            session_id: SessionId::parse("s1").unwrap(),
            message_id: MessageId::parse("m1").unwrap(),
            kind,
        }
    }

    fn delta(seq: u32, text: &str) -> ReplyEvent {
        event(seq, ReplyEventKind::Delta { index: seq, text: text.into() })
    }

    fn types(chunks: &[String]) -> Vec<String> {
        chunks
            .iter()
            .map(|c| serde_json::from_str::<Value>(c).map_or(c.clone(), |v| v["type"].as_str().unwrap().to_owned()))
            .collect()
    }

    #[tokio::test]
    async fn a_reply_becomes_one_text_part_between_start_and_finish_then_done() {
        let done = ReplyEventKind::Done {
            reply_id: ReplyId::parse("r_m1").unwrap(),
            text: "Hi there".into(),
            finish_reason: FinishReason::Stop,
            usage: None,
        };
        let events = vec![delta(0, "Hi"), delta(1, " there"), event(2, done)];

        let chunks: Vec<String> = ui_chunks(futures::stream::iter(events)).collect().await;

        assert_eq!(types(&chunks), ["start", "text-start", "text-delta", "text-delta", "text-end", "finish", "[DONE]"]);
        let finish: Value = serde_json::from_str(&chunks[5]).unwrap();
        assert_eq!(finish["finishReason"], "stop");
    }

    #[tokio::test]
    async fn a_cancelled_reply_finishes_as_other_with_chatfleets_reason_in_the_metadata() {
        let done = ReplyEventKind::Done {
            reply_id: ReplyId::parse("r_m1").unwrap(),
            text: "Hi".into(),
            finish_reason: FinishReason::cancelled(),
            usage: None,
        };

        let chunks: Vec<String> =
            ui_chunks(futures::stream::iter(vec![delta(0, "Hi"), event(1, done)])).collect().await;

        let finish: Value = serde_json::from_str(&chunks[4]).unwrap();
        assert_eq!(
            (finish["finishReason"].as_str(), finish["messageMetadata"]["finish_reason"].as_str()),
            (Some("other"), Some("cancelled"))
        );
    }

    #[test]
    fn a_replay_holds_only_the_attempt_after_the_last_reset() {
        let reset =
            ReplyEvent { event_id: EventId::new(1, 2, 0), ..event(0, ReplyEventKind::Reset { reason: "r".into() }) };
        let restarted = ReplyEvent { event_id: EventId::new(1, 2, 1), ..delta(0, "again") };
        let retained = vec![delta(0, "first"), delta(1, " try"), reset, restarted.clone()];

        assert_eq!(current_attempt(&retained, &MessageId::parse("m1").unwrap()), [restarted]);
    }
}
