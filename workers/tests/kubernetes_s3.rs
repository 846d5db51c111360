//! The worker pods of `manifests/` as processes: each Deployment's
//! container environment resolved from the shipped ConfigMap (pointed at an
//! S3-compatible server as the README says: `s3-endpoint`, `s3-allow-http`),
//! the Secrets the README has you create and the downward API, then the
//! container's args run with it. A `reading` job completes and its
//! artifacts are in the bucket: the manifests' default store works across
//! pods. moto's S3 server stands in for the bucket. One test function,
//! because reading the bucket back sets the process environment.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use queue::{ArtifactKind, JobStatus, JobType, NewJob, Queue};
use serde_json::{json, Value};
use sqlx::PgPool;
use store::ArtifactStore;
use test_support::s3::MotoS3;

fn manifest(name: &str) -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../manifests")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    text.split("\n---")
        .filter_map(|doc| serde_yaml_ng::from_str::<Option<Value>>(doc).unwrap())
        .collect()
}

/// The environment the kubelet gives `deployment`'s container: `value`s,
/// and `valueFrom` resolved from the ConfigMap, the Secrets and the pod's
/// name; an optional reference that resolves to nothing is left out.
fn container_env(
    deployment: &str,
    config: &BTreeMap<String, String>,
    secrets: &BTreeMap<(&str, &str), String>,
    pod_name: &str,
) -> (Vec<String>, Vec<(String, String)>) {
    let deployments = manifest("workers.yaml");
    let object = deployments
        .iter()
        .find(|d| d["metadata"]["name"] == deployment)
        .unwrap_or_else(|| panic!("no Deployment {deployment} in workers.yaml"));
    let container = &object["spec"]["template"]["spec"]["containers"][0];
    // `args`: the image's entrypoint (tini) runs them.
    let command: Vec<String> = serde_json::from_value(container["args"].clone()).unwrap();
    let mut env = Vec::new();
    for var in container["env"].as_array().unwrap() {
        let name = var["name"].as_str().unwrap().to_string();
        let from = &var["valueFrom"];
        let value = if let Some(value) = var["value"].as_str() {
            Some(value.to_string())
        } else if from["configMapKeyRef"].is_object() {
            let r = &from["configMapKeyRef"];
            assert_eq!(r["name"], "backlog", "{name}");
            config.get(r["key"].as_str().unwrap()).cloned()
        } else if from["secretKeyRef"].is_object() {
            let r = &from["secretKeyRef"];
            secrets
                .get(&(r["name"].as_str().unwrap(), r["key"].as_str().unwrap()))
                .cloned()
        } else if from["fieldRef"]["fieldPath"] == "metadata.name" {
            Some(pod_name.to_string())
        } else {
            panic!("{deployment}: {name}: unsupported source {var}");
        };
        let optional = from["configMapKeyRef"]["optional"] == json!(true)
            || from["secretKeyRef"]["optional"] == json!(true);
        match value {
            Some(value) => env.push((name, value)),
            None => assert!(optional, "{deployment}: {name} resolves to nothing"),
        }
    }
    (command, env)
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_reading_job_ends_with_its_artifacts_in_the_bucket_of_the_shipped_manifests(pool: PgPool) {
    let q = Queue::new(pool.clone());
    let s3 = MotoS3::start().await;
    store::install_tls_provider();

    // config.yaml as shipped, pointed at the S3-compatible server.
    let configmap = manifest("config.yaml").remove(0);
    let mut config: BTreeMap<String, String> = serde_json::from_value(configmap["data"].clone()).unwrap();
    let store_url = config["artifact-store"].clone();
    assert!(
        store_url.starts_with("s3://"),
        "the default store is a bucket: {store_url}"
    );
    config.insert("s3-endpoint".into(), s3.endpoint.clone());
    config.insert("s3-allow-http".into(), "true".into());
    let bucket = store_url
        .trim_start_matches("s3://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    s3.create_bucket(&bucket).await;
    let secrets = BTreeMap::from([
        (("backlog-database", "url"), test_support::database_url(&pool)),
        (("backlog-s3", "access-key-id"), "backlog-test".to_string()),
        (
            ("backlog-s3", "secret-access-key"),
            "backlog-test-secret".to_string(),
        ),
    ]);

    let mut workers = Vec::new();
    for (deployment, pod) in [
        ("worker", "worker-7d9f-abcde"),
        ("audio-worker", "audio-worker-5c8b-fghij"),
    ] {
        let (command, env) = container_env(deployment, &config, &secrets, pod);
        let binary = test_support::workspace_binary("workers", &command[0]);
        let mut process = tokio::process::Command::new(binary);
        // Only what the pod spec gives, plus what the runtime does.
        process
            .args(&command[1..])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap())
            .env("HOME", std::env::temp_dir());
        for (name, value) in env {
            // Two "pods" on one host: each its own metrics port.
            let value = if name == "WORKER_METRICS_ADDR" {
                "127.0.0.1:0".to_string()
            } else {
                value
            };
            process.env(name, value);
        }
        workers.push(process.kill_on_drop(true).spawn().unwrap());
    }

    let job = q
        .enqueue(NewJob::new(
            "acme",
            JobType::Reading,
            json!({"prompt": "the life of tides", "title": "Tides"}),
        ))
        .await
        .unwrap()
        .job;
    let mut status = JobStatus::Queued;
    for _ in 0..1200 {
        status = q.job("acme", job.id).await.unwrap().status;
        if status.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(workers);
    assert_eq!(
        status,
        JobStatus::Complete,
        "tasks: {:?}",
        q.tasks_of(job.id).await.unwrap()
    );

    // Read them back as the API pods would: the same settings.
    for (name, value) in [
        ("AWS_ENDPOINT_URL", s3.endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_REGION", config["s3-region"].as_str()),
        ("AWS_ACCESS_KEY_ID", "backlog-test"),
        ("AWS_SECRET_ACCESS_KEY", "backlog-test-secret"),
    ] {
        std::env::set_var(name, value);
    }
    let store = ArtifactStore::from_url(&store_url).unwrap();
    let artifacts = q.artifacts_of(job.id).await.unwrap();
    let kinds: Vec<ArtifactKind> = artifacts.iter().map(|a| a.kind).collect();
    assert_eq!(
        kinds,
        [ArtifactKind::Audio, ArtifactKind::Pdf, ArtifactKind::Text]
    );
    for artifact in &artifacts {
        let bytes = store.get(&artifact.storage_key).await.unwrap();
        assert_eq!(
            bytes.len() as i64,
            artifact.bytes,
            "{:?} in the bucket",
            artifact.kind
        );
    }
    let text = store
        .get(
            &artifacts
                .iter()
                .find(|a| a.kind == ArtifactKind::Text)
                .unwrap()
                .storage_key,
        )
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&text).contains("Tides"));
}

/// The ConfigMap's LLM settings reach the text workers whole: switching
/// `llm-provider` to a hosted one with its model (and the `backlog-llm`
/// secret) configures the client, rather than leaving it without a model.
#[test]
fn a_hosted_llm_set_in_the_config_map_reaches_the_text_workers() {
    let configmap = manifest("config.yaml").remove(0);
    let mut config: BTreeMap<String, String> = serde_json::from_value(configmap["data"].clone()).unwrap();
    config.insert("llm-provider".into(), "openai".into());
    config.insert("llm-model".into(), "gpt-4o-mini".into());
    config.insert("llm-base-url".into(), "https://llm.internal.example/v1".into());
    let secrets = BTreeMap::from([
        (("backlog-database", "url"), "postgres://db/backlog".to_string()),
        (("backlog-llm", "api-key"), "sk-test".to_string()),
    ]);
    let (_, env) = container_env("worker", &config, &secrets, "worker-7d9f-abcde");
    let env: BTreeMap<String, String> = env.into_iter().collect();
    assert_eq!(env.get("LLM_MODEL").map(String::as_str), Some("gpt-4o-mini"));
    assert_eq!(
        env.get("LLM_BASE_URL").map(String::as_str),
        Some("https://llm.internal.example/v1")
    );
    let provider = workers::pipelines::text::LlmProvider::from_lookup(|name| env.get(name).cloned())
        .expect("the text worker starts with the shipped manifests' LLM settings");
    assert_eq!(provider.name(), "openai");
}
