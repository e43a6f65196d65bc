//! Logging and the metrics recorder, set up once per process.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, fmt};

use crate::cli::LogFormat;

/// Structured logs to stderr; verbosity from RUST_LOG (default `info`). With `traces` on, spans
/// also go to OpenTelemetry (their own filter: RUST_LOG governs log lines only), and lines
/// logged inside a traced request or message carry its `trace_id`.
pub fn init_logging(format: LogFormat, traces: &crate::traces::Traces) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let lines = match format {
        LogFormat::Text => fmt::layer().with_writer(std::io::stderr).boxed(),
        LogFormat::Json => {
            fmt::layer().json().flatten_event(true).with_current_span(true).with_writer(std::io::stderr).boxed()
        }
    };
    let _ = tracing_subscriber::registry().with(traces.layer()).with(lines.with_filter(filter)).try_init();
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
