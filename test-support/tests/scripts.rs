//! `scripts/ensure-postgres.sh` gives `make run` a database of its own
//! (`backlog`, created when missing) on the server it finds, rather than
//! migrating backlog's schema into the server's `postgres` database.

use std::path::Path;
use std::process::Command;

/// Run `scripts/NAME` with `args` and `env`, and return its stdout; the
/// script must succeed.
fn run_script(name: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let output = Command::new("bash")
        .arg(root.join("scripts").join(name))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("bash runs the script");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn ensure_postgres(server_url: &str, database: &str) -> String {
    run_script("ensure-postgres.sh", &[database], &[("DATABASE_URL", server_url)])
        .trim_end()
        .to_string()
}

#[tokio::test]
async fn a_named_database_is_created_once_on_the_server_found() {
    let server = std::env::var("DATABASE_URL").expect("DATABASE_URL is set by make test");
    let database = format!("backlog_ensure_{}", std::process::id());
    let url = ensure_postgres(&server, &database);
    assert_eq!(
        url,
        test_support::with_database(&server, &database),
        "the server's URL with the database named"
    );
    assert_eq!(ensure_postgres(&server, &database), url, "a second run finds it");

    let pool = sqlx::PgPool::connect(&url).await.expect("the database exists");
    let current: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    assert_eq!(current, database);

    let admin = sqlx::PgPool::connect(&server).await.unwrap();
    sqlx::query(&format!("DROP DATABASE {database}"))
        .execute(&admin)
        .await
        .unwrap();
}

#[test]
fn make_run_uses_the_backlog_database() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let run = std::fs::read_to_string(root.join("scripts/run.sh")).unwrap();
    assert!(
        run.contains(r#"scripts/ensure-postgres.sh" backlog)"#),
        "make run asks for its own database"
    );
}

/// `make bench-queue` compares backlog with peers whose client
/// (node-postgres) connects without TLS unless the URL asks; sqlx and
/// pgbench would encrypt on a server that offers TLS. The script asks every
/// client for plain TCP when the URL names no sslmode, and keeps one named.
#[test]
fn bench_queue_runs_every_client_on_one_transport() {
    let server = std::env::var("DATABASE_URL").expect("DATABASE_URL is set by make test");
    // A `cargo` that reports the URL the benchmark would be given.
    let stub = std::env::temp_dir().join(format!("backlog-cargo-stub-{}", std::process::id()));
    std::fs::create_dir_all(&stub).unwrap();
    let cargo = stub.join("cargo");
    std::fs::write(&cargo, "#!/bin/sh\necho \"bench url: $DATABASE_URL\"\n").unwrap();
    std::fs::set_permissions(&cargo, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", stub.display(), std::env::var("PATH").unwrap());
    let bench_url = |url: &str| {
        run_script(
            "bench-queue.sh",
            &[],
            &[("DATABASE_URL", url), ("PEERS", "0"), ("PATH", &path)],
        )
        .lines()
        .find_map(|l| l.strip_prefix("bench url: "))
        .expect("the benchmark ran")
        .to_string()
    };
    let separator = if server.contains('?') { '&' } else { '?' };

    let plain = bench_url(&server);
    let named = bench_url(&format!("{server}{separator}sslmode=prefer"));
    std::fs::remove_dir_all(&stub).unwrap();
    assert!(plain.ends_with("sslmode=disable"), "{plain}");
    assert!(
        named.contains("sslmode=prefer") && !named.contains("sslmode=disable"),
        "{named}"
    );
}
