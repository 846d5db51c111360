//! The task lifecycle as a worker sees it: claim, heartbeat, complete, fail,
//! release. Every call after the claim presents the [`Lease`]; the database
//! refuses one that is no longer held.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::PgRow;
use sqlx::{FromRow, Row};
use uuid::Uuid;

use crate::error::{QueueError, Result};
use crate::model::{Lease, Task, TaskStatus, TaskType};
use crate::Queue;

/// Whether another attempt could succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// Timeouts, 429/5xx from a provider, storage hiccups: retry with backoff.
    Retryable,
    /// Bad input or a 4xx: retrying cannot help, so the task fails now.
    Permanent,
}

/// The longest wait a failure may ask for before its retry. Providers ask
/// for seconds to minutes (a daily quota's reset at most hours); a larger
/// figure is a malformed header, not a plan.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// Why a task attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
    /// The least wait before a retry, when whoever refused the work said
    /// (a provider's `Retry-After`): the retry runs no earlier, even when
    /// the queue's own backoff would be shorter.
    pub retry_after: Option<Duration>,
}

impl Failure {
    pub fn retryable(message: impl Into<String>) -> Self {
        Failure {
            kind: FailureKind::Retryable,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Failure {
            kind: FailureKind::Permanent,
            message: message.into(),
            retry_after: None,
        }
    }

    /// This failure, retried no earlier than `wait` from now.
    /// A wait past [`MAX_RETRY_AFTER`] is held to it.
    pub fn with_retry_after(self, wait: Duration) -> Self {
        Failure {
            retry_after: Some(wait.min(MAX_RETRY_AFTER)),
            ..self
        }
    }
}

/// What became of a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOutcome {
    /// Back to pending; runnable again at this time.
    RetryAt(DateTime<Utc>),
    /// Out of attempts, or the failure was permanent.
    Failed,
}

impl Queue {
    /// Claim up to `limit` runnable tasks of these types for `worker_id`
    /// through the `claim_tasks` SQL function. They are `claimed` until the
    /// first heartbeat marks them `processing`.
    pub async fn claim(&self, worker_id: &str, task_types: &[TaskType], limit: i32) -> Result<Vec<Task>> {
        self.take(
            "SELECT * FROM claim_tasks($1, $2, $3, $4)",
            worker_id,
            task_types,
            limit,
        )
        .await
    }

    /// Claim as [`Queue::claim`] does and mark the tasks `processing` at
    /// once (`claim_and_start_tasks`): for a caller that starts their work
    /// as soon as the claim returns, so no heartbeat is needed to say so.
    pub async fn claim_and_start(
        &self,
        worker_id: &str,
        task_types: &[TaskType],
        limit: i32,
    ) -> Result<Vec<Task>> {
        self.take(
            "SELECT * FROM claim_and_start_tasks($1, $2, $3, $4)",
            worker_id,
            task_types,
            limit,
        )
        .await
    }

    async fn take(
        &self,
        sql: &'static str,
        worker_id: &str,
        task_types: &[TaskType],
        limit: i32,
    ) -> Result<Vec<Task>> {
        let types = claim_arguments(worker_id, task_types, limit)?;
        // Safe to repeat: a repeat with the nonce of a call that committed
        // (its answer lost) returns that call's tasks, not more.
        let nonce = Uuid::now_v7();
        Ok(retry_transient(|| {
            sqlx::query_as(sql)
                .bind(worker_id)
                .bind(&types)
                .bind(limit)
                .bind(nonce)
                .fetch_all(&self.pool)
        })
        .await?)
    }

    /// Renew leases; marks claimed tasks as processing. Returns the leases
    /// that are no longer held (cancelled or swept): abandon those.
    pub async fn heartbeat(&self, worker_id: &str, leases: &[Lease]) -> Result<Vec<Lease>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let held = self
            .lease_call(
                "SELECT task_id FROM heartbeat_tasks($1, $2, $3)",
                worker_id,
                leases,
            )
            .await?;
        Ok(leases
            .iter()
            .filter(|l| !held.contains(&l.task_id))
            .copied()
            .collect())
    }

    /// Complete one held task with its output.
    pub async fn complete(&self, worker_id: &str, lease: Lease, output: serde_json::Value) -> Result<()> {
        let done = self.complete_batch(worker_id, &[(lease, output)]).await?;
        if done.is_empty() {
            return Err(QueueError::LeaseLost {
                task_id: lease.task_id,
                worker_id: worker_id.into(),
                claim: lease.claim,
            });
        }
        Ok(())
    }

    /// Complete many held tasks in one round trip. Returns the leases that
    /// were completed; the others were no longer held and were not applied.
    pub async fn complete_batch(
        &self,
        worker_id: &str,
        results: &[(Lease, serde_json::Value)],
    ) -> Result<Vec<Lease>> {
        if results.is_empty() {
            return Ok(Vec::new());
        }
        let batch = completion_arrays(results);
        let done: Vec<i64> = retry_transient(|| {
            sqlx::query_scalar("SELECT task_id FROM complete_tasks($1, $2, $3, $4, $5)")
                .bind(worker_id)
                .bind(&batch.ids)
                .bind(&batch.job_ids)
                .bind(&batch.claims)
                .bind(&batch.outputs)
                .fetch_all(&self.pool)
        })
        .await?;
        Ok(leases_among(results, &done))
    }

    /// Complete held tasks and claim up to `limit` more, started, in one
    /// round trip and one transaction (`complete_and_claim_next`): what
    /// [`Queue::complete_batch`] then [`Queue::claim_and_start`] would do,
    /// for a worker whose finished tasks free the slots it claims for.
    /// A draining worker's completions are stored and nothing is claimed.
    pub async fn complete_and_claim(
        &self,
        worker_id: &str,
        results: &[(Lease, serde_json::Value)],
        task_types: &[TaskType],
        limit: i32,
    ) -> Result<CompletedAndClaimed> {
        let types = claim_arguments(worker_id, task_types, limit)?;
        let batch = completion_arrays(results);
        // Safe to repeat, as each half is: a completion whose answer was
        // lost is reported again, and a claim repeated with its nonce
        // returns the tasks it took.
        let nonce = Uuid::now_v7();
        let rows: Vec<PgRow> = retry_transient(|| {
            sqlx::query("SELECT * FROM complete_and_claim_next($1, $2, $3, $4, $5, $6, $7, $8)")
                .bind(worker_id)
                .bind(&batch.ids)
                .bind(&batch.job_ids)
                .bind(&batch.claims)
                .bind(&batch.outputs)
                .bind(&types)
                .bind(limit)
                .bind(nonce)
                .fetch_all(&self.pool)
        })
        .await?;
        // A completed task's row is its id and status alone.
        let mut done = Vec::new();
        let mut claimed = Vec::new();
        for row in rows {
            if row.try_get::<&str, _>("status")? == TaskStatus::Complete.as_str() {
                done.push(row.try_get::<i64, _>("id")?);
            } else {
                claimed.push(Task::from_row(&row)?);
            }
        }
        Ok(CompletedAndClaimed {
            completed: leases_among(results, &done),
            claimed,
        })
    }

    /// Record a failed attempt: retried after a capped exponential backoff
    /// with jitter (or the failure's `retry_after`, when longer) while
    /// attempts remain and the failure is retryable, failed otherwise (and
    /// the tasks that depended on it are cancelled).
    pub async fn fail(&self, worker_id: &str, lease: Lease, failure: &Failure) -> Result<RetryOutcome> {
        let row: Option<(String, DateTime<Utc>)> = retry_transient(|| {
            sqlx::query_as("SELECT status, run_at FROM fail_task($1, $2, $3, $4, $5, $6, $7, $8)")
                .bind(worker_id)
                .bind(lease.task_id)
                .bind(lease.claim)
                .bind(&failure.message)
                .bind(failure.kind == FailureKind::Retryable)
                .bind(self.config.retry_base.as_secs_f64())
                .bind(self.config.retry_cap.as_secs_f64())
                // Held to the bound here too, since the field is public: a
                // wait past what an interval holds would fail the call and
                // leave the lease to the sweeper.
                .bind(
                    failure
                        .retry_after
                        .map(|wait| wait.min(MAX_RETRY_AFTER).as_secs_f64()),
                )
                .fetch_optional(&self.pool)
        })
        .await?;
        match row {
            None => Err(QueueError::LeaseLost {
                task_id: lease.task_id,
                worker_id: worker_id.into(),
                claim: lease.claim,
            }),
            Some((status, run_at)) if status == "pending" => Ok(RetryOutcome::RetryAt(run_at)),
            Some(_) => Ok(RetryOutcome::Failed),
        }
    }

    /// Hand unfinished tasks back to pending without spending an attempt.
    /// Returns the leases released.
    pub async fn release(&self, worker_id: &str, leases: &[Lease]) -> Result<Vec<Lease>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let released = self
            .lease_call("SELECT task_id FROM release_tasks($1, $2, $3)", worker_id, leases)
            .await?;
        Ok(leases
            .iter()
            .filter(|l| released.contains(&l.task_id))
            .copied()
            .collect())
    }

    /// The output of a job's completed task of this type (how a pdf task finds
    /// the text it typesets).
    pub async fn task_output(
        &self,
        job_id: uuid::Uuid,
        task_type: TaskType,
    ) -> Result<Option<serde_json::Value>> {
        Ok(sqlx::query_scalar(
            "SELECT output FROM all_tasks WHERE job_id = $1 AND task_type = $2 AND status = 'complete'",
        )
        .bind(job_id)
        .bind(task_type.as_str())
        .fetch_optional(&self.pool)
        .await?
        .flatten())
    }

    async fn lease_call(&self, sql: &'static str, worker_id: &str, leases: &[Lease]) -> Result<Vec<i64>> {
        let ids: Vec<i64> = leases.iter().map(|l| l.task_id).collect();
        let claims: Vec<i32> = leases.iter().map(|l| l.claim).collect();
        Ok(retry_transient(|| {
            sqlx::query_scalar(sql)
                .bind(worker_id)
                .bind(&ids)
                .bind(&claims)
                .fetch_all(&self.pool)
        })
        .await?)
    }
}

/// What [`Queue::complete_and_claim`] did.
#[derive(Debug, Default)]
pub struct CompletedAndClaimed {
    /// The leases completed; the others were no longer held and were not applied.
    pub completed: Vec<Lease>,
    /// The tasks claimed, already `processing`.
    pub claimed: Vec<Task>,
}

/// A claim's arguments checked, with the task types as the SQL functions
/// take them.
fn claim_arguments<'t>(worker_id: &str, task_types: &'t [TaskType], limit: i32) -> Result<Vec<&'t str>> {
    if worker_id.is_empty() {
        return Err(QueueError::invalid("worker_id", "must not be empty"));
    }
    if task_types.is_empty() {
        return Err(QueueError::invalid(
            "task_types",
            "at least one task type is required",
        ));
    }
    if limit < 1 {
        return Err(QueueError::invalid(
            "limit",
            format!("must be at least 1, got {limit}"),
        ));
    }
    Ok(task_types.iter().map(|t| t.as_str()).collect())
}

/// Completions as the SQL functions take them: task ids, job ids, claims,
/// outputs.
fn completion_arrays(results: &[(Lease, serde_json::Value)]) -> CompletionArrays<'_> {
    CompletionArrays {
        ids: results.iter().map(|(l, _)| l.task_id).collect(),
        job_ids: results.iter().map(|(l, _)| l.job_id).collect(),
        claims: results.iter().map(|(l, _)| l.claim).collect(),
        outputs: results.iter().map(|(_, o)| o).collect(),
    }
}

/// A batch of completions as `complete_tasks` takes them: one array per
/// field, in the batch's order.
struct CompletionArrays<'a> {
    ids: Vec<i64>,
    job_ids: Vec<Uuid>,
    claims: Vec<i32>,
    outputs: Vec<&'a serde_json::Value>,
}

/// The leases of `results` whose task is among `done`.
fn leases_among(results: &[(Lease, serde_json::Value)], done: &[i64]) -> Vec<Lease> {
    results
        .iter()
        .map(|(l, _)| *l)
        .filter(|l| done.contains(&l.task_id))
        .collect()
}

/// Run a lifecycle call again when it failed for a reason that a repeat
/// can cure: PostgreSQL aborted it (deadlock victim, serialization failure,
/// a server shutting down) or the connection broke. Every call passed here
/// is safe to repeat: an aborted transaction changed nothing, and one that
/// committed before the connection broke is answered the same again (a
/// completion reports what its lease completed) or refused by the fence.
pub(crate) async fn retry_transient<T, F, Fut>(mut call: F) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    // 25 ms doubling to 1 s, about 5 s in all: a deadlock is cured by the
    // first repeat, a server's fast restart within the window.
    const TRIES: u32 = 10;
    let mut tries = 0;
    loop {
        match call().await {
            Err(e) if tries + 1 < TRIES && is_transient(&e) => {
                tries += 1;
                let delay = std::time::Duration::from_millis((25u64 << (tries - 1)).min(1000));
                tracing::debug!(tries, error = %e, "transient database error; retrying");
                tokio::time::sleep(delay).await;
            }
            result => return result,
        }
    }
}

/// Errors after which the same call may succeed.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => matches!(
            db.code().as_deref(),
            // deadlock, serialization failure, a lock not had within the
            // call's own lock_timeout, admin/crash shutdown, cannot connect
            // now, and the connection-exception class.
            Some("40P01" | "40001" | "55P03" | "57P01" | "57P02" | "57P03" | "08000" | "08003" | "08006")
        ),
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Protocol(_) => true,
        _ => false,
    }
}
