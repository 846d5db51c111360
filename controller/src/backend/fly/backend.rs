//! The `Backend` impl over [`FlyClient`].

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use tokio::sync::Mutex;

use super::client::{
    CreateMachine, FlyClient, FlyError, ListFilter, Machine, MachineConfig, MachineGuest, MachineInit,
    StopMachine,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::backend::{Backend, BackendError, PoolRef, Replica};
use crate::spec::{ConditionType, FlyTarget, Target, WorkerPoolStatus};

/// Machine metadata flyctl reads to place a machine in a process group.
pub const PROCESS_GROUP_KEY: &str = "fly_process_group";
pub const PLATFORM_VERSION_KEY: &str = "fly_platform_version";

/// States that count as a replica: running or on the way there
/// (`creating`: a new machine being initialised, before `created`).
const ACTIVE_STATES: &[&str] = &[
    "creating",
    "starting",
    "started",
    "restarting",
    "updating",
    "replacing",
];
/// States a machine can be started from. `created` is one: Fly keeps a
/// machine there until someone starts it (created with `skip_launch`, or a
/// launch that never began), so counting it as a replica would hold the
/// pool at a count that runs nothing, with its tasks queued for good. A
/// machine this backend creates leaves `created` within the pass that
/// created it, which waits for it to start.
const STARTABLE_STATES: &[&str] = &["stopped", "suspended", "created"];
/// States a stop leaves a machine in, or that need no stop at all.
const STOPPED_STATES: &[&str] = &[
    "stopping",
    "stopped",
    "suspending",
    "suspended",
    "destroying",
    "destroyed",
];
/// A machine that "encountered an error and could not start successfully"
/// (Fly's machine states): it is destroyed, and others take its place.
const FAILED_STATE: &str = "failed";
/// How long `Degraded` stays True after failed machines were replaced.
const DEGRADED_SECONDS: i64 = 600;

#[derive(Debug, Clone)]
pub struct FlySettings {
    /// Sent as the stop `timeout`: how long the worker may drain after SIGTERM.
    pub stop_timeout: Duration,
    /// How long to wait for a machine to reach the state asked for.
    pub wait_timeout: Duration,
    /// Lease TTL for each mutation.
    pub lease_ttl: Duration,
    /// The app of pools that name none: the one this controller runs in
    /// (`FLY_APP_NAME`).
    pub own_app: Option<String>,
}

impl Default for FlySettings {
    fn default() -> Self {
        FlySettings {
            stop_timeout: Duration::from_secs(60),
            wait_timeout: Duration::from_secs(60),
            lease_ttl: Duration::from_secs(120),
            own_app: None,
        }
    }
}

pub struct FlyBackend {
    client: FlyClient,
    settings: FlySettings,
    /// Per pool: where the next created machine goes (round-robin).
    next_region: Mutex<HashMap<String, usize>>,
    /// Per pool: failed machines destroyed, for the `Degraded` condition.
    replaced: std::sync::Mutex<HashMap<String, Replacements>>,
}

/// Failed machines a pool's passes destroyed.
#[derive(Default)]
struct Replacements {
    /// Destroyed since the status last said so.
    unreported: Vec<String>,
    /// The last ones reported, and the pass that reported them.
    last: Option<(Vec<String>, Time)>,
}

/// A lease taken, or the reason the machine was skipped.
enum Leased {
    Held(String),
    Skipped,
}

impl FlyBackend {
    pub fn new(client: FlyClient, settings: FlySettings) -> Self {
        FlyBackend {
            client,
            settings,
            next_region: Mutex::new(HashMap::new()),
            replaced: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The pool's target, its app filled in when it names none.
    fn target<'a>(&self, pool: PoolRef<'a>) -> Result<Cow<'a, FlyTarget>, BackendError> {
        let fly = match &pool.spec.target {
            Target::Fly(fly) => fly,
            other => {
                return Err(BackendError::WrongTarget {
                    pool: pool.name.to_string(),
                    target: other.backend(),
                    backend: "fly",
                })
            }
        };
        if !fly.app.is_empty() {
            return Ok(Cow::Borrowed(fly));
        }
        match &self.settings.own_app {
            Some(app) => Ok(Cow::Owned(FlyTarget {
                app: app.clone(),
                ..fly.clone()
            })),
            None => Err(BackendError::Failed {
                pool: pool.name.to_string(),
                message: "spec.target.fly.app names no app, and this controller does not run on Fly \
                          (FLY_APP_NAME is not set): name the app in the pool"
                    .into(),
            }),
        }
    }

    /// Every machine of the group that is not destroyed, as flyctl finds them.
    async fn group(&self, pool: PoolRef<'_>, target: &FlyTarget) -> Result<Vec<Machine>, BackendError> {
        let filter = ListFilter {
            metadata: vec![(PROCESS_GROUP_KEY.into(), target.process_group.clone())],
            ..ListFilter::default()
        };
        let mut machines = self
            .client
            .list(&target.app, &filter)
            .await
            .map_err(|e| to_backend(pool, e))?;
        machines.retain(|m| m.state != "destroyed" && m.state != "destroying");
        machines.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(machines)
    }

    /// Lease the machine for `why` (`start`, `stop`, `destroy`), the write
    /// made under it next. Leadership is checked before the lease and again
    /// once it is held, right before that write.
    async fn lease(
        &self,
        pool: PoolRef<'_>,
        app: &str,
        machine: &str,
        why: &'static str,
    ) -> Result<Leased, BackendError> {
        pool.check_leading(why)?;
        let description = format!("backlog controller: {why} for pool {}", pool.name);
        match self
            .client
            .acquire_lease(app, machine, self.settings.lease_ttl, &description)
            .await
        {
            Ok(lease) => match pool.check_leading(why) {
                Ok(()) => Ok(Leased::Held(lease.nonce)),
                Err(lost) => {
                    self.release(pool, app, machine, &lease.nonce).await;
                    Err(lost)
                }
            },
            Err(FlyError::LeaseHeld { message, .. }) => {
                tracing::warn!(pool = pool.name, machine, holder = %message,
                    "machine is leased by someone else (a deploy?); skipping it this pass");
                Ok(Leased::Skipped)
            }
            Err(e) => Err(to_backend(pool, e)),
        }
    }

    async fn release(&self, pool: PoolRef<'_>, app: &str, machine: &str, nonce: &str) {
        // A lease that cannot be released expires with its TTL.
        if let Err(e) = self.client.release_lease(app, machine, nonce).await {
            tracing::warn!(pool = pool.name, machine, error = %e, "could not release the lease; it will expire");
        }
    }

    /// Start one stopped machine under its lease. Ok(false): skipped, because
    /// someone else holds the lease or the machine cannot start now (its
    /// host has no room for it, or it is in a state it cannot start from):
    /// the scale-up goes on with the next machine, or creates one.
    async fn start_one(&self, pool: PoolRef<'_>, app: &str, machine: &Machine) -> Result<bool, BackendError> {
        let Leased::Held(nonce) = self.lease(pool, app, &machine.id, "start").await? else {
            return Ok(false);
        };
        let started = match self.client.start(app, &machine.id, Some(&nonce)).await {
            // 412: it left the state it was listed in. Started meanwhile (a
            // retried start whose first answer was lost, or a launch under
            // way) is what was asked for.
            Err(FlyError::Api { status: 412, .. }) if self.now_in(app, &machine.id, ACTIVE_STATES).await => {
                Ok(())
            }
            other => other.map(|_| ()),
        };
        self.release(pool, app, &machine.id, &nonce).await;
        match started {
            Ok(()) => {
                tracing::info!(pool = pool.name, machine = %machine.id, region = %machine.region, "started stopped machine");
                Ok(true)
            }
            Err(e)
                if e.is_insufficient_capacity()
                    || matches!(
                        e,
                        FlyError::Api {
                            status: 409 | 412,
                            ..
                        }
                    ) =>
            {
                tracing::warn!(pool = pool.name, machine = %machine.id, region = %machine.region, error = %e,
                    "machine cannot start now; scaling up with others");
                Ok(false)
            }
            Err(e) => Err(to_backend(pool, e)),
        }
    }

    /// Stop one drained machine with SIGTERM under its lease, and wait (still
    /// holding the lease) until it is stopped. Ok(false): skipped because
    /// someone else holds the lease.
    async fn stop_one(
        &self,
        pool: PoolRef<'_>,
        app: &str,
        machine: &Machine,
        stop: &StopMachine,
    ) -> Result<bool, BackendError> {
        let id = machine.id.as_str();
        let Leased::Held(nonce) = self.lease(pool, app, id, "stop").await? else {
            return Ok(false);
        };
        let stopped = match self.client.stop(app, id, stop, Some(&nonce)).await {
            // 412: not running any more. A retried stop whose first answer
            // was lost meets a machine already stopping: that stop is done.
            Err(FlyError::Api { status: 412, .. }) if self.now_in(app, id, STOPPED_STATES).await => Ok(()),
            other => other.map(|_| ()),
        };
        if stopped.is_ok() {
            // The stop is under way whatever the wait says: not an error of the pass.
            // Fly asks for the instance to wait on when the state is `stopped`.
            let instance = Some(machine.instance_id.as_str());
            if let Err(e) = self.wait_for(pool, app, id, "stopped", instance).await {
                tracing::warn!(pool = pool.name, machine = %id, error = %e, "could not watch the machine stop");
            }
        }
        self.release(pool, app, id, &nonce).await;
        stopped.map_err(|e| to_backend(pool, e))?;
        tracing::info!(pool = pool.name, machine = %id, "stopped drained machine");
        Ok(true)
    }

    /// Whether the machine is now in one of `states`, read again after an
    /// action was refused for the state it had; false when it cannot be read.
    async fn now_in(&self, app: &str, id: &str, states: &[&str]) -> bool {
        match self.client.get(app, id).await {
            Ok(machine) => states.contains(&machine.state.as_str()),
            Err(e) => {
                tracing::warn!(machine = %id, error = %e, "could not read the machine after a refused action");
                false
            }
        }
    }

    /// Waits for a state; a machine that does not get there is left to count
    /// as not ready (the next observation sees its real state).
    async fn wait_for(
        &self,
        pool: PoolRef<'_>,
        app: &str,
        machine: &str,
        state: &str,
        instance_id: Option<&str>,
    ) -> Result<(), BackendError> {
        match self
            .client
            .wait(app, machine, state, instance_id, self.settings.wait_timeout)
            .await
        {
            Ok(()) => Ok(()),
            Err(e @ FlyError::WaitTimedOut { .. }) => {
                tracing::warn!(pool = pool.name, machine, error = %e, "machine not there yet; counted as not ready");
                Ok(())
            }
            Err(e) => Err(to_backend(pool, e)),
        }
    }

    /// The config a new machine of the group gets: a clone of an existing
    /// machine's, or the pool's template.
    fn new_config(
        pool: PoolRef<'_>,
        target: &FlyTarget,
        group: &[Machine],
    ) -> Result<MachineConfig, BackendError> {
        // Prefer a running machine (it runs the current release), newest
        // first; a failed one only when nothing else is left to clone.
        let source = group.iter().filter(|m| m.config.is_some()).max_by_key(|m| {
            (
                m.state != FAILED_STATE,
                m.state == "started",
                m.created_at.clone(),
                m.id.clone(),
            )
        });
        let mut config = match (source, &target.template) {
            (Some(machine), _) => {
                let mut config = machine.config.clone().expect("filtered on config");
                if let Some(image) = machine.full_image_ref() {
                    config.image = image;
                }
                // A clone is a replica in its own right, not a standby.
                config.standbys = None;
                config
            }
            (None, Some(template)) => {
                let mut env: BTreeMap<String, String> = template.env.clone();
                env.insert("FLY_PROCESS_GROUP".into(), target.process_group.clone());
                let guest = template.guest.as_ref().map(|g| MachineGuest {
                    cpu_kind: g.cpu_kind.clone(),
                    cpus: g.cpus,
                    memory_mb: g.memory_mb,
                    other: Default::default(),
                });
                let mut other = serde_json::Map::new();
                // The controller owns the count: Fly must not restart a machine it stopped.
                other.insert("restart".into(), serde_json::json!({"policy": "on-failure", "max_retries": 10}));
                other.insert("auto_destroy".into(), serde_json::Value::Bool(false));
                MachineConfig {
                    image: template.image.clone(),
                    env,
                    init: (!template.cmd.is_empty()).then(|| MachineInit {
                        cmd: template.cmd.clone(),
                        other: Default::default(),
                    }),
                    guest: guest.or(Some(MachineGuest {
                        cpu_kind: "shared".into(),
                        cpus: 1,
                        memory_mb: 256,
                        other: Default::default(),
                    })),
                    other,
                    ..MachineConfig::default()
                }
            }
            (None, None) => {
                return Err(BackendError::Failed {
                    pool: pool.name.to_string(),
                    message: format!(
                        "process group {:?} of Fly app {:?} has no machine to clone; \
                         add spec.target.fly.template (image, cmd) or deploy the group once with `fly deploy`",
                        target.process_group, target.app
                    ),
                })
            }
        };
        config.metadata.insert(PLATFORM_VERSION_KEY.into(), "v2".into());
        config
            .metadata
            .insert(PROCESS_GROUP_KEY.into(), target.process_group.clone());
        Ok(config)
    }

    /// The regions new machines go to, in round-robin order.
    fn regions(target: &FlyTarget, group: &[Machine]) -> Vec<Option<String>> {
        if let Some(region) = &target.region {
            return vec![Some(region.clone())];
        }
        let regions: BTreeSet<&str> = group
            .iter()
            .map(|m| m.region.as_str())
            .filter(|r| !r.is_empty())
            .collect();
        if regions.is_empty() {
            vec![None] // Fly picks
        } else {
            regions.into_iter().map(|r| Some(r.to_string())).collect()
        }
    }

    /// Create one machine, trying each region from `start` on when one has
    /// no capacity. Returns the machine and the index of the region used.
    async fn create_one(
        &self,
        pool: PoolRef<'_>,
        target: &FlyTarget,
        config: &MachineConfig,
        regions: &[Option<String>],
        start: usize,
    ) -> Result<(Machine, usize), BackendError> {
        let mut last = None;
        for offset in 0..regions.len() {
            let index = (start + offset) % regions.len();
            let request = CreateMachine {
                config: config.clone(),
                region: regions[index].clone(),
                name: None,
                skip_launch: false,
            };
            pool.check_leading("create")?;
            match self.client.create(&target.app, &request).await {
                Ok(machine) => return Ok((machine, index)),
                Err(e) if e.is_insufficient_capacity() => {
                    tracing::warn!(pool = pool.name, region = ?regions[index], error = %e, "no capacity; trying the next region");
                    last = Some(e);
                }
                Err(e) => return Err(to_backend(pool, e)),
            }
        }
        Err(to_backend(pool, last.expect("at least one region")))
    }

    /// Destroy stopped machines beyond `maxStopped` (default: one kept as
    /// the template when the pool has none), oldest stopped first, and
    /// failed machines.
    async fn prune_stopped(&self, pool: PoolRef<'_>, target: &FlyTarget) -> Result<(), BackendError> {
        let group = self.group(pool, target).await?;
        self.destroy_failed(pool, target, &group).await?;
        let keep = target.stopped_to_keep();
        // Not `created` ones: such a machine may be one `fly deploy` is
        // launching this very moment.
        let mut stopped: Vec<Machine> = group
            .into_iter()
            .filter(|m| matches!(m.state.as_str(), "stopped" | "suspended"))
            .collect();
        if stopped.len() <= keep {
            return Ok(());
        }
        // RFC 3339 timestamps of one format sort as time; newest kept.
        stopped.sort_by(|a, b| a.updated_at.cmp(&b.updated_at).then_with(|| a.id.cmp(&b.id)));
        let excess = stopped.len() - keep;
        for machine in stopped.into_iter().take(excess) {
            if self.destroy_one(pool, &target.app, &machine.id).await? {
                tracing::info!(pool = pool.name, machine = %machine.id, "destroyed stopped machine beyond maxStopped");
            }
        }
        Ok(())
    }

    /// Destroy one machine that is not running, under its lease. Ok(false):
    /// skipped because someone else holds the lease.
    async fn destroy_one(&self, pool: PoolRef<'_>, app: &str, id: &str) -> Result<bool, BackendError> {
        let Leased::Held(nonce) = self.lease(pool, app, id, "destroy").await? else {
            return Ok(false);
        };
        match self.client.destroy(app, id, false, Some(&nonce)).await {
            // Destroying the machine ends its lease too.
            Ok(()) => Ok(true),
            Err(e) => {
                self.release(pool, app, id, &nonce).await;
                Err(to_backend(pool, e))
            }
        }
    }

    /// Destroy the group's failed machines: a failed machine never counts
    /// as a replica, so the pool starts or creates others in their place.
    /// Each one destroyed is reported in the `Degraded` condition.
    async fn destroy_failed(
        &self,
        pool: PoolRef<'_>,
        target: &FlyTarget,
        group: &[Machine],
    ) -> Result<(), BackendError> {
        for machine in group.iter().filter(|m| m.state == FAILED_STATE) {
            if self.destroy_one(pool, &target.app, &machine.id).await? {
                tracing::warn!(pool = pool.name, machine = %machine.id, region = %machine.region,
                    "destroyed failed machine (it could not start); the pool replaces it");
                self.replaced
                    .lock()
                    .expect("replacements")
                    .entry(pool.name.to_string())
                    .or_default()
                    .unreported
                    .push(machine.id.clone());
            }
        }
        Ok(())
    }

    /// Create `count` machines of the group, round-robin over its regions.
    async fn create(
        &self,
        pool: PoolRef<'_>,
        target: &FlyTarget,
        group: &[Machine],
        count: usize,
        booting: &mut Vec<String>,
    ) -> Result<(), BackendError> {
        let config = Self::new_config(pool, target, group)?;
        let regions = Self::regions(target, group);
        for _ in 0..count {
            let start = *self
                .next_region
                .lock()
                .await
                .entry(pool.name.to_string())
                .or_default();
            let (machine, used) = self.create_one(pool, target, &config, &regions, start).await?;
            self.next_region
                .lock()
                .await
                .insert(pool.name.to_string(), (used + 1) % regions.len());
            tracing::info!(pool = pool.name, machine = %machine.id, region = %machine.region, image = %config.image, "created machine");
            booting.push(machine.id);
        }
        Ok(())
    }
}

fn to_backend(pool: PoolRef<'_>, error: FlyError) -> BackendError {
    match error {
        FlyError::Unauthorized { status, message } => BackendError::Unauthorized {
            pool: pool.name.to_string(),
            message: format!("Fly API {status}: {message}; check FLY_API_TOKEN and its scope for this app"),
        },
        other => BackendError::Failed {
            pool: pool.name.to_string(),
            message: other.to_string(),
        },
    }
}

impl Backend for FlyBackend {
    fn name(&self) -> &'static str {
        "fly"
    }

    async fn observe(&self, pool: PoolRef<'_>) -> Result<Vec<Replica>, BackendError> {
        let target = self.target(pool)?;
        Ok(self
            .group(pool, &target)
            .await?
            .into_iter()
            .filter(|m| ACTIVE_STATES.contains(&m.state.as_str()))
            .map(|m| Replica {
                ready: m.state == "started",
                id: m.id,
            })
            .collect())
    }

    async fn add(&self, pool: PoolRef<'_>, count: u32) -> Result<Vec<String>, BackendError> {
        let target = self.target(pool)?;
        let group = self.group(pool, &target).await?;
        // Failed machines go first; clones may still copy their config
        // below when nothing else is left to copy.
        self.destroy_failed(pool, &target, &group).await?;
        let mut needed = count as usize;

        // Stopped machines first: they boot in well under a second. The most
        // recently stopped run the newest release.
        let mut stopped: Vec<&Machine> = group
            .iter()
            .filter(|m| STARTABLE_STATES.contains(&m.state.as_str()))
            .collect();
        stopped.sort_by(|a, b| b.updated_at.cmp(&a.updated_at).then_with(|| a.id.cmp(&b.id)));
        let mut booting = Vec::new();
        for machine in stopped {
            if needed == 0 {
                break;
            }
            if self.start_one(pool, &target.app, machine).await? {
                booting.push(machine.id.clone());
                needed -= 1;
            }
        }
        if needed > 0 {
            self.create(pool, &target, &group, needed, &mut booting).await?;
        }
        // All boot at once; the waits only bound how long this pass watches.
        let waits = booting
            .iter()
            .map(|id| self.wait_for(pool, &target.app, id, "started", None));
        futures::future::join_all(waits)
            .await
            .into_iter()
            .collect::<Result<(), _>>()?;
        // A machine id survives stop and start: a restarted machine may come
        // back with the draining mark it was stopped under.
        Ok(booting)
    }

    async fn remove(&self, pool: PoolRef<'_>, ids: &[String]) -> Result<Vec<String>, BackendError> {
        let target = self.target(pool)?;
        let stop = StopMachine {
            signal: "SIGTERM".into(),
            timeout: format!("{}s", self.settings.stop_timeout.as_secs().max(1)),
        };
        let group = self.group(pool, &target).await?;
        let (group, app, stop) = (&group, target.app.as_str(), &stop);
        let stops = ids.iter().map(|id| async move {
            match group.iter().find(|m| &m.id == id) {
                Some(machine) => self.stop_one(pool, app, machine, stop).await,
                // Destroyed meanwhile (by hand, by `fly deploy`): gone is stopped.
                None => Ok(true),
            }
        });
        let stopped: Vec<bool> = futures::future::join_all(stops)
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        self.prune_stopped(pool, &target).await?;
        Ok(ids
            .iter()
            .zip(stopped)
            .filter(|(_, stopped)| *stopped)
            .map(|(id, _)| id.clone())
            .collect())
    }

    fn amend_status(&self, pool: PoolRef<'_>, status: &mut WorkerPoolStatus, now: &Time) {
        let mut replaced = self.replaced.lock().expect("replacements");
        let record = replaced.entry(pool.name.to_string()).or_default();
        if !record.unreported.is_empty() {
            record.last = Some((std::mem::take(&mut record.unreported), now.clone()));
        }
        match &record.last {
            None => status.set_condition(
                ConditionType::Degraded,
                false,
                "NoFailedMachines",
                "no machine of the group has failed",
                now,
            ),
            Some((ids, at)) => {
                let recent = now.0.duration_since(at.0).as_secs() < DEGRADED_SECONDS;
                let message = format!(
                    "destroyed {} failed machine(s) ({}) at {}: they could not start; \
                     the pool starts others in their place",
                    ids.len(),
                    ids.join(", "),
                    at.0
                );
                let reason = if recent {
                    "FailedMachinesReplaced"
                } else {
                    "NoFailedMachines"
                };
                status.set_condition(ConditionType::Degraded, recent, reason, &message, now);
            }
        }
    }

    async fn shutdown(&self) {}
}
