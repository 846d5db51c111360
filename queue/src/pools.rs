//! Pool status: what the controller last saw and did for each WorkerPool,
//! for `GET /v1/pools`.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::error::Result;
use crate::Queue;

/// One pool's status as the controller reports it after a pass.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PoolStatus {
    pub pool: String,
    pub backend: String,
    pub desired_replicas: i32,
    pub current_replicas: i32,
    pub ready_replicas: i32,
    pub busy_replicas: i32,
    pub pending: i64,
    pub in_flight: i64,
    /// A JSON array of Kubernetes-style conditions.
    pub conditions: serde_json::Value,
    pub last_decision: Option<String>,
    pub last_scale_at: Option<DateTime<Utc>>,
    /// The task types the pool serves, as its spec names them.
    pub task_types: Vec<String>,
    /// The WorkerPool's creationTimestamp where it has one (Kubernetes);
    /// `None` keeps the stored time (now, for a new row). Read back as
    /// [`PoolStatusRecord::created_at`].
    #[serde(skip)]
    pub created_at: Option<DateTime<Utc>>,
}

/// A stored status with when the pool was created and the status written.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolStatusRecord {
    #[serde(flatten)]
    pub status: PoolStatus,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

type PoolStatusRow = (
    String,
    String,
    i32,
    i32,
    i32,
    i32,
    i64,
    i64,
    serde_json::Value,
    Option<String>,
    Option<DateTime<Utc>>,
    Vec<String>,
    DateTime<Utc>,
    DateTime<Utc>,
);

impl Queue {
    /// Write a pool's status (insert or replace).
    pub async fn put_pool_status(&self, s: &PoolStatus) -> Result<()> {
        sqlx::query(
            "INSERT INTO pool_status (pool, backend, desired_replicas, current_replicas, ready_replicas,
                                      busy_replicas, pending, in_flight, conditions, last_decision,
                                      last_scale_at, task_types, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, COALESCE($13, now()), now())
             ON CONFLICT (pool) DO UPDATE SET
                backend = EXCLUDED.backend, desired_replicas = EXCLUDED.desired_replicas,
                current_replicas = EXCLUDED.current_replicas, ready_replicas = EXCLUDED.ready_replicas,
                busy_replicas = EXCLUDED.busy_replicas, pending = EXCLUDED.pending,
                in_flight = EXCLUDED.in_flight, conditions = EXCLUDED.conditions,
                last_decision = EXCLUDED.last_decision, last_scale_at = EXCLUDED.last_scale_at,
                task_types = EXCLUDED.task_types,
                created_at = COALESCE($13, pool_status.created_at), updated_at = now()",
        )
        .bind(&s.pool)
        .bind(&s.backend)
        .bind(s.desired_replicas)
        .bind(s.current_replicas)
        .bind(s.ready_replicas)
        .bind(s.busy_replicas)
        .bind(s.pending)
        .bind(s.in_flight)
        .bind(&s.conditions)
        .bind(&s.last_decision)
        .bind(s.last_scale_at)
        .bind(&s.task_types)
        .bind(s.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Drop the rows of this backend's pools that are no longer defined.
    pub async fn forget_pool_statuses(&self, backend: &str, live: &[String]) -> Result<u64> {
        let done = sqlx::query("DELETE FROM pool_status WHERE backend = $1 AND NOT (pool = ANY($2))")
            .bind(backend)
            .bind(live)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// Every pool's status, by name.
    pub async fn pool_statuses(&self) -> Result<Vec<PoolStatusRecord>> {
        let rows: Vec<PoolStatusRow> = sqlx::query_as(
            "SELECT pool, backend, desired_replicas, current_replicas, ready_replicas, busy_replicas,
                    pending, in_flight, conditions, last_decision, last_scale_at, task_types,
                    created_at, updated_at
             FROM pool_status ORDER BY pool",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| PoolStatusRecord {
                status: PoolStatus {
                    pool: r.0,
                    backend: r.1,
                    desired_replicas: r.2,
                    current_replicas: r.3,
                    ready_replicas: r.4,
                    busy_replicas: r.5,
                    pending: r.6,
                    in_flight: r.7,
                    conditions: r.8,
                    last_decision: r.9,
                    last_scale_at: r.10,
                    task_types: r.11,
                    created_at: None,
                },
                created_at: r.12,
                updated_at: r.13,
            })
            .collect())
    }

    /// Store the scaling policy's memory of a pool beside its status (the
    /// row [`Queue::put_pool_status`] wrote), so whoever leads next, and
    /// `controller plan`, decide from the same past.
    pub async fn put_policy_memory(&self, pool: &str, memory: &serde_json::Value) -> Result<bool> {
        let done = sqlx::query("UPDATE pool_status SET policy_memory = $2 WHERE pool = $1")
            .bind(pool)
            .bind(memory)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The stored policy memory of every pool that has one, by pool.
    pub async fn policy_memories(&self) -> Result<Vec<(String, serde_json::Value)>> {
        let rows = sqlx::query_as(
            "SELECT pool, policy_memory FROM pool_status WHERE policy_memory IS NOT NULL ORDER BY pool",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }
}
