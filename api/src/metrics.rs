//! Prometheus metrics: HTTP requests by route and status, queue depth per
//! task type (read from the queue at scrape time), and sweeper actions.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use queue::{SweepOutcome, TaskDepth};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    /// The route template (`/v1/jobs/{id}`), never the raw path, so the
    /// label set stays bounded.
    route: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskTypeLabels {
    task_type: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SweepLabels {
    /// `retried`, `failed`, `workers_removed`, `pruned`.
    action: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    job: &'static str,
    result: &'static str,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_seconds: Family<RequestLabels, Histogram>,
    pending: Family<TaskTypeLabels, Gauge>,
    scheduled: Family<TaskTypeLabels, Gauge>,
    blocked: Family<TaskTypeLabels, Gauge>,
    in_flight: Family<TaskTypeLabels, Gauge>,
    oldest_pending_seconds: Family<TaskTypeLabels, Gauge<f64, AtomicU64>>,
    completed_last_minute: Family<TaskTypeLabels, Gauge>,
    sweeper_actions: Family<SweepLabels, Counter>,
    maintenance_runs: Family<RunLabels, Counter>,
}

fn request_histogram() -> Histogram {
    // 1 ms to ~16 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("backlog");
        let requests = Family::<RequestLabels, Counter>::default();
        let request_seconds =
            Family::<RequestLabels, Histogram>::new_with_constructor(request_histogram as fn() -> Histogram);
        registry.register("http_requests", "HTTP requests answered", requests.clone());
        registry.register(
            "http_request_duration_seconds",
            "Time to answer an HTTP request (to the response head)",
            request_seconds.clone(),
        );
        let metrics = Metrics {
            requests,
            request_seconds,
            pending: Family::default(),
            scheduled: Family::default(),
            blocked: Family::default(),
            in_flight: Family::default(),
            oldest_pending_seconds: Family::default(),
            completed_last_minute: Family::default(),
            sweeper_actions: Family::default(),
            maintenance_runs: Family::default(),
            registry,
        };
        metrics.register_queue_and_sweeper()
    }

    fn register_queue_and_sweeper(mut self) -> Self {
        let r = &mut self.registry;
        r.register("queue_pending_tasks", "Tasks runnable now", self.pending.clone());
        r.register(
            "queue_scheduled_tasks",
            "Tasks waiting for a later run_at (retry backoff)",
            self.scheduled.clone(),
        );
        r.register(
            "queue_blocked_tasks",
            "Tasks waiting for tasks they depend on",
            self.blocked.clone(),
        );
        r.register(
            "queue_in_flight_tasks",
            "Tasks claimed or processing",
            self.in_flight.clone(),
        );
        r.register(
            "queue_oldest_pending_seconds",
            "Age of the oldest runnable task",
            self.oldest_pending_seconds.clone(),
        );
        r.register(
            "queue_completed_last_minute",
            "Tasks completed in the last minute",
            self.completed_last_minute.clone(),
        );
        r.register(
            "sweeper_actions",
            "What the sweeper and retention did: tasks retried or failed, workers removed, jobs pruned",
            self.sweeper_actions.clone(),
        );
        r.register(
            "maintenance_runs",
            "Sweeper and retention runs by result",
            self.maintenance_runs.clone(),
        );
        self
    }

    pub fn observe_request(&self, method: &str, route: &str, status: u16, started: Instant) {
        let labels = RequestLabels {
            method: method.to_string(),
            route: route.to_string(),
            status,
        };
        self.requests.get_or_create(&labels).inc();
        self.request_seconds
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
    }

    pub fn set_depth(&self, depth: &[TaskDepth]) {
        for d in depth {
            let labels = TaskTypeLabels {
                task_type: d.task_type.to_string(),
            };
            self.pending.get_or_create(&labels).set(d.pending);
            self.scheduled.get_or_create(&labels).set(d.scheduled);
            self.blocked.get_or_create(&labels).set(d.blocked);
            self.in_flight.get_or_create(&labels).set(d.in_flight);
            self.oldest_pending_seconds
                .get_or_create(&labels)
                .set(d.oldest_pending_seconds);
            self.completed_last_minute
                .get_or_create(&labels)
                .set(d.completed_last_minute);
        }
    }

    pub fn record_sweep(&self, outcome: &SweepOutcome) {
        self.count_action("retried", outcome.retried() as u64);
        self.count_action("failed", outcome.failed() as u64);
        self.count_action("workers_removed", outcome.workers_removed);
    }

    pub fn record_repaired(&self, jobs: u64) {
        self.count_action("jobs_repaired", jobs);
    }

    pub fn record_pruned(&self, jobs: u64) {
        self.count_action("pruned", jobs);
    }

    fn count_action(&self, action: &'static str, n: u64) {
        self.sweeper_actions
            .get_or_create(&SweepLabels { action })
            .inc_by(n);
    }

    /// `job` is `sweep`, `repair`, `retention` or `artifact_cleanup`.
    pub fn record_run(&self, job: &'static str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.maintenance_runs
            .get_or_create(&RunLabels { job, result })
            .inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Middleware: count and time every request by its route template.
pub async fn track_requests(State(metrics): State<Arc<Metrics>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let response = next.run(request).await;
    metrics.observe_request(method.as_str(), &route, response.status().as_u16(), started);
    response
}
