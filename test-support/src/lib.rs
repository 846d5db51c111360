//! Fixtures shared by backlog's tests.
//!
//! Tests that touch data use `#[sqlx::test(migrator = "queue::MIGRATOR")]`,
//! which gives each test a fresh, migrated database on the server named by
//! `DATABASE_URL` (`make test` sets it). The helpers here hand that
//! database to code under test that wants a URL (child processes, servers).
//! [`kube_api`] is an emulator of the Kubernetes API server;
//! [`worker_pool`] writes WorkerPool manifests of local text workers;
//! [`pg_proxy`] stands between a client and PostgreSQL to lose an answer.

pub mod fly;
pub mod kube_api;
pub mod pg_proxy;
pub mod s3;
pub mod worker_pool;

use std::path::PathBuf;

use sqlx::PgPool;

/// For a `Drop` that cleans up after a test: while the test is panicking,
/// print each of the processes' log files, so a failure shows what they said.
pub fn show_logs_if_panicking(logs: &[PathBuf]) {
    if std::thread::panicking() {
        for log in logs {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            eprintln!("--- {} ---\n{text}", log.display());
        }
    }
}

/// A `postgres://` URL for the database a pool is connected to, so a child
/// process can connect to the same per-test database.
pub fn database_url(pool: &PgPool) -> String {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL is set by make test");
    let db = pool
        .connect_options()
        .get_database()
        .unwrap_or("postgres")
        .to_string();
    with_database(&base, &db)
}

/// Replace the database name of a `postgres://` URL.
pub fn with_database(url: &str, database: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let scheme_end = head.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match head[scheme_end..].find('/') {
        Some(i) => &head[..scheme_end + i],
        None => head,
    };
    match query {
        Some(q) => format!("{base}/{database}?{q}"),
        None => format!("{base}/{database}"),
    }
}

/// `n` jobs of `job_type` for the tenant `acme`, enqueued in one batch. The
/// input is the one its type takes (a prompt, or a text).
pub async fn enqueue_jobs(q: &queue::Queue, job_type: queue::JobType, n: usize) {
    let jobs = (0..n)
        .map(|i| {
            queue::NewJob::new(
                "acme",
                job_type,
                match job_type.input_kind() {
                    queue::input::InputKind::Prompt => serde_json::json!({"prompt": format!("{i}")}),
                    queue::input::InputKind::Text => serde_json::json!({"text": format!("hello {i}")}),
                },
            )
        })
        .collect();
    q.enqueue_batch(jobs).await.expect("enqueue");
}

/// Register a replica of the `text` pool (text_generation) as a worker does
/// at start: under its pod name, machine id or `WORKER_ID`.
pub async fn register_text_worker(q: &queue::Queue, id: &str) {
    q.register_worker(&queue::NewWorker {
        id: id.into(),
        pool: Some("text".into()),
        task_types: vec![queue::TaskType::TextGeneration],
        concurrency: 2,
        hostname: None,
        pid: None,
    })
    .await
    .expect("register");
}

/// Tasks that took more than one attempt, and tasks with an error: both
/// (0, 0) when no scale-down interrupted, released or retried anything.
pub async fn retried_and_errored_tasks(pool: &PgPool) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE attempts <> 1), count(*) FILTER (WHERE last_error IS NOT NULL) FROM all_tasks",
    )
    .fetch_one(pool)
    .await
    .expect("counting retried tasks")
}

/// Put a finished job back among the open ones, with its tasks as they
/// are, as if it had never been moved to history: the state a job left
/// unfinished after its tasks (an old race, a hand edit) is in, or what a
/// retry does first. Returns how many tasks moved. The job must have a
/// `job_history` row: a job of one task that completed in its task's row
/// has none, and its row reopened alone would be no open job.
pub async fn reopen_in_place<'e>(executor: impl sqlx::PgExecutor<'e>, job: uuid::Uuid) -> u64 {
    let moved: i32 = sqlx::query_scalar("SELECT reopen_job($1)")
        .bind(job)
        .fetch_one(executor)
        .await
        .expect("reopening a finished job");
    moved as u64
}

/// History as a database migrated `days` days ago has it: what was moved
/// then in the partition of everything before, and a partition for each
/// day since (of jobs, tasks and artifact records), with artifact bytes in
/// day folders since then. The partitions of everything before must be
/// empty.
pub async fn history_partitioned_since(pool: &PgPool, days: i32) {
    let before = format!("uuid_v7_floor((current_date - {days})::timestamp AT TIME ZONE 'UTC')");
    for sql in [
        "ALTER TABLE job_history DETACH PARTITION job_history_before".to_string(),
        "ALTER TABLE task_history DETACH PARTITION task_history_before".to_string(),
        "ALTER TABLE artifacts DETACH PARTITION artifacts_before".to_string(),
        "DROP TABLE job_history_before, task_history_before, artifacts_before".to_string(),
        // A partition bound takes no parameter; `days` is the caller's own.
        format!("CREATE TABLE job_history_before PARTITION OF job_history FOR VALUES FROM (MINVALUE) TO ({before})"),
        format!("CREATE TABLE task_history_before PARTITION OF task_history FOR VALUES FROM (MINVALUE) TO ({before})"),
        format!("CREATE TABLE artifacts_before PARTITION OF artifacts FOR VALUES FROM (MINVALUE) TO ({before})"),
        format!("SELECT create_history_partitions(current_date - {days}, {days})"),
        // Its jobs' bytes have been in day folders since then too.
        format!("UPDATE artifact_layout SET day_folders_from = current_date - {days}"),
    ] {
        sqlx::query(&sql)
            .execute(pool)
            .await
            .expect("laying out history by day");
    }
}

/// Say a finished job finished `days` ago, in whichever history row holds
/// it: its `job_history` row, or, for a job of one task that completed in
/// its task's row, that row in `task_history`.
pub async fn finished_days_ago(pool: &PgPool, id: uuid::Uuid, days: i32) {
    let moved: i64 = sqlx::query_scalar(
        "WITH with_row AS (
             UPDATE job_history SET finished_at = now() - make_interval(days => $2) WHERE id = $1 RETURNING 1
         ), in_task_row AS (
             UPDATE task_history SET finished_at = now() - make_interval(days => $2)
             WHERE job_id = $1 AND job_input IS NOT NULL RETURNING 1
         )
         SELECT (SELECT count(*) FROM with_row) + (SELECT count(*) FROM in_task_row)",
    )
    .bind(id)
    .bind(days)
    .fetch_one(pool)
    .await
    .expect("moving a job's finish back");
    assert_eq!(moved, 1, "job {id} is not finished");
}

/// Make a job `days` old as if it had been created then: a UUIDv7 id from
/// that time, and its timestamps moved back. An open job stays open, a
/// finished one lands in the history partition of its new day.
pub async fn backdate(pool: &PgPool, id: uuid::Uuid, days: i64) -> uuid::Uuid {
    let then = chrono::Utc::now() - chrono::Duration::days(days);
    // The job's own random bits keep two jobs backdated in one millisecond apart.
    let random: [u8; 10] = id.as_bytes()[6..].try_into().expect("16 - 6 bytes");
    let old_id =
        uuid::Builder::from_unix_timestamp_millis(then.timestamp_millis() as u64, &random).into_uuid();
    let mut tx = pool.begin().await.unwrap();
    for (jobs, tasks) in [("jobs", "job_tasks"), ("job_history", "task_history")] {
        let statements = [
            // A job kept in its task's row was created with its task, and
            // one that completed there finished with it.
            format!(
                "UPDATE {tasks} SET created_at = created_at - make_interval(days => $3),
                                    finished_at = finished_at - make_interval(days => $3)
                 WHERE job_id = $1 AND job_input IS NOT NULL AND $2::uuid IS NOT NULL"
            ),
            format!(
                "INSERT INTO {jobs} SELECT $2, tenant, job_type, status, input, priority, idempotency_key, error,
                        created_at - make_interval(days => $3), updated_at, started_at,
                        finished_at - make_interval(days => $3), tasks_total, tasks_complete
                 FROM {jobs} WHERE id = $1"
            ),
            format!("UPDATE {tasks} SET job_id = $2 WHERE job_id = $1"),
            format!("DELETE FROM {jobs} WHERE id = $1"),
        ];
        for sql in statements {
            sqlx::query(&sql)
                .bind(id)
                .bind(old_id)
                .bind(days as i32)
                .execute(&mut *tx)
                .await
                .unwrap();
        }
    }
    for table in ["artifacts", "job_keys"] {
        sqlx::query(&format!("UPDATE {table} SET job_id = $2 WHERE job_id = $1"))
            .bind(id)
            .bind(old_id)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    old_id
}

/// The path of one of the workspace's binaries, built first if needed, so a
/// test in one crate can run another crate's program as a real process.
pub fn workspace_binary(package: &str, name: &str) -> std::path::PathBuf {
    // Test executables live in <target>/<profile>/deps.
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args(["build", "--quiet", "--locked", "-p", package, "--bin", name])
        .status()
        .expect("running cargo build");
    assert!(status.success(), "cargo build -p {package} --bin {name} failed");
    let path = profile_dir.join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// What the README's Configuration section says wrong about the settings
/// `binary ARGS --help` names (clap's `[env: NAME=]`): each variable with
/// no row (a setting a user cannot find), and each whose row does not
/// state the default `--help` shows (`[default: D]`).
pub fn settings_the_readme_misstates(binary: &str, args: &[&str]) -> Vec<String> {
    let help = std::process::Command::new(binary)
        .args(args)
        .arg("--help")
        .env_clear()
        .output()
        .unwrap_or_else(|e| panic!("{binary} --help: {e}"));
    assert!(help.status.success(), "{binary} {args:?} --help failed");
    let help = String::from_utf8(help.stdout).unwrap();
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let configuration = readme
        .split("\n## Configuration\n")
        .nth(1)
        .expect("the README's Configuration section")
        .split("\n## ")
        .next()
        .unwrap();
    let settings = help_settings(&help);
    assert!(!settings.is_empty(), "{binary} {args:?} --help names no variable");
    let mut wrong = Vec::new();
    for (name, default) in settings {
        let Some(row) = configuration
            .lines()
            .find(|line| line.starts_with('|') && line.contains(&format!("`{name}`")))
        else {
            wrong.push(format!("{name}: no row"));
            continue;
        };
        if let Some(default) = default {
            if !default_spellings(&default).iter().any(|s| mentions(row, s)) {
                wrong.push(format!("{name}: its row does not say the default, {default}"));
            }
        }
    }
    wrong
}

/// Each `[env: NAME=]` of a `--help` text, with the `[default: D]` shown
/// for the same argument, if any (clap prints the default after the env).
fn help_settings(help: &str) -> Vec<(String, Option<String>)> {
    let mut settings: Vec<(String, Option<String>)> = help
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| {
            let name = rest.split(['=', ']']).next()?.to_string();
            // This argument's text ends where the next argument starts (a
            // line that starts with `-` once indented).
            let own = rest
                .split('\n')
                .take_while(|line| !line.trim_start().starts_with('-'))
                .collect::<Vec<_>>()
                .join("\n");
            let default = own
                .split("[default: ")
                .nth(1)
                .and_then(|d| d.split(']').next())
                .map(str::to_string);
            Some((name, default))
        })
        .collect();
    settings.sort();
    settings.dedup();
    settings
}

/// How the README may write a default: as `--help` does, with thousands
/// separators, or in KiB/MiB. A boolean's `false` goes without saying.
fn default_spellings(default: &str) -> Vec<String> {
    if default == "false" {
        return vec![String::new()];
    }
    let mut spellings = vec![default.to_string()];
    if let Ok(n) = default.parse::<u64>() {
        let digits = n.to_string();
        let mut grouped = String::new();
        for (i, digit) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                grouped.push(',');
            }
            grouped.push(digit);
        }
        spellings.push(grouped);
        for (unit, size) in [("MiB", 1u64 << 20), ("KiB", 1 << 10)] {
            if n >= size && n % size == 0 {
                spellings.push(format!("{} {unit}", n / size));
            }
        }
    }
    spellings
}

/// Whether `row` holds `word` on its own: `60` is not mentioned by `600`.
fn mentions(row: &str, word: &str) -> bool {
    if word.is_empty() {
        return true;
    }
    row.match_indices(word).any(|(at, _)| {
        let before = row[..at].chars().next_back();
        let after = row[at + word.len()..].chars().next();
        let joins = |c: Option<char>| {
            c.is_some_and(|c| {
                c.is_ascii_alphanumeric() || c == '.' && word.chars().all(|w| w.is_ascii_digit())
            })
        };
        !joins(before) && !joins(after)
    })
}

#[cfg(test)]
mod tests {
    use super::{default_spellings, help_settings, mentions, with_database};

    #[test]
    fn reads_each_variable_and_its_own_default_from_a_help_text() {
        // clap's long help: env and default on lines of their own.
        let help = "Options:\n      --port <PORT>\n          listen port\n          \n          [env: PORT=]\n          [default: 8787]\n\n      --migrate\n          apply migrations first [env: MIGRATE_ON_START=]\n\n      --store <S>\n          [env: ARTIFACT_STORE=]\n\n      --mode <MODE>\n          [default: fast]\n  -h, --help\n          Print help [default: nothing]\n";
        assert_eq!(
            help_settings(help),
            vec![
                ("ARTIFACT_STORE".to_string(), None),
                ("MIGRATE_ON_START".to_string(), None),
                ("PORT".to_string(), Some("8787".to_string())),
            ]
        );
    }

    #[test]
    fn a_default_may_be_written_grouped_or_in_binary_units_but_not_as_part_of_a_number() {
        let row = "| `BODY_LIMIT_BYTES` | api | 1 MiB; batches of 1,000; every 600 s; 0.5 s |";
        let said = |default: &str| default_spellings(default).iter().any(|s| mentions(row, s));
        assert!(said("1048576"));
        assert!(said("1000"));
        assert!(said("600"));
        assert!(said("false"));
        assert!(!said("60"), "60 is not said by 600");
        assert!(!said("5"), "5 is not said by 0.5");
        assert!(!said("1024"));
    }

    #[test]
    fn replaces_the_database_and_keeps_the_query() {
        assert_eq!(with_database("postgres://u@h:5/a", "b"), "postgres://u@h:5/b");
        assert_eq!(with_database("postgres://u@h:5", "b"), "postgres://u@h:5/b");
        assert_eq!(
            with_database("postgres://u@h/a?host=/tmp&sslmode=disable", "b"),
            "postgres://u@h/b?host=/tmp&sslmode=disable"
        );
    }
}
