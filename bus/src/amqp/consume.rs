//! Deliveries and acknowledgements of the RabbitMQ bus: one channel and one consumer per owned
//! partition queue.
//!
//! The channel stays open, and its consumer registered, until the delivery stream *and* every
//! delivery's acker are gone; only then is the channel closed. Closing returns whatever was left
//! unsettled to the queue, and only then does single active consumer hand the queue to the next
//! consumer, which therefore receives those messages first, in queue order. Cancelling the
//! consumer earlier would let the next one start while this one still holds messages, breaking
//! per-session order across a hand-over.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Consumer};
use schemas::Partition;

use super::{AmqpBus, InFlight, unavailable};
use crate::{Acker, BusError, Deliveries, Delivery};
use schemas::subjects::SEQUENCE_HEADER;

/// A partition's channel and consumer, closed when the last holder lets go.
struct Held {
    bus: AmqpBus,
    channel: Channel,
    // Kept so that dropping the delivery stream does not cancel the consumer (see the module
    // documentation); it goes with the channel.
    _consumer: Consumer,
    partition: Partition,
}

impl Drop for Held {
    fn drop(&mut self) {
        let (bus, channel, partition) = (self.bus.clone(), self.channel.clone(), self.partition);
        // The last handle of a lapin consumer cancels it when dropped, and a cancelled consumer
        // keeps its unsettled messages while the queue already serves the next consumer: newer
        // messages would go first. So the consumer outlives the channel's close, which returns
        // the messages (in order) before the next consumer becomes active.
        let consumer = self._consumer.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if let Err(e) = channel.close(200, "partition released".into()).await {
                        tracing::debug!(event = "partition_channel_close_failed", partition = partition.get(), error = %e);
                    }
                    drop(consumer);
                    bus.channel_closed(partition);
                });
            }
            // No runtime: the process is ending, and its connection with it.
            Err(_) => bus.channel_closed(partition),
        }
    }
}

pub(super) async fn deliveries(bus: &AmqpBus, partition: Partition) -> Result<Deliveries, BusError> {
    let settings = bus.settings();
    let queue = settings.names.partition_queue(partition);
    let connection = bus.connection().await?;
    let channel = connection.create_channel().await.map_err(unavailable("open a channel"))?;
    channel.basic_qos(settings.prefetch, BasicQosOptions::default()).await.map_err(unavailable("set the prefetch"))?;
    let tag = format!("{}-p{}-{}", settings.client_name, partition, uuid_suffix());
    let consumer = channel
        .basic_consume(
            queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| BusError::Unavailable(format!("cannot consume {queue}: {e}")))?;
    bus.channel_opened(partition);
    let held = Arc::new(Held { bus: bus.clone(), channel, _consumer: consumer.clone(), partition });
    let bus = bus.clone();
    let stream = consumer
        .take_while(move |item| {
            if let Err(e) = item {
                tracing::warn!(event = "consume_error", partition = partition.get(), error = %e, "the partition's consumer stopped");
            }
            futures::future::ready(item.is_ok())
        })
        .filter_map(move |item| {
            let delivery = item.ok().map(|d| to_delivery(&bus, partition, d, held.clone()));
            futures::future::ready(delivery)
        });
    Ok(stream.boxed())
}

fn uuid_suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

fn header<'a>(delivery: &'a lapin::message::Delivery, name: &str) -> Option<&'a AMQPValue> {
    delivery.properties.headers().as_ref().and_then(|h| h.inner().get(name))
}

pub(super) fn as_u64(value: &AMQPValue) -> Option<u64> {
    match value {
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongUInt(v) => Some(u64::from(*v)),
        AMQPValue::ShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::Timestamp(v) => Some(*v),
        _ => None,
    }
}

fn to_delivery(bus: &AmqpBus, partition: Partition, delivery: lapin::message::Delivery, held: Arc<Held>) -> Delivery {
    // Quorum queues count earlier deliveries in `x-delivery-count`; a classic queue only says
    // whether it was delivered before.
    let earlier =
        header(&delivery, "x-delivery-count").and_then(as_u64).unwrap_or(if delivery.redelivered { 1 } else { 0 });
    let sequence = header(&delivery, SEQUENCE_HEADER).and_then(as_u64).unwrap_or(delivery.delivery_tag);
    let message = serde_json::from_slice(&delivery.data)
        .map_err(|e| format!("unreadable user message in partition {partition}: {e}"));
    let mut trace = crate::trace_context::TraceHeaders::new();
    for name in crate::trace_context::header_names() {
        if let Some(AMQPValue::LongString(value)) = header(&delivery, &name) {
            trace.insert(name, value.to_string());
        }
    }
    let acker = AmqpAcker { acker: delivery.acker, held, _in_flight: InFlight::start(bus, partition) };
    Delivery { message, attempt: earlier + 1, sequence, acker: Box::new(acker), trace }
}

struct AmqpAcker {
    acker: lapin::Acker,
    held: Arc<Held>,
    _in_flight: InFlight,
}

fn settled(what: &'static str, result: lapin::Result<bool>) -> Result<(), BusError> {
    match result {
        Ok(true) => Ok(()),
        Ok(false) => Err(BusError::Unavailable(format!(
            "cannot {what}: the partition's channel is closed; the broker delivers the message again"
        ))),
        Err(e) => Err(BusError::Unavailable(format!("cannot {what}: {e}"))),
    }
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(&self) -> Result<(), BusError> {
        settled("acknowledge a delivery", self.acker.ack(Default::default()).await)
    }

    async fn retry_after(&self, delay: Duration) -> Result<(), BusError> {
        // RabbitMQ has no delayed redelivery: hold the message, then return it. A quorum queue
        // delivers returned messages before newer ones, so the partition's order holds.
        let acker = self.acker.clone();
        let held = self.held.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let result = acker.nack(BasicNackOptions { multiple: false, requeue: true }).await;
            if let Err(e) = settled("return a delivery", result) {
                tracing::debug!(event = "retry_return_failed", partition = held.partition.get(), error = %e);
            }
            drop(held);
        });
        Ok(())
    }

    async fn in_progress(&self) -> Result<(), BusError> {
        // RabbitMQ redelivers only when the channel closes, never on a timer while it is open.
        Ok(())
    }

    async fn abandon(&self) -> Result<(), BusError> {
        // Closing the partition's channel returns it, with everything else unsettled, in queue
        // order and before the next consumer starts.
        Ok(())
    }

    async fn reject(&self) -> Result<(), BusError> {
        // Dead-lettered to `<prefix>.dead` by the queue's dead-letter exchange.
        settled("reject a delivery", self.acker.reject(BasicRejectOptions { requeue: false }).await)
    }
}
