//! The `api` binary itself: serves with JSON logs (on stderr) carrying
//! request ids, exits cleanly on SIGTERM, `keys create` prints only the
//! secret on stdout, and replicas migrating on start take turns.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn the_binary_logs_json_with_request_ids_and_stops_on_sigterm(pool: sqlx::PgPool) {
    let artifacts = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_api"))
        .args([
            "serve",
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--sweeper-interval-seconds",
            "1",
        ])
        .arg("--artifact-store")
        .arg(format!("file://{}", artifacts.path().display()))
        .env("DATABASE_URL", test_support::database_url(&pool))
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines_tx, lines) = mpsc::channel::<Value>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap();
            let value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            if lines_tx.send(value).is_err() {
                return;
            }
        }
    });
    let next_line = |what: &str, matches: &dyn Fn(&Value) -> bool| loop {
        let line = lines
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("no log line for {what} within 10 s"));
        if matches(&line) {
            return line;
        }
    };

    let listening = next_line("listening", &|l| l["message"] == "listening");
    let address = listening["address"].as_str().unwrap().to_string();
    // Workspace builds give reqwest rustls without a provider; see common::http_client.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let response = reqwest::Client::new()
        .get(format!("http://{address}/healthz"))
        .header("x-request-id", "req-from-test")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "req-from-test");
    let logged = next_line("the request", &|l| l["span"]["request_id"] == "req-from-test");
    assert_eq!(logged["span"]["path"], "/healthz");
    assert_eq!(logged["status"], 200);

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    next_line("shutdown", &|l| l["message"] == "stopped");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status}");
}

/// Scripts capture the secret with `$(api keys create ...)`: stdout must
/// hold it alone, whatever the log level (logs go to stderr).
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn keys_create_prints_only_the_secret_on_stdout(pool: sqlx::PgPool) {
    let output = tokio::task::spawn_blocking({
        let url = test_support::database_url(&pool);
        move || {
            Command::new(env!("CARGO_BIN_EXE_api"))
                .args(["keys", "create", "--tenant", "ops", "--admin"])
                .env("DATABASE_URL", url)
                // Debug makes the database driver log every statement.
                .env("RUST_LOG", "debug")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let secret = stdout
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("one line on stdout: {stdout:?}"));
    assert!(
        !secret.contains('\n') && !secret.contains(' '),
        "stdout holds more than the secret: {stdout:?}"
    );
    let keys = queue::Queue::new(pool).api_keys(Some("ops")).await.unwrap();
    assert_eq!(keys.len(), 1);
    assert!(
        secret.starts_with(&keys[0].prefix),
        "{secret:?} is the key created (prefix {})",
        keys[0].prefix
    );
    let logged: Vec<Value> = stderr
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    assert!(!logged.is_empty(), "the logs went to stderr: {stderr}");
    assert!(!stderr.contains(secret), "the secret is never logged");
}

/// The `application_name` of the replicas [`serve_migrating`] starts.
const REPLICA: &str = "backlog-test-replica";

/// An `api` process, killed if the test ends (or fails) before stopping it.
struct Replica(Option<std::process::Child>);

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut process) = self.0.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }
}

/// Once `replica` has exited, wait until PostgreSQL has ended its sessions:
/// the test's database is dropped after the test, which fails while any
/// session is still on it (a backend notices its client gone a moment
/// later).
async fn stopped(pool: &sqlx::PgPool, mut replica: Replica) -> std::process::ExitStatus {
    let mut process = replica.0.take().expect("a running replica");
    let status = tokio::task::spawn_blocking(move || process.wait())
        .await
        .unwrap()
        .unwrap();
    for _ in 0..100 {
        let sessions: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = $1",
        )
        .bind(REPLICA)
        .fetch_one(pool)
        .await
        .unwrap();
        if sessions == 0 {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the replica's sessions outlived it by 5 s");
}

/// `api serve` with `MIGRATE_ON_START=true` (as the shipped api.yaml runs
/// it), once it logs that it listens: the process and its address.
fn serve_migrating(database_url: &str, artifacts: &std::path::Path) -> (Replica, String) {
    serve_migrating_with(database_url, artifacts, &[])
}

/// [`serve_migrating`] with more settings in its environment.
fn serve_migrating_with(
    database_url: &str,
    artifacts: &std::path::Path,
    settings: &[(&str, &str)],
) -> (Replica, String) {
    // Named, so the test can wait for its sessions to end (see `stopped`).
    let separator = if database_url.contains('?') { '&' } else { '?' };
    let database_url = format!("{database_url}{separator}application_name={REPLICA}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_api"))
        .args(["serve", "--bind", "127.0.0.1", "--port", "0"])
        .arg("--artifact-store")
        .arg(format!("file://{}", artifacts.display()))
        .env("DATABASE_URL", &database_url)
        .env("MIGRATE_ON_START", "true")
        .env("SWEEPER_INTERVAL_SECONDS", "0")
        .env("RUST_LOG", "info")
        .envs(settings.iter().copied())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read to the end, so the replica never blocks on a full pipe.
    let stderr = child.stderr.take().unwrap();
    let replica = Replica(Some(child));
    let (address_tx, address) = mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let value: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            if value["message"] == "listening" {
                let _ = address_tx.send(Ok(value["address"].as_str().unwrap_or_default().to_string()));
            }
            seen.push(line);
        }
        let _ = address_tx.send(Err(seen));
    });
    match address.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(address)) => (replica, address),
        Ok(Err(seen)) => panic!("the api exited before listening; it logged: {seen:#?}"),
        Err(_) => panic!("the api did not listen within 60 s"),
    }
}

/// Two replicas migrating on start at once take turns (the migrator's
/// advisory lock): both serve, ready, on a database migrated once.
#[sqlx::test(migrations = false)]
async fn replicas_migrating_on_start_at_once_both_serve_a_database_migrated_once(pool: sqlx::PgPool) {
    let url = test_support::database_url(&pool);
    let artifacts = tempfile::tempdir().unwrap();
    let starting: Vec<_> = (0..2)
        .map(|_| {
            let (url, dir) = (url.clone(), artifacts.path().to_path_buf());
            std::thread::spawn(move || serve_migrating(&url, &dir))
        })
        .collect();
    let replicas: Vec<_> = starting.into_iter().map(|s| s.join().unwrap()).collect();
    let _ = rustls::crypto::ring::default_provider().install_default();
    for (_, address) in &replicas {
        let response = reqwest::get(format!("http://{address}/readyz")).await.unwrap();
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    }
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        applied as usize,
        queue::MIGRATOR.iter().count(),
        "each migration once"
    );
    for (mut replica, _) in replicas {
        if let Some(process) = replica.0.as_mut() {
            process.kill().unwrap();
        }
        stopped(&pool, replica).await;
    }
}

/// Started before `api migrate` (a first deploy starts everything at once),
/// `api serve` waits for the schema, as the workers do, and serves once it
/// is there; it used to listen at once and answer every request 500. Key
/// commands say to run `api migrate` instead of naming a missing relation.
#[sqlx::test(migrations = false)]
async fn an_api_started_before_the_schema_waits_for_it(pool: sqlx::PgPool) {
    let url = test_support::database_url(&pool);
    let keys = Command::new(env!("CARGO_BIN_EXE_api"))
        .args(["keys", "create", "--tenant", "ops"])
        .env("DATABASE_URL", &url)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&keys.stderr);
    assert!(
        !keys.status.success() && said.contains("run `api migrate` first"),
        "{said}"
    );

    let artifacts = tempfile::tempdir().unwrap();
    let starting = std::thread::spawn({
        let (url, dir) = (url.clone(), artifacts.path().to_path_buf());
        move || serve_migrating_with(&url, &dir, &[("MIGRATE_ON_START", "false")])
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !starting.is_finished(),
        "it listened on a database without the schema"
    );
    queue::Queue::new(pool.clone()).migrate().await.unwrap();
    let (mut replica, address) = starting.join().unwrap();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let response = reqwest::get(format!("http://{address}/readyz")).await.unwrap();
    assert_eq!(response.status(), 200);
    if let Some(process) = replica.0.as_mut() {
        process.kill().unwrap();
    }
    stopped(&pool, replica).await;
}

/// A finished job of tenant `acme` with a 32 MiB artifact in `artifacts`:
/// far more than the socket buffers hold, so a server is still sending it
/// when a test stops the process. The key's secret, the artifact's path
/// and its bytes.
async fn a_job_with_a_large_artifact(
    pool: &sqlx::PgPool,
    artifacts: &std::path::Path,
) -> (String, String, Vec<u8>) {
    let store = store::ArtifactStore::local(artifacts).unwrap();
    let q = queue::Queue::new(pool.clone());
    let key = api::auth::generate_key("acme", queue::ApiKeyRole::Client);
    q.create_api_key(&key.record).await.unwrap();
    let job = q
        .enqueue(queue::NewJob::new(
            "acme",
            queue::JobType::Text,
            serde_json::json!({"prompt": "p"}),
        ))
        .await
        .unwrap()
        .job;
    let task = q
        .claim("w", &[queue::TaskType::TextGeneration], 1)
        .await
        .unwrap()
        .remove(0);
    let bytes: Vec<u8> = (0..32 << 20).map(|i: u32| (i % 251) as u8).collect();
    let storage_key = store::artifact_key(job.id, queue::ArtifactKind::Text, task.lease());
    let stored = store
        .put(&storage_key, bytes.clone().into(), "text/markdown")
        .await
        .unwrap();
    let artifact = q
        .record_artifact(
            "w",
            task.lease(),
            &stored.to_new_artifact(job.id, queue::ArtifactKind::Text, serde_json::json!({})),
        )
        .await
        .unwrap();
    q.complete("w", task.lease(), serde_json::json!({}))
        .await
        .unwrap();
    let path = format!("/v1/jobs/{}/artifacts/{}", job.id, artifact.id);
    (key.secret, path, bytes)
}

/// GET `path` from `address` and read the body's first chunk: the
/// download is under way. The rest of the body and the chunk.
async fn a_download_under_way(
    address: &str,
    path: &str,
    secret: &str,
) -> (
    impl futures::Stream<Item = reqwest::Result<axum::body::Bytes>>,
    Vec<u8>,
) {
    use futures::StreamExt as _;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let response = reqwest::Client::new()
        .get(format!("http://{address}{path}"))
        .bearer_auth(secret)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = Box::pin(response.bytes_stream());
    let first = body.next().await.unwrap().unwrap().to_vec();
    (body, first)
}

fn terminate(replica: &Replica) {
    let kill = Command::new("kill")
        .args(["-TERM", &replica.0.as_ref().unwrap().id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
}

/// SIGTERM with a download in flight (`SHUTDOWN_GRACE_SECONDS`): no new
/// connections, but the download ends whole, and then the process exits 0.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_download_in_flight_at_sigterm_ends_whole(pool: sqlx::PgPool) {
    use futures::StreamExt as _;
    let artifacts = tempfile::tempdir().unwrap();
    let (secret, path, bytes) = a_job_with_a_large_artifact(&pool, artifacts.path()).await;
    let (api, address) = serve_migrating(&test_support::database_url(&pool), artifacts.path());
    let (mut body, mut received) = a_download_under_way(&address, &path, &secret).await;

    terminate(&api);
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Some(chunk) = body.next().await {
        received.extend_from_slice(&chunk.expect("the download goes on after SIGTERM"));
    }
    assert!(
        received == bytes,
        "{} of {} bytes, or other bytes",
        received.len(),
        bytes.len()
    );
    let status = stopped(&pool, api).await;
    assert!(status.success(), "exit status {status}");
}

/// The grace is a limit: a request still in flight when it ends (here a
/// client that stopped reading) does not hold the process, which exits 0
/// and cuts the download.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_download_still_in_flight_after_the_grace_is_cut_and_the_api_exits(pool: sqlx::PgPool) {
    use futures::StreamExt as _;
    let artifacts = tempfile::tempdir().unwrap();
    let (secret, path, bytes) = a_job_with_a_large_artifact(&pool, artifacts.path()).await;
    let (mut api, address) = serve_migrating_with(
        &test_support::database_url(&pool),
        artifacts.path(),
        &[("SHUTDOWN_GRACE_SECONDS", "1")],
    );
    let (mut body, mut received) = a_download_under_way(&address, &path, &secret).await;

    terminate(&api);
    // Far past the grace; without it the process would wait on this
    // client for good.
    let mut exited = false;
    for _ in 0..300 {
        if api.0.as_mut().unwrap().try_wait().unwrap().is_some() {
            exited = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(exited, "the api still runs 30 s after SIGTERM with a 1 s grace");
    while let Some(Ok(chunk)) = body.next().await {
        received.extend_from_slice(&chunk);
    }
    assert!(
        received.len() < bytes.len(),
        "the download was cut ({} of {} bytes)",
        received.len(),
        bytes.len()
    );
    let status = stopped(&pool, api).await;
    assert!(status.success(), "exit status {status}");
}
