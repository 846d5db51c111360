//! The controller's Prometheus metrics, served on `/metrics`.
//!
//! Per-pool gauges are set after every pass from the pool's status, so they
//! say what `kubectl get wp` and `GET /v1/pools` say. Only the leader has
//! them: a controller that loses leadership, or a pool whose manifest is
//! removed, drops its series, so a standby never reports stale replicas.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::policy::Decision;
use crate::spec::{WorkerPoolSpec, WorkerPoolStatus};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub pool: String,
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub pool: String,
    pub stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabels {
    pub pool: String,
    /// `Ready`, `Active`, `Fallback`, `Paused`, `Degraded`, `ScaleDownDeferred`.
    pub r#type: String,
    /// `True` or `False`: kube-state-metrics' shape, one series per status,
    /// 1 on the one that holds.
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskTypeLabels {
    pub pool: String,
    pub task_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub pool: String,
    /// `up` or `down`.
    pub direction: String,
}

/// The label sets a pool's gauges were last set with, so they can be
/// removed exactly (a family cannot be listed).
#[derive(Default)]
struct PoolSeries {
    conditions: BTreeSet<String>,
    task_types: BTreeSet<String>,
}

const CONDITION_STATUSES: [&str; 2] = ["True", "False"];

/// The stages `errors` counts by (`Context::count_error`). Each pool's
/// series start at 0, so the first error is an increase a rule and a panel
/// can see, rather than a series appearing at 1.
pub const ERROR_STAGES: [&str; 4] = ["backend", "status", "undrain", "mark_stopped"];

pub struct Metrics {
    pub desired_replicas: Family<PoolLabels, Gauge>,
    pub current_replicas: Family<PoolLabels, Gauge>,
    pub ready_replicas: Family<PoolLabels, Gauge>,
    pub busy_replicas: Family<PoolLabels, Gauge>,
    pub pending_tasks: Family<PoolLabels, Gauge>,
    pub in_flight_tasks: Family<PoolLabels, Gauge>,
    pub oldest_pending_seconds: Family<PoolLabels, Gauge<f64, AtomicU64>>,
    pub target_queue_seconds: Family<PoolLabels, Gauge>,
    pub pool_condition: Family<ConditionLabels, Gauge>,
    pub pool_task_type: Family<TaskTypeLabels, Gauge>,
    pub decisions: Family<DecisionLabels, Counter>,
    pub scale_changes: Family<DirectionLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub leader: Gauge,
    pub reconcile_seconds: Histogram,
    series: Mutex<HashMap<String, PoolSeries>>,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("backlog_controller");
        let m = Metrics {
            desired_replicas: Family::default(),
            current_replicas: Family::default(),
            ready_replicas: Family::default(),
            busy_replicas: Family::default(),
            pending_tasks: Family::default(),
            in_flight_tasks: Family::default(),
            oldest_pending_seconds: Family::default(),
            target_queue_seconds: Family::default(),
            pool_condition: Family::default(),
            pool_task_type: Family::default(),
            decisions: Family::default(),
            scale_changes: Family::default(),
            errors: Family::default(),
            leader: Gauge::default(),
            reconcile_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            series: Mutex::default(),
            registry: Registry::default(),
        };
        registry.register(
            "desired_replicas",
            "Replicas the last decision asked for",
            m.desired_replicas.clone(),
        );
        registry.register(
            "current_replicas",
            "Replicas the backend runs or is starting",
            m.current_replicas.clone(),
        );
        registry.register("ready_replicas", "Replicas that are up", m.ready_replicas.clone());
        registry.register(
            "busy_replicas",
            "Replicas holding at least one task",
            m.busy_replicas.clone(),
        );
        registry.register(
            "pending_tasks",
            "Runnable tasks of the pool's task types",
            m.pending_tasks.clone(),
        );
        registry.register(
            "in_flight_tasks",
            "Claimed or running tasks of the pool's task types",
            m.in_flight_tasks.clone(),
        );
        registry.register(
            "oldest_pending_seconds",
            "Age of the oldest runnable task of the pool's task types",
            m.oldest_pending_seconds.clone(),
        );
        registry.register(
            "target_queue_seconds",
            "The pool's spec.targetQueueSeconds (absent when the pool has none)",
            m.target_queue_seconds.clone(),
        );
        registry.register(
            "pool_condition",
            "The pool's status conditions: 1 on the status that holds",
            m.pool_condition.clone(),
        );
        registry.register(
            "pool_task_type_info",
            "The task types each pool serves (always 1), to join pools with per-task-type figures",
            m.pool_task_type.clone(),
        );
        registry.register("decisions", "Decisions by pool and phase", m.decisions.clone());
        registry.register(
            "scale_changes",
            "Decisions that changed a pool's replicas, by direction",
            m.scale_changes.clone(),
        );
        registry.register("errors", "Reconcile errors by pool and stage", m.errors.clone());
        registry.register(
            "leader",
            "1 while this controller is the one that acts, 0 on standby",
            m.leader.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time of one pool's reconcile pass",
            m.reconcile_seconds.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// Set the pool's gauges from its status and spec after a pass,
    /// successful or not (a failed pass leaves the figures of the last
    /// good one and turns `Ready` to `False`).
    pub fn record_pool(&self, pool: &str, spec: &WorkerPoolSpec, status: &WorkerPoolStatus) {
        let labels = PoolLabels {
            pool: pool.to_string(),
        };
        self.desired_replicas
            .get_or_create(&labels)
            .set(status.desired_replicas.into());
        self.current_replicas
            .get_or_create(&labels)
            .set(status.current_replicas.into());
        self.ready_replicas
            .get_or_create(&labels)
            .set(status.ready_replicas.into());
        self.busy_replicas
            .get_or_create(&labels)
            .set(status.busy_replicas.into());
        self.pending_tasks.get_or_create(&labels).set(status.pending);
        self.in_flight_tasks.get_or_create(&labels).set(status.in_flight);
        self.oldest_pending_seconds
            .get_or_create(&labels)
            .set(status.oldest_pending_seconds as f64);
        match spec.target_queue_seconds {
            Some(seconds) => {
                self.target_queue_seconds
                    .get_or_create(&labels)
                    .set(seconds.into());
            }
            None => {
                self.target_queue_seconds.remove(&labels);
            }
        }

        let mut series = self.series.lock().expect("metrics series lock");
        if !series.contains_key(pool) {
            for stage in ERROR_STAGES {
                let labels = ErrorLabels {
                    pool: pool.to_string(),
                    stage: stage.to_string(),
                };
                // Creating the series is the point; it starts at 0.
                let _ = self.errors.get_or_create(&labels);
            }
        }
        let known = series.entry(pool.to_string()).or_default();
        let conditions: BTreeSet<String> = status.conditions.iter().map(|c| c.type_.clone()).collect();
        for gone in known.conditions.difference(&conditions) {
            self.remove_condition(pool, gone);
        }
        for condition in &status.conditions {
            for value in CONDITION_STATUSES {
                self.pool_condition
                    .get_or_create(&condition_labels(pool, &condition.type_, value))
                    .set(i64::from(condition.status == value));
            }
        }
        let task_types: BTreeSet<String> = spec.task_types.iter().map(|t| t.as_str().to_string()).collect();
        for gone in known.task_types.difference(&task_types) {
            self.pool_task_type.remove(&task_type_labels(pool, gone));
        }
        for task_type in &task_types {
            self.pool_task_type
                .get_or_create(&task_type_labels(pool, task_type))
                .set(1);
        }
        *known = PoolSeries {
            conditions,
            task_types,
        };
    }

    /// A pool its source turned away: `Ready=False`, and none of the
    /// figures a pass sets (no pass runs for it; the last ones would go
    /// stale), nor the task types it would serve.
    pub fn record_rejected(&self, pool: &str) {
        let mut series = self.series.lock().expect("metrics series lock");
        if let Some(known) = series.remove(pool) {
            self.remove_pool(pool, &known);
        }
        for value in CONDITION_STATUSES {
            self.pool_condition
                .get_or_create(&condition_labels(pool, "Ready", value))
                .set(i64::from(value == "False"));
        }
        series.insert(
            pool.to_string(),
            PoolSeries {
                conditions: BTreeSet::from(["Ready".to_string()]),
                task_types: BTreeSet::new(),
            },
        );
    }

    /// Count a pass's decision by phase, and by direction when it changes
    /// the replicas.
    pub fn record_decision(&self, pool: &str, decision: &Decision) {
        self.decisions
            .get_or_create(&DecisionLabels {
                pool: pool.to_string(),
                phase: decision.phase.as_str().to_string(),
            })
            .inc();
        if decision.changes_replicas() {
            let direction = if decision.replicas > decision.from {
                "up"
            } else {
                "down"
            };
            self.scale_changes
                .get_or_create(&DirectionLabels {
                    pool: pool.to_string(),
                    direction: direction.to_string(),
                })
                .inc();
        }
    }

    /// Drop the gauges of every pool not in `live` (their manifests are
    /// gone). Counters stay: they only ever count what happened.
    pub fn forget_pools_except(&self, live: &[&str]) {
        let mut series = self.series.lock().expect("metrics series lock");
        let gone: Vec<String> = series
            .keys()
            .filter(|pool| !live.contains(&pool.as_str()))
            .cloned()
            .collect();
        for pool in gone {
            if let Some(known) = series.remove(&pool) {
                self.remove_pool(&pool, &known);
            }
        }
    }

    /// Leadership won or lost. A standby acts on nothing, so it reports no
    /// pool: its last figures would go stale beside the new leader's.
    pub fn set_leader(&self, leads: bool) {
        self.leader.set(i64::from(leads));
        if !leads {
            self.forget_pools_except(&[]);
        }
    }

    fn remove_pool(&self, pool: &str, known: &PoolSeries) {
        let labels = PoolLabels {
            pool: pool.to_string(),
        };
        self.desired_replicas.remove(&labels);
        self.current_replicas.remove(&labels);
        self.ready_replicas.remove(&labels);
        self.busy_replicas.remove(&labels);
        self.pending_tasks.remove(&labels);
        self.in_flight_tasks.remove(&labels);
        self.oldest_pending_seconds.remove(&labels);
        self.target_queue_seconds.remove(&labels);
        for condition in &known.conditions {
            self.remove_condition(pool, condition);
        }
        for task_type in &known.task_types {
            self.pool_task_type.remove(&task_type_labels(pool, task_type));
        }
    }

    fn remove_condition(&self, pool: &str, condition: &str) {
        for value in CONDITION_STATUSES {
            self.pool_condition
                .remove(&condition_labels(pool, condition, value));
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

fn condition_labels(pool: &str, condition: &str, status: &str) -> ConditionLabels {
    ConditionLabels {
        pool: pool.to_string(),
        r#type: condition.to_string(),
        status: status.to_string(),
    }
}

fn task_type_labels(pool: &str, task_type: &str) -> TaskTypeLabels {
    TaskTypeLabels {
        pool: pool.to_string(),
        task_type: task_type.to_string(),
    }
}
