//! backlog's PostgreSQL job queue.
//!
//! This crate owns every SQL statement backlog runs: the schema lives in
//! `migrations/` at the workspace root and is embedded here as [`MIGRATOR`].
//! Hot-path operations (claim, complete, fail, heartbeat, release, sweep) are
//! SQL functions, so each is one round trip and one transaction; everything
//! else is a short transaction of bound statements.

mod artifacts;
mod depth;
mod error;
mod events;
mod jobs;
mod keys;
mod leader;
mod maintenance;
mod model;
mod notify;
mod pools;
mod registry;
mod tasks;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

pub use artifacts::{Artifact, ArtifactKind, NewArtifact};
pub use depth::TaskDepth;
pub use error::{QueueError, Result};
pub use events::{JobStatusEvent, JobStatusNotifications, JOB_STATUS_CHANNEL};
pub use jobs::{Enqueued, JobFilter, JobPage, JobWithTasks, PRIORITY_RANGE};
pub use keys::{ApiKey, ApiKeyRole, NewApiKey};
pub use leader::Leadership;
pub use maintenance::{Retention, RetentionMode, SweepOutcome, SweptTask};
pub use model::{Job, JobStatus, JobType, Lease, NewJob, Task, TaskPlan, TaskStatus, TaskType};
pub use notify::{TaskNotifications, RUNNABLE_CHANNEL};
pub use pools::{PoolStatus, PoolStatusRecord};
pub use registry::{NewWorker, ReplicaLoad, WorkerRecord, WorkerState};
pub use tasks::{Failure, FailureKind, RetryOutcome};

/// The schema, applied with `queue.migrate()` or `api migrate`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Limits and retry settings. The defaults work without tuning.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// Largest accepted job input, serialised as JSON.
    pub max_input_bytes: usize,
    /// Jobs accepted in one batch enqueue.
    pub max_batch_jobs: usize,
    /// First retry delay; each later attempt doubles it, up to `retry_cap`.
    pub retry_base: Duration,
    pub retry_cap: Duration,
    /// Depth counts stop here (reported with `capped`), so reading the depth
    /// stays cheap however deep the backlog: no pool needs more than
    /// `maxReplicas × tasksPerReplica` to decide.
    pub depth_count_cap: i64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_input_bytes: 256 * 1024,
            max_batch_jobs: 1000,
            retry_base: Duration::from_secs(2),
            retry_cap: Duration::from_secs(600),
            depth_count_cap: 10_000,
        }
    }
}

/// A handle on the queue: a connection pool and the settings.
#[derive(Debug, Clone)]
pub struct Queue {
    pool: PgPool,
    config: QueueConfig,
}

impl Queue {
    /// Connect with a pool sized for `max_connections`.
    pub async fn connect(database_url: &str, max_connections: u32) -> Result<Self> {
        let options: PgConnectOptions = database_url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.application_name("backlog"))
            .await?;
        Ok(Queue::new(pool))
    }

    pub fn new(pool: PgPool) -> Self {
        Queue {
            pool,
            config: QueueConfig::default(),
        }
    }

    pub fn with_config(mut self, config: QueueConfig) -> Self {
        self.config = config;
        self
    }

    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Apply pending migrations.
    pub async fn migrate(&self) -> Result<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// True when the database answers and every known migration is applied.
    pub async fn is_ready(&self) -> Result<bool> {
        let applied: i64 =
            sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success AND version = ANY($1)")
                .bind(MIGRATOR.iter().map(|m| m.version).collect::<Vec<_>>())
                .fetch_one(&self.pool)
                .await
                .or_else(|e| match e {
                    // No migrations table yet: reachable, not migrated.
                    sqlx::Error::Database(db) if db.code().as_deref() == Some("42P01") => Ok(0),
                    e => Err(e),
                })?;
        Ok(applied as usize == MIGRATOR.iter().count())
    }
}
