//! A job of one task enqueued without a key has no `jobs` row while it is
//! open: its task's row holds it (migration `20261209000001`). These tests
//! check that such a job reads, lists, finishes, fails, is swept and is
//! cancelled as a job with a row does, that only those jobs live there, and
//! that its task's lock fences a completion as the job's lock would.

mod common;

use std::time::Duration;

use common::*;
use queue::{Failure, FailureKind, JobFilter, JobStatus, NewJob, QueueError, TaskType};
use serde_json::json;
use sqlx::PgPool;

async fn jobs_in_task_rows(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM job_tasks WHERE job_input IS NOT NULL")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_text_job_lives_in_its_task_row_until_it_finishes(pool: PgPool) {
    let q = queue(pool.clone());
    let enqueued = q.enqueue(text_job("tides")).await.unwrap().job;
    assert_eq!(count(&pool, "jobs").await, 0, "a text job is given no job row");
    assert_eq!(jobs_in_task_rows(&pool).await, 1);

    let queued = q.job(TENANT, enqueued.id).await.unwrap();
    assert_eq!(queued, enqueued, "the job read back is the one enqueue returned");
    assert_eq!(queued.status, JobStatus::Queued);
    assert_eq!(queued.input, json!({ "prompt": "tides" }));
    let page = q
        .list_jobs(
            TENANT,
            &JobFilter {
                limit: 10,
                ..JobFilter::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(page.jobs, vec![queued.clone()]);

    let task = claim_one(&q, "w1", TaskType::TextGeneration).await;
    let running = q.job(TENANT, enqueued.id).await.unwrap();
    assert_eq!(running.status, JobStatus::Processing);
    assert_eq!(running.started_at, task.claimed_at);
    let page = q
        .list_jobs(
            TENANT,
            &JobFilter {
                limit: 10,
                ..JobFilter::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(page.jobs, vec![running.clone()], "listed while it runs");

    q.complete("w1", task.lease(), json!({ "text": "ebb and flow" }))
        .await
        .unwrap();
    assert_eq!(
        count(&pool, "job_tasks").await,
        0,
        "the task row went with its job"
    );
    let done = q.job_with_tasks(TENANT, enqueued.id).await.unwrap();
    assert_eq!(done.job.status, JobStatus::Complete);
    assert_eq!(done.job.tenant, TENANT);
    assert_eq!(done.job.input, json!({ "prompt": "tides" }));
    assert_eq!(done.job.started_at, task.claimed_at);
    assert!(done.job.finished_at.is_some());
    assert_eq!(done.tasks.len(), 1);
    assert_eq!(done.tasks[0].output, Some(json!({ "text": "ebb and flow" })));
    assert_eq!(
        (
            count(&pool, "job_history").await,
            count(&pool, "task_history").await
        ),
        (0, 1),
        "the finished job is one history row, its task's"
    );
    assert_eq!(count(&pool, "jobs_in_task_history").await, 1);
    assert_eq!(q.job(TENANT, enqueued.id).await.unwrap(), done.job);
    let page = q
        .list_jobs(
            TENANT,
            &JobFilter {
                limit: 10,
                ..JobFilter::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(page.jobs, vec![done.job.clone()], "listed when finished");
    let complete = q
        .list_jobs(
            TENANT,
            &JobFilter {
                status: Some(JobStatus::Complete),
                limit: 10,
                ..JobFilter::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(complete.jobs, vec![done.job.clone()], "listed by its status");
    assert!(matches!(
        q.job("another-tenant", enqueued.id).await,
        Err(QueueError::JobNotFound(_))
    ));
    let theirs = q
        .list_jobs(
            "another-tenant",
            &JobFilter {
                limit: 10,
                ..JobFilter::default()
            },
        )
        .await
        .unwrap();
    assert!(theirs.jobs.is_empty(), "another tenant lists none of it");
    // Cancel and retry find it finished, under its lock, and refuse.
    for refused in [
        q.cancel_job(TENANT, enqueued.id).await,
        q.retry_job(TENANT, enqueued.id).await,
    ] {
        assert!(
            matches!(&refused, Err(QueueError::InvalidState { status, .. }) if status == "complete"),
            "{refused:?}"
        );
    }
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn keyed_jobs_and_jobs_of_several_tasks_keep_their_rows(pool: PgPool) {
    let q = queue(pool.clone());
    q.enqueue(text_job("tides").idempotency_key("tides-1"))
        .await
        .unwrap();
    q.enqueue_batch(vec![reading_job("waves"), text_job("sand")])
        .await
        .unwrap();
    assert_eq!(
        count(&pool, "jobs").await,
        2,
        "the keyed text job and the reading job"
    );
    assert_eq!(jobs_in_task_rows(&pool).await, 1, "the text job without a key");
    // A batch with a key keeps every job's row: its replay reads them.
    q.enqueue_batch_once("batch-1", vec![text_job("shore"), text_job("reef")])
        .await
        .unwrap();
    assert_eq!(count(&pool, "jobs").await, 4);
    assert_eq!(count(&pool, "all_jobs").await, 5);
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn another_tenant_neither_sees_nor_cancels_a_job_in_a_task_row(pool: PgPool) {
    let q = queue(pool.clone());
    let job = q.enqueue(text_job("tides")).await.unwrap().job;
    q.enqueue(NewJob::new(
        "globex",
        queue::JobType::Text,
        json!({ "prompt": "dunes" }),
    ))
    .await
    .unwrap();

    assert!(matches!(
        q.job("globex", job.id).await,
        Err(QueueError::JobNotFound(_))
    ));
    assert!(matches!(
        q.cancel_job("globex", job.id).await,
        Err(QueueError::JobNotFound(_))
    ));
    let theirs = q
        .list_jobs(
            "globex",
            &JobFilter {
                limit: 10,
                ..JobFilter::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(theirs.jobs.len(), 1);
    assert_ne!(theirs.jobs[0].id, job.id);
    assert_eq!(q.job(TENANT, job.id).await.unwrap().status, JobStatus::Queued);
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_job_in_a_task_row_is_cancelled_failed_and_swept_into_history(pool: PgPool) {
    let q = queue(pool.clone());
    let cancelled = q.enqueue(text_job("cancelled")).await.unwrap().job;
    let failed = q.enqueue(text_job("failed")).await.unwrap().job;
    let mut once = text_job("swept");
    once.max_attempts = 1;
    let swept = q.enqueue(once).await.unwrap().job;

    let job = q.cancel_job(TENANT, cancelled.id).await.unwrap();
    assert_eq!(job.status, JobStatus::Cancelled);
    assert_eq!(job.started_at, None, "it never ran");
    assert_eq!(q.job(TENANT, cancelled.id).await.unwrap(), job);

    let task = claim_one(&q, "w1", TaskType::TextGeneration).await;
    assert_eq!(task.job_id, failed.id);
    let failure = Failure {
        message: "the model refused".into(),
        kind: FailureKind::Permanent,
        retry_after: None,
    };
    q.fail("w1", task.lease(), &failure).await.unwrap();
    let job = q.job(TENANT, failed.id).await.unwrap();
    assert_eq!(job.status, JobStatus::Failed);
    assert_eq!(job.error.as_deref(), Some("text_generation: the model refused"));
    assert_eq!(job.started_at, task.claimed_at);

    let task = claim_one(&q, "w2", TaskType::TextGeneration).await;
    assert_eq!(task.job_id, swept.id);
    age_heartbeat(&pool, task.lease(), Duration::from_secs(3600)).await;
    let outcome = q.sweep(Duration::from_secs(60)).await.unwrap();
    assert_eq!(outcome.tasks.len(), 1);
    let job = q.job(TENANT, swept.id).await.unwrap();
    assert_eq!(job.status, JobStatus::Failed);
    assert!(
        job.error.as_deref().unwrap_or_default().contains("lease expired"),
        "{job:?}"
    );

    assert_eq!(count(&pool, "job_tasks").await, 0, "all three went to history");
    assert_eq!(count(&pool, "job_history").await, 3);
    let retried = q.retry_job(TENANT, failed.id).await.unwrap();
    assert_eq!(retried.status, JobStatus::Queued);
    assert_eq!(
        count(&pool, "jobs").await,
        1,
        "a retried job comes back with a row"
    );
    let task = claim_one(&q, "w3", TaskType::TextGeneration).await;
    q.complete("w3", task.lease(), json!({})).await.unwrap();
    assert_eq!(
        q.job(TENANT, failed.id).await.unwrap().status,
        JobStatus::Complete
    );
}

/// The sweeper takes a lease back while the worker's completion waits for
/// the task's row: the completion must then find the lease gone, and leave
/// the job open for its next attempt, not record it complete.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_completion_waiting_behind_a_sweep_of_its_task_completes_nothing(pool: PgPool) {
    let q = queue(pool.clone());
    let job = q.enqueue(text_job("tides")).await.unwrap().job;
    let task = claim_one(&q, "w1", TaskType::TextGeneration).await;
    age_heartbeat(&pool, task.lease(), Duration::from_secs(3600)).await;

    let mut sweep = pool.begin().await.unwrap();
    let swept: Vec<(i64,)> = sqlx::query_as("SELECT task_id FROM sweep_tasks(60, 10, 3600)")
        .fetch_all(&mut *sweep)
        .await
        .unwrap();
    assert_eq!(swept, vec![(task.id,)]);
    let completing = {
        let pool = pool.clone();
        let lease = task.lease();
        tokio::spawn(async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT task_id FROM complete_tasks('w1', $1, $2, ARRAY['{}'::jsonb])",
            )
            .bind(vec![lease.task_id])
            .bind(vec![lease.claim])
            .fetch_all(&pool)
            .await
        })
    };
    until_done_or_blocked(&pool, &completing, 1).await;
    assert!(
        !completing.is_finished(),
        "the completion waits for the task the sweep holds"
    );
    sweep.commit().await.unwrap();

    let completed = completing.await.unwrap().unwrap();
    assert!(completed.is_empty(), "the lease was swept: {completed:?}");
    let job = q.job(TENANT, job.id).await.unwrap();
    assert_eq!(job.status, JobStatus::Processing, "open, its retry pending");
    assert_eq!(count(&pool, "job_history").await, 0);
    let tasks = q.tasks_of(job.id).await.unwrap();
    assert_eq!(tasks[0].status, queue::TaskStatus::Pending);
}

/// A completion takes the tasks of jobs kept in their rows in id order,
/// whatever order its batch lists them in: the order a heartbeat takes
/// them in, so the two cannot each hold a task the other waits for. Here
/// another transaction holds the lower task; the completion, given the
/// higher one first, waits for the lower one without having taken the
/// higher one.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_completion_takes_jobs_in_task_rows_in_id_order(pool: PgPool) {
    let q = queue(pool.clone());
    for topic in ["tides", "moons"] {
        q.enqueue(text_job(topic)).await.unwrap();
    }
    let mut held = q.claim("w1", &[TaskType::TextGeneration], 2).await.unwrap();
    held.sort_by_key(|t| t.id);
    let (low, high) = (held[0].lease(), held[1].lease());

    let mut other = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM job_tasks WHERE id = $1 FOR UPDATE")
        .bind(low.task_id)
        .execute(&mut *other)
        .await
        .unwrap();
    let completing = {
        let q = q.clone();
        tokio::spawn(async move {
            q.complete_batch("w1", &[(high, json!({"n": 2})), (low, json!({"n": 1}))])
                .await
        })
    };
    until_done_or_blocked(&pool, &completing, 1).await;
    assert!(
        !completing.is_finished(),
        "the completion waits for the lower task, which the other transaction holds"
    );
    let higher_free = sqlx::query("SELECT 1 FROM job_tasks WHERE id = $1 FOR UPDATE NOWAIT")
        .bind(high.task_id)
        .execute(&mut *other)
        .await;
    assert!(
        higher_free.is_ok(),
        "the waiting completion must not hold the higher task: {higher_free:?}"
    );
    other.commit().await.unwrap();

    let mut completed = completing.await.unwrap().unwrap();
    completed.sort_by_key(|l| l.task_id);
    assert_eq!(completed, vec![low, high]);
    assert_eq!(jobs_in_task_rows(&pool).await, 0);
    assert_eq!(count(&pool, "job_history").await, 0);
    assert_eq!(count(&pool, "jobs_in_task_history").await, 2);
}

/// A tenant's newest page reads the top of its open jobs kept in task rows
/// and stops. Through `all_jobs` the planner sorted all of them first: a
/// member of a UNION ALL with a WHERE of its own is planned for its whole
/// result (about 100 ms for 20,000 jobs).
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_tenants_newest_page_reads_only_the_page(pool: PgPool) {
    let Some(one) = one_connection_with_statistics(&pool).await else {
        return;
    };
    let q = queue(one.clone());
    let mut ids = Vec::new();
    for batch in 0..5 {
        let jobs = (0..1000).map(|i| text_job(&format!("{batch}-{i}"))).collect();
        ids.extend(q.enqueue_batch(jobs).await.unwrap().into_iter().map(|e| e.job.id));
    }
    sqlx::query("ANALYZE job_tasks").execute(&one).await.unwrap();
    let rows_read = || async {
        flush_statistics(&one).await;
        sqlx::query_scalar::<_, i64>(
            "SELECT (coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0))::bigint
             FROM pg_stat_user_tables WHERE relname = 'job_tasks'",
        )
        .fetch_one(&one)
        .await
        .unwrap()
    };
    let before = rows_read().await;
    let page = q
        .list_jobs(
            TENANT,
            &JobFilter {
                limit: 20,
                ..JobFilter::default()
            },
        )
        .await
        .unwrap();
    let read = rows_read().await - before;

    let newest: Vec<_> = ids.iter().rev().take(20).copied().collect();
    assert_eq!(page.jobs.iter().map(|j| j.id).collect::<Vec<_>>(), newest);
    assert!(
        read <= 100,
        "a page of 20 read {read} of the tenant's 5,000 task rows"
    );

    // Jobs in flight are read apart from the waiting ones: every job is
    // listed once, in order, whichever it is.
    let running = q.claim("w", &[TaskType::TextGeneration], 50).await.unwrap();
    assert_eq!(running.len(), 50);
    let mut listed = Vec::new();
    let mut filter = JobFilter {
        limit: 700,
        ..JobFilter::default()
    };
    loop {
        let page = q.list_jobs(TENANT, &filter).await.unwrap();
        listed.extend(page.jobs.iter().map(|j| (j.id, j.status)));
        match page.next {
            Some(next) => filter.before = Some(next),
            None => break,
        }
    }
    let in_order: Vec<_> = ids.iter().rev().copied().collect();
    assert_eq!(listed.iter().map(|(id, _)| *id).collect::<Vec<_>>(), in_order);
    let processing = listed.iter().filter(|(_, s)| *s == JobStatus::Processing).count();
    assert_eq!(processing, 50);
}

/// A job kept in its task's row has no row whose trigger tells its
/// watchers: its failure, its sweep and its cancel tell them themselves.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn watchers_hear_a_job_in_a_task_row_fail_be_swept_and_be_cancelled(pool: PgPool) {
    let q = queue(pool.clone());
    let mut once = text_job("swept");
    once.max_attempts = 1;
    let swept = q.enqueue(once).await.unwrap().job;
    let failed = q.enqueue(text_job("failed")).await.unwrap().job;
    let cancelled = q.enqueue(text_job("cancelled")).await.unwrap().job;
    let mut notifications = q.listen_job_status().await.unwrap();
    for job in [&swept, &failed, &cancelled] {
        q.watch_job(TENANT, job.id, uuid::Uuid::now_v7(), Duration::from_secs(60))
            .await
            .unwrap();
    }
    let first = claim_one(&q, "w1", TaskType::TextGeneration).await;
    assert_eq!(first.job_id, swept.id);
    assert_eq!(next_change(&mut notifications).await, swept.id, "processing");
    age_heartbeat(&pool, first.lease(), Duration::from_secs(3600)).await;
    q.sweep(Duration::from_secs(60)).await.unwrap();
    assert_eq!(next_change(&mut notifications).await, swept.id, "swept to failed");

    let second = claim_one(&q, "w1", TaskType::TextGeneration).await;
    assert_eq!(next_change(&mut notifications).await, failed.id, "processing");
    q.fail("w1", second.lease(), &Failure::permanent("bad input"))
        .await
        .unwrap();
    assert_eq!(next_change(&mut notifications).await, failed.id, "failed");

    q.cancel_job(TENANT, cancelled.id).await.unwrap();
    assert_eq!(next_change(&mut notifications).await, cancelled.id, "cancelled");
}
