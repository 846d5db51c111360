//! Keys, roles and tenant isolation.

mod common;

use std::process::Command;

use common::{assert_error, read, TestServer};
use queue::{ApiKeyRole, ArtifactKind, NewArtifact, TaskType};
use reqwest::header::WWW_AUTHENTICATE;
use serde_json::json;

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn v1_routes_need_a_valid_key(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let id = server.create_text_job(&key, "p").await;
    let before = server.row_counts().await;

    let attempts = [
        None,
        Some("Bearer".to_string()),
        Some("Basic dXNlcjpwYXNz".to_string()),
        Some("Bearer bk_not-a-real-key".to_string()),
        Some(format!("Bearer {key}x")),
    ];
    for authorization in attempts {
        for (method, path) in [
            ("GET", "/v1/jobs".to_string()),
            ("GET", format!("/v1/jobs/{id}")),
            ("POST", "/v1/jobs".to_string()),
            ("POST", "/v1/jobs:batch".to_string()),
            ("POST", format!("/v1/jobs/{id}/cancel")),
            ("GET", format!("/v1/jobs/{id}/events")),
            ("GET", "/v1/queue".to_string()),
        ] {
            let mut request = server
                .client
                .request(method.parse().unwrap(), server.url(&path))
                .json(&json!({"type": "text", "input": {"prompt": "p"}}));
            if let Some(value) = &authorization {
                request = request.header("Authorization", value);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.headers()[WWW_AUTHENTICATE], "Bearer", "{method} {path}");
            assert_error(&read(response).await, 401, "unauthorized", None);
        }
    }
    assert_eq!(server.row_counts().await, before);
    server.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn queue_depth_is_for_admin_keys_only(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let client = server.key("acme", ApiKeyRole::Client).await;
    let admin = server.key("ops", ApiKeyRole::Admin).await;
    server.create_text_job(&client, "p").await;

    assert_error(
        &server.get_json(&client, "/v1/queue").await,
        403,
        "forbidden",
        None,
    );
    let (status, depth) = server.get_json(&admin, "/v1/queue").await;
    assert_eq!(status, 200, "{depth}");
    let types = depth["task_types"].as_array().unwrap();
    assert_eq!(types.len(), TaskType::ALL.len());
    let text = types
        .iter()
        .find(|t| t["task_type"] == "text_generation")
        .unwrap();
    assert_eq!(text["pending"], 1);
    assert_eq!(text["in_flight"], 0);
    server.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn tenants_cannot_see_or_touch_each_others_jobs(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let acme = server.key("acme", ApiKeyRole::Client).await;
    let globex = server.key("globex", ApiKeyRole::Client).await;
    let acme_job = server.create_text_job(&acme, "acme's").await;
    let globex_job = server.create_text_job(&globex, "globex's").await;

    // An artifact on acme's job, so its download path exists.
    let task = server
        .queue
        .claim("w", &[TaskType::TextGeneration], 10)
        .await
        .unwrap();
    let task = task.iter().find(|t| t.job_id.to_string() == acme_job).unwrap();
    std::fs::write(server.artifacts.path().join("a.txt"), "secret").unwrap();
    let artifact = server
        .queue
        .record_artifact(
            "w",
            task.lease(),
            &NewArtifact {
                job_id: task.job_id,
                kind: ArtifactKind::Text,
                content_type: "text/plain".into(),
                storage_key: "a.txt".into(),
                bytes: 6,
                sha256: "0".repeat(64),
                metadata: json!({}),
            },
        )
        .await
        .unwrap();
    // Only a completed task's artifact is served.
    server.queue.complete("w", task.lease(), json!({})).await.unwrap();
    let before = server.row_counts().await;

    for (key, own, theirs) in [(&acme, &acme_job, &globex_job), (&globex, &globex_job, &acme_job)] {
        let missing = uuid::Uuid::now_v7();
        let (_, page) = server.get_json(key, "/v1/jobs").await;
        let listed: Vec<_> = page["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].clone())
            .collect();
        assert_eq!(listed, [json!(own)], "a tenant lists only its own jobs");
        assert_eq!(server.get_json(key, &format!("/v1/jobs/{own}")).await.0, 200);

        for job in [theirs.to_string(), missing.to_string()] {
            let not_found = server.get_json(key, &format!("/v1/jobs/{job}")).await;
            assert_error(&not_found, 404, "not_found", None);
            for action in ["cancel", "retry"] {
                let answer = server
                    .post_json(key, &format!("/v1/jobs/{job}/{action}"), &json!(null))
                    .await;
                assert_error(&answer, 404, "not_found", None);
            }
            let events = read(
                server
                    .get(key, &format!("/v1/jobs/{job}/events"))
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
            assert_error(&events, 404, "not_found", None);
        }
        // Another tenant's id reads exactly like a missing one.
        let theirs_body = server.get_json(key, &format!("/v1/jobs/{theirs}")).await.1;
        let missing_body = server.get_json(key, &format!("/v1/jobs/{missing}")).await.1;
        assert_eq!(
            theirs_body["error"]["message"]
                .as_str()
                .unwrap()
                .replace(theirs.as_str(), "ID"),
            missing_body["error"]["message"]
                .as_str()
                .unwrap()
                .replace(&missing.to_string(), "ID"),
        );
    }
    let download = format!("/v1/jobs/{acme_job}/artifacts/{}", artifact.id);
    assert_eq!(
        server
            .get(&acme, &download)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "secret"
    );
    assert_error(
        &read(server.get(&globex, &download).send().await.unwrap()).await,
        404,
        "not_found",
        None,
    );
    assert_eq!(
        server.row_counts().await,
        before,
        "nothing was cancelled or retried"
    );
    server.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn the_cli_creates_keys_that_work_and_revokes_them(pool: sqlx::PgPool) {
    let server = TestServer::start(pool.clone()).await;
    let database_url = test_support::database_url(&pool);
    let api = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_api"))
            .args(args)
            .env("DATABASE_URL", &database_url)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "api {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output
    };

    let created = api(&["keys", "create", "--tenant", "initech"]);
    let secret = String::from_utf8(created.stdout).unwrap().trim().to_string();
    assert!(secret.starts_with("bk_"), "{secret}");
    let note = String::from_utf8(created.stderr).unwrap();
    assert!(!note.contains(&secret), "the key is printed once, on stdout only");
    assert_eq!(server.get_json(&secret, "/v1/jobs").await.0, 200);
    assert_error(
        &server.get_json(&secret, "/v1/queue").await,
        403,
        "forbidden",
        None,
    );

    let listed = String::from_utf8(api(&["keys", "list"]).stdout).unwrap();
    let record: serde_json::Value = serde_json::from_str(listed.lines().next().unwrap()).unwrap();
    assert_eq!(record["tenant"], "initech");
    assert!(!listed.contains(&secret));
    let prefix = record["prefix"].as_str().unwrap();
    assert!(secret.starts_with(prefix));

    api(&["keys", "revoke", prefix]);
    let revoked = server.get(&secret, "/v1/jobs").send().await.unwrap();
    assert_eq!(revoked.status(), 401);

    let admin = String::from_utf8(api(&["keys", "create", "--tenant", "ops", "--admin"]).stdout).unwrap();
    assert_eq!(server.get_json(admin.trim(), "/v1/queue").await.0, 200);
    server.stop().await;
}

/// The budget holds for lookups in flight together: each reserves its
/// unit before it queries. Charged after the query, every request that
/// arrived while one unit was left looked up.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn concurrent_unknown_keys_stay_within_the_lookup_budget(pool: sqlx::PgPool) {
    use api::auth::{AuthSettings, Authenticator};
    use api::error::ApiError;
    let queue = queue::Queue::new(pool.clone());
    let auth = Authenticator::new(
        queue,
        AuthSettings {
            ttl: std::time::Duration::ZERO,
            failure_ttl: std::time::Duration::from_secs(60),
            failed_lookups_per_second: 3,
        },
    );
    // Every key lookup waits on this lock, so all the requests are in
    // flight before the first lookup answers.
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let tokens: Vec<String> = (0..50)
        .map(|_| api::auth::generate_key("nobody", ApiKeyRole::Client).secret)
        .collect();
    let requests = futures::future::join_all(tokens.iter().map(|t| {
        let auth = &auth;
        async move { auth.authenticate(&bearer(t)).await }
    }));
    let release = async {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        holder.commit().await.unwrap();
    };
    let (answers, ()) = tokio::join!(requests, release);
    let unauthorized = answers
        .iter()
        .filter(|a| matches!(a, Err(ApiError::Unauthorized)))
        .count();
    let limited = answers
        .iter()
        .filter(|a| matches!(a, Err(ApiError::TooManyRequests { .. })))
        .count();
    assert_eq!((unauthorized, limited), (3, 47), "{answers:?}");
    // Three key lookups and one read of the active prefixes.
    assert!(auth.lookups() <= 4, "{} lookups", auth.lookups());

    // A real key's first requests, many at once with the budget spent,
    // are all admitted: they wait for the prefixes' read, not refused.
    let real = api::auth::generate_key("acme", ApiKeyRole::Client);
    queue::Queue::new(pool)
        .create_api_key(&real.record)
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(11)).await;
    let headers = bearer(&real.secret);
    let answers = futures::future::join_all((0..40).map(|_| auth.authenticate(&headers))).await;
    assert!(
        answers
            .iter()
            .all(|a| a.as_ref().is_ok_and(|p| p.tenant == "acme")),
        "{answers:?}"
    );
}

fn bearer(token: &str) -> reqwest::header::HeaderMap {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
    headers
}

/// A flood of bad tokens does not become a flood of queries: tokens not
/// shaped like keys are never looked up, an unknown key is looked up once,
/// and past the per-second budget of failed lookups unknown keys answer 429
/// without a lookup. Nor does it lock real clients out: a key that exists
/// is still admitted while the flood goes on.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn bad_tokens_cost_few_database_lookups(pool: sqlx::PgPool) {
    use api::auth::{AuthSettings, Authenticator};
    use api::error::ApiError;
    let queue = queue::Queue::new(pool);
    let auth = Authenticator::new(
        queue.clone(),
        AuthSettings {
            ttl: std::time::Duration::ZERO,
            failure_ttl: std::time::Duration::from_secs(60),
            failed_lookups_per_second: 3,
        },
    );
    let unknown = || api::auth::generate_key("nobody", ApiKeyRole::Client).secret;
    let real = api::auth::generate_key("acme", ApiKeyRole::Client);
    queue.create_api_key(&real.record).await.unwrap();

    for token in ["nope", "bk_short", &"x".repeat(46)] {
        for _ in 0..50 {
            assert!(matches!(
                auth.authenticate(&bearer(token)).await,
                Err(ApiError::Unauthorized)
            ));
        }
    }
    assert_eq!(auth.lookups(), 0, "malformed tokens were looked up");

    let same = unknown();
    for _ in 0..50 {
        assert!(matches!(
            auth.authenticate(&bearer(&same)).await,
            Err(ApiError::Unauthorized)
        ));
    }
    assert_eq!(auth.lookups(), 1, "a known-bad token was looked up again");

    // Two more failures use up the budget of 3; the next unknown key is
    // refused without a lookup.
    for _ in 0..2 {
        assert!(matches!(
            auth.authenticate(&bearer(&unknown())).await,
            Err(ApiError::Unauthorized)
        ));
    }
    for _ in 0..20 {
        assert!(matches!(
            auth.authenticate(&bearer(&unknown())).await,
            Err(ApiError::TooManyRequests {
                limit: "AUTH_FAILED_LOOKUPS_PER_SECOND",
                ..
            })
        ));
    }
    // One read of the active keys' prefixes, however many tokens follow.
    assert_eq!(auth.lookups(), 4);

    // The real key, never seen by this process, is admitted at once, with
    // one lookup, while the budget is still used up.
    let principal = auth.authenticate(&bearer(&real.secret)).await.unwrap();
    assert_eq!(principal.tenant, "acme");
    assert_eq!(auth.lookups(), 5);

    // A key created during the flood works once the budget refills or the
    // prefixes are read again, whichever comes first.
    let new = api::auth::generate_key("acme", ApiKeyRole::Client);
    queue.create_api_key(&new.record).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        match auth.authenticate(&bearer(&new.secret)).await {
            Ok(principal) => {
                assert_eq!(principal.tenant, "acme");
                break;
            }
            Err(ApiError::TooManyRequests { .. }) => {}
            Err(other) => panic!("{other:?}"),
        }
        assert!(std::time::Instant::now() < deadline, "the budget never refilled");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
