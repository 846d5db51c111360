//! `make bench-queue`: throughput and latency of the queue on this machine,
//! printed beside references measured in the same run — PostgreSQL's own
//! ceiling for a batched claim+complete loop (pgbench) and, when the script
//! ran them, the peer queues graphile-worker and pg-boss doing the same
//! work. The last line is one JSON object with every figure.
//!
//! Reads `DATABASE_URL` (a database it may truncate: the script creates a
//! fresh one), `PEER_RESULTS` (colon-separated files, each ending with one
//! peer's JSON line), `PEERS_FAILED` (comma-separated peer names) and
//! `DEPTH_HISTORY` (finished tasks in the tables for the second measurement
//! of the depth query and of the drain, default 1,000,000).
//!
//! `BENCH_SCOPE=targets` measures only what issue #16's targets compare
//! (the enqueue, the drains at 50, enqueue→claim latency, and pgbench's
//! ceiling as the round's yardstick): one round of `make bench-queue
//! ROUNDS=N`, which alternates such rounds with graphile-worker's and
//! then runs this program with `ROUND_RESULTS` and `ROUND_PEER_RESULTS`
//! (colon-separated files, each ending with one round's JSON line: this
//! program's and graphile-worker's, round by round) to print the rounds
//! side by side, their medians and how many rounds met each target.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use queue::{JobType, NewJob, Queue, TaskType, VacuumOutcome};
use serde_json::{json, Value};
use sqlx::PgPool;

const ENQUEUE_JOBS: usize = 200_000;
const ENQUEUE_BATCH: usize = 1_000;
/// Batched drains (50 tasks per claim, and 500, graphile-worker's documented
/// local queue) use the full 200k; one-task-per-commit drains are much
/// slower, so they drain 5,000 (rates are per second either way).
const DRAIN_TASKS_BATCHED: usize = 200_000;
const DRAIN_TASKS_SINGLE: usize = 5_000;
const LATENCY_SAMPLES: usize = 1_000;
const PGBENCH_BATCH: usize = 50;

/// What one run measures.
#[derive(Clone, Copy, PartialEq)]
enum Scope {
    /// Every figure (`make bench-queue`).
    All,
    /// Issue #16's compared figures only: one alternating round.
    Targets,
}

impl Scope {
    fn from_env() -> Result<Self> {
        match std::env::var("BENCH_SCOPE").as_deref() {
            Err(_) | Ok("") | Ok("all") => Ok(Scope::All),
            Ok("targets") => Ok(Scope::Targets),
            Ok(other) => bail!("BENCH_SCOPE must be all or targets, got {other:?}"),
        }
    }

    /// The claim sizes of the drains.
    fn drain_batches(self) -> &'static [i32] {
        match self {
            Scope::All => &[1, 50, 500],
            Scope::Targets => &[HEADLINE_BATCH],
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let rounds = env_list("ROUND_RESULTS", ':');
    if !rounds.is_empty() {
        return summarize_rounds(&rounds, &env_list("ROUND_PEER_RESULTS", ':'));
    }
    let scope = Scope::from_env()?;
    let url = std::env::var("DATABASE_URL").context("DATABASE_URL must name the bench database")?;
    // The pool a user's `Queue::connect` gets: the enqueue phase runs on it.
    let admin = queue::pool_options(2).connect(&url).await?;
    let q = Queue::new(admin.clone());
    q.migrate().await?;
    let mut report = serde_json::Map::new();
    // Read first: a bad peer file should fail the run before, not after, the work.
    let (peers, failed) = peer_results()?;

    println!(
        "backlog queue benchmark ({} cores{})",
        std::thread::available_parallelism()?.get(),
        match scope {
            Scope::All => "",
            Scope::Targets => "; issue #16's compared figures only",
        }
    );
    if scope == Scope::Targets {
        report.insert("scope".into(), json!("targets"));
        for var in ["ROUND", "ROUND_ORDER"] {
            if let Ok(v) = std::env::var(var) {
                report.insert(var.to_lowercase(), json!(v));
            }
        }
    }
    // TLS costs every call; the peers' ratios are only fair on one transport
    // (scripts/bench-queue.sh asks for plain TCP unless the URL says otherwise).
    let tls: bool = sqlx::query_scalar(
        "SELECT coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)",
    )
    .fetch_one(&admin)
    .await?;
    println!("backlog's connections: {}", transport(tls));
    report.insert("tls".into(), json!(tls));

    // Enqueue: batches of 1,000 jobs (one task each), one connection.
    reset(&admin).await?;
    let started = Instant::now();
    for chunk in 0..ENQUEUE_JOBS / ENQUEUE_BATCH {
        let jobs = (0..ENQUEUE_BATCH)
            .map(|i| noop_job(chunk * ENQUEUE_BATCH + i))
            .collect();
        q.enqueue_batch(jobs).await?;
    }
    let enqueue_rate = ENQUEUE_JOBS as f64 / started.elapsed().as_secs_f64();
    println!("enqueue (batch {ENQUEUE_BATCH}): {enqueue_rate:.0} tasks/s");
    report.insert("enqueue_tasks_per_s".into(), json!(enqueue_rate.round()));

    // Drain: claim and complete no-op tasks, both ways a worker can.
    let mut drains = serde_json::Map::new();
    // Best over loops and worker counts, per batch size.
    let mut best_of_batch: std::collections::BTreeMap<i32, f64> = Default::default();
    // The loop and worker count of the best batch-50 drain, measured again
    // with history below.
    let mut best_setup = (DrainLoop::CompleteAndClaim, 1);
    for how in [DrainLoop::ClaimThenComplete, DrainLoop::CompleteAndClaim] {
        for &batch in scope.drain_batches() {
            for workers in [1, 4, 16] {
                let tasks = if batch == 1 {
                    DRAIN_TASKS_SINGLE
                } else {
                    DRAIN_TASKS_BATCHED
                };
                reset(&admin).await?;
                let rate = drain(&url, &admin, how, workers, batch, tasks).await?;
                println!(
                    "{}, {workers:>2} workers, batch {batch:>3}: {rate:>8.0} tasks/s ({tasks} tasks)",
                    how.label()
                );
                drains.insert(
                    format!("w{workers}_b{batch}{}", how.key_suffix()),
                    json!(rate.round()),
                );
                let best = best_of_batch.entry(batch).or_default();
                if batch == HEADLINE_BATCH && rate > *best {
                    best_setup = (how, workers);
                }
                *best = best.max(rate);
            }
        }
    }
    let best_batched = best_of_batch[&HEADLINE_BATCH];
    let best_batch_500 = best_of_batch.get(&500).copied();
    report.insert("drain_tasks_per_s".into(), Value::Object(drains));
    report.insert(
        "drain_best_batched_tasks_per_s".into(),
        json!(best_batched.round()),
    );
    if let Some(rate) = best_batch_500 {
        report.insert("drain_best_batch_500_tasks_per_s".into(), json!(rate.round()));
    }

    // Enqueue → claim latency through LISTEN/NOTIFY.
    reset(&admin).await?;
    let latency = enqueue_to_claim_latency(&url).await?;
    println!(
        "enqueue→claim over {LATENCY_SAMPLES} sequential tasks: avg {:.2} ms, p50 {:.2} ms, p99 {:.2} ms",
        latency.avg, latency.p50, latency.p99
    );
    report.insert(
        "latency_ms".into(),
        json!({"avg": latency.avg, "p50": latency.p50, "p99": latency.p99}),
    );

    if scope == Scope::All {
        history_figures(&url, &admin, &q, best_setup, &mut report).await?;
    }

    // Reference 1: pgbench running the same batched claim+complete in raw SQL.
    reset(&admin).await?;
    let ceiling = pgbench_ceiling(&url, &admin).await?;
    println!("reference: pgbench raw SQL claim+complete, batch {PGBENCH_BATCH}: {ceiling:.0} tasks/s");
    report.insert("pgbench_ceiling_tasks_per_s".into(), json!(ceiling.round()));
    report.insert(
        "ratio_drain_to_pgbench".into(),
        json!(round2(best_batched / ceiling)),
    );
    println!(
        "  backlog best batched drain / pgbench ceiling = {:.2}",
        best_batched / ceiling
    );

    // References 2 and up: the peer queues the script measured in this run.
    let ours = Ours {
        tls,
        enqueue: enqueue_rate,
        drain: best_batched,
        drain_batch_500: best_batch_500,
        latency: &latency,
    };
    // A round of the targets scope is compared with its peer afterwards,
    // in the summary of the rounds.
    let peers_named = scope == Scope::All || !peers.is_empty();
    for known in PEERS.iter().filter(|_| peers_named) {
        match peers.iter().find(|p| p["peer"] == known.name) {
            Some(peer) => report_peer(known, peer, &ours, &mut report),
            None if failed.iter().any(|f| f == known.name) => {
                println!(
                    "reference: {} FAILED in this run (its output is above)",
                    known.name
                )
            }
            None => println!("reference: {} not measured (not in PEERS)", known.name),
        }
    }
    if !failed.is_empty() {
        report.insert("peers_failed".into(), json!(failed));
    }

    println!("{}", Value::Object(report));
    Ok(())
}

/// Issue #16's figures of history: the depth query and the best batch-50
/// drain without and with finished tasks, that drain beside the API's
/// vacuumer, and retention of a day of history.
async fn history_figures(
    url: &str,
    admin: &PgPool,
    q: &Queue,
    best_setup: (DrainLoop, usize),
    report: &mut serde_json::Map<String, Value>,
) -> Result<()> {
    // Depth query and the best batch-50 drain, without and with history.
    let history = history_size()?;
    let (how, workers) = best_setup;
    let flat = with_and_without_history(url, admin, q, history, how, workers).await?;
    let depth_change = percent_change(flat.depth_empty.p50, flat.depth_history.p50);
    let drain_change = percent_change(flat.drain_empty, flat.drain_history);
    println!(
        "depth query (100,000 pending; {HISTORY_ROUNDS} rounds of {DEPTH_SAMPLES} alternating): p50 {:.2} ms, \
         max {:.2} ms with no history; p50 {:.2} ms, max {:.2} ms with {history} finished ({depth_change:+.0} % at p50)",
        flat.depth_empty.p50, flat.depth_empty.max, flat.depth_history.p50, flat.depth_history.max
    );
    println!(
        "{}, {workers} workers, batch {HEADLINE_BATCH}, best of {HISTORY_ROUNDS} alternating: {:.0} tasks/s with no history, \
         {:.0} tasks/s with {history} finished ({drain_change:+.0} %)",
        how.label(),
        flat.drain_empty,
        flat.drain_history
    );
    report.insert(
        "depth_query_ms".into(),
        json!({
            "p50": flat.depth_history.p50,
            "max": flat.depth_history.max,
            "history": history,
            "no_history": {"p50": flat.depth_empty.p50, "max": flat.depth_empty.max},
            "change_p50_percent": round2(depth_change),
        }),
    );
    report.insert(
        "drain_with_history".into(),
        json!({
            "loop": how.label(),
            "workers": workers,
            "batch": HEADLINE_BATCH,
            "rounds": HISTORY_ROUNDS,
            "history": history,
            "no_history_tasks_per_s": flat.drain_empty.round(),
            "history_tasks_per_s": flat.drain_history.round(),
            "change_percent": round2(drain_change),
        }),
    );

    // The same drain with the API's vacuumer beside it, and again without.
    let (without, with) = with_and_without_vacuumer(url, admin, how, workers).await?;
    println!(
        "{}, {workers} workers, batch {HEADLINE_BATCH}, best of {HISTORY_ROUNDS} alternating: {without:.0} tasks/s \
         alone, {with:.0} tasks/s with the vacuumer ({:+.0} %)",
        how.label(),
        percent_change(without, with)
    );
    report.insert(
        "drain_with_vacuumer".into(),
        json!({
            "loop": how.label(),
            "workers": workers,
            "batch": HEADLINE_BATCH,
            "rounds": HISTORY_ROUNDS,
            "alone_tasks_per_s": without.round(),
            "vacuumer_tasks_per_s": with.round(),
            "change_percent": round2(percent_change(without, with)),
        }),
    );

    // Retention of a day of history, a small day and a large one.
    let days = time_day_retention(admin, q).await?;
    for day in &days {
        println!(
            "retention of a day of history ({} jobs, each with a task and an artifact record, half keyed and half in their task row): \
             {:.0} ms; the cleaner forgetting its keys afterwards: {:.0} ms",
            day.jobs, day.ms, day.keys_ms
        );
    }
    report.insert(
        "retention_day_ms".into(),
        json!(days
            .iter()
            .map(|d| json!({"jobs": d.jobs, "ms": d.ms.round(), "cleaner_keys_ms": d.keys_ms.round()}))
            .collect::<Vec<_>>()),
    );

    Ok(())
}

fn noop_job(i: usize) -> NewJob {
    NewJob::new("bench", JobType::Text, json!({ "prompt": format!("noop {i}") }))
}

/// From `before` to `after`, in percent of `before`.
fn percent_change(before: f64, after: f64) -> f64 {
    (after / before - 1.0) * 100.0
}

fn transport(tls: bool) -> &'static str {
    if tls {
        "TLS"
    } else {
        "plain TCP"
    }
}

/// A figure of a JSON report; NaN when it is missing, so a ratio to it
/// reads NaN rather than failing the run.
fn number(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// A ratio to a peer's figure: two decimals, or two significant digits
/// when it is that small (backlog's latency over pg-boss's polling), so
/// it never reads ×0.0.
fn ratio(ours: f64, theirs: f64) -> f64 {
    let r = ours / theirs;
    if r.abs() >= 0.1 || !r.is_normal() {
        return round2(r);
    }
    let scale = 10f64.powi(1 - r.abs().log10().floor() as i32);
    (r * scale).round() / scale
}

/// Empty the tables and reclaim space, so each phase starts alike.
async fn reset(pool: &PgPool) -> Result<()> {
    sqlx::query(
        "TRUNCATE jobs, job_tasks, job_history, task_history, job_keys, artifacts, artifact_deletions, retired_days, workers, jobs_archive",
    )
        .execute(pool)
        .await?;
    sqlx::query("DROP TABLE IF EXISTS bench_raw")
        .execute(pool)
        .await?;
    sqlx::query("VACUUM ANALYZE jobs, job_tasks, job_history, task_history")
        .execute(pool)
        .await?;
    Ok(())
}

async fn fill(pool: &PgPool, tasks: usize) -> Result<()> {
    let q = Queue::new(pool.clone());
    for chunk in 0..tasks.div_ceil(ENQUEUE_BATCH) {
        let n = ENQUEUE_BATCH.min(tasks - chunk * ENQUEUE_BATCH);
        q.enqueue_batch((0..n).map(|i| noop_job(chunk * ENQUEUE_BATCH + i)).collect())
            .await?;
    }
    sqlx::query("ANALYZE jobs, job_tasks").execute(pool).await?;
    Ok(())
}

/// How a drain loop stores a batch and takes the next.
#[derive(Clone, Copy)]
enum DrainLoop {
    /// Claim a batch, then complete it: two calls per batch.
    ClaimThenComplete,
    /// Complete each batch in the call that claims the next, as the worker
    /// runtime does: one call per batch.
    CompleteAndClaim,
}

impl DrainLoop {
    fn label(self) -> &'static str {
        match self {
            DrainLoop::ClaimThenComplete => "claim, then complete",
            DrainLoop::CompleteAndClaim => "complete and claim in one call",
        }
    }

    fn key_suffix(self) -> &'static str {
        match self {
            DrainLoop::ClaimThenComplete => "",
            DrainLoop::CompleteAndClaim => "_complete_and_claim",
        }
    }
}

/// Enqueue `tasks`, beside whatever the tables hold, then drain them with
/// `workers` loops each taking `batch` tasks at a time and completing them,
/// until the queue is empty. Returns tasks per second.
async fn drain(
    url: &str,
    admin: &PgPool,
    how: DrainLoop,
    workers: usize,
    batch: i32,
    tasks: usize,
) -> Result<f64> {
    drain_beside(url, admin, how, workers, batch, tasks, Beside::Nothing).await
}

/// What runs beside a drain's loops.
#[derive(Clone, Copy, PartialEq)]
enum Beside {
    Nothing,
    /// The API's vacuumer, on its default settings (`SweeperSettings`), on
    /// a connection of its own.
    Vacuumer,
}

/// The API's vacuumer defaults: a look every 2 s, a vacuum from 10,000
/// dead rows of the open-task table.
const VACUUMER_EVERY: Duration = Duration::from_secs(2);
const VACUUMER_MIN_DEAD_ROWS: i64 = 10_000;

async fn drain_beside(
    url: &str,
    admin: &PgPool,
    how: DrainLoop,
    workers: usize,
    batch: i32,
    tasks: usize,
    beside: Beside,
) -> Result<f64> {
    fill(admin, tasks).await?;
    let pool = queue::pool_options(workers as u32).connect(url).await?;
    let q = Queue::new(pool);
    let vacuumer = (beside == Beside::Vacuumer).then(|| {
        let q = Queue::new(admin.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(VACUUMER_EVERY);
            tick.tick().await;
            let mut left = 0;
            loop {
                tick.tick().await;
                let look = q.vacuum_tasks(VACUUMER_MIN_DEAD_ROWS, left).await?;
                if look.outcome == VacuumOutcome::Vacuumed {
                    left = look.dead_rows;
                }
            }
            #[allow(unreachable_code)]
            anyhow::Ok(())
        })
    });
    let started = Instant::now();
    let loops: Vec<_> = (0..workers)
        .map(|w| {
            let q = q.clone();
            tokio::spawn(async move {
                let worker = format!("bench-{w}");
                let types = [TaskType::TextGeneration];
                let mut done = 0usize;
                let mut held = q.claim(&worker, &types, batch).await?;
                while !held.is_empty() {
                    let results: Vec<_> = held.iter().map(|t| (t.lease(), Value::Null)).collect();
                    held = match how {
                        DrainLoop::ClaimThenComplete => {
                            done += q.complete_batch(&worker, &results).await?.len();
                            q.claim(&worker, &types, batch).await?
                        }
                        DrainLoop::CompleteAndClaim => {
                            let next = q.complete_and_claim(&worker, &results, &types, batch).await?;
                            done += next.completed.len();
                            next.claimed
                        }
                    };
                }
                anyhow::Ok(done)
            })
        })
        .collect();
    let mut done = 0;
    for l in loops {
        done += l.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(vacuumer) = vacuumer {
        // It only stops on an error, which fails the measurement.
        if vacuumer.is_finished() {
            vacuumer.await??;
        } else {
            vacuumer.abort();
        }
    }
    if done != tasks {
        bail!("drain completed {done} of {tasks} tasks");
    }
    Ok(tasks as f64 / elapsed)
}

struct Latency {
    avg: f64,
    p50: f64,
    p99: f64,
}

/// One worker waits on LISTEN; each task is enqueued only after the previous
/// one was claimed, so every sample is a cold wake-up.
async fn enqueue_to_claim_latency(url: &str) -> Result<Latency> {
    let pool = queue::pool_options(4).connect(url).await?;
    let q = Queue::new(pool);
    let (claimed_tx, mut claimed_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let mut wake = q.listen().await?;
    let worker = {
        let q = q.clone();
        tokio::spawn(async move {
            let mut done = 0;
            while done < LATENCY_SAMPLES {
                if wake.next(Duration::from_secs(1)).await?.is_none() {
                    continue;
                }
                for task in q.claim("latency", &[TaskType::TextGeneration], 1).await? {
                    let _ = claimed_tx.send(Instant::now());
                    q.complete("latency", task.lease(), Value::Null).await?;
                    done += 1;
                }
            }
            anyhow::Ok(())
        })
    };
    let mut samples = Vec::with_capacity(LATENCY_SAMPLES);
    for i in 0..LATENCY_SAMPLES {
        let sent = Instant::now();
        q.enqueue(noop_job(i)).await?;
        let claimed = claimed_rx.recv().await.context("latency worker stopped")?;
        samples.push(claimed.duration_since(sent).as_secs_f64() * 1000.0);
    }
    worker.await??;
    samples.sort_by(f64::total_cmp);
    Ok(Latency {
        avg: samples.iter().sum::<f64>() / samples.len() as f64,
        p50: percentile(&samples, 0.50),
        p99: percentile(&samples, 0.99),
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

struct DepthTime {
    p50: f64,
    max: f64,
}

impl DepthTime {
    fn of(mut times: Vec<f64>) -> Self {
        times.sort_by(f64::total_cmp);
        DepthTime {
            p50: percentile(&times, 0.5),
            max: *times.last().unwrap_or(&f64::NAN),
        }
    }
}

/// Issue #16's flat-with-history target: the depth query and the best
/// batch-50 drain (best of its rounds), each measured on a database with
/// no history and on one with `history` finished tasks, rounds alternating.
struct HistoryFigures {
    depth_empty: DepthTime,
    depth_history: DepthTime,
    drain_empty: f64,
    drain_history: f64,
}

/// Finished tasks for the second measurements: issue #16's target is
/// stated at 10,000,000 (`DEPTH_HISTORY=10000000`, a few minutes of
/// filling); the default keeps the run short.
fn history_size() -> Result<u64> {
    match std::env::var("DEPTH_HISTORY") {
        Ok(v) => v
            .parse()
            .with_context(|| format!("DEPTH_HISTORY must be a number of tasks, got {v:?}")),
        Err(_) => Ok(1_000_000),
    }
}

/// The rows written straight in SQL, each kind under a tenant of its own
/// so it can be found and removed through the tenant index.
#[derive(Clone, Copy)]
enum Rows {
    /// Queued jobs with a pending task.
    Backlog,
    /// Complete jobs, created and finished a day ago.
    History,
}

impl Rows {
    fn tenant(self) -> &'static str {
        match self {
            Rows::Backlog => "bench-backlog",
            Rows::History => "bench-history",
        }
    }
}
/// The headline drain's batch, issue #16's: the one compared with
/// graphile-worker, and measured again with history and the vacuumer.
const HEADLINE_BATCH: i32 = 50;
/// That drain's rounds on each side, best of: one round apart from the
/// other varies by ±15 % on a shared machine, more than the target's 10 %.
const HISTORY_ROUNDS: usize = 3;

async fn with_and_without_history(
    url: &str,
    admin: &PgPool,
    q: &Queue,
    history: u64,
    how: DrainLoop,
    workers: usize,
) -> Result<HistoryFigures> {
    // The history lives in a second database, so the two sides can take
    // turns: measured one after the other, a shared machine's drift between
    // the halves of the run read as history's cost (−23 % and −11 % on the
    // drain in two runs on one machine, the side without history first).
    let (name, history_url) = sibling_database(url, "history")?;
    recreate_database(admin, &name).await?;
    let history_admin = queue::pool_options(2).connect(&history_url).await?;
    let history_q = Queue::new(history_admin.clone());
    history_q.migrate().await?;
    let empty = Side { url, admin, q };
    let with_history = Side {
        url: &history_url,
        admin: &history_admin,
        q: &history_q,
    };
    let figures = side_by_side(&empty, &with_history, history, how, workers).await;
    history_admin.close().await;
    drop_database(admin, &name).await?;
    figures
}

/// One side of a comparison: a database, and the queue on it.
struct Side<'a> {
    url: &'a str,
    admin: &'a PgPool,
    q: &'a Queue,
}

async fn side_by_side(
    empty: &Side<'_>,
    with_history: &Side<'_>,
    history: u64,
    how: DrainLoop,
    workers: usize,
) -> Result<HistoryFigures> {
    // Backlog and history straight in SQL: ten million enqueues through the
    // API would only measure enqueue again. The history in steps of a
    // million, so no statement runs for minutes.
    reset(empty.admin).await?;
    add_rows(empty.admin, Rows::Backlog, DEPTH_BACKLOG, 0).await?;
    add_rows(with_history.admin, Rows::Backlog, DEPTH_BACKLOG, 0).await?;
    let mut added = 0;
    while added < history {
        let step = (history - added).min(1_000_000);
        add_rows(with_history.admin, Rows::History, step, added).await?;
        added += step;
    }
    let (mut depth_empty, mut depth_history) = (Vec::new(), Vec::new());
    for _ in 0..HISTORY_ROUNDS {
        depth_empty.extend(time_depth(empty.admin, empty.q).await?);
        depth_history.extend(time_depth(with_history.admin, with_history.q).await?);
    }
    // The same drain beside the history alone: the depth query's backlog
    // goes (its tasks are of every type, and the drain must end empty).
    sqlx::query("DELETE FROM job_tasks WHERE status = 'pending'")
        .execute(with_history.admin)
        .await?;
    sqlx::query("DELETE FROM jobs WHERE tenant = $1")
        .bind(Rows::Backlog.tenant())
        .execute(with_history.admin)
        .await?;
    // Each side's round starts from vacuumed open-task tables; the history
    // side's finished tasks join its history.
    let (mut drain_empty, mut drain_history): (f64, f64) = (0.0, 0.0);
    for _ in 0..HISTORY_ROUNDS {
        reset(empty.admin).await?;
        let rate = drain(
            empty.url,
            empty.admin,
            how,
            workers,
            HEADLINE_BATCH,
            DRAIN_TASKS_BATCHED,
        )
        .await?;
        drain_empty = drain_empty.max(rate);
        sqlx::query("VACUUM ANALYZE jobs, job_tasks, job_history, task_history")
            .execute(with_history.admin)
            .await?;
        let rate = drain(
            with_history.url,
            with_history.admin,
            how,
            workers,
            HEADLINE_BATCH,
            DRAIN_TASKS_BATCHED,
        )
        .await?;
        drain_history = drain_history.max(rate);
    }
    Ok(HistoryFigures {
        depth_empty: DepthTime::of(depth_empty),
        depth_history: DepthTime::of(depth_history),
        drain_empty,
        drain_history,
    })
}

/// A database beside the one `url` names, `<its name>_<suffix>` on the
/// same server: its name and its URL.
fn sibling_database(url: &str, suffix: &str) -> Result<(String, String)> {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let (server, database) = base
        .rsplit_once('/')
        .filter(|(server, database)| server.contains("//") && !database.is_empty())
        .with_context(|| format!("DATABASE_URL must name a database, got {url:?}"))?;
    let name = format!("{database}_{suffix}");
    // Created and dropped by name in SQL below.
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        bail!("the bench database's name must be lowercase letters, digits and _, got {database:?}");
    }
    Ok((name.clone(), format!("{server}/{name}{query}")))
}

/// Drop `name` if a failed run left it, and create it afresh.
async fn recreate_database(admin: &PgPool, name: &str) -> Result<()> {
    drop_database(admin, name).await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(admin)
        .await
        .with_context(|| format!("creating {name}, the history side's database (needs CREATEDB)"))?;
    Ok(())
}

/// Drop `name`, its connections with it.
async fn drop_database(admin: &PgPool, name: &str) -> Result<()> {
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(admin)
        .await?;
    Ok(())
}

/// The best batch-50 drain alone and with the vacuumer beside it (best of
/// `HISTORY_ROUNDS` each, rounds alternating), on empty tables.
async fn with_and_without_vacuumer(
    url: &str,
    admin: &PgPool,
    how: DrainLoop,
    workers: usize,
) -> Result<(f64, f64)> {
    let (mut alone, mut vacuumed): (f64, f64) = (0.0, 0.0);
    for _ in 0..HISTORY_ROUNDS {
        for (beside, best) in [(Beside::Nothing, &mut alone), (Beside::Vacuumer, &mut vacuumed)] {
            reset(admin).await?;
            let rate = drain_beside(
                url,
                admin,
                how,
                workers,
                HEADLINE_BATCH,
                DRAIN_TASKS_BATCHED,
                beside,
            )
            .await?;
            *best = best.max(rate);
        }
    }
    Ok((alone, vacuumed))
}

/// `count` jobs of one task each, ids UUIDv7 as the queue's own, created
/// `offset` milliseconds on from their kind's start so steps do not overlap.
async fn add_rows(admin: &PgPool, rows: Rows, count: u64, offset: u64) -> Result<()> {
    // Finished jobs live in history; the task ids come from the tasks' own
    // sequence, as a finished task's did.
    let (jobs, tasks, task_id) = match rows {
        Rows::History => (
            "job_history",
            "task_history (id, ",
            "nextval(pg_get_serial_sequence('job_tasks', 'id')), ",
        ),
        Rows::Backlog => ("jobs", "job_tasks (", ""),
    };
    sqlx::query(&format!(
        "WITH j AS (
             INSERT INTO {jobs} (id, tenant, job_type, status, input, finished_at)
             SELECT overlay(uuid_v7_floor(s.at + g * interval '1 millisecond')::text
                            PLACING substr(md5(random()::text), 1, 12) FROM 25)::uuid,
                    $1, 'text', s.status, '{{}}', CASE WHEN s.status = 'complete' THEN s.at END
             FROM (SELECT CASE WHEN $4 THEN 'complete' ELSE 'queued' END AS status,
                          CASE WHEN $4 THEN now() - interval '1 day' ELSE now() - interval '1 hour' END
                          + $3 * interval '1 millisecond' AS at) s,
                  generate_series(1, $2) g
             RETURNING id, status, finished_at
         )
         INSERT INTO {tasks}job_id, task_type, status, finished_at, run_at)
         SELECT {task_id}id, (ARRAY['text_generation','pdf_generation','audio_generation'])[1 + (random() * 2)::int],
                CASE WHEN status = 'complete' THEN 'complete' ELSE 'pending' END,
                finished_at, now() - random() * interval '10 minutes'
         FROM j"
    ))
    .bind(rows.tenant())
    .bind(count as i64)
    .bind(offset as i64)
    .bind(matches!(rows, Rows::History))
    .execute(admin)
    .await?;
    Ok(())
}

struct DayRetention {
    jobs: u64,
    ms: f64,
    /// The cleaner forgetting the day's keys afterwards.
    keys_ms: f64,
}

/// Jobs in each timed day of history: the second ten times the first, so
/// the two times show whether a day's removal grows with its size.
const RETENTION_DAYS_JOBS: [u64; 2] = [50_000, 500_000];

/// Retention of whole days of history: history laid out as a database
/// migrated twenty days ago has it (a partition per day since), a day ten
/// and one nine days back filled with finished jobs (a task and an
/// artifact record each; half of them keyed, with a job row, the others
/// their task's row alone), and `Queue::prune` timed as each
/// day passes the age, then the cleaner's forgetting of the day's keys.
async fn time_day_retention(admin: &PgPool, q: &Queue) -> Result<Vec<DayRetention>> {
    reset(admin).await?;
    test_support::history_partitioned_since(admin, 20).await;
    for (days_back, jobs) in [10, 9].into_iter().zip(RETENTION_DAYS_JOBS) {
        sqlx::query(
            "WITH d AS (
                 SELECT overlay(uuid_v7_floor(d.at)::text PLACING substr(md5(random()::text), 1, 12) FROM 25)::uuid
                            AS id,
                        d.at, d.g % 2 = 0 AS keyed
                 -- Multiplied before divided: a step rounded to the
                 -- microsecond, times 500,000, can reach the next day.
                 FROM (SELECT g, (current_date - $1)::timestamp AT TIME ZONE 'UTC' + g * interval '1 day' / ($2 + 1) AS at
                       FROM generate_series(1, $2) g) d
             ), j AS (
                 -- Half keyed, with a job row; the others jobs of one
                 -- task that completed in their task's row.
                 INSERT INTO job_history (id, tenant, job_type, status, input, finished_at)
                 SELECT d.id, 'bench-retention', 'text', 'complete', '{}', d.at FROM d WHERE d.keyed
                 RETURNING id
             ), k AS (
                 INSERT INTO job_keys (tenant, idempotency_key, job_id)
                 SELECT 'bench-retention', id::text, id FROM j
             ), t AS (
                 INSERT INTO task_history (id, job_id, task_type, status, finished_at, job_tenant, job_type, job_input)
                 SELECT nextval(pg_get_serial_sequence('job_tasks', 'id')), d.id, 'text_generation', 'complete',
                        d.at, CASE WHEN NOT d.keyed THEN 'bench-retention' END,
                        CASE WHEN NOT d.keyed THEN 'text' END, CASE WHEN NOT d.keyed THEN '{}'::jsonb END
                 FROM d
                 RETURNING id, job_id
             )
             INSERT INTO artifacts (id, job_id, task_id, kind, content_type, storage_key, bytes, sha256)
             SELECT gen_random_uuid(), job_id, id, 'text', 'text/markdown',
                    artifact_prefix(job_id) || 'text.md', 1, repeat('0', 64)
             FROM t",
        )
        .bind(days_back)
        .bind(jobs as i64)
        .execute(admin)
        .await?;
    }
    sqlx::query("VACUUM ANALYZE job_history, task_history, artifacts, job_keys")
        .execute(admin)
        .await?;
    let mut figures = Vec::new();
    // The ten-day-old day passes an age of nine days, the other one of eight.
    for (age_days, jobs) in [9, 8].into_iter().zip(RETENTION_DAYS_JOBS) {
        let started = Instant::now();
        let removed = q
            .prune(queue::Retention {
                older_than: Duration::from_secs(age_days * 86_400),
                mode: queue::RetentionMode::Delete,
                batch: 1_000,
            })
            .await?;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        if removed != jobs {
            bail!("retention at {age_days} days removed {removed} jobs, expected the day's {jobs}");
        }
        // What the cleaner does afterwards, in the background: forget the
        // day's idempotency keys, a batch per statement as the API does.
        let started = Instant::now();
        let mut forgotten = 0;
        for day in q.retired_days().await? {
            forgotten += q.forget_keys_of_retired_day(&day, 5_000).await?;
            q.forget_retired_day(&day).await?;
        }
        let keys_ms = started.elapsed().as_secs_f64() * 1000.0;
        if forgotten != jobs / 2 {
            bail!("the cleaner forgot {forgotten} keys, expected the day's keyed half of {jobs}");
        }
        figures.push(DayRetention { jobs, ms, keys_ms });
    }
    Ok(figures)
}

/// The depth query's timing: unmeasured calls, then timed ones, per round.
const DEPTH_WARMUP: usize = 10;
const DEPTH_SAMPLES: usize = 100;
/// Pending tasks the depth query counts, with and without history.
const DEPTH_BACKLOG: u64 = 100_000;

/// One side's depth timings: unmeasured calls, then `DEPTH_SAMPLES` timed
/// ones, in milliseconds.
async fn time_depth(admin: &PgPool, q: &Queue) -> Result<Vec<f64>> {
    sqlx::query("VACUUM ANALYZE jobs, job_tasks, job_history, task_history")
        .execute(admin)
        .await?;
    // Each side is timed from a finished checkpoint: the writes before it
    // (drains, a backlog, a million rows of history) otherwise leave one
    // running through some timings and not others.
    sqlx::query("CHECKPOINT")
        .execute(admin)
        .await
        .context("CHECKPOINT before timing the depth query (needs superuser or pg_checkpoint)")?;
    // Unmeasured calls first: the statement is prepared and its plan
    // settled (custom plans for the first five). The samples of a side's
    // rounds together narrow its p50; the swing between the sides with and
    // without history went only with the checkpoint above (docs/bench-queue-log.md).
    for _ in 0..DEPTH_WARMUP {
        q.depth().await?;
    }
    let mut times = Vec::new();
    for _ in 0..DEPTH_SAMPLES {
        let started = Instant::now();
        q.depth().await?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(times)
}

/// PostgreSQL's ceiling for the same work in raw SQL: each pgbench
/// transaction claims 50 rows with SKIP LOCKED (one commit) and completes
/// them (a second commit), like a worker's claim and complete calls.
async fn pgbench_ceiling(url: &str, admin: &PgPool) -> Result<f64> {
    sqlx::query(
        "CREATE TABLE bench_raw (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                                 status text NOT NULL DEFAULT 'pending', claimed_by text)",
    )
    .execute(admin)
    .await?;
    sqlx::query("CREATE INDEX bench_raw_pending ON bench_raw (id) WHERE status = 'pending'")
        .execute(admin)
        .await?;
    let mut best: f64 = 0.0;
    for clients in [4usize, 16] {
        sqlx::query("TRUNCATE bench_raw").execute(admin).await?;
        sqlx::query("INSERT INTO bench_raw (status) SELECT 'pending' FROM generate_series(1, $1)")
            .bind(DRAIN_TASKS_BATCHED as i64)
            .execute(admin)
            .await?;
        sqlx::query("VACUUM ANALYZE bench_raw").execute(admin).await?;
        let script = std::env::temp_dir().join(format!("backlog-pgbench-{}.sql", std::process::id()));
        std::fs::write(
            &script,
            format!(
                "WITH c AS (SELECT id FROM bench_raw WHERE status = 'pending' ORDER BY id LIMIT {PGBENCH_BATCH} FOR UPDATE SKIP LOCKED),\n\
                 u AS (UPDATE bench_raw b SET status = 'claimed', claimed_by = 'pgbench' FROM c WHERE b.id = c.id RETURNING b.id)\n\
                 SELECT coalesce(quote_literal(array_agg(id)::text), '''{{}}''') AS ids FROM u \\gset\n\
                 UPDATE bench_raw SET status = 'complete' WHERE id = ANY (:ids::bigint[]) AND claimed_by = 'pgbench';\n"
            ),
        )?;
        let per_client = DRAIN_TASKS_BATCHED / PGBENCH_BATCH / clients;
        let out = Command::new("pgbench")
            .args([
                "-n",
                "-c",
                &clients.to_string(),
                "-j",
                "2",
                "-t",
                &per_client.to_string(),
                "-f",
            ])
            .arg(&script)
            .arg(url)
            .output()
            .context("running pgbench (postgresql-contrib / postgresql client)")?;
        let _ = std::fs::remove_file(&script);
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "pgbench failed: {}\n{stdout}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let tps = stdout
            .lines()
            .find_map(|l| l.strip_prefix("tps = ").and_then(|r| r.split_whitespace().next()))
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| format!("no tps in pgbench output:\n{stdout}"))?;
        let rate = tps * PGBENCH_BATCH as f64;
        println!("  pgbench {clients:>2} clients: {rate:.0} tasks/s");
        best = best.max(rate);
    }
    Ok(best)
}

/// A peer queue scripts/bench-queue.sh may measure (scripts/peers/NAME).
struct Peer {
    /// As in the `peer` field of its JSON line.
    name: &'static str,
    /// Its figures' key in the report, and `ratio_to_` that.
    key: &'static str,
    /// Whether issue #16's targets are stated against it.
    has_targets: bool,
}

const PEERS: [Peer; 2] = [
    Peer {
        name: "graphile-worker",
        key: "graphile_worker",
        has_targets: true,
    },
    Peer {
        name: "pg-boss",
        key: "pg_boss",
        has_targets: false,
    },
];

/// backlog's own figures of this run, for the ratios to the peers.
struct Ours<'a> {
    /// Whether backlog's connections are encrypted.
    tls: bool,
    enqueue: f64,
    /// Best drain claiming 50 at a time.
    drain: f64,
    /// Best drain claiming 500 at a time; not measured in the targets scope.
    drain_batch_500: Option<f64>,
    latency: &'a Latency,
}

/// One of issue #16's targets against graphile-worker.
struct Target {
    /// Its key in the report.
    key: &'static str,
    /// How the report names it.
    label: &'static str,
    /// A ratio to graphile-worker's figure that must reach `bound`, or a
    /// time in ms that must stay under it.
    ratio: bool,
    bound: f64,
}

const TARGETS: [Target; 4] = [
    Target {
        key: "drain_at_50",
        label: "drain at 50 (graphile-worker fetching 50)",
        ratio: true,
        bound: 1.2,
    },
    Target {
        key: "enqueue",
        label: "enqueue, batches of 1,000",
        ratio: true,
        bound: 1.0,
    },
    Target {
        key: "latency_avg",
        label: "enqueue→claim avg",
        ratio: false,
        bound: 1.5,
    },
    Target {
        key: "latency_p99",
        label: "enqueue→claim p99",
        ratio: false,
        bound: 5.0,
    },
];

impl Target {
    fn met(&self, figure: f64) -> bool {
        if self.ratio {
            figure >= self.bound
        } else {
            figure < self.bound
        }
    }

    /// "×1.31 (≥ ×1.2: met)" or "1.68 ms (< 1.5 ms: not met)".
    fn verdict(&self, figure: f64) -> String {
        let met = if self.met(figure) { "met" } else { "not met" };
        if self.ratio {
            format!("×{figure:.2} (≥ ×{}: {met})", self.bound)
        } else {
            format!("{figure:.2} ms (< {} ms: {met})", self.bound)
        }
    }

    /// This target's figure in a report's `issue_16_targets`.
    fn figure_in(&self, targets: &Value) -> f64 {
        number(&targets[self.key]["figure"])
    }
}

/// Issue #16's targets for this run's figures against graphile-worker's.
fn issue_16_targets(ours: &Ours<'_>, peer: &Value) -> Value {
    let figures = [
        ours.drain / number(&peer["drain_matched_batch_jobs_per_s"]),
        ours.enqueue / number(&peer["enqueue_jobs_per_s"]),
        ours.latency.avg,
        ours.latency.p99,
    ];
    let mut out = serde_json::Map::new();
    for (target, figure) in TARGETS.iter().zip(figures) {
        // Judged as reported: the summary of rounds reads the rounded figure.
        let figure = round2(figure);
        out.insert(
            target.key.into(),
            json!({"figure": figure, "met": target.met(figure)}),
        );
    }
    Value::Object(out)
}

/// Print a peer's figures and backlog's ratios to them; add both to the report.
fn report_peer(known: &Peer, peer: &Value, ours: &Ours<'_>, report: &mut serde_json::Map<String, Value>) {
    // Not measured in the targets scope.
    let drain = peer["drain_jobs_per_s"].as_f64();
    let enqueue = number(&peer["enqueue_jobs_per_s"]);
    let avg = number(&peer["latency_ms"]["avg"]);
    let p99 = number(&peer["latency_ms"]["p99"]);
    // A peer may say how its drain figure was taken when it differs from a
    // full drain (pg-boss times the first jobs of a deep queue).
    let drain_note = peer["drain_note"]
        .as_str()
        .map(|n| format!(" ({n})"))
        .unwrap_or_default();
    println!(
        "reference: {} {}: {}enqueue {enqueue:.0} jobs/s, enqueue→start ({}) avg {avg:.2} ms, p99 {p99:.2} ms",
        known.name,
        peer["version"].as_str().unwrap_or("?"),
        drain
            .map(|d| format!("drain {d:.0} jobs/s{drain_note}, "))
            .unwrap_or_default(),
        peer["latency_wakeup"].as_str().unwrap_or("?"),
    );
    match peer["tls"].as_bool() {
        Some(theirs) if theirs == ours.tls => println!("  transport matched: {}", transport(theirs)),
        Some(theirs) => println!(
            "  transport NOT matched: backlog {}, {} {}; the ratios compare unlike connections",
            transport(ours.tls),
            known.name,
            transport(theirs)
        ),
        None => println!("  transport of {} not reported", known.name),
    }
    let mut ratios = json!({
        "enqueue": ratio(ours.enqueue, enqueue),
        "latency_avg": ratio(ours.latency.avg, avg),
        "latency_p99": ratio(ours.latency.p99, p99),
    });
    if let Some(drain) = drain {
        ratios["drain"] = json!(ratio(ours.drain, drain));
        println!(
            "  backlog (batch 50) / {} at its own settings: drain ×{}",
            known.name, ratios["drain"]
        );
    }
    println!(
        "  backlog / {}: enqueue ×{}, latency avg ×{} and p99 ×{}",
        known.name, ratios["enqueue"], ratios["latency_avg"], ratios["latency_p99"],
    );
    // graphile-worker fetches 500 jobs at a time at its documented settings
    // and backlog's headline drain claims 50: compare each at the other's
    // batch too (backlog claiming 500, graphile-worker fetching 50).
    if peer["drain_matched_local_queue"] == 50 {
        let drain_fetching_50 = number(&peer["drain_matched_batch_jobs_per_s"]);
        let mut same_batch = json!({"batch_50": ratio(ours.drain, drain_fetching_50)});
        if let (Some(drain), Some(ours_500), true) =
            (drain, ours.drain_batch_500, peer["drain_local_queue"] == 500)
        {
            same_batch["batch_500"] = json!(ratio(ours_500, drain));
            println!(
                "  drain at the same batch: backlog claiming 500 ({ours_500:.0} tasks/s) / {} fetching 500 = ×{}",
                known.name, same_batch["batch_500"],
            );
        }
        println!(
            "  drain at the same batch: backlog claiming 50 ({:.0} tasks/s) / {} fetching 50 ({drain_fetching_50:.0} jobs/s) = ×{}",
            ours.drain, known.name, same_batch["batch_50"],
        );
        ratios["drain_same_batch"] = same_batch;
    }
    if known.has_targets {
        let targets = issue_16_targets(ours, peer);
        let verdicts: Vec<String> = TARGETS
            .iter()
            .map(|t| format!("{} {}", t.label, t.verdict(t.figure_in(&targets))))
            .collect();
        println!("  issue #16's targets: {}", verdicts.join("; "));
        report.insert("issue_16_targets".into(), targets);
    }
    report.insert(known.key.into(), peer.clone());
    report.insert(format!("ratio_to_{}", known.key), ratios);
}

/// A colon- or comma-separated list in the environment; empty when unset.
fn env_list(var: &str, sep: char) -> Vec<String> {
    std::env::var(var)
        .unwrap_or_default()
        .split(sep)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The last JSON object line of a file a peer or a round printed.
fn last_json_line(path: &str) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let last = text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .with_context(|| format!("{path}: printed no JSON"))?;
    serde_json::from_str(last).with_context(|| format!("{path}: last JSON line"))
}

/// The peers' JSON lines (the last `{` line of each file in the
/// colon-separated `PEER_RESULTS`) and the names in `PEERS_FAILED`.
fn peer_results() -> Result<(Vec<Value>, Vec<String>)> {
    let mut peers = Vec::new();
    for path in env_list("PEER_RESULTS", ':') {
        let peer = last_json_line(&path)?;
        if !PEERS.iter().any(|p| peer["peer"] == p.name) {
            bail!("{path}: unknown peer {}", peer["peer"]);
        }
        peers.push(peer);
    }
    Ok((peers, env_list("PEERS_FAILED", ',')))
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    match xs.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => xs[n / 2],
        n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

/// `make bench-queue ROUNDS=N`'s summary: each round's figures beside
/// graphile-worker's of the same round, the medians of the rounds, and in
/// how many rounds each of issue #16's targets was met.
fn summarize_rounds(ours_files: &[String], peer_files: &[String]) -> Result<()> {
    if ours_files.len() != peer_files.len() {
        bail!(
            "ROUND_RESULTS names {} rounds and ROUND_PEER_RESULTS {}; they go round by round",
            ours_files.len(),
            peer_files.len()
        );
    }
    let mut rounds = Vec::new();
    for (ours_path, peer_path) in ours_files.iter().zip(peer_files) {
        let mut round = last_json_line(ours_path)?;
        if round["scope"] != "targets" {
            bail!("{ours_path}: not a round of backlog's targets scope (BENCH_SCOPE=targets)");
        }
        let peer = last_json_line(peer_path)?;
        if peer["peer"] != "graphile-worker" || peer["scope"] != "targets" {
            bail!("{peer_path}: not a round of graphile-worker's targets scope (BENCH_SCOPE=targets)");
        }
        let latency = Latency {
            avg: number(&round["latency_ms"]["avg"]),
            p50: number(&round["latency_ms"]["p50"]),
            p99: number(&round["latency_ms"]["p99"]),
        };
        let ours = Ours {
            tls: round["tls"].as_bool().unwrap_or(false),
            enqueue: number(&round["enqueue_tasks_per_s"]),
            drain: number(&round["drain_best_batched_tasks_per_s"]),
            drain_batch_500: None,
            latency: &latency,
        };
        if peer["tls"].as_bool() != Some(ours.tls) {
            bail!("{peer_path}: graphile-worker's transport is not backlog's in this round");
        }
        round["issue_16_targets"] = issue_16_targets(&ours, &peer);
        round["graphile_worker"] = peer;
        rounds.push(round);
    }
    let n = rounds.len();
    println!("{n} alternating rounds, backlog / graphile-worker:");
    for r in &rounds {
        let peer = &r["graphile_worker"];
        println!(
            "  round {} ({} first): pgbench {:.0} tasks/s; enqueue {:.0} / {:.0}; drain at 50 {:.0} / {:.0}; \
             latency avg {:.2} / {:.2} ms, p99 {:.2} / {:.2} ms",
            r["round"].as_str().unwrap_or("?"),
            r["round_order"].as_str().unwrap_or("?"),
            number(&r["pgbench_ceiling_tasks_per_s"]),
            number(&r["enqueue_tasks_per_s"]),
            number(&peer["enqueue_jobs_per_s"]),
            number(&r["drain_best_batched_tasks_per_s"]),
            number(&peer["drain_matched_batch_jobs_per_s"]),
            number(&r["latency_ms"]["avg"]),
            number(&peer["latency_ms"]["avg"]),
            number(&r["latency_ms"]["p99"]),
            number(&peer["latency_ms"]["p99"]),
        );
    }
    let of_rounds = |f: &dyn Fn(&Value) -> f64| median(rounds.iter().map(f).collect());
    let ceiling = of_rounds(&|r| number(&r["pgbench_ceiling_tasks_per_s"]));
    let peer_latency = of_rounds(&|r| number(&r["graphile_worker"]["latency_ms"]["avg"]));
    println!(
        "  medians: pgbench {ceiling:.0} tasks/s; graphile-worker's enqueue→start avg {peer_latency:.2} ms"
    );
    let mut summary = serde_json::Map::new();
    println!("issue #16's targets over the {n} rounds:");
    for target in &TARGETS {
        let figures: Vec<f64> = rounds
            .iter()
            .map(|r| target.figure_in(&r["issue_16_targets"]))
            .collect();
        let met = figures.iter().filter(|&&f| target.met(f)).count();
        let mid = median(figures.clone());
        println!(
            "  {}: met in {met} of {n}; median {}",
            target.label,
            target.verdict(mid)
        );
        summary.insert(
            target.key.into(),
            json!({
                "figures": figures.iter().map(|&f| round2(f)).collect::<Vec<_>>(),
                "median": round2(mid),
                "rounds_met": met,
                "median_met": target.met(mid),
            }),
        );
    }
    println!(
        "{}",
        json!({
            "rounds": n,
            "pgbench_ceiling_median_tasks_per_s": ceiling.round(),
            "graphile_worker_latency_avg_median_ms": round2(peer_latency),
            "issue_16_targets": summary,
        })
    );
    Ok(())
}
