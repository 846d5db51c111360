//! The worker binaries' shared command line: `text-worker`, `pdf-worker`,
//! `audio-worker` and `worker` differ only in their default task types.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use queue::{Queue, TaskType};
use tokio_util::sync::CancellationToken;

use crate::handlers::Pipelines;
use crate::metrics::WorkerMetrics;
use crate::pipelines::pdf;
use crate::runtime::{self, replica_identity, RuntimeConfig};

/// Arguments that carry a secret: taken from their environment variable
/// only (see `telemetry::secrets`).
pub const SECRETS: &[&str] = &["database_url"];

#[derive(Debug, Parser)]
#[command(
    version,
    about = "A backlog worker: claims tasks from PostgreSQL and runs their pipelines."
)]
pub struct WorkerArgs {
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Task types to run, comma-separated (text_generation, pdf_generation, audio_generation).
    #[arg(long, env = "WORKER_TASK_TYPES", value_delimiter = ',')]
    pub task_types: Vec<TaskType>,
    /// Tasks run at once.
    #[arg(long, env = "WORKER_CONCURRENCY", default_value_t = 4)]
    pub concurrency: usize,
    /// The WorkerPool this replica belongs to.
    #[arg(long, env = "WORKER_POOL")]
    pub pool: Option<String>,
    /// Replica identity; defaults to FLY_MACHINE_ID, POD_NAME or host-pid.
    #[arg(long, env = "WORKER_ID")]
    pub worker_id: Option<String>,
    /// Seconds between lease heartbeats.
    #[arg(long, env = "WORKER_HEARTBEAT_SECONDS", default_value_t = 5.0)]
    pub heartbeat_seconds: f64,
    /// Seconds between backstop polls when no notification arrives.
    #[arg(long, env = "WORKER_POLL_SECONDS", default_value_t = 5.0)]
    pub poll_seconds: f64,
    /// Seconds running tasks get to finish after SIGTERM before they are released.
    #[arg(long, env = "WORKER_SHUTDOWN_GRACE_SECONDS", default_value_t = 25.0)]
    pub shutdown_grace_seconds: f64,
    /// Serve Prometheus metrics here (e.g. 0.0.0.0:9465).
    #[arg(long, env = "WORKER_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Log format: json or text.
    #[arg(long, env = "LOG_FORMAT", default_value = "json")]
    pub log_format: telemetry::LogFormat,
}

/// Parse arguments, run the worker until SIGTERM/SIGINT, drain, exit.
/// How often a worker started before the schema checks for it again.
const SCHEMA_POLL: Duration = Duration::from_secs(2);

pub fn main(default_types: &[TaskType]) -> anyhow::Result<()> {
    let mut args: WorkerArgs = telemetry::secrets::parse(SECRETS);
    if args.task_types.is_empty() {
        args.task_types = default_types.to_vec();
    }
    anyhow::ensure!(
        !args.task_types.is_empty(),
        "no task types: pass --task-types or WORKER_TASK_TYPES"
    );
    anyhow::ensure!(args.concurrency >= 1, "--concurrency must be at least 1");
    telemetry::init_tracing(args.log_format);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    // Signals first: a worker stopped while it still waits for the schema
    // (a first deploy, rolled back) exits 0, not killed by the signal.
    let shutdown = CancellationToken::new();
    tokio::spawn(exit_on_signals(shutdown.clone()));
    let pipelines = Pipelines::from_env().context("configuring the pipelines")?;
    let queue = Queue::connect(&args.database_url, args.concurrency as u32 + 3)
        .await
        .context("connecting to PostgreSQL")?;
    tokio::select! {
        waited = queue.wait_for_schema(SCHEMA_POLL) => waited.context("reading the schema's migrations")?,
        () = shutdown.cancelled() => {
            tracing::info!("stopped before the schema was applied; nothing was claimed");
            return Ok(());
        }
    }
    let metrics = Arc::new(WorkerMetrics::default());
    if let Some(addr) = args.metrics_addr {
        let metrics = metrics.clone();
        telemetry::serve_metrics(addr, move || metrics.encode()).await?;
    }
    let config = RuntimeConfig {
        worker_id: args.worker_id.unwrap_or_else(replica_identity),
        pool: args.pool,
        task_types: args.task_types,
        concurrency: args.concurrency,
        heartbeat_interval: Duration::from_secs_f64(args.heartbeat_seconds),
        poll_interval: Duration::from_secs_f64(args.poll_seconds),
        shutdown_grace: Duration::from_secs_f64(args.shutdown_grace_seconds),
        metrics,
    };
    if config.task_types.contains(&TaskType::PdfGeneration) {
        // Finding the machine's fonts takes a moment; pay it before the
        // first claim, not inside the first task's timeout.
        let fonts = tokio::task::spawn_blocking(pdf::load_fonts).await?;
        tracing::info!(fonts, "PDF fonts found");
    }
    runtime::run(queue, config, pipelines, shutdown).await?;
    Ok(())
}

/// The first SIGTERM/SIGINT starts a drain; a second one exits at once
/// (the sweeper then rescues whatever was held).
async fn exit_on_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    for n in 0.. {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        if n == 0 {
            tracing::info!("signal received: draining (send again to exit now)");
            shutdown.cancel();
        } else {
            tracing::warn!("second signal: exiting without draining");
            std::process::exit(130);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_url_is_refused_on_the_command_line() {
        let args = ["text-worker", "--database-url", "postgres://u:pw@db/x"];
        let error = telemetry::secrets::try_parse_from::<WorkerArgs, _, _>(args, SECRETS).unwrap_err();
        assert!(
            error.to_string().contains("set DATABASE_URL in the environment"),
            "{error}"
        );
    }
}
