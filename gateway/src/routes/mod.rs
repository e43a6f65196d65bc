//! The routes: one module per resource.

mod messages;
mod ops;
mod sessions;

use axum::Router;
use axum::routing::{get, post};

use crate::AppState;

pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(ops::chat_page))
        .route("/favicon.ico", get(ops::favicon))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/v1/sessions", post(sessions::create))
        .route("/v1/sessions/{session_id}", axum::routing::delete(sessions::delete))
        .route("/v1/sessions/{session_id}/messages", post(messages::post).get(messages::history))
        .route("/v1/sessions/{session_id}/events", get(messages::events))
        .fallback(ops::not_found)
        .with_state(state)
}
