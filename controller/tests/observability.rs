//! The dashboard and the alert rules of `manifests/observability/` use only
//! metrics that a running system exports: the real `api`, `controller` and
//! (started by the controller's local backend) `text-worker` binaries run a
//! job on a scratch database, each `/metrics` is scraped, and every metric
//! name in a panel's query, a template variable or a rule's expression must
//! be among the names they serve. A few of the new series are checked for
//! their values too: they come from the system, not from constants.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::PgPool;
use test_support::worker_pool::LocalTextPool;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

// --- metric names in PromQL ----------------------------------------------

/// Keywords of PromQL that are not metric names.
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
/// Keywords followed by a parenthesised list of label names.
const LABEL_LISTS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

/// The metric names a PromQL expression selects: identifiers outside
/// strings, label matchers (`{…}`) and ranges (`[…]`), not followed by `(`
/// (functions, aggregations), not keywords and not in a `by (…)`-style label
/// list. Grafana's `$variables` are left out.
fn metric_names(expr: &str) -> BTreeSet<String> {
    // Blank out strings, matchers and ranges, keeping positions.
    let mut plain = String::with_capacity(expr.len());
    let (mut quote, mut escaped, mut depth) = (None::<char>, false, 0usize);
    for c in expr.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
                plain.push(' ');
                continue;
            }
            None if matches!(c, '"' | '\'' | '`') => {
                quote = Some(c);
                plain.push(' ');
                continue;
            }
            None => {}
        }
        match c {
            '{' | '[' => depth += 1,
            '}' | ']' => depth = depth.saturating_sub(1),
            _ if depth == 0 => {
                plain.push(c);
                continue;
            }
            _ => {}
        }
        plain.push(' ');
    }

    let chars: Vec<char> = plain.chars().collect();
    let next_non_space = |from: usize| {
        chars[from..]
            .iter()
            .position(|c| !c.is_whitespace())
            .map(|p| from + p)
    };
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '$' {
            // A Grafana variable: `$name`.
            i += 1;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
        } else if c.is_ascii_digit() || c == '.' {
            // A number or a duration (5m, 1e3, 0.95).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '.' | '_')) {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | ':')) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = next_non_space(i);
            let followed_by_paren = next.is_some_and(|n| chars[n] == '(');
            // `max by (pool) (…)`: an aggregation with its grouping first.
            let followed_by_grouping = next.is_some_and(|n| {
                let rest: String = chars[n..].iter().take(8).collect();
                ["by", "without"].iter().any(|k| {
                    rest.strip_prefix(k).is_some_and(|after| {
                        !after.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
                    })
                })
            });
            if LABEL_LISTS.contains(&word.as_str()) {
                if let (true, Some(open)) = (followed_by_paren, next) {
                    let close = chars[open..]
                        .iter()
                        .position(|&c| c == ')')
                        .expect("a closed label list");
                    i = open + close + 1;
                }
            } else if !followed_by_paren && !followed_by_grouping && !KEYWORDS.contains(&word.as_str()) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The metric a Grafana variable query reads: `label_values(METRIC, LABEL)`
/// names one; anything else is PromQL.
fn variable_metric_names(query: &str) -> BTreeSet<String> {
    match query.trim().strip_prefix("label_values(") {
        Some(args) => match args.split_once(',') {
            Some((selector, _label)) => metric_names(selector),
            None => BTreeSet::new(),
        },
        None => metric_names(query),
    }
}

/// Every metric name the dashboard's queries and variables use, with where.
fn dashboard_metrics() -> BTreeMap<String, String> {
    let path = repo_root().join("manifests/observability/backlog-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut used = BTreeMap::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            for name in metric_names(target["expr"].as_str().unwrap_or_default()) {
                used.entry(name)
                    .or_insert_with(|| format!("dashboard panel {:?}", panel["title"]));
            }
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if variable["type"] == "query" {
            let query = variable["query"]["query"]
                .as_str()
                .or(variable["query"].as_str())
                .unwrap_or_default();
            for name in variable_metric_names(query) {
                used.entry(name)
                    .or_insert_with(|| format!("dashboard variable {:?}", variable["name"]));
            }
        }
    }
    used
}

/// Every metric name the rules' expressions use, with the rule.
fn rule_metrics() -> BTreeMap<String, String> {
    let path = repo_root().join("manifests/observability/rules.yaml");
    let rules: serde_json::Value = serde_yaml_ng::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut used = BTreeMap::new();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let name = rule["alert"]
                .as_str()
                .or(rule["record"].as_str())
                .unwrap_or_default();
            for metric in metric_names(rule["expr"].as_str().unwrap()) {
                used.entry(metric).or_insert_with(|| format!("rule {name}"));
            }
        }
    }
    used
}

#[test]
fn metric_names_are_read_from_promql_without_functions_labels_or_variables() {
    let expr = r#"max by (task_type) (backlog_queue_pending_tasks{task_type=~"$task_type"}) > 0
        unless on (task_type) max by (task_type) (
          backlog_controller_pool_task_type_info * on (pool) group_left () max by (pool) (ready:replicas)
        ) > bool 0.5e3 or histogram_quantile(0.95, sum by (le) (rate(x_bucket[$__rate_interval] offset 5m)))
        or absent(gone) or label_replace(a, "class", "${1}xx", "status", "(.)..") or sum(b) without (instance)"#;
    let names: Vec<String> = metric_names(expr).into_iter().collect();
    assert_eq!(
        names,
        [
            "a",
            "b",
            "backlog_controller_pool_task_type_info",
            "backlog_queue_pending_tasks",
            "gone",
            "ready:replicas",
            "x_bucket"
        ]
    );
    assert_eq!(
        variable_metric_names("label_values(backlog_controller_desired_replicas, pool)"),
        BTreeSet::from(["backlog_controller_desired_replicas".to_string()])
    );
}

#[test]
fn the_dashboard_and_the_rules_use_metrics() {
    // So the scrape test below cannot pass by reading nothing.
    let dashboard = dashboard_metrics();
    let rules = rule_metrics();
    assert!(dashboard.len() >= 20, "{dashboard:?}");
    assert!(rules.len() >= 8, "{rules:?}");
    assert!(rules.contains_key("backlog_controller_pool_task_type_info"));
}

// --- the running system ------------------------------------------------------

/// One sample of a scrape: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A scrape's samples and the names it exports: every sample's, and every
/// declared family's (a counter's `_total`, a histogram's `_bucket`, `_sum`,
/// `_count`). prometheus-client declares no family that has no series yet,
/// so a metric counts as exported only once the binary really serves it.
struct Scrape {
    samples: Vec<Sample>,
    names: BTreeSet<String>,
}

fn parse_exposition(text: &str) -> Scrape {
    let mut samples = Vec::new();
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(declared) = line.strip_prefix("# TYPE ") {
            let (family, kind) = declared.split_once(' ').unwrap();
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{family}{s}")));
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels = labels
            .split("\",")
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once("=\"").unwrap();
                (k.to_string(), v.trim_end_matches('"').to_string())
            })
            .collect();
        names.insert(name.to_string());
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value: value.parse().unwrap(),
        });
    }
    Scrape { samples, names }
}

impl Scrape {
    /// The value of the one sample named `name` with these labels (others
    /// it may have are not compared).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }
}

/// `N` ports free now and distinct: each listener is held until all are
/// bound, or the system may hand one port out twice (it did, and the
/// worker could not bind the metrics port the API already served).
fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<_> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| listeners[i].local_addr().unwrap().port())
}

/// Stops what the test started, pass or fail: SIGTERM first (the
/// controller stops its workers), then SIGKILL to whatever of this test's
/// database still runs; shows the logs on failure.
struct Running {
    database_url: String,
    children: Vec<Child>,
    logs: Vec<PathBuf>,
}

impl Running {
    fn stop(&mut self) {
        for child in self.children.iter().rev() {
            // SAFETY: kill(2) on a child of this process.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        for child in &mut self.children {
            while child.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.children.clear();
        for pid in processes_of_database(&self.database_url) {
            // SAFETY: kill(2) on a worker of this test's database, found in /proc.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        test_support::show_logs_if_panicking(&self.logs);
        self.stop();
    }
}

/// Live processes whose environment points at this test's database.
fn processes_of_database(database_url: &str) -> Vec<u32> {
    let wanted = format!("DATABASE_URL={database_url}");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ.split(|b| *b == 0).any(|v| v == wanted.as_bytes()) {
            found.push(pid);
        }
    }
    found
}

fn spawn_logged(command: &mut Command, log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    command
        .env("LOG_FORMAT", "text")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {command:?}: {e}"))
}

async fn scrape(http: &reqwest::Client, port: u16) -> Option<Scrape> {
    let response = http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .ok()?;
    Some(parse_exposition(&response.text().await.ok()?))
}

/// Poll `read` every 200 ms until `done` holds for its value, up to 90 s.
async fn eventually<T, F, Fut>(what: &str, mut read: F, done: impl Fn(&T) -> bool) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(value) = read().await {
            if done(&value) {
                return value;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn every_metric_of_the_dashboard_and_the_rules_is_exported_by_the_binaries(pool: PgPool) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let api = test_support::workspace_binary("api", "api");
    let worker = test_support::workspace_binary("workers", "text-worker");
    let controller = PathBuf::from(env!("CARGO_BIN_EXE_controller"));
    let database_url = test_support::database_url(&pool);
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file://{}", dir.path().join("artifacts").display());
    let [api_port, api_metrics, worker_metrics, controller_metrics] = free_ports();
    let mut running = Running {
        database_url: database_url.clone(),
        children: Vec::new(),
        logs: vec![dir.path().join("api.log"), dir.path().join("controller.log")],
    };

    let key = Command::new(&api)
        .args(["keys", "create", "--tenant", "ops", "--admin"])
        .env("DATABASE_URL", &database_url)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(key.status.success(), "{}", String::from_utf8_lossy(&key.stderr));
    let key = String::from_utf8(key.stdout).unwrap().trim().to_string();

    running.children.push(spawn_logged(
        Command::new(&api)
            .args(["serve", "--bind", "127.0.0.1", "--sweeper-interval-seconds", "1"])
            .args(["--port", &api_port.to_string()])
            .args(["--metrics-addr", &format!("127.0.0.1:{api_metrics}")])
            .args(["--artifact-store", &store])
            .env("REPAIR_INTERVAL_SECONDS", "1")
            .env("DATABASE_URL", &database_url),
        &running.logs[0],
    ));

    // One pool with a wait target, so the target's gauge has a value too.
    let manifest = LocalTextPool::new(&worker, &database_url, &store)
        .env("WORKER_METRICS_ADDR", &format!("127.0.0.1:{worker_metrics}"))
        .env("WORKER_POLL_SECONDS", "0.5")
        .spec("minReplicas", 0)
        .spec("maxReplicas", 1)
        .spec("targetQueueSeconds", 60)
        .write_to(dir.path());
    running.children.push(spawn_logged(
        Command::new(&controller)
            .args(["run", "--backend", "local", "--tick-seconds", "0.3"])
            .arg("--filename")
            .arg(&manifest)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(["--metrics-addr", &format!("127.0.0.1:{controller_metrics}")])
            .env("DATABASE_URL", &database_url),
        &running.logs[1],
    ));

    // A job: the pool scales from zero, the worker runs it.
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{api_port}");
    let created: serde_json::Value = eventually(
        "the API to take a job",
        || async {
            let response = http
                .post(format!("{base}/v1/jobs"))
                .bearer_auth(&key)
                .json(&serde_json::json!({"type": "text", "input": {"prompt": "tides"}}))
                .send()
                .await
                .ok()?;
            (response.status() == 201).then_some(response.json().await.ok()?)
        },
        |_| true,
    )
    .await;
    let job = created["id"].as_str().unwrap().to_string();
    eventually(
        "the job to complete",
        || async {
            let response = http
                .get(format!("{base}/v1/jobs/{job}"))
                .bearer_auth(&key)
                .send()
                .await
                .ok()?;
            let job: serde_json::Value = response.json().await.ok()?;
            Some(job["status"].as_str()?.to_string())
        },
        |status| status == "complete",
    )
    .await;

    let api_scrape = eventually(
        "the API's metrics with the job",
        || scrape(&http, api_metrics),
        |s| s.value("backlog_jobs_created_total", &[("job_type", "text")]) == Some(1.0),
    )
    .await;
    let worker_scrape = eventually(
        "the worker's metrics with the task",
        || scrape(&http, worker_metrics),
        |s| {
            s.value(
                "backlog_worker_tasks_total",
                &[("task_type", "text_generation"), ("outcome", "completed")],
            ) == Some(1.0)
        },
    )
    .await;
    let controller_scrape = eventually(
        "the controller's metrics with a ready replica",
        || scrape(&http, controller_metrics),
        |s| s.value("backlog_controller_ready_replicas", &[("pool", "text")]) == Some(1.0),
    )
    .await;

    // The new series hold what the system did.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = worker_scrape
        .value("backlog_worker_start_time_seconds", &[])
        .unwrap();
    assert!(
        now - 300.0 < started && started <= now,
        "start time {started}, now {now}"
    );
    let c = &controller_scrape;
    assert_eq!(c.value("backlog_controller_leader", &[]), Some(1.0));
    assert_eq!(
        c.value(
            "backlog_controller_pool_task_type_info",
            &[("pool", "text"), ("task_type", "text_generation")]
        ),
        Some(1.0)
    );
    assert_eq!(
        c.value("backlog_controller_target_queue_seconds", &[("pool", "text")]),
        Some(60.0)
    );
    for (status, value) in [("True", 1.0), ("False", 0.0)] {
        assert_eq!(
            c.value(
                "backlog_controller_pool_condition",
                &[("pool", "text"), ("type", "Ready"), ("status", status)]
            ),
            Some(value),
            "Ready={status}"
        );
    }
    assert_eq!(
        c.value(
            "backlog_controller_pool_condition",
            &[("pool", "text"), ("type", "Fallback"), ("status", "True")]
        ),
        Some(0.0)
    );
    assert!(
        c.value(
            "backlog_controller_scale_changes_total",
            &[("pool", "text"), ("direction", "up")]
        ) >= Some(1.0),
        "the scale-up from zero is counted"
    );
    assert!(
        api_scrape
            .value("backlog_sweeper_actions_total", &[("action", "jobs_repaired")])
            .is_some(),
        "the repair counter exists (at 0) before the first repair, so increase() sees the first"
    );

    // Prometheus sets `job` and `instance` on every series it scrapes; a
    // label of ours with either name would be renamed `exported_…`, and
    // every query grouping by it would group by the scrape instead.
    let reserved: Vec<String> = [&api_scrape, &worker_scrape, &controller_scrape]
        .iter()
        .flat_map(|s| s.samples.iter())
        .filter(|s| s.labels.contains_key("job") || s.labels.contains_key("instance"))
        .map(|s| format!("{} {:?}", s.name, s.labels))
        .collect();
    assert!(
        reserved.is_empty(),
        "series with a label Prometheus reserves: {reserved:#?}"
    );

    let exported: BTreeSet<String> = [&api_scrape, &worker_scrape, &controller_scrape]
        .iter()
        .flat_map(|s| s.names.iter().cloned())
        .collect();
    let mut used = dashboard_metrics();
    used.extend(rule_metrics());
    let missing: Vec<String> = used
        .iter()
        .filter(|(name, _)| !exported.contains(*name))
        .map(|(name, place)| format!("{name} ({place})"))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics the dashboard or the rules use and no binary exports: {missing:#?}"
    );
    running.stop();
}
