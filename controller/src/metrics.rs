//! The controller's Prometheus metrics, served on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

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

pub struct Metrics {
    pub desired_replicas: Family<PoolLabels, Gauge>,
    pub current_replicas: Family<PoolLabels, Gauge>,
    pub ready_replicas: Family<PoolLabels, Gauge>,
    pub busy_replicas: Family<PoolLabels, Gauge>,
    pub pending_tasks: Family<PoolLabels, Gauge>,
    pub in_flight_tasks: Family<PoolLabels, Gauge>,
    pub decisions: Family<DecisionLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub reconcile_seconds: Histogram,
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
            decisions: Family::default(),
            errors: Family::default(),
            reconcile_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
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
        registry.register("decisions", "Decisions by pool and phase", m.decisions.clone());
        registry.register("errors", "Reconcile errors by pool and stage", m.errors.clone());
        registry.register(
            "reconcile_duration_seconds",
            "Time of one reconcile pass over all pools",
            m.reconcile_seconds.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}
