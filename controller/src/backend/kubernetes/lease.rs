//! Leader election with a `coordination.k8s.io/v1` Lease, as client-go's
//! leaderelection does it: the holder renews `spec.renewTime`; a standby
//! takes the Lease over once it has seen no renewal for
//! `leaseDurationSeconds` (measured on its own clock, so clock skew between
//! nodes does not matter). Every write carries the `resourceVersion` it
//! read, so two standbys racing for an expired Lease cannot both win.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::Client;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::reconcile::{Election, Leadership};

#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    /// This controller replica (the pod name on Kubernetes).
    pub identity: String,
    /// How long a Lease without renewal stays the holder's.
    pub lease_duration: Duration,
    /// How often the holder renews and a standby retries.
    pub retry_period: Duration,
    /// The holder gives up leadership if it could not renew for this long
    /// (shorter than the lease duration, so it stops before a standby starts).
    pub renew_deadline: Duration,
}

impl LeaseSettings {
    /// client-go's proportions: renew every 2 s of 15, give up after 10.
    pub fn new(namespace: &str, name: &str, identity: &str, lease_duration: Duration) -> Self {
        LeaseSettings {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration,
            retry_period: lease_duration.mul_f64(2.0 / 15.0),
            renew_deadline: lease_duration.mul_f64(10.0 / 15.0),
        }
    }
}

/// The Lease as last seen, and when it was first seen like that.
struct Observed {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    at: Instant,
}

struct LeaseLock {
    api: Api<Lease>,
    settings: LeaseSettings,
    observed: Option<Observed>,
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl LeaseLock {
    /// Take or renew the Lease. `Ok(true)`: this replica holds it now.
    async fn try_acquire_or_renew(&mut self) -> kube::Result<bool> {
        let me = self.settings.identity.clone();
        let duration = self.settings.lease_duration.as_secs().max(1) as i32;
        let Some(mut lease) = self.api.get_opt(&self.settings.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.settings.name.clone()),
                    namespace: Some(self.settings.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(duration),
                    acquire_time: Some(now()),
                    renew_time: Some(now()),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let changed = self
            .observed
            .as_ref()
            .is_none_or(|o| o.holder != holder || o.renew_time != spec.renew_time);
        if changed {
            self.observed = Some(Observed {
                holder: holder.clone(),
                renew_time: spec.renew_time.clone(),
                at: Instant::now(),
            });
        }
        let held_by_me = holder.as_deref() == Some(me.as_str());
        let expired = self.observed.as_ref().is_some_and(|o| {
            let lease_for =
                Duration::from_secs(spec.lease_duration_seconds.unwrap_or(duration).max(1) as u64);
            o.at.elapsed() >= lease_for
        });
        if !(held_by_me || holder.is_none() || expired) {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!held_by_me);
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(me),
            lease_duration_seconds: Some(duration),
            acquire_time: if held_by_me {
                spec.acquire_time
            } else {
                Some(now())
            },
            renew_time: Some(now()),
            lease_transitions: Some(transitions),
            ..spec
        });
        // `replace` sends the resourceVersion read above: a stale write is a 409.
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(written) => {
                let spec = written.spec.unwrap_or_default();
                self.observed = Some(Observed {
                    holder: spec.holder_identity,
                    renew_time: spec.renew_time,
                    at: Instant::now(),
                });
                Ok(true)
            }
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Give the Lease up so a standby need not wait for it to expire.
    async fn release(&mut self) -> kube::Result<()> {
        let Some(mut lease) = self.api.get_opt(&self.settings.name).await? else {
            return Ok(());
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(now());
        lease.spec = Some(spec);
        self.api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await?;
        Ok(())
    }
}

pub struct LeaseElection {
    lock: Arc<Mutex<LeaseLock>>,
    held: Arc<AtomicBool>,
    /// The passes' flag, cleared the moment renewing fails.
    passes: Option<Leadership>,
    renewing: Option<tokio::task::JoinHandle<()>>,
    retry_period: Duration,
}

impl LeaseElection {
    pub fn new(client: Client, settings: LeaseSettings) -> Self {
        let api = Api::namespaced(client, &settings.namespace);
        LeaseElection {
            retry_period: settings.retry_period,
            lock: Arc::new(Mutex::new(LeaseLock {
                api,
                settings,
                observed: None,
            })),
            held: Arc::new(AtomicBool::new(false)),
            passes: None,
            renewing: None,
        }
    }
}

impl Drop for LeaseElection {
    fn drop(&mut self) {
        if let Some(task) = self.renewing.take() {
            task.abort();
        }
    }
}

impl Election for LeaseElection {
    async fn acquire(&mut self, shutdown: &CancellationToken) -> anyhow::Result<bool> {
        let mut told = false;
        loop {
            match self.lock.lock().await.try_acquire_or_renew().await {
                Ok(true) => break,
                Ok(false) if !told => {
                    tracing::info!("standby: another controller holds the Lease; waiting");
                    told = true;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "cannot read or write the leader Lease; retrying"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(false),
                _ = tokio::time::sleep(self.retry_period) => {}
            }
        }
        self.held.store(true, Ordering::SeqCst);
        let (lock, held, period) = (self.lock.clone(), self.held.clone(), self.retry_period);
        let passes = self.passes.clone();
        self.renewing = Some(tokio::spawn(async move {
            let deadline = lock.lock().await.settings.renew_deadline;
            let mut renewed = Instant::now();
            loop {
                tokio::time::sleep(period).await;
                // Each renewal is bounded by what is left of the deadline, as
                // client-go does: a hung request must not keep us leader
                // after the Lease expired for the standby.
                let left = deadline.saturating_sub(renewed.elapsed());
                let attempt =
                    tokio::time::timeout(left, async { lock.lock().await.try_acquire_or_renew().await });
                match attempt.await {
                    Ok(Ok(true)) => renewed = Instant::now(),
                    Ok(Ok(false)) if renewed.elapsed() < deadline => {
                        tracing::warn!("the leader Lease changed under us (a conflict?); retrying");
                    }
                    Ok(Ok(false)) => {
                        tracing::error!("the leader Lease was taken over");
                        break;
                    }
                    Ok(Err(e)) if renewed.elapsed() < deadline => {
                        tracing::warn!(error = %e, "cannot renew the leader Lease; retrying");
                    }
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "could not renew the leader Lease within the renew deadline");
                        break;
                    }
                    Err(_) => {
                        tracing::error!("renewing the leader Lease hung past the renew deadline");
                        break;
                    }
                }
            }
            held.store(false, Ordering::SeqCst);
            if let Some(passes) = passes {
                passes.set(false);
            }
        }));
        Ok(true)
    }

    async fn still_held(&mut self) -> bool {
        self.held.load(Ordering::SeqCst)
    }

    fn share(&mut self, leadership: Leadership) {
        self.passes = Some(leadership);
    }

    async fn release(mut self) -> anyhow::Result<()> {
        if let Some(task) = self.renewing.take() {
            task.abort();
        }
        if self.held.swap(false, Ordering::SeqCst) {
            self.lock.lock().await.release().await?;
        }
        Ok(())
    }
}
