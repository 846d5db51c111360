//! The queue's vocabulary: job and task types, statuses, and rows.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::QueueError;

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident, $what:literal { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = QueueError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(QueueError::invalid(
                        $what,
                        format!(
                            "unknown {} {other:?}; expected one of: {}",
                            $what,
                            [$($text),+].join(", ")
                        ),
                    )),
                }
            }
        }
    };
}

string_enum!(
    /// What a client asks for; each expands into a small DAG of tasks.
    JobType, "job type" {
        Reading => "reading",
        Text => "text",
        Pdf => "pdf",
        Audiobook => "audiobook",
    }
);

string_enum!(
    /// What a worker does. These names are a contract with other programs.
    TaskType, "task type" {
        TextGeneration => "text_generation",
        PdfGeneration => "pdf_generation",
        AudioGeneration => "audio_generation",
    }
);

string_enum!(
    /// `queued → processing → complete | failed | cancelled`.
    JobStatus, "job status" {
        Queued => "queued",
        Processing => "processing",
        Complete => "complete",
        Failed => "failed",
        Cancelled => "cancelled",
    }
);

string_enum!(
    /// `pending → claimed → processing → complete | failed | cancelled`.
    TaskStatus, "task status" {
        Pending => "pending",
        Claimed => "claimed",
        Processing => "processing",
        Complete => "complete",
        Failed => "failed",
        Cancelled => "cancelled",
    }
);

impl JobStatus {
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobStatus::Complete | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

/// One task of a job's plan: its type, what it waits for, and its limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskPlan {
    pub task_type: TaskType,
    pub depends_on: &'static [TaskType],
}

impl JobType {
    /// The task DAG a job of this type expands into.
    pub fn plan(self) -> &'static [TaskPlan] {
        use TaskType::*;
        const TEXT: TaskPlan = TaskPlan {
            task_type: TextGeneration,
            depends_on: &[],
        };
        match self {
            JobType::Reading => &[
                TEXT,
                TaskPlan {
                    task_type: PdfGeneration,
                    depends_on: &[TextGeneration],
                },
                TaskPlan {
                    task_type: AudioGeneration,
                    depends_on: &[TextGeneration],
                },
            ],
            JobType::Text => &[TEXT],
            JobType::Pdf => &[TaskPlan {
                task_type: PdfGeneration,
                depends_on: &[],
            }],
            JobType::Audiobook => &[TaskPlan {
                task_type: AudioGeneration,
                depends_on: &[],
            }],
        }
    }
}

impl TaskType {
    /// How long one attempt may run before the sweeper takes it back.
    pub fn default_timeout_seconds(self) -> i32 {
        match self {
            TaskType::TextGeneration => 300,
            TaskType::PdfGeneration => 120,
            TaskType::AudioGeneration => 900,
        }
    }
}

/// A job as clients submit it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    pub tenant: String,
    pub job_type: JobType,
    pub input: serde_json::Value,
    pub priority: i32,
    pub idempotency_key: Option<String>,
    /// Attempts each task gets before it is failed.
    pub max_attempts: i32,
}

impl NewJob {
    pub fn new(tenant: impl Into<String>, job_type: JobType, input: serde_json::Value) -> Self {
        NewJob {
            tenant: tenant.into(),
            job_type,
            input,
            priority: 0,
            idempotency_key: None,
            max_attempts: 5,
        }
    }

    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    pub fn max_attempts(mut self, max_attempts: i32) -> Self {
        self.max_attempts = max_attempts;
        self
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Job {
    pub id: Uuid,
    pub tenant: String,
    #[sqlx(try_from = "String")]
    pub job_type: JobType,
    #[sqlx(try_from = "String")]
    pub status: JobStatus,
    pub input: serde_json::Value,
    pub priority: i32,
    pub idempotency_key: Option<String>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Task {
    pub id: i64,
    pub job_id: Uuid,
    #[sqlx(try_from = "String")]
    pub task_type: TaskType,
    #[sqlx(try_from = "String")]
    pub status: TaskStatus,
    pub dependencies: Vec<String>,
    pub waiting_on: i32,
    pub priority: i32,
    pub attempts: i32,
    pub max_attempts: i32,
    /// How many times the task was claimed: the current claim's lease token.
    pub claims: i32,
    pub run_at: DateTime<Utc>,
    pub timeout_seconds: i32,
    pub claimed_by: Option<String>,
    pub claimed_at: Option<DateTime<Utc>>,
    pub heartbeat_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub output: Option<serde_json::Value>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl Task {
    /// The fence a worker presents with every later call on this task.
    pub fn lease(&self) -> Lease {
        Lease {
            task_id: self.id,
            job_id: self.job_id,
            claim: self.claims,
        }
    }
}

/// A claim on one task: only the holder of this claim may finish it.
///
/// `claim` counts every claim of the task and never goes back (a release
/// returns the attempt, not the claim; a retried job keeps it), so a lease
/// names one claim forever: a late call of an earlier holder is refused even
/// when the task was claimed again by a worker with the same id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lease {
    pub task_id: i64,
    /// The task's job: a completion repeated after its answer was lost
    /// finds the task in history by it (history's key is the job's id and
    /// the task's).
    pub job_id: Uuid,
    pub claim: i32,
}

macro_rules! try_from_string {
    ($($t:ty),+) => {$(
        impl TryFrom<String> for $t {
            type Error = QueueError;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                s.parse()
            }
        }
    )+};
}
try_from_string!(JobType, TaskType, JobStatus, TaskStatus);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_listed() {
        for t in TaskType::ALL {
            assert_eq!(t.as_str().parse::<TaskType>().unwrap(), *t);
        }
        let err = "video".parse::<JobType>().unwrap_err().to_string();
        assert!(
            err.contains("\"video\"") && err.contains("reading, text, pdf, audiobook"),
            "{err}"
        );
    }

    #[test]
    fn reading_is_text_then_pdf_and_audio() {
        let plan = JobType::Reading.plan();
        assert_eq!(plan[0].task_type, TaskType::TextGeneration);
        assert!(plan[1..]
            .iter()
            .all(|t| t.depends_on == [TaskType::TextGeneration]));
    }
}
