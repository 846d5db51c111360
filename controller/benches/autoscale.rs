//! Replays the checked-in arrival trace through the simulator, under
//! backlog's default policy and under an HPA/KEDA-style baseline, and
//! prints replica-seconds and queue waits. The last line of output is one
//! JSON object with every figure, for scripts to compare runs.
//!
//! With `DATABASE_URL` set (`make bench-autoscale` gives it a scratch
//! database) it also measures activation in the real reconcile loop: a pool
//! at zero, a 60 s tick, and the time from enqueueing a task to the
//! backend's scale-up call, over 20 cold runs.
//!
//! ```text
//! cargo bench -p controller --bench autoscale
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use controller::backend::{Backend, BackendError, PoolRef, Replica};
use controller::metrics::Metrics;
use controller::reconcile::{self, Context, LoopSettings, ManifestSource, Reconciler};
use controller::sim::{parse_trace, simulate, Arrival, Backlog, HpaKeda, Report, World};
use controller::spec::WorkerPoolSpec;
use queue::{JobType, NewJob, Queue};
use serde_json::json;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

const TRACE_PATH: &str = "controller/testdata/arrivals.csv";
const TRACE: &str = include_str!("../testdata/arrivals.csv");

const WORLD: World = World {
    startup_seconds: 20,
    service_seconds: 30,
    concurrency: 4,
    tail_seconds: 1800,
};
const MAX_REPLICAS: u32 = 20;
/// The reconcile loop's tick; a pool at zero is also woken by NOTIFY.
const TICK_SECONDS: u64 = 5;

/// The target: p95 no worse with at least 30 % fewer replica-seconds, or no
/// more replica-seconds with at most half the p95 wait.
fn target_met(backlog: &Report, baseline: &Report) -> bool {
    let (cost, base_cost) = (backlog.replica_seconds as f64, baseline.replica_seconds as f64);
    let (p95, base_p95) = (backlog.wait_p95_seconds, baseline.wait_p95_seconds);
    (p95 <= base_p95 && cost <= 0.7 * base_cost) || (cost <= base_cost && 2 * p95 <= base_p95)
}

fn ratio(value: u64, base: u64) -> Option<f64> {
    (base > 0).then(|| (value as f64 / base as f64 * 1000.0).round() / 1000.0)
}

fn main() -> anyhow::Result<()> {
    let arrivals = parse_trace(TRACE)?;
    // Only the fields without a default: the rest is backlog's defaults.
    let spec: WorkerPoolSpec = serde_json::from_value(json!({
        "taskTypes": ["text_generation"],
        "target": { "local": { "command": ["text-worker"] } },
        "maxReplicas": MAX_REPLICAS,
        "tasksPerReplica": WORLD.concurrency,
    }))?;
    let backlog = simulate(&WORLD, &arrivals, &mut Backlog::new(spec, TICK_SECONDS));
    let baseline = simulate(
        &WORLD,
        &arrivals,
        &mut HpaKeda::new(u64::from(WORLD.concurrency), MAX_REPLICAS),
    );

    let tasks: u64 = arrivals.iter().map(|a: &Arrival| u64::from(a.tasks)).sum();
    let last = arrivals.last().map_or(0, |a| a.second);
    println!(
        "trace: {TRACE_PATH}: {tasks} tasks over {last} s, then {} s of tail",
        WORLD.tail_seconds
    );
    println!(
        "world: a replica starts in {} s and runs {} tasks at a time, {} s each; at most {MAX_REPLICAS} replicas",
        WORLD.startup_seconds, WORLD.concurrency, WORLD.service_seconds
    );
    println!(
        "backlog: defaults, {TICK_SECONDS} s tick + wake on new work; baseline: KEDA 30 s poll and 300 s cooldown, \
         HPA 15 s sync, 10 % tolerance, 300 s scale-down window"
    );
    println!();
    println!(
        "{:<18} {:>10} {:>9} {:>9} {:>9} {:>5} {:>8} {:>10}",
        "policy", "replica-s", "wait p50", "wait p95", "wait max", "peak", "changes", "unfinished"
    );
    for (name, report) in [("backlog defaults", &backlog), ("hpa/keda baseline", &baseline)] {
        println!(
            "{:<18} {:>10} {:>7} s {:>7} s {:>7} s {:>5} {:>8} {:>10}",
            name,
            report.replica_seconds,
            report.wait_p50_seconds,
            report.wait_p95_seconds,
            report.wait_max_seconds,
            report.peak_replicas,
            report.scale_changes,
            report.unfinished
        );
    }

    let cost_ratio = ratio(backlog.replica_seconds, baseline.replica_seconds);
    let p95_ratio = ratio(backlog.wait_p95_seconds, baseline.wait_p95_seconds);
    let shown = |r: Option<f64>| r.map_or("n/a".to_string(), |r| format!("{r:.3}"));
    println!();
    println!(
        "backlog / baseline: replica-seconds {}, p95 wait {}, max wait {}",
        shown(cost_ratio),
        shown(p95_ratio),
        shown(ratio(backlog.wait_max_seconds, baseline.wait_max_seconds)),
    );
    let met = target_met(&backlog, &baseline);
    let activation = match std::env::var("DATABASE_URL") {
        Ok(url) => Some(tokio::runtime::Runtime::new()?.block_on(activation_latency(&url))?),
        Err(_) => {
            println!("activation in the real loop: skipped (DATABASE_URL is not set; make bench-autoscale sets it)");
            None
        }
    };
    println!(
        "target (p95 no worse with >= 30 % fewer replica-seconds, or no more replica-seconds with half the p95): {}",
        if met { "met" } else { "NOT met" }
    );
    println!(
        "{}",
        json!({
            "trace": { "path": TRACE_PATH, "tasks": tasks, "last_arrival_second": last },
            "world": WORLD,
            "max_replicas": MAX_REPLICAS,
            "tick_seconds": TICK_SECONDS,
            "backlog": backlog,
            "baseline": baseline,
            "ratios": {
                "replica_seconds": cost_ratio,
                "wait_p95": p95_ratio,
                "wait_max": ratio(backlog.wait_max_seconds, baseline.wait_max_seconds),
            },
            "target_met": met,
            "activation_ms": activation,
        })
    );
    Ok(())
}

const ACTIVATION_RUNS: usize = 20;
/// Long enough that only the NOTIFY wake-up can explain a fast scale-up.
const ACTIVATION_TICK: Duration = Duration::from_secs(60);

/// A backend with no replicas that records when it is asked for some.
struct RecordingBackend {
    observed: Arc<Notify>,
    added: mpsc::UnboundedSender<Instant>,
}

impl Backend for RecordingBackend {
    fn name(&self) -> &'static str {
        "recording"
    }
    async fn observe(&self, _pool: PoolRef<'_>) -> Result<Vec<Replica>, BackendError> {
        self.observed.notify_one();
        Ok(Vec::new())
    }
    async fn add(&self, _pool: PoolRef<'_>, _count: u32) -> Result<Vec<String>, BackendError> {
        let _ = self.added.send(Instant::now());
        Ok(Vec::new())
    }
    async fn remove(&self, _pool: PoolRef<'_>, ids: &[String]) -> Result<Vec<String>, BackendError> {
        Ok(ids.to_vec())
    }
    async fn shutdown(&self) {}
}

/// Enqueue → scale call through the real loop (LISTEN/NOTIFY, the depth
/// query, the policy), each run from a fresh controller with its pool at zero.
async fn activation_latency(url: &str) -> anyhow::Result<serde_json::Value> {
    let queue = Queue::connect(url, 4).await?;
    queue.migrate().await?;
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("pool.yaml"),
        "apiVersion: backlog.dev/v1alpha1\nkind: WorkerPool\nmetadata: {name: text}\n\
         spec: {taskTypes: [text_generation], target: {local: {command: [text-worker]}}, maxReplicas: 2}\n",
    )?;
    let mut samples = Vec::with_capacity(ACTIVATION_RUNS);
    for run in 0..ACTIVATION_RUNS {
        let observed = Arc::new(Notify::new());
        let (added_tx, mut added) = mpsc::unbounded_channel();
        let reconciler = Reconciler::new(Context {
            queue: queue.clone(),
            backend: RecordingBackend {
                observed: observed.clone(),
                added: added_tx,
            },
            metrics: Arc::new(Metrics::default()),
        });
        let settings = LoopSettings {
            tick: ACTIVATION_TICK,
            leader_key: 0x0062_656e_6368,
        };
        let shutdown = CancellationToken::new();
        let controller = tokio::spawn(reconcile::run(
            reconciler,
            ManifestSource::new(dir.path().to_path_buf()),
            settings,
            shutdown.clone(),
        ));
        // The first pass (at start, queue empty) means the loop listens.
        tokio::time::timeout(Duration::from_secs(30), observed.notified()).await?;
        tokio::time::sleep(Duration::from_millis(50)).await;

        let enqueued_at = Instant::now();
        let job = queue
            .enqueue(NewJob::new(
                "bench",
                JobType::Text,
                json!({ "prompt": format!("activation {run}") }),
            ))
            .await?
            .job;
        let scaled_at = tokio::time::timeout(Duration::from_secs(30), added.recv())
            .await?
            .ok_or_else(|| anyhow::anyhow!("the controller stopped before scaling"))?;
        samples.push(scaled_at.duration_since(enqueued_at).as_secs_f64() * 1000.0);

        shutdown.cancel();
        controller.await??;
        queue.cancel_job("bench", job.id).await?;
    }
    samples.sort_by(f64::total_cmp);
    let avg = samples.iter().sum::<f64>() / samples.len() as f64;
    let p50 = samples[samples.len() / 2];
    let max = samples[samples.len() - 1];
    println!(
        "activation in the real loop ({ACTIVATION_RUNS} runs, {} s tick, enqueue → scale call): \
         avg {avg:.1} ms, p50 {p50:.1} ms, max {max:.1} ms",
        ACTIVATION_TICK.as_secs()
    );
    Ok(json!({
        "runs": ACTIVATION_RUNS,
        "tick_seconds": ACTIVATION_TICK.as_secs(),
        "avg": (avg * 10.0).round() / 10.0,
        "p50": (p50 * 10.0).round() / 10.0,
        "max": (max * 10.0).round() / 10.0,
    }))
}
