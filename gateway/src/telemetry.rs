//! The gateway's metrics, named in one place.

use metrics::{counter, gauge, histogram};

/// Requests that failed, by error code.
pub const REQUEST_ERRORS: &str = "chatfleet_gateway_request_errors_total";
/// Messages accepted onto the bus (`duplicate` = "true" for repeated idempotency keys).
pub const MESSAGES_ACCEPTED: &str = "chatfleet_gateway_messages_accepted_total";
/// Seconds the bus took to confirm an enqueued message.
pub const ENQUEUE_SECONDS: &str = "chatfleet_gateway_enqueue_seconds";
/// Reply streams open now.
pub const OPEN_STREAMS: &str = "chatfleet_gateway_open_streams";
/// Sessions created.
pub const SESSIONS_CREATED: &str = "chatfleet_gateway_sessions_created_total";
/// Streamed replies whose terminal event never arrived and was read from the store instead.
pub const TERMINAL_EVENTS_RECOVERED: &str = "chatfleet_gateway_terminal_events_recovered_total";

pub fn request_failed(code: &schemas::ErrorCode) {
    counter!(REQUEST_ERRORS, "code" => code.known_name().unwrap_or("other")).increment(1);
}

pub fn message_accepted(duplicate: bool, seconds: f64) {
    counter!(MESSAGES_ACCEPTED, "duplicate" => if duplicate { "true" } else { "false" }).increment(1);
    histogram!(ENQUEUE_SECONDS).record(seconds);
}

pub fn session_created() {
    counter!(SESSIONS_CREATED).increment(1);
}

pub fn terminal_event_recovered() {
    counter!(TERMINAL_EVENTS_RECOVERED).increment(1);
}

/// Counts an open stream for as long as the guard lives.
pub struct StreamGuard(());

impl StreamGuard {
    pub fn open() -> Self {
        gauge!(OPEN_STREAMS).increment(1.0);
        Self(())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        gauge!(OPEN_STREAMS).decrement(1.0);
    }
}

/// Event streams resumed from a `Last-Event-ID`.
pub const STREAMS_RESUMED: &str = "chatfleet_gateway_streams_resumed_total";
/// Reply events sent again to resuming clients (the ones they had missed).
pub const EVENTS_REPLAYED: &str = "chatfleet_gateway_events_replayed_total";
/// Resumes refused with `410 cursor_expired`.
pub const CURSORS_EXPIRED: &str = "chatfleet_gateway_cursors_expired_total";

pub fn stream_resumed(replayed: usize) {
    counter!(STREAMS_RESUMED).increment(1);
    counter!(EVENTS_REPLAYED).increment(replayed as u64);
}

pub fn cursor_expired() {
    counter!(CURSORS_EXPIRED).increment(1);
}

/// Cancel requests passed on to the workers.
pub const CANCELS_REQUESTED: &str = "chatfleet_gateway_cancels_requested_total";

pub fn cancel_requested() {
    counter!(CANCELS_REQUESTED).increment(1);
}
