//! A job's life: its DAG, claims, completion, failure and retries.

mod common;

use std::time::Duration;

use common::*;
use queue::{Failure, JobStatus, QueueError, RetryOutcome, TaskStatus, TaskType};
use serde_json::json;
use sqlx::PgPool;

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_reading_job_runs_text_first_then_pdf_and_audio(pool: PgPool) {
    let q = queue(pool);
    let job = q.enqueue(reading_job("tides")).await.unwrap().job;
    assert_eq!(job.status, JobStatus::Queued);

    // Only the text task is runnable.
    let none = q
        .claim("w1", &[TaskType::PdfGeneration, TaskType::AudioGeneration], 10)
        .await
        .unwrap();
    assert!(none.is_empty(), "pdf/audio must wait for the text task");

    let text = claim_one(&q, "w1", TaskType::TextGeneration).await;
    assert_eq!(q.job(TENANT, job.id).await.unwrap().status, JobStatus::Processing);
    q.complete("w1", text.lease(), json!({"chars": 100}))
        .await
        .unwrap();
    assert_eq!(q.job(TENANT, job.id).await.unwrap().status, JobStatus::Processing);

    let both = q
        .claim("w2", &[TaskType::PdfGeneration, TaskType::AudioGeneration], 10)
        .await
        .unwrap();
    assert_eq!(both.len(), 2, "text done: pdf and audio are runnable");
    for t in &both {
        q.complete("w2", t.lease(), json!({})).await.unwrap();
    }
    let job = q.job(TENANT, job.id).await.unwrap();
    assert_eq!(job.status, JobStatus::Complete);
    assert!(job.finished_at.is_some() && job.started_at.is_some());
    assert_eq!(
        q.task_output(job.id, TaskType::TextGeneration).await.unwrap(),
        Some(json!({"chars": 100}))
    );
}

/// The job's row as last written: a claim must leave it alone. None for a
/// job kept in its task's row.
async fn job_row_version(pool: &PgPool, job: uuid::Uuid) -> Option<String> {
    sqlx::query_scalar("SELECT xmin::text FROM jobs WHERE id = $1")
        .bind(job)
        .fetch_optional(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_job_with_a_row_started_when_its_task_was_first_claimed_through_a_retry(pool: PgPool) {
    let job = text_job("tides").idempotency_key("tides");
    started_when_its_task_was_first_claimed_through_a_retry(pool, job).await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_job_in_its_task_row_started_when_its_task_was_first_claimed_through_a_retry(pool: PgPool) {
    started_when_its_task_was_first_claimed_through_a_retry(pool, text_job("tides")).await;
}

async fn started_when_its_task_was_first_claimed_through_a_retry(pool: PgPool, job: queue::NewJob) {
    let q = queue(pool.clone());
    let job = q.enqueue(job).await.unwrap().job;
    let written = job_row_version(&pool, job.id).await;

    let first = claim_one(&q, "w1", TaskType::TextGeneration).await;
    assert_eq!(
        job_row_version(&pool, job.id).await,
        written,
        "the claim wrote the job's row"
    );
    let running = q.job(TENANT, job.id).await.unwrap();
    assert_eq!(running.status, JobStatus::Processing);
    assert_eq!(running.started_at, first.claimed_at);
    assert!(
        running.updated_at >= first.claimed_at.unwrap(),
        "updated by the claim"
    );

    q.fail("w1", first.lease(), &Failure::retryable("busy"))
        .await
        .unwrap();
    make_retries_due(&pool).await;
    let second = claim_one(&q, "w2", TaskType::TextGeneration).await;
    assert!(second.claimed_at > first.claimed_at);
    assert_eq!(
        q.job(TENANT, job.id).await.unwrap().started_at,
        first.claimed_at,
        "started at the first claim, not the failure's time"
    );
    q.complete("w2", second.lease(), json!({})).await.unwrap();

    let done = q.job(TENANT, job.id).await.unwrap();
    assert_eq!(done.status, JobStatus::Complete);
    assert_eq!(done.started_at, first.claimed_at, "in history too");
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_job_cancelled_while_its_task_ran_started_when_it_was_claimed(pool: PgPool) {
    let q = queue(pool.clone());
    let job = q.enqueue(text_job("tides")).await.unwrap().job;
    let task = claim_one(&q, "w1", TaskType::TextGeneration).await;

    let cancelled = q.cancel_job(TENANT, job.id).await.unwrap();
    assert_eq!(cancelled.status, JobStatus::Cancelled);
    assert_eq!(cancelled.started_at, task.claimed_at);
    assert_eq!(q.job(TENANT, job.id).await.unwrap().started_at, task.claimed_at);
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_reading_job_started_when_its_text_task_was_claimed(pool: PgPool) {
    let q = queue(pool.clone());
    let job = q.enqueue(reading_job("tides")).await.unwrap().job;
    let text = claim_one(&q, "w1", TaskType::TextGeneration).await;
    q.complete("w1", text.lease(), json!({})).await.unwrap();

    let running = q.job(TENANT, job.id).await.unwrap();
    assert_eq!(
        running.status,
        JobStatus::Processing,
        "pdf and audio are still to run"
    );
    assert_eq!(running.started_at, text.claimed_at);
    for task in q
        .claim("w2", &[TaskType::PdfGeneration, TaskType::AudioGeneration], 2)
        .await
        .unwrap()
    {
        q.complete("w2", task.lease(), json!({})).await.unwrap();
    }
    let done = q.job(TENANT, job.id).await.unwrap();
    assert_eq!(done.status, JobStatus::Complete);
    assert_eq!(done.started_at, text.claimed_at);
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_failed_text_task_fails_the_job_and_cancels_what_depended_on_it(pool: PgPool) {
    let q = queue(pool);
    let job = q.enqueue(reading_job("tides").max_attempts(1)).await.unwrap().job;
    let text = claim_one(&q, "w1", TaskType::TextGeneration).await;

    let outcome = q
        .fail("w1", text.lease(), &Failure::retryable("provider down"))
        .await
        .unwrap();
    assert_eq!(outcome, RetryOutcome::Failed, "one attempt allowed, so no retry");

    let job = q.job_with_tasks(TENANT, job.id).await.unwrap();
    assert_eq!(job.job.status, JobStatus::Failed);
    assert!(job.job.error.as_deref().unwrap().contains("provider down"));
    let statuses: Vec<_> = job.tasks.iter().map(|t| (t.task_type, t.status)).collect();
    assert_eq!(
        statuses,
        vec![
            (TaskType::TextGeneration, TaskStatus::Failed),
            (TaskType::PdfGeneration, TaskStatus::Cancelled),
            (TaskType::AudioGeneration, TaskStatus::Cancelled),
        ]
    );
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_retried_task_comes_back_later_each_time_then_fails(pool: PgPool) {
    let q = queue(pool.clone());
    let job = q.enqueue(text_job("x").max_attempts(4)).await.unwrap().job;
    let mut previous_delay = 0.0;
    for attempt in 1..=4 {
        let task = claim_one(&q, "w1", TaskType::TextGeneration).await;
        assert_eq!(task.attempts, attempt);
        let failed_at = chrono::Utc::now();
        let outcome = q
            .fail("w1", task.lease(), &Failure::retryable(format!("boom {attempt}")))
            .await
            .unwrap();
        match outcome {
            RetryOutcome::RetryAt(run_at) => {
                assert!(attempt < 4);
                let delay = (run_at - failed_at).num_milliseconds() as f64 / 1000.0;
                // base 10 s doubling, equal jitter: [5, 10], [10, 20], [20, 40].
                let full = 10.0 * 2f64.powi(attempt - 1);
                assert!(
                    delay >= full / 2.0 - 1.0 && delay <= full + 1.0,
                    "attempt {attempt}: {delay}s"
                );
                assert!(
                    delay >= previous_delay - 1.0,
                    "backoff must grow: {previous_delay} then {delay}"
                );
                previous_delay = delay;
                // Not claimable until its run_at.
                assert!(q
                    .claim("w1", &[TaskType::TextGeneration], 1)
                    .await
                    .unwrap()
                    .is_empty());
                make_retries_due(&pool).await;
            }
            RetryOutcome::Failed => assert_eq!(attempt, 4, "fails only after max_attempts"),
        }
    }
    let job = q.job_with_tasks(TENANT, job.id).await.unwrap();
    assert_eq!(job.job.status, JobStatus::Failed);
    assert_eq!(job.tasks[0].last_error.as_deref(), Some("boom 4"));
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_permanent_failure_does_not_burn_the_remaining_attempts(pool: PgPool) {
    let q = queue(pool);
    let job = q.enqueue(text_job("x").max_attempts(5)).await.unwrap().job;
    let task = claim_one(&q, "w1", TaskType::TextGeneration).await;
    let outcome = q
        .fail("w1", task.lease(), &Failure::permanent("400: prompt rejected"))
        .await
        .unwrap();
    assert_eq!(outcome, RetryOutcome::Failed);
    let tasks = q.tasks_of(job.id).await.unwrap();
    assert_eq!((tasks[0].status, tasks[0].attempts), (TaskStatus::Failed, 1));
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn completion_is_fenced_to_the_holder_and_claim(pool: PgPool) {
    let q = queue(pool);
    q.enqueue(text_job("x")).await.unwrap();
    let task = claim_one(&q, "w1", TaskType::TextGeneration).await;

    let err = q.complete("w2", task.lease(), json!({})).await.unwrap_err();
    assert!(
        matches!(err, QueueError::LeaseLost { .. }),
        "another worker cannot complete it: {err}"
    );
    let mut stale = task.lease();
    stale.claim -= 1;
    assert!(matches!(
        q.complete("w1", stale, json!({})).await,
        Err(QueueError::LeaseLost { .. })
    ));

    q.complete("w1", task.lease(), json!({"n": 1})).await.unwrap();
    // A repeat under the same lease (a call retried after a lost connection)
    // is told the task is done, and changes nothing.
    q.complete("w1", task.lease(), json!({"n": 2})).await.unwrap();
    let tasks = q.tasks_of(task.job_id).await.unwrap();
    assert_eq!(
        tasks[0].output,
        Some(json!({"n": 1})),
        "the first completion stands"
    );
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn heartbeats_mark_processing_and_report_lost_leases(pool: PgPool) {
    let q = queue(pool);
    let job = q.enqueue(text_job("x")).await.unwrap().job;
    let task = claim_one(&q, "w1", TaskType::TextGeneration).await;
    assert_eq!(task.status, TaskStatus::Claimed);

    assert!(q.heartbeat("w1", &[task.lease()]).await.unwrap().is_empty());
    assert_eq!(
        q.tasks_of(job.id).await.unwrap()[0].status,
        TaskStatus::Processing
    );

    q.cancel_job(TENANT, job.id).await.unwrap();
    assert_eq!(
        q.heartbeat("w1", &[task.lease()]).await.unwrap(),
        vec![task.lease()]
    );
    assert!(matches!(
        q.complete("w1", task.lease(), json!({})).await,
        Err(QueueError::LeaseLost { .. })
    ));
    assert_eq!(q.job(TENANT, job.id).await.unwrap().status, JobStatus::Cancelled);
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_claim_that_starts_its_tasks_marks_them_processing_under_the_same_fence(pool: PgPool) {
    let q = queue(pool);
    let job = q.enqueue(text_job("x")).await.unwrap().job;
    let started = q
        .claim_and_start("w1", &[TaskType::TextGeneration], 5)
        .await
        .unwrap();
    assert_eq!(started.len(), 1);
    let task = &started[0];
    assert_eq!(
        task.status,
        TaskStatus::Processing,
        "no heartbeat needed to say so"
    );
    assert_eq!((task.attempts, task.claims), (1, 1));
    assert_eq!(
        q.tasks_of(job.id).await.unwrap()[0].status,
        TaskStatus::Processing
    );
    assert_eq!(q.job(TENANT, job.id).await.unwrap().status, JobStatus::Processing);
    assert!(
        q.claim("w2", &[TaskType::TextGeneration], 5)
            .await
            .unwrap()
            .is_empty(),
        "a started task is held like a claimed one"
    );

    let mut stale = task.lease();
    stale.claim -= 1;
    assert!(matches!(
        q.complete("w1", stale, json!({})).await,
        Err(QueueError::LeaseLost { .. })
    ));
    assert!(q.heartbeat("w1", &[task.lease()]).await.unwrap().is_empty());
    q.complete("w1", task.lease(), json!({"n": 1})).await.unwrap();
    assert_eq!(q.job(TENANT, job.id).await.unwrap().status, JobStatus::Complete);
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn completing_and_claiming_in_one_call_fences_the_completions_and_starts_the_claims(pool: PgPool) {
    let q = queue(pool.clone());
    let mut jobs = Vec::new();
    for prompt in ["a", "b", "c"] {
        jobs.push(q.enqueue(text_job(prompt)).await.unwrap().job);
    }
    let held = q
        .claim_and_start("w1", &[TaskType::TextGeneration], 2)
        .await
        .unwrap();
    assert_eq!(held.len(), 2);
    let mut stale = held[1].lease();
    stale.claim -= 1;

    let done = q
        .complete_and_claim(
            "w1",
            &[(held[0].lease(), json!({"n": 1})), (stale, json!({}))],
            &[TaskType::TextGeneration],
            5,
        )
        .await
        .unwrap();
    assert_eq!(
        done.completed,
        vec![held[0].lease()],
        "the stale lease is refused"
    );
    assert_eq!(done.claimed.len(), 1, "the one task left, claimed");
    let next = &done.claimed[0];
    assert_eq!((next.status, next.claims), (TaskStatus::Processing, 1));
    assert_eq!(
        q.job(TENANT, held[0].job_id).await.unwrap().status,
        JobStatus::Complete
    );
    let completed = &q.tasks_of(held[0].job_id).await.unwrap()[0];
    assert_eq!(completed.output, Some(json!({"n": 1})), "the output is stored");
    // now() is the transaction's start: one instant for all one call wrote.
    assert_eq!(
        completed.finished_at, next.claimed_at,
        "completed and claimed in one transaction"
    );
    assert_eq!(
        q.tasks_of(held[1].job_id).await.unwrap()[0].status,
        TaskStatus::Processing,
        "still held under its real lease"
    );

    // Neither skips the WAL flush: a completion must be on disk before the
    // worker is told, and so must a claim, whose number is the lease
    // (races.rs, a_claim_commits_only_once_it_is_on_disk).
    for (call, setting) in [
        ("SELECT count(*) FROM claim_tasks('w2', ARRAY['text_generation'], 1)", "on"),
        (
            "SELECT count(*) FROM complete_and_claim_next('w2', '{}', '{}', '{}', ARRAY['text_generation'], 1)",
            "on",
        ),
    ] {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query(call).execute(&mut *tx).await.unwrap();
        let now: String = sqlx::query_scalar("SELECT current_setting('synchronous_commit')")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(now, setting, "after {call}");
    }
}

/// A completion that names a task twice, under a claim the sweeper took
/// back and under the claim the same worker took next, completes it under
/// the current claim with that claim's output. With the stale entry first,
/// the job was recorded complete while its task went to history still
/// `processing`, its output lost, and the worker was told its lease was
/// gone.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_task_named_under_a_swept_claim_and_its_current_one_completes_under_the_current_one(pool: PgPool) {
    let q = queue(pool.clone());
    let job = q.enqueue(text_job("x")).await.unwrap().job;
    let old = claim_one(&q, "w", TaskType::TextGeneration).await;
    sqlx::query("UPDATE job_tasks SET heartbeat_at = now() - interval '1 hour'")
        .execute(&pool)
        .await
        .unwrap();
    q.sweep(Duration::from_secs(60)).await.unwrap();
    sqlx::query("UPDATE job_tasks SET run_at = now()")
        .execute(&pool)
        .await
        .unwrap();
    let current = claim_one(&q, "w", TaskType::TextGeneration).await;
    assert_eq!(current.id, old.id);

    let done = q
        .complete_batch(
            "w",
            &[
                (old.lease(), json!({"run": "old"})),
                (current.lease(), json!({"run": "current"})),
            ],
        )
        .await
        .unwrap();
    assert!(done.contains(&current.lease()), "{done:?}");
    let (job, tasks) = {
        let found = q.job_with_tasks(TENANT, job.id).await.unwrap();
        (found.job, found.tasks)
    };
    assert_eq!(job.status, JobStatus::Complete);
    assert_eq!(tasks[0].status, TaskStatus::Complete);
    assert_eq!(tasks[0].output, Some(json!({"run": "current"})));
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn released_tasks_go_back_without_spending_an_attempt(pool: PgPool) {
    let q = queue(pool);
    let job = q.enqueue(text_job("x")).await.unwrap().job;
    let task = claim_one(&q, "w1", TaskType::TextGeneration).await;
    assert_eq!(
        q.release("w1", &[task.lease()]).await.unwrap(),
        vec![task.lease()]
    );
    assert_eq!(q.job(TENANT, job.id).await.unwrap().status, JobStatus::Queued);
    let again = claim_one(&q, "w2", TaskType::TextGeneration).await;
    assert_eq!((again.id, again.attempts), (task.id, 1));
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn claims_take_higher_priority_first_then_oldest(pool: PgPool) {
    let q = queue(pool);
    let low = q.enqueue(text_job("low")).await.unwrap().job;
    let high = q.enqueue(text_job("high").priority(10)).await.unwrap().job;
    let low2 = q.enqueue(text_job("low2")).await.unwrap().job;
    let order: Vec<_> = q
        .claim("w", &[TaskType::TextGeneration], 3)
        .await
        .unwrap()
        .iter()
        .map(|t| t.job_id)
        .collect();
    assert_eq!(order, vec![high.id, low.id, low2.id]);
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_failed_job_can_be_retried_from_its_failed_task(pool: PgPool) {
    let q = queue(pool);
    let job = q.enqueue(reading_job("x").max_attempts(1)).await.unwrap().job;
    let text = claim_one(&q, "w1", TaskType::TextGeneration).await;
    q.fail("w1", text.lease(), &Failure::permanent("bad"))
        .await
        .unwrap();

    let failed = q.job(TENANT, job.id).await.unwrap();
    assert_eq!(failed.status, JobStatus::Failed);
    let retried = q.retry_job(TENANT, job.id).await.unwrap();
    assert_eq!(retried.status, JobStatus::Queued);
    assert!(
        retried.updated_at > failed.updated_at,
        "a retry is a change: updated_at {} after the failure's {}",
        retried.updated_at,
        failed.updated_at
    );
    assert_eq!(retried.finished_at, None);
    assert!(matches!(
        q.retry_job(TENANT, job.id).await,
        Err(QueueError::InvalidState { .. })
    ));
    // The dependents wait for the text task again instead of running early.
    assert!(q
        .claim("w1", &[TaskType::PdfGeneration], 5)
        .await
        .unwrap()
        .is_empty());
    let text = claim_one(&q, "w1", TaskType::TextGeneration).await;
    q.complete("w1", text.lease(), json!({})).await.unwrap();
    assert_eq!(
        q.claim("w1", &[TaskType::PdfGeneration, TaskType::AudioGeneration], 5)
            .await
            .unwrap()
            .len(),
        2
    );
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_draining_worker_claims_nothing(pool: PgPool) {
    let q = queue(pool);
    q.enqueue(text_job("x")).await.unwrap();
    q.register_worker(&queue::NewWorker {
        id: "w1".into(),
        pool: Some("text".into()),
        task_types: vec![TaskType::TextGeneration],
        concurrency: 2,
        hostname: None,
        pid: None,
    })
    .await
    .unwrap();
    assert_eq!(
        q.drain_idle(&["w1".to_string()]).await.unwrap(),
        vec!["w1".to_string()]
    );
    assert!(q
        .claim("w1", &[TaskType::TextGeneration], 1)
        .await
        .unwrap()
        .is_empty());
    assert!(q
        .claim_and_start("w1", &[TaskType::TextGeneration], 1)
        .await
        .unwrap()
        .is_empty());
    assert!(q
        .complete_and_claim("w1", &[], &[TaskType::TextGeneration], 1)
        .await
        .unwrap()
        .claimed
        .is_empty());
    q.undrain(&["w1".to_string()]).await.unwrap();
    assert_eq!(
        q.claim("w1", &[TaskType::TextGeneration], 1).await.unwrap().len(),
        1
    );
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_replica_drained_before_it_registers_claims_nothing_once_it_does(pool: PgPool) {
    let q = queue(pool);
    q.enqueue(text_job("x")).await.unwrap();
    let starting = "pod-still-starting".to_string();
    assert_eq!(
        q.drain_idle(std::slice::from_ref(&starting)).await.unwrap(),
        vec![starting.clone()],
        "an unregistered replica holds nothing: drained at once"
    );
    let worker = queue::NewWorker {
        id: starting.clone(),
        pool: Some("text".into()),
        task_types: vec![TaskType::TextGeneration],
        concurrency: 1,
        hostname: None,
        pid: None,
    };
    q.register_worker(&worker).await.unwrap();
    assert_eq!(
        q.worker_heartbeat(&starting).await.unwrap(),
        Some(queue::WorkerState::Draining),
        "registering does not undo the drain"
    );
    assert!(q
        .claim(&starting, &[TaskType::TextGeneration], 1)
        .await
        .unwrap()
        .is_empty());

    // Kept after all: back to work. A later restart registers as running.
    q.undrain(std::slice::from_ref(&starting)).await.unwrap();
    assert_eq!(
        q.claim(&starting, &[TaskType::TextGeneration], 1)
            .await
            .unwrap()
            .len(),
        1
    );
    q.register_worker(&worker).await.unwrap();
    assert_eq!(
        q.worker_heartbeat(&starting).await.unwrap(),
        Some(queue::WorkerState::Running)
    );
}

/// A registered replica drained, then registering again (restarted under
/// the same id before the controller stopped it, or repeating a
/// registration whose answer was lost), stays draining: it would otherwise
/// claim work the stop then cuts short. Only the controller puts it back.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_drained_replica_registering_again_stays_draining_until_the_controller_releases_it(pool: PgPool) {
    let q = queue(pool);
    q.enqueue(text_job("x")).await.unwrap();
    let worker = queue::NewWorker {
        id: "m-1".into(),
        pool: Some("text".into()),
        task_types: vec![TaskType::TextGeneration],
        concurrency: 1,
        hostname: None,
        pid: None,
    };
    q.register_worker(&worker).await.unwrap();
    assert_eq!(
        q.drain_idle(std::slice::from_ref(&worker.id)).await.unwrap(),
        vec![worker.id.clone()]
    );
    q.register_worker(&worker).await.unwrap();
    assert_eq!(
        q.worker_heartbeat(&worker.id).await.unwrap(),
        Some(queue::WorkerState::Draining)
    );
    assert!(q
        .claim_and_start(&worker.id, &[TaskType::TextGeneration], 1)
        .await
        .unwrap()
        .is_empty());

    // Not stopped after all: the controller's pass releases the mark.
    assert_eq!(
        q.undrain_marked(std::slice::from_ref(&worker.id)).await.unwrap(),
        vec![worker.id.clone()]
    );
    let claimed = q
        .claim_and_start(&worker.id, &[TaskType::TextGeneration], 1)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    q.complete(&worker.id, claimed[0].lease(), serde_json::json!({}))
        .await
        .unwrap();
    // Drained and removed (recorded stopped), then started again: running.
    q.drain_idle(std::slice::from_ref(&worker.id)).await.unwrap();
    assert_eq!(
        q.mark_stopped(std::slice::from_ref(&worker.id)).await.unwrap(),
        vec![worker.id.clone()]
    );
    q.register_worker(&worker).await.unwrap();
    assert_eq!(
        q.worker_heartbeat(&worker.id).await.unwrap(),
        Some(queue::WorkerState::Running)
    );
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_job_with_a_failed_task_fails_when_the_last_open_one_completes_and_completes_once_retried(
    pool: PgPool,
) {
    let q = queue(pool);
    let job = q.enqueue(reading_job("x").max_attempts(1)).await.unwrap().job;
    let text = claim_one(&q, "w1", TaskType::TextGeneration).await;
    q.complete("w1", text.lease(), json!({})).await.unwrap();
    let pdf = claim_one(&q, "w1", TaskType::PdfGeneration).await;
    let audio = claim_one(&q, "w2", TaskType::AudioGeneration).await;

    q.fail("w1", pdf.lease(), &Failure::permanent("typesetting broke"))
        .await
        .unwrap();
    assert_eq!(
        q.job(TENANT, job.id).await.unwrap().status,
        JobStatus::Processing,
        "audio is still running"
    );
    q.complete("w2", audio.lease(), json!({})).await.unwrap();
    let failed = q.job(TENANT, job.id).await.unwrap();
    assert_eq!(failed.status, JobStatus::Failed);
    assert!(failed.error.unwrap().contains("typesetting broke"));

    // Only the pdf task runs again; its completion is the job's last.
    q.retry_job(TENANT, job.id).await.unwrap();
    let pdf = claim_one(&q, "w1", TaskType::PdfGeneration).await;
    assert_eq!(q.job(TENANT, job.id).await.unwrap().status, JobStatus::Processing);
    q.complete("w1", pdf.lease(), json!({})).await.unwrap();
    let done = q.job(TENANT, job.id).await.unwrap();
    assert_eq!(done.status, JobStatus::Complete);
    assert_eq!(done.error, None);
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn completing_a_cancelled_jobs_task_is_refused_and_the_job_stays_cancelled(pool: PgPool) {
    let q = queue(pool);
    let job = q.enqueue(text_job("x")).await.unwrap().job;
    let text = claim_one(&q, "w1", TaskType::TextGeneration).await;
    q.cancel_job(TENANT, job.id).await.unwrap();

    assert!(matches!(
        q.complete("w1", text.lease(), json!({})).await,
        Err(QueueError::LeaseLost { .. })
    ));
    assert_eq!(q.job(TENANT, job.id).await.unwrap().status, JobStatus::Cancelled);
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_jobs_last_two_tasks_completing_at_once_complete_it(pool: PgPool) {
    let q = queue(pool);
    for round in 0..10 {
        let job = q
            .enqueue(reading_job(&format!("race {round}")))
            .await
            .unwrap()
            .job;
        let text = claim_one(&q, "w1", TaskType::TextGeneration).await;
        q.complete("w1", text.lease(), json!({})).await.unwrap();
        let pdf = claim_one(&q, "w1", TaskType::PdfGeneration).await;
        let audio = claim_one(&q, "w2", TaskType::AudioGeneration).await;

        let (a, b) = tokio::join!(
            q.complete("w1", pdf.lease(), json!({})),
            q.complete("w2", audio.lease(), json!({}))
        );
        a.unwrap();
        b.unwrap();
        let job = q.job(TENANT, job.id).await.unwrap();
        assert_eq!(job.status, JobStatus::Complete, "round {round}");
        assert!(job.finished_at.is_some());
    }
}

/// A queue over one connection the pool hands out untested, so a
/// connection the server killed reaches the call instead of being
/// replaced quietly by the pool's check.
async fn queue_on_one_connection(pool: &PgPool) -> queue::Queue {
    let one = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .test_before_acquire(false)
        .connect_with(pool.connect_options().as_ref().clone())
        .await
        .unwrap();
    queue(one)
}

/// End the session of `q`'s one connection from `pool`, as a server
/// restart or an operator would.
async fn kill_the_connection_of(q: &queue::Queue, pool: &PgPool) {
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(q.pool())
        .await
        .unwrap();
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 5000)")
        .bind(pid)
        .fetch_one(pool)
        .await
        .unwrap();
    assert!(killed);
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn calls_safe_to_repeat_survive_a_connection_the_server_killed(pool: PgPool) {
    let q = queue_on_one_connection(&pool).await;
    q.enqueue(text_job("x")).await.unwrap();

    // The server ends the session (a restart, a failover, an operator):
    // the claim's first try fails on the dead connection and its repeat
    // runs on a new one.
    kill_the_connection_of(&q, &pool).await;
    let task = claim_one(&q, "w", TaskType::TextGeneration).await;

    kill_the_connection_of(&q, &pool).await;
    q.complete("w", task.lease(), json!({ "text": "done" }))
        .await
        .expect("the completion is repeated on a new connection");
    assert_eq!(
        q.job_by_id(task.job_id).await.unwrap().status,
        JobStatus::Complete
    );
}

/// The pool `Queue::connect` makes skips sqlx's ping before a statement on
/// a connection just returned (and pinged then), but still pings one that
/// sat idle: a connection the server killed meanwhile is replaced before a
/// call takes it, even a call that is not repeated on an error (a read).
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn the_pool_replaces_a_connection_the_server_killed_while_it_sat_idle(pool: PgPool) {
    let one = queue::pool_options(1)
        .connect_with(pool.connect_options().as_ref().clone())
        .await
        .unwrap();
    let q = queue(one);
    let job = q.enqueue(text_job("x")).await.unwrap().job;

    kill_the_connection_of(&q, &pool).await;
    tokio::time::sleep(queue::PING_WHEN_IDLE_FOR).await;
    let read = q
        .job_by_id(job.id)
        .await
        .expect("the read runs on a new connection");
    assert_eq!(read.status, JobStatus::Queued);
}

/// The ids of the tasks `worker` holds `processing`, in order.
async fn processing_by(pool: &PgPool, worker: &str) -> Vec<i64> {
    sqlx::query_scalar("SELECT id FROM job_tasks WHERE claimed_by = $1 AND status = 'processing' ORDER BY id")
        .bind(worker)
        .fetch_all(pool)
        .await
        .unwrap()
}

/// A claim whose answer was lost (it committed; the connection was cut
/// before the reply) is repeated with its nonce and gets the tasks it took.
/// Repeated as a new claim, it took the next tasks instead, and the first
/// stayed with a worker that never heard of them until the sweeper.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_claim_whose_answer_was_lost_returns_the_tasks_it_took(pool: PgPool) {
    use test_support::pg_proxy::AnswerLosingProxy;
    let proxy = AnswerLosingProxy::in_front_of(&pool, b"claim_and_start_tasks").await;
    let through_proxy = proxy.pool(&pool, 2).await;
    let q = queue(pool.clone());
    q.enqueue_batch((0..4).map(|i| text_job(&format!("{i}"))).collect())
        .await
        .unwrap();

    let got = queue(through_proxy)
        .claim_and_start("w", &[TaskType::TextGeneration], 2)
        .await
        .expect("the claim is repeated on a new connection");
    assert_eq!(proxy.cuts(), 1, "the first answer was lost");
    let held = processing_by(&pool, "w").await;
    let mut returned: Vec<i64> = got.iter().map(|t| t.id).collect();
    returned.sort();
    assert_eq!(
        returned, held,
        "the repeat returned what the worker holds, and took nothing more"
    );
    assert_eq!(held.len(), 2);
    assert!(got.iter().all(|t| t.attempts == 1), "{got:?}");
}

/// The call a worker makes after every batch: its completions and its next
/// claim in one transaction. When the answer is lost, the repeat reports the
/// completions again and returns the batch the lost call claimed. Before,
/// it claimed afresh (here: nothing was left) and the batch stayed with
/// the worker, unknown to it, until the sweeper.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_completion_and_claim_whose_answer_was_lost_returns_the_tasks_it_took(pool: PgPool) {
    use test_support::pg_proxy::AnswerLosingProxy;
    let proxy = AnswerLosingProxy::in_front_of(&pool, b"complete_and_claim_next").await;
    let q = queue(pool.clone());
    q.enqueue_batch((0..4).map(|i| text_job(&format!("{i}"))).collect())
        .await
        .unwrap();
    let first = q
        .claim_and_start("w", &[TaskType::TextGeneration], 2)
        .await
        .unwrap();
    let results: Vec<_> = first.iter().map(|t| (t.lease(), json!({ "n": t.id }))).collect();

    let done = queue(proxy.pool(&pool, 2).await)
        .complete_and_claim("w", &results, &[TaskType::TextGeneration], 2)
        .await
        .expect("the call is repeated on a new connection");
    assert_eq!(proxy.cuts(), 1, "the first answer was lost");
    let mut completed: Vec<i64> = done.completed.iter().map(|l| l.task_id).collect();
    completed.sort();
    let mut finished: Vec<i64> = first.iter().map(|t| t.id).collect();
    finished.sort();
    assert_eq!(completed, finished, "the completions are reported done");
    let held = processing_by(&pool, "w").await;
    let mut claimed: Vec<i64> = done.claimed.iter().map(|t| t.id).collect();
    claimed.sort();
    assert_eq!(claimed, held, "the repeat returned the batch the worker holds");
    assert_eq!(held.len(), 2);
    assert!(done.claimed.iter().all(|t| t.attempts == 1), "{:?}", done.claimed);
}

/// Instances of the previous release, still running while an upgrade rolls
/// out, complete through the signatures without the tasks' jobs: a repeat
/// is still reported, each task's job looked up. Through the new
/// signature, a repeat naming the wrong job is not reported (the lease is
/// taken as lost) and changes nothing.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn completions_repeated_through_the_previous_signatures_are_reported_again(pool: PgPool) {
    let q = queue(pool.clone());
    q.enqueue_batch((0..3).map(|i| text_job(&format!("{i}"))).collect())
        .await
        .unwrap();
    let mut held = q
        .claim_and_start("w", &[TaskType::TextGeneration], 3)
        .await
        .unwrap();
    held.sort_by_key(|t| t.id);

    let complete = |task: &queue::Task| {
        sqlx::query_scalar::<_, i64>("SELECT task_id FROM complete_tasks('w', $1, $2, ARRAY['{}'::jsonb])")
            .bind(vec![task.id])
            .bind(vec![task.claims])
            .fetch_all(&pool)
    };
    for call in ["first", "repeat"] {
        assert_eq!(complete(&held[0]).await.unwrap(), vec![held[0].id], "{call}");
    }
    let complete_and_claim = |task: &queue::Task| {
        sqlx::query_as::<_, (i64, String)>(
            "SELECT id, status FROM complete_and_claim_next('w', $1, $2, ARRAY['{}'::jsonb], '{text_generation}', 1)",
        )
        .bind(vec![task.id])
        .bind(vec![task.claims])
        .fetch_all(&pool)
    };
    for call in ["first", "repeat"] {
        assert_eq!(
            complete_and_claim(&held[1]).await.unwrap(),
            vec![(held[1].id, "complete".to_string())],
            "{call}"
        );
    }

    let lease = held[2].lease();
    let result = [(lease, json!({}))];
    assert_eq!(q.complete_batch("w", &result).await.unwrap(), vec![lease]);
    let wrong_job = queue::Lease {
        job_id: held[0].job_id,
        ..lease
    };
    assert!(q
        .complete_batch("w", &[(wrong_job, json!({"text": "again"}))])
        .await
        .unwrap()
        .is_empty());
    assert_eq!(q.complete_batch("w", &result).await.unwrap(), vec![lease]);
    for task in &held {
        let job = q.job_with_tasks(TENANT, task.job_id).await.unwrap();
        assert_eq!(job.job.status, JobStatus::Complete);
        assert_eq!(job.tasks[0].output, Some(json!({})));
    }
}

/// The nonce from plain SQL: the same nonce again returns the same tasks
/// (those still held), a new one claims the next.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_claim_repeated_with_its_nonce_returns_its_tasks_still_held(pool: PgPool) {
    let q = queue(pool.clone());
    q.enqueue_batch((0..5).map(|i| text_job(&format!("{i}"))).collect())
        .await
        .unwrap();
    let claim = |nonce: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT id FROM claim_tasks('w', '{text_generation}', 2, $1::uuid) ORDER BY id",
            )
            .bind(nonce)
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    const FIRST: &str = "01890000-0000-7000-8000-000000000001";
    const SECOND: &str = "01890000-0000-7000-8000-000000000002";
    let first = claim(FIRST).await;
    assert_eq!(first.len(), 2);
    assert_eq!(claim(FIRST).await, first, "a repeat claims nothing new");

    let second = claim(SECOND).await;
    assert_eq!(second.len(), 2);
    assert!(
        second.iter().all(|id| !first.contains(id)),
        "{first:?} {second:?}"
    );
    // One of the second batch finishes: a repeat returns the one still held.
    let lease = queue::Lease {
        task_id: second[0],
        job_id: sqlx::query_scalar("SELECT job_id FROM job_tasks WHERE id = $1")
            .bind(second[0])
            .fetch_one(&pool)
            .await
            .unwrap(),
        claim: 1,
    };
    q.complete("w", lease, json!({ "text": "done" })).await.unwrap();
    assert_eq!(claim(SECOND).await, vec![second[1]]);
    // Without a nonce a claim is a new claim, as before.
    let plain: Vec<i64> = sqlx::query_scalar("SELECT id FROM claim_tasks('w', '{text_generation}', 2)")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(plain.len(), 1, "the fifth task");
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_retry_waits_as_long_as_the_failure_asked_when_that_is_longer_than_the_backoff(pool: PgPool) {
    // Base 10 s: the first retry would come back in 5 to 10 s.
    let q = queue(pool.clone());
    q.enqueue(text_job("x")).await.unwrap();
    let task = claim_one(&q, "w1", TaskType::TextGeneration).await;
    let failed_at = chrono::Utc::now();
    let refused = Failure::retryable("llm: HTTP 429").with_retry_after(std::time::Duration::from_secs(120));
    let RetryOutcome::RetryAt(run_at) = q.fail("w1", task.lease(), &refused).await.unwrap() else {
        panic!("a retryable failure with attempts left is retried");
    };
    let delay = (run_at - failed_at).num_milliseconds() as f64 / 1000.0;
    assert!(
        (119.0..=121.0).contains(&delay),
        "retried after {delay} s, not the 120 s asked"
    );
    let fair_at: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT fair_at FROM job_tasks WHERE id = $1")
            .bind(task.id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(
        fair_at >= failed_at + chrono::Duration::seconds(119),
        "its place in line is no earlier than the wait either: {fair_at}"
    );

    // A wait shorter than the backoff leaves the backoff.
    make_retries_due(&pool).await;
    let task = claim_one(&q, "w1", TaskType::TextGeneration).await;
    let failed_at = chrono::Utc::now();
    let brief = Failure::retryable("llm: HTTP 429").with_retry_after(std::time::Duration::from_secs(1));
    let RetryOutcome::RetryAt(run_at) = q.fail("w1", task.lease(), &brief).await.unwrap() else {
        panic!("retried");
    };
    let delay = (run_at - failed_at).num_milliseconds() as f64 / 1000.0;
    assert!(
        (9.0..=21.0).contains(&delay),
        "second attempt's backoff is 10 to 20 s: {delay} s"
    );
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_wait_past_what_an_interval_holds_is_recorded_at_the_bound(pool: PgPool) {
    // The field is public, so a caller can skip with_retry_after's bound;
    // unbounded, the database refused the interval, the failure was never
    // recorded and the lease was left to the sweeper.
    let q = queue(pool);
    q.enqueue(text_job("x")).await.unwrap();
    let task = claim_one(&q, "w1", TaskType::TextGeneration).await;
    let failed_at = chrono::Utc::now();
    let absurd = Failure {
        retry_after: Some(std::time::Duration::MAX),
        ..Failure::retryable("llm: HTTP 429")
    };
    let RetryOutcome::RetryAt(run_at) = q.fail("w1", task.lease(), &absurd).await.unwrap() else {
        panic!("a retryable failure with attempts left is retried");
    };
    let delay = (run_at - failed_at).num_seconds();
    let bound = queue::MAX_RETRY_AFTER.as_secs() as i64;
    assert!(
        (bound - 2..=bound + 2).contains(&delay),
        "retried after {delay} s, not the bound's {bound} s"
    );
    assert_eq!(
        Failure::retryable("x")
            .with_retry_after(std::time::Duration::MAX)
            .retry_after,
        Some(queue::MAX_RETRY_AFTER)
    );
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn the_default_backoff_starts_at_two_seconds_and_stops_growing_at_ten_minutes(pool: PgPool) {
    let defaults = queue::QueueConfig::default();
    for (attempt, full) in [(1, 2.0), (2, 4.0), (9, 512.0), (10, 600.0), (30, 600.0)] {
        let delay: f64 = sqlx::query_scalar("SELECT extract(epoch FROM retry_backoff($1, $2, $3))::float8")
            .bind(attempt)
            .bind(defaults.retry_base.as_secs_f64())
            .bind(defaults.retry_cap.as_secs_f64())
            .fetch_one(&pool)
            .await
            .unwrap();
        // Equal jitter: half fixed, half random.
        assert!(
            (full / 2.0..=full).contains(&delay),
            "attempt {attempt}: {delay} s, expected {} to {full} s",
            full / 2.0
        );
    }
}

/// Waiting for the schema rides out a connection the server ends, as a
/// database restart does ("terminating connection due to administrator
/// command"): `make chaos` saw two workers started during a restart exit
/// on it instead of waiting.
#[sqlx::test(migrations = false)]
async fn waiting_for_the_schema_outlasts_a_connection_the_server_ended(pool: PgPool) {
    // One connection, reused without a check: the ended one is met.
    let waiting_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .test_before_acquire(false)
        .connect_with(
            (*pool.connect_options())
                .clone()
                .application_name("schema-waiter"),
        )
        .await
        .unwrap();
    let q = queue::Queue::new(waiting_pool);
    assert!(!q.is_ready().await.unwrap(), "no schema yet");
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'schema-waiter'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(ended, [true]);

    let waiting = tokio::spawn(async move { q.wait_for_schema(std::time::Duration::from_millis(50)).await });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "it gave up on the ended connection: {:?}",
        waiting.await
    );
    queue::MIGRATOR.run(&pool).await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
        .await
        .expect("the schema was seen")
        .unwrap()
        .unwrap();
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn one_call_completing_a_jobs_last_two_tasks_moves_it_to_history_with_both_outputs(pool: PgPool) {
    let q = queue(pool.clone());
    let job = q.enqueue(reading_job("x")).await.unwrap().job;
    let text = claim_one(&q, "w1", TaskType::TextGeneration).await;
    q.complete("w1", text.lease(), json!({"text": "t"}))
        .await
        .unwrap();
    let both = q
        .claim("w2", &[TaskType::PdfGeneration, TaskType::AudioGeneration], 10)
        .await
        .unwrap();
    assert_eq!(both.len(), 2);
    // A lease of the first round of the text task rides along: not this
    // worker's, it is neither completed nor counted.
    let mut results: Vec<_> = both
        .iter()
        .map(|t| (t.lease(), json!({ "kind": t.task_type.as_str() })))
        .collect();
    results.push((text.lease(), json!({"text": "stale"})));
    let done = q.complete_batch("w2", &results).await.unwrap();
    assert_eq!(done.len(), 2, "{done:?}");

    let finished = q.job(TENANT, job.id).await.unwrap();
    assert_eq!((finished.status, finished.error), (JobStatus::Complete, None));
    let counted: i32 = sqlx::query_scalar("SELECT tasks_complete FROM job_history WHERE id = $1")
        .bind(job.id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(counted, 3);
    assert_eq!(count(&pool, "jobs").await, 0, "moved out of the open table");
    assert_eq!(count(&pool, "job_tasks").await, 0);
    for task in q.tasks_of(job.id).await.unwrap() {
        assert_eq!(task.status, TaskStatus::Complete, "{task:?}");
        assert!(task.finished_at.is_some());
    }
    assert_eq!(
        q.task_output(job.id, TaskType::PdfGeneration).await.unwrap(),
        Some(json!({"kind": "pdf_generation"}))
    );
    assert_eq!(
        q.task_output(job.id, TaskType::TextGeneration).await.unwrap(),
        Some(json!({"text": "t"})),
        "the stale lease's output was not written"
    );
    // Repeated after a lost answer: reported as done again, nothing changes.
    let again = q.complete_batch("w2", &results[..2]).await.unwrap();
    assert_eq!(again.len(), 2);
}

/// A completion that finishes every job it names (one-task jobs, the
/// common batch) looks each task up twice in the task key: to lock its job
/// and to check its claim. The update of the tasks left open, which has
/// none to update then, is skipped; it looked each one up a third time.
/// Each job it looks up twice in the job key, to lock it and to read its
/// counters; the delete that moves it to history reads the row where the
/// counters were read (it looked the job up a third time before).
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn completing_one_task_jobs_looks_each_task_and_each_job_up_twice(pool: PgPool) {
    // Keyed, so each job has a row of its own.
    completing_one_task_jobs_looks_up(pool, true, 2, 2).await;
}

/// A job kept in its task's row has no job row to look up: the completion
/// looks its task up three times (to find that it has no job row to lock,
/// to lock and check it, to delete it) and no job.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn completing_jobs_kept_in_their_task_rows_looks_each_task_up_three_times_and_no_job(pool: PgPool) {
    completing_one_task_jobs_looks_up(pool, false, 3, 0).await;
}

async fn completing_one_task_jobs_looks_up(pool: PgPool, keyed: bool, per_task: i64, per_job: i64) {
    let Some(one) = one_connection_with_statistics(&pool).await else {
        return;
    };
    let q = queue(one.clone());
    const TASKS: i64 = 50;
    q.enqueue_batch(
        (0..TASKS)
            .map(|i| match keyed {
                true => text_job(&i.to_string()).idempotency_key(i.to_string()),
                false => text_job(&i.to_string()),
            })
            .collect(),
    )
    .await
    .unwrap();
    let held = q
        .claim("w", &[TaskType::TextGeneration], TASKS as i32)
        .await
        .unwrap();
    assert_eq!(held.len() as i64, TASKS);
    let lookups = |index: &'static str| {
        let one = one.clone();
        async move {
            flush_statistics(&one).await;
            sqlx::query_scalar::<_, i64>("SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = $1")
                .bind(index)
                .fetch_one(&one)
                .await
                .unwrap()
        }
    };
    let (tasks_before, jobs_before) = (lookups("job_tasks_pkey").await, lookups("jobs_pkey").await);
    let results: Vec<_> = held.iter().map(|t| (t.lease(), json!({"ok": true}))).collect();
    assert_eq!(q.complete_batch("w", &results).await.unwrap().len() as i64, TASKS);
    let tasks_looked_up = lookups("job_tasks_pkey").await - tasks_before;
    let jobs_looked_up = lookups("jobs_pkey").await - jobs_before;
    assert!(
        tasks_looked_up <= per_task * TASKS + 5 && jobs_looked_up <= per_job * TASKS + 5,
        "completing {TASKS} one-task jobs looked tasks up {tasks_looked_up} times and jobs {jobs_looked_up} times"
    );
    // And each finished as it should: complete, with its output, in history.
    let finished: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM task_history WHERE status = 'complete' AND output = '{\"ok\": true}'",
    )
    .fetch_one(&one)
    .await
    .unwrap();
    assert_eq!(finished, TASKS);
    assert_eq!(count(&pool, "jobs").await, 0);
}
