//! Every class of bad input answers a JSON error with the right status,
//! names the field when one is at fault, and writes nothing.

mod common;

use common::{assert_error, read, TestServer, MAX_INPUT_BYTES};
use queue::ApiKeyRole;
use reqwest::header::CONTENT_TYPE;
use serde_json::json;

/// A raw body with a content type, to send what `json()` cannot.
async fn post_raw(
    server: &TestServer,
    key: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    let request = server
        .post(key, path)
        .header(CONTENT_TYPE, content_type)
        .body(body.to_string());
    read(request.send().await.unwrap()).await
}

/// Path, content type, body; then the expected status, code and field.
type BodyCase<'a> = (&'a str, &'a str, &'a str, u16, &'a str, Option<&'a str>);

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn bad_job_bodies_are_refused_and_nothing_is_written(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    server.create_text_job(&key, "already here").await;
    let before = server.row_counts().await;
    let json = "application/json";
    let long_text = "x".repeat(MAX_INPUT_BYTES + 1);
    let oversized = json!({"type": "pdf", "input": {"text": long_text}}).to_string();
    let over_limit = json!({"type": "pdf", "input": {"text": "y".repeat(20 * 1024)}}).to_string();

    let cases: &[BodyCase<'_>] = &[
        (
            "/v1/jobs",
            json,
            "{\"type\": \"text\",",
            400,
            "malformed_json",
            None,
        ),
        ("/v1/jobs", json, "not json", 400, "malformed_json", None),
        ("/v1/jobs", json, "", 400, "malformed_json", None),
        (
            "/v1/jobs",
            json,
            r#"{"type":"text","input":{"prompt":"p"}} trailing"#,
            400,
            "malformed_json",
            None,
        ),
        ("/v1/jobs", json, r#"[1, 2]"#, 422, "invalid_input", None),
        (
            "/v1/jobs",
            json,
            r#"{"type":"video","input":{"prompt":"p"}}"#,
            422,
            "invalid_input",
            Some("type"),
        ),
        (
            "/v1/jobs",
            json,
            r#"{"type":7,"input":{"prompt":"p"}}"#,
            422,
            "invalid_input",
            Some("type"),
        ),
        (
            "/v1/jobs",
            json,
            r#"{"input":{"prompt":"p"}}"#,
            422,
            "invalid_input",
            Some("type"),
        ),
        (
            "/v1/jobs",
            json,
            r#"{"type":"text"}"#,
            422,
            "invalid_input",
            Some("input"),
        ),
        (
            "/v1/jobs",
            json,
            r#"{"type":"text","input":{"prompt":"p"},"priority":"high"}"#,
            422,
            "invalid_input",
            Some("priority"),
        ),
        (
            "/v1/jobs",
            json,
            r#"{"type":"text","input":{"prompt":"p"},"colour":"red"}"#,
            422,
            "invalid_input",
            Some("colour"),
        ),
        (
            "/v1/jobs",
            json,
            r#"{"type":"text","input":{}}"#,
            422,
            "invalid_input",
            Some("input.prompt"),
        ),
        (
            "/v1/jobs",
            json,
            r#"{"type":"text","input":{"prompt":""}}"#,
            422,
            "invalid_input",
            Some("input.prompt"),
        ),
        (
            "/v1/jobs",
            json,
            r#"{"type":"text","input":{"prompt":42}}"#,
            422,
            "invalid_input",
            Some("input.prompt"),
        ),
        (
            "/v1/jobs",
            json,
            r#"{"type":"text","input":{"prompt":"p","seed":1}}"#,
            422,
            "invalid_input",
            Some("input.seed"),
        ),
        (
            "/v1/jobs",
            json,
            r#"{"type":"pdf","input":{"prompt":"p"}}"#,
            422,
            "invalid_input",
            Some("input.prompt"),
        ),
        (
            "/v1/jobs",
            json,
            r#"{"type":"audiobook","input":"read this"}"#,
            422,
            "invalid_input",
            Some("input"),
        ),
        ("/v1/jobs", json, &oversized, 422, "invalid_input", Some("input")),
        ("/v1/jobs", json, &over_limit, 413, "payload_too_large", None),
        (
            "/v1/jobs",
            "text/plain",
            r#"{"type":"text","input":{"prompt":"p"}}"#,
            415,
            "unsupported_media_type",
            None,
        ),
        (
            "/v1/jobs",
            "application/x-www-form-urlencoded",
            "type=text",
            415,
            "unsupported_media_type",
            None,
        ),
        (
            "/v1/jobs:batch",
            json,
            r#"{"jobs": "many"}"#,
            422,
            "invalid_input",
            Some("jobs"),
        ),
        (
            "/v1/jobs:batch",
            json,
            r#"{"jobs": []}"#,
            422,
            "invalid_input",
            Some("jobs"),
        ),
        (
            "/v1/jobs:batch",
            json,
            r#"{"jobs": [{"type":"text","input":{"prompt":"p"}}, {"type":"text","input":{"prompt":"p"},"x":1}]}"#,
            422,
            "invalid_input",
            Some("jobs[1].x"),
        ),
        (
            "/v1/jobs:batch",
            json,
            r#"{"jobs": [{"type":"text","input":{"prompt":"p"}}, {"type":"nope","input":{}}]}"#,
            422,
            "invalid_input",
            Some("jobs[1].type"),
        ),
    ];
    for (path, content_type, body, status, code, field) in cases {
        let answer = post_raw(&server, &key, path, content_type, body).await;
        let shown: String = body.chars().take(60).collect();
        assert_eq!(answer.0, *status, "{path} {shown}: {}", answer.1);
        assert_error(&answer, *status, code, *field);
        assert_eq!(
            server.row_counts().await,
            before,
            "{path} {shown} wrote something"
        );
    }

    // No content type at all.
    let request = server
        .post(&key, "/v1/jobs")
        .body(r#"{"type":"text","input":{"prompt":"p"}}"#);
    assert_error(
        &read(request.send().await.unwrap()).await,
        415,
        "unsupported_media_type",
        None,
    );

    // A batch over the size limit of the queue.
    let jobs: Vec<_> = (0..11)
        .map(|_| json!({"type": "text", "input": {"prompt": "p"}}))
        .collect();
    let too_many = server
        .post_json(&key, "/v1/jobs:batch", &json!({ "jobs": jobs }))
        .await;
    assert_error(&too_many, 422, "invalid_input", Some("jobs"));

    // A bad Idempotency-Key header.
    let request = server
        .post(&key, "/v1/jobs")
        .header("Idempotency-Key", "k".repeat(201))
        .json(&json!({"type": "text", "input": {"prompt": "p"}}));
    assert_error(
        &read(request.send().await.unwrap()).await,
        400,
        "invalid_request",
        Some("Idempotency-Key"),
    );

    assert_eq!(server.row_counts().await, before);
    server.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn bad_ids_queries_and_cursors_are_400s_and_write_nothing(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let id = server.create_text_job(&key, "p").await;
    let before = server.row_counts().await;

    let gets: &[(&str, &str)] = &[
        ("/v1/jobs/not-a-uuid", "id"),
        // Not UTF-8 once percent-decoded: refused before any handler runs.
        ("/v1/jobs/%FF", "id"),
        ("/v1/jobs/%FF/events", "id"),
        ("/v1/jobs/%C3%28/artifacts", "id"),
        ("/v1/jobs/123/events", "id"),
        ("/v1/jobs?cursor=garbage", "cursor"),
        ("/v1/jobs?cursor=AQID", "cursor"),
        ("/v1/jobs?status=sleeping", "status"),
        ("/v1/jobs?type=video", "type"),
        ("/v1/jobs?limit=0", "limit"),
        ("/v1/jobs?limit=201", "limit"),
        ("/v1/jobs?limit=ten", "limit"),
        ("/v1/jobs?sort=asc", "sort"),
    ];
    for (path, field) in gets {
        let answer = server.get_json(&key, path).await;
        assert_error(&answer, 400, "invalid_request", Some(field));
    }
    let artifact = server
        .get_json(&key, &format!("/v1/jobs/{id}/artifacts/nope"))
        .await;
    assert_error(&artifact, 400, "invalid_request", Some("artifact_id"));
    let artifact = server
        .get_json(&key, &format!("/v1/jobs/{id}/artifacts/%FF"))
        .await;
    assert_error(&artifact, 400, "invalid_request", Some("artifact_id"));
    for action in ["cancel", "retry"] {
        let answer = server
            .post_json(&key, &format!("/v1/jobs/xyz/{action}"), &json!(null))
            .await;
        assert_error(&answer, 400, "invalid_request", Some("id"));
    }
    let missing = uuid::Uuid::now_v7();
    assert_error(
        &server.get_json(&key, &format!("/v1/jobs/{missing}")).await,
        404,
        "not_found",
        None,
    );
    assert_eq!(server.row_counts().await, before);
    server.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn unknown_routes_and_methods_answer_json_errors(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    assert_error(&server.get_json(&key, "/v2/jobs").await, 404, "not_found", None);
    let answer = read(server.client.delete(server.url("/v1/jobs")).send().await.unwrap()).await;
    assert_error(&answer, 405, "method_not_allowed", None);
    server.stop().await;
}

/// A `\u0000` is valid JSON but PostgreSQL stores it in neither `text` nor
/// `jsonb`: every place a client can put one is refused naming the field,
/// before anything reaches the database.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn nul_characters_are_refused_naming_the_field_and_write_nothing(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    server.create_text_job(&key, "already here").await;
    let before = server.row_counts().await;

    let cases = [
        (
            "/v1/jobs",
            json!({"type": "text", "input": {"prompt": "a\u{0}b"}}),
            "input.prompt",
        ),
        (
            "/v1/jobs",
            json!({"type": "reading", "input": {"prompt": "p", "title": "\u{0}"}}),
            "input.title",
        ),
        (
            "/v1/jobs",
            json!({"type": "audiobook", "input": {"text": "t", "voice": "en\u{0}"}}),
            "input.voice",
        ),
        (
            "/v1/jobs",
            json!({"type": "pdf", "input": {"text": "\u{0}"}}),
            "input.text",
        ),
        (
            "/v1/jobs:batch",
            json!({"jobs": [
                {"type": "text", "input": {"prompt": "fine"}},
                {"type": "pdf", "input": {"text": "x\u{0}"}},
            ]}),
            "jobs[1].input.text",
        ),
    ];
    for (path, body, field) in &cases {
        let answer = server.post_json(&key, path, body).await;
        assert_error(&answer, 422, "invalid_input", Some(field));
        assert_eq!(server.row_counts().await, before, "{body} wrote something");
    }
    // Query parameters and path ids with a NUL are unreadable, not 500s.
    for (path, field) in [
        ("/v1/jobs?status=%00", "status"),
        ("/v1/jobs?type=queued%00", "type"),
        ("/v1/jobs?cursor=%00", "cursor"),
        ("/v1/jobs/%00", "id"),
    ] {
        assert_error(
            &server.get_json(&key, path).await,
            400,
            "invalid_request",
            Some(field),
        );
    }
    assert_eq!(server.row_counts().await, before);
    server.stop().await;
}

/// The queue's own validation catches NULs from any caller, nested values
/// and object keys included, and in the tenant and idempotency key.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn the_queue_refuses_nul_characters_from_any_caller(pool: sqlx::PgPool) {
    let queue = queue::Queue::new(pool);
    let job = |input: serde_json::Value| queue::NewJob::new("acme", queue::JobType::Text, input);
    let cases = [
        (
            job(json!({"prompt": "p", "extra": {"list": ["ok", "no\u{0}"]}})),
            "input.extra.list[1]",
        ),
        (job(json!({"prompt": "p", "extra": {"k\u{0}": 1}})), "input.extra"),
        (
            queue::NewJob::new("ac\u{0}me", queue::JobType::Text, json!({"prompt": "p"})),
            "tenant",
        ),
        (
            job(json!({"prompt": "p"})).idempotency_key("k\u{0}"),
            "idempotency_key",
        ),
    ];
    for (new, field) in cases {
        match queue.enqueue(new.clone()).await {
            Err(queue::QueueError::InvalidInput { field: got, .. }) => assert_eq!(got, field, "{new:?}"),
            other => panic!("{new:?}: {other:?}"),
        }
    }
    let key = api::auth::generate_key("ac\u{0}me", ApiKeyRole::Client);
    assert!(matches!(
        queue.create_api_key(&key.record).await,
        Err(queue::QueueError::InvalidInput { ref field, .. }) if field == "tenant"
    ));
    assert!(matches!(
        queue.revoke_api_key("bk_\u{0}").await,
        Err(queue::QueueError::InvalidInput { ref field, .. }) if field == "key"
    ));
    assert!(matches!(
        queue.api_keys(Some("\u{0}")).await,
        Err(queue::QueueError::InvalidInput { ref field, .. }) if field == "tenant"
    ));
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM all_jobs")
        .fetch_one(queue.pool())
        .await
        .unwrap();
    assert_eq!(jobs, 0);
}

/// Priority orders all tenants' work, so it is bounded to -100..=100.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn priorities_outside_the_documented_range_are_refused(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let before = server.row_counts().await;
    for priority in [101, -101, i32::MAX, i32::MIN] {
        let body = json!({"type": "text", "input": {"prompt": "p"}, "priority": priority});
        let answer = server.post_json(&key, "/v1/jobs", &body).await;
        assert_error(&answer, 422, "invalid_input", Some("priority"));
        let batch = json!({"jobs": [body]});
        let answer = server.post_json(&key, "/v1/jobs:batch", &batch).await;
        assert_error(&answer, 422, "invalid_input", Some("jobs[0].priority"));
    }
    assert_eq!(server.row_counts().await, before);
    for priority in [100, -100] {
        let body = json!({"type": "text", "input": {"prompt": "p"}, "priority": priority});
        let (status, job) = server.post_json(&key, "/v1/jobs", &body).await;
        assert_eq!(status, 201, "{job}");
        assert_eq!(job["priority"], priority);
    }
    server.stop().await;
}
