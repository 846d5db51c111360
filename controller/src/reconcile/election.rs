//! Which of several controllers acts: the election trait, and the
//! PostgreSQL advisory lock that elects everywhere but Kubernetes (where
//! [`crate::backend::kubernetes::LeaseElection`] holds a Lease).

use std::future::Future;
use std::time::Duration;

use queue::Queue;

use super::Leadership;
use tokio_util::sync::CancellationToken;

/// How one controller of several becomes the one that acts.
pub trait Election: Send {
    /// Wait until this controller leads. `false`: shut down before that.
    fn acquire(&mut self, shutdown: &CancellationToken) -> impl Future<Output = anyhow::Result<bool>> + Send;

    /// Whether this controller still leads; asked before every pass.
    fn still_held(&mut self) -> impl Future<Output = bool> + Send;

    /// The flag passes and backends check before each write. An election
    /// that learns of its loss on its own, between rounds (a Lease not
    /// renewed within its deadline), clears it then, so a pass in flight
    /// stops before a standby can take over, however long the tick. The
    /// default keeps nothing: the run loop clears it at its next round.
    fn share(&mut self, _leadership: Leadership) {}

    /// Step down so a standby can take over at once.
    fn release(self) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// Leader election with a PostgreSQL advisory lock, for everywhere but
/// Kubernetes: the lock lives as long as the leader's database session.
pub struct AdvisoryLock {
    queue: Queue,
    key: i64,
    retry: Duration,
    held: Option<queue::Leadership>,
}

impl AdvisoryLock {
    pub fn new(queue: Queue, key: i64, retry: Duration) -> Self {
        AdvisoryLock {
            queue,
            key,
            retry,
            held: None,
        }
    }
}

impl Election for AdvisoryLock {
    async fn acquire(&mut self, shutdown: &CancellationToken) -> anyhow::Result<bool> {
        loop {
            match self.queue.try_lead(self.key).await {
                Ok(Some(lead)) => {
                    self.held = Some(lead);
                    return Ok(true);
                }
                Ok(None) => tracing::info!("standby: another controller is the leader; waiting"),
                // A database restarting: try again rather than exit.
                Err(e) if e.is_transient() => {
                    tracing::warn!(error = %e, "standby: the database cannot be reached; waiting")
                }
                // Any other refusal too (too many connections for the
                // role, a database being recreated, a password rotated):
                // a leader whose lock session died waits here, and exiting
                // would take the local backend's workers down with it,
                // busy or not. The error says what to fix.
                Err(e) => {
                    tracing::error!(error = %e, "standby: the database refuses the leader election; waiting")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(false),
                _ = tokio::time::sleep(self.retry) => {}
            }
        }
    }

    async fn still_held(&mut self) -> bool {
        match self.held.as_mut() {
            Some(lead) => lead.still_held().await,
            None => false,
        }
    }

    async fn release(self) -> anyhow::Result<()> {
        if let Some(lead) = self.held {
            lead.release().await?;
        }
        Ok(())
    }
}
