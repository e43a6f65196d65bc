//! The routes: one module per resource.

mod ai_sdk;
mod cancel;
mod messages;
mod ops;
pub(crate) mod resume;
mod sessions;

pub(crate) use messages::MAX_TEXT_BYTES;

use axum::Router;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::AppState;
use crate::error::ApiError;
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
        .layer(axum::middleware::from_fn(refuse_oversized_bodies))
        .with_state(state)
}

/// The largest body any route takes (`POST /v1/ai-sdk/chat`, which carries the whole
/// conversation); each route that reads a body has its own, smaller limit besides.
const MAX_ANY_BODY_BYTES: u64 = 4 * 1024 * 1024;

/// Refuses at once a request that declares a body larger than any route takes, whatever its
/// route (those that take no body never read it, and the connection closes after the answer).
async fn refuse_oversized_bodies(request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_ANY_BODY_BYTES) {
        return ApiError::PayloadTooLarge(format!("the request body is larger than {MAX_ANY_BODY_BYTES} bytes"))
            .into_response();
    }
    next.run(request).await
}
