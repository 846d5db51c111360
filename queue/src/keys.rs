//! API keys: who may call the HTTP API, for which tenant, in which role.
//!
//! The queue never sees a key itself: callers generate it and pass only its
//! SHA-256, which is what is stored and looked up.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::error::{QueueError, Result};
use crate::jobs::refuse_nul;
use crate::Queue;

const MAX_TENANT_LEN: usize = 128;
const MAX_PREFIX_LEN: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiKeyRole {
    /// Sees and changes only its tenant's jobs.
    Client,
    /// Also reads operator routes such as queue depth.
    Admin,
}

impl ApiKeyRole {
    pub fn as_str(self) -> &'static str {
        match self {
            ApiKeyRole::Client => "client",
            ApiKeyRole::Admin => "admin",
        }
    }
}

impl fmt::Display for ApiKeyRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ApiKeyRole {
    type Err = QueueError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "client" => Ok(ApiKeyRole::Client),
            "admin" => Ok(ApiKeyRole::Admin),
            other => Err(QueueError::invalid(
                "role",
                format!("unknown role {other:?}; expected client or admin"),
            )),
        }
    }
}

impl TryFrom<String> for ApiKeyRole {
    type Error = QueueError;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

/// A key to store: its SHA-256 and the short prefix shown to operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewApiKey {
    pub tenant: String,
    pub role: ApiKeyRole,
    pub prefix: String,
    pub key_hash: [u8; 32],
}

/// A stored key, without anything secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct ApiKey {
    pub id: Uuid,
    pub tenant: String,
    #[sqlx(try_from = "String")]
    pub role: ApiKeyRole,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

// The columns of [`ApiKey`], spliced in at compile time (never the hash).
macro_rules! key_columns {
    () => {
        "id, tenant, role, prefix, created_at, revoked_at, last_used_at"
    };
}

impl Queue {
    pub async fn create_api_key(&self, key: &NewApiKey) -> Result<ApiKey> {
        if key.tenant.trim().is_empty() || key.tenant.len() > MAX_TENANT_LEN {
            return Err(QueueError::invalid(
                "tenant",
                format!("must be 1 to {MAX_TENANT_LEN} characters"),
            ));
        }
        refuse_nul("tenant", &key.tenant)?;
        if key.prefix.is_empty() || key.prefix.len() > MAX_PREFIX_LEN {
            return Err(QueueError::invalid(
                "prefix",
                format!("must be 1 to {MAX_PREFIX_LEN} characters"),
            ));
        }
        refuse_nul("prefix", &key.prefix)?;
        Ok(sqlx::query_as(concat!(
            "INSERT INTO api_keys (id, tenant, role, prefix, key_hash) VALUES ($1, $2, $3, $4, $5)
             RETURNING ",
            key_columns!()
        ))
        .bind(Uuid::now_v7())
        .bind(&key.tenant)
        .bind(key.role.as_str())
        .bind(&key.prefix)
        .bind(&key.key_hash[..])
        .fetch_one(&self.pool)
        .await?)
    }

    /// The active (not revoked) key with this SHA-256, if any. Records the use,
    /// at most once a minute per key, so authentication rarely writes.
    pub async fn verify_api_key(&self, key_hash: &[u8; 32]) -> Result<Option<ApiKey>> {
        Ok(sqlx::query_as(concat!("WITH found AS (
                 SELECT ", key_columns!(), " FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL
             ), touched AS (
                 UPDATE api_keys k SET last_used_at = now()
                 FROM found f
                 WHERE k.id = f.id AND (k.last_used_at IS NULL OR k.last_used_at < now() - interval '1 minute')
             )
             SELECT * FROM found"))
        .bind(&key_hash[..])
        .fetch_optional(&self.pool)
        .await?)
    }

    /// The prefixes of the keys not revoked. Prefixes are not secret, but
    /// random: a token guessed at random carries none of them.
    pub async fn active_api_key_prefixes(&self) -> Result<HashSet<String>> {
        let prefixes: Vec<String> =
            sqlx::query_scalar("SELECT prefix FROM api_keys WHERE revoked_at IS NULL")
                .fetch_all(&self.pool)
                .await?;
        Ok(prefixes.into_iter().collect())
    }

    /// Revoke one key, named by its id or its prefix. A prefix that names
    /// several keys is refused rather than revoking them all.
    /// Whether the key still admits its holder (not revoked, not gone).
    pub async fn api_key_is_active(&self, id: Uuid) -> Result<bool> {
        Ok(
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM api_keys WHERE id = $1 AND revoked_at IS NULL)")
                .bind(id)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    pub async fn revoke_api_key(&self, id_or_prefix: &str) -> Result<ApiKey> {
        refuse_nul("key", id_or_prefix)?;
        let id = Uuid::parse_str(id_or_prefix).ok();
        let mut tx = self.pool.begin().await?;
        let matches: Vec<ApiKey> = sqlx::query_as(concat!(
            "SELECT ",
            key_columns!(),
            " FROM api_keys WHERE id = $1 OR ($1 IS NULL AND prefix = $2) FOR UPDATE"
        ))
        .bind(id)
        .bind(id_or_prefix)
        .fetch_all(&mut *tx)
        .await?;
        let key = match matches.as_slice() {
            [key] => key,
            [] => return Err(QueueError::invalid("key", format!("no key {id_or_prefix:?}"))),
            _ => {
                return Err(QueueError::invalid(
                    "key",
                    format!("{id_or_prefix:?} names several keys; revoke by id"),
                ))
            }
        };
        let revoked = sqlx::query_as(concat!(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1 RETURNING ",
            key_columns!()
        ))
        .bind(key.id)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(revoked)
    }

    /// Every key (of one tenant, or all), newest first.
    pub async fn api_keys(&self, tenant: Option<&str>) -> Result<Vec<ApiKey>> {
        if let Some(tenant) = tenant {
            refuse_nul("tenant", tenant)?;
        }
        Ok(sqlx::query_as(concat!(
            "SELECT ",
            key_columns!(),
            " FROM api_keys WHERE $1::text IS NULL OR tenant = $1 ORDER BY id DESC"
        ))
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?)
    }
}
