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
    assert_eq!(count(&pool, "all_jobs").await, 4);
    assert_eq!(count(&pool, "all_tasks").await, 4);
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
        count(&pool, "all_tasks").await,
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
async fn retention_finds_a_jobs_artifacts_through_an_index(pool: PgPool) {
    // No foreign key cascades from a job to its artifact records (the job
    // moves to history); retention deletes them by job id, and without an
    // index each of those deletes would read the whole artifacts table.
    sqlx::query(
        "WITH j AS (
             INSERT INTO job_history (id, tenant, job_type, status, input, finished_at)
             SELECT uuid_v7_floor(now() - interval '1 day' + g * interval '1 millisecond'),
                    'acme', 'text', 'complete', '{}', now()
             FROM generate_series(1, 5000) g
             RETURNING id
         ), t AS (
             INSERT INTO task_history (id, job_id, task_type, status, finished_at)
             SELECT nextval(pg_get_serial_sequence('job_tasks', 'id')), id, 'text_generation', 'complete', now()
             FROM j
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
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN DELETE FROM artifacts WHERE job_id = (SELECT id FROM job_history LIMIT 1)",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let plan = plan.join("\n");
    assert!(plan.contains("artifacts_one_per_kind"), "{plan}");
    assert!(!plan.contains("Seq Scan on artifacts"), "{plan}");
}

/// Make a job `days` old as if it had been created then: a UUIDv7 id from
/// that time, and its timestamps moved back. An open job stays open, a
/// finished one lands in the history partition of its new day.
async fn backdate(pool: &PgPool, id: uuid::Uuid, days: i64) -> uuid::Uuid {
    let then = chrono::Utc::now() - chrono::Duration::days(days);
    // The job's own random bits keep two jobs backdated in one millisecond apart.
    let random: [u8; 10] = id.as_bytes()[6..].try_into().expect("16 - 6 bytes");
    let old_id =
        uuid::Builder::from_unix_timestamp_millis(then.timestamp_millis() as u64, &random).into_uuid();
    let mut tx = pool.begin().await.unwrap();
    for (jobs, tasks) in [("jobs", "job_tasks"), ("job_history", "task_history")] {
        let statements = [
            format!(
                "INSERT INTO {jobs} SELECT $2, tenant, job_type, status, input, priority, idempotency_key, error,
                        created_at - make_interval(days => $3), updated_at, started_at,
                        finished_at - make_interval(days => $3), tasks_total, tasks_complete
                 FROM {jobs} WHERE id = $1"
            ),
            format!("UPDATE {tasks} SET job_id = $2 WHERE job_id = $1"),
            format!("DELETE FROM {jobs} WHERE id = $1"),
        ];
        for sql in statements {
            sqlx::query(&sql)
                .bind(id)
                .bind(old_id)
                .bind(days as i32)
                .execute(&mut *tx)
                .await
                .unwrap();
        }
    }
    for table in ["artifacts", "job_keys"] {
        sqlx::query(&format!("UPDATE {table} SET job_id = $2 WHERE job_id = $1"))
            .bind(id)
            .bind(old_id)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    old_id
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

/// The partition of history a job's row is in.
async fn partition_of(pool: &PgPool, id: uuid::Uuid) -> Option<String> {
    sqlx::query_scalar("SELECT tableoid::regclass::text FROM job_history WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
        .unwrap()
}

async fn finished_job(q: &queue::Queue, prompt: &str, key: &str) -> uuid::Uuid {
    let job = q
        .enqueue(text_job(prompt).idempotency_key(key))
        .await
        .unwrap()
        .job;
    let task = claim_one(q, "w", TaskType::TextGeneration).await;
    q.complete("w", task.lease(), json!({})).await.unwrap();
    job.id
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn retention_drops_a_whole_day_and_keeps_its_jobs_that_finished_late(pool: PgPool) {
    test_support::history_partitioned_since(&pool, 20).await;
    let q = queue(pool.clone());
    let old = finished_job(&q, "old", "k-old").await;
    let late = finished_job(&q, "late", "k-late").await;
    let recent = finished_job(&q, "recent", "k-recent").await;
    let open = q.enqueue(text_job("open")).await.unwrap().job.id;
    let old = backdate(&pool, old, 10).await;
    let late = backdate(&pool, late, 10).await;
    let open = backdate(&pool, open, 10).await;
    let day = partition_of(&pool, old).await.expect("the old job is in history");
    assert!(day.starts_with("job_history_2"), "a day's partition: {day}");
    // Created ten days ago, finished just now: younger than the age.
    sqlx::query("UPDATE job_history SET finished_at = now() WHERE id = $1")
        .bind(late)
        .execute(&pool)
        .await
        .unwrap();

    let week = Duration::from_secs(7 * 86400);
    let removed = q
        .prune(Retention {
            older_than: week,
            mode: RetentionMode::Delete,
            batch: 100,
        })
        .await
        .unwrap();
    assert_eq!(removed, 1, "only the old job");
    let gone: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(&day)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(gone, None, "the day's partition was dropped, not emptied");
    assert!(matches!(
        q.job(TENANT, old).await,
        Err(queue::QueueError::JobNotFound(_))
    ));
    assert_eq!(
        partition_of(&pool, late).await.as_deref(),
        Some("job_history_default"),
        "the job that finished late is kept, with its task"
    );
    assert_eq!(q.tasks_of(late).await.unwrap().len(), 1);
    assert_eq!(q.job(TENANT, open).await.unwrap().status, JobStatus::Queued);
    assert!(q.job(TENANT, recent).await.is_ok());
    let waiting = q.artifact_deletions(10).await.unwrap();
    assert_eq!(waiting, [format!("jobs/{old}/")], "the old job's bytes go");
    // Its key went with it: the same key makes a new job; the kept one's
    // still replays.
    let again = q.enqueue(text_job("old").idempotency_key("k-old")).await.unwrap();
    assert!(again.created && again.job.id != old);
    let replay = q
        .enqueue(text_job("late").idempotency_key("k-late"))
        .await
        .unwrap();
    assert_eq!((replay.created, replay.job.id), (false, late));

    // The open job of that day finishes after its day was dropped: its
    // row goes to DEFAULT, and row-by-row retention takes it later.
    let task = claim_one(&q, "w", TaskType::TextGeneration).await;
    assert_eq!(task.job_id, open);
    q.complete("w", task.lease(), json!({})).await.unwrap();
    assert_eq!(
        partition_of(&pool, open).await.as_deref(),
        Some("job_history_default")
    );
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_day_detached_by_a_run_that_stopped_is_dropped_by_the_next(pool: PgPool) {
    test_support::history_partitioned_since(&pool, 20).await;
    let q = queue(pool.clone());
    let old = finished_job(&q, "old", "k-old").await;
    let old = backdate(&pool, old, 10).await;
    let day = partition_of(&pool, old).await.unwrap();
    let task_day = day.replace("job_history_", "task_history_");
    // The first of the two transactions committed; the second never ran.
    for sql in [
        format!("ALTER TABLE job_history DETACH PARTITION {day}"),
        format!("ALTER TABLE task_history DETACH PARTITION {task_day}"),
    ] {
        sqlx::query(&sql).execute(&pool).await.unwrap();
    }
    let removed = q
        .prune(Retention {
            older_than: Duration::from_secs(30 * 86400),
            mode: RetentionMode::Delete,
            batch: 100,
        })
        .await
        .unwrap();
    assert_eq!(removed, 1, "the detached day is finished, whatever its age");
    let left: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(&task_day)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, None);
    assert_eq!(q.artifact_deletions(10).await.unwrap(), [format!("jobs/{old}/")]);
}
