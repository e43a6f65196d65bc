//! Logging and the metrics recorder, set up once per process.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::field::MakeExt;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, fmt};

use crate::cli::LogFormat;

/// Structured logs to stderr; verbosity from RUST_LOG (default `info`). With `traces` on, spans
/// also go to OpenTelemetry (their own filter: RUST_LOG governs log lines only), and lines
/// logged inside a traced request or message carry its `trace_id`.
///
/// Field values often come from clients (a webhook name, a conversation id, a text): in text
/// lines every control character of a value is escaped (`\n`, `\u{1b}`), so a value cannot
/// start a forged line or drive the terminal; JSON lines are escaped by JSON itself.
pub fn init_logging(format: LogFormat, traces: &crate::traces::Traces) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let lines = match format {
        LogFormat::Text => text_lines(std::io::stderr).boxed(),
        LogFormat::Json => {
            fmt::layer().json().flatten_event(true).with_current_span(true).with_writer(std::io::stderr).boxed()
        }
    };
    let _ = tracing_subscriber::registry().with(traces.layer()).with(lines.with_filter(filter)).try_init();
}

/// Human-readable log lines on `writer`, one line per event whatever its values hold.
fn text_lines<S, W>(writer: W) -> impl Layer<S> + Send + Sync + 'static
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
    W: for<'writer> MakeWriter<'writer> + Send + Sync + 'static,
{
    let fields =
        fmt::format::debug_fn(|out: &mut Writer<'_>, field: &tracing::field::Field, value: &dyn std::fmt::Debug| {
            if field.name() != "message" {
                write!(out, "{}=", field.name())?;
            }
            write_escaped(out, &format!("{value:?}"))
        })
        .delimited(" ");
    fmt::layer().fmt_fields(fields).with_writer(writer)
}

/// Writes `text` with its control characters (and the Unicode line and paragraph separators)
/// escaped as Rust escapes them.
fn write_escaped(out: &mut Writer<'_>, text: &str) -> std::fmt::Result {
    for c in text.chars() {
        if c.is_control() || c == '\u{2028}' || c == '\u{2029}' {
            write!(out, "{}", c.escape_default())?;
        } else {
            out.write_char(c)?;
        }
    }
    Ok(())
}

/// The process's Prometheus recorder; installed on first use.
pub fn metrics() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| match PrometheusBuilder::new().install_recorder() {
            Ok(handle) => Some(handle),
            Err(e) => {
                tracing::warn!(event = "metrics_unavailable", error = %e, "metrics are disabled");
                None
            }
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt;

    /// A log sink the test reads back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> tracing_subscriber::fmt::MakeWriter<'w> for Captured {
        type Writer = Captured;
        fn make_writer(&'w self) -> Captured {
            self.clone()
        }
    }

    #[test]
    fn a_client_value_with_newlines_or_terminal_escapes_stays_inside_its_one_log_line() {
        let sink = Captured::default();
        let subscriber = tracing_subscriber::registry().with(super::text_lines(sink.clone()));
        let forged = "abc\n2026-12-01T00:00:00Z  INFO forged: event=\"session_deleted\"\r\u{1b}[2J\u{2028}x";

        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("webhook_inbound", integration = %forged);
            let _entered = span.enter();
            tracing::info!(event = "channel_event_rejected", name = %forged, debug = ?forged, text = forged, "refused {forged}");
        });

        let written = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert_eq!(written.matches('\n').count(), 1, "one event, one line: {written:?}");
        assert!(written.ends_with('\n'));
        // (The level may be coloured: only the value's own escape sequence must not be there.)
        assert!(
            !written.contains('\r') && !written.contains("\u{1b}[2J") && !written.contains('\u{2028}'),
            "{written:?}"
        );
        assert!(written.contains(r"abc\n2026-12-01"), "the value is kept, escaped: {written:?}");
        assert!(
            written.contains("event=\"channel_event_rejected\"") || written.contains("event=channel_event_rejected"),
            "{written:?}"
        );
    }
}
