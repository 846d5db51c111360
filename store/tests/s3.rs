//! The artifact store against a real S3 API: moto's S3 server, started on a
//! free loopback port (`make test` installs it). One test function, because
//! the store reads its S3 settings from the process environment.

use bytes::Bytes;
use futures::TryStreamExt;
use queue::{ArtifactKind, Lease};
use store::{artifact_key, ArtifactStore, StoreError};
use test_support::s3::MotoS3;
use uuid::Uuid;

#[tokio::test]
async fn objects_round_trip_through_an_s3_api() {
    let s3 = MotoS3::start().await;
    store::install_tls_provider();
    // The standard AWS variables, as a deployment would set them.
    for (name, value) in [
        ("AWS_ENDPOINT_URL", s3.endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "backlog-test"),
        ("AWS_SECRET_ACCESS_KEY", "backlog-test-secret"),
    ] {
        std::env::set_var(name, value);
    }
    s3.create_bucket("artifacts").await;

    let store = ArtifactStore::from_url("s3://artifacts/backlog/dev").unwrap();
    assert_eq!(store.location(), "s3://artifacts/backlog/dev");
    let key = artifact_key(
        Uuid::now_v7(),
        ArtifactKind::Pdf,
        Lease {
            task_id: 1,
            job_id: Uuid::nil(),
            claim: 1,
        },
    );
    let stored = store
        .put(&key, Bytes::from_static(b"%PDF-1.7 pretend"), "application/pdf")
        .await
        .unwrap();
    assert_eq!(stored.bytes, 16);

    // Under the prefix, as a store over the whole bucket sees it.
    let bucket = ArtifactStore::from_url("s3://artifacts").unwrap();
    assert_eq!(
        bucket.get(&format!("backlog/dev/{key}")).await.unwrap(),
        "%PDF-1.7 pretend"
    );

    assert_eq!(store.get(&key).await.unwrap(), "%PDF-1.7 pretend");
    assert_eq!(store.size(&key).await.unwrap(), 16);
    assert_eq!(store.get_range(&key, 5..8).await.unwrap(), "1.7");
    let streamed: Vec<Bytes> = store
        .stream_range(&key, 9..16)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(streamed.concat(), b"pretend");

    // A re-run overwrites the one object.
    store
        .put(&key, Bytes::from_static(b"second"), "application/pdf")
        .await
        .unwrap();
    assert_eq!(store.get(&key).await.unwrap(), "second");

    store.delete(&key).await.unwrap();
    let missing = store.get(&key).await.unwrap_err();
    assert!(matches!(missing, StoreError::NotFound { .. }), "{missing:?}");
    assert!(!missing.is_retryable());
    store.delete(&key).await.expect("deleting twice succeeds");

    // A bucket that does not exist is an error that names the problem.
    let nowhere = ArtifactStore::from_url("s3://no-such-bucket").unwrap();
    let error = nowhere
        .put("jobs/x/text.md", Bytes::from_static(b"x"), "text/markdown")
        .await
        .unwrap_err();
    assert!(error.to_string().to_lowercase().contains("bucket"), "{error}");
}
