//! The API's one error type and its JSON shape:
//! `{"error": {"code", "message", "field"?}}`.
//!
//! Status rule: 400 when the request cannot be read at all (malformed JSON,
//! bad query parameters, path ids or headers, bad cursors); 422 when it was
//! read but its content is wrong (wrong types, unknown or missing fields,
//! unknown job type, oversized input: everything the queue calls
//! `InvalidInput`).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use queue::QueueError;
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("malformed JSON: {message}")]
    MalformedJson { message: String },
    /// Query parameters, path ids, headers or cursors that cannot be read.
    #[error("{message}")]
    InvalidRequest { field: Option<String>, message: String },
    /// A readable request whose content is not acceptable.
    #[error("{message}")]
    InvalidInput { field: Option<String>, message: String },
    #[error("a valid API key is required: send `Authorization: Bearer <key>`")]
    Unauthorized,
    #[error("this route needs an admin key")]
    Forbidden,
    #[error("{0} not found")]
    NotFound(String),
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    #[error("Idempotency-Key {key:?} was already used for a different job ({existing})")]
    IdempotencyConflict { key: String, existing: uuid::Uuid },
    #[error("job is {status}: {message}")]
    InvalidState { status: String, message: String },
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("expected `Content-Type: application/json`")]
    UnsupportedMediaType,
    #[error("range not satisfiable: the artifact is {size} bytes")]
    RangeNotSatisfiable { size: u64 },
    /// A bounded resource is used up; `limit` names the setting that bounds
    /// it, `retry_after` is in seconds.
    #[error("{what}: the limit is {max} ({limit}); retry later")]
    TooManyRequests {
        what: &'static str,
        limit: &'static str,
        max: usize,
        retry_after: u64,
    },
    #[error("the database is unavailable; try again")]
    Unavailable(#[source] QueueError),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

/// Machine-readable error codes, one per [`ApiError`] variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    MalformedJson,
    InvalidRequest,
    InvalidInput,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    IdempotencyConflict,
    InvalidState,
    PayloadTooLarge,
    UnsupportedMediaType,
    RangeNotSatisfiable,
    TooManyRequests,
    Unavailable,
    Internal,
}

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
    /// The offending field, as a path into the request (`input.prompt`,
    /// `jobs[2].type`, `cursor`), when one field is to blame; for a 429, the
    /// setting whose limit was reached (`SSE_MAX_STREAMS_PER_TENANT`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    pub fn invalid_request(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidRequest {
            field: Some(field.into()),
            message: message.into(),
        }
    }

    pub fn invalid_input(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidInput {
            field: Some(field.into()),
            message: message.into(),
        }
    }

    pub fn internal(error: impl Into<anyhow::Error>) -> Self {
        ApiError::Internal(error.into())
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            ApiError::MalformedJson { .. } => ErrorCode::MalformedJson,
            ApiError::InvalidRequest { .. } => ErrorCode::InvalidRequest,
            ApiError::InvalidInput { .. } => ErrorCode::InvalidInput,
            ApiError::Unauthorized => ErrorCode::Unauthorized,
            ApiError::Forbidden => ErrorCode::Forbidden,
            ApiError::NotFound(_) => ErrorCode::NotFound,
            ApiError::MethodNotAllowed => ErrorCode::MethodNotAllowed,
            ApiError::IdempotencyConflict { .. } => ErrorCode::IdempotencyConflict,
            ApiError::InvalidState { .. } => ErrorCode::InvalidState,
            ApiError::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
            ApiError::UnsupportedMediaType => ErrorCode::UnsupportedMediaType,
            ApiError::RangeNotSatisfiable { .. } => ErrorCode::RangeNotSatisfiable,
            ApiError::TooManyRequests { .. } => ErrorCode::TooManyRequests,
            ApiError::Unavailable(_) => ErrorCode::Unavailable,
            ApiError::Internal(_) => ErrorCode::Internal,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::MalformedJson { .. } | ApiError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::InvalidInput { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::IdempotencyConflict { .. } | ApiError::InvalidState { .. } => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn field(&self) -> Option<String> {
        match self {
            ApiError::InvalidRequest { field, .. } | ApiError::InvalidInput { field, .. } => field.clone(),
            ApiError::IdempotencyConflict { .. } => Some("Idempotency-Key".into()),
            ApiError::TooManyRequests { limit, .. } => Some((*limit).into()),
            _ => None,
        }
    }
}

impl From<QueueError> for ApiError {
    fn from(error: QueueError) -> Self {
        match error {
            // The queue's own wording ("invalid input.prompt: must not be
            // empty") already names the field.
            QueueError::InvalidInput { ref field, .. } => ApiError::InvalidInput {
                field: Some(field.clone()),
                message: error.to_string(),
            },
            QueueError::JobNotFound(id) => ApiError::NotFound(format!("job {id}")),
            QueueError::IdempotencyConflict { key, existing } => {
                ApiError::IdempotencyConflict { key, existing }
            }
            QueueError::InvalidState { status, message, .. } => ApiError::InvalidState { status, message },
            QueueError::Database(sqlx::Error::PoolTimedOut | sqlx::Error::Io(_)) => {
                ApiError::Unavailable(error)
            }
            error => ApiError::Internal(error.into()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            // The cause goes to the log (with the request id from the span),
            // never to the client.
            ApiError::Internal(cause) => tracing::error!(error = format!("{cause:#}"), "request failed"),
            ApiError::Unavailable(cause) => tracing::warn!(error = %cause, "database unavailable"),
            _ => {}
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: self.to_string(),
                field: self.field(),
            },
        };
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        match self {
            ApiError::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::RangeNotSatisfiable { size } => {
                if let Ok(value) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    headers.insert(header::CONTENT_RANGE, value);
                }
            }
            ApiError::TooManyRequests { retry_after, .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            }
            // The database is out of reach or its pool full: a client (the
            // console's streams, say) waits a moment instead of asking again
            // at once, many times over.
            ApiError::Unavailable(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(UNAVAILABLE_RETRY_AFTER));
            }
            _ => {}
        }
        response
    }
}

/// Seconds a 503 asks clients to wait.
const UNAVAILABLE_RETRY_AFTER: u32 = 2;

pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_answers_say_when_to_come_back() {
        let response = ApiError::Unavailable(QueueError::Database(sqlx::Error::PoolTimedOut)).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
    }
}
