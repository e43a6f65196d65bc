//! OpenTelemetry traces, configured by the standard `OTEL_*` variables. With
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, the process
//! exports its spans over OTLP/HTTP with protobuf, as service `OTEL_SERVICE_NAME` (default
//! `chatfleet-<role>`), and propagates W3C trace context (`traceparent`) through the bus.
//! Unset, no tracing layer and no propagator are installed: nothing is recorded or sent, and
//! the bus writes no trace headers.

use async_trait::async_trait;
use bytes::Bytes;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_otlp::WithHttpConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;

/// The spans exported: chatfleet's own, at `info` and above, whatever `RUST_LOG` says about
/// log lines.
fn exported() -> Targets {
    Targets::new().with_target("chatfleet", tracing::Level::INFO)
}

/// The trace pipeline of a process, if tracing is on; shut it down before exiting, so that the
/// last spans are sent.
#[derive(Debug, Default)]
pub struct Traces {
    provider: Option<SdkTracerProvider>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
}

/// Whether the `OTEL_*` variables ask for traces.
fn wanted() -> bool {
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let no_exporter = env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
    let endpoint = env("OTEL_EXPORTER_OTLP_ENDPOINT").or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"));
    !disabled && !no_exporter && endpoint.is_some()
}

impl Traces {
    /// Sets up exporting for `role` if the environment asks for it. `runtime` runs the exporter's
    /// HTTP requests. An unsupported setting is an error naming it.
    pub fn init(role: &str, runtime: tokio::runtime::Handle) -> Result<Traces, String> {
        if !wanted() {
            return Ok(Traces::default());
        }
        for name in ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"] {
            if let Some(protocol) = env(name).filter(|p| p != "http/protobuf") {
                return Err(format!("{name}={protocol} is not supported: chatfleet exports traces over http/protobuf"));
            }
        }
        if let Some(exporter) = env("OTEL_TRACES_EXPORTER").filter(|e| e != "otlp") {
            return Err(format!("OTEL_TRACES_EXPORTER={exporter} is not supported: use otlp (or none)"));
        }
        llm::install_crypto_provider();
        let client = reqwest::Client::builder().build().map_err(|e| format!("cannot build the OTLP client: {e}"))?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(OtlpHttp { client, runtime })
            .build()
            .map_err(|e| format!("OTEL_EXPORTER_OTLP_ENDPOINT: cannot set up the trace exporter: {e}"))?;
        let mut resource = opentelemetry_sdk::Resource::builder();
        if env("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name(format!("chatfleet-{role}"));
        }
        let provider =
            SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build();
        opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
        Ok(Traces { provider: Some(provider) })
    }

    /// The layer that turns spans into OpenTelemetry spans, if tracing is on.
    pub fn layer<S>(&self) -> Option<Box<dyn Layer<S> + Send + Sync>>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span> + Send + Sync,
    {
        let tracer = self.provider.as_ref()?.tracer("chatfleet");
        Some(tracing_opentelemetry::layer().with_tracer(tracer).with_filter(exported()).boxed())
    }

    /// Sends the spans still waiting and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            eprintln!("chatfleet: could not send the last traces: {e}");
        }
    }
}

/// The exporter's HTTP client: the SDK exports from a thread of its own, outside any async
/// runtime, so each request runs on the process's runtime and the exporter awaits its result.
#[derive(Debug)]
struct OtlpHttp {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait]
impl HttpClient for OtlpHttp {
    async fn send_bytes(&self, request: http::Request<Bytes>) -> Result<http::Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let request = reqwest::Request::try_from(request)?;
        let sent = self.runtime.spawn(async move {
            let response = client.execute(request).await?;
            let (status, headers) = (response.status(), response.headers().clone());
            let body = response.bytes().await?;
            let mut answer = http::Response::builder().status(status).body(body)?;
            *answer.headers_mut() = headers;
            Ok::<_, HttpError>(answer)
        });
        sent.await?
    }
}
