//! Depth stats: the numbers the controller scales on, and their cost; and
//! the plans of the other queries that read open tasks by type.

mod common;

use common::*;
use queue::{Failure, NewJob, TaskType};
use serde_json::json;
use sqlx::PgPool;

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn depth_counts_each_state_per_task_type(pool: PgPool) {
    let q = queue(pool.clone());
    // 3 reading jobs: 3 text runnable, 6 pdf/audio blocked.
    q.enqueue_batch((0..3).map(|i| reading_job(&format!("{i}"))).collect())
        .await
        .unwrap();
    // 2 pdf jobs: runnable.
    for _ in 0..2 {
        q.enqueue(NewJob::new(TENANT, queue::JobType::Pdf, json!({"text": "t"})))
            .await
            .unwrap();
    }
    sqlx::query("UPDATE job_tasks SET run_at = now() - interval '90 seconds' WHERE task_type = 'pdf_generation' AND waiting_on = 0")
        .execute(&pool)
        .await
        .unwrap();
    // One text task in flight, one retried into the future, one completed.
    let _in_flight = claim_one(&q, "w", TaskType::TextGeneration).await;
    let b = claim_one(&q, "w", TaskType::TextGeneration).await;
    let c = claim_one(&q, "w", TaskType::TextGeneration).await;
    q.fail("w", b.lease(), &Failure::retryable("later"))
        .await
        .unwrap();
    q.complete("w", c.lease(), json!({})).await.unwrap();

    let depth = q.depth().await.unwrap();
    let text = depth
        .iter()
        .find(|d| d.task_type == TaskType::TextGeneration)
        .unwrap();
    assert_eq!(
        (
            text.pending,
            text.scheduled,
            text.in_flight,
            text.completed_last_minute
        ),
        (0, 1, 1, 1)
    );
    let pdf = depth
        .iter()
        .find(|d| d.task_type == TaskType::PdfGeneration)
        .unwrap();
    // 2 runnable pdf jobs, 1 unblocked by the completed text, 2 still blocked.
    assert_eq!((pdf.pending, pdf.blocked, pdf.in_flight), (3, 2, 0));
    assert!(
        (85.0..120.0).contains(&pdf.oldest_pending_seconds),
        "oldest {}",
        pdf.oldest_pending_seconds
    );
    let audio = depth
        .iter()
        .find(|d| d.task_type == TaskType::AudioGeneration)
        .unwrap();
    assert_eq!((audio.pending, audio.blocked), (1, 2));
    assert!(
        audio.oldest_pending_seconds < 5.0,
        "age counts from when it became runnable"
    );
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn depth_says_when_the_next_retry_falls_due(pool: PgPool) {
    let q = queue(pool.clone());
    for i in 0..2 {
        q.enqueue(NewJob::new(
            TENANT,
            queue::JobType::Text,
            json!({"prompt": format!("{i}")}),
        ))
        .await
        .unwrap();
    }
    for _ in 0..2 {
        let task = claim_one(&q, "w", TaskType::TextGeneration).await;
        q.fail("w", task.lease(), &Failure::retryable("later"))
            .await
            .unwrap();
    }
    sqlx::query(
        "UPDATE job_tasks SET run_at = now() + interval '40 seconds' WHERE task_type = 'text_generation'",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE job_tasks SET run_at = now() + interval '400 seconds' \
         WHERE id = (SELECT max(id) FROM job_tasks WHERE task_type = 'text_generation')",
    )
    .execute(&pool)
    .await
    .unwrap();

    let depth = q.depth().await.unwrap();
    let text = depth
        .iter()
        .find(|d| d.task_type == TaskType::TextGeneration)
        .unwrap();
    assert_eq!(text.scheduled, 2);
    let due = text.next_scheduled_seconds.expect("a retry is scheduled");
    assert!((30.0..=40.0).contains(&due), "the earliest, in {due} s");
    let pdf = depth
        .iter()
        .find(|d| d.task_type == TaskType::PdfGeneration)
        .unwrap();
    assert_eq!(pdf.next_scheduled_seconds, None);
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn depth_reads_the_history_only_through_its_index_of_completions(pool: PgPool) {
    let q = queue(pool.clone());
    // History far larger than the active set, as in production.
    sqlx::query(
        "WITH j AS (
             INSERT INTO job_history (id, tenant, job_type, status, input, finished_at)
             SELECT uuid_v7_floor(now() - interval '1 day' + g * interval '1 millisecond'),
                    'acme', 'text', 'complete', '{}', now() - interval '1 day'
             FROM generate_series(1, 20000) g
             RETURNING id, finished_at
         )
         INSERT INTO task_history (id, job_id, task_type, status, finished_at)
         SELECT nextval(pg_get_serial_sequence('job_tasks', 'id')), id, 'text_generation', 'complete', finished_at
         FROM j",
    )
    .execute(&pool)
    .await
    .unwrap();
    q.enqueue_batch((0..50).map(|i| text_job(&format!("{i}"))).collect())
        .await
        .unwrap();
    sqlx::query("ANALYZE job_tasks, task_history")
        .execute(&pool)
        .await
        .unwrap();

    let plan = q.explain_depth().await.unwrap();
    // The open table holds the active set alone (a scan of it is one);
    // history is read only through its index of completions.
    assert!(
        plan.contains("task_history_before_finished_at_task_type_idx"),
        "recent completions in history read through their index:\n{plan}"
    );
    assert!(
        !plan.contains("Seq Scan on task_history_before"),
        "no scan of the history:\n{plan}"
    );
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn claiming_uses_the_runnable_index(pool: PgPool) {
    let q = queue(pool.clone());
    q.enqueue_batch((0..500).map(|i| text_job(&format!("{i}"))).collect())
        .await
        .unwrap();
    sqlx::query("ANALYZE job_tasks").execute(&pool).await.unwrap();
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN SELECT t.id FROM job_tasks t
         WHERE t.task_type = 'text_generation' AND task_phase(t.status, t.waiting_on) = 'runnable' AND t.run_at <= now()
         ORDER BY t.priority DESC, t.fair_at, t.id LIMIT 50 FOR UPDATE SKIP LOCKED",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let plan = plan.join("\n");
    assert!(plan.contains("job_tasks_runnable"), "{plan}");
    assert!(
        !plan.contains("Sort"),
        "claim order comes from the index, not a sort:\n{plan}"
    );
}

/// Pending text tasks in the statistics tests: enough that reading them
/// all is unmistakable beside reading a claim's worth.
const BACKLOG: i64 = 5_000;

/// Enqueue [`BACKLOG`] text jobs (named after `round`) with autovacuum off
/// for `job_tasks`, so its statistics stay what the test makes them.
async fn enqueue_backlog_without_autovacuum(pool: &PgPool, q: &queue::Queue, round: &str) {
    sqlx::query("ALTER TABLE job_tasks SET (autovacuum_enabled = false)")
        .execute(pool)
        .await
        .unwrap();
    enqueue_backlog(q, round).await;
}

/// Enqueue [`BACKLOG`] text jobs (named after `round`), in batches of 1,000.
async fn enqueue_backlog(q: &queue::Queue, round: &str) {
    for batch in 0..BACKLOG / 1_000 {
        q.enqueue_batch(
            (0..1_000)
                .map(|i| text_job(&format!("{round}-{batch}-{i}")))
                .collect(),
        )
        .await
        .unwrap();
    }
}

/// Rows sequential scans returned and index entries read so far, of
/// `tables` and their indexes, by this backend's transaction (counts not
/// yet reported carry over from its earlier transactions: take deltas).
async fn rows_and_entries_read(conn: &mut sqlx::PgConnection, tables: &[&str]) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(sum(pg_stat_get_xact_tuples_returned(r)), 0)::bigint
         FROM (SELECT t::regclass AS r FROM unnest($1::text[]) AS t
               UNION ALL
               SELECT i.indexrelid FROM pg_index i WHERE i.indrelid = ANY ($1::text[]::regclass[])) rels",
    )
    .bind(tables)
    .fetch_one(conn)
    .await
    .unwrap()
}

/// A new database's first burst: `job_tasks` has never been analyzed with
/// rows in it, so the planner gives every filter its default selectivity and
/// takes every plan for one row. The claim, and take_places_in_line's head of the
/// line and fair-restart probe, must still read the claim index at the head
/// of the line; they read every pending task of the type when the
/// active-task index looked cheaper (and a hashed subplan did the same).
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn runnable_reads_stay_at_the_head_of_the_line_before_any_statistics(pool: PgPool) {
    let q = queue(pool.clone());
    enqueue_backlog_without_autovacuum(&pool, &q, "now").await;
    let analyzed: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stats WHERE tablename = 'job_tasks'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(analyzed, 0, "the table must not have statistics yet");

    let mut tx = pool.begin().await.unwrap();
    for _ in 0..3 {
        // The tenant's clock is past the head, so each call probes its
        // latest place.
        sqlx::query("SELECT first_place FROM take_places_in_line($1, $2, $3, '{1}', 0.001)")
            .bind(vec![TENANT])
            .bind(vec!["text_generation"])
            .bind(vec![0i32])
            .fetch_all(&mut *tx)
            .await
            .unwrap();
    }
    let claimed: i64 = sqlx::query_scalar("SELECT count(*) FROM claim_tasks('w-1', '{text_generation}', 50)")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(claimed, 50);
    // Index entries read by this transaction, per index.
    let read: Vec<(String, i64)> = sqlx::query_as(
        "SELECT c.relname::text, pg_stat_get_xact_tuples_returned(c.oid)
         FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
         WHERE i.indrelid = 'job_tasks'::regclass ORDER BY 1",
    )
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    let total: i64 = read.iter().map(|(_, n)| n).sum();
    assert!(
        total < 200,
        "three places and a claim of 50 read {total} index entries of a {BACKLOG}-task backlog: {read:?}"
    );
}

/// A queue that drained empty and fills again: autovacuum analyzed
/// `job_tasks` while nothing in it was live, and a burst arrives. For the
/// planner the table holds next to no rows until the next analyze, and
/// once a worker's connection runs the claim with a cached (generic) plan,
/// its update took the claimed tasks by walking the whole table in key
/// order against the candidates: 5,000 primary-key entries read for a
/// claim of 32 here, 20 ms.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn claims_stay_at_the_head_of_the_line_when_statistics_say_the_table_is_empty(pool: PgPool) {
    let q = queue(pool.clone());
    // The last burst, gone (its rows dead, their pages still there), and
    // the table analyzed then: the planner's density is near zero rows a page.
    enqueue_backlog_without_autovacuum(&pool, &q, "before").await;
    sqlx::raw_sql("DELETE FROM job_tasks; DELETE FROM jobs; ANALYZE job_tasks")
        .execute(&pool)
        .await
        .unwrap();
    enqueue_backlog_without_autovacuum(&pool, &q, "now").await;
    let mut worker = pool.acquire().await.unwrap();
    let claim = "SELECT count(*) FROM claim_and_start_tasks('w-1', '{text_generation}', 32)";
    // From the sixth call on, a function's statements may run a generic plan.
    for _ in 0..8 {
        let claimed: i64 = sqlx::query_scalar(claim).fetch_one(&mut *worker).await.unwrap();
        assert_eq!(claimed, 32);
    }
    let reltuples: f32 = sqlx::query_scalar("SELECT reltuples FROM pg_class WHERE relname = 'job_tasks'")
        .fetch_one(&mut *worker)
        .await
        .unwrap();
    assert!(
        reltuples < 1.0,
        "the statistics must still say empty: {reltuples}"
    );

    // Primary-key entries read, as this backend counts them (counts not
    // yet reported accumulate across its transactions, so a delta). The
    // claim index's own count varies with the dead entries a scan steps
    // over (how many it may mark dead depends on other transactions); the
    // key's is the claimed tasks, or the whole table.
    let read = "SELECT pg_stat_get_xact_tuples_returned('job_tasks_pkey'::regclass)";
    let mut tx = sqlx::Connection::begin(&mut *worker).await.unwrap();
    let before: i64 = sqlx::query_scalar(read).fetch_one(&mut *tx).await.unwrap();
    let claimed: i64 = sqlx::query_scalar(claim).fetch_one(&mut *tx).await.unwrap();
    let after: i64 = sqlx::query_scalar(read).fetch_one(&mut *tx).await.unwrap();
    assert_eq!(claimed, 32);
    assert!(
        after - before <= 64,
        "the ninth claim of 32 read {} primary-key entries of a {BACKLOG}-task backlog",
        after - before
    );
}

/// A queue that drained empty, vacuumed down to no pages (autovacuum
/// truncates the empty end of a table), and a burst: plans a connection
/// caches for take_places_in_line are made for a table where a sequential scan
/// costs nothing, and until the next analyze every enqueue read every task
/// twice, for the head of the line and for the fair-restart probe (50 ms a
/// call at 99,000 tasks, in a scratch program running `make bench-queue`'s
/// enqueue phase, whose rate it about halved). Ruling out the sequential scan was not
/// enough: the probe, an equality on the place, then walked another index
/// of the type.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn places_in_line_stay_at_the_head_of_the_line_when_the_queue_drained_empty(pool: PgPool) {
    let q = queue(pool.clone());
    // Autovacuum off first: altering the table later would drop the plans.
    for sql in [
        "ALTER TABLE job_tasks SET (autovacuum_enabled = false)",
        "VACUUM ANALYZE job_tasks",
    ] {
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
    // A producer's first enqueues. The hot path's functions keep a generic
    // plan from the first call (`20261206000001`); without that setting,
    // from the sixth call on they may. Either way it is made while the
    // table is empty.
    let mut producer = pool.acquire().await.unwrap();
    let place =
        "SELECT first_place FROM take_places_in_line('{acme}', '{text_generation}', '{0}', '{1}', 0.001)";
    for _ in 0..8 {
        sqlx::query(place).fetch_all(&mut *producer).await.unwrap();
    }
    // The burst; the tenant's clock is then past the head, so the call
    // below probes.
    enqueue_backlog(&q, "now").await;
    let relpages: i32 = sqlx::query_scalar("SELECT relpages FROM pg_class WHERE relname = 'job_tasks'")
        .fetch_one(&mut *producer)
        .await
        .unwrap();
    assert_eq!(relpages, 0, "the statistics must still say no pages");

    let mut tx = sqlx::Connection::begin(&mut *producer).await.unwrap();
    let before = rows_and_entries_read(&mut tx, &["job_tasks"]).await;
    sqlx::query(place).fetch_all(&mut *tx).await.unwrap();
    let after = rows_and_entries_read(&mut tx, &["job_tasks"]).await;
    assert!(
        after - before <= 10,
        "a place in line read {} rows and index entries of a {BACKLOG}-task backlog",
        after - before
    );
}

/// The same for a worker: its connection claimed and completed the last
/// few tasks of a queue that then drained (vacuumed down to no pages), and
/// kept the plans. When the burst came, each claim of 32 read every task
/// of the table four times (20,000 rows and entries here), a completion
/// of 32 and the next claim 59,842, and a completion planned on the empty
/// table looped over sequential scans of jobs and tasks (more than ten
/// minutes at 50,000 jobs, seen in psql).
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_worker_claims_and_completes_at_the_head_of_the_line_when_the_queue_drained_empty(pool: PgPool) {
    let q = queue(pool.clone());
    for sql in [
        "ALTER TABLE job_tasks SET (autovacuum_enabled = false)",
        "ALTER TABLE jobs SET (autovacuum_enabled = false)",
        "VACUUM ANALYZE job_tasks",
        "VACUUM ANALYZE jobs",
    ] {
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
    let mut worker = pool.acquire().await.unwrap();
    let claim = "SELECT id, job_id, claims FROM claim_and_start_tasks('w-1', '{text_generation}', 32)";
    let complete_and_claim = "SELECT count(*) FROM complete_and_claim_next('w-1', $1, $2, $3,
                                  array_fill('null'::jsonb, ARRAY[cardinality($1)]), '{text_generation}', 32)";
    // The quiet hour before: jobs one at a time, each claimed and completed.
    for i in 0..8 {
        q.enqueue(text_job(&format!("quiet-{i}"))).await.unwrap();
        let held: Vec<(i64, uuid::Uuid, i32)> = sqlx::query_as(claim).fetch_all(&mut *worker).await.unwrap();
        assert_eq!(held.len(), 1);
        let done: i64 = sqlx::query_scalar(complete_and_claim)
            .bind(held.iter().map(|h| h.0).collect::<Vec<_>>())
            .bind(held.iter().map(|h| h.1).collect::<Vec<_>>())
            .bind(held.iter().map(|h| h.2).collect::<Vec<_>>())
            .fetch_one(&mut *worker)
            .await
            .unwrap();
        assert_eq!(done, 1, "the quiet job's task completes");
    }
    enqueue_backlog(&q, "now").await;

    let tables = ["job_tasks", "jobs"];
    let mut tx = sqlx::Connection::begin(&mut *worker).await.unwrap();
    let before = rows_and_entries_read(&mut tx, &tables).await;
    let held: Vec<(i64, uuid::Uuid, i32)> = sqlx::query_as(claim).fetch_all(&mut *tx).await.unwrap();
    assert_eq!(held.len(), 32);
    let after_claim = rows_and_entries_read(&mut tx, &tables).await;
    let touched: i64 = sqlx::query_scalar(complete_and_claim)
        .bind(held.iter().map(|h| h.0).collect::<Vec<_>>())
        .bind(held.iter().map(|h| h.1).collect::<Vec<_>>())
        .bind(held.iter().map(|h| h.2).collect::<Vec<_>>())
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(touched, 64, "32 completed and 32 claimed");
    let after_completion = rows_and_entries_read(&mut tx, &tables).await;
    let (claim_read, completion_read) = (after_claim - before, after_completion - after_claim);
    // The claim reads its 32 at the head of the line (and their jobs), the
    // completion its tasks and jobs by key. With sequential scans ruled out
    // but the lookups left to the planner, three statements of the
    // completion walked a whole index instead (15,536 entries here).
    assert!(
        claim_read <= 32 * 6 && completion_read <= 64 * 20,
        "from a {BACKLOG}-task backlog, a claim of 32 read {claim_read} rows and index entries, \
         a completion of 32 with the next claim {completion_read}"
    );
    // And the completion reads each held task once: answering with the
    // completed tasks' whole rows, as complete_and_claim_tasks does, took a
    // read of each before the completion moved it (288 here against 224).
    assert!(
        completion_read <= 64 * 4,
        "a completion of 32 with the next claim read {completion_read} rows and index entries"
    );
}

/// The hot path's functions plan without sequential scans (`20261205000011`),
/// and keep one generic plan per statement (`20261206000001`); the claim
/// (`20261205000006`) and the completion (`20261210000001`) also plan
/// without bitmap scans: a bitmap scan would hand the claim its tasks out
/// of the line's order, and the completion's delete would lock tasks in
/// the heap's order rather than by id. The tests above hold only while
/// these settings do. `CREATE OR REPLACE FUNCTION` drops a
/// function's settings, so a migration that restates one of these must set
/// them again.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn the_hot_path_keeps_its_plan_settings(pool: PgPool) {
    let hot_path = [
        "complete_and_claim_next",
        "complete_and_claim_tasks",
        "complete_tasks",
        "fail_task",
        "lock_jobs_of_tasks",
        "release_tasks",
        "take_places_in_line",
        "take_tasks",
    ];
    // Every signature of each: an instance of the previous release calls
    // the previous one while an upgrade rolls out.
    let settings: Vec<(String, Vec<String>)> = sqlx::query_as(
        "SELECT p.proname::text, coalesce(p.proconfig, '{}') FROM pg_proc p
         WHERE p.pronamespace = 'public'::regnamespace AND p.proname = ANY ($1)
         ORDER BY p.proname",
    )
    .bind(hot_path)
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut names: Vec<&str> = settings.iter().map(|(name, _)| name.as_str()).collect();
    names.dedup();
    assert_eq!(names, hot_path, "each function is there");
    for (name, config) in &settings {
        let mut wanted = vec!["enable_seqscan=off", "plan_cache_mode=force_generic_plan"];
        if name == "take_tasks" || name == "complete_tasks" {
            wanted.push("enable_bitmapscan=off");
        }
        for wanted in wanted {
            assert!(
                config.iter().any(|c| c == wanted),
                "{name} must be set {wanted}; its settings: {config:?}"
            );
        }
    }
}

/// The claim's entry points are PL/pgSQL, which keeps each statement's
/// plan for the session (`20261207000005`). PostgreSQL 15 runs a VOLATILE
/// set-returning SQL function by parsing and planning its body again on
/// every call, about 0.06 ms of each claim when they were one-line SQL
/// wrappers over `take_tasks`.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn the_claim_entry_points_keep_their_plans_across_calls(pool: PgPool) {
    let entry_points = ["claim_and_start_tasks", "claim_tasks"];
    let languages: Vec<(String, String)> = sqlx::query_as(
        "SELECT p.proname::text, l.lanname::text FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
         WHERE p.pronamespace = 'public'::regnamespace AND p.proname = ANY ($1)
         ORDER BY p.proname",
    )
    .bind(entry_points)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        languages,
        entry_points.map(|name| (name.to_string(), "plpgsql".to_string())),
        "one function of each name, in PL/pgSQL"
    );
}

/// A new database's first bursts, drained before autovacuum first came:
/// `job_tasks` has no statistics and its pages hold their dead rows. The
/// planner sizes the runnable set from the pages at a default selectivity,
/// two or three rows, and at some table sizes a bitmap scan of the claim
/// index and a sort looked as cheap as the ordered scan: every runnable
/// task read and sorted for a claim of 32 (5,000 entries here).
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn claims_take_the_head_of_the_line_in_index_order_on_a_table_without_statistics(pool: PgPool) {
    let q = queue(pool.clone());
    enqueue_backlog_without_autovacuum(&pool, &q, "now").await;
    // Where the plan tips depends on the table's size, so the claim runs at
    // several: each step leaves the pages of 10,000 more finished tasks.
    let mut reads = Vec::new();
    for _ in 0..8 {
        sqlx::raw_sql(
            "INSERT INTO job_tasks (job_id, task_type, status)
             SELECT gen_random_uuid(), 'text_generation', 'complete' FROM generate_series(1, 10000);
             DELETE FROM job_tasks WHERE status = 'complete'",
        )
        .execute(&pool)
        .await
        .unwrap();
        // A delta: counts this backend has not reported yet carry over
        // from its earlier transactions.
        let read = "SELECT pg_stat_get_xact_tuples_returned('job_tasks_runnable'::regclass)";
        let mut tx = pool.begin().await.unwrap();
        let before: i64 = sqlx::query_scalar(read).fetch_one(&mut *tx).await.unwrap();
        let claimed: i64 =
            sqlx::query_scalar("SELECT count(*) FROM claim_and_start_tasks('w-1', '{text_generation}', 32)")
                .fetch_one(&mut *tx)
                .await
                .unwrap();
        let after: i64 = sqlx::query_scalar(read).fetch_one(&mut *tx).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(claimed, 32);
        reads.push(after - before);
    }
    let analyzed: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stats WHERE tablename = 'job_tasks'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(analyzed, 0, "the table must not have statistics yet");
    // The head of the line: this claim's 32 and the entries of the claims
    // before it that the scan steps over (dead to it, not yet vacuumed).
    assert!(
        reads.iter().all(|&read| read <= 32 * 9),
        "claim-index entries read by each claim of 32 from a {BACKLOG}-task backlog: {reads:?}"
    );
}

/// Completions at work: statistics that put a few dozen tasks in flight,
/// as they are in a working queue. A completion named its tasks by id and
/// by status, and the planner read the active-task index (keyed by status)
/// for every in-flight entry, dead ones included: every task completed
/// since the last vacuum, so each completion read more than the last (128
/// rising to 363 entries over the first five calls here; 70,000 to 89,000
/// a completion of 32 in `make bench-workers`).
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn completions_read_their_tasks_by_key_in_a_working_queue(pool: PgPool) {
    let q = queue(pool.clone());
    enqueue_backlog_without_autovacuum(&pool, &q, "now").await;
    // Analyzed with a batch in flight, as autovacuum finds a working queue.
    sqlx::raw_sql(
        "SELECT count(*) FROM claim_and_start_tasks('w-0', '{text_generation}', 32); ANALYZE job_tasks",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let read = "SELECT coalesce(sum(pg_stat_get_xact_tuples_returned(i.indexrelid)), 0)::bigint
                FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                WHERE i.indrelid = 'job_tasks'::regclass AND c.relname = 'job_tasks_active'";
    let mut reads = Vec::new();
    for _ in 0..9 {
        let ids: Vec<(i64, i32)> =
            sqlx::query_as("SELECT id, claims FROM claim_and_start_tasks('w-1', '{text_generation}', 32)")
                .fetch_all(&mut *conn)
                .await
                .unwrap();
        let task_ids: Vec<i64> = ids.iter().map(|(id, _)| *id).collect();
        let claims: Vec<i32> = ids.iter().map(|(_, c)| *c).collect();
        let outputs: Vec<serde_json::Value> = ids.iter().map(|_| serde_json::json!({})).collect();
        let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
        let before: i64 = sqlx::query_scalar(read).fetch_one(&mut *tx).await.unwrap();
        let done: Vec<i64> = sqlx::query_scalar("SELECT task_id FROM complete_tasks('w-1', $1, $2, $3)")
            .bind(&task_ids)
            .bind(&claims)
            .bind(&outputs)
            .fetch_all(&mut *tx)
            .await
            .unwrap();
        let after: i64 = sqlx::query_scalar(read).fetch_one(&mut *tx).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(done.len(), 32);
        reads.push(after - before);
    }
    assert_eq!(
        reads, [0; 9],
        "active-task index entries read by each completion of 32"
    );
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn depth_counts_stop_at_the_cap_and_say_so(pool: PgPool) {
    let q = queue::Queue::new(pool).with_config(queue::QueueConfig {
        depth_count_cap: 5,
        ..queue::QueueConfig::default()
    });
    q.enqueue_batch((0..8).map(|i| text_job(&format!("{i}"))).collect())
        .await
        .unwrap();
    let depth = q.depth().await.unwrap();
    let text = depth
        .iter()
        .find(|d| d.task_type == TaskType::TextGeneration)
        .unwrap();
    assert_eq!((text.pending, text.capped), (5, true), "{text:?}");
    let pdf = depth
        .iter()
        .find(|d| d.task_type == TaskType::PdfGeneration)
        .unwrap();
    assert_eq!((pdf.pending, pdf.capped), (0, false), "{pdf:?}");
    assert_eq!(
        depth.iter().map(|d| d.task_type).collect::<Vec<_>>(),
        TaskType::ALL.to_vec(),
        "every type, in order"
    );
}
