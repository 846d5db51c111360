//! LISTEN on the channel the schema NOTIFYs when tasks become runnable.

use std::time::Duration;

use sqlx::postgres::PgListener;

use crate::error::Result;
use crate::model::TaskType;
use crate::Queue;

/// The channel name; the payload is the task type that became runnable.
pub const RUNNABLE_CHANNEL: &str = "backlog_task_runnable";

/// A dedicated connection listening for runnable tasks. It reconnects by
/// itself after a connection loss (and reports a wake-up then, since
/// notifications may have been missed).
pub struct TaskNotifications {
    listener: PgListener,
}

impl Queue {
    pub async fn listen(&self) -> Result<TaskNotifications> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(RUNNABLE_CHANNEL).await?;
        Ok(TaskNotifications { listener })
    }
}

impl TaskNotifications {
    /// Wait up to `timeout` for a notification. Returns the task type that
    /// became runnable, `Some(None)` when a wake-up is due for another
    /// reason (reconnect, unknown payload), and `None` on timeout.
    pub async fn next(&mut self, timeout: Duration) -> Result<Option<Option<TaskType>>> {
        match tokio::time::timeout(timeout, self.listener.try_recv()).await {
            Err(_) => Ok(None),
            Ok(Ok(Some(n))) => Ok(Some(n.payload().parse().ok())),
            // Connection was lost and re-established: notifications may have
            // been dropped, so the caller should look at the queue.
            Ok(Ok(None)) => Ok(Some(None)),
            Ok(Err(e)) => Err(e.into()),
        }
    }
}
