//! The delivery loop: every gateway takes finished channel replies from the bus's durable queue
//! of deliveries (competing with the other gateways), hands each to its channel's adapter, and
//! settles it by what the attempt gave: delivered or refused for good (`410 Gone`):
//! acknowledged; failed: back on the queue for the next attempt after the schedule's delay
//! (jittered, or the receiver's `Retry-After` if longer); failed after the last attempt: kept
//! as undeliverable. While an attempt runs, the gateway reports progress, so that the bus hands
//! the delivery to another gateway only if this one dies.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bus::{Acker, PendingDelivery};
use futures::StreamExt;
use schemas::ChannelDelivery;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{Channels, DeliverySettings};
use crate::{AppState, telemetry};

/// How many deliveries one gateway attempts at once.
const CONCURRENCY: usize = 64;
/// How often a running attempt reports progress to the bus (well within NATS' 10 s ack wait).
const PROGRESS_EVERY: Duration = Duration::from_secs(3);
/// The longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// What one attempt gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Attempt {
    /// The receiver took it (2xx).
    Delivered,
    /// The receiver refused it for good (410): no more attempts.
    Gone,
    /// It failed and may succeed later; `reason` labels the failure metric.
    Failed { reason: &'static str, retry_after: Option<Duration> },
}

/// Delivers finished replies of one channel.
#[async_trait]
pub(crate) trait Deliver: Send + Sync {
    async fn deliver(&self, delivery: &ChannelDelivery) -> Attempt;
}

/// Runs until `closing` is cancelled. Attempts still running then are abandoned unsettled: the
/// bus hands them to another gateway.
pub(crate) async fn run(state: AppState, closing: CancellationToken) {
    let channels = state.channels.clone();
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    loop {
        match state.bus.consume_deliveries().await {
            Ok(mut pending) => {
                tracing::info!(event = "channel_deliveries_started", "delivering channel replies");
                loop {
                    let next = tokio::select! {
                        next = pending.next() => next,
                        _ = closing.cancelled() => return,
                    };
                    let Some(next) = next else { break };
                    let permit = permits.clone().acquire_owned().await.expect("the semaphore is never closed");
                    let channels = channels.clone();
                    tokio::spawn(async move {
                        attempt(&channels, next).await;
                        drop(permit);
                    });
                }
                tracing::warn!(event = "channel_deliveries_interrupted", "the deliveries consumer ended; resuming");
            }
            Err(e) => {
                tracing::warn!(event = "channel_deliveries_unavailable", error = %e, "cannot take deliveries; retrying")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = closing.cancelled() => return,
        }
    }
}

/// One attempt at one delivery, settled.
async fn attempt(channels: &Channels, pending: PendingDelivery) {
    let PendingDelivery { delivery, attempt, acker } = pending;
    let delivery = match delivery {
        Ok(delivery) => delivery,
        Err(why) => {
            tracing::error!(event = "channel_delivery_unreadable", error = %why, "keeping an unreadable delivery as undeliverable");
            settle(acker.dead_letter("unreadable").await);
            return;
        }
    };
    let channel = delivery.origin.channel.as_str();
    let span = tracing::info_span!("channel_delivery", channel, session_id = %delivery.event.session_id, message_id = %delivery.event.message_id, attempt);
    let _ = tracing::Instrument::instrument(
        async {
            let result = match channels.adapter(channel) {
                Some(adapter) => with_progress(acker.as_ref(), adapter.deliver(&delivery)).await,
                // A gateway whose channels file lacks the channel (one being changed, say)
                // leaves the delivery for a later attempt, perhaps by another gateway.
                None => Attempt::Failed { reason: "unknown_channel", retry_after: None },
            };
            settle_attempt(&channels.config.delivery, &delivery, attempt, acker.as_ref(), result).await;
        },
        span,
    )
    .await;
}

async fn settle_attempt(
    settings: &DeliverySettings,
    delivery: &ChannelDelivery,
    attempt: u64,
    acker: &dyn Acker,
    result: Attempt,
) {
    let channel = delivery.origin.channel.as_str();
    match result {
        Attempt::Delivered => {
            let seconds = (time::OffsetDateTime::now_utc() - delivery.finished_at).as_seconds_f64().max(0.0);
            telemetry::channel_delivery_attempted(channel, "delivered");
            telemetry::channel_reply_delivered(channel, seconds);
            tracing::info!(event = "channel_reply_delivered", seconds, "reply delivered");
            settle(acker.ack().await);
        }
        Attempt::Gone => {
            telemetry::channel_delivery_attempted(channel, "gone");
            tracing::warn!(event = "channel_reply_gone", "the receiver answered 410 Gone: no more attempts");
            settle(acker.ack().await);
        }
        Attempt::Failed { reason, retry_after } => {
            telemetry::channel_delivery_attempted(channel, "failed");
            telemetry::channel_delivery_failed(channel, reason);
            match next_delay(settings, attempt, retry_after, rand::random::<f64>()) {
                Some(delay) => {
                    tracing::info!(event = "channel_delivery_retry", reason, retry_in = ?delay, "delivery failed; retrying later");
                    settle(acker.retry_after(delay).await);
                }
                None => {
                    telemetry::channel_reply_undeliverable(channel);
                    tracing::error!(
                        event = "channel_reply_undeliverable",
                        reason,
                        "delivery failed for the last time; kept as undeliverable"
                    );
                    settle(acker.dead_letter("gave_up").await);
                }
            }
        }
    }
}

/// The wait before the attempt after `attempt` (1-based), or None after the last. `unit` in
/// [0, 1) draws the jitter: up to a fifth of the delay either way.
pub(crate) fn next_delay(
    settings: &DeliverySettings,
    attempt: u64,
    retry_after: Option<Duration>,
    unit: f64,
) -> Option<Duration> {
    let scheduled = *settings.retry_schedule.get(usize::try_from(attempt).ok()?.checked_sub(1)?)?;
    let jittered = scheduled.mul_f64(0.8 + 0.4 * unit.clamp(0.0, 1.0));
    Some(match retry_after {
        Some(asked) => jittered.max(asked.min(MAX_RETRY_AFTER)),
        None => jittered,
    })
}

/// A failed settlement leaves the delivery with the bus, which hands it out again.
fn settle(result: Result<(), bus::BusError>) {
    if let Err(e) = result {
        tracing::warn!(event = "channel_delivery_settle_failed", error = %e, "the bus will hand this delivery out again");
    }
}

/// Runs an attempt, reporting progress to the bus while it runs.
async fn with_progress(acker: &dyn Acker, work: impl Future<Output = Attempt>) -> Attempt {
    let mut work = std::pin::pin!(work);
    let mut ticks = tokio::time::interval(PROGRESS_EVERY);
    ticks.tick().await;
    loop {
        tokio::select! {
            result = &mut work => return result,
            _ = ticks.tick() => {
                if let Err(e) = acker.in_progress().await {
                    tracing::debug!(event = "channel_delivery_progress_failed", error = %e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> DeliverySettings {
        DeliverySettings {
            retry_schedule: vec![Duration::from_secs(5), Duration::from_secs(30)],
            attempt_timeout: Duration::from_secs(10),
        }
    }

    #[test]
    fn delays_follow_the_schedule_with_a_fifth_of_jitter_then_stop() {
        assert_eq!(next_delay(&settings(), 1, None, 0.5), Some(Duration::from_secs(5)));
        assert_eq!(next_delay(&settings(), 1, None, 0.0), Some(Duration::from_secs(4)));
        assert_eq!(next_delay(&settings(), 2, None, 1.0), Some(Duration::from_secs(36)));
        assert_eq!(next_delay(&settings(), 3, None, 0.5), None);
    }

    #[test]
    fn a_longer_retry_after_wins_and_a_shorter_one_does_not() {
        assert_eq!(next_delay(&settings(), 1, Some(Duration::from_secs(60)), 0.5), Some(Duration::from_secs(60)));
        assert_eq!(next_delay(&settings(), 1, Some(Duration::from_secs(1)), 0.5), Some(Duration::from_secs(5)));
        assert_eq!(next_delay(&settings(), 2, Some(Duration::from_secs(60)), 0.5), Some(Duration::from_secs(60)));
    }
}
