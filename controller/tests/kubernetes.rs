//! The Kubernetes backend end to end: the controller's run loop against the
//! API server emulator (test-support's `kube_api`) and real PostgreSQL, and
//! kubectl against the same emulator.

use std::sync::Arc;
use std::time::Duration;

use controller::backend::kubernetes::{KubernetesBackend, LeaseElection, LeaseSettings, WorkerPoolSource};
use controller::metrics::Metrics;
use controller::reconcile::{self, Context, Election, LoopSettings, Reconciler};
use controller::spec::WorkerPool;
use kube::CustomResourceExt;
use queue::{JobType, Queue, TaskType};
use serde_json::{json, Value};
use sqlx::PgPool;
use test_support::kube_api::{Fault, KubeApi, Method};
use test_support::{enqueue_jobs, register_text_worker};
use tokio_util::sync::CancellationToken;

const NS: &str = "default";

async fn emulator() -> KubeApi {
    KubeApi::start(&[serde_json::to_value(WorkerPool::crd()).unwrap()]).await
}

/// The emulator with a `worker` Deployment at `replicas` and the `text`
/// WorkerPool (text_generation) that scales it.
async fn text_pool_on_a_deployment(replicas: i64) -> KubeApi {
    let api = emulator().await;
    api.create(deployment("worker", replicas));
    api.create(worker_pool("text", "text_generation", "worker", json!({})));
    api
}

/// A client for the controller, with [`controller_token`].
fn client(api: &KubeApi) -> kube::Client {
    client_with_token(api, NS, Some(controller_token(api)))
}

/// A token of the controller's service account in the shipped
/// manifests/rbac.yaml, whose ServiceAccount, Role and RoleBinding are
/// applied here first (moved from `backlog` to the test's namespace). The
/// emulator enforces the Role, so the tests run the controller with
/// exactly the permissions it ships with.
fn controller_token(api: &KubeApi) -> String {
    if api.get("", "serviceaccounts", NS, "backlog-controller").is_none() {
        for mut object in documents("manifests/rbac.yaml") {
            object["metadata"]["namespace"] = json!(NS);
            for subject in object["subjects"].as_array_mut().into_iter().flatten() {
                subject["namespace"] = json!(NS);
            }
            api.create(object);
        }
    }
    api.service_account_token(NS, "backlog-controller")
}

/// The cluster administrator's client (no token), for a test's own changes.
fn admin_client(api: &KubeApi) -> kube::Client {
    client_with_token(api, NS, None)
}

fn client_with_token(api: &KubeApi, namespace: &str, token: Option<String>) -> kube::Client {
    let mut config = kube::Config::new(api.url().parse().unwrap());
    config.default_namespace = namespace.into();
    config.read_timeout = Some(Duration::from_secs(60));
    config.auth_info.token = token.map(Into::into);
    kube::Client::try_from(config).unwrap()
}

fn deployment(name: &str, replicas: i64) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "worker", "image": "backlog:dev"}]}},
        },
    })
}

fn worker_pool(name: &str, task_type: &str, deployment: &str, extra: Value) -> Value {
    let mut spec = json!({
        "taskTypes": [task_type],
        "target": {"kubernetes": {"kind": "Deployment", "name": deployment}},
        "maxReplicas": 5,
        "cooldownPeriod": 0,
        "scaleDown": {"stabilizationWindowSeconds": 0},
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    json!({"apiVersion": "backlog.dev/v1alpha1", "kind": "WorkerPool", "metadata": {"name": name, "namespace": NS}, "spec": spec})
}

/// A controller running the loop until its token is cancelled or its task aborted.
struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn start_controller(api: &KubeApi, q: &Queue, identity: &str) -> Running {
    start_controller_with_metrics(api, q, identity, Arc::new(Metrics::default()))
}

fn start_controller_with_metrics(api: &KubeApi, q: &Queue, identity: &str, metrics: Arc<Metrics>) -> Running {
    let client = client(api);
    let reconciler = Reconciler::new(Context {
        queue: q.clone(),
        backend: KubernetesBackend::new(client.clone(), q.clone()),
        metrics,
    });
    let lease = LeaseSettings::new(NS, "backlog-controller", identity, Duration::from_secs(3));
    let election = LeaseElection::new(client.clone(), lease);
    let source = WorkerPoolSource::new(client, Some(NS));
    let settings = LoopSettings {
        tick: Duration::from_millis(300),
        leader_key: 0,
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn(reconcile::run_elected(
        reconciler,
        source,
        election,
        settings,
        stop.clone(),
    ));
    Running { stop, task }
}

/// Polls `check` until it returns `Some`, for up to 30 s.
async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    for _ in 0..300 {
        if let Some(value) = check() {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

fn replicas(api: &KubeApi, name: &str) -> i64 {
    api.get("apps", "deployments", NS, name).expect("deployment")["spec"]["replicas"]
        .as_i64()
        .unwrap()
}

fn pool_status(api: &KubeApi, name: &str) -> Value {
    api.get("backlog.dev", "workerpools", NS, name)
        .expect("workerpool")["status"]
        .clone()
}

fn condition(status: &Value, type_: &str) -> Value {
    status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_).cloned())
        .unwrap_or(Value::Null)
}

fn events(api: &KubeApi, pool: &str, reason: &str) -> Vec<Value> {
    api.list("", "events", NS)
        .into_iter()
        .filter(|e| e["involvedObject"]["name"] == pool && e["reason"] == reason)
        .collect()
}

fn pod_names(api: &KubeApi, app: &str) -> Vec<String> {
    api.list("", "pods", NS)
        .into_iter()
        .filter(|p| p["metadata"]["labels"]["app"] == app)
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .collect()
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn work_for_a_pool_at_zero_scales_its_deployment_and_writes_status_and_events(pool: PgPool) {
    let q = Queue::new(pool);
    let api = emulator().await;
    api.create(deployment("worker", 0));
    let created = api.create(worker_pool("text", "text_generation", "worker", json!({})));
    let controller = start_controller(&api, &q, "a");

    let idle = eventually("the idle pool's status", || {
        let status = pool_status(&api, "text");
        (condition(&status, "Ready")["status"] == "True").then_some(status)
    })
    .await;
    assert_eq!(condition(&idle, "Active")["status"], "False", "{idle}");
    assert_eq!(replicas(&api, "worker"), 0);

    enqueue_jobs(&q, JobType::Text, 3).await;
    eventually("3 replicas and 3 pods", || {
        (replicas(&api, "worker") == 3 && pod_names(&api, "worker").len() == 3).then_some(())
    })
    .await;
    let status = eventually("the status to follow", || {
        let status = pool_status(&api, "text");
        (status["desiredReplicas"] == 3 && status["readyReplicas"] == 3).then_some(status)
    })
    .await;
    assert_eq!(status["pending"], 3, "{status}");
    assert_eq!(status["observedGeneration"], 1, "{status}");
    assert_eq!(condition(&status, "Active")["status"], "True", "{status}");
    let scaled_up = events(&api, "text", "ScaledUp");
    assert_eq!(scaled_up.len(), 1, "{scaled_up:?}");
    assert!(
        scaled_up[0]["message"]
            .as_str()
            .unwrap()
            .starts_with("scaled from 0 to 3"),
        "{scaled_up:?}"
    );
    assert_eq!(scaled_up[0]["involvedObject"]["uid"], created["metadata"]["uid"]);
    assert_eq!(scaled_up[0]["type"], "Normal");

    // The status is the controller's, by server-side apply.
    let object = api.get("backlog.dev", "workerpools", NS, "text").unwrap();
    let managers: Vec<&Value> = object["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .collect();
    assert!(
        managers.iter().any(|m| m["manager"] == "backlog-controller"
            && m["subresource"] == "status"
            && m["operation"] == "Apply"),
        "{managers:?}"
    );
    // A status write is no spec change.
    assert_eq!(object["metadata"]["generation"], 1);
    controller.stop().await;
    let refused: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.code == 401 || r.code == 403)
        .collect();
    assert!(
        refused.is_empty(),
        "the shipped Role lacks what these need: {refused:?}"
    );
}

/// A pool from the cluster is labelled by its name in every series, the
/// error counter of a failed status write included (it used to carry
/// `namespace/name` there alone, so a dashboard summing by pool split it).
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_failed_status_write_is_counted_under_the_pools_name(pool: PgPool) {
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_pool_status() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'pool_status is read-only in this test'; END $$;
         CREATE TRIGGER refuse_pool_status BEFORE INSERT OR UPDATE ON pool_status
           FOR EACH ROW EXECUTE FUNCTION refuse_pool_status();",
    )
    .execute(&pool)
    .await
    .unwrap();
    let q = Queue::new(pool);
    let api = text_pool_on_a_deployment(0).await;
    let metrics = Arc::new(Metrics::default());
    let controller = start_controller_with_metrics(&api, &q, "a", metrics.clone());
    let counted = r#"backlog_controller_errors_total{pool="text",stage="status"} "#;
    let text = eventually("a status error counted", || {
        let text = metrics.encode();
        text.lines()
            .any(|line| line.starts_with(counted) && !line.ends_with(" 0"))
            .then_some(text)
    })
    .await;
    controller.stop().await;
    assert!(
        !text.contains(&format!("pool=\"{NS}/text\"")),
        "a series labelled namespace/name:\n{text}"
    );
}

/// The Role grants what the controller uses and nothing more: no listing
/// or watching of workloads, no other Lease, no writes to the pools' spec.
/// The refusals are the API server's 403 Status, word for word.
#[tokio::test]
async fn the_shipped_role_grants_the_controller_only_what_it_uses() {
    let api = text_pool_on_a_deployment(1).await;
    let client = client(&api);
    let forbidden = |e: kube::Error| match e {
        kube::Error::Api(status) => *status,
        other => panic!("not an API error: {other}"),
    };
    let sa = "system:serviceaccount:default:backlog-controller";

    let deployments: kube::Api<k8s_openapi::api::apps::v1::Deployment> =
        kube::Api::namespaced(client.clone(), NS);
    let scale = deployments
        .get_scale("worker")
        .await
        .expect("get deployments/scale");
    assert_eq!(scale.spec.unwrap().replicas, Some(1));
    deployments
        .get("worker")
        .await
        .expect("get deployments (rollout status)");
    let list = forbidden(deployments.list(&Default::default()).await.unwrap_err());
    assert_eq!((list.code, list.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        list.message,
        format!("deployments.apps is forbidden: User \"{sa}\" cannot list resource \"deployments\" in API group \"apps\" in the namespace \"default\"")
    );
    let patch = kube::api::Patch::Merge(json!({"spec": {"replicas": 3}}));
    let write = forbidden(
        deployments
            .patch("worker", &Default::default(), &patch)
            .await
            .unwrap_err(),
    );
    assert_eq!(
        write.message,
        format!("deployments.apps \"worker\" is forbidden: User \"{sa}\" cannot patch resource \"deployments\" in API group \"apps\" in the namespace \"default\"")
    );

    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(client.clone(), NS);
    let other = forbidden(leases.get("someone-else").await.unwrap_err());
    assert_eq!(
        other.message,
        format!("leases.coordination.k8s.io \"someone-else\" is forbidden: User \"{sa}\" cannot get resource \"leases\" in API group \"coordination.k8s.io\" in the namespace \"default\"")
    );
    let pools: kube::Api<WorkerPool> = kube::Api::namespaced(client.clone(), NS);
    let pool_patch = kube::api::Patch::Merge(json!({"spec": {"maxReplicas": 1}}));
    assert_eq!(
        forbidden(
            pools
                .patch("text", &Default::default(), &pool_patch)
                .await
                .unwrap_err()
        )
        .code,
        403
    );
    let elsewhere: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client, "kube-system");
    let other_namespace = forbidden(elsewhere.list(&Default::default()).await.unwrap_err());
    assert!(
        other_namespace
            .message
            .ends_with("in the namespace \"kube-system\""),
        "{}",
        other_namespace.message
    );

    let mut config = kube::Config::new(api.url().parse().unwrap());
    config.auth_info.token = Some("not-a-token".to_string().into());
    let stranger: kube::Api<WorkerPool> = kube::Api::namespaced(kube::Client::try_from(config).unwrap(), NS);
    let unknown = forbidden(stranger.get("text").await.unwrap_err());
    assert_eq!((unknown.code, unknown.reason.as_str()), (401, "Unauthorized"));
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn scale_down_marks_the_idle_pods_cheapest_and_keeps_the_busy_one(pool: PgPool) {
    let q = Queue::new(pool);
    let api = text_pool_on_a_deployment(3).await;
    let mut pods = pod_names(&api, "worker");
    pods.sort();
    assert_eq!(pods.len(), 3);
    for pod in &pods {
        register_text_worker(&q, pod).await;
    }
    // The pod the ReplicaSet would remove first without deletion costs
    // (same age: the highest name) is the busy one.
    let busy = pods[2].clone();
    enqueue_jobs(&q, JobType::Text, 1).await;
    let held = q.claim(&busy, &[TaskType::TextGeneration], 1).await.unwrap();
    assert_eq!(held.len(), 1);

    let controller = start_controller(&api, &q, "a");
    eventually("the deployment at 1", || {
        (replicas(&api, "worker") == 1).then_some(())
    })
    .await;
    assert_eq!(
        pod_names(&api, "worker"),
        vec![busy.clone()],
        "only the busy pod is left"
    );
    let survivor = api.get("", "pods", NS, &busy).unwrap();
    assert_eq!(
        survivor["metadata"]["annotations"]["controller.kubernetes.io/pod-deletion-cost"], "1000",
        "the busy pod is expensive"
    );
    let workers: Vec<String> = q.workers(None).await.unwrap().into_iter().map(|w| w.id).collect();
    let drained = q
        .workers(None)
        .await
        .unwrap()
        .into_iter()
        .filter(|w| w.state != queue::WorkerState::Running)
        .count();
    assert_eq!(
        (workers.len(), drained),
        (3, 2),
        "the removed pods were drained first"
    );
    // The cost patches came before the count dropped.
    let requests = api.requests();
    let scale_patch = requests
        .iter()
        .position(|r| r.method == "PATCH" && r.uri.contains("/deployments/worker/scale"))
        .expect("a scale patch");
    let cost_patches: Vec<usize> = requests
        .iter()
        .enumerate()
        .filter(|(_, r)| r.method == "PATCH" && r.uri.contains("/pods/"))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(cost_patches.len(), 3, "two cheap, one expensive");
    assert!(cost_patches.iter().all(|i| *i < scale_patch));
    let scaled_down = events(&api, "text", "ScaledDown");
    assert_eq!(scaled_down.len(), 1);
    assert!(!scaled_down[0]["message"].as_str().unwrap().contains(&busy));
    controller.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_busy_pod_that_is_not_ready_is_never_traded_for_ready_idle_ones(pool: PgPool) {
    let q = Queue::new(pool);
    let api = text_pool_on_a_deployment(3).await;
    let pods = pod_names(&api, "worker");
    for pod in &pods {
        register_text_worker(&q, pod).await;
    }
    let busy = pods[0].clone();
    enqueue_jobs(&q, JobType::Text, 1).await;
    assert_eq!(
        q.claim(&busy, &[TaskType::TextGeneration], 1)
            .await
            .unwrap()
            .len(),
        1
    );
    // A ReplicaSet deletes pods that are not ready first, whatever their cost.
    api.set_pod_ready(NS, &busy, false);

    let controller = start_controller(&api, &q, "a");
    eventually("the pool deciding on 1 replica", || {
        (pool_status(&api, "text")["desiredReplicas"] == 1).then_some(())
    })
    .await;
    assert!(pod_names(&api, "worker").contains(&busy), "the busy pod survives");
    assert_eq!(replicas(&api, "worker"), 3, "no ready idle pod was traded for it");

    api.set_pod_ready(NS, &busy, true);
    eventually("the deployment at 1", || {
        (replicas(&api, "worker") == 1).then_some(())
    })
    .await;
    assert_eq!(pod_names(&api, "worker"), vec![busy], "only the busy pod is left");
    controller.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn watch_disconnects_and_server_errors_are_recovered_without_double_scaling(pool: PgPool) {
    let q = Queue::new(pool);
    let api = emulator().await;
    api.set_bookmark_interval(Duration::from_millis(200));
    api.create(deployment("worker", 0));
    api.create(worker_pool(
        "text",
        "text_generation",
        "worker",
        json!({"maxReplicas": 2}),
    ));
    let controller = start_controller(&api, &q, "a");
    eventually("the first status", || {
        (condition(&pool_status(&api, "text"), "Ready")["status"] == "True").then_some(())
    })
    .await;

    // The watch is cut and the re-list fails twice; the scale reads fail 3 times.
    api.inject(Fault {
        method: Some(Method::GET),
        path_contains: "/workerpools".into(),
        code: 500,
        times: 2,
    });
    api.inject(Fault {
        method: Some(Method::GET),
        path_contains: "/deployments/worker/scale".into(),
        code: 500,
        times: 3,
    });
    api.disconnect_watches();
    api.compact();
    enqueue_jobs(&q, JobType::Text, 5).await;

    let failed = eventually("Ready=False from the 500s", || {
        let ready = condition(&pool_status(&api, "text"), "Ready");
        (ready["status"] == "False").then_some(ready)
    })
    .await;
    assert_eq!(failed["reason"], "BackendError", "{failed}");
    eventually("recovery at maxReplicas", || {
        let ready = condition(&pool_status(&api, "text"), "Ready");
        (ready["status"] == "True" && replicas(&api, "worker") == 2).then_some(())
    })
    .await;
    // A spec change through the re-established watch still takes effect.
    let mut object = api.get("backlog.dev", "workerpools", NS, "text").unwrap();
    object["spec"]["maxReplicas"] = json!(3);
    let client = admin_client(&api);
    let pools: kube::Api<WorkerPool> = kube::Api::namespaced(client, NS);
    pools
        .replace(
            "text",
            &Default::default(),
            &serde_json::from_value(object).unwrap(),
        )
        .await
        .unwrap();
    eventually("3 replicas after the spec change", || {
        (replicas(&api, "worker") == 3).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let scale_writes = api
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH" && r.uri.contains("/deployments/worker/scale") && r.code == 200)
        .count();
    assert_eq!(scale_writes, 2, "0→2 and 2→3, each once");
    assert_eq!(
        api.get("apps", "deployments", NS, "worker").unwrap()["metadata"]["generation"],
        3
    );
    let watches = api
        .requests()
        .iter()
        .filter(|r| r.uri.contains("/workerpools?") && r.uri.contains("watch=true"))
        .count();
    assert!(watches >= 2, "the watch was re-established ({watches} watches)");
    controller.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_missing_target_fails_only_its_pool_and_recovers_once_created(pool: PgPool) {
    let q = Queue::new(pool);
    let api = emulator().await;
    api.create(deployment("audio-worker", 0));
    api.create(worker_pool("text", "text_generation", "nowhere", json!({})));
    api.create(worker_pool(
        "audio",
        "audio_generation",
        "audio-worker",
        json!({}),
    ));
    let controller = start_controller(&api, &q, "a");
    enqueue_jobs(&q, JobType::Audiobook, 1).await;
    enqueue_jobs(&q, JobType::Text, 1).await;

    eventually("the audio pool scaled up", || {
        (replicas(&api, "audio-worker") == 1).then_some(())
    })
    .await;
    let ready = eventually("Ready=False on the text pool", || {
        let ready = condition(&pool_status(&api, "text"), "Ready");
        (ready["status"] == "False").then_some(ready)
    })
    .await;
    assert_eq!(ready["reason"], "TargetNotFound", "{ready}");
    assert!(
        ready["message"].as_str().unwrap().contains("default/nowhere"),
        "{ready}"
    );
    let warning = eventually("a TargetNotFound event", || {
        events(&api, "text", "TargetNotFound").pop()
    })
    .await;
    assert_eq!(warning["type"], "Warning");
    // The audio pool's status is written after its scale, on its own pass.
    eventually("Ready=True on the audio pool beside the failing one", || {
        (condition(&pool_status(&api, "audio"), "Ready")["status"] == "True").then_some(())
    })
    .await;

    // Retried with backoff: a few attempts in the first seconds, not one a tick.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let attempts = api
        .requests()
        .iter()
        .filter(|r| r.uri.contains("/deployments/nowhere/scale"))
        .count();
    assert!(
        (2..=5).contains(&attempts),
        "{attempts} attempts in ~3 s at a 300 ms tick"
    );

    api.create(deployment("nowhere", 0));
    eventually("the text pool recovered", || {
        (replicas(&api, "nowhere") == 1 && condition(&pool_status(&api, "text"), "Ready")["status"] == "True")
            .then_some(())
    })
    .await;
    controller.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_target_the_role_does_not_cover_is_reported_unauthorized_on_its_pool(pool: PgPool) {
    let q = Queue::new(pool);
    let api = text_pool_on_a_deployment(0).await;
    // A cluster whose Role was trimmed to Deployments: StatefulSets' scale
    // is refused (403), as the API server refuses it.
    controller_token(&api);
    let mut role = api
        .get("rbac.authorization.k8s.io", "roles", NS, "backlog-controller")
        .expect("the shipped Role");
    for rule in role["rules"].as_array_mut().unwrap() {
        if let Some(resources) = rule["resources"].as_array_mut() {
            resources.retain(|r| r != "statefulsets/scale");
        }
    }
    role["metadata"] = json!({"name": "backlog-controller", "namespace": NS});
    assert!(api.delete("rbac.authorization.k8s.io", "roles", NS, "backlog-controller"));
    api.create(role);
    api.create(json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "tts", "namespace": NS},
        "spec": {"replicas": 0, "serviceName": "tts", "selector": {"matchLabels": {"app": "tts"}},
            "template": {"metadata": {"labels": {"app": "tts"}}, "spec": {"containers": [{"name": "w", "image": "x"}]}}},
    }));
    let mut audio = worker_pool("audio", "audio_generation", "tts", json!({}));
    audio["spec"]["target"] = json!({"kubernetes": {"kind": "StatefulSet", "name": "tts"}});
    api.create(audio);
    let controller = start_controller(&api, &q, "a");
    enqueue_jobs(&q, JobType::Audiobook, 1).await;
    enqueue_jobs(&q, JobType::Text, 1).await;

    let ready = eventually("Ready=False on the audio pool", || {
        let ready = condition(&pool_status(&api, "audio"), "Ready");
        (ready["status"] == "False").then_some(ready)
    })
    .await;
    assert_eq!(ready["reason"], "Unauthorized", "{ready}");
    assert!(
        ready["message"].as_str().unwrap().contains("tts"),
        "names the target: {ready}"
    );
    let warning = eventually("an Unauthorized event", || {
        events(&api, "audio", "Unauthorized").pop()
    })
    .await;
    assert_eq!(warning["type"], "Warning");
    eventually("the text pool scaled regardless", || {
        (replicas(&api, "worker") == 1).then_some(())
    })
    .await;
    controller.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn an_invalid_spec_is_reported_on_the_pool(pool: PgPool) {
    let q = Queue::new(pool);
    let api = emulator().await;
    api.create(deployment("worker", 0));
    api.create(worker_pool(
        "text",
        "text_generation",
        "worker",
        json!({"minReplicas": 3, "maxReplicas": 2}),
    ));
    let metrics = Arc::new(Metrics::default());
    let controller = start_controller_with_metrics(&api, &q, "a", metrics.clone());
    let ready = eventually("Ready=False, InvalidSpec", || {
        let ready = condition(&pool_status(&api, "text"), "Ready");
        (ready["reason"] == "InvalidSpec").then_some(ready)
    })
    .await;
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["message"], "spec.maxReplicas: must be >= minReplicas (3)");
    let event = eventually("an InvalidSpec event", || {
        events(&api, "text", "InvalidSpec").pop()
    })
    .await;
    assert_eq!(event["message"], ready["message"]);
    assert_eq!(replicas(&api, "worker"), 0, "an invalid pool is not scaled");
    // And where the BacklogPoolNotReady alert looks.
    eventually("Ready=False in /metrics", || {
        metrics
            .encode()
            .contains(r#"backlog_controller_pool_condition{pool="text",type="Ready",status="False"} 1"#)
            .then_some(())
    })
    .await;
    controller.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_hand_scaled_deployment_is_converged_back_with_an_event(pool: PgPool) {
    let q = Queue::new(pool);
    let api = text_pool_on_a_deployment(0).await;
    let controller = start_controller(&api, &q, "a");
    enqueue_jobs(&q, JobType::Text, 2).await;
    eventually("2 replicas", || (replicas(&api, "worker") == 2).then_some(())).await;

    api.scale("deployments", NS, "worker", 5);
    let event = eventually("a ManualScaleReverted event", || {
        events(&api, "text", "ManualScaleReverted").pop()
    })
    .await;
    assert!(
        event["message"]
            .as_str()
            .unwrap()
            .contains("scaled to 5 outside the controller; set back to 2"),
        "{event}"
    );
    eventually("back at 2 replicas and 2 pods", || {
        (replicas(&api, "worker") == 2 && pod_names(&api, "worker").len() == 2).then_some(())
    })
    .await;

    // Paused, a hand-set count stands.
    let client = admin_client(&api);
    let pools: kube::Api<WorkerPool> = kube::Api::namespaced(client, NS);
    let patch = kube::api::Patch::Merge(json!({"spec": {"paused": true}}));
    pools.patch("text", &Default::default(), &patch).await.unwrap();
    eventually("Paused=True", || {
        (condition(&pool_status(&api, "text"), "Paused")["status"] == "True").then_some(())
    })
    .await;
    api.scale("deployments", NS, "worker", 4);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(replicas(&api, "worker"), 4);
    assert_eq!(events(&api, "text", "ManualScaleReverted").len(), 1);
    controller.stop().await;
}

/// Setting a hand-scaled Deployment back lowers its count as a scale-down
/// does, so it keeps the same rule: while a busy pod is not ready, the
/// ReplicaSet would delete it first whatever its deletion cost, so the
/// count is not lowered under it.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_hand_scaled_deployment_is_set_back_without_losing_a_busy_pod_that_is_not_ready(pool: PgPool) {
    let q = Queue::new(pool);
    let api = text_pool_on_a_deployment(0).await;
    let controller = start_controller(&api, &q, "a");
    enqueue_jobs(&q, JobType::Text, 2).await;
    eventually("2 replicas and 2 pods", || {
        (replicas(&api, "worker") == 2 && pod_names(&api, "worker").len() == 2).then_some(())
    })
    .await;
    let pods = pod_names(&api, "worker");
    for pod in &pods {
        register_text_worker(&q, pod).await;
    }
    let busy = pods[0].clone();
    let held = q.claim(&busy, &[TaskType::TextGeneration], 1).await.unwrap();
    assert_eq!(held.len(), 1);
    api.set_pod_ready(NS, &busy, false);

    api.scale("deployments", NS, "worker", 3);
    eventually("a ManualScaleReverted event", || {
        events(&api, "text", "ManualScaleReverted").pop()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(pod_names(&api, "worker").contains(&busy), "the busy pod survives");

    api.set_pod_ready(NS, &busy, true);
    eventually("back at 2 replicas and 2 pods", || {
        (replicas(&api, "worker") == 2 && pod_names(&api, "worker").len() == 2).then_some(())
    })
    .await;
    assert!(pod_names(&api, "worker").contains(&busy), "the busy pod survives");
    controller.stop().await;
}

/// The WorkerPool `name` as the cluster holds it, loaded as the controller's
/// pool source loads it, for driving a reconciler or a backend directly.
fn loaded_from_the_cluster(api: &KubeApi, name: &str) -> controller::manifest::LoadedPool {
    let object = api.get("backlog.dev", "workerpools", NS, name).unwrap();
    controller::manifest::LoadedPool {
        location: controller::error::Location {
            file: format!("workerpools.backlog.dev/default/{name}").into(),
            line: 0,
            document: 0,
            name: Some(name.into()),
        },
        pool: serde_json::from_value(object).unwrap(),
    }
}

fn lease_holder(api: &KubeApi) -> Option<String> {
    api.get("coordination.k8s.io", "leases", NS, "backlog-controller")
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn of_two_controllers_one_leads_and_the_other_takes_over_when_it_dies(pool: PgPool) {
    let q = Queue::new(pool);
    let api = text_pool_on_a_deployment(0).await;
    let first = start_controller(&api, &q, "first");
    eventually("the first controller to lead", || {
        (lease_holder(&api).as_deref() == Some("first")).then_some(())
    })
    .await;
    let second = start_controller(&api, &q, "second");
    enqueue_jobs(&q, JobType::Text, 1).await;
    eventually("1 replica", || (replicas(&api, "worker") == 1).then_some(())).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        lease_holder(&api).as_deref(),
        Some("first"),
        "the standby waits while the leader renews"
    );
    assert!(!second.task.is_finished());

    // The leader dies without releasing the Lease.
    first.task.abort();
    let _ = first.task.await;
    let died = std::time::Instant::now();
    eventually("the standby to take over", || {
        (lease_holder(&api).as_deref() == Some("second")).then_some(())
    })
    .await;
    let took = died.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "took over after {took:?} with a 3 s lease"
    );
    let lease = api
        .get("coordination.k8s.io", "leases", NS, "backlog-controller")
        .unwrap();
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    enqueue_jobs(&q, JobType::Text, 1).await;
    eventually("the new leader acts", || {
        (replicas(&api, "worker") == 2).then_some(())
    })
    .await;
    second.stop().await;
    assert_eq!(lease_holder(&api), None, "a clean stop releases the Lease");
}

/// A Lease not renewed within its deadline ends the term for passes and
/// backends at once, not at the loop's next round: with a long tick, the
/// standby took over when the Lease expired while passes in flight went
/// on acting as leader until that round.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_lease_not_renewed_in_time_ends_the_term_before_the_next_round(pool: PgPool) {
    let q = Queue::new(pool);
    let api = emulator().await;
    let client = client(&api);
    let reconciler = Reconciler::new(Context {
        queue: q.clone(),
        backend: KubernetesBackend::new(client.clone(), q.clone()),
        metrics: Arc::new(Metrics::default()),
    });
    let leadership = reconciler.leadership().clone();
    let lease = LeaseSettings::new(NS, "backlog-controller", "first", Duration::from_secs(3));
    let settings = LoopSettings {
        tick: Duration::from_secs(3600),
        leader_key: 0,
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn(reconcile::run_elected(
        reconciler,
        WorkerPoolSource::new(client.clone(), Some(NS)),
        LeaseElection::new(client, lease),
        settings,
        stop.clone(),
    ));
    eventually("the controller to lead", || {
        (lease_holder(&api).as_deref() == Some("first")).then_some(())
    })
    .await;
    assert!(leadership.is_held());

    api.inject(Fault {
        method: Some(Method::PUT),
        path_contains: "/leases/backlog-controller".into(),
        code: 500,
        times: u32::MAX,
    });
    // The renew deadline is 2 s; the next round is an hour away.
    eventually("the term to end", || (!leadership.is_held()).then_some(())).await;
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn racing_standbys_cannot_both_take_a_lease() {
    let api = emulator().await;
    let mut elections: Vec<LeaseElection> = (0..4)
        .map(|i| {
            let settings = LeaseSettings::new(
                NS,
                "backlog-controller",
                &format!("c{i}"),
                Duration::from_secs(30),
            );
            LeaseElection::new(client(&api), settings)
        })
        .collect();
    let shutdown = CancellationToken::new();
    let attempts = elections.iter_mut().map(|e| {
        let shutdown = shutdown.clone();
        async move {
            tokio::select! {
                won = e.acquire(&shutdown) => won.unwrap(),
                _ = tokio::time::sleep(Duration::from_secs(2)) => false,
            }
        }
    });
    let won = futures::future::join_all(attempts).await;
    assert_eq!(won.iter().filter(|w| **w).count(), 1, "{won:?}");
    let conflicts = api
        .requests()
        .iter()
        .filter(|r| r.uri.contains("/leases") && r.code == 409)
        .count();
    assert!(conflicts >= 1, "the losers' creates were refused with 409");
}

/// kubectl against the emulator, with no kubeconfig of the machine's.
/// `None` (and a note) where kubectl is not installed.
async fn kubectl(api: &KubeApi, home: &std::path::Path, args: &[&str]) -> Option<String> {
    let found = tokio::process::Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .await;
    if found.is_err() {
        eprintln!("SKIPPED: kubectl is not installed; the kubectl checks need it");
        return None;
    }
    let output = tokio::process::Command::new("kubectl")
        .args([
            "--server",
            &api.url(),
            "--cache-dir",
            home.join("cache").to_str().unwrap(),
        ])
        .args(args)
        .env("KUBECONFIG", home.join("kubeconfig"))
        .env("HOME", home)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "kubectl {args:?} failed:\n{stdout}\n{stderr}"
    );
    Some(stdout)
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn kubectl_shows_the_columns_conditions_and_events(pool: PgPool) {
    let q = Queue::new(pool);
    let api = emulator().await;
    let home = tempfile::tempdir().unwrap();
    api.create(deployment("worker", 0));
    api.create(worker_pool("text", "text_generation", "worker", json!({})));
    let controller = start_controller(&api, &q, "a");
    enqueue_jobs(&q, JobType::Text, 2).await;
    eventually("the status at 2 replicas", || {
        (pool_status(&api, "text")["readyReplicas"] == 2 && !events(&api, "text", "ScaledUp").is_empty())
            .then_some(())
    })
    .await;
    controller.stop().await;

    let Some(get) = kubectl(&api, home.path(), &["get", "wp"]).await else {
        return;
    };
    eprintln!("kubectl get wp:\n{get}");
    let lines: Vec<&str> = get.lines().collect();
    assert!(lines[0].starts_with("NAME"), "{get}");
    for column in [
        "TASK TYPES",
        "PENDING",
        "IN-FLIGHT",
        "DESIRED",
        "CURRENT",
        "READY",
        "ACTIVE",
        "AGE",
    ] {
        assert!(lines[0].contains(column), "no {column} column:\n{get}");
    }
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        &row[..8],
        ["text", "[\"text_generation\"]", "2", "0", "2", "2", "2", "True"],
        "{get}"
    );

    let describe = kubectl(&api, home.path(), &["describe", "wp", "text"])
        .await
        .unwrap();
    for expected in [
        "Name:         text",
        "Kind:         WorkerPool",
        "Type:",
        "Ready",
        "Reconciled",
        "ScaledUp",
        "scaled from 0 to 2",
        "backlog-controller",
    ] {
        assert!(
            describe.contains(expected),
            "describe lacks {expected:?}:\n{describe}"
        );
    }
    assert!(describe.contains("Events:"), "{describe}");
    eprintln!("kubectl describe wp text:\n{describe}");

    let yaml = kubectl(&api, home.path(), &["get", "wp", "text", "-o", "yaml"])
        .await
        .unwrap();
    let object: serde_yaml_ng::Value = serde_yaml_ng::from_str(&yaml).unwrap();
    assert_eq!(object["status"]["desiredReplicas"], serde_yaml_ng::Value::from(2));
    assert_eq!(
        object["spec"]["taskTypes"][0],
        serde_yaml_ng::Value::from("text_generation")
    );
    assert!(yaml.contains("type: Ready"), "{yaml}");
}

fn repo_path(relative: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

/// The YAML documents of a manifest file, as JSON.
fn documents(relative: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(repo_path(relative)).unwrap();
    text.split("\n---")
        .filter_map(|doc| serde_yaml_ng::from_str::<Option<serde_yaml_ng::Value>>(doc).unwrap())
        .map(|doc| serde_json::to_value(doc).unwrap())
        .collect()
}

#[test]
fn the_example_workerpools_load_and_scale_the_example_deployments() {
    let manifests = controller::manifest::load(&repo_path("manifests/workerpools.yaml"));
    let errors: Vec<String> = manifests.errors.iter().map(ToString::to_string).collect();
    assert_eq!(errors, Vec::<String>::new());
    let deployments = documents("manifests/workers.yaml");
    assert_eq!(manifests.pools.len(), 2);
    for loaded in &manifests.pools {
        let controller::spec::Target::Kubernetes(target) = &loaded.pool.spec.target else {
            panic!("{} is not a kubernetes pool", loaded.name());
        };
        let deployment = deployments
            .iter()
            .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == target.name.as_str())
            .unwrap_or_else(|| panic!("no Deployment {} in workers.yaml", target.name));
        let pod = &deployment["spec"]["template"]["spec"];
        let env = pod["containers"][0]["env"].as_array().unwrap();
        let var = |name: &str| {
            env.iter()
                .find(|e| e["name"] == name)
                .cloned()
                .unwrap_or(Value::Null)
        };
        assert_eq!(
            var("POD_NAME")["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.name"
        );
        assert_eq!(var("WORKER_POOL")["value"], loaded.name());
        let grace: f64 = var("WORKER_SHUTDOWN_GRACE_SECONDS")["value"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let termination = pod["terminationGracePeriodSeconds"].as_f64().unwrap();
        assert!(
            grace + 10.0 <= termination,
            "{}: the pod's grace ({termination} s) must cover the worker's drain ({grace} s) and its exit",
            target.name
        );
    }
}

#[tokio::test]
async fn the_manifests_pass_kubectl_client_side_dry_run_and_kustomize() {
    let api = emulator().await;
    let home = tempfile::tempdir().unwrap();
    let Some(kustomized) = kubectl(
        &api,
        home.path(),
        &["kustomize", repo_path("manifests").to_str().unwrap()],
    )
    .await
    else {
        return;
    };
    let kinds: Vec<&str> = kustomized
        .lines()
        .filter_map(|l| l.strip_prefix("kind: "))
        .collect();
    for kind in [
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
        "WorkerPool",
    ] {
        assert!(
            kinds.contains(&kind),
            "kustomize output lacks a {kind}: {kinds:?}"
        );
    }
    for file in [
        "namespace",
        "crd",
        "rbac",
        "config",
        "api",
        "controller",
        "workers",
        "workerpools",
    ] {
        let path = repo_path(&format!("manifests/{file}.yaml"));
        let out = kubectl(
            &api,
            home.path(),
            &[
                "apply",
                "--dry-run=client",
                "--validate=false",
                "-f",
                path.to_str().unwrap(),
            ],
        )
        .await
        .unwrap();
        assert!(out.contains("(dry run)"), "{file}.yaml: {out}");
    }
    let out = kubectl(
        &api,
        home.path(),
        &[
            "apply",
            "--dry-run=client",
            "--validate=false",
            "-k",
            repo_path("manifests").to_str().unwrap(),
        ],
    )
    .await
    .unwrap();
    assert!(
        out.contains("workerpool.backlog.dev/text-pdf created (dry run)"),
        "{out}"
    );
    assert!(
        !api.requests()
            .iter()
            .any(|r| r.method == "POST" || r.method == "PATCH" || r.method == "PUT"),
        "a client-side dry run writes nothing"
    );
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn kubectl_applies_the_crd_and_a_pool_that_the_controller_then_runs(pool: PgPool) {
    let q = Queue::new(pool);
    // A server without the CRD: kubectl installs it, as an operator would
    // (without schema validation: the emulator serves no OpenAPI documents).
    let api = KubeApi::start(&[]).await;
    let home = tempfile::tempdir().unwrap();
    let crd = repo_path("manifests/crd.yaml");
    let Some(out) = kubectl(
        &api,
        home.path(),
        &["apply", "--validate=false", "-f", crd.to_str().unwrap()],
    )
    .await
    else {
        return;
    };
    assert!(
        out.contains("customresourcedefinition.apiextensions.k8s.io/workerpools.backlog.dev created"),
        "{out}"
    );
    api.create(deployment("worker", 0));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pool.yaml");
    let pool = worker_pool("text", "text_generation", "worker", json!({}));
    std::fs::write(&file, serde_yaml_ng::to_string(&pool).unwrap()).unwrap();
    let out = kubectl(
        &api,
        home.path(),
        &["apply", "--validate=false", "-f", file.to_str().unwrap()],
    )
    .await
    .unwrap();
    assert!(out.contains("workerpool.backlog.dev/text created"), "{out}");

    let controller = start_controller(&api, &q, "a");
    enqueue_jobs(&q, JobType::Text, 1).await;
    eventually("1 replica", || (replicas(&api, "worker") == 1).then_some(())).await;
    let out = kubectl(&api, home.path(), &["delete", "wp", "text"])
        .await
        .unwrap();
    assert!(out.contains("deleted"), "{out}");
    enqueue_jobs(&q, JobType::Text, 3).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        replicas(&api, "worker"),
        1,
        "a deleted pool leaves its Deployment at its last count"
    );

    // Scaled down by hand and the pool created again: a new pool, not a
    // hand-scaled one to set back.
    api.scale("deployments", NS, "worker", 0);
    let args = ["apply", "--validate=false", "-f", file.to_str().unwrap()];
    let out = kubectl(&api, home.path(), &args).await.unwrap();
    assert!(out.contains("workerpool.backlog.dev/text created"), "{out}");
    eventually("4 replicas for the 4 pending tasks", || {
        (replicas(&api, "worker") == 4).then_some(())
    })
    .await;
    assert_eq!(events(&api, "text", "ManualScaleReverted").len(), 0);
    controller.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_statefulset_loses_only_idle_top_ordinals(pool: PgPool) {
    let q = Queue::new(pool);
    let api = emulator().await;
    api.create(json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "sts", "namespace": NS},
        "spec": {"replicas": 3, "serviceName": "sts", "selector": {"matchLabels": {"app": "sts"}},
            "template": {"metadata": {"labels": {"app": "sts"}}, "spec": {"containers": [{"name": "w", "image": "x"}]}}},
    }));
    let mut pool = worker_pool("text", "text_generation", "sts", json!({}));
    pool["spec"]["target"] = json!({"kubernetes": {"kind": "StatefulSet", "name": "sts"}});
    api.create(pool);
    for pod in ["sts-0", "sts-1", "sts-2"] {
        register_text_worker(&q, pod).await;
    }
    enqueue_jobs(&q, JobType::Text, 1).await;
    assert_eq!(
        q.claim("sts-1", &[TaskType::TextGeneration], 1)
            .await
            .unwrap()
            .len(),
        1
    );

    let controller = start_controller(&api, &q, "a");
    let statefulset = || api.get("apps", "statefulsets", NS, "sts").unwrap();
    eventually("sts at 2", || {
        (statefulset()["spec"]["replicas"] == 2).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        statefulset()["spec"]["replicas"],
        2,
        "sts-1 is busy: the StatefulSet cannot go lower"
    );
    assert_eq!(pod_names(&api, "sts"), ["sts-0", "sts-1"]);
    let drained: Vec<String> = q
        .workers(None)
        .await
        .unwrap()
        .into_iter()
        .filter(|w| w.state != queue::WorkerState::Running)
        .map(|w| w.id)
        .collect();
    assert_eq!(drained, ["sts-2"], "sts-0 was put back to work");
    controller.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_statefulset_ordinal_that_comes_back_is_not_left_draining(pool: PgPool) {
    let q = Queue::new(pool);
    let api = emulator().await;
    api.create(json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "sts", "namespace": NS},
        "spec": {"replicas": 2, "serviceName": "sts", "selector": {"matchLabels": {"app": "sts"}},
            "template": {"metadata": {"labels": {"app": "sts"}}, "spec": {"containers": [{"name": "w", "image": "x"}]}}},
    }));
    let mut pool = worker_pool("text", "text_generation", "sts", json!({}));
    pool["spec"]["target"] = json!({"kubernetes": {"kind": "StatefulSet", "name": "sts"}});
    api.create(pool);
    // sts-0 works; sts-1 has not registered yet when the pool scales down,
    // so it is drained under a placeholder row and removed.
    register_text_worker(&q, "sts-0").await;
    enqueue_jobs(&q, JobType::Text, 1).await;
    let held = q.claim("sts-0", &[TaskType::TextGeneration], 1).await.unwrap();
    let controller = start_controller(&api, &q, "a");
    let statefulset = || api.get("apps", "statefulsets", NS, "sts").unwrap();
    eventually("sts at 1", || {
        (statefulset()["spec"]["replicas"] == 1).then_some(())
    })
    .await;
    assert_eq!(pod_names(&api, "sts"), ["sts-0"]);

    // Work for two replicas: sts-1 comes back under its old name and registers.
    enqueue_jobs(&q, JobType::Text, 4).await;
    eventually("sts back at 2 or more", || {
        (statefulset()["spec"]["replicas"].as_i64() >= Some(2)).then_some(())
    })
    .await;
    register_text_worker(&q, "sts-1").await;
    let state = |q: Queue| async move {
        let workers = q.workers(None).await.unwrap();
        workers.into_iter().find(|w| w.id == "sts-1").map(|w| w.state)
    };
    let mut last = None;
    for _ in 0..50 {
        last = state(q.clone()).await;
        if last == Some(queue::WorkerState::Running) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        last,
        Some(queue::WorkerState::Running),
        "sts-1 is back: it takes work"
    );
    q.complete("sts-0", held[0].lease(), json!({})).await.unwrap();
    controller.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn two_pools_for_one_task_type_leave_the_newer_one_invalid(pool: PgPool) {
    let q = Queue::new(pool);
    let api = emulator().await;
    api.create(deployment("worker", 0));
    api.create(worker_pool("first", "text_generation", "worker", json!({})));
    tokio::time::sleep(Duration::from_millis(1100)).await; // a later creationTimestamp
    api.create(worker_pool("second", "text_generation", "worker", json!({})));
    let controller = start_controller(&api, &q, "a");
    let ready = eventually("the second pool rejected", || {
        let ready = condition(&pool_status(&api, "second"), "Ready");
        (ready["reason"] == "InvalidSpec").then_some(ready)
    })
    .await;
    assert_eq!(
        ready["message"],
        "spec.taskTypes: text_generation is already served by WorkerPool default/first"
    );
    eventually("the first pool runs", || {
        (condition(&pool_status(&api, "first"), "Ready")["status"] == "True").then_some(())
    })
    .await;
    // GET /v1/pools lists it too, under its namespaced key, saying why.
    let mut listed = None;
    for _ in 0..100 {
        let rows = q.pool_statuses().await.unwrap();
        listed = rows.into_iter().find(|r| r.status.pool == "default/second");
        if listed.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let listed = listed.expect("the rejected pool in GET /v1/pools").status;
    assert_eq!(listed.conditions[0]["reason"], "InvalidSpec");
    assert_eq!(listed.conditions[0]["message"], ready["message"]);
    controller.stop().await;
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn an_unreadable_queue_switches_to_the_fallback_with_an_event(pool: PgPool) {
    let q = Queue::new(pool.clone());
    let api = emulator().await;
    api.create(deployment("worker", 0));
    let spec = json!({"fallback": {"failureThreshold": 2, "replicas": 2}});
    api.create(worker_pool("text", "text_generation", "worker", spec));
    let loaded = loaded_from_the_cluster(&api, "text");
    let mut reconciler = Reconciler::new(Context {
        queue: q.clone(),
        backend: KubernetesBackend::new(client(&api), q.clone()),
        metrics: Arc::new(Metrics::default()),
    });
    let pools = [loaded];
    let now = chrono::Utc::now();
    reconciler.reconcile(&pools, now).await;
    pool.close().await;
    reconciler
        .reconcile(&pools, now + chrono::Duration::seconds(1))
        .await;
    // Below the threshold the pool holds: not on its fallback yet, and the
    // condition says the queue is unreadable rather than readable.
    let holding = condition(&pool_status(&api, "text"), "Fallback");
    assert_eq!(
        (holding["status"].as_str(), holding["reason"].as_str()),
        (Some("False"), Some("QueueUnreadable")),
        "{holding}"
    );
    for i in 2..=3 {
        reconciler
            .reconcile(&pools, now + chrono::Duration::seconds(i))
            .await;
    }
    assert_eq!(replicas(&api, "worker"), 2, "the fallback count");
    let status = pool_status(&api, "text");
    assert_eq!(condition(&status, "Fallback")["status"], "True", "{status}");
    assert_eq!(
        condition(&status, "Fallback")["reason"],
        "QueueUnreadable",
        "{status}"
    );
    let fallback = events(&api, "text", "Fallback");
    assert_eq!(
        fallback.len(),
        1,
        "one Event when the fallback starts: {fallback:?}"
    );
    assert_eq!(fallback[0]["type"], "Warning");
    assert_eq!(events(&api, "text", "ScaledUp").len(), 1);
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn controller_run_backend_kubernetes_uses_the_kubeconfig_and_stops_on_sigterm(pool: PgPool) {
    let q = Queue::new(pool.clone());
    let api = text_pool_on_a_deployment(0).await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = kubeconfig(&api, dir.path(), Some(controller_token(&api)));
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_controller"))
        .args([
            "run",
            "--backend",
            "kubernetes",
            "--tick-seconds",
            "0.3",
            "--log-format",
            "text",
        ])
        .env("KUBECONFIG", &kubeconfig)
        .env("DATABASE_URL", test_support::database_url(&pool))
        // Without POD_NAME (a pod spec that forgot the downward API):
        // the hostname and a random suffix, never `controller-{pid}`.
        .env_remove("POD_NAME")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    enqueue_jobs(&q, JobType::Text, 2).await;
    eventually("the binary scaled the deployment", || {
        (replicas(&api, "worker") == 2).then_some(())
    })
    .await;
    let holder = lease_holder(&api).expect("a Lease holder");
    let mut host = [0u8; 256];
    // SAFETY: gethostname(2) writes at most `host.len()` bytes into `host`.
    let named = unsafe { libc::gethostname(host.as_mut_ptr().cast(), host.len()) };
    assert_eq!(named, 0);
    let host = std::ffi::CStr::from_bytes_until_nul(&host)
        .unwrap()
        .to_str()
        .unwrap();
    let suffix = holder
        .strip_prefix(&format!("{host}-"))
        .unwrap_or_else(|| panic!("the identity {holder:?} is not the hostname and a suffix"));
    assert!(
        suffix.len() == 8 && suffix.chars().all(|c| c.is_ascii_hexdigit()),
        "{holder}"
    );
    let reporting: Vec<Value> = eventually("the ScaledUp Event", || {
        let scaled = events(&api, "text", "ScaledUp");
        (!scaled.is_empty()).then(|| scaled.iter().map(|e| e["reportingInstance"].clone()).collect())
    })
    .await;
    assert_eq!(reporting, vec![json!(holder)], "the Events name the same replica");

    // SAFETY: kill(2) on the child we started, with a valid signal.
    unsafe { libc::kill(child.id().unwrap() as libc::pid_t, libc::SIGTERM) };
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(lease_holder(&api), None, "the Lease is released on the way out");
}

/// The README's steps against the emulator: the CRD, then the
/// kustomization, applied again later as any change would be. The worker
/// Deployments leave `replicas` to the controller, so a re-apply keeps the
/// count it set (through /scale, as its service account) and kills no pod.
#[tokio::test]
async fn reapplying_the_kustomization_keeps_the_count_the_controller_set() {
    let api = KubeApi::start(&[]).await;
    let home = tempfile::tempdir().unwrap();
    let crd = repo_path("manifests/crd.yaml");
    let manifests = repo_path("manifests");
    let apply_crd = ["apply", "--validate=false", "-f", crd.to_str().unwrap()];
    if kubectl(&api, home.path(), &apply_crd).await.is_none() {
        return;
    }
    let established = [
        "wait",
        "--for",
        "condition=established",
        "--timeout=10s",
        "crd/workerpools.backlog.dev",
    ];
    let out = kubectl(&api, home.path(), &established).await.unwrap();
    assert!(out.contains("condition met"), "{out}");
    let apply = ["apply", "--validate=false", "-k", manifests.to_str().unwrap()];
    let out = kubectl(&api, home.path(), &apply).await.unwrap();
    assert!(out.contains("deployment.apps/worker created"), "{out}");
    let replicas_of = |name: &str| {
        api.get("apps", "deployments", "backlog", name).unwrap()["spec"]["replicas"]
            .as_i64()
            .unwrap()
    };
    assert_eq!(
        replicas_of("worker"),
        1,
        "a new Deployment without replicas starts at 1"
    );

    // The controller, as the applied service account, scales the workers.
    let token = api.service_account_token("backlog", "backlog-controller");
    let controller = client_with_token(&api, "backlog", Some(token));
    let deployments: kube::Api<k8s_openapi::api::apps::v1::Deployment> =
        kube::Api::namespaced(controller, "backlog");
    let patch = kube::api::Patch::Merge(json!({"spec": {"replicas": 5}}));
    deployments
        .patch_scale("worker", &Default::default(), &patch)
        .await
        .expect("the applied Role lets the controller scale");
    let pods_of_worker = || {
        let mut pods: Vec<String> = api
            .list("", "pods", "backlog")
            .into_iter()
            .filter(|p| p["metadata"]["labels"]["app.kubernetes.io/name"] == "backlog-worker")
            .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
            .collect();
        pods.sort();
        pods
    };
    let before = pods_of_worker();
    assert_eq!(before.len(), 5);

    let out = kubectl(&api, home.path(), &apply).await.unwrap();
    eprintln!("second apply:\n{out}");
    assert_eq!(
        replicas_of("worker"),
        5,
        "the re-apply reset the controller's count:\n{out}"
    );
    assert_eq!(pods_of_worker(), before, "the re-apply deleted pods");
}

/// Logs every replica marked draining, however briefly: a drain undone in
/// the same pass leaves no other trace. (A test instrument, not a queue
/// statement.)
async fn record_drains(pool: &PgPool) {
    sqlx::raw_sql(
        "CREATE TABLE drain_log (worker_id text NOT NULL);
         CREATE FUNCTION log_drain() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.state = 'draining' AND (TG_OP = 'INSERT' OR OLD.state <> 'draining') THEN
                 INSERT INTO drain_log VALUES (NEW.id);
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER log_drain AFTER INSERT OR UPDATE ON workers
             FOR EACH ROW EXECUTE FUNCTION log_drain();",
    )
    .execute(pool)
    .await
    .unwrap();
}

async fn drains(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT worker_id FROM drain_log")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// A Deployment mid-rollout (new pods not ready yet, so it stalls with
/// pods of two ReplicaSets) is not scaled down: the pool says why, in an
/// Event and its `ScaleDownDeferred` condition, and scale-up goes on. Once
/// the rollout completes the condition clears.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_deployment_mid_rollout_is_not_scaled_down(pool: PgPool) {
    record_drains(&pool).await;
    let q = Queue::new(pool.clone());
    let api = text_pool_on_a_deployment(4).await;
    // A rollout whose new pods do not get ready: `kubectl rollout restart`.
    api.set_pods_start_ready(false);
    let admin: kube::Api<k8s_openapi::api::apps::v1::Deployment> =
        kube::Api::namespaced(admin_client(&api), NS);
    let restart = json!({"spec": {"template": {"metadata": {"annotations": {
        "kubectl.kubernetes.io/restartedAt": "2026-12-02T18:00:00Z"}}}}});
    admin
        .patch("worker", &Default::default(), &kube::api::Patch::Merge(restart))
        .await
        .unwrap();
    let deployment = api.get("apps", "deployments", NS, "worker").unwrap();
    let status = &deployment["status"];
    assert!(
        status["updatedReplicas"].as_i64().unwrap() < 4 && status["replicas"].as_i64().unwrap() > 4,
        "the emulator's rollout stalls at the surge: {status}"
    );
    let pods = pod_names(&api, "worker");
    for pod in &pods {
        register_text_worker(&q, pod).await;
    }
    let ready_pod = api
        .list("", "pods", NS)
        .into_iter()
        .find(|p| p["status"]["conditions"][1]["status"] == "True")
        .unwrap();
    let busy = ready_pod["metadata"]["name"].as_str().unwrap().to_string();
    enqueue_jobs(&q, JobType::Text, 1).await;
    assert_eq!(
        q.claim(&busy, &[TaskType::TextGeneration], 1)
            .await
            .unwrap()
            .len(),
        1
    );

    // One task in flight: the policy wants 1 replica of 4.
    let controller = start_controller(&api, &q, "a");
    let deferred = eventually("ScaleDownDeferred=True", || {
        let c = condition(&pool_status(&api, "text"), "ScaleDownDeferred");
        (c["status"] == "True").then_some(c)
    })
    .await;
    assert_eq!(deferred["reason"], "RolloutInProgress", "{deferred}");
    let event = events(&api, "text", "ScaleDownDeferred");
    assert_eq!(event.len(), 1, "{event:?}");
    assert!(
        event[0]["message"]
            .as_str()
            .unwrap()
            .starts_with("Deployment worker is rolling out ("),
        "{event:?}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(replicas(&api, "worker"), 4, "no scale-down during the rollout");
    assert_eq!(
        drains(&pool).await,
        Vec::<String>::new(),
        "a deferred scale-down takes no pod out of service, not even for a pass"
    );
    assert!(pod_names(&api, "worker").contains(&busy));
    assert!(events(&api, "text", "ScaledDown").is_empty());

    // Scale-up is not held: 5 tasks want the 5 replicas of maxReplicas.
    enqueue_jobs(&q, JobType::Text, 4).await;
    eventually("5 replicas", || (replicas(&api, "worker") == 5).then_some(())).await;

    // New pods get ready: the rollout completes and the hold is lifted.
    api.set_pods_start_ready(true);
    for pod in api.list("", "pods", NS) {
        api.set_pod_ready(NS, pod["metadata"]["name"].as_str().unwrap(), true);
    }
    let settled = api.get("apps", "deployments", NS, "worker").unwrap();
    assert_eq!(
        settled["status"]["updatedReplicas"], settled["status"]["replicas"],
        "{settled}"
    );
    eventually("ScaleDownDeferred=False", || {
        let c = condition(&pool_status(&api, "text"), "ScaleDownDeferred");
        (c["status"] == "False").then_some(())
    })
    .await;
    controller.stop().await;
}

/// A kubeconfig for the emulator: the controller's service account, or the
/// administrator with no token.
fn kubeconfig(api: &KubeApi, dir: &std::path::Path, token: Option<String>) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    let user = token.map_or_else(|| "{}".to_string(), |t| format!("{{token: {t}}}"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: emulator\n  cluster: {{server: \"{}\"}}\n\
             users:\n- name: controller\n  user: {user}\ncontexts:\n- name: emulator\n  context: {{cluster: emulator, user: controller, namespace: {NS}}}\n\
             current-context: emulator\n",
            api.url(),
        ),
    )
    .unwrap();
    path
}

/// `controller plan --backend kubernetes ARGS`, which must succeed: its output.
async fn controller_plan(pool: &PgPool, kubeconfig: &std::path::Path, args: &[&str]) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_controller"))
        .args(["plan", "--backend", "kubernetes"])
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("DATABASE_URL", test_support::database_url(pool))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("CONTROLLER_NAMESPACE")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn the_plan_command_reads_the_clusters_pools_and_changes_nothing(pool: PgPool) {
    let q = Queue::new(pool.clone());
    let api = text_pool_on_a_deployment(0).await;
    // A pool of another namespace: planned only with --all-namespaces.
    api.create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "elsewhere"}}));
    let mut audio_target = deployment("audio", 0);
    audio_target["metadata"]["namespace"] = json!("elsewhere");
    api.create(audio_target);
    let mut audio = worker_pool("audio", "audio_generation", "audio", json!({}));
    audio["metadata"]["namespace"] = json!("elsewhere");
    api.create(audio);
    enqueue_jobs(&q, JobType::Text, 2).await;
    enqueue_jobs(&q, JobType::Audiobook, 1).await;
    let dir = tempfile::tempdir().unwrap();

    let as_controller = kubeconfig(&api, dir.path(), Some(controller_token(&api)));
    let stdout = controller_plan(&pool, &as_controller, &[]).await;
    assert!(stdout.contains("text: 0 → 2 replicas"), "{stdout}");
    assert!(stdout.contains("2 pending"), "{stdout}");
    assert!(!stdout.contains("audio"), "another namespace's pool: {stdout}");

    let admin_dir = tempfile::tempdir().unwrap();
    let as_admin = kubeconfig(&api, admin_dir.path(), None);
    let stdout = controller_plan(&pool, &as_admin, &["--all-namespaces"]).await;
    assert!(stdout.contains("text: 0 → 2 replicas"), "{stdout}");
    assert!(stdout.contains("audio: 0 → 1 replicas"), "{stdout}");

    assert_eq!(replicas(&api, "worker"), 0, "plan scaled a deployment");
    assert_eq!(
        pool_status(&api, "text"),
        Value::Null,
        "plan wrote the pool's status"
    );
    assert!(events(&api, "text", "ScaledUp").is_empty());
    assert_eq!(lease_holder(&api), None, "plan took the leader's Lease");
    let statuses: i64 = sqlx::query_scalar("SELECT count(*) FROM pool_status")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(statuses, 0, "plan wrote a pool status row");
}

/// The ReplicaSet lowered for a drained pod may remove another one (a pod
/// not ready ranks before any deletion cost). The drained pod is then one
/// of those kept: it counts as a replica again and goes back to work,
/// instead of staying drained and uncounted until the controller restarts.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_drained_pod_the_replica_set_spared_goes_back_to_work(pool: PgPool) {
    use controller::backend::{Backend, PoolRef};
    use controller::reconcile::Leadership;
    let q = Queue::new(pool);
    let api = text_pool_on_a_deployment(2).await;
    let pods = pod_names(&api, "worker");
    for pod in &pods {
        register_text_worker(&q, pod).await;
    }
    let (drained, other) = (pods[0].clone(), pods[1].clone());
    // Idle but not ready: the ReplicaSet deletes it first, whatever the costs.
    api.set_pod_ready(NS, &other, false);
    let loaded = loaded_from_the_cluster(&api, "text");
    let backend = KubernetesBackend::new(client(&api), q.clone());
    let leading = Leadership::held();
    let text = PoolRef::new(&loaded, &leading);
    assert_eq!(backend.observe(text).await.unwrap().len(), 2);

    let only = std::slice::from_ref(&drained);
    assert_eq!(q.drain_idle(only).await.unwrap(), only);
    backend.remove(text, only).await.unwrap();
    eventually("the ReplicaSet to remove a pod", || {
        (pod_names(&api, "worker").len() == 1).then_some(())
    })
    .await;
    assert_eq!(pod_names(&api, "worker"), only, "the other pod went");

    let replicas = backend.observe(text).await.unwrap();
    let ids: Vec<&str> = replicas.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, [drained.as_str()], "the spared pod counts again");
    let state = q
        .workers(None)
        .await
        .unwrap()
        .into_iter()
        .find(|w| w.id == drained)
        .unwrap()
        .state;
    assert_eq!(state, queue::WorkerState::Running, "and is back at work");
}

/// A pass checks leadership before it scales, but observing a target
/// scaled by hand converges it (a drain, deletion costs, `/scale`) inside
/// the backend. A controller whose leadership is gone leaves a hand-scaled
/// target to the new leader: no count set back, no pod drained, no Event.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_former_leader_leaves_a_hand_scaled_target_as_it_is(pool: PgPool) {
    use controller::backend::{Backend, BackendError, PoolRef};
    use controller::reconcile::Leadership;
    let q = Queue::new(pool);
    let api = text_pool_on_a_deployment(2).await;
    let pods = pod_names(&api, "worker");
    for pod in &pods {
        register_text_worker(&q, pod).await;
    }
    let loaded = loaded_from_the_cluster(&api, "text");
    let backend = KubernetesBackend::new(client(&api), q.clone());
    let leadership = Leadership::held();
    let text = PoolRef::new(&loaded, &leadership);
    assert_eq!(backend.observe(text).await.unwrap().len(), 2);

    api.scale("deployments", NS, "worker", 1);
    leadership.set(false);
    let err = backend.observe(text).await.unwrap_err();

    assert!(matches!(err, BackendError::LostLeadership { .. }), "{err}");
    assert_eq!(replicas(&api, "worker"), 1, "the count is not set back");
    assert!(events(&api, "text", "ManualScaleReverted").is_empty());
    api.scale("deployments", NS, "worker", 3);
    backend.observe(text).await.unwrap_err();
    assert_eq!(replicas(&api, "worker"), 3, "nor lowered again");
    let draining: Vec<String> = q
        .workers(None)
        .await
        .unwrap()
        .into_iter()
        .filter(|w| w.state == queue::WorkerState::Draining)
        .map(|w| w.id)
        .collect();
    assert!(draining.is_empty(), "no pod drained: {draining:?}");
}

/// Leadership lost and won back: what another leader set meanwhile is a
/// leader's count, not a hand-scale. The count remembered from before was
/// taken for the one to converge to: the other leader's scale-up was set
/// back, with a ManualScaleReverted Warning.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_count_set_by_another_leader_is_not_reverted_on_winning_back(pool: PgPool) {
    use controller::backend::{Backend, PoolRef};
    use controller::reconcile::Leadership;
    let q = Queue::new(pool);
    let api = text_pool_on_a_deployment(2).await;
    let loaded = loaded_from_the_cluster(&api, "text");
    let backend = KubernetesBackend::new(client(&api), q.clone());
    let leading = Leadership::held();
    let text = PoolRef::new(&loaded, &leading);
    assert_eq!(backend.observe(text).await.unwrap().len(), 2);

    // Another controller leads for a while and scales to 4.
    api.scale("deployments", NS, "worker", 4);
    backend.take_office().await;
    backend.observe(text).await.unwrap();
    assert_eq!(replicas(&api, "worker"), 4, "the other leader's count stands");
    assert!(events(&api, "text", "ManualScaleReverted").is_empty());

    // A hand-scale after that is still set back.
    api.scale("deployments", NS, "worker", 6);
    backend.observe(text).await.unwrap();
    eventually("a ManualScaleReverted event", || {
        events(&api, "text", "ManualScaleReverted").pop()
    })
    .await;
}
