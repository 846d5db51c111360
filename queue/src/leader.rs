//! One controller acts at a time: a session-level PostgreSQL advisory lock,
//! held on a dedicated connection for as long as the leader lives. If the
//! leader dies, its connection closes and the lock is free.

use sqlx::{Connection, PgConnection};

use crate::error::Result;
use crate::Queue;

/// Held leadership. Dropping it closes its connection, which frees the lock.
pub struct Leadership {
    /// Detached from the pool, so the lock can never leak back into it.
    conn: PgConnection,
}

impl Queue {
    /// Try once to become the leader for `key`. `None` means another
    /// process holds it.
    pub async fn try_lead(&self, key: i64) -> Result<Option<Leadership>> {
        let mut conn = self.pool.acquire().await?.detach();
        let won: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut conn)
            .await?;
        Ok(won.then_some(Leadership { conn }))
    }
}

impl Leadership {
    /// True while the lock's session is alive; a failed check means the
    /// lock may be gone, so the holder must step down.
    pub async fn still_held(&mut self) -> bool {
        self.conn.ping().await.is_ok()
    }

    /// Give leadership up now.
    pub async fn release(self) -> Result<()> {
        self.conn.close().await?;
        Ok(())
    }
}
