//! What the provider clients share: one TLS setup, a secret that never prints,
//! and sending a request with bounded, jittered retries.

use std::fmt;
use std::time::{Duration, SystemTime};

use rand::Rng;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{RequestBuilder, Response, StatusCode};
use tokio::time::Instant;

use crate::{runtime, Error, Result};

/// reqwest and object_store are built without a crypto provider of their
/// own so the binary carries one TLS stack (the one sqlx already uses, ring)
/// instead of also compiling aws-lc; the store crate selects it.
pub(crate) use store::install_tls_provider;

/// An HTTP client with TLS ready and the given whole-request timeout.
pub(crate) fn client(timeout: Duration) -> Result<reqwest::Client> {
    install_tls_provider();
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(10).min(timeout))
        .user_agent(concat!("backlog-workers/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| Error::Config(format!("cannot build an HTTP client: {e}")))
}

/// A credential. Its `Debug` prints a placeholder so a config struct can be
/// logged without leaking it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// How a client retries a request that failed in a way that may pass: HTTP
/// 408/429/5xx and connection errors. Waits grow exponentially with full
/// jitter (so many workers do not retry in step), and the wait the server
/// asks for (see [`asked_wait`]) replaces the computed one.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// A server asking for a longer pause than this is not waited for here:
    /// the error goes back to the queue with the pause asked for, and the
    /// queue schedules the retry no earlier, instead of a worker slot
    /// waiting idle.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(20),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// The pause before attempt `failed_attempts + 1`: uniform in
    /// `[0, min(max, initial * 2^(failed_attempts - 1))]`.
    pub(crate) fn backoff(&self, failed_attempts: u32) -> Duration {
        let exponent = failed_attempts.saturating_sub(1).min(20);
        let ceiling = self
            .initial_backoff
            .saturating_mul(1 << exponent)
            .min(self.max_backoff);
        ceiling.mul_f64(rand::rng().random_range(0.0..=1.0))
    }
}

/// Why one attempt failed, and whether to try again.
enum AttemptError {
    Retryable {
        message: String,
        retry_after: Option<Duration>,
    },
    Permanent(String),
}

/// How long before the task's deadline (see [`runtime::task_deadline`])
/// retries stop: the task then fails with the provider's last error, not
/// with the runtime's bare "timed out" a moment later.
pub(crate) const DEADLINE_MARGIN: Duration = Duration::from_secs(2);

/// Sends the request `build` makes until it answers with a success status.
/// Returns a permanent error at once for other 4xx, and a retryable one once
/// `policy.max_attempts` are used up, or once the running task's time
/// (less [`DEADLINE_MARGIN`]) would run out before the next attempt: an
/// attempt is cut off then, and a pause that would outlast it is not taken.
pub(crate) async fn send_with_retries(
    service: &'static str,
    policy: &RetryPolicy,
    build: impl Fn() -> RequestBuilder,
) -> Result<Response> {
    let time_left = || {
        runtime::task_deadline().map(|deadline| {
            deadline
                .checked_sub(DEADLINE_MARGIN)
                .map_or(Duration::ZERO, |end| {
                    end.saturating_duration_since(Instant::now())
                })
        })
    };
    let mut attempt = 0;
    // The last refusal and the wait it asked for: an attempt cut off at the
    // deadline says why the ones before failed, and the retry keeps the wait.
    let mut refused: Option<(String, Option<Duration>)> = None;
    loop {
        attempt += 1;
        let sent = match time_left() {
            None => build().send().await,
            Some(left) => match tokio::time::timeout(left, build().send()).await {
                Ok(sent) => sent,
                Err(_) => {
                    let cut = format!(
                        "no answer before the task's time ran out ({attempt} attempts, the last cut off after {:.1}s)",
                        left.as_secs_f64()
                    );
                    let (message, retry_after) = match refused {
                        Some((before, asked)) => (format!("{before}; then {cut}"), asked),
                        None => (cut, None),
                    };
                    return Err(Error::remote(service, message, true).retry_after(retry_after));
                }
            },
        };
        let (message, retry_after) = match classify(sent).await {
            Ok(response) => return Ok(response),
            Err(AttemptError::Permanent(message)) => return Err(Error::remote(service, message, false)),
            Err(AttemptError::Retryable { message, retry_after }) => (message, retry_after),
        };
        if attempt >= policy.max_attempts {
            let message = format!("{message} (gave up after {attempt} attempts)");
            return Err(Error::remote(service, message, true).retry_after(retry_after));
        }
        let pause = match retry_after {
            Some(asked) if asked > policy.max_retry_after => {
                let message = format!("{message}; server asked to retry after {}s", asked.as_secs());
                return Err(Error::remote(service, message, true).retry_after(Some(asked)));
            }
            Some(asked) => asked,
            None => policy.backoff(attempt),
        };
        if time_left().is_some_and(|left| pause >= left) {
            // The queue schedules the retry, no earlier than the server asked.
            let message = format!(
                "{message} (gave up after {attempt} attempts: the task's time runs out before the next)"
            );
            return Err(Error::remote(service, message, true).retry_after(retry_after));
        }
        tracing::warn!(service, attempt, pause_ms = pause.as_millis() as u64, error = %message, "retrying");
        refused = Some((message, retry_after));
        tokio::time::sleep(pause).await;
    }
}

async fn classify(outcome: reqwest::Result<Response>) -> Result<Response, AttemptError> {
    let response = match outcome {
        Ok(response) => response,
        // A request that could not even be built will not build next time.
        Err(e) if e.is_builder() => return Err(AttemptError::Permanent(e.to_string())),
        Err(e) => {
            return Err(AttemptError::Retryable {
                message: describe_transport_error(e),
                retry_after: None,
            })
        }
    };
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let retry_after = asked_wait(response.headers(), SystemTime::now());
    let body = response.text().await.unwrap_or_default();
    let message = format!("HTTP {status}: {}", excerpt(&body));
    if is_retryable_status(status) && !is_out_of_quota(&body) {
        Err(AttemptError::Retryable { message, retry_after })
    } else {
        Err(AttemptError::Permanent(message))
    }
}

/// OpenAI answers 429 both to "too fast" and to "out of credit"
/// (`"code": "insufficient_quota"` in its error body). The second does not
/// pass with time: retrying spends every attempt of every task waiting for
/// a bill to be paid.
fn is_out_of_quota(body: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Body {
        error: Detail,
    }
    #[derive(serde::Deserialize)]
    struct Detail {
        code: Option<serde_json::Value>,
        #[serde(rename = "type")]
        kind: Option<String>,
    }
    serde_json::from_str::<Body>(body).is_ok_and(|b| {
        b.error.code.as_ref().and_then(|c| c.as_str()) == Some("insufficient_quota")
            || b.error.kind.as_deref() == Some("insufficient_quota")
    })
}

/// The wait a refusal asks for: `retry-after-ms` (milliseconds, sent by
/// OpenAI and Azure OpenAI) when present, else `Retry-After` in seconds or
/// as an HTTP-date (RFC 9110 §10.2.3), a date already past being no wait.
/// None when neither is there or readable. A wait past
/// [`queue::MAX_RETRY_AFTER`] is held to it (a header is the provider's
/// input: `retry-after-ms: 1e23` must not panic the worker).
pub(crate) fn asked_wait(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    asked_wait_unbounded(headers, now).map(|wait| wait.min(queue::MAX_RETRY_AFTER))
}

fn asked_wait_unbounded(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let header = |name| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(ms) = header("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        if ms >= 0.0 {
            // Past what a Duration holds (infinity included) is past the bound.
            return Some(Duration::try_from_secs_f64(ms / 1000.0).unwrap_or(Duration::MAX));
        }
    }
    let value = header(RETRY_AFTER.as_str())?;
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

fn is_retryable_status(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
}

fn describe_transport_error(e: reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    // The URL is left out: it can carry an endpoint id, and the status says enough.
    format!("{what}: {}", e.without_url())
}

/// The whole body of a successful response. A body cut off mid-way is a
/// network failure, so retryable; its message leaves the URL out (reqwest
/// appends it, query string and all: a pre-signed URL's signature would
/// reach the logs and the job's `last_error`).
pub(crate) async fn read_body(service: &'static str, what: &str, response: Response) -> Result<bytes::Bytes> {
    response
        .bytes()
        .await
        .map_err(|e| Error::remote(service, format!("reading {what}: {}", e.without_url()), true))
}

/// The start of an error body, enough to say what the server objected to.
/// The first 300 characters of `body`, trimmed, for an error message.
pub(crate) fn excerpt(body: &str) -> String {
    const LIMIT: usize = 300;
    let body = body.trim();
    match body.char_indices().nth(LIMIT) {
        Some((cut, _)) => format!("{}…", &body[..cut]),
        None => body.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_request_timeout_a_rate_limit_and_server_errors_are_retried_and_nothing_else() {
        for code in [408, 429, 500, 502, 503, 504] {
            assert!(is_retryable_status(StatusCode::from_u16(code).unwrap()), "{code}");
        }
        for code in [400, 401, 403, 404, 409, 413, 422] {
            assert!(
                !is_retryable_status(StatusCode::from_u16(code).unwrap()),
                "{code}"
            );
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let secret = Secret::new("sk-very-secret");
        assert!(!format!("{secret:?}").contains("sk-"));
        assert_eq!(secret.expose(), "sk-very-secret");
    }

    /// A server that counts requests and answers each with `answer`, or
    /// never answers when it is None. Each answer closes its connection, so
    /// every attempt is a request of its own.
    async fn counting_server(answer: Option<&'static str>) -> (String, Arc<AtomicUsize>) {
        scripted_server(vec![answer]).await
    }

    /// [`counting_server`], the n-th request answered with `answers[n]` (the
    /// last one for any after).
    async fn scripted_server(answers: Vec<Option<&'static str>>) -> (String, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1/chat/completions", listener.local_addr().unwrap());
        let requests = Arc::new(AtomicUsize::new(0));
        let counted = requests.clone();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                let counted = counted.clone();
                let answers = answers.clone();
                tokio::spawn(async move {
                    let mut request = [0u8; 4096];
                    let _ = socket.read(&mut request).await;
                    let n = counted.fetch_add(1, Ordering::SeqCst);
                    match answers[n.min(answers.len() - 1)] {
                        Some(answer) => socket.write_all(answer.as_bytes()).await.unwrap(),
                        None => std::future::pending().await,
                    }
                });
            }
        });
        (url, requests)
    }

    /// `send_with_retries` for a POST to `url`, as a handler whose task has
    /// `seconds` left would call it.
    async fn send_with_time_left(url: &str, seconds: u64, policy: &RetryPolicy) -> Result<Response> {
        let http = client(Duration::from_secs(60)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let send =
            runtime::TASK_DEADLINE.scope(deadline, send_with_retries("openai", policy, || http.post(url)));
        // Far past the deadline: a send that ignored it fails here, not by hanging.
        tokio::time::timeout(Duration::from_secs(30), send)
            .await
            .expect("the send ended by the task's deadline")
    }

    #[tokio::test]
    async fn a_pause_the_tasks_time_cannot_hold_is_not_taken() {
        let (url, requests) = counting_server(Some(
            "HTTP/1.1 429 Too Many Requests\r\nretry-after: 4\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        ))
        .await;
        let policy = RetryPolicy {
            max_attempts: 5,
            ..RetryPolicy::default()
        };
        // 5 s left, less the 2 s margin: the 4 s the server asks for do not fit.
        let error = send_with_time_left(&url, 5, &policy).await.unwrap_err();
        assert_eq!(requests.load(Ordering::SeqCst), 1, "one attempt, no pause");
        assert!(error.is_retryable(), "{error}");
        let message = error.to_string();
        assert!(
            message.contains("HTTP 429"),
            "the provider's error is kept: {message}"
        );
        assert!(message.contains("time runs out"), "{message}");
        // The queue is told to wait as the server asked.
        let failure = queue::Failure::from(error);
        assert_eq!(failure.retry_after, Some(Duration::from_secs(4)));
    }

    #[tokio::test]
    async fn an_account_out_of_quota_is_not_retried() {
        let (url, requests) = counting_server(Some(concat!(
            "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\ncontent-length: 130\r\n",
            "connection: close\r\n\r\n",
            r#"{"error":{"message":"You exceeded your current quota.","type":"insufficient_quota","#,
            r#""param":null,"code":"insufficient_quota"}}     "#
        )))
        .await;
        let error = send_with_time_left(&url, 60, &RetryPolicy::default())
            .await
            .unwrap_err();
        assert_eq!(requests.load(Ordering::SeqCst), 1, "one attempt");
        assert!(!error.is_retryable(), "{error}");
        assert!(
            error.to_string().contains("exceeded your current quota"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn an_attempt_cut_off_keeps_the_refusal_before_it() {
        let (url, requests) = scripted_server(vec![
            Some("HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-length: 8\r\nconnection: close\r\n\r\noverload"),
            None,
        ])
        .await;
        // 6 s left, less the margin: the 503, a 1 s pause, then an attempt
        // that never answers, cut off.
        let error = send_with_time_left(&url, 6, &RetryPolicy::default())
            .await
            .unwrap_err();
        assert_eq!(requests.load(Ordering::SeqCst), 2);
        let message = error.to_string();
        assert!(
            message.contains("HTTP 503") && message.contains("overload"),
            "{message}"
        );
        assert!(message.contains("cut off"), "{message}");
        assert_eq!(
            queue::Failure::from(error).retry_after,
            Some(Duration::from_secs(1))
        );
    }

    #[tokio::test]
    async fn an_attempt_is_cut_off_before_the_tasks_time_is_up() {
        let (url, requests) = counting_server(None).await;
        // 3 s left: the attempt gets 1 s, where the client would wait 60 s.
        let error = send_with_time_left(&url, 3, &RetryPolicy::default())
            .await
            .unwrap_err();
        assert_eq!(requests.load(Ordering::SeqCst), 1);
        assert!(error.is_retryable(), "{error}");
        assert!(
            error
                .to_string()
                .contains("no answer before the task's time ran out"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_body_cut_off_is_retryable_and_its_message_leaves_the_url_out() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request).await.unwrap();
            // 1,000 bytes promised, 10 sent, then the connection closes.
            socket
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789")
                .await
                .unwrap();
        });
        let response = client(Duration::from_secs(10))
            .unwrap()
            .get(format!("http://{address}/audio.wav?X-Amz-Signature=s3cr3t"))
            .send()
            .await
            .unwrap();
        let error = read_body("tts", "the audio", response).await.unwrap_err();
        assert!(error.is_retryable(), "{error}");
        let message = error.to_string();
        assert!(message.starts_with("tts: reading the audio"), "{message}");
        assert!(
            !message.contains("s3cr3t") && !message.contains("127.0.0.1"),
            "{message}"
        );
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| {
                (
                    reqwest::header::HeaderName::from_static(name),
                    value.parse().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn the_wait_asked_for_is_read_in_every_form_a_server_sends() {
        let now = httpdate::parse_http_date("Fri, 04 Dec 2026 16:00:00 GMT").unwrap();
        let asked = |pairs: &[(&'static str, &str)]| asked_wait(&headers(pairs), now);
        assert_eq!(asked(&[("retry-after", "120")]), Some(Duration::from_secs(120)));
        assert_eq!(
            asked(&[("retry-after", "Fri, 04 Dec 2026 16:02:00 GMT")]),
            Some(Duration::from_secs(120)),
            "an HTTP-date"
        );
        assert_eq!(
            asked(&[("retry-after", "Friday, 04-Dec-26 16:00:30 GMT")]),
            Some(Duration::from_secs(30)),
            "the obsolete RFC 850 form"
        );
        assert_eq!(
            asked(&[("retry-after", "Fri, 04 Dec 2026 15:59:00 GMT")]),
            Some(Duration::ZERO),
            "a date already past"
        );
        assert_eq!(
            asked(&[("retry-after-ms", "1500"), ("retry-after", "9")]),
            Some(Duration::from_millis(1500)),
            "milliseconds win over seconds"
        );
        let day = queue::MAX_RETRY_AFTER;
        for absurd in ["1e23", "inf", "1e400"] {
            assert_eq!(
                asked(&[("retry-after-ms", absurd)]),
                Some(day),
                "retry-after-ms: {absurd}"
            );
        }
        assert_eq!(asked(&[("retry-after", "99999999999999")]), Some(day));
        assert_eq!(asked(&[("retry-after", "soon")]), None);
        assert_eq!(asked(&[("retry-after-ms", "-5")]), None);
        assert_eq!(asked(&[]), None);
    }

    #[test]
    fn backoff_grows_and_stays_capped() {
        let policy = RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
            ..RetryPolicy::default()
        };
        for _ in 0..200 {
            assert!(policy.backoff(1) <= Duration::from_millis(100));
            assert!(policy.backoff(3) <= Duration::from_millis(400));
            assert!(policy.backoff(30) <= Duration::from_millis(1000));
        }
        // Full jitter: over many draws the third wait exceeds the first's ceiling.
        assert!((0..200).any(|_| policy.backoff(3) > Duration::from_millis(100)));
    }
}
