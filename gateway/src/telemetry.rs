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
/// Connections closed because they carried no request and no byte for the idle timeout.
pub const IDLE_CONNECTIONS_CLOSED: &str = "chatfleet_gateway_idle_connections_closed_total";

/// Requests refused by a quota or rate limit, by error code and scope (`key`, `user`, `session`).
pub const LIMITS_EXCEEDED: &str = "chatfleet_gateway_limits_exceeded_total";
/// Times the API keys file was read again after a change (`outcome` = `loaded` or `refused`).
pub const API_KEYS_RELOADS: &str = "chatfleet_gateway_api_keys_reloads_total";

pub fn limit_exceeded(exceeded: &crate::quotas::Exceeded) {
    let code = exceeded.code.known_name().unwrap_or("other");
    tracing::info!(event = "limit_exceeded", code, scope = exceeded.kind, limit = exceeded.limit, "refused by a limit");
    counter!(LIMITS_EXCEEDED, "code" => code, "scope" => exceeded.kind).increment(1);
}

pub fn api_keys_reloaded(keys: usize) {
    tracing::info!(event = "api_keys_reloaded", keys, "the API keys file changed; its keys are in force");
    counter!(API_KEYS_RELOADS, "outcome" => "loaded").increment(1);
}

pub fn api_keys_reload_failed(error: &str) {
    tracing::error!(
        event = "api_keys_reload_failed",
        error,
        "the API keys file was refused; the keys before it stay in force"
    );
    counter!(API_KEYS_RELOADS, "outcome" => "refused").increment(1);
}

pub fn connections_at_limit(limit: usize) {
    tracing::warn!(event = "connections_at_limit", limit, "every connection slot is taken; new connections wait");
    counter!(CONNECTIONS_AT_LIMIT).increment(1);
}

pub fn idle_connection_closed() {
    tracing::debug!(event = "idle_connection_closed", "closed a connection that stayed idle");
    counter!(IDLE_CONNECTIONS_CLOSED).increment(1);
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

/// Channel events received (`channel` = `slack`, `teams`, `webhooks/<name>`), before any check.
pub const CHANNEL_EVENTS: &str = "chatfleet_gateway_channel_events_total";
/// Channel events refused, by `reason` (`missing_signature`, `bad_signature`, `stale_timestamp`,
/// `invalid`, ...).
pub const CHANNEL_REJECTED: &str = "chatfleet_gateway_channel_rejected_total";
/// Channel events that repeated an idempotency key already enqueued (a platform's retry).
pub const CHANNEL_DEDUPLICATED: &str = "chatfleet_gateway_channel_deduplicated_total";
/// Delivery attempts of channel replies, by `result` (`delivered`, `gone`, `failed`).
pub const CHANNEL_DELIVERY_ATTEMPTS: &str = "chatfleet_gateway_channel_delivery_attempts_total";
/// Failed delivery attempts, by `reason` (`http_4xx`, `http_429`, `http_5xx`, `timeout`, `network`, ...).
pub const CHANNEL_DELIVERY_FAILURES: &str = "chatfleet_gateway_channel_delivery_failures_total";
/// Replies delivered (a 2xx from the receiver).
pub const CHANNEL_REPLIES_DELIVERED: &str = "chatfleet_gateway_channel_replies_delivered_total";
/// Replies given up on after their last attempt and kept as undeliverable.
pub const CHANNEL_UNDELIVERABLE: &str = "chatfleet_gateway_channel_undeliverable_total";
/// Seconds from a reply's outcome being handed over by its worker to its delivery.
pub const CHANNEL_DELIVERY_SECONDS: &str = "chatfleet_gateway_channel_delivery_seconds";

pub fn channel_event_received(channel: &str) {
    counter!(CHANNEL_EVENTS, "channel" => channel.to_owned()).increment(1);
}

pub fn channel_event_rejected(channel: &str, reason: &'static str) {
    counter!(CHANNEL_REJECTED, "channel" => channel.to_owned(), "reason" => reason).increment(1);
}

pub fn channel_event_deduplicated(channel: &str) {
    counter!(CHANNEL_DEDUPLICATED, "channel" => channel.to_owned()).increment(1);
}

pub fn channel_delivery_attempted(channel: &str, result: &'static str) {
    counter!(CHANNEL_DELIVERY_ATTEMPTS, "channel" => channel.to_owned(), "result" => result).increment(1);
}

pub fn channel_delivery_failed(channel: &str, reason: &'static str) {
    counter!(CHANNEL_DELIVERY_FAILURES, "channel" => channel.to_owned(), "reason" => reason).increment(1);
}

pub fn channel_reply_delivered(channel: &str, seconds: f64) {
    counter!(CHANNEL_REPLIES_DELIVERED, "channel" => channel.to_owned()).increment(1);
    histogram!(CHANNEL_DELIVERY_SECONDS, "channel" => channel.to_owned()).record(seconds);
}

pub fn channel_reply_undeliverable(channel: &str) {
    counter!(CHANNEL_UNDELIVERABLE, "channel" => channel.to_owned()).increment(1);
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
