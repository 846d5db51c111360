//! A Kubernetes API server emulator for tests: stateful, on 127.0.0.1:0,
//! serving what backlog's controller and kubectl use.
//!
//! - discovery (`/api`, `/apis`, group/version resource lists, `/version`)
//!   in the legacy form (clients asking for aggregated discovery fall back
//!   to it, as they do against older servers);
//! - get, list (label and field selectors, `limit`/`continue`), watch (from
//!   a `resourceVersion`, with bookmarks when asked, `410 Expired` after a
//!   compaction), create (`generateName`), replace, patch (merge, strategic
//!   merge as merge, JSON patch, server-side apply with field managers and
//!   conflicts), delete — with `409 Conflict` on a stale `resourceVersion`
//!   and `Status` bodies for every error;
//! - the `/status` subresource (status writes never bump `generation`; spec
//!   writes do) and the `/scale` subresource of Deployments and StatefulSets;
//! - a ReplicaSet/StatefulSet controller in miniature: replica counts
//!   become Pods, a Deployment's scale-down removes pods by readiness,
//!   `controller.kubernetes.io/pod-deletion-cost` and age as the real
//!   ReplicaSet controller ranks them, a StatefulSet's the highest ordinals;
//! - CustomResourceDefinitions: creating one serves its resource, with the
//!   Table form (`kubectl get`) built from `additionalPrinterColumns`;
//! - bearer tokens for service accounts and RBAC from the stored Roles,
//!   ClusterRoles and their bindings (`403 Forbidden` worded as the real
//!   server words it); requests without a token are the administrator's;
//! - injectable faults: error responses, slow responses, watch disconnects.

mod rbac;
mod select;
mod table;
mod types;
mod workloads;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::watch;

/// The HTTP method a [`Fault`] matches, so tests need no HTTP crate of their own.
pub use axum::http::Method;
pub use select::{human_duration, json_path, LabelSelector};
pub use types::ResourceType;

/// An error response: a `Status` object with this code and reason.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    details: Value,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: Value::Null,
        }
    }

    fn not_found(rt: &ResourceType, name: &str) -> Self {
        ApiError {
            details: json!({"name": name, "group": rt.group, "kind": rt.plural}),
            ..ApiError::new(
                404,
                "NotFound",
                format!("{} \"{name}\" not found", rt.qualified()),
            )
        }
    }

    fn conflict(rt: &ResourceType, name: &str) -> Self {
        ApiError {
            details: json!({"name": name, "group": rt.group, "kind": rt.plural}),
            ..ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                    rt.qualified()
                ),
            )
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(400, "BadRequest", message)
    }

    fn invalid(rt: &ResourceType, name: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        ApiError {
            details: json!({"name": name, "group": rt.group, "kind": rt.kind}),
            ..ApiError::new(
                422,
                "Invalid",
                format!("{} \"{name}\" is invalid: {message}", rt.kind),
            )
        }
    }

    fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if !self.details.is_null() {
            status["details"] = self.details.clone();
        }
        status
    }

    fn into_response(self) -> Response {
        json_response(
            StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            &self.status(),
        )
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn json_response(code: StatusCode, body: &Value) -> Response {
    (
        code,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// A response to inject: requests matching `method` (any when `None`) whose
/// path contains `path_contains` get `code` instead, `times` times.
#[derive(Debug, Clone)]
pub struct Fault {
    pub method: Option<Method>,
    pub path_contains: String,
    pub code: u16,
    pub times: u32,
}

/// One request the server answered, for tests to count.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: Method,
    /// Path and query.
    pub uri: String,
    pub content_type: Option<String>,
    pub code: u16,
}

/// One change, as a watch replays it.
#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    key: String,
    namespace: String,
    kind: &'static str,
    object: Value,
}

/// Field ownership of server-side apply: manager → owned field paths.
type Owners = BTreeMap<String, BTreeSet<String>>;

struct State {
    rv: u64,
    types: Vec<ResourceType>,
    /// type key → (namespace, name) → object.
    objects: HashMap<String, BTreeMap<(String, String), Value>>,
    changes: Vec<Change>,
    /// Watches from a resourceVersion below this get `410 Expired`.
    compacted: u64,
    /// (type key, namespace, name, subresource) → owners.
    owners: HashMap<(String, String, String, String), Owners>,
    pods_start_ready: bool,
    /// Names handed out by `generateName`, to make them unique.
    generated: u64,
}

struct Shared {
    state: Mutex<State>,
    /// The latest resourceVersion, for open watches to wake on.
    revision: watch::Sender<u64>,
    /// Bumped to cut every open watch.
    disconnects: watch::Sender<u64>,
    faults: Mutex<Vec<Fault>>,
    latency: Mutex<Duration>,
    bookmark_interval: Mutex<Duration>,
    requests: Mutex<Vec<RecordedRequest>>,
    /// Bearer token → the user it authenticates.
    tokens: Mutex<HashMap<String, rbac::UserInfo>>,
}

/// A running emulator. Dropping it stops the server.
pub struct KubeApi {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn now_rfc3339() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

impl KubeApi {
    /// A server with the built-in types, the `default` and `kube-system`
    /// namespaces, and these CustomResourceDefinitions (as JSON objects).
    pub async fn start(crds: &[Value]) -> KubeApi {
        let state = State {
            rv: 1,
            types: types::builtin_types(),
            objects: HashMap::new(),
            changes: Vec::new(),
            compacted: 0,
            owners: HashMap::new(),
            pods_start_ready: true,
            generated: 0,
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            revision: watch::channel(1).0,
            disconnects: watch::channel(0).0,
            faults: Mutex::new(Vec::new()),
            latency: Mutex::new(Duration::ZERO),
            bookmark_interval: Mutex::new(Duration::from_secs(1)),
            requests: Mutex::new(Vec::new()),
            tokens: Mutex::new(HashMap::new()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let app = axum::Router::new().fallback(handle).with_state(shared.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let api = KubeApi { addr, shared, server };
        for ns in ["default", "kube-system"] {
            api.create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}));
        }
        for crd in crds {
            api.create(crd.clone());
        }
        api
    }

    /// `http://127.0.0.1:PORT`, for kube's `Config` and `kubectl --server`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Create an object as an administrator would (no faults, no latency).
    /// Panics on an error response: a test's setup is wrong.
    pub fn create(&self, object: Value) -> Value {
        let mut state = self.shared.state.lock().unwrap();
        let rt = state
            .type_of(&object)
            .unwrap_or_else(|e| panic!("cannot create {object}: {}", e.message));
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or(if rt.namespaced { "default" } else { "" })
            .to_string();
        let created = state
            .create(&rt, &namespace, object, None)
            .unwrap_or_else(|e| panic!("create failed: {}", e.message));
        self.publish(&state);
        created
    }

    /// The object, if it exists. `plural` as in `deployments`, `workerpools`.
    pub fn get(&self, group: &str, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        let state = self.shared.state.lock().unwrap();
        state
            .objects
            .get(&format!("{group}/{plural}"))
            .and_then(|objects| objects.get(&(namespace.to_string(), name.to_string())))
            .cloned()
    }

    /// Every object of a type in a namespace, sorted by name.
    pub fn list(&self, group: &str, plural: &str, namespace: &str) -> Vec<Value> {
        let state = self.shared.state.lock().unwrap();
        state
            .objects
            .get(&format!("{group}/{plural}"))
            .map(|objects| {
                objects
                    .iter()
                    .filter(|((ns, _), _)| ns == namespace)
                    .map(|(_, o)| o.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Delete an object as an administrator would. Whether it existed.
    pub fn delete(&self, group: &str, plural: &str, namespace: &str, name: &str) -> bool {
        let mut state = self.shared.state.lock().unwrap();
        let Some(rt) = state
            .types
            .iter()
            .find(|t| t.group == group && t.plural == plural)
            .cloned()
        else {
            return false;
        };
        let deleted = state.delete(&rt, namespace, name).is_ok();
        self.publish(&state);
        deleted
    }

    /// Set a workload's `spec.replicas` as `kubectl scale` would.
    pub fn scale(&self, plural: &str, namespace: &str, name: &str, replicas: i64) {
        let mut state = self.shared.state.lock().unwrap();
        let rt = state
            .types
            .iter()
            .find(|t| t.group == "apps" && t.plural == plural)
            .cloned()
            .expect("deployments or statefulsets");
        state
            .write_scale(&rt, namespace, name, replicas)
            .unwrap_or_else(|e| panic!("scale failed: {}", e.message));
        self.publish(&state);
    }

    /// Whether pods created from now on start ready (default) or not.
    pub fn set_pods_start_ready(&self, ready: bool) {
        self.shared.state.lock().unwrap().pods_start_ready = ready;
    }

    /// Mark a pod ready or not, as its readiness probe would.
    pub fn set_pod_ready(&self, namespace: &str, name: &str, ready: bool) {
        let mut state = self.shared.state.lock().unwrap();
        state.set_pod_ready(namespace, name, ready);
        self.publish(&state);
    }

    /// Answer the next matching requests with an error.
    pub fn inject(&self, fault: Fault) {
        self.shared.faults.lock().unwrap().push(fault);
    }

    /// Delay every response by this much.
    pub fn set_latency(&self, latency: Duration) {
        *self.shared.latency.lock().unwrap() = latency;
    }

    /// How often a watch that asked for bookmarks gets one.
    pub fn set_bookmark_interval(&self, interval: Duration) {
        *self.shared.bookmark_interval.lock().unwrap() = interval;
    }

    /// End every open watch now, as a load balancer or an API server restart would.
    pub fn disconnect_watches(&self) {
        self.shared.disconnects.send_modify(|n| *n += 1);
    }

    /// Forget the change history: a watch resumed from an older
    /// resourceVersion gets `410 Expired` and must list again.
    pub fn compact(&self) {
        let mut state = self.shared.state.lock().unwrap();
        state.compacted = state.rv;
        state.changes.clear();
    }

    /// A bearer token for the service account `namespace/name`, as the
    /// token a pod of that account mounts: requests made with it are
    /// authorized by RBAC against the Roles and bindings stored here.
    pub fn service_account_token(&self, namespace: &str, name: &str) -> String {
        let token = format!("emulator-sa-{}", uuid::Uuid::new_v4().simple());
        self.shared
            .tokens
            .lock()
            .unwrap()
            .insert(token.clone(), rbac::UserInfo::service_account(namespace, name));
        token
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests.lock().unwrap().clone()
    }

    fn publish(&self, state: &State) {
        self.shared.revision.send_replace(state.rv);
    }
}

/// The parsed path of a resource request.
#[derive(Debug)]
struct Target {
    rt: ResourceType,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

async fn handle(
    axum::extract::State(shared): axum::extract::State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let latency = *shared.latency.lock().unwrap();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let path_and_query = uri.path_and_query().map(|p| p.to_string()).unwrap_or_default();
    let injected = {
        let mut faults = shared.faults.lock().unwrap();
        let hit = faults.iter_mut().find(|f| {
            f.times > 0
                && f.method.as_ref().is_none_or(|m| *m == method)
                && path_and_query.contains(&f.path_contains)
        });
        hit.map(|f| {
            f.times -= 1;
            f.code
        })
    };
    let response = match injected {
        Some(code) => ApiError::new(
            code,
            if code == 429 {
                "TooManyRequests"
            } else {
                "InternalError"
            },
            format!("injected fault: {code}"),
        )
        .into_response(),
        None => authorize(&shared, &method, &uri, &headers)
            .and_then(|()| respond(&shared, &method, &uri, &headers, content_type.as_deref(), &body))
            .unwrap_or_else(ApiError::into_response),
    };
    shared.requests.lock().unwrap().push(RecordedRequest {
        method,
        uri: path_and_query,
        content_type,
        code: response.status().as_u16(),
    });
    response
}

/// Authentication (a bearer token, when one is sent) and RBAC authorization.
fn authorize(shared: &Arc<Shared>, method: &Method, uri: &Uri, headers: &HeaderMap) -> ApiResult<()> {
    let Some(authorization) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Ok(());
    };
    let token = authorization
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(rbac::unauthorized)?;
    let user = shared
        .tokens
        .lock()
        .unwrap()
        .get(token.trim())
        .cloned()
        .ok_or_else(rbac::unauthorized)?;
    let is_watch = matches!(
        query_map(uri).get("watch").map(String::as_str),
        Some("true" | "1")
    );
    let Some(request) = rbac::attributes(method, uri.path(), is_watch) else {
        return Ok(());
    };
    if shared.state.lock().unwrap().authorize(&user, &request) {
        Ok(())
    } else {
        Err(rbac::forbidden(&user, &request))
    }
}

fn query_map(uri: &Uri) -> HashMap<String, String> {
    uri.query()
        .map(|q| url_pairs(q).into_iter().collect::<HashMap<String, String>>())
        .unwrap_or_default()
}

fn url_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn respond(
    shared: &Arc<Shared>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    content_type: Option<&str>,
    body: &Bytes,
) -> ApiResult<Response> {
    let segments: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    let query = query_map(uri);
    let ok = |v: Value| Ok(json_response(StatusCode::OK, &v));
    let state = || shared.state.lock().unwrap();
    match segments.as_slice() {
        ["version"] => ok(json!({
            "major": "1", "minor": "32", "gitVersion": "v1.32.0-backlog-emulator",
            "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
            "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.23", "compiler": "gc",
            "platform": "linux/amd64",
        })),
        ["api"] => ok(json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": uri.authority().map(|a| a.to_string()).unwrap_or_default()}],
        })),
        ["apis"] => ok(state().group_list()),
        ["apis", group] => state().group(group).map(|g| json_response(StatusCode::OK, &g)),
        ["api", "v1"] => ok(state().resource_list("", "v1")?),
        ["apis", group, version] => ok(state().resource_list(group, version)?),
        ["openapi", ..] => Err(ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )),
        ["api", "v1", rest @ ..] => {
            let target = state().target("", "v1", rest)?;
            serve(shared, method, target, &query, headers, content_type, body)
        }
        ["apis", group, version, rest @ ..] => {
            let target = state().target(group, version, rest)?;
            serve(shared, method, target, &query, headers, content_type, body)
        }
        _ => Err(ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )),
    }
}

fn parse_body(body: &Bytes, content_type: Option<&str>) -> ApiResult<Value> {
    let text = std::str::from_utf8(body).map_err(|_| ApiError::bad_request("the body is not UTF-8"))?;
    let is_yaml = content_type.is_some_and(|c| c.contains("yaml"));
    if is_yaml {
        let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(text)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?;
        serde_json::to_value(yaml).map_err(|e| ApiError::bad_request(e.to_string()))
    } else {
        serde_json::from_str(text)
            .map_err(|e| ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}")))
    }
}

fn serve(
    shared: &Arc<Shared>,
    method: &Method,
    target: Target,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    content_type: Option<&str>,
    body: &Bytes,
) -> ApiResult<Response> {
    let accept = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let wants_table = accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=Table"));
    let rt = target.rt.clone();
    let namespace = target.namespace.clone().unwrap_or_default();
    let ok = |v: Value| Ok(json_response(StatusCode::OK, &v));
    let created = |v: Value| Ok(json_response(StatusCode::CREATED, &v));
    let is_watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let mut state = shared.state.lock().unwrap();
    let result = match (method.as_str(), &target.name, target.subresource.as_deref()) {
        ("GET", None, None) if is_watch => {
            drop(state);
            return watch_response(shared, target, query);
        }
        ("GET", None, None) => {
            let list = state.list(&rt, target.namespace.as_deref(), query)?;
            if wants_table {
                ok(table::list_table(&rt, &list))
            } else {
                ok(list)
            }
        }
        ("POST", None, None) => {
            let object = parse_body(body, content_type)?;
            if query.get("dryRun").is_some_and(|d| d == "All") {
                return created(object);
            }
            let object = state.create(
                &rt,
                &namespace,
                object,
                query.get("fieldManager").map(String::as_str),
            )?;
            created(object)
        }
        ("GET", Some(name), None) => {
            let object = state.get(&rt, &namespace, name)?;
            if wants_table {
                ok(table::object_table(&rt, &object))
            } else {
                ok(object)
            }
        }
        ("PUT", Some(name), sub @ (None | Some("status"))) => {
            let object = parse_body(body, content_type)?;
            ok(state.replace(&rt, &namespace, name, object, sub)?)
        }
        ("PATCH", Some(name), sub @ (None | Some("status"))) => {
            let patch = parse_body(body, content_type)?;
            let kind = content_type.unwrap_or("");
            ok(state.patch(&rt, &namespace, name, sub, kind, &patch, query)?)
        }
        ("DELETE", Some(name), None) => ok(state.delete(&rt, &namespace, name)?),
        ("GET", Some(name), Some("status")) => ok(state.get(&rt, &namespace, name)?),
        ("GET", Some(name), Some("scale")) if rt.scale => ok(state.scale_of(&rt, &namespace, name)?),
        ("PUT", Some(name), Some("scale")) if rt.scale => {
            let scale = parse_body(body, content_type)?;
            ok(state.replace_scale(&rt, &namespace, name, &scale)?)
        }
        ("PATCH", Some(name), Some("scale")) if rt.scale => {
            let patch = parse_body(body, content_type)?;
            ok(state.patch_scale(&rt, &namespace, name, content_type.unwrap_or(""), &patch)?)
        }
        (m, _, Some(sub)) => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{m} is not supported on {}/{sub}", rt.plural),
        )),
        (m, _, None) => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method ({m}) on the requested resource"),
        )),
    };
    shared.revision.send_replace(state.rv);
    result
}

/// A watch: changes after `resourceVersion` (or the current objects as
/// ADDED first, when it is absent or "0"), then changes as they happen,
/// bookmarks when asked, until `timeoutSeconds` or a disconnect.
fn watch_response(
    shared: &Arc<Shared>,
    target: Target,
    query: &HashMap<String, String>,
) -> ApiResult<Response> {
    let labels = LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))
        .map_err(ApiError::bad_request)?;
    let fields = select::FieldSelector::parse(
        query.get("fieldSelector").map_or("", String::as_str),
        &target.rt.selectable_fields,
    )
    .map_err(ApiError::bad_request)?;
    let bookmarks = query.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let key = target.rt.key();
    let namespace = target.namespace.clone();
    let matches = move |c: &Change| {
        c.key == key
            && namespace.as_ref().is_none_or(|ns| *ns == c.namespace)
            && labels.matches(c.object["metadata"]["labels"].as_object())
            && fields.matches(&c.object)
    };
    let (mut from, initial) = {
        let state = shared.state.lock().unwrap();
        match query.get("resourceVersion").map(String::as_str) {
            None | Some("") | Some("0") => {
                let initial: Vec<Value> = state
                    .objects
                    .get(&target.rt.key())
                    .map(|objects| {
                        objects
                            .iter()
                            .map(|((ns, _), o)| Change {
                                rv: 0,
                                key: target.rt.key(),
                                namespace: ns.clone(),
                                kind: "ADDED",
                                object: o.clone(),
                            })
                            .filter(|c| matches(c))
                            .map(|c| json!({"type": "ADDED", "object": c.object}))
                            .collect()
                    })
                    .unwrap_or_default();
                (state.rv, initial)
            }
            Some(rv) => {
                let rv: u64 = rv
                    .parse()
                    .map_err(|_| ApiError::bad_request(format!("invalid resource version {rv:?}")))?;
                if rv < state.compacted {
                    let expired = ApiError::new(
                        410,
                        "Expired",
                        format!("too old resource version: {rv} ({})", state.compacted),
                    );
                    (rv, vec![json!({"type": "ERROR", "object": expired.status()})])
                } else {
                    (rv, vec![])
                }
            }
        }
    };
    let expired = initial.first().is_some_and(|e| e["type"] == "ERROR");
    let shared = shared.clone();
    let bookmark_interval = *shared.bookmark_interval.lock().unwrap();
    let kind = target.rt.kind.clone();
    let api_version = target.rt.api_version();
    let stream = async_stream(move |tx| async move {
        for event in initial {
            if tx.send(event).await.is_err() {
                return;
            }
        }
        if expired {
            return;
        }
        let mut revision = shared.revision.subscribe();
        let mut disconnects = shared.disconnects.subscribe();
        disconnects.borrow_and_update();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut bookmark = tokio::time::interval(bookmark_interval);
        bookmark.tick().await;
        loop {
            let pending: Vec<Change> = {
                let state = shared.state.lock().unwrap();
                if from < state.compacted {
                    let expired = ApiError::new(410, "Expired", format!("too old resource version: {from}"));
                    let _ = tx.try_send(json!({"type": "ERROR", "object": expired.status()}));
                    return;
                }
                state.changes.iter().filter(|c| c.rv > from).cloned().collect()
            };
            for change in pending {
                from = change.rv;
                if matches(&change)
                    && tx
                        .send(json!({"type": change.kind, "object": change.object}))
                        .await
                        .is_err()
                {
                    return;
                }
            }
            tokio::select! {
                _ = revision.changed() => {}
                _ = disconnects.changed() => return,
                _ = tokio::time::sleep_until(deadline) => return,
                _ = bookmark.tick(), if bookmarks => {
                    let event = json!({"type": "BOOKMARK", "object": {
                        "kind": kind, "apiVersion": api_version,
                        "metadata": {"resourceVersion": from.to_string()}}});
                    if tx.send(event).await.is_err() { return; }
                }
            }
        }
    });
    Ok((
        StatusCode::OK,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// A body stream fed by a task through a channel of JSON events, one a line.
fn async_stream<F, Fut>(producer: F) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Value>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Value>(64);
    tokio::spawn(producer(tx));
    futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|event| event.map(|e| Ok(Bytes::from(format!("{e}\n")))))
    })
}

impl State {
    fn find_type(&self, group: &str, version: &str, plural: &str) -> Option<&ResourceType> {
        self.types
            .iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
    }

    fn type_of(&self, object: &Value) -> ApiResult<ResourceType> {
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let kind = object["kind"].as_str().unwrap_or_default();
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        self.types
            .iter()
            .find(|t| t.group == group && t.version == version && t.kind == kind)
            .cloned()
            .ok_or_else(|| {
                ApiError::new(
                    404,
                    "NotFound",
                    format!("no matches for kind \"{kind}\" in version \"{api_version}\""),
                )
            })
    }

    fn target(&self, group: &str, version: &str, rest: &[&str]) -> ApiResult<Target> {
        let not_found = || {
            ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            )
        };
        let lookup = |plural: &str| {
            self.find_type(group, version, plural)
                .cloned()
                .ok_or_else(not_found)
        };
        let (namespace, rest) = match rest {
            // `namespaces/NAME[/status]` is the Namespace object itself.
            ["namespaces", _] | ["namespaces", _, "status" | "finalize"] if group.is_empty() => (None, rest),
            ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
            _ => (None, rest),
        };
        let (rt, name, subresource) = match rest {
            [plural] => (lookup(plural)?, None, None),
            [plural, name] => (lookup(plural)?, Some(name.to_string()), None),
            [plural, name, sub] => (lookup(plural)?, Some(name.to_string()), Some(sub.to_string())),
            _ => return Err(not_found()),
        };
        if namespace.is_some() && !rt.namespaced {
            return Err(not_found());
        }
        if namespace.is_none() && rt.namespaced && name.is_some() {
            return Err(not_found());
        }
        Ok(Target {
            rt,
            namespace,
            name,
            subresource,
        })
    }

    fn group_list(&self) -> Value {
        let mut groups: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for t in self.types.iter().filter(|t| !t.group.is_empty()) {
            groups.entry(&t.group).or_default().insert(&t.version);
        }
        let groups: Vec<Value> = groups.keys().filter_map(|g| self.group(g).ok()).collect();
        json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
    }

    fn group(&self, group: &str) -> ApiResult<Value> {
        let versions: BTreeSet<&str> = self
            .types
            .iter()
            .filter(|t| t.group == group)
            .map(|t| t.version.as_str())
            .collect();
        if versions.is_empty() {
            return Err(ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ));
        }
        let versions: Vec<Value> = versions
            .iter()
            .rev()
            .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
            .collect();
        Ok(json!({
            "kind": "APIGroup", "apiVersion": "v1", "name": group,
            "preferredVersion": versions[0], "versions": versions,
        }))
    }

    fn resource_list(&self, group: &str, version: &str) -> ApiResult<Value> {
        let resources: Vec<Value> = self
            .types
            .iter()
            .filter(|t| t.group == group && t.version == version)
            .flat_map(|t| t.discovery())
            .collect();
        if resources.is_empty() {
            return Err(ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ));
        }
        let group_version = if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        };
        Ok(
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}),
        )
    }

    fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn record(&mut self, rt: &ResourceType, namespace: &str, kind: &'static str, object: &Value) {
        self.changes.push(Change {
            rv: self.rv,
            key: rt.key(),
            namespace: namespace.to_string(),
            kind,
            object: object.clone(),
        });
    }

    fn get(&self, rt: &ResourceType, namespace: &str, name: &str) -> ApiResult<Value> {
        self.objects
            .get(&rt.key())
            .and_then(|o| o.get(&(namespace.to_string(), name.to_string())))
            .cloned()
            .ok_or_else(|| ApiError::not_found(rt, name))
    }

    fn list(
        &self,
        rt: &ResourceType,
        namespace: Option<&str>,
        query: &HashMap<String, String>,
    ) -> ApiResult<Value> {
        let labels = LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))
            .map_err(ApiError::bad_request)?;
        let fields = select::FieldSelector::parse(
            query.get("fieldSelector").map_or("", String::as_str),
            &rt.selectable_fields,
        )
        .map_err(ApiError::bad_request)?;
        let limit = query
            .get("limit")
            .and_then(|l| l.parse::<usize>().ok())
            .filter(|l| *l > 0);
        let after = query.get("continue").filter(|c| !c.is_empty()).cloned();
        let mut items: Vec<(String, Value)> = self
            .objects
            .get(&rt.key())
            .map(|objects| {
                objects
                    .iter()
                    .filter(|((ns, _), _)| namespace.is_none_or(|n| n == ns))
                    .map(|((ns, name), o)| (format!("{ns}/{name}"), o.clone()))
                    .filter(|(_, o)| labels.matches(o["metadata"]["labels"].as_object()) && fields.matches(o))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(after) = &after {
            items.retain(|(key, _)| key > after);
        }
        let mut metadata = json!({"resourceVersion": self.rv.to_string()});
        if let Some(limit) = limit {
            if items.len() > limit {
                metadata["continue"] = json!(items[limit - 1].0);
                metadata["remainingItemCount"] = json!(items.len() - limit);
                items.truncate(limit);
            }
        }
        Ok(json!({
            "kind": format!("{}List", rt.kind),
            "apiVersion": rt.api_version(),
            "metadata": metadata,
            "items": items.into_iter().map(|(_, o)| o).collect::<Vec<_>>(),
        }))
    }

    fn create(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        mut object: Value,
        manager: Option<&str>,
    ) -> ApiResult<Value> {
        if !object.is_object() {
            return Err(ApiError::bad_request("the body must be an object"));
        }
        let body_namespace = object["metadata"]["namespace"].as_str().map(str::to_string);
        if rt.namespaced {
            if body_namespace.as_deref().is_some_and(|ns| ns != namespace) {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            if self
                .get(
                    &self.find_type("", "v1", "namespaces").cloned().expect("builtin"),
                    "",
                    namespace,
                )
                .is_err()
            {
                return Err(ApiError {
                    details: json!({"name": namespace, "kind": "namespaces"}),
                    ..ApiError::new(404, "NotFound", format!("namespaces \"{namespace}\" not found"))
                });
            }
        }
        let name = match (
            object["metadata"]["name"].as_str(),
            object["metadata"]["generateName"].as_str(),
        ) {
            (Some(name), _) if !name.is_empty() => name.to_string(),
            (_, Some(prefix)) => {
                self.generated += 1;
                format!("{prefix}{}", suffix(self.generated))
            }
            _ => {
                return Err(ApiError::invalid(
                    rt,
                    "",
                    "metadata.name: Required value: name or generateName is required",
                ))
            }
        };
        if !valid_name(&name) {
            return Err(ApiError::invalid(
                rt,
                &name,
                format!("metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'"),
            ));
        }
        let key = (
            if rt.namespaced {
                namespace.to_string()
            } else {
                String::new()
            },
            name.clone(),
        );
        if self.objects.get(&rt.key()).is_some_and(|o| o.contains_key(&key)) {
            return Err(ApiError {
                details: json!({"name": name, "group": rt.group, "kind": rt.plural}),
                ..ApiError::new(
                    409,
                    "AlreadyExists",
                    format!("{} \"{name}\" already exists", rt.qualified()),
                )
            });
        }
        if rt.group == "apiextensions.k8s.io" {
            let served = ResourceType::from_crd(&object).map_err(|m| ApiError::invalid(rt, &name, m))?;
            self.types
                .retain(|t| !served.iter().any(|s| s.group == t.group && s.plural == t.plural));
            self.types.extend(served);
            object["status"] = json!({
                "conditions": [
                    {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": now_rfc3339()},
                    {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": now_rfc3339()},
                ],
                "acceptedNames": object["spec"]["names"].clone(),
                "storedVersions": [object["spec"]["versions"][0]["name"].clone()],
            });
        }
        let rv = self.bump();
        object["apiVersion"] = json!(rt.api_version());
        object["kind"] = json!(rt.kind);
        default_fields(rt, &mut object);
        let metadata = object["metadata"]
            .as_object_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        let mut metadata = Value::Object(metadata);
        metadata["name"] = json!(name);
        if rt.namespaced {
            metadata["namespace"] = json!(namespace);
        } else if let Some(m) = metadata.as_object_mut() {
            m.remove("namespace");
        }
        metadata["uid"] = json!(uuid::Uuid::new_v4().to_string());
        metadata["resourceVersion"] = json!(rv.to_string());
        metadata["creationTimestamp"] = json!(now_rfc3339());
        metadata["generation"] = json!(1);
        object["metadata"] = metadata;
        if rt.status && rt.group != "apiextensions.k8s.io" && rt.kind != "Pod" && rt.kind != "Namespace" {
            // Status is the controllers' to write, through /status.
            if let Some(o) = object.as_object_mut() {
                o.remove("status");
            }
        }
        if rt.kind == "Namespace" {
            object["status"] = json!({"phase": "Active"});
        }
        if let Some(manager) = manager {
            self.own(rt, &key, "", manager, &object, &["spec", "metadata", "data"]);
        }
        self.objects
            .entry(rt.key())
            .or_default()
            .insert(key.clone(), object.clone());
        self.record(rt, &key.0, "ADDED", &object);
        if rt.scale {
            workloads::sync(self, rt, &key.0, &name);
            return self.get(rt, &key.0, &name);
        }
        Ok(object)
    }

    /// Store an updated object: new resourceVersion, `generation` bumped
    /// when anything but metadata and status changed, a MODIFIED change.
    fn store(&mut self, rt: &ResourceType, namespace: &str, name: &str, mut object: Value) -> Value {
        let old = self.get(rt, namespace, name).unwrap_or(Value::Null);
        let strip = |v: &Value| {
            let mut v = v.clone();
            if let Some(o) = v.as_object_mut() {
                o.remove("metadata");
                o.remove("status");
            }
            v
        };
        default_fields(rt, &mut object);
        let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
        let changed = strip(&old) != strip(&object);
        let rv = self.bump();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        object["metadata"]["generation"] = json!(if changed { generation + 1 } else { generation });
        for field in ["uid", "creationTimestamp", "name", "namespace"] {
            if !old["metadata"][field].is_null() {
                object["metadata"][field] = old["metadata"][field].clone();
            }
        }
        object["apiVersion"] = json!(rt.api_version());
        object["kind"] = json!(rt.kind);
        self.objects
            .entry(rt.key())
            .or_default()
            .insert((namespace.to_string(), name.to_string()), object.clone());
        self.record(rt, namespace, "MODIFIED", &object);
        if rt.scale && changed {
            workloads::sync(self, rt, namespace, name);
            return self.get(rt, namespace, name).unwrap_or(object);
        }
        object
    }

    fn check_version(rt: &ResourceType, name: &str, current: &Value, given: &Value) -> ApiResult<()> {
        match given["metadata"]["resourceVersion"].as_str() {
            Some(rv) if !rv.is_empty() && Some(rv) != current["metadata"]["resourceVersion"].as_str() => {
                Err(ApiError::conflict(rt, name))
            }
            _ => Ok(()),
        }
    }

    /// Keep the part of `current` a write to `subresource` may not change.
    fn confine(rt: &ResourceType, current: &Value, mut updated: Value, subresource: Option<&str>) -> Value {
        match subresource {
            Some("status") => {
                let mut kept = current.clone();
                kept["status"] = updated.get("status").cloned().unwrap_or(Value::Null);
                kept
            }
            _ if rt.status && rt.kind != "Pod" && rt.group != "apiextensions.k8s.io" => {
                match current.get("status") {
                    Some(status) => updated["status"] = status.clone(),
                    None => {
                        if let Some(o) = updated.as_object_mut() {
                            o.remove("status");
                        }
                    }
                }
                updated
            }
            _ => updated,
        }
    }

    fn replace(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        object: Value,
        subresource: Option<&str>,
    ) -> ApiResult<Value> {
        let current = self.get(rt, namespace, name)?;
        if object["metadata"]["name"].as_str().is_some_and(|n| n != name) {
            return Err(ApiError::bad_request(
                "the name of the object does not match the name on the URL",
            ));
        }
        Self::check_version(rt, name, &current, &object)?;
        let updated = Self::confine(rt, &current, object, subresource);
        Ok(self.store(rt, namespace, name, updated))
    }

    #[allow(clippy::too_many_arguments)]
    fn patch(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        subresource: Option<&str>,
        content_type: &str,
        patch: &Value,
        query: &HashMap<String, String>,
    ) -> ApiResult<Value> {
        if content_type.starts_with("application/apply-patch") {
            let manager = query
                .get("fieldManager")
                .filter(|m| !m.is_empty())
                .ok_or_else(|| ApiError::bad_request("PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch"))?;
            let force = query.get("force").is_some_and(|f| f == "true");
            return self.apply(rt, namespace, name, subresource, manager, force, patch);
        }
        let current = self.get(rt, namespace, name)?;
        let mut updated = current.clone();
        if content_type.starts_with("application/json-patch+json") {
            select::json_patch(&mut updated, patch).map_err(|m| ApiError::new(422, "Invalid", m))?;
        } else if content_type.starts_with("application/merge-patch+json")
            || content_type.starts_with("application/strategic-merge-patch+json")
        {
            Self::check_version(rt, name, &current, patch)?;
            select::merge_patch(&mut updated, patch);
        } else {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json; got {content_type:?}"),
            ));
        }
        let updated = Self::confine(rt, &current, updated, subresource);
        Ok(self.store(rt, namespace, name, updated))
    }

    /// Server-side apply: the manager's fields become what it applied; the
    /// fields it owned before and left out are removed unless another
    /// manager owns them; a field another manager owns with a different
    /// value is a conflict unless forced. Ownership is tracked per top-level
    /// field of `spec`/`status`, and per `type` in `status.conditions`.
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        subresource: Option<&str>,
        manager: &str,
        force: bool,
        applied: &Value,
    ) -> ApiResult<Value> {
        let current = match self.get(rt, namespace, name) {
            Ok(current) => current,
            Err(e) if subresource.is_some() => return Err(e),
            Err(_) => {
                let mut object = applied.clone();
                object["metadata"]["name"] = json!(name);
                return self.create(rt, namespace, object, Some(manager));
            }
        };
        let section = if subresource == Some("status") {
            "status"
        } else {
            "spec"
        };
        let sub = subresource.unwrap_or("").to_string();
        let owner_key = (rt.key(), namespace.to_string(), name.to_string(), sub.clone());
        let owners = self.owners.get(&owner_key).cloned().unwrap_or_default();
        let applied_fields = field_paths(section, &applied[section]);
        let conflicts: Vec<String> = applied_fields
            .iter()
            .flat_map(|path| {
                owners
                    .iter()
                    .filter(move |(m, fields)| *m != manager && fields.contains(path))
                    .map(move |(m, _)| (m.clone(), path.clone()))
            })
            .filter(|(_, path)| field_value(&current, path) != field_value(applied, path))
            .map(|(m, path)| format!("conflict with \"{m}\": .{path}"))
            .collect();
        if !conflicts.is_empty() && !force {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Apply failed with {} conflict(s): {}",
                    conflicts.len(),
                    conflicts.join(", ")
                ),
            ));
        }
        let mut updated = current.clone();
        let previously: BTreeSet<String> = owners.get(manager).cloned().unwrap_or_default();
        let others: BTreeSet<String> = owners
            .iter()
            .filter(|(m, _)| *m != manager)
            .flat_map(|(_, f)| f.iter().cloned())
            .collect();
        for path in previously.difference(&applied_fields) {
            if !others.contains(path) {
                remove_field(&mut updated, path);
            }
        }
        for path in &applied_fields {
            set_field(
                &mut updated,
                path,
                field_value(applied, path).cloned().unwrap_or(Value::Null),
            );
        }
        if subresource.is_none() {
            if let Some(meta) = applied["metadata"].as_object() {
                for field in ["labels", "annotations"] {
                    if let Some(v) = meta.get(field) {
                        select::merge_patch(&mut updated["metadata"][field], v);
                    }
                }
            }
        }
        let mut owners = owners;
        for fields in owners.values_mut() {
            if force {
                fields.retain(|f| !applied_fields.contains(f));
            }
        }
        owners.insert(manager.to_string(), applied_fields);
        self.owners.insert(owner_key, owners);
        let updated = Self::confine(rt, &current, updated, subresource);
        let mut stored = self.store(rt, namespace, name, updated);
        stored["metadata"]["managedFields"] = self.managed_fields(rt, namespace, name);
        self.objects
            .entry(rt.key())
            .or_default()
            .insert((namespace.to_string(), name.to_string()), stored.clone());
        if let Some(last) = self.changes.last_mut() {
            last.object = stored.clone();
        }
        Ok(stored)
    }

    fn own(
        &mut self,
        rt: &ResourceType,
        key: &(String, String),
        sub: &str,
        manager: &str,
        object: &Value,
        sections: &[&str],
    ) {
        let fields: BTreeSet<String> = sections
            .iter()
            .flat_map(|s| field_paths(s, &object[*s]))
            .collect();
        self.owners
            .entry((rt.key(), key.0.clone(), key.1.clone(), sub.to_string()))
            .or_default()
            .insert(manager.to_string(), fields);
    }

    /// `metadata.managedFields` in the FieldsV1 form, from the owners.
    fn managed_fields(&self, rt: &ResourceType, namespace: &str, name: &str) -> Value {
        let mut entries = Vec::new();
        for ((key, ns, n, sub), owners) in &self.owners {
            if *key != rt.key() || ns != namespace || n != name {
                continue;
            }
            for (manager, fields) in owners {
                let mut tree = json!({});
                for path in fields {
                    let mut at = &mut tree;
                    for segment in path.split('.') {
                        let segment = match segment.strip_prefix("conditions[type=") {
                            Some(t) => format!("k:{{\"type\":\"{}\"}}", t.trim_end_matches(']')),
                            None => format!("f:{segment}"),
                        };
                        at = at
                            .as_object_mut()
                            .expect("objects")
                            .entry(segment)
                            .or_insert(json!({}));
                    }
                }
                let mut entry = json!({
                    "manager": manager, "operation": "Apply", "apiVersion": rt.api_version(),
                    "time": now_rfc3339(), "fieldsType": "FieldsV1", "fieldsV1": tree,
                });
                if !sub.is_empty() {
                    entry["subresource"] = json!(sub);
                }
                entries.push(entry);
            }
        }
        Value::Array(entries)
    }

    fn delete(&mut self, rt: &ResourceType, namespace: &str, name: &str) -> ApiResult<Value> {
        let mut object = self
            .objects
            .get_mut(&rt.key())
            .and_then(|o| o.remove(&(namespace.to_string(), name.to_string())))
            .ok_or_else(|| ApiError::not_found(rt, name))?;
        let rv = self.bump();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(rt, namespace, "DELETED", &object);
        self.owners
            .retain(|(k, ns, n, _), _| !(*k == rt.key() && ns == namespace && n == name));
        if rt.group == "apiextensions.k8s.io" {
            if let Ok(served) = ResourceType::from_crd(&object) {
                for t in &served {
                    self.objects.remove(&t.key());
                }
                self.types
                    .retain(|t| !served.iter().any(|s| s.group == t.group && s.plural == t.plural));
            }
        }
        if rt.scale {
            workloads::collect_garbage(self, rt, namespace, &object);
        }
        Ok(json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
            "details": {"name": name, "group": rt.group, "kind": rt.plural, "uid": object["metadata"]["uid"]},
        }))
    }

    fn scale_of(&self, rt: &ResourceType, namespace: &str, name: &str) -> ApiResult<Value> {
        let object = self.get(rt, namespace, name)?;
        Ok(workloads::scale(&object))
    }

    fn write_scale(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        replicas: i64,
    ) -> ApiResult<Value> {
        if replicas < 0 {
            return Err(ApiError::invalid(
                rt,
                name,
                format!("spec.replicas: Invalid value: {replicas}: must be greater than or equal to 0"),
            ));
        }
        let mut object = self.get(rt, namespace, name)?;
        object["spec"]["replicas"] = json!(replicas);
        self.store(rt, namespace, name, object);
        self.scale_of(rt, namespace, name)
    }

    fn replace_scale(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        scale: &Value,
    ) -> ApiResult<Value> {
        let current = self.get(rt, namespace, name)?;
        Self::check_version(rt, name, &current, scale)?;
        let replicas = scale["spec"]["replicas"].as_i64().unwrap_or(0);
        self.write_scale(rt, namespace, name, replicas)
    }

    fn patch_scale(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        content_type: &str,
        patch: &Value,
    ) -> ApiResult<Value> {
        let mut scale = self.scale_of(rt, namespace, name)?;
        if content_type.starts_with("application/json-patch+json") {
            select::json_patch(&mut scale, patch).map_err(|m| ApiError::new(422, "Invalid", m))?;
        } else if content_type.starts_with("application/merge-patch+json")
            || content_type.starts_with("application/strategic-merge-patch+json")
        {
            let current = self.get(rt, namespace, name)?;
            Self::check_version(rt, name, &current, patch)?;
            select::merge_patch(&mut scale, patch);
        } else {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!("unsupported patch type {content_type:?} for scale"),
            ));
        }
        let replicas = scale["spec"]["replicas"]
            .as_i64()
            .ok_or_else(|| ApiError::invalid(rt, name, "spec.replicas: Required value"))?;
        self.write_scale(rt, namespace, name, replicas)
    }

    fn set_pod_ready(&mut self, namespace: &str, name: &str, ready: bool) {
        let rt = self.find_type("", "v1", "pods").cloned().expect("builtin");
        let Ok(mut pod) = self.get(&rt, namespace, name) else {
            return;
        };
        workloads::set_ready(&mut pod, ready);
        self.store(&rt, namespace, name, pod.clone());
        workloads::sync_owner_status(self, namespace, &pod);
    }
}

/// The API server's defaulting of the fields the emulator models: a
/// Deployment or StatefulSet written without `spec.replicas` gets 1.
fn default_fields(rt: &ResourceType, object: &mut Value) {
    if rt.scale && rt.group == "apps" && object["spec"].is_object() && object["spec"]["replicas"].is_null() {
        object["spec"]["replicas"] = json!(1);
    }
}

/// `status.x` paths of the top-level fields under `section`, with one path
/// per condition type (`status.conditions[type=Ready]`).
fn field_paths(section: &str, value: &Value) -> BTreeSet<String> {
    let Some(fields) = value.as_object() else {
        return BTreeSet::new();
    };
    let mut paths = BTreeSet::new();
    for (key, v) in fields {
        if key == "conditions" && v.is_array() {
            for c in v.as_array().into_iter().flatten() {
                if let Some(t) = c["type"].as_str() {
                    paths.insert(format!("{section}.conditions[type={t}]"));
                }
            }
        } else {
            paths.insert(format!("{section}.{key}"));
        }
    }
    paths
}

fn split_path(path: &str) -> (&str, &str, Option<&str>) {
    let (section, rest) = path.split_once('.').unwrap_or((path, ""));
    match rest.strip_prefix("conditions[type=") {
        Some(t) => (section, "conditions", Some(t.trim_end_matches(']'))),
        None => (section, rest, None),
    }
}

fn field_value<'a>(object: &'a Value, path: &str) -> Option<&'a Value> {
    let (section, field, condition) = split_path(path);
    let value = object.get(section)?.get(field)?;
    match condition {
        Some(t) => value.as_array()?.iter().find(|c| c["type"] == t),
        None => Some(value),
    }
}

fn set_field(object: &mut Value, path: &str, value: Value) {
    let (section, field, condition) = split_path(path);
    if !object[section].is_object() {
        object[section] = json!({});
    }
    match condition {
        Some(t) => {
            if !object[section][field].is_array() {
                object[section][field] = json!([]);
            }
            let list = object[section][field].as_array_mut().expect("made an array");
            match list.iter_mut().find(|c| c["type"] == t) {
                Some(existing) => *existing = value,
                None => list.push(value),
            }
        }
        None => object[section][field] = value,
    }
}

fn remove_field(object: &mut Value, path: &str) {
    let (section, field, condition) = split_path(path);
    let Some(section) = object.get_mut(section).and_then(Value::as_object_mut) else {
        return;
    };
    match condition {
        Some(t) => {
            if let Some(list) = section.get_mut(field).and_then(Value::as_array_mut) {
                list.retain(|c| c["type"] != t);
            }
        }
        None => {
            section.remove(field);
        }
    }
}

/// The five random-looking characters Kubernetes appends to generated names.
fn suffix(n: u64) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5bd1_e995;
    (0..5)
        .map(|_| {
            let c = ALPHABET[(x % ALPHABET.len() as u64) as usize] as char;
            x /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

fn valid_name(name: &str) -> bool {
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    name.len() <= 253
        && name.chars().all(|c| ok(c) || c == '-' || c == '.')
        && name.chars().next().is_some_and(ok)
        && name.chars().last().is_some_and(ok)
}
