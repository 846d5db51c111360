//! The `api` binary itself: serves with JSON logs carrying request ids,
//! and exits cleanly on SIGTERM.

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
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines_tx, lines) = mpsc::channel::<Value>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
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

    let listening = next_line("listening", &|l| l["fields"]["message"] == "listening");
    let address = listening["fields"]["address"].as_str().unwrap().to_string();
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
    assert_eq!(logged["fields"]["status"], 200);

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    next_line("shutdown", &|l| l["fields"]["message"] == "stopped");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status}");
}
