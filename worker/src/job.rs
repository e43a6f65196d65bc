//! A job: a delivery read into a user message, as a session's queue carries it, and the
//! [`Interruption`] through which a newer message of an `interrupt` session, or a cancel
//! request, can stop it.

use std::collections::BTreeSet;

use bus::Acker;
use schemas::{FinishReason, UserMessage};
use tokio::sync::watch;

/// A delivery whose message could be read, with its place in its session's queue: 0 for the
/// first handed to the queue, then 1, 2, and so on. The partition runner parses each delivery
/// once; what cannot be read never becomes a job (it goes to the dead letters).
pub(crate) struct Job {
    pub(crate) place: u64,
    /// The bus message's position in its partition ([`bus::Delivery::sequence`]).
    pub(crate) sequence: u64,
    /// How many times the bus has delivered it, this time included.
    pub(crate) attempt: u64,
    pub(crate) message: UserMessage,
    /// Settles the delivery with the broker; see `settle.rs`.
    pub(crate) acker: Box<dyn Acker>,
    /// The trace the gateway enqueued the message in ([`bus::Delivery::trace`]).
    pub(crate) trace: bus::trace_context::TraceHeaders,
}

/// Whether a newer message of the session has interrupted the one at `place`
/// (`double_texting: interrupt`). The partition runner, which sees deliveries arrive while the
/// session's task is busy, publishes the place of the newest interrupting message: every
/// message before it is interrupted. A value rather than a one-off signal, so that a message
/// interrupted while still waiting in the queue knows it as soon as it starts.
///
/// A cancel request works the same way for one message: the runner adds the place of the
/// message it cancels to a set, and the message stops as if interrupted, with the finish reason
/// `cancelled`.
#[derive(Clone)]
pub(crate) struct Interruption {
    interrupted_before: watch::Receiver<u64>,
    cancelled: watch::Receiver<BTreeSet<u64>>,
    place: u64,
}

impl Interruption {
    pub(crate) fn new(interrupted_before: watch::Receiver<u64>, place: u64) -> Self {
        // Nobody can cancel through a channel whose sender is gone.
        let (_, cancelled) = watch::channel(BTreeSet::new());
        Self { interrupted_before, cancelled, place }
    }

    /// Also stopped when the runner marks this message's place cancelled in `cancelled`.
    pub(crate) fn cancellable(self, cancelled: watch::Receiver<BTreeSet<u64>>) -> Self {
        Self { cancelled, ..self }
    }

    pub(crate) fn is_interrupted(&self) -> bool {
        *self.interrupted_before.borrow() > self.place || self.is_cancelled()
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled.borrow().contains(&self.place)
    }

    /// The finish reason of the reply this stopped: `cancelled` or `interrupted`.
    pub(crate) fn finish_reason(&self) -> FinishReason {
        if self.is_cancelled() { FinishReason::cancelled() } else { FinishReason::interrupted() }
    }

    /// Resolves once the message is interrupted or cancelled; never, if it is not.
    pub(crate) async fn interrupted(&self) {
        let (mut interrupted_before, mut cancelled) = (self.interrupted_before.clone(), self.cancelled.clone());
        let place = self.place;
        // Once the runner lets go of the queue, nothing can stop this message any more.
        let by_newer = async move {
            if interrupted_before.wait_for(|before| *before > place).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let by_cancel = async move {
            if cancelled.wait_for(|places| places.contains(&place)).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = by_newer => {}
            _ = by_cancel => {}
        }
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

    #[tokio::test]
    async fn a_cancel_stops_its_place_only_and_names_itself_in_the_finish_reason() {
        let (_interrupted_before, receiver) = watch::channel(0);
        let (cancel, cancelled) = watch::channel(std::collections::BTreeSet::new());
        let first = Interruption::new(receiver.clone(), 0).cancellable(cancelled.clone());
        let second = Interruption::new(receiver, 1).cancellable(cancelled);

        cancel.send_modify(|places| {
            places.insert(1);
        });

        assert!(!first.is_interrupted(), "a cancel stops only its own message");
        assert!(second.is_interrupted());
        assert!(second.finish_reason().is_cancelled());
        tokio::time::timeout(Duration::from_secs(1), second.interrupted()).await.expect("resolves at once");
    }
}
