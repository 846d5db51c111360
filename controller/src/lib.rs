//! backlog's controller: the WorkerPool spec, its manifests, the pure
//! scaling policy, and a simulator to measure that policy against an
//! HPA/KEDA-style baseline.

pub mod error;
pub mod manifest;
pub mod policy;
pub mod sim;
pub mod spec;

pub use error::Error;
