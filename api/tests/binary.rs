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

/// `api serve` with `MIGRATE_ON_START=true` (the shipped api.yaml), started
/// on an empty database, once it logs that it listens: its address.
fn serve_migrating(database_url: &str, artifacts: &std::path::Path) -> (std::process::Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_api"))
        .args(["serve", "--bind", "127.0.0.1", "--port", "0"])
        .arg("--artifact-store")
        .arg(format!("file://{}", artifacts.display()))
        .env("DATABASE_URL", database_url)
        .env("MIGRATE_ON_START", "true")
        .env("SWEEPER_INTERVAL_SECONDS", "0")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read to the end, so the replica never blocks on a full pipe.
    let stderr = child.stderr.take().unwrap();
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
        Ok(Ok(address)) => (child, address),
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
    for (mut child, _) in replicas {
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
