//! Where replicas run. Every backend answers the same three questions —
//! which replicas exist, start more, stop these — and the reconciler decides
//! which ones, so the drain protocol is the same everywhere.

pub mod fly;
pub mod kubernetes;
pub mod local;

use std::future::Future;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

use crate::manifest::LoadedPool;
use crate::policy::Decision;
use crate::reconcile::{Leadership, PassError};
use crate::spec::{WorkerPoolSpec, WorkerPoolStatus};

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
    /// The workload the pool scales does not exist (yet).
    #[error("pool {pool}: target {target} not found")]
    TargetNotFound { pool: String, target: String },
    /// Another controller may lead now: this one acts on nothing more.
    #[error("pool {pool}: leadership lost before {action}; left to the new leader")]
    LostLeadership { pool: String, action: &'static str },
}

impl BackendError {
    /// The CamelCase reason of the pool's `Ready=False` condition and of its Event.
    pub fn reason(&self) -> &'static str {
        match self {
            BackendError::Failed { .. } => "BackendError",
            BackendError::WrongTarget { .. } => "WrongTarget",
            BackendError::TargetNotFound { .. } => "TargetNotFound",
            BackendError::Unauthorized { .. } => "Unauthorized",
            BackendError::LostLeadership { .. } => "LostLeadership",
        }
    }
}

/// A pool, as handed to a backend, with the leadership it is acted on
/// under.
#[derive(Debug, Clone, Copy)]
pub struct PoolRef<'a> {
    pub name: &'a str,
    /// The WorkerPool's metadata: namespace, uid and generation on
    /// Kubernetes; only the name for pools from files.
    pub metadata: &'a ObjectMeta,
    pub spec: &'a WorkerPoolSpec,
    /// Whether this controller still leads. A backend asks before each
    /// write it makes ([`PoolRef::check_leading`]), not once per call: one
    /// call can make many (a Fly scale-up starts machines one by one), and
    /// a former leader's later writes would undo the new leader's.
    pub leadership: &'a Leadership,
}

impl<'a> PoolRef<'a> {
    pub fn new(loaded: &'a LoadedPool, leadership: &'a Leadership) -> Self {
        PoolRef {
            name: loaded.name(),
            metadata: &loaded.pool.metadata,
            spec: &loaded.pool.spec,
            leadership,
        }
    }

    pub fn namespace(&self) -> Option<&'a str> {
        self.metadata.namespace.as_deref()
    }

    /// `Err(LostLeadership)` once this controller no longer leads: the
    /// write about to be made (`action`) is left to the new leader.
    pub fn check_leading(&self, action: &'static str) -> Result<(), BackendError> {
        if self.leadership.is_held() {
            Ok(())
        } else {
            Err(BackendError::LostLeadership {
                pool: self.name.to_string(),
                action,
            })
        }
    }
}

/// What one pool's pass did, handed to [`Backend::pass_finished`].
#[derive(Debug, Clone, Copy)]
pub struct PassOutcome<'a> {
    /// The pool's status after the pass (`Ready=False` with the error's
    /// reason when the pass failed).
    pub status: &'a WorkerPoolStatus,
    /// The policy's decision, when the pass got that far.
    pub decision: Option<&'a Decision>,
    /// Why the pass failed, if it did.
    pub error: Option<&'a PassError>,
    /// Replicas removed by this pass (drained and idle).
    pub removed: &'a [String],
}

pub trait Backend: Send + Sync {
    /// The name used in logs and metrics: `local`, `kubernetes`, `fly`.
    fn name(&self) -> &'static str;

    /// The pool's replicas, including ones still starting.
    fn observe(&self, pool: PoolRef<'_>) -> impl Future<Output = Result<Vec<Replica>, BackendError>> + Send;

    /// The pool's replicas as [`Backend::observe`] would find them, changing
    /// nothing: no restarts, no writes, nothing remembered. `controller
    /// plan` uses it, under a leadership never held, so a write `observe`
    /// would make is refused. The default is `observe`, for backends whose
    /// observation only reads.
    fn inspect(&self, pool: PoolRef<'_>) -> impl Future<Output = Result<Vec<Replica>, BackendError>> + Send {
        self.observe(pool)
    }

    /// Start `count` more replicas. Returns the ids of the replicas started,
    /// where the backend knows them before they run (a restarted Fly
    /// machine, a StatefulSet ordinal): a name that comes back may still
    /// carry a draining mark, which the reconciler clears.
    fn add(
        &self,
        pool: PoolRef<'_>,
        count: u32,
    ) -> impl Future<Output = Result<Vec<String>, BackendError>> + Send;

    /// Why no replica of the pool can be removed right now (a Deployment
    /// mid-rollout), or `None`. Asked before a scale-down drains anything,
    /// so a removal that cannot happen takes no replica out of service;
    /// [`Backend::remove`] still checks for itself, since the answer can
    /// change in between.
    fn removal_blocked(
        &self,
        _pool: PoolRef<'_>,
    ) -> impl Future<Output = Result<Option<String>, BackendError>> + Send {
        async { Ok(None) }
    }

    /// Stop these replicas, or fewer, and return the ones stopped. The
    /// reconciler only passes replicas it has drained (marked draining in
    /// the registry while holding no task) and puts back to work any it
    /// gets not back (a Fly machine leased by someone else, a StatefulSet
    /// pod that is not its highest ordinal).
    fn remove(
        &self,
        pool: PoolRef<'_>,
        ids: &[String],
    ) -> impl Future<Output = Result<Vec<String>, BackendError>> + Send;

    /// Adds what only the backend knows to the status of a pass that
    /// succeeded, before it is published (the Fly backend's `Degraded`
    /// condition when it replaced failed machines).
    fn amend_status(&self, _pool: PoolRef<'_>, _status: &mut WorkerPoolStatus, _now: &Time) {}

    /// Called after every pass over a pool, whether it succeeded or not, so
    /// a backend can publish what happened where its operators look (the
    /// Kubernetes backend writes the WorkerPool's status and Events).
    /// Failures here are the backend's to log: they never fail the pass.
    fn pass_finished(
        &self,
        _pool: PoolRef<'_>,
        _outcome: PassOutcome<'_>,
    ) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Leadership won (again): forget what was learnt of the targets while
    /// another controller led. Its changes are a leader's, not someone's
    /// by hand, and must not be set back.
    fn take_office(&self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// The controller is stopping: release what the backend holds (the local
    /// backend stops its child processes; remote backends leave replicas be).
    fn shutdown(&self) -> impl Future<Output = ()> + Send;
}
