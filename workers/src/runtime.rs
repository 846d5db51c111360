//! The worker runtime shared by every pipeline: register the replica, claim
//! up to its concurrency, heartbeat, run the handler under the task's
//! timeout, complete or fail (fenced), stop claiming when draining, and on
//! shutdown finish or release what it holds within a grace period.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use queue::{Failure, Lease, NewWorker, Queue, QueueError, Task, TaskType, WorkerState};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Outcome, WorkerMetrics};

/// How long one wait on the notification channel lasts; other branches of
/// the loop interrupt it (the listener is cancel-safe).
const NOTIFY_WAIT: Duration = Duration::from_secs(60);

/// How long a stopping replica waits for an unreachable database (a
/// restart, a failover) to take its unfinished tasks back and its registry
/// row away. Past it, lease expiry and the sweeper do both, later.
const HAND_BACK_WINDOW: Duration = Duration::from_secs(10);

tokio::task_local! {
    /// When the running task's time is up: its `timeout_seconds` after the
    /// handler started. Set around every handler, so a client deep in a
    /// pipeline can end its retries in time with its own error (see
    /// [`task_deadline`]) without each pipeline passing it down.
    pub(crate) static TASK_DEADLINE: Instant;
}

/// The deadline of the task whose handler is running, if called from one.
pub fn task_deadline() -> Option<Instant> {
    TASK_DEADLINE.try_with(|deadline| *deadline).ok()
}

/// What a task produced: the JSON stored as the task's output.
pub type TaskOutput = serde_json::Value;

/// Everything a handler may use while running one task.
#[derive(Clone)]
pub struct TaskContext {
    pub task: Task,
    pub queue: Queue,
    pub worker_id: String,
    /// Cancelled when the lease is lost (job cancelled, task swept) or the
    /// worker is shutting down past its grace period.
    pub cancelled: CancellationToken,
}

impl TaskContext {
    pub fn lease(&self) -> Lease {
        self.task.lease()
    }
}

/// A pipeline: turns one claimed task into its output or a classified failure.
pub trait TaskHandler: Send + Sync + 'static {
    fn run(&self, ctx: TaskContext) -> impl Future<Output = Result<TaskOutput, Failure>> + Send;
}

/// How a replica identifies itself: Fly machine id, pod name, or host+pid.
pub fn replica_identity() -> String {
    if let Ok(id) = std::env::var("FLY_MACHINE_ID") {
        if !id.is_empty() {
            return id;
        }
    }
    if let Ok(pod) = std::env::var("POD_NAME") {
        if !pod.is_empty() {
            return pod;
        }
    }
    format!("{}-{}", hostname(), std::process::id())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub worker_id: String,
    pub pool: Option<String>,
    pub task_types: Vec<TaskType>,
    /// Tasks run at once; also the claim batch size.
    pub concurrency: usize,
    /// How often leases and the replica are renewed.
    pub heartbeat_interval: Duration,
    /// Backstop poll when no notification arrives.
    pub poll_interval: Duration,
    /// On shutdown, how long running tasks may take before they are released.
    pub shutdown_grace: Duration,
    /// Where the replica counts its tasks (served on `/metrics` by the binaries).
    pub metrics: Arc<WorkerMetrics>,
}

/// What a run did, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RunSummary {
    pub completed: u64,
    pub failed: u64,
    /// Tasks handed back unfinished at shutdown.
    pub released: u64,
    /// Tasks abandoned because the lease was lost (cancelled or swept).
    pub lost: u64,
}

enum Finished {
    Done {
        lease: Lease,
        result: Result<TaskOutput, Failure>,
        seconds: f64,
    },
    Cancelled(Lease),
}

/// A task this replica holds.
struct Held {
    lease: Lease,
    task_type: TaskType,
    cancelled: CancellationToken,
    /// What the handler came to, while the database cannot take it: the
    /// task stays held (its lease renewed, its slot taken) until it can.
    unstored: Option<Result<TaskOutput, Failure>>,
}

/// The runtime's bookkeeping, shared by the claim loop and the drain.
struct Replica<'a> {
    queue: &'a Queue,
    worker_id: &'a str,
    task_types: &'a [TaskType],
    concurrency: usize,
    held: HashMap<i64, Held>,
    summary: RunSummary,
    metrics: &'a WorkerMetrics,
}

/// Run until `shutdown` is cancelled, then drain. A replica the controller
/// marked draining keeps running its tasks but claims nothing more; the
/// controller stops it once it is idle.
pub async fn run<H: TaskHandler>(
    queue: Queue,
    config: RuntimeConfig,
    handler: H,
    shutdown: CancellationToken,
) -> Result<RunSummary, QueueError> {
    let handler = Arc::new(handler);
    let worker_id = config.worker_id.clone();
    let announcement = NewWorker {
        id: worker_id.clone(),
        pool: config.pool.clone(),
        task_types: config.task_types.clone(),
        concurrency: config.concurrency as i32,
        hostname: Some(hostname()),
        pid: Some(std::process::id() as i32),
    };
    // A replica started while the database restarts waits for it rather
    // than exiting: the controller would only start it again.
    let Some(()) = until_reachable("registering", &shutdown, || queue.register_worker(&announcement)).await?
    else {
        return Ok(RunSummary::default());
    };
    tracing::info!(
        worker_id = %worker_id,
        task_types = ?config.task_types.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
        concurrency = config.concurrency,
        pool = config.pool.as_deref().unwrap_or("-"),
        "worker started"
    );

    let Some(mut wake) = until_reachable("listening", &shutdown, || queue.listen()).await? else {
        queue.deregister_worker(&worker_id).await?;
        return Ok(RunSummary::default());
    };
    let mut running: JoinSet<Finished> = JoinSet::new();
    let mut replica = Replica {
        queue: &queue,
        worker_id: &worker_id,
        task_types: &config.task_types,
        concurrency: config.concurrency,
        held: HashMap::new(),
        summary: RunSummary::default(),
        metrics: &config.metrics,
    };
    let mut draining = false;
    let mut heartbeat = tokio::time::interval(config.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut poll = tokio::time::interval(config.poll_interval);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Claim at once on start: work may be waiting.
    let (claim_now_tx, mut claim_now) = watch::channel(());
    claim_now.mark_changed();

    loop {
        let free = config.concurrency.saturating_sub(replica.held.len());
        let may_claim = !draining && !shutdown.is_cancelled() && free > 0;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Ok(()) = claim_now.changed(), if may_claim => {
                // Claimed as processing: the handlers start right below.
                let tasks = match queue.claim_and_start(&worker_id, &config.task_types, free as i32).await {
                    Ok(tasks) => tasks,
                    Err(e) => {
                        tracing::warn!(error = %e, "claim failed; retrying at the next wake-up");
                        continue;
                    }
                };
                if replica.start(tasks, &handler, &mut running) {
                    claim_now_tx.send_replace(());
                }
            }
            note = wake.next(NOTIFY_WAIT), if may_claim => {
                match note {
                    Ok(Some(Some(t))) if !config.task_types.contains(&t) => {}
                    Ok(Some(_)) => { claim_now_tx.send_replace(()); }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "listener failed; polling until it reconnects");
                        tokio::time::sleep(config.poll_interval).await;
                    }
                }
            }
            // The backstop: retries whose backoff ended and notifications
            // lost in a reconnect are found by polling.
            _ = poll.tick(), if may_claim => { claim_now_tx.send_replace(()); }
            Some(finished) = running.join_next(), if !running.is_empty() => {
                let finished = finished_together(finished, &mut running).await;
                let claim_next = !draining && !shutdown.is_cancelled();
                let more_may_wait = match replica.settle(finished, claim_next).await {
                    // Claimed with the completions, for the slots they freed.
                    Some(tasks) => replica.start(tasks, &handler, &mut running),
                    None => true,
                };
                if more_may_wait {
                    claim_now_tx.send_replace(());
                }
            }
            _ = heartbeat.tick() => {
                if replica.renew().await {
                    claim_now_tx.send_replace(());
                }
                match queue.worker_heartbeat(&worker_id).await {
                    Ok(Some(WorkerState::Draining)) if !draining => {
                        tracing::info!(worker_id = %worker_id, in_flight = replica.held.len(),
                            "replica marked draining: no more claims");
                        draining = true;
                    }
                    Ok(Some(WorkerState::Running)) if draining => {
                        tracing::info!(worker_id = %worker_id, "replica back to running");
                        draining = false;
                        claim_now_tx.send_replace(());
                    }
                    Ok(None) => {
                        // Swept from the registry after a long stall: announce again.
                        if let Err(e) = queue.register_worker(&NewWorker {
                            id: worker_id.clone(), pool: config.pool.clone(), task_types: config.task_types.clone(),
                            concurrency: config.concurrency as i32, hostname: Some(hostname()),
                            pid: Some(std::process::id() as i32),
                        }).await {
                            tracing::warn!(error = %e, "re-registering failed");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "replica heartbeat failed"),
                }
            }
        }
    }

    // Shutdown: no more claims; let running tasks finish within the grace.
    tracing::info!(worker_id = %worker_id, in_flight = replica.held.len(), grace_s = config.shutdown_grace.as_secs_f64(),
        "shutting down: finishing running tasks");
    let deadline = Instant::now() + config.shutdown_grace;
    let mut heartbeat = tokio::time::interval(config.heartbeat_interval);
    while !running.is_empty() || replica.waiting() > 0 {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            _ = heartbeat.tick() => {
                replica.renew().await;
            }
            Some(finished) = running.join_next(), if !running.is_empty() => {
                replica.settle(finished_together(finished, &mut running).await, false).await;
            }
        }
    }
    running.abort_all();
    // Both are tried whatever the other did: a replica that released
    // nothing still leaves the registry, so the controller does not count
    // it.
    let window = CancellationToken::new();
    tokio::spawn({
        let window = window.clone();
        async move {
            tokio::time::sleep(HAND_BACK_WINDOW).await;
            window.cancel();
        }
    });
    let released = replica.release_all(&window).await;
    let deregistered =
        until_reachable("deregistering", &window, || queue.deregister_worker(&worker_id)).await;
    if let Ok(None) = deregistered {
        tracing::error!(worker_id = %worker_id, "the database stayed unreachable: the sweeper removes this replica's registry row");
    }
    released?;
    deregistered?;
    let summary = replica.summary;
    tracing::info!(worker_id = %worker_id, ?summary, "worker stopped");
    Ok(summary)
}

/// Call `f` until it succeeds, waiting out a database that cannot be
/// reached (1 s, doubling to 30 s). Other errors are returned; `None` when
/// shutdown came first.
async fn until_reachable<T, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    mut f: F,
) -> Result<Option<T>, QueueError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, QueueError>>,
{
    let mut delay = Duration::from_secs(1);
    loop {
        match f().await {
            Ok(value) => return Ok(Some(value)),
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, retry_in_s = delay.as_secs(), "{what} failed: database unreachable");
            }
            Err(e) => return Err(e),
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// The first finished task and every other one already finished, so their
/// results are stored in one round trip: completions are commits, and
/// commits are the queue's ceiling. Yielding lets handlers that are ready
/// to finish (short tasks claimed together) do so, and it goes on while a
/// yield brings more: gathering a batch only in part would split it for
/// good, since the claim that follows refills just the slots it freed.
/// Handlers seconds apart cost one empty yield.
async fn finished_together(
    first: Result<Finished, tokio::task::JoinError>,
    running: &mut JoinSet<Finished>,
) -> Vec<Finished> {
    let mut batch = vec![first.expect("task handlers do not panic across the join")];
    loop {
        tokio::task::yield_now().await;
        let gathered = batch.len();
        while let Some(next) = running.try_join_next() {
            batch.push(next.expect("task handlers do not panic across the join"));
        }
        if batch.len() == gathered {
            return batch;
        }
    }
}

/// Run the handler under the task's timeout; a lost lease cancels it. A
/// handler that panics fails its task for good (a bug does not go away on
/// retry) and leaves the process and its other tasks running: unwinding
/// through the join used to end the run loop, and every task the replica
/// held waited for the sweeper.
async fn run_one<H: TaskHandler>(handler: Arc<H>, ctx: TaskContext) -> Finished {
    let lease = ctx.lease();
    let task_type = ctx.task.task_type;
    let timeout = Duration::from_secs(ctx.task.timeout_seconds.max(1) as u64);
    let cancelled = ctx.cancelled.clone();
    let started = Instant::now();
    let run =
        TASK_DEADLINE.scope(started + timeout, async move {
            AssertUnwindSafe(handler.run(ctx))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| {
                let what = panic_message(panic.as_ref());
                tracing::error!(task_id = lease.task_id, %task_type, panic = what, "task handler panicked");
                Err(Failure::permanent(format!("the {task_type} handler panicked: {what}")))
            })
        });
    tokio::select! {
        _ = cancelled.cancelled() => Finished::Cancelled(lease),
        result = tokio::time::timeout(timeout, run) => Finished::Done {
            lease,
            result: result.unwrap_or_else(|_| Err(Failure::retryable(format!(
                "timed out after {} s", timeout.as_secs()
            )))),
            seconds: started.elapsed().as_secs_f64(),
        },
    }
}

/// What a panic said, when it said it with a string (as `panic!` does).
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

impl Replica<'_> {
    /// Hold and run freshly claimed tasks. Returns whether they filled every
    /// free slot: a full batch means more may be waiting.
    fn start<H: TaskHandler>(
        &mut self,
        tasks: Vec<Task>,
        handler: &Arc<H>,
        running: &mut JoinSet<Finished>,
    ) -> bool {
        let filled = tasks.len() == self.concurrency.saturating_sub(self.held.len());
        if !tasks.is_empty() {
            self.metrics.claim_batches.inc();
        }
        for task in tasks {
            let lease = task.lease();
            let cancelled = CancellationToken::new();
            let earlier = self.held.insert(
                lease.task_id,
                Held {
                    lease,
                    task_type: task.task_type,
                    cancelled: cancelled.clone(),
                    unstored: None,
                },
            );
            if let Some(earlier) = earlier {
                // Swept back from this replica (it was silent past the
                // stale limit) and claimed by it again before a heartbeat
                // told it: the earlier run's lease is dead. Stop that run;
                // what it comes to is not this claim's (`settle` matches
                // leases).
                tracing::warn!(
                    task_id = lease.task_id,
                    earlier_claim = earlier.lease.claim,
                    claim = lease.claim,
                    "task claimed again after its lease was lost: abandoning the earlier run"
                );
                earlier.cancelled.cancel();
                self.summary.lost += 1;
                self.metrics.count(earlier.task_type, Outcome::lost, 1);
            }
            tracing::debug!(task_id = lease.task_id, job_id = %task.job_id, task_type = %task.task_type,
                attempt = task.attempts, claim = lease.claim, "task claimed");
            let ctx = TaskContext {
                task,
                queue: self.queue.clone(),
                worker_id: self.worker_id.to_string(),
                cancelled,
            };
            running.spawn(run_one(handler.clone(), ctx));
        }
        self.metrics.in_flight.set(self.held.len() as i64);
        filled
    }

    /// Store the results of finished tasks, and those the database could
    /// not take before: every completion in one call, failures one by one
    /// (each has its own error and backoff). With `claim_next`, the
    /// completions' call also claims tasks (started) for the free slots,
    /// saving the claim's round trip; those are returned, `None` when no
    /// such claim was made.
    ///
    /// A result the database cannot take (unreachable past the queue's own
    /// retries, a few seconds) stays with its task, whose lease the
    /// heartbeat keeps renewing, and is stored at a later heartbeat or
    /// settle. Dropping it left the task to the sweeper, to be run again.
    async fn settle(&mut self, finished: Vec<Finished>, claim_next: bool) -> Option<Vec<Task>> {
        for finished in finished {
            match finished {
                // A run of an earlier claim of a task held again finds
                // another lease there, and leaves it alone.
                Finished::Cancelled(lease) => {
                    self.take_held(lease);
                }
                Finished::Done {
                    lease,
                    result,
                    seconds,
                } => {
                    if let Some(held) = self.held.get_mut(&lease.task_id).filter(|h| h.lease == lease) {
                        self.metrics.observe_duration(held.task_type, seconds);
                        held.unstored = Some(result);
                    }
                }
            }
        }
        let mut failures = Vec::new();
        let mut completions = Vec::new();
        for held in self.held.values() {
            match &held.unstored {
                Some(Ok(output)) => completions.push((held.lease, output.clone(), held.task_type)),
                Some(Err(failure)) => failures.push((held.lease, held.task_type, failure.clone())),
                None => {}
            }
        }
        for (lease, task_type, failure) in failures {
            if self.fail(lease, task_type, &failure).await {
                self.held.remove(&lease.task_id);
            }
        }
        let claimed = if completions.is_empty() {
            None
        } else {
            self.complete(completions, claim_next).await
        };
        self.metrics.in_flight.set(self.held.len() as i64);
        self.metrics.results_waiting.set(self.waiting() as i64);
        claimed
    }

    /// Finished tasks whose result is not stored yet.
    fn waiting(&self) -> usize {
        self.held.values().filter(|h| h.unstored.is_some()).count()
    }

    /// Store completions (see [`Self::settle`]).
    async fn complete(
        &mut self,
        mut completions: Vec<(Lease, TaskOutput, TaskType)>,
        claim_next: bool,
    ) -> Option<Vec<Task>> {
        completions.sort_by_key(|(lease, _, _)| lease.task_id);
        let free = self
            .concurrency
            .saturating_sub(self.held.len() - completions.len());
        let claim_for = (claim_next && free > 0).then_some(free as i32);
        let (types, results): (Vec<TaskType>, Vec<(Lease, TaskOutput)>) = completions
            .into_iter()
            .map(|(lease, output, task_type)| (task_type, (lease, output)))
            .unzip();
        match self.store(&results, claim_for).await {
            Ok((done, claimed)) => {
                for ((lease, _), task_type) in results.iter().zip(types) {
                    self.held.remove(&lease.task_id);
                    if done.contains(lease) {
                        self.summary.completed += 1;
                        self.metrics.count(task_type, Outcome::completed, 1);
                        tracing::info!(task_id = lease.task_id, "task complete");
                    } else {
                        self.summary.lost += 1;
                        self.metrics.count(task_type, Outcome::lost, 1);
                        tracing::warn!(
                            task_id = lease.task_id,
                            "lease lost before the result was stored; result dropped"
                        );
                    }
                }
                claimed
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(tasks = results.len(), error = %e,
                    "database unreachable: the tasks' results are kept and stored when it is back");
                None
            }
            // Refused for good: the leases stay with this worker until they
            // expire, and the sweeper then hands the tasks to another replica.
            Err(e) => {
                tracing::error!(tasks = results.len(), error = %e, "could not store the tasks' results");
                for (lease, _) in &results {
                    self.held.remove(&lease.task_id);
                }
                None
            }
        }
    }

    /// Complete, and with `claim_for` claim up to that many in the same
    /// call; the leases completed and what was claimed (`None`: no claim).
    async fn store(
        &self,
        results: &[(Lease, TaskOutput)],
        claim_for: Option<i32>,
    ) -> Result<(Vec<Lease>, Option<Vec<Task>>), QueueError> {
        if let Some(limit) = claim_for {
            match self
                .queue
                .complete_and_claim(self.worker_id, results, self.task_types, limit)
                .await
            {
                Ok(c) => return Ok((c.completed, Some(c.claimed))),
                Err(e) if e.is_transient() => return Err(e),
                // The call changed nothing; a claim that fails must not
                // cost the results, so they are stored on their own.
                Err(e) => tracing::warn!(error = %e, "completing and claiming failed; completing alone"),
            }
        }
        let done = self.queue.complete_batch(self.worker_id, results).await?;
        Ok((done, None))
    }

    /// Store a failed attempt; false when the database could not be
    /// reached, and the failure is kept to be stored later.
    async fn fail(&mut self, lease: Lease, task_type: TaskType, failure: &Failure) -> bool {
        match self.queue.fail(self.worker_id, lease, failure).await {
            Ok(retry) => {
                self.summary.failed += 1;
                self.metrics.count(task_type, Outcome::failed, 1);
                tracing::warn!(task_id = lease.task_id, kind = ?failure.kind, error = %failure.message,
                    outcome = ?retry, "task failed");
            }
            Err(QueueError::LeaseLost { .. }) => {
                self.summary.lost += 1;
                self.metrics.count(task_type, Outcome::lost, 1);
                tracing::warn!(
                    task_id = lease.task_id,
                    "lease lost before the failure was stored; result dropped"
                );
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(task_id = lease.task_id, error = %e,
                    "database unreachable: the task's failure is kept and stored when it is back");
                return false;
            }
            Err(e) => {
                tracing::error!(task_id = lease.task_id, error = %e, "could not store the task's failure")
            }
        }
        true
    }

    /// Stop holding `lease`'s task, if it is held under that lease (not
    /// under a later claim of the same task).
    fn take_held(&mut self, lease: Lease) -> Option<Held> {
        let held = self.held.get(&lease.task_id)?;
        (held.lease == lease)
            .then(|| self.held.remove(&lease.task_id))
            .flatten()
    }

    /// Renew every held lease; cancel the handlers of leases that were
    /// lost. Once the database answers, store the results an outage kept;
    /// returns whether it did (their slots are free).
    async fn renew(&mut self) -> bool {
        if self.held.is_empty() {
            return false;
        }
        let leases: Vec<Lease> = self.held.values().map(|h| h.lease).collect();
        match self.queue.heartbeat(self.worker_id, &leases).await {
            Ok(lost) => {
                for lease in lost {
                    if let Some(held) = self.take_held(lease) {
                        tracing::warn!(
                            task_id = lease.task_id,
                            "lease lost (cancelled or swept): abandoning the task"
                        );
                        held.cancelled.cancel();
                        self.summary.lost += 1;
                        self.metrics.count(held.task_type, Outcome::lost, 1);
                    }
                }
                self.metrics.in_flight.set(self.held.len() as i64);
            }
            Err(e) => {
                tracing::warn!(error = %e, "lease heartbeat failed");
                return false;
            }
        }
        let waiting = self.waiting();
        if waiting > 0 {
            self.settle(Vec::new(), false).await;
        }
        self.waiting() < waiting
    }

    /// Hand what is still held back to the queue without spending attempts,
    /// waiting out an unreachable database until `window` ends. Finished
    /// tasks whose results still could not be stored are not released
    /// (that would run them again at once): their leases expire and the
    /// sweeper hands them on, as it does for all of them past the window.
    async fn release_all(&mut self, window: &CancellationToken) -> Result<(), QueueError> {
        let waiting = self.waiting();
        if waiting > 0 {
            tracing::error!(
                tasks = waiting,
                "stopping with results the database could not take; the sweeper hands their tasks on"
            );
        }
        let unfinished: Vec<Lease> = self
            .held
            .values()
            .filter(|h| h.unstored.is_none())
            .map(|h| h.lease)
            .collect();
        if unfinished.is_empty() {
            return Ok(());
        }
        let (queue, worker_id) = (self.queue, self.worker_id);
        let Some(released) = until_reachable("releasing unfinished tasks", window, || {
            queue.release(worker_id, &unfinished)
        })
        .await?
        else {
            tracing::error!(
                tasks = unfinished.len(),
                "the database stayed unreachable: the sweeper hands the unfinished tasks on when their leases expire"
            );
            return Ok(());
        };
        for lease in &released {
            if let Some(held) = self.held.remove(&lease.task_id) {
                self.metrics.count(held.task_type, Outcome::released, 1);
            }
        }
        self.summary.released += released.len() as u64;
        self.metrics.in_flight.set(self.held.len() as i64);
        tracing::info!(
            released = released.len(),
            "released unfinished tasks back to pending"
        );
        Ok(())
    }
}
