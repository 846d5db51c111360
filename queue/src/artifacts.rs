//! Artifact records: what a task produced and where the bytes are stored.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{QueueError, Result};
use crate::model::Lease;
use crate::Queue;

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
    /// Record the artifact a held task produced. A re-run replaces the
    /// record of the same kind, so a job never has two. Refused when the
    /// lease is no longer held.
    pub async fn record_artifact(
        &self,
        worker_id: &str,
        lease: Lease,
        artifact: &NewArtifact,
    ) -> Result<Artifact> {
        sqlx::query_as(
            "INSERT INTO artifacts (id, job_id, task_id, kind, content_type, storage_key, bytes, sha256, metadata)
             SELECT $1, t.job_id, t.id, $4, $5, $6, $7, $8, $9
             FROM job_tasks t
             WHERE t.id = $2 AND t.job_id = $10 AND t.claimed_by = $3 AND t.attempts = $11
               AND t.status IN ('claimed', 'processing')
             ON CONFLICT (job_id, kind) DO UPDATE
             SET task_id = EXCLUDED.task_id, content_type = EXCLUDED.content_type,
                 storage_key = EXCLUDED.storage_key, bytes = EXCLUDED.bytes, sha256 = EXCLUDED.sha256,
                 metadata = EXCLUDED.metadata, created_at = now()
             RETURNING *",
        )
        .bind(Uuid::now_v7())
        .bind(lease.task_id)
        .bind(worker_id)
        .bind(artifact.kind.as_str())
        .bind(&artifact.content_type)
        .bind(&artifact.storage_key)
        .bind(artifact.bytes)
        .bind(&artifact.sha256)
        .bind(&artifact.metadata)
        .bind(artifact.job_id)
        .bind(lease.attempt)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| QueueError::LeaseLost { task_id: lease.task_id, worker_id: worker_id.into(), attempt: lease.attempt })
    }

    /// A job's final artifacts: those whose task completed (a running or
    /// retried task's artifact may still be replaced).
    pub async fn artifacts_of(&self, job_id: Uuid) -> Result<Vec<Artifact>> {
        Ok(sqlx::query_as(
            "SELECT a.* FROM artifacts a JOIN job_tasks t ON t.id = a.task_id
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
            "SELECT a.* FROM artifacts a JOIN jobs j ON j.id = a.job_id
             JOIN job_tasks t ON t.id = a.task_id
             WHERE a.id = $1 AND a.job_id = $2 AND j.tenant = $3 AND t.status = 'complete'",
        )
        .bind(artifact_id)
        .bind(job_id)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?)
    }
}
