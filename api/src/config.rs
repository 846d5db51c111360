//! Command line and environment: every setting is a flag with an
//! environment variable behind it (`api --help` lists them).

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use queue::{QueueConfig, Retention, RetentionMode};

use crate::depth_history::HistorySettings;
use crate::state::{Settings, SweeperSettings};
use crate::streams::StreamLimits;

#[derive(Debug, Parser)]
#[command(name = "api", version, about = "backlog's HTTP API (serves by default)")]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Settings for `api` without a subcommand, which serves.
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Log format: json or text. Logs go to stderr, so stdout holds only a
    /// command's output (the secret of `keys create`).
    #[arg(long, env = "LOG_FORMAT", default_value = "json", global = true)]
    pub log_format: telemetry::LogFormat,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API and run the sweeper (the default).
    Serve(ServeArgs),
    /// Apply pending database migrations and exit.
    Migrate(DatabaseArgs),
    /// Create, list and revoke API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print it once: it cannot be shown again.
    Create {
        #[arg(long)]
        tenant: String,
        /// An admin key (may read operator routes such as /v1/queue).
        #[arg(long)]
        admin: bool,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Revoke a key by its id or its prefix (`bk_…`, as `keys list` shows).
    Revoke {
        key: String,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// List keys (never their secrets).
    List {
        #[arg(long)]
        tenant: Option<String>,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

/// Arguments that carry a secret: taken from their environment variable
/// only (see `telemetry::secrets`).
pub const SECRETS: &[&str] = &["database_url"];

#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL connection string.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Connections in the pool.
    #[arg(long, env = "DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub database: Option<DatabaseArgs>,
    /// Address to listen on.
    #[arg(long, env = "BIND_ADDR", default_value = "0.0.0.0")]
    pub bind: String,
    #[arg(long, env = "PORT", default_value_t = 8787)]
    pub port: u16,
    /// Serve Prometheus `/metrics` here (e.g. 0.0.0.0:9465); unset, no
    /// metrics are served. The API's own port never serves them.
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Where artifact bytes are stored: `file:///path` or `s3://bucket/prefix`
    /// (default: the folder `artifacts` under the working directory).
    #[arg(long, env = "ARTIFACT_STORE")]
    pub artifact_store: Option<String>,
    /// Apply pending migrations before serving.
    #[arg(long, env = "MIGRATE_ON_START")]
    pub migrate: bool,
    /// Largest request body, in bytes (413 above).
    #[arg(long, env = "BODY_LIMIT_BYTES", default_value_t = 1024 * 1024)]
    pub body_limit_bytes: usize,
    /// Largest job input (JSON-encoded), in bytes (422 above).
    #[arg(long, env = "MAX_INPUT_BYTES", default_value_t = QueueConfig::default().max_input_bytes)]
    pub max_input_bytes: usize,
    /// Most jobs in one batch request.
    #[arg(long, env = "MAX_BATCH_JOBS", default_value_t = QueueConfig::default().max_batch_jobs)]
    pub max_batch_jobs: usize,
    /// How long a verified API key is trusted before it is checked again
    /// (and so how long a revoked key may keep working).
    #[arg(long, env = "AUTH_CACHE_SECONDS", default_value_t = 5)]
    pub auth_cache_seconds: u64,
    /// How long a token the database did not know is refused (401) without
    /// asking the database again.
    #[arg(long, env = "AUTH_FAILURE_CACHE_SECONDS", default_value_t = 10)]
    pub auth_failure_cache_seconds: u64,
    /// Database lookups that may find no key, per second and per process;
    /// past it, unknown tokens answer 429 without a lookup.
    #[arg(long, env = "AUTH_FAILED_LOOKUPS_PER_SECOND", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub auth_failed_lookups_per_second: u32,
    /// Most event streams open at once in this process (429 beyond).
    #[arg(long, env = "SSE_MAX_STREAMS", default_value_t = StreamLimits::default().per_process)]
    pub sse_max_streams: usize,
    /// Most event streams one tenant may have open at once in this process.
    #[arg(long, env = "SSE_MAX_STREAMS_PER_TENANT", default_value_t = StreamLimits::default().per_tenant)]
    pub sse_max_streams_per_tenant: usize,
    /// An event stream ends after this many seconds; the client reconnects.
    #[arg(long, env = "SSE_MAX_STREAM_SECONDS", default_value_t = StreamLimits::default().max_duration.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    pub sse_max_stream_seconds: u64,
    /// Seconds between sweeps for stuck tasks; 0 runs no maintenance here
    /// (no sweeper, retention, repairer or artifact cleaner).
    #[arg(long, env = "SWEEPER_INTERVAL_SECONDS", default_value_t = 15)]
    pub sweeper_interval_seconds: u64,
    /// A task whose worker has not heartbeated for this long is taken back.
    #[arg(long, env = "SWEEPER_STALE_AFTER_SECONDS", default_value_t = 60)]
    pub stale_after_seconds: u64,
    /// Remove finished jobs older than this many days (unset: keep them).
    #[arg(long, env = "RETENTION_DAYS")]
    pub retention_days: Option<u32>,
    /// Delete old jobs, or move them to jobs_archive first.
    #[arg(long, env = "RETENTION_MODE", value_enum, default_value_t = RetentionModeArg::Delete)]
    pub retention_mode: RetentionModeArg,
    #[arg(long, env = "RETENTION_INTERVAL_SECONDS", default_value_t = 3600)]
    pub retention_interval_seconds: u64,
    /// How often to look for jobs left unfinished after their tasks (it
    /// reads every unfinished job), remove replaced artifacts' bytes and
    /// create the coming days' history partitions.
    #[arg(long, env = "REPAIR_INTERVAL_SECONDS", default_value_t = 60)]
    pub repair_interval_seconds: u64,
    /// How often to look at the open-task table's dead rows (the entries
    /// of tasks already taken, which every claim walks past until a
    /// vacuum); 0 leaves the table to autovacuum.
    #[arg(long, env = "VACUUM_INTERVAL_SECONDS", default_value_t = 2)]
    pub vacuum_interval_seconds: u64,
    /// Dead rows of the open-task table, beyond those the last vacuum
    /// left, that start a vacuum.
    #[arg(long, env = "VACUUM_MIN_DEAD_ROWS", default_value_t = 10_000)]
    pub vacuum_min_dead_rows: i64,
    /// Seconds between samples of the queue depth kept for the console's
    /// last-hour chart (`/v1/queue/history`); 0 keeps none.
    #[arg(long, env = "DEPTH_SAMPLE_SECONDS", default_value_t = 15)]
    pub depth_sample_seconds: u64,
    /// On SIGTERM, how long in-flight requests may take to finish.
    #[arg(long, env = "SHUTDOWN_GRACE_SECONDS", default_value_t = 30)]
    pub shutdown_grace_seconds: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RetentionModeArg {
    Delete,
    Archive,
}

/// Jobs removed per retention statement.
const RETENTION_BATCH: i64 = 500;

impl ServeArgs {
    pub fn settings(&self) -> Settings {
        let sweeper = (self.sweeper_interval_seconds > 0).then(|| SweeperSettings {
            interval: Duration::from_secs(self.sweeper_interval_seconds),
            stale_after: Duration::from_secs(self.stale_after_seconds),
            retention: self.retention_days.map(|days| Retention {
                older_than: Duration::from_secs(u64::from(days) * 86_400),
                mode: match self.retention_mode {
                    RetentionModeArg::Delete => RetentionMode::Delete,
                    RetentionModeArg::Archive => RetentionMode::Archive,
                },
                batch: RETENTION_BATCH,
            }),
            retention_interval: Duration::from_secs(self.retention_interval_seconds.max(1)),
            repair_interval: Duration::from_secs(self.repair_interval_seconds.max(1)),
            vacuum_interval: (self.vacuum_interval_seconds > 0)
                .then(|| Duration::from_secs(self.vacuum_interval_seconds)),
            vacuum_min_dead_rows: self.vacuum_min_dead_rows,
        });
        Settings {
            body_limit_bytes: self.body_limit_bytes,
            auth_cache_ttl: Duration::from_secs(self.auth_cache_seconds),
            auth_failure_ttl: Duration::from_secs(self.auth_failure_cache_seconds),
            auth_failed_lookups_per_second: self.auth_failed_lookups_per_second,
            streams: StreamLimits {
                per_process: self.sse_max_streams,
                per_tenant: self.sse_max_streams_per_tenant,
                max_duration: Duration::from_secs(self.sse_max_stream_seconds),
            },
            sweeper,
            depth_history: (self.depth_sample_seconds > 0).then(|| HistorySettings {
                interval: Duration::from_secs(self.depth_sample_seconds),
                ..HistorySettings::default()
            }),
        }
    }

    pub fn queue_config(&self) -> QueueConfig {
        QueueConfig {
            max_input_bytes: self.max_input_bytes,
            max_batch_jobs: self.max_batch_jobs,
            ..QueueConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_url_is_refused_on_the_command_line() {
        for command in [&[][..], &["serve"], &["migrate"], &["keys", "list"]] {
            let args = ["api"]
                .iter()
                .chain(command)
                .chain(&["--database-url", "postgres://x"]);
            let error = telemetry::secrets::try_parse_from::<Cli, _, _>(args, SECRETS).unwrap_err();
            assert!(
                error.to_string().contains("set DATABASE_URL in the environment"),
                "{error}"
            );
        }
    }

    #[test]
    fn serving_is_the_default_and_flags_reach_the_settings() {
        let cli = Cli::try_parse_from([
            "api",
            "--database-url",
            "postgres://x",
            "--port",
            "9000",
            "--sweeper-interval-seconds",
            "0",
            "--metrics-addr",
            "127.0.0.1:9465",
            "--sse-max-streams-per-tenant",
            "3",
        ])
        .unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.serve.port, 9000);
        assert_eq!(cli.serve.metrics_addr, Some("127.0.0.1:9465".parse().unwrap()));
        let settings = cli.serve.settings();
        assert!(settings.sweeper.is_none());
        assert_eq!(settings.streams.per_tenant, 3);
        assert_eq!(
            settings.streams,
            StreamLimits {
                per_tenant: 3,
                ..StreamLimits::default()
            }
        );

        let cli = Cli::try_parse_from([
            "api",
            "serve",
            "--retention-days",
            "7",
            "--retention-mode",
            "archive",
        ])
        .unwrap();
        let Some(Command::Serve(args)) = cli.command else {
            panic!("not serve")
        };
        let retention = args.settings().sweeper.unwrap().retention.unwrap();
        assert_eq!(retention.older_than, Duration::from_secs(7 * 86_400));
        assert_eq!(retention.mode, RetentionMode::Archive);
    }

    #[test]
    fn keys_commands_parse() {
        let cli = Cli::try_parse_from([
            "api",
            "keys",
            "create",
            "--tenant",
            "acme",
            "--admin",
            "--database-url",
            "postgres://x",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Keys(KeysCommand::Create { admin: true, ref tenant, .. })) if tenant == "acme"
        ));
    }
}
