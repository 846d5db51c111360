//! The maintenance services against a store that does not answer. A test
//! binary of its own: the store reads its S3 settings from the process
//! environment, which must not change while other tests' threads read it.

use std::sync::Arc;
use std::time::Duration;

use api::metrics::Metrics;
use api::state::SweeperSettings;
use queue::{JobType, NewJob, Queue, TaskStatus, TaskType};
use serde_json::json;
use sqlx::PgPool;
use store::ArtifactStore;
use tokio_util::sync::CancellationToken;

/// The cleaner and the sweeper run side by side: deleting bytes from an S3
/// that does not answer retries for minutes, and meanwhile the task of a
/// dead worker is still taken back on time.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_store_that_hangs_does_not_hold_up_the_sweep(pool: PgPool) {
    // An S3 endpoint that takes connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = vec![];
        loop {
            held.push(listener.accept().await.unwrap().0);
        }
    });
    store::install_tls_provider();
    // The store reads its S3 settings from the environment (nextest runs
    // each test in a process of its own).
    for (name, value) in [
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "backlog-test"),
        ("AWS_SECRET_ACCESS_KEY", "backlog-test-secret"),
    ] {
        std::env::set_var(name, value);
    }
    let artifacts = ArtifactStore::from_url("s3://artifacts").unwrap();
    let q = Queue::new(pool.clone());
    sqlx::query("INSERT INTO artifact_deletions (storage_key) VALUES ('jobs/x/text-1.md')")
        .execute(&pool)
        .await
        .unwrap();
    let job = q
        .enqueue(NewJob::new("acme", JobType::Text, json!({"prompt": "p"})))
        .await
        .unwrap()
        .job;
    // Claimed by a worker that is never heard from again.
    q.claim("w", &[TaskType::TextGeneration], 1).await.unwrap();

    let shutdown = CancellationToken::new();
    let settings = SweeperSettings {
        interval: Duration::from_millis(200),
        stale_after: Duration::from_secs(1),
        repair_interval: Duration::from_millis(100),
        ..SweeperSettings::default()
    };
    let sweeper = tokio::spawn(api::sweeper::run(
        q.clone(),
        artifacts,
        settings,
        Arc::new(Metrics::new()),
        shutdown.clone(),
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let tasks = q.tasks_of(job.id).await.unwrap();
        if tasks[0].status == TaskStatus::Pending {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the dead worker's task was not taken back: {tasks:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        q.artifact_deletions(10).await.unwrap(),
        vec!["jobs/x/text-1.md"],
        "the delete is still waiting on the store"
    );
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), sweeper)
        .await
        .expect("shutdown ends a run under way")
        .unwrap();
}
