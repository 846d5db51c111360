//! Creating, reading, listing, cancelling and retrying jobs over HTTP.

mod common;

use common::{assert_error, TestServer};
use queue::{ApiKeyRole, Failure, JobType, TaskType};
use serde_json::json;

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_created_job_comes_back_with_its_task_plan(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;

    let created = server
        .post(&key, "/v1/jobs")
        .json(&json!({"type": "reading", "input": {"prompt": "tides", "title": "Tides"}, "priority": 3}))
        .send()
        .await
        .unwrap();
    let location = created
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_string());
    let (status, job) = common::read(created).await;
    assert_eq!(status, 201, "{job}");
    assert_eq!(
        location,
        Some(format!("/v1/jobs/{}", job["id"].as_str().unwrap()))
    );
    assert_eq!(job["type"], "reading");
    assert_eq!(job["status"], "queued");
    assert_eq!(job["priority"], 3);
    assert_eq!(job["input"], json!({"prompt": "tides", "title": "Tides"}));
    let id = job["id"].as_str().unwrap();
    assert_eq!(job["events_path"], format!("/v1/jobs/{id}/events"));

    let (status, detail) = server.get_json(&key, &format!("/v1/jobs/{id}")).await;
    assert_eq!(status, 200, "{detail}");
    assert_eq!(detail["id"], id);
    let tasks = detail["tasks"].as_array().unwrap();
    let types: Vec<&str> = tasks.iter().map(|t| t["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["text_generation", "pdf_generation", "audio_generation"]);
    assert_eq!(tasks[1]["depends_on"], json!(["text_generation"]));
    assert!(tasks
        .iter()
        .all(|t| t["status"] == "pending" && t["attempts"] == 0));
    assert_eq!(detail["artifacts"], json!([]));
    server.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn an_idempotency_key_replays_the_same_job_and_refuses_a_different_one(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let body = json!({"type": "pdf", "input": {"text": "Hello"}});
    let send = |body: serde_json::Value| {
        let request = server
            .post(&key, "/v1/jobs")
            .header("Idempotency-Key", "order-17")
            .json(&body);
        async move { common::read(request.send().await.unwrap()).await }
    };

    let (first_status, first) = send(body.clone()).await;
    assert_eq!(first_status, 201, "{first}");
    let (second_status, second) = send(body).await;
    assert_eq!(second_status, 200, "{second}");
    assert_eq!(first["id"], second["id"]);
    assert_eq!(second["idempotency_key"], "order-17");
    let before = server.row_counts().await;

    let conflict = send(json!({"type": "pdf", "input": {"text": "Goodbye"}})).await;
    assert_error(&conflict, 409, "idempotency_conflict", Some("Idempotency-Key"));
    assert_eq!(server.row_counts().await, before);

    // The same key from another tenant is a different key.
    let other = server.key("globex", ApiKeyRole::Client).await;
    let request = server
        .post(&other, "/v1/jobs")
        .header("Idempotency-Key", "order-17")
        .json(&json!({"type": "pdf", "input": {"text": "Goodbye"}}));
    let (status, job) = common::read(request.send().await.unwrap()).await;
    assert_eq!(status, 201, "{job}");
    server.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn concurrent_creations_are_all_written_once(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    // Enough at once that the server groups them into shared transactions,
    // with duplicates of one idempotency key among them.
    let requests = (0..40).map(|i| {
        let mut request = server
            .post(&key, "/v1/jobs")
            .json(&json!({"type": "text", "input": {"prompt": "same"}}));
        if i % 4 == 0 {
            request = request.header("Idempotency-Key", "shared");
        }
        async move { common::read(request.send().await.unwrap()).await }
    });
    let answers = futures::future::join_all(requests).await;
    let created = answers.iter().filter(|(s, _)| *s == 201).count();
    let replayed: Vec<_> = answers.iter().filter(|(s, _)| *s == 200).collect();
    assert_eq!(created, 31, "30 unkeyed and the first keyed one: {answers:?}");
    assert_eq!(replayed.len(), 9);
    let shared_id = &replayed[0].1["id"];
    assert!(replayed.iter().all(|(_, job)| &job["id"] == shared_id));
    assert_eq!(server.row_counts().await[..2], [31, 31]);
    server.stop().await;
}

/// A group of creations whose insert committed but whose answer was lost
/// (the connection cut at the commit) is not written again: each request
/// gets the error (503), and each job exists once. Written again one by one,
/// as any failed group was, every job of the group existed twice.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_group_whose_answer_was_lost_is_not_written_twice(pool: sqlx::PgPool) {
    use api::enqueuer::Enqueuer;
    use test_support::pg_proxy::AnswerLosingProxy;
    let proxy = AnswerLosingProxy::in_front_of(&pool, b"INSERT INTO jobs").await;
    let through_proxy = proxy.pool(&pool, 4).await;
    let enqueuer = Enqueuer::start(queue::Queue::new(through_proxy));

    // All in the channel before the first group is taken: groups of 128.
    let answers = futures::future::join_all((0..200).map(|i| {
        let job = queue::NewJob::new(
            "acme",
            queue::JobType::Text,
            json!({"prompt": format!("job {i}")}),
        );
        enqueuer.enqueue(job)
    }))
    .await;
    assert_eq!(proxy.cuts(), 1, "one group's answer was lost");
    let failed = answers.iter().filter(|a| a.is_err()).count();
    assert!(failed > 1, "a whole group failed: {failed}");
    let (rows, prompts): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT input->>'prompt') FROM all_jobs")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(rows, prompts, "a job was written twice");
    assert_eq!(rows, 200, "the lost group was written, once");
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_batch_is_created_in_one_go_and_replays_with_its_key(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let body = json!({"jobs": [
        {"type": "text", "input": {"prompt": "one"}},
        {"type": "audiobook", "input": {"text": "two", "voice": "en"}, "priority": 5},
    ]});
    let send = |body: serde_json::Value| {
        let request = server
            .post(&key, "/v1/jobs:batch")
            .header("Idempotency-Key", "nightly")
            .json(&body);
        async move { common::read(request.send().await.unwrap()).await }
    };

    let (status, batch) = send(body.clone()).await;
    assert_eq!(status, 201, "{batch}");
    let jobs = batch["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2);
    assert!(jobs.iter().all(|j| j["created"] == true));
    assert_eq!(jobs[1]["job"]["type"], "audiobook");
    assert_eq!(jobs[1]["job"]["priority"], 5);
    assert_eq!(jobs[1]["job"]["idempotency_key"], "nightly№1");
    assert_eq!(server.row_counts().await[..2], [2, 2]);

    let (status, replay) = send(body).await;
    assert_eq!(status, 200, "{replay}");
    assert_eq!(replay["jobs"][0]["created"], false);
    assert_eq!(replay["jobs"][0]["job"]["id"], jobs[0]["job"]["id"]);

    // One invalid job: nothing from the batch is written.
    let (status, error) = send(json!({"jobs": [
        {"type": "text", "input": {"prompt": "fine"}},
        {"type": "text", "input": {"prompt": "   "}},
    ]}))
    .await;
    assert_eq!(status, 422, "{error}");
    assert_eq!(error["error"]["field"], "jobs[1].input.prompt");
    assert_eq!(server.row_counts().await[..2], [2, 2]);
    server.stop().await;
}

/// A batch replays whole: a replay that adds a job or leaves one out is a
/// different request (409, nothing written), as one that changes a job is.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_batch_replayed_with_a_job_added_or_left_out_is_refused(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let text = |prompt: &str| json!({"type": "text", "input": {"prompt": prompt}});
    let send = |jobs: Vec<serde_json::Value>| {
        let request = server
            .post(&key, "/v1/jobs:batch")
            .header("Idempotency-Key", "import-7")
            .json(&json!({ "jobs": jobs }));
        async move { common::read(request.send().await.unwrap()).await }
    };
    let (status, batch) = send(vec![text("one"), text("two")]).await;
    assert_eq!(status, 201, "{batch}");
    let first = batch["jobs"][0]["job"]["id"].clone();

    for (what, jobs) in [
        ("a job added", vec![text("one"), text("two"), text("three")]),
        ("a job left out", vec![text("one")]),
        ("a job changed", vec![text("one"), text("2")]),
    ] {
        let (status, error) = send(jobs).await;
        assert_eq!(status, 409, "{what}: {error}");
        assert_eq!(error["error"]["code"], "idempotency_conflict", "{what}: {error}");
        assert_eq!(server.row_counts().await[..2], [2, 2], "{what}: nothing written");
    }

    let (status, replay) = send(vec![text("one"), text("two")]).await;
    assert_eq!(status, 200, "the same batch still replays: {replay}");
    assert_eq!(replay["jobs"][0]["job"]["id"], first);
    server.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn listing_pages_newest_first_with_filters(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(server.create_text_job(&key, &format!("job {i}")).await);
    }
    let (_, pdf) = server
        .post_json(&key, "/v1/jobs", &json!({"type": "pdf", "input": {"text": "x"}}))
        .await;
    server
        .post(&key, &format!("/v1/jobs/{}/cancel", ids[0]))
        .send()
        .await
        .unwrap();

    let mut seen = Vec::new();
    let mut path = "/v1/jobs?type=text&limit=2".to_string();
    loop {
        let (status, page) = server.get_json(&key, &path).await;
        assert_eq!(status, 200, "{page}");
        seen.extend(
            page["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|j| j["id"].as_str().unwrap().to_string()),
        );
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/jobs?type=text&limit=2&cursor={cursor}"),
            None => break,
        }
    }
    ids.reverse();
    assert_eq!(seen, ids, "every text job once, newest first");

    let (_, cancelled) = server.get_json(&key, "/v1/jobs?status=cancelled").await;
    let cancelled: Vec<_> = cancelled["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].clone())
        .collect();
    assert_eq!(cancelled, [json!(ids[4])]);
    let (_, pdfs) = server.get_json(&key, "/v1/jobs?type=pdf").await;
    assert_eq!(pdfs["jobs"][0]["id"], pdf["id"]);
    assert_eq!(pdfs["next_cursor"], serde_json::Value::Null);
    server.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn listing_by_age_keeps_the_jobs_created_since_the_given_instant(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let old = server.create_text_job(&key, "old").await;
    let new = server.create_text_job(&key, "new").await;
    // Two days old: a job from before the console's "last 24 hours" (a
    // text job is kept in its task's row).
    sqlx::query(
        "WITH moved AS (UPDATE jobs SET created_at = now() - interval '2 days' WHERE id = $1::uuid)
         UPDATE job_tasks SET created_at = now() - interval '2 days'
         WHERE job_id = $1::uuid AND job_input IS NOT NULL",
    )
    .bind(&old)
    .execute(&server.pool)
    .await
    .unwrap();
    let ids = |page: &serde_json::Value| -> Vec<String> {
        page["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_string())
            .collect()
    };

    let day_ago = (chrono::Utc::now() - chrono::Duration::days(1)).to_rfc3339();
    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair("created_after", &day_ago)
        .finish();
    let (status, page) = server.get_json(&key, &format!("/v1/jobs?{query}")).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(ids(&page), vec![new.clone()]);
    let (_, page) = server
        .get_json(&key, "/v1/jobs?created_after=2000-01-01T00:00:00Z&type=text")
        .await;
    assert_eq!(ids(&page), [new, old]);

    let refused = server.get_json(&key, "/v1/jobs?created_after=yesterday").await;
    assert_error(&refused, 400, "invalid_request", Some("created_after"));
    assert!(
        refused.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("RFC 3339"),
        "{}",
        refused.1
    );
    server.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn cancel_and_retry_follow_the_job_lifecycle(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;

    let id = server.create_text_job(&key, "cancel me").await;
    let (status, job) = server
        .post_json(&key, &format!("/v1/jobs/{id}/cancel"), &json!(null))
        .await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["status"], "cancelled");
    let (status, job) = server
        .post_json(&key, &format!("/v1/jobs/{id}/cancel"), &json!(null))
        .await;
    assert_eq!(
        (status, job["status"].as_str()),
        (200, Some("cancelled")),
        "idempotent"
    );
    let retry = server
        .post_json(&key, &format!("/v1/jobs/{id}/retry"), &json!(null))
        .await;
    assert_error(&retry, 409, "invalid_state", None);

    // A job whose only task failed for good can be retried.
    let (_, job) = server
        .post_json(&key, "/v1/jobs", &json!({"type": "pdf", "input": {"text": "t"}}))
        .await;
    let id = job["id"].as_str().unwrap();
    let task = server
        .queue
        .claim("w1", &[TaskType::PdfGeneration], 1)
        .await
        .unwrap()
        .remove(0);
    server
        .queue
        .fail("w1", task.lease(), &Failure::permanent("font missing"))
        .await
        .unwrap();
    let (_, failed) = server.get_json(&key, &format!("/v1/jobs/{id}")).await;
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["tasks"][0]["last_error"], "font missing");
    let cancel = server
        .post_json(&key, &format!("/v1/jobs/{id}/cancel"), &json!(null))
        .await;
    assert_error(&cancel, 409, "invalid_state", None);

    let (status, retried) = server
        .post_json(&key, &format!("/v1/jobs/{id}/retry"), &json!(null))
        .await;
    assert_eq!(status, 200, "{retried}");
    assert_eq!(retried["status"], "queued");
    let (_, detail) = server.get_json(&key, &format!("/v1/jobs/{id}")).await;
    assert_eq!(detail["tasks"][0]["status"], "pending");
    assert_eq!(detail["tasks"][0]["attempts"], 0);
    server.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn every_job_type_accepts_its_documented_input(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    for job_type in JobType::ALL {
        let input = match job_type {
            JobType::Reading | JobType::Text => {
                json!({"prompt": "p", "title": "t", "voice": "v", "lang": "el"})
            }
            JobType::Pdf | JobType::Audiobook => {
                json!({"text": "x", "title": "t", "voice": "v", "lang": "en-GB"})
            }
        };
        let (status, job) = server
            .post_json(
                &key,
                "/v1/jobs",
                &json!({"type": job_type.as_str(), "input": input}),
            )
            .await;
        assert_eq!(status, 201, "{job_type}: {job}");
    }
    server.stop().await;
}

/// A voice name that would lead a TTS engine out of its voices folder
/// (espeak-ng read `gmw/../../../../etc/passwd` and printed the file into
/// the job's error) is refused when the job is sent, naming the field.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_voice_that_is_a_path_out_of_the_voices_folder_is_refused(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    for (job_type, voice) in [
        ("audiobook", "gmw/../../../../etc/passwd"),
        ("reading", "/proc/self/environ"),
    ] {
        let field = if job_type == "reading" { "prompt" } else { "text" };
        let refused = server
            .post_json(
                &key,
                "/v1/jobs",
                &json!({"type": job_type, "input": {field: "p", "voice": voice}}),
            )
            .await;
        assert_error(&refused, 422, "invalid_input", Some("input.voice"));
    }
    let (status, _) = server
        .post_json(
            &key,
            "/v1/jobs",
            &json!({"type": "audiobook", "input": {"text": "p", "voice": "gmw/en-GB-x-rp"}}),
        )
        .await;
    assert_eq!(status, 201, "a voice in a folder is a voice");
    server.stop().await;
}

/// `lang` is part of the one input contract the workers read: a tag is
/// taken, a word is refused naming the field, nothing is written.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_jobs_language_is_checked_where_it_is_sent(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let refused = server
        .post_json(
            &key,
            "/v1/jobs",
            &json!({"type": "reading", "input": {"prompt": "p", "lang": "greek"}}),
        )
        .await;
    assert_error(&refused, 422, "invalid_input", Some("input.lang"));
    let (status, page) = server.get_json(&key, "/v1/jobs").await;
    assert_eq!(
        (status, page["jobs"].as_array().map(Vec::len)),
        (200, Some(0)),
        "{page}"
    );
    server.stop().await;
}

/// A batch's per-job keys live apart from single-job keys: no key a client
/// can send for one job names a job of a batch.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn batch_keys_never_collide_with_single_job_keys(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let batch = server
        .post(&key, "/v1/jobs:batch")
        .header("Idempotency-Key", "k")
        .json(&json!({"jobs": [{"type": "text", "input": {"prompt": "from the batch"}}]}));
    let (status, batch) = common::read(batch.send().await.unwrap()).await;
    assert_eq!(status, 201, "{batch}");
    let batch_job = batch["jobs"][0]["job"]["id"].clone();

    for single_key in ["k#0", "k", "k 0", "k-0"] {
        let single = server
            .post(&key, "/v1/jobs")
            .header("Idempotency-Key", single_key)
            .json(&json!({"type": "pdf", "input": {"text": "a single job"}}));
        let (status, job) = common::read(single.send().await.unwrap()).await;
        assert_eq!(status, 201, "{single_key}: {job}");
        assert_ne!(job["id"], batch_job, "{single_key}");
    }
    server.stop().await;
}

/// A replay must ask for the same job: a different priority (or, from the
/// queue, a different max_attempts) is a conflict like a different input.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_replay_with_another_priority_or_max_attempts_is_a_conflict(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let send = |path: &str, body: serde_json::Value| {
        let request = server
            .post(&key, path)
            .header("Idempotency-Key", "same")
            .json(&body);
        async move { common::read(request.send().await.unwrap()).await }
    };
    let job = json!({"type": "text", "input": {"prompt": "p"}, "priority": 1});
    assert_eq!(send("/v1/jobs", job.clone()).await.0, 201);
    assert_eq!(send("/v1/jobs", job).await.0, 200);
    let other = json!({"type": "text", "input": {"prompt": "p"}, "priority": 2});
    assert_error(
        &send("/v1/jobs", other.clone()).await,
        409,
        "idempotency_conflict",
        None,
    );
    assert_eq!(
        send(
            "/v1/jobs:batch",
            json!({"jobs": [{"type": "text", "input": {"prompt": "p"}}]})
        )
        .await
        .0,
        201
    );
    let batch = json!({"jobs": [{"type": "text", "input": {"prompt": "p"}, "priority": 9}]});
    assert_error(
        &send("/v1/jobs:batch", batch).await,
        409,
        "idempotency_conflict",
        None,
    );

    let new = || queue::NewJob::new("acme", JobType::Pdf, json!({"text": "t"})).idempotency_key("attempts");
    assert!(server.queue.enqueue(new().max_attempts(3)).await.unwrap().created);
    assert!(!server.queue.enqueue(new().max_attempts(3)).await.unwrap().created);
    assert!(matches!(
        server.queue.enqueue(new().max_attempts(7)).await,
        Err(queue::QueueError::IdempotencyConflict { .. })
    ));
    server.stop().await;
}
