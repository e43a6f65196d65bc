//! `POST /v1/channels/webhooks/{name}`: verify the signature, map `conversation_id` to its
//! session, enqueue with `webhook-id` as the idempotency key, answer `202`.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use schemas::ChannelOrigin;
use serde::Deserialize;

use crate::channels::{Rejection, session};
use crate::extract::Path;
use crate::routes::MAX_TEXT_BYTES;
use crate::{AppState, error::ApiError, telemetry};

/// Largest accepted body: the longest text, even fully escaped, and the rest.
const MAX_BODY_BYTES: usize = 128 * 1024;
/// Longest `conversation_id` and `user`, in characters.
const MAX_ID_CHARS: usize = 128;

#[derive(Debug, Deserialize)]
struct Inbound {
    conversation_id: String,
    text: String,
    user: Option<String>,
}

#[tracing::instrument(name = "webhook_inbound", skip_all, fields(integration = %name))]
pub(crate) async fn receive(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Some(hook) = state.channels.config.webhooks.get(&name) else {
        return Err(ApiError::NotFound(format!("no webhook integration named {name:?} is configured")));
    };
    let channel = super::channel_name(&name);
    telemetry::channel_event_received(&channel);
    let body = crate::body::read(body, MAX_BODY_BYTES, state.config.http.body_read_timeout)
        .await
        .map_err(|e| Rejection::from(e).refuse(&channel))?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let webhook_id = hook.key.verify(&headers, &body, now).map_err(|r| r.refuse(&channel))?;
    let request = parse(&body).map_err(|r| r.refuse(&channel))?;

    let record = session::open(&state, &channel, &request.conversation_id, request.user).await?;
    let origin = ChannelOrigin {
        channel: channel.clone(),
        address: serde_json::json!({"conversation_id": request.conversation_id}),
    };
    let submitted = session::submit(&state, &record, webhook_id, request.text, origin).await?;
    let body = serde_json::json!({"session_id": record.id, "message_id": submitted.message_id});
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

fn parse(body: &[u8]) -> Result<Inbound, Rejection> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|_| Rejection::InvalidJson)?;
    let request: Inbound =
        serde_json::from_value(value).map_err(|e| Rejection::Invalid(format!("invalid request: {e}")))?;
    let chars = request.conversation_id.chars().count();
    if chars == 0 || chars > MAX_ID_CHARS {
        return Err(Rejection::Invalid(format!("conversation_id must be 1 to {MAX_ID_CHARS} characters")));
    }
    if request.text.trim().is_empty() || request.text.len() > MAX_TEXT_BYTES {
        return Err(Rejection::Invalid(format!("text must be 1 to {MAX_TEXT_BYTES} bytes and not blank")));
    }
    if request.user.as_ref().is_some_and(|u| u.chars().count() > MAX_ID_CHARS) {
        return Err(Rejection::Invalid(format!("user is longer than {MAX_ID_CHARS} characters")));
    }
    Ok(request)
}
