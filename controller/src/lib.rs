//! backlog's controller: the WorkerPool spec, its manifests, the pure
//! scaling policy, the reconcile loop with its backends, and a simulator to
//! measure the policy against an HPA/KEDA-style baseline.

pub mod backend;
pub mod error;
pub mod manifest;
pub mod metrics;
pub mod policy;
pub mod reconcile;
pub mod sim;
pub mod spec;

pub use error::Error;
