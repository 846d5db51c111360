//! Where replicas run. Every backend answers the same three questions —
//! which replicas exist, start more, stop these — and the reconciler decides
//! which ones, so the drain protocol is the same everywhere.

pub mod fly;
pub mod local;

use std::future::Future;

use crate::spec::WorkerPoolSpec;

/// One worker replica as its backend sees it. `id` is the identity the
/// worker registers under (`WORKER_ID`, `POD_NAME` or `FLY_MACHINE_ID`),
/// which is how busy replicas are matched to the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub id: String,
    /// Up and able to take work (not starting, not crashed).
    pub ready: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("pool {pool}: {message}")]
    Failed { pool: String, message: String },
    /// The platform rejected the controller's credentials (401/403): nothing
    /// else is attempted for the pool until they change.
    #[error("pool {pool}: credentials rejected: {message}")]
    Unauthorized { pool: String, message: String },
    #[error("pool {pool}: target is {target}, but this controller runs the {backend} backend")]
    WrongTarget {
        pool: String,
        target: &'static str,
        backend: &'static str,
    },
}

/// A pool, as handed to a backend.
#[derive(Debug, Clone, Copy)]
pub struct PoolRef<'a> {
    pub name: &'a str,
    pub spec: &'a WorkerPoolSpec,
}

pub trait Backend: Send + Sync {
    /// The name used in logs and metrics: `local`, `kubernetes`, `fly`.
    fn name(&self) -> &'static str;

    /// The pool's replicas, including ones still starting.
    fn observe(&self, pool: PoolRef<'_>) -> impl Future<Output = Result<Vec<Replica>, BackendError>> + Send;

    /// Start `count` more replicas.
    fn add(&self, pool: PoolRef<'_>, count: u32) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Stop exactly these replicas. The reconciler only passes replicas it
    /// has drained: marked draining in the registry while holding no task.
    fn remove(
        &self,
        pool: PoolRef<'_>,
        ids: &[String],
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// The controller is stopping: release what the backend holds (the local
    /// backend stops its child processes; remote backends leave replicas be).
    fn shutdown(&self) -> impl Future<Output = ()> + Send;
}
