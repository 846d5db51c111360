//! LISTEN on the channel the schema NOTIFYs when a job's status changes.

use sqlx::postgres::PgListener;
use uuid::Uuid;

use crate::error::Result;
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
