//! A session's queue: its messages are handled strictly one after another.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;

use schemas::SessionId;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::cache::CacheScope;
use crate::job::{Interruption, Job};
use crate::settle::{Decision, settle};
use crate::{Worker, process, telemetry};

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
    while let Some(job) = queue.recv().await {
        let sequence = job.sequence;
        // A message not yet started when shutdown begins goes back to the bus at once, so
        // the next owner of the partition need not wait for it to time out.
        let permit = tokio::select! {
            biased;
            _ = ownership.stop.cancelled() => None,
            permit = permits.clone().acquire_owned() => permit.ok(),
        };
        match permit {
            Some(_permit) => {
                let interruption =
                    Interruption::new(interrupted_before.clone(), job.place).cancellable(cancelled.clone());
                handle_in_place(&worker, &ownership, &session, &job, &interruption).await;
            }
            None => {
                let decision = if ownership.abort.is_cancelled() { Decision::Abandon } else { Decision::HandBack };
                let span = tracing::info_span!("message", session_id = %session, message_id = %job.message.message_id);
                settle(job.acker.as_ref(), decision).instrument(span).await;
            }
        }
        let _ = finished.send((session.clone(), sequence));
    }
}

/// The longest wait before a message whose handling panicked is handled again.
const PANIC_RETRY_MAX: Duration = Duration::from_secs(30);

/// Handles `job`, and handles it again, in place, for as long as its handling panics (a bug).
/// In place, so that the session's later messages never overtake it and no other session pays
/// for it; with a growing pause between tries (from 100 ms up to [`PANIC_RETRY_MAX`]), so that
/// a panic that comes back every time costs little. Each try that reaches the model counts as a
/// generation start in the store, so a message that panics every time goes to the dead letters
/// once it reaches [`crate::WorkerConfig::max_generation_starts`]. What the cache held of the
/// session is dropped after a panic: the handling may have stopped halfway through an update.
async fn handle_in_place(
    worker: &Worker,
    ownership: &Ownership,
    session: &SessionId,
    job: &Job,
    interruption: &Interruption,
) {
    let Ownership { cache, stop, abort } = ownership;
    let mut pause = Duration::from_millis(100);
    loop {
        let handled =
            AssertUnwindSafe(process::handle(worker, cache, job, interruption, stop, abort)).catch_unwind().await;
        let Err(panic) = handled else { return };
        let panic = telemetry::panic_message(panic.as_ref());
        tracing::error!(event = "message_panicked", session_id = %session, message_id = %job.message.message_id, panic, retry_in = ?pause, "handling the message panicked; it is handled again");
        telemetry::message_panicked();
        cache.invalidate(session);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.cancelled() => {
                let decision = if abort.is_cancelled() { Decision::Abandon } else { Decision::HandBack };
                let span = tracing::info_span!("message", session_id = %session, message_id = %job.message.message_id);
                return settle(job.acker.as_ref(), decision).instrument(span).await;
            }
            _ = abort.cancelled() => return settle(job.acker.as_ref(), Decision::Abandon).await,
        }
        pause = (pause * 2).min(PANIC_RETRY_MAX);
    }
}
