//! A stateful emulator of the Fly Machines API (`/v1/apps/{app}/machines/...`),
//! served on 127.0.0.1 for tests that cannot reach Fly.
//!
//! It follows the public contract in `contracts/`: machines with
//! config, metadata and states that change after a (configurable) delay;
//! list filters and `fly-next-cursor` pagination; create, start, stop,
//! suspend, destroy, update with `current_version`; `/wait` with 408;
//! leases with nonces and 409s; Fly's error body; 401/403; Fly's documented
//! rate limits answered with 429; injectable faults, including boots that
//! end in `failed` ("encountered an error and could not start
//! successfully"); and a log of every request so tests can assert on calls
//! and rates.

pub mod openapi;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, State as AxumState};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use rand::Rng;
use serde_json::{json, Value};
use tokio::time::Instant;

/// How long transitions take. Starting a stopped machine is quick on Fly;
/// creating one takes longer.
#[derive(Debug, Clone)]
pub struct Timings {
    pub create: Duration,
    pub start: Duration,
    pub stop: Duration,
    pub suspend: Duration,
    pub destroy: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            create: Duration::from_millis(300),
            start: Duration::from_millis(60),
            stop: Duration::from_millis(100),
            suspend: Duration::from_millis(100),
            destroy: Duration::from_millis(50),
        }
    }
}

/// Faults injected into answers.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Fraction of requests (after auth) answered 500, 503 or 429 instead,
    /// spread evenly from a random first one: any n requests meet n times
    /// the fraction of them, give or take one, so a test's faults do not
    /// depend on luck (drawn per request, 38 requests at 0.3 met 3).
    pub error_fraction: f64,
    /// Every answer is delayed this much.
    pub slow: Option<Duration>,
    /// Creating a machine here fails with 422 `insufficient_capacity`.
    pub no_capacity_regions: HashSet<String>,
    /// Starting these machines fails with 409: their host has no room left
    /// for them ("insufficient memory available to fulfill request").
    pub full_hosts: HashSet<String>,
    /// The next this many requests of these actions (`stop`, `start`, ...)
    /// take effect, then are answered 503: an answer lost on its way back,
    /// after which a client's retry meets the new state.
    pub lost_answers: HashMap<&'static str, usize>,
}

/// One request as the emulator saw and answered it.
#[derive(Debug, Clone)]
pub struct LoggedRequest {
    /// Since the emulator started.
    pub at: Duration,
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    /// `list`, `create`, `get`, `update`, `destroy`, `start`, `stop`,
    /// `suspend`, `wait`, `lease`, `get_lease`, `release_lease`, or `unknown`.
    pub action: &'static str,
    pub app: String,
    pub machine: Option<String>,
    pub nonce: Option<String>,
    pub request_body: Option<Value>,
    pub status: u16,
    pub response_body: Option<Value>,
    /// The answer was an injected fault, not the emulated API's.
    pub injected: bool,
    /// The answer was a 429 from the emulated rate limits.
    pub rate_limited: bool,
}

/// A machine state change, for hooks.
#[derive(Debug, Clone)]
pub struct MachineEvent {
    pub app: String,
    pub machine: String,
    /// The state entered: a transition's transient state when it begins
    /// (`starting`, `stopping`, `destroying`, ...) and its final one when it
    /// completes (`started`, `stopped`, `suspended`, `destroyed`).
    pub state: String,
    pub config: Value,
    /// The signal a stop asked for (`SIGKILL` for a destroy).
    pub signal: Option<String>,
}

pub type Hook = Arc<dyn Fn(&MachineEvent) + Send + Sync>;

/// A machine to put in place before a test runs.
#[derive(Debug, Clone)]
pub struct MachineSeed {
    pub region: String,
    pub state: String,
    pub config: Value,
    pub image_ref: Option<Value>,
}

struct Lease {
    nonce: String,
    owner: String,
    description: String,
    expires_at: DateTime<Utc>,
}

struct Machine {
    id: String,
    name: String,
    region: String,
    state: String,
    config: Value,
    image_ref: Value,
    instance_id: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    lease: Option<Lease>,
    events: Vec<Value>,
    /// Bumped by each transition, so a stale delayed completion is dropped.
    generation: u64,
}

impl Machine {
    fn to_json(&self, summary: bool) -> Value {
        let mut config = self.config.clone();
        if summary {
            // Summaries keep what identifies the machine, not its whole config.
            config = json!({
                "image": config.get("image").cloned().unwrap_or(Value::Null),
                "metadata": config.get("metadata").cloned().unwrap_or(json!({})),
            });
        }
        let mut m = json!({
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "region": self.region,
            "instance_id": self.instance_id,
            "private_ip": format!("fdaa:0:1::{}", &self.id[..4]),
            "config": config,
            "image_ref": self.image_ref,
            "created_at": rfc3339(self.created_at),
            "updated_at": rfc3339(self.updated_at),
        });
        if !summary {
            m["events"] = Value::Array(self.events.iter().rev().take(10).cloned().collect());
        }
        m
    }

    fn metadata(&self, key: &str) -> Option<&str> {
        self.config.get("metadata")?.get(key)?.as_str()
    }

    fn lease_held(&self, now: DateTime<Utc>) -> Option<&Lease> {
        self.lease.as_ref().filter(|l| l.expires_at > now)
    }
}

#[derive(Default)]
struct State {
    /// Token → the apps it may use (None: all).
    tokens: HashMap<String, Option<HashSet<String>>>,
    apps: HashSet<String>,
    machines: BTreeMap<(String, String), Machine>,
    faults: Faults,
    buckets: HashMap<(&'static str, String), (f64, Instant)>,
    log: Vec<LoggedRequest>,
    hooks: Vec<Hook>,
    /// The next this many boots (a create's launch or a start) end in
    /// `failed` instead of `started`.
    failing_boots: usize,
    /// Per app: requests being answered now, and the most at once so far.
    in_flight: HashMap<String, (usize, usize)>,
    /// `error_fraction` accrued since the last injected fault; one is
    /// injected each time it reaches 1.
    fault_credit: f64,
}

struct Shared {
    state: Mutex<State>,
    timings: Timings,
    started: Instant,
}

/// The running emulator. Dropping it stops the server.
pub struct FlyEmulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FlyEmulator {
    fn drop(&mut self) {
        self.server.abort();
    }
}

type Reply = (StatusCode, Vec<(&'static str, String)>, Option<Value>);

fn error(status: StatusCode, message: impl Into<String>) -> Reply {
    error_with(status, message, "unknown")
}

fn error_with(status: StatusCode, message: impl Into<String>, code: &str) -> Reply {
    (
        status,
        vec![],
        Some(json!({"error": message.into(), "status": code})),
    )
}

fn ok(body: Value) -> Reply {
    (StatusCode::OK, vec![], Some(body))
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn random_hex(n: usize) -> String {
    let mut rng = rand::rng();
    (0..n)
        .map(|_| format!("{:x}", rng.random_range(0..16u8)))
        .collect()
}

/// Fly's documented limits: per action and machine 1/s with bursts of 3,
/// list and wait included; Get Machine 5/s with bursts of 10.
fn rate_for(action: &str) -> (f64, f64) {
    match action {
        "get" => (5.0, 10.0),
        _ => (1.0, 3.0),
    }
}

impl FlyEmulator {
    pub async fn start(timings: Timings) -> FlyEmulator {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            timings,
            started: Instant::now(),
        });
        let app = axum::Router::new().fallback(handle).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the Fly emulator");
        let addr = listener.local_addr().expect("emulator address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FlyEmulator { addr, shared, server }
    }

    /// The base URL a client is configured with (no `/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().expect("emulator state")
    }

    /// Accept `token` for these apps (`None`: every app).
    pub fn add_token(&self, token: &str, apps: Option<&[&str]>) {
        let apps = apps.map(|a| a.iter().map(|s| s.to_string()).collect());
        self.state().tokens.insert(token.to_string(), apps);
    }

    pub fn add_app(&self, app: &str) {
        self.state().apps.insert(app.to_string());
    }

    pub fn set_faults(&self, faults: Faults) {
        let mut state = self.state();
        state.faults = faults;
        state.fault_credit = rand::rng().random::<f64>();
    }

    pub fn on_machine_event(&self, hook: Hook) {
        self.state().hooks.push(hook);
    }

    /// The next `count` machines to boot (created and launched, or started)
    /// go from `starting` to `failed`, as a machine whose image or host
    /// breaks does.
    pub fn fail_next_boots(&self, count: usize) {
        self.state().failing_boots = count;
    }

    /// Put a machine in place directly (as a past `fly deploy` would have).
    /// `updated_at` moves forward one second per seed so order is known.
    pub fn seed_machine(&self, app: &str, seed: MachineSeed) -> String {
        let mut state = self.state();
        state.apps.insert(app.to_string());
        let id = random_hex(14);
        let n = state.machines.len() as i64;
        let at = Utc::now() - chrono::Duration::seconds(600 - n);
        state.machines.insert(
            (app.to_string(), id.clone()),
            Machine {
                name: format!("seed-{}", &id[..6]),
                id: id.clone(),
                region: seed.region,
                state: seed.state,
                config: seed.config,
                image_ref: seed.image_ref.unwrap_or(json!({})),
                instance_id: ulid_like(),
                created_at: at,
                updated_at: at,
                lease: None,
                events: vec![],
                generation: 0,
            },
        );
        id
    }

    /// A machine as the API would return it.
    pub fn machine(&self, app: &str, id: &str) -> Option<Value> {
        self.state()
            .machines
            .get(&(app.to_string(), id.to_string()))
            .map(|m| m.to_json(false))
    }

    /// Every machine of the app, destroyed ones included.
    pub fn machines(&self, app: &str) -> Vec<Value> {
        self.state()
            .machines
            .iter()
            .filter(|((a, _), _)| a == app)
            .map(|(_, m)| m.to_json(false))
            .collect()
    }

    /// Take a machine's lease as someone else would (`fly deploy`).
    pub fn hold_lease(&self, app: &str, id: &str, owner: &str, ttl: Duration) -> String {
        let mut state = self.state();
        let machine = state
            .machines
            .get_mut(&(app.to_string(), id.to_string()))
            .expect("machine to lease");
        let nonce = random_hex(32);
        machine.lease = Some(Lease {
            nonce: nonce.clone(),
            owner: owner.to_string(),
            description: "held by the test".into(),
            expires_at: Utc::now() + chrono::Duration::from_std(ttl).expect("ttl"),
        });
        nonce
    }

    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.state().log.clone()
    }

    pub fn clear_requests(&self) {
        self.state().log.clear();
    }

    /// The most requests for `app` the emulator was answering at once.
    pub fn most_in_flight(&self, app: &str) -> usize {
        self.state().in_flight.get(app).map_or(0, |&(_, most)| most)
    }
}

/// Machine versions look like ULIDs (26 characters).
fn ulid_like() -> String {
    let alphabet = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let mut rng = rand::rng();
    (0..26)
        .map(|_| alphabet[rng.random_range(0..alphabet.len())] as char)
        .collect()
}

/// What a path names.
struct Route {
    action: &'static str,
    app: String,
    machine: Option<String>,
}

fn route(method: &Method, path: &str) -> Option<Route> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (app, rest) = match parts.as_slice() {
        ["v1", "apps", app, "machines", rest @ ..] => (app.to_string(), rest),
        _ => return None,
    };
    let (action, machine) = match (method, rest) {
        (&Method::GET, []) => ("list", None),
        (&Method::POST, []) => ("create", None),
        (&Method::GET, [id]) => ("get", Some(id)),
        (&Method::POST, [id]) => ("update", Some(id)),
        (&Method::DELETE, [id]) => ("destroy", Some(id)),
        (&Method::POST, [id, "start"]) => ("start", Some(id)),
        (&Method::POST, [id, "stop"]) => ("stop", Some(id)),
        (&Method::POST, [id, "suspend"]) => ("suspend", Some(id)),
        (&Method::GET, [id, "wait"]) => ("wait", Some(id)),
        (&Method::POST, [id, "lease"]) => ("lease", Some(id)),
        (&Method::GET, [id, "lease"]) => ("get_lease", Some(id)),
        (&Method::DELETE, [id, "lease"]) => ("release_lease", Some(id)),
        _ => return None,
    };
    Some(Route {
        action,
        app,
        machine: machine.map(|m| m.to_string()),
    })
}

/// A request of `app` being answered, for [`FlyEmulator::most_in_flight`].
struct Answering {
    shared: Arc<Shared>,
    app: String,
}

impl Drop for Answering {
    fn drop(&mut self) {
        if let Some((now, _)) = self
            .shared
            .state
            .lock()
            .expect("state")
            .in_flight
            .get_mut(&self.app)
        {
            *now -= 1;
        }
    }
}

async fn handle(
    AxumState(shared): AxumState<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query: Vec<(String, String)> = Query::<Vec<(String, String)>>::try_from_uri(&uri)
        .map(|q| q.0)
        .unwrap_or_default();
    let request_body: Option<Value> = if body.is_empty() {
        None
    } else {
        serde_json::from_slice(&body).ok()
    };
    let nonce = headers
        .get("fly-machine-lease-nonce")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let route = route(&method, uri.path());
    let app = route.as_ref().map(|r| r.app.clone()).unwrap_or_default();
    let slow = {
        let mut state = shared.state.lock().expect("state");
        let (now, most) = state.in_flight.entry(app.clone()).or_default();
        *now += 1;
        *most = (*most).max(*now);
        state.faults.slow
    };
    // Counted down however the request ends, a client that hangs up included.
    let _answering = Answering {
        shared: shared.clone(),
        app,
    };
    if let Some(delay) = slow {
        tokio::time::sleep(delay).await;
    }
    let mut injected = false;
    let mut rate_limited = false;
    let reply = match &route {
        None => error(
            StatusCode::NOT_FOUND,
            format!("no such endpoint: {method} {}", uri.path()),
        ),
        Some(r) => {
            let pre = shared.gate(r, &headers, &mut injected, &mut rate_limited);
            match pre {
                Some(reply) => reply,
                None if !body.is_empty() && request_body.is_none() => {
                    error(StatusCode::BAD_REQUEST, "request body is not valid JSON")
                }
                None => {
                    let reply = shared
                        .dispatch(r, &query, request_body.as_ref(), nonce.as_deref())
                        .await;
                    if reply.0.is_success() && shared.lose_answer(r.action) {
                        injected = true;
                        error(StatusCode::SERVICE_UNAVAILABLE, "upstream connection reset")
                    } else {
                        reply
                    }
                }
            }
        }
    };
    let (status, extra_headers, response_body) = reply;
    {
        let mut state = shared.state.lock().expect("state");
        state.log.push(LoggedRequest {
            at: shared.started.elapsed(),
            method: method.to_string(),
            path: uri.path().to_string(),
            query,
            action: route.as_ref().map(|r| r.action).unwrap_or("unknown"),
            app: route.as_ref().map(|r| r.app.clone()).unwrap_or_default(),
            machine: route.as_ref().and_then(|r| r.machine.clone()),
            nonce,
            request_body,
            status: status.as_u16(),
            response_body: response_body.clone(),
            injected,
            rate_limited,
        });
    }
    let mut response = match response_body {
        Some(body) => (status, axum::Json(body)).into_response(),
        None => status.into_response(),
    };
    for (name, value) in extra_headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            response.headers_mut().insert(name, v);
        }
    }
    response
}

impl Shared {
    /// Auth, the app, rate limits and injected faults, in the order a real
    /// front end applies them. `Some` is the answer that stops the request.
    /// Whether this applied `action` is to be answered as lost (see
    /// [`Faults::lost_answers`]), counting it down.
    fn lose_answer(&self, action: &str) -> bool {
        let mut state = self.state.lock().expect("state");
        match state.faults.lost_answers.get_mut(action) {
            Some(left) if *left > 0 => {
                *left -= 1;
                true
            }
            _ => false,
        }
    }

    fn gate(&self, r: &Route, headers: &HeaderMap, injected: &mut bool, limited: &mut bool) -> Option<Reply> {
        let mut state = self.state.lock().expect("state");
        // Macaroons (fm1r_, fm1a_, fm2_) go with the FlyV1 scheme, other
        // tokens with Bearer, as Fly's front end expects; the wrong scheme is a 401.
        let is_macaroon = |t: &str| ["fm1r_", "fm1a_", "fm2_"].iter().any(|p| t.starts_with(p));
        let token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| match (v.strip_prefix("Bearer "), v.strip_prefix("FlyV1 ")) {
                (Some(t), _) if !is_macaroon(t) => Some(t),
                (_, Some(t)) if is_macaroon(t) => Some(t),
                _ => None,
            });
        let Some(scope) = token.and_then(|t| state.tokens.get(t)) else {
            return Some(error(StatusCode::UNAUTHORIZED, "unauthorized"));
        };
        if scope.as_ref().is_some_and(|apps| !apps.contains(&r.app)) {
            return Some(error(
                StatusCode::FORBIDDEN,
                format!("token has no access to app {}", r.app),
            ));
        }
        if !state.apps.contains(&r.app) {
            return Some(error(StatusCode::NOT_FOUND, format!("app {} not found", r.app)));
        }
        let (per_second, burst) = rate_for(r.action);
        let key = (
            r.action,
            format!("{}/{}", r.app, r.machine.as_deref().unwrap_or("")),
        );
        let now = Instant::now();
        let (tokens, at) = state.buckets.entry(key).or_insert((burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * per_second).min(burst);
        *at = now;
        if *tokens < 1.0 {
            *limited = true;
            let retry_after = ((1.0 - *tokens) / per_second).ceil().max(1.0) as u64;
            let (status, _, body) = error(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded");
            return Some((status, vec![("retry-after", retry_after.to_string())], body));
        }
        *tokens -= 1.0;
        state.fault_credit += state.faults.error_fraction;
        if state.faults.error_fraction > 0.0 && state.fault_credit >= 1.0 {
            state.fault_credit -= 1.0;
            *injected = true;
            let reply = match rand::rng().random_range(0..3) {
                0 => error(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
                1 => error(StatusCode::SERVICE_UNAVAILABLE, "service unavailable"),
                _ => error(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded"),
            };
            return Some(reply);
        }
        None
    }

    async fn dispatch(
        self: &Arc<Self>,
        r: &Route,
        query: &[(String, String)],
        body: Option<&Value>,
        nonce: Option<&str>,
    ) -> Reply {
        if r.action == "wait" {
            return self.wait(r, query).await;
        }
        let mut state = self.state.lock().expect("state");
        if r.action == "list" {
            return list(&state, &r.app, query);
        }
        if r.action == "create" {
            let reply = self.create(&mut state, &r.app, body);
            return reply;
        }
        let id = r.machine.clone().expect("machine routes name one");
        let now = Utc::now();
        let key = (r.app.clone(), id.clone());
        let host_full = state.faults.full_hosts.contains(&id);
        let Some(machine) = state.machines.get_mut(&key) else {
            return error(StatusCode::NOT_FOUND, format!("machine {id} not found"));
        };
        if machine.state == "destroyed" && r.action != "get" {
            return error(StatusCode::NOT_FOUND, format!("machine {id} not found"));
        }
        // Mutations of a leased machine need the lease's nonce.
        let mutating = matches!(r.action, "update" | "destroy" | "start" | "stop" | "suspend");
        if mutating {
            if let Some(lease) = machine.lease_held(now) {
                if nonce != Some(lease.nonce.as_str()) {
                    return error(
                        StatusCode::CONFLICT,
                        format!(
                            "machine {id} lease currently held by {}, expires at {}",
                            lease.owner,
                            rfc3339(lease.expires_at)
                        ),
                    );
                }
            }
        }
        match r.action {
            "get" => ok(machine.to_json(false)),
            "get_lease" => match machine.lease_held(now) {
                Some(l) => ok(lease_json(l, &machine.instance_id)),
                None => error(StatusCode::NOT_FOUND, "no active lease"),
            },
            "lease" => {
                let ttl = body
                    .and_then(|b| b.get("ttl"))
                    .and_then(Value::as_i64)
                    .or_else(|| query_value(query, "ttl").and_then(|t| t.parse().ok()))
                    .unwrap_or(30);
                let description = body
                    .and_then(|b| b.get("description"))
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                if let Some(held) = machine.lease_held(now) {
                    if nonce != Some(held.nonce.as_str()) {
                        return error(
                            StatusCode::CONFLICT,
                            format!(
                                "lease currently held by {}, expires at {}",
                                held.owner,
                                rfc3339(held.expires_at)
                            ),
                        );
                    }
                }
                let lease = Lease {
                    nonce: nonce.map(str::to_string).unwrap_or_else(|| random_hex(32)),
                    owner: "controller@example.com".into(),
                    description,
                    expires_at: now + chrono::Duration::seconds(ttl.clamp(1, 3600)),
                };
                let body = lease_json(&lease, &machine.instance_id);
                machine.lease = Some(lease);
                ok(body)
            }
            "release_lease" => match machine.lease_held(now) {
                Some(held) if nonce == Some(held.nonce.as_str()) => {
                    machine.lease = None;
                    ok(json!({"ok": true}))
                }
                Some(_) => error(StatusCode::CONFLICT, "lease nonce does not match"),
                None => ok(json!({"ok": true})),
            },
            "update" => {
                let current = body
                    .and_then(|b| b.get("current_version"))
                    .and_then(Value::as_str);
                if current.is_some_and(|v| v != machine.instance_id) {
                    return error(
                        StatusCode::CONFLICT,
                        format!(
                            "machine {id} version is {}, not {}",
                            machine.instance_id,
                            current.unwrap_or("")
                        ),
                    );
                }
                let Some(config) = body.and_then(|b| b.get("config")) else {
                    return error(StatusCode::BAD_REQUEST, "config is required");
                };
                machine.config = config.clone();
                machine.instance_id = ulid_like();
                machine.updated_at = now;
                let was_running = machine.state == "started";
                drop(state);
                if was_running {
                    self.transition(&key, "updating", "started", self.timings.start, None);
                }
                let state = self.state.lock().expect("state");
                ok(state.machines[&key].to_json(false))
            }
            "start" => {
                if host_full {
                    return error(
                        StatusCode::CONFLICT,
                        "could not reserve resource for machine: insufficient memory available to fulfill request",
                    );
                }
                if !matches!(machine.state.as_str(), "stopped" | "suspended" | "created") {
                    return error(
                        StatusCode::PRECONDITION_FAILED,
                        format!("unable to start machine from current state: '{}'", machine.state),
                    );
                }
                let previous = machine.state.clone();
                drop(state);
                self.boot(&key, self.timings.start);
                ok(json!({"previous_state": previous}))
            }
            "stop" => {
                if !matches!(machine.state.as_str(), "started" | "starting") {
                    return error(
                        StatusCode::PRECONDITION_FAILED,
                        format!("unable to stop machine from current state: '{}'", machine.state),
                    );
                }
                let signal = body
                    .and_then(|b| b.get("signal"))
                    .and_then(Value::as_str)
                    .unwrap_or("SIGINT")
                    .to_string();
                if let Some(timeout) = body.and_then(|b| b.get("timeout")) {
                    if !timeout.as_str().is_some_and(valid_go_duration) {
                        return error(StatusCode::BAD_REQUEST, format!("invalid stop timeout {timeout}"));
                    }
                }
                drop(state);
                self.transition(&key, "stopping", "stopped", self.timings.stop, Some(signal));
                ok(json!({"ok": true}))
            }
            "suspend" => {
                if machine.state != "started" {
                    return error(
                        StatusCode::PRECONDITION_FAILED,
                        format!(
                            "unable to suspend machine from current state: '{}'",
                            machine.state
                        ),
                    );
                }
                drop(state);
                self.transition(&key, "suspending", "suspended", self.timings.suspend, None);
                ok(json!({"ok": true}))
            }
            "destroy" => {
                let force = ["force", "kill"]
                    .iter()
                    .any(|k| query_value(query, k) == Some("true"));
                if !force
                    && !matches!(
                        machine.state.as_str(),
                        "stopped" | "suspended" | "created" | "failed"
                    )
                {
                    return error(
                        StatusCode::PRECONDITION_FAILED,
                        format!(
                            "unable to destroy machine, not currently stopped or suspended (state: {})",
                            machine.state
                        ),
                    );
                }
                machine.lease = None;
                drop(state);
                self.transition(
                    &key,
                    "destroying",
                    "destroyed",
                    self.timings.destroy,
                    Some("SIGKILL".into()),
                );
                ok(json!({"ok": true}))
            }
            _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
        }
    }

    fn create(self: &Arc<Self>, state: &mut State, app: &str, body: Option<&Value>) -> Reply {
        let Some(body) = body else {
            return error(StatusCode::BAD_REQUEST, "request body is required");
        };
        let Some(config) = body.get("config").filter(|c| c.is_object()) else {
            return error(StatusCode::BAD_REQUEST, "config is required");
        };
        let image = config.get("image").and_then(Value::as_str).unwrap_or("");
        if image.is_empty() {
            return error(StatusCode::BAD_REQUEST, "config.image is required");
        }
        let region = body
            .get("region")
            .and_then(Value::as_str)
            .unwrap_or("iad")
            .to_string();
        if state.faults.no_capacity_regions.contains(&region) {
            return error_with(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("insufficient resources available to fulfill request in region {region}"),
                "insufficient_capacity",
            );
        }
        let name = body.get("name").and_then(Value::as_str).map(str::to_string);
        if let Some(name) = &name {
            if state
                .machines
                .iter()
                .any(|((a, _), m)| a == app && &m.name == name && m.state != "destroyed")
            {
                return error(
                    StatusCode::CONFLICT,
                    format!("a machine named {name} already exists"),
                );
            }
        }
        let id = random_hex(14);
        let now = Utc::now();
        let (repository, tag) = image
            .split_once('/')
            .map(|(_, rest)| rest)
            .unwrap_or(image)
            .split('@')
            .next()
            .unwrap_or("")
            .split_once(':')
            .map(|(r, t)| (r.to_string(), t.to_string()))
            .unwrap_or((image.to_string(), "latest".into()));
        let skip_launch = body.get("skip_launch").and_then(Value::as_bool).unwrap_or(false);
        let machine = Machine {
            name: name.unwrap_or_else(|| format!("{}-{}", adjective(&id), &id[..4])),
            id: id.clone(),
            region,
            state: "created".into(),
            config: config.clone(),
            image_ref: json!({
                "registry": image.split_once('/').map(|(r, _)| r).unwrap_or("docker.io"),
                "repository": repository,
                "tag": tag,
                "digest": image.split_once('@').map(|(_, d)| d).unwrap_or("sha256:0000"),
            }),
            instance_id: ulid_like(),
            created_at: now,
            updated_at: now,
            lease: None,
            events: vec![
                json!({"type": "launch", "status": "created", "source": "user", "timestamp": now.timestamp_millis()}),
            ],
            generation: 0,
        };
        let answer = machine.to_json(false);
        let key = (app.to_string(), id);
        state.machines.insert(key.clone(), machine);
        if !skip_launch {
            let shared = Arc::clone(self);
            let delay = self.timings.create;
            // The machine is created at once and boots after the delay.
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                shared.boot(&key, Duration::ZERO);
            });
        }
        ok(answer)
    }

    /// Boot a machine: `starting` now, then `started` after `delay`, or
    /// `failed` when a failing boot was asked for.
    fn boot(self: &Arc<Self>, key: &(String, String), delay: Duration) {
        let fails = {
            let mut state = self.state.lock().expect("state");
            let fails = state.failing_boots > 0;
            state.failing_boots = state.failing_boots.saturating_sub(1);
            fails
        };
        let target = if fails { "failed" } else { "started" };
        self.transition(key, "starting", target, delay, None);
    }

    /// Move a machine to `transient` now and to `target` after `delay`.
    fn transition(
        self: &Arc<Self>,
        key: &(String, String),
        transient: &str,
        target: &str,
        delay: Duration,
        signal: Option<String>,
    ) {
        let (generation, begun, hooks) = {
            let mut state = self.state.lock().expect("state");
            let hooks = state.hooks.clone();
            let Some(m) = state.machines.get_mut(key) else {
                return;
            };
            m.state = transient.to_string();
            m.updated_at = Utc::now();
            m.generation += 1;
            let begun = MachineEvent {
                app: key.0.clone(),
                machine: key.1.clone(),
                state: transient.to_string(),
                config: m.config.clone(),
                signal: signal.clone(),
            };
            (m.generation, begun, hooks)
        };
        // A stop's signal reaches the machine's process when the stop begins.
        for hook in &hooks {
            hook(&begun);
        }
        let key = key.clone();
        let target = target.to_string();
        let shared = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let (event, hooks) = {
                let mut state = shared.state.lock().expect("state");
                let hooks = state.hooks.clone();
                let Some(m) = state.machines.get_mut(&key) else {
                    return;
                };
                if m.generation != generation {
                    return;
                }
                let now = Utc::now();
                m.state = target.clone();
                m.updated_at = now;
                m.events
                    .push(json!({"type": target, "status": target, "source": "flyd", "timestamp": now.timestamp_millis()}));
                let event = MachineEvent {
                    app: key.0.clone(),
                    machine: key.1.clone(),
                    state: target,
                    config: m.config.clone(),
                    signal,
                };
                (event, hooks)
            };
            for hook in hooks {
                hook(&event);
            }
        });
    }

    async fn wait(&self, r: &Route, query: &[(String, String)]) -> Reply {
        let id = r.machine.clone().expect("wait names a machine");
        let wanted = query_value(query, "state").unwrap_or("started").to_string();
        if !matches!(wanted.as_str(), "started" | "stopped" | "suspended" | "destroyed") {
            return error(StatusCode::BAD_REQUEST, format!("invalid state {wanted:?}"));
        }
        let timeout = match query_value(query, "timeout").map(str::parse::<u64>) {
            None => 60,
            Some(Ok(t)) if (1..=60).contains(&t) => t,
            Some(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "timeout must be between 1 and 60 seconds",
                )
            }
        };
        // Fly's docs: required when waiting for a machine to be `stopped`.
        if wanted == "stopped" && query_value(query, "instance_id").is_none_or(str::is_empty) {
            return error(
                StatusCode::BAD_REQUEST,
                "instance_id is required when waiting for a machine to be stopped",
            );
        }
        let deadline = Instant::now() + Duration::from_secs(timeout);
        loop {
            {
                let state = self.state.lock().expect("state");
                let Some(m) = state.machines.get(&(r.app.clone(), id.clone())) else {
                    return error(StatusCode::NOT_FOUND, format!("machine {id} not found"));
                };
                if m.state == wanted {
                    return ok(json!({"ok": true, "state": m.state, "version": m.instance_id,
                        "event_id": ulid_like()}));
                }
                if m.state == "destroyed" {
                    return error(StatusCode::BAD_REQUEST, format!("machine {id} was destroyed"));
                }
            }
            if Instant::now() >= deadline {
                return error(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("deadline_exceeded: machine {id} did not reach {wanted} in {timeout}s"),
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn lease_json(lease: &Lease, version: &str) -> Value {
    json!({"status": "success", "data": {
        "nonce": lease.nonce,
        "expires_at": lease.expires_at.timestamp(),
        "owner": lease.owner,
        "description": lease.description,
        "version": version,
    }})
}

fn query_value<'a>(query: &'a [(String, String)], key: &str) -> Option<&'a str> {
    query.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn valid_go_duration(s: &str) -> bool {
    let digits = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &s[digits.len()..];
    !digits.is_empty() && digits.parse::<f64>().is_ok() && matches!(unit, "ms" | "s" | "m" | "h")
}

fn adjective(id: &str) -> &'static str {
    const WORDS: [&str; 4] = ["quiet", "bold", "calm", "swift"];
    WORDS[id.as_bytes()[0] as usize % WORDS.len()]
}

/// `GET /v1/apps/{app}/machines` with its filters and cursor pagination.
fn list(state: &State, app: &str, query: &[(String, String)]) -> Reply {
    let mut metadata = Vec::new();
    let mut states: Option<Vec<String>> = None;
    let mut region = None;
    let mut include_deleted = false;
    let mut summary = false;
    let mut limit = 1000usize;
    let mut cursor = None;
    for (key, value) in query {
        match key.as_str() {
            k if k.starts_with("metadata.") => metadata.push((&k["metadata.".len()..], value.as_str())),
            "state" => states = Some(value.split(',').map(str::to_string).collect()),
            "region" => region = Some(value.as_str()),
            "include_deleted" => include_deleted = value == "true",
            "summary" => summary = value == "true",
            "limit" => match value.parse::<usize>() {
                Ok(l) if (1..=1000).contains(&l) => limit = l,
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("limit must be 1..1000, got {value:?}"),
                    )
                }
            },
            "cursor" => cursor = Some(value.as_str()),
            _ => {}
        }
    }
    let matching: Vec<&Machine> = state
        .machines
        .iter()
        .filter(|((a, _), _)| a == app)
        .map(|(_, m)| m)
        .filter(|m| include_deleted || m.state != "destroyed")
        .filter(|m| states.as_ref().is_none_or(|s| s.contains(&m.state)))
        .filter(|m| region.is_none_or(|r| m.region == r))
        .filter(|m| metadata.iter().all(|(k, v)| m.metadata(k) == Some(*v)))
        .filter(|m| cursor.is_none_or(|c| m.id.as_str() > c))
        .collect();
    let page: Vec<Value> = matching.iter().take(limit).map(|m| m.to_json(summary)).collect();
    let mut headers = vec![];
    if matching.len() > limit {
        headers.push(("fly-next-cursor", matching[limit - 1].id.clone()));
    }
    (StatusCode::OK, headers, Some(Value::Array(page)))
}
