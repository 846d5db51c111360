//! The local backend: each replica is a process running the pool's command
//! with its own identity. Crashed replicas are restarted with backoff;
//! removed ones get SIGTERM and time to drain.
//!
//! What it starts is written to a state file per pool, so the replicas
//! survive a controller that dies without stopping them (`kill -9`) and the
//! next controller adopts them: counts them, stops them when scaling down or
//! shutting down, and never starts more beside them. Replica ids carry the
//! starting controller's run id, so a new process never takes a live one's id.

mod process;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;
use tokio::time::Instant;

pub use process::ProcessRecord;

use super::{Backend, BackendError, PoolRef, Replica};
use crate::spec::{LocalTarget, Target};

/// Restart delay after the first crash; doubles per crash up to the cap.
const RESTART_BASE: Duration = Duration::from_millis(500);
const RESTART_CAP: Duration = Duration::from_secs(30);
/// How often shutdown checks whether the replicas being stopped are gone.
const SHUTDOWN_POLL: Duration = Duration::from_millis(100);

pub struct LocalBackend {
    pools: Arc<Mutex<HashMap<String, LocalPool>>>,
    /// How long a stopped replica may drain before it is killed.
    stop_grace: Duration,
    /// Where each pool's state file lives.
    state_dir: PathBuf,
    /// This controller's part of the replica ids it gives.
    run: String,
}

struct LocalPool {
    file: PathBuf,
    next_index: u64,
    replicas: BTreeMap<String, LocalReplica>,
    /// Replicas stopped and not exited yet: kept in the state file so a
    /// controller that dies meanwhile waits them out after its restart.
    stopping: BTreeMap<String, ProcessRecord>,
}

struct LocalReplica {
    process: Option<Process>,
    crashes: u32,
    /// When a crashed replica may be started again.
    restart_at: Option<Instant>,
}

enum Process {
    /// Started by this controller.
    Child(Child, ProcessRecord),
    /// Started by an earlier controller and found running.
    Adopted(ProcessRecord),
}

impl Process {
    fn record(&self) -> &ProcessRecord {
        match self {
            Process::Child(_, record) | Process::Adopted(record) => record,
        }
    }

    /// Whether the process has exited (a child is reaped here).
    fn exited(&mut self) -> bool {
        match self {
            Process::Child(child, _) => matches!(child.try_wait(), Ok(Some(_))),
            Process::Adopted(record) => !record.is_alive(),
        }
    }
}

/// A pool's state file: the processes of its replicas, by replica id.
#[derive(Default, Serialize, Deserialize)]
struct StateFile {
    replicas: BTreeMap<String, ProcessRecord>,
    #[serde(default)]
    stopping: BTreeMap<String, ProcessRecord>,
}

impl StateFile {
    /// The file as written, or an empty state when there is none yet.
    fn read(file: &Path) -> Result<StateFile, String> {
        match std::fs::read(file) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", file.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StateFile::default()),
            Err(e) => Err(format!("{}: {e}", file.display())),
        }
    }
}

impl LocalPool {
    /// The pool's state as the file left it: processes still running are
    /// adopted, the others forgotten.
    fn load(file: PathBuf) -> Result<LocalPool, String> {
        let saved = StateFile::read(&file)?;
        let live = |records: BTreeMap<String, ProcessRecord>| -> BTreeMap<String, ProcessRecord> {
            records.into_iter().filter(|(_, r)| r.is_alive()).collect()
        };
        let replicas = live(saved.replicas)
            .into_iter()
            .map(|(id, record)| {
                tracing::info!(replica = %id, pid = record.pid, "adopted a local replica an earlier controller started");
                let replica = LocalReplica {
                    process: Some(Process::Adopted(record)),
                    crashes: 0,
                    restart_at: None,
                };
                (id, replica)
            })
            .collect();
        let pool = LocalPool {
            file,
            next_index: 0,
            replicas,
            stopping: live(saved.stopping),
        };
        pool.save()?;
        Ok(pool)
    }

    /// Write the processes this pool runs, atomically (write, then rename).
    fn save(&self) -> Result<(), String> {
        let state = StateFile {
            replicas: self
                .replicas
                .iter()
                .filter_map(|(id, r)| r.process.as_ref().map(|p| (id.clone(), p.record().clone())))
                .collect(),
            stopping: self.stopping.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&state).map_err(|e| e.to_string())?;
        let dir = self.file.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let temporary = self.file.with_extension("json.tmp");
        std::fs::write(&temporary, bytes)
            .and_then(|()| std::fs::rename(&temporary, &self.file))
            .map_err(|e| format!("{}: {e}", self.file.display()))
    }

    /// `save`, where a failure is logged: the processes run either way, a
    /// controller that dies before the next save may not find them.
    fn save_or_warn(&self) {
        if let Err(e) = self.save() {
            tracing::error!(error = %e, "could not write the local replicas' state file");
        }
    }
}

impl LocalBackend {
    /// `state_dir` holds one state file per pool; controllers of the same
    /// database and pools must share it, and no others.
    pub fn new(stop_grace: Duration, state_dir: PathBuf) -> Self {
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        LocalBackend {
            pools: Arc::new(Mutex::new(HashMap::new())),
            stop_grace,
            state_dir,
            run: base36(millis),
        }
    }

    /// The default state directory for a database: under the system's
    /// temporary directory, named after the database's host, port and name
    /// (never its credentials).
    pub fn default_state_dir(database_url: &str) -> PathBuf {
        let rest = database_url.split_once("://").map_or(database_url, |(_, r)| r);
        let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
        let rest = rest.split('?').next().unwrap_or_default();
        std::env::temp_dir()
            .join("backlog-controller")
            .join(file_name(rest))
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

    fn state_file(&self, pool: &str) -> PathBuf {
        self.state_dir.join(format!("{}.json", file_name(pool)))
    }

    /// The pool's state, loaded from its file (adopting what runs) the first
    /// time the pool is seen.
    fn pool<'a>(
        &self,
        pools: &'a mut HashMap<String, LocalPool>,
        name: &str,
    ) -> Result<&'a mut LocalPool, BackendError> {
        if !pools.contains_key(name) {
            let loaded = LocalPool::load(self.state_file(name)).map_err(|message| BackendError::Failed {
                pool: name.to_string(),
                message: format!("local state file: {message}"),
            })?;
            for (id, record) in &loaded.stopping {
                // Stopped by the earlier controller: SIGTERM was sent (a
                // second one would end its drain), so only wait it out.
                self.forget_when_stopped(name, id, None, record.clone());
            }
            pools.insert(name.to_string(), loaded);
        }
        Ok(pools.get_mut(name).expect("inserted above"))
    }

    fn spawn(pool: PoolRef<'_>, target: &LocalTarget, id: &str) -> Result<Process, BackendError> {
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
            // A process group of its own: Ctrl-C in the terminal signals the
            // controller's group only, and the controller then stops each
            // worker with one SIGTERM (a second signal would end its drain).
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| BackendError::Failed {
                pool: pool.name.to_string(),
                message: format!("cannot start {program:?}: {e}"),
            })?;
        let pid = child.id().unwrap_or_default();
        // A process already gone gets a record that matches nothing.
        let record = ProcessRecord::started(pid, target.command.clone()).unwrap_or(ProcessRecord {
            pid,
            start_ticks: 0,
            boot_id: String::new(),
            cmdline: Vec::new(),
        });
        tracing::info!(pool = pool.name, replica = id, pid, "started local replica");
        Ok(Process::Child(child, record))
    }

    /// A replica id no process of the pool has.
    fn new_id(&self, pool: &str, state: &mut LocalPool) -> String {
        loop {
            state.next_index += 1;
            let id = format!("{pool}-{}-{}", self.run, state.next_index);
            if !state.replicas.contains_key(&id) && !state.stopping.contains_key(&id) {
                return id;
            }
        }
    }

    /// Stop a replica's process in the background (SIGTERM, then SIGKILL
    /// after the grace), listed as stopping until it has exited.
    fn stop(&self, pool: &str, state: &mut LocalPool, id: String, process: Process) {
        let record = process.record().clone();
        let child = match process {
            Process::Child(child, _) => {
                // Our child, not reaped yet: its pid is still its own.
                if let Some(pid) = child.id() {
                    // SAFETY: kill(2) with our child's pid and a valid signal.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
                }
                Some(child)
            }
            Process::Adopted(_) => {
                record.signal(libc::SIGTERM);
                None
            }
        };
        state.stopping.insert(id.clone(), record.clone());
        self.forget_when_stopped(pool, &id, child, record);
    }

    /// Wait for a stopped process to exit (killing it after the grace), then
    /// drop it from the pool's stopping list and state file.
    fn forget_when_stopped(&self, pool: &str, id: &str, child: Option<Child>, record: ProcessRecord) {
        let (pools, grace) = (self.pools.clone(), self.stop_grace);
        let (pool, id) = (pool.to_string(), id.to_string());
        tokio::spawn(async move {
            // The exit status of our own children (adopted ones are not ours to reap).
            let (in_time, status) = match child {
                Some(mut child) => match tokio::time::timeout(grace, child.wait()).await {
                    Ok(status) => (true, status.ok()),
                    Err(_) => {
                        let _ = child.kill().await;
                        (false, None)
                    }
                },
                None => (record.wait_or_kill(grace).await, None),
            };
            if in_time {
                let exit = status.map_or_else(|| "unknown".to_string(), |s| s.to_string());
                tracing::info!(pool = %pool, replica = %id, %exit, "local replica stopped");
            } else {
                tracing::warn!(pool = %pool, replica = %id, grace_s = grace.as_secs_f64(),
                    "replica did not stop in time; killed it");
            }
            let mut pools = pools.lock().await;
            if let Some(state) = pools.get_mut(&pool) {
                if state.stopping.get(&id) == Some(&record) {
                    state.stopping.remove(&id);
                    state.save_or_warn();
                }
            }
        });
    }
}

/// A name safe as a file name: letters, digits, `.`, `-`; anything else `_`.
fn file_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn base36(mut n: u128) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ascii digits")
}

impl Backend for LocalBackend {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn observe(&self, pool: PoolRef<'_>) -> Result<Vec<Replica>, BackendError> {
        let target = Self::target(pool)?;
        let mut pools = self.pools.lock().await;
        let state = self.pool(&mut pools, pool.name)?;
        let now = Instant::now();
        let mut changed = false;
        let mut replicas = Vec::with_capacity(state.replicas.len());
        for (id, replica) in state.replicas.iter_mut() {
            if replica.process.as_mut().is_some_and(Process::exited) {
                replica.crashes += 1;
                let delay = RESTART_BASE
                    .saturating_mul(1 << replica.crashes.min(16))
                    .min(RESTART_CAP);
                tracing::warn!(pool = pool.name, replica = %id, restart_in_s = delay.as_secs_f64(),
                    "local replica exited unexpectedly; restarting it");
                replica.process = None;
                replica.restart_at = Some(now + delay);
                changed = true;
            }
            if replica.process.is_none()
                && replica.restart_at.is_some_and(|at| at <= now)
                && pool.leadership.is_held()
            {
                match Self::spawn(pool, target, id) {
                    Ok(process) => {
                        replica.process = Some(process);
                        replica.restart_at = None;
                        changed = true;
                    }
                    Err(e) => tracing::warn!(error = %e, "restart failed; trying again later"),
                }
            }
            // A crashed replica still counts as current (it is being
            // restarted), just not ready — as a crash-looping pod would.
            replicas.push(Replica {
                id: id.clone(),
                ready: replica.process.is_some(),
            });
        }
        if changed {
            state.save_or_warn();
        }
        Ok(replicas)
    }

    /// The replicas the pool's state file records that still run, read
    /// without adopting, restarting or writing anything. (A replica that
    /// crashed and awaits its restart is not in the file: `observe` counts
    /// it as current and not ready.)
    async fn inspect(&self, pool: PoolRef<'_>) -> Result<Vec<Replica>, BackendError> {
        Self::target(pool)?;
        let saved = StateFile::read(&self.state_file(pool.name)).map_err(|message| BackendError::Failed {
            pool: pool.name.to_string(),
            message: format!("local state file: {message}"),
        })?;
        Ok(saved
            .replicas
            .into_iter()
            .filter(|(_, record)| record.is_alive())
            .map(|(id, _)| Replica { id, ready: true })
            .collect())
    }

    async fn add(&self, pool: PoolRef<'_>, count: u32) -> Result<Vec<String>, BackendError> {
        let target = Self::target(pool)?;
        let mut pools = self.pools.lock().await;
        let state = self.pool(&mut pools, pool.name)?;
        let mut started = Vec::with_capacity(count as usize);
        let mut result = Ok(());
        for _ in 0..count {
            if let Err(lost) = pool.check_leading("starting a replica") {
                result = Err(lost);
                break;
            }
            let id = self.new_id(pool.name, state);
            match Self::spawn(pool, target, &id) {
                Ok(process) => {
                    let replica = LocalReplica {
                        process: Some(process),
                        crashes: 0,
                        restart_at: None,
                    };
                    state.replicas.insert(id.clone(), replica);
                    started.push(id);
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        // Recorded before anything else can happen to this controller.
        state.save_or_warn();
        result.map(|()| started)
    }

    async fn remove(&self, pool: PoolRef<'_>, ids: &[String]) -> Result<Vec<String>, BackendError> {
        let mut pools = self.pools.lock().await;
        let state = self.pool(&mut pools, pool.name)?;
        let mut removed = Vec::with_capacity(ids.len());
        for id in ids {
            if pool.check_leading("stopping a replica").is_err() {
                break;
            }
            if let Some(replica) = state.replicas.remove(id) {
                if let Some(process) = replica.process {
                    self.stop(pool.name, state, id.clone(), process);
                }
                removed.push(id.clone());
            }
        }
        state.save_or_warn();
        Ok(removed)
    }

    async fn shutdown(&self) {
        let deadline = Instant::now() + self.stop_grace + SHUTDOWN_POLL * 10;
        {
            let mut pools = self.pools.lock().await;
            // Pools whose manifests went away still have their files: their
            // processes are stopped too.
            let files: Vec<String> = std::fs::read_dir(&self.state_dir)
                .map(|dir| {
                    dir.flatten()
                        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".json").map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            for name in files {
                if pools.keys().any(|pool| file_name(pool) == name) {
                    continue;
                }
                if let Err(e) = self.pool(&mut pools, &name) {
                    tracing::warn!(error = %e, "could not read a pool's local state");
                }
            }
            let mut stopping = 0;
            for (name, state) in pools.iter_mut() {
                for (id, replica) in std::mem::take(&mut state.replicas) {
                    if let Some(process) = replica.process {
                        self.stop(name, state, id, process);
                        stopping += 1;
                    }
                }
                state.save_or_warn();
            }
            tracing::info!(replicas = stopping, "stopping local replicas");
        }
        // Each stop forgets its replica once it has exited or was killed.
        loop {
            let left: usize = self.pools.lock().await.values().map(|p| p.stopping.len()).sum();
            if left == 0 || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(SHUTDOWN_POLL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{base36, LocalBackend};

    #[test]
    fn the_default_state_dir_names_the_database_without_its_credentials() {
        let dir =
            LocalBackend::default_state_dir("postgres://user:secret@db.example:5432/backlog?sslmode=require");
        let name = dir.file_name().unwrap().to_str().unwrap();
        assert_eq!(name, "db.example_5432_backlog");
        assert!(!dir.to_string_lossy().contains("secret"));
    }

    #[test]
    fn run_ids_are_base36() {
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36 * 36 + 1), "101");
    }
}
