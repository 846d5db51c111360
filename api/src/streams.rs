//! Bounds on open event streams: each holds a connection, a job watch and a
//! broadcast receiver for as long as it is open, so how many there are
//! (per tenant and per process) and how long each lives are capped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::ApiError;

/// What a client over a stream limit is told to wait before trying again.
const RETRY_AFTER_SECONDS: u64 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    /// Open streams in this process, all tenants together.
    pub per_process: usize,
    /// Open streams of one tenant (all its keys) in this process.
    pub per_tenant: usize,
    /// A stream ends after this long; the client reconnects for more.
    pub max_duration: Duration,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            per_process: 1000,
            per_tenant: 50,
            max_duration: Duration::from_secs(15 * 60),
        }
    }
}

/// The streams open now, counted so that a new one can be refused.
pub struct OpenStreams {
    limits: StreamLimits,
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    by_tenant: HashMap<String, usize>,
}

/// One open stream's place in the count, given back when dropped.
pub struct StreamSlot {
    streams: Arc<OpenStreams>,
    tenant: String,
}

impl OpenStreams {
    pub fn new(limits: StreamLimits) -> Arc<Self> {
        Arc::new(OpenStreams {
            limits,
            counts: Mutex::new(Counts::default()),
        })
    }

    pub fn limits(&self) -> StreamLimits {
        self.limits
    }

    /// A slot for a new stream of `tenant`, or a 429 naming the limit.
    pub fn open(self: &Arc<Self>, tenant: &str) -> Result<StreamSlot, ApiError> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if counts.total >= self.limits.per_process {
            return Err(too_many(
                "open event streams on this server",
                "SSE_MAX_STREAMS",
                self.limits.per_process,
            ));
        }
        let of_tenant = counts.by_tenant.get(tenant).copied().unwrap_or(0);
        if of_tenant >= self.limits.per_tenant {
            return Err(too_many(
                "open event streams of this tenant",
                "SSE_MAX_STREAMS_PER_TENANT",
                self.limits.per_tenant,
            ));
        }
        counts.total += 1;
        *counts.by_tenant.entry(tenant.to_string()).or_default() += 1;
        Ok(StreamSlot {
            streams: self.clone(),
            tenant: tenant.to_string(),
        })
    }

    /// Streams open now (in total, and of one tenant).
    pub fn open_now(&self, tenant: &str) -> (usize, usize) {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        (counts.total, counts.by_tenant.get(tenant).copied().unwrap_or(0))
    }
}

fn too_many(what: &'static str, limit: &'static str, max: usize) -> ApiError {
    ApiError::TooManyRequests {
        what,
        limit,
        max,
        retry_after: RETRY_AFTER_SECONDS,
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut counts = self.streams.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.by_tenant.get_mut(&self.tenant) {
            *n -= 1;
            // Tenants without streams leave the map, so it stays small.
            if *n == 0 {
                counts.by_tenant.remove(&self.tenant);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_count_per_tenant_and_per_process_and_come_back_when_dropped() {
        let streams = OpenStreams::new(StreamLimits {
            per_process: 3,
            per_tenant: 2,
            max_duration: Duration::from_secs(1),
        });
        let a1 = streams.open("a").unwrap();
        let _a2 = streams.open("a").unwrap();
        match streams.open("a") {
            Err(ApiError::TooManyRequests { limit, max, .. }) => {
                assert_eq!((limit, max), ("SSE_MAX_STREAMS_PER_TENANT", 2))
            }
            _ => panic!("a third stream of one tenant"),
        }
        let _b1 = streams.open("b").unwrap();
        match streams.open("c") {
            Err(ApiError::TooManyRequests { limit, max, .. }) => {
                assert_eq!((limit, max), ("SSE_MAX_STREAMS", 3))
            }
            _ => panic!("a fourth stream in the process"),
        }
        drop(a1);
        assert_eq!(streams.open_now("a"), (2, 1));
        let _c1 = streams.open("c").unwrap();
        assert_eq!(streams.open_now("c"), (3, 1));
    }
}
