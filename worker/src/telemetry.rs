//! The worker's metrics, named in one place.

use metrics::{counter, gauge, histogram};

/// Messages settled, by outcome (`replied`, `interrupted`, `failed`, `store_failed`, `duplicate`, `session_gone`,
/// `rejected`, `retried`); `settle.rs` names them.
pub const MESSAGES: &str = "chatfleet_worker_messages_total";
/// Generations running now.
pub const INFLIGHT: &str = "chatfleet_worker_inflight_generations";
/// Model attempts that failed transiently and were retried.
pub const LLM_RETRIES: &str = "chatfleet_worker_llm_retries_total";
/// Seconds from the start of a generation to its first token.
pub const FIRST_TOKEN_SECONDS: &str = "chatfleet_worker_first_token_seconds";
/// Seconds from the start of a generation to its stored reply.
pub const REPLY_SECONDS: &str = "chatfleet_worker_reply_seconds";
/// Store operations that failed and were retried.
pub const STORE_RETRIES: &str = "chatfleet_worker_store_retries_total";

/// Messages given up on and sent to the dead letters, by reason (`unreadable`,
/// `too_many_starts`).
pub const DEAD_LETTERS: &str = "chatfleet_worker_dead_letters_total";

/// Panics caught in the worker, by where (`message`: handling one message; `partition`: a
/// partition runner). Each ends the partition's ownership as a crash would; nonzero is a bug.
pub const PANICS: &str = "chatfleet_worker_panics_total";

pub fn message_panicked() {
    counter!(PANICS, "where" => "message").increment(1);
}

pub fn runner_panicked() {
    counter!(PANICS, "where" => "partition").increment(1);
}

/// What a caught panic said, as far as it says anything printable.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with no message".to_owned())
}

pub fn dead_lettered(reason: &'static str) {
    counter!(DEAD_LETTERS, "reason" => reason).increment(1);
}

pub fn message_settled(outcome: &'static str) {
    counter!(MESSAGES, "outcome" => outcome).increment(1);
}

pub fn inflight(delta: f64) {
    gauge!(INFLIGHT).increment(delta);
}

pub fn llm_retry() {
    counter!(LLM_RETRIES).increment(1);
}

pub fn store_retry() {
    counter!(STORE_RETRIES).increment(1);
}

pub fn first_token(seconds: f64) {
    histogram!(FIRST_TOKEN_SECONDS).record(seconds);
}

/// The model's first token, as an event of the current span (`llm.generate`) in the trace:
/// time to first token is where a trace shows it. A trace event only, not a log line (one per
/// reply would flood the logs); nothing when tracing is off.
pub fn first_token_event(elapsed: std::time::Duration) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let ttft_ms = i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX);
    tracing::Span::current().add_event("first_token", vec![opentelemetry::KeyValue::new("ttft_ms", ttft_ms)]);
}

pub fn reply_complete(seconds: f64) {
    histogram!(REPLY_SECONDS).record(seconds);
}

/// Partitions this worker runs now.
pub const RUNNING_PARTITIONS: &str = "chatfleet_worker_running_partitions";

pub fn owned_partitions(n: usize) {
    gauge!(RUNNING_PARTITIONS).set(n as f64);
}

/// Messages whose history came from the context cache, with no read from the store.
pub const CONTEXT_CACHE_HITS: &str = "chatfleet_worker_context_cache_hits_total";
/// Messages whose history had to be read from the store (the cache did not hold the session).
pub const CONTEXT_CACHE_MISSES: &str = "chatfleet_worker_context_cache_misses_total";
/// Bytes the context caches of this process hold now (message text plus a fixed overhead per
/// message).
pub const CONTEXT_CACHE_BYTES: &str = "chatfleet_worker_context_cache_bytes";

pub fn context_cache_hit() {
    counter!(CONTEXT_CACHE_HITS).increment(1);
}

pub fn context_cache_miss() {
    counter!(CONTEXT_CACHE_MISSES).increment(1);
}

/// A cache went from `before` to `after` bytes. Moved by the difference rather than set, so
/// that the several workers `chatfleet dev` runs in one process add up.
pub fn context_cache_resized(before: usize, after: usize) {
    if before != after {
        gauge!(CONTEXT_CACHE_BYTES).increment(after as f64 - before as f64);
    }
}

/// Outcomes of channel messages queued for delivery by the gateways, by channel.
pub const CHANNEL_DELIVERIES_QUEUED: &str = "chatfleet_worker_channel_deliveries_queued_total";

pub fn channel_delivery_queued(channel: &str) {
    counter!(CHANNEL_DELIVERIES_QUEUED, "channel" => channel.to_owned()).increment(1);
}
