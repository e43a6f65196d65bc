//! Trace context across the bus: the W3C `traceparent` (and `tracestate`) of the span that
//! enqueues a message travels in the broker message's headers, so that the worker's handling
//! continues the gateway's trace. Every adapter uses these two functions; which headers they
//! are is decided by the propagator the binary installs (none when tracing is off, and then
//! nothing is written or read).

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Trace headers of one message: name to value, lower-case names.
pub type TraceHeaders = HashMap<String, String>;

struct Headers<'a>(&'a mut TraceHeaders);

impl Injector for Headers<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_ascii_lowercase(), value);
    }
}

struct ReadHeaders<'a>(&'a TraceHeaders);

impl Extractor for ReadHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(&key.to_ascii_lowercase()).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// The trace headers of the current span: empty when tracing is off or no span is sampled.
pub fn current() -> TraceHeaders {
    let mut headers = TraceHeaders::new();
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&context, &mut Headers(&mut headers)));
    headers
}

/// Makes `span` continue the trace that `headers` name, if they name one.
pub fn continue_trace(span: &tracing::Span, headers: &TraceHeaders) {
    if headers.is_empty() {
        return;
    }
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&ReadHeaders(headers)));
    let _ = span.set_parent(parent);
}

/// Shows the trace id of `span` (once it continues or starts a trace) as its `trace_id` field,
/// which the span must declare empty: every log line inside the span then carries it, and the
/// trace is one search away from a log line. Nothing happens when tracing is off.
pub fn record_trace_id(span: &tracing::Span) {
    use opentelemetry::trace::TraceContextExt;
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if span_context.is_valid() {
        span.record("trace_id", tracing::field::display(span_context.trace_id()));
    }
}

/// The names of the headers the installed propagator writes, so adapters can pick them out
/// of a broker message's headers (`traceparent`, `tracestate` with the W3C propagator).
pub fn header_names() -> Vec<String> {
    opentelemetry::global::get_text_map_propagator(|p| p.fields().map(str::to_owned).collect())
}
