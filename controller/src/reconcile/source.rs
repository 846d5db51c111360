//! Where the run loop gets its pools: YAML files or folders
//! ([`ManifestSource`]) or WorkerPool objects on Kubernetes
//! ([`crate::backend::kubernetes::WorkerPoolSource`]).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::manifest::{self, LoadedPool};

/// Where pools come from outside Kubernetes: a YAML file or folder,
/// re-read when anything in it changes.
pub struct ManifestSource {
    path: PathBuf,
    stamp: Option<Vec<(PathBuf, SystemTime)>>,
    pools: Vec<LoadedPool>,
    /// The pools the last load turned away.
    rejected: Vec<RejectedPool>,
}

/// A pool its source turned away, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedPool {
    /// Its key as an admitted pool's ([`super::pool_key`]): `namespace/name`
    /// on Kubernetes, the name elsewhere.
    pub key: String,
    pub name: String,
    /// What is wrong with it, in the words of the error.
    pub message: String,
}

impl ManifestSource {
    pub fn new(path: PathBuf) -> Self {
        ManifestSource {
            path,
            stamp: None,
            pools: Vec::new(),
            rejected: Vec::new(),
        }
    }

    /// The current pools, reloading when a file changed. A manifest with
    /// errors is reported and skipped; the other pools keep running.
    pub fn pools(&mut self) -> &[LoadedPool] {
        let stamp = stamp(&self.path);
        if self.stamp.as_ref() != Some(&stamp) {
            let loaded = manifest::load(&self.path);
            for error in &loaded.errors {
                tracing::error!(error = %error, "manifest rejected");
            }
            let names: Vec<&str> = loaded.pools.iter().map(|p| p.name()).collect();
            tracing::info!(path = %self.path.display(), pools = ?names, "loaded WorkerPools");
            // A document without a name cannot be reported as a pool.
            self.rejected = loaded
                .errors
                .iter()
                .filter_map(|error| {
                    let name = error.location()?.name.clone()?;
                    Some(RejectedPool {
                        key: name.clone(),
                        name,
                        message: error.to_string(),
                    })
                })
                .collect();
            self.pools = loaded.pools;
            self.stamp = Some(stamp);
        }
        &self.pools
    }
}

fn stamp(path: &Path) -> Vec<(PathBuf, SystemTime)> {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut out = Vec::new();
    if let Some(t) = modified(path) {
        out.push((path.to_path_buf(), t));
    }
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            if let Some(t) = modified(&entry.path()) {
                out.push((entry.path(), t));
            }
        }
    }
    out.sort();
    out
}

/// A source of pools for the run loop.
pub trait PoolSource: Send {
    /// The pools to reconcile now.
    fn load(&mut self) -> impl Future<Output = Vec<LoadedPool>> + Send;

    /// The pools the last `load` turned away (an invalid spec, a task type
    /// another pool serves): no pass runs for them; `/metrics` and
    /// `GET /v1/pools` report them `Ready=False`, so the alert on that fires.
    fn rejected(&self) -> Vec<RejectedPool>;

    /// Resolves when the pools changed, so a pass should run now. Sources
    /// re-read on every pass never resolve.
    fn changed(&mut self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }
}

impl PoolSource for ManifestSource {
    async fn load(&mut self) -> Vec<LoadedPool> {
        self.pools().to_vec()
    }

    fn rejected(&self) -> Vec<RejectedPool> {
        self.rejected.clone()
    }
}
