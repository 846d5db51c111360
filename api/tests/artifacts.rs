//! Artifact downloads: content type, length, ranges.

mod common;

use common::{assert_error, read, TestServer};
use queue::{ApiKeyRole, Artifact, ArtifactKind, NewArtifact, TaskType};
use reqwest::header::{
    ACCEPT_RANGES, CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG,
    IF_NONE_MATCH, IF_RANGE, RANGE,
};
use reqwest::StatusCode;
use serde_json::json;

const SHA: &str = "3a6eb0790f39ac87c94f3856b2dd2c5d110e6811602261a9a923d3bb23adc8b7";

/// An audiobook job whose audio artifact (`bytes`) is in the file store.
async fn job_with_audio(server: &TestServer, key: &str, bytes: &[u8]) -> (String, Artifact) {
    let (_, job) = server
        .post_json(
            key,
            "/v1/jobs",
            &json!({"type": "audiobook", "input": {"text": "t"}}),
        )
        .await;
    let task = server
        .queue
        .claim("w", &[TaskType::AudioGeneration], 1)
        .await
        .unwrap()
        .remove(0);
    let storage_key = format!("jobs/{}/audio.mp3", task.job_id);
    let path = server.artifacts.path().join(&storage_key);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, bytes).unwrap();
    let artifact = server
        .queue
        .record_artifact(
            "w",
            task.lease(),
            &NewArtifact {
                job_id: task.job_id,
                kind: ArtifactKind::Audio,
                content_type: "audio/mpeg".into(),
                storage_key,
                bytes: bytes.len() as i64,
                sha256: SHA.into(),
                metadata: json!({"duration_seconds": 1.5}),
            },
        )
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    let (_, detail) = server.get_json(key, &format!("/v1/jobs/{id}")).await;
    assert_eq!(
        detail["artifacts"],
        json!([]),
        "not listed before its task completes"
    );
    server.queue.complete("w", task.lease(), json!({})).await.unwrap();
    (id, artifact)
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn artifacts_download_whole_or_by_range(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let content: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    let (job_id, artifact) = job_with_audio(&server, &key, &content).await;

    let (_, detail) = server.get_json(&key, &format!("/v1/jobs/{job_id}")).await;
    let listed = &detail["artifacts"][0];
    assert_eq!(listed["kind"], "audio");
    assert_eq!(listed["content_type"], "audio/mpeg");
    assert_eq!(listed["bytes"], 100_000);
    assert_eq!(listed["sha256"], SHA);
    let path = listed["download_path"].as_str().unwrap().to_string();
    assert_eq!(path, format!("/v1/jobs/{job_id}/artifacts/{}", artifact.id));

    let whole = server.get(&key, &path).send().await.unwrap();
    assert_eq!(whole.status(), StatusCode::OK);
    assert_eq!(whole.headers()[CONTENT_TYPE], "audio/mpeg");
    assert_eq!(whole.headers()[CONTENT_LENGTH], "100000");
    assert_eq!(whole.headers()[ACCEPT_RANGES], "bytes");
    assert_eq!(whole.headers()[ETAG], format!("\"{SHA}\""));
    // The browser that fetched it may keep it, revalidated; no shared cache.
    assert_eq!(whole.headers()[CACHE_CONTROL], "private, no-cache");
    assert_eq!(
        whole.headers()[CONTENT_DISPOSITION],
        format!("inline; filename=\"{job_id}-audio.mp3\""),
        "saved under a name that says what it is"
    );
    assert_eq!(whole.bytes().await.unwrap(), content);

    for (range, start, end) in [
        ("bytes=0-99", 0, 100),
        ("bytes=99000-", 99_000, 100_000),
        ("bytes=-10", 99_990, 100_000),
    ] {
        let part = server.get(&key, &path).header(RANGE, range).send().await.unwrap();
        assert_eq!(part.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            part.headers()[CONTENT_RANGE],
            format!("bytes {start}-{}/100000", end - 1)
        );
        assert_eq!(part.headers()[CONTENT_LENGTH], (end - start).to_string());
        assert_eq!(part.bytes().await.unwrap(), content[start..end], "{range}");
    }

    let past_end = server
        .get(&key, &path)
        .header(RANGE, "bytes=100000-")
        .send()
        .await
        .unwrap();
    assert_eq!(past_end.headers()[CONTENT_RANGE], "bytes */100000");
    assert_error(&read(past_end).await, 416, "range_not_satisfiable", None);

    // If-Range with a stale ETag: the whole (changed) object instead.
    let stale = server
        .get(&key, &path)
        .header(RANGE, "bytes=0-9")
        .header(IF_RANGE, "\"old\"")
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), StatusCode::OK);
    let fresh = server
        .get(&key, &path)
        .header(RANGE, "bytes=0-9")
        .header(IF_RANGE, format!("\"{SHA}\""))
        .send()
        .await
        .unwrap();
    assert_eq!(fresh.status(), StatusCode::PARTIAL_CONTENT);

    // A client that holds these bytes revalidates for nothing (RFC 9110
    // 13.1.2: weak comparison, a list, or `*`), before any Range.
    for held in [
        format!("\"{SHA}\""),
        format!("W/\"{SHA}\""),
        format!("\"old\", \"{SHA}\""),
        "*".to_string(),
    ] {
        let current = server
            .get(&key, &path)
            .header(IF_NONE_MATCH, &held)
            .header(RANGE, "bytes=0-9")
            .send()
            .await
            .unwrap();
        assert_eq!(current.status(), StatusCode::NOT_MODIFIED, "{held}");
        assert_eq!(current.headers()[ETAG], format!("\"{SHA}\""));
        assert_eq!(current.headers()[CACHE_CONTROL], "private, no-cache");
        assert!(current.bytes().await.unwrap().is_empty());
    }
    let changed = server
        .get(&key, &path)
        .header(IF_NONE_MATCH, "\"old\"")
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), StatusCode::OK);
    assert_eq!(changed.bytes().await.unwrap(), content);

    // Every other authenticated answer, a refusal included, is kept by no
    // cache: it holds the tenant's prompts and errors.
    for (path, key, what) in [
        (format!("/v1/jobs/{job_id}"), key.as_str(), "a job"),
        ("/v1/jobs".to_string(), key.as_str(), "the list"),
        ("/v1/jobs".to_string(), "bk_wrong", "a refusal"),
    ] {
        let answer = server.get(key, &path).send().await.unwrap();
        assert_eq!(answer.headers()[CACHE_CONTROL], "no-store", "{what}");
    }
    // So are the refusals of paths and methods no route serves, which a
    // fallback answers outside the routes' layers.
    let client = reqwest::Client::new();
    for (request, what) in [
        (client.get(server.url("/v1/nope")), "an unknown path"),
        (
            client.put(server.url("/v1/jobs")),
            "a method the path does not serve",
        ),
    ] {
        let answer = request.bearer_auth(&key).send().await.unwrap();
        assert!(answer.status().is_client_error(), "{what}: {}", answer.status());
        assert_eq!(answer.headers()[CACHE_CONTROL], "no-store", "{what}");
    }
    // The console and the public documents are not a tenant's.
    let console = client.get(server.url("/openapi.json")).send().await.unwrap();
    assert_ne!(
        console.headers().get(CACHE_CONTROL).map(|v| v.to_str().unwrap()),
        Some("no-store")
    );
    server.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn missing_artifacts_and_missing_bytes_are_404(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let (job_id, artifact) = job_with_audio(&server, &key, b"abc").await;
    let unknown = uuid::Uuid::now_v7();
    let answer = server
        .get_json(&key, &format!("/v1/jobs/{job_id}/artifacts/{unknown}"))
        .await;
    assert_error(&answer, 404, "not_found", None);

    std::fs::remove_file(server.artifacts.path().join(&artifact.storage_key)).unwrap();
    let answer = server
        .get_json(&key, &format!("/v1/jobs/{job_id}/artifacts/{}", artifact.id))
        .await;
    assert_error(&answer, 404, "not_found", None);
    server.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn an_empty_artifact_downloads_as_an_empty_body(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let (job_id, artifact) = job_with_audio(&server, &key, b"").await;
    let path = format!("/v1/jobs/{job_id}/artifacts/{}", artifact.id);

    let whole = server.get(&key, &path).send().await.unwrap();
    assert_eq!(whole.status(), StatusCode::OK);
    assert_eq!(whole.headers()[CONTENT_LENGTH], "0");
    assert!(whole.bytes().await.unwrap().is_empty());
    for range in ["bytes=0-", "bytes=0-0", "bytes=-1"] {
        let part = server.get(&key, &path).header(RANGE, range).send().await.unwrap();
        assert_eq!(part.headers()[CONTENT_RANGE], "bytes */0", "{range}");
        assert_error(&read(part).await, 416, "range_not_satisfiable", None);
    }
    server.stop().await;
}

/// An artifact recorded by a task that has not completed (still running,
/// or failed and retried) may be replaced: it is neither listed nor served.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn artifacts_of_unfinished_tasks_are_not_served(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let (_, job) = server
        .post_json(
            &key,
            "/v1/jobs",
            &json!({"type": "audiobook", "input": {"text": "t"}}),
        )
        .await;
    let task = server
        .queue
        .claim("w", &[TaskType::AudioGeneration], 1)
        .await
        .unwrap()
        .remove(0);
    let storage_key = format!("jobs/{}/audio.mp3", task.job_id);
    let file = server.artifacts.path().join(&storage_key);
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, b"partial").unwrap();
    let artifact = server
        .queue
        .record_artifact(
            "w",
            task.lease(),
            &NewArtifact {
                job_id: task.job_id,
                kind: ArtifactKind::Audio,
                content_type: "audio/mpeg".into(),
                storage_key,
                bytes: 7,
                sha256: SHA.into(),
                metadata: json!({}),
            },
        )
        .await
        .unwrap();
    let job_id = job["id"].as_str().unwrap();
    let path = format!("/v1/jobs/{job_id}/artifacts/{}", artifact.id);
    assert_error(&server.get_json(&key, &path).await, 404, "not_found", None);
    assert!(server.queue.artifacts_of(task.job_id).await.unwrap().is_empty());

    server.queue.complete("w", task.lease(), json!({})).await.unwrap();
    let done = server.get(&key, &path).send().await.unwrap();
    assert_eq!(done.status(), StatusCode::OK);
    assert_eq!(server.queue.artifacts_of(task.job_id).await.unwrap().len(), 1);
    server.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_jobs_artifacts_are_listed_for_its_tenant_only(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let (job_id, artifact) = job_with_audio(&server, &key, b"ID3 audio").await;

    let (status, listed) = server
        .get_json(&key, &format!("/v1/jobs/{job_id}/artifacts"))
        .await;
    assert_eq!(status, 200);
    let (_, detail) = server.get_json(&key, &format!("/v1/jobs/{job_id}")).await;
    assert_eq!(
        listed,
        json!({"artifacts": detail["artifacts"]}),
        "as the job's view lists them"
    );
    assert_eq!(listed["artifacts"][0]["id"], artifact.id.to_string());

    let other = server.key("globex", ApiKeyRole::Client).await;
    let theirs = server
        .get_json(&other, &format!("/v1/jobs/{job_id}/artifacts"))
        .await;
    assert_error(&theirs, 404, "not_found", None);
    let not_an_id = server.get_json(&key, "/v1/jobs/nope/artifacts").await;
    assert_error(&not_an_id, 400, "invalid_request", Some("id"));
}
