//! Handing a channel message's outcome to the gateways: a message that a chat platform or a
//! webhook integration brought (its envelope names a [`schemas::ChannelOrigin`]) gets its
//! terminal event published to the bus's durable queue of pending deliveries, which the
//! gateways deliver from. The worker never looks inside the origin: it stays
//! platform-agnostic.
//!
//! This happens after the outcome is stored and before the delivery of the user message is
//! acknowledged, so a worker that dies in between answers the redelivered message by announcing
//! the stored outcome again, and hands it over again; the bus (on NATS) and the receivers
//! (by the reply id) drop the repeat.

use std::time::Duration;

use bus::Bus;
use schemas::{ChannelDelivery, ReplyEvent, UserMessage};
use tokio_util::sync::CancellationToken;

use crate::telemetry;

/// The worker was told to stop before the bus took the delivery.
#[derive(Debug)]
pub(crate) struct Stopped;

/// Publishes the outcome of `message` for delivery to its channel, if it came from one,
/// retrying while the bus is unavailable; `stop` ends the wait (the message's delivery is then
/// left unsettled, and its next handling hands the outcome over again).
pub(crate) async fn hand_over(
    bus: &dyn Bus,
    message: &UserMessage,
    event: &ReplyEvent,
    stop: &CancellationToken,
) -> Result<(), Stopped> {
    let Some(origin) = &message.channel else {
        return Ok(());
    };
    let delivery = ChannelDelivery {
        v: schemas::ENVELOPE_VERSION,
        origin: origin.clone(),
        event: event.clone(),
        finished_at: time::OffsetDateTime::now_utc(),
    };
    let mut delay = Duration::from_millis(100);
    loop {
        match bus.publish_delivery(&delivery).await {
            Ok(()) => {
                tracing::info!(event = "channel_delivery_queued", channel = %origin.channel, "reply queued for its channel");
                telemetry::channel_delivery_queued(&origin.channel);
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(event = "channel_delivery_queue_failed", error = %e, retry_in = ?delay, "cannot queue the reply for its channel; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => return Err(Stopped),
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}
