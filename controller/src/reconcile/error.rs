//! Why one pool's pass failed.

use std::time::Duration;

use crate::backend::BackendError;

/// A failed pass over one pool. The pool gets `Ready=False` with
/// [`PassError::reason`] and is retried with a growing delay; the other
/// pools go on.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error(transparent)]
    Backend(#[from] BackendError),

    /// Removing replicas needs the registry's word that they are idle.
    #[error("pool {pool}: the queue cannot be read: not removing replicas blind")]
    QueueUnreadable { pool: String },

    #[error("pool {pool}: draining replicas failed: {source}")]
    Drain {
        pool: String,
        #[source]
        source: queue::QueueError,
    },

    /// A bug: the pass panicked. The pool is retried like any failed pass.
    #[error("pool {pool}: the pass panicked: {message}")]
    Panicked { pool: String, message: String },

    /// The backend (or the database) did not answer in time. The pass was
    /// abandoned; the next one observes again and settles any mark it left.
    #[error("pool {pool}: the pass did not finish within {}s", deadline.as_secs_f64())]
    DeadlineExceeded { pool: String, deadline: Duration },
}

impl PassError {
    /// The CamelCase reason of the pool's `Ready=False` condition and of its Event.
    pub fn reason(&self) -> &'static str {
        match self {
            PassError::Backend(e) => e.reason(),
            PassError::QueueUnreadable { .. } => "QueueUnreadable",
            PassError::Drain { .. } => "DrainFailed",
            PassError::Panicked { .. } => "Panicked",
            PassError::DeadlineExceeded { .. } => "DeadlineExceeded",
        }
    }
}
