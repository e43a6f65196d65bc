//! Reply events kept for resuming, on RabbitMQ: workers publish reply events to the fanout
//! exchange `<prefix>.out.all`, which forwards each to the direct exchange `<prefix>.out` (and
//! so to the gateways listening to its session, as before) and to the stream queue
//! `<prefix>.out.log`, which keeps every event for the retention window (`x-max-age`).
//!
//! A resume first listens to the session as usual (the binding confirmed), then appends a
//! marker of its own to the stream and reads the stream from the start of the retention window
//! up to that marker, keeping the session's events. Everything published before the listener
//! was bound is in the stream ahead of the marker; everything after reaches the listener; an
//! event in both is skipped by id by the reader. A stream queue cannot filter by session on
//! 3.10, so a resume reads the whole window's events of every session: the cost grows with
//! the retention and the fleet's traffic (ARCHITECTURE.md, "Resumable replies").

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ExchangeBindOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, ExchangeKind};
use schemas::{ReplyEvent, SessionId};

use super::{AmqpBus, unavailable};
use crate::{BusError, Resumed};

/// How long reading the retained events may take before the resume fails.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(5);
/// Segments of the stream: retention drops whole segments, so small ones keep its age close
/// to the setting.
const SEGMENT_BYTES: i64 = 8 * 1024 * 1024;
/// How long declaring the stream queue may hold up connecting.
const LOG_DECLARE_TIMEOUT: Duration = Duration::from_secs(2);
/// How many stream entries are in flight to a resuming reader at once.
const READ_PREFETCH: u16 = 2000;

/// Declares the fanout exchange, the stream queue and their bindings; idempotent. A stream
/// queue declared earlier with another retention keeps its own (RabbitMQ refuses to change a
/// queue's arguments; an operator policy `max-age` changes it), which is logged.
pub(super) async fn declare(bus: &AmqpBus, connection: &lapin::Connection, channel: &Channel) -> Result<(), BusError> {
    let names = &bus.settings().names;
    let (fanout, log) = (names.events_fanout(), names.events_log());
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    channel
        .exchange_declare(fanout.as_str().into(), ExchangeKind::Fanout, durable, FieldTable::default())
        .await
        .map_err(unavailable("declare the reply-event exchange"))?;
    channel
        .exchange_bind(
            names.events_exchange().as_str().into(),
            fanout.as_str().into(),
            "".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(unavailable("bind the reply-event exchanges"))?;
    // The stream queue is only needed for resuming: a broker slow to bring it up (a node just
    // restarted) must not hold up the connection, so it gets a channel and a deadline of its own,
    // and a failure is logged; live events flow either way, and resumes answer 503 until a later
    // connection declares it.
    let declared = tokio::time::timeout(LOG_DECLARE_TIMEOUT, declare_log(bus, connection)).await;
    match declared {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(event = "reply_log_not_declared", queue = %log, error = %e, "resuming is unavailable until the reply-event stream is declared")
        }
        Err(_) => {
            tracing::warn!(event = "reply_log_not_declared", queue = %log, "the broker did not declare the reply-event stream in time; resuming is unavailable until it does")
        }
    }
    Ok(())
}

/// Declares the stream queue and binds it to the fanout exchange, on a channel of its own.
async fn declare_log(bus: &AmqpBus, connection: &lapin::Connection) -> Result<(), BusError> {
    let names = &bus.settings().names;
    let (fanout, log) = (names.events_fanout(), names.events_log());
    let channel = connection.create_channel().await.map_err(unavailable("open a channel"))?;
    let options = QueueDeclareOptions { durable: true, ..Default::default() };
    let declared = channel.queue_declare(log.as_str().into(), options, log_arguments(bus)).await;
    let channel = match declared {
        Ok(_) => channel,
        Err(e) => {
            tracing::warn!(event = "reply_log_retention_kept", queue = %log, error = %e, "the reply-event stream exists with other settings; keeping them");
            connection.create_channel().await.map_err(unavailable("open a channel"))?
        }
    };
    channel
        .queue_bind(
            log.as_str().into(),
            fanout.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(unavailable("bind the reply-event stream"))?;
    let _ = channel.close(200, "reply-event stream declared".into()).await;
    Ok(())
}

fn log_arguments(bus: &AmqpBus) -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString("stream".into()));
    let age = format!("{}s", retention(bus).as_secs().max(1));
    arguments.insert("x-max-age".into(), AMQPValue::LongString(age.into()));
    arguments.insert("x-stream-max-segment-size-bytes".into(), AMQPValue::LongLongInt(SEGMENT_BYTES));
    arguments
}

fn retention(bus: &AmqpBus) -> Duration {
    bus.settings().event_retention.unwrap_or(crate::DEFAULT_EVENT_RETENTION)
}

/// The session's retained events, then the live ones.
pub(super) async fn resume(bus: &AmqpBus, session: &SessionId) -> Result<Resumed, BusError> {
    let live = super::events::subscribe(bus, session).await?;
    let connection = bus.connection().await?;
    let channel = connection.create_channel().await.map_err(unavailable("open a channel"))?;
    let retained = tokio::time::timeout(CATCH_UP_TIMEOUT, read_log(bus, &channel, session)).await.map_err(|_| {
        BusError::Unavailable(format!("the reply-event stream did not answer within {CATCH_UP_TIMEOUT:?}"))
    });
    let _ = channel.close(200, "resumed".into()).await;
    Ok(Resumed { retained: retained??, live })
}

/// Reads the stream from the start of the retention window up to a marker appended now,
/// leaving out events stamped before the window (see `publish_event`).
async fn read_log(bus: &AmqpBus, channel: &Channel, session: &SessionId) -> Result<Vec<ReplyEvent>, BusError> {
    let log = bus.settings().names.events_log();
    let marker = format!("resume-{:032x}", rand::random::<u128>());
    channel
        .basic_publish(
            "".into(),
            log.as_str().into(),
            BasicPublishOptions::default(),
            b"",
            BasicProperties::default().with_message_id(marker.as_str().into()),
        )
        .await
        .map_err(unavailable("mark the reply-event stream"))?;
    channel
        .basic_qos(READ_PREFETCH, BasicQosOptions::default())
        .await
        .map_err(unavailable("read the reply-event stream"))?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    // Events published before this are past the retention, even while the stream still holds
    // their segment.
    let oldest = now.saturating_sub(retention(bus)).as_secs();
    // A minute of slack: the stream's clock and ours may differ, and reading more is harmless.
    let from = now.saturating_sub(retention(bus) + Duration::from_secs(60)).as_secs();
    let mut arguments = FieldTable::default();
    arguments.insert("x-stream-offset".into(), AMQPValue::Timestamp(from));
    let mut consumer = channel
        .basic_consume(log.as_str().into(), "".into(), BasicConsumeOptions::default(), arguments)
        .await
        .map_err(unavailable("read the reply-event stream"))?;
    let mut retained = Vec::new();
    let mut read = 0u32;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery.map_err(unavailable("read the reply-event stream"))?;
        read += 1;
        if read.is_multiple_of(u32::from(READ_PREFETCH / 2)) {
            let _ = delivery.acker.ack(BasicAckOptions { multiple: true }).await;
        }
        if delivery.properties.message_id().as_ref().is_some_and(|id| id.as_str() == marker) {
            return Ok(retained);
        }
        if delivery.routing_key.as_str() != session.as_str()
            || delivery.properties.timestamp().is_some_and(|t| t < oldest)
        {
            continue;
        }
        match serde_json::from_slice::<ReplyEvent>(&delivery.data) {
            Ok(event) if &event.session_id == session => retained.push(event),
            Ok(_) => {}
            Err(e) => tracing::warn!(event = "bad_reply_event", error = %e, "skipping an unreadable reply event"),
        }
    }
    Err(BusError::Unavailable("the reply-event stream ended before the resume marker".into()))
}
