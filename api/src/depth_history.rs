//! Queue depth over the last hour, sampled by this process: the console's
//! chart. The queue keeps only the current depth, so a background task
//! reads it every `interval` into a bounded ring; each API process keeps
//! its own samples, from when it started.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use queue::{Queue, TaskDepth};
use tokio::time::{interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// How often the depth is read, and how far back samples are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistorySettings {
    pub interval: Duration,
    pub span: Duration,
}

impl Default for HistorySettings {
    fn default() -> Self {
        HistorySettings {
            interval: Duration::from_secs(15),
            span: Duration::from_secs(3600),
        }
    }
}

impl HistorySettings {
    /// Samples that cover `span`: at least one.
    fn capacity(&self) -> usize {
        let interval = self.interval.as_secs_f64().max(0.001);
        ((self.span.as_secs_f64() / interval).ceil() as usize).max(1)
    }
}

/// The depth of every task type at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct DepthSample {
    pub at: DateTime<Utc>,
    pub depth: Vec<TaskDepth>,
}

/// A bounded ring of samples, oldest first; shared by the sampler and the
/// route that serves it.
#[derive(Debug)]
pub struct DepthHistory {
    settings: HistorySettings,
    samples: Mutex<VecDeque<DepthSample>>,
}

impl DepthHistory {
    pub fn new(settings: HistorySettings) -> Arc<Self> {
        Arc::new(DepthHistory {
            samples: Mutex::new(VecDeque::with_capacity(settings.capacity())),
            settings,
        })
    }

    pub fn settings(&self) -> HistorySettings {
        self.settings
    }

    /// Keep `sample`, dropping the oldest when full.
    pub fn push(&self, sample: DepthSample) {
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if samples.len() >= self.settings.capacity() {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// Every kept sample, oldest first.
    pub fn samples(&self) -> Vec<DepthSample> {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        samples.iter().cloned().collect()
    }

    /// Read the depth now and every `interval` until `shutdown`. A failed
    /// read leaves a gap (logged), not a zero: a chart should not show an
    /// outage as an empty queue.
    pub async fn sample_until(self: Arc<Self>, queue: Queue, shutdown: CancellationToken) {
        let mut tick = interval(self.settings.interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => match queue.depth().await {
                    Ok(depth) => self.push(DepthSample { at: Utc::now(), depth }),
                    Err(error) => tracing::warn!(%error, "queue depth sample failed"),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use queue::TaskType;

    use super::*;

    fn sample(pending: i64) -> DepthSample {
        let mut depth = TaskDepth::empty(TaskType::TextGeneration);
        depth.pending = pending;
        DepthSample {
            at: Utc::now(),
            depth: vec![depth],
        }
    }

    #[test]
    fn the_ring_keeps_the_newest_samples_that_cover_the_span() {
        let history = DepthHistory::new(HistorySettings {
            interval: Duration::from_secs(15),
            span: Duration::from_secs(60),
        });
        for pending in 0..6 {
            history.push(sample(pending));
        }
        let kept: Vec<i64> = history.samples().iter().map(|s| s.depth[0].pending).collect();
        assert_eq!(kept, vec![2, 3, 4, 5], "an hour at 15 s is 240; a minute is 4");
    }

    #[test]
    fn an_hour_at_the_default_interval_is_240_samples() {
        assert_eq!(HistorySettings::default().capacity(), 240);
        let odd = HistorySettings {
            interval: Duration::from_secs(7),
            span: Duration::from_secs(60),
        };
        assert_eq!(odd.capacity(), 9);
    }
}
