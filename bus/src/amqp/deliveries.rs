//! Channel deliveries on RabbitMQ: the durable quorum queue `<prefix>.deliveries` holds
//! finished channel replies, and every gateway consumes it (competing consumers, manual
//! acknowledgements). A gateway that dies mid-attempt closes its channel with it, and the broker
//! hands the delivery to another gateway.
//!
//! RabbitMQ has no delayed redelivery, so a retry waits in quorum queues of fixed delays,
//! `<prefix>.deliveries.wait.<ms>` for 250 ms × 4^k (250 ms to about 18 hours), declared by every
//! gateway that consumes deliveries when it starts to: each holds its messages for its `x-message-ttl`, then dead-letters them back to the
//! deliveries queue, at least once (`x-dead-letter-strategy: at-least-once`: the wait queue keeps
//! a message until the deliveries queue has confirmed it, so a broker restart or a deliveries
//! queue without a leader delays it but never drops it). A retry is a copy published (with a
//! publisher confirm) to the longest wait that fits the delay, carrying the time it is due in
//! [`DUE_HEADER`]; only then is the original acknowledged (a crash in between leaves two
//! copies, which the receiver's dedupe on the reply id absorbs). A copy that comes back before
//! it is due waits again, in the longest wait that fits what is left, before any gateway sees
//! it; so a delay of any length takes a few hops. The attempt travels in the header
//! [`ATTEMPT_HEADER`]. Deliveries given up on are copied to the quorum queue
//! `<prefix>.undeliverable` before the original is acknowledged.

use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation};
use schemas::ChannelDelivery;

use super::{AmqpBus, quorum, unavailable};
use crate::{Acker, BusError, DeliveryQueueStatus, PendingDeliveries, PendingDelivery};

/// The header carrying a delivery's attempt number (1 for the first).
pub const ATTEMPT_HEADER: &str = "x-chatfleet-attempt";
/// The header naming why a delivery was given up on.
const REASON_HEADER: &str = "x-chatfleet-undeliverable-reason";
/// How many deliveries one gateway attempts at once.
const PREFETCH: u16 = 64;
/// The header carrying when a waiting delivery is due, in milliseconds since the Unix epoch.
pub const DUE_HEADER: &str = "x-chatfleet-due";
/// The shortest wait queue's delay; each next one is four times longer.
const SHORTEST_WAIT_MS: u64 = 250;
/// How many wait queues there are: the longest holds 250 ms × 4^9, about 18 hours.
const WAIT_LEVELS: u32 = 10;

/// The delays of the wait queues, shortest first.
fn wait_levels() -> impl Iterator<Item = u64> {
    (0..WAIT_LEVELS).map(|k| SHORTEST_WAIT_MS << (2 * k))
}

/// The wait queue for a delivery due in `remaining_ms`: the longest that fits, or the shortest.
fn wait_level(remaining_ms: u64) -> u64 {
    wait_levels().take_while(|&level| level <= remaining_ms).last().unwrap_or(SHORTEST_WAIT_MS)
}

/// Whether a delivery due in `remaining_ms` must wait again rather than be handed out now:
/// handed out at most half the shortest wait early, it is never late by a whole one.
fn must_wait(remaining_ms: u64) -> bool {
    remaining_ms >= SHORTEST_WAIT_MS / 2
}

fn now_ms() -> u64 {
    u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

/// Declares the deliveries and undeliverable queues; part of the layout every process declares.
pub(super) async fn declare(channel: &Channel, bus: &AmqpBus) -> Result<(), BusError> {
    let names = &bus.settings().names;
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    for queue in [names.deliveries_queue(), names.undeliverable_queue()] {
        channel
            .queue_declare(queue.as_str().into(), durable, quorum(FieldTable::default()))
            .await
            .map_err(super::layout_error(&queue))?;
    }
    Ok(())
}

/// Declares the wait queues. Only processes that deliver need them: a gateway with channels
/// declares them when it starts consuming deliveries, long before a retry needs them (RabbitMQ
/// 3.10 can lose a quorum queue declared within half a second of a crash).
async fn declare_waits(channel: &Channel, bus: &AmqpBus) -> Result<(), BusError> {
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    for level in wait_levels() {
        let queue = bus.settings().names.delivery_wait_queue(level);
        channel
            .queue_declare(queue.as_str().into(), durable, wait_queue_arguments(bus, level))
            .await
            .map_err(super::layout_error(&queue))?;
    }
    Ok(())
}

fn wait_queue_arguments(bus: &AmqpBus, level_ms: u64) -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert("x-message-ttl".into(), AMQPValue::LongLongInt(level_ms as i64));
    arguments.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
    arguments.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(bus.settings().names.deliveries_queue().as_str().into()),
    );
    // At least once needs the queue to refuse publishes beyond a limit rather than drop its head.
    arguments.insert("x-dead-letter-strategy".into(), AMQPValue::LongString("at-least-once".into()));
    arguments.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
    quorum(arguments)
}

/// Publishes a delivery to the wait queue that fits the time left until `due_ms`.
async fn wait(bus: &AmqpBus, payload: &[u8], attempt: u64, due_ms: u64) -> Result<(), BusError> {
    let queue = bus.settings().names.delivery_wait_queue(wait_level(due_ms.saturating_sub(now_ms())));
    let mut headers = attempt_headers(attempt);
    headers.insert(DUE_HEADER.into(), AMQPValue::LongLongInt(due_ms as i64));
    publish_to(bus, &queue, payload, headers).await
}

/// Publishes to the default exchange (routing key = queue name) and waits for the confirm.
async fn publish_to(bus: &AmqpBus, queue: &str, payload: &[u8], headers: FieldTable) -> Result<(), BusError> {
    let timeout = bus.settings().publish_timeout;
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_headers(headers);
    let confirmation = tokio::time::timeout(timeout, async {
        let channel = bus.channel_in(&bus.inner.publisher, true).await?;
        channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions { mandatory: true, ..Default::default() },
                payload,
                properties,
            )
            .await
            .map_err(unavailable("publish a delivery"))?
            .await
            .map_err(unavailable("get a publisher confirm"))
    })
    .await
    .map_err(|_| BusError::Unavailable(format!("RabbitMQ did not confirm a delivery within {timeout:?}")))
    .and_then(|r| r);
    match confirmation {
        Ok(Confirmation::Ack(None)) => Ok(()),
        Ok(Confirmation::Ack(Some(_))) => Err(BusError::Failed(format!("RabbitMQ has no queue {queue}"))),
        Ok(_) => Err(BusError::Unavailable(format!("RabbitMQ refused a delivery for {queue}"))),
        Err(e) => {
            AmqpBus::forget_channel(&bus.inner.publisher).await;
            Err(e)
        }
    }
}

fn attempt_headers(attempt: u64) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert(ATTEMPT_HEADER.into(), AMQPValue::LongLongInt(attempt as i64));
    headers
}

pub(super) async fn publish(bus: &AmqpBus, delivery: &ChannelDelivery) -> Result<(), BusError> {
    let payload = serde_json::to_vec(delivery).map_err(|e| BusError::Failed(e.to_string()))?;
    publish_to(bus, &bus.settings().names.deliveries_queue(), &payload, attempt_headers(1)).await
}

pub(super) async fn consume(bus: &AmqpBus) -> Result<PendingDeliveries, BusError> {
    let queue = bus.settings().names.deliveries_queue();
    let connection = bus.connection().await?;
    let channel = connection.create_channel().await.map_err(unavailable("open a channel"))?;
    declare_waits(&channel, bus).await?;
    channel.basic_qos(PREFETCH, BasicQosOptions::default()).await.map_err(unavailable("set the prefetch"))?;
    let consumer = channel
        .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .map_err(|e| BusError::Unavailable(format!("cannot consume {queue}: {e}")))?;
    let bus = bus.clone();
    let stream = consumer
        .take_while(|item| {
            if let Err(e) = item {
                tracing::warn!(event = "deliveries_consumer_stopped", error = %e, "the deliveries consumer stopped");
            }
            futures::future::ready(item.is_ok())
        })
        .filter_map(move |item| {
            // The channel lives as long as the stream and every acker: closing it would return
            // the deliveries in hand.
            let (bus, channel) = (bus.clone(), channel.clone());
            async move {
                let delivery = item.ok()?;
                match not_due(&delivery) {
                    Some(due_ms) => wait_again(bus, channel, delivery, due_ms).await,
                    None => Some(to_pending(bus, channel, delivery)),
                }
            }
        });
    Ok(stream.boxed())
}

fn header_u64(delivery: &lapin::message::Delivery, name: &str) -> Option<u64> {
    delivery.properties.headers().as_ref().and_then(|h| h.inner().get(name)).and_then(super::consume::as_u64)
}

/// When a delivery back from a wait queue is due, if that is still too far off to hand it out.
fn not_due(delivery: &lapin::message::Delivery) -> Option<u64> {
    let due_ms = header_u64(delivery, DUE_HEADER)?;
    must_wait(due_ms.saturating_sub(now_ms())).then_some(due_ms)
}

/// Puts a delivery that came back early into the wait queue that fits what is left, then
/// acknowledges it; a delivery that cannot be put back is handed out now rather than held.
async fn wait_again(
    bus: AmqpBus,
    channel: Channel,
    delivery: lapin::message::Delivery,
    due_ms: u64,
) -> Option<PendingDelivery> {
    let attempt = header_u64(&delivery, ATTEMPT_HEADER).unwrap_or(1).max(1);
    match wait(&bus, &delivery.data, attempt, due_ms).await {
        Ok(()) => {
            if let Err(e) = delivery.acker.ack(Default::default()).await {
                // Unacknowledged, it comes back when the channel closes: a copy too many, which
                // the receiver's dedupe absorbs.
                tracing::warn!(event = "delivery_wait_ack_failed", error = %e);
            }
            None
        }
        Err(e) => {
            tracing::warn!(event = "delivery_wait_failed", error = %e, "handing out a delivery before it is due");
            Some(to_pending(bus, channel, delivery))
        }
    }
}

fn to_pending(bus: AmqpBus, channel: Channel, delivery: lapin::message::Delivery) -> PendingDelivery {
    let attempt = header_u64(&delivery, ATTEMPT_HEADER).unwrap_or(1).max(1);
    let parsed = serde_json::from_slice(&delivery.data).map_err(|e| format!("unreadable channel delivery: {e}"));
    let acker = DeliveryAcker { bus, _channel: channel, acker: delivery.acker, payload: delivery.data, attempt };
    PendingDelivery { delivery: parsed, attempt, acker: Box::new(acker) }
}

struct DeliveryAcker {
    bus: AmqpBus,
    _channel: Channel,
    acker: lapin::Acker,
    payload: Vec<u8>,
    attempt: u64,
}

impl DeliveryAcker {
    async fn ack_original(&self) -> Result<(), BusError> {
        match self.acker.ack(Default::default()).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(BusError::Unavailable(
                "cannot acknowledge a delivery: its channel is closed; the broker hands it out again".into(),
            )),
            Err(e) => Err(BusError::Unavailable(format!("cannot acknowledge a delivery: {e}"))),
        }
    }
}

#[async_trait]
impl Acker for DeliveryAcker {
    async fn ack(&self) -> Result<(), BusError> {
        self.ack_original().await
    }

    async fn retry_after(&self, delay: Duration) -> Result<(), BusError> {
        let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        wait(&self.bus, &self.payload, self.attempt + 1, now_ms().saturating_add(delay_ms)).await?;
        self.ack_original().await
    }

    async fn in_progress(&self) -> Result<(), BusError> {
        // RabbitMQ hands a delivery out again only when its channel closes, never on a timer.
        Ok(())
    }

    async fn reject(&self) -> Result<(), BusError> {
        self.dead_letter("rejected").await
    }

    async fn dead_letter(&self, reason: &str) -> Result<(), BusError> {
        let mut headers = attempt_headers(self.attempt);
        headers.insert(REASON_HEADER.into(), AMQPValue::LongString(reason.into()));
        publish_to(&self.bus, &self.bus.settings().names.undeliverable_queue(), &self.payload, headers).await?;
        self.ack_original().await
    }
}

pub(super) async fn status(bus: &AmqpBus) -> Result<DeliveryQueueStatus, BusError> {
    let names = &bus.settings().names;
    let connection = bus.connection().await?;
    let mut counts = [0u64; 2];
    for (i, queue) in [names.deliveries_queue(), names.undeliverable_queue()].iter().enumerate() {
        let channel = connection.create_channel().await.map_err(unavailable("open a channel"))?;
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        let declared = channel
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await
            .map_err(|e| BusError::Unavailable(format!("cannot inspect queue {queue}: {e}")));
        let _ = channel.close(200, "inspected".into()).await;
        counts[i] = u64::from(declared?.message_count());
    }
    Ok(DeliveryQueueStatus { pending: counts[0], undeliverable: counts[1] })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delay_waits_in_the_longest_queue_that_fits_or_the_shortest() {
        assert_eq!(wait_levels().collect::<Vec<_>>().last(), Some(&(250 << 18)));
        assert_eq!(wait_level(0), 250);
        assert_eq!(wait_level(249), 250);
        assert_eq!(wait_level(250), 250);
        assert_eq!(wait_level(999), 250);
        assert_eq!(wait_level(1000), 1000);
        assert_eq!(wait_level(17_000), 16_000);
        assert_eq!(wait_level(u64::MAX), 250 << 18);
    }

    #[test]
    fn a_delivery_due_within_half_the_shortest_wait_is_handed_out() {
        assert!(!must_wait(0));
        assert!(!must_wait(124));
        assert!(must_wait(125));
        assert!(must_wait(10_000));
    }
}
