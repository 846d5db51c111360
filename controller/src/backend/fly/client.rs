//! A typed client for the Fly Machines API (`https://api.machines.dev/v1`).
//!
//! It keeps to Fly's documented limits on its own side — a token bucket per
//! action and machine (1 request/s, bursts of 3; reads 5/s, bursts of 10) and
//! a bound on requests in flight per app — and retries 429 and 5xx with
//! capped, jittered exponential backoff that honours `Retry-After`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use rand::Rng;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// The header that carries a lease's nonce on every call to a leased machine.
pub const LEASE_NONCE_HEADER: &str = "fly-machine-lease-nonce";
/// The header that carries the cursor of the next page of a list.
pub const NEXT_CURSOR_HEADER: &str = "fly-next-cursor";
/// Page size for listing; the API accepts 1..=1000.
const PAGE_SIZE: u32 = 200;

#[derive(Debug, thiserror::Error)]
pub enum FlyError {
    /// 401 or 403: the token is wrong or lacks access. Never retried.
    #[error("Fly API {status}: the token was rejected: {message}")]
    Unauthorized { status: u16, message: String },
    /// 409 on a lease: someone else (a `fly deploy`, another controller) holds it.
    #[error("machine {machine}: lease held by someone else: {message}")]
    LeaseHeld { machine: String, message: String },
    /// 408 from `/wait`: the machine did not reach the state in time.
    #[error("machine {machine}: did not reach {state} within the wait")]
    WaitTimedOut { machine: String, state: String },
    /// Any other error answer, with Fly's error body.
    #[error("Fly API {status} on {action}: {message}{}", code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Api {
        action: &'static str,
        status: u16,
        message: String,
        /// The body's `status` field: `insufficient_capacity`, `name_taken`, ...
        code: Option<String>,
    },
    #[error("Fly API unreachable on {action}: {source}")]
    Transport {
        action: &'static str,
        #[source]
        source: reqwest::Error,
    },
    #[error("Fly API answered {action} with a body that is not what the API documents: {message}")]
    Decode { action: &'static str, message: String },
    #[error("invalid Fly API setting: {0}")]
    Config(String),
}

impl FlyError {
    /// No room for the machine where it was asked for. Fly says so with
    /// the body's `insufficient_capacity` status or an "insufficient
    /// memory/resources" message, under 422, 409, 412 or 503 depending on
    /// the action and the host: the body decides, not the code.
    pub fn is_insufficient_capacity(&self) -> bool {
        match self {
            FlyError::Api { code: Some(c), .. } if c == "insufficient_capacity" => true,
            FlyError::Api { status, message, .. } => {
                matches!(status, 409 | 412 | 422 | 503) && message.contains("insufficient")
            }
            _ => false,
        }
    }
}

/// Fly's error body: `{"error": "...", "status": "..."}`; some answers use `message`.
#[derive(Deserialize, Default)]
struct ErrorBody {
    error: Option<String>,
    message: Option<String>,
    status: Option<String>,
}

/// A machine as the API returns it. The config is kept whole (every field
/// Fly sends, known or not) so that a clone carries all of it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Machine {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub instance_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<MachineConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_ref: Option<ImageRef>,
    #[serde(default)]
    pub created_at: String,
    #[serde(default)]
    pub updated_at: String,
}

impl Machine {
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.config.as_ref()?.metadata.get(key).map(String::as_str)
    }

    /// `registry/repository[:tag]@digest` when the API reports the digest (what
    /// `fly deploy` pins), else the config's image.
    pub fn full_image_ref(&self) -> Option<String> {
        if let Some(r) = &self.image_ref {
            if !r.registry.is_empty() && !r.repository.is_empty() && !r.digest.is_empty() {
                let tag = if r.tag.is_empty() {
                    String::new()
                } else {
                    format!(":{}", r.tag)
                };
                return Some(format!("{}/{}{tag}@{}", r.registry, r.repository, r.digest));
            }
        }
        self.config
            .as_ref()
            .map(|c| c.image.clone())
            .filter(|i| !i.is_empty())
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ImageRef {
    #[serde(default)]
    pub registry: String,
    #[serde(default)]
    pub repository: String,
    #[serde(default)]
    pub tag: String,
    #[serde(default)]
    pub digest: String,
}

/// `api.MachineConfig`: the fields the controller reads or changes, and the
/// rest kept verbatim in `other`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MachineConfig {
    #[serde(default)]
    pub image: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<MachineInit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<MachineGuest>,
    /// Machines this one stands by for; a clone must not inherit that role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standbys: Option<Vec<String>>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MachineInit {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MachineGuest {
    pub cpu_kind: String,
    pub cpus: i32,
    pub memory_mb: i32,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// `CreateMachineRequest`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CreateMachine {
    pub config: MachineConfig,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub skip_launch: bool,
}

/// `StopRequest`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StopMachine {
    pub signal: String,
    /// A Go duration, e.g. `"30s"`.
    pub timeout: String,
}

/// `Lease`, from the `data` of a lease answer.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Lease {
    pub nonce: String,
    #[serde(default)]
    pub expires_at: i64,
    #[serde(default)]
    pub owner: String,
    #[serde(default)]
    pub description: String,
}

#[derive(Deserialize)]
struct LeaseAnswer {
    data: Lease,
}

/// Which machines a list returns; every metadata pair must match.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub metadata: Vec<(String, String)>,
    pub states: Vec<String>,
    pub region: Option<String>,
    pub include_deleted: bool,
}

/// How hard to retry 429 and 5xx.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub base: Duration,
    pub cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 6,
            base: Duration::from_millis(250),
            cap: Duration::from_secs(8),
        }
    }
}

/// Fly's documented per-action, per-machine limits.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

/// Every action but Get Machine, reads (list, wait, get lease) too: 1
/// request/s, bursts of 3 ("Working with the Machines API", Rate Limits).
pub const ACTION_RATE: Rate = Rate {
    per_second: 1.0,
    burst: 3.0,
};
/// Get Machine: 5 requests/s, bursts of 10.
pub const GET_RATE: Rate = Rate {
    per_second: 5.0,
    burst: 10.0,
};

/// A token: Bearer for classic tokens, `FlyV1` for macaroons. Its `Debug`
/// never shows it.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    pub fn new(token: impl Into<String>) -> Self {
        Token(token.into().trim().to_string())
    }

    fn header(&self) -> Result<HeaderValue, FlyError> {
        let t = &self.0;
        let macaroon = ["fm1r_", "fm1a_", "fm2_"].iter().any(|p| t.starts_with(p));
        let already_schemed = t.starts_with("FlyV1 ") || t.starts_with("Bearer ");
        let value = if already_schemed {
            t.clone()
        } else if macaroon {
            format!("FlyV1 {t}")
        } else {
            format!("Bearer {t}")
        };
        let mut header = HeaderValue::from_str(&value)
            .map_err(|_| FlyError::Config("FLY_API_TOKEN holds characters a header cannot carry".into()))?;
        header.set_sensitive(true);
        Ok(header)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// The client refills its buckets a little slower than Fly's limits: the
/// server counts arrivals, which come a little later and unevenly.
const RATE_MARGIN: f64 = 0.9;

/// The client's side of Fly's rate limits.
struct Buckets {
    buckets: HashMap<(&'static str, String), (f64, Instant)>,
}

impl Buckets {
    /// How long to wait before a request for `key` may go out; takes the token.
    fn reserve(&mut self, key: (&'static str, String), rate: Rate, now: Instant) -> Duration {
        let per_second = rate.per_second * RATE_MARGIN;
        let (tokens, at) = self.buckets.entry(key).or_insert((rate.burst, now));
        // Tokens refill continuously; a negative balance is a queue of waiters.
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * per_second).min(rate.burst);
        *at = now;
        *tokens -= 1.0;
        if *tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-*tokens / per_second)
        }
    }
}

#[derive(Clone)]
pub struct FlyClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    base: String,
    auth: HeaderValue,
    retry: RetryPolicy,
    buckets: Mutex<Buckets>,
    per_app: Mutex<HashMap<String, Arc<Semaphore>>>,
    app_concurrency: usize,
}

/// One call: what it is called in limits and errors, and what it is about.
struct Call<'a> {
    action: &'static str,
    method: Method,
    app: &'a str,
    /// The machine, for per-machine limits; app-level calls use "".
    machine: &'a str,
    path: String,
    query: Vec<(String, String)>,
    body: Option<Value>,
    nonce: Option<&'a str>,
    rate: Rate,
    /// Safe to send twice. A create is not: after a timeout or a 5xx the
    /// machine may exist, and a retry would make a second one. It is
    /// retried only when Fly cannot have acted (429, no connection).
    idempotent: bool,
    /// A long poll (`/wait`, up to 60 s) that takes no slot of the app's
    /// concurrency: it would otherwise hold one for its whole wait, and a
    /// few boots watched in one pool would stall every other pool of the
    /// app, a scale-up from zero included. Its rate is still limited.
    long_poll: bool,
}

static TLS: Once = Once::new();

impl FlyClient {
    /// `base` is `https://api.machines.dev` (or `http://_api.internal:4280`).
    pub fn new(
        base: &str,
        token: Token,
        retry: RetryPolicy,
        app_concurrency: usize,
    ) -> Result<Self, FlyError> {
        // reqwest is built without a crypto provider (one TLS stack, ring, for the
        // whole workspace); Err means one is installed already.
        TLS.call_once(|| {
            let _ = rustls::crypto::ring::default_provider().install_default();
        });
        // The OpenAPI document's server URL carries `/v1`, which every path
        // here adds again.
        let base = base.trim_end_matches('/');
        let base = base.strip_suffix("/v1").unwrap_or(base);
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(FlyError::Config(format!(
                "FLY_API_BASE_URL must be an http(s) URL, got {base:?}"
            )));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // `/wait` may hold a request for up to 60 s.
            .timeout(Duration::from_secs(75))
            .user_agent(concat!("backlog-controller/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| FlyError::Config(format!("cannot build an HTTP client: {e}")))?;
        Ok(FlyClient {
            inner: Arc::new(Inner {
                http,
                base: base.to_string(),
                auth: token.header()?,
                retry,
                buckets: Mutex::new(Buckets {
                    buckets: HashMap::new(),
                }),
                per_app: Mutex::new(HashMap::new()),
                app_concurrency: app_concurrency.max(1),
            }),
        })
    }

    fn machines_path(app: &str) -> String {
        format!("/v1/apps/{}/machines", encode(app))
    }

    fn machine_path(app: &str, machine: &str) -> String {
        format!("/v1/apps/{}/machines/{}", encode(app), encode(machine))
    }

    /// Every machine matching the filter, following `fly-next-cursor`.
    pub async fn list(&self, app: &str, filter: &ListFilter) -> Result<Vec<Machine>, FlyError> {
        let mut machines = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut query: Vec<(String, String)> = filter
                .metadata
                .iter()
                .map(|(k, v)| (format!("metadata.{k}"), v.clone()))
                .collect();
            if !filter.states.is_empty() {
                query.push(("state".into(), filter.states.join(",")));
            }
            if let Some(region) = &filter.region {
                query.push(("region".into(), region.clone()));
            }
            if filter.include_deleted {
                query.push(("include_deleted".into(), "true".into()));
            }
            query.push(("limit".into(), PAGE_SIZE.to_string()));
            if let Some(c) = &cursor {
                query.push(("cursor".into(), c.clone()));
            }
            let (headers, body) = self
                .send(Call {
                    action: "list",
                    method: Method::GET,
                    app,
                    machine: "",
                    path: Self::machines_path(app),
                    query,
                    body: None,
                    nonce: None,
                    rate: ACTION_RATE,
                    idempotent: true,
                    long_poll: false,
                })
                .await?;
            let page: Vec<Machine> = decode("list", body)?;
            let empty = page.is_empty();
            machines.extend(page);
            cursor = headers
                .get(NEXT_CURSOR_HEADER)
                .and_then(|v| v.to_str().ok())
                .filter(|c| !c.is_empty())
                .map(str::to_string);
            if cursor.is_none() || empty {
                return Ok(machines);
            }
        }
    }

    pub async fn get(&self, app: &str, machine: &str) -> Result<Machine, FlyError> {
        let (_, body) = self
            .send(self.simple("get", Method::GET, app, machine, "", None, GET_RATE))
            .await?;
        decode("get", body)
    }

    pub async fn create(&self, app: &str, request: &CreateMachine) -> Result<Machine, FlyError> {
        let body = serde_json::to_value(request).map_err(|e| FlyError::Config(e.to_string()))?;
        let (_, body) = self
            .send(Call {
                action: "create",
                method: Method::POST,
                app,
                machine: "",
                path: Self::machines_path(app),
                query: vec![],
                body: Some(body),
                nonce: None,
                rate: ACTION_RATE,
                idempotent: false,
                long_poll: false,
            })
            .await?;
        decode("create", body)
    }

    /// Replace a machine's config. `current_version` makes it conditional:
    /// a stale version is a 409.
    pub async fn update(
        &self,
        app: &str,
        machine: &str,
        config: &MachineConfig,
        current_version: Option<&str>,
        nonce: Option<&str>,
    ) -> Result<Machine, FlyError> {
        let mut call = self.simple("update", Method::POST, app, machine, "", nonce, ACTION_RATE);
        let mut body = serde_json::json!({ "config": config });
        if let Some(version) = current_version {
            body["current_version"] = Value::String(version.into());
        }
        call.body = Some(body);
        let (_, body) = self.send(call).await?;
        decode("update", body)
    }

    pub async fn start(&self, app: &str, machine: &str, nonce: Option<&str>) -> Result<(), FlyError> {
        self.send(self.simple("start", Method::POST, app, machine, "/start", nonce, ACTION_RATE))
            .await
            .map(drop)
    }

    pub async fn stop(
        &self,
        app: &str,
        machine: &str,
        stop: &StopMachine,
        nonce: Option<&str>,
    ) -> Result<(), FlyError> {
        let mut call = self.simple("stop", Method::POST, app, machine, "/stop", nonce, ACTION_RATE);
        call.body = Some(serde_json::to_value(stop).map_err(|e| FlyError::Config(e.to_string()))?);
        self.send(call).await.map(drop)
    }

    pub async fn suspend(&self, app: &str, machine: &str, nonce: Option<&str>) -> Result<(), FlyError> {
        self.send(self.simple(
            "suspend",
            Method::POST,
            app,
            machine,
            "/suspend",
            nonce,
            ACTION_RATE,
        ))
        .await
        .map(drop)
    }

    /// Destroy; `force` also kills a machine that is still running.
    pub async fn destroy(
        &self,
        app: &str,
        machine: &str,
        force: bool,
        nonce: Option<&str>,
    ) -> Result<(), FlyError> {
        let mut call = self.simple("destroy", Method::DELETE, app, machine, "", nonce, ACTION_RATE);
        if force {
            call.query.push(("force".into(), "true".into()));
        }
        self.send(call).await.map(drop)
    }

    /// Wait up to `timeout` (at most 60 s) for the machine to reach `state`.
    pub async fn wait(
        &self,
        app: &str,
        machine: &str,
        state: &str,
        instance_id: Option<&str>,
        timeout: Duration,
    ) -> Result<(), FlyError> {
        let mut call = self.simple("wait", Method::GET, app, machine, "/wait", None, ACTION_RATE);
        call.long_poll = true;
        call.query.push(("state".into(), state.into()));
        call.query
            .push(("timeout".into(), timeout.as_secs().clamp(1, 60).to_string()));
        if let Some(id) = instance_id.filter(|i| !i.is_empty()) {
            call.query.push(("instance_id".into(), id.into()));
        }
        match self.send(call).await {
            Ok(_) => Ok(()),
            Err(FlyError::Api { status: 408, .. }) => Err(FlyError::WaitTimedOut {
                machine: machine.into(),
                state: state.into(),
            }),
            Err(e) => Err(e),
        }
    }

    /// Take the machine's lease for `ttl`. A lease someone else holds is
    /// [`FlyError::LeaseHeld`]; it is never broken.
    pub async fn acquire_lease(
        &self,
        app: &str,
        machine: &str,
        ttl: Duration,
        description: &str,
    ) -> Result<Lease, FlyError> {
        let mut call = self.simple("lease", Method::POST, app, machine, "/lease", None, ACTION_RATE);
        call.body = Some(serde_json::json!({"ttl": ttl.as_secs().max(1), "description": description}));
        // Retried like a read: if a lost answer had granted it, the retry
        // sees a 409 and the machine is skipped until the TTL ends, which
        // is cheaper than failing the pass on every 5xx.
        match self.send(call).await {
            Ok((_, body)) => Ok(decode::<LeaseAnswer>("lease", body)?.data),
            Err(FlyError::Api {
                status: 409, message, ..
            }) => Err(FlyError::LeaseHeld {
                machine: machine.into(),
                message,
            }),
            Err(e) => Err(e),
        }
    }

    pub async fn release_lease(&self, app: &str, machine: &str, nonce: &str) -> Result<(), FlyError> {
        self.send(self.simple(
            "release_lease",
            Method::DELETE,
            app,
            machine,
            "/lease",
            Some(nonce),
            ACTION_RATE,
        ))
        .await
        .map(drop)
    }

    #[allow(clippy::too_many_arguments)]
    fn simple<'a>(
        &self,
        action: &'static str,
        method: Method,
        app: &'a str,
        machine: &'a str,
        suffix: &str,
        nonce: Option<&'a str>,
        rate: Rate,
    ) -> Call<'a> {
        Call {
            action,
            method,
            app,
            machine,
            path: format!("{}{suffix}", Self::machine_path(app, machine)),
            query: vec![],
            body: None,
            nonce,
            rate,
            idempotent: true,
            long_poll: false,
        }
    }

    /// Sends one call within the limits, retrying 429 and 5xx.
    async fn send(&self, call: Call<'_>) -> Result<(HeaderMap, Value), FlyError> {
        let inner = &self.inner;
        let semaphore = {
            let mut per_app = inner.per_app.lock().expect("per-app limits");
            per_app
                .entry(call.app.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(inner.app_concurrency)))
                .clone()
        };
        let mut url = format!("{}{}", inner.base, call.path);
        for (i, (key, value)) in call.query.iter().enumerate() {
            let sep = if i == 0 { '?' } else { '&' };
            url.push_str(&format!("{sep}{}={}", encode(key), encode(value)));
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let delay = inner.buckets.lock().expect("rate buckets").reserve(
                (call.action, format!("{}/{}", call.app, call.machine)),
                call.rate,
                Instant::now(),
            );
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let permit = match call.long_poll {
                true => None,
                false => Some(semaphore.acquire().await.expect("semaphore is never closed")),
            };
            let mut request = inner
                .http
                .request(call.method.clone(), &url)
                .header(AUTHORIZATION, inner.auth.clone());
            if let Some(nonce) = call.nonce {
                request = request.header(LEASE_NONCE_HEADER, nonce);
            }
            if let Some(body) = &call.body {
                request = request.json(body);
            }
            let result = request.send().await;
            let retry_in = match result {
                Err(source) => {
                    drop(permit);
                    let unsent = source.is_connect();
                    let maybe_applied = source.is_timeout() || source.is_request();
                    if attempt >= inner.retry.attempts || !(unsent || (call.idempotent && maybe_applied)) {
                        return Err(FlyError::Transport {
                            action: call.action,
                            source,
                        });
                    }
                    tracing::debug!(action = call.action, attempt, error = %source, "Fly API unreachable; retrying");
                    None
                }
                Ok(response) => {
                    let status = response.status();
                    let headers = response.headers().clone();
                    let bytes = response.bytes().await.map_err(|source| FlyError::Transport {
                        action: call.action,
                        source,
                    });
                    drop(permit);
                    let bytes = match bytes {
                        Ok(b) => b,
                        Err(e) if attempt >= inner.retry.attempts || !call.idempotent => return Err(e),
                        Err(_) => {
                            tokio::time::sleep(backoff(inner.retry, attempt)).await;
                            continue;
                        }
                    };
                    if status.is_success() {
                        let body = if bytes.is_empty() {
                            Value::Null
                        } else {
                            serde_json::from_slice(&bytes).map_err(|e| FlyError::Decode {
                                action: call.action,
                                message: e.to_string(),
                            })?
                        };
                        return Ok((headers, body));
                    }
                    let error: ErrorBody = serde_json::from_slice(&bytes).unwrap_or_default();
                    let message = error
                        .error
                        .or(error.message)
                        .unwrap_or_else(|| String::from_utf8_lossy(&bytes).chars().take(200).collect());
                    let retryable = status == StatusCode::TOO_MANY_REQUESTS
                        || (call.idempotent && status.is_server_error());
                    if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
                        return Err(FlyError::Unauthorized {
                            status: status.as_u16(),
                            message,
                        });
                    }
                    if !retryable || attempt >= inner.retry.attempts {
                        return Err(FlyError::Api {
                            action: call.action,
                            status: status.as_u16(),
                            message,
                            code: error.status,
                        });
                    }
                    tracing::debug!(
                        action = call.action,
                        machine = call.machine,
                        attempt,
                        status = status.as_u16(),
                        "Fly API asked to retry"
                    );
                    headers
                        .get(RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<f64>().ok())
                        .map(|s| Duration::from_secs_f64(s.clamp(0.0, 60.0)))
                }
            };
            let wait = retry_in.unwrap_or_else(|| backoff(inner.retry, attempt));
            tokio::time::sleep(wait).await;
        }
    }
}

/// Full jitter: a random delay up to the capped exponential bound.
fn backoff(policy: RetryPolicy, attempt: u32) -> Duration {
    let bound = policy
        .base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(policy.cap);
    let low = bound / 4;
    low + bound.saturating_sub(low).mul_f64(rand::rng().random::<f64>())
}

fn decode<T: serde::de::DeserializeOwned>(action: &'static str, body: Value) -> Result<T, FlyError> {
    serde_json::from_value(body).map_err(|e| FlyError::Decode {
        action,
        message: e.to_string(),
    })
}

/// Percent-encodes all but RFC 3986's unreserved characters (path segments,
/// query keys and values alike).
fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_capacity_is_read_from_the_body_whatever_the_status() {
        let answer = |status: u16, message: &str, code: Option<&str>| FlyError::Api {
            action: "create",
            status,
            message: message.into(),
            code: code.map(str::to_string),
        };
        assert!(answer(503, "no room", Some("insufficient_capacity")).is_insufficient_capacity());
        assert!(answer(422, "x", Some("insufficient_capacity")).is_insufficient_capacity());
        assert!(answer(412, "insufficient resources to create new machine", None).is_insufficient_capacity());
        assert!(
            answer(409, "insufficient memory available to fulfill request", None).is_insufficient_capacity()
        );
        assert!(!answer(503, "service unavailable", None).is_insufficient_capacity());
        assert!(!answer(422, "name already taken", Some("name_taken")).is_insufficient_capacity());
    }

    #[test]
    fn macaroons_use_the_flyv1_scheme_and_others_bearer() {
        assert_eq!(Token::new("fm2_abc").header().unwrap(), "FlyV1 fm2_abc");
        assert_eq!(Token::new("fm1r_abc").header().unwrap(), "FlyV1 fm1r_abc");
        assert_eq!(
            Token::new("FlyV1 fm2_x,fm2_y").header().unwrap(),
            "FlyV1 fm2_x,fm2_y"
        );
        assert_eq!(Token::new("classic123\n").header().unwrap(), "Bearer classic123");
        assert_eq!(format!("{:?}", Token::new("fm2_secret")), "Token(<redacted>)");
    }

    #[test]
    fn buckets_allow_the_burst_then_one_per_period() {
        let mut b = Buckets {
            buckets: HashMap::new(),
        };
        let now = Instant::now();
        let key = || ("start", "app/m1".to_string());
        for _ in 0..3 {
            assert_eq!(b.reserve(key(), ACTION_RATE, now), Duration::ZERO);
        }
        let fourth = b.reserve(key(), ACTION_RATE, now);
        let fifth = b.reserve(key(), ACTION_RATE, now);
        assert!(
            fourth > Duration::from_secs(1) && fourth < Duration::from_millis(1200),
            "{fourth:?}"
        );
        assert!(
            fifth > Duration::from_secs(2) && fifth < Duration::from_millis(2400),
            "{fifth:?}"
        );
        // Time refills the bucket: 3 s later the burst is back, minus the queue.
        assert_eq!(
            b.reserve(key(), ACTION_RATE, now + Duration::from_secs(10)),
            Duration::ZERO
        );
        // Another machine has its own bucket.
        assert_eq!(
            b.reserve(("start", "app/m2".into()), ACTION_RATE, now),
            Duration::ZERO
        );
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        let policy = RetryPolicy {
            attempts: 10,
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
        };
        for attempt in 1..10 {
            let d = backoff(policy, attempt);
            assert!(d <= Duration::from_secs(1), "{d:?}");
        }
        let samples: std::collections::HashSet<_> = (0..20).map(|_| backoff(policy, 3)).collect();
        assert!(samples.len() > 1, "jitter varies the delay");
    }

    #[test]
    fn full_image_ref_pins_the_digest() {
        let mut m: Machine = serde_json::from_value(serde_json::json!({
            "id": "m1", "config": {"image": "registry.fly.io/app:deployment-1"},
            "image_ref": {"registry": "registry.fly.io", "repository": "app", "tag": "deployment-1", "digest": "sha256:ab"}
        }))
        .unwrap();
        assert_eq!(
            m.full_image_ref().unwrap(),
            "registry.fly.io/app:deployment-1@sha256:ab"
        );
        m.image_ref = None;
        assert_eq!(m.full_image_ref().unwrap(), "registry.fly.io/app:deployment-1");
    }
}
