//! Speech from a RunPod serverless endpoint.
//!
//! The contract a handler deployed there must follow:
//!
//! - Input (`POST {base}/{endpoint_id}/run`, body `{"input": …}`):
//!   `text` (the chunk to speak), `voice` (the job's voice, when it names
//!   one) and `voice_sample_url` (`VOICE_SAMPLE_URL`, when set: a reference
//!   recording for voice-cloning models).
//! - Output, once `GET {base}/{endpoint_id}/status/{id}` reports
//!   `COMPLETED`: an object with either `audio_base64` (a WAV file, base64,
//!   optionally as a `data:` URL) or `audio_url` (an http(s) URL to a WAV
//!   file, fetched without the API key, e.g. a presigned bucket URL).
//!
//! `IN_QUEUE` and `IN_PROGRESS` are polled with growing pauses. `FAILED`
//! means the handler raised on this input and is permanent; `CANCELLED`,
//! `TIMED_OUT` and running past our own deadline are retryable.

use std::time::{Duration, Instant};

use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};

use super::pcm::Pcm;
use crate::http::{self, RetryPolicy, Secret};
use crate::{Error, Result};

const SERVICE: &str = "runpod";
pub const DEFAULT_BASE_URL: &str = "https://api.runpod.ai/v2";

#[derive(Debug, Clone)]
pub struct RunPodConfig {
    /// The API root the endpoint id is appended to (`RUNPOD_BASE_URL`).
    pub base_url: String,
    pub endpoint_id: String,
    pub api_key: Secret,
    pub voice_sample_url: Option<String>,
    /// Per HTTP request.
    pub request_timeout: Duration,
    /// From submission to `COMPLETED` (`RUNPOD_TIMEOUT_SECONDS`), cold starts included.
    pub job_timeout: Duration,
    pub first_poll: Duration,
    pub max_poll: Duration,
    pub retry: RetryPolicy,
}

impl RunPodConfig {
    pub fn new(endpoint_id: impl Into<String>, api_key: Secret) -> Self {
        RunPodConfig {
            base_url: DEFAULT_BASE_URL.into(),
            endpoint_id: endpoint_id.into(),
            api_key,
            voice_sample_url: None,
            request_timeout: Duration::from_secs(60),
            job_timeout: Duration::from_secs(600),
            first_poll: Duration::from_millis(500),
            max_poll: Duration::from_secs(5),
            retry: RetryPolicy::default(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RunPodClient {
    config: RunPodConfig,
    http: reqwest::Client,
}

/// Cancels the RunPod job if the wait for it is dropped while it runs: the
/// task's timeout, a lost lease or another chunk's failure ends the wait,
/// and a job left running holds a GPU and is billed. Cleared once the job
/// has ended (or was cancelled in place).
struct CancelOnDrop {
    client: RunPodClient,
    id: Option<String>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let Some(id) = self.id.take() else { return };
        // The wait's future is gone; the cancel is sent from a task of its own.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let client = self.client.clone();
            runtime.spawn(async move { client.cancel(&id).await });
        }
    }
}

#[derive(Debug, Deserialize)]
struct JobStatus {
    id: Option<String>,
    status: String,
    #[serde(default)]
    output: Option<Value>,
    #[serde(default)]
    error: Option<Value>,
}

impl RunPodClient {
    pub fn new(config: RunPodConfig) -> Result<Self> {
        let http = http::client(config.request_timeout)?;
        Ok(RunPodClient { config, http })
    }

    fn url(&self, tail: &str) -> String {
        format!(
            "{}/{}/{tail}",
            self.config.base_url.trim_end_matches('/'),
            self.config.endpoint_id
        )
    }

    /// Submits `text`, waits for the job to finish and returns its audio.
    pub async fn synthesize(&self, text: &str, voice: Option<&str>) -> Result<Pcm> {
        let mut input = json!({ "text": text });
        if let Some(voice) = voice {
            input["voice"] = json!(voice);
        }
        if let Some(sample) = &self.config.voice_sample_url {
            input["voice_sample_url"] = json!(sample);
        }
        let body = json!({ "input": input });
        let submitted: JobStatus = self.call(|| self.http.post(self.url("run")).json(&body)).await?;
        let id = submitted
            .id
            .clone()
            .ok_or_else(|| Error::malformed(SERVICE, "the run response has no job id"))?;
        let mut running = CancelOnDrop {
            client: self.clone(),
            id: Some(id.clone()),
        };
        let deadline = Instant::now() + self.config.job_timeout;
        let mut pause = self.config.first_poll;
        let mut status = submitted;
        loop {
            if !matches!(status.status.as_str(), "IN_QUEUE" | "IN_PROGRESS") {
                running.id = None;
            }
            match status.status.as_str() {
                "IN_QUEUE" | "IN_PROGRESS" => {}
                "COMPLETED" => return self.fetch_audio(status.output).await,
                "FAILED" => {
                    let reason = status
                        .error
                        .map_or_else(|| "no error given".into(), |e| describe(&e));
                    return Err(Error::remote(
                        SERVICE,
                        format!("job {id} failed: {reason}"),
                        false,
                    ));
                }
                "CANCELLED" | "TIMED_OUT" => {
                    let message = format!("job {id} ended {}", status.status);
                    return Err(Error::remote(SERVICE, message, true));
                }
                other => {
                    return Err(Error::malformed(
                        SERVICE,
                        format!("job {id} has unknown status {other:?}"),
                    ))
                }
            }
            if Instant::now() + pause > deadline {
                running.id = None;
                self.cancel(&id).await;
                let message = format!(
                    "job {id} not finished after {}s",
                    self.config.job_timeout.as_secs()
                );
                return Err(Error::remote(SERVICE, message, true));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(self.config.max_poll);
            let status_url = self.url(&format!("status/{id}"));
            status = self.call(|| self.http.get(&status_url)).await?;
        }
    }

    /// Sends an authenticated request (with retries) and parses its JSON.
    async fn call(&self, build: impl Fn() -> reqwest::RequestBuilder) -> Result<JobStatus> {
        let response = http::send_with_retries(SERVICE, &self.config.retry, || {
            build().bearer_auth(self.config.api_key.expose())
        })
        .await?;
        let raw = http::read_body(SERVICE, "the response", response).await?;
        serde_json::from_slice(&raw).map_err(|e| Error::malformed(SERVICE, e.to_string()))
    }

    /// Frees the GPU a job we stopped waiting for would hold. Best effort:
    /// the caller reports the timeout whatever this returns.
    async fn cancel(&self, id: &str) {
        let outcome = self
            .http
            .post(self.url(&format!("cancel/{id}")))
            .bearer_auth(self.config.api_key.expose())
            .send()
            .await;
        if let Err(e) = outcome {
            tracing::warn!(job = id, error = %e.without_url(), "could not cancel the RunPod job");
        }
    }

    async fn fetch_audio(&self, output: Option<Value>) -> Result<Pcm> {
        let output = output.unwrap_or(Value::Null);
        let wav = if let Some(encoded) = output.get("audio_base64").and_then(Value::as_str) {
            // Accept a bare payload or a `data:audio/wav;base64,` URL.
            let payload = encoded.rsplit_once("base64,").map_or(encoded, |(_, p)| p);
            base64::engine::general_purpose::STANDARD
                .decode(payload.trim())
                .map_err(|e| Error::malformed(SERVICE, format!("audio_base64: {e}")))?
        } else if let Some(url) = output.get("audio_url").and_then(Value::as_str) {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return Err(Error::malformed(SERVICE, "audio_url is not an http(s) URL"));
            }
            // No bearer token: the URL may point anywhere, the key is RunPod's.
            let response =
                http::send_with_retries(SERVICE, &self.config.retry, || self.http.get(url)).await?;
            http::read_body(SERVICE, "audio_url", response).await?.to_vec()
        } else {
            return Err(Error::malformed(
                SERVICE,
                "output has neither audio_base64 nor audio_url",
            ));
        };
        Pcm::from_wav(&wav).map_err(|e| Error::malformed(SERVICE, format!("audio: {e}")))
    }
}

/// An error value as one line: strings as they are, anything else as JSON.
fn describe(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
