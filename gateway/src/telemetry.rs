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

/// Times every connection slot was taken (`--max-connections`): new connections waited.
pub const CONNECTIONS_AT_LIMIT: &str = "chatfleet_gateway_connections_at_limit_total";
/// Connections the listener failed to accept (out of files, reset before accepted).
pub const ACCEPT_ERRORS: &str = "chatfleet_gateway_accept_errors_total";

pub fn connections_at_limit(limit: usize) {
    tracing::warn!(event = "connections_at_limit", limit, "every connection slot is taken; new connections wait");
    counter!(CONNECTIONS_AT_LIMIT).increment(1);
}

pub fn accept_failed(error: &std::io::Error) {
    tracing::warn!(event = "accept_failed", error = %error, "could not accept a connection");
    counter!(ACCEPT_ERRORS).increment(1);
}

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
