//! Where operators look: the WorkerPool's status (server-side apply through
//! the status subresource, field manager `backlog-controller`) and Events
//! on the WorkerPool, aggregated like the Kubernetes event recorder does
//! (a repeat of the last Event bumps its count).

use std::collections::HashMap;

use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, Resource};
use serde_json::json;
use tokio::sync::Mutex;

use super::FIELD_MANAGER;
use crate::backend::{PassOutcome, PoolRef};
use crate::policy::Phase;
use crate::reconcile::{Leadership, PassError};
use crate::spec::{ConditionType, WorkerPool, WorkerPoolStatus};

#[derive(Default)]
struct Published {
    status: Option<WorkerPoolStatus>,
    /// The last Event: (reason, message, object name, count).
    event: Option<(String, String, String, i32)>,
    in_fallback: bool,
}

pub struct Publisher {
    client: Client,
    /// `reportingInstance` of the Events: this controller replica.
    instance: String,
    published: Mutex<HashMap<String, Published>>,
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

impl Publisher {
    pub fn new(client: Client) -> Self {
        Publisher {
            client,
            instance: super::replica_identity().to_string(),
            published: Mutex::new(HashMap::new()),
        }
    }

    /// Status and Events after a pass. Pools that are not WorkerPool
    /// objects (loaded from files) have nowhere to publish to. `deferred`:
    /// why the pass's scale-down was held back, for `ScaleDownDeferred`.
    pub async fn publish(&self, pool: PoolRef<'_>, outcome: PassOutcome<'_>, deferred: Option<&str>) {
        if pool.metadata.uid.is_none() {
            return;
        }
        let mut status = outcome.status.clone();
        // The condition is the backend's: carry its last transition over.
        let previous = self
            .published
            .lock()
            .await
            .get(&key(pool))
            .and_then(|p| p.status.as_ref())
            .and_then(|s| s.condition(ConditionType::ScaleDownDeferred).cloned());
        if let Some(previous) = previous {
            if status.condition(ConditionType::ScaleDownDeferred).is_none() {
                status.conditions.push(previous);
            }
        }
        let time = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
        match deferred {
            Some(message) => status.set_condition(
                ConditionType::ScaleDownDeferred,
                true,
                "RolloutInProgress",
                message,
                &time,
            ),
            None => status.set_condition(ConditionType::ScaleDownDeferred, false, "NotDeferred", "", &time),
        }
        self.write_status(pool, &status).await;
        if let Some(error) = outcome.error {
            self.error_event(pool, error).await;
        }
        if let Some(decision) = outcome.decision {
            if outcome.error.is_none() && decision.replicas > decision.from {
                let message = format!(
                    "scaled from {} to {}: {}",
                    decision.from, decision.replicas, decision.reason
                );
                self.event(pool, "Normal", "ScaledUp", &message).await;
            } else if outcome.error.is_none()
                && decision.replicas < decision.from
                && !outcome.removed.is_empty()
            {
                // What happened, not what was asked: busy pods are kept.
                let to = decision.from as usize - outcome.removed.len();
                let message = format!(
                    "scaled from {} to {to}, removing idle {}: {}",
                    decision.from,
                    outcome.removed.join(", "),
                    decision.reason
                );
                self.event(pool, "Normal", "ScaledDown", &message).await;
            }
            let in_fallback = matches!(decision.phase, Phase::Fallback { .. });
            let was = {
                let mut published = self.published.lock().await;
                let entry = published.entry(key(pool)).or_default();
                std::mem::replace(&mut entry.in_fallback, in_fallback)
            };
            if in_fallback && !was {
                self.event(pool, "Warning", "Fallback", &decision.reason).await;
            }
        }
    }

    async fn error_event(&self, pool: PoolRef<'_>, error: &PassError) {
        self.event(pool, "Warning", error.reason(), &error.to_string())
            .await;
    }

    /// A WorkerPool the controller will not run: `Ready=False, InvalidSpec`
    /// and a Warning Event.
    pub async fn invalid_spec(&self, pool: &WorkerPool, message: &str) {
        // The source loads pools only while this controller leads.
        let leading = Leadership::held();
        let pool_ref = PoolRef {
            name: pool.metadata.name.as_deref().unwrap_or_default(),
            metadata: &pool.metadata,
            spec: &pool.spec,
            leadership: &leading,
        };
        let mut status = pool.status.clone().unwrap_or_default();
        status.observed_generation = pool.metadata.generation;
        let time = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
        status.set_condition(ConditionType::Ready, false, "InvalidSpec", message, &time);
        self.write_status(pool_ref, &status).await;
        self.event(pool_ref, "Warning", "InvalidSpec", message).await;
    }

    async fn write_status(&self, pool: PoolRef<'_>, status: &WorkerPoolStatus) {
        let key = key(pool);
        if self
            .published
            .lock()
            .await
            .get(&key)
            .is_some_and(|p| p.status.as_ref() == Some(status))
        {
            return;
        }
        let api = self.pools(pool);
        let patch = json!({
            "apiVersion": WorkerPool::api_version(&()),
            "kind": WorkerPool::kind(&()),
            "status": status,
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match api.patch_status(pool.name, &params, &Patch::Apply(patch)).await {
            Ok(_) => {
                self.published.lock().await.entry(key).or_default().status = Some(status.clone());
            }
            Err(e) => tracing::warn!(pool = %key, error = %e, "cannot write the WorkerPool status"),
        }
    }

    fn pools(&self, pool: PoolRef<'_>) -> Api<WorkerPool> {
        match pool.namespace() {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::default_namespaced(self.client.clone()),
        }
    }

    /// Record an Event on the WorkerPool; a repeat of the pool's last Event
    /// bumps that Event's count instead of adding another.
    pub async fn event(&self, pool: PoolRef<'_>, type_: &str, reason: &str, message: &str) {
        if pool.metadata.uid.is_none() {
            return;
        }
        let namespace = pool
            .namespace()
            .unwrap_or(self.client.default_namespace())
            .to_string();
        let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        let key = key(pool);
        let last = self
            .published
            .lock()
            .await
            .get(&key)
            .and_then(|p| p.event.clone());
        if let Some((last_reason, last_message, name, count)) = last {
            if last_reason == reason && last_message == message {
                let patch = json!({"count": count + 1, "lastTimestamp": now()});
                if api
                    .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                    .await
                    .is_ok()
                {
                    if let Some(p) = self.published.lock().await.get_mut(&key) {
                        p.event = Some((last_reason, last_message, name, count + 1));
                    }
                    return;
                }
            }
        }
        let stamp = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
        let name = format!("{}.{:x}", pool.name, stamp);
        let event: Event = match serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": namespace},
            "involvedObject": {
                "apiVersion": WorkerPool::api_version(&()),
                "kind": WorkerPool::kind(&()),
                "name": pool.name,
                "namespace": namespace,
                "uid": pool.metadata.uid,
                "resourceVersion": pool.metadata.resource_version,
            },
            "reason": reason,
            "message": message,
            "type": type_,
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "reportingInstance": self.instance,
            "firstTimestamp": now(),
            "lastTimestamp": now(),
            "count": 1,
        })) {
            Ok(event) => event,
            Err(e) => {
                tracing::warn!(error = %e, "cannot build an Event");
                return;
            }
        };
        match api.create(&PostParams::default(), &event).await {
            Ok(_) => {
                let mut published = self.published.lock().await;
                published.entry(key).or_default().event =
                    Some((reason.to_string(), message.to_string(), name, 1));
            }
            Err(e) => tracing::warn!(pool = pool.name, reason, error = %e, "cannot record an Event"),
        }
    }
}

fn key(pool: PoolRef<'_>) -> String {
    format!("{}/{}", pool.namespace().unwrap_or_default(), pool.name)
}
