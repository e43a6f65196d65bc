//! Resuming a session's event stream from a cursor (`Last-Event-ID`): the events the client
//! missed, from the bus's retained reply events, then the live ones, each event once.
//!
//! An event id is a cursor: ids increase within a session (turn, generation start, sequence),
//! so "every event after this id" is well defined whichever gateway or worker produced them.
//! A cursor is served when nothing after it can have expired from the bus's retention: either
//! some retained event is not newer than it (retention drops the oldest first, so everything
//! newer is still there), or the events since it are known to be complete (the cursor ends a
//! turn, and what follows is the next turn's first event, or nothing at all according to the
//! store). Otherwise it is `410 cursor_expired`, and the client reads the history.

use axum::http::HeaderMap;
use futures::{Stream, StreamExt};
use schemas::{EventId, ReplyEvent, SessionId};
use store::Role;

use crate::{AppState, error::ApiError, telemetry};

/// The header browsers' `EventSource` sends when it reconnects.
const LAST_EVENT_ID: &str = "last-event-id";

/// The cursor of a request: the `Last-Event-ID` header, else the `last_event_id` query
/// parameter. An empty value means none (what `EventSource` sends before it saw an id).
pub(crate) fn cursor(headers: &HeaderMap, query: Option<&str>) -> Result<Option<EventId>, ApiError> {
    let header = headers.get(LAST_EVENT_ID).map(|v| v.to_str().unwrap_or("?"));
    match header.or(query).map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(value) => value
            .parse()
            .map(Some)
            .map_err(|_| ApiError::Invalid(format!("Last-Event-ID {value:?} is not an event id of this API"))),
    }
}

/// Every event of the session after `cursor`, then the live ones; each id at most once, in
/// increasing order.
pub(crate) async fn events_after(
    state: &AppState,
    session: &SessionId,
    cursor: EventId,
) -> Result<impl Stream<Item = ReplyEvent> + Send + 'static, ApiError> {
    let bus::Resumed { retained, live } = state.bus.resume_events(session).await?;
    if !retained.iter().any(|e| e.event_id <= cursor) && !complete_since(state, session, cursor, &retained).await? {
        tracing::info!(event = "cursor_expired", cursor = %cursor, "a resume asked for events past the retention");
        telemetry::cursor_expired();
        return Err(ApiError::CursorExpired);
    }
    let missed: Vec<ReplyEvent> = retained.into_iter().filter(|e| e.event_id > cursor).collect();
    tracing::info!(event = "stream_resumed", cursor = %cursor, replayed = missed.len(), "resuming an event stream");
    telemetry::stream_resumed(missed.len());
    Ok(after(cursor, futures::stream::iter(missed).chain(live)))
}

/// The events of `events` with ids above `cursor`, each id once: a repeated `done` keeps its
/// id, an event read both from the retention and live comes twice, and a worker that lost its
/// partition may still publish a stale event below one its successor sent.
pub(crate) fn after(
    cursor: EventId,
    events: impl Stream<Item = ReplyEvent> + Send + 'static,
) -> impl Stream<Item = ReplyEvent> + Send + 'static {
    let mut last = cursor;
    events.filter(move |event| {
        let newer = event.event_id > last;
        if newer {
            last = event.event_id;
        }
        futures::future::ready(newer)
    })
}

/// Whether the client holding `cursor`, older than every retained event, can have missed
/// nothing: its cursor ends a turn, and the session's next event (the oldest retained one, or
/// none yet) is the first of the next turn.
async fn complete_since(
    state: &AppState,
    session: &SessionId,
    cursor: EventId,
    retained: &[ReplyEvent],
) -> Result<bool, ApiError> {
    if cursor != EventId::terminal(cursor.turn) {
        return Ok(false);
    }
    if let Some(oldest) = retained.first() {
        return Ok(oldest.event_id == EventId::new(cursor.turn + 1, 1, 0));
    }
    // Nothing retained: the store says whether any turn came after the cursor's. A message
    // still waiting for its first event has published nothing to miss.
    let newest = state.store.recent(session, 1).await?;
    Ok(match newest.last() {
        None => true,
        Some(m) => m.turn <= cursor.turn || (m.turn == cursor.turn + 1 && m.role == Role::User && m.failure.is_none()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::{MessageId, ReplyEventKind};

    fn event(turn: u64, start: u32, seq: u32) -> ReplyEvent {
        ReplyEvent {
            v: schemas::ENVELOPE_VERSION,
            event_id: EventId::new(turn, start, seq),
            session_id: SessionId::parse("s1").unwrap(),
            message_id: MessageId::parse("m1").unwrap(),
            kind: ReplyEventKind::Delta { index: seq, text: "x".into() },
        }
    }

    #[tokio::test]
    async fn after_a_cursor_each_id_passes_once_and_stale_ones_never() {
        let events =
            vec![event(1, 1, 0), event(1, 1, 1), event(1, 1, 2), event(1, 1, 2), event(1, 2, 0), event(1, 1, 3)];

        let passed: Vec<EventId> =
            after(EventId::new(1, 1, 0), futures::stream::iter(events)).map(|e| e.event_id).collect().await;

        assert_eq!(passed, [EventId::new(1, 1, 1), EventId::new(1, 1, 2), EventId::new(1, 2, 0)]);
    }

    #[test]
    fn a_cursor_comes_from_the_header_before_the_query_and_must_be_an_event_id() {
        let mut headers = HeaderMap::new();
        headers.insert(LAST_EVENT_ID, "0000000002-001-000004".parse().unwrap());

        assert_eq!(cursor(&headers, Some("0000000001-001-000000")).unwrap(), Some(EventId::new(2, 1, 4)));
        assert_eq!(cursor(&HeaderMap::new(), Some("0000000001-001-000000")).unwrap(), Some(EventId::new(1, 1, 0)));
        assert_eq!(cursor(&HeaderMap::new(), Some("")).unwrap(), None);
        assert!(cursor(&HeaderMap::new(), Some("seven")).is_err());
    }
}
