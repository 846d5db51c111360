//! The real worker binary as a process: killed with -9 mid-task, its task
//! is swept and completed exactly once by another replica; SIGTERM exits 0;
//! a second signal during the drain exits at once.

use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::post;
use axum::Json;
use queue::{JobStatus, JobType, NewJob, Queue, TaskStatus};
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::process::{Child, Command};

/// An OpenAI-compatible endpoint that takes a while to answer, so a worker
/// can be killed while it waits.
async fn slow_llm(calls: Arc<AtomicUsize>, delay: Duration) -> String {
    let app = axum::Router::new().route(
        "/chat/completions",
        post(move || {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                Json(json!({
                    "id": "cmpl-1", "object": "chat.completion", "model": "test-model",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": "# Tides\n\nThe sea rises and falls."}}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 8, "total_tokens": 18}
                }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

fn spawn_worker(id: &str, database_url: &str, llm_url: &str, store: &std::path::Path) -> Child {
    worker_command(id, database_url, llm_url, store)
        .spawn()
        .expect("start text-worker")
}

fn worker_command(id: &str, database_url: &str, llm_url: &str, store: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_text-worker"));
    command
        .env("DATABASE_URL", database_url)
        .env("WORKER_ID", id)
        .env("WORKER_HEARTBEAT_SECONDS", "0.2")
        .env("WORKER_POLL_SECONDS", "0.5")
        .env("LLM_PROVIDER", "openai")
        .env("LLM_BASE_URL", llm_url)
        .env("LLM_API_KEY", "test-key")
        .env("LLM_MODEL", "test-model")
        .env("ARTIFACT_STORE", format!("file://{}", store.display()))
        .env("LOG_FORMAT", "text")
        .stdout(Stdio::null())
        .kill_on_drop(true);
    command
}

/// SIGTERM, as a platform stopping the replica sends it.
fn sigterm(pid: libc::pid_t) {
    // SAFETY: kill(2) on a child of this test with a valid signal.
    unsafe { libc::kill(pid, libc::SIGTERM) };
}

async fn task_state(pool: &PgPool) -> (String, Option<String>, i32) {
    sqlx::query_as("SELECT status, claimed_by, attempts FROM all_tasks")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn eventually<T: PartialEq + std::fmt::Debug>(
    what: &str,
    expected: T,
    mut read: impl AsyncFnMut() -> T,
) {
    let mut last = None;
    for _ in 0..300 {
        let now = read().await;
        if now == expected {
            return;
        }
        last = Some(now);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}: expected {expected:?}, last saw {last:?}");
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_worker_killed_mid_task_loses_it_to_the_sweeper_and_another_finishes_it_once(pool: PgPool) {
    let q = Queue::new(pool.clone());
    let url = test_support::database_url(&pool);
    let store = tempfile::tempdir().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let llm = slow_llm(calls.clone(), Duration::from_millis(1500)).await;
    let job = q
        .enqueue(NewJob::new("acme", JobType::Text, json!({"prompt": "tides"})))
        .await
        .unwrap()
        .job;

    let mut doomed = spawn_worker("doomed", &url, &llm, store.path());
    eventually(
        "the task to be processing on `doomed`",
        ("processing".to_string(), Some("doomed".to_string()), 1),
        async || task_state(&pool).await,
    )
    .await;
    // Killed while it waits on the provider, not before it asked.
    eventually("the provider call of `doomed`", 1, async || {
        calls.load(Ordering::SeqCst)
    })
    .await;
    doomed.start_kill().unwrap(); // SIGKILL: no drain, no release
    doomed.wait().await.unwrap();
    assert_eq!(task_state(&pool).await.0, "processing", "nobody released it");

    // Its heartbeats stopped; the sweeper takes the task back.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let swept = q.sweep(Duration::from_millis(500)).await.unwrap();
    assert_eq!(swept.retried(), 1);
    sqlx::query("UPDATE job_tasks SET run_at = now()")
        .execute(&pool)
        .await
        .unwrap();

    // Its log as JSON, as `make chaos` reads every worker's (scripts/chaos.py).
    let mut rescuer = worker_command("rescuer", &url, &llm, store.path())
        .env("LOG_FORMAT", "json")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = {
        use tokio::io::AsyncReadExt;
        let mut stderr = rescuer.stderr.take().unwrap();
        tokio::spawn(async move {
            let mut text = String::new();
            stderr.read_to_string(&mut text).await.unwrap();
            text
        })
    };
    eventually("the job to complete", JobStatus::Complete, async || {
        q.job("acme", job.id).await.unwrap().status
    })
    .await;
    let task = &q.tasks_of(job.id).await.unwrap()[0];
    assert_eq!(
        (task.status, task.attempts, task.claimed_by.as_deref()),
        (TaskStatus::Complete, 2, Some("rescuer"))
    );
    assert_eq!(
        task.output.as_ref().unwrap()["usage"]["total_tokens"],
        18,
        "token usage recorded on the task"
    );
    let artifacts = q.artifacts_of(job.id).await.unwrap();
    assert_eq!(artifacts.len(), 1, "one text artifact, not one per attempt");
    assert_eq!(
        std::fs::read_to_string(store.path().join(&artifacts[0].storage_key)).unwrap(),
        "# Tides\n\nThe sea rises and falls."
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2, "one provider call per attempt");

    // SIGTERM: drains (nothing running) and exits 0, deregistered.
    let pid = rescuer.id().unwrap() as libc::pid_t;
    sigterm(pid);
    let status = tokio::time::timeout(Duration::from_secs(10), rescuer.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status}");
    // The events scripts/chaos.py counts, by the messages and fields it reads.
    let events: Vec<Value> = log
        .await
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    let message = |e: &Value| e["message"].as_str().unwrap_or_default().to_string();
    assert!(
        events.iter().any(|e| message(e) == "worker started"),
        "{events:#?}"
    );
    assert!(
        events
            .iter()
            .any(|e| message(e) == "task complete" && e["task_id"] == json!(task.id)),
        "{events:#?}"
    );
    assert!(
        events.iter().any(|e| message(e).starts_with("signal received")),
        "{events:#?}"
    );
    assert!(
        events
            .iter()
            .any(|e| message(e).starts_with("shutting down") && e["in_flight"] == json!(0)),
        "{events:#?}"
    );
    let registered: Vec<String> = q.workers(None).await.unwrap().into_iter().map(|w| w.id).collect();
    assert_eq!(
        registered,
        ["doomed"],
        "the rescuer deregistered; the killed one waits for the sweeper"
    );
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_second_signal_during_the_drain_exits_at_once_and_leaves_the_task_to_the_sweeper(pool: PgPool) {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let q = Queue::new(pool.clone());
    let url = test_support::database_url(&pool);
    let store = tempfile::tempdir().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    // A provider slower than the test: the drain would wait for it.
    let llm = slow_llm(calls.clone(), Duration::from_secs(60)).await;
    q.enqueue(NewJob::new("acme", JobType::Text, json!({"prompt": "tides"})))
        .await
        .unwrap();
    // Its log is read below, so the pipe never fills.
    let mut worker = worker_command("impatient", &url, &llm, store.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually("the provider call", 1, async || calls.load(Ordering::SeqCst)).await;

    let mut log = BufReader::new(worker.stderr.take().unwrap()).lines();
    let pid = worker.id().unwrap() as libc::pid_t;
    sigterm(pid);
    // The first signal is taken (a drain begins) before the second is sent:
    // two pending signals of one kind would be delivered as one.
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = log.next_line().await.unwrap() {
            if line.contains("signal received: draining") {
                return;
            }
        }
        panic!("the worker exited without draining");
    })
    .await
    .expect("the drain's log line");
    sigterm(pid);
    let status = tokio::time::timeout(Duration::from_secs(10), worker.wait())
        .await
        .expect("exits without waiting for the provider")
        .unwrap();
    assert_eq!(status.code(), Some(130), "exit status {status}");
    assert_eq!(
        task_state(&pool).await,
        ("processing".to_string(), Some("impatient".to_string()), 1),
        "not released: the sweeper rescues it"
    );
}

#[test]
fn every_setting_of_a_worker_is_in_the_readme_with_its_default() {
    for binary in [
        env!("CARGO_BIN_EXE_worker"),
        env!("CARGO_BIN_EXE_text-worker"),
        env!("CARGO_BIN_EXE_pdf-worker"),
        env!("CARGO_BIN_EXE_audio-worker"),
    ] {
        let wrong = test_support::settings_the_readme_misstates(binary, &[]);
        assert!(wrong.is_empty(), "README, Configuration: {wrong:#?} ({binary})");
    }
}

type LogLines = tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>;

/// A text worker `early` started on a database without the schema, once it
/// has said it waits for it, with the rest of its log.
async fn worker_waiting_for_the_schema(pool: &PgPool, store: &std::path::Path) -> (Child, LogLines) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let url = test_support::database_url(pool);
    let mut worker = worker_command("early", &url, "http://127.0.0.1:9", store)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start text-worker");
    let mut log = BufReader::new(worker.stderr.take().unwrap()).lines();
    let mut seen = vec![];
    loop {
        let line = tokio::time::timeout(Duration::from_secs(30), log.next_line())
            .await
            .expect("a log line within 30 s")
            .unwrap()
            .unwrap_or_else(|| panic!("the worker exited; it logged: {seen:#?}"));
        if line.contains("lacks backlog's schema") {
            break;
        }
        seen.push(line);
    }
    assert!(worker.try_wait().unwrap().is_none(), "the worker exited");
    (worker, log)
}

/// SIGTERM `worker` (its log read to the end meanwhile): it exits 0 within 30 s.
async fn stops_cleanly(mut worker: Child, mut log: LogLines) {
    tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });
    sigterm(worker.id().unwrap() as libc::pid_t);
    let status = tokio::time::timeout(Duration::from_secs(30), worker.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
}

/// A worker started before the schema (a first deploy starts everything at
/// once) waits for it, saying so, then registers and runs once migrated.
#[sqlx::test(migrations = false)]
async fn a_worker_started_before_the_schema_waits_for_it(pool: PgPool) {
    let store = tempfile::tempdir().unwrap();
    let (worker, log) = worker_waiting_for_the_schema(&pool, store.path()).await;

    queue::MIGRATOR.run(&pool).await.unwrap();
    eventually("the worker to register", 1, async || {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM workers WHERE id = 'early'")
            .fetch_one(&pool)
            .await
            .unwrap()
    })
    .await;
    stops_cleanly(worker, log).await;
}

/// Stopped while it waits for the schema (a first deploy rolled back), a
/// worker exits 0 like any other stop; it used to die by the signal.
#[sqlx::test(migrations = false)]
async fn a_worker_stopped_while_waiting_for_the_schema_exits_cleanly(pool: PgPool) {
    let store = tempfile::tempdir().unwrap();
    let (worker, log) = worker_waiting_for_the_schema(&pool, store.path()).await;
    stops_cleanly(worker, log).await;
}

/// Without `WORKER_ID`, a worker on Kubernetes registers under its pod's
/// name (`POD_NAME`, from the downward API in workers.yaml): the drain and
/// the pod-deletion cost match registry rows to pods by it.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_worker_without_an_id_registers_under_its_pod_name(pool: PgPool) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let store = tempfile::tempdir().unwrap();
    let url = test_support::database_url(&pool);
    let mut worker = worker_command("unused", &url, "http://127.0.0.1:9", store.path())
        .env_remove("WORKER_ID")
        .env_remove("FLY_MACHINE_ID")
        .env("POD_NAME", "text-workers-5d8c7-x2x9q")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start text-worker");
    let log = BufReader::new(worker.stderr.take().unwrap()).lines();
    eventually(
        "the worker to register",
        vec!["text-workers-5d8c7-x2x9q".to_string()],
        async || {
            sqlx::query_scalar::<_, String>("SELECT id FROM workers")
                .fetch_all(&pool)
                .await
                .unwrap()
        },
    )
    .await;
    stops_cleanly(worker, log).await;
}
