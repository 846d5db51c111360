//! `GET /v1/jobs/{id}/events`: Server-Sent Events of a job's status until
//! it finishes.
//!
//! Driven by the database's job-status notifications (see
//! [`crate::job_events`]); a notification only says "this job changed", and
//! the stream then reads the job, so what it reports is always a status the
//! job really had, in order, and never one older than the last it sent.
//! The database notifies only watched jobs, so each stream registers a watch
//! for its job, renews it while open and removes it when it ends.

use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use chrono::{DateTime, Utc};
use queue::{Job, JobStatus, JobStatusEvent, Queue, QueueError};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::time::{interval_at, Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use utoipa::openapi::extensions::Extensions;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};
use uuid::Uuid;

use crate::auth::Principal;
use crate::error::{ApiResult, ErrorBody};
use crate::extract::{parse_uuid, PathParams};
use crate::openapi::job_status_schema;
use crate::state::AppState;
use crate::streams::StreamSlot;

/// The data of each `status` event.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobStatusUpdate {
    pub job_id: Uuid,
    #[schema(schema_with = job_status_schema)]
    pub status: JobStatus,
    pub error: Option<String>,
    pub updated_at: DateTime<Utc>,
}

/// One event of the stream as the OpenAPI document describes it (for
/// OpenAPI 3.1, an event stream's schema is that of each event): `event:
/// status` with a [`JobStatusUpdate`] as JSON in `data`.
pub struct StatusEvent;

impl PartialSchema for StatusEvent {
    fn schema() -> RefOr<Schema> {
        // utoipa has no `contentSchema`; an extension entry (not prefixed
        // `x-`, so validators read it) carries it.
        let content_schema: Extensions = [(
            "contentSchema",
            serde_json::json!({"$ref": format!("#/components/schemas/{}", JobStatusUpdate::name())}),
        )]
        .into_iter()
        .collect();
        let data = ObjectBuilder::new()
            .schema_type(Type::String)
            .content_media_type("application/json")
            .extensions(Some(content_schema))
            .description(Some("A `JobStatusUpdate`, as JSON"));
        let event = ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(["status"]));
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some("One server-sent event"))
            .property("event", event)
            .required("event")
            .property("data", data)
            .required("data")
            .into()
    }
}

impl ToSchema for StatusEvent {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((JobStatusUpdate::name().into(), JobStatusUpdate::schema()));
    }
}

/// Status changes of a job: one `status` event with the current status,
/// then one per change; the stream ends after a finished status
/// (`complete`, `failed`, `cancelled`), or once it has been open for
/// `SSE_MAX_STREAM_SECONDS` (reconnect to go on: the first event is the
/// status then). Open streams are capped per tenant and per server (429
/// with `Retry-After` beyond).
#[utoipa::path(
    get, path = "/v1/jobs/{id}/events", tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id")),
    responses(
        (status = 200, description = "`text/event-stream` of `status` events", content_type = "text/event-stream",
         body = StatusEvent),
        (status = 400, description = "Not a UUID", body = ErrorBody),
        (status = 404, description = "No such job for this tenant", body = ErrorBody),
        (status = 429, description = "Too many open event streams (`field` names the limit); retry after \
         `Retry-After` seconds", body = ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
pub async fn job_events(
    State(state): State<AppState>,
    principal: Principal,
    PathParams(id): PathParams<String>,
) -> ApiResult<impl IntoResponse> {
    let id = parse_uuid("id", &id)?;
    // Counted from here until the stream is dropped, whatever ends it.
    let slot = state.open_streams.open(&principal.tenant)?;
    let now = Instant::now();
    // A limit too large to add up means none: a year is as good.
    let deadline = now
        .checked_add(state.open_streams.limits().max_duration)
        .unwrap_or(now + Duration::from_secs(365 * 86_400));
    // Subscribe before the watch, so no notification can fall between them.
    let notifications = state.job_events.subscribe();
    let stream_id = Uuid::now_v7();
    let job = state
        .queue
        .watch_job(&principal.tenant, id, stream_id, WATCH_TTL)
        .await?;
    let mut renew = interval_at(Instant::now() + WATCH_RENEW_EVERY, WATCH_RENEW_EVERY);
    renew.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let watch = JobWatch {
        queue: state.queue.clone(),
        key_id: principal.key_id,
        tenant: principal.tenant,
        job_id: id,
        stream_id,
        renew,
        last_status: None,
        finished: false,
        notifications,
        shutdown: state.shutdown.clone(),
        deadline,
        _slot: slot,
    };
    let stream = futures::stream::unfold((watch, Some(job)), |(mut watch, current)| async move {
        let event = match current {
            Some(job) => watch.report(job),
            None => watch.next_change().await?,
        };
        Some((event, (watch, None)))
    });
    // axum's SSE says `no-cache`, which lets a cache keep the job's status
    // and error; `no-store`, as every answer under /v1.
    let no_store = [(header::CACHE_CONTROL, "no-store")];
    Ok((no_store, Sse::new(stream).keep_alive(KeepAlive::default())))
}

/// How long a watch lives without renewal: a stream whose API process died
/// stops costing notifications after this, and the sweeper removes it.
const WATCH_TTL: Duration = Duration::from_secs(90);
const WATCH_RENEW_EVERY: Duration = Duration::from_secs(30);

struct JobWatch {
    queue: Queue,
    /// The key the stream was opened with: once it is revoked, the stream
    /// says nothing more and ends (at the next change, or the next renewal
    /// of the watch, whichever comes first).
    key_id: Uuid,
    tenant: String,
    job_id: Uuid,
    /// This stream's watch in `job_watches`.
    stream_id: Uuid,
    renew: Interval,
    last_status: Option<JobStatus>,
    finished: bool,
    notifications: broadcast::Receiver<JobStatusEvent>,
    shutdown: CancellationToken,
    /// The stream ends here however long the job takes.
    deadline: Instant,
    _slot: StreamSlot,
}

impl JobWatch {
    /// The next status event, or `None` when the stream is over.
    async fn next_change(&mut self) -> Option<Result<Event, axum::Error>> {
        if self.finished {
            return None;
        }
        loop {
            let wake = tokio::select! {
                () = self.shutdown.cancelled() => return None,
                () = tokio::time::sleep_until(self.deadline) => return None,
                wake = self.notifications.recv() => Some(wake),
                _ = self.renew.tick() => None,
            };
            let read = match wake {
                Some(Ok(JobStatusEvent::Changed(id))) if id != self.job_id => continue,
                Some(Ok(JobStatusEvent::Changed(_))) => self.queue.job(&self.tenant, self.job_id).await,
                // Notifications may have been missed, and after a database
                // crash the (unlogged) watch itself: register it again,
                // which also reads the job.
                Some(Ok(JobStatusEvent::Resync) | Err(RecvError::Lagged(_))) => self.rewatch().await,
                Some(Err(RecvError::Closed)) => return None,
                None if !self.key_is_active().await => return None,
                None => match self
                    .queue
                    .renew_job_watch(self.job_id, self.stream_id, WATCH_TTL)
                    .await
                {
                    Ok(true) => continue,
                    Ok(false) => self.rewatch().await,
                    Err(error) => {
                        tracing::warn!(%error, job_id = %self.job_id, "could not renew a job watch");
                        continue;
                    }
                },
            };
            match read {
                Ok(job) if Some(job.status) != self.last_status => {
                    if !self.key_is_active().await {
                        return None;
                    }
                    return Some(self.report(job));
                }
                Ok(_) => {}
                // Removed by retention while watched: nothing more to say.
                Err(QueueError::JobNotFound(_)) => return None,
                Err(error) => {
                    tracing::warn!(%error, job_id = %self.job_id, "job event stream stopped");
                    return None;
                }
            }
        }
    }

    /// Whether the stream's key still admits it; a failed check counts as
    /// no (the client reconnects, and is asked for its key again).
    async fn key_is_active(&self) -> bool {
        match self.queue.api_key_is_active(self.key_id).await {
            Ok(active) => active,
            Err(error) => {
                tracing::warn!(%error, job_id = %self.job_id, "could not check a stream's key; ending it");
                false
            }
        }
    }

    async fn rewatch(&self) -> queue::Result<Job> {
        self.queue
            .watch_job(&self.tenant, self.job_id, self.stream_id, WATCH_TTL)
            .await
    }

    fn report(&mut self, job: Job) -> Result<Event, axum::Error> {
        self.last_status = Some(job.status);
        self.finished = job.status.is_finished();
        Event::default().event("status").json_data(JobStatusUpdate {
            job_id: job.id,
            status: job.status,
            error: job.error,
            updated_at: job.updated_at,
        })
    }
}

impl Drop for JobWatch {
    /// The stream ended (finished job, client gone, shutdown): stop the
    /// job's notifications for it. Should this fail, the watch expires.
    fn drop(&mut self) {
        let queue = self.queue.clone();
        let (job_id, stream) = (self.job_id, self.stream_id);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = queue.unwatch_job(job_id, stream).await {
                    tracing::debug!(%error, "could not remove a job watch; it will expire");
                }
            });
        }
    }
}
