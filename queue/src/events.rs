//! LISTEN on the channel the schema NOTIFYs when a watched job's status
//! changes, and the watches that ask for it.
//!
//! A NOTIFY makes its transaction hold a cluster-wide lock through the
//! commit's WAL flush, so notifying every job would serialise all
//! completions. Only jobs with a row in `job_watches` are notified: a reader
//! registers a watch, and the answer to that registration is the job as it
//! stands, so no change can fall between the two.

use std::time::Duration;

use sqlx::postgres::PgListener;
use uuid::Uuid;

use crate::error::Result;
use crate::model::Job;
use crate::Queue;

/// The channel name; the payload is the job id.
pub const JOB_STATUS_CHANNEL: &str = "backlog_job_status";

/// What a job-status listener reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatusEvent {
    /// This job's status changed; read the job for the new one.
    Changed(Uuid),
    /// The connection was lost and re-established, so notifications may
    /// have been missed: every watcher should re-read its job.
    Resync,
}

/// A dedicated connection listening for job status changes. It reconnects
/// by itself after a connection loss.
pub struct JobStatusNotifications {
    listener: PgListener,
}

impl Queue {
    /// Ask for notifications of this job's status changes on behalf of one
    /// `stream`, for `ttl` unless renewed. Returns the job as it is now.
    ///
    /// The job is read under a share lock in the transaction that registers
    /// the watch: a status change being written meanwhile is waited for and
    /// read, and every later one sees the watch and notifies.
    pub async fn watch_job(&self, tenant: &str, job_id: Uuid, stream: Uuid, ttl: Duration) -> Result<Job> {
        let mut tx = self.pool.begin().await?;
        let job = crate::jobs::locked_job(&mut tx, tenant, job_id, crate::jobs::RowLock::Share).await?;
        sqlx::query(
            "INSERT INTO job_watches (job_id, stream, expires_at)
             VALUES ($1, $2, now() + make_interval(secs => $3))
             ON CONFLICT (job_id, stream) DO UPDATE SET expires_at = EXCLUDED.expires_at",
        )
        .bind(job_id)
        .bind(stream)
        .bind(ttl.as_secs_f64())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(job)
    }

    /// Keep a stream's watch of a job for another `ttl`. Returns whether
    /// the watch was still there (it may have expired, or been lost in a
    /// crash: then register it again with [`Queue::watch_job`]).
    pub async fn renew_job_watch(&self, job_id: Uuid, stream: Uuid, ttl: Duration) -> Result<bool> {
        let renewed = sqlx::query(
            "UPDATE job_watches SET expires_at = now() + make_interval(secs => $3)
             WHERE job_id = $1 AND stream = $2",
        )
        .bind(job_id)
        .bind(stream)
        .bind(ttl.as_secs_f64())
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(renewed > 0)
    }

    /// Stop a stream's watch of a job.
    pub async fn unwatch_job(&self, job_id: Uuid, stream: Uuid) -> Result<()> {
        sqlx::query("DELETE FROM job_watches WHERE job_id = $1 AND stream = $2")
            .bind(job_id)
            .bind(stream)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn listen_job_status(&self) -> Result<JobStatusNotifications> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(JOB_STATUS_CHANNEL).await?;
        Ok(JobStatusNotifications { listener })
    }
}

impl JobStatusNotifications {
    /// Wait for the next status change.
    pub async fn next(&mut self) -> Result<JobStatusEvent> {
        loop {
            match self.listener.try_recv().await? {
                None => return Ok(JobStatusEvent::Resync),
                Some(n) => match Uuid::parse_str(n.payload()) {
                    Ok(id) => return Ok(JobStatusEvent::Changed(id)),
                    // Someone NOTIFYed the channel by hand: not ours to act on.
                    Err(_) => tracing::debug!(payload = n.payload(), "ignoring job status notification"),
                },
            }
        }
    }
}
