//! The operational endpoints every chatfleet process serves, gateway and worker alike:
//! `/healthz` (the process runs), `/readyz` (the bus and the store answer) and `/metrics`
//! (Prometheus text). One implementation, so the two roles cannot drift apart.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bus::Bus;
use metrics_exporter_prometheus::PrometheusHandle;
use store::Store;

/// What the endpoints look at.
#[derive(Clone)]
pub struct Health {
    pub bus: Arc<dyn Bus>,
    pub store: Arc<dyn Store>,
    /// How long a readiness probe waits for the bus and for the store.
    pub readiness_timeout: Duration,
    /// The process's metrics recorder; without one, `/metrics` is empty.
    pub metrics: Option<PrometheusHandle>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health").field("readiness_timeout", &self.readiness_timeout).finish_non_exhaustive()
    }
}

/// `/healthz`, `/readyz` and `/metrics`, ready to be served alone or merged into a router of
/// any state.
pub fn router<S: Clone + Send + Sync + 'static>(health: Health) -> Router<S> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health)
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready only while both the bus and the store answer in time:
/// `{"bus": "ok" | "unavailable", "store": "ok" | "unavailable"}`, 200 or 503.
async fn readyz(State(health): State<Health>) -> Response {
    let timeout = health.readiness_timeout;
    let (bus, store) = tokio::join!(
        tokio::time::timeout(timeout, health.bus.ping()),
        tokio::time::timeout(timeout, health.store.ping()),
    );
    let bus_ok = matches!(bus, Ok(Ok(())));
    let store_ok = matches!(store, Ok(Ok(())));
    let label = |ok: bool| if ok { "ok" } else { "unavailable" };
    let body = serde_json::json!({ "bus": label(bus_ok), "store": label(store_ok) });
    let status = if bus_ok && store_ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

async fn metrics(State(health): State<Health>) -> Response {
    let body = health.metrics.as_ref().map(|m| m.render()).unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
