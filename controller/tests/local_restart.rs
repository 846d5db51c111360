//! The controller binary with the local backend and real `text-worker`
//! processes, killed with SIGKILL and started again: its workers are adopted,
//! never doubled, and stopped with the controller that adopted them; and
//! stopped with Ctrl-C, when its workers drain once and exit cleanly.

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use controller::backend::local::ProcessRecord;
use sqlx::PgPool;
use test_support::worker_pool::LocalTextPool;

const MAX_REPLICAS: usize = 3;

/// A live worker process of the test's pool, found in `/proc`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct WorkerProcess {
    pid: u32,
    worker_id: String,
}

/// The live processes whose environment says they are workers of pool
/// `text` on this test's database (other tests run in other databases).
fn live_workers(database_url: &str) -> Vec<WorkerProcess> {
    let wanted_db = format!("DATABASE_URL={database_url}");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let vars: Vec<String> = environ
            .split(|b| *b == 0)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        let in_pool = vars.iter().any(|v| v == "WORKER_POOL=text") && vars.contains(&wanted_db);
        let worker_id = vars.iter().find_map(|v| v.strip_prefix("WORKER_ID="));
        if let (true, Some(worker_id)) = (in_pool, worker_id) {
            if ProcessRecord::of(pid).is_some() {
                found.push(WorkerProcess {
                    pid,
                    worker_id: worker_id.to_string(),
                });
            }
        }
    }
    found.sort();
    found
}

/// Kills whatever the test leaves running, pass or fail, and shows the
/// controllers' logs on failure.
struct Cleanup {
    database_url: String,
    controllers: Vec<Child>,
    logs: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        test_support::show_logs_if_panicking(&self.logs);
        for controller in &mut self.controllers {
            let _ = controller.kill();
            let _ = controller.wait();
        }
        for worker in live_workers(&self.database_url) {
            // SAFETY: kill(2) on a pid just found in /proc.
            unsafe { libc::kill(worker.pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

fn write_manifest(dir: &Path, worker: &Path, database_url: &str) -> PathBuf {
    LocalTextPool::new(worker, database_url, &format!("file://{}", dir.display()))
        .env("WORKER_HEARTBEAT_SECONDS", "0.5")
        .spec("minReplicas", MAX_REPLICAS)
        .spec("maxReplicas", MAX_REPLICAS)
        .write_to(dir)
}

fn start_controller(
    binary: &Path,
    manifest: &Path,
    state_dir: &Path,
    database_url: &str,
    log: &Path,
) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(binary)
        .args([
            "run",
            "--backend",
            "local",
            "--tick-seconds",
            "0.3",
            "--stop-grace-seconds",
            "10",
        ])
        .arg("--filename")
        .arg(manifest)
        .arg("--state-dir")
        .arg(state_dir)
        .args(["--leader-key", "4242", "--log-format", "text"])
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        // Its own process group, as a shell starts a foreground job.
        .process_group(0)
        .spawn()
        .expect("starting the controller")
}

/// Whether the log at `log` says `what` within a minute.
async fn logs_within_a_minute(log: &Path, what: &str) -> bool {
    eventually(Duration::from_secs(60), || {
        std::fs::read_to_string(log).is_ok_and(|text| text.contains(what))
    })
    .await
}

/// The pool's registered workers once they are `MAX_REPLICAS`, or after a
/// minute.
async fn registered_workers(q: &queue::Queue) -> usize {
    let mut registered = 0;
    for _ in 0..600 {
        registered = q.workers(Some("text")).await.unwrap().len();
        if registered == MAX_REPLICAS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    registered
}

/// Poll `check` every 100 ms, up to `limit`; true once it holds.
async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    check()
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_controller_killed_with_sigkill_leaves_its_workers_to_the_next_one(pool: PgPool) {
    let controller = test_support::workspace_binary("controller", "controller");
    let worker = test_support::workspace_binary("workers", "text-worker");
    let database_url = test_support::database_url(&pool);
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(dir.path(), &worker, &database_url);
    let state_dir = dir.path().join("state");
    let (first_log, second_log) = (dir.path().join("first.log"), dir.path().join("second.log"));
    let mut cleanup = Cleanup {
        database_url: database_url.clone(),
        controllers: Vec::new(),
        logs: vec![first_log.clone(), second_log.clone()],
    };
    let q = queue::Queue::new(pool);

    cleanup.controllers.push(start_controller(
        &controller,
        &manifest,
        &state_dir,
        &database_url,
        &first_log,
    ));
    assert_eq!(
        registered_workers(&q).await,
        MAX_REPLICAS,
        "the first controller's workers registered"
    );
    let first_workers = live_workers(&database_url);
    assert_eq!(first_workers.len(), MAX_REPLICAS, "{first_workers:?}");

    // kill -9: nothing of the controller runs after this.
    let mut first = cleanup.controllers.pop().unwrap();
    first.kill().unwrap();
    first.wait().unwrap();
    assert_eq!(
        live_workers(&database_url),
        first_workers,
        "the workers outlive a controller killed with SIGKILL"
    );

    cleanup.controllers.push(start_controller(
        &controller,
        &manifest,
        &state_dir,
        &database_url,
        &second_log,
    ));
    assert!(
        logs_within_a_minute(&second_log, "leader: this controller acts").await,
        "the second controller became the leader"
    );
    // Many passes (0.3 s apart): the count never goes over maxReplicas.
    let mut most = 0;
    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        let live = live_workers(&database_url);
        most = most.max(live.len());
        seen.extend(live);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        most <= MAX_REPLICAS,
        "at most {MAX_REPLICAS} live workers, saw {most}: {seen:?}"
    );
    let now = live_workers(&database_url);
    assert_eq!(
        now, first_workers,
        "the earlier workers were adopted, none started beside them"
    );
    let ids: BTreeSet<&str> = seen.iter().map(|w| w.worker_id.as_str()).collect();
    let pids: BTreeSet<u32> = seen.iter().map(|w| w.pid).collect();
    assert_eq!(
        ids.len(),
        pids.len(),
        "no two processes shared a worker id: {seen:?}"
    );

    // A graceful stop of the second controller stops the adopted workers.
    let mut second = cleanup.controllers.pop().unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(second.id() as libc::pid_t, libc::SIGTERM) };
    let exited = eventually(Duration::from_secs(60), || {
        matches!(second.try_wait(), Ok(Some(_)))
    })
    .await;
    assert!(exited, "the second controller stopped on SIGTERM");
    let left = live_workers(&database_url);
    assert!(
        left.is_empty(),
        "no worker of the pool outlives the controller's shutdown: {left:?}"
    );
    assert!(
        q.workers(Some("text")).await.unwrap().is_empty(),
        "the stopped workers deregistered"
    );
}

/// The process group of a live process (`pgrp`, field 5 of stat(5)).
fn process_group(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

/// Ctrl-C in a terminal (`make run`) sends SIGINT to the whole foreground
/// process group. The workers are not in it: only the controller signals
/// them, once, so they drain and exit 0, where a second signal would make
/// them exit 130 without draining.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn ctrl_c_stops_the_controller_and_its_workers_drain_once(pool: PgPool) {
    let controller = test_support::workspace_binary("controller", "controller");
    let worker = test_support::workspace_binary("workers", "text-worker");
    let database_url = test_support::database_url(&pool);
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(dir.path(), &worker, &database_url);
    let log = dir.path().join("controller.log");
    let mut cleanup = Cleanup {
        database_url: database_url.clone(),
        controllers: Vec::new(),
        logs: vec![log.clone()],
    };
    let q = queue::Queue::new(pool);
    cleanup.controllers.push(start_controller(
        &controller,
        &manifest,
        &dir.path().join("state"),
        &database_url,
        &log,
    ));
    let mut registered = 0;
    for _ in 0..600 {
        registered = q.workers(Some("text")).await.unwrap().len();
        if registered == MAX_REPLICAS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(registered, MAX_REPLICAS, "the workers registered");
    let terminal_group = cleanup.controllers[0].id();
    let workers = live_workers(&database_url);
    assert_eq!(workers.len(), MAX_REPLICAS);
    for worker in &workers {
        assert_ne!(
            process_group(worker.pid),
            Some(terminal_group),
            "{worker:?} is in the controller's process group: Ctrl-C would signal it twice"
        );
    }

    // SAFETY: kill(2) on the process group of the controller this test started.
    unsafe { libc::kill(-(terminal_group as libc::pid_t), libc::SIGINT) };
    let mut controller = cleanup.controllers.pop().unwrap();
    let mut status = None;
    for _ in 0..600 {
        status = controller.try_wait().unwrap();
        if status.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cleanup.controllers.push(controller);
    let status = status.expect("the controller stopped on Ctrl-C");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "controller exit {status}:\n{text}");
    assert!(
        !text.contains("without draining"),
        "a worker took a second signal:\n{text}"
    );
    let drained = text
        .lines()
        .filter(|l| l.contains("local replica stopped") && l.contains("exit status: 0"))
        .count();
    assert_eq!(drained, MAX_REPLICAS, "every worker exited 0:\n{text}");
    assert!(live_workers(&database_url).is_empty());
    assert!(
        q.workers(Some("text")).await.unwrap().is_empty(),
        "the workers deregistered as they drained"
    );
}

/// A controller started on a database without the schema (a first deploy
/// starts everything at once), once it has said it waits for it; the
/// controller is `controllers[0]` of what is returned.
async fn controller_waiting_for_the_schema(pool: &PgPool, dir: &Path) -> Cleanup {
    let controller = test_support::workspace_binary("controller", "controller");
    let worker = test_support::workspace_binary("workers", "text-worker");
    let database_url = test_support::database_url(pool);
    let manifest = write_manifest(dir, &worker, &database_url);
    let log = dir.join("controller.log");
    let mut cleanup = Cleanup {
        database_url: database_url.clone(),
        controllers: Vec::new(),
        logs: vec![log.clone()],
    };
    cleanup.controllers.push(start_controller(
        &controller,
        &manifest,
        &dir.join("state"),
        &database_url,
        &log,
    ));
    assert!(
        logs_within_a_minute(&log, "lacks backlog's schema").await,
        "the controller says it waits for the schema"
    );
    assert!(
        matches!(cleanup.controllers[0].try_wait(), Ok(None)),
        "the controller is still running"
    );
    assert!(
        live_workers(&database_url).is_empty(),
        "nothing scaled before the schema"
    );
    cleanup
}

#[sqlx::test(migrations = false)]
async fn a_controller_started_before_the_schema_waits_for_it_then_scales(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = controller_waiting_for_the_schema(&pool, dir.path()).await;

    queue::MIGRATOR.run(&pool).await.unwrap();
    let q = queue::Queue::new(pool);
    assert_eq!(
        registered_workers(&q).await,
        MAX_REPLICAS,
        "the pool was scaled once migrated"
    );
}

/// Stopped while it waits for the schema (a first deploy rolled back), the
/// controller exits 0 like any other stop; it used to die by the signal.
#[sqlx::test(migrations = false)]
async fn a_controller_stopped_while_waiting_for_the_schema_exits_cleanly(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let mut cleanup = controller_waiting_for_the_schema(&pool, dir.path()).await;

    let controller = &mut cleanup.controllers[0];
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(controller.id() as libc::pid_t, libc::SIGTERM) };
    let mut status = None;
    let exited = eventually(Duration::from_secs(30), || {
        status = controller.try_wait().unwrap();
        status.is_some()
    })
    .await;
    assert!(exited, "the controller stopped on SIGTERM");
    let status = status.unwrap();
    assert!(status.success(), "{status}");
}
