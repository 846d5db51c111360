//! Group commit for single-job creations.
//!
//! Each `POST /v1/jobs` would otherwise be its own transaction, and the
//! NOTIFY that wakes workers makes PostgreSQL serialize committing
//! transactions, so creations/s would be capped by commit latency. Instead,
//! requests that arrive while earlier batches are being written are
//! gathered into one `enqueue_batch` call: one transaction and one round
//! trip for all of them. Nothing waits for a batch to fill: an idle server
//! writes each job at once.

use std::sync::Arc;

use queue::{Enqueued, NewJob, Queue, QueueError};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Jobs written in one transaction at most.
const MAX_GROUP: usize = 128;
/// Batches written at once; while they are in flight, new requests queue
/// up and form the next ones.
const CONCURRENT_GROUPS: usize = 4;

type Reply = oneshot::Sender<Result<Enqueued, QueueError>>;

/// Handle for submitting jobs; cheap to clone.
#[derive(Clone)]
pub struct Enqueuer {
    submit: mpsc::Sender<(NewJob, Reply)>,
}

impl Enqueuer {
    /// Start the grouping task. It ends once every handle is dropped and
    /// the submitted jobs are written.
    pub fn start(queue: Queue) -> Self {
        let (submit, requests) = mpsc::channel(MAX_GROUP * CONCURRENT_GROUPS);
        tokio::spawn(group_and_write(queue, requests));
        Enqueuer { submit }
    }

    pub async fn enqueue(&self, job: NewJob) -> Result<Enqueued, QueueError> {
        let (reply, answer) = oneshot::channel();
        self.submit
            .send((job, reply))
            .await
            .map_err(|_| QueueError::Database(sqlx::Error::PoolClosed))?;
        answer
            .await
            .map_err(|_| QueueError::Database(sqlx::Error::WorkerCrashed))?
    }
}

async fn group_and_write(queue: Queue, mut requests: mpsc::Receiver<(NewJob, Reply)>) {
    let slots = Arc::new(Semaphore::new(CONCURRENT_GROUPS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = requests.recv().await else {
            return;
        };
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match requests.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        let queue = queue.clone();
        tokio::spawn(async move {
            write_group(&queue, group).await;
            drop(slot);
        });
    }
}

async fn write_group(queue: &Queue, group: Vec<(NewJob, Reply)>) {
    let (jobs, replies): (Vec<NewJob>, Vec<Reply>) = group.into_iter().unzip();
    if jobs.len() > 1 {
        match queue.enqueue_batch(jobs.clone()).await {
            Ok(written) => {
                for (reply, enqueued) in replies.into_iter().zip(written) {
                    // The requester may have gone away; its job stays written.
                    let _ = reply.send(Ok(enqueued));
                }
                return;
            }
            // The group may have been written, its answer lost (the
            // connection dropped at the commit): written again one by one,
            // every job without an idempotency key would exist twice. Each
            // request gets the error, as a request of its own would, and its
            // client decides (a key makes the retry safe).
            Err(QueueError::Database(error)) if may_have_written(&error) => {
                tracing::warn!(%error, jobs = jobs.len(), "group enqueue failed with its outcome unknown");
                for reply in replies {
                    let _ = reply.send(Err(outcome_unknown(&error)));
                }
                return;
            }
            // One job's error (a reused idempotency key, say) fails the whole
            // transaction; write each on its own so only that request sees it.
            Err(error) => {
                tracing::debug!(%error, jobs = jobs.len(), "group enqueue failed; retrying one by one")
            }
        }
    }
    let each = jobs.into_iter().zip(replies).map(|(job, reply)| async move {
        let _ = reply.send(queue.enqueue(job).await);
    });
    futures::future::join_all(each).await;
}

/// Whether a failed enqueue may still have written its jobs: a connection
/// lost (or a pooled one broken) with the statement sent. The database's
/// own refusals roll the statement back, and a connection never acquired
/// sent nothing.
fn may_have_written(error: &sqlx::Error) -> bool {
    !matches!(
        error,
        sqlx::Error::Database(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed
    )
}

/// The group's error, for each of its requests (errors are not `Clone`): a
/// connection error, which the API answers with 503.
fn outcome_unknown(error: &sqlx::Error) -> QueueError {
    let kind = match error {
        sqlx::Error::Io(io) => io.kind(),
        _ => std::io::ErrorKind::ConnectionAborted,
    };
    QueueError::Database(sqlx::Error::Io(std::io::Error::new(kind, error.to_string())))
}
