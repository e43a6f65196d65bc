//! The chat page and the answer to an unknown path. (`/healthz`, `/readyz` and `/metrics` are
//! `crate::health`'s, shared with the worker.)

use axum::http::StatusCode;
use axum::response::Html;

use crate::error::ApiError;

/// The chat page: one self-contained file that uses the public API.
const CHAT_PAGE: &str = include_str!("../../static/index.html");

pub(crate) async fn chat_page() -> Html<&'static str> {
    Html(CHAT_PAGE)
}

/// Browsers ask for it on every page load; an empty answer keeps their consoles quiet.
pub(crate) async fn favicon() -> StatusCode {
    StatusCode::NO_CONTENT
}

pub(crate) async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint".into())
}

/// The endpoint exists but not with this method; axum adds the `Allow` header to this answer.
pub(crate) async fn method_not_allowed(method: axum::http::Method) -> ApiError {
    ApiError::MethodNotAllowed(format!("this endpoint does not take {method}; the Allow header lists what it takes"))
}
