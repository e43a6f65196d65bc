//! Dead letters of the NATS bus: user messages given up on are copied, bytes and headers, to
//! the stream `<PREFIX>_DEAD` (subjects `<prefix>.dead.<partition>`) before their delivery is
//! terminated, so that operators can list and replay them (`chatfleet dead-letters`).
//!
//! A dead letter carries the original headers, except `Nats-Msg-Id` (kept as
//! `Chatfleet-Original-Msg-Id`: the dead stream's own duplicate window must not drop a message
//! dead-lettered again after a replay), plus the reason, the partition and the original subject.
//! It is published with the id `dead-<input stream sequence>`, so a reject retried after a lost
//! acknowledgement does not keep the message twice.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use schemas::{Partition, UserMessage};

use super::NatsBus;
use crate::{BusError, DeadLetter, Replay};

pub(super) const REASON: &str = "Chatfleet-Dead-Reason";
pub(super) const PARTITION: &str = "Chatfleet-Dead-Partition";
pub(super) const SUBJECT: &str = "Chatfleet-Original-Subject";
pub(super) const ORIGINAL_ID: &str = "Chatfleet-Original-Msg-Id";

/// How long a dead letter is kept before the stream drops it.
const MAX_AGE: Duration = Duration::from_secs(14 * 24 * 3600);

/// Makes sure the dead-letter stream exists.
pub(super) async fn ensure_stream(bus: &NatsBus) -> Result<(), BusError> {
    let names = &bus.settings.names;
    let config = stream::Config {
        name: names.dead_stream(),
        subjects: vec![names.dead_wildcard()],
        // Kept until replayed (deleted by sequence) or too old: nobody consumes them.
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        max_age: MAX_AGE,
        allow_direct: true,
        num_replicas: bus.replicas,
        ..Default::default()
    };
    bus.js
        .get_or_create_stream(config)
        .await
        .map_err(|e| BusError::Failed(format!("cannot create stream {}: {e}", names.dead_stream())))?;
    super::replicas::reconcile(&bus.js, &names.dead_stream(), bus.settings.replicas, bus.replicas).await
}

/// What a NATS delivery needs to become a dead letter.
pub(super) struct Original {
    pub(super) js: jetstream::Context,
    pub(super) dead_subject: String,
    pub(super) partition: Partition,
    pub(super) subject: String,
    pub(super) headers: Option<HeaderMap>,
    pub(super) payload: Bytes,
    /// Its sequence in the input stream.
    pub(super) sequence: u64,
}

impl Original {
    /// Stores the message in the dead-letter stream and waits for JetStream to have it.
    pub(super) async fn keep(&self, reason: &str) -> Result<(), BusError> {
        let mut headers = HeaderMap::new();
        for (name, values) in self.headers.iter().flat_map(|h| h.iter()) {
            let name =
                if AsRef::<str>::as_ref(name) == "Nats-Msg-Id" { ORIGINAL_ID } else { AsRef::<str>::as_ref(name) };
            for value in values {
                headers.append(name, value.as_str());
            }
        }
        headers.insert(REASON, reason);
        headers.insert(PARTITION, self.partition.to_string().as_str());
        headers.insert(SUBJECT, self.subject.as_str());
        let publish = jetstream::message::PublishMessage::build()
            .payload(self.payload.clone())
            .headers(headers)
            .message_id(format!("dead-{}", self.sequence));
        self.js
            .send_publish(self.dead_subject.clone(), publish)
            .await
            .map_err(|e| BusError::Unavailable(format!("cannot keep a dead letter: {e}")))?
            .await
            .map_err(|e| BusError::Unavailable(format!("no acknowledgement for a dead letter: {e}")))?;
        Ok(())
    }
}

async fn dead_stream(bus: &NatsBus) -> Result<jetstream::stream::Stream, BusError> {
    let name = bus.settings.names.dead_stream();
    bus.js.get_stream(&name).await.map_err(|e| BusError::Unavailable(format!("cannot open stream {name}: {e}")))
}

/// How many dead letters the stream holds (`chatfleet status`).
pub(super) async fn count(bus: &NatsBus) -> Result<u64, BusError> {
    let mut stream = dead_stream(bus).await?;
    let info = stream.info().await.map_err(|e| BusError::Unavailable(format!("cannot read the dead letters: {e}")))?;
    Ok(info.state.messages)
}

/// The next dead letter at or after `from`, if any.
async fn next(
    bus: &NatsBus,
    stream: &jetstream::stream::Stream,
    from: u64,
) -> Result<Option<jetstream::message::StreamMessage>, BusError> {
    use async_nats::jetstream::stream::DirectGetErrorKind;
    match stream.direct_get_next_for_subject(bus.settings.names.dead_wildcard(), Some(from)).await {
        Ok(message) => Ok(Some(message)),
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
        Err(e) => Err(BusError::Unavailable(format!("cannot read the dead letters: {e}"))),
    }
}

fn describe(message: &jetstream::message::StreamMessage) -> DeadLetter {
    let parsed = serde_json::from_slice::<UserMessage>(&message.payload).ok();
    let header = |name: &str| message.headers.get(name).map(|v| v.as_str().to_owned());
    DeadLetter {
        id: message.sequence.to_string(),
        session_id: parsed.as_ref().map(|m| m.session_id.as_str().to_owned()),
        message_id: parsed.as_ref().map(|m| m.message_id.as_str().to_owned()),
        reason: header(REASON).unwrap_or_else(|| "rejected".into()),
        at: message.time.format(&time::format_description::well_known::Rfc3339).ok(),
    }
}

pub(super) async fn list(bus: &NatsBus, limit: usize) -> Result<Vec<DeadLetter>, BusError> {
    let stream = dead_stream(bus).await?;
    let mut found = Vec::new();
    let mut from = 1;
    while found.len() < limit {
        let Some(message) = next(bus, &stream, from).await? else { break };
        from = message.sequence + 1;
        found.push(describe(&message));
    }
    Ok(found)
}

/// Publishes each chosen dead letter to its input subject again, then deletes it. The copy gets
/// the id `<message id>.replay-<dead sequence>`: the original id would fall in the input stream's
/// duplicate window (10 minutes) and be dropped, and this one still makes a replay interrupted
/// between publishing and deleting safe to run again.
pub(super) async fn replay(bus: &NatsBus, which: &Replay) -> Result<Vec<DeadLetter>, BusError> {
    let stream = dead_stream(bus).await?;
    let mut replayed = Vec::new();
    let mut from = 1;
    while let Some(message) = next(bus, &stream, from).await? {
        from = message.sequence + 1;
        let letter = describe(&message);
        if !which.includes(&letter.id) {
            continue;
        }
        republish(bus, &message).await?;
        stream
            .delete_message(message.sequence)
            .await
            .map_err(|e| BusError::Unavailable(format!("cannot delete dead letter {}: {e}", letter.id)))?;
        replayed.push(letter);
    }
    Ok(replayed)
}

async fn republish(bus: &NatsBus, message: &jetstream::message::StreamMessage) -> Result<(), BusError> {
    let Some(subject) = message.headers.get(SUBJECT).map(|v| v.as_str().to_owned()) else {
        return Err(BusError::Failed(format!("dead letter {} does not say where it came from", message.sequence)));
    };
    let original = message.headers.get(ORIGINAL_ID).map(|v| v.as_str().to_owned()).unwrap_or_default();
    let mut headers = HeaderMap::new();
    for (name, values) in message.headers.iter() {
        if [REASON, PARTITION, SUBJECT, ORIGINAL_ID].contains(&AsRef::<str>::as_ref(name)) {
            continue;
        }
        for value in values {
            headers.append(AsRef::<str>::as_ref(name), value.as_str());
        }
    }
    let publish = jetstream::message::PublishMessage::build()
        .payload(message.payload.clone())
        .headers(headers)
        .message_id(format!("{original}.replay-{}", message.sequence));
    bus.js
        .send_publish(subject, publish)
        .await
        .map_err(|e| BusError::Unavailable(format!("cannot replay a dead letter: {e}")))?
        .await
        .map_err(|e| BusError::Unavailable(format!("no acknowledgement for a replayed dead letter: {e}")))?;
    Ok(())
}
