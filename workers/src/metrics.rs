//! A replica's Prometheus metrics, served on `/metrics` when the worker is
//! given `--metrics-addr` (`WORKER_METRICS_ADDR`).

use std::sync::atomic::AtomicU64;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use queue::TaskType;

/// How a task left this replica.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    completed,
    /// Failed; retried later or failed for good, as the queue decides.
    failed,
    /// Handed back unfinished at shutdown, without spending an attempt.
    released,
    /// The lease was lost (job cancelled, task swept) before the result was stored.
    lost,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    pub task_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub task_type: String,
    pub outcome: Outcome,
}

pub struct WorkerMetrics {
    pub tasks: Family<OutcomeLabels, Counter>,
    pub in_flight: Gauge,
    /// Finished tasks whose result waits for the database to take it.
    pub results_waiting: Gauge,
    pub task_seconds: Family<TaskLabels, Histogram>,
    pub claim_batches: Counter,
    /// When this replica started (Unix seconds): a value that changes under
    /// one scrape target means the process restarted, which is how a crash
    /// loop shows.
    pub start_time_seconds: Gauge<f64, AtomicU64>,
    registry: Registry,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("backlog_worker");
        let m = WorkerMetrics {
            tasks: Family::default(),
            in_flight: Gauge::default(),
            results_waiting: Gauge::default(),
            // 10 ms .. ~20 min: no-op tasks to long LLM calls and audiobooks.
            task_seconds: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.01, 2.0, 17))),
            claim_batches: Counter::default(),
            start_time_seconds: Gauge::default(),
            registry: Registry::default(),
        };
        // The metrics are made as the process starts (before it connects).
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        m.start_time_seconds.set(started);
        registry.register(
            "tasks",
            "Tasks that left this replica, by task type and outcome",
            m.tasks.clone(),
        );
        registry.register("tasks_in_flight", "Tasks this replica holds", m.in_flight.clone());
        registry.register(
            "results_waiting",
            "Finished tasks whose result or failure is not stored yet: the database could not be reached",
            m.results_waiting.clone(),
        );
        registry.register(
            "task_duration_seconds",
            "How long the pipeline ran for one task",
            m.task_seconds.clone(),
        );
        registry.register(
            "claim_batches",
            "Claims that returned at least one task",
            m.claim_batches.clone(),
        );
        registry.register(
            "start_time_seconds",
            "When this replica's process started, in Unix seconds",
            m.start_time_seconds.clone(),
        );
        WorkerMetrics { registry, ..m }
    }
}

impl std::fmt::Debug for WorkerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerMetrics").finish_non_exhaustive()
    }
}

impl WorkerMetrics {
    pub fn count(&self, task_type: TaskType, outcome: Outcome, n: u64) {
        self.tasks
            .get_or_create(&OutcomeLabels {
                task_type: task_type.as_str().to_string(),
                outcome,
            })
            .inc_by(n);
    }

    pub fn observe_duration(&self, task_type: TaskType, seconds: f64) {
        self.task_seconds
            .get_or_create(&TaskLabels {
                task_type: task_type.as_str().to_string(),
            })
            .observe(seconds);
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}
