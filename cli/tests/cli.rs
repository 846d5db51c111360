//! The `backlog` binary against the real API (its router in this process,
//! as the API's own tests start it) and a real PostgreSQL. Tasks are done
//! the way a worker does them, through the queue library: claim, store
//! the bytes, record the artifact under the lease, complete.

// The API's test server, shared rather than copied.
#[path = "../../api/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use common::TestServer;
use queue::{ApiKeyRole, ArtifactKind, Failure, NewArtifact, PoolStatus, TaskType};
use serde_json::{json, Value};

/// The binary with the server's URL and a key in its environment, and no
/// config file of the machine's.
/// The CLI pointed at `url`, which is not a backlog API, with a key-shaped
/// key, no config file and `env` besides.
fn backlog_at(url: &str, env: &[(&str, &str)]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_backlog"));
    command
        .env_clear()
        .env("BACKLOG_URL", url)
        .env("BACKLOG_KEY", format!("bk_{}", "a".repeat(43)))
        .env("BACKLOG_CONFIG", "/nonexistent/backlog.toml")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

fn backlog(server: &TestServer, key: &str) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_backlog"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("BACKLOG_URL", &server.base)
        .env("BACKLOG_KEY", key)
        .env("BACKLOG_CONFIG", "/nonexistent/backlog.toml")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// Run to the end; stdout and stderr as text, and the exit code.
async fn run(
    command: &mut tokio::process::Command,
    args: &[impl AsRef<str> + std::fmt::Debug],
) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = tokio::time::timeout(
        Duration::from_secs(30),
        command.args(args.iter().map(AsRef::as_ref)).output(),
    )
    .await
    .unwrap_or_else(|_| panic!("backlog {args:?} ended within 30 s"))
    .unwrap();
    (
        status.code().expect("exited, not killed"),
        String::from_utf8(stdout).unwrap(),
        String::from_utf8(stderr).unwrap(),
    )
}

/// `backlog <args> -o json`, which must succeed, parsed.
async fn json_of(server: &TestServer, key: &str, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let (code, stdout, stderr) = run(&mut backlog(server, key), &all).await;
    assert_eq!(code, 0, "backlog {all:?}: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// Do one task of `task_type` as a worker would, storing `artifact`.
async fn do_task(server: &TestServer, task_type: TaskType, artifact: Option<(ArtifactKind, &[u8])>) {
    let artifact = artifact.map(|(kind, bytes)| {
        let write = move |path: &Path| {
            std::fs::write(path, bytes).unwrap();
            (bytes.len() as i64, store::sha256_hex(bytes))
        };
        (kind, write)
    });
    do_task_writing(server, task_type, artifact).await
}

/// [`do_task`], the artifact's file written by `write`, which returns its
/// size and the sha256 to record.
async fn do_task_writing(
    server: &TestServer,
    task_type: TaskType,
    artifact: Option<(ArtifactKind, impl FnOnce(&Path) -> (i64, String))>,
) {
    let mut claimed = Vec::new();
    for _ in 0..200 {
        claimed = server.queue.claim("test-worker", &[task_type], 1).await.unwrap();
        if !claimed.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let task = claimed
        .pop()
        .unwrap_or_else(|| panic!("a {task_type} task to claim"));
    if let Some((kind, write)) = artifact {
        let storage_key = format!("jobs/{}/{}-{}", task.job_id, kind.as_str(), task.id);
        let path = server.artifacts.path().join(&storage_key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let (bytes, sha256) = write(&path);
        let content_type = match kind {
            ArtifactKind::Text => "text/markdown",
            ArtifactKind::Pdf => "application/pdf",
            ArtifactKind::Audio => "audio/mpeg",
        };
        server
            .queue
            .record_artifact(
                "test-worker",
                task.lease(),
                &NewArtifact {
                    job_id: task.job_id,
                    kind,
                    content_type: content_type.into(),
                    storage_key,
                    bytes,
                    sha256,
                    metadata: json!({}),
                },
            )
            .await
            .unwrap();
    }
    // Long enough that elapsed times read above zero.
    tokio::time::sleep(Duration::from_millis(150)).await;
    server
        .queue
        .complete("test-worker", task.lease(), json!({}))
        .await
        .unwrap();
}

/// A PDF-ish body big enough to download in several chunks.
fn pdf_bytes() -> Vec<u8> {
    let mut bytes = b"%PDF-1.7\n".to_vec();
    bytes.extend((0..200_000u32).map(|i| (i % 251) as u8));
    bytes
}

/// Do a reading job's three tasks, in the order their dependencies allow.
async fn do_reading_job(server: &TestServer, pdf: &[u8]) {
    do_task(
        server,
        TaskType::TextGeneration,
        Some((ArtifactKind::Text, b"# Tides\n")),
    )
    .await;
    do_task(server, TaskType::PdfGeneration, Some((ArtifactKind::Pdf, pdf))).await;
    do_task(
        server,
        TaskType::AudioGeneration,
        Some((ArtifactKind::Audio, b"ID3 audio")),
    )
    .await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn submit_wait_follows_a_reading_job_to_its_artifacts_and_downloads_resume(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let mut waiting = backlog(&server, &key);
    waiting.args([
        "submit",
        "reading",
        "--prompt",
        "the life of tides",
        "--title",
        "Tides",
        "--lang",
        "el",
        "--wait",
    ]);
    let waiting = tokio::spawn(async move { run(&mut waiting, &[] as &[&str]).await });
    let pdf = pdf_bytes();
    do_reading_job(&server, &pdf).await;
    let (code, stdout, stderr) = waiting.await.unwrap();
    assert_eq!(code, 0, "{stderr}");
    // No terminal: plain lines, one per task change, then the artifacts.
    for task_type in ["text_generation", "pdf_generation", "audio_generation"] {
        assert!(
            stderr.contains(&format!("{task_type:<17} complete   attempt 1/")),
            "{task_type} reported complete: {stderr}"
        );
    }
    assert!(stderr.contains("complete (3/3 tasks)"), "{stderr}");
    assert!(
        !stderr.contains('\u{1b}'),
        "no escape codes without a terminal: {stderr:?}"
    );
    let table: Vec<&str> = stdout.lines().collect();
    assert!(table[0].starts_with("ARTIFACT   TYPE"), "{stdout}");
    assert!(
        table
            .iter()
            .any(|l| l.starts_with("pdf ") && l.contains("195.3 KiB")),
        "{stdout}"
    );
    assert_eq!(table.len(), 4, "a header and three artifacts: {stdout}");

    let jobs = json_of(&server, &key, &["jobs", "list"]).await;
    let id = jobs["jobs"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(
        jobs["jobs"][0]["input"],
        json!({"prompt": "the life of tides", "title": "Tides", "lang": "el"})
    );

    // Whole, then resumed from half a file; both checked by sha256.
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole.pdf");
    let (code, _, stderr) = run(
        &mut backlog(&server, &key),
        &[
            "artifacts",
            "get",
            &id,
            "--kind",
            "pdf",
            "-o",
            whole.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(std::fs::read(&whole).unwrap(), pdf);
    assert!(stderr.contains("sha256 verified"), "{stderr}");

    let get_pdf = |to: &std::path::Path| {
        [
            "artifacts".to_string(),
            "get".into(),
            id.clone(),
            "--kind".into(),
            "pdf".into(),
            "-o".into(),
            to.to_str().unwrap().into(),
        ]
    };
    let (code, _, stderr) = run(&mut backlog(&server, &key), &get_pdf(&whole)).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("already here, sha256 verified"), "{stderr}");

    // Half a download, left in FILE.partial: resumed from there, and put in
    // place once whole.
    let resumed = dir.path().join("resumed.pdf");
    std::fs::write(dir.path().join("resumed.pdf.partial"), &pdf[..70_000]).unwrap();
    let (code, _, stderr) = run(&mut backlog(&server, &key), &get_pdf(&resumed)).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("resumed at byte 70000"), "{stderr}");
    assert_eq!(std::fs::read(&resumed).unwrap(), pdf);
    assert!(!dir.path().join("resumed.pdf.partial").exists());

    // A partial file that is not a prefix of the artifact: downloaded again
    // from the start.
    let stale = dir.path().join("stale.pdf");
    std::fs::write(dir.path().join("stale.pdf.partial"), vec![b'x'; 1000]).unwrap();
    let (code, _, stderr) = run(&mut backlog(&server, &key), &get_pdf(&stale)).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("downloaded again"), "{stderr}");
    assert_eq!(std::fs::read(&stale).unwrap(), pdf);

    // Another file of the same name (another job's document.pdf) is neither
    // appended to nor taken for a partial download: it is replaced whole.
    let other = dir.path().join("other.pdf");
    std::fs::write(&other, vec![b'y'; 1000]).unwrap();
    let (code, _, stderr) = run(&mut backlog(&server, &key), &get_pdf(&other)).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("resumed"), "{stderr}");
    assert_eq!(std::fs::read(&other).unwrap(), pdf);

    // To stdout, checked as it passes.
    let piped = backlog(&server, &key)
        .args(get_pdf(std::path::Path::new("-")))
        .output()
        .await
        .unwrap();
    assert_eq!(piped.status.code(), Some(0));
    assert_eq!(piped.stdout, pdf);

    // Bytes that do not match the artifact's sha256 (a store damaged under
    // the API): exit 6, and nothing is kept, neither FILE nor FILE.partial.
    let stored = std::fs::read_dir(server.artifacts.path().join("jobs").join(&id))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| path.file_name().unwrap().to_str().unwrap().starts_with("pdf-"))
        .expect("the stored PDF");
    let mut damaged = pdf.clone();
    damaged[100] ^= 0xff;
    std::fs::write(&stored, &damaged).unwrap();
    let fresh = dir.path().join("fresh.pdf");
    let (code, _, stderr) = run(&mut backlog(&server, &key), &get_pdf(&fresh)).await;
    assert_eq!((code, stderr.contains("nothing was kept")), (6, true), "{stderr}");
    assert!(!fresh.exists() && !dir.path().join("fresh.pdf.partial").exists());
    let piped = backlog(&server, &key)
        .args(get_pdf(std::path::Path::new("-")))
        .output()
        .await
        .unwrap();
    assert_eq!(
        piped.status.code(),
        Some(6),
        "a damaged stream to stdout is told by the exit code"
    );
    server.stop().await;
}

/// Each response type of the CLI, read from the real API and written back,
/// is the API's JSON exactly: a field renamed, added or retyped on either
/// side fails here.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn json_and_yaml_output_is_the_api_response_field_for_field(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let admin = server.key("ops", ApiKeyRole::Admin).await;
    let submitted = json_of(&server, &key, &["submit", "reading", "--prompt", "tides"]).await;
    let id = submitted["id"].as_str().unwrap().to_string();
    do_reading_job(&server, b"%PDF").await;
    server
        .queue
        .put_pool_status(&PoolStatus {
            pool: "text".into(),
            backend: "kubernetes".into(),
            desired_replicas: 2,
            current_replicas: 2,
            ready_replicas: 1,
            busy_replicas: 1,
            pending: 7,
            in_flight: 1,
            conditions: json!([{"type": "Active", "status": "True", "reason": "Scaled"}]),
            last_decision: Some("scale up".into()),
            last_scale_at: Some(chrono::Utc::now()),
            task_types: vec!["text_generation".into()],
            created_at: None,
        })
        .await
        .unwrap();
    test_support::enqueue_jobs(&server.queue, queue::JobType::Text, 3).await;

    let (_, api_job) = server.get_json(&key, &format!("/v1/jobs/{id}")).await;
    assert_eq!(api_job["artifacts"].as_array().unwrap().len(), 3, "{api_job}");
    assert_eq!(json_of(&server, &key, &["jobs", "get", &id]).await, api_job);
    let (_, api_list) = server.get_json(&key, "/v1/jobs").await;
    assert_eq!(json_of(&server, &key, &["jobs", "list"]).await, api_list);
    // The oldest pending task's age is read at each request: compared as
    // present, then set aside.
    let without_ages = |mut depth: Value| {
        for row in depth["task_types"].as_array_mut().unwrap() {
            assert!(row["oldest_pending_seconds"].is_f64(), "{row}");
            row["oldest_pending_seconds"] = Value::Null;
        }
        depth
    };
    let (_, api_queue) = server.get_json(&admin, "/v1/queue").await;
    assert_eq!(
        without_ages(json_of(&server, &admin, &["queue"]).await),
        without_ages(api_queue)
    );
    let (_, api_pools) = server.get_json(&admin, "/v1/pools").await;
    assert_eq!(json_of(&server, &admin, &["pools"]).await, api_pools);

    let (code, yaml, stderr) = run(&mut backlog(&server, &key), &["jobs", "get", &id, "-o", "yaml"]).await;
    assert_eq!(code, 0, "{stderr}");
    let from_yaml: Value = serde_yaml_ng::from_str(&yaml).unwrap();
    assert_eq!(from_yaml, api_job);
    server.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn queue_and_pools_print_tables_with_kubectls_columns(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let admin = server.key("ops", ApiKeyRole::Admin).await;
    test_support::enqueue_jobs(&server.queue, queue::JobType::Text, 3).await;
    server
        .queue
        .put_pool_status(&PoolStatus {
            pool: "text".into(),
            backend: "fly".into(),
            desired_replicas: 3,
            current_replicas: 2,
            ready_replicas: 2,
            busy_replicas: 1,
            pending: 3,
            in_flight: 0,
            conditions: json!([{"type": "Active", "status": "True"}]),
            last_decision: None,
            last_scale_at: None,
            task_types: vec!["text_generation".into()],
            created_at: Some(chrono::Utc::now() - chrono::Duration::hours(2)),
        })
        .await
        .unwrap();

    let (code, stdout, stderr) = run(&mut backlog(&server, &admin), &["queue"]).await;
    assert_eq!(code, 0, "{stderr}");
    let lines: Vec<Vec<&str>> = stdout
        .lines()
        .map(|l| l.split("   ").map(str::trim).filter(|c| !c.is_empty()).collect())
        .collect();
    assert_eq!(
        lines[0],
        [
            "TASK TYPE",
            "PENDING",
            "SCHEDULED",
            "BLOCKED",
            "IN FLIGHT",
            "OLDEST PENDING",
            "DONE/MIN"
        ]
    );
    let text = lines
        .iter()
        .find(|l| l[0] == "text_generation")
        .expect("a text_generation row");
    assert_eq!(text[1], "3", "{stdout}");

    let (code, stdout, stderr) = run(&mut backlog(&server, &admin), &["pools"]).await;
    assert_eq!(code, 0, "{stderr}");
    let lines: Vec<Vec<&str>> = stdout
        .lines()
        .map(|l| l.split("   ").map(str::trim).filter(|c| !c.is_empty()).collect())
        .collect();
    // Every printer column of the CRD, by kubectl's name and in its order.
    let crd: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(workspace().join("manifests/crd.yaml")).unwrap())
            .unwrap();
    let columns: Vec<String> = crd["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_uppercase())
        .collect();
    assert!(columns.len() >= 10, "{columns:?}");
    let kubectls: Vec<&str> = lines[0]
        .iter()
        .copied()
        .filter(|h| columns.iter().any(|c| c == h))
        .collect();
    assert_eq!(kubectls, columns, "{stdout}");
    assert_eq!(lines[0][0], "NAME", "{stdout}");
    assert_eq!(
        &lines[1][..12],
        [
            "text",
            "text_generation",
            "3",
            "0",
            "3",
            "2",
            "2",
            "True",
            "1",
            "-",
            "2h0m",
            "fly"
        ],
        "{stdout}"
    );
    assert!(lines[1][12].ends_with('s'), "written seconds ago: {stdout}");

    // A pool whose passes fail keeps the figures of its last good pass;
    // its decision column says why it fails instead of "nothing pending".
    server
        .queue
        .put_pool_status(&PoolStatus {
            pool: "pdf".into(),
            backend: "local".into(),
            desired_replicas: 0,
            current_replicas: 0,
            ready_replicas: 0,
            busy_replicas: 0,
            pending: 0,
            in_flight: 0,
            conditions: json!([{"type": "Ready", "status": "False", "reason": "BackendError",
                "message": "pool pdf: cannot start \"wroker\""}]),
            last_decision: Some("hold 0: nothing pending".into()),
            last_scale_at: None,
            task_types: vec!["pdf_generation".into()],
            created_at: None,
        })
        .await
        .unwrap();
    let (_, stdout, _) = run(&mut backlog(&server, &admin), &["pools"]).await;
    let failing = stdout.lines().find(|l| l.starts_with("pdf ")).expect("a pdf row");
    assert!(
        failing.contains("not ready: BackendError: pool pdf: cannot start \"wroker\"")
            && !failing.contains("nothing pending"),
        "{stdout}"
    );
    server.stop().await;
}

/// Claim the queue's text task and fail it for good with `error`.
async fn fail_the_text_task(server: &TestServer, error: &str) {
    let task = server
        .queue
        .claim("w", &[TaskType::TextGeneration], 1)
        .await
        .unwrap()
        .remove(0);
    server
        .queue
        .fail("w", task.lease(), &Failure::permanent(error))
        .await
        .unwrap();
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn cancel_retry_and_failures_end_with_their_exit_codes(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;

    // Cancel; waiting for a cancelled job exits 1.
    let job = json_of(&server, &key, &["submit", "text", "--prompt", "x"]).await;
    let id = job["id"].as_str().unwrap();
    assert_eq!(
        json_of(&server, &key, &["jobs", "cancel", id]).await["status"],
        "cancelled"
    );
    let (code, _, stderr) = run(&mut backlog(&server, &key), &["jobs", "wait", id]).await;
    assert_eq!((code, stderr.contains("cancelled")), (1, true), "{stderr}");

    // A job that fails: waiting exits 1 and names the error; retry queues it.
    let job = json_of(&server, &key, &["submit", "text", "--prompt", "y"]).await;
    let id = job["id"].as_str().unwrap();
    fail_the_text_task(&server, "the model refused").await;
    let (code, _, stderr) = run(&mut backlog(&server, &key), &["jobs", "wait", id]).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("failed") && stderr.contains("the model refused"),
        "{stderr}"
    );
    let (code, _, stderr) = run(&mut backlog(&server, &key), &["jobs", "cancel", id]).await;
    assert_eq!(code, 5, "a failed job cannot be cancelled: {stderr}");
    let retried = json_of(&server, &key, &["jobs", "retry", id]).await;
    assert_eq!(retried["status"], "queued");
    let (code, _, stderr) = run(&mut backlog(&server, &key), &["jobs", "retry", id]).await;
    assert_eq!(code, 5, "a queued job cannot be retried: {stderr}");

    // Not found, bad key, no configuration, bad input.
    let unknown = uuid::Uuid::now_v7().to_string();
    let (code, _, stderr) = run(&mut backlog(&server, &key), &["jobs", "get", &unknown]).await;
    assert_eq!(code, 4, "{stderr}");
    let (code, _, stderr) = run(
        &mut backlog(&server, &key),
        &["artifacts", "get", id, "--kind", "pdf"],
    )
    .await;
    assert_eq!(
        (code, stderr.contains("no pdf artifact yet")),
        (4, true),
        "{stderr}"
    );
    let (code, _, stderr) = run(&mut backlog(&server, "bk_not_a_key"), &["jobs", "list"]).await;
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("401") && !stderr.contains("bk_not_a_key"),
        "{stderr}"
    );
    let (code, _, stderr) = run(
        backlog(&server, &key).env_remove("BACKLOG_KEY"),
        &["jobs", "list"],
    )
    .await;
    assert_eq!((code, stderr.contains("set BACKLOG_KEY")), (3, true), "{stderr}");
    let (code, _, stderr) = run(&mut backlog(&server, &key), &["queue"]).await;
    assert_eq!(code, 3, "a client key may not read the queue: {stderr}");
    let (code, _, stderr) = run(&mut backlog(&server, &key), &["submit", "pdf", "--prompt", "x"]).await;
    assert_eq!(
        (code, stderr.contains("--text or --text-file")),
        (2, true),
        "{stderr}"
    );
    let (code, _, stderr) = run(
        &mut backlog(&server, &key),
        &["submit", "text", "--prompt", "x", "--lang", "english"],
    )
    .await;
    assert_eq!(
        (code, stderr.contains("not an ISO 639 language code")),
        (2, true),
        "{stderr}"
    );
    let (code, _, stderr) = run(&mut backlog(&server, &key), &["submit", "video"]).await;
    assert_eq!((code, stderr.contains("unknown job type")), (2, true), "{stderr}");
    // What the API would refuse is named by its flag before anything is
    // sent: a blank prompt, a text of only Markdown markers, a priority
    // out of range.
    let count_jobs = async || -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM all_jobs")
            .fetch_one(&server.pool)
            .await
            .unwrap()
    };
    let before = count_jobs().await;
    for (args, named) in [
        (&["submit", "reading", "--prompt", " "][..], "--prompt: "),
        (&["submit", "pdf", "--text", "## "][..], "--text: "),
        (
            &["submit", "text", "--prompt", "x", "--priority", "200"][..],
            "--priority: ",
        ),
    ] {
        let (code, _, stderr) = run(&mut backlog(&server, &key), args).await;
        assert_eq!((code, stderr.contains(named)), (2, true), "{args:?}: {stderr}");
    }
    assert_eq!(count_jobs().await, before, "nothing reached the API");
    server.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_batch_file_is_checked_whole_and_is_safe_to_run_again(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let dir = tempfile::tempdir().unwrap();
    let batch = dir.path().join("jobs.jsonl");
    std::fs::write(
        &batch,
        "{\"type\": \"text\", \"input\": {\"prompt\": \"one\"}}\n\n\
         {\"type\": \"pdf\", \"input\": {\"text\": \"two\"}, \"priority\": 5}\n",
    )
    .unwrap();
    let args = [
        "submit",
        "--batch",
        batch.to_str().unwrap(),
        "--idempotency-key",
        "import-1",
    ];
    let (code, stdout, stderr) = run(&mut backlog(&server, &key), &args).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("2 created, 0 already existed"), "{stdout}");
    let (code, stdout, stderr) = run(&mut backlog(&server, &key), &args).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("0 created, 2 already existed"), "{stdout}");
    let jobs = json_of(&server, &key, &["jobs", "list"]).await;
    let keys: Vec<&str> = jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["idempotency_key"].as_str().unwrap())
        .collect();
    assert_eq!(keys.len(), 2);
    assert!(
        keys.contains(&"import-1-1") && keys.contains(&"import-1-3"),
        "{keys:?}"
    );

    // --since: a job from two days ago is left out of the last day's.
    sqlx::query(
        "UPDATE jobs SET created_at = now() - interval '2 days' WHERE idempotency_key = 'import-1-1'",
    )
    .execute(&server.pool)
    .await
    .unwrap();
    for since in ["1d", "24h"] {
        let recent = json_of(&server, &key, &["jobs", "list", "--since", since]).await;
        let keys: Vec<&str> = recent["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["idempotency_key"].as_str().unwrap())
            .collect();
        assert_eq!(keys, ["import-1-3"], "--since {since}");
    }
    let (code, _, stderr) = run(
        &mut backlog(&server, &key),
        &["jobs", "list", "--since", "yesterday"],
    )
    .await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("\"yesterday\" is neither a duration"), "{stderr}");

    // A line the workers would refuse, and what only the API used to check
    // (a priority out of range, a key the header cannot carry): nothing of
    // the file is sent, and the line and field are named.
    for (line, said) in [
        (
            "{\"type\": \"audiobook\", \"input\": {\"text\": \"t\", \"language\": \"el\"}}",
            "jobs.jsonl:2: input: unknown field `language`",
        ),
        (
            "{\"type\": \"text\", \"input\": {\"prompt\": \"p\"}, \"priority\": 500}",
            "jobs.jsonl:2: priority: must be between -100 and 100, got 500",
        ),
        (
            "{\"type\": \"text\", \"input\": {\"prompt\": \"p\"}, \"idempotency_key\": \"tab\\there\"}",
            "jobs.jsonl:2: idempotency_key \"tab\\there\": must be 1 to 200 visible ASCII characters",
        ),
        // What the API refuses in a job's text: once only line by line,
        // after the lines before it were created.
        (
            "{\"type\": \"text\", \"input\": {\"prompt\": \"   \"}}",
            "jobs.jsonl:2: input.prompt: must not be empty",
        ),
        (
            "{\"type\": \"pdf\", \"input\": {\"text\": \"## \"}}",
            "jobs.jsonl:2: input.text: has nothing to typeset or read aloud, only Markdown markers",
        ),
        (
            "{\"type\": \"text\", \"input\": {\"prompt\": \"a\\u0000b\"}}",
            "jobs.jsonl:2: input.prompt: must not contain a NUL character",
        ),
        // A field of the wrong type is named, at the file's line.
        (
            "{\"type\": \"text\", \"input\": {\"prompt\": \"p\"}, \"priority\": \"5\"}",
            "jobs.jsonl:2: priority: invalid type: string \"5\", expected i32",
        ),
        // Two lines of one file under one key: the second would only
        // replay the first.
        (
            "{\"type\": \"text\", \"input\": {\"prompt\": \"p\"}, \"idempotency_key\": \"dup\"}\n\
             {\"type\": \"text\", \"input\": {\"prompt\": \"q\"}, \"idempotency_key\": \"dup\"}",
            "jobs.jsonl:3: idempotency_key \"dup\" is line 2's too",
        ),
    ] {
        std::fs::write(
            &batch,
            format!("{{\"type\": \"text\", \"input\": {{\"prompt\": \"three\"}}}}\n{line}\n"),
        )
        .unwrap();
        let (code, _, stderr) = run(
            &mut backlog(&server, &key),
            &["submit", "--batch", batch.to_str().unwrap()],
        )
        .await;
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.contains(said), "{stderr}");
        assert_eq!(server.row_counts().await[0], 2, "nothing of {line} was created");
    }

    // A line the API refuses (its key already used for another job): the
    // lines created before it are printed, then the error.
    std::fs::write(
        &batch,
        "{\"type\": \"text\", \"input\": {\"prompt\": \"four\"}}\n\
         {\"type\": \"text\", \"input\": {\"prompt\": \"not one\"}, \"idempotency_key\": \"import-1-1\"}\n",
    )
    .unwrap();
    let (code, stdout, stderr) = run(
        &mut backlog(&server, &key),
        &["submit", "--batch", batch.to_str().unwrap(), "-o", "json"],
    )
    .await;
    assert_eq!(code, 5, "{stderr}");
    let printed: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(printed.as_array().unwrap().len(), 1, "{printed}");
    assert_eq!(printed[0]["line"], 1);
    assert!(stderr.contains("jobs.jsonl:2:"), "{stderr}");
    server.stop().await;
}

/// Under a pseudo-terminal (python's `pty`, with a window size set, as a
/// terminal has), the live display names every task and reaches 100 %.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn on_a_terminal_the_progress_display_reaches_100_percent_naming_every_task(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let mut under_pty = tokio::process::Command::new("python3");
    under_pty
        .arg("-c")
        .arg(PTY_RUNNER)
        .arg(env!("CARGO_BIN_EXE_backlog"))
        .args(["submit", "reading", "--prompt", "tides", "--wait"])
        .env("BACKLOG_URL", &server.base)
        .env("BACKLOG_KEY", &key)
        .env("BACKLOG_CONFIG", "/nonexistent/backlog.toml")
        .env("TERM", "xterm-256color")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let waiting = tokio::spawn(async move { run(&mut under_pty, &[] as &[&str]).await });
    do_reading_job(&server, b"%PDF").await;
    let (code, screen, stderr) = waiting.await.unwrap();
    assert_eq!(code, 0, "{stderr}\n{screen}");
    assert!(
        screen.contains('\u{1b}'),
        "drawn with escape codes on a terminal: {screen:?}"
    );
    assert!(screen.contains("3/3 tasks 100%"), "{screen}");
    for task_type in ["text_generation", "pdf_generation", "audio_generation"] {
        assert!(screen.contains(task_type), "{task_type} named: {screen}");
    }
    server.stop().await;
}

/// Runs argv[1:] under a new pseudo-terminal of 40x120, copies what it
/// draws to stdout, and exits with its exit code.
const PTY_RUNNER: &str = r#"
import fcntl, os, pty, struct, sys, termios
pid, fd = pty.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
while True:
    try:
        chunk = os.read(fd, 65536)
    except OSError:
        break
    if not chunk:
        break
    sys.stdout.buffer.write(chunk)
sys.stdout.flush()
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"#;

#[tokio::test]
async fn help_lists_exit_codes_and_completions_are_generated() {
    let run_plain = |args: &'static [&'static str]| async move {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_backlog"))
            .args(args)
            .output()
            .await
            .unwrap();
        (
            output.status.code().unwrap(),
            String::from_utf8(output.stdout).unwrap(),
        )
    };
    let (code, help) = run_plain(&["--help"]).await;
    assert_eq!(code, 0);
    assert!(
        help.contains("Exit codes:") && help.contains("Examples:"),
        "{help}"
    );
    for shell in ["bash", "zsh", "fish"] {
        let (code, script) = run_plain(match shell {
            "bash" => &["completions", "bash"],
            "zsh" => &["completions", "zsh"],
            _ => &["completions", "fish"],
        })
        .await;
        assert_eq!(code, 0);
        assert!(
            script.contains("backlog") && script.contains("artifacts"),
            "{shell}: {script}"
        );
    }
    let (code, _) = run_plain(&["jobs", "frobnicate"]).await;
    assert_eq!(code, 2, "usage errors exit 2");
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `backlog <args>` with `input` on stdin.
async fn run_with_stdin(
    command: &mut tokio::process::Command,
    args: &[&str],
    input: &str,
) -> (i32, String, String) {
    use tokio::io::AsyncWriteExt;
    let mut child = command
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).await.unwrap();
    drop(stdin);
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("backlog {args:?} ended within 30 s"))
        .unwrap();
    (
        output.status.code().expect("exited, not killed"),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

/// `login` keeps a key the API accepts, in a file only its owner reads; a
/// refused key changes nothing; `logout` forgets the key and keeps the URL.
/// The README: a config file that does not parse "stops only a command that
/// needs a setting from it, and `backlog login` writes it afresh". Login
/// read the file first and stopped at it, the one command that fixes it.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn login_writes_afresh_a_config_file_that_does_not_parse(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let login = ["login", "--url", server.base.as_str()];
    for broken in [&b"url = \"http://old\"\nbogus\n"[..], &[0xff, 0xfe, b'\n'][..]] {
        std::fs::write(&config, broken).unwrap();
        let mut command = backlog(&server, "");
        command
            .env_remove("BACKLOG_URL")
            .env_remove("BACKLOG_KEY")
            .env("BACKLOG_CONFIG", &config);
        let (code, stdout, stderr) = run_with_stdin(&mut command, &login, &format!("{key}\n")).await;
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains("Logged in to"), "{stdout}");
        assert!(stderr.contains("this login replaces it"), "{stderr}");
        let written = std::fs::read_to_string(&config).unwrap();
        assert!(
            written.contains(&server.base) && written.contains(&key),
            "{written}"
        );
    }
    server.stop().await;
}

/// A key typed or pasted at `backlog login` is not echoed: the terminal
/// (util-linux `script` gives the command one) showed it in the scrollback.
/// Sent after the prompt, as a person would.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn login_at_a_terminal_does_not_echo_the_key(pool: sqlx::PgPool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: util-linux `script` is not installed; it gives the CLI a terminal");
        return;
    }
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let dir = tempfile::tempdir().unwrap();
    let line = format!(
        "'{}' login --url '{}'",
        env!("CARGO_BIN_EXE_backlog"),
        server.base
    );
    let mut child = tokio::process::Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("BACKLOG_CONFIG", dir.path().join("config.toml"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut transcript = Vec::new();
    let prompted = tokio::time::timeout(Duration::from_secs(20), async {
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&transcript).contains("(not shown)") {
            let n = stdout.read(&mut buf).await.unwrap();
            assert!(n > 0, "no prompt: {}", String::from_utf8_lossy(&transcript));
            transcript.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert!(
        prompted.is_ok(),
        "no prompt: {}",
        String::from_utf8_lossy(&transcript)
    );
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(format!("{key}\n").as_bytes()).await.unwrap();
    let rest = tokio::time::timeout(Duration::from_secs(20), stdout.read_to_end(&mut transcript)).await;
    assert!(
        rest.is_ok(),
        "login did not finish: {}",
        String::from_utf8_lossy(&transcript)
    );
    drop(stdin);
    let transcript = String::from_utf8_lossy(&transcript).into_owned();
    assert!(transcript.contains("Logged in to"), "{transcript}");
    assert!(!transcript.contains(&key), "the key was echoed: {transcript}");
    server.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn login_keeps_an_accepted_key_and_logout_forgets_it(pool: sqlx::PgPool) {
    use std::os::unix::fs::PermissionsExt;
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("backlog").join("config.toml");
    let from_config_only = || {
        let mut command = backlog(&server, "");
        command
            .env_remove("BACKLOG_URL")
            .env_remove("BACKLOG_KEY")
            .env("BACKLOG_CONFIG", &config);
        command
    };
    let login = ["login", "--url", server.base.as_str()];

    let (code, _, stderr) = run_with_stdin(&mut from_config_only(), &login, "bk_not_a_key\n").await;
    assert_eq!(code, 3, "a refused key: {stderr}");
    assert!(!config.exists(), "a refused key writes nothing");
    let (code, _, stderr) = run_with_stdin(&mut from_config_only(), &login, "\n").await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("no key on stdin"), "{stderr}");

    let (code, stdout, stderr) = run_with_stdin(&mut from_config_only(), &login, &format!("{key}\n")).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("Logged in to"), "{stdout}");
    assert!(
        !stdout.contains(&key) && !stderr.contains(&key),
        "the key is never printed"
    );
    let mode = std::fs::metadata(&config).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the config file is its owner's only");
    let (code, _, stderr) = run(&mut from_config_only(), &["jobs", "list"]).await;
    assert_eq!(code, 0, "the stored URL and key serve later commands: {stderr}");
    // `config` says where the key comes from, never what it is.
    for args in [&["config"][..], &["config", "-o", "json"]] {
        let (code, stdout, stderr) = run(&mut from_config_only(), args).await;
        assert_eq!(code, 0, "{stderr}");
        assert!(
            !stdout.contains(&key) && !stderr.contains(&key),
            "backlog {args:?} printed the key: {stdout}"
        );
        assert!(stdout.contains(&config.display().to_string()), "{stdout}");
        if args.contains(&"json") {
            let shown: Value = serde_json::from_str(&stdout).unwrap();
            assert_eq!(shown["key"], "(set)");
            assert_eq!(shown["url"], server.base.as_str());
        }
    }

    let (code, stdout, stderr) = run(&mut from_config_only(), &["logout"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("removed"), "{stdout}");
    let stored = std::fs::read_to_string(&config).unwrap();
    assert!(
        !stored.contains(&key) && stored.contains(&server.base),
        "{stored}"
    );
    let (code, _, stderr) = run(&mut from_config_only(), &["jobs", "list"]).await;
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("no API key"), "{stderr}");

    // With the URL kept, logging in again needs only the key.
    let (code, _, stderr) = run_with_stdin(&mut from_config_only(), &["login"], &format!("{key}\n")).await;
    assert_eq!(code, 0, "{stderr}");
    server.stop().await;
}

/// `submit --wait` against a server with these stream limits: still
/// waiting after `queued_for`, it ends with exit 0 once the job's task is
/// done. Its stderr.
async fn wait_through(
    pool: sqlx::PgPool,
    streams: api::streams::StreamLimits,
    queued_for: Duration,
) -> String {
    let settings = api::state::Settings {
        streams,
        ..common::test_settings()
    };
    let server = TestServer::start_with(pool, settings).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let mut waiting = backlog(&server, &key);
    waiting.args(["submit", "text", "--prompt", "slow tides", "--wait"]);
    let waiting = tokio::spawn(async move { run(&mut waiting, &[] as &[&str]).await });
    tokio::time::sleep(queued_for).await;
    assert!(!waiting.is_finished(), "--wait gave up while the job was queued");
    do_task(
        &server,
        TaskType::TextGeneration,
        Some((ArtifactKind::Text, b"tides")),
    )
    .await;
    let (code, _, stderr) = waiting.await.unwrap();
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("complete (1/1 tasks)"), "{stderr}");
    server.stop().await;
    stderr
}

/// The server ends an event stream at its time limit; `--wait` reads the
/// job again and opens another, until the job finishes.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn wait_outlasts_the_servers_stream_limit(pool: sqlx::PgPool) {
    let streams = api::streams::StreamLimits {
        max_duration: Duration::from_secs(1),
        ..api::streams::StreamLimits::default()
    };
    // Two of the server's stream lifetimes pass with the job queued.
    wait_through(pool, streams, Duration::from_millis(2500)).await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_reader_that_stops_early_ends_the_output_quietly(pool: sqlx::PgPool) {
    // `backlog jobs list -o json | head -1`: the reader closes the pipe.
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    server.create_text_job(&key, "tides").await;
    let mut child = backlog(&server, &key)
        .args(["jobs", "list", "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Closed before the CLI has its answer from the API to print.
    drop(child.stdout.take());
    let Output { status, stderr, .. } = child.wait_with_output().await.unwrap();
    let stderr = String::from_utf8(stderr).unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    server.stop().await;
}

/// A server that takes the connection and never answers (a hung proxy)
/// fails the request after `BACKLOG_READ_TIMEOUT_SECONDS` as unreachable
/// (exit 3), where the CLI waited for good; `--wait` rides such an outage
/// out like any other, up to its limit.
#[tokio::test]
async fn a_server_that_never_answers_is_unreachable_after_the_read_timeout() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let mut command = backlog_at(&url, &[("BACKLOG_READ_TIMEOUT_SECONDS", "1")]);
    let (code, _, stderr) = run(&mut command, &["jobs", "list"]).await;
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("could not reach the API"), "{stderr}");

    let mut command = backlog_at(&url, &[("BACKLOG_READ_TIMEOUT_SECONDS", "soon")]);
    let (code, _, stderr) = run(&mut command, &["jobs", "list"]).await;
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("BACKLOG_READ_TIMEOUT_SECONDS must be a whole number"),
        "{stderr}"
    );
}

/// `artifacts get -o - | head -c …`: once the reader has gone, the
/// download stops. The artifact is a GiB (a sparse file) recorded with a
/// sha256 it does not have, so reading on to the end (as the CLI did)
/// ends in the checksum's failure, not in a quiet exit.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_download_to_stdout_stops_when_its_reader_goes(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let id = server.create_text_job(&key, "tides").await;
    let huge = |path: &Path| {
        std::fs::File::create(path).unwrap().set_len(1 << 30).unwrap();
        (1 << 30, "0".repeat(64))
    };
    do_task_writing(
        &server,
        TaskType::TextGeneration,
        Some((ArtifactKind::Text, huge)),
    )
    .await;

    let mut child = backlog(&server, &key)
        .args(["artifacts", "get", &id, "--kind", "text", "-o", "-"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 4096];
    tokio::io::AsyncReadExt::read_exact(&mut stdout, &mut first)
        .await
        .unwrap();
    drop(stdout);
    let Output { status, stderr, .. } =
        tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("the CLI exits")
            .unwrap();
    let stderr = String::from_utf8(stderr).unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("sha256"), "read to the end: {stderr}");
    server.stop().await;
}

/// No stream for this tenant (every GET /v1/jobs/{id}/events is a 429):
/// `--wait` says so once and follows the job by polling.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn wait_follows_by_polling_when_the_api_refuses_it_a_stream(pool: sqlx::PgPool) {
    let streams = api::streams::StreamLimits {
        per_tenant: 0,
        ..api::streams::StreamLimits::default()
    };
    let stderr = wait_through(pool, streams, Duration::from_millis(1500)).await;
    assert!(
        stderr.contains("429") && stderr.contains("still following job"),
        "{stderr}"
    );
}

/// A `BACKLOG_URL` that names a web app, not the API, answers with a page:
/// the CLI says that (exit 3), not that the API could not be reached, nor,
/// when the page comes with a 404 or 409, that there is no such job (4) or
/// a conflict (5).
#[tokio::test]
async fn a_url_that_is_not_the_api_is_named_as_such() {
    use axum::http::StatusCode;
    for status in [
        StatusCode::OK,
        StatusCode::NOT_FOUND,
        StatusCode::BAD_REQUEST,
        StatusCode::CONFLICT,
    ] {
        let app = axum::Router::new().fallback(move || async move {
            (
                status,
                axum::response::Html("<!doctype html><title>Open WebUI</title>"),
            )
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

        let job = uuid::Uuid::now_v7().to_string();
        for args in [&["jobs", "list"][..], &["jobs", "get", &job]] {
            let (code, stdout, stderr) = run(&mut backlog_at(&url, &[]), args).await;
            assert_eq!(code, 3, "{status} {args:?}: {stderr}");
            assert!(stdout.is_empty());
            assert!(
                stderr.contains("not the backlog API's JSON")
                    && stderr.contains("<!doctype html><title>Open WebUI")
                    && stderr.contains("BACKLOG_URL"),
                "{status} {args:?}: {stderr}"
            );
            assert!(!stderr.contains("could not reach"), "{stderr}");
        }
    }
}

/// What a [`faulty_proxy`] does to the requests it passes.
#[derive(Default)]
struct ProxyFaults {
    /// Answer 503, as a platform does while the API restarts.
    down: std::sync::atomic::AtomicBool,
    /// End every event stream at once, as a proxy with a short idle
    /// timeout does.
    cut_streams: std::sync::atomic::AtomicBool,
    /// Event streams asked for.
    streams: std::sync::atomic::AtomicUsize,
}

/// A proxy in front of `upstream`, streams included, with `faults`.
async fn faulty_proxy(upstream: &str, faults: std::sync::Arc<ProxyFaults>) -> String {
    use axum::body::Body;
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    use std::sync::atomic::Ordering;
    let client = reqwest::Client::new();
    let upstream = upstream.trim_end_matches('/').to_string();
    let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let (client, upstream, faults) = (client.clone(), upstream.clone(), faults.clone());
        async move {
            if faults.down.load(Ordering::SeqCst) {
                return (StatusCode::SERVICE_UNAVAILABLE, "restarting").into_response();
            }
            if request.uri().path().ends_with("/events") {
                faults.streams.fetch_add(1, Ordering::SeqCst);
                if faults.cut_streams.load(Ordering::SeqCst) {
                    return ([(header::CONTENT_TYPE, "text/event-stream")], "").into_response();
                }
            }
            let (parts, body) = request.into_parts();
            let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let mut forward = client
                .request(parts.method, format!("{upstream}{path}"))
                .body(body);
            for (name, value) in parts.headers.iter().filter(|(n, _)| *n != header::HOST) {
                forward = forward.header(name, value);
            }
            match forward.send().await {
                Ok(answer) => {
                    let mut response = axum::http::Response::builder().status(answer.status());
                    for (name, value) in answer.headers() {
                        response = response.header(name, value);
                    }
                    response.body(Body::from_stream(answer.bytes_stream())).unwrap()
                }
                Err(_) => StatusCode::BAD_GATEWAY.into_response(),
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// `jobs wait` goes on through an API answering 503 for seconds (one line
/// says so) and ends once the job does; a key revoked meanwhile ends it at
/// once with exit 3, not after the five minutes an outage is given.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn wait_rides_out_a_restarting_api_and_a_revoked_key_ends_it(pool: sqlx::PgPool) {
    use std::sync::atomic::Ordering;
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let faults = std::sync::Arc::new(ProxyFaults::default());
    let proxy = faulty_proxy(&server.base, faults.clone()).await;
    let down = &faults.down;
    let wait = |id: String| {
        let mut waiting = backlog_at(&proxy, &[("BACKLOG_KEY", key.as_str())]);
        waiting.args(["jobs", "wait", id.as_str()]);
        tokio::spawn(async move { run(&mut waiting, &[] as &[&str]).await })
    };

    let waiting = wait(server.create_text_job(&key, "tides").await);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    down.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!waiting.is_finished(), "--wait gave up on a restarting API");
    down.store(false, Ordering::SeqCst);
    do_task(
        &server,
        TaskType::TextGeneration,
        Some((ArtifactKind::Text, b"tides")),
    )
    .await;
    let (code, _, stderr) = waiting.await.unwrap();
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("503") && stderr.matches("still following job").count() == 1,
        "{stderr}"
    );

    let waiting = wait(server.create_text_job(&key, "more tides").await);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let id: uuid::Uuid = sqlx::query_scalar("SELECT id FROM api_keys")
        .fetch_one(&server.pool)
        .await
        .unwrap();
    server.queue.revoke_api_key(&id.to_string()).await.unwrap();
    let (code, _, stderr) = waiting.await.unwrap();
    assert_eq!(code, 3, "a refused key ends it: {stderr}");
    server.stop().await;
}

/// A key read with the line end a CRLF env file or a secret file leaves
/// on it works; one with another character a header cannot carry is
/// refused, naming where it came from and not the key: sent as it was,
/// the request failed before it left and was reported as the API
/// unreachable.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_key_with_a_line_end_works_and_one_with_a_control_character_is_named(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let (code, _, stderr) = run(&mut backlog(&server, &format!("{key}\r\n")), &["jobs", "list"]).await;
    assert_eq!(code, 0, "{stderr}");

    let broken = format!("{}\t{}", &key[..6], &key[6..]);
    let (code, _, stderr) = run(&mut backlog(&server, &broken), &["jobs", "list"]).await;
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("the API key in $BACKLOG_KEY"), "{stderr}");
    assert!(!stderr.contains("could not reach"), "{stderr}");
    assert!(!stderr.contains(&key[6..]), "the key is never printed: {stderr}");
    server.stop().await;
}

/// A job's error quotes what a provider sent: an escape sequence in it is
/// written out wherever the CLI prints it (a table, `jobs wait`'s lines and
/// its final error), never sent to the terminal.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn an_escape_sequence_in_a_jobs_error_never_reaches_the_terminal(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let job = json_of(&server, &key, &["submit", "text", "--prompt", "y"]).await;
    let id = job["id"].as_str().unwrap();
    let error = "HTTP 500: \u{1b}]0;pwned\u{7}\u{1b}[2Jcleared";
    fail_the_text_task(&server, error).await;
    for args in [
        vec!["jobs", "list"],
        vec!["jobs", "get", id],
        vec!["jobs", "wait", id],
    ] {
        let (_, stdout, stderr) = run(&mut backlog(&server, &key), &args).await;
        let shown = format!("{stdout}{stderr}");
        assert!(
            !shown.contains('\u{1b}') && !shown.contains('\u{7}'),
            "{args:?}: {shown:?}"
        );
        assert!(
            shown.contains("\\u{1b}[2Jcleared"),
            "{args:?}: written out: {shown}"
        );
    }
    // As the API sent it, for scripts.
    let (_, stdout, _) = run(&mut backlog(&server, &key), &["jobs", "get", id, "-o", "json"]).await;
    let job: Value = serde_json::from_str(&stdout).unwrap();
    assert!(job["error"].as_str().unwrap().contains(error), "{job}");
    server.stop().await;
}

/// A proxy that ends every event stream at once: `jobs wait` asks for the
/// next one a refresh later, not in a busy loop, and still ends with the
/// job.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn wait_asks_again_for_a_stream_cut_at_once_no_more_than_each_refresh(pool: sqlx::PgPool) {
    use std::sync::atomic::Ordering;
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let faults = std::sync::Arc::new(ProxyFaults::default());
    faults.cut_streams.store(true, Ordering::SeqCst);
    let proxy = faulty_proxy(&server.base, faults.clone()).await;
    let id = server.create_text_job(&key, "tides").await;
    let waiting = {
        let mut waiting = backlog_at(&proxy, &[("BACKLOG_KEY", key.as_str())]);
        waiting.args(["jobs", "wait", id.as_str()]);
        tokio::spawn(async move { run(&mut waiting, &[] as &[&str]).await })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let asked = faults.streams.load(Ordering::SeqCst);
    // About one a second; a busy loop asks thousands of times.
    assert!((1..=10).contains(&asked), "{asked} streams asked for in 3 s");
    do_task(&server, TaskType::TextGeneration, None).await;
    let (code, _, stderr) = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("jobs wait ends with the job")
        .unwrap();
    assert_eq!(code, 0, "{stderr}");
    server.stop().await;
}
