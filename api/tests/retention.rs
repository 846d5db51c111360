//! Retention removes an old job's artifact bytes from the store, not only
//! its records: the cleaner runs after the queue has pruned.

use std::time::Duration;

use api::metrics::Metrics;
use axum::body::Bytes;
use queue::{ArtifactKind, JobType, NewJob, Queue, Retention, RetentionMode, TaskType};
use serde_json::json;
use sqlx::PgPool;
use store::{artifact_key, ArtifactStore};

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn pruned_jobs_lose_their_bytes_and_kept_jobs_keep_theirs(pool: PgPool) {
    let q = Queue::new(pool.clone());
    let dir = tempfile::tempdir().unwrap();
    let artifacts = ArtifactStore::local(dir.path()).unwrap();
    let mut keys = Vec::new();
    for finish in [true, false] {
        let job = q
            .enqueue(NewJob::new("acme", JobType::Text, json!({"prompt": "p"})))
            .await
            .unwrap()
            .job;
        let task = q
            .claim("w", &[TaskType::TextGeneration], 1)
            .await
            .unwrap()
            .remove(0);
        let key = artifact_key(job.id, ArtifactKind::Text);
        let stored = artifacts
            .put(&key, Bytes::from_static(b"# text"), "text/markdown")
            .await
            .unwrap();
        q.record_artifact(
            "w",
            task.lease(),
            &stored.to_new_artifact(job.id, ArtifactKind::Text, json!({})),
        )
        .await
        .unwrap();
        if finish {
            q.complete("w", task.lease(), json!({})).await.unwrap();
        }
        keys.push(key);
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
        dir.path().join(&keys[1]).exists(),
        "the running job's bytes are kept"
    );
    assert!(
        q.artifact_deletions(10).await.unwrap().is_empty(),
        "nothing left to delete"
    );
    let exposition = metrics.encode();
    assert!(
        exposition.lines().any(|l| l.contains("job=\"artifact_cleanup\"")
            && l.contains("result=\"ok\"")
            && l.ends_with(" 1")),
        "{exposition}"
    );
}
