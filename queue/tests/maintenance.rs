//! The sweeper and retention.

mod common;

use std::time::Duration;

use common::*;
use queue::{JobStatus, Retention, RetentionMode, TaskStatus, TaskType, VacuumOutcome};
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
        test_support::backdate(&pool, *id, 10).await;
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
    let mut old = None;
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
            old = Some(test_support::backdate(&pool, job.id, 10).await);
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
    // Its recorded object, and its whole folder: bytes an attempt stored
    // and never recorded go too. A job from before bytes went into day
    // folders also has its old folder. (backdate gave the job an older id.)
    let mut waiting = q.artifact_deletions(10).await.unwrap();
    waiting.sort();
    let old = old.unwrap();
    let mut expected = [
        format!("jobs/{old}/"),
        keys[0].clone(),
        queue::artifact_prefix(old),
    ];
    expected.sort();
    assert_eq!(
        waiting, expected,
        "the old job's bytes wait for the cleaner, not the recent one's"
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
    // The partition holding them (the others are empty).
    assert!(plan.contains("Index Scan using artifacts_before_"), "{plan}");
    assert!(!plan.contains("Seq Scan on artifacts_before"), "{plan}");
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

/// The partition of history a job's row is in: `job_history`'s, or, for a
/// job of one task that completed in its task's row, `task_history`'s.
async fn partition_of(pool: &PgPool, id: uuid::Uuid) -> Option<String> {
    sqlx::query_scalar(
        "SELECT tableoid::regclass::text FROM job_history WHERE id = $1
         UNION ALL
         SELECT tableoid::regclass::text FROM task_history WHERE job_id = $1 AND job_input IS NOT NULL",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
    .unwrap()
}

/// An artifact record for each of these jobs' tasks, in the job's folder.
async fn record_artifacts_of(pool: &PgPool, jobs: &[uuid::Uuid]) {
    sqlx::query(
        "INSERT INTO artifacts (id, job_id, task_id, kind, content_type, storage_key, bytes, sha256)
         SELECT gen_random_uuid(), job_id, id, 'text', 'text/markdown', artifact_prefix(job_id) || 'text.md',
                5, repeat('0', 64)
         FROM all_tasks WHERE job_id = ANY ($1)",
    )
    .bind(jobs)
    .execute(pool)
    .await
    .unwrap();
}

/// The jobs that have artifact records.
async fn artifact_records(pool: &PgPool) -> std::collections::HashSet<uuid::Uuid> {
    sqlx::query_scalar::<_, uuid::Uuid>("SELECT job_id FROM artifacts")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
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
    let forgotten = finished_job(&q, "forgotten", "k-forgotten").await;
    let late = finished_job(&q, "late", "k-late").await;
    let recent = finished_job(&q, "recent", "k-recent").await;
    let open = q.enqueue(text_job("open")).await.unwrap().job.id;
    let old = test_support::backdate(&pool, old, 10).await;
    let forgotten = test_support::backdate(&pool, forgotten, 10).await;
    let late = test_support::backdate(&pool, late, 10).await;
    let open = test_support::backdate(&pool, open, 10).await;
    record_artifacts_of(&pool, &[old, forgotten, late, open, recent]).await;
    let day = partition_of(&pool, old).await.expect("the old job is in history");
    assert!(day.starts_with("job_history_2"), "a day's partition: {day}");
    let artifacts_of_day = day.replace("job_history_", "artifacts_");
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
    assert_eq!(removed, 2, "only the old jobs");
    for table in [&day, &artifacts_of_day] {
        let gone: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(table)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(gone, None, "the day's partition was dropped, not emptied");
    }
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
    assert_eq!(
        artifact_records(&pool).await,
        [late, open, recent].into_iter().collect(),
        "the kept jobs of the day keep their artifact records"
    );
    // Nothing was queued job by job: the cleaner has the day.
    assert!(q.artifact_deletions(10).await.unwrap().is_empty());
    let retired = q.retired_days().await.unwrap();
    assert_eq!(retired.len(), 1);
    assert!(retired[0].delete_bytes);
    assert_eq!(
        retired[0].folder(),
        format!("jobs/{}/", &day["job_history_".len()..])
    );
    assert!(queue::artifact_prefix(old).starts_with(&retired[0].folder()));
    // Its jobs' keys are free before the cleaner forgets them: the same key
    // makes a new job; the kept job's key still replays.
    let again = q.enqueue(text_job("old").idempotency_key("k-old")).await.unwrap();
    assert!(again.created && again.job.id != old);
    let replay = q
        .enqueue(text_job("late").idempotency_key("k-late"))
        .await
        .unwrap();
    assert_eq!((replay.created, replay.job.id), (false, late));
    // The cleaner forgets the one key still naming a gone job.
    assert_eq!(q.forget_keys_of_retired_day(&retired[0], 1).await.unwrap(), 1);
    let keys: Vec<String> = sqlx::query_scalar("SELECT idempotency_key FROM job_keys ORDER BY 1")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(keys, ["k-late", "k-old", "k-recent"]);
    assert_eq!(
        q.jobs_kept(&[old, forgotten, late, open]).await.unwrap(),
        [late, open].into_iter().collect()
    );
    q.forget_retired_day(&retired[0]).await.unwrap();
    assert!(q.retired_days().await.unwrap().is_empty());

    // The open job of that day finishes after its day was dropped: its
    // row goes to DEFAULT, and row-by-row retention takes it later.
    let task = claim_one(&q, "w", TaskType::TextGeneration).await;
    assert_eq!(task.job_id, open);
    q.complete("w", task.lease(), json!({})).await.unwrap();
    assert_eq!(
        partition_of(&pool, open).await.as_deref(),
        Some("task_history_default")
    );
}

/// A job of one task enqueued without a key that completes stays one
/// history row, its task's (migration `20261213000001`): retention keeps
/// it when it finished late, archives it whole, and removes it with its
/// day, from DEFAULT and, under a day's age, row by row, as any job.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn retention_keeps_archives_and_drops_jobs_that_completed_in_their_task_rows(pool: PgPool) {
    test_support::history_partitioned_since(&pool, 20).await;
    let q = queue(pool.clone());
    let mut finished = Vec::new();
    for prompt in ["old", "late"] {
        q.enqueue(text_job(prompt)).await.unwrap();
        let task = claim_one(&q, "w", TaskType::TextGeneration).await;
        q.complete("w", task.lease(), json!({ "text": prompt }))
            .await
            .unwrap();
        finished.push(test_support::backdate(&pool, task.job_id, 10).await);
    }
    let [old, late] = finished[..] else { unreachable!() };
    assert_eq!(count(&pool, "job_history").await, 0, "both are task rows");
    record_artifacts_of(&pool, &[old, late]).await;
    let day = partition_of(&pool, old).await.expect("the old job is in history");
    assert!(day.starts_with("task_history_2"), "a day's partition: {day}");
    // Created ten days ago, finished just now: younger than the age.
    test_support::finished_days_ago(&pool, late, 0).await;

    let week = Duration::from_secs(7 * 86400);
    let archive = |older_than, batch| Retention {
        older_than,
        mode: RetentionMode::Archive,
        batch,
    };
    assert_eq!(q.prune(archive(week, 100)).await.unwrap(), 1, "only the old job");
    assert!(matches!(
        q.job(TENANT, old).await,
        Err(queue::QueueError::JobNotFound(_))
    ));
    let archived: (String, String, serde_json::Value, serde_json::Value, i32, i32) = sqlx::query_as(
        "SELECT tenant, status, job->'input', tasks->0->'output',
                jsonb_array_length(tasks), jsonb_array_length(artifacts)
         FROM jobs_archive WHERE id = $1",
    )
    .bind(old)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        archived,
        (
            TENANT.to_string(),
            "complete".into(),
            json!({"prompt": "old"}),
            json!({"text": "old"}),
            1,
            1
        ),
        "archived whole: the job, its task and its artifact"
    );
    assert_eq!(
        partition_of(&pool, late).await.as_deref(),
        Some("task_history_default"),
        "the job that finished late is kept"
    );
    let kept = q.job_with_tasks(TENANT, late).await.unwrap();
    assert_eq!(kept.job.status, JobStatus::Complete);
    assert_eq!(kept.tasks[0].output, Some(json!({ "text": "late" })));
    assert_eq!(artifact_records(&pool).await, [late].into_iter().collect());

    // Old enough now: DEFAULT is pruned row by row.
    test_support::finished_days_ago(&pool, late, 8).await;
    assert_eq!(q.prune(archive(week, 100)).await.unwrap(), 1);
    assert!(q.job(TENANT, late).await.is_err());
    assert_eq!(count(&pool, "task_history").await, 0);
    assert!(artifact_records(&pool).await.is_empty());

    // Under a day's age, history is pruned row by row: both kinds of job,
    // one of each a statement.
    let keyed = finished_job(&q, "keyed", "k-keyed").await;
    q.enqueue(text_job("keyless")).await.unwrap();
    let task = claim_one(&q, "w", TaskType::TextGeneration).await;
    q.complete("w", task.lease(), json!({})).await.unwrap();
    for id in [keyed, task.job_id] {
        test_support::backdate(&pool, id, 2).await;
    }
    let removed = q
        .prune(Retention {
            older_than: Duration::from_secs(3600),
            mode: RetentionMode::Delete,
            batch: 1,
        })
        .await
        .unwrap();
    assert_eq!(removed, 2);
    assert_eq!(count(&pool, "all_jobs").await, 0);
    assert_eq!(count(&pool, "all_tasks").await, 0);
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_day_detached_by_a_run_that_stopped_is_dropped_by_the_next(pool: PgPool) {
    test_support::history_partitioned_since(&pool, 20).await;
    let q = queue(pool.clone());
    let old = finished_job(&q, "old", "k-old").await;
    let old = test_support::backdate(&pool, old, 10).await;
    let day = partition_of(&pool, old).await.unwrap();
    let task_day = day.replace("job_history_", "task_history_");
    let artifacts_day = day.replace("job_history_", "artifacts_");
    // The first of the two transactions committed; the second never ran.
    for sql in [
        format!("ALTER TABLE job_history DETACH PARTITION {day}"),
        format!("ALTER TABLE task_history DETACH PARTITION {task_day}"),
        format!("ALTER TABLE artifacts DETACH PARTITION {artifacts_day}"),
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
    for table in [&task_day, &artifacts_day] {
        let left: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(table)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(left, None);
    }
    assert!(q.artifact_deletions(10).await.unwrap().is_empty());
    let retired = q.retired_days().await.unwrap();
    assert!(retired.len() == 1 && queue::artifact_prefix(old).starts_with(&retired[0].folder()));
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_jobs_folder_is_the_same_in_rust_and_in_sql(pool: PgPool) {
    let at = |rfc3339: &str| {
        let millis = chrono::DateTime::parse_from_rfc3339(rfc3339)
            .unwrap()
            .timestamp_millis();
        uuid::Builder::from_unix_timestamp_millis(millis as u64, &[0xab; 10]).into_uuid()
    };
    let ids = [
        at("2026-12-04T23:59:59.999Z"),
        at("2026-12-05T00:00:00.000Z"),
        uuid::Uuid::now_v7(),
        // A UUIDv1: no day of its own.
        "6ba7b810-9dad-11d1-80b4-00c04fd430c8".parse().unwrap(),
    ];
    let in_sql: Vec<String> = sqlx::query_scalar("SELECT artifact_prefix(id) FROM unnest($1::uuid[]) AS id")
        .bind(&ids[..])
        .fetch_all(&pool)
        .await
        .unwrap();
    let in_rust: Vec<String> = ids.iter().map(|id| queue::artifact_prefix(*id)).collect();
    assert_eq!(in_sql, in_rust);
    assert!(in_rust[0].starts_with("jobs/20261204/") && in_rust[1].starts_with("jobs/20261205/"));
    assert_eq!(in_rust[3], "jobs/6ba7b810-9dad-11d1-80b4-00c04fd430c8/");
}

/// Today's and the next two days' suffixes, `YYYYMMDD`, by the database's
/// clock.
async fn coming_days(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT to_char(current_date + i, 'YYYYMMDD') FROM generate_series(0, 2) i ORDER BY i")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn the_coming_days_get_their_partitions_and_a_day_already_in_default_is_left_there(pool: PgPool) {
    let q = queue(pool.clone());
    let days = coming_days(&pool).await;
    // A database whose partitions ran out: none for today or after.
    for day in &days {
        for table in ["job_history", "task_history", "artifacts"] {
            sqlx::query(&format!("DROP TABLE IF EXISTS {table}_{day}"))
                .execute(&pool)
                .await
                .unwrap();
        }
    }
    // Meanwhile a job of today finished into the DEFAULT partition.
    let early = finished_job(&q, "early", "early").await;
    assert_eq!(
        partition_of(&pool, early).await.as_deref(),
        Some("job_history_default")
    );

    let created = q.create_history_partitions().await.unwrap();
    assert_eq!(
        created,
        days[1..],
        "today's rows stay in DEFAULT; the next days get theirs"
    );
    for table in ["job_history", "task_history", "artifacts"] {
        for day in &days[1..] {
            let partition: Option<String> = sqlx::query_scalar(
                "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                 WHERE i.inhparent = $1::regclass AND c.relname = $2",
            )
            .bind(table)
            .bind(format!("{table}_{day}"))
            .fetch_optional(&pool)
            .await
            .unwrap();
            assert!(partition.is_some(), "{table}_{day}");
        }
    }
    assert!(
        q.create_history_partitions().await.unwrap().is_empty(),
        "a second run creates nothing"
    );

    // Once today's DEFAULT rows are gone, today gets its partition too and
    // today's next finished job lands in it.
    sqlx::raw_sql("DELETE FROM artifacts; DELETE FROM task_history; DELETE FROM job_history")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(q.create_history_partitions().await.unwrap(), days[..1]);
    let later = finished_job(&q, "later", "later").await;
    assert_eq!(
        partition_of(&pool, later).await,
        Some(format!("job_history_{}", days[0]))
    );
}

/// History takes rows the open tables have already checked, and does not
/// check them again (migration `20261212000001`): on history and every
/// partition of it, those of the coming days made after the migration too,
/// the one CHECK left is that a job there is finished, and it still holds.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn history_checks_only_that_its_jobs_are_finished(pool: PgPool) {
    let q = queue(pool.clone());
    let days = coming_days(&pool).await;
    for day in &days[1..] {
        sqlx::raw_sql(&format!(
            "DROP TABLE job_history_{day}; DROP TABLE task_history_{day}; DROP TABLE artifacts_{day}"
        ))
        .execute(&pool)
        .await
        .unwrap();
    }
    assert_eq!(q.create_history_partitions().await.unwrap(), days[1..]);

    let checks: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT c.relname::text, k.conname::text
         FROM pg_class c LEFT JOIN pg_constraint k ON k.conrelid = c.oid AND k.contype = 'c'
         WHERE c.oid IN ('job_history'::regclass, 'task_history'::regclass)
            OR c.oid IN (SELECT inhrelid FROM pg_inherits
                         WHERE inhparent IN ('job_history'::regclass, 'task_history'::regclass))
         ORDER BY 1, 2",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for day in &days[1..] {
        for table in ["job_history", "task_history"] {
            let partition = format!("{table}_{day}");
            assert!(
                checks.iter().any(|(relation, _)| *relation == partition),
                "{partition} is among those read"
            );
        }
    }
    for (relation, check) in &checks {
        let expected = relation
            .starts_with("job_history")
            .then_some("job_history_finished");
        assert_eq!(
            check.as_deref(),
            expected,
            "{relation}: a job in history is finished, and nothing else is checked again"
        );
    }

    let unfinished = sqlx::query(
        "INSERT INTO job_history (id, tenant, job_type, status, input)
         VALUES (uuid_v7_floor(now()), 'acme', 'text', 'queued', '{}')",
    )
    .execute(&pool)
    .await
    .unwrap_err();
    assert_eq!(
        unfinished.as_database_error().and_then(|e| e.constraint()),
        Some("job_history_finished"),
        "{unfinished}"
    );
}

/// `task_types()` (what the in-flight reads name so they skip the backlog)
/// must hold every task type: a type left out would never be swept, and a
/// replica holding only such tasks would look idle to the drain step.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn task_types_in_sql_are_the_task_types_the_check_allows(pool: PgPool) {
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let in_sql: Vec<String> = sqlx::query_scalar("SELECT unnest(task_types())")
        .fetch_all(&pool)
        .await
        .unwrap();
    let known: Vec<String> = TaskType::ALL.iter().map(|t| t.as_str().to_string()).collect();
    assert_eq!(in_sql, known);
    let in_check: Vec<String> = sqlx::query_scalar(
        "SELECT m[1] FROM pg_constraint c,
                regexp_matches(pg_get_constraintdef(c.oid), '''([a-z_]+)''', 'g') AS m
         WHERE c.conrelid = 'job_tasks'::regclass AND c.conname = 'job_tasks_task_type_check'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        sorted(in_check),
        sorted(known),
        "the literals of job_tasks' task type CHECK"
    );
}

/// The sweeper (its first look, and its cleanup of silent replicas), the
/// controller's read of busy replicas, the registry's list and the drain
/// step (registered replicas and placeholders) read the tasks in flight,
/// not the backlog: with 40,000 pending tasks and two in flight, each
/// touches a few pages of the open-task index (a few per type and status,
/// for each replica asked about), where naming only the status walked all
/// of it.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn reads_of_in_flight_tasks_skip_the_backlog(pool: PgPool) {
    sqlx::query("ALTER TABLE job_tasks SET (autovacuum_enabled = off)")
        .execute(&pool)
        .await
        .unwrap();
    let Some(one) = one_connection_with_statistics(&pool).await else {
        return;
    };
    let q = queue(one.clone());
    q.enqueue_batch(vec![text_job("a"), text_job("b")]).await.unwrap();
    // Processing, as the worker runtime's claims are: that status sorts
    // after pending in the index, so a read that stops at its first
    // in-flight entry still walks the backlog's before it.
    for worker in ["busy-1", "busy-2"] {
        let taken = q
            .claim_and_start(worker, &[TaskType::TextGeneration], 1)
            .await
            .unwrap();
        assert_eq!(taken.len(), 1);
    }
    // busy-1 silent long enough for the sweep's cleanup to ask whether it
    // holds a task (it does, so it stays).
    sqlx::query(
        "UPDATE workers SET heartbeat_at = now() - interval '1 hour', last_claim_at = now() - interval '1 hour'
         WHERE id = 'busy-1'",
    )
    .execute(&one)
    .await
    .unwrap();
    // The backlog straight in SQL, each task due at a time of its own (as
    // retries are), so the index cannot fold their entries together.
    sqlx::query(
        "WITH j AS (INSERT INTO jobs (id, tenant, job_type, input, tasks_total)
                    SELECT gen_random_uuid(), 'acme', 'text', '{}', 1 FROM generate_series(1, 40000)
                    RETURNING id)
         INSERT INTO job_tasks (job_id, task_type, run_at)
         SELECT id, 'text_generation', now() - random() * interval '10 minutes' FROM j",
    )
    .execute(&one)
    .await
    .unwrap();
    sqlx::query("ANALYZE job_tasks").execute(&one).await.unwrap();
    let index_pages: i64 = sqlx::query_scalar("SELECT pg_relation_size('job_tasks_active') / 8192")
        .fetch_one(&one)
        .await
        .unwrap();
    assert!(
        index_pages >= 200,
        "the backlog's index holds {index_pages} pages"
    );

    let pages_read = || async {
        flush_statistics(&one).await;
        sqlx::query_scalar::<_, i64>(
            "SELECT idx_blks_hit + idx_blks_read FROM pg_statio_user_indexes
             WHERE indexrelname = 'job_tasks_active'",
        )
        .fetch_one(&one)
        .await
        .unwrap()
    };
    let mut before = pages_read().await;
    let mut read = |what: &str, after: i64| {
        let pages = after - before;
        before = after;
        assert!(
            pages * 4 < index_pages,
            "{what} read {pages} of the open-task index's {index_pages} pages"
        );
    };
    let swept = q.sweep(STALE).await.unwrap();
    assert!(swept.tasks.is_empty());
    assert_eq!(swept.workers_removed, 0, "busy-1 holds a task");
    read("the sweep", pages_read().await);
    assert_eq!(q.busy_replicas().await.unwrap().len(), 2);
    read("busy replicas", pages_read().await);
    assert_eq!(q.workers(None).await.unwrap().len(), 2);
    read("the registry's list", pages_read().await);
    let drained = q
        .drain_idle(&[
            "busy-1".to_string(),
            "busy-2".to_string(),
            "starting-3".to_string(),
        ])
        .await
        .unwrap();
    assert_eq!(
        drained,
        ["starting-3"],
        "only the replica not registered yet, as a placeholder"
    );
    read("the drain step", pages_read().await);
}

/// A claim starts reading at the head of the claim index, where the tasks
/// already taken left their dead entries; the vacuumer clears them once
/// enough rows are dead, so a claim reads a few pages again instead of
/// one more for every 150 or so tasks taken since the last vacuum.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn the_vacuumer_clears_what_claims_left_at_the_head_of_the_line(pool: PgPool) {
    sqlx::query("ALTER TABLE job_tasks SET (autovacuum_enabled = off)")
        .execute(&pool)
        .await
        .unwrap();
    let Some(one) = one_connection_with_statistics(&pool).await else {
        return;
    };
    let q = queue(one.clone());
    for batch in 0..21 {
        q.enqueue_batch((0..1000).map(|i| text_job(&format!("{batch}-{i}"))).collect())
            .await
            .unwrap();
    }
    for _ in 0..40 {
        let held = q.claim("w", &[TaskType::TextGeneration], 500).await.unwrap();
        let results: Vec<_> = held.iter().map(|t| (t.lease(), json!(null))).collect();
        assert_eq!(q.complete_batch("w", &results).await.unwrap().len(), 500);
    }
    let pages_read_by_a_claim = || async {
        flush_statistics(&one).await;
        let read = "SELECT idx_blks_hit + idx_blks_read FROM pg_statio_user_indexes
                    WHERE indexrelname = 'job_tasks_runnable'";
        let before: i64 = sqlx::query_scalar(read).fetch_one(&one).await.unwrap();
        let held = q.claim("w", &[TaskType::TextGeneration], 1).await.unwrap();
        assert_eq!(held.len(), 1);
        let results = [(held[0].lease(), json!(null))];
        q.complete_batch("w", &results).await.unwrap();
        flush_statistics(&one).await;
        let after: i64 = sqlx::query_scalar(read).fetch_one(&one).await.unwrap();
        after - before
    };

    let walked = pages_read_by_a_claim().await;
    assert!(
        walked > 50,
        "a claim behind 20,000 taken tasks read {walked} pages"
    );

    let too_few = q.vacuum_tasks(1_000_000, 0).await.unwrap();
    assert_eq!(too_few.outcome, VacuumOutcome::NotNeeded, "{too_few:?}");
    assert!(too_few.dead_rows >= 20_000, "{too_few:?}");
    assert!(pages_read_by_a_claim().await > 50, "nothing vacuumed yet");

    // A role that does not own the table is told so, and nothing is sent
    // for PostgreSQL to refuse; once it owns the database, it may vacuum.
    let role = format!("backlog_not_owner_{}", uuid::Uuid::new_v4().simple());
    let (database, owner): (String, String) = sqlx::query_as(
        "SELECT datname::text, datdba::regrole::text FROM pg_database WHERE datname = current_database()",
    )
    .fetch_one(&one)
    .await
    .unwrap();
    let run = |sql: String| {
        let one = one.clone();
        async move { sqlx::query(&sql).execute(&one).await.unwrap() }
    };
    run(format!("CREATE ROLE {role}")).await;
    run(format!("SET ROLE {role}")).await;
    let refused = q.vacuum_tasks(10_000, 0).await;
    run("RESET ROLE".into()).await;
    run(format!("ALTER DATABASE \"{database}\" OWNER TO {role}")).await;
    run(format!("SET ROLE {role}")).await;
    let vacuumed = q.vacuum_tasks(10_000, 0).await;
    run("RESET ROLE".into()).await;
    run(format!("ALTER DATABASE \"{database}\" OWNER TO {owner}")).await;
    run(format!("DROP ROLE {role}")).await;
    assert_eq!(refused.unwrap().outcome, VacuumOutcome::NotAllowed);
    let vacuumed = vacuumed.unwrap();
    assert_eq!(
        vacuumed.outcome,
        VacuumOutcome::Vacuumed,
        "the database's owner: {vacuumed:?}"
    );
    let read = pages_read_by_a_claim().await;
    assert!(read < 10, "a claim after the vacuum read {read} pages");
    // What is left is what was not taken, by those three claims of one.
    assert_eq!(count(&pool, "job_tasks").await, 1000 - 3);

    // Rows a long transaction still sees stay dead through a vacuum; they
    // do not make the next look vacuum again, only as many more do.
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *holder)
        .await
        .unwrap();
    sqlx::query("SELECT count(*) FROM job_tasks")
        .execute(&mut *holder)
        .await
        .unwrap();
    let held = q.claim("w", &[TaskType::TextGeneration], 997).await.unwrap();
    let results: Vec<_> = held.iter().map(|t| (t.lease(), json!(null))).collect();
    assert_eq!(q.complete_batch("w", &results).await.unwrap().len(), 997);
    flush_statistics(&one).await;
    let kept = q.vacuum_tasks(1_000, vacuumed.dead_rows).await.unwrap();
    assert_eq!(kept.outcome, VacuumOutcome::Vacuumed, "{kept:?}");
    assert!(kept.dead_rows >= 1_000, "the held rows are still dead: {kept:?}");
    let again = q.vacuum_tasks(1_000, kept.dead_rows).await.unwrap();
    assert_eq!(again.outcome, VacuumOutcome::NotNeeded, "{again:?}");
    holder.rollback().await.unwrap();
}
