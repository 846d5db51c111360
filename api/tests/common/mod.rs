//! The real server on a random port against the test's own database, and a
//! real HTTP client.

#![allow(dead_code)] // Each test binary uses a different part of this.

use std::time::Duration;

use api::auth::generate_key;
use api::state::Settings;
use futures::StreamExt;
use queue::{ApiKeyRole, Queue, QueueConfig};
use reqwest::header::AUTHORIZATION;
use reqwest::{Client, RequestBuilder, Response};
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct TestServer {
    pub base: String,
    /// Where `/metrics` is served (its own listener, as `METRICS_ADDR`).
    pub metrics_base: String,
    pub client: Client,
    pub queue: Queue,
    pub pool: PgPool,
    pub artifacts: tempfile::TempDir,
    shutdown: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
}

/// Small limits so that limit tests send small bodies; keys are checked on
/// every request so revocation shows at once; no sweeper and no depth
/// sampling unless asked.
pub fn test_settings() -> Settings {
    Settings {
        body_limit_bytes: 16 * 1024,
        auth_cache_ttl: Duration::ZERO,
        sweeper: None,
        depth_history: None,
        ..Settings::default()
    }
}

pub const MAX_INPUT_BYTES: usize = 4 * 1024;

impl TestServer {
    pub async fn start(pool: PgPool) -> Self {
        Self::start_with(pool, test_settings()).await
    }

    pub async fn start_with(pool: PgPool, settings: Settings) -> Self {
        let queue = Queue::new(pool.clone()).with_config(QueueConfig {
            max_input_bytes: MAX_INPUT_BYTES,
            max_batch_jobs: 10,
            ..QueueConfig::default()
        });
        let artifacts = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let metrics_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics_base = format!("http://{}", metrics_listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(api::server::run_with_metrics(
            listener,
            Some(metrics_listener),
            queue.clone(),
            store::ArtifactStore::local(artifacts.path()).unwrap(),
            settings,
            shutdown.clone(),
        ));
        TestServer {
            base,
            metrics_base,
            client: http_client(),
            queue,
            pool,
            artifacts,
            shutdown,
            handle,
        }
    }

    /// Shut down gracefully, as SIGTERM would, and check it ended cleanly.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.handle)
            .await
            .expect("server stops within 10 s")
            .unwrap()
            .unwrap();
    }

    pub async fn key(&self, tenant: &str, role: ApiKeyRole) -> String {
        let key = generate_key(tenant, role);
        self.queue.create_api_key(&key.record).await.unwrap();
        key.secret
    }

    /// The metrics exposition, as text.
    pub async fn scrape(&self) -> String {
        let response = self
            .client
            .get(format!("{}/metrics", self.metrics_base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.text().await.unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn get(&self, key: &str, path: &str) -> RequestBuilder {
        self.client
            .get(self.url(path))
            .header(AUTHORIZATION, format!("Bearer {key}"))
    }

    pub fn post(&self, key: &str, path: &str) -> RequestBuilder {
        self.client
            .post(self.url(path))
            .header(AUTHORIZATION, format!("Bearer {key}"))
    }

    /// POST a JSON body; returns status and parsed body.
    pub async fn post_json(&self, key: &str, path: &str, body: &Value) -> (u16, Value) {
        read(self.post(key, path).json(body).send().await.unwrap()).await
    }

    pub async fn get_json(&self, key: &str, path: &str) -> (u16, Value) {
        read(self.get(key, path).send().await.unwrap()).await
    }

    /// Create a `text` job and return its id.
    pub async fn create_text_job(&self, key: &str, prompt: &str) -> String {
        let (status, job) = self
            .post_json(
                key,
                "/v1/jobs",
                &json!({"type": "text", "input": {"prompt": prompt}}),
            )
            .await;
        assert_eq!(status, 201, "{job}");
        job["id"].as_str().unwrap().to_string()
    }

    /// Rows in every table a request could write to.
    pub async fn row_counts(&self) -> [i64; 4] {
        let mut counts = [0; 4];
        for (count, table) in counts
            .iter_mut()
            .zip(["all_jobs", "all_tasks", "artifacts", "api_keys"])
        {
            // Table names come from the fixed list above.
            *count = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
                .fetch_one(&self.pool)
                .await
                .unwrap();
        }
        counts
    }
}

pub async fn read(response: Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    };
    (status, body)
}

/// Assert an error response: status, code, and (when given) field.
#[track_caller]
pub fn assert_error(actual: &(u16, Value), status: u16, code: &str, field: Option<&str>) {
    let (actual_status, body) = actual;
    assert_eq!(*actual_status, status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    if let Some(field) = field {
        assert_eq!(body["error"]["field"], field, "{body}");
    }
}

/// Reads `text/event-stream` events (`event` name, parsed `data`).
pub struct EventReader {
    stream: futures::stream::BoxStream<'static, reqwest::Result<axum::body::Bytes>>,
    buffer: String,
}

impl EventReader {
    pub fn new(response: Response) -> Self {
        EventReader {
            stream: response.bytes_stream().boxed(),
            buffer: String::new(),
        }
    }

    /// The next event, or `None` when the stream ended. Comments
    /// (keep-alives) are skipped.
    pub async fn next(&mut self) -> Option<(String, Value)> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut name = String::from("message");
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if data.is_empty() {
                    continue;
                }
                return Some((name, serde_json::from_str(&data).unwrap()));
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.stream.next())
                .await
                .expect("an event within 10 s")?
                .unwrap();
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }
}

/// A plain-HTTP client. In a workspace build reqwest is compiled with rustls
/// but no crypto provider (the workers choose ring explicitly), and building
/// any client then needs a provider installed first.
pub fn http_client() -> Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::new()
}
