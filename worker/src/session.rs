//! A session's queue: its messages are handled strictly one after another.

use std::sync::Arc;

use schemas::SessionId;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::cache::CacheScope;
use crate::job::{Interruption, Job};
use crate::settle::{Decision, settle};
use crate::{Worker, process};

/// What a session's queue works under: its partition's current ownership.
#[derive(Clone)]
pub(crate) struct Ownership {
    /// The ownership's share of the context cache.
    pub(crate) cache: CacheScope,
    /// Take nothing new; let what is in hand finish.
    pub(crate) stop: CancellationToken,
    /// Abandon what is in hand.
    pub(crate) abort: CancellationToken,
}

/// Handles the session's jobs in the order they come, each once a generation permit is free,
/// and reports each finished one (by its bus sequence) to the partition runner.
// Each argument is one channel or handle the runner hands the queue; bundling them would only
// move the list into a struct built at this one call site.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    worker: Worker,
    ownership: Ownership,
    session: SessionId,
    mut queue: mpsc::UnboundedReceiver<Job>,
    interrupted_before: watch::Receiver<u64>,
    cancelled: watch::Receiver<std::collections::BTreeSet<u64>>,
    finished: mpsc::UnboundedSender<(SessionId, u64)>,
    permits: Arc<Semaphore>,
) {
    let Ownership { cache, stop, abort } = ownership;
    while let Some(job) = queue.recv().await {
        let sequence = job.sequence;
        // A message not yet started when shutdown begins goes back to the bus at once, so
        // the next owner of the partition need not wait for it to time out.
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => None,
            permit = permits.clone().acquire_owned() => permit.ok(),
        };
        match permit {
            Some(_permit) => {
                let interruption =
                    Interruption::new(interrupted_before.clone(), job.place).cancellable(cancelled.clone());
                process::handle(&worker, &cache, job, &interruption, &stop, &abort).await
            }
            None => {
                let decision = if abort.is_cancelled() { Decision::Abandon } else { Decision::HandBack };
                let span = tracing::info_span!("message", session_id = %session, message_id = %job.message.message_id);
                settle(job.acker.as_ref(), decision).instrument(span).await;
            }
        }
        let _ = finished.send((session.clone(), sequence));
    }
}
