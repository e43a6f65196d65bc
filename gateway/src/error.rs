//! Every way a request can fail, mapped once to a status code and the documented body
//! `{"error": {"code", "message"}}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use schemas::ErrorCode;

/// A failed request.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(String),
    #[error("this token belongs to another session")]
    Forbidden,
    /// 403 with its reason: a channel request whose credentials are valid but not for this.
    #[error("{0}")]
    Refused(String),
    #[error("no such session")]
    SessionNotFound,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    InvalidJson(String),
    #[error("{0}")]
    InvalidQuery(String),
    #[error("{0}")]
    RequestTimeout(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error(
        "an earlier message of this session is still being answered, and this session refuses new messages until \
         then (double_texting: reject); send it again once that reply is done"
    )]
    ReplyInProgress,
    #[error("this message is already answered; there is nothing to cancel")]
    AlreadyAnswered,
    #[error(
        "the events after this Last-Event-ID are no longer kept (it is older than the reply events' retention); read \
         the history (GET /v1/sessions/{{id}}/messages) and listen again without Last-Event-ID"
    )]
    CursorExpired,
    #[error("the message bus is unavailable; try again shortly (resending with the same client_message_id is safe)")]
    BusUnavailable,
    #[error("the conversation store is unavailable; try again shortly")]
    StoreUnavailable,
    #[error("the API key this session was created with has been revoked")]
    ApiKeyRevoked,
    #[error("{}", limit_message(.0))]
    LimitExceeded(crate::quotas::Exceeded),
    #[error("internal error")]
    Internal(String),
}

fn limit_message(exceeded: &crate::quotas::Exceeded) -> String {
    use schemas::ErrorCode;
    let crate::quotas::Exceeded { code, scope, limit, retry_after, .. } = exceeded;
    let what = match code {
        ErrorCode::MessagesPerMinuteExceeded | ErrorCode::SessionMessagesPerMinuteExceeded => {
            format!("{scope} may send at most {limit} messages per minute")
        }
        ErrorCode::OpenStreamsExceeded => format!("{scope} may have at most {limit} reply streams open at once"),
        ErrorCode::SessionsExceeded => {
            return format!("{scope} may have at most {limit} sessions; delete one to create another");
        }
        ErrorCode::TokensPerDayExceeded => format!("{scope} has used its {limit} model tokens of the day (UTC)"),
        other => format!("{scope} reached a limit ({other}) of {limit}"),
    };
    format!("{what}; try again in {} s", retry_after.as_secs())
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, ErrorCode) {
        match self {
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized),
            Self::Forbidden | Self::Refused(_) => (StatusCode::FORBIDDEN, ErrorCode::Forbidden),
            Self::SessionNotFound => (StatusCode::NOT_FOUND, ErrorCode::SessionNotFound),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, ErrorCode::NotFound),
            Self::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, ErrorCode::MethodNotAllowed),
            Self::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::PayloadTooLarge),
            Self::InvalidJson(_) => (StatusCode::BAD_REQUEST, ErrorCode::InvalidJson),
            Self::InvalidQuery(_) => (StatusCode::BAD_REQUEST, ErrorCode::InvalidQuery),
            Self::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, ErrorCode::RequestTimeout),
            Self::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::InvalidRequest),
            Self::UnsupportedMediaType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, ErrorCode::UnsupportedMediaType),
            Self::ReplyInProgress => (StatusCode::CONFLICT, ErrorCode::ReplyInProgress),
            Self::AlreadyAnswered => (StatusCode::CONFLICT, ErrorCode::AlreadyAnswered),
            Self::CursorExpired => (StatusCode::GONE, ErrorCode::CursorExpired),
            Self::BusUnavailable => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::BusUnavailable),
            Self::StoreUnavailable => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::StoreUnavailable),
            Self::ApiKeyRevoked => (StatusCode::UNAUTHORIZED, ErrorCode::ApiKeyRevoked),
            Self::LimitExceeded(exceeded) => (StatusCode::TOO_MANY_REQUESTS, exceeded.code.clone()),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal),
        }
    }
}

impl From<bus::BusError> for ApiError {
    fn from(e: bus::BusError) -> Self {
        tracing::warn!(event = "bus_error", error = %e);
        match e {
            bus::BusError::Unavailable(_) => Self::BusUnavailable,
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<store::StoreError> for ApiError {
    fn from(e: store::StoreError) -> Self {
        tracing::warn!(event = "store_error", error = %e);
        match e {
            store::StoreError::Unavailable(_) => Self::StoreUnavailable,
            other => Self::Internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if let Self::Internal(detail) = &self {
            // The detail goes to the log, not to the client.
            tracing::error!(event = "internal_error", detail = %detail);
        }
        crate::telemetry::request_failed(&code);
        let body = serde_json::json!({"error": {"code": code, "message": self.to_string()}});
        let mut response = (status, Json(body)).into_response();
        if let Self::LimitExceeded(exceeded) = &self
            && !exceeded.retry_after.is_zero()
        {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, exceeded.retry_after.as_secs().into());
        }
        response
    }
}
