//! Deployments and StatefulSets in miniature: their replica count becomes
//! Pods, their status follows the Pods, deleting one deletes its Pods.

use serde_json::{json, Value};

use super::{ResourceType, State};

/// The annotation the ReplicaSet controller ranks pods by on scale-down.
pub const POD_DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

fn pods_type(state: &State) -> ResourceType {
    state.find_type("", "v1", "pods").cloned().expect("builtin pods")
}

/// A stable 10-character stand-in for a ReplicaSet's pod-template-hash.
fn template_hash(uid: &str) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut x: u64 = uid.bytes().fold(1469598103934665603, |h, b| {
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

/// Pods the workload owns: by the template hash for a Deployment, by owner uid for a StatefulSet.
fn owned_pods(state: &State, workload: &Value) -> Vec<Value> {
    let namespace = workload["metadata"]["namespace"].as_str().unwrap_or_default();
    let uid = workload["metadata"]["uid"].as_str().unwrap_or_default();
    let deployment = workload["kind"] == "Deployment";
    let hash = template_hash(uid);
    state
        .objects
        .get("/pods")
        .map(|pods| {
            pods.iter()
                .filter(|((ns, _), _)| ns == namespace)
                .map(|(_, p)| p)
                .filter(|p| {
                    if deployment {
                        p["metadata"]["labels"]["pod-template-hash"].as_str() == Some(&hash)
                    } else {
                        p["metadata"]["ownerReferences"][0]["uid"].as_str() == Some(uid)
                    }
                })
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// Create or delete Pods until the workload's replica count is met, then
/// write its status.
pub fn sync(state: &mut State, rt: &ResourceType, namespace: &str, name: &str) {
    let Ok(workload) = state.get(rt, namespace, name) else {
        return;
    };
    let desired = workload["spec"]["replicas"].as_i64().unwrap_or(1).max(0) as usize;
    let pods_rt = pods_type(state);
    let mut pods = owned_pods(state, &workload);
    let uid = workload["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let hash = template_hash(&uid);
    let deployment = workload["kind"] == "Deployment";
    let template = &workload["spec"]["template"];
    if pods.len() < desired {
        let mut ordinals: Vec<usize> = Vec::new();
        if !deployment {
            let taken: Vec<String> = pods
                .iter()
                .map(|p| p["metadata"]["name"].as_str().unwrap_or("").to_string())
                .collect();
            ordinals = (0..desired)
                .filter(|i| !taken.contains(&format!("{name}-{i}")))
                .collect();
        }
        let mut free_ordinals = ordinals.into_iter();
        for _ in pods.len()..desired {
            let mut labels = template["metadata"]["labels"].clone();
            if !labels.is_object() {
                labels = json!({});
            }
            let (metadata_name, owner) = if deployment {
                labels["pod-template-hash"] = json!(hash);
                (
                    json!({"generateName": format!("{name}-{hash}-")}),
                    json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{name}-{hash}"),
                        "uid": format!("{uid}-rs"), "controller": true, "blockOwnerDeletion": true}),
                )
            } else {
                let pod_name = format!("{name}-{}", free_ordinals.next().unwrap_or_default());
                labels["statefulset.kubernetes.io/pod-name"] = json!(pod_name);
                (
                    json!({"name": pod_name}),
                    json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "name": name,
                        "uid": uid, "controller": true, "blockOwnerDeletion": true}),
                )
            };
            let mut metadata = metadata_name;
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
            if let Ok(created) = state.create(&pods_rt, namespace, pod, None) {
                pods.push(created);
            }
        }
    } else if pods.len() > desired {
        let surplus = pods.len() - desired;
        if deployment {
            // The ReplicaSet controller's ranking: not ready first, then the
            // lowest deletion cost, then the newest.
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
        } else {
            // A StatefulSet removes its highest ordinals.
            let ordinal = |p: &Value| {
                p["metadata"]["name"]
                    .as_str()
                    .and_then(|n| n.rsplit('-').next())
                    .and_then(|o| o.parse::<usize>().ok())
                    .unwrap_or(0)
            };
            pods.sort_by_key(|p| std::cmp::Reverse(ordinal(p)));
        }
        for pod in pods.drain(..surplus) {
            let pod_name = pod["metadata"]["name"].as_str().unwrap_or_default().to_string();
            let _ = state.delete(&pods_rt, namespace, &pod_name);
        }
    }
    write_status(state, rt, namespace, name);
}

fn write_status(state: &mut State, rt: &ResourceType, namespace: &str, name: &str) {
    let Ok(mut workload) = state.get(rt, namespace, name) else {
        return;
    };
    let pods = owned_pods(state, &workload);
    let ready = pods.iter().filter(|p| is_ready(p)).count();
    let mut status = json!({
        "observedGeneration": workload["metadata"]["generation"],
        "replicas": pods.len(),
        "updatedReplicas": pods.len(),
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

/// After a pod's readiness changed, its workload's status follows.
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
                write_status(state, &rt, namespace, &name);
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
