//! The worker runtime against real PostgreSQL, with handlers whose timing
//! the tests control.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use queue::{Failure, JobStatus, JobType, NewJob, Queue, TaskStatus, TaskType};
use serde_json::json;
use sqlx::PgPool;
use test_support::pg_proxy::OutageProxy;
use tokio_util::sync::CancellationToken;
use workers::metrics::WorkerMetrics;
use workers::runtime::{self, RunSummary, RuntimeConfig, TaskContext, TaskHandler, TaskOutput};

/// Sleeps for a while, counting how many run at once.
#[derive(Clone, Default)]
struct SlowHandler {
    running: Arc<AtomicUsize>,
    most_at_once: Arc<AtomicUsize>,
    started: Arc<AtomicUsize>,
    sleep: Duration,
}

impl TaskHandler for SlowHandler {
    async fn run(&self, ctx: TaskContext) -> Result<TaskOutput, Failure> {
        self.started.fetch_add(1, Ordering::SeqCst);
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_at_once.fetch_max(now, Ordering::SeqCst);
        // Counted down even when the runtime drops this future mid-sleep.
        let _running = Running(self.running.clone());
        tokio::time::sleep(self.sleep).await;
        Ok(json!({ "task": ctx.task.id }))
    }
}

struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A runtime running in the background until `stop`.
struct RunningWorker {
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<Result<RunSummary, queue::QueueError>>,
}

fn start(q: &Queue, config: RuntimeConfig, handler: impl TaskHandler) -> RunningWorker {
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(runtime::run(q.clone(), config, handler, shutdown.clone()));
    RunningWorker { shutdown, handle }
}

impl RunningWorker {
    /// Shut down as SIGTERM would, and return what the run did.
    async fn stop(self) -> RunSummary {
        self.shutdown.cancel();
        self.handle.await.unwrap().unwrap()
    }
}

fn config(concurrency: usize, grace: Duration) -> RuntimeConfig {
    RuntimeConfig {
        worker_id: "test-worker".into(),
        pool: Some("text".into()),
        task_types: vec![TaskType::TextGeneration],
        concurrency,
        heartbeat_interval: Duration::from_millis(200),
        poll_interval: Duration::from_millis(500),
        shutdown_grace: grace,
        metrics: Default::default(),
    }
}

async fn enqueue_text_jobs(q: &Queue, n: usize) {
    let jobs = (0..n)
        .map(|i| NewJob::new("acme", JobType::Text, json!({ "prompt": format!("job {i}") })))
        .collect();
    q.enqueue_batch(jobs).await.unwrap();
}

/// A queue whose retries back off from `base` up to `cap`.
fn queue_retrying_after(pool: &PgPool, base: Duration, cap: Duration) -> Queue {
    Queue::new(pool.clone()).with_config(queue::QueueConfig {
        retry_base: base,
        retry_cap: cap,
        ..Default::default()
    })
}

async fn enqueue_text_job(q: &Queue) -> queue::Job {
    q.enqueue(NewJob::new("acme", JobType::Text, json!({"prompt": "x"})))
        .await
        .unwrap()
        .job
}

async fn statuses(pool: &PgPool) -> Vec<(String, i64)> {
    sqlx::query_as("SELECT status, count(*) FROM all_tasks GROUP BY status ORDER BY status")
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn wait_until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..200 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting until {what}");
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn runs_at_most_its_concurrency_and_completes_everything(pool: PgPool) {
    let q = Queue::new(pool.clone());
    enqueue_text_jobs(&q, 12).await;
    let handler = SlowHandler {
        sleep: Duration::from_millis(150),
        ..Default::default()
    };
    let config = config(3, Duration::from_secs(5));
    let metrics = config.metrics.clone();
    let worker = start(&q, config, handler.clone());

    wait_until("all tasks complete", async || {
        statuses(&pool).await == [("complete".to_string(), 12)]
    })
    .await;
    let summary = worker.stop().await;
    assert_eq!(
        summary,
        RunSummary {
            completed: 12,
            ..Default::default()
        }
    );
    // What /metrics shows for the same run.
    let exposition = metrics.encode();
    for line in [
        "backlog_worker_tasks_total{task_type=\"text_generation\",outcome=\"completed\"} 12",
        "backlog_worker_tasks_in_flight 0",
        "backlog_worker_task_duration_seconds_count{task_type=\"text_generation\"} 12",
    ] {
        assert!(exposition.lines().any(|l| l == line), "{line} in\n{exposition}");
    }
    assert_eq!(
        handler.most_at_once.load(Ordering::SeqCst),
        3,
        "never more than the concurrency, and it used it"
    );
    assert!(q.workers(None).await.unwrap().is_empty(), "deregistered on exit");
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_running_task_shows_processing_without_waiting_for_a_heartbeat(pool: PgPool) {
    let q = Queue::new(pool.clone());
    let handler = SlowHandler {
        sleep: Duration::from_millis(1_500),
        ..Default::default()
    };
    // The heartbeat's first tick comes at start, before there is work; the
    // next one not within the test.
    let config = RuntimeConfig {
        heartbeat_interval: Duration::from_secs(3_600),
        ..config(2, Duration::from_secs(10))
    };
    let worker = start(&q, config, handler.clone());
    wait_until("the replica registered", async || {
        !q.workers(None).await.unwrap().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    enqueue_text_jobs(&q, 1).await;
    wait_until("the task started", async || {
        handler.started.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(statuses(&pool).await, [("processing".to_string(), 1)]);
    assert_eq!(worker.stop().await.completed, 1);
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_finished_task_is_completed_in_the_call_that_claims_the_next(pool: PgPool) {
    let q = Queue::new(pool.clone());
    enqueue_text_jobs(&q, 3).await;
    let handler = SlowHandler {
        sleep: Duration::from_millis(100),
        ..Default::default()
    };
    let worker = start(&q, config(1, Duration::from_secs(5)), handler);
    wait_until("all tasks complete", async || {
        statuses(&pool).await == [("complete".to_string(), 3)]
    })
    .await;
    assert_eq!(worker.stop().await.completed, 3);
    // now() is the transaction's start, so a task claimed in the call that
    // completed another was claimed at the instant that one finished.
    let claimed_as_one_finished: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM all_tasks done JOIN all_tasks next
           ON next.claimed_at = done.finished_at AND next.id <> done.id",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        claimed_as_one_finished, 2,
        "one round trip per task after the first"
    );
}

/// The answer to the call that stores a batch's results and claims the
/// next is lost once (the connection cut after the commit). The runtime's
/// repeat gets the batch that call claimed, and runs it: every task runs
/// once. Before, the repeat claimed afresh and the lost call's batch stayed
/// `processing` with this replica, which never heard of it, until a
/// sweeper took it back a lease's expiry and an attempt later.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_batch_claimed_in_a_call_whose_answer_was_lost_is_still_run(pool: PgPool) {
    use test_support::pg_proxy::AnswerLosingProxy;
    let proxy = AnswerLosingProxy::in_front_of(&pool, b"complete_and_claim_next").await;
    let q = Queue::new(pool.clone());
    enqueue_text_jobs(&q, 6).await;
    let handler = SlowHandler {
        sleep: Duration::from_millis(50),
        ..Default::default()
    };
    let through_proxy = Queue::new(proxy.pool(&pool, 4).await);
    let worker = start(&through_proxy, config(2, Duration::from_secs(5)), handler.clone());
    wait_until("all tasks complete", async || {
        statuses(&pool).await == [("complete".to_string(), 6)]
    })
    .await;
    assert_eq!(proxy.cuts(), 1, "an answer was lost");
    let summary = worker.stop().await;
    assert_eq!((summary.completed, summary.lost), (6, 0));
    assert_eq!(handler.started.load(Ordering::SeqCst), 6, "each task ran once");
}

/// Holds every task until the test opens the gate; fails the tasks whose
/// prompt says `fail`.
#[derive(Clone)]
struct GatedHandler {
    gate: Arc<tokio::sync::Semaphore>,
    started: Arc<AtomicUsize>,
}

impl GatedHandler {
    fn closed() -> Self {
        GatedHandler {
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
            started: Arc::default(),
        }
    }

    fn open(&self) {
        self.gate.add_permits(tokio::sync::Semaphore::MAX_PERMITS);
    }
}

impl TaskHandler for GatedHandler {
    async fn run(&self, ctx: TaskContext) -> Result<TaskOutput, Failure> {
        let job = ctx.queue.job("acme", ctx.task.job_id).await.unwrap();
        self.started.fetch_add(1, Ordering::SeqCst);
        let _pass = self.gate.acquire().await.unwrap();
        if job.input["prompt"] == "fail" {
            return Err(Failure::retryable("the provider said no"));
        }
        Ok(json!({ "task": ctx.task.id }))
    }
}

/// Once `tasks` tasks run, take the database away and let their handlers
/// finish; return when the worker's own retries of their results (a few
/// seconds) have run out and the results wait for the database.
async fn finish_during_an_outage(
    proxy: &OutageProxy,
    handler: &GatedHandler,
    metrics: &WorkerMetrics,
    tasks: i64,
) {
    wait_until("the tasks run", async || {
        handler.started.load(Ordering::SeqCst) == tasks as usize
    })
    .await;
    proxy.cut();
    handler.open();
    // Longer than wait_until waits: the retries take up to ten seconds.
    for _ in 0..300 {
        if metrics.results_waiting.get() == tasks {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{} results wait for the database, not {tasks}",
        metrics.results_waiting.get()
    );
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn results_finished_while_the_database_is_away_are_stored_when_it_is_back(pool: PgPool) {
    let q = Queue::new(pool.clone());
    for prompt in ["write", "fail"] {
        q.enqueue(NewJob::new("acme", JobType::Text, json!({ "prompt": prompt })))
            .await
            .unwrap();
    }
    let proxy = OutageProxy::in_front_of(&pool).await;
    // The failed task's retry far off, so it is not run again here.
    let through_proxy = queue_retrying_after(
        &proxy.pool(&pool, 4, Duration::from_millis(200)),
        Duration::from_secs(60),
        Duration::from_secs(60),
    );
    let config = config(2, Duration::from_secs(5));
    let metrics = config.metrics.clone();
    let handler = GatedHandler::closed();
    let worker = start(&through_proxy, config, handler.clone());
    finish_during_an_outage(&proxy, &handler, &metrics, 2).await;
    assert_eq!(
        statuses(&pool).await,
        [("processing".to_string(), 2)],
        "nothing reached the database"
    );

    proxy.restore();
    wait_until("the results are stored", async || {
        statuses(&pool).await == [("complete".to_string(), 1), ("pending".to_string(), 1)]
    })
    .await;
    let (output, error, attempts): (serde_json::Value, Option<String>, i32) = sqlx::query_as(
        "SELECT coalesce(max(output::text) FILTER (WHERE status = 'complete'), 'null')::jsonb,
                max(last_error) FILTER (WHERE status = 'pending'), max(attempts)::int
         FROM all_tasks",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        output["task"].is_i64(),
        "the handler's output was stored: {output}"
    );
    assert_eq!(error.as_deref(), Some("the provider said no"));
    assert_eq!(attempts, 1, "no task was run twice");
    assert_eq!(metrics.results_waiting.get(), 0);
    let summary = worker.stop().await;
    assert_eq!((summary.completed, summary.failed, summary.lost), (1, 1, 0));
    assert_eq!(handler.started.load(Ordering::SeqCst), 2, "each task ran once");
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_result_waiting_at_shutdown_is_stored_within_the_grace_not_released(pool: PgPool) {
    let q = Queue::new(pool.clone());
    enqueue_text_jobs(&q, 1).await;
    let proxy = OutageProxy::in_front_of(&pool).await;
    let through_proxy = Queue::new(proxy.pool(&pool, 4, Duration::from_millis(200)));
    // No heartbeat until the shutdown's own first one: the result waits
    // for the shutdown, not for a heartbeat of the run loop.
    let config = RuntimeConfig {
        heartbeat_interval: Duration::from_secs(60),
        ..config(1, Duration::from_secs(20))
    };
    let metrics = config.metrics.clone();
    let handler = GatedHandler::closed();
    let worker = start(&through_proxy, config, handler.clone());
    finish_during_an_outage(&proxy, &handler, &metrics, 1).await;

    // SIGTERM with nothing running: the finished task is not handed back
    // to run again; its result is stored once the database is back.
    worker.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.restore();
    let summary = worker.handle.await.unwrap().unwrap();
    assert_eq!((summary.completed, summary.released, summary.lost), (1, 0, 0));
    assert_eq!(statuses(&pool).await, [("complete".to_string(), 1)]);
}

/// SIGTERM while the database restarts: the unfinished task goes back to
/// pending and the replica leaves the registry once the database is back.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_replica_stopped_while_the_database_restarts_hands_its_task_back_once_it_is_back(pool: PgPool) {
    let q = Queue::new(pool.clone());
    enqueue_text_jobs(&q, 1).await;
    let proxy = OutageProxy::in_front_of(&pool).await;
    let through_proxy = Queue::new(proxy.pool(&pool, 4, Duration::from_millis(200)));
    let handler = GatedHandler::closed();
    let worker = start(
        &through_proxy,
        config(1, Duration::from_millis(200)),
        handler.clone(),
    );
    wait_until("the task runs", async || {
        handler.started.load(Ordering::SeqCst) == 1
    })
    .await;

    proxy.cut();
    worker.shutdown.cancel();
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.restore();

    let summary = worker.handle.await.unwrap().unwrap();
    assert_eq!((summary.released, summary.completed), (1, 0));
    assert_eq!(statuses(&pool).await, [("pending".to_string(), 1)]);
    assert!(q.workers(None).await.unwrap().is_empty(), "deregistered");
}

/// A stop whose release the database refuses still leaves the registry,
/// so the controller does not count the replica among the running ones.
/// The failed release used to skip the deregistration. The stop reports
/// the error, and the task's lease expires for the sweeper to hand on.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_replica_whose_release_is_refused_still_leaves_the_registry(pool: PgPool) {
    let q = Queue::new(pool.clone());
    enqueue_text_jobs(&q, 1).await;
    let handler = GatedHandler::closed();
    let worker = start(&q, config(1, Duration::from_millis(100)), handler.clone());
    wait_until("the task runs", async || {
        handler.started.load(Ordering::SeqCst) == 1
    })
    .await;
    sqlx::query(
        "CREATE OR REPLACE FUNCTION release_tasks(p_worker_id text, p_task_ids bigint[], p_claims int[])
         RETURNS TABLE (task_id bigint) LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'release refused'; END $$",
    )
    .execute(&pool)
    .await
    .unwrap();

    worker.shutdown.cancel();
    let stopped = worker.handle.await.unwrap();

    assert!(stopped.is_err(), "the refusal is reported");
    assert!(
        q.workers(None).await.unwrap().is_empty(),
        "deregistered all the same"
    );
    assert_eq!(statuses(&pool).await, [("processing".to_string(), 1)]);
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_claim_that_fails_after_a_task_finished_does_not_cost_its_result(pool: PgPool) {
    let q = Queue::new(pool.clone());
    enqueue_text_jobs(&q, 2).await;
    let handler = SlowHandler {
        sleep: Duration::from_millis(500),
        ..Default::default()
    };
    let worker = start(&q, config(1, Duration::from_secs(5)), handler.clone());
    wait_until("the first task started", async || {
        handler.started.load(Ordering::SeqCst) == 1
    })
    .await;
    // From now on every claim fails (as a bug or a full disk might make it).
    sqlx::query(
        "CREATE OR REPLACE FUNCTION take_tasks(p_worker_id text, p_task_types text[], p_limit int, p_status text,
         p_nonce uuid DEFAULT NULL)
         RETURNS SETOF job_tasks LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'claims are broken'; END $$",
    )
    .execute(&pool)
    .await
    .unwrap();
    wait_until("the finished task is stored", async || {
        statuses(&pool).await == [("complete".to_string(), 1), ("pending".to_string(), 1)]
    })
    .await;
    assert_eq!(worker.stop().await.completed, 1);
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn on_shutdown_running_tasks_finish_and_unstarted_work_stays_pending(pool: PgPool) {
    let q = Queue::new(pool.clone());
    enqueue_text_jobs(&q, 5).await;
    let handler = SlowHandler {
        sleep: Duration::from_millis(800),
        ..Default::default()
    };
    let worker = start(&q, config(2, Duration::from_secs(10)), handler.clone());

    wait_until("two tasks started", async || {
        handler.started.load(Ordering::SeqCst) == 2
    })
    .await;
    let summary = worker.stop().await;
    assert_eq!(
        (summary.completed, summary.released),
        (2, 0),
        "the running two finished within the grace"
    );
    assert_eq!(
        statuses(&pool).await,
        [("complete".to_string(), 2), ("pending".to_string(), 3)]
    );
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn tasks_still_running_after_the_grace_are_released_without_spending_an_attempt(pool: PgPool) {
    let q = Queue::new(pool.clone());
    enqueue_text_jobs(&q, 2).await;
    let handler = SlowHandler {
        sleep: Duration::from_secs(60),
        ..Default::default()
    };
    let worker = start(&q, config(2, Duration::from_millis(300)), handler.clone());

    wait_until("both tasks started", async || {
        handler.started.load(Ordering::SeqCst) == 2
    })
    .await;
    let summary = worker.stop().await;
    assert_eq!(summary.released, 2);
    let attempts: Vec<(String, i32)> = sqlx::query_as("SELECT status, attempts FROM all_tasks ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(
        attempts,
        vec![("pending".to_string(), 0), ("pending".to_string(), 0)]
    );
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_cancelled_job_stops_its_running_task(pool: PgPool) {
    let q = Queue::new(pool.clone());
    let job = q
        .enqueue(NewJob::new("acme", JobType::Text, json!({"prompt": "x"})))
        .await
        .unwrap()
        .job;
    let handler = SlowHandler {
        sleep: Duration::from_secs(60),
        ..Default::default()
    };
    let worker = start(&q, config(1, Duration::from_secs(5)), handler.clone());

    wait_until("the task started", async || {
        handler.started.load(Ordering::SeqCst) == 1
    })
    .await;
    q.cancel_job("acme", job.id).await.unwrap();
    wait_until("the handler was stopped", async || {
        handler.running.load(Ordering::SeqCst) == 0
    })
    .await;
    let summary = worker.stop().await;
    assert_eq!((summary.lost, summary.completed), (1, 0));
    assert_eq!(q.job("acme", job.id).await.unwrap().status, JobStatus::Cancelled);
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_draining_replica_claims_nothing_more(pool: PgPool) {
    let q = Queue::new(pool.clone());
    let handler = SlowHandler {
        sleep: Duration::from_millis(10),
        ..Default::default()
    };
    let worker = start(&q, config(2, Duration::from_secs(5)), handler.clone());
    wait_until("registered", async || !q.workers(None).await.unwrap().is_empty()).await;

    assert_eq!(
        q.drain_idle(&["test-worker".to_string()]).await.unwrap(),
        vec!["test-worker".to_string()]
    );
    enqueue_text_jobs(&q, 3).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(handler.started.load(Ordering::SeqCst), 0, "drained: no claims");
    assert_eq!(statuses(&pool).await, [("pending".to_string(), 3)]);
    worker.stop().await;
}

/// Fails the first attempt as retryable, so the runtime's fail path runs.
struct FailOnce(Arc<AtomicUsize>);

impl TaskHandler for FailOnce {
    async fn run(&self, _ctx: TaskContext) -> Result<TaskOutput, Failure> {
        if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
            Err(Failure::retryable("provider answered 503"))
        } else {
            Ok(json!({}))
        }
    }
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_retryable_failure_is_stored_and_the_task_retried(pool: PgPool) {
    let q = queue_retrying_after(&pool, Duration::from_millis(100), Duration::from_millis(200));
    let job = enqueue_text_job(&q).await;
    let worker = start(&q, config(1, Duration::from_secs(5)), FailOnce(Arc::default()));
    wait_until("the job completed", async || {
        q.job("acme", job.id).await.unwrap().status == JobStatus::Complete
    })
    .await;
    let summary = worker.stop().await;
    assert_eq!((summary.failed, summary.completed), (1, 1));
    let task = &q.tasks_of(job.id).await.unwrap()[0];
    assert_eq!((task.status, task.attempts), (TaskStatus::Complete, 2));
    assert_eq!(task.last_error.as_deref(), Some("provider answered 503"));
}

/// Panics on the job whose prompt says so, succeeds on the others.
struct PanicsOnRequest;

impl TaskHandler for PanicsOnRequest {
    async fn run(&self, ctx: TaskContext) -> Result<TaskOutput, Failure> {
        let job = ctx.queue.job_by_id(ctx.task.job_id).await.unwrap();
        if job.input["prompt"] == "panic" {
            panic!("index out of bounds: the len is 0 but the index is 0");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(json!({}))
    }
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_panicking_handler_fails_its_task_and_the_worker_goes_on(pool: PgPool) {
    let q = Queue::new(pool.clone());
    let doomed = q
        .enqueue(NewJob::new("acme", JobType::Text, json!({ "prompt": "panic" })))
        .await
        .unwrap()
        .job;
    enqueue_text_jobs(&q, 3).await;
    let worker = start(&q, config(4, Duration::from_secs(5)), PanicsOnRequest);
    wait_until("every job finished", async || {
        statuses(&pool)
            .await
            .iter()
            .all(|(status, _)| status == "complete" || status == "failed")
    })
    .await;
    // The run loop is still there to stop (it ended with the panic before).
    let summary = worker.stop().await;
    assert_eq!((summary.failed, summary.completed), (1, 3));
    let task = &q.tasks_of(doomed.id).await.unwrap()[0];
    assert_eq!(
        (task.status, task.attempts),
        (TaskStatus::Failed, 1),
        "a bug is not retried"
    );
    let error = task.last_error.as_deref().unwrap();
    assert!(
        error.contains("text_generation handler panicked") && error.contains("index out of bounds"),
        "{error}"
    );
}

/// Forward connections from `listener` to the database the pool uses:
/// the database "coming back" on the address a worker was given.
async fn forward_to_database(listener: tokio::net::TcpListener, pool: &PgPool) {
    let options = pool.connect_options();
    let target = format!("{}:{}", options.get_host(), options.get_port());
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_replica_started_while_the_database_is_down_waits_for_it_then_works(pool: PgPool) {
    // An address where no database answers yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let options = (*pool.connect_options()).clone().host("127.0.0.1").port(port);
    let unreachable = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy_with(options);
    let worker = start(
        &Queue::new(unreachable),
        config(1, Duration::from_secs(5)),
        SlowHandler::default(),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !worker.handle.is_finished(),
        "the replica gave up while the database was down"
    );

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    forward_to_database(listener, &pool).await;
    let q = Queue::new(pool.clone());
    enqueue_text_jobs(&q, 1).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM all_tasks WHERE status = 'complete'")
            .fetch_one(&pool)
            .await
            .unwrap();
        if done == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replica never worked after the database came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(worker.stop().await.completed, 1);
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_task_past_its_timeout_is_stopped_and_failed_for_a_retry(pool: PgPool) {
    // A retry far enough off that this replica does not run it again here.
    let q = queue_retrying_after(&pool, Duration::from_secs(600), Duration::from_secs(600));
    let job = enqueue_text_job(&q).await;
    sqlx::query("UPDATE job_tasks SET timeout_seconds = 1 WHERE job_id = $1")
        .bind(job.id)
        .execute(&pool)
        .await
        .unwrap();
    let handler = SlowHandler {
        sleep: Duration::from_secs(60),
        ..Default::default()
    };
    let worker = start(&q, config(1, Duration::from_secs(5)), handler.clone());
    wait_until("the attempt failed", async || {
        q.tasks_of(job.id).await.unwrap()[0].last_error.is_some()
    })
    .await;
    let task = &q.tasks_of(job.id).await.unwrap()[0];
    assert_eq!(task.last_error.as_deref(), Some("timed out after 1 s"));
    assert_eq!(
        (task.status, task.attempts),
        (TaskStatus::Pending, 1),
        "retried later"
    );
    assert_eq!(
        handler.running.load(Ordering::SeqCst),
        0,
        "the handler was stopped, not left running beside its retry"
    );
    let summary = worker.stop().await;
    assert_eq!((summary.failed, summary.completed), (1, 0));
}

/// Each run waits until the test lets it go; a first claim's run that is
/// let go ends as a run whose lease is gone does when it meets the fence
/// (a permanent failure). Tells when a run is dropped unfinished.
#[derive(Clone, Default)]
struct RunsUntilLetGo {
    let_go: Arc<tokio::sync::Notify>,
    first_run_dropped: Arc<std::sync::atomic::AtomicBool>,
}

struct FlagOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for FlagOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl TaskHandler for RunsUntilLetGo {
    async fn run(&self, ctx: TaskContext) -> Result<TaskOutput, Failure> {
        if ctx.task.claims == 1 {
            let _dropped = FlagOnDrop(self.first_run_dropped.clone());
            std::future::pending::<()>().await;
        }
        self.let_go.notified().await;
        Ok(json!({ "claim": ctx.task.claims }))
    }
}

async fn claim_of_the_task(pool: &PgPool) -> (i32, String) {
    sqlx::query_as("SELECT claims, status FROM all_tasks")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A replica silent past the stale limit (a stall) has its task swept back
/// and may claim it again before a heartbeat tells it the lease is gone.
/// The earlier run is stopped, and the task is finished by the new run:
/// the earlier run's end (it would fail at the fence) was stored under the
/// new lease, failing the task for good, and its cancellation dropped the
/// new run's bookkeeping, leaving the task to the sweeper.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_task_swept_back_and_claimed_again_by_its_replica_is_finished_by_the_new_run(pool: PgPool) {
    let q = Queue::new(pool.clone());
    let job = enqueue_text_job(&q).await;
    let handler = RunsUntilLetGo::default();
    let mut config = config(2, Duration::from_secs(5));
    // No heartbeat within the test: the sweep and the new claim come first.
    config.heartbeat_interval = Duration::from_secs(3600);
    config.poll_interval = Duration::from_millis(100);
    let worker = start(&q, config, handler.clone());
    wait_until("the first claim runs", async || {
        claim_of_the_task(&pool).await == (1, "processing".to_string())
    })
    .await;

    sqlx::query("UPDATE job_tasks SET heartbeat_at = now() - interval '1 hour'")
        .execute(&pool)
        .await
        .unwrap();
    let swept = q.sweep(Duration::from_secs(60)).await.unwrap();
    assert_eq!(swept.tasks.len(), 1);
    sqlx::query("UPDATE job_tasks SET run_at = now()")
        .execute(&pool)
        .await
        .unwrap();
    wait_until("the same replica claims the task again", async || {
        claim_of_the_task(&pool).await == (2, "processing".to_string())
    })
    .await;
    wait_until("the earlier run is stopped", async || {
        handler.first_run_dropped.load(Ordering::SeqCst)
    })
    .await;

    handler.let_go.notify_one();
    wait_until("the job completes", async || {
        q.job("acme", job.id).await.unwrap().status == JobStatus::Complete
    })
    .await;
    let tasks = q.job_with_tasks("acme", job.id).await.unwrap().tasks;
    assert_eq!(tasks[0].status, TaskStatus::Complete);
    assert_eq!(tasks[0].output, Some(json!({ "claim": 2 })));
    let summary = worker.stop().await;
    assert_eq!((summary.completed, summary.lost), (1, 1), "{summary:?}");
}
