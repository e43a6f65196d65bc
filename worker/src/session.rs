//! A session's queue: its messages are handled strictly one after another.

use std::sync::Arc;

use bus::Delivery;
use schemas::SessionId;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::cache::CacheScope;
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

/// A delivery in a session's queue, with its place there: 0 for the first handed to the queue,
/// then 1, 2, and so on.
pub(crate) struct Queued {
    pub(crate) place: u64,
    pub(crate) delivery: Delivery,
}

/// Whether a newer message of the session has interrupted the one at `place`
/// (`double_texting: interrupt`). The partition runner, which sees deliveries arrive while the
/// session's task is busy, publishes the place of the newest interrupting message: every
/// message before it is interrupted. A value rather than a one-off signal, so that a message
/// interrupted while still waiting in the queue knows it as soon as it starts.
#[derive(Clone)]
pub(crate) struct Interruption {
    interrupted_before: watch::Receiver<u64>,
    place: u64,
}

impl Interruption {
    pub(crate) fn new(interrupted_before: watch::Receiver<u64>, place: u64) -> Self {
        Self { interrupted_before, place }
    }

    pub(crate) fn is_interrupted(&self) -> bool {
        *self.interrupted_before.borrow() > self.place
    }

    /// Resolves once the message is interrupted; never, if it is not.
    pub(crate) async fn interrupted(&self) {
        let mut interrupted_before = self.interrupted_before.clone();
        let place = self.place;
        if interrupted_before.wait_for(|before| *before > place).await.is_err() {
            // The runner let go of the queue: nothing can interrupt this message any more.
            std::future::pending::<()>().await;
        }
    }
}

pub(crate) async fn run(
    worker: Worker,
    ownership: Ownership,
    session: SessionId,
    mut queue: mpsc::UnboundedReceiver<Queued>,
    interrupted_before: watch::Receiver<u64>,
    finished: mpsc::UnboundedSender<(SessionId, u64)>,
    permits: Arc<Semaphore>,
) {
    let Ownership { cache, stop, abort } = ownership;
    while let Some(Queued { place, delivery }) = queue.recv().await {
        let sequence = delivery.sequence;
        let message_id = match &delivery.message {
            Ok(message) => message.message_id.clone(),
            Err(_) => continue,
        };
        // A message not yet started when shutdown begins goes back to the bus at once, so
        // the next owner of the partition need not wait for it to time out.
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => None,
            permit = permits.clone().acquire_owned() => permit.ok(),
        };
        match permit {
            Some(_permit) => {
                let interruption = Interruption::new(interrupted_before.clone(), place);
                process::handle(&worker, &cache, delivery, &interruption, &stop, &abort).await
            }
            None if abort.is_cancelled() => {}
            None => {
                if let Err(e) = delivery.acker.abandon().await {
                    tracing::warn!(event = "settle_failed", session_id = %session, message_id = %message_id, error = %e);
                }
            }
        }
        let _ = finished.send((session.clone(), sequence));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::watch;

    use super::Interruption;

    #[tokio::test]
    async fn a_message_is_interrupted_by_later_places_only() {
        let (interrupted_before, receiver) = watch::channel(0);
        let (first, second, third) = (
            Interruption::new(receiver.clone(), 0),
            Interruption::new(receiver.clone(), 1),
            Interruption::new(receiver, 2),
        );

        interrupted_before.send_replace(2);

        assert!(first.is_interrupted());
        assert!(second.is_interrupted());
        assert!(!third.is_interrupted(), "the interrupting message itself goes on");
        tokio::time::timeout(Duration::from_secs(1), second.interrupted()).await.expect("resolves at once");
    }

    #[tokio::test]
    async fn waiting_for_an_interruption_ends_when_one_comes_and_not_when_the_runner_lets_go() {
        let (interrupted_before, receiver) = watch::channel(0);
        let waiting = Interruption::new(receiver.clone(), 0);
        let abandoned = Interruption::new(receiver, 1);

        let waiter = tokio::spawn(async move { waiting.interrupted().await });
        interrupted_before.send_replace(1);
        tokio::time::timeout(Duration::from_secs(1), waiter).await.expect("the wait ended").unwrap();
        drop(interrupted_before);
        let after_letting_go = tokio::time::timeout(Duration::from_millis(100), abandoned.interrupted()).await;

        assert!(after_letting_go.is_err(), "no interruption can come any more, so the wait never ends");
        assert!(!abandoned.is_interrupted());
    }
}
