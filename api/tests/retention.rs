//! Retention removes an old job's artifact bytes from the store, not only
//! its records: the cleaner runs after the queue has pruned.

use std::time::Duration;

use api::metrics::Metrics;
use axum::body::Bytes;
use queue::{ArtifactKind, JobType, NewJob, Queue, Retention, RetentionMode, TaskType};
use serde_json::json;
use sqlx::PgPool;
use store::{artifact_key, ArtifactStore};

/// A `text` job of the tenant `acme`.
async fn enqueue_text_job(q: &Queue) -> queue::Job {
    q.enqueue(NewJob::new("acme", JobType::Text, json!({"prompt": "p"})))
        .await
        .unwrap()
        .job
}

/// The next text task, claimed by the worker `w`.
async fn claim_text_task(q: &Queue) -> queue::Task {
    q.claim("w", &[TaskType::TextGeneration], 1)
        .await
        .unwrap()
        .remove(0)
}

/// `/metrics` counts one run of this maintenance service, and it went well.
fn assert_ran_once_and_well(metrics: &Metrics, maintenance: &str) {
    let exposition = metrics.encode();
    assert!(
        exposition
            .lines()
            .any(|l| l.contains(&format!("maintenance=\"{maintenance}\""))
                && l.contains("result=\"ok\"")
                && l.ends_with(" 1")),
        "{exposition}"
    );
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn pruned_jobs_lose_their_bytes_and_kept_jobs_keep_theirs(pool: PgPool) {
    let q = Queue::new(pool.clone());
    let dir = tempfile::tempdir().unwrap();
    let artifacts = ArtifactStore::local(dir.path()).unwrap();
    let mut keys = Vec::new();
    for finish in [true, false] {
        let job = enqueue_text_job(&q).await;
        let task = claim_text_task(&q).await;
        let key = store_and_record(&q, &artifacts, job.id, &task).await;
        if finish {
            q.complete("w", task.lease(), json!({})).await.unwrap();
        }
        keys.push(key);
        // An earlier attempt stored bytes and stopped before recording
        // them (killed, its lease lost): nothing names them but the job.
        let orphan = format!("{}text-0.0.md", queue::artifact_prefix(job.id));
        artifacts
            .put(&orphan, Bytes::from_static(b"# earlier"), "text/markdown")
            .await
            .unwrap();
        keys.push(orphan);
    }

    let pruned = q
        .prune(Retention {
            older_than: Duration::ZERO,
            mode: RetentionMode::Delete,
            batch: 100,
        })
        .await
        .unwrap();
    assert_eq!(pruned, 1, "only the finished job is pruned");
    assert!(
        dir.path().join(&keys[0]).exists(),
        "bytes outlive the records until the cleaner runs"
    );

    let metrics = Metrics::new();
    api::sweeper::delete_pruned_artifacts(&q, &artifacts, &metrics).await;
    assert!(
        !dir.path().join(&keys[0]).exists(),
        "the pruned job's bytes are gone"
    );
    assert!(
        !dir.path().join(&keys[1]).exists(),
        "and so are the bytes an attempt stored and never recorded"
    );
    assert!(
        dir.path().join(&keys[2]).exists() && dir.path().join(&keys[3]).exists(),
        "the running job's bytes are kept"
    );
    assert!(
        q.artifact_deletions(10).await.unwrap().is_empty(),
        "nothing left to delete"
    );
    assert_ran_once_and_well(&metrics, "artifact_cleanup");
}

/// Store bytes for a job's held task under its folder, as a worker does,
/// and record them under the lease.
async fn store_and_record(
    q: &Queue,
    artifacts: &ArtifactStore,
    job: uuid::Uuid,
    task: &queue::Task,
) -> String {
    let key = artifact_key(job, ArtifactKind::Text, task.lease());
    let stored = artifacts
        .put(&key, Bytes::from_static(b"# text"), "text/markdown")
        .await
        .unwrap();
    q.record_artifact(
        "w",
        task.lease(),
        &stored.to_new_artifact(job, ArtifactKind::Text, json!({})),
    )
    .await
    .unwrap();
    key
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_dropped_day_loses_its_bytes_and_keys_and_its_kept_jobs_keep_theirs(pool: PgPool) {
    test_support::history_partitioned_since(&pool, 20).await;
    let q = Queue::new(pool.clone());
    let dir = tempfile::tempdir().unwrap();
    let artifacts = ArtifactStore::local(dir.path()).unwrap();
    // Three jobs of ten days ago: one finished then, one finished just now,
    // one still running. Each has recorded bytes and bytes of an attempt
    // that never recorded them.
    let mut jobs = Vec::new();
    let mut keys = Vec::new();
    for name in ["pruned", "late", "running"] {
        let job = q
            .enqueue(NewJob::new("acme", JobType::Text, json!({"prompt": name})).idempotency_key(name))
            .await
            .unwrap()
            .job;
        let task = claim_text_task(&q).await;
        let job = test_support::backdate(&pool, job.id, 10).await;
        let recorded = store_and_record(&q, &artifacts, job, &task).await;
        let orphan = format!("{}text-0.0.md", queue::artifact_prefix(job));
        artifacts
            .put(&orphan, Bytes::from_static(b"# earlier"), "text/markdown")
            .await
            .unwrap();
        if name != "running" {
            q.complete("w", task.lease(), json!({})).await.unwrap();
        }
        jobs.push(job);
        keys.push([recorded, orphan]);
    }
    // Both finished just now; the first as if ten days ago.
    sqlx::query("UPDATE job_history SET finished_at = now() - interval '10 days' WHERE id = $1")
        .bind(jobs[0])
        .execute(&pool)
        .await
        .unwrap();
    let day_folder = queue::artifact_prefix(jobs[0])
        .rsplitn(3, '/')
        .nth(2)
        .unwrap()
        .to_string();
    // Not under a job's folder: no job's, and left alone.
    let stray = format!("{day_folder}/README");
    artifacts
        .put(&stray, Bytes::from_static(b"?"), "text/plain")
        .await
        .unwrap();

    let pruned = q
        .prune(Retention {
            older_than: Duration::from_secs(7 * 86400),
            mode: RetentionMode::Delete,
            batch: 100,
        })
        .await
        .unwrap();
    assert_eq!(pruned, 1, "the day is dropped, its late and running jobs kept");
    assert!(
        keys[0].iter().all(|k| dir.path().join(k).exists()),
        "bytes wait for the cleaner"
    );

    let metrics = Metrics::new();
    api::sweeper::clean_retired_days(&q, &artifacts, &metrics).await;
    assert!(
        keys[0].iter().all(|k| !dir.path().join(k).exists()),
        "the dropped job's bytes are gone, recorded or not"
    );
    assert!(
        keys[1..].iter().flatten().all(|k| dir.path().join(k).exists()),
        "the kept jobs of the day keep theirs"
    );
    assert!(dir.path().join(&stray).exists());
    assert!(q.retired_days().await.unwrap().is_empty(), "the day is done");
    let named: Vec<String> = sqlx::query_scalar("SELECT idempotency_key FROM job_keys ORDER BY 1")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(named, ["late", "running"], "the dropped job's key is forgotten");
    assert_eq!(q.artifacts_of(jobs[1]).await.unwrap().len(), 1);
    assert_ran_once_and_well(&metrics, "day_cleanup");
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_job_left_unfinished_after_its_tasks_is_repaired_and_counted(pool: PgPool) {
    let q = Queue::new(pool.clone());
    // Keyed, so it has a job row to leave unfinished.
    let job = q
        .enqueue(NewJob::new("acme", JobType::Text, json!({"prompt": "p"})).idempotency_key("k"))
        .await
        .unwrap()
        .job;
    let task = claim_text_task(&q).await;
    q.complete("w", task.lease(), json!({})).await.unwrap();
    // The state a status race used to leave: every task final, the job not.
    test_support::reopen_in_place(&pool, job.id).await;
    sqlx::query("UPDATE jobs SET status = 'processing', finished_at = NULL WHERE id = $1")
        .bind(job.id)
        .execute(&pool)
        .await
        .unwrap();

    let metrics = Metrics::new();
    api::sweeper::repair_once(&q, &metrics).await;
    api::sweeper::repair_once(&q, &metrics).await;
    assert_eq!(
        q.job_by_id(job.id).await.unwrap().status,
        queue::JobStatus::Complete
    );
    let exposition = metrics.encode();
    assert!(
        exposition
            .lines()
            .any(|l| l.starts_with("backlog_sweeper_actions_total{action=\"jobs_repaired\"} 1")),
        "one repair counted once: {exposition}"
    );
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_rerun_records_its_own_bytes_and_the_replaced_ones_are_removed(pool: PgPool) {
    let q = Queue::new(pool.clone());
    let dir = tempfile::tempdir().unwrap();
    let artifacts = ArtifactStore::local(dir.path()).unwrap();
    let job = enqueue_text_job(&q).await;
    let mut keys = Vec::new();
    let mut leases = Vec::new();
    for round in ["first", "second"] {
        let task = claim_text_task(&q).await;
        let key = artifact_key(job.id, ArtifactKind::Text, task.lease());
        let stored = artifacts
            .put(&key, Bytes::from(round.as_bytes().to_vec()), "text/markdown")
            .await
            .unwrap();
        q.record_artifact(
            "w",
            task.lease(),
            &stored.to_new_artifact(job.id, ArtifactKind::Text, json!({})),
        )
        .await
        .unwrap();
        if round == "first" {
            // The worker dies after recording; its lease is released.
            q.release("w", &[task.lease()]).await.unwrap();
        }
        keys.push(key);
        leases.push(task.lease());
    }
    assert_ne!(keys[0], keys[1], "each claim writes its own key");

    // The first claim, late, can neither record nor overwrite the second's.
    let late = artifacts
        .put(&keys[0], Bytes::from_static(b"late"), "text/markdown")
        .await
        .unwrap();
    assert!(q
        .record_artifact(
            "w",
            leases[0],
            &late.to_new_artifact(job.id, ArtifactKind::Text, json!({}))
        )
        .await
        .is_err());
    q.complete("w", leases[1], json!({})).await.unwrap();
    let recorded = q
        .completed_artifact(job.id, ArtifactKind::Text)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(recorded.storage_key, keys[1]);
    assert_eq!(recorded.sha256, store::sha256_hex(b"second"));
    assert_eq!(artifacts.get(&keys[1]).await.unwrap().as_ref(), b"second");

    api::sweeper::delete_pruned_artifacts(&q, &artifacts, &Metrics::new()).await;
    assert!(
        !dir.path().join(&keys[0]).exists(),
        "the replaced bytes are removed"
    );
    assert!(dir.path().join(&keys[1]).exists(), "the recorded bytes stay");
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn an_archived_day_keeps_the_bytes_its_archive_names(pool: PgPool) {
    test_support::history_partitioned_since(&pool, 20).await;
    let q = Queue::new(pool.clone());
    let dir = tempfile::tempdir().unwrap();
    let artifacts = ArtifactStore::local(dir.path()).unwrap();
    let job = q
        .enqueue(NewJob::new("acme", JobType::Text, json!({"prompt": "p"})).idempotency_key("old"))
        .await
        .unwrap()
        .job;
    let task = claim_text_task(&q).await;
    let job = test_support::backdate(&pool, job.id, 10).await;
    let key = store_and_record(&q, &artifacts, job, &task).await;
    q.complete("w", task.lease(), json!({})).await.unwrap();
    sqlx::query("UPDATE job_history SET finished_at = now() - interval '10 days' WHERE id = $1")
        .bind(job)
        .execute(&pool)
        .await
        .unwrap();

    let pruned = q
        .prune(Retention {
            older_than: Duration::from_secs(7 * 86400),
            mode: RetentionMode::Archive,
            batch: 100,
        })
        .await
        .unwrap();
    assert_eq!(pruned, 1);
    let day_partitions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE c.relname = 'job_history_' || to_char(now() - interval '10 days', 'YYYYMMDD')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(day_partitions, 0, "the whole day went at once, not row by row");
    let archived: Vec<String> = sqlx::query_scalar(
        "SELECT a ->> 'storage_key' FROM jobs_archive, jsonb_array_elements(artifacts) a WHERE id = $1",
    )
    .bind(job)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        archived,
        std::slice::from_ref(&key),
        "the archive names the job's bytes"
    );

    let metrics = Metrics::new();
    api::sweeper::clean_retired_days(&q, &artifacts, &metrics).await;
    assert!(dir.path().join(&key).exists(), "an archived day keeps its bytes");
    assert!(q.retired_days().await.unwrap().is_empty(), "the day is done");
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM job_keys")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        keys, 0,
        "its idempotency key is forgotten: the job left the queue"
    );
    assert_ran_once_and_well(&metrics, "day_cleanup");
}
