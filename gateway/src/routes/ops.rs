//! Operational endpoints and the chat page.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};

use crate::{AppState, error::ApiError};

/// The chat page: one self-contained file that uses the public API.
const CHAT_PAGE: &str = include_str!("../../static/index.html");

pub(crate) async fn chat_page() -> Html<&'static str> {
    Html(CHAT_PAGE)
}

/// Browsers ask for it on every page load; an empty answer keeps their consoles quiet.
pub(crate) async fn favicon() -> StatusCode {
    StatusCode::NO_CONTENT
}

pub(crate) async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready only while both the bus and the store answer in time.
pub(crate) async fn readyz(State(state): State<AppState>) -> Response {
    let timeout = state.config.readiness_timeout;
    let (bus, store) = tokio::join!(
        tokio::time::timeout(timeout, state.bus.ping()),
        tokio::time::timeout(timeout, state.store.ping()),
    );
    let bus_ok = matches!(bus, Ok(Ok(())));
    let store_ok = matches!(store, Ok(Ok(())));
    let body = serde_json::json!({
        "bus": if bus_ok { "ok" } else { "unavailable" },
        "store": if store_ok { "ok" } else { "unavailable" },
    });
    let status = if bus_ok && store_ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(body)).into_response()
}

pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    let body = state.metrics.as_ref().map(|m| m.render()).unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

pub(crate) async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint".into())
}
