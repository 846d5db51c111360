//! What each subcommand does.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use queue::{ApiKeyRole, Queue};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::generate_key;
use crate::config::{Cli, Command, DatabaseArgs, KeysCommand, ServeArgs};
use crate::server;

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        None => serve(cli.serve).await,
        Some(Command::Serve(args)) => serve(args).await,
        Some(Command::Migrate(database)) => {
            connect(&database).await?.migrate().await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Some(Command::Keys(command)) => keys(command).await,
    }
}

async fn connect(database: &DatabaseArgs) -> anyhow::Result<Queue> {
    Queue::connect(&database.database_url, database.db_max_connections)
        .await
        .context("connecting to DATABASE_URL")
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let database = args.database.as_ref().context("DATABASE_URL is required")?;
    let queue = connect(database).await?.with_config(args.queue_config());
    if args.migrate {
        queue.migrate().await.context("applying migrations")?;
    } else {
        // As the workers and the controller do: served without the schema,
        // every request was a 500 and the log a list of missing relations.
        tokio::select! {
            waited = queue.wait_for_schema(Duration::from_secs(2)) => waited.context("waiting for the schema")?,
            () = termination_signal() => return Ok(()),
        }
    }
    let artifacts = store::ArtifactStore::open(args.artifact_store.as_deref())
        .context("opening the artifact store (ARTIFACT_STORE)")?;
    tracing::info!(artifacts = artifacts.location(), "artifact store");
    let listener = TcpListener::bind((args.bind.as_str(), args.port))
        .await
        .with_context(|| format!("binding {}:{}", args.bind, args.port))?;
    let metrics_listener = match args.metrics_addr {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics address {addr}"))?,
        ),
        None => None,
    };

    let shutdown = CancellationToken::new();
    let mut server = tokio::spawn(server::run_with_metrics(
        listener,
        metrics_listener,
        queue,
        artifacts,
        args.settings(),
        shutdown.clone(),
    ));
    tokio::select! {
        result = &mut server => return result?,
        () = termination_signal() => {}
    }
    tracing::info!("shutting down: no new connections, finishing requests in flight");
    shutdown.cancel();
    let grace = Duration::from_secs(args.shutdown_grace_seconds);
    match tokio::time::timeout(grace, server).await {
        Ok(result) => result?,
        Err(_) => {
            tracing::warn!(?grace, "requests still in flight after the grace period; exiting");
            Ok(())
        }
    }
}

/// SIGTERM (what Fly and Kubernetes send) or Ctrl-C.
async fn termination_signal() {
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}

/// The database, once it has the schema: key commands on one without it
/// failed on a missing relation, with no word of what to do.
async fn migrated(database: &DatabaseArgs) -> anyhow::Result<Queue> {
    let queue = connect(database).await?;
    if !queue.is_ready().await? {
        anyhow::bail!(
            "the database lacks backlog's schema or some of its migrations: run `api migrate` first"
        );
    }
    Ok(queue)
}

async fn keys(command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Create {
            tenant,
            admin,
            database,
        } => {
            let role = if admin {
                ApiKeyRole::Admin
            } else {
                ApiKeyRole::Client
            };
            let key = generate_key(&tenant, role);
            let record = migrated(&database).await?.create_api_key(&key.record).await?;
            eprintln!(
                "created {role} key {} (prefix {}) for tenant {:?}; it is printed once, below:",
                record.id, record.prefix, record.tenant
            );
            // The secret alone on stdout, so scripts can capture it.
            writeln!(std::io::stdout(), "{}", key.secret)?;
            Ok(())
        }
        KeysCommand::Revoke { key, database } => {
            let record = migrated(&database).await?.revoke_api_key(&key).await?;
            eprintln!(
                "revoked key {} (prefix {}) of tenant {:?}",
                record.id, record.prefix, record.tenant
            );
            Ok(())
        }
        KeysCommand::List { tenant, database } => {
            let keys = migrated(&database).await?.api_keys(tenant.as_deref()).await?;
            let mut out = std::io::stdout().lock();
            for key in keys {
                writeln!(out, "{}", serde_json::to_string(&key)?)?;
            }
            Ok(())
        }
    }
}
