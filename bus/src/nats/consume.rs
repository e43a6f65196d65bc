//! Deliveries and acknowledgements of the NATS bus: one durable pull consumer per partition,
//! pinned to a single puller at a time by a priority group.

use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull};
use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use schemas::Partition;

use super::NatsBus;
use super::dead_letters::Original;
use crate::{Acker, BusError, Deliveries, Delivery, telemetry};
use schemas::subjects::PINNED_GROUP as GROUP;

fn consumer_config(bus: &NatsBus, partition: Partition) -> pull::Config {
    let settings = &bus.settings;
    let names = &settings.names;
    pull::Config {
        durable_name: Some(names.partition_consumer(partition)),
        filter_subject: names.partition_filter(partition),
        // Every message still in the work-queue stream is unacknowledged, so a fresh consumer
        // starts from the oldest of them.
        deliver_policy: jetstream::consumer::DeliverPolicy::All,
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: settings.ack_wait,
        max_deliver: settings.max_deliver,
        max_ack_pending: settings.max_ack_pending,
        // Only the pinned puller receives messages: even two workers that both believe they
        // own a partition never interleave its sessions.
        priority_policy: jetstream::consumer::PriorityPolicy::PinnedClient,
        priority_groups: vec![GROUP.into()],
        priority_timeout: settings.pin_timeout,
        ..Default::default()
    }
}

async fn input_stream(bus: &NatsBus) -> Result<jetstream::stream::Stream, BusError> {
    let name = bus.settings.names.input_stream();
    bus.js.get_stream(&name).await.map_err(|e| BusError::Unavailable(format!("cannot open stream {name}: {e}")))
}

/// Replaces a partition's consumer with a fresh one, which delivers every message the
/// previous owner left unacknowledged again, at once and in stream order.
///
/// A consumer that never delivered anything already is what a fresh one would be: it is updated
/// to this process's settings (the process that created it may have had others) and kept, so
/// that it never vanishes from view. Replacing it would leave a moment in which the consumer
/// does not exist, and KEDA's `nats-jetstream` scaler, polling then, would read the whole stream
/// as this partition's lag. Should another puller take a delivery from it after this check, the
/// new owner's pull sees a hole in the consumer sequence and replaces it then
/// ([`GaplessPull`]).
pub(super) async fn reset_consumer(bus: &NatsBus, partition: Partition) -> Result<(), BusError> {
    let stream = input_stream(bus).await?;
    let durable = bus.settings.names.partition_consumer(partition);
    match stream.consumer_info(&durable).await {
        Ok(info) if info.delivered.consumer_sequence == 0 => {
            match stream.update_consumer(consumer_config(bus, partition)).await {
                Ok(_) => return Ok(()),
                Err(e) => tracing::debug!(event = "consumer_update_failed", partition = partition.get(), error = %e),
            }
            delete_consumer(&stream, &durable).await?;
        }
        Ok(_) => delete_consumer(&stream, &durable).await?,
        Err(_) => {}
    }
    stream
        .create_consumer(consumer_config(bus, partition))
        .await
        .map_err(|e| BusError::Failed(format!("cannot create consumer {durable}: {e}")))?;
    Ok(())
}

async fn delete_consumer(stream: &jetstream::stream::Stream, durable: &str) -> Result<(), BusError> {
    stream
        .delete_consumer(durable)
        .await
        .map(drop)
        .map_err(|e| BusError::Unavailable(format!("cannot delete consumer {durable}: {e}")))
}

/// Creates each partition's consumer that does not exist yet, with the configuration its owner
/// gives it. Every process does this when it connects, so a partition's backlog is visible on
/// its consumer (`num_pending`, which KEDA's `nats-jetstream` scaler reads) even while no
/// worker has ever run: otherwise a fleet scaled to zero workers could never scale up. An
/// existing consumer is left alone (its owner resets it on taking the partition, under the same
/// name); a create that loses a race with another process is no error.
pub(super) async fn ensure_consumers(bus: &NatsBus) -> Result<(), BusError> {
    let stream = input_stream(bus).await?;
    let stream = &stream;
    futures::stream::iter(bus.settings.partitions.all())
        .map(|partition| async move {
            let durable = bus.settings.names.partition_consumer(partition);
            if stream.consumer_info(&durable).await.is_ok() {
                return Ok(());
            }
            // Strict: never changes a consumer that appeared meanwhile.
            match stream.create_consumer_strict(consumer_config(bus, partition)).await {
                Ok(_) => Ok(()),
                Err(_) if stream.consumer_info(&durable).await.is_ok() => Ok(()),
                Err(e) => Err(BusError::Failed(format!("cannot create consumer {durable}: {e}"))),
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// The partition consumer's state, for lag metrics and `chatfleet status`.
pub(super) async fn consumer_info(bus: &NatsBus, partition: Partition) -> Result<jetstream::consumer::Info, BusError> {
    let stream = input_stream(bus).await?;
    let durable = bus.settings.names.partition_consumer(partition);
    stream.consumer_info(&durable).await.map_err(|e| BusError::Unavailable(format!("no consumer {durable}: {e}")))
}

/// The partition's deliveries, in stream order without gaps.
///
/// A delivery can be lost on its way to the worker: JetStream counts a message as delivered
/// when it sends it, and a connection that breaks (the server it was attached to dies, a
/// reconnect) loses whatever was in flight. JetStream delivers such a message again only after
/// the ack wait, and the ones after it at once, so a session's later message would be answered
/// before its earlier one. Every delivery carries the consumer's own sequence, which has no
/// holes; a hole means a lost delivery. Then this pull ends, the consumer is replaced (every
/// unacknowledged message comes again at once, in stream order: the ones in hand are recognised
/// by the worker, the lost one is next), and a new pull starts.
pub(super) async fn deliveries(bus: &NatsBus, partition: Partition) -> Result<Deliveries, BusError> {
    let (durable, stream) = (bus.settings.names.partition_consumer(partition), input_stream(bus).await?);
    // A consumer that delivered before belongs to an earlier pull of ours, whose last deliveries
    // may not have arrived: replaced, it delivers them again. A fresh one (a hand-over just made
    // it) starts at the first sequence.
    let delivered_before = stream.consumer_info(&durable).await.is_ok_and(|info| info.delivered.consumer_sequence > 0);
    if delivered_before {
        reset_consumer(bus, partition).await?;
    }
    let pull =
        GaplessPull { bus: bus.clone(), partition, messages: open_pull(bus, partition).await?, next: 1, silent: 0 };
    let deliveries = futures::stream::unfold(pull, |mut pull| async move {
        let delivery = pull.next().await?;
        Some((delivery, pull))
    });
    Ok(deliveries.boxed())
}

/// A partition's pull, replaced with a fresh consumer whenever a delivery went missing.
struct GaplessPull {
    bus: NatsBus,
    partition: Partition,
    messages: pull::Stream,
    /// The consumer sequence the next delivery must carry.
    next: u64,
    /// Idle heartbeats missed in a row.
    silent: u32,
}

/// How many idle heartbeats in a row a pull may miss before it is replaced (a heartbeat is a
/// twentieth of the pin timeout: a quarter second by default).
const SILENT_HEARTBEATS_BEFORE_RESTART: u32 = 3;

impl GaplessPull {
    async fn next(&mut self) -> Option<Delivery> {
        let partition = self.partition;
        loop {
            let message = match self.messages.next().await? {
                Ok(message) => message,
                Err(e) => {
                    // Missed heartbeats and reconnects surface here; the pull stream carries on.
                    tracing::warn!(event = "pull_error", partition = partition.get(), error = %e, "pull error");
                    if e.kind() == pull::MessagesErrorKind::MissingHeartbeat {
                        self.silent += 1;
                    }
                    // After a server of a cluster dies, a pull can stay silent for many seconds
                    // while its requests go nowhere (seen for 7 s with the consumer's leader on
                    // the dead server); deliveries in flight may be lost too. A fresh consumer
                    // and pull recover both at once.
                    if self.silent >= SILENT_HEARTBEATS_BEFORE_RESTART {
                        telemetry::pull_restarted(partition, "heartbeats missed");
                        if let Err(e) = self.restart().await {
                            tracing::warn!(event = "pull_restart_failed", partition = partition.get(), error = %e);
                            return None;
                        }
                    }
                    continue;
                }
            };
            self.silent = 0;
            let sequence = message.info().map(|info| info.consumer_sequence).unwrap_or(self.next);
            if sequence > self.next {
                // The message in hand is not settled: the fresh consumer delivers it again.
                telemetry::delivery_gap(partition, self.next, sequence);
                telemetry::pull_restarted(partition, "deliveries missing");
                if let Err(e) = self.restart().await {
                    tracing::warn!(event = "pull_restart_failed", partition = partition.get(), error = %e);
                    return None;
                }
                continue;
            }
            // A lower sequence: somebody replaced the consumer (a new owner); counting restarts.
            self.next = sequence + 1;
            let (js, dead_subject) = (self.bus.js.clone(), self.bus.settings.names.dead_subject(partition));
            return Some(to_delivery(message, js, dead_subject, partition));
        }
    }

    async fn restart(&mut self) -> Result<(), BusError> {
        reset_consumer(&self.bus, self.partition).await?;
        self.messages = open_pull(&self.bus, self.partition).await?;
        self.next = 1;
        self.silent = 0;
        Ok(())
    }
}

/// Opens the pinned pull on the partition's consumer (creating the consumer if it is missing).
async fn open_pull(bus: &NatsBus, partition: Partition) -> Result<pull::Stream, BusError> {
    let settings = &bus.settings;
    let durable = settings.names.partition_consumer(partition);
    let stream = input_stream(bus).await?;
    let consumer: jetstream::consumer::Consumer<pull::Config> = stream
        .get_or_create_consumer(&durable, consumer_config(bus, partition))
        .await
        .map_err(|e| BusError::Failed(format!("cannot create consumer {durable}: {e}")))?;
    // Only the lease holder opens a partition's pull, so any pin left on the consumer belongs to
    // a pull of ours that is gone (a stream reopened after missed heartbeats): release it, or the
    // new pull would wait on standby for the pin to time out.
    if let Err(e) = stream.unpin_consumer(&durable, GROUP).await {
        tracing::debug!(event = "unpin_skipped", partition = partition.get(), error = %e);
    }
    // Pulls expire well within the pin timeout, so a live puller never loses its pin.
    let expires = (settings.pin_timeout / 5).max(Duration::from_millis(500));
    consumer
        .stream()
        .group(GROUP)
        .max_messages_per_batch(256)
        .expires(expires)
        .heartbeat(expires / 4)
        .messages()
        .await
        .map_err(|e| BusError::Unavailable(format!("cannot pull from {durable}: {e}")))
}

fn to_delivery(
    message: jetstream::Message,
    js: jetstream::Context,
    dead_subject: String,
    partition: Partition,
) -> Delivery {
    let (attempt, sequence) = message.info().map(|i| (i.delivered.max(1) as u64, i.stream_sequence)).unwrap_or((1, 0));
    let (message, acker) = message.split();
    let mut trace = crate::trace_context::TraceHeaders::new();
    if let Some(headers) = &message.headers {
        for name in crate::trace_context::header_names() {
            if let Some(value) = headers.get(name.as_str()) {
                trace.insert(name, value.as_str().to_owned());
            }
        }
    }
    let parsed = serde_json::from_slice(&message.payload)
        .map_err(|e| format!("unreadable user message on {}: {e}", message.subject));
    let original = Original {
        js,
        dead_subject,
        partition,
        subject: message.subject.to_string(),
        headers: message.headers,
        payload: message.payload,
        sequence,
    };
    Delivery { message: parsed, attempt, sequence, acker: Box::new(NatsAcker(acker, original)), trace }
}

/// Settles a delivery; keeps the message's bytes for the dead letters should it be rejected.
struct NatsAcker(jetstream::message::Acker, Original);

fn failed(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(format!("cannot settle a delivery: {e}"))
}

#[async_trait]
impl Acker for NatsAcker {
    async fn ack(&self) -> Result<(), BusError> {
        // A double ack waits for the server's confirmation, so a reply is never followed
        // by a redelivery that the worker believes settled.
        self.0.double_ack().await.map_err(failed)
    }

    async fn retry_after(&self, delay: Duration) -> Result<(), BusError> {
        self.0.ack_with(AckKind::Nak(Some(delay))).await.map_err(failed)
    }

    async fn in_progress(&self) -> Result<(), BusError> {
        self.0.ack_with(AckKind::Progress).await.map_err(failed)
    }

    async fn reject(&self) -> Result<(), BusError> {
        self.dead_letter("rejected").await
    }

    async fn dead_letter(&self, reason: &str) -> Result<(), BusError> {
        // Kept first, terminated after: a crash in between delivers it again, and the dead
        // stream's duplicate window drops the second copy.
        self.1.keep(reason).await?;
        self.0.ack_with(AckKind::Term).await.map_err(failed)
    }
}
