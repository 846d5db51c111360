//! The Fly backend against the Machines API emulator and real PostgreSQL:
//! scale-up order, cloning, the drain protocol, leases, faults, maxStopped
//! and the template kept at zero, failed machines, auth and capacity, the
//! README's sequence on a fresh app — and the client's and emulator's JSON
//! against Fly's published OpenAPI schemas.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use controller::backend::fly::client::{ListFilter, StopMachine};
use controller::backend::fly::{FlyBackend, FlyClient, FlyError, FlySettings, RetryPolicy, Token};
use controller::backend::{Backend, BackendError, PoolRef};
use controller::manifest::{self, LoadedPool};
use controller::metrics::Metrics;
use controller::reconcile::{Context, Leadership, PoolReport, Reconciler};
use queue::{JobType, Queue, TaskType};
use serde_json::{json, Value};
use sqlx::PgPool;
use test_support::fly::openapi::Spec;
use test_support::fly::{Faults, FlyEmulator, LoggedRequest, MachineSeed, Timings};
use test_support::{enqueue_jobs, register_text_worker};

const APP: &str = "backlog";
const TOKEN: &str = "fm2_controller-token";

fn timings() -> Timings {
    Timings {
        create: Duration::from_millis(150),
        start: Duration::from_millis(30),
        stop: Duration::from_millis(50),
        suspend: Duration::from_millis(50),
        destroy: Duration::from_millis(20),
    }
}

async fn emulator() -> FlyEmulator {
    let emu = FlyEmulator::start(timings()).await;
    emu.add_app(APP);
    emu.add_token(TOKEN, Some(&[APP]));
    emu
}

fn backend_with_token(emu: &FlyEmulator, token: &str) -> FlyBackend {
    backend_waiting(emu, token, Duration::from_secs(10))
}

/// A backend that watches a machine boot for at most `wait_timeout`.
fn backend_waiting(emu: &FlyEmulator, token: &str, wait_timeout: Duration) -> FlyBackend {
    backend_in(emu, token, wait_timeout, None)
}

/// A backend whose controller runs in `own_app` (`FLY_APP_NAME`).
fn backend_in(emu: &FlyEmulator, token: &str, wait_timeout: Duration, own_app: Option<&str>) -> FlyBackend {
    let retry = RetryPolicy {
        attempts: 10,
        base: Duration::from_millis(20),
        cap: Duration::from_millis(400),
    };
    let client = FlyClient::new(&emu.base_url(), Token::new(token), retry, 4).unwrap();
    FlyBackend::new(
        client,
        FlySettings {
            stop_timeout: Duration::from_secs(5),
            wait_timeout,
            lease_ttl: Duration::from_secs(30),
            own_app: own_app.map(str::to_string),
        },
    )
}

fn backend(emu: &FlyEmulator) -> FlyBackend {
    backend_with_token(emu, TOKEN)
}

/// `count` more replicas for the first pool, straight through the backend.
async fn add(emu: &FlyEmulator, pools: &[LoadedPool], count: u32) -> Result<Vec<String>, BackendError> {
    backend(emu)
        .add(PoolRef::new(&pools[0], &Leadership::held()), count)
        .await
}

/// A machine of the `worker` group as `fly deploy` leaves it.
fn worker_config() -> Value {
    json!({
        "image": "registry.fly.io/backlog:deployment-01HQ",
        "metadata": {
            "fly_platform_version": "v2",
            "fly_process_group": "worker",
            "fly_release_id": "Rel_abc",
            "fly_release_version": "7",
        },
        "env": {"FLY_PROCESS_GROUP": "worker", "PRIMARY_REGION": "ord"},
        "init": {"cmd": ["worker", "--task-types", "text_generation,pdf_generation"]},
        "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 512},
        "restart": {"policy": "on-failure", "max_retries": 10},
        "standbys": ["0e286039f42e86"],
    })
}

fn seed(emu: &FlyEmulator, state: &str, region: &str) -> String {
    emu.seed_machine(
        APP,
        MachineSeed {
            region: region.into(),
            state: state.into(),
            config: worker_config(),
            image_ref: Some(json!({"registry": "registry.fly.io", "repository": "backlog",
                "tag": "deployment-01HQ", "digest": "sha256:feed"})),
        },
    )
}

fn pool_yaml(target: &str) -> String {
    format!(
        r#"
apiVersion: backlog.dev/v1alpha1
kind: WorkerPool
metadata: {{name: text}}
spec:
  taskTypes: [text_generation]
  target: {{fly: {target}}}
  maxReplicas: 4
  tasksPerReplica: 2
  cooldownPeriod: 0
  scaleDown: {{stabilizationWindowSeconds: 0}}
"#
    )
}

fn pools(yaml: &str) -> Vec<LoadedPool> {
    let mut m = manifest::Manifests::default();
    m.add_file(std::path::Path::new("fly.yaml"), yaml);
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    m.pools
}

fn reconciler(q: &Queue, backend: FlyBackend) -> Reconciler<FlyBackend> {
    Reconciler::new(Context {
        queue: q.clone(),
        backend,
        metrics: Arc::new(Metrics::default()),
    })
}

fn state_of(emu: &FlyEmulator, id: &str) -> String {
    emu.machine(APP, id).unwrap()["state"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Machine ids of the app in a state, sorted.
fn in_state(emu: &FlyEmulator, state: &str) -> Vec<String> {
    let mut ids: Vec<String> = emu
        .machines(APP)
        .iter()
        .filter(|m| m["state"] == state)
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..300 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

fn of<'a>(log: &'a [LoggedRequest], action: &str) -> Vec<&'a LoggedRequest> {
    log.iter()
        .filter(|r| r.action == action && r.status < 300)
        .collect()
}

async fn pass(r: &mut Reconciler<FlyBackend>, pools: &[LoadedPool], at_s: i64) -> Vec<PoolReport> {
    let base = chrono::DateTime::parse_from_rfc3339("2026-12-01T12:00:00Z")
        .unwrap()
        .to_utc();
    r.reconcile(pools, base + chrono::Duration::seconds(at_s)).await
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_group_at_zero_starts_its_stopped_machines_before_creating_any(pool: PgPool) {
    let emu = emulator().await;
    let stopped = [seed(&emu, "stopped", "ord"), seed(&emu, "suspended", "ams")];
    let q = Queue::new(pool);
    let pools = pools(&pool_yaml("{app: backlog, processGroup: worker, maxStopped: 2}"));
    let mut r = reconciler(&q, backend(&emu));
    enqueue_jobs(&q, JobType::Text, 7).await;

    let reports = pass(&mut r, &pools, 0).await;
    assert_eq!(reports.len(), 1, "the pass succeeded");
    assert_eq!(reports[0].decision.replicas, 4, "{}", reports[0].decision);

    let statuses = q.pool_statuses().await.unwrap();
    assert_eq!(statuses.len(), 1);
    let status = &statuses[0].status;
    assert_eq!(
        (
            status.pool.as_str(),
            status.backend.as_str(),
            status.desired_replicas,
            status.pending
        ),
        ("text", "fly", 4, 7),
        "the pass's status is published for GET /v1/pools"
    );
    assert!(
        status
            .conditions
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "Ready"),
        "{status:?}"
    );

    let log = emu.requests();
    let starts = of(&log, "start");
    let creates = of(&log, "create");
    let started: HashSet<_> = starts.iter().filter_map(|s| s.machine.clone()).collect();
    assert_eq!(
        started,
        stopped.iter().cloned().collect(),
        "both stopped machines started"
    );
    assert_eq!(creates.len(), 2, "only the shortfall is created");
    let last_start = starts.iter().map(|s| s.at).max().unwrap();
    assert!(
        creates.iter().all(|c| c.at > last_start),
        "every start precedes every create"
    );
    for start in &starts {
        assert!(start.nonce.is_some(), "start carries the lease nonce");
    }
    let regions: HashSet<&str> = creates
        .iter()
        .map(|c| c.request_body.as_ref().unwrap()["region"].as_str().unwrap())
        .collect();
    assert_eq!(
        regions,
        HashSet::from(["ams", "ord"]),
        "new machines go round-robin over the group's regions"
    );

    let b = backend(&emu);
    wait_until("four ready machines", || in_state(&emu, "started").len() == 4).await;
    let replicas = b
        .observe(PoolRef::new(&pools[0], &Leadership::held()))
        .await
        .unwrap();
    assert_eq!(
        (replicas.len(), replicas.iter().filter(|r| r.ready).count()),
        (4, 4)
    );
}

/// A start refused for room on the machine's host (409, "insufficient
/// memory") passes that machine over: the scale-up creates one instead.
/// It failed the whole pass, and since the most recently stopped machine is
/// tried first, every pass after it too.
#[tokio::test]
async fn a_stopped_machine_whose_host_is_full_is_passed_over() {
    let emu = emulator().await;
    let full = seed(&emu, "stopped", "ord");
    emu.set_faults(Faults {
        full_hosts: HashSet::from([full.clone()]),
        ..Faults::default()
    });
    let pools = pools(&pool_yaml("{app: backlog, processGroup: worker}"));

    let booted = add(&emu, &pools, 1).await.unwrap();

    assert_eq!(booted.len(), 1, "{booted:?}");
    assert_ne!(booted[0], full, "a new machine in its place");
    assert_eq!(in_state(&emu, "stopped"), [full]);
}

/// Fly asks for the instance when waiting for `stopped`; without it the
/// wait is refused (400), the lease was let go while the worker still
/// drained, and every stop logged a warning.
#[tokio::test]
async fn a_stop_is_watched_to_the_end_under_its_lease() {
    let emu = emulator().await;
    let machine = seed(&emu, "started", "ord");
    let pools = pools(&pool_yaml("{app: backlog, processGroup: worker, maxStopped: 1}"));
    let leading = Leadership::held();

    let stopped = backend(&emu)
        .remove(PoolRef::new(&pools[0], &leading), std::slice::from_ref(&machine))
        .await
        .unwrap();

    assert_eq!(stopped, std::slice::from_ref(&machine));
    let log = emu.requests();
    let waited = of(&log, "wait")
        .into_iter()
        .find(|w| w.query.iter().any(|(k, v)| k == "state" && v == "stopped"))
        .map(|w| w.at);
    let released = of(&log, "release_lease").last().map(|r| r.at);
    assert!(waited.is_some(), "the wait for stopped was answered: {log:?}");
    assert!(waited < released, "the lease is held until the machine stopped");
    assert_eq!(in_state(&emu, "stopped"), [machine]);
}

#[tokio::test]
async fn created_machines_clone_the_group_config_with_the_metadata_flyctl_needs() {
    let emu = emulator().await;
    let source = seed(&emu, "started", "ord");
    let pools = pools(&pool_yaml("{app: backlog, processGroup: worker}"));
    add(&emu, &pools, 2).await.unwrap();

    let created: Vec<Value> = emu
        .machines(APP)
        .into_iter()
        .filter(|m| m["id"] != source.as_str())
        .collect();
    assert_eq!(created.len(), 2);
    for machine in &created {
        let config = &machine["config"];
        assert_eq!(config["metadata"]["fly_platform_version"], "v2");
        assert_eq!(config["metadata"]["fly_process_group"], "worker");
        assert_eq!(
            config["metadata"]["fly_release_id"], "Rel_abc",
            "release metadata kept"
        );
        assert_eq!(config["metadata"]["fly_release_version"], "7");
        assert_eq!(
            config["image"], "registry.fly.io/backlog:deployment-01HQ@sha256:feed",
            "the full image reference, pinned by digest"
        );
        assert!(
            config.get("standbys").is_none(),
            "standby settings dropped: {config}"
        );
        assert_eq!(config["init"]["cmd"][0], "worker");
        assert_eq!(config["env"]["FLY_PROCESS_GROUP"], "worker");
        assert_eq!(config["guest"]["memory_mb"], 512);
        assert_eq!(machine["region"], "ord");
    }
}

/// The pass checks leadership before it scales, but one scale-up is many
/// writes. A controller that loses leadership after its first start starts
/// and creates nothing more, and leases nothing more: the new leader
/// decides from then on.
#[tokio::test]
async fn a_controller_that_loses_leadership_mid_scale_up_starts_and_creates_nothing_more() {
    let emu = emulator().await;
    for _ in 0..3 {
        seed(&emu, "stopped", "ord");
    }
    let pools = pools(&pool_yaml("{app: backlog, processGroup: worker}"));
    let leadership = Leadership::held();
    emu.on_machine_event(Arc::new({
        let leadership = leadership.clone();
        move |event| {
            if event.state == "starting" {
                leadership.set(false);
            }
        }
    }));

    let err = backend(&emu)
        .add(PoolRef::new(&pools[0], &leadership), 4)
        .await
        .unwrap_err();

    assert!(matches!(err, BackendError::LostLeadership { .. }), "{err}");
    let log = emu.requests();
    assert_eq!(of(&log, "start").len(), 1, "one start, then nothing: {log:?}");
    assert_eq!(of(&log, "lease").len(), 1, "no lease for a start not made");
    assert!(of(&log, "create").is_empty(), "no machine created");
    assert_eq!(in_state(&emu, "stopped").len(), 2);
}

/// Fly app names are global, so the app is rarely called `backlog`. A pool
/// that names no app (as the shipped `manifests/fly/pools.yaml` does)
/// scales the app its controller runs in; outside Fly, it says what to set.
#[tokio::test]
async fn a_pool_naming_no_app_scales_the_app_its_controller_runs_in() {
    let emu = emulator().await;
    seed(&emu, "stopped", "ord");
    let pools = pools(&pool_yaml("{processGroup: worker}"));
    let leading = Leadership::held();
    let text = PoolRef::new(&pools[0], &leading);

    let nowhere = backend_in(&emu, TOKEN, Duration::from_secs(10), None);
    let err = nowhere.add(text, 1).await.unwrap_err();
    assert!(err.to_string().contains("FLY_APP_NAME"), "{err}");

    let inside = backend_in(&emu, TOKEN, Duration::from_secs(10), Some(APP));
    assert_eq!(inside.add(text, 1).await.unwrap().len(), 1);
    assert_eq!(in_state(&emu, "started").len(), 1);
}

#[tokio::test]
async fn an_empty_group_needs_a_template_and_is_created_from_it() {
    let emu = emulator().await;
    let bare = pools(&pool_yaml("{app: backlog, processGroup: worker}"));
    let err = add(&emu, &bare, 1).await.unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("pool text")
            && message.contains("no machine to clone")
            && message.contains("template"),
        "{message}"
    );
    assert!(of(&emu.requests(), "create").is_empty(), "nothing created");

    let templated = pools(&pool_yaml(
        "{app: backlog, processGroup: worker, region: fra, template: {image: \"registry.fly.io/backlog:v1\", cmd: [worker, --task-types, text_generation], env: {LOG_FORMAT: json}}}",
    ));
    add(&emu, &templated, 1).await.unwrap();
    let machines = emu.machines(APP);
    assert_eq!(machines.len(), 1);
    let m = &machines[0];
    assert_eq!(
        (m["region"].as_str(), m["config"]["image"].as_str()),
        (Some("fra"), Some("registry.fly.io/backlog:v1"))
    );
    assert_eq!(m["config"]["metadata"]["fly_process_group"], "worker");
    assert_eq!(m["config"]["metadata"]["fly_platform_version"], "v2");
    assert_eq!(m["config"]["env"]["FLY_PROCESS_GROUP"], "worker");
    assert_eq!(
        m["config"]["init"]["cmd"],
        json!(["worker", "--task-types", "text_generation"])
    );
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn scale_down_never_stops_a_machine_that_holds_a_task(pool: PgPool) {
    let emu = emulator().await;
    let machines: Vec<String> = (0..3).map(|_| seed(&emu, "started", "ord")).collect();
    let q = Queue::new(pool);
    for m in &machines {
        register_text_worker(&q, m).await;
    }
    enqueue_jobs(&q, JobType::Text, 1).await;
    let busy = machines[1].clone();
    let held = q.claim(&busy, &[TaskType::TextGeneration], 1).await.unwrap();
    assert_eq!(held.len(), 1);
    let pools = pools(&pool_yaml("{app: backlog, processGroup: worker, maxStopped: 5}"));
    let mut r = reconciler(&q, backend(&emu));

    let reports = pass(&mut r, &pools, 0).await;
    assert_eq!(reports.len(), 1, "the pass succeeded");
    let report = &reports[0];
    assert_eq!(report.decision.replicas, 1, "{}", report.decision);
    let mut removed = report.removed.clone();
    removed.sort();
    let mut idle: Vec<String> = machines.iter().filter(|m| **m != busy).cloned().collect();
    idle.sort();
    assert_eq!(removed, idle, "only the idle machines are removed");
    assert_eq!(state_of(&emu, &busy), "started", "the busy machine runs on");
    assert_eq!(in_state(&emu, "stopped"), idle);

    let log = emu.requests();
    let stops = of(&log, "stop");
    assert_eq!(stops.len(), 2);
    for stop in stops {
        assert_eq!(
            stop.request_body,
            Some(json!({"signal": "SIGTERM", "timeout": "5s"}))
        );
        assert!(stop.nonce.is_some(), "stop carries the lease nonce");
    }
    assert!(log
        .iter()
        .all(|l| l.machine.as_deref() != Some(busy.as_str()) || l.action == "get"));
    assert_eq!(
        of(&log, "release_lease").len(),
        2,
        "every lease taken is released"
    );
}

/// Fly keeps a machine in `created` until someone starts it (`skip_launch`,
/// or a launch that never began). It runs nothing, so it is no replica: the
/// pool starts it as it would a stopped one, instead of holding at a count
/// that serves no task while the queue waits.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_machine_left_in_created_is_started_not_counted(pool: PgPool) {
    let emu = emulator().await;
    let created = seed(&emu, "created", "ord");
    let q = Queue::new(pool);
    let pools = pools(&pool_yaml("{app: backlog, processGroup: worker}"));
    let mut r = reconciler(&q, backend(&emu));
    enqueue_jobs(&q, JobType::Text, 1).await;

    let reports = pass(&mut r, &pools, 0).await;
    assert_eq!(reports.len(), 1, "the pass succeeded");
    assert_eq!(reports[0].decision.replicas, 1, "{}", reports[0].decision);
    let log = emu.requests();
    let started: Vec<String> = of(&log, "start")
        .iter()
        .filter_map(|s| s.machine.clone())
        .collect();
    assert_eq!(started, vec![created.clone()], "the created machine is started");
    assert!(of(&log, "create").is_empty(), "no machine is created beside it");
    wait_until("the machine to run", || state_of(&emu, &created) == "started").await;
}

/// A stop that took effect but whose answer was lost (a 503) is retried by
/// the client, and the retry meets a machine already stopping: its 412
/// means the stop is done, not that the pass failed.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_stop_whose_answer_was_lost_still_counts_as_done(pool: PgPool) {
    let emu = emulator().await;
    let mut machines: Vec<String> = (0..2).map(|_| seed(&emu, "started", "ord")).collect();
    machines.sort();
    let q = Queue::new(pool);
    for m in &machines {
        register_text_worker(&q, m).await;
    }
    emu.set_faults(Faults {
        lost_answers: HashMap::from([("stop", 1)]),
        ..Faults::default()
    });
    let pools = pools(&pool_yaml("{app: backlog, processGroup: worker, maxStopped: 5}"));
    let mut r = reconciler(&q, backend(&emu));

    let reports = pass(&mut r, &pools, 0).await;
    assert_eq!(reports.len(), 1, "the pass succeeded");
    let mut removed = reports[0].removed.clone();
    removed.sort();
    assert_eq!(removed, machines, "both stops are reported");
    wait_until("both machines to stop", || in_state(&emu, "stopped") == machines).await;
    let log = emu.requests();
    assert!(
        log.iter().any(|l| l.action == "stop" && l.injected),
        "a stop's answer was lost"
    );
    assert!(
        log.iter().any(|l| l.action == "stop" && l.status == 412),
        "its retry met a machine no longer running"
    );
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_lease_held_elsewhere_skips_that_machine_without_an_error_storm(pool: PgPool) {
    let emu = emulator().await;
    let deploying = seed(&emu, "started", "ord");
    let free = seed(&emu, "started", "ord");
    let q = Queue::new(pool);
    register_text_worker(&q, &deploying).await;
    register_text_worker(&q, &free).await;
    emu.hold_lease(APP, &deploying, "deployer@example.com", Duration::from_secs(300));
    let pools = pools(&pool_yaml("{app: backlog, processGroup: worker, maxStopped: 5}"));
    let mut r = reconciler(&q, backend(&emu));

    // 20 s apart: the policy takes one removal step per 15 s period.
    for i in 0..3 {
        let reports = pass(&mut r, &pools, i * 20).await;
        assert_eq!(reports.len(), 1, "pass {i} reported no error");
    }
    assert_eq!(state_of(&emu, &free), "stopped");
    assert_eq!(
        state_of(&emu, &deploying),
        "started",
        "the leased machine is left alone"
    );
    let log = emu.requests();
    let on_leased: Vec<&LoggedRequest> = log
        .iter()
        .filter(|l| l.machine.as_deref() == Some(deploying.as_str()))
        .collect();
    assert_eq!(
        on_leased.iter().map(|l| (l.action, l.status)).collect::<Vec<_>>(),
        vec![("lease", 409); 3],
        "one lease attempt per pass, never retried, never broken"
    );
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn the_group_converges_through_injected_faults_within_the_rate_limits(pool: PgPool) {
    let emu = emulator().await;
    seed(&emu, "stopped", "ord");
    seed(&emu, "started", "ams");
    emu.set_faults(Faults {
        error_fraction: 0.3,
        ..Faults::default()
    });
    let q = Queue::new(pool);
    let pools = pools(&pool_yaml("{app: backlog, processGroup: worker, maxStopped: 1}"));
    let mut r = reconciler(&q, backend(&emu));
    enqueue_jobs(&q, JobType::Text, 8).await;

    let mut converged = false;
    for i in 0..40 {
        pass(&mut r, &pools, i * 5).await;
        if in_state(&emu, "started").len() == 4 {
            converged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        converged,
        "4 machines started: {:?}",
        emu.machines(APP).iter().map(|m| &m["state"]).collect::<Vec<_>>()
    );
    assert_eq!(emu.machines(APP).len(), 4, "no machine created twice");

    // Work done: every machine registered and idle, so the group drains to zero.
    for id in in_state(&emu, "started") {
        register_text_worker(&q, &id).await;
    }
    let tasks = q
        .claim("elsewhere", &[TaskType::TextGeneration], 100)
        .await
        .unwrap();
    let results: Vec<_> = tasks.iter().map(|t| (t.lease(), json!({}))).collect();
    q.complete_batch("elsewhere", &results).await.unwrap();
    let mut drained = false;
    for i in 0..40 {
        pass(&mut r, &pools, 1000 + i * 5).await;
        if in_state(&emu, "started").is_empty() && in_state(&emu, "stopped").len() <= 1 {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        drained,
        "{:?}",
        emu.machines(APP).iter().map(|m| &m["state"]).collect::<Vec<_>>()
    );

    let log = emu.requests();
    let injected = log.iter().filter(|l| l.injected).count();
    assert!(
        injected >= 5,
        "faults were injected ({injected} of {})",
        log.len()
    );
    let limited: Vec<_> = log
        .iter()
        .filter(|l| l.rate_limited)
        .map(|l| (l.action, &l.machine))
        .collect();
    assert!(
        limited.is_empty(),
        "the client stayed within Fly's rate limits: {limited:?}"
    );
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn max_stopped_is_kept_and_the_oldest_stopped_machines_are_destroyed(pool: PgPool) {
    let emu = emulator().await;
    // Seeded in order: each one stopped a second after the one before.
    let old: Vec<String> = (0..4).map(|_| seed(&emu, "stopped", "ord")).collect();
    let running = [seed(&emu, "started", "ord"), seed(&emu, "started", "ord")];
    let q = Queue::new(pool);
    for m in &running {
        register_text_worker(&q, m).await;
    }
    let pools = pools(&pool_yaml("{app: backlog, processGroup: worker, maxStopped: 3}"));
    let mut r = reconciler(&q, backend(&emu));

    let reports = pass(&mut r, &pools, 0).await;
    assert_eq!(reports[0].removed.len(), 2, "{}", reports[0].decision);
    wait_until("destroys to finish", || in_state(&emu, "destroying").is_empty()).await;
    let mut expected_destroyed = old[..3].to_vec();
    expected_destroyed.sort();
    assert_eq!(
        in_state(&emu, "destroyed"),
        expected_destroyed,
        "the three oldest stopped are destroyed"
    );
    let mut kept = vec![old[3].clone(), running[0].clone(), running[1].clone()];
    kept.sort();
    assert_eq!(
        in_state(&emu, "stopped"),
        kept,
        "maxStopped=3 newest stopped kept"
    );
    for destroy in of(&emu.requests(), "destroy") {
        assert!(destroy.nonce.is_some(), "destroy carries the lease nonce");
    }
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn at_zero_one_stopped_machine_is_kept_and_the_group_scales_back_up_from_it(pool: PgPool) {
    let emu = emulator().await;
    let running = [seed(&emu, "started", "ord"), seed(&emu, "started", "ams")];
    let q = Queue::new(pool);
    // No maxStopped and no template: what a new user writes first.
    let pools = pools(&pool_yaml("{app: backlog, processGroup: worker}"));
    let mut r = reconciler(&q, backend(&emu));

    let reports = pass(&mut r, &pools, 0).await;
    assert_eq!(reports[0].decision.replicas, 0, "{}", reports[0].decision);
    assert_eq!(reports[0].removed.len(), 2);
    wait_until("destroys to finish", || in_state(&emu, "destroying").is_empty()).await;
    let kept = in_state(&emu, "stopped");
    assert_eq!(kept.len(), 1, "one stopped machine kept as the group's template");
    assert!(running.contains(&kept[0]));
    assert_eq!(in_state(&emu, "destroyed").len(), 1);

    enqueue_jobs(&q, JobType::Text, 5).await;
    let reports = pass(&mut r, &pools, 60).await;
    assert_eq!(
        reports.len(),
        1,
        "the scale-up from zero succeeded without `fly deploy`"
    );
    assert_eq!(reports[0].decision.replicas, 3, "{}", reports[0].decision);
    wait_until("three started machines", || in_state(&emu, "started").len() == 3).await;
    let log = emu.requests();
    assert_eq!(
        of(&log, "start")
            .iter()
            .filter_map(|s| s.machine.clone())
            .collect::<Vec<_>>(),
        kept,
        "the kept machine is started first"
    );
    for create in of(&log, "create") {
        let config = &create.request_body.as_ref().unwrap()["config"];
        assert_eq!(config["init"]["cmd"][0], "worker", "cloned from the kept machine");
        assert_eq!(config["metadata"]["fly_process_group"], "worker");
    }
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_failed_machine_is_destroyed_and_replaced_and_the_status_says_so(pool: PgPool) {
    let emu = emulator().await;
    seed(&emu, "started", "ord");
    let q = Queue::new(pool);
    let pools = pools(&pool_yaml("{app: backlog, processGroup: worker}"));
    // A failed boot never reaches `started`: watch it for a second only.
    let mut r = reconciler(&q, backend_waiting(&emu, TOKEN, Duration::from_secs(1)));
    enqueue_jobs(&q, JobType::Text, 4).await;

    emu.fail_next_boots(1);
    let reports = pass(&mut r, &pools, 0).await;
    assert_eq!((reports[0].decision.from, reports[0].decision.replicas), (1, 2));
    wait_until("the new machine to fail", || in_state(&emu, "failed").len() == 1).await;
    let failed = in_state(&emu, "failed").remove(0);

    let reports = pass(&mut r, &pools, 15).await;
    assert_eq!(
        (reports[0].decision.from, reports[0].decision.replicas),
        (1, 2),
        "a failed machine is no replica"
    );
    wait_until("the failed machine destroyed", || {
        state_of(&emu, &failed) == "destroyed"
    })
    .await;
    wait_until("two started machines", || in_state(&emu, "started").len() == 2).await;
    let destroy = of(&emu.requests(), "destroy")
        .into_iter()
        .find(|d| d.machine.as_deref() == Some(failed.as_str()))
        .cloned()
        .expect("the failed machine destroyed through the API");
    assert!(destroy.nonce.is_some(), "under its lease");

    let degraded = |statuses: &[queue::PoolStatusRecord]| -> Value {
        let conditions = statuses[0].status.conditions.as_array().unwrap().clone();
        conditions
            .into_iter()
            .find(|c| c["type"] == "Degraded")
            .expect("a Degraded condition")
    };
    let condition = degraded(&q.pool_statuses().await.unwrap());
    assert_eq!(
        (condition["status"].as_str(), condition["reason"].as_str()),
        (Some("True"), Some("FailedMachinesReplaced"))
    );
    assert!(
        condition["message"].as_str().unwrap().contains(&failed),
        "{condition}"
    );

    // Ten minutes on with nothing failing, the condition clears and still
    // names what was replaced.
    pass(&mut r, &pools, 15 + 700).await;
    let condition = degraded(&q.pool_statuses().await.unwrap());
    assert_eq!(
        (condition["status"].as_str(), condition["reason"].as_str()),
        (Some("False"), Some("NoFailedMachines"))
    );
    assert!(condition["message"].as_str().unwrap().contains(&failed));
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_rejected_token_is_reported_and_nothing_else_is_attempted(pool: PgPool) {
    let emu = emulator().await;
    seed(&emu, "stopped", "ord");
    emu.add_token("other-app-token", Some(&["someone-else"]));
    let q = Queue::new(pool);
    enqueue_jobs(&q, JobType::Text, 4).await;
    let pools = pools(&pool_yaml("{app: backlog, processGroup: worker}"));

    for (token, status) in [("fm2_revoked", 401), ("other-app-token", 403)] {
        emu.clear_requests();
        let b = backend_with_token(&emu, token);
        let err = b
            .observe(PoolRef::new(&pools[0], &Leadership::held()))
            .await
            .unwrap_err();
        assert!(matches!(err, BackendError::Unauthorized { .. }), "{err}");
        let message = err.to_string();
        assert!(
            message.contains("pool text") && message.contains("FLY_API_TOKEN"),
            "{message}"
        );
        let mut r = reconciler(&q, b);
        assert!(
            pass(&mut r, &pools, 0).await.is_empty(),
            "the pass failed for the pool"
        );
        let log = emu.requests();
        assert_eq!(
            log.iter().map(|l| (l.action, l.status)).collect::<Vec<_>>(),
            vec![("list", status); 2],
            "one list per attempt, no retries, no start or create"
        );
    }
}

#[tokio::test]
async fn no_capacity_in_one_region_moves_creation_to_the_next() {
    let emu = emulator().await;
    seed(&emu, "started", "ams");
    seed(&emu, "started", "ord");
    emu.set_faults(Faults {
        no_capacity_regions: HashSet::from(["ams".to_string()]),
        ..Faults::default()
    });
    let pools = pools(&pool_yaml("{app: backlog, processGroup: worker}"));
    add(&emu, &pools, 2).await.unwrap();
    let log = emu.requests();
    let creates: Vec<(String, u16)> = log
        .iter()
        .filter(|l| l.action == "create")
        .map(|l| {
            (
                l.request_body.as_ref().unwrap()["region"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                l.status,
            )
        })
        .collect();
    assert!(creates.contains(&("ams".into(), 422)), "{creates:?}");
    let created: Vec<&(String, u16)> = creates.iter().filter(|c| c.1 == 200).collect();
    assert_eq!(created.len(), 2);
    assert!(created.iter().all(|c| c.0 == "ord"), "{creates:?}");
    let capacity_error = log.iter().find(|l| l.status == 422).unwrap();
    assert_eq!(
        capacity_error.response_body.as_ref().unwrap()["status"],
        "insufficient_capacity"
    );
}

/// The spec's path template for a logged request (`/v1` dropped, names replaced).
fn spec_path(log: &LoggedRequest) -> String {
    let rest = log.path.trim_start_matches("/v1");
    let rest = rest.replacen(&format!("/apps/{}", log.app), "/apps/{app_name}", 1);
    match &log.machine {
        Some(id) => rest.replacen(&format!("/machines/{id}"), "/machines/{machine_id}", 1),
        None => rest,
    }
}

/// Every request body the client sent and every answer the emulator gave,
/// checked against Fly's published schemas.
fn check_against_the_spec(log: &[LoggedRequest]) -> usize {
    let spec = Spec::load();
    let mut problems = Vec::new();
    let mut checked = 0;
    for entry in log {
        let path = spec_path(entry);
        let method = entry.method.to_lowercase();
        let what = format!("{} {} → {}", entry.method, entry.path, entry.status);
        if let Some(body) = &entry.request_body {
            let schema = spec
                .request_schema(&path, &method)
                .unwrap_or_else(|| panic!("{what}: the spec has no request body for {method} {path}"));
            problems.extend(
                spec.validate(&schema, body)
                    .into_iter()
                    .map(|p| format!("{what} request: {p}")),
            );
            checked += 1;
        }
        let Some(body) = &entry.response_body else {
            continue;
        };
        let schema = if entry.status >= 400 {
            Some(Spec::component("ErrorResponse"))
        } else if entry.action == "lease" {
            // Today's API wraps the spec's Lease in {status, data}.
            assert_eq!(body["status"], "success", "{what}");
            problems.extend(
                spec.validate(&Spec::component("Lease"), &body["data"])
                    .into_iter()
                    .map(|p| format!("{what} lease: {p}")),
            );
            checked += 1;
            None
        } else {
            spec.response_schema(&path, &method, entry.status)
        };
        if let Some(schema) = schema {
            problems.extend(
                spec.validate(&schema, body)
                    .into_iter()
                    .map(|p| format!("{what} response: {p}")),
            );
            checked += 1;
        }
    }
    assert!(
        problems.is_empty(),
        "not as Fly's spec says:\n{}",
        problems.join("\n")
    );
    checked
}

#[tokio::test]
async fn client_and_emulator_speak_the_published_schemas_and_the_emulator_keeps_the_contract() {
    let emu = emulator().await;
    for _ in 0..450 {
        seed(&emu, "stopped", "ord");
    }
    let other = emu.seed_machine(
        APP,
        MachineSeed {
            region: "ams".into(),
            state: "started".into(),
            config: json!({"image": "x/app:1", "metadata": {"fly_process_group": "app"}}),
            image_ref: None,
        },
    );
    // The OpenAPI document's server URL, `/v1` and all, works as the base.
    let spec_style = format!("{}/v1/", emu.base_url());
    let client = FlyClient::new(&spec_style, Token::new(TOKEN), RetryPolicy::default(), 4).unwrap();
    let filter = ListFilter {
        metadata: vec![("fly_process_group".into(), "worker".into())],
        ..ListFilter::default()
    };
    let listed = client.list(APP, &filter).await.unwrap();
    assert_eq!(
        listed.len(),
        450,
        "every page followed, the other group filtered out"
    );
    let log = emu.requests();
    assert_eq!(of(&log, "list").len(), 3, "200 + 200 + 50 via fly-next-cursor");
    assert_eq!(
        client
            .list(
                APP,
                &ListFilter {
                    region: Some("ams".into()),
                    ..ListFilter::default()
                }
            )
            .await
            .unwrap()
            .iter()
            .map(|m| m.id.clone())
            .collect::<Vec<_>>(),
        vec![other.clone()]
    );
    assert_eq!(
        client
            .list(
                APP,
                &ListFilter {
                    states: vec!["started".into()],
                    ..ListFilter::default()
                }
            )
            .await
            .unwrap()
            .len(),
        1
    );

    // A machine's life: create, lease, wait, stop, update, destroy.
    // (The `app` group has no stopped machine, so this is a create.)
    let pools = pools(&pool_yaml("{app: backlog, processGroup: app}"));
    add(&emu, &pools, 1).await.unwrap();
    let created = of(&emu.requests(), "create")[0].response_body.clone().unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(state_of(&emu, &id), "started");
    let lease = client
        .acquire_lease(APP, &id, Duration::from_secs(30), "test")
        .await
        .unwrap();
    let held = client
        .acquire_lease(APP, &id, Duration::from_secs(30), "second")
        .await
        .unwrap_err();
    assert!(matches!(held, FlyError::LeaseHeld { .. }), "{held}");
    let stop = StopMachine {
        signal: "SIGTERM".into(),
        timeout: "10s".into(),
    };
    let no_nonce = client.stop(APP, &id, &stop, None).await.unwrap_err();
    assert!(
        matches!(no_nonce, FlyError::Api { status: 409, .. }),
        "a leased machine needs the nonce: {no_nonce}"
    );
    let instance = created["instance_id"].as_str();
    let no_instance = client
        .wait(APP, &id, "stopped", None, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(
        matches!(no_instance, FlyError::Api { status: 400, .. }),
        "waiting for stopped names the instance: {no_instance}"
    );
    let timed_out = client
        .wait(APP, &id, "stopped", instance, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(
        matches!(timed_out, FlyError::WaitTimedOut { .. }),
        "408 from /wait: {timed_out}"
    );
    client.stop(APP, &id, &stop, Some(&lease.nonce)).await.unwrap();
    client
        .wait(APP, &id, "stopped", instance, Duration::from_secs(10))
        .await
        .unwrap();
    let machine = client.get(APP, &id).await.unwrap();
    let mut config = machine.config.clone().unwrap();
    config.env.insert("EXTRA".into(), "1".into());
    let stale = client
        .update(
            APP,
            &id,
            &config,
            Some("01STALEVERSION0000000000000"),
            Some(&lease.nonce),
        )
        .await
        .unwrap_err();
    assert!(matches!(stale, FlyError::Api { status: 409, .. }), "{stale}");
    let updated = client
        .update(APP, &id, &config, Some(&machine.instance_id), Some(&lease.nonce))
        .await
        .unwrap();
    assert_ne!(
        updated.instance_id, machine.instance_id,
        "an update is a new version"
    );
    client.release_lease(APP, &id, &lease.nonce).await.unwrap();
    let running = client.destroy(APP, &other, false, None).await.unwrap_err();
    assert!(matches!(running, FlyError::Api { status: 412, .. }), "{running}");
    client.destroy(APP, &other, true, None).await.unwrap();
    client
        .wait(APP, &other, "destroyed", None, Duration::from_secs(10))
        .await
        .unwrap();
    let deleted = ListFilter {
        include_deleted: true,
        ..ListFilter::default()
    };
    assert_eq!(client.list(APP, &deleted).await.unwrap().len(), 452);
    assert_eq!(client.list(APP, &ListFilter::default()).await.unwrap().len(), 451);

    // A lease expires with its TTL, and then anyone may take it.
    let short = emu.hold_lease(APP, &id, "deployer@example.com", Duration::from_millis(300));
    assert!(!short.is_empty());
    let early = client
        .acquire_lease(APP, &id, Duration::from_secs(5), "too early")
        .await
        .unwrap_err();
    assert!(matches!(early, FlyError::LeaseHeld { .. }), "{early}");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    client
        .acquire_lease(APP, &id, Duration::from_secs(5), "after expiry")
        .await
        .unwrap();

    // Fly's limits, server side: 1/s with bursts of 3 per action and machine.
    let raw = reqwest::Client::new();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let response = raw
            .post(format!("{}/v1/apps/{APP}/machines/{id}/suspend", emu.base_url()))
            .header("authorization", format!("FlyV1 {TOKEN}"))
            .send()
            .await
            .unwrap();
        statuses.push((
            response.status().as_u16(),
            response.headers().contains_key("retry-after"),
        ));
    }
    assert_eq!(statuses[3..], [(429, true), (429, true)], "{statuses:?}");
    let unauthorized = raw
        .get(format!("{}/v1/apps/{APP}/machines", emu.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);

    let checked = check_against_the_spec(&emu.requests());
    assert!(checked > 20, "{checked} bodies checked");
}

/// `fly.toml` as Fly reads it: the four process groups run binaries this
/// workspace builds, the HTTP service and its checks are the API's only.
#[test]
fn fly_toml_runs_every_group_with_a_real_binary() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("fly.toml")).expect("fly.toml at the repository root");
    let doc: toml::Table = toml::from_str(&text).expect("fly.toml is TOML");
    let processes = doc["processes"].as_table().expect("[processes]");
    let names: Vec<&str> = processes.keys().map(String::as_str).collect();
    assert_eq!(names, ["app", "audiobook-worker", "controller", "worker"]);
    // Binaries the workspace declares: src/main.rs of a package, or src/bin/*.rs.
    let binaries: HashSet<String> = ["api", "workers", "controller"]
        .iter()
        .flat_map(|package| {
            let dir = root.join(package).join("src/bin");
            let mut bins: Vec<String> = std::fs::read_dir(&dir)
                .map(|entries| {
                    entries
                        .filter_map(|e| e.ok()?.path().file_stem()?.to_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            if root.join(package).join("src/main.rs").exists() {
                bins.push(package.to_string());
            }
            bins
        })
        .collect();
    let command = |group: &str| -> Vec<String> {
        let line = processes[group]
            .as_str()
            .unwrap_or_else(|| panic!("{group}: a command string"));
        assert!(
            !line.trim().is_empty(),
            "process group {group} has an empty command"
        );
        assert!(
            !line.contains('&') && !line.contains(';'),
            "{group}: one supervised program, not a shell list"
        );
        line.split_whitespace().map(str::to_string).collect()
    };
    for group in &names {
        let argv = command(group);
        assert!(
            binaries.contains(&argv[0]),
            "{group} runs {:?}, which the workspace does not build",
            argv[0]
        );
    }
    assert_eq!(command("app")[0], "api");
    assert_eq!(
        command("worker")[..3],
        ["worker", "--task-types", "text_generation,pdf_generation"]
    );
    assert_eq!(command("audiobook-worker")[0], "audio-worker");
    let controller = command("controller");
    assert_eq!(controller[..4], ["controller", "run", "--backend", "fly"]);
    let pools_file = controller
        .iter()
        .skip_while(|a| *a != "-f")
        .nth(1)
        .expect("controller -f <pools>");
    let in_repo = root.join(pools_file.trim_start_matches("/app/"));
    let loaded = manifest::load(&in_repo);
    assert!(
        loaded.errors.is_empty(),
        "{}: {:?}",
        in_repo.display(),
        loaded.errors
    );
    let groups: HashSet<String> = loaded
        .pools
        .iter()
        .map(|p| match &p.pool.spec.target {
            controller::spec::Target::Fly(fly) => fly.process_group.clone(),
            other => panic!("{} targets {}", p.name(), other.backend()),
        })
        .collect();
    assert_eq!(
        groups,
        HashSet::from(["worker".to_string(), "audiobook-worker".to_string()])
    );
    // A machine runs as many tasks at once as its pool sizes it for: more,
    // and the first machine up takes the work the others were started for.
    for loaded in &loaded.pools {
        let controller::spec::Target::Fly(fly) = &loaded.pool.spec.target else {
            unreachable!("checked above")
        };
        let argv = command(&fly.process_group);
        let concurrency = argv
            .iter()
            .skip_while(|a| *a != "--concurrency")
            .nth(1)
            .map(|n| n.parse::<i32>().unwrap())
            .or_else(|| {
                doc["env"]
                    .get("WORKER_CONCURRENCY")
                    .map(|v| v.as_str().unwrap().parse().unwrap())
            })
            .unwrap_or(4); // the workers' default
        assert_eq!(
            concurrency, loaded.pool.spec.tasks_per_replica,
            "{}: --concurrency vs its pool's tasksPerReplica",
            fly.process_group
        );
    }

    // Inside Fly the controller reaches the Machines API on the private
    // network (Fly's documented endpoint); the binary's default is the
    // public one, for a controller run from elsewhere.
    assert_eq!(
        doc["env"].get("FLY_API_BASE_URL").and_then(|v| v.as_str()),
        Some("http://_api.internal:4280")
    );

    let service = doc["http_service"].as_table().expect("[http_service]");
    assert_eq!(service["internal_port"].as_integer(), Some(8787));
    assert_eq!(
        service["processes"].as_array().unwrap(),
        &vec![toml::Value::from("app")]
    );
    let checks: Vec<&str> = service["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["path"].as_str().unwrap())
        .collect();
    assert_eq!(checks, ["/healthz", "/readyz"]);
    assert_eq!(doc["deploy"]["release_command"].as_str(), Some("api migrate"));

    // Fly scrapes [metrics] on every machine: each binary serves /metrics
    // there, the API only on METRICS_ADDR (never on its own port).
    let metrics = doc["metrics"].as_table().expect("[metrics]");
    assert_eq!(metrics["path"].as_str(), Some("/metrics"));
    let port = metrics["port"].as_integer().expect("[metrics] port");
    assert_ne!(port, 8787, "not the API's own port");
    for variable in ["METRICS_ADDR", "WORKER_METRICS_ADDR", "CONTROLLER_METRICS_ADDR"] {
        assert_eq!(
            doc["env"][variable].as_str(),
            Some(format!("0.0.0.0:{port}").as_str()),
            "{variable} serves the port [metrics] scrapes"
        );
    }
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).expect("Dockerfile");
    for program in ["api", "worker", "audio-worker", "controller", "espeak-ng"] {
        assert!(dockerfile.contains(program), "the image carries {program}");
    }
}

/// Real worker processes, one per started machine (`FLY_MACHINE_ID` = the
/// machine id), given SIGTERM when their machine stops.
#[derive(Default)]
struct MachineProcesses {
    running: std::sync::Mutex<std::collections::HashMap<String, std::process::Child>>,
    stopped: std::sync::Mutex<Vec<std::process::Child>>,
    most_running: std::sync::atomic::AtomicUsize,
}

impl MachineProcesses {
    fn on_event(
        &self,
        event: &test_support::fly::MachineEvent,
        worker: &std::path::Path,
        env: &[(&str, String)],
    ) {
        match event.state.as_str() {
            "started" => {
                let child = std::process::Command::new(worker)
                    .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                    .env("FLY_MACHINE_ID", &event.machine)
                    .stdin(std::process::Stdio::null())
                    .spawn()
                    .expect("start a worker for the machine");
                let mut running = self.running.lock().unwrap();
                running.insert(event.machine.clone(), child);
                self.most_running
                    .fetch_max(running.len(), std::sync::atomic::Ordering::SeqCst);
            }
            "stopping" | "destroying" => {
                if let Some(child) = self.running.lock().unwrap().remove(&event.machine) {
                    // SAFETY: kill(2) on a child this test started.
                    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
                    self.stopped.lock().unwrap().push(child);
                }
            }
            _ => {}
        }
    }

    fn stop_all(&self) {
        let running: Vec<_> = self.running.lock().unwrap().drain().map(|(_, c)| c).collect();
        for child in &running {
            // SAFETY: as above.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        }
        for mut child in running.into_iter().chain(self.stopped.lock().unwrap().drain(..)) {
            let _ = child.wait();
        }
    }
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn fly_machines_running_real_workers_rise_finish_the_queue_and_stop(pool: PgPool) {
    let worker = test_support::workspace_binary("workers", "worker");
    let dir = tempfile::tempdir().unwrap();
    let env = vec![
        ("DATABASE_URL", test_support::database_url(&pool)),
        ("LLM_PROVIDER", "offline".to_string()),
        ("ARTIFACT_STORE", format!("file://{}", dir.path().display())),
        ("WORKER_TASK_TYPES", "text_generation".to_string()),
        ("WORKER_POOL", "text".to_string()),
        ("WORKER_CONCURRENCY", "2".to_string()),
        ("WORKER_HEARTBEAT_SECONDS", "0.5".to_string()),
        ("LOG_FORMAT", "text".to_string()),
        ("RUST_LOG", "warn".to_string()),
    ];
    let emu = emulator().await;
    let processes = Arc::new(MachineProcesses::default());
    emu.on_machine_event(Arc::new({
        let processes = processes.clone();
        move |event| processes.on_event(event, &worker, &env)
    }));
    seed(&emu, "stopped", "ord");
    let q = Queue::new(pool.clone());
    enqueue_jobs(&q, JobType::Text, 120).await;

    let manifest = dir.path().join("pools.yaml");
    std::fs::write(
        &manifest,
        pool_yaml("{app: backlog, processGroup: worker, maxStopped: 1}")
            .replace("maxReplicas: 4", "maxReplicas: 3")
            .replace("cooldownPeriod: 0", "cooldownPeriod: 2")
            // One removal step a second, not HPA's 15 s: the test waits on
            // the way down to zero.
            .replace(
                "scaleDown: {stabilizationWindowSeconds: 0}",
                "scaleDown: {stabilizationWindowSeconds: 0, periodSeconds: 1}",
            ),
    )
    .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let controller = tokio::spawn(controller::reconcile::run(
        reconciler(&q, backend(&emu)),
        controller::reconcile::ManifestSource::new(manifest),
        controller::reconcile::LoopSettings {
            tick: Duration::from_millis(300),
            leader_key: 11,
        },
        shutdown.clone(),
    ));

    let mut done = false;
    for _ in 0..600 {
        let unfinished: i64 = sqlx::query_scalar("SELECT count(*) FROM all_tasks WHERE status <> 'complete'")
            .fetch_one(&pool)
            .await
            .unwrap();
        if unfinished == 0 && in_state(&emu, "started").is_empty() && in_state(&emu, "stopping").is_empty() {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    controller.await.unwrap().unwrap();
    processes.stop_all();
    assert!(
        done,
        "every task complete and every machine stopped: {:?}",
        emu.machines(APP)
            .iter()
            .map(|m| (&m["id"], &m["state"]))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        processes.most_running.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "machines rose to maxReplicas"
    );
    let (retried, with_error) = test_support::retried_and_errored_tasks(&pool).await;
    assert_eq!(
        (retried, with_error),
        (0, 0),
        "no task was interrupted by a scale-down"
    );
    assert!(in_state(&emu, "stopped").len() <= 1, "maxStopped=1");
    let claimed_by: Vec<String> = sqlx::query_scalar("SELECT DISTINCT claimed_by FROM all_tasks")
        .fetch_all(&pool)
        .await
        .unwrap();
    let machine_ids: HashSet<String> = emu
        .machines(APP)
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert!(
        claimed_by.iter().all(|w| machine_ids.contains(w)),
        "workers ran under their machine ids: {claimed_by:?}"
    );
}

/// The machine configs `fly deploy` creates on a fresh app, one machine per
/// process group of `fly.toml`, as flyctl derives them from the file: the
/// group's command, `[env]`, its `[[vm]]` size, its `[[restart]]` policy,
/// and the metadata flyctl finds the group by.
fn fly_deploy_configs(doc: &toml::Table, image: &str) -> BTreeMap<String, Value> {
    let in_group = |table: &toml::Value, group: &str| {
        table["processes"]
            .as_array()
            .is_some_and(|p| p.iter().any(|g| g.as_str() == Some(group)))
    };
    let region = doc["primary_region"].as_str().unwrap();
    let mut configs = BTreeMap::new();
    for (group, command) in doc["processes"].as_table().unwrap() {
        let mut env: BTreeMap<String, String> = doc["env"]
            .as_table()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        env.insert("FLY_PROCESS_GROUP".into(), group.clone());
        env.insert("PRIMARY_REGION".into(), region.into());
        let vm = doc["vm"]
            .as_array()
            .unwrap()
            .iter()
            .find(|vm| in_group(vm, group))
            .unwrap_or_else(|| panic!("a [[vm]] for {group}"));
        let (cpu_kind, cpus) = match vm["size"].as_str().unwrap() {
            "shared-cpu-1x" => ("shared", 1),
            "shared-cpu-2x" => ("shared", 2),
            other => panic!("size {other} not known to this test"),
        };
        let memory = vm["memory"].as_str().unwrap();
        let memory_mb = match (memory.strip_suffix("gb"), memory.strip_suffix("mb")) {
            (Some(gb), _) => gb.parse::<i64>().unwrap() * 1024,
            (_, Some(mb)) => mb.parse::<i64>().unwrap(),
            _ => panic!("memory {memory}"),
        };
        let restart = doc["restart"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| in_group(r, group))
            .unwrap_or_else(|| panic!("a [[restart]] for {group}"));
        let mut restart_config = json!({"policy": restart["policy"].as_str().unwrap()});
        if let Some(retries) = restart.get("retries").and_then(toml::Value::as_integer) {
            restart_config["max_retries"] = json!(retries);
        }
        let cmd: Vec<&str> = command.as_str().unwrap().split_whitespace().collect();
        configs.insert(
            group.clone(),
            json!({
                "image": image,
                "env": env,
                "init": {"cmd": cmd},
                "guest": {"cpu_kind": cpu_kind, "cpus": cpus, "memory_mb": memory_mb},
                "restart": restart_config,
                "metadata": {
                    "fly_platform_version": "v2",
                    "fly_process_group": group,
                    "fly_release_id": "Rel_1",
                    "fly_release_version": "1",
                },
            }),
        );
    }
    configs
}

/// The machines of one process group in a state.
fn group_in_state(emu: &FlyEmulator, group: &str, state: &str) -> Vec<String> {
    let mut ids: Vec<String> = emu
        .machines(APP)
        .iter()
        .filter(|m| m["config"]["metadata"]["fly_process_group"] == group && m["state"] == state)
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

/// The README's Fly section, step by step, against the emulator: `fly
/// deploy` of the shipped `fly.toml` on a fresh app (one machine per group),
/// the shipped pools scale the worker groups to zero when the queue is
/// empty, and back up from their stopped machines when jobs arrive.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn the_readme_sequence_on_a_fresh_app_deploys_scales_to_zero_and_back(pool: PgPool) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc: toml::Table = toml::from_str(&std::fs::read_to_string(root.join("fly.toml")).unwrap()).unwrap();
    assert_eq!(doc["app"].as_str(), Some(APP));
    let emu = emulator().await;

    // `fly deploy`: the release, then one machine per group.
    let client = FlyClient::new(&emu.base_url(), Token::new(TOKEN), RetryPolicy::default(), 4).unwrap();
    let configs = fly_deploy_configs(&doc, "registry.fly.io/backlog:deployment-01JREADME");
    for config in configs.values() {
        let request = controller::backend::fly::client::CreateMachine {
            config: serde_json::from_value(config.clone()).unwrap(),
            region: doc["primary_region"].as_str().map(str::to_string),
            name: None,
            skip_launch: false,
        };
        client.create(APP, &request).await.unwrap();
    }
    wait_until("one started machine per group", || {
        in_state(&emu, "started").len() == 4
    })
    .await;

    // The controller group runs the shipped pools.
    let loaded = manifest::load(&root.join("manifests/fly/pools.yaml"));
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    let pools = loaded.pools;
    let q = Queue::new(pool);
    // Inside the app, as Fly runs it: FLY_APP_NAME names the pools' app.
    let inside = backend_in(&emu, TOKEN, Duration::from_secs(10), doc["app"].as_str());
    let mut r = reconciler(&q, inside);

    // An empty queue: after the cooldown both worker groups go to zero.
    for at in [0, 150, 310, 450] {
        let reports = pass(&mut r, &pools, at).await;
        assert_eq!(reports.len(), 2, "both pools reconciled at {at} s");
    }
    for group in ["worker", "audiobook-worker"] {
        wait_until("the worker groups to stop", || {
            group_in_state(&emu, group, "started").is_empty()
                && group_in_state(&emu, group, "stopping").is_empty()
        })
        .await;
        assert_eq!(
            group_in_state(&emu, group, "stopped").len(),
            1,
            "{group}: its machine stopped and kept"
        );
    }
    for group in ["app", "controller"] {
        assert_eq!(
            group_in_state(&emu, group, "started").len(),
            1,
            "{group} is not the controller's"
        );
    }
    let stopped_worker = group_in_state(&emu, "worker", "stopped");

    // Jobs arrive: the stopped machines start, and clones of them follow.
    enqueue_jobs(&q, JobType::Text, 40).await;
    enqueue_jobs(&q, JobType::Audiobook, 2).await;
    let reports = pass(&mut r, &pools, 600).await;
    assert_eq!(reports.len(), 2, "both pools scaled up from zero");
    let wanted = |name: &str| {
        reports
            .iter()
            .find(|r| r.pool == name)
            .map(|r| r.decision.replicas as usize)
            .unwrap()
    };
    let (workers, audio) = (wanted("worker"), wanted("audiobook-worker"));
    assert!(
        workers > 1 && audio == 2,
        "worker {workers}, audiobook-worker {audio}"
    );
    wait_until("the worker groups up", || {
        group_in_state(&emu, "worker", "started").len() == workers
            && group_in_state(&emu, "audiobook-worker", "started").len() == audio
    })
    .await;
    let started_worker = group_in_state(&emu, "worker", "started");
    assert!(
        started_worker.contains(&stopped_worker[0]),
        "the stopped machine came back"
    );
    for id in &started_worker {
        let config = &emu.machine(APP, id).unwrap()["config"];
        let deployed = &configs["worker"];
        for field in ["init", "guest", "restart", "env"] {
            assert_eq!(config[field], deployed[field], "{id}: {field} as fly.toml says");
        }
        assert_eq!(config["metadata"]["fly_process_group"], "worker");
        assert_eq!(config["metadata"]["fly_release_version"], "1");
    }
}

#[tokio::test]
async fn requests_to_one_app_are_bounded_by_the_client_concurrency() {
    let emu = emulator().await;
    emu.set_faults(Faults {
        slow: Some(Duration::from_millis(200)),
        ..Faults::default()
    });
    let client = FlyClient::new(&emu.base_url(), Token::new(TOKEN), RetryPolicy::default(), 2).unwrap();
    let reads: Vec<_> = (0..6)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { client.get(APP, &format!("m{i}")).await })
        })
        .collect();
    for read in reads {
        assert!(
            matches!(read.await.unwrap(), Err(FlyError::Api { status: 404, .. })),
            "no such machine"
        );
    }
    assert_eq!(emu.requests().len(), 6);
    assert_eq!(emu.most_in_flight(APP), 2, "FLY_API_CONCURRENCY=2");
}

/// A `/wait` is a long poll: it takes no slot of the app's concurrency, or a
/// few boots watched in one pool would stall every other pool of the app.
#[tokio::test]
async fn long_waits_leave_the_apps_request_slots_to_other_calls() {
    let emu = emulator().await;
    let stopped = [seed(&emu, "stopped", "ord"), seed(&emu, "stopped", "ord")];
    let client = FlyClient::new(&emu.base_url(), Token::new(TOKEN), RetryPolicy::default(), 2).unwrap();
    // Two waits for machines nobody starts fill the app's two slots if they
    // take them: each holds on for its 5 s.
    let waits: Vec<_> = stopped
        .iter()
        .map(|id| {
            let (client, id) = (client.clone(), id.clone());
            tokio::spawn(async move {
                client
                    .wait(APP, &id, "started", None, Duration::from_secs(5))
                    .await
            })
        })
        .collect();
    wait_until("both waits to reach the API", || {
        emu.requests().is_empty() && emu.most_in_flight(APP) == 2
    })
    .await;

    let machine = client.get(APP, &stopped[0]).await.unwrap();
    assert_eq!(machine.state, "stopped");
    assert!(
        waits.iter().all(|w| !w.is_finished()),
        "the read went through while both waits were still waiting"
    );
    for wait in waits {
        assert!(matches!(wait.await.unwrap(), Err(FlyError::WaitTimedOut { .. })));
    }
}
