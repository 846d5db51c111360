//! Artifact records: what a task produced and where the bytes are stored.

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{QueueError, Result};
use crate::model::Lease;
use crate::Queue;

/// Where every object of a job's artifacts is stored, whatever the attempt:
/// the store puts them under it, and retention deletes all of it, bytes
/// written and never recorded included (an attempt that stopped between
/// storing and recording them).
///
/// The folder is inside the job's day folder (`jobs/YYYYMMDD/ID/`, the UTC
/// day of its UUIDv7 id), so when retention drops a day of history the
/// cleaner finds the day's bytes by listing one folder. The SQL function
/// `artifact_prefix` says the same. An id that is no UUIDv7 has no day.
pub fn artifact_prefix(job_id: Uuid) -> String {
    match day_of(job_id) {
        Some(day) => format!("{}{job_id}/", day_folder(day)),
        None => format!("jobs/{job_id}/"),
    }
}

/// The folder of the artifacts of every job created on `day` (UTC).
pub fn day_folder(day: NaiveDate) -> String {
    format!("jobs/{}/", day.format("%Y%m%d"))
}

/// The UTC day a UUIDv7 was made, from its 48-bit millisecond timestamp.
fn day_of(id: Uuid) -> Option<NaiveDate> {
    if id.get_version_num() != 7 {
        return None;
    }
    let b = id.as_bytes();
    let millis = u64::from_be_bytes([0, 0, b[0], b[1], b[2], b[3], b[4], b[5]]);
    DateTime::from_timestamp_millis(i64::try_from(millis).ok()?).map(|at| at.date_naive())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactKind {
    Text,
    Pdf,
    Audio,
}

impl ArtifactKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ArtifactKind::Text => "text",
            ArtifactKind::Pdf => "pdf",
            ArtifactKind::Audio => "audio",
        }
    }
}

impl TryFrom<String> for ArtifactKind {
    type Error = QueueError;
    fn try_from(s: String) -> Result<Self> {
        match s.as_str() {
            "text" => Ok(ArtifactKind::Text),
            "pdf" => Ok(ArtifactKind::Pdf),
            "audio" => Ok(ArtifactKind::Audio),
            other => Err(QueueError::invalid(
                "kind",
                format!("unknown artifact kind {other:?}"),
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct NewArtifact {
    pub job_id: Uuid,
    pub kind: ArtifactKind,
    pub content_type: String,
    pub storage_key: String,
    pub bytes: i64,
    pub sha256: String,
    pub metadata: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Artifact {
    pub id: Uuid,
    pub job_id: Uuid,
    pub task_id: i64,
    #[sqlx(try_from = "String")]
    pub kind: ArtifactKind,
    pub content_type: String,
    pub storage_key: String,
    pub bytes: i64,
    pub sha256: String,
    pub metadata: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

impl Queue {
    /// Record the artifact a held task produced, under its lease. A re-run
    /// replaces the record of the same kind, so a job never has two; the
    /// bytes of the replaced record are queued for deletion when they lie
    /// under another key. Refused when the lease is no longer held.
    ///
    /// The job is locked first, like every change to its tasks, so the
    /// lease cannot be swept or the task finished between the fence check
    /// and the commit.
    pub async fn record_artifact(
        &self,
        worker_id: &str,
        lease: Lease,
        artifact: &NewArtifact,
    ) -> Result<Artifact> {
        let lost = || QueueError::LeaseLost {
            task_id: lease.task_id,
            worker_id: worker_id.into(),
            claim: lease.claim,
        };
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT lock_jobs_of_tasks(ARRAY[$1::bigint])")
            .bind(lease.task_id)
            .execute(&mut *tx)
            .await?;
        let held: Option<Uuid> = sqlx::query_scalar(
            "SELECT job_id FROM job_tasks
             WHERE id = $1 AND job_id = $2 AND claimed_by = $3 AND claims = $4
               AND status IN ('claimed', 'processing')
             FOR SHARE",
        )
        .bind(lease.task_id)
        .bind(artifact.job_id)
        .bind(worker_id)
        .bind(lease.claim)
        .fetch_optional(&mut *tx)
        .await?;
        if held.is_none() {
            return Err(lost());
        }
        sqlx::query(
            "INSERT INTO artifact_deletions (storage_key)
             SELECT storage_key FROM artifacts
             WHERE job_id = $1 AND kind = $2 AND storage_key <> $3
             ON CONFLICT (storage_key) DO NOTHING",
        )
        .bind(artifact.job_id)
        .bind(artifact.kind.as_str())
        .bind(&artifact.storage_key)
        .execute(&mut *tx)
        .await?;
        let recorded: Artifact = sqlx::query_as(
            "INSERT INTO artifacts (id, job_id, task_id, kind, content_type, storage_key, bytes, sha256, metadata)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (job_id, kind) DO UPDATE
             SET task_id = EXCLUDED.task_id, content_type = EXCLUDED.content_type,
                 storage_key = EXCLUDED.storage_key, bytes = EXCLUDED.bytes, sha256 = EXCLUDED.sha256,
                 metadata = EXCLUDED.metadata, created_at = now()
             RETURNING *",
        )
        .bind(Uuid::now_v7())
        .bind(artifact.job_id)
        .bind(lease.task_id)
        .bind(artifact.kind.as_str())
        .bind(&artifact.content_type)
        .bind(&artifact.storage_key)
        .bind(artifact.bytes)
        .bind(&artifact.sha256)
        .bind(&artifact.metadata)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(recorded)
    }

    /// The artifact of this kind that a job's completed task recorded: what
    /// a later task reads as its input (a reading job's pdf and audio read
    /// the text task's). `None` until that task completed.
    pub async fn completed_artifact(&self, job_id: Uuid, kind: ArtifactKind) -> Result<Option<Artifact>> {
        Ok(sqlx::query_as(
            "SELECT a.* FROM artifacts a JOIN all_tasks t ON t.job_id = a.job_id AND t.id = a.task_id
             WHERE a.job_id = $1 AND a.kind = $2 AND t.status = 'complete'",
        )
        .bind(job_id)
        .bind(kind.as_str())
        .fetch_optional(&self.pool)
        .await?)
    }

    /// A job's final artifacts: those whose task completed (a running or
    /// retried task's artifact may still be replaced).
    pub async fn artifacts_of(&self, job_id: Uuid) -> Result<Vec<Artifact>> {
        Ok(sqlx::query_as(
            "SELECT a.* FROM artifacts a JOIN all_tasks t ON t.job_id = a.job_id AND t.id = a.task_id
             WHERE a.job_id = $1 AND t.status = 'complete' ORDER BY a.kind",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// One final artifact of a tenant's job; anything else (another
    /// tenant's, or one whose task has not completed) is not found.
    pub async fn artifact(&self, tenant: &str, job_id: Uuid, artifact_id: Uuid) -> Result<Option<Artifact>> {
        Ok(sqlx::query_as(
            "SELECT a.* FROM artifacts a JOIN all_jobs j ON j.id = a.job_id
             JOIN all_tasks t ON t.job_id = a.job_id AND t.id = a.task_id
             WHERE a.id = $1 AND a.job_id = $2 AND j.tenant = $3 AND t.status = 'complete'",
        )
        .bind(artifact_id)
        .bind(job_id)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?)
    }
}
