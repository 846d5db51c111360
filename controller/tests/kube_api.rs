//! The API server emulator behaves as the real server does for what the
//! controller relies on, checked with kube's own client and k8s-openapi's
//! types (which are generated from the official OpenAPI schema).

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::CustomResourceExt;
use serde_json::json;
use test_support::kube_api::{Fault, KubeApi};

use controller::spec::WorkerPool;

async fn setup() -> (KubeApi, kube::Client) {
    let api = KubeApi::start(&[serde_json::to_value(WorkerPool::crd()).unwrap()]).await;
    let client = kube::Client::try_from(kube::Config::new(api.url().parse().unwrap())).unwrap();
    (api, client)
}

fn deployment(name: &str, replicas: i32) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "w", "image": "x"}]}}},
    }))
    .unwrap()
}

fn api_error(e: kube::Error) -> kube::core::Status {
    match e {
        kube::Error::Api(status) => *status,
        other => panic!("not an API error: {other}"),
    }
}

#[tokio::test]
async fn errors_are_status_objects_with_code_and_reason() {
    let (_api, client) = setup().await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let missing = api_error(deployments.get("nope").await.unwrap_err());
    assert_eq!((missing.code, missing.reason.as_str()), (404, "NotFound"));
    assert_eq!(missing.message, "deployments.apps \"nope\" not found");

    deployments
        .create(&PostParams::default(), &deployment("w", 1))
        .await
        .unwrap();
    let exists = api_error(
        deployments
            .create(&PostParams::default(), &deployment("w", 1))
            .await
            .unwrap_err(),
    );
    assert_eq!((exists.code, exists.reason.as_str()), (409, "AlreadyExists"));

    let elsewhere: Api<Deployment> = Api::namespaced(client, "nowhere");
    let no_namespace = api_error(
        elsewhere
            .create(&PostParams::default(), &deployment("w", 1))
            .await
            .unwrap_err(),
    );
    assert_eq!(no_namespace.code, 404);
    assert_eq!(no_namespace.message, "namespaces \"nowhere\" not found");
}

#[tokio::test]
async fn a_stale_resource_version_is_a_conflict() {
    let (_api, client) = setup().await;
    let deployments: Api<Deployment> = Api::namespaced(client, "default");
    let created = deployments
        .create(&PostParams::default(), &deployment("w", 1))
        .await
        .unwrap();
    let mut first = created.clone();
    first.spec.as_mut().unwrap().replicas = Some(2);
    let updated = deployments
        .replace("w", &PostParams::default(), &first)
        .await
        .unwrap();
    assert_eq!(
        updated.metadata.generation,
        Some(2),
        "a spec change bumps the generation"
    );
    let stale = api_error(
        deployments
            .replace("w", &PostParams::default(), &created)
            .await
            .unwrap_err(),
    );
    assert_eq!((stale.code, stale.reason.as_str()), (409, "Conflict"));

    // The scale subresource follows the Deployment and makes its pods.
    let scale = deployments.get_scale("w").await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(2));
    assert_eq!(scale.status.unwrap().selector.as_deref(), Some("app=w"));
    deployments
        .patch_scale(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await
        .unwrap();
    let deployment = deployments.get("w").await.unwrap();
    assert_eq!(deployment.status.unwrap().ready_replicas, Some(3));
}

#[tokio::test]
async fn pods_are_listed_by_label_selector() {
    let (_api, client) = setup().await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    deployments
        .create(&PostParams::default(), &deployment("a", 2))
        .await
        .unwrap();
    deployments
        .create(&PostParams::default(), &deployment("b", 1))
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let a = pods.list(&ListParams::default().labels("app=a")).await.unwrap();
    assert_eq!(a.items.len(), 2);
    let not_a = pods
        .list(&ListParams::default().labels("app notin (a)"))
        .await
        .unwrap();
    assert_eq!(not_a.items.len(), 1);
    let page = pods.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(page.items.len(), 2);
    let token = page.metadata.continue_.clone().expect("a continue token");
    let rest = pods
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(rest.items.len(), 1);
}

#[tokio::test]
async fn a_watch_resumes_after_its_resource_version_and_expires_after_compaction() {
    let (api, client) = setup().await;
    api.set_bookmark_interval(Duration::from_millis(100));
    let pools: Api<WorkerPool> = Api::namespaced(client, "default");
    let list = pools.list(&ListParams::default()).await.unwrap();
    let rv = list.metadata.resource_version.unwrap();
    let pool = json!({"apiVersion": "backlog.dev/v1alpha1", "kind": "WorkerPool", "metadata": {"name": "p"},
        "spec": {"taskTypes": ["text_generation"], "target": {"local": {"command": ["w"]}}, "maxReplicas": 1}});
    pools
        .create(&PostParams::default(), &serde_json::from_value(pool).unwrap())
        .await
        .unwrap();
    let mut stream = pools
        .watch(&WatchParams::default().timeout(10), &rv)
        .await
        .unwrap()
        .boxed();
    let mut saw_added = false;
    let mut saw_bookmark = false;
    while !(saw_added && saw_bookmark) {
        match tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            WatchEvent::Added(p) => saw_added = p.metadata.name.as_deref() == Some("p"),
            WatchEvent::Bookmark(_) => saw_bookmark = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    api.compact();
    let mut expired = pools.watch(&WatchParams::default(), &rv).await.unwrap().boxed();
    match expired.next().await.unwrap().unwrap() {
        WatchEvent::Error(e) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        other => panic!("expected 410, got {other:?}"),
    }
    // A disconnect ends the open watch.
    api.disconnect_watches();
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(event) = stream.next().await {
            if event.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the watch ended on disconnect");
}

#[tokio::test]
async fn server_side_apply_of_status_tracks_field_managers() {
    let (api, client) = setup().await;
    let pools: Api<WorkerPool> = Api::namespaced(client, "default");
    let pool = json!({"apiVersion": "backlog.dev/v1alpha1", "kind": "WorkerPool", "metadata": {"name": "p"},
        "spec": {"taskTypes": ["text_generation"], "target": {"local": {"command": ["w"]}}, "maxReplicas": 1}});
    pools
        .create(&PostParams::default(), &serde_json::from_value(pool).unwrap())
        .await
        .unwrap();
    let apply = |manager: &str, status: serde_json::Value, force: bool| {
        let mut params = PatchParams::apply(manager);
        params.force = force;
        let patch = Patch::Apply(
            json!({"apiVersion": "backlog.dev/v1alpha1", "kind": "WorkerPool", "status": status}),
        );
        let pools = pools.clone();
        async move { pools.patch_status("p", &params, &patch).await }
    };
    apply("a", json!({"pending": 1, "inFlight": 2}), false)
        .await
        .unwrap();
    let conflict = api_error(apply("b", json!({"pending": 5}), false).await.unwrap_err());
    assert_eq!(conflict.code, 409);
    assert!(
        conflict.message.contains("conflict with \"a\": .status.pending"),
        "{}",
        conflict.message
    );
    apply("b", json!({"pending": 5}), true).await.unwrap();
    // `a` no longer sets inFlight: removed; pending is b's now: kept.
    let written = apply("a", json!({}), false).await.unwrap();
    let status = written.status.unwrap();
    assert_eq!((status.pending, status.in_flight), (5, 0));
    let object = api.get("backlog.dev", "workerpools", "default", "p").unwrap();
    assert!(object["status"].get("inFlight").is_none(), "{object}");
    assert_eq!(
        object["metadata"]["generation"], 1,
        "status writes leave the generation alone"
    );
    let missing = api_error(
        pools
            .patch_status(
                "nope",
                &PatchParams::apply("a"),
                &Patch::Apply(json!({"status": {}})),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(missing.code, 404);
}

#[tokio::test]
async fn discovery_serves_the_builtin_groups_and_the_crd() {
    let (_api, client) = setup().await;
    let discovery = kube::Discovery::new(client).run().await.unwrap();
    let (wp, caps) = discovery
        .groups()
        .flat_map(|g| g.recommended_resources())
        .find(|(r, _)| r.plural == "workerpools")
        .expect("workerpools are discovered");
    assert_eq!(
        (wp.group.as_str(), wp.version.as_str(), wp.kind.as_str()),
        ("backlog.dev", "v1alpha1", "WorkerPool")
    );
    assert!(caps.subresources.iter().any(|(r, _)| r.plural == "status"));
    for group in [
        "apps",
        "coordination.k8s.io",
        "rbac.authorization.k8s.io",
        "apiextensions.k8s.io",
    ] {
        assert!(discovery.has_group(group), "{group}");
    }
}

#[tokio::test]
async fn injected_faults_and_latency_are_served() {
    let (api, client) = setup().await;
    let deployments: Api<Deployment> = Api::namespaced(client, "default");
    api.inject(Fault {
        method: None,
        path_contains: "/deployments".into(),
        code: 500,
        times: 1,
    });
    let failed = api_error(deployments.list(&ListParams::default()).await.unwrap_err());
    assert_eq!((failed.code, failed.reason.as_str()), (500, "InternalError"));
    deployments
        .list(&ListParams::default())
        .await
        .expect("the fault was used up");

    api.set_latency(Duration::from_millis(300));
    let started = std::time::Instant::now();
    deployments.list(&ListParams::default()).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
}

/// A Deployment's rollout as the Deployment controller runs it: a new
/// template starts a second ReplicaSet, surge and unavailability bound it,
/// unready new pods stall it; lowering the count mid-rollout takes pods from
/// each ReplicaSet in proportion to its size, whatever the deletion costs in
/// the other — the reason the controller will not scale down mid-rollout.
#[tokio::test]
async fn a_rollout_stalls_on_unready_pods_and_a_scale_down_spreads_over_replica_sets() {
    let (api, client) = setup().await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    deployments
        .create(&PostParams::default(), &deployment("w", 4))
        .await
        .unwrap();
    api.set_pods_start_ready(false);
    let restart = json!({"spec": {"template": {"metadata": {"annotations": {"restartedAt": "now"}}}}});
    deployments
        .patch("w", &PatchParams::default(), &Patch::Merge(restart))
        .await
        .unwrap();
    let status = deployments.get("w").await.unwrap().status.unwrap();
    // 25 % surge (1) and 25 % unavailable (1) of 4: 3 old ready, 2 new not.
    assert_eq!(
        (status.replicas, status.updated_replicas, status.ready_replicas),
        (Some(5), Some(2), Some(3))
    );
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let listed = pods.list(&ListParams::default()).await.unwrap().items;
    let owner = |p: &Pod| p.metadata.owner_references.as_ref().unwrap()[0].name.clone();
    let mut sets: Vec<String> = listed.iter().map(owner).collect();
    sets.sort();
    sets.dedup();
    assert_eq!(sets.len(), 2, "two ReplicaSets: {sets:?}");

    // The old pods are marked expensive, a new one cheapest: no matter.
    let old_set = owner(listed.iter().find(|p| is_ready(p)).unwrap());
    for pod in &listed {
        let cost = if owner(pod) == old_set { "1000" } else { "-1000" };
        let patch =
            json!({"metadata": {"annotations": {"controller.kubernetes.io/pod-deletion-cost": cost}}});
        pods.patch(
            pod.metadata.name.as_ref().unwrap(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
        .unwrap();
    }
    api.scale("deployments", "default", "w", 2);
    let left = pods.list(&ListParams::default()).await.unwrap().items;
    let old_left = left.iter().filter(|p| owner(p) == old_set).count();
    let new_left = left.len() - old_left;
    assert_eq!(
        (old_left, new_left),
        (1, 2),
        "the larger old ReplicaSet gave up its expensive pods; the cheap new ones stayed"
    );
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}
