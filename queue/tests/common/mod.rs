//! Fixtures for the queue's integration tests: each test gets a fresh
//! migrated database from `#[sqlx::test]`.
#![allow(dead_code)]

use std::time::Duration;

use queue::{JobType, Lease, NewJob, Queue, QueueConfig, Task, TaskType};
use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

pub const TENANT: &str = "acme";

/// A queue whose retries back off quickly, so tests can watch them.
pub fn queue(pool: PgPool) -> Queue {
    Queue::new(pool).with_config(QueueConfig {
        retry_base: Duration::from_secs(10),
        retry_cap: Duration::from_secs(3600),
        ..QueueConfig::default()
    })
}

pub fn text_job(prompt: &str) -> NewJob {
    NewJob::new(TENANT, JobType::Text, json!({ "prompt": prompt }))
}

pub fn reading_job(prompt: &str) -> NewJob {
    NewJob::new(
        TENANT,
        JobType::Reading,
        json!({ "prompt": prompt, "title": "A reading" }),
    )
}

/// Claim exactly one task of a type, failing the test otherwise.
pub async fn claim_one(q: &Queue, worker: &str, task_type: TaskType) -> Task {
    let mut tasks = q.claim(worker, &[task_type], 1).await.expect("claim");
    assert_eq!(tasks.len(), 1, "expected one {task_type} task to be claimable");
    tasks.remove(0)
}

/// Move a claimed task's lease into the past, as if its worker had died.
pub async fn age_heartbeat(pool: &PgPool, lease: Lease, by: Duration) {
    sqlx::query("UPDATE job_tasks SET heartbeat_at = heartbeat_at - make_interval(secs => $2) WHERE id = $1")
        .bind(lease.task_id)
        .bind(by.as_secs_f64())
        .execute(pool)
        .await
        .unwrap();
}

/// Make every scheduled retry due now, as if its backoff had passed.
pub async fn make_retries_due(pool: &PgPool) {
    sqlx::query("UPDATE job_tasks SET run_at = now() WHERE status = 'pending' AND run_at > now()")
        .execute(pool)
        .await
        .unwrap();
}

pub async fn count(pool: &PgPool, table: &str) -> i64 {
    // Table names come from the tests themselves, never from input.
    let sql = match table {
        "jobs" => "SELECT count(*) FROM jobs",
        "job_tasks" => "SELECT count(*) FROM job_tasks",
        "all_jobs" => "SELECT count(*) FROM all_jobs",
        "all_tasks" => "SELECT count(*) FROM all_tasks",
        "job_history" => "SELECT count(*) FROM job_history",
        // Jobs of one task that completed in their task's row.
        "jobs_in_task_history" => "SELECT count(*) FROM task_history WHERE job_input IS NOT NULL",
        "task_history" => "SELECT count(*) FROM task_history",
        "artifacts" => "SELECT count(*) FROM artifacts",
        "workers" => "SELECT count(*) FROM workers",
        "job_watches" => "SELECT count(*) FROM job_watches",
        other => panic!("unknown table {other}"),
    };
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// A pool of one connection to the test's database, for a test that reads
/// PostgreSQL's statistics: they are then all that backend's, flushed when
/// it asks (`flush_statistics`), with none of another backend's arriving
/// late in the middle. `None`, saying so, before PostgreSQL 15, which has
/// no way to ask.
pub async fn one_connection_with_statistics(pool: &PgPool) -> Option<PgPool> {
    let version: i32 = sqlx::query_scalar("SELECT current_setting('server_version_num')::int")
        .fetch_one(pool)
        .await
        .unwrap();
    if version < 150000 {
        eprintln!("skipped: pg_stat_force_next_flush() needs PostgreSQL 15, the server is {version}");
        return None;
    }
    let one = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(pool.connect_options().as_ref().clone())
        .await
        .unwrap();
    Some(one)
}

/// Make the statistics of `one`'s connection visible in the views.
pub async fn flush_statistics(one: &PgPool) {
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(one)
        .await
        .unwrap();
}

/// Backends of this test's database waiting for a lock right now.
pub async fn lock_waiters(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Wait until `other` has finished or `waiters` backends are blocked on a
/// lock: the moment the held transaction may commit.
pub async fn until_done_or_blocked<T>(pool: &PgPool, other: &tokio::task::JoinHandle<T>, waiters: i64) {
    for _ in 0..500 {
        if other.is_finished() || lock_waiters(pool).await >= waiters {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the concurrent call neither finished nor blocked within 5 s");
}

/// The next job a status notification names, within 10 s.
pub async fn next_change(notifications: &mut queue::JobStatusNotifications) -> uuid::Uuid {
    match tokio::time::timeout(Duration::from_secs(10), notifications.next())
        .await
        .expect("a notification within 10 s")
        .unwrap()
    {
        queue::JobStatusEvent::Changed(id) => id,
        queue::JobStatusEvent::Resync => panic!("unexpected resync"),
    }
}
