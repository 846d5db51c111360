//! One LISTEN connection per API process, fanned out to every event stream.
//!
//! A stream per client holding its own database connection would not scale;
//! instead one task listens on the job-status channel and broadcasts job
//! ids. Each stream re-reads its job when its id goes by.

use std::time::Duration;

use queue::{JobStatusEvent, JobStatusNotifications, Queue};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// Notifications buffered per subscriber; one that falls further behind
/// re-reads its job instead of seeing each.
const CAPACITY: usize = 1024;
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct JobEvents {
    sender: broadcast::Sender<JobStatusEvent>,
}

impl JobEvents {
    /// LISTEN (before returning, so no change after startup is missed) and
    /// forward notifications until `shutdown`.
    pub async fn start(queue: Queue, shutdown: CancellationToken) -> queue::Result<Self> {
        let notifications = queue.listen_job_status().await?;
        let (sender, _) = broadcast::channel(CAPACITY);
        tokio::spawn(forward(queue, notifications, sender.clone(), shutdown));
        Ok(JobEvents { sender })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<JobStatusEvent> {
        self.sender.subscribe()
    }
}

async fn forward(
    queue: Queue,
    mut notifications: JobStatusNotifications,
    sender: broadcast::Sender<JobStatusEvent>,
    shutdown: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return,
            event = notifications.next() => event,
        };
        match event {
            // No subscribers is fine: nobody is watching.
            Ok(event) => drop(sender.send(event)),
            Err(error) => {
                tracing::warn!(%error, "job status listener failed; reconnecting");
                notifications = loop {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(RECONNECT_DELAY) => {}
                    }
                    match queue.listen_job_status().await {
                        Ok(listener) => break listener,
                        Err(error) => tracing::warn!(%error, "job status listener reconnect failed"),
                    }
                };
                // Changes made while disconnected were not heard.
                drop(sender.send(JobStatusEvent::Resync));
            }
        }
    }
}
