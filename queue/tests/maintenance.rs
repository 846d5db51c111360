//! The sweeper and retention.

mod common;

use std::time::Duration;

use common::*;
use queue::{JobStatus, Retention, RetentionMode, TaskStatus, TaskType};
use serde_json::json;
use sqlx::PgPool;

const STALE: Duration = Duration::from_secs(30);

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_task_whose_worker_stopped_heartbeating_returns_to_pending(pool: PgPool) {
    let q = queue(pool.clone());
    let job = q.enqueue(text_job("x")).await.unwrap().job;
    let fresh_job = q.enqueue(text_job("y")).await.unwrap().job;
    let dead = claim_one(&q, "dead", TaskType::TextGeneration).await;
    let alive = claim_one(&q, "alive", TaskType::TextGeneration).await;
    age_heartbeat(&pool, dead.lease(), Duration::from_secs(60)).await;

    let outcome = q.sweep(STALE).await.unwrap();
    assert_eq!(outcome.tasks.len(), 1);
    let swept = &outcome.tasks[0];
    assert_eq!((swept.task_id, swept.status), (dead.id, TaskStatus::Pending));
    assert!(swept.reason.contains("stopped heartbeating"), "{}", swept.reason);
    // The reason is shown to the job's client; the worker is for operators.
    assert_eq!(swept.worker_id.as_deref(), Some("dead"));
    assert!(!swept.reason.contains("dead"), "{}", swept.reason);

    let task = &q.tasks_of(job.id).await.unwrap()[0];
    assert_eq!(task.status, TaskStatus::Pending);
    assert!(task.run_at > chrono::Utc::now(), "returned with a backoff");
    assert_eq!(task.claimed_by, None);
    assert_eq!(task.last_error.as_deref(), Some(swept.reason.as_str()));
    assert_eq!(
        q.tasks_of(fresh_job.id).await.unwrap()[0].status,
        TaskStatus::Claimed,
        "{alive:?} untouched"
    );
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_task_past_its_timeout_returns_to_pending_even_while_heartbeating(pool: PgPool) {
    let q = queue(pool.clone());
    q.enqueue(text_job("x")).await.unwrap();
    let task = claim_one(&q, "w", TaskType::TextGeneration).await;
    sqlx::query("UPDATE job_tasks SET claimed_at = now() - interval '1 hour' WHERE id = $1")
        .bind(task.id)
        .execute(&pool)
        .await
        .unwrap();
    assert!(
        q.heartbeat("w", &[task.lease()]).await.unwrap().is_empty(),
        "still heartbeating"
    );

    let outcome = q.sweep(STALE).await.unwrap();
    assert_eq!(outcome.retried(), 1);
    assert!(
        outcome.tasks[0].reason.contains("timed out after 300 s"),
        "{}",
        outcome.tasks[0].reason
    );
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_swept_task_out_of_attempts_fails_its_job(pool: PgPool) {
    let q = queue(pool.clone());
    let job = q.enqueue(reading_job("x").max_attempts(1)).await.unwrap().job;
    let task = claim_one(&q, "dead", TaskType::TextGeneration).await;
    age_heartbeat(&pool, task.lease(), Duration::from_secs(60)).await;
    let outcome = q.sweep(STALE).await.unwrap();
    assert_eq!((outcome.retried(), outcome.failed()), (0, 1));
    let job = q.job_with_tasks(TENANT, job.id).await.unwrap();
    assert_eq!(job.job.status, JobStatus::Failed);
    assert!(job.tasks[1..].iter().all(|t| t.status == TaskStatus::Cancelled));
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn concurrent_sweeps_act_once_and_a_second_sweep_changes_nothing(pool: PgPool) {
    let q = queue(pool.clone());
    for i in 0..200 {
        q.enqueue(text_job(&format!("{i}"))).await.unwrap();
    }
    let tasks = q.claim("dead", &[TaskType::TextGeneration], 200).await.unwrap();
    sqlx::query("UPDATE job_tasks SET heartbeat_at = now() - interval '1 hour'")
        .execute(&pool)
        .await
        .unwrap();

    let sweeps: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn({
                let q = q.clone();
                async move { q.sweep(STALE).await.unwrap() }
            })
        })
        .collect();
    let mut total = 0;
    for s in sweeps {
        total += s.await.unwrap().tasks.len();
    }
    assert_eq!(
        total,
        tasks.len(),
        "each stuck task swept exactly once across concurrent sweepers"
    );

    let snapshot: Vec<(i64, String, i32, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as("SELECT id, status, attempts, run_at FROM job_tasks ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(q.sweep(STALE).await.unwrap().tasks.is_empty());
    let after: Vec<(i64, String, i32, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as("SELECT id, status, attempts, run_at FROM job_tasks ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(snapshot, after, "sweeping again changes nothing");
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn retention_deletes_or_archives_only_old_finished_jobs(pool: PgPool) {
    let q = queue(pool.clone());
    let mut finished = Vec::new();
    for i in 0..5 {
        let job = q.enqueue(text_job(&format!("{i}"))).await.unwrap().job;
        let task = claim_one(&q, "w", TaskType::TextGeneration).await;
        q.complete("w", task.lease(), json!({})).await.unwrap();
        finished.push(job.id);
    }
    let recent = q.enqueue(text_job("recent")).await.unwrap().job;
    let running = q.enqueue(text_job("running")).await.unwrap().job;
    claim_one(&q, "w", TaskType::TextGeneration).await;
    // Three finished jobs and the two unfinished ones are ten days old.
    for id in finished[..3].iter().chain([&recent.id, &running.id]) {
        backdate(&pool, *id, 10).await;
    }
    let week = Duration::from_secs(7 * 86400);
    let archived = q
        .prune(Retention {
            older_than: week,
            mode: RetentionMode::Archive,
            batch: 2,
        })
        .await
        .unwrap();
    assert_eq!(archived, 3, "pruned in batches of 2 until done");
    let archive: (i64, i64) =
        sqlx::query_as("SELECT count(*), sum(jsonb_array_length(tasks)) FROM jobs_archive")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(archive, (3, 3), "jobs archived with their tasks");
    assert_eq!(count(&pool, "jobs").await, 4);
    assert_eq!(count(&pool, "job_tasks").await, 4);
    assert_eq!(
        q.prune(Retention {
            older_than: week,
            mode: RetentionMode::Delete,
            batch: 100
        })
        .await
        .unwrap(),
        0
    );
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn deleting_old_jobs_queues_their_artifact_bytes_for_the_cleaner(pool: PgPool) {
    let q = queue(pool.clone());
    let mut keys = Vec::new();
    for name in ["old", "new"] {
        let job = q.enqueue(text_job(name)).await.unwrap().job;
        let task = claim_one(&q, "w", TaskType::TextGeneration).await;
        let key = format!("jobs/{}/text.md", job.id);
        q.record_artifact(
            "w",
            task.lease(),
            &queue::NewArtifact {
                job_id: job.id,
                kind: queue::ArtifactKind::Text,
                content_type: "text/markdown".into(),
                storage_key: key.clone(),
                bytes: 5,
                sha256: "0".repeat(64),
                metadata: json!({}),
            },
        )
        .await
        .unwrap();
        q.complete("w", task.lease(), json!({})).await.unwrap();
        if name == "old" {
            backdate(&pool, job.id, 10).await;
        }
        keys.push(key);
    }
    assert!(q.artifact_deletions(10).await.unwrap().is_empty());

    let week = Duration::from_secs(7 * 86400);
    let retention = Retention {
        older_than: week,
        mode: RetentionMode::Delete,
        batch: 100,
    };
    assert_eq!(q.prune(retention).await.unwrap(), 1);
    assert_eq!(
        count(&pool, "job_tasks").await,
        1,
        "the old job's task goes with it"
    );
    assert_eq!(
        count(&pool, "artifacts").await,
        1,
        "the recent job keeps its artifact"
    );
    // Its recorded object, and its whole prefix: bytes an attempt stored
    // and never recorded go too. (backdate gave the job an older id.)
    let waiting = q.artifact_deletions(10).await.unwrap();
    let prefixes: Vec<&String> = waiting.iter().filter(|k| k.ends_with('/')).collect();
    assert_eq!(waiting.len(), 2, "{waiting:?}");
    assert!(
        waiting.contains(&keys[0]),
        "the old job's bytes wait for the cleaner: {waiting:?}"
    );
    assert!(
        prefixes.len() == 1 && prefixes[0].starts_with("jobs/") && !keys[1].starts_with(prefixes[0].as_str()),
        "the old job's prefix, not the recent one's: {waiting:?}"
    );
    q.forget_artifact_deletions(&waiting).await.unwrap();
    assert!(q.artifact_deletions(10).await.unwrap().is_empty());
    assert!(matches!(
        q.artifact_deletions(0).await,
        Err(queue::QueueError::InvalidInput { .. })
    ));
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_deleted_task_finds_its_artifacts_through_an_index(pool: PgPool) {
    // Retention deletes tasks, and each delete cascades to the task's
    // artifacts: without an index on artifacts.task_id, every one of those
    // cascades read the whole artifacts table.
    sqlx::query(
        "WITH j AS (
             INSERT INTO jobs (id, tenant, job_type, status, input, finished_at)
             SELECT gen_random_uuid(), 'acme', 'text', 'complete', '{}', now()
             FROM generate_series(1, 5000)
             RETURNING id
         ), t AS (
             INSERT INTO job_tasks (job_id, task_type, status, finished_at)
             SELECT id, 'text_generation', 'complete', now() FROM j
             RETURNING id, job_id
         )
         INSERT INTO artifacts (id, job_id, task_id, kind, content_type, storage_key, bytes, sha256)
         SELECT gen_random_uuid(), job_id, id, 'text', 'text/markdown', 'jobs/' || job_id || '/text.md', 5,
                repeat('0', 64)
         FROM t",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE artifacts").execute(&pool).await.unwrap();
    // The statement the foreign key's cascade runs for each deleted task.
    let plan: Vec<String> = sqlx::query_scalar("EXPLAIN DELETE FROM ONLY artifacts WHERE task_id = 42")
        .fetch_all(&pool)
        .await
        .unwrap();
    let plan = plan.join("\n");
    assert!(plan.contains("artifacts_task_id"), "{plan}");
    assert!(!plan.contains("Seq Scan"), "{plan}");
}

/// Make a job `days` old as if it had been created then: a UUIDv7 id from
/// that time, and its timestamps moved back.
async fn backdate(pool: &PgPool, id: uuid::Uuid, days: i64) {
    let then = chrono::Utc::now() - chrono::Duration::days(days);
    // The job's own random bits keep two jobs backdated in one millisecond apart.
    let random: [u8; 10] = id.as_bytes()[6..].try_into().expect("16 - 6 bytes");
    let old_id =
        uuid::Builder::from_unix_timestamp_millis(then.timestamp_millis() as u64, &random).into_uuid();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO jobs SELECT $2, tenant, job_type, status, input, priority, idempotency_key, error,
                created_at - make_interval(days => $3), updated_at, started_at,
                finished_at - make_interval(days => $3), tasks_total, tasks_complete
         FROM jobs WHERE id = $1",
    )
    .bind(id)
    .bind(old_id)
    .bind(days as i32)
    .execute(&mut *tx)
    .await
    .unwrap();
    for table in ["job_tasks", "artifacts"] {
        sqlx::query(&format!("UPDATE {table} SET job_id = $2 WHERE job_id = $1"))
            .bind(id)
            .bind(old_id)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    sqlx::query("DELETE FROM jobs WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn silent_idle_replicas_are_forgotten_busy_ones_kept(pool: PgPool) {
    let q = queue(pool.clone());
    for id in ["idle", "busy"] {
        q.register_worker(&queue::NewWorker {
            id: id.into(),
            pool: None,
            task_types: vec![TaskType::TextGeneration],
            concurrency: 1,
            hostname: None,
            pid: None,
        })
        .await
        .unwrap();
    }
    q.enqueue(text_job("x")).await.unwrap();
    claim_one(&q, "busy", TaskType::TextGeneration).await;
    sqlx::query("UPDATE workers SET heartbeat_at = now() - interval '200 seconds'")
        .execute(&pool)
        .await
        .unwrap();
    let outcome = q.sweep(Duration::from_secs(600)).await.unwrap();
    assert_eq!(outcome.workers_removed, 0, "200 s is within 10 × stale-after");
    let outcome = q.sweep(Duration::from_secs(10)).await.unwrap();
    assert_eq!(outcome.workers_removed, 1, "200 s is past 10 × 10 s");
    let left: Vec<_> = q
        .workers(None)
        .await
        .unwrap()
        .into_iter()
        .map(|w| (w.id, w.in_flight))
        .collect();
    assert_eq!(
        left,
        vec![("busy".to_string(), 1)],
        "a replica holding a task is kept"
    );
}
