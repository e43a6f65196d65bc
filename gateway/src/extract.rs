//! The parts of a request the routes read from its URL, with axum's own rejections (plain-text
//! bodies) turned into the API's JSON errors: a path that names no resource is a 404, a query
//! string that cannot be read is a 400 `invalid_query`.
//!
//! Path segments are parsed into the id types here, at the edge (`Path<SessionId>`): a
//! malformed id names no session, so it is a 404 before any token is looked at, and no
//! handler, log line or bus subject ever sees an id that is not one.

use axum::extract::FromRequestParts;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// The path parameters of the route, deserialized into `T`.
#[derive(Debug)]
pub(crate) struct Path<T>(pub(crate) T);

impl<S, T> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Self(value)),
            Err(rejection) => Err(path_rejected(&rejection)),
        }
    }
}

fn path_rejected(rejection: &PathRejection) -> ApiError {
    let why = match rejection {
        PathRejection::FailedToDeserializePathParams(e) => e.body_text(),
        other => other.body_text(),
    };
    ApiError::NotFound(format!("this path names nothing here: {why}"))
}

/// The query string, deserialized into `T` (unknown parameters are ignored).
#[derive(Debug)]
pub(crate) struct Query<T>(pub(crate) T);

impl<S, T> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(query_rejected(&rejection)),
        }
    }
}

fn query_rejected(rejection: &QueryRejection) -> ApiError {
    ApiError::InvalidQuery(format!("the query string cannot be read: {}", rejection.body_text()))
}
