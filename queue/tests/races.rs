//! Races reproduced with two (or three) connections: one transaction is held
//! open at the worst moment while another runs, and the test waits until the
//! second has either finished or is blocked on a lock before letting the
//! first commit. Each of these left a job unfinished, applied a dead lease or
//! deadlocked before the queue took one lock order and unique leases.

mod common;

use std::time::Duration;

use common::*;
use queue::{Failure, JobStatus, Lease, Queue, QueueError, TaskStatus, TaskType};
use serde_json::json;
use sqlx::{PgPool, Postgres, Transaction};
use tokio::task::JoinHandle;

/// A reading job whose text is complete, with pdf and audio claimed by w1
/// and w2: the moment two of its tasks can finish together.
async fn reading_job_at_its_last_two_tasks(q: &Queue) -> (uuid::Uuid, Lease, Lease) {
    let job = q.enqueue(reading_job("tides")).await.unwrap().job;
    let text = claim_one(q, "w0", TaskType::TextGeneration).await;
    q.complete("w0", text.lease(), json!({})).await.unwrap();
    let pdf = claim_one(q, "w1", TaskType::PdfGeneration).await;
    let audio = claim_one(q, "w2", TaskType::AudioGeneration).await;
    (job.id, pdf.lease(), audio.lease())
}

/// Begin a transaction that fails `lease` for good (as `Queue::fail` does)
/// and keep it open.
async fn fail_and_hold(pool: &PgPool, worker: &str, lease: Lease) -> Transaction<'static, Postgres> {
    let mut tx = pool.begin().await.unwrap();
    let row: Option<(String,)> =
        sqlx::query_as("SELECT status FROM fail_task($1, $2, $3, 'boom', false, 1, 10)")
            .bind(worker)
            .bind(lease.task_id)
            .bind(lease.claim)
            .fetch_optional(&mut *tx)
            .await
            .unwrap();
    assert_eq!(row, Some(("failed".to_string(),)));
    tx
}

/// Begin a transaction that completes `lease` (as `Queue::complete` does)
/// and keep it open.
async fn complete_and_hold(pool: &PgPool, worker: &str, lease: Lease) -> Transaction<'static, Postgres> {
    let mut tx = pool.begin().await.unwrap();
    let done: Vec<i64> =
        sqlx::query_scalar("SELECT task_id FROM complete_tasks($1, $2, $3, ARRAY['{}'::jsonb])")
            .bind(worker)
            .bind(vec![lease.task_id])
            .bind(vec![lease.claim])
            .fetch_all(&mut *tx)
            .await
            .unwrap();
    assert_eq!(done, vec![lease.task_id]);
    tx
}

async fn job_status(q: &Queue, job: uuid::Uuid) -> JobStatus {
    q.job_by_id(job).await.unwrap().status
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn two_tasks_failing_at_once_fail_their_job(pool: PgPool) {
    let q = queue(pool.clone());
    let (job, pdf, audio) = reading_job_at_its_last_two_tasks(&q).await;

    let held = fail_and_hold(&pool, "w1", pdf).await;
    let other = {
        let q = q.clone();
        tokio::spawn(async move { q.fail("w2", audio, &Failure::permanent("boom too")).await })
    };
    until_done_or_blocked(&pool, &other, 1).await;
    held.commit().await.unwrap();
    other.await.unwrap().unwrap();

    assert_eq!(
        job_status(&q, job).await,
        JobStatus::Failed,
        "every task is final, so the job is"
    );
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_completion_and_a_failure_at_once_fail_their_job(pool: PgPool) {
    let q = queue(pool.clone());
    let (job, pdf, audio) = reading_job_at_its_last_two_tasks(&q).await;

    let held = complete_and_hold(&pool, "w1", pdf).await;
    let other = {
        let q = q.clone();
        tokio::spawn(async move { q.fail("w2", audio, &Failure::permanent("no voice")).await })
    };
    until_done_or_blocked(&pool, &other, 1).await;
    held.commit().await.unwrap();
    other.await.unwrap().unwrap();

    assert_eq!(job_status(&q, job).await, JobStatus::Failed);
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_completion_and_a_sweep_at_once_finish_their_job(pool: PgPool) {
    let q = queue(pool.clone());
    let mut new = reading_job("tides");
    new.max_attempts = 1;
    let job = q.enqueue(new).await.unwrap().job.id;
    let text = claim_one(&q, "w0", TaskType::TextGeneration).await;
    q.complete("w0", text.lease(), json!({})).await.unwrap();
    let pdf = claim_one(&q, "w1", TaskType::PdfGeneration).await;
    let audio = claim_one(&q, "w2", TaskType::AudioGeneration).await;
    age_heartbeat(&pool, audio.lease(), Duration::from_secs(600)).await;

    // pdf completes while the sweeper (as in another API process) fails
    // the stale audio task.
    let held = complete_and_hold(&pool, "w1", pdf.lease()).await;
    let sweep = {
        let q = q.clone();
        tokio::spawn(async move { q.sweep(Duration::from_secs(60)).await })
    };
    until_done_or_blocked(&pool, &sweep, 1).await;
    held.commit().await.unwrap();
    let swept = sweep.await.unwrap().unwrap();
    // A sweep that found the job held skips it until its next run.
    if swept.tasks.is_empty() {
        let again = q.sweep(Duration::from_secs(60)).await.unwrap();
        assert_eq!(again.failed(), 1);
    } else {
        assert_eq!(swept.failed(), 1);
    }

    assert_eq!(job_status(&q, job).await, JobStatus::Failed);
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_released_lease_stays_dead_when_the_same_worker_claims_again(pool: PgPool) {
    let q = queue(pool);
    q.enqueue(text_job("x")).await.unwrap();
    let first = claim_one(&q, "pod-a", TaskType::TextGeneration).await;
    assert_eq!(q.release("pod-a", &[first.lease()]).await.unwrap().len(), 1);
    // The replica restarts under the same name and claims the task again.
    let second = claim_one(&q, "pod-a", TaskType::TextGeneration).await;
    assert_eq!(second.id, first.id);
    assert_eq!(
        second.attempts, first.attempts,
        "a release gives the attempt back"
    );

    let late = q.complete("pod-a", first.lease(), json!({"from": "old"})).await;
    assert!(
        matches!(late, Err(QueueError::LeaseLost { .. })),
        "the released claim completed the task: {late:?}"
    );
    assert!(q.heartbeat("pod-a", &[first.lease()]).await.unwrap() == vec![first.lease()]);
    q.complete("pod-a", second.lease(), json!({"from": "new"}))
        .await
        .unwrap();
    let task = &q.tasks_of(first.job_id).await.unwrap()[0];
    assert_eq!(task.output, Some(json!({"from": "new"})));
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_lease_of_a_failed_round_stays_dead_after_the_job_is_retried(pool: PgPool) {
    let q = queue(pool.clone());
    let mut new = text_job("x");
    new.max_attempts = 1;
    let job = q.enqueue(new).await.unwrap().job.id;
    let first = claim_one(&q, "pod-a", TaskType::TextGeneration).await;
    age_heartbeat(&pool, first.lease(), Duration::from_secs(600)).await;
    q.sweep(Duration::from_secs(60)).await.unwrap();
    assert_eq!(job_status(&q, job).await, JobStatus::Failed);

    q.retry_job(TENANT, job).await.unwrap();
    let second = claim_one(&q, "pod-a", TaskType::TextGeneration).await;
    assert_eq!(second.attempts, 1, "a retried job starts its attempts again");

    let late = q.complete("pod-a", first.lease(), json!({})).await;
    assert!(
        matches!(late, Err(QueueError::LeaseLost { .. })),
        "the swept claim completed the retried task: {late:?}"
    );
    let task = &q.tasks_of(job).await.unwrap()[0];
    assert_eq!(task.status, TaskStatus::Claimed);
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_claimer_without_a_registry_row_is_never_drained(pool: PgPool) {
    let q = queue(pool);
    q.enqueue(text_job("x")).await.unwrap();
    claim_one(&q, "ghost", TaskType::TextGeneration).await;

    let drained = q.drain_idle(&["ghost".to_string()]).await.unwrap();
    assert!(
        drained.is_empty(),
        "a replica holding a task was drained: {drained:?}"
    );
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_drain_racing_an_unregistered_claim_waits_for_it_and_keeps_the_claimer(pool: PgPool) {
    let q = queue(pool.clone());
    q.enqueue(text_job("x")).await.unwrap();

    let mut claim = pool.begin().await.unwrap();
    let claimed: Vec<(i64,)> =
        sqlx::query_as("SELECT id FROM claim_tasks('ghost', ARRAY['text_generation'], 1)")
            .fetch_all(&mut *claim)
            .await
            .unwrap();
    assert_eq!(claimed.len(), 1);
    let drain = {
        let q = q.clone();
        tokio::spawn(async move { q.drain_idle(&["ghost".to_string()]).await })
    };
    until_done_or_blocked(&pool, &drain, 1).await;
    claim.commit().await.unwrap();

    let drained = drain.await.unwrap().unwrap();
    assert!(
        drained.is_empty(),
        "the claimer was drained while its claim committed: {drained:?}"
    );
    let state: String = sqlx::query_scalar("SELECT state FROM workers WHERE id = 'ghost'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(state, "running");
}

/// A third connection holds the job, so both racers queue up behind it in a
/// known order: the cancel first, then the other call. A job kept in its
/// task's row is held there.
async fn hold_job(pool: &PgPool, job: uuid::Uuid) -> Transaction<'static, Postgres> {
    let mut tx = pool.begin().await.unwrap();
    let held: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM (SELECT 1 FROM jobs WHERE id = $1 FOR NO KEY UPDATE) j)
              + (SELECT count(*) FROM (SELECT 1 FROM job_tasks WHERE job_id = $1 AND job_input IS NOT NULL
                                       FOR NO KEY UPDATE) t)",
    )
    .bind(job)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!(held, 1, "the job is open");
    tx
}

fn cancel(q: &Queue, job: uuid::Uuid) -> JoinHandle<Result<queue::Job, QueueError>> {
    let q = q.clone();
    tokio::spawn(async move { q.cancel_job(TENANT, job).await })
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_cancel_and_a_completion_of_one_job_do_not_deadlock(pool: PgPool) {
    let q = queue(pool.clone());
    let job = q.enqueue(text_job("x")).await.unwrap().job.id;
    let task = claim_one(&q, "w1", TaskType::TextGeneration).await;

    let holder = hold_job(&pool, job).await;
    let cancelling = cancel(&q, job);
    until_done_or_blocked(&pool, &cancelling, 1).await;
    // The completion as a worker sends it, without the library's retry, so
    // a deadlock shows as an error.
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
    until_done_or_blocked(&pool, &completing, 2).await;
    holder.commit().await.unwrap();

    let completed = completing
        .await
        .unwrap()
        .expect("the completion must not deadlock");
    match cancelling.await.unwrap() {
        Ok(job) => {
            assert_eq!(job.status, JobStatus::Cancelled);
            assert!(completed.is_empty(), "a cancelled task was completed");
        }
        Err(QueueError::InvalidState { .. }) => assert_eq!(completed, vec![task.id]),
        Err(e) => panic!("the cancel failed: {e}"),
    }
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_cancel_and_a_claim_of_one_job_do_not_deadlock(pool: PgPool) {
    let q = queue(pool.clone());
    // A job with a row of its own, locked apart from its task (a key keeps
    // it there): a job kept in its task's row has one lock for both.
    let job = q
        .enqueue(text_job("x").idempotency_key("x"))
        .await
        .unwrap()
        .job
        .id;

    let holder = hold_job(&pool, job).await;
    let cancelling = cancel(&q, job);
    until_done_or_blocked(&pool, &cancelling, 1).await;
    let claiming = {
        let pool = pool.clone();
        tokio::spawn(async move {
            sqlx::query_scalar::<_, i64>("SELECT id FROM claim_tasks('w1', ARRAY['text_generation'], 1)")
                .fetch_all(&pool)
                .await
        })
    };
    until_done_or_blocked(&pool, &claiming, 2).await;
    holder.commit().await.unwrap();

    let claimed = claiming.await.unwrap().expect("the claim must not deadlock");
    assert_eq!(claimed.len(), 1, "the task was runnable and unlocked");
    let job = cancelling.await.unwrap().expect("the cancel must not deadlock");
    assert_eq!(job.status, JobStatus::Cancelled);
    let task = &q.tasks_of(job.id).await.unwrap()[0];
    assert_eq!(
        task.status,
        TaskStatus::Cancelled,
        "the claimed task was cancelled with its job"
    );
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_job_left_unfinished_after_its_tasks_is_repaired_once(pool: PgPool) {
    let q = queue(pool.clone());
    let (job, pdf, audio) = reading_job_at_its_last_two_tasks(&q).await;
    q.complete("w1", pdf, json!({})).await.unwrap();
    q.fail("w2", audio, &Failure::permanent("no voice"))
        .await
        .unwrap();
    assert_eq!(job_status(&q, job).await, JobStatus::Failed);
    assert!(
        q.repair_stuck_jobs().await.unwrap().is_empty(),
        "nothing to repair"
    );

    // The state the old race left behind.
    test_support::reopen_in_place(&pool, job).await;
    sqlx::query("UPDATE jobs SET status = 'processing', finished_at = NULL, error = NULL WHERE id = $1")
        .bind(job)
        .execute(&pool)
        .await
        .unwrap();
    let repaired = q.repair_stuck_jobs().await.unwrap();
    assert_eq!(repaired.len(), 1);
    assert_eq!(repaired[0].job_id, job);
    assert_eq!(repaired[0].status, JobStatus::Failed);
    let after = q.job_by_id(job).await.unwrap();
    assert!(after.finished_at.is_some() && after.error.as_deref().unwrap_or("").contains("no voice"));
    assert!(q.repair_stuck_jobs().await.unwrap().is_empty(), "repaired once");
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_completion_chosen_as_a_deadlock_victim_is_repeated_and_applies(pool: PgPool) {
    let q = queue(pool.clone());
    let job = q.enqueue(text_job("x")).await.unwrap().job;
    let task = claim_one(&q, "w", TaskType::TextGeneration).await;

    // Another session (a script, a migration) takes the locks in the
    // opposite order: the task first, then its job. Its deadlock check
    // waits a minute, so the completion's (after 1 s) is the one to find
    // the cycle and give up.
    let mut other = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL deadlock_timeout = '60s'")
        .execute(&mut *other)
        .await
        .unwrap();
    sqlx::query("UPDATE job_tasks SET updated_at = now() WHERE id = $1")
        .bind(task.id)
        .execute(&mut *other)
        .await
        .unwrap();
    let completion = tokio::spawn({
        let q = q.clone();
        let lease = task.lease();
        async move { q.complete("w", lease, json!({ "text": "done" })).await }
    });
    until_done_or_blocked(&pool, &completion, 1).await;
    assert!(!completion.is_finished(), "the completion waits for the task");
    sqlx::query("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE")
        .bind(job.id)
        .execute(&mut *other)
        .await
        .expect("the other session gets the job once the completion gave up");
    other.commit().await.unwrap();

    completion
        .await
        .unwrap()
        .expect("the completion is repeated after the deadlock and applies");
    assert_eq!(job_status(&q, job.id).await, JobStatus::Complete);
}

/// A claim writes its tasks and not its job's row (the job reads
/// `processing` off them), so a watch registering meanwhile must wait for
/// the claim's task locks. Had it read the job before the claim committed,
/// and put its watch in after the claim looked for watches, the stream
/// would show `queued` and never hear of the change.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_watch_registering_while_a_claim_commits_reads_the_job_started(pool: PgPool) {
    let q = queue(pool.clone());
    let job = q.enqueue(text_job("tides")).await.unwrap().job;

    let mut claiming = pool.begin().await.unwrap();
    let claimed: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM claim_tasks('w', ARRAY['text_generation'], 1)")
            .fetch_all(&mut *claiming)
            .await
            .unwrap();
    assert_eq!(claimed.len(), 1);
    let watching = {
        let q = q.clone();
        tokio::spawn(async move {
            q.watch_job(TENANT, job.id, uuid::Uuid::now_v7(), Duration::from_secs(60))
                .await
        })
    };
    until_done_or_blocked(&pool, &watching, 1).await;
    claiming.commit().await.unwrap();

    let seen = watching.await.unwrap().unwrap();
    assert_eq!(
        seen.status,
        JobStatus::Processing,
        "the watch read the job before the claim it raced"
    );
    let claimed_at = q.tasks_of(job.id).await.unwrap()[0].claimed_at;
    assert_eq!(seen.started_at, claimed_at, "started when claimed");
}

/// The claim number is the lease, so a claim must be on disk before its
/// lease is handed out. A claim whose commit a server crash lost would
/// otherwise give the same number to the next claimer, while the first
/// holder (workers outlive a database restart) still runs under it: two
/// holders of one lease, both passing every fence and writing one storage
/// key. Claims once turned `synchronous_commit` off for their transaction.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_claim_commits_only_once_it_is_on_disk(pool: PgPool) {
    let q = queue(pool.clone());
    q.enqueue(text_job("tides")).await.unwrap();
    q.enqueue(text_job("waves")).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    let setting = "SELECT current_setting('synchronous_commit')";
    let before: String = sqlx::query_scalar(setting).fetch_one(&mut *tx).await.unwrap();
    for claim in ["claim_tasks", "claim_and_start_tasks"] {
        let claimed: Vec<i64> = sqlx::query_scalar(&format!(
            "SELECT id FROM {claim}('w', ARRAY['text_generation'], 1)"
        ))
        .fetch_all(&mut *tx)
        .await
        .unwrap();
        assert_eq!(claimed.len(), 1, "{claim}");
        let after: String = sqlx::query_scalar(setting).fetch_one(&mut *tx).await.unwrap();
        assert_eq!(after, before, "{claim} changed synchronous_commit");
    }
    tx.commit().await.unwrap();
}

/// A completion that finishes its job, open in another transaction: the
/// job row is deleted there and its history row written, neither visible.
async fn text_job_finishing_in(q: &Queue, pool: &PgPool) -> (uuid::Uuid, Transaction<'static, Postgres>) {
    let job = q.enqueue(text_job("x")).await.unwrap().job.id;
    let task = claim_one(q, "w1", TaskType::TextGeneration).await;
    (job, complete_and_hold(pool, "w1", task.lease()).await)
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_watch_waiting_on_a_job_that_finishes_finds_it_in_history(pool: PgPool) {
    let q = queue(pool.clone());
    let (job, finishing) = text_job_finishing_in(&q, &pool).await;
    let watching = {
        let q = q.clone();
        tokio::spawn(async move {
            q.watch_job(TENANT, job, uuid::Uuid::now_v7(), Duration::from_secs(60))
                .await
        })
    };
    until_done_or_blocked(&pool, &watching, 1).await;
    finishing.commit().await.unwrap();
    let seen = watching.await.unwrap().expect("the job moved, it did not vanish");
    assert_eq!(seen.status, JobStatus::Complete);
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_cancel_waiting_on_a_job_that_finishes_is_refused_as_finished(pool: PgPool) {
    let q = queue(pool.clone());
    let (job, finishing) = text_job_finishing_in(&q, &pool).await;
    let cancelling = cancel(&q, job);
    until_done_or_blocked(&pool, &cancelling, 1).await;
    finishing.commit().await.unwrap();
    assert!(
        matches!(
            cancelling.await.unwrap(),
            Err(QueueError::InvalidState { ref status, .. }) if status == "complete"
        ),
        "a finished job cannot be cancelled, and it is found"
    );
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn two_retries_of_one_failed_job_reopen_it_once(pool: PgPool) {
    let q = queue(pool.clone());
    let job = q.enqueue(text_job("x").max_attempts(1)).await.unwrap().job.id;
    let task = claim_one(&q, "w1", TaskType::TextGeneration).await;
    q.fail("w1", task.lease(), &Failure::permanent("bad"))
        .await
        .unwrap();
    // The first retry holds the history row it is moving back.
    let mut first = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM job_history WHERE id = $1 FOR UPDATE")
        .bind(job)
        .execute(&mut *first)
        .await
        .unwrap();
    let second = {
        let q = q.clone();
        tokio::spawn(async move { q.retry_job(TENANT, job).await })
    };
    until_done_or_blocked(&pool, &second, 1).await;
    let reopened = test_support::reopen_in_place(&mut *first, job).await;
    assert_eq!(reopened, 1);
    sqlx::query("UPDATE jobs SET status = 'queued', error = NULL, finished_at = NULL WHERE id = $1")
        .bind(job)
        .execute(&mut *first)
        .await
        .unwrap();
    first.commit().await.unwrap();
    assert!(
        matches!(
            second.await.unwrap(),
            Err(QueueError::InvalidState { ref status, .. }) if status == "queued"
        ),
        "the second retry finds the job reopened, not gone"
    );
    assert_eq!(count(&pool, "all_tasks").await, 1, "its task once");
}

/// Drop the days of history older than a week, which
/// `history_partitioned_since` gave partitions.
async fn prune_a_week(q: &Queue) -> JoinHandle<Result<u64, QueueError>> {
    let q = q.clone();
    tokio::spawn(async move {
        q.prune(queue::Retention {
            older_than: Duration::from_secs(7 * 86400),
            mode: queue::RetentionMode::Delete,
            batch: 100,
        })
        .await
    })
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_job_of_a_dropped_day_finishing_while_retention_runs_is_kept(pool: PgPool) {
    test_support::history_partitioned_since(&pool, 20).await;
    let q = queue(pool.clone());
    q.enqueue(text_job("x")).await.unwrap();
    let held = claim_one(&q, "w1", TaskType::TextGeneration).await;
    // Open for twenty days, and finishing now: younger than the age once
    // done. Its day is the oldest, the first retention detaches.
    let job = test_support::backdate(&pool, held.job_id, 20).await;
    let finishing = complete_and_hold(&pool, "w1", held.lease()).await;
    let pruning = prune_a_week(&q).await;
    until_done_or_blocked(&pool, &pruning, 1).await;
    finishing.commit().await.unwrap();
    assert_eq!(
        pruning.await.unwrap().unwrap(),
        0,
        "the day held no job past the age"
    );
    assert_eq!(
        job_status(&q, job).await,
        JobStatus::Complete,
        "the job that finished during the run is kept, not dropped with its day"
    );
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_freed_key_taken_over_by_one_request_is_replayed_to_a_racing_one(pool: PgPool) {
    test_support::history_partitioned_since(&pool, 20).await;
    let q = queue(pool.clone());
    // A keyed job of a day retention dropped: its key names a job gone.
    let old = q
        .enqueue(text_job("x").idempotency_key("k"))
        .await
        .unwrap()
        .job
        .id;
    let task = claim_one(&q, "w1", TaskType::TextGeneration).await;
    q.complete("w1", task.lease(), json!({})).await.unwrap();
    test_support::backdate(&pool, old, 10).await;
    assert_eq!(prune_a_week(&q).await.await.unwrap().unwrap(), 1);
    // One request takes the key over and has not committed yet.
    let template = q.enqueue(text_job("x")).await.unwrap().job.id;
    let first = uuid::Uuid::now_v7();
    let mut taking = pool.begin().await.unwrap();
    for sql in [
        "INSERT INTO jobs (id, tenant, job_type, input, priority, idempotency_key, tasks_total)
         SELECT $1, tenant, job_type, input, priority, 'k', tasks_total FROM all_jobs WHERE id = $2",
        "UPDATE job_keys SET job_id = $1 WHERE idempotency_key = 'k'",
    ] {
        sqlx::query(sql)
            .bind(first)
            .bind(template)
            .execute(&mut *taking)
            .await
            .unwrap();
    }
    let racing = {
        let q = q.clone();
        tokio::spawn(async move { q.enqueue(text_job("x").idempotency_key("k")).await })
    };
    until_done_or_blocked(&pool, &racing, 1).await;
    taking.commit().await.unwrap();
    let second = racing.await.unwrap().unwrap();
    assert_eq!(
        (second.created, second.job.id),
        (false, first),
        "the racing request replays the job that took the key, it does not take it again"
    );
}

/// A text job of ten days ago that finished then: the day retention drops.
async fn a_finished_job_of_ten_days_ago(pool: &PgPool, q: &Queue) -> uuid::Uuid {
    q.enqueue(text_job("old")).await.unwrap();
    let old = claim_one(q, "w0", TaskType::TextGeneration).await;
    let job = test_support::backdate(pool, old.job_id, 10).await;
    q.complete("w0", old.lease(), json!({})).await.unwrap();
    test_support::finished_days_ago(pool, job, 10).await;
    job
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_transaction_that_read_history_and_artifacts_writes_them_while_retention_waits(pool: PgPool) {
    test_support::history_partitioned_since(&pool, 20).await;
    let q = queue(pool.clone());
    a_finished_job_of_ten_days_ago(&pool, &q).await;
    // Keyed, so it finishes as a job_history row, which a retry locks.
    let done = q
        .enqueue(text_job("done").idempotency_key("done"))
        .await
        .unwrap()
        .job
        .id;
    let task = claim_one(&q, "w1", TaskType::TextGeneration).await;
    q.complete("w1", task.lease(), json!({})).await.unwrap();
    q.enqueue(text_job("running")).await.unwrap();
    let running = claim_one(&q, "w2", TaskType::TextGeneration).await;

    // Reads first, as a retry (the job locked in history) and a worker
    // recording an artifact (the records of its kind read) do.
    let mut reader = pool.begin().await.unwrap();
    sqlx::query("SELECT status FROM job_history WHERE id = $1 FOR UPDATE")
        .bind(done)
        .execute(&mut *reader)
        .await
        .unwrap();
    sqlx::query("SELECT count(*) FROM artifacts WHERE job_id = $1")
        .bind(running.job_id)
        .execute(&mut *reader)
        .await
        .unwrap();
    let pruning = prune_a_week(&q).await;
    until_done_or_blocked(&pool, &pruning, 1).await;
    // Then its writes, which must not wait for retention: it waited for
    // this transaction, a deadlock.
    sqlx::query("SET LOCAL lock_timeout = '100ms'")
        .execute(&mut *reader)
        .await
        .unwrap();
    sqlx::query("SELECT reopen_job($1)")
        .bind(done)
        .execute(&mut *reader)
        .await
        .expect("reopening a job does not wait for retention");
    sqlx::query(
        "INSERT INTO artifacts (id, job_id, task_id, kind, content_type, storage_key, bytes, sha256)
         VALUES (gen_random_uuid(), $1, $2, 'text', 'text/markdown', artifact_prefix($1) || 'text.md', 5, repeat('0', 64))",
    )
    .bind(running.job_id)
    .bind(running.id)
    .execute(&mut *reader)
    .await
    .expect("recording an artifact does not wait for retention");
    reader.commit().await.unwrap();
    assert_eq!(pruning.await.unwrap().unwrap(), 1, "the old day is dropped");
    assert_eq!(count(&pool, "artifacts").await, 1, "the record stays");
    assert_eq!(
        job_status(&q, done).await,
        JobStatus::Complete,
        "and the reopened job"
    );
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn retention_gives_way_to_a_long_transaction_and_drops_the_day_after_it(pool: PgPool) {
    test_support::history_partitioned_since(&pool, 20).await;
    let q = queue(pool.clone());
    let old = a_finished_job_of_ten_days_ago(&pool, &q).await;
    let mut reader = pool.begin().await.unwrap();
    sqlx::query("SELECT count(*) FROM artifacts")
        .execute(&mut *reader)
        .await
        .unwrap();
    let pruning = prune_a_week(&q).await;
    until_done_or_blocked(&pool, &pruning, 1).await;
    // Longer than retention waits for a lock (half the deadlock timeout):
    // it gives up, readers queued behind it go on, and it tries again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!pruning.is_finished(), "retention waits its turn");
    reader.commit().await.unwrap();
    assert_eq!(pruning.await.unwrap().unwrap(), 1, "the day is dropped once free");
    assert!(q.job_by_id(old).await.is_err());
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_silent_claimer_claiming_while_the_sweeper_runs_keeps_its_registry_row(pool: PgPool) {
    silent_claimer_claims_while_the_sweeper_runs(
        pool,
        "SELECT id FROM claim_tasks('w1', '{text_generation}', 1, gen_random_uuid())",
    )
    .await;
}

/// The same through the three-argument `claim_tasks`, as from psql: a
/// claim without a nonce kept no time of its own, and lost the row.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_silent_claimer_claiming_without_a_nonce_while_the_sweeper_runs_keeps_its_registry_row(
    pool: PgPool,
) {
    silent_claimer_claims_while_the_sweeper_runs(
        pool,
        "SELECT id FROM claim_tasks('w1', '{text_generation}', 1)",
    )
    .await;
}

async fn silent_claimer_claims_while_the_sweeper_runs(pool: PgPool, claim: &str) {
    let q = queue(pool.clone());
    q.enqueue(text_job("x")).await.unwrap();
    q.enqueue(text_job("y")).await.unwrap();
    let first = claim_one(&q, "w1", TaskType::TextGeneration).await;
    q.complete("w1", first.lease(), json!({})).await.unwrap();
    // Registered long ago and silent since (a script claiming through SQL,
    // a worker stalled), with nothing in flight: the sweeper's to forget.
    sqlx::query("UPDATE workers SET heartbeat_at = now() - interval '1 hour', last_claim_at = now() - interval '1 hour'")
        .execute(&pool)
        .await
        .unwrap();

    // It claims again, and the sweep runs before that claim commits.
    let mut claiming = pool.begin().await.unwrap();
    let claimed: Vec<i64> = sqlx::query_scalar(claim).fetch_all(&mut *claiming).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let sweeping = {
        let q = q.clone();
        tokio::spawn(async move { q.sweep(Duration::from_secs(60)).await })
    };
    until_done_or_blocked(&pool, &sweeping, 1).await;
    claiming.commit().await.unwrap();
    sweeping.await.unwrap().unwrap();
    let registered: Vec<String> = q.workers(None).await.unwrap().into_iter().map(|w| w.id).collect();
    assert_eq!(registered, ["w1"], "a claimer holding a task stays registered");
}

/// A heartbeat and a cancel of one job with two tasks in flight on one
/// worker (a reading job's pdf and audio) take those tasks in one order.
/// Each took them in the order its plan met them (the heartbeat in its
/// list's or the table's, the cancel in the order of the index it read),
/// and each could hold the task the other wanted next (40P01). Here a
/// trigger pauses the heartbeat on each task it renews, longer than
/// `deadlock_timeout`, and the cancel comes during the first pause.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_heartbeat_and_a_cancel_of_one_job_lock_its_tasks_in_one_order(pool: PgPool) {
    let q = queue(pool.clone());
    let job = q.enqueue(reading_job("tides")).await.unwrap().job;
    let text = claim_one(&q, "w0", TaskType::TextGeneration).await;
    q.complete("w0", text.lease(), json!({})).await.unwrap();
    let pdf = claim_one(&q, "w1", TaskType::PdfGeneration).await;
    let audio = claim_one(&q, "w1", TaskType::AudioGeneration).await;
    // Listed from the highest id down: the list does not set the order.
    let mut leases = [pdf.lease(), audio.lease()];
    leases.sort_by_key(|l| std::cmp::Reverse(l.task_id));

    for statement in [
        "CREATE FUNCTION pause_renewal() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_sleep(1.5); RETURN NEW; END $$",
        "CREATE TRIGGER pause_renewal BEFORE UPDATE ON job_tasks FOR EACH ROW
         WHEN (current_setting('backlog.pause_renewal', true) = 'on') EXECUTE FUNCTION pause_renewal()",
    ] {
        sqlx::query(statement).execute(&pool).await.unwrap();
    }
    let heartbeating = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut conn = pool.acquire().await.unwrap();
            sqlx::query("SET backlog.pause_renewal = on")
                .execute(&mut *conn)
                .await
                .unwrap();
            // As a worker sends it, without the library's retry.
            sqlx::query_scalar::<_, i64>("SELECT task_id FROM heartbeat_tasks('w1', $1, $2)")
                .bind(leases.iter().map(|l| l.task_id).collect::<Vec<_>>())
                .bind(leases.iter().map(|l| l.claim).collect::<Vec<_>>())
                .fetch_all(&mut *conn)
                .await
        })
    };
    let mut paused = false;
    for _ in 0..500 {
        paused = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                            WHERE datname = current_database() AND wait_event = 'PgSleep')",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if paused {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(paused, "the heartbeat paused on its first task");

    let cancelled = q
        .cancel_job(TENANT, job.id)
        .await
        .expect("the cancel must not deadlock");
    assert_eq!(cancelled.status, JobStatus::Cancelled);
    let renewed = heartbeating
        .await
        .unwrap()
        .expect("the heartbeat must not deadlock");
    assert_eq!(renewed.len(), 2, "renewed, then cancelled");
}
