//! `POST /v1/sessions/{id}/messages/{message_id}/cancel`: stops a message's reply wherever it
//! is being generated, or drops the message while it still waits.
//!
//! The cancel request travels as an envelope through the session's partition (a
//! [`UserMessage`] with `cancel` set), behind the message it names: it reaches whichever worker
//! holds that message, however ownership moved, and finds it waiting or being answered. The
//! worker stops the generation and keeps what it had generated as the reply, finish reason
//! `cancelled`, stored and announced with `done` like any reply.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use schemas::{MessageId, SessionId, UserMessage};
use store::Outcome;

use super::messages::{TokenQuery, open_session};
use crate::extract::{Path, Query};
use crate::{AppState, error::ApiError, telemetry};

#[tracing::instrument(name = "cancel", skip_all, fields(session_id = %session_id, message_id = %target))]
pub(crate) async fn cancel(
    State(state): State<AppState>,
    Path((session_id, target)): Path<(SessionId, MessageId)>,
    Query(query): Query<TokenQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let session = open_session(&state, &session_id, &headers, &query).await?.id;
    match state.store.outcome(&session, &target).await? {
        // Cancelled before: the same answer again.
        Some(Outcome::Replied(reply)) if reply.finish_reason.as_ref().is_some_and(|r| r.is_cancelled()) => {}
        Some(_) => return Err(ApiError::AlreadyAnswered),
        None => {
            state.bus.enqueue(&UserMessage::cancel_request(&session, &target)).await?;
            telemetry::cancel_requested();
            tracing::info!(event = "cancel_requested", "cancel request enqueued");
        }
    }
    let body = serde_json::json!({"session_id": session, "message_id": target});
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}
