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
pub mod input;
mod jobs;
mod keys;
mod leader;
mod maintenance;
mod model;
mod notify;
mod pools;
mod registry;
mod tasks;
mod vacuum;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgPool};

pub use artifacts::{artifact_prefix, day_folder, Artifact, ArtifactKind, NewArtifact};
pub use depth::TaskDepth;
pub use error::{QueueError, Result};
pub use events::{JobStatusEvent, JobStatusNotifications, JOB_STATUS_CHANNEL};
pub use jobs::{
    batch_item_key, validate_new_job, Enqueued, JobFilter, JobPage, JobWithTasks, BATCH_KEY_SEPARATOR,
    PRIORITY_RANGE,
};
pub use keys::{ApiKey, ApiKeyRole, NewApiKey};
pub use leader::Leadership;
pub use maintenance::{RepairedJob, Retention, RetentionMode, RetiredDay, SweepOutcome, SweptTask};
pub use model::{Job, JobStatus, JobType, Lease, NewJob, Task, TaskPlan, TaskStatus, TaskType};
pub use notify::{TaskNotifications, RUNNABLE_CHANNEL};
pub use pools::{PoolStatus, PoolStatusRecord};
pub use registry::{NewWorker, ReplicaLoad, WorkerRecord, WorkerState};
pub use tasks::{is_transient, CompletedAndClaimed, Failure, FailureKind, RetryOutcome, MAX_RETRY_AFTER};
pub use vacuum::{TaskVacuum, VacuumOutcome};

/// The schema, applied with `queue.migrate()` or `api migrate`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// How long [`Queue::connect`] waits for a database that cannot be reached.
pub const CONNECT_PATIENCE: Duration = Duration::from_secs(120);

/// A pooled connection taken again within this long of its return is not
/// pinged first (see [`pool_options`]).
pub const PING_WHEN_IDLE_FOR: Duration = Duration::from_secs(1);

/// The pool [`Queue::connect`] makes, for up to `max_connections`.
///
/// sqlx pings a connection as it returns to the pool (dropping one that
/// broke) and, by default, again as it is taken: a round trip before every
/// statement, about 0.15 ms of the 2 ms from enqueue to claim on a
/// 2-core machine, twice on an enqueue. A connection taken again within
/// [`PING_WHEN_IDLE_FOR`] of the ping on its return is used as it is; one
/// idle for longer is pinged, as before, so a pool that sat through a
/// database restart finds its connections gone without failing a call.
/// (HikariCP skips its check the same way, for 500 ms.) One gap: sqlx's
/// maintenance pass, every 10 minutes, puts each idle connection back
/// without a ping, which restarts its idle time; a restart that
/// connection missed then fails one call taken within the second after.
/// The calls safe to repeat repeat it.
pub fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_WHEN_IDLE_FOR {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
}

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
    /// How far one job moves its tenant's place in line: the spacing of a
    /// tenant's jobs in the fair order across tenants. Any positive value
    /// interleaves backlogged tenants one for one; it also sets how far
    /// ahead of a retry's run_at the retry may be placed.
    pub fair_share_interval: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_input_bytes: 256 * 1024,
            max_batch_jobs: 1000,
            retry_base: Duration::from_secs(2),
            retry_cap: Duration::from_secs(600),
            depth_count_cap: 10_000,
            fair_share_interval: Duration::from_millis(10),
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
    /// Connect with a pool sized for `max_connections`. A database that
    /// cannot be reached yet (restarting, still starting) is waited for, up
    /// to [`CONNECT_PATIENCE`], so a process started at that moment does
    /// not exit for it; a wrong URL or password fails at once.
    pub async fn connect(database_url: &str, max_connections: u32) -> Result<Self> {
        let options: PgConnectOptions = database_url.parse()?;
        let options = options.application_name("backlog");
        let started = std::time::Instant::now();
        let mut delay = Duration::from_millis(250);
        loop {
            let attempt = pool_options(max_connections).connect_with(options.clone()).await;
            match attempt {
                Ok(pool) => return Ok(Queue::new(pool)),
                Err(e) if is_transient(&e) && started.elapsed() + delay < CONNECT_PATIENCE => {
                    // Where it looked, so a wrong host or port is told apart
                    // from a database still starting (no user or password).
                    tracing::warn!(error = %e, host = options.get_host(), port = options.get_port(),
                        retry_in_ms = delay.as_millis() as u64, gives_up_in_s = CONNECT_PATIENCE.saturating_sub(started.elapsed()).as_secs(),
                        "PostgreSQL cannot be reached yet; waiting for it");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e.into()),
            }
        }
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

    /// Apply pending migrations. A database that a later build migrated
    /// further (this build is a rollback) is left as it is, with a warning:
    /// refusing, as sqlx does by default, would crash-loop the rolled-back
    /// API and abort a Fly release command, and the later migrations would
    /// still be there.
    pub async fn migrate(&self) -> Result<()> {
        let known: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
        let unknown: Vec<i64> = sqlx::query_scalar(
            "SELECT version FROM _sqlx_migrations WHERE version <> ALL($1) ORDER BY version",
        )
        .bind(&known)
        .fetch_all(&self.pool)
        .await
        .or_else(|e| match e {
            // No migrations table yet: a new database.
            sqlx::Error::Database(db) if db.code().as_deref() == Some("42P01") => Ok(Vec::new()),
            e => Err(e),
        })?;
        if !unknown.is_empty() {
            tracing::warn!(
                ?unknown,
                "the database has migrations this build does not know (a rollback?): they stay, and this build runs on the newer schema"
            );
        }
        let mut migrator = sqlx::migrate!("../migrations");
        migrator.set_ignore_missing(true);
        migrator.run(&self.pool).await?;
        Ok(())
    }

    /// Returns once every migration this build knows is applied, checking
    /// every `interval`. A worker or the controller may start before `api
    /// migrate` has run (on a first deploy they all start together): it
    /// waits, saying why once, instead of failing on a missing table.
    pub async fn wait_for_schema(&self, interval: std::time::Duration) -> Result<()> {
        let mut said = false;
        let mut said_unreachable = false;
        loop {
            match self.is_ready().await {
                Ok(true) => break,
                Ok(false) if !said => {
                    tracing::warn!(
                        "the database lacks backlog's schema or some of its migrations: waiting for \
                        `api migrate` (or `api serve --migrate`) to apply them"
                    );
                    said = true;
                }
                Ok(false) => {}
                // A restart ends the connection or refuses new ones for a
                // moment: wait it out, as for the schema itself.
                Err(e) if e.is_transient() => {
                    if !said_unreachable {
                        tracing::warn!(error = %e, "the database cannot be reached while waiting for the schema; retrying");
                        said_unreachable = true;
                    }
                }
                Err(e) => return Err(e),
            }
            tokio::time::sleep(interval).await;
        }
        if said {
            tracing::info!("the schema is in place");
        }
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
