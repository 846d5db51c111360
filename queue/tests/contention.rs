//! Exactly-once under contention, fencing after a sweep, and claims that
//! lock only what they take.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use queue::{JobStatus, JobType, NewJob, QueueError, TaskType};
use serde_json::json;
use sqlx::PgPool;

const TASKS: usize = 20_000;
const CLAIMERS: usize = 8;

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn eight_claimers_claim_and_complete_twenty_thousand_tasks_exactly_once(pool: PgPool) {
    let q = queue(pool.clone());
    for chunk in 0..(TASKS / 1000) {
        let jobs: Vec<NewJob> = (0..1000).map(|i| text_job(&format!("job {chunk}-{i}"))).collect();
        q.enqueue_batch(jobs).await.unwrap();
    }

    let mut workers = Vec::new();
    for w in 0..CLAIMERS {
        let q = q.clone();
        workers.push(tokio::spawn(async move {
            let worker = format!("worker-{w}");
            let mut claimed = Vec::new();
            loop {
                let tasks = q.claim(&worker, &[TaskType::TextGeneration], 50).await.unwrap();
                if tasks.is_empty() {
                    return claimed;
                }
                let results: Vec<_> = tasks.iter().map(|t| (t.lease(), json!({}))).collect();
                let done = q.complete_batch(&worker, &results).await.unwrap();
                assert_eq!(done.len(), tasks.len(), "{worker} held every task it claimed");
                claimed.extend(tasks.iter().map(|t| t.id));
            }
        }));
    }

    let mut seen = HashSet::new();
    let mut per_worker = Vec::new();
    for w in workers {
        let ids = w.await.unwrap();
        per_worker.push(ids.len());
        for id in ids {
            assert!(seen.insert(id), "task {id} was claimed twice");
        }
    }
    assert_eq!(seen.len(), TASKS, "every task claimed once");
    assert!(
        per_worker.iter().filter(|n| **n > 0).count() > 1,
        "the work was shared: {per_worker:?}"
    );

    let (complete, attempts_over_one): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'complete'), count(*) FILTER (WHERE attempts <> 1) FROM all_tasks",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((complete, attempts_over_one), (TASKS as i64, 0));
    let unfinished: i64 = sqlx::query_scalar("SELECT count(*) FROM all_jobs WHERE status <> 'complete'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(unfinished, 0, "every job completed with its task");
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_worker_whose_lease_was_swept_cannot_complete(pool: PgPool) {
    let q = queue(pool.clone());
    let job = q.enqueue(text_job("x")).await.unwrap().job;
    let slow = claim_one(&q, "slow-worker", TaskType::TextGeneration).await;
    age_heartbeat(&pool, slow.lease(), Duration::from_secs(120)).await;

    let swept = q.sweep(Duration::from_secs(30)).await.unwrap();
    assert_eq!(swept.retried(), 1);
    make_retries_due(&pool).await;
    let rescued = claim_one(&q, "healthy-worker", TaskType::TextGeneration).await;
    assert_eq!((rescued.id, rescued.attempts), (slow.id, 2));

    let late = q
        .complete("slow-worker", slow.lease(), json!({"from": "slow"}))
        .await
        .unwrap_err();
    assert!(matches!(late, QueueError::LeaseLost { .. }), "{late}");
    q.complete("healthy-worker", rescued.lease(), json!({"from": "healthy"}))
        .await
        .unwrap();

    let tasks = q.tasks_of(job.id).await.unwrap();
    assert_eq!(tasks[0].output, Some(json!({"from": "healthy"})));
    assert_eq!(q.job(TENANT, job.id).await.unwrap().status, JobStatus::Complete);
}

/// A claimer of several types, holding its claim open, has locked only the
/// task it takes: a claimer of the other type finds that type's task. It
/// used to lock its limit of every type, so the other claimer, woken by the
/// same notification, found nothing and slept until its next poll.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_claim_of_several_types_leaves_the_tasks_it_does_not_take_to_others(pool: PgPool) {
    let q = queue(pool.clone());
    let first = q.enqueue(text_job("first").priority(10)).await.unwrap().job;
    let other = q
        .enqueue(NewJob::new(TENANT, JobType::Pdf, json!({"text": "# Other"})))
        .await
        .unwrap()
        .job;

    let mut both = pool.begin().await.unwrap();
    let taken: Vec<uuid::Uuid> = sqlx::query_scalar(
        "SELECT job_id FROM claim_and_start_tasks('both', '{text_generation,pdf_generation,text_generation}', 1)",
    )
    .fetch_all(&mut *both)
    .await
    .unwrap();
    assert_eq!(taken, [first.id], "the first in line of either type");

    let pdf = tokio::time::timeout(
        Duration::from_secs(10),
        q.claim("pdf-only", &[TaskType::PdfGeneration], 1),
    )
    .await
    .expect("a claim never waits for another")
    .unwrap();
    assert_eq!(
        pdf.iter().map(|t| t.job_id).collect::<Vec<_>>(),
        [other.id],
        "the pdf task is free for its own claimer"
    );
    both.commit().await.unwrap();
}
