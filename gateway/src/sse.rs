//! Reply events as Server-Sent Events.

use axum::response::sse::Event;
use schemas::ReplyEvent;

/// The SSE form of a reply event: `event: <type>`, `id: <event id>`, one `data:` line.
pub(crate) fn to_sse(event: &ReplyEvent) -> Event {
    Event::default().event(event.kind.name()).id(event.event_id.to_string()).data(event.client_payload_json())
}
