//! Channel deliveries on NATS: the work-queue stream `<PREFIX>_DELIVERIES` holds finished
//! channel replies (published with `Nats-Msg-Id` = the reply id, so a reply announced twice
//! within the duplicate window is stored once), and one durable pull consumer without a
//! priority group, `<prefix>-deliveries`, hands them out to every gateway as competing
//! consumers. A retry is a negative acknowledgement with the delay; a gateway that dies
//! mid-attempt stops reporting progress and JetStream redelivers after [`ACK_WAIT`]. Deliveries
//! given up on are copied to the stream `<PREFIX>_UNDELIVERABLE` before they are terminated.

use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull, stream};
use async_trait::async_trait;
use futures::StreamExt;
use schemas::ChannelDelivery;

use super::NatsBus;
use crate::{Acker, BusError, DeliveryQueueStatus, PendingDeliveries, PendingDelivery};

/// How long an attempt may go without a progress report before another gateway gets the
/// delivery. Gateways report progress every few seconds while an HTTP request runs.
pub(crate) const ACK_WAIT: Duration = Duration::from_secs(10);

/// How long undeliverable replies are kept.
const UNDELIVERABLE_MAX_AGE: Duration = Duration::from_secs(14 * 24 * 3600);

/// The header naming why a delivery was given up on.
const REASON: &str = "Chatfleet-Undeliverable-Reason";

/// Makes sure both streams and the consumer exist.
pub(super) async fn ensure(bus: &NatsBus) -> Result<(), BusError> {
    let names = &bus.settings.names;
    let pending = stream::Config {
        name: names.deliveries_stream(),
        subjects: vec![names.deliveries_subject()],
        // Kept until a gateway settles it: the stream holds exactly the pending deliveries.
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        duplicate_window: bus.settings.duplicate_window,
        // Longer than the longest retry schedule (a day), so nothing pending ages out.
        max_age: Duration::from_secs(7 * 24 * 3600),
        num_replicas: bus.replicas,
        ..Default::default()
    };
    let undeliverable = stream::Config {
        name: names.undeliverable_stream(),
        subjects: vec![names.undeliverable_subject()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        max_age: UNDELIVERABLE_MAX_AGE,
        num_replicas: bus.replicas,
        ..Default::default()
    };
    for config in [pending, undeliverable] {
        bus.js
            .get_or_create_stream(config.clone())
            .await
            .map_err(|e| super::replicas::refused(&config.name, bus.replicas, e))?;
        super::replicas::reconcile(&bus.js, &config.name, bus.settings.replicas, bus.replicas).await?;
    }
    consumer(bus).await.map(|_| ())
}

async fn consumer(bus: &NatsBus) -> Result<jetstream::consumer::Consumer<pull::Config>, BusError> {
    let names = &bus.settings.names;
    let stream = bus
        .js
        .get_stream(names.deliveries_stream())
        .await
        .map_err(|e| BusError::Unavailable(format!("cannot open stream {}: {e}", names.deliveries_stream())))?;
    let config = pull::Config {
        durable_name: Some(names.deliveries_consumer()),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: ACK_WAIT,
        // Never given up on by the broker: the gateways decide when a delivery is undeliverable.
        max_deliver: -1,
        max_ack_pending: 10_000,
        ..Default::default()
    };
    stream
        .get_or_create_consumer(&names.deliveries_consumer(), config)
        .await
        .map_err(|e| BusError::Failed(format!("cannot create consumer {}: {e}", names.deliveries_consumer())))
}

pub(super) async fn publish(bus: &NatsBus, delivery: &ChannelDelivery) -> Result<(), BusError> {
    bus.connected()?;
    let payload = serde_json::to_vec(delivery).map_err(|e| BusError::Failed(e.to_string()))?;
    let publish = jetstream::message::PublishMessage::build().payload(payload.into()).message_id(delivery.key());
    let timeout = bus.settings.publish_timeout;
    tokio::time::timeout(timeout, async {
        bus.js
            .send_publish(bus.settings.names.deliveries_subject(), publish)
            .await
            .map_err(|e| BusError::Unavailable(format!("cannot publish a delivery: {e}")))?
            .await
            .map_err(|e| BusError::Unavailable(format!("no acknowledgement for a delivery: {e}")))
    })
    .await
    .map_err(|_| BusError::Unavailable(format!("NATS did not acknowledge a delivery within {timeout:?}")))??;
    Ok(())
}

pub(super) async fn consume(bus: &NatsBus) -> Result<PendingDeliveries, BusError> {
    let messages = consumer(bus)
        .await?
        .stream()
        .max_messages_per_batch(64)
        .expires(Duration::from_secs(5))
        .heartbeat(Duration::from_secs(1))
        .messages()
        .await
        .map_err(|e| BusError::Unavailable(format!("cannot pull deliveries: {e}")))?;
    let (js, subject) = (bus.js.clone(), bus.settings.names.undeliverable_subject());
    let stream = messages.filter_map(move |item| {
        let (js, subject) = (js.clone(), subject.clone());
        futures::future::ready(match item {
            Ok(message) => Some(to_pending(message, js, subject)),
            Err(e) => {
                // Missed heartbeats and reconnects surface here; the pull carries on.
                tracing::warn!(event = "deliveries_pull_error", error = %e, "pull error on the deliveries consumer");
                None
            }
        })
    });
    Ok(stream.boxed())
}

fn to_pending(message: jetstream::Message, js: jetstream::Context, undeliverable: String) -> PendingDelivery {
    let (attempt, sequence) = message.info().map(|i| (i.delivered.max(1) as u64, i.stream_sequence)).unwrap_or((1, 0));
    let (message, acker) = message.split();
    let delivery = serde_json::from_slice(&message.payload).map_err(|e| format!("unreadable channel delivery: {e}"));
    let acker = DeliveryAcker { acker, js, undeliverable, payload: message.payload, sequence };
    PendingDelivery { delivery, attempt, acker: Box::new(acker) }
}

/// Settles a pending delivery; keeps its bytes to store them should it be given up on.
struct DeliveryAcker {
    acker: jetstream::message::Acker,
    js: jetstream::Context,
    undeliverable: String,
    payload: bytes::Bytes,
    sequence: u64,
}

fn failed(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(format!("cannot settle a delivery: {e}"))
}

#[async_trait]
impl Acker for DeliveryAcker {
    async fn ack(&self) -> Result<(), BusError> {
        self.acker.double_ack().await.map_err(failed)
    }

    async fn retry_after(&self, delay: Duration) -> Result<(), BusError> {
        self.acker.ack_with(AckKind::Nak(Some(delay))).await.map_err(failed)
    }

    async fn in_progress(&self) -> Result<(), BusError> {
        self.acker.ack_with(AckKind::Progress).await.map_err(failed)
    }

    async fn reject(&self) -> Result<(), BusError> {
        self.dead_letter("rejected").await
    }

    async fn dead_letter(&self, reason: &str) -> Result<(), BusError> {
        // Kept first, terminated after: a crash in between hands it out again, and the
        // undeliverable stream's duplicate window drops the second copy.
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(REASON, reason);
        let publish = jetstream::message::PublishMessage::build()
            .payload(self.payload.clone())
            .headers(headers)
            .message_id(format!("undeliverable-{}", self.sequence));
        self.js
            .send_publish(self.undeliverable.clone(), publish)
            .await
            .map_err(|e| BusError::Unavailable(format!("cannot keep an undeliverable reply: {e}")))?
            .await
            .map_err(|e| BusError::Unavailable(format!("no acknowledgement for an undeliverable reply: {e}")))?;
        self.acker.double_ack_with(AckKind::Term).await.map_err(failed)
    }
}

pub(super) async fn status(bus: &NatsBus) -> Result<DeliveryQueueStatus, BusError> {
    let names = &bus.settings.names;
    let mut counts = [0u64; 2];
    for (i, name) in [names.deliveries_stream(), names.undeliverable_stream()].iter().enumerate() {
        let mut stream = bus
            .js
            .get_stream(name)
            .await
            .map_err(|e| BusError::Unavailable(format!("cannot open stream {name}: {e}")))?;
        let info = stream.info().await.map_err(|e| BusError::Unavailable(format!("cannot read stream {name}: {e}")))?;
        counts[i] = info.state.messages;
    }
    Ok(DeliveryQueueStatus { pending: counts[0], undeliverable: counts[1] })
}
