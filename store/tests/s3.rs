//! The artifact store against a real S3 API: moto's S3 server, started on a
//! free loopback port (`make test` installs it). One test function, because
//! the store reads its S3 settings from the process environment.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::TryStreamExt;
use queue::{ArtifactKind, Lease};
use store::{artifact_key, ArtifactStore, StoreError};
use uuid::Uuid;

/// moto's server, stopped when dropped.
struct S3Server {
    child: Child,
    endpoint: String,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_s3() -> S3Server {
    let port = free_port();
    let child = Command::new("python3")
        .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 runs");
    let server = S3Server {
        child,
        endpoint: format!("http://127.0.0.1:{port}"),
    };
    store::install_tls_provider();
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if http.get(&server.endpoint).send().await.is_ok() {
            return server;
        }
        let mut probe = Command::new("python3");
        assert!(
            probe
                .args(["-c", "import moto.server"])
                .status()
                .unwrap()
                .success(),
            "moto is not installed: run `make test` (scripts/ensure-tools.sh installs it) \
             or `pip install 'moto[server]'`"
        );
        assert!(
            Instant::now() < deadline,
            "moto's S3 server did not answer on {}",
            server.endpoint
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn objects_round_trip_through_an_s3_api() {
    let s3 = start_s3().await;
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
    let http = reqwest::Client::new();
    let created = http
        .put(format!("{}/artifacts", s3.endpoint))
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success(), "bucket: {}", created.status());

    let store = ArtifactStore::from_url("s3://artifacts/backlog/dev").unwrap();
    assert_eq!(store.location(), "s3://artifacts/backlog/dev");
    let key = artifact_key(Uuid::now_v7(), ArtifactKind::Pdf, Lease { task_id: 1, claim: 1 });
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
