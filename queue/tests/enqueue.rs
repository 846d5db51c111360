//! Enqueueing: batches, idempotency, bad input, and the runnable NOTIFY.

mod common;

use std::time::Duration;

use common::*;
use queue::{JobType, NewJob, QueueError, TaskType};
use serde_json::json;
use sqlx::PgPool;

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn the_same_tenant_and_key_return_the_same_job(pool: PgPool) {
    let q = queue(pool.clone());
    let first = q.enqueue(text_job("x").idempotency_key("order-7")).await.unwrap();
    let again = q.enqueue(text_job("x").idempotency_key("order-7")).await.unwrap();
    assert!(first.created && !again.created);
    assert_eq!(first.job.id, again.job.id);
    assert_eq!(count(&pool, "job_tasks").await, 1);

    // Another tenant's key space is its own.
    let other = NewJob::new("globex", JobType::Text, json!({"prompt": "x"})).idempotency_key("order-7");
    assert!(q.enqueue(other).await.unwrap().created);

    // Reusing a key for a different request is a conflict, not a silent replay.
    let err = q
        .enqueue(text_job("different").idempotency_key("order-7"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, QueueError::IdempotencyConflict { existing, .. } if existing == first.job.id),
        "{err}"
    );
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_batch_with_a_conflicting_key_writes_none_of_its_jobs(pool: PgPool) {
    let q = queue(pool.clone());
    q.enqueue(text_job("x").idempotency_key("order-7")).await.unwrap();
    // Unkeyed jobs beside the conflicting one: the batch is still all or
    // nothing.
    let err = q
        .enqueue_batch(vec![
            text_job("new 1"),
            text_job("different").idempotency_key("order-7"),
            text_job("new 2"),
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, QueueError::IdempotencyConflict { .. }), "{err}");
    assert_eq!(count(&pool, "jobs").await, 1);
    assert_eq!(count(&pool, "job_tasks").await, 1);
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn concurrent_requests_with_one_key_create_one_job(pool: PgPool) {
    let q = queue(pool.clone());
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let q = q.clone();
            tokio::spawn(async move { q.enqueue(text_job("x").idempotency_key("once")).await.unwrap() })
        })
        .collect();
    let mut ids = Vec::new();
    for c in calls {
        ids.push(c.await.unwrap().job.id);
    }
    ids.dedup();
    assert_eq!(ids.len(), 1);
    assert_eq!(count(&pool, "jobs").await, 1);
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_batch_is_written_whole_in_order_with_its_tasks(pool: PgPool) {
    let q = queue(pool.clone());
    let jobs = vec![
        reading_job("a"),
        text_job("b").idempotency_key("k"),
        NewJob::new(TENANT, JobType::Audiobook, json!({"text": "c"})),
        text_job("b").idempotency_key("k"),
    ];
    let out = q.enqueue_batch(jobs).await.unwrap();
    assert_eq!(
        out.iter().map(|e| e.job.job_type).collect::<Vec<_>>(),
        [JobType::Reading, JobType::Text, JobType::Audiobook, JobType::Text]
    );
    assert_eq!(
        out.iter().map(|e| e.created).collect::<Vec<_>>(),
        [true, true, true, false]
    );
    assert_eq!(
        out[1].job.id, out[3].job.id,
        "a key repeated in one batch is one job"
    );
    assert_eq!(count(&pool, "jobs").await, 3);
    assert_eq!(count(&pool, "job_tasks").await, 5);
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn bad_input_is_a_typed_error_naming_the_field_and_writes_nothing(pool: PgPool) {
    let q = queue(pool.clone());
    let invalid = |r: Result<_, QueueError>| match r {
        Err(QueueError::InvalidInput { field, message }) => format!("{field}: {message}"),
        other => panic!("expected InvalidInput, got {other:?}"),
    };

    assert_eq!(
        invalid("video".parse::<JobType>().map(|_| ())),
        "job type: unknown job type \"video\"; expected one of: reading, text, pdf, audiobook"
    );
    assert!(
        invalid("ocr".parse::<TaskType>().map(|_| ())).starts_with("task type: unknown task type \"ocr\"")
    );
    assert_eq!(
        invalid(
            q.enqueue(NewJob::new(TENANT, JobType::Pdf, json!({"prompt": "x"})))
                .await
                .map(|_| ())
        ),
        "input.text: is required for pdf jobs"
    );
    assert_eq!(
        invalid(q.enqueue(text_job("   ")).await.map(|_| ())),
        "input.prompt: must not be empty"
    );
    // Headings and bullets with nothing in them: an empty page, an
    // "Untitled." MP3.
    for markers in ["##", "# \n- \n* ", "---"] {
        assert_eq!(
            invalid(
                q.enqueue(NewJob::new(TENANT, JobType::Audiobook, json!({"text": markers})))
                    .await
                    .map(|_| ())
            ),
            "input.text: has nothing to typeset or read aloud, only Markdown markers",
            "{markers:?}"
        );
    }
    assert_eq!(
        invalid(
            q.enqueue(NewJob::new(TENANT, JobType::Text, json!({"prompt": 7})))
                .await
                .map(|_| ())
        ),
        "input.prompt: must be a string"
    );
    assert_eq!(
        invalid(
            q.enqueue(NewJob::new(TENANT, JobType::Text, json!("x")))
                .await
                .map(|_| ())
        ),
        "input: must be a JSON object"
    );
    let huge = "x".repeat(q.config().max_input_bytes + 1);
    assert!(invalid(q.enqueue(text_job(&huge)).await.map(|_| ())).starts_with("input: is 262"));
    assert_eq!(
        invalid(q.enqueue(text_job("x").max_attempts(0)).await.map(|_| ())),
        "max_attempts: must be between 1 and 100, got 0"
    );
    assert_eq!(
        invalid(
            q.enqueue(NewJob::new("", JobType::Text, json!({"prompt": "x"})))
                .await
                .map(|_| ())
        ),
        "tenant: must be 1 to 128 characters"
    );
    // One bad job in a batch: nothing of the batch is written.
    let batch = vec![
        text_job("fine"),
        text_job("fine too"),
        NewJob::new(TENANT, JobType::Audiobook, json!({})),
    ];
    assert_eq!(
        invalid(q.enqueue_batch(batch).await.map(|_| ())),
        "jobs[2].input.text: is required for audiobook jobs"
    );
    assert_eq!(
        invalid(q.enqueue_batch(vec![]).await.map(|_| ())),
        "jobs: at least one job is required"
    );

    assert_eq!(
        invalid(q.claim("w", &[TaskType::TextGeneration], -1).await.map(|_| ())),
        "limit: must be at least 1, got -1"
    );
    assert_eq!(
        invalid(q.claim("w", &[], 1).await.map(|_| ())),
        "task_types: at least one task type is required"
    );

    assert_eq!(
        (count(&pool, "jobs").await, count(&pool, "job_tasks").await),
        (0, 0)
    );
}

/// Every caller of `enqueue` (the API, test fixtures, scripts) writes only
/// inputs the workers accept: the queue reads the input through the same
/// contract as they do, so a field they would never read is refused.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn inputs_the_workers_would_refuse_are_refused_at_enqueue(pool: PgPool) {
    let q = queue(pool.clone());
    let refused = |job: NewJob| {
        let q = q.clone();
        async move {
            match q.enqueue(job).await {
                Err(QueueError::InvalidInput { field, message }) => format!("{field}: {message}"),
                other => panic!("expected InvalidInput, got {other:?}"),
            }
        }
    };
    assert_eq!(
        refused(NewJob::new(
            TENANT,
            JobType::Text,
            json!({"prompt": "x", "language": "el"})
        ))
        .await,
        "input.language: is not a field of text jobs' input (expected prompt, title, voice, lang)"
    );
    assert_eq!(
        refused(NewJob::new(
            TENANT,
            JobType::Pdf,
            json!({"text": "x", "prompt": "y"})
        ))
        .await,
        "input.prompt: is not a field of pdf jobs' input (expected text, title, voice, lang)"
    );
    assert_eq!(count(&pool, "jobs").await, 0);

    // What the queue accepts, the workers' contract reads back.
    let written = q
        .enqueue(NewJob::new(
            TENANT,
            JobType::Reading,
            json!({"prompt": "tea", "lang": "el"}),
        ))
        .await
        .unwrap()
        .job;
    let input = queue::input::JobInput::parse(written.job_type, &written.input).unwrap();
    assert_eq!((input.prompt(), input.lang()), (Some("tea"), Some("el")));
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn every_claim_is_callable_from_plain_sql_and_rejects_a_bad_limit(pool: PgPool) {
    let q = queue(pool.clone());
    // claim_and_start_tasks writes `processing` where claim_tasks writes
    // `claimed`; complete_and_claim_next (here with nothing to complete)
    // claims as claim_and_start_tasks does, as does complete_and_claim_tasks,
    // which the previous release calls.
    for (function, completions, status) in [
        ("claim_tasks", "", "claimed"),
        ("claim_and_start_tasks", "", "processing"),
        ("complete_and_claim_next", "'{}', '{}', '{}', ", "processing"),
        ("complete_and_claim_tasks", "'{}', '{}', '{}', ", "processing"),
    ] {
        q.enqueue(text_job("x")).await.unwrap();
        let err = sqlx::query(&format!(
            "SELECT * FROM {function}('psql', {completions}ARRAY['text_generation'], -1)"
        ))
        .execute(&pool)
        .await
        .unwrap_err();
        assert!(
            err.to_string().contains("p_limit must be at least 1, got -1"),
            "{function}: {err}"
        );
        let (id, claimed_status, claimed_by): (i64, String, String) = sqlx::query_as(&format!(
            "SELECT id, status, claimed_by FROM {function}('psql', {completions}ARRAY['text_generation'], 5)"
        ))
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(
            (claimed_status.as_str(), claimed_by.as_str()),
            (status, "psql"),
            "{function}"
        );
        assert!(id > 0);
    }
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn listeners_wake_when_tasks_become_runnable(pool: PgPool) {
    let q = queue(pool.clone());
    let mut wake = q.listen().await.unwrap();
    let idle = wake.next(Duration::from_millis(200)).await.unwrap();
    assert_eq!(idle, None, "nothing runnable yet");

    q.enqueue(reading_job("x")).await.unwrap();
    assert_eq!(
        wake.next(Duration::from_secs(5)).await.unwrap(),
        Some(Some(TaskType::TextGeneration))
    );
    assert_eq!(
        wake.next(Duration::from_millis(200)).await.unwrap(),
        None,
        "blocked tasks do not wake anyone"
    );

    let text = claim_one(&q, "w", TaskType::TextGeneration).await;
    q.complete("w", text.lease(), json!({})).await.unwrap();
    let mut woken = vec![
        wake.next(Duration::from_secs(5))
            .await
            .unwrap()
            .flatten()
            .unwrap(),
        wake.next(Duration::from_secs(5))
            .await
            .unwrap()
            .flatten()
            .unwrap(),
    ];
    woken.sort();
    assert_eq!(
        woken,
        vec![TaskType::PdfGeneration, TaskType::AudioGeneration],
        "a completed dependency wakes its dependents"
    );
}

/// `created_after` bounds the scan by id too (ids are UUIDv7), with an
/// hour's slack: a job whose id the API host's clock, behind the
/// database's, made a little older than its `created_at` is still listed.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn created_after_lists_a_job_whose_id_is_behind_its_clock(pool: PgPool) {
    let q = queue(pool.clone());
    // Ten minutes' skew between the hosts; and one job of yesterday.
    for (id_age, created_age) in [("10 minutes", "0 minutes"), ("1 day", "1 day")] {
        sqlx::query(
            "INSERT INTO jobs (id, tenant, job_type, input, created_at)
             VALUES (overlay(uuid_v7_floor(now() - $1::interval)::text placing '9' from 36)::uuid,
                     'acme', 'text', '{\"prompt\": \"p\"}', now() - $2::interval)",
        )
        .bind(id_age)
        .bind(created_age)
        .execute(&pool)
        .await
        .unwrap();
    }
    let recent = q
        .list_jobs(
            "acme",
            &queue::JobFilter {
                status: None,
                job_type: None,
                before: None,
                created_after: Some(chrono::Utc::now() - chrono::Duration::minutes(1)),
                limit: 10,
            },
        )
        .await
        .unwrap();
    assert_eq!(recent.jobs.len(), 1, "{:?}", recent.jobs);
    assert!(recent.jobs[0].created_at > chrono::Utc::now() - chrono::Duration::minutes(1));
}

/// sqlx pings every connection as it goes back to the pool, so each
/// checkout is a round trip more: an enqueue takes its place in line and
/// inserts on one connection (the latency bench-queue measures).
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn an_enqueue_checks_out_one_connection(pool: PgPool) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let released = Arc::new(AtomicUsize::new(0));
    let counted = {
        let released = released.clone();
        queue::pool_options(4).after_release(move |_, _| {
            released.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Ok(true) })
        })
    };
    let counted = counted
        .connect_with(pool.connect_options().as_ref().clone())
        .await
        .unwrap();
    let q = queue(counted.clone());
    // A connection goes back to the pool in a task of its own, after the
    // call has returned.
    let checkouts = || async {
        for _ in 0..500 {
            if counted.num_idle() == counted.size() as usize {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        released.swap(0, Ordering::SeqCst)
    };

    q.enqueue(text_job("one")).await.unwrap();
    assert_eq!(checkouts().await, 1, "one job");
    q.enqueue_batch((0..3).map(|i| text_job(&format!("{i}"))).collect())
        .await
        .unwrap();
    assert_eq!(checkouts().await, 1, "a batch");
    assert_eq!(count(&pool, "job_tasks").await, 4);
}

/// A tenant's job indexes stay about as dense as the primary key while its
/// jobs arrive and finish. Ids rise with time; an index that put each new
/// job at the left end of its tenant's range (`id DESC`) split its pages in
/// half and stood at 2.3 times the key's pages, in the open jobs and again
/// in history.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_tenants_job_indexes_stay_dense_as_its_jobs_arrive_and_finish(pool: PgPool) {
    // Pages of an index, over all its partitions when it has them.
    async fn pages(pool: &PgPool, index: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT coalesce((SELECT sum(pg_relation_size(relid)) FROM pg_partition_tree($1::regclass)),
                             pg_relation_size($1::regclass))::bigint / 8192",
        )
        .bind(index)
        .fetch_one(pool)
        .await
        .unwrap()
    }
    // A tenant entry (a short tenant and the id) is about 1.3 times a key
    // entry (the id) at the same density.
    async fn assert_dense(pool: &PgPool, tenant_index: &str, key_index: &str) {
        let (tenant, key) = (pages(pool, tenant_index).await, pages(pool, key_index).await);
        assert!(
            key >= 30 && (tenant as f64) < key as f64 * 1.6,
            "{tenant_index}: {tenant} pages against {key_index}'s {key}"
        );
    }

    let q = queue(pool.clone());
    // Keyed, so each job has a row of its own (a text job without a key is
    // kept in its task's row).
    for batch in 0..10 {
        q.enqueue_batch(
            (0..1000)
                .map(|i| text_job(&format!("{batch}-{i}")).idempotency_key(format!("{batch}-{i}")))
                .collect(),
        )
        .await
        .unwrap();
    }
    assert_dense(&pool, "jobs_tenant_id", "jobs_pkey").await;

    loop {
        let held = q.claim("w", &[TaskType::TextGeneration], 500).await.unwrap();
        if held.is_empty() {
            break;
        }
        let results: Vec<_> = held.iter().map(|t| (t.lease(), json!(null))).collect();
        assert_eq!(q.complete_batch("w", &results).await.unwrap().len(), held.len());
    }
    assert_eq!(count(&pool, "jobs").await, 0);
    assert_dense(&pool, "job_history_tenant_id", "job_history_pkey").await;

    // Without keys: each job is its task's row, and finishes as that row.
    for batch in 0..10 {
        q.enqueue_batch((0..1000).map(|i| text_job(&format!("{batch}-{i}"))).collect())
            .await
            .unwrap();
    }
    loop {
        let held = q.claim("w", &[TaskType::TextGeneration], 500).await.unwrap();
        if held.is_empty() {
            break;
        }
        let results: Vec<_> = held.iter().map(|t| (t.lease(), json!(null))).collect();
        assert_eq!(q.complete_batch("w", &results).await.unwrap().len(), held.len());
    }
    assert_eq!(count(&pool, "jobs_in_task_history").await, 10_000);
    // Against the 10,000 keyed jobs' key: as many entries.
    assert_dense(&pool, "task_history_job_tenant", "job_history_pkey").await;
}

/// The job an enqueue returns is built from what the client sent and what
/// the server set; read back, the stored job is the same, keyed or not,
/// whatever the input's key order and text.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn the_job_an_enqueue_returns_is_the_job_stored(pool: PgPool) {
    let q = queue(pool.clone());
    // The fields in no order jsonb keeps, text beyond ASCII, escapes.
    let input = json!({
        "voice": "gmw/en-GB-x-rp",
        "title": "Grüße, 世界 \u{1F600}",
        "prompt": "tides\tand\\moons",
        "lang": "en"
    });
    let unkeyed = NewJob::new("globex", JobType::Text, input.clone())
        .priority(7)
        .max_attempts(3);
    let keyed = NewJob::new("globex", JobType::Text, input).idempotency_key("k-1");
    let returned = q.enqueue_batch(vec![unkeyed, keyed.clone()]).await.unwrap();
    let replayed = q.enqueue(keyed).await.unwrap();
    for (enqueued, replay) in returned.iter().zip([false, true]) {
        assert!(enqueued.created);
        let stored = q.job("globex", enqueued.job.id).await.unwrap();
        assert_eq!(enqueued.job, stored, "returned and stored differ");
        if replay {
            assert_eq!(replayed.job, stored, "a replay returns the stored job");
        }
    }
    assert_eq!(returned[0].job.priority, 7);
    assert_eq!(returned[1].job.idempotency_key.as_deref(), Some("k-1"));
}
