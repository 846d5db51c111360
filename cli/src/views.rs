//! The API's responses, as the CLI reads them. Fields mirror the API's
//! views one for one (`tests/cli.rs` checks each against a real response:
//! read and written back, it must be the same JSON), and unknown fields are
//! tolerated, so a newer server does not break an older client.

use chrono::{DateTime, Utc};
use queue::{ArtifactKind, JobStatus, JobType, TaskStatus, TaskType};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub id: Uuid,
    #[serde(rename = "type")]
    pub job_type: JobType,
    pub status: JobStatus,
    pub priority: i32,
    pub input: serde_json::Value,
    pub idempotency_key: Option<String>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub events_path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Task {
    pub id: i64,
    #[serde(rename = "type")]
    pub task_type: TaskType,
    pub status: TaskStatus,
    pub depends_on: Vec<String>,
    pub attempts: i32,
    pub max_attempts: i32,
    pub last_error: Option<String>,
    pub run_at: DateTime<Utc>,
    pub claimed_at: Option<DateTime<Utc>>,
    pub heartbeat_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl Task {
    pub fn is_finished(&self) -> bool {
        matches!(
            self.status,
            TaskStatus::Complete | TaskStatus::Failed | TaskStatus::Cancelled
        )
    }

    /// How long it has run (claimed until finished, or until `now`).
    pub fn elapsed(&self, now: DateTime<Utc>) -> Option<chrono::Duration> {
        let start = self.claimed_at?;
        Some(self.finished_at.unwrap_or(now) - start)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Artifact {
    pub id: Uuid,
    pub kind: ArtifactKind,
    pub content_type: String,
    pub bytes: i64,
    pub sha256: String,
    pub created_at: DateTime<Utc>,
    pub download_path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobDetail {
    #[serde(flatten)]
    pub job: Job,
    pub tasks: Vec<Task>,
    pub artifacts: Vec<Artifact>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobList {
    pub jobs: Vec<Job>,
    pub next_cursor: Option<String>,
}

/// One `status` event of `GET /v1/jobs/{id}/events`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobStatusUpdate {
    pub job_id: Uuid,
    pub status: JobStatus,
    pub error: Option<String>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskDepth {
    pub task_type: TaskType,
    pub pending: i64,
    pub scheduled: i64,
    pub blocked: i64,
    pub in_flight: i64,
    pub oldest_pending_seconds: f64,
    pub completed_last_minute: i64,
    pub capped: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueueDepth {
    pub task_types: Vec<TaskDepth>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolStatus {
    pub pool: String,
    pub backend: String,
    pub task_types: Vec<String>,
    pub desired_replicas: i32,
    pub current_replicas: i32,
    pub ready_replicas: i32,
    pub busy_replicas: i32,
    pub pending: i64,
    pub in_flight: i64,
    pub conditions: serde_json::Value,
    pub last_decision: Option<String>,
    pub last_scale_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl PoolStatus {
    /// The status of the condition of `kind` (`True`, `False`, `Unknown`),
    /// as `kubectl get wp` reads `.status.conditions[?(@.type=="Active")]`.
    pub fn condition(&self, kind: &str) -> Option<&str> {
        self.condition_of(kind)?.get("status")?.as_str()
    }

    /// The whole condition of `kind` (`type`, `status`, `reason`, `message`).
    fn condition_of(&self, kind: &str) -> Option<&serde_json::Value> {
        self.conditions.as_array()?.iter().find(|c| c["type"] == kind)
    }

    /// What the DECISION column shows: the last decision, or, while the
    /// pool's passes fail (`Ready=False`), why. The figures are then those
    /// of the last pass that succeeded, and the decision alone read as a
    /// healthy, idle pool.
    pub fn decision_or_failure(&self) -> Option<String> {
        let not_ready = self.condition_of("Ready").filter(|c| c["status"] == "False");
        match not_ready {
            Some(c) => Some(format!(
                "not ready: {}: {}",
                c["reason"].as_str().unwrap_or("Unknown"),
                c["message"].as_str().unwrap_or_default()
            )),
            None => self.last_decision.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pools {
    pub pools: Vec<PoolStatus>,
}

/// `{"error": {"code", "message", "field"?}}`, every error the API answers.
#[derive(Debug, Clone, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
    #[serde(default)]
    pub field: Option<String>,
}
