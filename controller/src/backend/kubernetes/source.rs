//! WorkerPools from the Kubernetes API: a watch (kube's reflector) keeps a
//! local copy, and a new, deleted or re-specified pool wakes the loop.
//! Status writes do not: they change no `generation`.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use futures::StreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use tokio::sync::Notify;

use super::Publisher;
use crate::error::Location;
use crate::manifest::LoadedPool;
use crate::reconcile::{key_of, PoolSource, RejectedPool};
use crate::spec::WorkerPool;

pub struct WorkerPoolSource {
    store: Store<WorkerPool>,
    changed: Arc<Notify>,
    publisher: Publisher,
    /// Pools already told why they are rejected: (uid, generation) → message.
    rejected: HashMap<(String, i64), String>,
    /// The pools the last load turned away.
    current_rejections: Vec<RejectedPool>,
    watch: tokio::task::JoinHandle<()>,
}

impl Drop for WorkerPoolSource {
    fn drop(&mut self) {
        self.watch.abort();
    }
}

impl WorkerPoolSource {
    /// Watch the WorkerPools of `namespace`, or of every namespace.
    pub fn new(client: Client, namespace: Option<&str>) -> Self {
        let api: Api<WorkerPool> = match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        let (store, writer) = reflector::store();
        let changed = Arc::new(Notify::new());
        let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()).default_backoff());
        let notify = changed.clone();
        let watch = tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            // uid → generation of the pools seen: only spec changes matter.
            let mut seen: HashMap<String, i64> = HashMap::new();
            let mut listing: HashSet<String> = HashSet::new();
            while let Some(event) = stream.next().await {
                let wake = match event {
                    Ok(watcher::Event::Apply(pool)) => note(&mut seen, &pool),
                    Ok(watcher::Event::Delete(pool)) => {
                        seen.remove(&uid(&pool));
                        true
                    }
                    Ok(watcher::Event::Init) => {
                        listing.clear();
                        false
                    }
                    Ok(watcher::Event::InitApply(pool)) => {
                        listing.insert(uid(&pool));
                        note(&mut seen, &pool);
                        false
                    }
                    Ok(watcher::Event::InitDone) => {
                        seen.retain(|uid, _| listing.contains(uid));
                        true
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "WorkerPool watch failed; retrying with backoff");
                        false
                    }
                };
                if wake {
                    notify.notify_one();
                }
            }
        });
        WorkerPoolSource {
            store,
            changed,
            publisher: Publisher::new(client),
            rejected: HashMap::new(),
            current_rejections: Vec::new(),
            watch,
        }
    }
}

/// The pools to run: valid specs, the first (oldest) pool to claim a task
/// type keeps it; the others with why they are rejected.
fn admit(pools: Vec<Arc<WorkerPool>>) -> (Vec<LoadedPool>, Vec<(Arc<WorkerPool>, String)>) {
    let mut pools: Vec<Arc<WorkerPool>> = pools
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    pools.sort_by(|a, b| {
        a.metadata
            .creation_timestamp
            .cmp(&b.metadata.creation_timestamp)
            .then(a.metadata.name.cmp(&b.metadata.name))
    });
    let mut admitted: Vec<LoadedPool> = Vec::new();
    let mut rejections = Vec::new();
    for pool in pools {
        let mut problems: Vec<String> = pool.spec.validate().iter().map(ToString::to_string).collect();
        for task_type in &pool.spec.task_types {
            if let Some(first) = admitted
                .iter()
                .find(|p| p.pool.spec.task_types.contains(task_type))
            {
                problems.push(format!(
                    "spec.taskTypes: {task_type} is already served by WorkerPool {}/{}",
                    first.pool.metadata.namespace.as_deref().unwrap_or_default(),
                    first.name()
                ));
            }
        }
        if problems.is_empty() {
            admitted.push(LoadedPool {
                location: location(&pool),
                pool: (*pool).clone(),
            });
        } else {
            rejections.push((pool, problems.join("; ")));
        }
    }
    (admitted, rejections)
}

/// The WorkerPools the controller would run, listed once (for `controller
/// plan`): the admitted pools, and a line for each rejected one. Writes nothing.
pub async fn list_worker_pools(
    client: Client,
    namespace: Option<&str>,
) -> Result<(Vec<LoadedPool>, Vec<String>), kube::Error> {
    let api: Api<WorkerPool> = match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let listed = api.list(&Default::default()).await?;
    let (admitted, rejections) = admit(listed.items.into_iter().map(Arc::new).collect());
    let rejected = rejections
        .into_iter()
        .map(|(pool, message)| {
            format!(
                "WorkerPool {}: {message}",
                pool.metadata.name.as_deref().unwrap_or_default()
            )
        })
        .collect();
    Ok((admitted, rejected))
}

fn uid(pool: &WorkerPool) -> String {
    pool.metadata.uid.clone().unwrap_or_default()
}

/// Record a pool's generation; whether it is new or its spec changed.
fn note(seen: &mut HashMap<String, i64>, pool: &WorkerPool) -> bool {
    let generation = pool.metadata.generation.unwrap_or_default();
    seen.insert(uid(pool), generation) != Some(generation)
}

fn location(pool: &WorkerPool) -> Location {
    let namespace = pool.metadata.namespace.as_deref().unwrap_or_default();
    let name = pool.metadata.name.clone().unwrap_or_default();
    Location {
        file: PathBuf::from(format!("workerpools.backlog.dev/{namespace}/{name}")),
        line: 0,
        document: 0,
        name: Some(name),
    }
}

impl PoolSource for WorkerPoolSource {
    /// The pools to run: valid specs, the first (oldest) pool to claim a
    /// task type keeps it. The others get `Ready=False, InvalidSpec`.
    async fn load(&mut self) -> Vec<LoadedPool> {
        let (admitted, rejections) = admit(self.store.state());
        self.current_rejections = rejections
            .iter()
            .map(|(pool, message)| RejectedPool {
                key: key_of(&pool.metadata),
                name: pool.metadata.name.clone().unwrap_or_default(),
                message: message.clone(),
            })
            .collect();
        for (pool, message) in rejections {
            let key = (uid(&pool), pool.metadata.generation.unwrap_or_default());
            if self.rejected.get(&key) != Some(&message) {
                tracing::error!(pool = pool.metadata.name.as_deref().unwrap_or_default(), %message, "WorkerPool rejected");
                self.publisher.invalid_spec(&pool, &message).await;
                self.rejected.insert(key, message);
            }
        }
        admitted
    }

    fn rejected(&self) -> Vec<RejectedPool> {
        self.current_rejections.clone()
    }

    async fn changed(&mut self) {
        self.changed.notified().await
    }
}
