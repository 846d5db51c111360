//! Probes, metrics, the sweeper, and the OpenAPI document against the
//! routes the server really serves.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use api::state::{Settings, SweeperSettings};
use common::{read, test_settings, TestServer};
use queue::{ApiKeyRole, Retention, RetentionMode, TaskType};
use reqwest::header::CONTENT_TYPE;
use serde_json::{json, Value};

/// Every route, as `METHOD path`. Adding a route means adding it here too,
/// and the document must follow (it does, being built from the same table).
const ROUTES: &[&str] = &[
    "GET /healthz",
    "GET /openapi.json",
    "GET /readyz",
    "GET /v1/jobs",
    "GET /v1/jobs/{id}",
    "GET /v1/jobs/{id}/artifacts",
    "GET /v1/jobs/{id}/artifacts/{artifact_id}",
    "GET /v1/jobs/{id}/events",
    "GET /v1/pools",
    "GET /v1/queue",
    "GET /v1/queue/history",
    "POST /v1/jobs",
    "POST /v1/jobs/{id}/cancel",
    "POST /v1/jobs/{id}/retry",
    "POST /v1/jobs:batch",
];

const METHODS: &[&str] = &["get", "put", "post", "delete", "patch"];

fn documented_operations(doc: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in METHODS {
            if item.get(*method).is_some() {
                out.insert(format!("{} {path}", method.to_uppercase()));
            }
        }
    }
    out
}

fn refs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("$ref", Value::String(r)) => out.push(r.clone()),
                    _ => refs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn the_openapi_document_lists_exactly_the_served_routes(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let admin = server.key("ops", ApiKeyRole::Admin).await;
    let (status, doc) = read(
        server
            .client
            .get(server.url("/openapi.json"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1."),
        "{}",
        doc["openapi"]
    );
    assert_eq!(doc, serde_json::to_value(api::openapi::document()).unwrap());

    let documented = documented_operations(&doc);
    let expected: BTreeSet<String> = ROUTES.iter().map(|r| r.to_string()).collect();
    assert_eq!(documented, expected);

    let id = uuid::Uuid::now_v7().to_string();
    for operation in &documented {
        let (method, template) = operation.split_once(' ').unwrap();
        let path = template.replace("{id}", &id).replace("{artifact_id}", &id);
        // Served: whatever it answers, it is not the router's fallback.
        let response = server
            .client
            .request(method.parse().unwrap(), server.url(&path))
            .bearer_auth(&admin)
            .json(&json!({"jobs": [], "type": "text", "input": {}}))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body = response.text().await.unwrap();
        assert_ne!(status, 405, "{operation}: {body}");
        assert!(!body.contains("\"route "), "{operation} is not served: {body}");

        // Every other method on a documented path is refused by the router.
        for other in METHODS.iter().map(|m| m.to_uppercase()) {
            if documented.contains(&format!("{other} {template}")) {
                continue;
            }
            let response = server
                .client
                .request(other.parse().unwrap(), server.url(&path))
                .bearer_auth(&admin)
                .send()
                .await
                .unwrap();
            assert_eq!(
                response.status(),
                405,
                "{other} {template} is served but not documented"
            );
        }

        // /v1 needs a key, and says so; every operation documents its errors.
        let spec = &doc["paths"][template][method.to_lowercase()];
        let responses = spec["responses"].as_object().unwrap();
        assert!(
            responses.contains_key("500") && responses.contains_key("503"),
            "{operation}"
        );
        if template.starts_with("/v1/") {
            assert!(responses.contains_key("401"), "{operation}");
            assert_eq!(spec["security"], json!([{"bearer": []}]), "{operation}");
        }
    }

    let mut references = Vec::new();
    refs(&doc, &mut references);
    assert!(!references.is_empty());
    for reference in references {
        let name = reference.strip_prefix("#/components/schemas/").unwrap();
        assert!(
            doc["components"]["schemas"].get(name).is_some(),
            "{reference} is not defined"
        );
    }
    let codes = &doc["components"]["schemas"]["ErrorCode"]["enum"];
    for code in [
        "invalid_input",
        "unauthorized",
        "payload_too_large",
        "range_not_satisfiable",
    ] {
        assert!(codes.as_array().unwrap().contains(&json!(code)), "{code}");
    }
    // Each job type appears with the one input it takes.
    let alternatives = doc["components"]["schemas"]["CreateJobRequest"]["oneOf"]
        .as_array()
        .unwrap();
    let by_input: Vec<(Value, Value)> = alternatives
        .iter()
        .map(|a| {
            (
                a["properties"]["input"]["$ref"].clone(),
                a["properties"]["type"]["enum"].clone(),
            )
        })
        .collect();
    assert_eq!(
        by_input,
        [
            (
                json!("#/components/schemas/PromptInput"),
                json!(["reading", "text"])
            ),
            (
                json!("#/components/schemas/TextInput"),
                json!(["pdf", "audiobook"])
            ),
        ]
    );
    server.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn probes_answer_without_a_key(pool: sqlx::PgPool) {
    let server = TestServer::start(pool.clone()).await;
    let (status, health) = read(server.client.get(server.url("/healthz")).send().await.unwrap()).await;
    assert_eq!((status, health), (200, json!({"status": "ok"})));
    let (status, ready) = read(server.client.get(server.url("/readyz")).send().await.unwrap()).await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["ready"], true);

    // A migration missing from the database: not ready.
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = (SELECT max(version) FROM _sqlx_migrations)")
        .execute(&pool)
        .await
        .unwrap();
    let (status, ready) = read(server.client.get(server.url("/readyz")).send().await.unwrap()).await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["ready"], false);
    server.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn metrics_count_requests_by_route_and_report_queue_depth(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let id = server.create_text_job(&key, "p").await;
    server.create_text_job(&key, "q").await;
    server.get(&key, &format!("/v1/jobs/{id}")).send().await.unwrap();
    server.get(&key, "/v1/jobs/nope").send().await.unwrap();

    let response = server
        .client
        .get(format!("{}/metrics", server.metrics_base))
        .send()
        .await
        .unwrap();
    assert!(response.headers()[CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let text = response.text().await.unwrap();
    for line in [
        r#"backlog_http_requests_total{method="POST",route="/v1/jobs",status="201"} 2"#,
        r#"backlog_http_requests_total{method="GET",route="/v1/jobs/{id}",status="200"} 1"#,
        r#"backlog_http_requests_total{method="GET",route="/v1/jobs/{id}",status="400"} 1"#,
        r#"backlog_http_request_duration_seconds_count{method="POST",route="/v1/jobs",status="201"} 2"#,
        r#"backlog_queue_pending_tasks{task_type="text_generation"} 2"#,
        r#"backlog_queue_in_flight_tasks{task_type="pdf_generation"} 0"#,
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    }
    assert!(text.trim_end().ends_with("# EOF"));
    server.stop().await;
}

/// The API's port serves no metrics: they are on their own address only.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn the_api_port_serves_no_metrics(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let (status, body) = read(server.client.get(server.url("/metrics")).send().await.unwrap()).await;
    assert_eq!(status, 404, "{body}");
    server.stop().await;
}

/// Scrapes in quick succession share one depth read.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn scrapes_reuse_a_recent_depth_read(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    server.create_text_job(&key, "p").await;
    let scrapes = futures::future::join_all((0..5).map(|_| server.scrape())).await;
    for text in scrapes.iter().chain([&server.scrape().await]) {
        assert!(
            text.lines().any(|l| l == "backlog_queue_depth_reads_total 1"),
            "{text}"
        );
        assert!(text
            .lines()
            .any(|l| l == r#"backlog_queue_pending_tasks{task_type="text_generation"} 1"#));
    }
    server.stop().await;
}

/// Labels stay bounded whatever clients send: custom methods are `other`,
/// and unmatched paths share `unmatched` (never the raw path).
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn request_labels_are_bounded_whatever_the_client_sends(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let id = uuid::Uuid::now_v7();
    for (method, path) in [
        ("BREW", format!("/v1/jobs/{id}")),
        ("FROBNICATE", "/v1/jobs".to_string()),
        ("GET", "/no/such/path/12345".to_string()),
        ("GET", format!("/v1/jobs/{id}")),
    ] {
        server
            .client
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                server.url(&path),
            )
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
    }
    let text = server.scrape().await;
    let requests: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("backlog_http_requests_total{"))
        .collect();
    for forbidden in ["BREW", "FROBNICATE", "/no/such", &id.to_string()] {
        assert!(
            requests.iter().all(|l| !l.contains(forbidden)),
            "{forbidden} in {requests:#?}"
        );
    }
    for line in [
        r#"backlog_http_requests_total{method="other",route="/v1/jobs/{id}",status="405"} 1"#,
        r#"backlog_http_requests_total{method="other",route="/v1/jobs",status="405"} 1"#,
        r#"backlog_http_requests_total{method="GET",route="unmatched",status="404"} 1"#,
        r#"backlog_http_requests_total{method="GET",route="/v1/jobs/{id}",status="404"} 1"#,
    ] {
        assert!(requests.contains(&line), "missing {line:?} in {requests:#?}");
    }
    server.stop().await;
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn the_sweeper_rescues_stale_tasks_and_prunes_finished_jobs(pool: sqlx::PgPool) {
    let settings = Settings {
        sweeper: Some(SweeperSettings {
            interval: Duration::from_millis(100),
            stale_after: Duration::from_millis(300),
            retention: Some(Retention {
                older_than: Duration::ZERO,
                mode: RetentionMode::Delete,
                batch: 10,
            }),
            retention_interval: Duration::from_millis(100),
            repair_interval: Duration::from_millis(100),
            vacuum_interval: Some(Duration::from_millis(100)),
            vacuum_min_dead_rows: 1,
        }),
        ..test_settings()
    };
    let server = TestServer::start_with(pool.clone(), settings).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let stuck = server.create_text_job(&key, "worker dies").await;
    let done = server.create_text_job(&key, "cancelled").await;
    server
        .post(&key, &format!("/v1/jobs/{done}/cancel"))
        .send()
        .await
        .unwrap();
    let claimed = server
        .queue
        .claim("dead-worker", &[TaskType::TextGeneration], 1)
        .await
        .unwrap();
    assert_eq!(claimed[0].job_id.to_string(), stuck);

    // The claimed task's worker never heartbeats: it goes back to pending.
    wait_for("the sweeper to take the task back", async || {
        let (_, job) = server.get_json(&key, &format!("/v1/jobs/{stuck}")).await;
        job["tasks"][0]["status"] == "pending"
    })
    .await;
    let (_, job) = server.get_json(&key, &format!("/v1/jobs/{stuck}")).await;
    assert!(job["tasks"][0]["last_error"]
        .as_str()
        .unwrap()
        .contains("stopped heartbeating"));
    // The cancelled job is past its (zero) retention.
    wait_for("retention to remove the cancelled job", async || {
        server
            .get(&key, &format!("/v1/jobs/{done}"))
            .send()
            .await
            .unwrap()
            .status()
            == 404
    })
    .await;

    // A dead row in the open-task table, counted at once (each backend
    // reports its own when it flushes; asking for that needs PostgreSQL
    // 15): the vacuumer vacuums the table.
    let version: i32 = sqlx::query_scalar("SELECT current_setting('server_version_num')::int")
        .fetch_one(&pool)
        .await
        .unwrap();
    if version >= 150000 {
        let mut conn = pool.acquire().await.unwrap();
        sqlx::query("UPDATE job_tasks SET updated_at = now()")
            .execute(&mut *conn)
            .await
            .unwrap();
        sqlx::query("SELECT pg_stat_force_next_flush()")
            .execute(&mut *conn)
            .await
            .unwrap();
        wait_for("the vacuumer to vacuum the open-task table", async || {
            server
                .scrape()
                .await
                .lines()
                .any(|l| l.starts_with(r#"backlog_sweeper_actions_total{action="vacuums"} "#))
        })
        .await;
        let text = server.scrape().await;
        assert!(text.contains(r#"backlog_maintenance_runs_total{maintenance="vacuum",result="ok"}"#));
        let vacuums: i64 = sqlx::query_scalar(
            "SELECT vacuum_count FROM pg_stat_user_tables WHERE relid = 'job_tasks'::regclass",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert!(vacuums >= 1, "PostgreSQL counted {vacuums} vacuums of job_tasks");
    }

    let text = server.scrape().await;
    for line in [
        r#"backlog_sweeper_actions_total{action="retried"} 1"#,
        r#"backlog_sweeper_actions_total{action="pruned"} 1"#,
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    }
    assert!(text.contains(r#"backlog_maintenance_runs_total{maintenance="sweep",result="ok"}"#));
    server.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn pools_show_the_status_the_controller_wrote_to_admin_keys_only(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let admin = server.key("ops", ApiKeyRole::Admin).await;
    let client_key = server.key("acme", ApiKeyRole::Client).await;
    let get = |key: String| {
        let request = server.client.get(server.url("/v1/pools")).bearer_auth(key);
        async move { read(request.send().await.unwrap()).await }
    };
    assert_eq!(get(admin.clone()).await, (200, json!({"pools": []})));

    let mut status = queue::PoolStatus {
        pool: "worker".into(),
        backend: "fly".into(),
        desired_replicas: 3,
        current_replicas: 2,
        ready_replicas: 1,
        busy_replicas: 1,
        pending: 9,
        in_flight: 4,
        conditions: json!([{"type": "Ready", "status": "False", "reason": "Unauthorized", "message": "token"}]),
        last_decision: Some("9 pending at 4 per replica".into()),
        last_scale_at: None,
        task_types: vec!["text_generation".into(), "pdf_generation".into()],
        created_at: Some("2026-11-30T08:00:00Z".parse().unwrap()),
    };
    server.queue.put_pool_status(&status).await.unwrap();
    // A later pass replaces the row; a writer that knows no creation time
    // (a pool from a file) keeps the stored one.
    status.desired_replicas = 4;
    status.created_at = None;
    server.queue.put_pool_status(&status).await.unwrap();
    let (code, body) = get(admin.clone()).await;
    assert_eq!(code, 200, "{body}");
    let pools = body["pools"].as_array().unwrap();
    assert_eq!(pools.len(), 1, "{body}");
    let p = &pools[0];
    assert_eq!(
        (
            &p["pool"],
            &p["backend"],
            &p["desired_replicas"],
            &p["ready_replicas"],
            &p["busy_replicas"],
            &p["pending"]
        ),
        (
            &json!("worker"),
            &json!("fly"),
            &json!(4),
            &json!(1),
            &json!(1),
            &json!(9)
        )
    );
    assert_eq!(p["conditions"][0]["reason"], "Unauthorized");
    assert_eq!(p["task_types"], json!(["text_generation", "pdf_generation"]));
    assert_eq!(p["created_at"], "2026-11-30T08:00:00Z");
    assert!(p["updated_at"].is_string());

    let (code, body) = get(client_key).await;
    assert_eq!(code, 403, "a client key may not read pools: {body}");

    // A pool whose manifest is gone is forgotten by its own backend only.
    assert_eq!(server.queue.forget_pool_statuses("local", &[]).await.unwrap(), 0);
    assert_eq!(server.queue.forget_pool_statuses("fly", &[]).await.unwrap(), 1);
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn the_queue_history_keeps_sampled_depth_for_admin_keys_only(pool: sqlx::PgPool) {
    let settings = Settings {
        depth_history: Some(api::depth_history::HistorySettings {
            interval: Duration::from_millis(50),
            span: Duration::from_millis(500),
        }),
        ..test_settings()
    };
    let server = TestServer::start_with(pool, settings).await;
    let admin = server.key("ops", ApiKeyRole::Admin).await;
    let client_key = server.key("acme", ApiKeyRole::Client).await;
    test_support::enqueue_jobs(&server.queue, queue::JobType::Text, 3).await;

    // Samples come in, and the ring keeps only the span's worth (10).
    let mut body = Value::Null;
    wait_for("samples that count the three pending tasks", async || {
        body = server.get_json(&admin, "/v1/queue/history").await.1;
        body["samples"].as_array().is_some_and(|samples| {
            samples.len() == 10
                && samples.last().unwrap()["task_types"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|t| t["task_type"] == "text_generation" && t["pending"] == 3)
        })
    })
    .await;
    assert_eq!(body["interval_seconds"], 0.05);
    let times: Vec<&str> = body["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["at"].as_str().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] < w[1]), "oldest first: {times:?}");

    let (status, body) = server.get_json(&client_key, "/v1/queue/history").await;
    assert_eq!(status, 403, "{body}");
    server.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn without_sampling_the_queue_history_is_empty(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let admin = server.key("ops", ApiKeyRole::Admin).await;
    let (status, body) = server.get_json(&admin, "/v1/queue/history").await;
    assert_eq!(
        (status, body),
        (200, json!({"interval_seconds": 0.0, "samples": []}))
    );
    server.stop().await;
}

#[test]
fn every_setting_of_api_serve_is_in_the_readme_with_its_default() {
    let wrong = test_support::settings_the_readme_misstates(env!("CARGO_BIN_EXE_api"), &["serve"]);
    assert!(wrong.is_empty(), "README, Configuration: {wrong:#?}");
}
