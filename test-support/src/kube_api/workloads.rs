//! Deployments and StatefulSets in miniature: their replica count becomes
//! Pods, their status follows the Pods, deleting one deletes its Pods.
//!
//! A Deployment's pods belong to the ReplicaSet of their template (the
//! `pod-template-hash` label): a new template starts a rollout, which
//! follows the Deployment controller's rules — `RollingUpdate` (default 25 %
//! surge, 25 % unavailable: new pods up to the surge, old ones down as far
//! as availability allows, unready old ones first) or `Recreate` — and
//! stalls while new pods are not ready, as on a real cluster. Lowering the
//! count mid-rollout scales every ReplicaSet down in proportion to its
//! size, each ranking only its own pods (not ready, then
//! `controller.kubernetes.io/pod-deletion-cost`, then the newest): the
//! real controller's proportional scaling. (ReplicaSets are not served as
//! objects; pods name theirs in `ownerReferences`.)

use serde_json::{json, Value};

use super::{ResourceType, State};

/// The annotation the ReplicaSet controller ranks pods by on scale-down.
pub const POD_DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

fn pods_type(state: &State) -> ResourceType {
    state.find_type("", "v1", "pods").cloned().expect("builtin pods")
}

/// A stable 10-character stand-in for a ReplicaSet's pod-template-hash:
/// one per Deployment and template.
fn template_hash(uid: &str, template: &Value) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let text = format!("{uid}{template}");
    let mut x: u64 = text.bytes().fold(1469598103934665603, |h, b| {
        (h ^ b as u64).wrapping_mul(1099511628211)
    });
    (0..10)
        .map(|_| {
            let c = ALPHABET[(x % 27) as usize] as char;
            x /= 27;
            c
        })
        .collect()
}

fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

pub fn set_ready(pod: &mut Value, ready: bool) {
    let status = if ready { "True" } else { "False" };
    pod["status"]["conditions"] = json!([
        {"type": "PodScheduled", "status": "True"},
        {"type": "Ready", "status": status},
        {"type": "ContainersReady", "status": status},
    ]);
}

fn deletion_cost(pod: &Value) -> i64 {
    pod["metadata"]["annotations"][POD_DELETION_COST]
        .as_str()
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn pod_name(pod: &Value) -> String {
    pod["metadata"]["name"].as_str().unwrap_or_default().to_string()
}

fn hash_of(pod: &Value) -> &str {
    pod["metadata"]["labels"]["pod-template-hash"]
        .as_str()
        .unwrap_or_default()
}

/// Pods the workload owns: through its ReplicaSets for a Deployment (their
/// uid is the Deployment's and the template hash), directly for a StatefulSet.
fn owned_pods(state: &State, workload: &Value) -> Vec<Value> {
    let namespace = workload["metadata"]["namespace"].as_str().unwrap_or_default();
    let uid = workload["metadata"]["uid"].as_str().unwrap_or_default();
    let deployment = workload["kind"] == "Deployment";
    let replica_set_uid = format!("{uid}-");
    state
        .objects
        .get("/pods")
        .map(|pods| {
            pods.iter()
                .filter(|((ns, _), _)| ns == namespace)
                .map(|(_, p)| p)
                .filter(|p| {
                    let owner = p["metadata"]["ownerReferences"][0]["uid"]
                        .as_str()
                        .unwrap_or_default();
                    if deployment {
                        owner.starts_with(&replica_set_uid)
                    } else {
                        owner == uid
                    }
                })
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// The ReplicaSet controller's ranking for removal: not ready first, then
/// the lowest deletion cost, then the newest.
fn rank_for_removal(pods: &mut [Value]) {
    pods.sort_by(|a, b| {
        is_ready(a)
            .cmp(&is_ready(b))
            .then(deletion_cost(a).cmp(&deletion_cost(b)))
            .then(
                b["metadata"]["creationTimestamp"]
                    .as_str()
                    .cmp(&a["metadata"]["creationTimestamp"].as_str()),
            )
            .then(
                b["metadata"]["name"]
                    .as_str()
                    .cmp(&a["metadata"]["name"].as_str()),
            )
    });
}

fn delete_pods(state: &mut State, namespace: &str, pods: &[Value]) {
    let pods_rt = pods_type(state);
    for pod in pods {
        let _ = state.delete(&pods_rt, namespace, &pod_name(pod));
    }
}

/// Create a pod from the workload's template: in the ReplicaSet of `hash`
/// for a Deployment, under `ordinal` for a StatefulSet.
fn create_pod(state: &mut State, workload: &Value, hash: Option<&str>, ordinal: usize) {
    let namespace = workload["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let name = workload["metadata"]["name"].as_str().unwrap_or_default();
    let uid = workload["metadata"]["uid"].as_str().unwrap_or_default();
    let template = &workload["spec"]["template"];
    let mut labels = template["metadata"]["labels"].clone();
    if !labels.is_object() {
        labels = json!({});
    }
    let (mut metadata, owner) = match hash {
        Some(hash) => {
            labels["pod-template-hash"] = json!(hash);
            (
                json!({"generateName": format!("{name}-{hash}-")}),
                json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{name}-{hash}"),
                    "uid": format!("{uid}-{hash}"), "controller": true, "blockOwnerDeletion": true}),
            )
        }
        None => {
            let pod_name = format!("{name}-{ordinal}");
            labels["statefulset.kubernetes.io/pod-name"] = json!(pod_name);
            (
                json!({"name": pod_name}),
                json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "name": name,
                    "uid": uid, "controller": true, "blockOwnerDeletion": true}),
            )
        }
    };
    metadata["namespace"] = json!(namespace);
    metadata["labels"] = labels;
    metadata["ownerReferences"] = json!([owner]);
    if let Some(annotations) = template["metadata"].get("annotations") {
        metadata["annotations"] = annotations.clone();
    }
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": metadata,
        "spec": template.get("spec").cloned().unwrap_or(json!({})),
        "status": {"phase": "Running", "podIP": "10.0.0.1"},
    });
    set_ready(&mut pod, state.pods_start_ready);
    let pods_rt = pods_type(state);
    let _ = state.create(&pods_rt, &namespace, pod, None);
}

/// `maxSurge`/`maxUnavailable`: a count, or a percentage of `desired`
/// rounded up (surge) or down (unavailable).
fn resolve(value: &Value, default_percent: usize, desired: usize, round_up: bool) -> usize {
    let percent = |p: usize| {
        if round_up {
            (desired * p).div_ceil(100)
        } else {
            desired * p / 100
        }
    };
    match value {
        Value::Number(n) => n.as_u64().unwrap_or(0) as usize,
        Value::String(s) => s
            .strip_suffix('%')
            .and_then(|p| p.parse().ok())
            .map(percent)
            .unwrap_or(0),
        _ => percent(default_percent),
    }
}

/// One step of the Deployment controller; whether it changed any pod.
fn step_deployment(state: &mut State, workload: &Value) -> bool {
    let namespace = workload["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let desired = workload["spec"]["replicas"].as_i64().unwrap_or(1).max(0) as usize;
    let uid = workload["metadata"]["uid"].as_str().unwrap_or_default();
    let hash = template_hash(uid, &workload["spec"]["template"]);
    let pods = owned_pods(state, workload);
    let (mut new, old): (Vec<Value>, Vec<Value>) = pods.into_iter().partition(|p| hash_of(p) == hash);
    if old.is_empty() {
        // No rollout: the one ReplicaSet follows the count.
        if new.len() < desired {
            for _ in new.len()..desired {
                create_pod(state, workload, Some(&hash), 0);
            }
            return true;
        }
        if new.len() > desired {
            rank_for_removal(&mut new);
            let surplus = new.len() - desired;
            delete_pods(state, &namespace, &new[..surplus]);
            return true;
        }
        return false;
    }
    let strategy = &workload["spec"]["strategy"];
    if strategy["type"] == "Recreate" {
        delete_pods(state, &namespace, &old);
        return true;
    }
    let rolling = &strategy["rollingUpdate"];
    let surge = resolve(&rolling["maxSurge"], 25, desired, true);
    let mut unavailable = resolve(&rolling["maxUnavailable"], 25, desired, false);
    if surge == 0 && unavailable == 0 {
        unavailable = 1;
    }
    let total = new.len() + old.len();
    let allowed = desired + surge;
    if total > allowed {
        // The count dropped mid-rollout: every ReplicaSet gives up pods in
        // proportion to its size, each choosing among its own pods only.
        let mut sets: Vec<Vec<Value>> = Vec::new();
        for pod in new.into_iter().chain(old) {
            match sets.iter_mut().find(|s| hash_of(&s[0]) == hash_of(&pod)) {
                Some(set) => set.push(pod),
                None => sets.push(vec![pod]),
            }
        }
        sets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        let surplus = total - allowed;
        let mut shares: Vec<usize> = sets.iter().map(|s| surplus * s.len() / total).collect();
        let mut left = surplus - shares.iter().sum::<usize>();
        for (share, set) in shares.iter_mut().zip(&sets) {
            let extra = left.min(set.len() - *share);
            *share += extra;
            left -= extra;
        }
        for (mut set, share) in sets.into_iter().zip(shares) {
            rank_for_removal(&mut set);
            delete_pods(state, &namespace, &set[..share]);
        }
        return true;
    }
    let mut changed = false;
    // Up: new pods as far as the surge allows.
    let add = desired.saturating_sub(new.len()).min(allowed - total);
    for _ in 0..add {
        create_pod(state, workload, Some(&hash), 0);
        changed = true;
    }
    // Down: old pods as far as availability allows, unready ones first.
    let min_available = desired.saturating_sub(unavailable);
    let new_unavailable = new.iter().filter(|p| !is_ready(p)).count();
    let total = total + add;
    let (mut old_ready, old_unready): (Vec<Value>, Vec<Value>) = old.into_iter().partition(is_ready);
    let cleanup = old_unready
        .len()
        .min(total.saturating_sub(min_available + new_unavailable));
    if cleanup > 0 {
        delete_pods(state, &namespace, &old_unready[..cleanup]);
        return true;
    }
    let available = new.iter().filter(|p| is_ready(p)).count() + old_ready.len();
    let down = available.saturating_sub(min_available).min(old_ready.len());
    if down > 0 {
        rank_for_removal(&mut old_ready);
        delete_pods(state, &namespace, &old_ready[..down]);
        changed = true;
    }
    changed
}

fn sync_statefulset(state: &mut State, workload: &Value) {
    let namespace = workload["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let name = workload["metadata"]["name"].as_str().unwrap_or_default();
    let desired = workload["spec"]["replicas"].as_i64().unwrap_or(1).max(0) as usize;
    let mut pods = owned_pods(state, workload);
    if pods.len() < desired {
        let taken: Vec<String> = pods.iter().map(pod_name).collect();
        let free: Vec<usize> = (0..desired)
            .filter(|i| !taken.contains(&format!("{name}-{i}")))
            .take(desired - pods.len())
            .collect();
        for ordinal in free {
            create_pod(state, workload, None, ordinal);
        }
    } else if pods.len() > desired {
        // A StatefulSet removes its highest ordinals.
        let ordinal = |p: &Value| {
            p["metadata"]["name"]
                .as_str()
                .and_then(|n| n.rsplit('-').next())
                .and_then(|o| o.parse::<usize>().ok())
                .unwrap_or(0)
        };
        pods.sort_by_key(|p| std::cmp::Reverse(ordinal(p)));
        let surplus = pods.len() - desired;
        delete_pods(state, &namespace, &pods[..surplus]);
    }
}

/// Create or delete Pods until the workload's replica count (and, for a
/// Deployment, its rollout) is as far as it can get now, then write its
/// status.
pub fn sync(state: &mut State, rt: &ResourceType, namespace: &str, name: &str) {
    let Ok(workload) = state.get(rt, namespace, name) else {
        return;
    };
    if workload["kind"] == "Deployment" {
        // Each step waits on nothing but pod readiness, which is immediate
        // or set by the test: run them until the rollout stalls or ends.
        for _ in 0..1000 {
            if !step_deployment(state, &workload) {
                break;
            }
        }
    } else {
        sync_statefulset(state, &workload);
    }
    write_status(state, rt, namespace, name);
}

fn write_status(state: &mut State, rt: &ResourceType, namespace: &str, name: &str) {
    let Ok(mut workload) = state.get(rt, namespace, name) else {
        return;
    };
    let pods = owned_pods(state, &workload);
    let ready = pods.iter().filter(|p| is_ready(p)).count();
    let hash = template_hash(
        workload["metadata"]["uid"].as_str().unwrap_or_default(),
        &workload["spec"]["template"],
    );
    let updated = pods.iter().filter(|p| hash_of(p) == hash).count();
    let mut status = json!({
        "observedGeneration": workload["metadata"]["generation"],
        "replicas": pods.len(),
        "updatedReplicas": updated,
        "readyReplicas": ready,
        "availableReplicas": ready,
    });
    if workload["kind"] == "StatefulSet" {
        status["currentReplicas"] = json!(pods.len());
        if let Some(o) = status.as_object_mut() {
            o.remove("updatedReplicas");
        }
    }
    if workload["status"] != status {
        workload["status"] = status;
        state.store(rt, namespace, name, workload);
    }
}

/// After a pod's readiness changed, its workload follows: a rollout
/// waiting on it moves on, and the status is written again.
pub fn sync_owner_status(state: &mut State, namespace: &str, pod: &Value) {
    for plural in ["deployments", "statefulsets"] {
        let rt = state.find_type("apps", "v1", plural).cloned().expect("builtin");
        let names: Vec<String> = state
            .objects
            .get(&rt.key())
            .map(|o| {
                o.keys()
                    .filter(|(ns, _)| ns == namespace)
                    .map(|(_, n)| n.clone())
                    .collect()
            })
            .unwrap_or_default();
        for name in names {
            let Ok(workload) = state.get(&rt, namespace, &name) else {
                continue;
            };
            if owned_pods(state, &workload)
                .iter()
                .any(|p| p["metadata"]["uid"] == pod["metadata"]["uid"])
            {
                sync(state, &rt, namespace, &name);
            }
        }
    }
}

/// A deleted workload's Pods go too (background cascading deletion).
pub fn collect_garbage(state: &mut State, _rt: &ResourceType, namespace: &str, workload: &Value) {
    let pods_rt = pods_type(state);
    for pod in owned_pods(state, workload) {
        let name = pod["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let _ = state.delete(&pods_rt, namespace, &name);
    }
}

/// The `autoscaling/v1` Scale of a workload.
pub fn scale(workload: &Value) -> Value {
    let selector = workload["spec"]["selector"]["matchLabels"]
        .as_object()
        .map(|labels| {
            labels
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let meta = &workload["metadata"];
    json!({
        "kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"],
            "resourceVersion": meta["resourceVersion"], "creationTimestamp": meta["creationTimestamp"]},
        "spec": {"replicas": workload["spec"]["replicas"].as_i64().unwrap_or(1)},
        "status": {"replicas": workload["status"]["replicas"].as_i64().unwrap_or(0), "selector": selector},
    })
}
