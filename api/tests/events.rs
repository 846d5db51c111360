//! Server-Sent Events follow a job driven through the queue library.

mod common;

use std::time::Duration;

use common::{EventReader, TestServer};
use queue::{ApiKeyRole, TaskType};
use reqwest::header::{CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use serde_json::json;

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn the_stream_reports_queued_processing_complete_and_ends(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let id = server.create_text_job(&key, "a story").await;
    let other = server.create_text_job(&key, "noise").await;

    let response = server
        .get(&key, &format!("/v1/jobs/{id}/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()[CONTENT_TYPE], "text/event-stream");
    // The job's error and status are the tenant's: kept by no cache, as
    // every answer under /v1 (axum's SSE said `no-cache`).
    assert_eq!(response.headers()[CACHE_CONTROL], "no-store");
    let mut events = EventReader::new(response);

    let (name, data) = events.next().await.unwrap();
    assert_eq!(name, "status");
    assert_eq!(
        (data["job_id"].as_str(), data["status"].as_str()),
        (Some(id.as_str()), Some("queued"))
    );
    let watched: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT job_id FROM job_watches")
        .fetch_all(&server.pool)
        .await
        .unwrap();
    assert_eq!(
        watched,
        vec![id.parse::<uuid::Uuid>().unwrap()],
        "only this job is watched"
    );

    // Claim both jobs' tasks; only this job's change is reported.
    let claimed = server
        .queue
        .claim("w1", &[TaskType::TextGeneration], 2)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2);
    let (_, data) = events.next().await.unwrap();
    assert_eq!(data["status"], "processing");

    let ours = claimed.iter().find(|t| t.job_id.to_string() == id).unwrap();
    let theirs = claimed.iter().find(|t| t.job_id.to_string() == other).unwrap();
    server.queue.heartbeat("w1", &[ours.lease()]).await.unwrap();
    server
        .queue
        .complete("w1", theirs.lease(), json!({}))
        .await
        .unwrap();
    server
        .queue
        .complete("w1", ours.lease(), json!({"text": "Once"}))
        .await
        .unwrap();
    let (_, data) = events.next().await.unwrap();
    assert_eq!(data["status"], "complete");
    assert_eq!(data["error"], serde_json::Value::Null);

    // Finished: the server closes the stream, and its watch goes with it,
    // so the job's later changes cost no notification.
    assert!(events.next().await.is_none());
    let mut watches = i64::MAX;
    for _ in 0..100 {
        watches = sqlx::query_scalar("SELECT count(*) FROM job_watches")
            .fetch_one(&server.pool)
            .await
            .unwrap();
        if watches == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(watches, 0, "the ended stream's watch was removed");
    server.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_finished_job_reports_once_and_a_cancel_is_reported(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let id = server.create_text_job(&key, "p").await;

    let response = server
        .get(&key, &format!("/v1/jobs/{id}/events"))
        .send()
        .await
        .unwrap();
    let mut events = EventReader::new(response);
    assert_eq!(events.next().await.unwrap().1["status"], "queued");
    server
        .post(&key, &format!("/v1/jobs/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(events.next().await.unwrap().1["status"], "cancelled");
    assert!(events.next().await.is_none());

    let response = server
        .get(&key, &format!("/v1/jobs/{id}/events"))
        .send()
        .await
        .unwrap();
    let mut events = EventReader::new(response);
    assert_eq!(events.next().await.unwrap().1["status"], "cancelled");
    assert!(events.next().await.is_none());
    server.stop().await;
}

/// A stream opened with a key that is then revoked says nothing more: the
/// job's next change ends it instead of reaching the revoked key's holder.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_revoked_keys_stream_reports_no_more(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let revoked = server.key("acme", ApiKeyRole::Client).await;
    let other = server.key("acme", ApiKeyRole::Client).await;
    let id = server.create_text_job(&other, "a story").await;
    let mut events = EventReader::new(open_stream(&server, &revoked, &id).await);
    assert_eq!(events.next().await.unwrap().1["status"], "queued");

    server.queue.revoke_api_key(&revoked[..11]).await.unwrap();
    let (status, _) = server
        .post_json(&other, &format!("/v1/jobs/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 200);
    assert!(
        events.next().await.is_none(),
        "the cancel reached a revoked key's stream"
    );
    server.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn shutting_down_ends_open_streams(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let id = server.create_text_job(&key, "p").await;
    let response = server
        .get(&key, &format!("/v1/jobs/{id}/events"))
        .send()
        .await
        .unwrap();
    let mut events = EventReader::new(response);
    assert_eq!(events.next().await.unwrap().1["status"], "queued");
    // `stop` asserts the server finishes within its timeout although this
    // stream's job never finishes.
    tokio::time::timeout(Duration::from_secs(5), server.stop())
        .await
        .unwrap();
    assert!(events.next().await.is_none());
}

async fn open_stream(server: &TestServer, key: &str, job: &str) -> reqwest::Response {
    server
        .get(key, &format!("/v1/jobs/{job}/events"))
        .send()
        .await
        .unwrap()
}

/// Over a cap, a stream is refused with 429, the limit's name and
/// Retry-After; a stream that ends gives its place back.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn open_streams_are_capped_per_tenant_and_per_server(pool: sqlx::PgPool) {
    let settings = api::state::Settings {
        streams: api::streams::StreamLimits {
            per_process: 2,
            per_tenant: 1,
            ..Default::default()
        },
        ..common::test_settings()
    };
    let server = TestServer::start_with(pool, settings).await;
    let acme = server.key("acme", ApiKeyRole::Client).await;
    let beta = server.key("beta", ApiKeyRole::Client).await;
    let gamma = server.key("gamma", ApiKeyRole::Client).await;
    let acme_job = server.create_text_job(&acme, "a").await;
    let beta_job = server.create_text_job(&beta, "b").await;
    let gamma_job = server.create_text_job(&gamma, "c").await;

    let mut first = EventReader::new(open_stream(&server, &acme, &acme_job).await);
    assert_eq!(first.next().await.unwrap().1["status"], "queued");
    let refused = open_stream(&server, &acme, &acme_job).await;
    assert_eq!(refused.headers()[RETRY_AFTER], "10");
    let refused = common::read(refused).await;
    common::assert_error(
        &refused,
        429,
        "too_many_requests",
        Some("SSE_MAX_STREAMS_PER_TENANT"),
    );

    let mut second = EventReader::new(open_stream(&server, &beta, &beta_job).await);
    assert_eq!(second.next().await.unwrap().1["status"], "queued");
    let refused = common::read(open_stream(&server, &gamma, &gamma_job).await).await;
    common::assert_error(&refused, 429, "too_many_requests", Some("SSE_MAX_STREAMS"));

    // acme's stream ends with its job, and acme may open one again.
    server
        .post(&acme, &format!("/v1/jobs/{acme_job}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(first.next().await.unwrap().1["status"], "cancelled");
    assert!(first.next().await.is_none());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let response = open_stream(&server, &acme, &acme_job).await;
        if response.status() == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the ended stream's slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}

/// A stream ends cleanly after its maximum duration, even though its job
/// is still queued; reconnecting reports the status again.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_stream_ends_after_its_maximum_duration(pool: sqlx::PgPool) {
    let settings = api::state::Settings {
        streams: api::streams::StreamLimits {
            max_duration: Duration::from_secs(1),
            ..Default::default()
        },
        ..common::test_settings()
    };
    let server = TestServer::start_with(pool, settings).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let id = server.create_text_job(&key, "never runs").await;
    for _ in 0..2 {
        let mut events = EventReader::new(open_stream(&server, &key, &id).await);
        assert_eq!(events.next().await.unwrap().1["status"], "queued");
        assert!(
            events.next().await.is_none(),
            "the stream outlived its maximum duration"
        );
    }
    server.stop().await;
}

/// A quiet stream sends a keep-alive comment every 15 s, inside the CLI's
/// 60 s read timeout and the idle timeouts of the proxies in between.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_quiet_stream_sends_a_keep_alive_within_16_seconds(pool: sqlx::PgPool) {
    use futures::StreamExt as _;
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let id = server.create_text_job(&key, "a quiet story").await;
    let response = server
        .get(&key, &format!("/v1/jobs/{id}/events"))
        .send()
        .await
        .unwrap();
    let mut body = response.bytes_stream();
    let mut received = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(16);
    // The job's first status, then nothing happens to it.
    while !received.lines().any(|l| l.starts_with(':')) {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .unwrap_or_else(|_| panic!("no keep-alive within 16 s; received {received:?}"))
            .expect("the stream stays open")
            .unwrap();
        received.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert_eq!(
        received.matches("event:").count(),
        1,
        "only the first status before it: {received:?}"
    );
    drop(body);
    server.stop().await;
}
