//! The error codes clients see: in the HTTP API's `{"error": {"code", ...}}` bodies and in a
//! reply's `error` event. One list, so the gateway, the worker and the model layer cannot spell
//! the same code two ways.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A machine-readable error code, on the wire as its snake_case name. Codes this build does not
/// know (written by a newer one, or stored before a code was added here) are kept as they are
/// in [`ErrorCode::Other`], so reading and writing them back changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    // The HTTP API's status codes.
    /// 401: no token, or one that is not valid.
    Unauthorized,
    /// 403: the token belongs to another session.
    Forbidden,
    /// 404 (and the `error` event of a message whose session was deleted).
    SessionNotFound,
    /// 404: no such endpoint.
    NotFound,
    /// 405: the endpoint exists, the method does not (the `Allow` header lists those that do).
    MethodNotAllowed,
    /// 413.
    PayloadTooLarge,
    /// 400: the body is not a JSON object.
    InvalidJson,
    /// 400: the query string cannot be read (a parameter given twice, or not UTF-8).
    InvalidQuery,
    /// 408: the client took longer than the body read timeout to send the request's body.
    RequestTimeout,
    /// 422: a missing, empty or mistyped field.
    InvalidRequest,
    /// 415.
    UnsupportedMediaType,
    /// 409: a `reject` session is still answering an earlier message.
    ReplyInProgress,
    /// 409: a cancel of a message that is already answered.
    AlreadyAnswered,
    /// 410: a `Last-Event-ID` older than the reply events' retention; read the history instead.
    CursorExpired,
    /// 503: the message bus is unreachable.
    BusUnavailable,
    /// 503: the conversation store is unreachable.
    StoreUnavailable,
    /// 500.
    Internal,
    /// 401: the API key that created the session was revoked.
    ApiKeyRevoked,
    /// 429: an API key's or an end user's messages per minute.
    MessagesPerMinuteExceeded,
    /// 429: one session's messages per minute.
    SessionMessagesPerMinuteExceeded,
    /// 429: an API key's or an end user's reply streams open at once.
    OpenStreamsExceeded,
    /// 429: an API key's or an end user's sessions.
    SessionsExceeded,
    /// 429: an API key's or an end user's model tokens of the day (UTC).
    TokensPerDayExceeded,

    // A reply's `error` event.
    /// The model kept failing transiently and the worker gave up after its attempts.
    ModelUnavailable,
    /// The store refused the message's records for good (bad data it cannot handle); the
    /// message is not answered.
    StoreFailed,
    /// The model endpoint is configured wrongly (bad URL, no such model).
    ModelMisconfigured,
    /// The model answered with something that is not a valid reply.
    ModelBadResponse,
    /// The model refused the request as malformed (400, 422).
    ModelBadRequest,
    /// The model client failed before a request could be made.
    ModelClientError,
    /// The model account has no quota left.
    ModelQuotaExhausted,
    /// The conversation is longer than the model's context.
    ModelContextTooLong,
    /// 401 from the model.
    ModelUnauthorized,
    /// 403 from the model.
    ModelForbidden,
    /// 404 from the model.
    ModelNotFound,
    /// 413 from the model.
    ModelRequestTooLarge,
    /// Any other permanent refusal by the model.
    ModelRejected,
    /// The message was given up on and kept in the dead letters (its generation was started
    /// too many times across workers); an operator may replay it.
    MessageDeadLettered,

    /// A code this build does not know.
    #[serde(untagged)]
    Other(String),
}

impl ErrorCode {
    /// Every code this build knows, for documentation and tests.
    pub const KNOWN: [ErrorCode; 37] = [
        Self::Unauthorized,
        Self::Forbidden,
        Self::SessionNotFound,
        Self::NotFound,
        Self::MethodNotAllowed,
        Self::PayloadTooLarge,
        Self::InvalidJson,
        Self::InvalidQuery,
        Self::RequestTimeout,
        Self::InvalidRequest,
        Self::UnsupportedMediaType,
        Self::ReplyInProgress,
        Self::AlreadyAnswered,
        Self::CursorExpired,
        Self::BusUnavailable,
        Self::StoreUnavailable,
        Self::Internal,
        Self::ApiKeyRevoked,
        Self::MessagesPerMinuteExceeded,
        Self::SessionMessagesPerMinuteExceeded,
        Self::OpenStreamsExceeded,
        Self::SessionsExceeded,
        Self::TokensPerDayExceeded,
        Self::ModelUnavailable,
        Self::StoreFailed,
        Self::ModelMisconfigured,
        Self::ModelBadResponse,
        Self::ModelBadRequest,
        Self::ModelClientError,
        Self::ModelQuotaExhausted,
        Self::ModelContextTooLong,
        Self::ModelUnauthorized,
        Self::ModelForbidden,
        Self::ModelNotFound,
        Self::ModelRequestTooLarge,
        Self::ModelRejected,
        Self::MessageDeadLettered,
    ];

    /// The code's name on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Other(code) => code,
            known => known.known_name().unwrap_or_default(),
        }
    }

    /// The wire name of a known code, with a static lifetime (for metric labels); None for
    /// [`ErrorCode::Other`].
    pub fn known_name(&self) -> Option<&'static str> {
        Some(match self {
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::SessionNotFound => "session_not_found",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::PayloadTooLarge => "payload_too_large",
            Self::InvalidJson => "invalid_json",
            Self::InvalidQuery => "invalid_query",
            Self::RequestTimeout => "request_timeout",
            Self::InvalidRequest => "invalid_request",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::ReplyInProgress => "reply_in_progress",
            Self::AlreadyAnswered => "already_answered",
            Self::CursorExpired => "cursor_expired",
            Self::BusUnavailable => "bus_unavailable",
            Self::StoreUnavailable => "store_unavailable",
            Self::Internal => "internal",
            Self::ApiKeyRevoked => "api_key_revoked",
            Self::MessagesPerMinuteExceeded => "messages_per_minute_exceeded",
            Self::SessionMessagesPerMinuteExceeded => "session_messages_per_minute_exceeded",
            Self::OpenStreamsExceeded => "open_streams_exceeded",
            Self::SessionsExceeded => "sessions_exceeded",
            Self::TokensPerDayExceeded => "tokens_per_day_exceeded",
            Self::ModelUnavailable => "model_unavailable",
            Self::StoreFailed => "store_failed",
            Self::ModelMisconfigured => "model_misconfigured",
            Self::ModelBadResponse => "model_bad_response",
            Self::ModelBadRequest => "model_bad_request",
            Self::ModelClientError => "model_client_error",
            Self::ModelQuotaExhausted => "model_quota_exhausted",
            Self::ModelContextTooLong => "model_context_too_long",
            Self::ModelUnauthorized => "model_unauthorized",
            Self::ModelForbidden => "model_forbidden",
            Self::ModelNotFound => "model_not_found",
            Self::ModelRequestTooLarge => "model_request_too_large",
            Self::ModelRejected => "model_rejected",
            Self::MessageDeadLettered => "message_dead_lettered",
            Self::Other(_) => return None,
        })
    }
}

impl From<&str> for ErrorCode {
    /// The known code of that name, else [`ErrorCode::Other`].
    fn from(code: &str) -> Self {
        Self::KNOWN.into_iter().find(|known| known.as_str() == code).unwrap_or_else(|| Self::Other(code.to_owned()))
    }
}

impl From<String> for ErrorCode {
    fn from(code: String) -> Self {
        Self::from(code.as_str())
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for ErrorCode {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for ErrorCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorCode;

    #[test]
    fn every_known_code_travels_as_its_snake_case_name_and_reads_back_as_itself() {
        for code in ErrorCode::KNOWN {
            let json = serde_json::to_value(&code).unwrap();

            assert_eq!(json, code.as_str());
            assert_eq!(serde_json::from_value::<ErrorCode>(json).unwrap(), code);
            assert_eq!(ErrorCode::from(code.as_str()), code);
        }
    }

    #[test]
    fn the_codes_clients_already_rely_on_keep_their_names() {
        assert_eq!(serde_json::to_string(&ErrorCode::SessionNotFound).unwrap(), "\"session_not_found\"");
        assert_eq!(serde_json::to_string(&ErrorCode::InvalidRequest).unwrap(), "\"invalid_request\"");
        assert_eq!(serde_json::to_string(&ErrorCode::ModelUnavailable).unwrap(), "\"model_unavailable\"");
    }

    #[test]
    fn an_unknown_code_is_kept_as_it_is() {
        let code: ErrorCode = serde_json::from_str("\"tool_failed\"").unwrap();

        assert_eq!(code, ErrorCode::Other("tool_failed".into()));
        assert_eq!(serde_json::to_string(&code).unwrap(), "\"tool_failed\"");
        assert_eq!(code.known_name(), None);
        assert!(code == "tool_failed");
    }
}
