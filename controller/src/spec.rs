//! `WorkerPool` (`backlog.dev/v1alpha1`): the one spec of a pool of workers,
//! a CRD on Kubernetes and a YAML document everywhere else.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt};
use queue::TaskType;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::Error;

pub const DEFAULT_MIN_REPLICAS: i32 = 0;
pub const DEFAULT_TASKS_PER_REPLICA: i32 = 1;
pub const DEFAULT_ACTIVATION_TASKS: i32 = 1;
pub const DEFAULT_COOLDOWN_SECONDS: i32 = 120;
pub const DEFAULT_SCALE_UP_STABILIZATION_SECONDS: i32 = 0;
pub const DEFAULT_SCALE_DOWN_STABILIZATION_SECONDS: i32 = 60;
pub const DEFAULT_PERIOD_SECONDS: i32 = 15;
/// HPA's default tolerance (`--horizontal-pod-autoscaler-tolerance`): no
/// change while the load is within 10 % of the replicas' capacity.
pub const DEFAULT_TOLERANCE: f64 = 0.1;
/// HPA's default scale-up policies: +4 replicas or +100 % per period, whichever is more.
pub const DEFAULT_SCALE_UP_REPLICAS_PER_STEP: i32 = 4;
pub const DEFAULT_SCALE_UP_PERCENT_PER_STEP: i32 = 100;
/// HPA's default scale-down policy: any number of replicas (100 %) per period.
pub const DEFAULT_SCALE_DOWN_PERCENT_PER_STEP: i32 = 100;
/// No HPA equivalent: a removal smaller than this share of the pool waits
/// for more idle replicas. 20 is what `make bench-autoscale` justifies: on
/// its Poisson traces 23–40 % fewer scale changes for 2–3 % more
/// replica-seconds; on bursts fewer changes at about the same cost.
pub const DEFAULT_SCALE_DOWN_MIN_PERCENT_PER_STEP: i32 = 20;
/// Longest stabilisation window, as for HPA: history older than this is never consulted.
pub const MAX_STABILIZATION_SECONDS: i32 = 3600;
/// Longest rate-limit period, as for HPA.
pub const MAX_PERIOD_SECONDS: i32 = 1800;

/// A pool of identical workers that serve some task types, scaled from the
/// depth of their queue.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "backlog.dev",
    version = "v1alpha1",
    kind = "WorkerPool",
    namespaced,
    shortname = "wp",
    status = "WorkerPoolStatus",
    derive = "PartialEq",
    doc = "A pool of workers scaled from the depth of its task queue.",
    printcolumn(name = "Task Types", type_ = "string", json_path = ".spec.taskTypes"),
    printcolumn(name = "Pending", type_ = "integer", json_path = ".status.pending"),
    printcolumn(name = "In-Flight", type_ = "integer", json_path = ".status.inFlight"),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".status.desiredReplicas"),
    printcolumn(name = "Current", type_ = "integer", json_path = ".status.currentReplicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(
        name = "Active",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Active\")].status"
    ),
    printcolumn(
        name = "Busy",
        type_ = "integer",
        json_path = ".status.busyReplicas",
        priority = 1
    ),
    printcolumn(
        name = "Decision",
        type_ = "string",
        json_path = ".status.lastDecision",
        priority = 1
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
// Each printcolumn(...) repeats `type_ = "integer"`, which the lint takes for a duplicate.
#[allow(clippy::duplicated_attributes)]
pub struct WorkerPoolSpec {
    /// Task types this pool's workers claim (`text_generation`,
    /// `pdf_generation`, `audio_generation`). At least one; a task type is
    /// served by one pool only.
    #[schemars(schema_with = "task_types_schema")]
    pub task_types: Vec<TaskType>,

    /// Where the replicas run: exactly one of `kubernetes`, `fly` or `local`.
    pub target: Target,

    /// Fewest replicas, even with an empty queue. Default 0 (scale to zero).
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 0))]
    pub min_replicas: i32,

    /// Most replicas, whatever the load. Required: it is the cost ceiling.
    #[schemars(range(min = 1))]
    pub max_replicas: i32,

    /// How many pending plus in-flight tasks one replica absorbs: the
    /// worker's concurrency. Default 1.
    #[serde(default = "default_tasks_per_replica")]
    #[schemars(range(min = 1))]
    pub tasks_per_replica: i32,

    /// Runnable tasks that wake a pool at zero replicas. Default 1.
    #[serde(default = "default_activation_tasks")]
    #[schemars(range(min = 1))]
    pub activation_tasks: i32,

    /// Optional wait target: size the pool by Little's law (measured
    /// arrival rate × mean task duration, plus the slots that start the
    /// pending tasks within this many seconds) instead of one slot per
    /// pending task. Fewer replicas and scale changes for longer waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub target_queue_seconds: Option<i32>,

    /// Seconds with nothing pending and nothing in flight (and no retry
    /// falling due sooner) before the pool goes to zero replicas (when
    /// `minReplicas` is 0), KEDA's `cooldownPeriod`. Default 120 (KEDA: 300):
    /// a runnable task wakes a pool at zero at once.
    #[serde(default = "default_cooldown_period")]
    #[schemars(range(min = 0))]
    pub cooldown_period: i32,

    /// How fast replicas are added. Defaults: no stabilisation, at most
    /// +4 replicas or +100 % (whichever is more) per 15 s, one step per
    /// period once the pool runs (activation from zero is not held).
    #[serde(default)]
    pub scale_up: ScalingRules,

    /// How fast replicas are removed. Defaults: 60 s stabilisation, up to
    /// 100 % per 15 s, one removal step per period, each removing at least
    /// 20 % of the pool (or going to zero).
    #[serde(default)]
    pub scale_down: ScalingRules,

    /// What to run when the queue cannot be read. Without it the pool holds
    /// its replicas for as long as the outage lasts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,

    /// Hold the replicas as they are: no scaling in either direction.
    #[serde(default)]
    pub paused: bool,
}

/// The CRD as YAML: what `controller crd` prints and `manifests/crd.yaml` holds.
pub fn crd_yaml() -> Result<String, Error> {
    serde_yaml_ng::to_string(&WorkerPool::crd()).map_err(Error::RenderCrd)
}

fn default_min_replicas() -> i32 {
    DEFAULT_MIN_REPLICAS
}
fn default_tasks_per_replica() -> i32 {
    DEFAULT_TASKS_PER_REPLICA
}
fn default_activation_tasks() -> i32 {
    DEFAULT_ACTIVATION_TASKS
}
fn default_cooldown_period() -> i32 {
    DEFAULT_COOLDOWN_SECONDS
}

/// `queue::TaskType` is the queue's vocabulary and carries no schema; the
/// CRD lists its names so the API server rejects a typo at apply time.
fn task_types_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let names: Vec<&str> = TaskType::ALL.iter().map(|t| t.as_str()).collect();
    schemars::json_schema!({
        "type": "array",
        "minItems": 1,
        "items": { "type": "string", "enum": names },
        "x-kubernetes-list-type": "set",
    })
}

/// Where a pool's replicas run.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Target {
    /// A Deployment or StatefulSet in the pool's namespace, scaled through its `/scale` subresource.
    Kubernetes(KubernetesTarget),
    /// A process group of a Fly app, scaled as Fly Machines.
    Fly(FlyTarget),
    /// Child processes of the controller, for one machine.
    Local(LocalTarget),
}

impl Target {
    /// The name used in messages and metrics labels.
    pub fn backend(&self) -> &'static str {
        match self {
            Target::Kubernetes(_) => "kubernetes",
            Target::Fly(_) => "fly",
            Target::Local(_) => "local",
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubernetesTarget {
    /// `Deployment` or `StatefulSet`: scaled through its `/scale` subresource.
    pub kind: WorkloadKind,
    /// The workload's name, in the WorkerPool's namespace.
    pub name: String,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FlyTarget {
    /// The Fly app. Default: the app the controller runs in (Fly sets
    /// `FLY_APP_NAME` on every machine), so pools shipped with the app
    /// follow it when it is launched under another name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub app: String,
    /// The process group (`fly_process_group` machine metadata), e.g. `worker`.
    pub process_group: String,
    /// Region for new machines. Default: the regions the group already runs in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Stopped machines kept for fast restarts; the rest are destroyed.
    /// Default 1 without a template (the stopped machine is what the group
    /// scales back up from after zero), 0 with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_stopped: Option<i32>,
    /// Machine to create when the group has none to clone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<FlyMachineTemplate>,
}

impl FlyTarget {
    /// How many stopped machines to keep, default applied: without a
    /// template, the last stopped machine is the only config the group can
    /// be cloned from once it is at zero.
    pub fn stopped_to_keep(&self) -> usize {
        let default = if self.template.is_some() { 0 } else { 1 };
        self.max_stopped
            .map_or(default, |n| usize::try_from(n).unwrap_or(0))
    }
}

/// The parts of a Fly machine config a pool needs to create its first machine.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FlyMachineTemplate {
    /// Full image reference, e.g. `registry.fly.io/backlog:deployment-01H...`.
    pub image: String,
    /// Command, as `config.init.cmd`. Default: the image's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    /// Environment of the machine, as `config.env`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Machine size. Default: Fly's smallest shared CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<FlyGuest>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FlyGuest {
    /// `shared` or `performance`.
    pub cpu_kind: String,
    /// Number of CPUs.
    #[schemars(range(min = 1))]
    pub cpus: i32,
    /// Memory in MiB (at least 256).
    #[schemars(range(min = 1))]
    pub memory_mb: i32,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalTarget {
    /// Program and arguments of one worker replica.
    #[schemars(length(min = 1))]
    pub command: Vec<String>,
    /// Extra environment for the workers, on top of the controller's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

/// Stabilisation and rate limits for one direction (`scaleUp` or `scaleDown`).
///
/// Every field is optional and falls back to the direction's default. As
/// with HPA policies, giving either limit replaces the default limits: only
/// the limits given apply, and when both are given the more permissive one
/// wins (HPA's `selectPolicy: Max`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScalingRules {
    /// Window of past recommendations to consult: scale-up goes to the
    /// lowest recommendation within it, scale-down to the highest.
    /// Defaults: 0 up, 60 down (HPA: 300; removal here only takes idle
    /// replicas, so a short window kills no work).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub stabilization_window_seconds: Option<i32>,
    /// Most replicas added or removed per period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_replicas_per_step: Option<i32>,
    /// Most replicas added or removed per period, in percent of the count at
    /// the start of the period (at most 100 down).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_percent_per_step: Option<i32>,
    /// scaleDown only, no HPA equivalent: fewest replicas removed per step,
    /// in percent of the current count; a smaller removal waits until more
    /// replicas are idle (going to zero and maxReplicas are not held).
    /// Default 20; 0 removes each idle replica as soon as the rules allow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub min_percent_per_step: Option<i32>,
    /// Length of the period the limits apply to. Default 15.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1800))]
    pub period_seconds: Option<i32>,
    /// HPA's `tolerance`: no move in this direction while the load is
    /// within this fraction of what the current replicas absorb (0.1: a
    /// pool sized for 40 tasks holds from 36 to 44). Default 0.1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1))]
    pub tolerance: Option<f64>,
}

/// What the pool runs after the queue could not be read several times in a row.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fallback {
    /// Consecutive failed reads before switching to `replicas`.
    #[schemars(range(min = 1))]
    pub failure_threshold: i32,
    /// Replicas to run meanwhile: at least 1 (and at least `minReplicas`),
    /// since no read is no reason to stop working.
    #[schemars(range(min = 1))]
    pub replicas: i32,
}

/// Scaling direction, for the rules that differ between up and down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Up,
    Down,
}

impl Direction {
    fn field(self) -> &'static str {
        match self {
            Direction::Up => "scaleUp",
            Direction::Down => "scaleDown",
        }
    }
}

/// A rate limit: at most this many replicas, or this percentage of the
/// count at the start of the period, per period.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimits {
    pub replicas_per_step: Option<u32>,
    pub percent_per_step: Option<u32>,
    pub period_seconds: u32,
}

impl WorkerPoolSpec {
    pub fn rules(&self, direction: Direction) -> &ScalingRules {
        match direction {
            Direction::Up => &self.scale_up,
            Direction::Down => &self.scale_down,
        }
    }

    /// The stabilisation window for `direction`, defaults applied.
    pub fn stabilization_window_seconds(&self, direction: Direction) -> u32 {
        let default = match direction {
            Direction::Up => DEFAULT_SCALE_UP_STABILIZATION_SECONDS,
            Direction::Down => DEFAULT_SCALE_DOWN_STABILIZATION_SECONDS,
        };
        non_negative(
            self.rules(direction)
                .stabilization_window_seconds
                .unwrap_or(default),
        )
    }

    /// The tolerance for `direction`, default applied.
    pub fn tolerance(&self, direction: Direction) -> f64 {
        self.rules(direction).tolerance.unwrap_or(DEFAULT_TOLERANCE)
    }

    /// `scaleDown.minPercentPerStep`, default applied.
    pub fn min_removal_percent(&self) -> u32 {
        non_negative(
            self.scale_down
                .min_percent_per_step
                .unwrap_or(DEFAULT_SCALE_DOWN_MIN_PERCENT_PER_STEP),
        )
    }

    /// The rate limits for `direction`, defaults applied.
    pub fn rate_limits(&self, direction: Direction) -> RateLimits {
        let rules = self.rules(direction);
        let (replicas, percent) = match (rules.max_replicas_per_step, rules.max_percent_per_step, direction) {
            (None, None, Direction::Up) => (
                Some(DEFAULT_SCALE_UP_REPLICAS_PER_STEP),
                Some(DEFAULT_SCALE_UP_PERCENT_PER_STEP),
            ),
            (None, None, Direction::Down) => (None, Some(DEFAULT_SCALE_DOWN_PERCENT_PER_STEP)),
            (replicas, percent, _) => (replicas, percent),
        };
        RateLimits {
            replicas_per_step: replicas.map(non_negative),
            percent_per_step: percent.map(non_negative),
            period_seconds: non_negative(rules.period_seconds.unwrap_or(DEFAULT_PERIOD_SECONDS)),
        }
    }

    /// Every problem with this spec, each with its field path, e.g.
    /// `spec.maxReplicas: must be >= minReplicas (2)`. Empty when valid.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut problems = Problems::default();
        self.validate_task_types(&mut problems);
        self.validate_target(&mut problems);
        self.validate_counts(&mut problems);
        for direction in [Direction::Up, Direction::Down] {
            self.validate_rules(direction, &mut problems);
        }
        if let Some(fallback) = &self.fallback {
            problems.at_least("spec.fallback.failureThreshold", fallback.failure_threshold, 1);
            let floor = self.min_replicas.max(1);
            if fallback.replicas < floor {
                problems.push(
                    "spec.fallback.replicas",
                    format!("must be >= {floor} (at least 1 and at least minReplicas)"),
                );
            } else if fallback.replicas > self.max_replicas {
                problems.push(
                    "spec.fallback.replicas",
                    format!("must be <= maxReplicas ({})", self.max_replicas),
                );
            }
        }
        problems.0
    }

    fn validate_task_types(&self, problems: &mut Problems) {
        if self.task_types.is_empty() {
            problems.push("spec.taskTypes", "must name at least one task type");
        }
        let mut seen = BTreeSet::new();
        for (i, task_type) in self.task_types.iter().enumerate() {
            if !seen.insert(task_type) {
                problems.push(
                    format!("spec.taskTypes[{i}]"),
                    format!("{task_type} is listed twice"),
                );
            }
        }
    }

    fn validate_target(&self, problems: &mut Problems) {
        match &self.target {
            Target::Kubernetes(k8s) => problems.not_blank("spec.target.kubernetes.name", &k8s.name),
            Target::Fly(fly) => {
                problems.not_blank("spec.target.fly.processGroup", &fly.process_group);
                if let Some(region) = &fly.region {
                    problems.not_blank("spec.target.fly.region", region);
                }
                if let Some(max_stopped) = fly.max_stopped {
                    problems.at_least("spec.target.fly.maxStopped", max_stopped, 0);
                    // At zero every machine would be destroyed, leaving
                    // nothing to clone: the next scale-up would fail until
                    // someone runs `fly deploy`.
                    if max_stopped == 0 && self.min_replicas == 0 && fly.template.is_none() {
                        problems.push(
                            "spec.target.fly.maxStopped",
                            "0 with minReplicas 0 and no template destroys every machine of the group \
                             at zero replicas, and the pool could not scale back up: keep at least 1 \
                             stopped machine (the default) or set spec.target.fly.template",
                        );
                    }
                }
                if let Some(template) = &fly.template {
                    problems.not_blank("spec.target.fly.template.image", &template.image);
                    if let Some(guest) = &template.guest {
                        if !matches!(guest.cpu_kind.as_str(), "shared" | "performance") {
                            problems.push(
                                "spec.target.fly.template.guest.cpuKind",
                                format!("must be shared or performance, got {:?}", guest.cpu_kind),
                            );
                        }
                        problems.at_least("spec.target.fly.template.guest.cpus", guest.cpus, 1);
                        problems.at_least("spec.target.fly.template.guest.memoryMb", guest.memory_mb, 256);
                    }
                }
            }
            Target::Local(local) => match local.command.first() {
                None => problems.push("spec.target.local.command", "must name a program to run"),
                Some(program) => problems.not_blank("spec.target.local.command[0]", program),
            },
        }
    }

    fn validate_counts(&self, problems: &mut Problems) {
        problems.at_least("spec.minReplicas", self.min_replicas, 0);
        if self.max_replicas < 1 {
            problems.push("spec.maxReplicas", "must be >= 1");
        } else if self.max_replicas < self.min_replicas {
            problems.push(
                "spec.maxReplicas",
                format!("must be >= minReplicas ({})", self.min_replicas),
            );
        }
        problems.at_least("spec.tasksPerReplica", self.tasks_per_replica, 1);
        problems.at_least("spec.activationTasks", self.activation_tasks, 1);
        if let Some(seconds) = self.target_queue_seconds {
            problems.at_least("spec.targetQueueSeconds", seconds, 1);
        }
        problems.at_least("spec.cooldownPeriod", self.cooldown_period, 0);
    }

    fn validate_rules(&self, direction: Direction, problems: &mut Problems) {
        let rules = self.rules(direction);
        let field = |name: &str| format!("spec.{}.{name}", direction.field());
        if let Some(seconds) = rules.stabilization_window_seconds {
            problems.within(
                field("stabilizationWindowSeconds"),
                seconds,
                0,
                MAX_STABILIZATION_SECONDS,
            );
        }
        if let Some(replicas) = rules.max_replicas_per_step {
            problems.at_least(field("maxReplicasPerStep"), replicas, 1);
        }
        if let Some(percent) = rules.max_percent_per_step {
            match direction {
                // Doubling or more per step is legitimate on the way up.
                Direction::Up => problems.at_least(field("maxPercentPerStep"), percent, 1),
                Direction::Down => problems.within(field("maxPercentPerStep"), percent, 1, 100),
            }
        }
        if let Some(percent) = rules.min_percent_per_step {
            match direction {
                Direction::Up => problems.push(
                    field("minPercentPerStep"),
                    "applies to scaleDown only: a scale-up is never held back to make a bigger step"
                        .to_string(),
                ),
                Direction::Down => problems.within(field("minPercentPerStep"), percent, 0, 100),
            }
        }
        if let Some(seconds) = rules.period_seconds {
            problems.within(field("periodSeconds"), seconds, 1, MAX_PERIOD_SECONDS);
        }
        if let Some(tolerance) = rules.tolerance {
            if !(0.0..=1.0).contains(&tolerance) {
                problems.push(
                    field("tolerance"),
                    format!("must be between 0 and 1, got {tolerance}"),
                );
            }
        }
    }
}

fn non_negative(value: i32) -> u32 {
    u32::try_from(value).unwrap_or(0)
}

/// One problem in a spec, at a field path such as `spec.scaleUp.periodSeconds`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

#[derive(Default)]
struct Problems(Vec<FieldError>);

impl Problems {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    fn at_least(&mut self, path: impl Into<String>, value: i32, min: i32) {
        if value < min {
            self.push(path, format!("must be >= {min}, got {value}"));
        }
    }

    fn within(&mut self, path: impl Into<String>, value: i32, min: i32, max: i32) {
        if !(min..=max).contains(&value) {
            self.push(path, format!("must be between {min} and {max}, got {value}"));
        }
    }

    fn not_blank(&mut self, path: &str, value: &str) {
        if value.trim().is_empty() {
            self.push(path, "must not be empty");
        }
    }
}

/// What the controller last saw and did, for `kubectl get wp` and operators.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerPoolStatus {
    /// The `metadata.generation` of the spec this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Runnable tasks of the pool's task types.
    #[serde(default)]
    pub pending: i64,
    /// Tasks claimed or running.
    #[serde(default)]
    pub in_flight: i64,
    /// Retries waiting for a later run time.
    #[serde(default)]
    pub scheduled: i64,
    /// Tasks waiting for the tasks they depend on.
    #[serde(default)]
    pub blocked: i64,
    /// The depth counts reached the query's cap: they are lower bounds.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub depth_capped: bool,
    /// How long the oldest runnable task has waited, in whole seconds.
    #[serde(default)]
    pub oldest_pending_seconds: i64,
    /// What the last decision asked for.
    #[serde(default)]
    pub desired_replicas: i32,
    /// Replicas the backend runs or is starting.
    #[serde(default)]
    pub current_replicas: i32,
    /// Replicas that are up.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Replicas holding at least one task: never removed by a scale-down.
    #[serde(default)]
    pub busy_replicas: i32,
    /// When the replica count last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
    /// The last decision's reason, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_decision: Option<String>,
    /// `Ready`, `Active`, `Fallback` and `Paused`; on Fly also `Degraded`
    /// (failed machines destroyed and replaced); on Kubernetes also
    /// `ScaleDownDeferred` (a Deployment mid-rollout holds a scale-down).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// The condition types a WorkerPool reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionType {
    /// The spec is valid and the backend answers.
    Ready,
    /// The pool runs replicas (it is not scaled to zero).
    Active,
    /// The queue could not be read and the fallback replica count applies.
    Fallback,
    /// `spec.paused` holds the replicas.
    Paused,
    /// Replicas failed on the platform (a Fly machine that could not start)
    /// and were destroyed so others take their place.
    Degraded,
    /// Kubernetes: the target Deployment is mid-rollout, so a scale-down
    /// waits for it (pod-deletion-cost ranks pods within one ReplicaSet only).
    ScaleDownDeferred,
}

impl ConditionType {
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionType::Ready => "Ready",
            ConditionType::Active => "Active",
            ConditionType::Fallback => "Fallback",
            ConditionType::Paused => "Paused",
            ConditionType::Degraded => "Degraded",
            ConditionType::ScaleDownDeferred => "ScaleDownDeferred",
        }
    }
}

impl WorkerPoolStatus {
    /// Sets a condition the Kubernetes way: `lastTransitionTime` moves only
    /// when the status flips, while reason and message always follow the
    /// latest observation.
    pub fn set_condition(
        &mut self,
        condition: ConditionType,
        status: bool,
        reason: &str,
        message: &str,
        now: &Time,
    ) {
        let mut updated = Condition {
            type_: condition.as_str().to_string(),
            status: if status { "True" } else { "False" }.to_string(),
            reason: reason.to_string(),
            message: message.to_string(),
            observed_generation: self.observed_generation,
            last_transition_time: now.clone(),
        };
        match self.conditions.iter_mut().find(|c| c.type_ == updated.type_) {
            Some(existing) => {
                if existing.status == updated.status {
                    updated.last_transition_time = existing.last_transition_time.clone();
                }
                *existing = updated;
            }
            None => self.conditions.push(updated),
        }
    }

    pub fn condition(&self, condition: ConditionType) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == condition.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> WorkerPoolSpec {
        WorkerPoolSpec {
            task_types: vec![TaskType::TextGeneration],
            target: Target::Local(LocalTarget {
                command: vec!["text-worker".into()],
                env: BTreeMap::new(),
            }),
            min_replicas: 0,
            max_replicas: 4,
            tasks_per_replica: 2,
            activation_tasks: 1,
            target_queue_seconds: None,
            cooldown_period: 300,
            scale_up: ScalingRules::default(),
            scale_down: ScalingRules::default(),
            fallback: None,
            paused: false,
        }
    }

    fn problems(spec: &WorkerPoolSpec) -> Vec<String> {
        spec.validate().iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_sensible_spec_has_no_problems() {
        assert_eq!(problems(&spec()), Vec::<String>::new());
    }

    #[test]
    fn an_empty_task_type_list_is_reported() {
        let spec = WorkerPoolSpec {
            task_types: vec![],
            ..spec()
        };
        assert_eq!(
            problems(&spec),
            ["spec.taskTypes: must name at least one task type"]
        );
    }

    #[test]
    fn a_task_type_listed_twice_is_reported_at_its_index() {
        let spec = WorkerPoolSpec {
            task_types: vec![TaskType::PdfGeneration, TaskType::PdfGeneration],
            ..spec()
        };
        assert_eq!(
            problems(&spec),
            ["spec.taskTypes[1]: pdf_generation is listed twice"]
        );
    }

    #[test]
    fn max_below_min_names_the_min() {
        let spec = WorkerPoolSpec {
            min_replicas: 2,
            max_replicas: 1,
            ..spec()
        };
        assert_eq!(problems(&spec), ["spec.maxReplicas: must be >= minReplicas (2)"]);
    }

    #[test]
    fn zero_max_replicas_is_reported_once() {
        let spec = WorkerPoolSpec {
            max_replicas: 0,
            ..spec()
        };
        assert_eq!(problems(&spec), ["spec.maxReplicas: must be >= 1"]);
    }

    #[test]
    fn zero_and_negative_counts_are_reported_with_their_values() {
        let spec = WorkerPoolSpec {
            min_replicas: -1,
            tasks_per_replica: 0,
            activation_tasks: 0,
            target_queue_seconds: Some(0),
            cooldown_period: -5,
            ..spec()
        };
        assert_eq!(
            problems(&spec),
            [
                "spec.minReplicas: must be >= 0, got -1",
                "spec.tasksPerReplica: must be >= 1, got 0",
                "spec.activationTasks: must be >= 1, got 0",
                "spec.targetQueueSeconds: must be >= 1, got 0",
                "spec.cooldownPeriod: must be >= 0, got -5",
            ]
        );
    }

    #[test]
    fn rate_rules_out_of_range_are_reported_per_direction() {
        let spec = WorkerPoolSpec {
            scale_up: ScalingRules {
                stabilization_window_seconds: Some(-1),
                max_replicas_per_step: Some(0),
                max_percent_per_step: Some(500),
                min_percent_per_step: Some(20),
                period_seconds: Some(0),
                tolerance: Some(1.5),
            },
            scale_down: ScalingRules {
                stabilization_window_seconds: Some(7200),
                max_replicas_per_step: None,
                max_percent_per_step: Some(101),
                min_percent_per_step: Some(101),
                period_seconds: Some(-15),
                tolerance: Some(0.0),
            },
            ..spec()
        };
        assert_eq!(
            problems(&spec),
            [
                "spec.scaleUp.stabilizationWindowSeconds: must be between 0 and 3600, got -1",
                "spec.scaleUp.maxReplicasPerStep: must be >= 1, got 0",
                "spec.scaleUp.minPercentPerStep: applies to scaleDown only: a scale-up is never held back to make a bigger step",
                "spec.scaleUp.periodSeconds: must be between 1 and 1800, got 0",
                "spec.scaleUp.tolerance: must be between 0 and 1, got 1.5",
                "spec.scaleDown.stabilizationWindowSeconds: must be between 0 and 3600, got 7200",
                "spec.scaleDown.maxPercentPerStep: must be between 1 and 100, got 101",
                "spec.scaleDown.minPercentPerStep: must be between 0 and 100, got 101",
                "spec.scaleDown.periodSeconds: must be between 1 and 1800, got -15",
            ]
        );
    }

    #[test]
    fn fallback_replicas_must_fit_between_one_and_max() {
        let above_max = WorkerPoolSpec {
            fallback: Some(Fallback {
                failure_threshold: 3,
                replicas: 5,
            }),
            ..spec()
        };
        assert_eq!(
            problems(&above_max),
            ["spec.fallback.replicas: must be <= maxReplicas (4)"]
        );
        let zero = WorkerPoolSpec {
            fallback: Some(Fallback {
                failure_threshold: 0,
                replicas: 0,
            }),
            ..spec()
        };
        assert_eq!(
            problems(&zero),
            [
                "spec.fallback.failureThreshold: must be >= 1, got 0",
                "spec.fallback.replicas: must be >= 1 (at least 1 and at least minReplicas)",
            ]
        );
    }

    #[test]
    fn a_local_target_needs_a_program() {
        let empty = WorkerPoolSpec {
            target: Target::Local(LocalTarget {
                command: vec![],
                env: BTreeMap::new(),
            }),
            ..spec()
        };
        assert_eq!(
            problems(&empty),
            ["spec.target.local.command: must name a program to run"]
        );
        let blank = WorkerPoolSpec {
            target: Target::Local(LocalTarget {
                command: vec![" ".into()],
                env: BTreeMap::new(),
            }),
            ..spec()
        };
        assert_eq!(
            problems(&blank),
            ["spec.target.local.command[0]: must not be empty"]
        );
    }

    #[test]
    fn fly_and_kubernetes_targets_need_their_names() {
        let fly = WorkerPoolSpec {
            target: Target::Fly(FlyTarget {
                app: "".into(),
                process_group: "worker".into(),
                region: Some("".into()),
                max_stopped: Some(-1),
                template: Some(FlyMachineTemplate {
                    image: "".into(),
                    cmd: vec![],
                    env: BTreeMap::new(),
                    guest: Some(FlyGuest {
                        cpu_kind: "gpu".into(),
                        cpus: 0,
                        memory_mb: 128,
                    }),
                }),
            }),
            ..spec()
        };
        assert_eq!(
            problems(&fly),
            [
                "spec.target.fly.region: must not be empty",
                "spec.target.fly.maxStopped: must be >= 0, got -1",
                "spec.target.fly.template.image: must not be empty",
                "spec.target.fly.template.guest.cpuKind: must be shared or performance, got \"gpu\"",
                "spec.target.fly.template.guest.cpus: must be >= 1, got 0",
                "spec.target.fly.template.guest.memoryMb: must be >= 256, got 128",
            ]
        );
        let k8s = WorkerPoolSpec {
            target: Target::Kubernetes(KubernetesTarget {
                kind: WorkloadKind::Deployment,
                name: "".into(),
            }),
            ..spec()
        };
        assert_eq!(problems(&k8s), ["spec.target.kubernetes.name: must not be empty"]);
    }

    fn fly_target(max_stopped: Option<i32>, template: Option<FlyMachineTemplate>) -> Target {
        Target::Fly(FlyTarget {
            app: "backlog".into(),
            process_group: "worker".into(),
            region: None,
            max_stopped,
            template,
        })
    }

    fn template() -> FlyMachineTemplate {
        FlyMachineTemplate {
            image: "registry.fly.io/backlog:v1".into(),
            cmd: vec!["worker".into()],
            env: BTreeMap::new(),
            guest: None,
        }
    }

    #[test]
    fn a_fly_pool_that_could_not_scale_back_up_from_zero_is_rejected() {
        let destroys_all = WorkerPoolSpec {
            target: fly_target(Some(0), None),
            ..spec()
        };
        let problems = problems(&destroys_all);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("spec.target.fly.maxStopped: 0 with minReplicas 0 and no template")
                && problems[0].contains("could not scale back up"),
            "{problems:?}"
        );
        // Each of these can: a template, a replica always running, or the default.
        for fine in [
            WorkerPoolSpec {
                target: fly_target(Some(0), Some(template())),
                ..spec()
            },
            WorkerPoolSpec {
                target: fly_target(Some(0), None),
                min_replicas: 1,
                ..spec()
            },
            WorkerPoolSpec {
                target: fly_target(None, None),
                ..spec()
            },
        ] {
            assert_eq!(fine.validate(), vec![], "{fine:?}");
        }
    }

    #[test]
    fn without_a_template_one_stopped_machine_is_kept_by_default() {
        let kept = |target: Target| match target {
            Target::Fly(fly) => fly.stopped_to_keep(),
            _ => unreachable!(),
        };
        assert_eq!(kept(fly_target(None, None)), 1);
        assert_eq!(kept(fly_target(None, Some(template()))), 0);
        assert_eq!(kept(fly_target(Some(3), None)), 3);
        assert_eq!(kept(fly_target(Some(0), Some(template()))), 0);
    }

    #[test]
    fn scaling_defaults_are_hpas_but_for_a_shorter_scale_down_window() {
        let spec = spec();
        assert_eq!(spec.stabilization_window_seconds(Direction::Up), 0);
        // HPA's is 300 s. Removal here only takes idle replicas, and
        // `make bench-autoscale` measures what 60 s saves.
        assert_eq!(spec.stabilization_window_seconds(Direction::Down), 60);
        assert_eq!(
            (spec.tolerance(Direction::Up), spec.tolerance(Direction::Down)),
            (0.1, 0.1)
        );
        assert_eq!(
            spec.rate_limits(Direction::Up),
            RateLimits {
                replicas_per_step: Some(4),
                percent_per_step: Some(100),
                period_seconds: 15
            }
        );
        assert_eq!(
            spec.rate_limits(Direction::Down),
            RateLimits {
                replicas_per_step: None,
                percent_per_step: Some(100),
                period_seconds: 15
            }
        );
    }

    #[test]
    fn giving_one_limit_replaces_the_default_limits() {
        let spec = WorkerPoolSpec {
            scale_down: ScalingRules {
                max_replicas_per_step: Some(1),
                period_seconds: Some(60),
                ..ScalingRules::default()
            },
            ..spec()
        };
        assert_eq!(
            spec.rate_limits(Direction::Down),
            RateLimits {
                replicas_per_step: Some(1),
                percent_per_step: None,
                period_seconds: 60
            }
        );
    }

    #[test]
    fn a_condition_keeps_its_transition_time_until_its_status_flips() {
        let t = |s: i64| Time(k8s_openapi::jiff::Timestamp::from_second(s).unwrap());
        let mut status = WorkerPoolStatus::default();
        status.set_condition(ConditionType::Active, true, "Scaled", "1 replica", &t(10));
        status.set_condition(ConditionType::Active, true, "Scaled", "3 replicas", &t(20));
        let active = status.condition(ConditionType::Active).unwrap();
        assert_eq!(
            (active.message.as_str(), &active.last_transition_time),
            ("3 replicas", &t(10))
        );

        status.set_condition(ConditionType::Active, false, "ScaledToZero", "idle", &t(30));
        let active = status.condition(ConditionType::Active).unwrap();
        assert_eq!(
            (active.status.as_str(), &active.last_transition_time),
            ("False", &t(30))
        );
        assert_eq!(status.conditions.len(), 1);
    }
}
