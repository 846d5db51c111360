//! Upgrades: a database filled by the first release's schema and functions,
//! migrated to this one, keeps every job, task, output, artifact and live
//! lease, and the queue then runs all of it to the end.
//!
//! Several migrations rewrite rows (the lease counter `claims`, the place in
//! line `fair_at`, the jobs' task counters the completion's fast path trusts,
//! `has_dependents`); these tests are what would catch one of them losing
//! or mis-deriving a row.

mod common;

use std::borrow::Cow;
use std::time::Duration;

use common::*;
use queue::{JobStatus, Lease, QueueError, TaskStatus, TaskType};
use serde_json::json;
use sqlx::migrate::Migrator;
use sqlx::PgPool;
use uuid::Uuid;

/// The last migration of the first release.
const FIRST_RELEASE: i64 = 20261128000003;

/// The jobs of the filled database, each left in one state by the first
/// release's own functions (`claim_tasks`, `complete_tasks`, `fail_task`
/// with attempt numbers as leases). Priorities order the claims below.
const QUEUED: &str = "00000000-0000-7000-8000-000000000001";
const HELD: &str = "00000000-0000-7000-8000-000000000002";
const COMPLETE: &str = "00000000-0000-7000-8000-000000000003";
const HALF_READ: &str = "00000000-0000-7000-8000-000000000004";
const FAILED: &str = "00000000-0000-7000-8000-000000000005";
const BACKING_OFF: &str = "00000000-0000-7000-8000-000000000006";
const ABANDONED: &str = "00000000-0000-7000-8000-000000000007";
const CANCELLED: &str = "00000000-0000-7000-8000-000000000008";
const OTHER_TENANT: &str = "00000000-0000-7000-8000-000000000009";

/// Written against the first release's schema; `claim_tasks` there claims
/// the highest priority first, so each claim below takes the intended job.
const FILL_FIRST_RELEASE: &str = r#"
INSERT INTO jobs (id, tenant, job_type, input, priority) VALUES
    ('00000000-0000-7000-8000-000000000001', 'acme', 'text', '{"prompt": "queued"}', 0),
    ('00000000-0000-7000-8000-000000000002', 'acme', 'text', '{"prompt": "held"}', 9),
    ('00000000-0000-7000-8000-000000000003', 'acme', 'text', '{"prompt": "complete"}', 8),
    ('00000000-0000-7000-8000-000000000004', 'acme', 'reading', '{"prompt": "half read", "title": "T"}', 7),
    ('00000000-0000-7000-8000-000000000005', 'acme', 'text', '{"prompt": "failed"}', 6),
    ('00000000-0000-7000-8000-000000000006', 'acme', 'text', '{"prompt": "backing off"}', 5),
    ('00000000-0000-7000-8000-000000000007', 'acme', 'text', '{"prompt": "abandoned"}', 4),
    ('00000000-0000-7000-8000-000000000008', 'acme', 'reading', '{"prompt": "cancelled", "title": "T"}', 0),
    ('00000000-0000-7000-8000-000000000009', 'globex', 'text', '{"prompt": "other tenant"}', 0);

INSERT INTO job_tasks (job_id, task_type, dependencies, waiting_on, priority, max_attempts)
SELECT j.id, p.task_type, p.dependencies, cardinality(p.dependencies), j.priority,
       CASE WHEN j.input->>'prompt' = 'failed' THEN 1 ELSE 5 END
FROM jobs j
CROSS JOIN LATERAL (VALUES ('text_generation', '{}'::text[]),
                           ('pdf_generation', '{text_generation}'),
                           ('audio_generation', '{text_generation}')) AS p(task_type, dependencies)
WHERE j.job_type = 'reading' OR p.task_type = 'text_generation'
ORDER BY j.id, p.task_type;

-- Held by a live worker, lease attempt 1.
SELECT count(*) FROM claim_tasks('w-live', '{text_generation}', 1);
-- Completed, with an artifact.
SELECT count(*) FROM claim_tasks('w-old', '{text_generation}', 1);
SELECT complete_tasks('w-old', ARRAY[t.id], ARRAY[1], ARRAY['{"text": "done"}'::jsonb])
FROM job_tasks t WHERE t.job_id = '00000000-0000-7000-8000-000000000003';
INSERT INTO artifacts (id, job_id, task_id, kind, content_type, storage_key, bytes, sha256)
SELECT '00000000-0000-7000-8000-0000000000a3', t.job_id, t.id, 'text', 'text/plain; charset=utf-8',
       'jobs/complete/text.txt', 4, repeat('ab', 32)
FROM job_tasks t WHERE t.job_id = '00000000-0000-7000-8000-000000000003';
-- A reading job whose text is done: its pdf and audio tasks are runnable.
SELECT count(*) FROM claim_tasks('w-old', '{text_generation}', 1);
SELECT complete_tasks('w-old', ARRAY[t.id], ARRAY[1], ARRAY['{"text": "read me"}'::jsonb])
FROM job_tasks t WHERE t.job_id = '00000000-0000-7000-8000-000000000004' AND t.task_type = 'text_generation';
-- Out of attempts: failed.
SELECT count(*) FROM claim_tasks('w-old', '{text_generation}', 1);
SELECT fail_task('w-old', t.id, 1, 'provider said no', true, 10, 3600)
FROM job_tasks t WHERE t.job_id = '00000000-0000-7000-8000-000000000005';
-- Failed once, retrying after a backoff.
SELECT count(*) FROM claim_tasks('w-old', '{text_generation}', 1);
SELECT fail_task('w-old', t.id, 1, 'provider busy', true, 10, 3600)
FROM job_tasks t WHERE t.job_id = '00000000-0000-7000-8000-000000000006';
-- Held by a worker that died an hour ago.
SELECT count(*) FROM claim_tasks('w-dead', '{text_generation}', 1);
UPDATE job_tasks SET heartbeat_at = now() - interval '1 hour', claimed_at = now() - interval '1 hour'
WHERE job_id = '00000000-0000-7000-8000-000000000007';
-- Cancelled as the first release's API did.
UPDATE job_tasks SET status = 'cancelled', finished_at = now(), updated_at = now(), last_error = 'cancelled'
WHERE job_id = '00000000-0000-7000-8000-000000000008';
UPDATE jobs SET status = 'cancelled', finished_at = now(), updated_at = now()
WHERE id = '00000000-0000-7000-8000-000000000008';
-- Created with an idempotency key.
UPDATE jobs SET idempotency_key = 'the-complete-one' WHERE id = '00000000-0000-7000-8000-000000000003';
"#;

type TaskRow = (
    i64,
    Uuid,
    String,
    String,
    i32,
    Option<serde_json::Value>,
    Option<String>,
);

/// Every job and task, open or (once history exists) finished.
async fn jobs_and_tasks(pool: &PgPool) -> (Vec<(Uuid, String, String)>, Vec<TaskRow>) {
    let history: bool = sqlx::query_scalar("SELECT to_regclass('all_jobs') IS NOT NULL")
        .fetch_one(pool)
        .await
        .unwrap();
    let (jobs, tasks) = if history {
        ("all_jobs", "all_tasks")
    } else {
        ("jobs", "job_tasks")
    };
    let jobs = sqlx::query_as(&format!("SELECT id, tenant, status FROM {jobs} ORDER BY id"))
        .fetch_all(pool)
        .await
        .unwrap();
    let tasks = sqlx::query_as(&format!(
        "SELECT id, job_id, task_type, status, attempts, output, claimed_by FROM {tasks} ORDER BY id"
    ))
    .fetch_all(pool)
    .await
    .unwrap();
    (jobs, tasks)
}

async fn migrate_to(pool: &PgPool, last: i64) {
    // sqlx builds a Migrator from a folder or `migrate!()` only; its fields
    // are public (for that macro) and pinned by Cargo.lock.
    let earlier = Migrator {
        migrations: Cow::Owned(
            queue::MIGRATOR
                .iter()
                .filter(|m| m.version <= last)
                .cloned()
                .collect(),
        ),
        ignore_missing: false,
        locking: true,
        no_tx: false,
    };
    earlier.run(pool).await.expect("the earlier release's migrations");
}

/// A database of the first release, filled and then migrated to this one.
async fn upgraded_database(pool: &PgPool) -> (Vec<(Uuid, String, String)>, Vec<TaskRow>) {
    migrate_to(pool, FIRST_RELEASE).await;
    sqlx::raw_sql(FILL_FIRST_RELEASE)
        .execute(pool)
        .await
        .expect("fill");
    let before = jobs_and_tasks(pool).await;
    queue::MIGRATOR.run(pool).await.expect("upgrade to this release");
    before
}

fn job(id: &str) -> Uuid {
    id.parse().unwrap()
}

/// The live worker of the first release finishes the task it held.
async fn complete_held_task(q: &queue::Queue, pool: &PgPool) -> queue::Result<()> {
    let held = task_of(pool, HELD, TaskType::TextGeneration).await;
    let lease = Lease {
        task_id: held,
        job_id: job(HELD),
        claim: 1,
    };
    q.complete("w-live", lease, json!({ "text": "late but fine" }))
        .await
}

async fn task_of(pool: &PgPool, job_id: &str, task_type: TaskType) -> i64 {
    sqlx::query_scalar("SELECT id FROM all_tasks WHERE job_id = $1 AND task_type = $2")
        .bind(job(job_id))
        .bind(task_type.as_str())
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrations = false)]
async fn an_upgrade_keeps_every_job_task_output_and_artifact(pool: PgPool) {
    let before = upgraded_database(&pool).await;
    let after = jobs_and_tasks(&pool).await;
    assert_eq!(after, before, "jobs and tasks as the first release left them");

    // Finished jobs moved to history with all their tasks; open ones, and
    // their tasks however many finished, stayed.
    let finished: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM job_history ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(finished, [job(COMPLETE), job(FAILED), job(CANCELLED)]);
    let moved: Vec<Uuid> = sqlx::query_scalar("SELECT job_id FROM task_history ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(
        moved,
        [
            job(COMPLETE),
            job(FAILED),
            job(CANCELLED),
            job(CANCELLED),
            job(CANCELLED)
        ]
    );
    assert_eq!(count(&pool, "jobs").await, 6);
    assert_eq!(
        count(&pool, "job_tasks").await,
        8,
        "the half-read job keeps its finished text task"
    );
    // The key moved to job_keys: a replay finds the finished job.
    let q = queue(pool.clone());
    let replay = q
        .enqueue(
            text_job("complete")
                .priority(8)
                .idempotency_key("the-complete-one"),
        )
        .await
        .unwrap();
    assert_eq!((replay.job.id, replay.created), (job(COMPLETE), false));
    let statuses: Vec<&str> = before.0.iter().map(|(_, _, s)| s.as_str()).collect();
    assert_eq!(
        statuses,
        [
            "queued",
            "processing",
            "complete",
            "processing",
            "failed",
            "processing",
            "processing",
            "cancelled",
            "queued"
        ],
        "the fill left each job in its state"
    );

    // The completion's fast path trusts these counters.
    let counters: Vec<(i32, i32)> =
        sqlx::query_as("SELECT tasks_total, tasks_complete FROM all_jobs ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        counters,
        [
            (1, 0),
            (1, 0),
            (1, 1),
            (3, 1),
            (1, 0),
            (1, 0),
            (1, 0),
            (3, 0),
            (1, 0)
        ]
    );
    let with_dependents: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT job_id, task_type FROM all_tasks WHERE has_dependents ORDER BY job_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        with_dependents,
        [
            (job(HALF_READ), "text_generation".to_string()),
            (job(CANCELLED), "text_generation".to_string())
        ]
    );

    let q = queue(pool.clone());
    let artifacts = q.artifacts_of(job(COMPLETE)).await.unwrap();
    assert_eq!(artifacts.len(), 1);
    assert_eq!(artifacts[0].storage_key, "jobs/complete/text.txt");
    assert_eq!(
        q.task_output(job(HALF_READ), TaskType::TextGeneration)
            .await
            .unwrap(),
        Some(json!({ "text": "read me" })),
        "the pdf and audio tasks still find the text they render"
    );
    assert!(q.repair_stuck_jobs().await.unwrap().is_empty());
}

#[sqlx::test(migrations = false)]
async fn leases_of_the_first_release_hold_or_die_as_they_did(pool: PgPool) {
    upgraded_database(&pool).await;
    let q = queue(pool.clone());

    // A live lease (attempt 1 then) is claim 1 now: its worker finishes.
    complete_held_task(&q, &pool)
        .await
        .expect("a lease held across the upgrade completes");
    assert_eq!(q.job_by_id(job(HELD)).await.unwrap().status, JobStatus::Complete);

    // The dead worker's task is swept back; its old lease stays dead.
    let abandoned = task_of(&pool, ABANDONED, TaskType::TextGeneration).await;
    let swept = q.sweep(Duration::from_secs(30)).await.unwrap();
    assert_eq!(
        swept
            .tasks
            .iter()
            .map(|t| (t.task_id, t.status))
            .collect::<Vec<_>>(),
        [(abandoned, TaskStatus::Pending)]
    );

    // A failed task retried and claimed again, by the same worker id, gets a
    // lease no attempt number of the first release can name.
    let failed = task_of(&pool, FAILED, TaskType::TextGeneration).await;
    assert_eq!(
        q.retry_job("acme", job(FAILED)).await.unwrap().status,
        JobStatus::Queued
    );
    make_retries_due(&pool).await;
    let mut claimed = Vec::new();
    loop {
        let batch = q.claim("w-old", &[TaskType::TextGeneration], 10).await.unwrap();
        if batch.is_empty() {
            break;
        }
        claimed.extend(batch);
    }
    let again = claimed
        .iter()
        .find(|t| t.id == failed)
        .expect("the retried task is claimed");
    for stale in [1, 2] {
        let refused = q
            .complete(
                "w-old",
                Lease {
                    task_id: failed,
                    job_id: job(FAILED),
                    claim: stale,
                },
                json!({ "text": "stale" }),
            )
            .await;
        assert!(
            matches!(refused, Err(QueueError::LeaseLost { .. })),
            "claim {stale} of a task now held as claim {}: {refused:?}",
            again.claims
        );
    }
    let old_abandoned = q
        .complete(
            "w-dead",
            Lease {
                task_id: abandoned,
                job_id: job(ABANDONED),
                claim: 1,
            },
            json!({ "text": "zombie" }),
        )
        .await;
    assert!(
        matches!(old_abandoned, Err(QueueError::LeaseLost { .. })),
        "{old_abandoned:?}"
    );
}

#[sqlx::test(migrations = false)]
async fn after_an_upgrade_every_open_job_runs_to_the_end(pool: PgPool) {
    upgraded_database(&pool).await;
    let q = queue(pool.clone());

    // The retry in backoff kept its place behind its run_at.
    let behind: bool =
        sqlx::query_scalar("SELECT fair_at >= run_at AND run_at > now() FROM job_tasks WHERE job_id = $1")
            .bind(job(BACKING_OFF))
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(behind, "a scheduled retry is not claimable before its run_at");
    let in_line: bool = sqlx::query_scalar("SELECT fair_at = run_at FROM job_tasks WHERE job_id = $1")
        .bind(job(QUEUED))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(in_line, "a queued task's place in line is its run_at");
    assert_eq!(q.job("globex", job(OTHER_TENANT)).await.unwrap().tenant, "globex");
    assert!(
        matches!(
            q.job("acme", job(OTHER_TENANT)).await,
            Err(QueueError::JobNotFound(_))
        ),
        "tenants still do not see each other's jobs"
    );
    let text = q
        .depth()
        .await
        .unwrap()
        .into_iter()
        .find(|d| d.task_type == TaskType::TextGeneration)
        .unwrap();
    assert_eq!(
        (text.pending, text.scheduled, text.in_flight),
        (2, 1, 2),
        "queued ×2, the retry, held ×2: {text:?}"
    );

    q.sweep(Duration::from_secs(30)).await.unwrap();
    make_retries_due(&pool).await;
    complete_held_task(&q, &pool).await.unwrap();
    loop {
        let batch = q.claim("w-new", TaskType::ALL, 10).await.unwrap();
        if batch.is_empty() {
            break;
        }
        for task in batch {
            q.complete("w-new", task.lease(), json!({ "text": "done" }))
                .await
                .unwrap();
        }
    }

    let statuses: Vec<(Uuid, String)> = sqlx::query_as("SELECT id, status FROM all_jobs ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    for (id, status) in &statuses {
        let expected = match id.to_string().as_str() {
            CANCELLED => "cancelled",
            FAILED => "failed",
            _ => "complete",
        };
        assert_eq!(status, expected, "job {id}");
    }
    let open: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM job_tasks WHERE status IN ('pending', 'claimed', 'processing')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(open, 0);
    assert!(q.repair_stuck_jobs().await.unwrap().is_empty());
}

/// A rollback: the database carries a migration of a later build that this
/// one does not know. `api migrate` (a Fly release command, an API pod with
/// `MIGRATE_ON_START`) goes on instead of refusing, which crash-looped the
/// rolled-back API, and the later migration stays recorded.
#[sqlx::test(migrations = false)]
async fn a_rolled_back_build_migrates_a_database_a_later_build_migrated(pool: PgPool) {
    let q = queue::Queue::new(pool.clone());
    q.migrate().await.unwrap();
    const LATER: i64 = 29991231000000;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES ($1, 'a later build', true, '\\x00', 0)",
    )
    .bind(LATER)
    .execute(&pool)
    .await
    .unwrap();

    q.migrate().await.expect("a rolled-back build starts");

    assert!(q.is_ready().await.unwrap(), "its own migrations are all there");
    let kept: bool = sqlx::query_scalar("SELECT exists (SELECT FROM _sqlx_migrations WHERE version = $1)")
        .bind(LATER)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(kept);
}
