use thiserror::Error;

/// Everything the queue can refuse or fail at.
#[derive(Debug, Error)]
pub enum QueueError {
    /// The caller asked for something the queue will not store or do.
    #[error("invalid {field}: {message}")]
    InvalidInput { field: String, message: String },
    /// No such job for this tenant (another tenant's job is "not found" too).
    #[error("job {0} not found")]
    JobNotFound(uuid::Uuid),
    /// The task is no longer held by this worker under this claim: it was
    /// swept, released, re-claimed or cancelled. The result must be dropped.
    #[error("task {task_id} is no longer held by {worker_id} under claim {claim}")]
    LeaseLost {
        task_id: i64,
        worker_id: String,
        claim: i32,
    },
    /// The same idempotency key was used before with a different request.
    #[error("idempotency key {key:?} was already used for a different job ({existing})")]
    IdempotencyConflict { key: String, existing: uuid::Uuid },
    /// The job is in a state where the operation does not apply.
    #[error("job {job_id} is {status}: {message}")]
    InvalidState {
        job_id: uuid::Uuid,
        status: String,
        message: String,
    },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl QueueError {
    /// Whether the same call may succeed if made again: the database aborted
    /// it or could not be reached (see [`crate::is_transient`]). The caller's
    /// input was not at fault.
    pub fn is_transient(&self) -> bool {
        matches!(self, QueueError::Database(e) if crate::is_transient(e))
    }

    pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        QueueError::InvalidInput {
            field: field.into(),
            message: message.into(),
        }
    }
}

pub type Result<T, E = QueueError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_database_that_failed_the_call_is_worth_another_try() {
        assert!(QueueError::Database(sqlx::Error::PoolTimedOut).is_transient());
        assert!(!QueueError::Database(sqlx::Error::RowNotFound).is_transient());
        assert!(!QueueError::invalid("tenant", "must not be empty").is_transient());
        assert!(!QueueError::JobNotFound(uuid::Uuid::nil()).is_transient());
    }
}
