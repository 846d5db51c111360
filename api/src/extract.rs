//! Request extractors whose rejections are [`ApiError`]s naming the
//! offending field, instead of axum's plain-text rejections.

use axum::body::Bytes;
use axum::extract::path::ErrorKind as PathErrorKind;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::error::ApiError;
use crate::state::AppState;

/// A JSON request body. Answers 415 without a JSON content type, 413 over
/// the body limit, 400 for malformed JSON and 422 for JSON of the wrong
/// shape (with the path of the field at fault).
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        if !has_json_content_type(req.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge {
                    limit: state.settings.body_limit_bytes,
                }
            } else {
                ApiError::InvalidRequest {
                    field: None,
                    message: rejection.body_text(),
                }
            }
        })?;
        parse_json(&bytes).map(JsonBody)
    }
}

fn has_json_content_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Parse JSON: a document that is not JSON is a 400, JSON of the wrong
/// shape a 422. Checking the syntax first matters: a streaming parse would
/// report a bad field before noticing that the document is cut short.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| ApiError::MalformedJson {
        message: e.to_string(),
    })?;
    from_json_value(value, "")
}

/// Deserialize a JSON value already in hand (a job's `input`), prefixing
/// error paths with where the value sits in the request.
pub fn from_json_value<T: DeserializeOwned>(value: serde_json::Value, at: &str) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let field = match (field_path(error.path(), error.inner()), at) {
            (Some(inner), "") => Some(inner),
            (Some(inner), at) => Some(format!("{at}.{inner}")),
            (None, "") => None,
            (None, at) => Some(at.to_string()),
        };
        ApiError::InvalidInput {
            field,
            message: error.inner().to_string(),
        }
    })
}

/// The path of the field at fault: for an unknown or missing field, the
/// field itself rather than the object that holds it.
fn field_path(path: &serde_path_to_error::Path, error: &impl std::fmt::Display) -> Option<String> {
    let mut path = path.to_string();
    if path == "." {
        path.clear();
    }
    let message = error.to_string();
    let named = ["unknown field `", "missing field `"]
        .iter()
        .find_map(|lead| message.strip_prefix(lead))
        .and_then(|rest| rest.split('`').next());
    // serde_path_to_error sometimes reports these at the enclosing object
    // and sometimes at the field itself; always name the field.
    if let Some(name) = named {
        if path.rsplit('.').next() != Some(name) {
            path = if path.is_empty() {
                name.to_string()
            } else {
                format!("{path}.{name}")
            };
        }
    }
    (!path.is_empty()).then_some(path)
}

/// Query parameters; unreadable or unknown ones answer 400 naming them.
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or("");
        let deserializer = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(deserializer)
            .map(QueryParams)
            .map_err(|error| ApiError::InvalidRequest {
                field: field_path(error.path(), error.inner()),
                message: error.inner().to_string(),
            })
    }
}

/// Path parameters. A rejection (a parameter whose percent-decoding is not
/// UTF-8, `/v1/jobs/%FF`) answers 400 in the API's JSON error body naming
/// the parameter, not in axum's plain text.
pub struct PathParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for PathParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(PathParams(value)),
            Err(rejection) => {
                let field = match &rejection {
                    PathRejection::FailedToDeserializePathParams(e) => match e.kind() {
                        PathErrorKind::InvalidUtf8InPathParam { key }
                        | PathErrorKind::ParseErrorAtKey { key, .. } => Some(key.clone()),
                        _ => None,
                    },
                    _ => None,
                };
                Err(ApiError::InvalidRequest {
                    field,
                    message: rejection.body_text(),
                })
            }
        }
    }
}

/// A UUID from the path; anything else answers 400 naming the parameter.
pub fn parse_uuid(field: &str, raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::invalid_request(field, format!("{raw:?} is not a UUID")))
}
