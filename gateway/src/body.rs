//! Reading a request's body: at most so many bytes, within a deadline. Every route that takes a
//! body reads it here, so a client can make the gateway hold neither a large body nor a
//! connection it trickles one byte at a time (the header read timeout ends at the headers).

use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};

use crate::error::ApiError;

/// Why a body could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("the request body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the request body took longer than {0:?} to arrive")]
    TimedOut(Duration),
    #[error("the request body broke off")]
    Broken,
}

/// The whole body, if it holds at most `limit` bytes and arrives within `deadline` (counted
/// from when the handler starts reading). A declared `Content-Length` above the limit is
/// refused before anything is read.
pub(crate) async fn read(body: Body, limit: usize, deadline: Duration) -> Result<Bytes, BodyError> {
    if body.size_hint().lower() > limit as u64 {
        return Err(BodyError::TooLarge { limit });
    }
    match tokio::time::timeout(deadline, axum::body::to_bytes(body, limit)).await {
        Err(_elapsed) => Err(BodyError::TimedOut(deadline)),
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => {
            // axum reports a body over the limit as a length-limit error somewhere in the
            // chain of sources; anything else is the client going away or breaking framing.
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(err) = source {
                if err.is::<http_body_util::LengthLimitError>() {
                    return Err(BodyError::TooLarge { limit });
                }
                source = err.source();
            }
            Err(BodyError::Broken)
        }
    }
}

impl From<BodyError> for ApiError {
    fn from(e: BodyError) -> Self {
        match e {
            BodyError::TooLarge { .. } => Self::PayloadTooLarge(e.to_string()),
            BodyError::TimedOut(_) => Self::RequestTimeout(e.to_string()),
            BodyError::Broken => Self::InvalidJson(e.to_string()),
        }
    }
}
