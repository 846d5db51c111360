//! The local backend: each replica is a child process running the pool's
//! command with its own identity. Crashed replicas are restarted with
//! backoff; removed ones get SIGTERM and time to drain.

use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::{Backend, BackendError, PoolRef, Replica};
use crate::spec::{LocalTarget, Target};

/// Restart delay after the first crash; doubles per crash up to the cap.
const RESTART_BASE: Duration = Duration::from_millis(500);
const RESTART_CAP: Duration = Duration::from_secs(30);

pub struct LocalBackend {
    pools: Mutex<HashMap<String, LocalPool>>,
    /// How long a stopped replica may drain before it is killed.
    stop_grace: Duration,
}

#[derive(Default)]
struct LocalPool {
    next_index: u64,
    replicas: BTreeMap<String, LocalReplica>,
}

struct LocalReplica {
    child: Option<Child>,
    crashes: u32,
    /// When a crashed replica may be started again.
    restart_at: Option<Instant>,
}

impl LocalBackend {
    pub fn new(stop_grace: Duration) -> Self {
        LocalBackend {
            pools: Mutex::new(HashMap::new()),
            stop_grace,
        }
    }

    fn target<'a>(pool: PoolRef<'a>) -> Result<&'a LocalTarget, BackendError> {
        match &pool.spec.target {
            Target::Local(local) => Ok(local),
            other => Err(BackendError::WrongTarget {
                pool: pool.name.to_string(),
                target: other.backend(),
                backend: "local",
            }),
        }
    }

    fn spawn(pool: PoolRef<'_>, target: &LocalTarget, id: &str) -> Result<Child, BackendError> {
        let (program, args) = target.command.split_first().ok_or_else(|| BackendError::Failed {
            pool: pool.name.to_string(),
            message: "target.local.command is empty".into(),
        })?;
        let task_types: Vec<&str> = pool.spec.task_types.iter().map(|t| t.as_str()).collect();
        let child = Command::new(program)
            .args(args)
            .envs(&target.env)
            .env("WORKER_ID", id)
            .env("WORKER_POOL", pool.name)
            .env("WORKER_TASK_TYPES", task_types.join(","))
            .env("WORKER_CONCURRENCY", pool.spec.tasks_per_replica.to_string())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| BackendError::Failed {
                pool: pool.name.to_string(),
                message: format!("cannot start {program:?}: {e}"),
            })?;
        tracing::info!(
            pool = pool.name,
            replica = id,
            pid = child.id(),
            "started local replica"
        );
        Ok(child)
    }
}

/// SIGTERM, then SIGKILL if the process has not exited within `grace`.
async fn stop(mut child: Child, id: String, grace: Duration) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) with a pid we own and a valid signal number.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => tracing::info!(replica = %id, ?status, "local replica stopped"),
        Err(_) => {
            tracing::warn!(replica = %id, grace_s = grace.as_secs_f64(), "replica did not stop in time; killing it");
            let _ = child.kill().await;
        }
    }
}

impl Backend for LocalBackend {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn observe(&self, pool: PoolRef<'_>) -> Result<Vec<Replica>, BackendError> {
        let target = Self::target(pool)?;
        let mut pools = self.pools.lock().await;
        let state = pools.entry(pool.name.to_string()).or_default();
        let now = Instant::now();
        let mut replicas = Vec::with_capacity(state.replicas.len());
        for (id, replica) in state.replicas.iter_mut() {
            if let Some(child) = replica.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    replica.crashes += 1;
                    let delay = RESTART_BASE
                        .saturating_mul(1 << replica.crashes.min(16))
                        .min(RESTART_CAP);
                    tracing::warn!(pool = pool.name, replica = %id, %status, restart_in_s = delay.as_secs_f64(),
                        "local replica exited unexpectedly; restarting it");
                    replica.child = None;
                    replica.restart_at = Some(now + delay);
                }
            }
            if replica.child.is_none() && replica.restart_at.is_some_and(|at| at <= now) {
                match Self::spawn(pool, target, id) {
                    Ok(child) => {
                        replica.child = Some(child);
                        replica.restart_at = None;
                    }
                    Err(e) => tracing::warn!(error = %e, "restart failed; trying again later"),
                }
            }
            // A crashed replica still counts as current (it is being
            // restarted), just not ready — as a crash-looping pod would.
            replicas.push(Replica {
                id: id.clone(),
                ready: replica.child.is_some(),
            });
        }
        Ok(replicas)
    }

    async fn add(&self, pool: PoolRef<'_>, count: u32) -> Result<(), BackendError> {
        let target = Self::target(pool)?;
        let mut pools = self.pools.lock().await;
        let state = pools.entry(pool.name.to_string()).or_default();
        for _ in 0..count {
            state.next_index += 1;
            let id = format!("{}-{}", pool.name, state.next_index);
            let child = Self::spawn(pool, target, &id)?;
            state.replicas.insert(
                id,
                LocalReplica {
                    child: Some(child),
                    crashes: 0,
                    restart_at: None,
                },
            );
        }
        Ok(())
    }

    async fn remove(&self, pool: PoolRef<'_>, ids: &[String]) -> Result<Vec<String>, BackendError> {
        let mut pools = self.pools.lock().await;
        let Some(state) = pools.get_mut(pool.name) else {
            return Ok(Vec::new());
        };
        let mut removed = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(replica) = state.replicas.remove(id) {
                if let Some(child) = replica.child {
                    tokio::spawn(stop(child, id.clone(), self.stop_grace));
                }
                removed.push(id.clone());
            }
        }
        Ok(removed)
    }

    async fn shutdown(&self) {
        let mut pools = self.pools.lock().await;
        let stops: Vec<_> = pools
            .values_mut()
            .flat_map(|p| std::mem::take(&mut p.replicas))
            .filter_map(|(id, r)| r.child.map(|c| stop(c, id, self.stop_grace)))
            .collect();
        tracing::info!(replicas = stops.len(), "stopping local replicas");
        futures::future::join_all(stops).await;
    }
}
