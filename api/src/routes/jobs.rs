//! `/v1/jobs`: create (one or a batch), read, list, cancel, retry.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};
use queue::input::{InputKind, JobInput, PromptInput, TextInput};
use queue::{
    Artifact, ArtifactKind, Enqueued, Job, JobFilter, JobStatus, JobType, JobWithTasks, NewJob, Task,
    TaskStatus, TaskType,
};
use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{
    AdditionalProperties, KnownFormat, ObjectBuilder, OneOfBuilder, Schema, SchemaFormat, Type,
};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{IntoParams, PartialSchema, ToSchema};
use uuid::Uuid;

use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{from_json_value, parse_uuid, JsonBody, PathParams, QueryParams};
use crate::openapi::{
    artifact_kind_schema, job_status_schema, job_type_schema, task_status_schema, task_type_schema,
};
use crate::state::AppState;

const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Shorter than the queue's 255 bytes so that a batch's per-job keys
/// (`<key>№<index>`) still fit.
const MAX_IDEMPOTENCY_KEY_LEN: usize = 200;
const DEFAULT_PAGE: i64 = 50;
const MAX_PAGE: i64 = 200;
const CURSOR_VERSION: u8 = 1;

// ---------------------------------------------------------------- requests

/// A job to create. Its schema (see the `PartialSchema` impl below) ties
/// the input to the type, as [`CreateJobRequest::into_new_job`] checks it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateJobRequest {
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// `reading` and `text` jobs take a [`PromptInput`]; `pdf` and
    /// `audiobook` jobs a [`TextInput`].
    pub input: serde_json::Value,
    /// Higher runs first, across all tenants; -100 to 100 (default 0).
    #[serde(default)]
    pub priority: i32,
}

impl utoipa::PartialSchema for CreateJobRequest {
    /// One alternative per input kind: the job types that take it, with it.
    fn schema() -> RefOr<Schema> {
        let alternative = |kind: InputKind, input: &str| {
            let types = JobType::ALL
                .iter()
                .filter(|t| t.input_kind() == kind)
                .map(|t| t.as_str());
            let priority = ObjectBuilder::new()
                .schema_type(Type::Integer)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int32)))
                .minimum(Some(*queue::PRIORITY_RANGE.start()))
                .maximum(Some(*queue::PRIORITY_RANGE.end()))
                .default(Some(0.into()))
                .description(Some("Higher runs first, across all tenants"));
            ObjectBuilder::new()
                .schema_type(Type::Object)
                .property(
                    "type",
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .enum_values(Some(types)),
                )
                .required("type")
                .property("input", Ref::from_schema_name(input))
                .required("input")
                .property("priority", priority)
                .additional_properties(Some(AdditionalProperties::FreeForm(false)))
        };
        OneOfBuilder::new()
            .description(Some("A job to create: its type and the input that type takes"))
            .item(alternative(InputKind::Prompt, "PromptInput"))
            .item(alternative(InputKind::Text, "TextInput"))
            .into()
    }
}

impl ToSchema for CreateJobRequest {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((PromptInput::name().into(), PromptInput::schema()));
        schemas.push((TextInput::name().into(), TextInput::schema()));
    }
}

/// Many jobs, created in one transaction: all or none.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJobsRequest {
    pub jobs: Vec<CreateJobRequest>,
}

impl CreateJobRequest {
    /// Check the input against the job type (unknown fields included) and
    /// build the queue's job. `at` is where this job sits in the request.
    fn into_new_job(self, tenant: &str, at: &str) -> ApiResult<NewJob> {
        let input_at = if at.is_empty() {
            "input".to_string()
        } else {
            format!("{at}.input")
        };
        let input = match self.job_type.input_kind() {
            InputKind::Prompt => JobInput::Prompt(from_json_value(self.input, &input_at)?),
            InputKind::Text => JobInput::Text(from_json_value(self.input, &input_at)?),
        };
        let input = serde_json::to_value(input).map_err(ApiError::internal)?;
        Ok(NewJob::new(tenant, self.job_type, input).priority(self.priority))
    }
}

fn idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY_LEN)
        .ok_or_else(|| {
            ApiError::invalid_request(
                "Idempotency-Key",
                format!("must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters"),
            )
        })?;
    Ok(Some(key.to_string()))
}

// --------------------------------------------------------------- responses

/// A job as clients see it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobView {
    pub id: Uuid,
    #[serde(rename = "type")]
    #[schema(schema_with = job_type_schema)]
    pub job_type: JobType,
    #[schema(schema_with = job_status_schema)]
    pub status: JobStatus,
    pub priority: i32,
    #[schema(value_type = JobInput)]
    pub input: serde_json::Value,
    pub idempotency_key: Option<String>,
    /// Why the job failed, task by task.
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Server-Sent Events of this job's status changes.
    pub events_path: String,
}

impl From<Job> for JobView {
    fn from(job: Job) -> Self {
        JobView {
            events_path: format!("/v1/jobs/{}/events", job.id),
            id: job.id,
            job_type: job.job_type,
            status: job.status,
            priority: job.priority,
            input: job.input,
            idempotency_key: job.idempotency_key,
            error: job.error,
            created_at: job.created_at,
            updated_at: job.updated_at,
            started_at: job.started_at,
            finished_at: job.finished_at,
        }
    }
}

/// One step of a job.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskView {
    pub id: i64,
    #[serde(rename = "type")]
    #[schema(schema_with = task_type_schema)]
    pub task_type: TaskType,
    #[schema(schema_with = task_status_schema)]
    pub status: TaskStatus,
    /// Task types of this job that must complete first.
    pub depends_on: Vec<String>,
    pub attempts: i32,
    pub max_attempts: i32,
    pub last_error: Option<String>,
    /// When it is (or was) runnable; later than now while a retry backs off.
    pub run_at: DateTime<Utc>,
    pub claimed_at: Option<DateTime<Utc>>,
    pub heartbeat_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl From<Task> for TaskView {
    fn from(task: Task) -> Self {
        TaskView {
            id: task.id,
            task_type: task.task_type,
            status: task.status,
            depends_on: task.dependencies,
            attempts: task.attempts,
            max_attempts: task.max_attempts,
            last_error: task.last_error,
            run_at: task.run_at,
            claimed_at: task.claimed_at,
            heartbeat_at: task.heartbeat_at,
            created_at: task.created_at,
            finished_at: task.finished_at,
        }
    }
}

/// A file a job produced.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ArtifactView {
    pub id: Uuid,
    #[schema(schema_with = artifact_kind_schema)]
    pub kind: ArtifactKind,
    pub content_type: String,
    pub bytes: i64,
    /// Hex SHA-256 of the content; also its ETag.
    pub sha256: String,
    pub created_at: DateTime<Utc>,
    /// Where to GET the bytes (Range requests supported).
    pub download_path: String,
}

impl From<Artifact> for ArtifactView {
    fn from(a: Artifact) -> Self {
        ArtifactView {
            download_path: format!("/v1/jobs/{}/artifacts/{}", a.job_id, a.id),
            id: a.id,
            kind: a.kind,
            content_type: a.content_type,
            bytes: a.bytes,
            sha256: a.sha256,
            created_at: a.created_at,
        }
    }
}

/// A job with its tasks and artifacts.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobDetail {
    #[serde(flatten)]
    pub job: JobView,
    pub tasks: Vec<TaskView>,
    /// What its completed tasks produced.
    pub artifacts: Vec<ArtifactView>,
}

/// One job of a batch, and whether this request created it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchItem {
    /// False when an earlier request with the same Idempotency-Key did.
    pub created: bool,
    pub job: JobView,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchResponse {
    /// In request order.
    pub jobs: Vec<BatchItem>,
}

/// A page of jobs, newest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<JobView>,
    /// Pass as `cursor` for the next page; absent on the last one.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListJobsQuery {
    /// Only jobs in this status.
    #[param(schema_with = job_status_schema)]
    pub status: Option<JobStatus>,
    /// Only jobs of this type.
    #[serde(rename = "type")]
    #[param(rename = "type", schema_with = job_type_schema)]
    pub job_type: Option<JobType>,
    /// Only jobs created at or after this instant (RFC 3339), e.g. the
    /// last hour's.
    #[param(value_type = Option<DateTime<Utc>>)]
    pub created_after: Option<String>,
    /// Page size, 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

fn encode_cursor(last: Uuid) -> String {
    let mut bytes = Vec::with_capacity(17);
    bytes.push(CURSOR_VERSION);
    bytes.extend_from_slice(last.as_bytes());
    URL_SAFE_NO_PAD.encode(bytes)
}

fn decode_cursor(cursor: &str) -> ApiResult<Uuid> {
    let bad = || ApiError::invalid_request("cursor", "not a cursor this API issued");
    let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?;
    match bytes.split_first() {
        Some((&CURSOR_VERSION, id)) => Uuid::from_slice(id).map_err(|_| bad()),
        _ => Err(bad()),
    }
}

/// Read as text and parsed here so a bad value's message says what is
/// expected (chrono's own says only where it stopped).
fn parse_created_after(raw: &str) -> ApiResult<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(raw)
        .map(|at| at.with_timezone(&Utc))
        .map_err(|_| {
            ApiError::invalid_request(
                "created_after",
                format!("{raw:?} is not an RFC 3339 date-time such as 2026-12-01T09:30:00Z"),
            )
        })
}

// ---------------------------------------------------------------- handlers

/// Create a job.
#[utoipa::path(
    post, path = "/v1/jobs", tag = "jobs",
    request_body = CreateJobRequest,
    params(("Idempotency-Key" = Option<String>, Header,
        description = "Retrying with the same key returns the job the first request created (200) \
                       instead of creating another; reusing it for a different job is a 409.")),
    responses(
        (status = 201, description = "Created", body = JobView,
            headers(("Location" = String, description = "The job's path, `/v1/jobs/{id}`"))),
        (status = 200, description = "Created earlier by a request with this Idempotency-Key", body = JobView,
            headers(("Location" = String, description = "The job's path, `/v1/jobs/{id}`"))),
        (status = 400, description = "Malformed JSON or Idempotency-Key", body = ErrorBody),
        (status = 409, description = "Idempotency-Key already used for a different job", body = ErrorBody),
        (status = 413, description = "Body over the limit", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "Invalid job: type, input fields, sizes", body = ErrorBody),
    )
)]
pub async fn create_job(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    JsonBody(request): JsonBody<CreateJobRequest>,
) -> ApiResult<(StatusCode, [(header::HeaderName, String); 1], Json<JobView>)> {
    let key = idempotency_key(&headers)?;
    let mut job = request.into_new_job(&principal.tenant, "")?;
    job.idempotency_key = key;
    let enqueued = state.enqueuer.enqueue(job).await?;
    state.metrics.record_created([&enqueued]);
    let Enqueued { job, created } = enqueued;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    // RFC 9110 §15.3.2: a 201 names what it created (else it is the target,
    // /v1/jobs itself).
    let location = [(header::LOCATION, format!("/v1/jobs/{}", job.id))];
    Ok((status, location, Json(job.into())))
}

/// Create many jobs in one transaction.
#[utoipa::path(
    post, path = "/v1/jobs:batch", tag = "jobs",
    request_body = CreateJobsRequest,
    params(("Idempotency-Key" = Option<String>, Header,
        description = "Makes the whole batch replayable: job `i` is keyed `<key>№<i>` (`№` is U+2116, \
                       which no Idempotency-Key header can contain, so batch and single-job keys never collide). \
                       A replay must send the same jobs, as many and in the same order, else 409.")),
    responses(
        (status = 201, description = "Created (at least one job is new)", body = BatchResponse),
        (status = 200, description = "Every job was created earlier with this Idempotency-Key", body = BatchResponse),
        (status = 400, description = "Malformed JSON or Idempotency-Key", body = ErrorBody),
        (status = 409, description = "Idempotency-Key already used for a different batch (a job changed, added or left out)", body = ErrorBody),
        (status = 413, description = "Body over the limit", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "An invalid job (`field` says which) or too many", body = ErrorBody),
    )
)]
pub async fn create_jobs_batch(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    JsonBody(request): JsonBody<CreateJobsRequest>,
) -> ApiResult<(StatusCode, Json<BatchResponse>)> {
    let key = idempotency_key(&headers)?;
    let jobs = request
        .jobs
        .into_iter()
        .enumerate()
        .map(|(i, job)| job.into_new_job(&principal.tenant, &format!("jobs[{i}]")))
        .collect::<ApiResult<Vec<_>>>()?;
    let written = match key {
        Some(key) => state.queue.enqueue_batch_once(&key, jobs).await?,
        None => state.queue.enqueue_batch(jobs).await?,
    };
    state.metrics.record_created(&written);
    let status = if written.iter().any(|e| e.created) {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let jobs = written
        .into_iter()
        .map(|Enqueued { job, created }| BatchItem {
            created,
            job: job.into(),
        })
        .collect();
    Ok((status, Json(BatchResponse { jobs })))
}

/// A job with its tasks and artifacts.
#[utoipa::path(
    get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job", body = JobDetail),
        (status = 400, description = "Not a UUID", body = ErrorBody),
        (status = 404, description = "No such job for this tenant", body = ErrorBody),
    )
)]
pub async fn get_job(
    State(state): State<AppState>,
    principal: Principal,
    PathParams(id): PathParams<String>,
) -> ApiResult<Json<JobDetail>> {
    let id = parse_uuid("id", &id)?;
    let JobWithTasks { job, tasks } = state.queue.job_with_tasks(&principal.tenant, id).await?;
    // Only a completed task's artifact is final (the queue lists no other);
    // a job with no completed task needs no read.
    let artifacts = if tasks.iter().any(|t| t.status == TaskStatus::Complete) {
        let listed = state.queue.artifacts_of(id).await?;
        listed.into_iter().map(Into::into).collect()
    } else {
        Vec::new()
    };
    Ok(Json(JobDetail {
        job: job.into(),
        tasks: tasks.into_iter().map(Into::into).collect(),
        artifacts,
    }))
}

/// The tenant's jobs, newest first.
#[utoipa::path(
    get, path = "/v1/jobs", tag = "jobs",
    params(ListJobsQuery),
    responses(
        (status = 200, description = "A page of jobs", body = JobList),
        (status = 400, description = "Unknown or invalid parameter, or a bad cursor", body = ErrorBody),
    )
)]
pub async fn list_jobs(
    State(state): State<AppState>,
    principal: Principal,
    QueryParams(query): QueryParams<ListJobsQuery>,
) -> ApiResult<Json<JobList>> {
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid_request(
            "limit",
            format!("must be between 1 and {MAX_PAGE}, got {limit}"),
        ));
    }
    let filter = JobFilter {
        status: query.status,
        job_type: query.job_type,
        before: query.cursor.as_deref().map(decode_cursor).transpose()?,
        created_after: query
            .created_after
            .as_deref()
            .map(parse_created_after)
            .transpose()?,
        limit,
    };
    let page = state.queue.list_jobs(&principal.tenant, &filter).await?;
    Ok(Json(JobList {
        jobs: page.jobs.into_iter().map(Into::into).collect(),
        next_cursor: page.next.map(encode_cursor),
    }))
}

/// Cancel a job: its unfinished tasks stop (a worker holding one loses it
/// at its next heartbeat). Cancelling a cancelled job changes nothing.
#[utoipa::path(
    post, path = "/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id")),
    responses(
        (status = 200, description = "The cancelled job", body = JobView),
        (status = 400, description = "Not a UUID", body = ErrorBody),
        (status = 404, description = "No such job for this tenant", body = ErrorBody),
        (status = 409, description = "The job already finished", body = ErrorBody),
    )
)]
pub async fn cancel_job(
    State(state): State<AppState>,
    principal: Principal,
    PathParams(id): PathParams<String>,
) -> ApiResult<Json<JobView>> {
    let id = parse_uuid("id", &id)?;
    Ok(Json(state.queue.cancel_job(&principal.tenant, id).await?.into()))
}

/// Retry a failed job: its failed and cancelled tasks go back to pending
/// with fresh attempts.
#[utoipa::path(
    post, path = "/v1/jobs/{id}/retry", tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job, queued again", body = JobView),
        (status = 400, description = "Not a UUID", body = ErrorBody),
        (status = 404, description = "No such job for this tenant", body = ErrorBody),
        (status = 409, description = "The job has not failed", body = ErrorBody),
    )
)]
pub async fn retry_job(
    State(state): State<AppState>,
    principal: Principal,
    PathParams(id): PathParams<String>,
) -> ApiResult<Json<JobView>> {
    let id = parse_uuid("id", &id)?;
    Ok(Json(state.queue.retry_job(&principal.tenant, id).await?.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_foreign_ones_are_refused() {
        let id = Uuid::now_v7();
        assert_eq!(decode_cursor(&encode_cursor(id)).unwrap(), id);
        let uuid_text = id.to_string();
        for bad in [
            "",
            "!!",
            "AQ",
            uuid_text.as_str(),
            &URL_SAFE_NO_PAD.encode([2u8; 17]),
        ] {
            assert!(decode_cursor(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn input_fields_are_checked_against_the_job_type() {
        let request = |job_type, input| CreateJobRequest {
            job_type,
            input,
            priority: 0,
        };
        let ok = request(JobType::Text, serde_json::json!({"prompt": "p", "title": "t"}));
        assert_eq!(
            ok.into_new_job("t", "").unwrap().input,
            serde_json::json!({"prompt": "p", "title": "t"})
        );
        let wrong = request(JobType::Pdf, serde_json::json!({"prompt": "p"}));
        match wrong.into_new_job("t", "jobs[3]").unwrap_err() {
            ApiError::InvalidInput { field, .. } => {
                assert_eq!(field.as_deref(), Some("jobs[3].input.prompt"))
            }
            other => panic!("{other:?}"),
        }
        let missing = request(JobType::Audiobook, serde_json::json!({}));
        match missing.into_new_job("t", "").unwrap_err() {
            ApiError::InvalidInput { field, .. } => assert_eq!(field.as_deref(), Some("input.text")),
            other => panic!("{other:?}"),
        }
    }
}
