//! `make bench-api`: requests/s and p99 latency of `POST /v1/jobs` and
//! `GET /v1/jobs/{id}` at 64 concurrent connections, against PostgreSQL's
//! own ceiling measured in the same run with pgbench (`-b simple-update`,
//! one commit per transaction like a job creation, and `-S`, select-only).
//!
//! The server is the release `api` binary in its own process, on a fresh
//! database of the server in `DATABASE_URL`; this process is the load
//! generator, speaking plain HTTP/1.1 with keep-alive so that it costs as
//! little CPU as possible next to the server. The last line of output is
//! one JSON object with every figure.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use api::auth::generate_key;
use queue::{ApiKeyRole, Queue};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;

const CONNECTIONS: usize = 64;
const WARMUP: Duration = Duration::from_secs(2);
const MEASURE: Duration = Duration::from_secs(10);
const BENCH_DB: &str = "backlog_bench_api";
const PGBENCH_DB: &str = "backlog_bench_pgbench";
const PGBENCH_SCALE: &str = "10";

#[tokio::main]
async fn main() -> Result<()> {
    let admin_url = std::env::var("DATABASE_URL").context("DATABASE_URL must name a PostgreSQL server")?;
    let bench_url = test_support::with_database(&admin_url, BENCH_DB);
    let pgbench_url = test_support::with_database(&admin_url, PGBENCH_DB);
    let admin = sqlx::PgPool::connect(&admin_url).await?;
    for db in [BENCH_DB, PGBENCH_DB] {
        // Names are the constants above, not input.
        sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .execute(&admin)
            .await?;
        sqlx::query(&format!("CREATE DATABASE {db}"))
            .execute(&admin)
            .await?;
    }
    let cores = std::thread::available_parallelism()?.get();
    println!("backlog api benchmark: {CONNECTIONS} connections, {cores} cores, {MEASURE:?} per phase");

    let queue = Queue::connect(&bench_url, 2).await?;
    queue.migrate().await?;
    let key = generate_key("bench", ApiKeyRole::Client);
    queue.create_api_key(&key.record).await?;

    let port = free_port()?;
    let mut server = Command::new(env!("CARGO_BIN_EXE_api"))
        .args(["serve", "--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--sweeper-interval-seconds", "0", "--auth-cache-seconds", "30"])
        .env("DATABASE_URL", &bench_url)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting the api binary")?;
    let address = format!("127.0.0.1:{port}");
    wait_until_ready(&address).await?;

    let body = r#"{"type":"text","input":{"prompt":"benchmark"}}"#;
    let create = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        key.secret,
        body.len()
    );
    let creates = load(&address, 201, |_| create.clone()).await?;
    println!(
        "POST /v1/jobs:         {:>8.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms",
        creates.rate, creates.p50_ms, creates.p99_ms
    );

    let ids: Vec<String> = sqlx::query_scalar("SELECT id::text FROM all_jobs ORDER BY random() LIMIT 10000")
        .fetch_all(queue.pool())
        .await?;
    if ids.is_empty() {
        bail!("no jobs were created");
    }
    let secret = key.secret.clone();
    let reads = load(&address, 200, |n| {
        format!(
            "GET /v1/jobs/{} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {secret}\r\n\r\n",
            ids[n % ids.len()]
        )
    })
    .await?;
    println!(
        "GET /v1/jobs/{{id}}:     {:>8.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms",
        reads.rate, reads.p50_ms, reads.p99_ms
    );
    server.kill().await?;

    pgbench(&["-i", "-q", "-s", PGBENCH_SCALE], &pgbench_url).await?;
    let clients = CONNECTIONS.to_string();
    let seconds = MEASURE.as_secs().to_string();
    let run = ["-n", "-c", &clients, "-j", "2", "-T", &seconds];
    let update_tps = tps(&pgbench(&[&run[..], &["-b", "simple-update"]].concat(), &pgbench_url).await?)?;
    println!("pgbench -b simple-update: {update_tps:>8.0} tps");
    let select_tps = tps(&pgbench(&[&run[..], &["-S"]].concat(), &pgbench_url).await?)?;
    println!("pgbench -S:               {select_tps:>8.0} tps");

    let create_ratio = creates.rate / update_tps;
    let read_ratio = reads.rate / select_tps;
    println!(
        "creations / simple-update: {:.0} % (target 80 %)   reads / select-only: {:.0} % (target 30 %)",
        create_ratio * 100.0,
        read_ratio * 100.0
    );
    for db in [BENCH_DB, PGBENCH_DB] {
        sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .execute(&admin)
            .await?;
    }
    println!(
        "{}",
        json!({
            "connections": CONNECTIONS,
            "cores": cores,
            "seconds_per_phase": MEASURE.as_secs(),
            "create": creates.json(),
            "read": reads.json(),
            "pgbench_simple_update_tps": update_tps.round(),
            "pgbench_select_only_tps": select_tps.round(),
            "create_vs_simple_update": (create_ratio * 1000.0).round() / 1000.0,
            "read_vs_select_only": (read_ratio * 1000.0).round() / 1000.0,
        })
    );
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn wait_until_ready(address: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut conn) = Connection::open(address).await {
            let probe = "GET /readyz HTTP/1.1\r\nHost: bench\r\n\r\n";
            if matches!(conn.exchange(probe.as_bytes()).await, Ok((200, _))) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("the api did not become ready within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Figures {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: usize,
}

impl Figures {
    fn json(&self) -> serde_json::Value {
        json!({
            "requests_per_s": self.rate.round(),
            "p50_ms": (self.p50_ms * 100.0).round() / 100.0,
            "p99_ms": (self.p99_ms * 100.0).round() / 100.0,
            "requests": self.requests,
        })
    }
}

/// `CONNECTIONS` closed loops, each sending `request(n)` and waiting for
/// the answer, for `WARMUP` then `MEASURE`. Every answer must have status
/// `expect`.
async fn load(address: &str, expect: u16, request: impl Fn(usize) -> String + Sync) -> Result<Figures> {
    let started = Instant::now();
    let measure_from = started + WARMUP;
    let stop_at = measure_from + MEASURE;
    let request = &request;
    let loops = (0..CONNECTIONS).map(|c| async move {
        let mut conn = Connection::open(address).await?;
        let mut latencies = Vec::new();
        let mut n = c;
        loop {
            let sent = Instant::now();
            if sent >= stop_at {
                return anyhow::Ok(latencies);
            }
            let (status, body) = conn.exchange(request(n).as_bytes()).await?;
            if status != expect {
                bail!(
                    "expected {expect}, got {status}: {}",
                    String::from_utf8_lossy(&body)
                );
            }
            if sent >= measure_from {
                latencies.push(sent.elapsed());
            }
            n += CONNECTIONS;
        }
    });
    let mut latencies: Vec<Duration> = futures::future::try_join_all(loops).await?.concat();
    latencies.sort_unstable();
    let percentile = |p: f64| {
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i].as_secs_f64() * 1000.0
    };
    if latencies.is_empty() {
        bail!("no request finished in the measured window");
    }
    Ok(Figures {
        rate: latencies.len() as f64 / MEASURE.as_secs_f64(),
        p50_ms: percentile(0.50),
        p99_ms: percentile(0.99),
        requests: latencies.len(),
    })
}

/// A keep-alive HTTP/1.1 connection that knows just enough of the protocol
/// for this server's answers (which always carry Content-Length).
struct Connection {
    stream: BufReader<TcpStream>,
    line: String,
}

impl Connection {
    async fn open(address: &str) -> Result<Self> {
        let stream = TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        Ok(Connection {
            stream: BufReader::new(stream),
            line: String::new(),
        })
    }

    async fn exchange(&mut self, request: &[u8]) -> Result<(u16, Vec<u8>)> {
        self.stream.get_mut().write_all(request).await?;
        self.line.clear();
        self.stream.read_line(&mut self.line).await?;
        let status: u16 = self
            .line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {:?}", self.line))?;
        let mut length = 0;
        loop {
            self.line.clear();
            self.stream.read_line(&mut self.line).await?;
            let header = self.line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse()?;
                }
            }
        }
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body).await?;
        Ok((status, body))
    }
}

async fn pgbench(args: &[&str], url: &str) -> Result<String> {
    let output = Command::new("pgbench")
        .args(args)
        .arg(url)
        .output()
        .await
        .context("running pgbench (install postgresql-client)")?;
    if !output.status.success() {
        bail!(
            "pgbench {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The `tps = N (without initial connection time)` figure of a pgbench run.
fn tps(output: &str) -> Result<f64> {
    output
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no tps in pgbench output:\n{output}"))
}
