//! The reconcile loop against real PostgreSQL: an in-memory backend for the
//! decisions, the local backend with real worker processes end to end, and
//! leader election.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use controller::backend::local::LocalBackend;
use controller::backend::{Backend, BackendError, PoolRef, Replica};
use controller::manifest::{self, LoadedPool};
use controller::metrics::Metrics;
use controller::reconcile::{
    self, Context, Leadership, LoopSettings, ManifestSource, PassSettings, Reconciler,
};
use controller::spec::ConditionType;
use queue::{JobType, Queue, TaskType, WorkerState};
use serde_json::json;
use sqlx::PgPool;
use test_support::worker_pool::LocalTextPool;
use test_support::{enqueue_jobs, register_text_worker};
use tokio_util::sync::CancellationToken;

/// Replicas in memory, started and stopped instantly.
#[derive(Clone, Default)]
struct MemoryBackend {
    replicas: Arc<Mutex<BTreeSet<String>>>,
    next: Arc<Mutex<u32>>,
    /// `remove` fails, as a platform that does not answer.
    fail_remove: Arc<AtomicBool>,
    /// Pools whose `observe` hangs until [`MemoryBackend::unstall`].
    stalled: Arc<Mutex<BTreeSet<String>>>,
    /// Told each time a stalled `observe` starts waiting.
    stall_entered: Arc<tokio::sync::Notify>,
    unstalled: Arc<tokio::sync::Notify>,
    /// The pools whose stalled `observe` is waiting right now.
    waiting: Arc<Mutex<BTreeSet<String>>>,
    /// The next `observe` panics, as a bug would.
    panic_once: Arc<AtomicBool>,
}

impl MemoryBackend {
    fn ids(&self) -> Vec<String> {
        self.replicas.lock().unwrap().iter().cloned().collect()
    }

    fn pool_ids(&self, pool: &str) -> Vec<String> {
        let prefix = format!("{pool}-");
        self.ids()
            .into_iter()
            .filter(|id| id.starts_with(&prefix))
            .collect()
    }

    fn stall(&self, pool: &str) {
        self.stalled.lock().unwrap().insert(pool.to_string());
    }

    fn unstall(&self, pool: &str) {
        self.stalled.lock().unwrap().remove(pool);
        self.unstalled.notify_waiters();
    }

    async fn hang_while_stalled(&self, pool: &str) {
        loop {
            let unstalled = self.unstalled.notified();
            if !self.stalled.lock().unwrap().contains(pool) {
                self.waiting.lock().unwrap().remove(pool);
                return;
            }
            self.waiting.lock().unwrap().insert(pool.to_string());
            self.stall_entered.notify_one();
            unstalled.await;
        }
    }
}

impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }
    async fn observe(&self, pool: PoolRef<'_>) -> Result<Vec<Replica>, BackendError> {
        if self.panic_once.swap(false, Ordering::SeqCst) {
            panic!("observe broke");
        }
        self.hang_while_stalled(pool.name).await;
        Ok(self
            .pool_ids(pool.name)
            .into_iter()
            .map(|id| Replica { id, ready: true })
            .collect())
    }
    async fn add(&self, pool: PoolRef<'_>, count: u32) -> Result<Vec<String>, BackendError> {
        let mut started = Vec::new();
        for _ in 0..count {
            let mut next = self.next.lock().unwrap();
            *next += 1;
            let id = format!("{}-{}", pool.name, *next);
            self.replicas.lock().unwrap().insert(id.clone());
            started.push(id);
        }
        Ok(started)
    }
    async fn remove(&self, pool: PoolRef<'_>, ids: &[String]) -> Result<Vec<String>, BackendError> {
        if self.fail_remove.load(Ordering::SeqCst) {
            return Err(BackendError::Failed {
                pool: pool.name.to_string(),
                message: "the platform did not answer".into(),
            });
        }
        let mut replicas = self.replicas.lock().unwrap();
        Ok(ids.iter().filter(|id| replicas.remove(*id)).cloned().collect())
    }
    async fn shutdown(&self) {}
}

/// Another worker claims and completes every pending text task (up to 10).
async fn complete_text_tasks_elsewhere(q: &Queue) {
    let tasks = q
        .claim("elsewhere", &[TaskType::TextGeneration], 10)
        .await
        .unwrap();
    let results: Vec<_> = tasks.iter().map(|t| (t.lease(), json!({}))).collect();
    q.complete_batch("elsewhere", &results).await.unwrap();
}

fn pools(yaml: &str) -> Vec<LoadedPool> {
    let mut m = manifest::Manifests::default();
    m.add_file(std::path::Path::new("test.yaml"), yaml);
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    m.pools
}

const TEXT_POOL: &str = r#"
apiVersion: backlog.dev/v1alpha1
kind: WorkerPool
metadata: {name: text}
spec:
  taskTypes: [text_generation]
  target: {local: {command: [unused]}}
  maxReplicas: 5
  tasksPerReplica: 2
  cooldownPeriod: 0
  scaleDown: {stabilizationWindowSeconds: 0}
"#;

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn replicas_follow_the_queue_and_scale_down_spares_the_busy_replica(pool: PgPool) {
    let q = Queue::new(pool);
    let backend = MemoryBackend::default();
    let mut reconciler = Reconciler::new(Context {
        queue: q.clone(),
        backend: backend.clone(),
        metrics: Arc::new(Metrics::default()),
    });
    let pools = pools(TEXT_POOL);
    let now = chrono::Utc::now();

    let idle = reconciler.reconcile(&pools, now).await;
    assert_eq!(
        idle[0].decision.replicas, 0,
        "an empty queue runs nothing: {}",
        idle[0].decision
    );

    enqueue_jobs(&q, JobType::Text, 7).await;
    let up = reconciler
        .reconcile(&pools, now + chrono::Duration::seconds(1))
        .await;
    assert_eq!(
        up[0].decision.replicas, 4,
        "7 pending at 2 per replica: {}",
        up[0].decision
    );
    assert_eq!(backend.ids().len(), 4);

    // One replica holds the last task; the rest of the work is done.
    for id in backend.ids() {
        register_text_worker(&q, &id).await;
    }
    let busy = backend.ids()[2].clone();
    let held = q.claim(&busy, &[TaskType::TextGeneration], 1).await.unwrap();
    complete_text_tasks_elsewhere(&q).await;

    let down = reconciler
        .reconcile(&pools, now + chrono::Duration::seconds(60))
        .await;
    assert_eq!(down[0].decision.replicas, 1, "{}", down[0].decision);
    assert_eq!(
        backend.ids(),
        vec![busy.clone()],
        "the busy replica is the one kept"
    );
    assert_eq!(down[0].removed.len(), 3);
    assert_eq!(down[0].status.busy_replicas, 1);

    q.complete(&busy, held[0].lease(), json!({})).await.unwrap();
    let zero = reconciler
        .reconcile(&pools, now + chrono::Duration::seconds(120))
        .await;
    assert_eq!(
        (zero[0].decision.replicas, backend.ids().len()),
        (0, 0),
        "{}",
        zero[0].decision
    );
    // These replicas had no process to stop their own registration: the
    // removal records them stopped, and no draining mark outlives the pass.
    let states: Vec<String> = q
        .workers(None)
        .await
        .unwrap()
        .iter()
        .filter(|w| w.id != "elsewhere")
        .map(|w| format!("{:?}", w.state))
        .collect();
    assert_eq!(states, vec!["Stopped"; 4], "{states:?}");
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn an_unreadable_queue_holds_the_replicas(pool: PgPool) {
    let q = Queue::new(pool.clone());
    let backend = MemoryBackend::default();
    let mut reconciler = Reconciler::new(Context {
        queue: q.clone(),
        backend: backend.clone(),
        metrics: Arc::new(Metrics::default()),
    });
    let pools = pools(TEXT_POOL);
    enqueue_jobs(&q, JobType::Text, 4).await;
    let now = chrono::Utc::now();
    assert_eq!(reconciler.reconcile(&pools, now).await[0].decision.replicas, 2);

    pool.close().await; // the database is gone for this controller
    let held = reconciler
        .reconcile(&pools, now + chrono::Duration::seconds(600))
        .await;
    assert_eq!(held[0].decision.replicas, 2, "{}", held[0].decision);
    assert_eq!(backend.ids().len(), 2, "never scaled to zero blind");
}

fn write_manifest(
    dir: &std::path::Path,
    worker: &std::path::Path,
    database_url: &str,
    store: &std::path::Path,
) -> PathBuf {
    LocalTextPool::new(worker, database_url, &format!("file://{}", store.display()))
        .env("WORKER_HEARTBEAT_SECONDS", "0.5")
        .spec("maxReplicas", 3)
        .spec("tasksPerReplica", 2)
        .spec("cooldownPeriod", 2)
        .spec("scaleDown", json!({"stabilizationWindowSeconds": 0}))
        .write_to(dir)
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn local_workers_rise_to_the_max_finish_everything_and_go_back_to_zero(pool: PgPool) {
    let worker = test_support::workspace_binary("workers", "worker");
    let q = Queue::new(pool.clone());
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(
        dir.path(),
        &worker,
        &test_support::database_url(&pool),
        dir.path(),
    );
    enqueue_jobs(&q, JobType::Text, 200).await;

    let reconciler = Reconciler::new(Context {
        queue: q.clone(),
        backend: LocalBackend::new(Duration::from_secs(10), dir.path().join("state")),
        metrics: Arc::new(Metrics::default()),
    });
    let settings = LoopSettings {
        tick: Duration::from_millis(300),
        leader_key: 7,
    };
    let shutdown = CancellationToken::new();
    let controller = tokio::spawn(reconcile::run(
        reconciler,
        ManifestSource::new(manifest),
        settings,
        shutdown.clone(),
    ));

    let mut most_replicas = 0;
    let mut done = false;
    for _ in 0..600 {
        most_replicas = most_replicas.max(q.workers(Some("text")).await.unwrap().len());
        let unfinished: i64 = sqlx::query_scalar("SELECT count(*) FROM all_tasks WHERE status <> 'complete'")
            .fetch_one(&pool)
            .await
            .unwrap();
        if unfinished == 0 && q.workers(Some("text")).await.unwrap().is_empty() {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    controller.await.unwrap().unwrap();
    assert!(
        done,
        "all tasks complete and every replica gone after the cooldown"
    );
    assert_eq!(most_replicas, 3, "replicas rose to maxReplicas");
    let (retried, with_error) = test_support::retried_and_errored_tasks(&pool).await;
    assert_eq!(
        (retried, with_error),
        (0, 0),
        "no task was interrupted, released or retried by a scale-down"
    );
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_standby_controller_takes_over_when_the_leader_exits(pool: PgPool) {
    let q = Queue::new(pool.clone());
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("pools.yaml");
    std::fs::write(&manifest, TEXT_POOL).unwrap();
    let settings = LoopSettings {
        tick: Duration::from_millis(200),
        leader_key: 42,
    };
    let start = |backend: MemoryBackend, shutdown: CancellationToken| {
        let reconciler = Reconciler::new(Context {
            queue: q.clone(),
            backend,
            metrics: Arc::new(Metrics::default()),
        });
        tokio::spawn(reconcile::run(
            reconciler,
            ManifestSource::new(manifest.clone()),
            settings.clone(),
            shutdown,
        ))
    };
    let (leader_backend, standby_backend) = (MemoryBackend::default(), MemoryBackend::default());
    let (leader_stop, standby_stop) = (CancellationToken::new(), CancellationToken::new());
    let leader = start(leader_backend.clone(), leader_stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let standby = start(standby_backend.clone(), standby_stop.clone());

    enqueue_jobs(&q, JobType::Text, 2).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        (leader_backend.ids().len(), standby_backend.ids().len()),
        (1, 0),
        "only the leader acts"
    );

    leader_stop.cancel();
    leader.await.unwrap().unwrap();
    for _ in 0..50 {
        if !standby_backend.ids().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(standby_backend.ids().len(), 1, "the standby took over");
    standby_stop.cancel();
    standby.await.unwrap().unwrap();
}

/// A pool that keeps `min..=max` replicas of text workers and scales at once.
fn text_pool(min: u32, max: u32, command: &str) -> Vec<LoadedPool> {
    pools(&format!(
        r#"
apiVersion: backlog.dev/v1alpha1
kind: WorkerPool
metadata: {{name: text}}
spec:
  taskTypes: [text_generation]
  target: {{local: {{command: [{command}]}}}}
  minReplicas: {min}
  maxReplicas: {max}
  tasksPerReplica: 2
  cooldownPeriod: 0
  scaleDown: {{stabilizationWindowSeconds: 0}}
"#
    ))
}

async fn worker_state(q: &Queue, id: &str) -> Option<WorkerState> {
    let workers = q.workers(None).await.unwrap();
    workers.into_iter().find(|w| w.id == id).map(|w| w.state)
}

fn memory_reconciler(q: &Queue, backend: &MemoryBackend) -> Reconciler<MemoryBackend> {
    memory_reconciler_with(q, backend, PassSettings::default())
}

fn memory_reconciler_with(
    q: &Queue,
    backend: &MemoryBackend,
    settings: PassSettings,
) -> Reconciler<MemoryBackend> {
    Reconciler::with_settings(
        Context {
            queue: q.clone(),
            backend: backend.clone(),
            metrics: Arc::new(Metrics::default()),
        },
        settings,
    )
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_draining_mark_left_by_a_crashed_pass_is_cleared_by_the_next_pass(pool: PgPool) {
    let q = Queue::new(pool);
    let backend = MemoryBackend::default();
    let pools = text_pool(2, 2, "unused");
    let now = chrono::Utc::now();
    memory_reconciler(&q, &backend).reconcile(&pools, now).await;
    let ids = backend.ids();
    assert_eq!(ids.len(), 2);
    for id in &ids {
        register_text_worker(&q, id).await;
    }
    // An earlier controller drained a replica, then died before stopping it.
    assert_eq!(q.drain_idle(&ids[1..]).await.unwrap(), ids[1..]);

    let mut restarted = memory_reconciler(&q, &backend);
    let report = restarted
        .reconcile(&pools, now + chrono::Duration::seconds(1))
        .await;
    assert_eq!(report[0].decision.replicas, 2, "{}", report[0].decision);
    for id in &ids {
        assert_eq!(
            worker_state(&q, id).await,
            Some(WorkerState::Running),
            "{id} is a replica the backend runs and no pass stopped"
        );
    }
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_failed_undrain_is_retried_by_the_next_pass(pool: PgPool) {
    let q = Queue::new(pool.clone());
    let backend = MemoryBackend::default();
    let mut reconciler = memory_reconciler(&q, &backend);
    let pools = text_pool(0, 5, "unused");
    let now = chrono::Utc::now();
    enqueue_jobs(&q, JobType::Text, 4).await;
    reconciler.reconcile(&pools, now).await;
    let ids = backend.ids();
    assert_eq!(ids.len(), 2);
    for id in &ids {
        register_text_worker(&q, id).await;
    }
    complete_text_tasks_elsewhere(&q).await;

    // The scale-down drains both, the platform fails the stop, and putting
    // them back to work fails too.
    backend.fail_remove.store(true, Ordering::SeqCst);
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_undrain() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'undrain refused by the test'; END $$;
         CREATE TRIGGER refuse_undrain BEFORE UPDATE ON workers FOR EACH ROW
           WHEN (OLD.state = 'draining' AND NEW.state = 'running') EXECUTE FUNCTION refuse_undrain();",
    )
    .execute(&pool)
    .await
    .unwrap();
    let failed = reconciler
        .reconcile(&pools, now + chrono::Duration::seconds(60))
        .await;
    assert!(failed.is_empty(), "the pass failed: {failed:?}");
    for id in &ids {
        assert_eq!(worker_state(&q, id).await, Some(WorkerState::Draining));
    }

    // The database takes writes again; work arrives, so nothing is removed.
    sqlx::raw_sql("DROP TRIGGER refuse_undrain ON workers")
        .execute(&pool)
        .await
        .unwrap();
    enqueue_jobs(&q, JobType::Text, 4).await;
    reconciler
        .reconcile(&pools, now + chrono::Duration::seconds(120))
        .await;
    assert_eq!(backend.ids(), ids, "no replica was stopped");
    for id in &ids {
        assert_eq!(
            worker_state(&q, id).await,
            Some(WorkerState::Running),
            "{id}: the failed undrain was retried"
        );
    }
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_local_replica_started_under_a_name_that_carries_a_mark_is_not_left_draining(pool: PgPool) {
    let q = Queue::new(pool);
    let dir = tempfile::tempdir().unwrap();
    let pools = text_pool(1, 1, "sleep, '600'");
    let now = chrono::Utc::now();
    let local = |state: &str| {
        Reconciler::new(Context {
            queue: q.clone(),
            backend: LocalBackend::new(Duration::from_secs(5), dir.path().join(state)),
            metrics: Arc::new(Metrics::default()),
        })
    };
    let running = |reports: &[reconcile::PoolReport]| reports[0].status.current_replicas;

    // A controller starts a replica, drains it before it registered (a
    // placeholder row), and dies without stopping it; its state is lost.
    let mut first = local("first");
    assert_eq!(running(&first.reconcile(&pools, now).await), 1);
    let first_ids: Vec<String> = {
        let replicas = first
            .context()
            .backend
            .observe(PoolRef::new(&pools[0], &Leadership::held()))
            .await
            .unwrap();
        replicas.into_iter().map(|r| r.id).collect()
    };
    assert_eq!(q.drain_idle(&first_ids).await.unwrap(), first_ids);
    drop(first);

    // The next controller starts a replica, which registers.
    let mut second = local("second");
    second.reconcile(&pools, now + chrono::Duration::seconds(1)).await;
    let replicas = second
        .context()
        .backend
        .observe(PoolRef::new(&pools[0], &Leadership::held()))
        .await
        .unwrap();
    assert_eq!(replicas.len(), 1);
    let id = &replicas[0].id;
    register_text_worker(&q, id).await;
    second.reconcile(&pools, now + chrono::Duration::seconds(2)).await;
    assert_eq!(
        worker_state(&q, id).await,
        Some(WorkerState::Running),
        "{id} runs and takes work, whatever an earlier controller marked"
    );
    second.context().backend.shutdown().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_pool_of_one_whose_only_worker_was_left_draining_works_again(pool: PgPool) {
    let worker = test_support::workspace_binary("workers", "worker");
    let q = Queue::new(pool.clone());
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(
        dir.path(),
        &worker,
        &test_support::database_url(&pool),
        dir.path(),
    );
    // One replica, always.
    let yaml = std::fs::read_to_string(&manifest)
        .unwrap()
        .replace("maxReplicas: 3", "minReplicas: 1\n  maxReplicas: 1");
    std::fs::write(&manifest, yaml).unwrap();
    let reconciler = Reconciler::new(Context {
        queue: q.clone(),
        backend: LocalBackend::new(Duration::from_secs(10), dir.path().join("state")),
        metrics: Arc::new(Metrics::default()),
    });
    let settings = LoopSettings {
        tick: Duration::from_millis(300),
        leader_key: 11,
    };
    let shutdown = CancellationToken::new();
    let controller = tokio::spawn(reconcile::run(
        reconciler,
        ManifestSource::new(manifest),
        settings,
        shutdown.clone(),
    ));
    let mut registered = Vec::new();
    for _ in 0..300 {
        registered = q.workers(Some("text")).await.unwrap();
        if !registered.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(registered.len(), 1, "the pool's one worker registered");
    // A mark left by an earlier controller that died between drain and stop.
    let ids = vec![registered[0].id.clone()];
    assert_eq!(q.drain_idle(&ids).await.unwrap(), ids);

    enqueue_jobs(&q, JobType::Text, 5).await;
    let mut unfinished: i64 = -1;
    for _ in 0..600 {
        unfinished = sqlx::query_scalar("SELECT count(*) FROM all_tasks WHERE status <> 'complete'")
            .fetch_one(&pool)
            .await
            .unwrap();
        if unfinished == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    controller.await.unwrap().unwrap();
    assert_eq!(
        unfinished, 0,
        "the only worker went back to work and finished the jobs"
    );
}

/// Scale-from-zero does not wait for the tick: the task's NOTIFY wakes the
/// loop. The tick here is a minute, so only the wake-up can start the
/// replica within the 20 s the test waits.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_runnable_task_wakes_a_pool_at_zero_without_waiting_for_the_tick(pool: PgPool) {
    let q = Queue::new(pool);
    let backend = MemoryBackend::default();
    let running = RunningLoop::start(
        memory_reconciler(&q, &backend),
        TEXT_POOL,
        Duration::from_secs(60),
        44,
    );
    assert!(
        within_20s(async || !q.pool_statuses().await.unwrap().is_empty()).await,
        "the first pass ran"
    );
    assert!(backend.ids().is_empty(), "the first pass found nothing to do");

    enqueue_jobs(&q, JobType::Text, 1).await;
    assert!(
        within_20s(async || backend.ids().len() == 1).await,
        "woken by the task, not left to the next tick"
    );
    running.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_leader_whose_lock_session_dies_wins_again_instead_of_exiting(pool: PgPool) {
    let q = Queue::new(pool.clone());
    // One scale-up step per 1 s period, so the second step below is not
    // held for the default 15 s after the first.
    let pool_yaml = format!("{TEXT_POOL}  scaleUp: {{periodSeconds: 1}}\n");
    let backend = MemoryBackend::default();
    let leader = RunningLoop::start(
        memory_reconciler(&q, &backend),
        &pool_yaml,
        Duration::from_millis(200),
        43,
    );
    enqueue_jobs(&q, JobType::Text, 2).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(backend.ids().len(), 1);

    // What a database restart does to the lock's session.
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_locks
         WHERE locktype = 'advisory' AND objid = 43 AND granted",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(killed, [true]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !leader.task.is_finished(),
        "the controller exited when its lock session died"
    );

    enqueue_jobs(&q, JobType::Text, 4).await;
    assert!(
        within_20s(async || backend.ids().len() == 3).await,
        "it leads again and acts on the pools: {:?}",
        backend.ids()
    );
    leader.stop().await;
}

/// Waiting for leadership (a standby, or a leader whose lock session died)
/// outlasts any refusal of the database, not only a transient one: an
/// error here ended the run loop, and the local backend's workers, busy or
/// not, went with the process. Here the database does not exist (3D000)
/// until it is created.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn waiting_for_leadership_outlasts_a_database_that_refuses_the_connection(pool: PgPool) {
    use controller::reconcile::{AdvisoryLock, Election};
    let name = format!(
        "backlog_election_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    let url = test_support::with_database(&test_support::database_url(&pool), &name);
    let refusing = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy(&url)
        .unwrap();
    let mut election = AdvisoryLock::new(Queue::new(refusing), 44, Duration::from_millis(100));
    let shutdown = CancellationToken::new();
    let waiting = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let won = election.acquire(&shutdown).await;
            (won, election)
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !waiting.is_finished(),
        "acquire gave up on a refused connection: {:?}",
        waiting.await.unwrap().0
    );

    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&pool)
        .await
        .unwrap();
    let (won, election) = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("leading once the database accepts the connection")
        .unwrap();
    assert!(won.unwrap(), "won, not shut down");
    election.release().await.unwrap();
    shutdown.cancel();
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&pool)
        .await
        .unwrap();
}

/// A pdf pool beside the text pool: the one whose backend hangs below.
fn pdf_pool() -> String {
    TEXT_POOL
        .replace("{name: text}", "{name: pdf}")
        .replace("text_generation", "pdf_generation")
}

fn text_and_pdf_pools() -> Vec<LoadedPool> {
    pools(&format!("{TEXT_POOL}---{}", pdf_pool()))
}

/// Wait (bounded) until a stalled `observe` has started.
async fn until_stalled(backend: &MemoryBackend) {
    tokio::time::timeout(Duration::from_secs(30), backend.stall_entered.notified())
        .await
        .expect("the stalled pool's pass never reached its backend");
}

/// The pools whose stalled `observe` waits, once `done` holds of them (or
/// as they are after 30 s).
async fn until_waiting(
    backend: &MemoryBackend,
    done: impl Fn(&BTreeSet<String>) -> bool,
) -> BTreeSet<String> {
    let mut waiting = BTreeSet::new();
    for _ in 0..300 {
        waiting = backend.waiting.lock().unwrap().clone();
        if done(&waiting) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    waiting
}

/// The run loop in the background over the pools of `yaml`, kept in a
/// manifest file the test may rewrite.
struct RunningLoop {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    manifest: PathBuf,
    _dir: tempfile::TempDir,
}

impl RunningLoop {
    fn start(reconciler: Reconciler<MemoryBackend>, yaml: &str, tick: Duration, leader_key: i64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join("pools.yaml");
        std::fs::write(&manifest, yaml).unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(reconcile::run(
            reconciler,
            ManifestSource::new(manifest.clone()),
            LoopSettings { tick, leader_key },
            stop.clone(),
        ));
        RunningLoop {
            stop,
            task,
            manifest,
            _dir: dir,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// Polls `check` every 100 ms until it holds, for up to 20 s; whether it did.
async fn within_20s(mut check: impl AsyncFnMut() -> bool) -> bool {
    for _ in 0..200 {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    check().await
}

fn ready_reason(reconciler: &Reconciler<MemoryBackend>, pool: &str) -> Option<(String, String)> {
    let condition = reconciler.status(pool)?.condition(ConditionType::Ready)?;
    Some((condition.status.clone(), condition.reason.clone()))
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_pool_at_zero_is_woken_while_another_pools_backend_hangs(pool: PgPool) {
    let q = Queue::new(pool);
    let backend = MemoryBackend::default();
    backend.stall("pdf");
    let pools = format!("{TEXT_POOL}---{}", pdf_pool());
    let running = RunningLoop::start(
        memory_reconciler(&q, &backend),
        &pools,
        Duration::from_millis(200),
        44,
    );
    until_stalled(&backend).await;

    enqueue_jobs(&q, JobType::Text, 2).await;
    assert!(
        within_20s(async || backend.pool_ids("text").len() == 1).await,
        "the text pool waited on the pdf pool's hung backend"
    );
    backend.unstall("pdf");
    running.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn no_more_passes_run_at_once_than_the_bound(pool: PgPool) {
    assert_eq!(PassSettings::default().max_concurrent, 16, "the README's bound");
    let q = Queue::new(pool);
    let backend = MemoryBackend::default();
    for name in ["text", "pdf", "audio"] {
        backend.stall(name);
    }
    let audio_pool = TEXT_POOL
        .replace("{name: text}", "{name: audio}")
        .replace("text_generation", "audio_generation");
    let three = pools(&format!("{TEXT_POOL}---{}---{audio_pool}", pdf_pool()));
    let mut reconciler = memory_reconciler_with(
        &q,
        &backend,
        PassSettings {
            max_concurrent: 2,
            ..PassSettings::default()
        },
    );
    let round = tokio::spawn(async move { reconciler.reconcile(&three, chrono::Utc::now()).await });
    until_waiting(&backend, |w| w.len() == 2).await;
    // Time for a third pass to start, if anything let it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let waiting = backend.waiting.lock().unwrap().clone();
    assert_eq!(waiting.len(), 2, "passes at once: {waiting:?}");

    // One finishes: the third starts in its place.
    backend.unstall(waiting.first().unwrap());
    let now_waiting = until_waiting(&backend, |w| w.len() == 2 && !w.is_subset(&waiting)).await;
    assert_eq!(now_waiting.len(), 2, "{now_waiting:?}");
    assert!(
        !now_waiting.is_subset(&waiting),
        "the third pool's pass started: {now_waiting:?}"
    );
    for name in ["text", "pdf", "audio"] {
        backend.unstall(name);
    }
    let reports = round.await.unwrap();
    assert_eq!(reports.len(), 3, "{reports:?}");
}

/// A reconciler whose passes give a pool 300 ms: a stalled backend fails
/// its pool with `DeadlineExceeded` at once.
fn memory_reconciler_with_a_short_deadline(q: &Queue, backend: &MemoryBackend) -> Reconciler<MemoryBackend> {
    memory_reconciler_with(
        q,
        backend,
        PassSettings {
            deadline: Duration::from_millis(300),
            ..PassSettings::default()
        },
    )
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_pass_past_its_deadline_fails_its_pool_and_the_others_go_on(pool: PgPool) {
    let q = Queue::new(pool);
    let backend = MemoryBackend::default();
    backend.stall("pdf");
    let mut reconciler = memory_reconciler_with_a_short_deadline(&q, &backend);
    enqueue_jobs(&q, JobType::Text, 2).await;
    let reports = reconciler
        .reconcile(&text_and_pdf_pools(), chrono::Utc::now())
        .await;
    let done: Vec<(&str, u32)> = reports
        .iter()
        .map(|r| (r.pool.as_str(), r.decision.replicas))
        .collect();
    assert_eq!(done, [("text", 1)]);
    assert_eq!(
        ready_reason(&reconciler, "pdf"),
        Some(("False".into(), "DeadlineExceeded".into()))
    );
    backend.unstall("pdf");
}

/// A failing pool waits out its backoff, unless its spec changes: a fix
/// to the manifest is tried at the next pass, not a minute later.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_failing_pool_waits_out_its_backoff_unless_its_spec_changes(pool: PgPool) {
    let q = Queue::new(pool);
    let backend = MemoryBackend::default();
    backend.stall("pdf");
    let mut reconciler = memory_reconciler_with_a_short_deadline(&q, &backend);
    let now = chrono::Utc::now();
    reconciler.reconcile(&text_and_pdf_pools(), now).await;
    assert_eq!(
        ready_reason(&reconciler, "pdf"),
        Some(("False".into(), "DeadlineExceeded".into()))
    );
    backend.unstall("pdf");
    let reconciled = |reports: Vec<controller::reconcile::PoolReport>| -> BTreeSet<String> {
        reports.into_iter().map(|r| r.pool).collect()
    };

    // The same spec, the same instant: still within the backoff.
    let reports = reconciler.reconcile(&text_and_pdf_pools(), now).await;
    assert_eq!(
        reconciled(reports),
        BTreeSet::from(["text".into()]),
        "the failing pool waits"
    );

    // Its manifest fixed: tried at once.
    let fixed = pools(&format!(
        "{TEXT_POOL}---{}",
        pdf_pool().replace("maxReplicas: 5", "maxReplicas: 4")
    ));
    let reports = reconciler.reconcile(&fixed, now).await;
    assert_eq!(
        reconciled(reports),
        BTreeSet::from(["pdf".into(), "text".into()]),
        "a changed spec is tried at once"
    );
    assert_eq!(ready_reason(&reconciler, "pdf").map(|r| r.0), Some("True".into()));
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_pass_that_outlives_its_leadership_starts_nothing(pool: PgPool) {
    let q = Queue::new(pool);
    let backend = MemoryBackend::default();
    let reconciler = memory_reconciler(&q, &backend);
    let leadership = reconciler.leadership().clone();
    backend.stall("text");
    enqueue_jobs(&q, JobType::Text, 4).await;
    let pass = tokio::spawn(async move {
        let mut reconciler = reconciler;
        let reports = reconciler.reconcile(&pools(TEXT_POOL), chrono::Utc::now()).await;
        (reconciler, reports)
    });
    until_stalled(&backend).await;

    // Another controller wins while this pass waits on the platform.
    leadership.set(false);
    backend.unstall("text");
    let (reconciler, reports) = pass.await.unwrap();
    assert!(reports.is_empty(), "{reports:?}");
    assert!(backend.ids().is_empty(), "started {:?}", backend.ids());
    assert_eq!(
        ready_reason(&reconciler, "text"),
        Some(("False".into(), "LostLeadership".into()))
    );
    // Nor does it publish: the status and the policy memory a successor
    // decides from are the new leader's to write.
    assert!(
        q.pool_statuses().await.unwrap().is_empty(),
        "a former leader wrote the pool's status"
    );
}

/// A bug that panics in a pool's pass fails that pass like any error, and
/// the pool is retried. The panic used to unwind out of the loop, dropping
/// the backend: the local backend's workers, busy or not, were killed.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_pass_that_panics_fails_its_pool_and_the_controller_goes_on(pool: PgPool) {
    let q = Queue::new(pool);
    let backend = MemoryBackend::default();
    let mut reconciler = memory_reconciler(&q, &backend);
    let pools = pools(TEXT_POOL);
    enqueue_jobs(&q, JobType::Text, 4).await;
    backend.panic_once.store(true, Ordering::SeqCst);
    let now = chrono::Utc::now();

    let reports = reconciler.reconcile(&pools, now).await;

    assert!(reports.is_empty(), "{reports:?}");
    assert_eq!(
        ready_reason(&reconciler, "text"),
        Some(("False".into(), "Panicked".into()))
    );
    let later = now + chrono::Duration::minutes(5);
    let reports = reconciler.reconcile(&pools, later).await;
    assert_eq!(reports.len(), 1, "retried after its backoff");
    assert!(!backend.pool_ids("text").is_empty(), "and scaled up");
}

/// Scale-down held by a five-minute window and a five-minute cooldown:
/// deciding from an empty history (a restarted leader, or `plan` as it
/// was) goes 3 → 1 at once.
fn windowed_pool() -> String {
    TEXT_POOL
        .replace("cooldownPeriod: 0", "cooldownPeriod: 300")
        .replace("stabilizationWindowSeconds: 0", "stabilizationWindowSeconds: 300")
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn plan_and_a_new_leader_decide_from_the_stored_policy_memory(pool: PgPool) {
    let q = Queue::new(pool);
    let backend = MemoryBackend::default();
    let pools = pools(&windowed_pool());
    let now = chrono::Utc::now();
    let mut leader = memory_reconciler(&q, &backend);
    enqueue_jobs(&q, JobType::Text, 6).await;
    assert_eq!(leader.reconcile(&pools, now).await[0].decision.replicas, 3);
    complete_text_tasks_elsewhere(&q).await;

    let later = now + chrono::Duration::seconds(60);
    let held = leader.reconcile(&pools, later).await;
    assert_eq!(held[0].decision.replicas, 3, "{}", held[0].decision);

    let ctx = Context {
        queue: q.clone(),
        backend: backend.clone(),
        metrics: Arc::new(Metrics::default()),
    };
    let planned = reconcile::plan(&ctx, &pools, later).await.unwrap();
    let decision = planned[0].decision.as_ref().expect("the backend answered");
    assert!(planned[0].from_stored_memory);
    assert_eq!(
        (decision.from, decision.replicas),
        (3, 3),
        "plan holds as run does: {decision}"
    );

    // The leader is gone; its successor keeps the window.
    drop(leader);
    let mut successor = memory_reconciler(&q, &backend);
    successor.take_office().await;
    let kept = successor
        .reconcile(&pools, later + chrono::Duration::seconds(10))
        .await;
    assert_eq!(kept[0].decision.replicas, 3, "{}", kept[0].decision);
    assert_eq!(backend.ids().len(), 3);
    // And once the window has passed, it scales down.
    let down = successor
        .reconcile(&pools, now + chrono::Duration::seconds(400))
        .await;
    assert_eq!(down[0].decision.replicas, 0, "{}", down[0].decision);
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn the_plan_command_reads_the_local_backend_and_changes_nothing(pool: PgPool) {
    let q = Queue::new(pool.clone());
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("pools.yaml");
    std::fs::write(&manifest, windowed_pool()).unwrap();
    let state_dir = dir.path().join("state");
    enqueue_jobs(&q, JobType::Text, 3).await;

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_controller"))
        .args(["plan", "--backend", "local", "-f"])
        .arg(&manifest)
        .arg("--state-dir")
        .arg(&state_dir)
        .env("DATABASE_URL", test_support::database_url(&pool))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("text: 0 → 2 replicas (activating)"),
        "{stdout}"
    );
    assert!(stdout.contains("3 pending"), "{stdout}");
    assert!(stdout.contains("history: none stored"), "{stdout}");
    assert!(!state_dir.exists(), "plan wrote the local backend's state");
    let unchanged: i64 = sqlx::query_scalar("SELECT count(*) FROM pool_status")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(unchanged, 0, "plan wrote a pool status");
}

/// A pool edited into an invalid spec stops scaling, and `/metrics` says
/// so with `Ready=False`, the series the BacklogPoolNotReady alert watches.
/// Its series used to vanish with it, so the alert could not fire. So does
/// its row in `GET /v1/pools`, which went on saying `Ready=True`.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_pool_edited_into_an_invalid_spec_is_reported_not_ready(pool: PgPool) {
    let q = Queue::new(pool);
    // The Ready condition of the pool's row in GET /v1/pools.
    let api_ready = async || {
        let rows = q.pool_statuses().await.unwrap();
        let row = rows.iter().find(|r| r.status.pool == "text")?;
        row.status
            .conditions
            .as_array()?
            .iter()
            .find(|c| c["type"] == "Ready")
            .cloned()
    };
    let metrics = Arc::new(Metrics::default());
    let reconciler = Reconciler::new(Context {
        queue: q.clone(),
        backend: MemoryBackend::default(),
        metrics: metrics.clone(),
    });
    let running = RunningLoop::start(reconciler, TEXT_POOL, Duration::from_millis(100), 7);
    let ready = |status: &str, value: u8| {
        format!(r#"backlog_controller_pool_condition{{pool="text",type="Ready",status="{status}"}} {value}"#)
    };
    let scraped_with = async |series: &[String]| {
        let all_there = within_20s(async || {
            let scraped = metrics.encode();
            series.iter().all(|s| scraped.contains(s.as_str()))
        })
        .await;
        assert!(all_there, "{series:?} never in:\n{}", metrics.encode());
        metrics.encode()
    };
    scraped_with(&[ready("True", 1)]).await;

    let invalid = TEXT_POOL.replace("maxReplicas: 5", "maxReplicas: 5\n  minReplicas: 9");
    std::fs::write(&running.manifest, invalid).unwrap();
    let scraped = scraped_with(&[ready("False", 1), ready("True", 0)]).await;
    let said_not_ready = within_20s(async || api_ready().await.is_some_and(|c| c["status"] == "False")).await;
    let condition = api_ready().await.unwrap();
    assert!(said_not_ready, "GET /v1/pools still says {condition}");
    assert_eq!(condition["reason"], "InvalidSpec");
    assert!(
        condition["message"].as_str().unwrap().contains("minReplicas"),
        "names what is wrong: {condition}"
    );
    for stale in [
        r#"backlog_controller_desired_replicas{pool="text"}"#,
        r#"backlog_controller_pool_task_type_info{pool="text""#,
        r#"backlog_controller_pool_condition{pool="text",type="Active""#,
    ] {
        assert!(!scraped.contains(stale), "{stale} in:\n{scraped}");
    }

    // Fixed: Ready again.
    std::fs::write(&running.manifest, TEXT_POOL).unwrap();
    scraped_with(&[ready("True", 1), ready("False", 0)]).await;
    let ready_again = within_20s(async || api_ready().await.is_some_and(|c| c["status"] == "True")).await;
    assert!(ready_again, "GET /v1/pools: {:?}", api_ready().await);
    running.stop().await;
}

/// A pool rejected from its first load (here: a task type another pool
/// serves) has a row in `GET /v1/pools` that says why; it had none, so
/// the operator saw no trace of the pool they had applied.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_pool_rejected_from_the_start_is_listed_with_why(pool: PgPool) {
    let q = Queue::new(pool);
    let reconciler = Reconciler::new(Context {
        queue: q.clone(),
        backend: MemoryBackend::default(),
        metrics: Arc::new(Metrics::default()),
    });
    let second = TEXT_POOL.replace("name: text", "name: text-again");
    let manifests = format!("{TEXT_POOL}\n---\n{second}");
    let running = RunningLoop::start(reconciler, &manifests, Duration::from_millis(100), 7);
    let listed = within_20s(async || q.pool_statuses().await.unwrap().len() == 2).await;
    let rows = q.pool_statuses().await.unwrap();
    assert!(listed, "{rows:?}");
    let rejected = &rows
        .iter()
        .find(|r| r.status.pool == "text-again")
        .unwrap()
        .status;
    let ready = &rejected.conditions[0];
    assert_eq!(
        (ready["type"].as_str(), ready["status"].as_str()),
        (Some("Ready"), Some("False"))
    );
    assert!(
        ready["message"].as_str().unwrap().contains("text_generation"),
        "names the task type: {ready}"
    );
    assert_eq!(
        (rejected.current_replicas, rejected.backend.as_str()),
        (0, "memory")
    );
    running.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn the_metrics_follow_the_pools_and_a_standby_reports_none(pool: PgPool) {
    let q = Queue::new(pool);
    let metrics = Arc::new(Metrics::default());
    let reconciler_metrics = metrics.clone();
    let mut reconciler = Reconciler::new(Context {
        queue: q.clone(),
        backend: MemoryBackend::default(),
        metrics: reconciler_metrics,
    });
    let pools = pools(TEXT_POOL);
    let now = chrono::Utc::now();
    enqueue_jobs(&q, JobType::Text, 3).await;
    reconciler.reconcile(&pools, now).await;

    let scraped = metrics.encode();
    for series in [
        "backlog_controller_leader 1",
        r#"backlog_controller_desired_replicas{pool="text"} 2"#,
        r#"backlog_controller_pending_tasks{pool="text"} 3"#,
        r#"backlog_controller_pool_task_type_info{pool="text",task_type="text_generation"} 1"#,
        r#"backlog_controller_pool_condition{pool="text",type="Ready",status="True"} 1"#,
        r#"backlog_controller_pool_condition{pool="text",type="Ready",status="False"} 0"#,
        r#"backlog_controller_pool_condition{pool="text",type="Active",status="True"} 1"#,
        r#"backlog_controller_scale_changes_total{pool="text",direction="up"} 1"#,
        // At 0 before the first error, so increase() sees the first.
        r#"backlog_controller_errors_total{pool="text",stage="backend"} 0"#,
    ] {
        assert!(scraped.contains(series), "{series} in:\n{scraped}");
    }
    assert!(
        !scraped.contains("backlog_controller_target_queue_seconds{"),
        "a pool without targetQueueSeconds has no target series:\n{scraped}"
    );

    // The manifest is removed: its gauges go, its counters stay.
    reconciler
        .reconcile(&[], now + chrono::Duration::seconds(1))
        .await;
    let scraped = metrics.encode();
    assert!(
        !scraped.contains(r#"backlog_controller_desired_replicas{pool="text"}"#),
        "{scraped}"
    );
    assert!(
        !scraped.contains(r#"backlog_controller_pool_condition{pool="text""#),
        "{scraped}"
    );
    assert!(scraped.contains(r#"backlog_controller_scale_changes_total{pool="text",direction="up"} 1"#));

    // Back, then leadership lost: a standby reports no pool.
    reconciler
        .reconcile(&pools, now + chrono::Duration::seconds(2))
        .await;
    assert!(metrics
        .encode()
        .contains(r#"backlog_controller_ready_replicas{pool="text"}"#));
    reconciler.set_leading(false);
    let scraped = metrics.encode();
    assert!(scraped.contains("backlog_controller_leader 0"), "{scraped}");
    assert!(
        !scraped.contains(r#"backlog_controller_ready_replicas{pool="text"}"#),
        "{scraped}"
    );
    assert!(
        !scraped.contains(r#"backlog_controller_pool_task_type_info{pool="text""#),
        "{scraped}"
    );
}

#[test]
fn every_setting_of_controller_run_is_in_the_readme_with_its_default() {
    let wrong = test_support::settings_the_readme_misstates(env!("CARGO_BIN_EXE_controller"), &["run"]);
    assert!(wrong.is_empty(), "README, Configuration: {wrong:#?}");
}
