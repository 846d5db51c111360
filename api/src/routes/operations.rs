//! Operator routes: queue depth (now and over the last hour), pools,
//! health, readiness, the OpenAPI document.
//! (Metrics are served on their own address: see [`crate::metrics`].)

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::{Extension, Json};
use queue::{TaskDepth, TaskType};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::Principal;
use crate::error::{ApiResult, ErrorBody};
use crate::openapi::task_type_schema;
use crate::state::AppState;

/// The load on one task type right now.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskDepthView {
    #[schema(schema_with = task_type_schema)]
    pub task_type: TaskType,
    /// Runnable now.
    pub pending: i64,
    /// Waiting for a later run time (retries backing off).
    pub scheduled: i64,
    /// Waiting for tasks they depend on.
    pub blocked: i64,
    /// Claimed or processing.
    pub in_flight: i64,
    /// How long the oldest runnable task has waited.
    pub oldest_pending_seconds: f64,
    /// Completions in the last minute.
    pub completed_last_minute: i64,
    /// A count reached the queue's counting cap (10,000 by default) and
    /// stopped there: the figures are lower bounds.
    pub capped: bool,
}

impl From<TaskDepth> for TaskDepthView {
    fn from(d: TaskDepth) -> Self {
        TaskDepthView {
            task_type: d.task_type,
            pending: d.pending,
            scheduled: d.scheduled,
            blocked: d.blocked,
            in_flight: d.in_flight,
            oldest_pending_seconds: d.oldest_pending_seconds,
            completed_last_minute: d.completed_last_minute,
            capped: d.capped,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct QueueDepth {
    /// Every task type, idle ones with zeros.
    pub task_types: Vec<TaskDepthView>,
}

/// Queue depth per task type (admin keys only).
#[utoipa::path(
    get, path = "/v1/queue", tag = "operations",
    responses(
        (status = 200, description = "Depth per task type", body = QueueDepth),
        (status = 403, description = "Not an admin key", body = ErrorBody),
    )
)]
pub async fn queue_depth(State(state): State<AppState>, principal: Principal) -> ApiResult<Json<QueueDepth>> {
    principal.require_admin()?;
    let depth = state.queue.depth().await?;
    state.metrics.set_depth(&depth);
    Ok(Json(QueueDepth {
        task_types: depth.into_iter().map(Into::into).collect(),
    }))
}

/// The depth of every task type at one instant.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DepthSampleView {
    pub at: chrono::DateTime<chrono::Utc>,
    pub task_types: Vec<TaskDepthView>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct QueueHistory {
    /// Seconds between samples; 0 when this process samples none
    /// (`DEPTH_SAMPLE_SECONDS=0`).
    pub interval_seconds: f64,
    /// Oldest first, at most an hour's worth. Each API process keeps its
    /// own, since it started; a read that failed leaves a gap.
    pub samples: Vec<DepthSampleView>,
}

/// Queue depth per task type over the last hour, as this API process
/// sampled it (admin keys only).
#[utoipa::path(
    get, path = "/v1/queue/history", tag = "operations",
    responses(
        (status = 200, description = "Depth samples, oldest first", body = QueueHistory),
        (status = 403, description = "Not an admin key", body = ErrorBody),
    )
)]
pub async fn queue_history(
    State(state): State<AppState>,
    principal: Principal,
) -> ApiResult<Json<QueueHistory>> {
    principal.require_admin()?;
    let interval_seconds = if state.settings.depth_history.is_some() {
        state.depth_history.settings().interval.as_secs_f64()
    } else {
        0.0
    };
    let samples = state
        .depth_history
        .samples()
        .into_iter()
        .map(|sample| DepthSampleView {
            at: sample.at,
            task_types: sample.depth.into_iter().map(Into::into).collect(),
        })
        .collect();
    Ok(Json(QueueHistory {
        interval_seconds,
        samples,
    }))
}

/// One WorkerPool as its controller last reported it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PoolStatusView {
    pub pool: String,
    /// Where the replicas run: `fly`, `kubernetes` or `local`.
    pub backend: String,
    /// The task types the pool's workers claim.
    pub task_types: Vec<String>,
    /// What the last decision asked for.
    pub desired_replicas: i32,
    /// Replicas running or starting.
    pub current_replicas: i32,
    /// Replicas up and taking work.
    pub ready_replicas: i32,
    /// Replicas holding a task (never removed by a scale-down).
    pub busy_replicas: i32,
    /// Runnable tasks of the pool's task types.
    pub pending: i64,
    /// Tasks claimed or running.
    pub in_flight: i64,
    /// Kubernetes-style conditions (`Ready`, `Active`, `Fallback`, `Paused`).
    #[schema(value_type = Vec<Object>)]
    pub conditions: serde_json::Value,
    /// The last decision's reason, in words.
    pub last_decision: Option<String>,
    pub last_scale_at: Option<chrono::DateTime<chrono::Utc>>,
    /// When the pool was created (the WorkerPool's creationTimestamp on
    /// Kubernetes; when a controller first saw it elsewhere).
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// When the controller wrote this status; an old one means no controller runs.
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Pools {
    pub pools: Vec<PoolStatusView>,
}

/// Every WorkerPool's status as the controller last wrote it (admin keys only).
#[utoipa::path(
    get, path = "/v1/pools", tag = "operations",
    responses(
        (status = 200, description = "Status per pool, by name", body = Pools),
        (status = 403, description = "Not an admin key", body = ErrorBody),
    )
)]
pub async fn pools(State(state): State<AppState>, principal: Principal) -> ApiResult<Json<Pools>> {
    principal.require_admin()?;
    let pools = state
        .queue
        .pool_statuses()
        .await?
        .into_iter()
        .map(|r| PoolStatusView {
            pool: r.status.pool,
            backend: r.status.backend,
            task_types: r.status.task_types,
            desired_replicas: r.status.desired_replicas,
            current_replicas: r.status.current_replicas,
            ready_replicas: r.status.ready_replicas,
            busy_replicas: r.status.busy_replicas,
            pending: r.status.pending,
            in_flight: r.status.in_flight,
            conditions: r.status.conditions,
            last_decision: r.status.last_decision,
            last_scale_at: r.status.last_scale_at,
            created_at: r.created_at,
            updated_at: r.updated_at,
        })
        .collect();
    Ok(Json(Pools { pools }))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Up", body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok".into() })
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Readiness {
    pub ready: bool,
    pub detail: String,
}

/// The database answers and every migration is applied.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "Database unreachable or not migrated", body = Readiness),
    ))]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let (ready, detail) = match state.queue.is_ready().await {
        Ok(true) => (true, "database reachable and migrated".to_string()),
        Ok(false) => (false, "database reachable but not migrated".to_string()),
        Err(error) => {
            tracing::warn!(%error, "readiness check failed");
            (false, "database unreachable".to_string())
        }
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(Readiness { ready, detail }))
}

/// The serialized OpenAPI document, built once at startup.
#[derive(Clone)]
pub struct OpenApiJson(pub Arc<str>);

/// This API's OpenAPI 3.1 document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI document", body = Object)))]
pub async fn openapi_json(Extension(OpenApiJson(json)): Extension<OpenApiJson>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], json.to_string())
}
