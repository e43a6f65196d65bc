//! Dead letters of the RabbitMQ bus: the quorum queue `<prefix>.dead`, filled by the partition
//! queues' dead-letter exchange. Listing takes messages with `basic.get` without acknowledging
//! them and closes the channel, which returns them in place; replaying publishes a message to
//! the input exchange again with its original routing key (from `x-death`), waits for the
//! publisher confirm, and only then acknowledges (removes) the dead letter.
//!
//! A dead letter's id is its `x-chatfleet-seq` header, set once per enqueue.

use std::time::Duration;

use lapin::Confirmation;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use schemas::UserMessage;

use super::{AmqpBus, SEQUENCE_HEADER, sequence_number, unavailable};
use crate::{BusError, DeadLetter, Replay};

fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// The first (oldest) `x-death` entry: why, when and from which routing key it died.
fn first_death(headers: &FieldTable) -> Option<&FieldTable> {
    match headers.inner().get("x-death")? {
        AMQPValue::FieldArray(deaths) => match deaths.as_slice().last()? {
            AMQPValue::FieldTable(death) => Some(death),
            _ => None,
        },
        _ => None,
    }
}

fn routing_key(headers: &FieldTable) -> Option<String> {
    match first_death(headers)?.inner().get("routing-keys")? {
        AMQPValue::FieldArray(keys) => keys.as_slice().first().and_then(text),
        _ => None,
    }
}

fn describe(delivery: &lapin::message::Delivery) -> DeadLetter {
    let empty = FieldTable::default();
    let headers = delivery.properties.headers().as_ref().unwrap_or(&empty);
    let parsed = serde_json::from_slice::<UserMessage>(&delivery.data).ok();
    let death = first_death(headers);
    let id = headers
        .inner()
        .get(SEQUENCE_HEADER)
        .and_then(super::consume::as_u64)
        .map_or_else(|| "?".to_owned(), |s| s.to_string());
    let at = death.and_then(|d| d.inner().get("time")).and_then(|t| match t {
        AMQPValue::Timestamp(secs) => time::OffsetDateTime::from_unix_timestamp(*secs as i64)
            .ok()
            .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok()),
        _ => None,
    });
    DeadLetter {
        id,
        session_id: parsed.as_ref().map(|m| m.session_id.as_str().to_owned()),
        message_id: parsed.as_ref().map(|m| m.message_id.as_str().to_owned()),
        reason: death.and_then(|d| d.inner().get("reason")).and_then(text).unwrap_or_else(|| "rejected".into()),
        at,
    }
}

async fn channel(bus: &AmqpBus) -> Result<Channel, BusError> {
    bus.connection().await?.create_channel().await.map_err(unavailable("open a channel"))
}

async fn get(bus: &AmqpBus, channel: &Channel) -> Result<Option<lapin::message::Delivery>, BusError> {
    let queue = bus.settings().names.dead_letters();
    let got = channel
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
        .await
        .map_err(|e| BusError::Unavailable(format!("cannot read {queue}: {e}")))?;
    Ok(got.map(|m| m.delivery))
}

pub(super) async fn list(bus: &AmqpBus, limit: usize) -> Result<Vec<DeadLetter>, BusError> {
    let channel = channel(bus).await?;
    let before = ready(bus, &channel).await?;
    let mut found = Vec::new();
    let result = async {
        while found.len() < limit {
            let Some(delivery) = get(bus, &channel).await? else { break };
            found.push(describe(&delivery));
        }
        Ok(())
    }
    .await;
    // Closing returns every message taken, unacknowledged, to its place.
    let _ = channel.close(200, "listed".into()).await;
    // The broker puts them back after the close has been answered: wait until they are, so that
    // a replay (or another listing) that follows finds them all.
    let check = self::channel(bus).await?;
    let deadline = tokio::time::Instant::now() + RETURN_WAIT;
    while ready(bus, &check).await? < before && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = check.close(200, "listed".into()).await;
    result.map(|()| found)
}

/// How long a listing waits for the broker to put back the dead letters it read.
const RETURN_WAIT: Duration = Duration::from_secs(5);

/// Dead letters ready to be read (not held by a reader).
async fn ready(bus: &AmqpBus, channel: &Channel) -> Result<u32, BusError> {
    let queue = bus.settings().names.dead_letters();
    let declared = channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .map_err(|e| BusError::Unavailable(format!("cannot inspect queue {queue}: {e}")))?;
    Ok(declared.message_count())
}

pub(super) async fn replay(bus: &AmqpBus, which: &Replay) -> Result<Vec<DeadLetter>, BusError> {
    let queue = bus.settings().names.dead_letters();
    let channel = channel(bus).await?;
    let waiting = channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .map_err(|e| BusError::Unavailable(format!("cannot inspect queue {queue}: {e}")))?
        .message_count();
    channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(unavailable("enable publisher confirms"))?;
    let mut replayed = Vec::new();
    let result = async {
        // Each message is taken once: those not replayed stay unacknowledged until the close.
        for _ in 0..waiting {
            let Some(delivery) = get(bus, &channel).await? else { break };
            let letter = describe(&delivery);
            if !which.includes(&letter.id) {
                continue;
            }
            republish(bus, &channel, &delivery).await?;
            delivery.acker.ack(BasicAckOptions::default()).await.map_err(unavailable("remove a dead letter"))?;
            replayed.push(letter);
        }
        Ok(())
    }
    .await;
    let _ = channel.close(200, "replayed".into()).await;
    result.map(|()| replayed)
}

async fn republish(bus: &AmqpBus, channel: &Channel, delivery: &lapin::message::Delivery) -> Result<(), BusError> {
    let settings = bus.settings();
    let empty = FieldTable::default();
    let old = delivery.properties.headers().as_ref().unwrap_or(&empty);
    let key = routing_key(old)
        .or_else(|| {
            let message = serde_json::from_slice::<UserMessage>(&delivery.data).ok()?;
            Some(settings.partitions.of(&message.session_id).to_string())
        })
        .ok_or_else(|| BusError::Failed("a dead letter with neither x-death nor a readable session".into()))?;
    // A new bus message: a fresh sequence, and none of the death records.
    let mut headers = FieldTable::default();
    for (name, value) in old.inner() {
        let name = name.as_str();
        if name != SEQUENCE_HEADER
            && name != "x-death"
            && !name.starts_with("x-first-death")
            && !name.starts_with("x-last-death")
        {
            headers.insert(name.into(), value.clone());
        }
    }
    headers.insert(SEQUENCE_HEADER.into(), AMQPValue::LongLongInt(sequence_number() as i64));
    let mut properties = BasicProperties::default().with_delivery_mode(2).with_headers(headers);
    if let Some(id) = delivery.properties.message_id() {
        properties = properties.with_message_id(id.clone());
    }
    if let Some(kind) = delivery.properties.content_type() {
        properties = properties.with_content_type(kind.clone());
    }
    let confirm = channel
        .basic_publish(
            settings.names.input_exchange().as_str().into(),
            key.as_str().into(),
            BasicPublishOptions { mandatory: true, ..Default::default() },
            &delivery.data,
            properties,
        )
        .await
        .map_err(unavailable("replay a dead letter"))?
        .await
        .map_err(unavailable("get a publisher confirm"))?;
    match confirm {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => {
            Err(BusError::Failed(format!("no partition queue is bound to routing key {key}")))
        }
        Confirmation::Nack(_) => Err(BusError::Unavailable("RabbitMQ refused the replayed message (nack)".into())),
        Confirmation::NotRequested => Err(BusError::Failed("publisher confirms are off".into())),
    }
}
