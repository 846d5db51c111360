//! Prometheus metrics: HTTP requests by route and status, queue depth per
//! task type (read from the queue at scrape time, at most once per
//! [`DEPTH_REFRESH`]), jobs created, and sweeper actions. Served on their own address
//! (`METRICS_ADDR`), never on the API's port.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use queue::{Queue, SweepOutcome, TaskDepth};

/// Scrapes within this long of a depth read reuse its figures: however
/// often (or by however many scrapers) `/metrics` is read, the queue is
/// asked at most this often.
pub const DEPTH_REFRESH: Duration = Duration::from_secs(5);
/// A scrape should not hang on a slow database; stale gauges are better.
const DEPTH_READ_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// A standard method, or `other`: a client's custom method must not
    /// mint a series.
    method: &'static str,
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
struct JobTypeLabels {
    job_type: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SweepLabels {
    /// `retried`, `failed`, `workers_removed`, `pruned`.
    action: &'static str,
}

/// Not `job`: Prometheus gives every scraped series a `job` label of its
/// own and would rename this one `exported_job`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    maintenance: &'static str,
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
    jobs_created: Family<JobTypeLabels, Counter>,
    sweeper_actions: Family<SweepLabels, Counter>,
    maintenance_runs: Family<RunLabels, Counter>,
    depth_reads: Counter,
    /// When the depth gauges were last read; held across the read so
    /// concurrent scrapes wait for one read instead of making their own.
    depth_read_at: tokio::sync::Mutex<Option<Instant>>,
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
            jobs_created: Family::default(),
            sweeper_actions: Family::default(),
            maintenance_runs: Family::default(),
            depth_reads: Counter::default(),
            depth_read_at: tokio::sync::Mutex::new(None),
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
            "jobs_created",
            "Jobs created (arrivals), by job type; an idempotent replay creates none",
            self.jobs_created.clone(),
        );
        r.register(
            "sweeper_actions",
            "What the sweeper and retention did: tasks retried or failed, workers removed, jobs pruned, vacuums of the open-task table",
            self.sweeper_actions.clone(),
        );
        r.register(
            "maintenance_runs",
            "Sweeper and retention runs by result",
            self.maintenance_runs.clone(),
        );
        r.register(
            "queue_depth_reads",
            "Queue depth reads made for scrapes (at most one per refresh interval)",
            self.depth_reads.clone(),
        );
        self
    }

    pub fn observe_request(&self, method: &Method, route: &str, status: u16, started: Instant) {
        let labels = RequestLabels {
            method: method_label(method),
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

    /// Count the jobs a request created (not those an idempotency key
    /// found already there).
    pub fn record_created<'a>(&self, created: impl IntoIterator<Item = &'a queue::Enqueued>) {
        for enqueued in created.into_iter().filter(|e| e.created) {
            self.jobs_created
                .get_or_create(&JobTypeLabels {
                    job_type: enqueued.job.job_type.as_str(),
                })
                .inc();
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

    /// A vacuum of the open-task table the vacuumer ran.
    pub fn record_vacuum(&self) {
        self.count_action("vacuums", 1);
    }

    pub fn record_pruned(&self, jobs: u64) {
        self.count_action("pruned", jobs);
    }

    fn count_action(&self, action: &'static str, n: u64) {
        self.sweeper_actions
            .get_or_create(&SweepLabels { action })
            .inc_by(n);
    }

    /// `maintenance` is `sweep`, `repair`, `partitions`, `retention`,
    /// `artifact_cleanup`, `day_cleanup` or `vacuum`.
    pub fn record_run(&self, maintenance: &'static str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.maintenance_runs
            .get_or_create(&RunLabels { maintenance, result })
            .inc();
    }

    /// Read the queue depth into the gauges, unless it was read less than
    /// `DEPTH_REFRESH` ago. A failed read keeps the old figures and is not
    /// retried before the interval either: a struggling database is not
    /// asked more often because it struggles.
    pub async fn refresh_depth(&self, queue: &Queue) {
        let mut read_at = self.depth_read_at.lock().await;
        if read_at.is_some_and(|at| at.elapsed() < DEPTH_REFRESH) {
            return;
        }
        self.depth_reads.inc();
        match tokio::time::timeout(DEPTH_READ_TIMEOUT, queue.depth()).await {
            Ok(Ok(depth)) => self.set_depth(&depth),
            Ok(Err(error)) => tracing::warn!(%error, "queue depth unavailable for metrics"),
            Err(_) => tracing::warn!("queue depth read timed out for metrics"),
        }
        *read_at = Some(Instant::now());
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
    // The template of the route that matched; requests no route matched
    // share one label, so raw paths never become series.
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let response = next.run(request).await;
    metrics.observe_request(&method, &route, response.status().as_u16(), started);
    response
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::CONNECT => "CONNECT",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// The metrics listener's one route.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    queue: Queue,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let (metrics, queue) = (metrics.clone(), queue.clone());
            async move {
                metrics.refresh_depth(&queue).await;
                (
                    [(axum::http::header::CONTENT_TYPE, OPENMETRICS)],
                    metrics.encode(),
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_methods_share_one_label() {
        assert_eq!(method_label(&Method::PATCH), "PATCH");
        for custom in ["BREW", "PROPFIND", "get"] {
            let method = Method::from_bytes(custom.as_bytes()).unwrap();
            assert_eq!(method_label(&method), "other", "{custom}");
        }
    }
}
