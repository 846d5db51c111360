//! Fair order across tenants within a priority: one tenant's burst does not
//! hold a task type's workers while another tenant's jobs wait.

mod common;

use common::*;
use queue::{Failure, JobType, NewJob, Queue, QueueConfig, TaskType};
use serde_json::json;
use sqlx::PgPool;

fn jobs_of(tenant: &str, n: usize) -> Vec<NewJob> {
    (0..n)
        .map(|i| {
            NewJob::new(
                tenant,
                JobType::Text,
                json!({ "prompt": format!("{tenant} {i}") }),
            )
        })
        .collect()
}

/// The tenants of the next `n` claims, in claim order.
async fn next_claims(q: &Queue, pool: &PgPool, n: i32) -> Vec<String> {
    let mut tenants = Vec::new();
    for _ in 0..n {
        let task = claim_one(q, "w", TaskType::TextGeneration).await;
        let tenant: String = sqlx::query_scalar("SELECT tenant FROM all_jobs WHERE id = $1")
            .bind(task.job_id)
            .fetch_one(pool)
            .await
            .unwrap();
        q.complete("w", task.lease(), json!({})).await.unwrap();
        tenants.push(tenant);
    }
    tenants
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_burst_from_one_tenant_is_interleaved_with_another_tenants_jobs(pool: PgPool) {
    let q = queue(pool.clone());
    q.enqueue_batch(jobs_of("big", 200)).await.unwrap();
    q.enqueue_batch(jobs_of("small", 5)).await.unwrap();

    let order = next_claims(&q, &pool, 10).await;
    assert_eq!(
        order.iter().filter(|t| *t == "small").count(),
        5,
        "the small tenant's five jobs are among the first ten claims, not after 200: {order:?}"
    );
    assert_eq!(order[0], "big", "the burst that came first still starts first");
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_tenant_whose_burst_was_served_is_not_held_back_afterwards(pool: PgPool) {
    let q = queue(pool.clone());
    q.enqueue_batch(jobs_of("big", 100)).await.unwrap();
    next_claims(&q, &pool, 100).await;

    // The queue is empty again: both start level.
    q.enqueue_batch(jobs_of("big", 3)).await.unwrap();
    q.enqueue_batch(jobs_of("small", 3)).await.unwrap();
    let order = next_claims(&q, &pool, 6).await;
    assert_eq!(order, ["big", "small", "big", "small", "big", "small"]);
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_tenant_whose_burst_was_served_starts_level_while_others_wait(pool: PgPool) {
    let q = queue(pool.clone());
    // Served in one go, far faster than its clock moved (1,000 places).
    q.enqueue_batch(jobs_of("big", 1000)).await.unwrap();
    let served = q.claim("w", &[TaskType::TextGeneration], 1000).await.unwrap();
    assert_eq!(served.len(), 1000);

    // Others wait when it comes back with one job: it joins at the head,
    // not behind everything they queued.
    q.enqueue_batch(jobs_of("small", 5)).await.unwrap();
    q.enqueue_batch(jobs_of("big", 1)).await.unwrap();
    let order = next_claims(&q, &pool, 6).await;
    assert!(order[..2].contains(&"big".to_string()), "{order:?}");

    // While its own jobs still wait, it continues from its clock.
    q.enqueue_batch(jobs_of("big", 3)).await.unwrap();
    q.enqueue_batch(jobs_of("small", 3)).await.unwrap();
    q.enqueue_batch(jobs_of("big", 1)).await.unwrap();
    let order = next_claims(&q, &pool, 7).await;
    assert_eq!(order.last().map(String::as_str), Some("big"), "{order:?}");
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn priority_still_comes_before_fairness(pool: PgPool) {
    let q = queue(pool.clone());
    q.enqueue_batch(jobs_of("big", 20)).await.unwrap();
    let mut urgent = jobs_of("small", 1);
    urgent[0].priority = 10;
    q.enqueue_batch(urgent).await.unwrap();
    assert_eq!(next_claims(&q, &pool, 1).await, ["small"]);
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn retried_jobs_take_their_place_in_line_instead_of_jumping_it(pool: PgPool) {
    let q = queue(pool.clone());
    let failed: Vec<_> = q
        .enqueue_batch(jobs_of("big", 5))
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.job.id)
        .collect();
    for _ in 0..5 {
        let task = claim_one(&q, "w", TaskType::TextGeneration).await;
        q.fail("w", task.lease(), &Failure::permanent("bad prompt"))
            .await
            .unwrap();
    }
    q.enqueue_batch(jobs_of("small", 5)).await.unwrap();

    // Retried after the small tenant's jobs were queued: the retries go
    // through the big tenant's line, as new jobs would (its clock still
    // counts the burst it just sent), not ahead of everyone at the places
    // the jobs were first given.
    for id in failed {
        q.retry_job("big", id).await.unwrap();
    }
    let order = next_claims(&q, &pool, 4).await;
    assert!(
        order.iter().filter(|t| *t == "small").count() >= 2,
        "the small tenant's jobs are interleaved with the retries, not behind all five: {order:?}"
    );
}

/// A replay (the same idempotency key again) takes no place in line: an
/// empty place read as the tenant's line having been served, so its next
/// job started at the head, and a tenant replaying as it enqueued kept two
/// lines to everyone else's one.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_replayed_job_takes_no_place_in_line(pool: PgPool) {
    let q = queue(pool.clone());
    let keyed = |i: usize| NewJob {
        idempotency_key: Some(format!("big-{i}")),
        ..jobs_of("big", 1).remove(0)
    };
    q.enqueue_batch((0..100).map(keyed).collect()).await.unwrap();
    q.enqueue_batch(jobs_of("small", 100)).await.unwrap();
    for i in 0..100 {
        let replayed = q.enqueue(keyed(i)).await.unwrap();
        assert!(!replayed.created);
        q.enqueue(NewJob::new(
            "big",
            JobType::Text,
            json!({ "prompt": format!("more {i}") }),
        ))
        .await
        .unwrap();
    }

    let order = next_claims(&q, &pool, 100).await;
    let small = order.iter().filter(|t| *t == "small").count();
    assert!(
        (49..=51).contains(&small),
        "two tenants waiting share the first claims half and half, not {small} of 100: {order:?}"
    );
}

/// An enqueue takes its places one row per line (`take_places_in_line`)
/// and counts each line's jobs itself: in a mixed batch, the jobs of each
/// line (tenant, first task type, priority) queue behind that line's job
/// already waiting, a step apart, in the batch's order, whatever the other
/// lines' jobs between them.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_mixed_batch_queues_each_lines_jobs_a_step_apart_behind_its_waiting_job(pool: PgPool) {
    let q = queue(pool.clone());
    let job = |(tenant, job_type, priority): (&str, JobType, i32), i: usize| {
        let input = match job_type {
            JobType::Pdf => json!({ "text": format!("# {i}") }),
            _ => json!({ "prompt": format!("{i}") }),
        };
        NewJob {
            priority,
            ..NewJob::new(tenant, job_type, input)
        }
    };
    let place_of = |job_id: uuid::Uuid| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>(
                "SELECT fair_at FROM job_tasks WHERE job_id = $1",
            )
            .bind(job_id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let acme_text = ("acme", JobType::Text, 0);
    let acme_urgent = ("acme", JobType::Text, 5);
    let acme_pdf = ("acme", JobType::Pdf, 0);
    let globex_text = ("globex", JobType::Text, 0);
    // Every line already waits, so each clock goes on from its line's
    // waiting job rather than from the time of the call.
    let lines = [acme_text, acme_urgent, acme_pdf, globex_text];
    let mut waiting = Vec::new();
    for enqueued in q
        .enqueue_batch(lines.iter().enumerate().map(|(i, &l)| job(l, i)).collect())
        .await
        .unwrap()
    {
        waiting.push(place_of(enqueued.job.id).await);
    }
    let batch = [
        acme_text,
        globex_text,
        acme_text,
        acme_pdf,
        acme_urgent,
        acme_text,
        globex_text,
        acme_pdf,
        acme_text,
    ];
    let step = chrono::TimeDelta::milliseconds(10);
    // The k-th job of a line in the batch (from 1) goes k steps behind the
    // line's waiting job.
    let expected: Vec<_> = batch
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let l = lines.iter().position(|other| other == line).unwrap();
            let k = batch[..=i].iter().filter(|other| *other == line).count() as i32;
            waiting[l] + step * k
        })
        .collect();

    let mut placed = Vec::new();
    for enqueued in q
        .enqueue_batch(batch.iter().enumerate().map(|(i, &l)| job(l, 100 + i)).collect())
        .await
        .unwrap()
    {
        placed.push(place_of(enqueued.job.id).await);
    }
    assert_eq!(placed, expected);
    // And each line's clock stands a step past its last job, where the
    // line's next job will go.
    for (l, &(tenant, job_type, priority)) in lines.iter().enumerate() {
        let last = (0..batch.len())
            .filter(|&i| batch[i] == lines[l])
            .map(|i| placed[i])
            .max()
            .unwrap();
        let clock: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
            "SELECT fair_at FROM tenant_clocks WHERE tenant = $1 AND task_type = $2 AND priority = $3",
        )
        .bind(tenant)
        .bind(job_type.plan()[0].task_type.as_str())
        .bind(priority)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(
            clock,
            last + step,
            "{tenant}'s {job_type:?} line at priority {priority}"
        );
    }
}

/// The function's own checks: a line named twice would have its clock
/// moved twice from one head, so the two runs of places could overlap.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn take_places_in_line_refuses_a_line_named_twice_or_a_count_below_one(pool: PgPool) {
    let call = |tenants: Vec<&'static str>, counts: Vec<i32>| {
        let pool = pool.clone();
        async move {
            let n = tenants.len();
            sqlx::query("SELECT * FROM take_places_in_line($1, $2, $3, $4, 0.01)")
                .bind(tenants)
                .bind(vec!["text_generation"; n])
                .bind(vec![0i32; n])
                .bind(counts)
                .fetch_all(&pool)
                .await
                .map(|rows| rows.len())
                .map_err(|e| e.to_string())
        }
    };
    let twice = call(vec!["acme", "acme"], vec![1, 2]).await.unwrap_err();
    assert!(twice.contains("named twice"), "{twice}");
    let none = call(vec!["acme"], vec![0]).await.unwrap_err();
    assert!(none.contains("at least 1"), "{none}");
    let short = call(vec!["acme", "globex"], vec![1]).await.unwrap_err();
    assert!(short.contains("must be as long"), "{short}");
    assert_eq!(call(vec!["acme", "globex"], vec![3, 1]).await, Ok(2));
}

/// An enqueue's places commit before its insert: held behind a lock on
/// `job_tasks`, it has already moved and let go of its tenant's clock, so
/// another enqueue of the line is not held behind its insert and its
/// commit's flush (and the place of a job not yet inserted is counted).
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn an_enqueue_lets_go_of_its_tenants_clock_before_it_inserts(pool: PgPool) {
    let q = queue(pool.clone());
    let mut held = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE job_tasks IN SHARE MODE")
        .execute(&mut *held)
        .await
        .unwrap();
    let enqueue = {
        let q = q.clone();
        tokio::spawn(async move { q.enqueue(text_job("held behind the lock")).await })
    };
    until_done_or_blocked(&pool, &enqueue, 1).await;
    assert!(
        !enqueue.is_finished(),
        "the insert waits for the lock on job_tasks"
    );

    let mut other = pool.acquire().await.unwrap();
    let clock: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
        "SELECT fair_at FROM tenant_clocks WHERE tenant = $1 AND task_type = 'text_generation'
         FOR UPDATE NOWAIT",
    )
    .bind(TENANT)
    .fetch_optional(&mut *other)
    .await
    .expect("the clock is not locked while the insert waits");
    let clock = clock.expect("the place is committed before the insert");

    held.commit().await.unwrap();
    let job = enqueue.await.unwrap().unwrap().job;
    let place: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT fair_at FROM job_tasks WHERE job_id = $1")
            .bind(job.id)
            .fetch_one(&pool)
            .await
            .unwrap();
    let step = QueueConfig::default().fair_share_interval;
    assert_eq!(
        clock,
        place + chrono::Duration::from_std(step).unwrap(),
        "the job went where the clock counted it"
    );
}
