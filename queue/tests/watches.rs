//! Job-status notifications are sent only for watched jobs, and a watch
//! answers with the job as it stands.

mod common;

use std::time::Duration;

use common::*;
use queue::{JobStatus, QueueError, TaskType};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

const TTL: Duration = Duration::from_secs(60);

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn only_watched_jobs_are_notified(pool: PgPool) {
    let q = queue(pool);
    let watched = q.enqueue(text_job("watched")).await.unwrap().job;
    let unwatched = q.enqueue(text_job("unwatched")).await.unwrap().job;
    let mut notifications = q.listen_job_status().await.unwrap();
    let seen = q
        .watch_job(TENANT, watched.id, Uuid::now_v7(), TTL)
        .await
        .unwrap();
    assert_eq!(seen.status, JobStatus::Queued);

    let claimed = q.claim("w1", &[TaskType::TextGeneration], 2).await.unwrap();
    assert_eq!(claimed.len(), 2);
    assert_eq!(next_change(&mut notifications).await, watched.id, "processing");

    // Notifications arrive in commit order: had the unwatched job's
    // completion notified, it would come first.
    for id in [unwatched.id, watched.id] {
        let task = claimed.iter().find(|t| t.job_id == id).unwrap();
        q.complete("w1", task.lease(), json!({})).await.unwrap();
    }
    assert_eq!(next_change(&mut notifications).await, watched.id, "complete");
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn an_unwatched_job_is_not_notified_again(pool: PgPool) {
    let q = queue(pool);
    let first = q.enqueue(text_job("first")).await.unwrap().job;
    let second = q.enqueue(text_job("second")).await.unwrap().job;
    let mut notifications = q.listen_job_status().await.unwrap();
    let stream = Uuid::now_v7();
    q.watch_job(TENANT, first.id, stream, TTL).await.unwrap();
    q.unwatch_job(first.id, stream).await.unwrap();
    q.watch_job(TENANT, second.id, Uuid::now_v7(), TTL).await.unwrap();

    // As above, commit order makes a notification of `first` show up
    // before the second one of `second`.
    let claimed = q.claim("w1", &[TaskType::TextGeneration], 2).await.unwrap();
    for id in [first.id, second.id] {
        let task = claimed.iter().find(|t| t.job_id == id).unwrap();
        q.complete("w1", task.lease(), json!({})).await.unwrap();
    }
    assert_eq!(next_change(&mut notifications).await, second.id, "processing");
    assert_eq!(next_change(&mut notifications).await, second.id, "complete");
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn another_tenants_job_cannot_be_watched(pool: PgPool) {
    let q = queue(pool.clone());
    let job = q.enqueue(text_job("private")).await.unwrap().job;
    assert!(matches!(
        q.watch_job("someone-else", job.id, Uuid::now_v7(), TTL).await,
        Err(QueueError::JobNotFound(id)) if id == job.id
    ));
    assert_eq!(count(&pool, "job_watches").await, 0);
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn the_sweeper_removes_watches_their_stream_stopped_renewing(pool: PgPool) {
    let q = queue(pool.clone());
    let job = q.enqueue(text_job("x")).await.unwrap().job;
    let (lapsed, live) = (Uuid::now_v7(), Uuid::now_v7());
    q.watch_job(TENANT, job.id, lapsed, Duration::ZERO).await.unwrap();
    q.watch_job(TENANT, job.id, live, TTL).await.unwrap();

    let outcome = q.sweep(Duration::from_secs(30)).await.unwrap();
    assert_eq!(outcome.watches_removed, 1);
    assert!(
        !q.renew_job_watch(job.id, lapsed, TTL).await.unwrap(),
        "gone: register again"
    );
    assert!(q.renew_job_watch(job.id, live, TTL).await.unwrap());
    assert_eq!(count(&pool, "job_watches").await, 1);
}
