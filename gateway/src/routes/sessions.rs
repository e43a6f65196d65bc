//! `POST /v1/sessions` and `DELETE /v1/sessions/{id}`.

use std::collections::BTreeMap;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use schemas::{DoubleTexting, SessionId};
use serde::Deserialize;
use store::SessionRecord;

use super::messages::{TokenQuery, read_json};
use crate::extract::{Path, Query};
use crate::{AppState, auth, error::ApiError, telemetry};

/// Longest accepted `user`, in characters.
const MAX_USER_CHARS: usize = 128;
/// Most metadata accepted, keys and values together, in bytes.
const MAX_METADATA_BYTES: usize = 4096;
/// Largest accepted request body.
const MAX_BODY_BYTES: usize = 16 * 1024;

#[derive(Debug, Default, Deserialize)]
struct NewSession {
    user: Option<String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    /// A policy name; parsed here rather than by serde so that a wrong one gets a message
    /// listing the right ones.
    double_texting: Option<String>,
}

#[tracing::instrument(name = "create_session", skip_all, fields(session_id))]
pub(crate) async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let key = auth::authorize_api_key(&state.quotas.keys, auth::bearer(&headers, None))?;
    let request: NewSession = read_json(&state, body, MAX_BODY_BYTES, true).await?.unwrap_or_default();
    if let Some(user) = &request.user
        && user.chars().count() > MAX_USER_CHARS
    {
        return Err(ApiError::Invalid(format!("user is longer than {MAX_USER_CHARS} characters")));
    }
    let metadata_bytes: usize = request.metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
    if metadata_bytes > MAX_METADATA_BYTES {
        return Err(ApiError::Invalid(format!(
            "metadata takes {metadata_bytes} bytes; at most {MAX_METADATA_BYTES} are allowed"
        )));
    }
    let double_texting = match &request.double_texting {
        Some(name) => name.parse::<DoubleTexting>().map_err(|e| ApiError::Invalid(format!("double_texting: {e}")))?,
        None => state.config.double_texting,
    };

    let session = SessionRecord {
        id: SessionId::generate(),
        user: request.user,
        metadata: request.metadata,
        // In UTC to the millisecond, the form both stores keep times in: so the record given
        // to the store is the record it hands back, and can be cached as it is.
        created_at: time::OffsetDateTime::now_utc().truncate_to_millisecond(),
        double_texting,
        api_key: key.as_ref().map(|k| k.name.clone()),
    };
    tracing::Span::current().record("session_id", tracing::field::display(&session.id));
    if let Some(key) = &key {
        state.quotas.admit_session(key, session.user.as_deref()).await?;
    }
    if let Err(e) = state.store.create_session(&session).await {
        // Not created (or not known to be): uncounted, so that a store outage does not use up
        // the key's sessions. A create that did land is then counted one short, which errs on
        // the user's side.
        state.quotas.session_deleted(&session).await;
        return Err(e.into());
    }
    // The client's first message usually follows at once; spare it the store read.
    state.sessions.insert(session.clone());
    telemetry::session_created();
    tracing::info!(event = "session_created", double_texting = %double_texting, "session created");
    let token = state.tokens.issue(&session.id);
    let body = serde_json::json!({"session_id": session.id, "token": token, "double_texting": double_texting});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

#[tracing::instrument(name = "delete_session", skip_all, fields(session_id = %session_id))]
pub(crate) async fn delete(
    State(state): State<AppState>,
    Path(session_id): Path<SessionId>,
    Query(query): Query<TokenQuery>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let session = auth::authorize_session(
        &state.tokens,
        auth::bearer(&headers, query.access_token.as_deref()),
        session_id.as_str(),
    )?;
    // The record says which key and user the session counts against.
    let record = match state.sessions.get(&session) {
        Some(record) => Some(record),
        None => state.store.session(&session).await?,
    };
    let deleted = state.store.delete_session(&session).await;
    // Forget the session whatever the store said: even a failed delete may have been applied,
    // and forgetting costs no more than a store read.
    state.sessions.remove(&session);
    if !deleted? {
        return Err(ApiError::SessionNotFound);
    }
    if let Some(record) = &record {
        state.quotas.session_deleted(record).await;
    }
    tracing::info!(event = "session_deleted", "session deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::body::Body;
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use schemas::{PartitionCount, SessionId};
    use serde_json::{Value, json};
    use store::Store;

    use crate::{Gateway, GatewayConfig};

    #[tokio::test]
    async fn a_created_session_is_cached_exactly_as_the_store_returns_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(store::EmbeddedStore::open(&dir.path().join("store.redb")).unwrap());
        let bus = Arc::new(bus::MemoryBus::new(PartitionCount::new(1).unwrap()));
        let config =
            GatewayConfig { session_cache_ttl: std::time::Duration::from_secs(60), ..GatewayConfig::default() };
        let state = Gateway::build(bus, store.clone(), config, None).await.unwrap().state;
        let body = json!({"user": "u-1", "metadata": {"plan": "pro"}, "double_texting": "reject"}).to_string();

        let response = super::create(State(state.clone()), HeaderMap::new(), Body::from(body)).await.unwrap();

        assert_eq!(response.status(), StatusCode::CREATED);
        let body: Value =
            serde_json::from_slice(&axum::body::to_bytes(response.into_body(), 4096).await.unwrap()).unwrap();
        let id = SessionId::parse(body["session_id"].as_str().unwrap()).unwrap();
        let stored = store.session(&id).await.unwrap().unwrap();
        assert_eq!(state.sessions.get(&id), Some(stored));
    }
}
