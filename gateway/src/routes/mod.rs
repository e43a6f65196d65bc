//! The routes: one module per resource.

mod ai_sdk;
mod cancel;
mod messages;
mod ops;
mod resume;
mod sessions;

pub(crate) use messages::MAX_TEXT_BYTES;

use axum::Router;
use axum::routing::{get, post};

use crate::AppState;
use crate::health::{self, Health};

pub(crate) fn router(state: AppState) -> Router {
    let health = Health {
        bus: state.bus.clone(),
        store: state.store.clone(),
        readiness_timeout: state.config.readiness_timeout,
        metrics: state.metrics.clone(),
    };
    Router::new()
        .route("/", get(ops::chat_page))
        .route("/favicon.ico", get(ops::favicon))
        .route("/v1/sessions", post(sessions::create))
        .route("/v1/sessions/{session_id}", axum::routing::delete(sessions::delete))
        .route("/v1/sessions/{session_id}/messages", post(messages::post).get(messages::history))
        .route("/v1/sessions/{session_id}/events", get(messages::events))
        .merge(crate::channels::routes())
        .route("/v1/sessions/{session_id}/messages/{message_id}/cancel", post(cancel::cancel))
        .route("/v1/ai-sdk/chat", post(ai_sdk::chat))
        .route("/v1/ai-sdk/chat/{session_id}/stream", get(ai_sdk::resume))
        .merge(health::router(health))
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .with_state(state)
}
