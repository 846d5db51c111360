//! `controller`: scales backlog's worker pools from the depth of their queue.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use controller::backend::fly::{FlyBackend, FlyClient, FlySettings, RetryPolicy, Token};
use controller::backend::kubernetes::{
    self, list_worker_pools, KubernetesBackend, LeaseElection, LeaseSettings, WorkerPoolSource,
};
use controller::backend::local::LocalBackend;
use controller::metrics::Metrics;
use controller::reconcile::{self, Context, LoopSettings, ManifestSource, Reconciler};
use controller::{manifest, spec};
use queue::Queue;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "controller",
    version,
    about = "Scales backlog's worker pools from the depth of their queue"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the WorkerPool CustomResourceDefinition as YAML.
    Crd,
    /// Check WorkerPool manifests: print each pool that loads and every
    /// problem; exit 1 on any problem.
    Validate {
        /// A YAML file, or a folder of them.
        #[arg(short = 'f', long = "filename", value_name = "FILE_OR_DIR")]
        path: PathBuf,
    },
    /// Reconcile the pools continuously: read the queue, decide, scale.
    Run(Box<RunArgs>),
    /// Dry run: print what the next pass of `run` would do for each pool,
    /// and why, from the same state: the backend's replicas, the queue and
    /// the leader's stored policy memory. Changes nothing. Takes `run`'s
    /// flags and environment.
    Plan(Box<RunArgs>),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BackendKind {
    /// Worker replicas as child processes of the controller.
    Local,
    /// Deployments and StatefulSets, scaled from WorkerPool objects.
    Kubernetes,
    /// Worker replicas as the machines of a Fly app's process group.
    Fly,
}

#[derive(clap::Args)]
struct RunArgs {
    /// WorkerPool manifests: a YAML file or a folder; edits are picked up
    /// live. Required for the local backend; the Kubernetes backend watches
    /// WorkerPool objects instead unless this is given.
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE_OR_DIR",
        env = "WORKER_POOLS"
    )]
    path: Option<PathBuf>,
    #[arg(long, value_enum, env = "CONTROLLER_BACKEND", default_value = "local")]
    backend: BackendKind,
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Seconds between passes when no notification wakes the loop.
    #[arg(long, env = "CONTROLLER_TICK_SECONDS", default_value_t = 2.0)]
    tick_seconds: f64,
    /// Seconds a stopped replica may drain before it is killed (local: then SIGKILL;
    /// fly: the stop request's timeout). Must cover the workers' drain grace.
    #[arg(long, env = "CONTROLLER_STOP_GRACE_SECONDS", default_value_t = 30.0)]
    stop_grace_seconds: f64,
    /// Local backend: where the state file of each pool's replicas is kept,
    /// so a controller restarted after a crash adopts the replicas still
    /// running. Default: `backlog-controller/<database host, port and name>`
    /// under the system's temporary directory.
    #[arg(long, env = "CONTROLLER_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Advisory-lock key shared by the controllers of one deployment.
    #[arg(long, env = "CONTROLLER_LEADER_KEY", default_value_t = 0x6261_636b_6c6f_67)]
    leader_key: i64,
    /// Kubernetes: the namespace whose WorkerPools to run (default: the
    /// kubeconfig's or the pod's namespace). With --all-namespaces it only
    /// places the Lease (the shipped manifests set it from the pod).
    #[arg(long, env = "CONTROLLER_NAMESPACE")]
    namespace: Option<String>,
    /// Kubernetes: run the WorkerPools of every namespace.
    #[arg(long, env = "CONTROLLER_ALL_NAMESPACES")]
    all_namespaces: bool,
    /// Kubernetes: the leader-election Lease (in --lease-namespace).
    #[arg(long, env = "CONTROLLER_LEASE_NAME", default_value = "backlog-controller")]
    lease_name: String,
    /// Kubernetes: the Lease's namespace (default: --namespace, or the client's).
    #[arg(long, env = "CONTROLLER_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Kubernetes: seconds a leader's Lease lasts without renewal.
    #[arg(long, env = "CONTROLLER_LEASE_SECONDS", default_value_t = 15.0)]
    lease_seconds: f64,
    /// Kubernetes: this replica's identity in the Lease (default: the
    /// hostname and a random suffix).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Fly Machines API token (`fly tokens create deploy`); Bearer, or FlyV1 for macaroons.
    #[arg(long, env = "FLY_API_TOKEN", hide_env_values = true, hide = true)]
    fly_api_token: Option<String>,
    /// The Fly app this controller runs in (Fly sets it): the app of pools
    /// that name none; pools that name another app are warned about.
    #[arg(long, env = "FLY_APP_NAME")]
    fly_app_name: Option<String>,
    /// The Machines API; inside Fly, `http://_api.internal:4280`.
    #[arg(long, env = "FLY_API_BASE_URL", default_value = "https://api.machines.dev")]
    fly_api_base_url: String,
    /// Requests in flight per Fly app.
    #[arg(long, env = "FLY_API_CONCURRENCY", default_value_t = 4)]
    fly_api_concurrency: usize,
    /// Serve Prometheus metrics here (e.g. 0.0.0.0:9464).
    #[arg(long, env = "CONTROLLER_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Log format: json or text.
    #[arg(long, env = "LOG_FORMAT", default_value = "json")]
    log_format: telemetry::LogFormat,
}

/// Arguments that carry a secret: taken from their environment variable
/// only (see `telemetry::secrets`).
const SECRETS: &[&str] = &["database_url", "fly_api_token"];

fn main() -> anyhow::Result<ExitCode> {
    match telemetry::secrets::parse::<Cli>(SECRETS).command {
        Command::Crd => {
            print!("{}", spec::crd_yaml()?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { path } => Ok(validate(&path)),
        Command::Run(args) => {
            telemetry::init_tracing(args.log_format);
            tokio::runtime::Runtime::new()?.block_on(run(*args))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan(args) => tokio::runtime::Runtime::new()?.block_on(plan(*args)),
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    // Signals first: a controller stopped while it still waits for the
    // database or the schema (a first deploy, rolled back) exits 0, as the
    // workers do, rather than dying by the signal.
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            termination_signal().await;
            tracing::info!("signal received: stopping");
            shutdown.cancel();
        }
    });
    let ready = async {
        let queue = Queue::connect(&args.database_url, 4)
            .await
            .context("connecting to PostgreSQL")?;
        queue
            .wait_for_schema(Duration::from_secs(2))
            .await
            .context("reading the schema's migrations")?;
        anyhow::Ok(queue)
    };
    let queue = tokio::select! {
        queue = ready => queue?,
        () = shutdown.cancelled() => {
            tracing::info!("stopped before the database and its schema were ready; nothing was scaled");
            return Ok(());
        }
    };
    let metrics = Arc::new(Metrics::default());
    if let Some(addr) = args.metrics_addr {
        let metrics = metrics.clone();
        telemetry::serve_metrics(addr, move || metrics.encode()).await?;
    }
    let settings = LoopSettings {
        tick: Duration::from_secs_f64(args.tick_seconds),
        leader_key: args.leader_key,
    };
    match args.backend {
        BackendKind::Local => {
            let path = args
                .path
                .clone()
                .context("the local backend needs WorkerPool manifests: pass -f FILE_OR_DIR")?;
            let backend = local_backend(&args);
            let reconciler = Reconciler::new(Context {
                queue,
                backend,
                metrics,
            });
            reconcile::run(reconciler, ManifestSource::new(path), settings, shutdown).await
        }
        BackendKind::Kubernetes => {
            let (client, namespace) = kubernetes_client(&args).await?;
            // POD_NAME, or the hostname and a random suffix: never the pid,
            // which is 1 in every container.
            let identity = args
                .identity
                .clone()
                .filter(|i| !i.trim().is_empty())
                .unwrap_or_else(|| kubernetes::replica_identity().to_string());
            let lease = LeaseSettings::new(
                args.lease_namespace.as_deref().unwrap_or(&namespace),
                &args.lease_name,
                &identity,
                Duration::from_secs_f64(args.lease_seconds),
            );
            let election = LeaseElection::new(client.clone(), lease);
            let backend = KubernetesBackend::new(client.clone(), queue.clone());
            let reconciler = Reconciler::new(Context {
                queue,
                backend,
                metrics,
            });
            match args.path {
                Some(path) => {
                    reconcile::run_elected(
                        reconciler,
                        ManifestSource::new(path),
                        election,
                        settings,
                        shutdown,
                    )
                    .await
                }
                None => {
                    let watched = (!args.all_namespaces).then_some(namespace.as_str());
                    tracing::info!(namespace = watched.unwrap_or("(all)"), "watching WorkerPools");
                    let source = WorkerPoolSource::new(client, watched);
                    reconcile::run_elected(reconciler, source, election, settings, shutdown).await
                }
            }
        }
        BackendKind::Fly => {
            let path = args
                .path
                .clone()
                .context("the fly backend needs WorkerPool manifests: pass -f FILE_OR_DIR")?;
            if let Some(app) = &args.fly_app_name {
                warn_about_other_apps(&path, app);
            }
            let backend = fly_backend(&args)?;
            let reconciler = Reconciler::new(Context {
                queue,
                backend,
                metrics,
            });
            reconcile::run(reconciler, ManifestSource::new(path), settings, shutdown).await
        }
    }
}

fn local_backend(args: &RunArgs) -> LocalBackend {
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| LocalBackend::default_state_dir(&args.database_url));
    tracing::info!(state_dir = %state_dir.display(), "local backend");
    LocalBackend::new(Duration::from_secs_f64(args.stop_grace_seconds), state_dir)
}

/// The client (in-cluster service account, or KUBECONFIG / ~/.kube/config)
/// and the namespace whose WorkerPools to run.
async fn kubernetes_client(args: &RunArgs) -> anyhow::Result<(kube::Client, String)> {
    let config = kube::Config::infer()
        .await
        .context("finding the Kubernetes API")?;
    let client = kube::Client::try_from(config).context("building the Kubernetes client")?;
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    Ok((client, namespace))
}

fn fly_backend(args: &RunArgs) -> anyhow::Result<FlyBackend> {
    let token = args
        .fly_api_token
        .clone()
        .filter(|t| !t.trim().is_empty())
        .context(
            "--backend fly needs FLY_API_TOKEN (a deploy token for the app: `fly tokens create deploy`)",
        )?;
    let client = FlyClient::new(
        &args.fly_api_base_url,
        Token::new(token),
        RetryPolicy::default(),
        args.fly_api_concurrency,
    )?;
    tracing::info!(base_url = %args.fly_api_base_url, "Fly backend");
    Ok(FlyBackend::new(
        client,
        FlySettings {
            stop_timeout: Duration::from_secs_f64(args.stop_grace_seconds),
            own_app: args.fly_app_name.clone().filter(|app| !app.trim().is_empty()),
            ..FlySettings::default()
        },
    ))
}

/// A deploy token is scoped to one app: a pool aimed elsewhere will get 403s.
fn warn_about_other_apps(path: &Path, app: &str) {
    for pool in manifest::load(path).pools {
        if let spec::Target::Fly(fly) = &pool.pool.spec.target {
            if !fly.app.is_empty() && fly.app != app {
                tracing::warn!(pool = pool.name(), target_app = %fly.app, this_app = %app,
                    "pool scales another Fly app than the one this controller runs in; its token needs access to it");
            }
        }
    }
}

/// Prints what the next pass of `run` would do for each pool. Exit 1 when
/// a manifest or a pool's backend has a problem.
async fn plan(args: RunArgs) -> anyhow::Result<ExitCode> {
    let queue = Queue::connect(&args.database_url, 2)
        .await
        .context("connecting to PostgreSQL")?;
    let metrics = Arc::new(Metrics::default());
    let from_files = |path: Option<&PathBuf>| -> anyhow::Result<(Vec<manifest::LoadedPool>, Vec<String>)> {
        let path = path.context("pass the WorkerPool manifests: -f FILE_OR_DIR")?;
        let loaded = manifest::load(path);
        Ok((
            loaded.pools,
            loaded.errors.iter().map(ToString::to_string).collect(),
        ))
    };
    let now = chrono::Utc::now();
    let (reports, problems) = match args.backend {
        BackendKind::Local => {
            let (pools, problems) = from_files(args.path.as_ref())?;
            let ctx = Context {
                queue,
                backend: local_backend(&args),
                metrics,
            };
            (reconcile::plan(&ctx, &pools, now).await?, problems)
        }
        BackendKind::Kubernetes => {
            let (client, namespace) = kubernetes_client(&args).await?;
            let (pools, problems) = match &args.path {
                Some(path) => from_files(Some(path))?,
                None => {
                    let watched = (!args.all_namespaces).then_some(namespace.as_str());
                    list_worker_pools(client.clone(), watched)
                        .await
                        .context("listing WorkerPools")?
                }
            };
            let ctx = Context {
                queue: queue.clone(),
                backend: KubernetesBackend::new(client, queue),
                metrics,
            };
            (reconcile::plan(&ctx, &pools, now).await?, problems)
        }
        BackendKind::Fly => {
            let (pools, problems) = from_files(args.path.as_ref())?;
            let ctx = Context {
                queue,
                backend: fly_backend(&args)?,
                metrics,
            };
            (reconcile::plan(&ctx, &pools, now).await?, problems)
        }
    };
    for problem in &problems {
        println!("error: {problem}");
    }
    let mut failed = !problems.is_empty();
    for report in reports {
        print!("{}", describe_plan(&report));
        failed |= report.error.is_some();
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// A planned pass as `plan` prints it: the decision, then what it rests on.
fn describe_plan(report: &reconcile::PlanReport) -> String {
    let Some(decision) = &report.decision else {
        return format!(
            "{}: cannot plan: {}\n",
            report.pool,
            report.error.as_deref().unwrap_or("unknown")
        );
    };
    let mut out = format!(
        "{}: {} → {} replicas ({}): {}\n",
        report.pool,
        decision.from,
        decision.replicas,
        decision.phase.as_str(),
        decision.reason
    );
    let s = &report.status;
    out += &format!(
        "  queue: {} pending, {} in flight, oldest {}s; replicas: {} ready, {} busy\n",
        s.pending, s.in_flight, s.oldest_pending_seconds, s.ready_replicas, s.busy_replicas
    );
    if !report.would_remove.is_empty() {
        out += &format!(
            "  would drain and stop (idle): {}\n",
            report.would_remove.join(", ")
        );
    }
    out += if report.from_stored_memory {
        "  history: the leader's stored policy memory\n"
    } else {
        "  history: none stored (no controller has run this pool yet)\n"
    };
    out
}

async fn termination_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn validate(path: &Path) -> ExitCode {
    let manifests = manifest::load(path);
    for loaded in &manifests.pools {
        let spec = &loaded.pool.spec;
        let task_types: Vec<&str> = spec.task_types.iter().map(|t| t.as_str()).collect();
        println!(
            "ok: {}: WorkerPool {} ({}; {}; {}..{} replicas)",
            loaded.location.file.display(),
            loaded.name(),
            spec.target.backend(),
            task_types.join(", "),
            spec.min_replicas,
            spec.max_replicas,
        );
    }
    for error in &manifests.errors {
        println!("error: {error}");
    }
    println!(
        "{} pool(s) valid, {} problem(s)",
        manifests.pools.len(),
        manifests.errors.len()
    );
    if manifests.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, Command, SECRETS};

    #[test]
    fn secrets_are_refused_on_the_command_line() {
        for (flag, variable) in [
            ("--database-url", "DATABASE_URL"),
            ("--fly-api-token", "FLY_API_TOKEN"),
        ] {
            for command in ["run", "plan"] {
                let args = ["controller", command, flag, "secret", "-f", "pools.yaml"];
                let Err(error) = telemetry::secrets::try_parse_from::<Cli, _, _>(args, SECRETS) else {
                    panic!("{flag} accepted on the command line");
                };
                assert!(
                    error
                        .to_string()
                        .contains(&format!("set {variable} in the environment")),
                    "{error}"
                );
            }
        }
    }

    /// rbac.yaml says to add --all-namespaces to the shipped controller,
    /// whose pod sets CONTROLLER_NAMESPACE: the two must go together.
    #[test]
    fn all_namespaces_goes_with_a_namespace_from_the_pod() {
        let cli = Cli::try_parse_from([
            "controller",
            "run",
            "--database-url",
            "postgres://db/backlog",
            "--backend",
            "kubernetes",
            "--namespace",
            "backlog",
            "--all-namespaces",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert!(args.all_namespaces);
        assert_eq!(args.namespace.as_deref(), Some("backlog"));
    }
}
