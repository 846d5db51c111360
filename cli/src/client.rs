//! The HTTP API, over reqwest: every call the CLI makes, typed.

use std::time::Duration;

use futures::{Stream, StreamExt};
use queue::{JobStatus, JobType};
use reqwest::header::{AUTHORIZATION, RANGE};
use reqwest::{RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use uuid::Uuid;

use crate::config::ApiKey;
use crate::error::{CliError, Result};
use crate::views::{ErrorBody, Job, JobDetail, JobList, JobStatusUpdate, Pools, QueueDepth};

/// A job to create, as `POST /v1/jobs` takes it.
#[derive(Debug, Clone, Serialize)]
pub struct CreateJob {
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// A `queue::input::JobInput`, serialised.
    pub input: serde_json::Value,
    pub priority: i32,
}

#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub status: Option<JobStatus>,
    pub job_type: Option<JobType>,
    pub created_after: Option<chrono::DateTime<chrono::Utc>>,
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

#[derive(Clone)]
pub struct Client {
    base: String,
    key: ApiKey,
    http: reqwest::Client,
}

impl Client {
    pub fn new(base: String, key: ApiKey) -> Result<Client> {
        // rustls needs one process-wide provider; ring, as everywhere in backlog.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // A server that takes the connection and never answers (a hung
            // proxy) is an outage like any other, not a wait without end:
            // `--wait` rides it out up to its limit and then gives up. Event
            // streams send a keep-alive every 15 s, well inside it.
            .read_timeout(read_timeout()?)
            .user_agent(concat!("backlog-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| CliError::Unreachable {
                url: base.clone(),
                source,
            })?;
        Ok(Client { base, key, http })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .header(AUTHORIZATION, format!("Bearer {}", self.key.expose()))
    }

    /// Send, and turn an error status into the API's error.
    async fn send(&self, request: RequestBuilder) -> Result<Response> {
        let response = request.send().await.map_err(|source| CliError::Unreachable {
            url: self.base.clone(),
            source,
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let url = response.url().to_string();
        let text = response.text().await.unwrap_or_default();
        Err(match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) => CliError::Api {
                status,
                code: body.error.code,
                message: body.error.message,
                field: body.error.field,
            },
            // The API refuses a request with its error JSON, always; a page
            // with a 4xx is another server's (a web app's 404), and its
            // status must not read as "no such job" (exit 4). A gateway's
            // 5xx or 429 page may stand in front of the API: those stay
            // server errors.
            Err(_) if status.is_client_error() && status != StatusCode::TOO_MANY_REQUESTS => {
                CliError::NotTheApi {
                    url,
                    message: format!("HTTP {status}; the body began: {}", body_start(&text)),
                }
            }
            Err(_) => CliError::Api {
                status,
                code: "unexpected".into(),
                message: text.chars().take(200).collect(),
                field: None,
            },
        })
    }

    async fn json<T: DeserializeOwned>(&self, request: RequestBuilder) -> Result<T> {
        decode(self.send(request).await?).await
    }

    /// Create a job; `true` when new, `false` when an earlier request with
    /// this idempotency key made it.
    pub async fn create_job(&self, job: &CreateJob, idempotency_key: Option<&str>) -> Result<(Job, bool)> {
        let mut request = self.request(reqwest::Method::POST, "/v1/jobs").json(job);
        if let Some(key) = idempotency_key {
            request = request.header("idempotency-key", key);
        }
        let response = self.send(request).await?;
        let created = response.status() == StatusCode::CREATED;
        Ok((decode(response).await?, created))
    }

    pub async fn job(&self, id: Uuid) -> Result<JobDetail> {
        self.json(self.request(reqwest::Method::GET, &format!("/v1/jobs/{id}")))
            .await
    }

    pub async fn list_jobs(&self, filter: &ListFilter) -> Result<JobList> {
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(status) = filter.status {
            query.push(("status", status.to_string()));
        }
        if let Some(job_type) = filter.job_type {
            query.push(("type", job_type.to_string()));
        }
        if let Some(at) = filter.created_after {
            query.push((
                "created_after",
                at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            ));
        }
        if let Some(limit) = filter.limit {
            query.push(("limit", limit.to_string()));
        }
        if let Some(cursor) = &filter.cursor {
            query.push(("cursor", cursor.clone()));
        }
        let mut url = reqwest::Url::parse(&format!("{}/v1/jobs", self.base))
            .map_err(|e| CliError::Config(format!("BACKLOG_URL {:?} is not a URL: {e}", self.base)))?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(&query);
        }
        let request = self
            .http
            .get(url)
            .header(AUTHORIZATION, format!("Bearer {}", self.key.expose()));
        self.json(request).await
    }

    pub async fn cancel_job(&self, id: Uuid) -> Result<Job> {
        self.json(self.request(reqwest::Method::POST, &format!("/v1/jobs/{id}/cancel")))
            .await
    }

    pub async fn retry_job(&self, id: Uuid) -> Result<Job> {
        self.json(self.request(reqwest::Method::POST, &format!("/v1/jobs/{id}/retry")))
            .await
    }

    pub async fn queue_depth(&self) -> Result<QueueDepth> {
        self.json(self.request(reqwest::Method::GET, "/v1/queue")).await
    }

    pub async fn pools(&self) -> Result<Pools> {
        self.json(self.request(reqwest::Method::GET, "/v1/pools")).await
    }

    /// The bytes at `path` (an artifact's `download_path`), from `offset`
    /// on when it is not 0. The response is 206 when the range was served,
    /// 200 when the whole body was.
    pub async fn download(&self, path: &str, offset: u64) -> Result<Response> {
        let mut request = self.request(reqwest::Method::GET, path);
        if offset > 0 {
            request = request.header(RANGE, format!("bytes={offset}-"));
        }
        self.send(request).await
    }

    /// The job's status events until the server ends the stream.
    pub async fn job_events(&self, id: Uuid) -> Result<impl Stream<Item = Result<JobStatusUpdate>> + use<>> {
        let response = self
            .send(self.request(reqwest::Method::GET, &format!("/v1/jobs/{id}/events")))
            .await?;
        let base = self.base.clone();
        let events = sse_data(response.bytes_stream().boxed()).map(move |data| match data {
            Ok(data) => serde_json::from_str(&data).map_err(|e| CliError::Api {
                status: StatusCode::OK,
                code: "bad_event".into(),
                message: format!("an event that is not a job status ({e}): {data}"),
                field: None,
            }),
            Err(source) => Err(CliError::Unreachable {
                url: base.clone(),
                source,
            }),
        });
        Ok(events)
    }
}

/// The `data` of each Server-Sent Event of a byte stream; comments
/// (keep-alives) and events without data are skipped.
pub fn sse_data<S, B>(bytes: S) -> impl Stream<Item = reqwest::Result<String>>
where
    S: Stream<Item = reqwest::Result<B>> + Unpin,
    B: AsRef<[u8]>,
{
    // Bytes, not text, until an event is whole: a chunk may end inside a
    // UTF-8 character.
    futures::stream::unfold((bytes, Vec::<u8>::new()), |(mut bytes, mut buffer)| async move {
        loop {
            if let Some(end) = event_end(&buffer) {
                let block: Vec<u8> = buffer.drain(..end).collect();
                let block = String::from_utf8_lossy(&block);
                let data: Vec<&str> = block
                    .lines()
                    .filter_map(|line| line.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if data.is_empty() {
                    continue;
                }
                return Some((Ok(data.join("\n")), (bytes, buffer)));
            }
            match bytes.next().await? {
                Ok(chunk) => buffer.extend_from_slice(chunk.as_ref()),
                Err(e) => return Some((Err(e), (bytes, buffer))),
            }
        }
    })
}

/// Where the first event of `buffer` ends (after its blank line), if whole.
fn event_end(buffer: &[u8]) -> Option<usize> {
    (0..buffer.len()).find_map(|i| {
        let rest = &buffer[i..];
        if rest.starts_with(b"\n\n") {
            Some(i + 2)
        } else if rest.starts_with(b"\r\n\r\n") {
            Some(i + 4)
        } else {
            None
        }
    })
}

/// How long the API may send nothing before a request fails:
/// `BACKLOG_READ_TIMEOUT_SECONDS`, 60 by default.
fn read_timeout() -> Result<Duration> {
    const NAME: &str = "BACKLOG_READ_TIMEOUT_SECONDS";
    match std::env::var(NAME) {
        Err(_) => Ok(Duration::from_secs(60)),
        Ok(value) => value
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|seconds| *seconds > 0)
            .map(Duration::from_secs)
            .ok_or_else(|| {
                CliError::Config(format!(
                    "{NAME} must be a whole number of seconds above 0, got {value:?}"
                ))
            }),
    }
}

/// The body of a successful answer, read as the JSON the API documents. A
/// body cut off is the network's fault; one that is whole but not that
/// JSON means something else answered (an HTML page: `BACKLOG_URL` names
/// a web app, not the API), and the error says so with its start.
async fn decode<T: DeserializeOwned>(response: Response) -> Result<T> {
    let url = response.url().to_string();
    let body = response.bytes().await.map_err(|source| CliError::Unreachable {
        url: url.clone(),
        source,
    })?;
    serde_json::from_slice(&body).map_err(|e| CliError::NotTheApi {
        url,
        message: format!(
            "{e}; the body began: {}",
            body_start(&String::from_utf8_lossy(&body))
        ),
    })
}

fn body_start(text: &str) -> String {
    text.trim().chars().take(120).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_split_anywhere_are_read_whole() {
        let text =
            ": keep-alive\n\nevent: status\ndata: {\"a\":\"\u{e9}\"}\n\nevent: status\r\ndata: 2\r\n\r\n";
        let bytes = text.as_bytes();
        // One byte per chunk: every split, including inside `é`.
        let chunks: Vec<reqwest::Result<Vec<u8>>> = bytes.iter().map(|b| Ok(vec![*b])).collect();
        let events: Vec<String> = sse_data(futures::stream::iter(chunks))
            .map(|e| e.unwrap())
            .collect()
            .await;
        assert_eq!(events, ["{\"a\":\"\u{e9}\"}", "2"]);
    }
}
