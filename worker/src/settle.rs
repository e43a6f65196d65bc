//! What happens to a delivery, decided once per delivery as a [`Decision`] and carried out in
//! one place ([`settle`]): the log line, the metric and the call to the bus.
//!
//! Every way of handling a message ends in a decision, in the spirit of apalis'
//! `AbortError` / `RetryAfterError`: the handler says what should happen next, not how to tell
//! the broker.

use std::time::Duration;

use bus::Acker;

use crate::telemetry;

/// What to do with a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Done with it, for the reason given: never deliver it again.
    Ack(Outcome),
    /// Dropped while in hand (the partition's ownership ended, or shutdown came while waiting
    /// on the store): leave it unsettled, and the bus delivers it again, to the next owner.
    Abandon,
    /// Not started, and this worker is handing the partition over: give it back to the bus at
    /// once, so the next owner need not wait for it to time out ([`Acker::abandon`]).
    HandBack,
    /// It can never be processed (its bytes are not a message, or its generation was started
    /// too many times): to the dead letters, with the reason's label and what happened.
    Reject { reason: &'static str, detail: String },
    /// Not done: deliver it again after the delay. (Every failure the worker meets today is
    /// either waited out in place, which keeps the session's order, or settled for good; this is
    /// here for the first one that is neither.)
    #[cfg_attr(not(test), expect(dead_code, reason = "no handler asks for a delayed redelivery yet"))]
    RetryAfter(Duration),
}

/// How a delivery was done with; each names its label of the messages-settled metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Answered, its reply stored and announced.
    Replied,
    /// Cut short by a newer message of its session; what was generated is its reply.
    Interrupted,
    /// Stopped by a cancel request; what was generated is its reply.
    Cancelled,
    /// A cancel request, carried out (or finding nothing of its message in hand).
    CancelRequest,
    /// The model failed it for good; the failure is stored and announced.
    Failed,
    /// The store refused its records for good; the client got an `error` event.
    StoreFailed,
    /// Answered before (or being answered by another copy in hand); nothing new was done.
    Duplicate,
    /// Its session was deleted; it was dropped.
    SessionGone,
}

impl Outcome {
    /// The outcome's label in `chatfleet_worker_messages_total`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Replied => "replied",
            Self::Interrupted => "interrupted",
            Self::Cancelled => "cancelled",
            Self::CancelRequest => "cancel_request",
            Self::Failed => "failed",
            Self::StoreFailed => "store_failed",
            Self::Duplicate => "duplicate",
            Self::SessionGone => "session_gone",
        }
    }
}

/// Carries out `decision` for the delivery `acker` settles. A failed settlement is logged and
/// otherwise ignored: the bus delivers the message again, and a stored outcome is recognised.
pub(crate) async fn settle(acker: &dyn Acker, decision: Decision) {
    let result = match decision {
        Decision::Ack(outcome) => {
            telemetry::message_settled(outcome.label());
            acker.ack().await
        }
        Decision::Abandon => {
            tracing::info!(event = "message_abandoned", "left for redelivery");
            Ok(())
        }
        Decision::HandBack => acker.abandon().await,
        Decision::Reject { reason, detail } => {
            tracing::error!(event = "message_rejected", reason, detail = %detail, "sending the message to the dead letters");
            telemetry::message_settled("rejected");
            telemetry::dead_lettered(reason);
            acker.dead_letter(reason).await
        }
        Decision::RetryAfter(delay) => {
            tracing::warn!(event = "message_retry", retry_in = ?delay, "delivering the message again later");
            telemetry::message_settled("retried");
            acker.retry_after(delay).await
        }
    };
    if let Err(e) = result {
        tracing::warn!(event = "settle_failed", error = %e, "the bus did not take the settlement");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use async_trait::async_trait;
    use bus::{Acker, BusError};

    use super::{Decision, Outcome, settle};

    /// Records which settlement the bus was asked for.
    #[derive(Default)]
    struct Recording(Mutex<Vec<String>>);

    impl Recording {
        fn push(&self, call: impl Into<String>) -> Result<(), BusError> {
            self.0.lock().unwrap().push(call.into());
            Ok(())
        }
    }

    #[async_trait]
    impl Acker for Recording {
        async fn ack(&self) -> Result<(), BusError> {
            self.push("ack")
        }
        async fn retry_after(&self, delay: Duration) -> Result<(), BusError> {
            self.push(format!("retry_after {delay:?}"))
        }
        async fn in_progress(&self) -> Result<(), BusError> {
            self.push("in_progress")
        }
        async fn reject(&self) -> Result<(), BusError> {
            self.push("reject")
        }
        async fn dead_letter(&self, reason: &str) -> Result<(), BusError> {
            self.push(format!("dead_letter {reason}"))
        }
        async fn abandon(&self) -> Result<(), BusError> {
            self.push("abandon")
        }
    }

    async fn calls_for(decision: Decision) -> Vec<String> {
        let acker = Recording::default();
        settle(&acker, decision).await;
        acker.0.into_inner().unwrap()
    }

    #[tokio::test]
    async fn each_decision_asks_the_bus_for_its_own_settlement_and_abandoning_asks_for_none() {
        assert_eq!(calls_for(Decision::Ack(Outcome::StoreFailed)).await, ["ack"]);
        assert_eq!(calls_for(Decision::Abandon).await, Vec::<String>::new());
        assert_eq!(calls_for(Decision::HandBack).await, ["abandon"]);
        let unreadable = Decision::Reject { reason: bus::UNREADABLE, detail: "not JSON".into() };
        assert_eq!(calls_for(unreadable).await, ["dead_letter unreadable"]);
        assert_eq!(calls_for(Decision::RetryAfter(Duration::from_secs(2))).await, ["retry_after 2s"]);
    }
}
