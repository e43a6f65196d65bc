//! Channel deliveries on RabbitMQ: the durable quorum queue `<prefix>.deliveries` holds
//! finished channel replies, and every gateway consumes it (competing consumers, manual
//! acknowledgements). A gateway that dies mid-attempt closes its channel with it, and the broker
//! hands the delivery to another gateway.
//!
//! RabbitMQ has no delayed redelivery, so a retry is a copy published (with a publisher
//! confirm) to a retry queue `<prefix>.deliveries.retry.<ms>` whose every message waits the same
//! `x-message-ttl` and then dead-letters back to the deliveries queue, and only then is the
//! original acknowledged: a crash in between leaves two copies, which the receiver's dedupe on
//! the reply id absorbs. One queue per delay keeps expiry in order (a queue's TTL applies at its
//! head); unused retry queues expire. The attempt travels in the header
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
/// How long an unused retry queue lives beyond its delay.
const RETRY_QUEUE_IDLE: Duration = Duration::from_secs(10 * 60);

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
            futures::future::ready(item.ok().map(|d| to_pending(bus, channel, d)))
        });
    Ok(stream.boxed())
}

fn to_pending(bus: AmqpBus, channel: Channel, delivery: lapin::message::Delivery) -> PendingDelivery {
    let attempt = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(ATTEMPT_HEADER))
        .and_then(super::consume::as_u64)
        .unwrap_or(1)
        .max(1);
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

    async fn declare_retry_queue(&self, delay_ms: u64) -> Result<String, BusError> {
        let names = &self.bus.settings().names;
        let queue = names.delivery_retry_queue(delay_ms);
        let mut arguments = FieldTable::default();
        arguments.insert("x-message-ttl".into(), AMQPValue::LongLongInt(delay_ms as i64));
        arguments.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
        arguments.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(names.deliveries_queue().as_str().into()),
        );
        let idle = delay_ms + RETRY_QUEUE_IDLE.as_millis() as u64;
        arguments.insert("x-expires".into(), AMQPValue::LongLongInt(idle as i64));
        let connection = self.bus.connection().await?;
        let channel = connection.create_channel().await.map_err(unavailable("open a channel"))?;
        let declared = channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions { durable: true, ..Default::default() },
                arguments,
            )
            .await
            .map_err(|e| BusError::Unavailable(format!("cannot declare {queue}: {e}")));
        let _ = channel.close(200, "declared".into()).await;
        declared.map(|_| queue)
    }
}

#[async_trait]
impl Acker for DeliveryAcker {
    async fn ack(&self) -> Result<(), BusError> {
        self.ack_original().await
    }

    async fn retry_after(&self, delay: Duration) -> Result<(), BusError> {
        // Whole milliseconds, at least one: a TTL of zero would expire nothing.
        let delay_ms = (delay.as_millis() as u64).max(1);
        let queue = self.declare_retry_queue(delay_ms).await?;
        publish_to(&self.bus, &queue, &self.payload, attempt_headers(self.attempt + 1)).await?;
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
