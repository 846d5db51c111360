//! What every handler shares, and the settings that shape it.

use std::sync::Arc;
use std::time::Duration;

use queue::{Queue, Retention};
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::depth_history::{DepthHistory, HistorySettings};
use crate::enqueuer::Enqueuer;
use crate::job_events::JobEvents;
use crate::metrics::Metrics;
use crate::streams::{OpenStreams, StreamLimits};

/// Tunables of a running API, whatever their source (flags, tests).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Largest request body accepted (413 above).
    pub body_limit_bytes: usize,
    /// How long a verified key is trusted before it is checked again.
    pub auth_cache_ttl: Duration,
    /// How long a token the database did not know is refused without
    /// asking again.
    pub auth_failure_ttl: Duration,
    /// Database lookups that may find no key, per second (and in a burst):
    /// past it, unknown tokens are refused with 429 without a lookup.
    pub auth_failed_lookups_per_second: u32,
    /// Caps on event streams.
    pub streams: StreamLimits,
    /// `None` runs no sweeper in this process.
    pub sweeper: Option<SweeperSettings>,
    /// `None` samples no queue depth history (`/v1/queue/history` is empty).
    pub depth_history: Option<HistorySettings>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            body_limit_bytes: 1024 * 1024,
            auth_cache_ttl: Duration::from_secs(5),
            auth_failure_ttl: Duration::from_secs(10),
            auth_failed_lookups_per_second: 20,
            streams: StreamLimits::default(),
            sweeper: Some(SweeperSettings::default()),
            depth_history: Some(HistorySettings::default()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SweeperSettings {
    pub interval: Duration,
    /// A claimed task whose heartbeat is older than this is taken back.
    pub stale_after: Duration,
    /// `None` keeps finished jobs forever.
    pub retention: Option<Retention>,
    pub retention_interval: Duration,
    /// How often jobs left unfinished after their tasks are looked for (a
    /// read of every unfinished job) and replaced artifacts' bytes removed.
    pub repair_interval: Duration,
    /// How often the vacuumer looks at the open-task table's dead rows;
    /// `None` leaves the table to autovacuum.
    pub vacuum_interval: Option<Duration>,
    /// Dead rows of the open-task table, beyond those the last vacuum
    /// left, that make the vacuumer vacuum it.
    pub vacuum_min_dead_rows: i64,
}

impl Default for SweeperSettings {
    fn default() -> Self {
        SweeperSettings {
            interval: Duration::from_secs(15),
            stale_after: Duration::from_secs(60),
            retention: None,
            retention_interval: Duration::from_secs(3600),
            repair_interval: Duration::from_secs(60),
            vacuum_interval: Some(Duration::from_secs(2)),
            vacuum_min_dead_rows: 10_000,
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub queue: Queue,
    pub settings: Arc<Settings>,
    pub auth: Arc<Authenticator>,
    pub enqueuer: Enqueuer,
    pub job_events: JobEvents,
    pub artifacts: store::ArtifactStore,
    pub metrics: Arc<Metrics>,
    pub open_streams: Arc<OpenStreams>,
    /// The last hour of queue depth, as this process sampled it.
    pub depth_history: Arc<DepthHistory>,
    /// Cancelled when the server shuts down: long-lived responses (event
    /// streams) end then, so graceful shutdown does not wait on them.
    pub shutdown: CancellationToken,
}
