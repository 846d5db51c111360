//! `GET /v1/jobs/{id}/artifacts`: what a job's completed tasks produced;
//! `GET /v1/jobs/{id}/artifacts/{artifact_id}`: an artifact's bytes, whole
//! or by range.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::Json;
use serde::Serialize;
use store::StoreError;
use utoipa::ToSchema;

use crate::auth::Principal;
use crate::byte_range::{self, RangeRequest};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{parse_uuid, PathParams};
use crate::routes::jobs::ArtifactView;
use crate::state::AppState;

/// An artifact may stay in the browser that fetched it, checked again by
/// its ETag before each use (RFC 9111 5.2.2.4), and in no shared cache.
const PRIVATE_REVALIDATED: &str = "private, no-cache";

/// A job's artifacts.
#[derive(Debug, Serialize, ToSchema)]
pub struct ArtifactList {
    /// What the job's completed tasks produced, as in the job's own view.
    pub artifacts: Vec<ArtifactView>,
}

/// The job's artifacts (the same list `GET /v1/jobs/{id}` includes), each
/// with its `download_path`.
#[utoipa::path(
    get, path = "/v1/jobs/{id}/artifacts", tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job's artifacts", body = ArtifactList),
        (status = 400, description = "Not a UUID", body = ErrorBody),
        (status = 404, description = "No such job for this tenant", body = ErrorBody),
    )
)]
pub async fn list_artifacts(
    State(state): State<AppState>,
    principal: Principal,
    PathParams(job_id): PathParams<String>,
) -> ApiResult<Json<ArtifactList>> {
    let job_id = parse_uuid("id", &job_id)?;
    // The job is read first: another tenant's job is a 404, not an empty list.
    state.queue.job(&principal.tenant, job_id).await?;
    let artifacts = state.queue.artifacts_of(job_id).await?;
    Ok(Json(ArtifactList {
        artifacts: artifacts.into_iter().map(Into::into).collect(),
    }))
}

/// The artifact's bytes with its content type and length. `Range:
/// bytes=…` (one range) answers 206 with `Content-Range`; `If-Range` with
/// the ETag (the SHA-256) is honoured.
#[utoipa::path(
    get, path = "/v1/jobs/{id}/artifacts/{artifact_id}", tag = "jobs",
    params(
        ("id" = Uuid, Path, description = "Job id"),
        ("artifact_id" = Uuid, Path, description = "Artifact id"),
        ("Range" = Option<String>, Header, description = "One byte range, e.g. `bytes=0-1023`"),
        ("If-None-Match" = Option<String>, Header, description = "ETags of copies the client holds; 304 when one is current"),
    ),
    responses(
        (status = 200, description = "The whole artifact, in the content type it was recorded with",
            content((Vec<u8> = "text/markdown"), (Vec<u8> = "application/pdf"), (Vec<u8> = "audio/mpeg")),
            headers(("Content-Disposition" = String, description = "`inline; filename=\"<job>-<kind>.<ext>\"`: the name to save it under"))),
        (status = 304, description = "`If-None-Match` names the artifact's ETag (its SHA-256): the copy the client holds is current"),
        (status = 206, description = "The requested range, in the artifact's content type",
            content((Vec<u8> = "text/markdown"), (Vec<u8> = "application/pdf"), (Vec<u8> = "audio/mpeg"))),
        (status = 400, description = "Not a UUID", body = ErrorBody),
        (status = 404, description = "No such artifact of this tenant's job", body = ErrorBody),
        (status = 416, description = "Range outside the artifact", body = ErrorBody),
    )
)]
pub async fn download_artifact(
    State(state): State<AppState>,
    principal: Principal,
    PathParams((job_id, artifact_id)): PathParams<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let job_id = parse_uuid("id", &job_id)?;
    let artifact_id = parse_uuid("artifact_id", &artifact_id)?;
    let artifact = state
        .queue
        .artifact(&principal.tenant, job_id, artifact_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("artifact {artifact_id}")))?;
    let key = &artifact.storage_key;
    let etag = format!("\"{}\"", artifact.sha256);
    // RFC 9110 13.2.2: If-None-Match is answered before any Range. A client
    // holding these bytes (the ETag is their SHA-256) gets 304, no body.
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| none_match_fails(tags, &etag))
    {
        return Response::builder()
            .status(StatusCode::NOT_MODIFIED)
            .header(header::ETAG, etag)
            .header(header::CACHE_CONTROL, PRIVATE_REVALIDATED)
            .body(Body::empty())
            .map_err(ApiError::internal);
    }
    let size = state.artifacts.size(key).await.map_err(store_error)?;

    let if_range_holds = headers
        .get(header::IF_RANGE)
        .is_none_or(|v| v.as_bytes() == etag.as_bytes());
    let range_header = headers
        .get(header::RANGE)
        .filter(|_| if_range_holds)
        .and_then(|v| v.to_str().ok());
    let (status, range) = match byte_range::resolve(range_header, size) {
        RangeRequest::Full => (StatusCode::OK, 0..size),
        RangeRequest::Partial(range) => (StatusCode::PARTIAL_CONTENT, range),
        RangeRequest::Unsatisfiable => return Err(ApiError::RangeNotSatisfiable { size }),
    };
    let length = range.end - range.start;
    let content_range = (status == StatusCode::PARTIAL_CONTENT)
        .then(|| format!("bytes {}-{}/{size}", range.start, range.end - 1));
    // An empty range is no request the store accepts (and an empty
    // artifact has only that one): there is nothing to read.
    let body = if length == 0 {
        Body::empty()
    } else {
        Body::from_stream(
            state
                .artifacts
                .stream_range(key, range)
                .await
                .map_err(store_error)?,
        )
    };

    let content_type = HeaderValue::from_str(&artifact.content_type)
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    let mut response = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, length)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, etag)
        .header(header::CACHE_CONTROL, PRIVATE_REVALIDATED)
        // The content type is the worker's word; never let a browser guess.
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(header::CONTENT_DISPOSITION, content_disposition(&artifact));
    if let Some(content_range) = content_range {
        response = response.header(header::CONTENT_RANGE, content_range);
    }
    response.body(body).map_err(ApiError::internal)
}

/// Shown in the browser where it can be, saved under a name that says what
/// it is (`<job>-audio.mp3`), not under the artifact's id (RFC 6266). The
/// extension is the one the worker stored it under.
fn content_disposition(artifact: &queue::Artifact) -> String {
    let extension = artifact
        .storage_key
        .rsplit_once('.')
        .map(|(_, ext)| ext)
        .filter(|ext| (1..=8).contains(&ext.len()) && ext.bytes().all(|b| b.is_ascii_alphanumeric()));
    let name = format!("{}-{}", artifact.job_id, artifact.kind.as_str());
    match extension {
        Some(ext) => format!("inline; filename=\"{name}.{ext}\""),
        None => format!("inline; filename=\"{name}\""),
    }
}

/// Whether an `If-None-Match` list (`*`, or entity tags separated by
/// commas) names `etag`, compared weakly as RFC 9110 13.1.2 asks: then the
/// condition fails and the answer is 304.
fn none_match_fails(tags: &str, etag: &str) -> bool {
    let opaque = |tag: &str| tag.trim().trim_start_matches("W/").to_owned();
    tags.trim() == "*" || tags.split(',').any(|tag| opaque(tag) == opaque(etag))
}

fn store_error(error: StoreError) -> ApiError {
    match error {
        StoreError::NotFound { .. } => ApiError::NotFound("artifact content".into()),
        error => ApiError::internal(error),
    }
}
