//! The Kubernetes backend: a pool's target is a Deployment or StatefulSet,
//! scaled through its `/scale` subresource. Before the count drops, the
//! drained idle pods get the lowest `controller.kubernetes.io/pod-deletion-cost`
//! and busy pods a high one, so the ReplicaSet removes exactly the drained
//! pods. Pods are matched to the worker registry by name (`POD_NAME`).
//!
//! A replica count changed by hand while the pool is not paused is set back,
//! with an Event saying so. After every pass the WorkerPool's status is
//! written with server-side apply and Events record what changed.
//!
//! A Deployment mid-rollout runs pods of more than one ReplicaSet, and a
//! lower count is then spread over them in proportion to their size while
//! pod-deletion-cost only ranks pods within each: a busy pod could go while
//! a drained one stays. So no replica is removed during a rollout (scale-up
//! goes on); the pool gets `ScaleDownDeferred=True` and an Event saying so.

mod lease;
mod publish;
mod source;

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::Client;
use queue::Queue;
use serde_json::json;
use tokio::sync::Mutex;

pub use lease::{LeaseElection, LeaseSettings};
pub use publish::Publisher;
pub use source::{list_worker_pools, WorkerPoolSource};

use super::{Backend, BackendError, PassOutcome, PoolRef, Replica};
use crate::spec::{KubernetesTarget, Target, WorkloadKind};

/// The field manager of the controller's server-side applies.
pub const FIELD_MANAGER: &str = "backlog-controller";
/// The annotation the ReplicaSet controller ranks pods by on scale-down.
pub const POD_DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
/// Drained idle pods: removed first.
pub const COST_DRAINED: i32 = -1000;
/// Busy pods: removed last, should the count drop below the idle ones.
pub const COST_BUSY: i32 = 1000;

/// What the backend remembers of a target between passes.
#[derive(Default)]
struct TargetMemory {
    /// The replica count this controller set or accepted last: a different
    /// count on the target means someone scaled it by hand.
    replicas: Option<i32>,
    /// The target's pod label selector, from its Scale.
    selector: String,
    /// The WorkerPool this was learnt for: a pool deleted and created again
    /// starts from the target's count as it finds it.
    pool_uid: Option<String>,
    /// Uids of drained pods the count was lowered for, while the ReplicaSet
    /// or StatefulSet has not deleted them yet: they are on their way out,
    /// so not replicas (and their draining mark must stay). A pod created
    /// again under the same name has a new uid.
    leaving: HashSet<String>,
    /// Why this pass's scale-down was held back (a rollout), for the
    /// pool's status; cleared at the start of every pass.
    deferred: Option<String>,
}

pub struct KubernetesBackend {
    client: Client,
    queue: Queue,
    publisher: Publisher,
    targets: Mutex<HashMap<String, TargetMemory>>,
}

/// Maps a kube error on a pool's target to the backend's error.
fn target_error(pool: &str, target: &KubernetesTarget, namespace: &str, error: kube::Error) -> BackendError {
    let shown = format!("{:?} {namespace}/{}", target.kind, target.name);
    match &error {
        kube::Error::Api(status) if status.code == 404 => BackendError::TargetNotFound {
            pool: pool.to_string(),
            target: shown,
        },
        kube::Error::Api(status) if status.code == 401 || status.code == 403 => BackendError::Unauthorized {
            pool: pool.to_string(),
            message: format!("{shown}: {}", status.message),
        },
        _ => BackendError::Failed {
            pool: pool.to_string(),
            message: format!("{shown}: {error}"),
        },
    }
}

/// This controller replica's name in the leader Lease and its Events'
/// `reportingInstance`: `POD_NAME` (the downward API), or else
/// [`fallback_identity`], drawn once per process.
pub fn replica_identity() -> &'static str {
    static IDENTITY: OnceLock<String> = OnceLock::new();
    IDENTITY.get_or_init(|| match std::env::var("POD_NAME") {
        Ok(name) if !name.trim().is_empty() => name,
        _ => fallback_identity(),
    })
}

/// The hostname and a random suffix: unique per process even where two
/// replicas share a hostname or, in containers, the pid (1).
pub fn fallback_identity() -> String {
    let host = hostname().unwrap_or_else(|| "controller".to_string());
    format!("{host}-{:08x}", rand::random::<u32>())
}

fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname(2) writes at most `buf.len()` bytes into `buf`.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).trim().to_string();
    (!name.is_empty()).then_some(name)
}

/// Why the Deployment is mid-rollout, or `None` when it is not: its
/// controller has not observed the latest spec, fewer replicas than wanted
/// run the current template, old ones still run, or its pods belong to
/// more than one ReplicaSet (the same tests as `kubectl rollout status`,
/// plus the pods themselves).
pub fn rollout_in_progress(deployment: &Deployment, pods: &[Pod]) -> Option<String> {
    let generation = deployment.metadata.generation.unwrap_or(0);
    let wanted = deployment.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let status = deployment.status.clone().unwrap_or_default();
    let observed = status.observed_generation.unwrap_or(0);
    let updated = status.updated_replicas.unwrap_or(0);
    let total = status.replicas.unwrap_or(0);
    let replica_sets: HashSet<&str> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.metadata.owner_references.as_ref())
        .flatten()
        .filter(|o| o.kind == "ReplicaSet" && o.controller == Some(true))
        .map(|o| o.name.as_str())
        .collect();
    if observed < generation {
        Some(format!(
            "its controller has not observed generation {generation} yet (observed {observed})"
        ))
    } else if updated < wanted {
        Some(format!("{updated} of {wanted} replicas run the new template"))
    } else if total > updated {
        Some(format!("{} old replica(s) still run", total - updated))
    } else if replica_sets.len() > 1 {
        Some(format!("its pods belong to {} ReplicaSets", replica_sets.len()))
    } else {
        None
    }
}

fn pod_is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_uid(pod: &Pod) -> Option<&str> {
    pod.metadata.uid.as_deref()
}

/// The uids of the pods named in `ids`.
fn uids_of(pods: &[Pod], ids: &[String]) -> Vec<String> {
    pods.iter()
        .filter(|p| p.metadata.name.as_ref().is_some_and(|n| ids.contains(n)))
        .filter_map(|p| pod_uid(p).map(str::to_string))
        .collect()
}

/// A StatefulSet pod's ordinal: the number after the last `-`.
fn ordinal(name: &str) -> Option<u32> {
    name.rsplit('-').next().and_then(|o| o.parse().ok())
}

/// The pods of `removing` a ReplicaSet lowered by as many will delete. It
/// deletes pods that are not ready before ready ones, whatever their
/// deletion cost: while a busy pod is not ready, only the drained pods that
/// are not ready either are safe to count on.
fn deletable_by_replica_set<'a>(
    pods: &[Pod],
    busy: &HashSet<String>,
    mut removing: Vec<&'a String>,
) -> Vec<&'a String> {
    let busy_not_ready = pods
        .iter()
        .any(|p| p.metadata.name.as_ref().is_some_and(|n| busy.contains(n)) && !pod_is_ready(p));
    if busy_not_ready {
        let pod = |id: &str| pods.iter().find(|p| p.metadata.name.as_deref() == Some(id));
        removing.retain(|id| pod(id).is_none_or(|p| !pod_is_ready(p)));
    }
    removing
}

/// Of `ids` (pods, and placeholders for pods not created yet), the ones a
/// StatefulSet at `current` replicas can drop by. It deletes every pod
/// whose ordinal is at or above its new count, whichever ones exist, so the
/// count goes down one ordinal at a time from the top: past a pod of `ids`
/// (removed), or past an ordinal with no pod (a placeholder of `ids`
/// stands for it), stopping at the first pod that is not in `ids`. A
/// missing middle ordinal (a rolling update or an eviction took it) does
/// not make the pod above it removable.
fn highest_ordinals<'a>(pods: &[Pod], ids: &'a [String], current: i32) -> Vec<&'a String> {
    let names: Vec<&str> = pods.iter().filter_map(|p| p.metadata.name.as_deref()).collect();
    let mut placeholders = ids.iter().filter(|id| !names.contains(&id.as_str()));
    let mut top = Vec::new();
    for at in (0..current.max(0) as u32).rev() {
        if top.len() == ids.len() {
            break;
        }
        let next = match names.iter().find(|n| ordinal(n) == Some(at)) {
            Some(name) => ids.iter().find(|id| id.as_str() == *name),
            None => placeholders.next(),
        };
        match next {
            Some(id) => top.push(id),
            None => break,
        }
    }
    top
}

impl KubernetesBackend {
    pub fn new(client: Client, queue: Queue) -> Self {
        KubernetesBackend {
            publisher: Publisher::new(client.clone()),
            client,
            queue,
            targets: Mutex::new(HashMap::new()),
        }
    }

    fn target<'a>(pool: PoolRef<'a>) -> Result<&'a KubernetesTarget, BackendError> {
        match &pool.spec.target {
            Target::Kubernetes(target) => Ok(target),
            other => Err(BackendError::WrongTarget {
                pool: pool.name.to_string(),
                target: other.backend(),
                backend: "kubernetes",
            }),
        }
    }

    fn namespace<'a>(&'a self, pool: PoolRef<'a>) -> &'a str {
        pool.namespace().unwrap_or(self.client.default_namespace())
    }

    fn key(namespace: &str, target: &KubernetesTarget) -> String {
        format!("{namespace}/{:?}/{}", target.kind, target.name)
    }

    async fn get_scale(&self, namespace: &str, target: &KubernetesTarget) -> kube::Result<(i32, String)> {
        let scale = match target.kind {
            WorkloadKind::Deployment => {
                Api::<Deployment>::namespaced(self.client.clone(), namespace)
                    .get_scale(&target.name)
                    .await?
            }
            WorkloadKind::StatefulSet => {
                Api::<StatefulSet>::namespaced(self.client.clone(), namespace)
                    .get_scale(&target.name)
                    .await?
            }
        };
        let replicas = scale.spec.and_then(|s| s.replicas).unwrap_or(0);
        let selector = scale.status.and_then(|s| s.selector).unwrap_or_default();
        Ok((replicas, selector))
    }

    async fn set_scale(
        &self,
        pool: PoolRef<'_>,
        namespace: &str,
        target: &KubernetesTarget,
        replicas: i32,
    ) -> Result<(), BackendError> {
        pool.check_leading("setting the target's replica count")?;
        let patch = Patch::Merge(json!({"spec": {"replicas": replicas}}));
        let params = PatchParams::default();
        let patched = match target.kind {
            WorkloadKind::Deployment => Api::<Deployment>::namespaced(self.client.clone(), namespace)
                .patch_scale(&target.name, &params, &patch)
                .await
                .map(drop),
            WorkloadKind::StatefulSet => Api::<StatefulSet>::namespaced(self.client.clone(), namespace)
                .patch_scale(&target.name, &params, &patch)
                .await
                .map(drop),
        };
        patched.map_err(|e| target_error(pool.name, target, namespace, e))
    }

    /// `Some(why)` when the target is a Deployment mid-rollout.
    async fn rollout(
        &self,
        namespace: &str,
        target: &KubernetesTarget,
        pods: &[Pod],
    ) -> kube::Result<Option<String>> {
        if target.kind != WorkloadKind::Deployment {
            return Ok(None);
        }
        let deployment = Api::<Deployment>::namespaced(self.client.clone(), namespace)
            .get(&target.name)
            .await?;
        Ok(rollout_in_progress(&deployment, pods))
    }

    /// Hold a scale-down back during a rollout: an Event, and the reason
    /// kept for the pool's `ScaleDownDeferred` condition.
    async fn defer_scale_down(&self, pool: PoolRef<'_>, key: &str, target: &KubernetesTarget, why: &str) {
        let message = format!(
            "Deployment {} is rolling out ({why}): no replica is removed until it completes, \
             since a scale-down now would spread over its ReplicaSets regardless of \
             pod-deletion-cost; scale-up goes on",
            target.name
        );
        tracing::info!(pool = pool.name, target = %target.name, %why, "scale-down deferred: the target is rolling out");
        self.targets
            .lock()
            .await
            .entry(key.to_string())
            .or_default()
            .deferred = Some(message.clone());
        if pool.leadership.is_held() {
            self.publisher
                .event(pool, "Normal", "ScaleDownDeferred", &message)
                .await;
        }
    }

    /// The target's live pods (not terminating), by name.
    async fn pods(&self, namespace: &str, selector: &str) -> kube::Result<Vec<Pod>> {
        let params = ListParams::default().labels(selector);
        let mut pods: Vec<Pod> = Api::<Pod>::namespaced(self.client.clone(), namespace)
            .list(&params)
            .await?
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        pods.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        Ok(pods)
    }

    /// Rank pods for the coming scale-down: `remove` cheapest, busy pods
    /// expensive, and a stale cost of ours on any other pod cleared.
    async fn mark_deletion_costs(
        &self,
        pool: PoolRef<'_>,
        namespace: &str,
        target: &KubernetesTarget,
        pods: &[Pod],
        remove: &HashSet<&str>,
        busy: &HashSet<String>,
    ) -> Result<(), BackendError> {
        let api = Api::<Pod>::namespaced(self.client.clone(), namespace);
        for pod in pods {
            let name = pod.metadata.name.as_deref().unwrap_or_default();
            let current = pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(POD_DELETION_COST));
            let wanted = if remove.contains(name) {
                Some(COST_DRAINED.to_string())
            } else if busy.contains(name) {
                Some(COST_BUSY.to_string())
            } else {
                None
            };
            let stale_ours =
                current.is_some_and(|c| *c == COST_DRAINED.to_string() || *c == COST_BUSY.to_string());
            if current == wanted.as_ref() || (wanted.is_none() && !stale_ours) {
                continue;
            }
            pool.check_leading("ranking pods for deletion")?;
            let patch = json!({"metadata": {"annotations": {POD_DELETION_COST: wanted}}});
            api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
                .await
                .map_err(|e| target_error(pool.name, target, namespace, e))?;
        }
        Ok(())
    }

    async fn busy_pods(&self, pool: &str) -> Result<HashSet<String>, BackendError> {
        let busy = self
            .queue
            .busy_replicas()
            .await
            .map_err(|e| BackendError::Failed {
                pool: pool.to_string(),
                message: format!("reading the worker registry: {e}"),
            })?;
        Ok(busy.into_iter().map(|r| r.worker_id).collect())
    }

    /// Put drained pods that stay back to work. A failure is logged: the
    /// reconciler's sweep after the pass puts every listed pod back. Not
    /// once leadership is gone: the marks are the new leader's, which may
    /// have drained those pods itself.
    async fn undrain(&self, pool: PoolRef<'_>, ids: &[String]) {
        if !pool.leadership.is_held() {
            return;
        }
        if let Err(e) = self.queue.undrain(ids).await {
            tracing::warn!(pool = pool.name, pods = ?ids, error = %e, "could not put drained pods back to work; retrying after the pass");
        }
    }

    /// Remember drained pods the count was lowered for, until they are gone.
    async fn mark_leaving(&self, key: &str, uids: Vec<String>) {
        let mut targets = self.targets.lock().await;
        targets.entry(key.to_string()).or_default().leaving.extend(uids);
    }

    /// Someone set the target to `found` replicas instead of `wanted`: set
    /// it back. Going down, only idle pods are removed (drained first, as
    /// for any scale-down); if too few are idle, the busy ones stay.
    async fn converge(
        &self,
        pool: PoolRef<'_>,
        namespace: &str,
        target: &KubernetesTarget,
        selector: &str,
        found: i32,
        wanted: i32,
    ) -> Result<i32, BackendError> {
        let error = |e| target_error(pool.name, target, namespace, e);
        let mut result = wanted;
        if found > wanted {
            let busy = self.busy_pods(pool.name).await?;
            let mut pods = self.pods(namespace, selector).await.map_err(error)?;
            if let Some(why) = self.rollout(namespace, target, &pods).await.map_err(error)? {
                // Lowering it now could remove busy pods: keep the count
                // found, which the policy scales down after the rollout.
                self.defer_scale_down(pool, &Self::key(namespace, target), target, &why)
                    .await;
                return Ok(found);
            }
            // Not ready first, then the newest: the ones a person just added.
            pods.sort_by(|a, b| {
                pod_is_ready(a)
                    .cmp(&pod_is_ready(b))
                    .then(b.metadata.creation_timestamp.cmp(&a.metadata.creation_timestamp))
            });
            let candidates: Vec<String> = pods
                .iter()
                .filter_map(|p| p.metadata.name.clone())
                .filter(|n| !busy.contains(n))
                .take((found - wanted) as usize)
                .collect();
            pool.check_leading("draining pods of a target scaled by hand")?;
            let drained = self
                .queue
                .drain_idle(&candidates)
                .await
                .map_err(|e| BackendError::Failed {
                    pool: pool.name.to_string(),
                    message: format!("drain: {e}"),
                })?;
            let removing: Vec<String> = match target.kind {
                WorkloadKind::Deployment => {
                    let safe: Vec<String> = deletable_by_replica_set(&pods, &busy, drained.iter().collect())
                        .into_iter()
                        .cloned()
                        .collect();
                    let remove: HashSet<&str> = safe.iter().map(String::as_str).collect();
                    if let Err(e) = self
                        .mark_deletion_costs(pool, namespace, target, &pods, &remove, &busy)
                        .await
                    {
                        self.undrain(pool, &drained).await;
                        return Err(e);
                    }
                    safe
                }
                WorkloadKind::StatefulSet => highest_ordinals(&pods, &drained, found)
                    .into_iter()
                    .cloned()
                    .collect(),
            };
            // Drained pods the new count does not reach go back to work.
            let kept: Vec<String> = drained
                .iter()
                .filter(|d| !removing.contains(d))
                .cloned()
                .collect();
            if !kept.is_empty() {
                self.undrain(pool, &kept).await;
            }
            result = found - removing.len() as i32;
            if let Err(e) = self.set_scale(pool, namespace, target, result).await {
                self.undrain(pool, &removing).await;
                return Err(e);
            }
            self.mark_leaving(&Self::key(namespace, target), uids_of(&pods, &removing))
                .await;
        } else {
            self.set_scale(pool, namespace, target, result).await?;
        }
        let message = format!(
            "{:?} {} was scaled to {found} outside the controller; set back to {result} (pause the WorkerPool to scale by hand)",
            target.kind, target.name
        );
        tracing::warn!(
            pool = pool.name,
            found,
            wanted,
            set = result,
            "replica count changed by hand; converged back"
        );
        self.publisher
            .event(pool, "Warning", "ManualScaleReverted", &message)
            .await;
        Ok(result)
    }
}

impl Backend for KubernetesBackend {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    /// As a controller just started: the counts found next are taken as
    /// they are. A count remembered from before another leader's term read
    /// that leader's scaling as a hand-scale, and converged it back, with
    /// a `ManualScaleReverted` Warning.
    async fn take_office(&self) {
        self.targets.lock().await.clear();
    }

    async fn observe(&self, pool: PoolRef<'_>) -> Result<Vec<Replica>, BackendError> {
        let target = Self::target(pool)?;
        let namespace = self.namespace(pool).to_string();
        let error = |e| target_error(pool.name, target, &namespace, e);
        let (found, selector) = self.get_scale(&namespace, target).await.map_err(error)?;
        let key = Self::key(&namespace, target);
        let remembered = {
            let mut targets = self.targets.lock().await;
            let memory = targets.entry(key.clone()).or_default();
            memory.selector = selector.clone();
            memory.deferred = None;
            if memory.pool_uid != pool.metadata.uid {
                memory.pool_uid = pool.metadata.uid.clone();
                memory.replicas = None;
            }
            memory.replicas
        };
        let replicas = match remembered {
            Some(wanted) if wanted != found && !pool.spec.paused => {
                self.converge(pool, &namespace, target, &selector, found, wanted)
                    .await?
            }
            _ => found,
        };
        let pods = self.pods(&namespace, &selector).await.map_err(error)?;
        let (leaving, spared) = {
            let mut targets = self.targets.lock().await;
            let memory = targets.entry(key).or_default();
            memory.replicas = Some(replicas);
            // Forget pods that are gone (or terminating: no longer listed).
            memory
                .leaving
                .retain(|uid| pods.iter().any(|p| pod_uid(p) == Some(uid.as_str())));
            // No more pods than the count: the scale-down is done, and a pod
            // drained for it that is still here was spared (the ReplicaSet
            // removed another: a pending replacement or a pod not ready ranks
            // first, and the deletion cost is only a hint). It is one of the
            // pods kept, so it counts again and goes back to work.
            let spared: Vec<String> = if pods.len() <= replicas.max(0) as usize {
                let spared = pods
                    .iter()
                    .filter(|p| pod_uid(p).is_some_and(|uid| memory.leaving.contains(uid)))
                    .filter_map(|p| p.metadata.name.clone())
                    .collect();
                memory.leaving.clear();
                spared
            } else {
                Vec::new()
            };
            (memory.leaving.clone(), spared)
        };
        if !spared.is_empty() {
            tracing::info!(pool = pool.name, pods = ?spared, "drained pods the scale-down did not remove go back to work");
            self.undrain(pool, &spared).await;
        }
        let mut out: Vec<Replica> = pods
            .iter()
            .filter(|p| pod_uid(p).is_none_or(|uid| !leaving.contains(uid)))
            .map(|p| Replica {
                id: p.metadata.name.clone().unwrap_or_default(),
                ready: pod_is_ready(p),
            })
            .collect();
        // The count is the target's: pods beyond it are on their way out
        // (keep the ready ones), pods short of it are yet to be created.
        out.sort_by(|a, b| b.ready.cmp(&a.ready).then(a.id.cmp(&b.id)));
        out.truncate(replicas.max(0) as usize);
        for i in out.len()..replicas.max(0) as usize {
            out.push(Replica {
                id: format!("{}-not-created-{i}", target.name),
                ready: false,
            });
        }
        Ok(out)
    }

    async fn add(&self, pool: PoolRef<'_>, count: u32) -> Result<Vec<String>, BackendError> {
        let target = Self::target(pool)?;
        let namespace = self.namespace(pool).to_string();
        let key = Self::key(&namespace, target);
        let current = self
            .targets
            .lock()
            .await
            .get(&key)
            .and_then(|m| m.replicas)
            .unwrap_or(0);
        let wanted = current + count as i32;
        self.set_scale(pool, &namespace, target, wanted).await?;
        self.targets.lock().await.entry(key).or_default().replicas = Some(wanted);
        // StatefulSet pods come back under their ordinal's name, maybe with
        // the draining mark they were removed under; Deployment pods get
        // new names.
        Ok(match target.kind {
            WorkloadKind::StatefulSet => (current..wanted)
                .map(|i| format!("{}-{i}", target.name))
                .collect(),
            WorkloadKind::Deployment => Vec::new(),
        })
    }

    /// A Deployment mid-rollout: asked before the drain, so its pods keep
    /// working while the scale-down waits for the rollout.
    async fn removal_blocked(&self, pool: PoolRef<'_>) -> Result<Option<String>, BackendError> {
        let target = Self::target(pool)?;
        if target.kind != WorkloadKind::Deployment {
            return Ok(None);
        }
        let namespace = self.namespace(pool).to_string();
        let error = |e| target_error(pool.name, target, &namespace, e);
        let key = Self::key(&namespace, target);
        let selector = self
            .targets
            .lock()
            .await
            .get(&key)
            .map(|m| m.selector.clone())
            .unwrap_or_default();
        let pods = self.pods(&namespace, &selector).await.map_err(error)?;
        let why = self.rollout(&namespace, target, &pods).await.map_err(error)?;
        if let Some(why) = &why {
            self.defer_scale_down(pool, &key, target, why).await;
        }
        Ok(why)
    }

    async fn remove(&self, pool: PoolRef<'_>, ids: &[String]) -> Result<Vec<String>, BackendError> {
        let target = Self::target(pool)?;
        let namespace = self.namespace(pool).to_string();
        let error = |e| target_error(pool.name, target, &namespace, e);
        let key = Self::key(&namespace, target);
        let (current, selector) = {
            let targets = self.targets.lock().await;
            let memory = targets.get(&key);
            (
                memory.and_then(|m| m.replicas).unwrap_or(0),
                memory.map(|m| m.selector.clone()).unwrap_or_default(),
            )
        };
        let pods = self.pods(&namespace, &selector).await.map_err(error)?;
        let mut removing: Vec<&String> = ids.iter().collect();
        if target.kind == WorkloadKind::StatefulSet {
            let top = highest_ordinals(&pods, ids, current);
            let keep: Vec<&String> = ids.iter().filter(|id| !top.contains(id)).collect();
            if !keep.is_empty() {
                tracing::info!(pool = pool.name, kept = ?keep, "a StatefulSet removes its highest ordinals only; these stay");
            }
            removing = top;
        } else {
            if let Some(why) = self.rollout(&namespace, target, &pods).await.map_err(error)? {
                self.defer_scale_down(pool, &key, target, &why).await;
                return Ok(Vec::new());
            }
            let busy = self.busy_pods(pool.name).await?;
            removing = deletable_by_replica_set(&pods, &busy, removing);
            if removing.len() < ids.len() {
                tracing::info!(
                    pool = pool.name,
                    "a busy pod is not ready: keeping the ready drained pods this pass"
                );
            }
            let remove: HashSet<&str> = removing.iter().map(|id| id.as_str()).collect();
            self.mark_deletion_costs(pool, &namespace, target, &pods, &remove, &busy)
                .await?;
        }
        let removed: Vec<String> = removing.into_iter().cloned().collect();
        let wanted = (current - removed.len() as i32).max(0);
        if wanted == current {
            return Ok(removed);
        }
        self.set_scale(pool, &namespace, target, wanted).await?;
        self.targets.lock().await.entry(key.clone()).or_default().replicas = Some(wanted);
        self.mark_leaving(&key, uids_of(&pods, &removed)).await;
        Ok(removed)
    }

    async fn pass_finished(&self, pool: PoolRef<'_>, outcome: PassOutcome<'_>) {
        let deferred = match Self::target(pool) {
            Ok(target) => {
                let key = Self::key(self.namespace(pool), target);
                self.targets
                    .lock()
                    .await
                    .get(&key)
                    .and_then(|m| m.deferred.clone())
            }
            Err(_) => None,
        };
        self.publisher.publish(pool, outcome, deferred.as_deref()).await;
    }

    async fn shutdown(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fallback_identity_is_the_hostname_and_a_random_suffix() {
        let host = hostname().expect("a hostname");
        let (a, b) = (fallback_identity(), fallback_identity());
        assert_ne!(
            a, b,
            "two processes on one host (or pid 1 in two containers) must not share it"
        );
        for id in [&a, &b] {
            let suffix = id
                .strip_prefix(&format!("{host}-"))
                .unwrap_or_else(|| panic!("{id}"));
            assert_eq!(suffix.len(), 8, "{id}");
            assert!(suffix.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
        }
        assert!(!a.contains(&format!("controller-{}", std::process::id())));
    }

    fn deployment(generation: i64, status: serde_json::Value) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "w", "generation": generation},
            "spec": {"replicas": 4, "selector": {}, "template": {}},
            "status": status,
        }))
        .unwrap()
    }

    fn pod(replica_set: &str) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": format!("{replica_set}-x"), "ownerReferences": [
            {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": replica_set, "uid": "u", "controller": true}]}}))
        .unwrap()
    }

    fn named(name: &str) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": name}})).unwrap()
    }

    fn ids(names: &[&str]) -> Vec<String> {
        names.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_statefulset_drops_from_its_highest_ordinal_only() {
        let all = [named("sts-0"), named("sts-1"), named("sts-2")];
        let drained = ids(&["sts-2", "sts-0"]);
        assert_eq!(highest_ordinals(&all, &drained, 3), vec!["sts-2"]);
        let drained = ids(&["sts-1", "sts-2"]);
        assert_eq!(highest_ordinals(&all, &drained, 3), vec!["sts-2", "sts-1"]);
        // A count short of its pods: the ordinals not created go first.
        let short = [named("sts-0"), named("sts-1")];
        let drained = ids(&["sts-not-created-2", "sts-1"]);
        assert_eq!(
            highest_ordinals(&short, &drained, 3),
            vec!["sts-not-created-2", "sts-1"]
        );
    }

    #[test]
    fn a_missing_middle_ordinal_does_not_make_the_pod_above_it_removable() {
        // sts-1 was evicted: lowering 3 to 2 deletes sts-2, which is busy.
        let gapped = [named("sts-0"), named("sts-2")];
        let placeholder = ids(&["sts-not-created-2"]);
        assert!(highest_ordinals(&gapped, &placeholder, 3).is_empty());
        // Once sts-2 is drained, both ordinals above 0 can go.
        let drained = ids(&["sts-not-created-2", "sts-2"]);
        assert_eq!(
            highest_ordinals(&gapped, &drained, 3),
            vec!["sts-2", "sts-not-created-2"]
        );
    }

    #[test]
    fn a_settled_deployment_is_not_rolling_out() {
        let settled = deployment(
            3,
            json!({"observedGeneration": 3, "replicas": 4, "updatedReplicas": 4}),
        );
        assert_eq!(rollout_in_progress(&settled, &[pod("w-a"), pod("w-a")]), None);
    }

    #[test]
    fn each_sign_of_a_rollout_is_named() {
        let pods = [pod("w-a")];
        let behind = deployment(
            4,
            json!({"observedGeneration": 3, "replicas": 4, "updatedReplicas": 4}),
        );
        assert!(rollout_in_progress(&behind, &pods)
            .unwrap()
            .contains("generation 4"));
        let updating = deployment(
            3,
            json!({"observedGeneration": 3, "replicas": 5, "updatedReplicas": 1}),
        );
        assert_eq!(
            rollout_in_progress(&updating, &pods).as_deref(),
            Some("1 of 4 replicas run the new template")
        );
        let old_left = deployment(
            3,
            json!({"observedGeneration": 3, "replicas": 5, "updatedReplicas": 4}),
        );
        assert_eq!(
            rollout_in_progress(&old_left, &pods).as_deref(),
            Some("1 old replica(s) still run")
        );
        let settled = deployment(
            3,
            json!({"observedGeneration": 3, "replicas": 4, "updatedReplicas": 4}),
        );
        assert_eq!(
            rollout_in_progress(&settled, &[pod("w-a"), pod("w-b")]).as_deref(),
            Some("its pods belong to 2 ReplicaSets")
        );
    }
}
