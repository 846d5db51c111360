//! The Fly backend: a pool is a process group of a Fly app, and its replicas
//! are the group's running machines. Scale-up starts stopped machines before
//! creating clones; scale-down stops the drained machines under their leases
//! and destroys stopped ones beyond `maxStopped`, oldest first, keeping
//! one as the template of a pool without one. Failed machines are
//! destroyed and replaced, and the pool's `Degraded` condition says so.

mod backend;
pub mod client;

pub use backend::{FlyBackend, FlySettings};
pub use client::{FlyClient, FlyError, RetryPolicy, Token};
