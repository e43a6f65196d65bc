//! What every channel does with an accepted event: map the platform conversation to its
//! session (deterministically, so that every gateway replica maps it to the same one, created
//! on its first message) and enqueue the text with the platform's idempotency key, through the
//! same machinery as a client's `client_message_id`.

use std::collections::BTreeMap;
use std::time::Instant;

use schemas::{ChannelOrigin, ClientMessageId, DoubleTexting, MessageId, SessionId, UserMessage};
use sha2::{Digest, Sha256};
use store::{SessionRecord, StoreError};

use crate::{AppState, error::ApiError, telemetry};

/// Namespace of the UUIDv5 session ids of channel conversations; fixed forever, since
/// changing it would give every conversation a new session.
const CONVERSATION_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x3c9e_41d2_7a0b_4f55_8e26_d1b0_9a7c_5e13);

/// The session of a channel's conversation: `ch_` and a UUIDv5 of the channel and the
/// platform's key of the conversation.
pub(crate) fn session_id(channel: &str, conversation: &str) -> SessionId {
    // A newline cannot occur in a channel name, so different pairs never meet.
    let id = uuid::Uuid::new_v5(&CONVERSATION_NAMESPACE, format!("{channel}\n{conversation}").as_bytes());
    SessionId::parse(format!("ch_{}", id.simple())).expect("a UUID makes a valid session id")
}

/// The conversation's session, created on its first message. Two gateways creating it at once
/// both end up with the one stored.
pub(crate) async fn open(
    state: &AppState,
    channel: &str,
    conversation: &str,
    user: Option<String>,
) -> Result<SessionRecord, ApiError> {
    let id = session_id(channel, conversation);
    if let Some(record) = state.sessions.get(&id) {
        return Ok(record);
    }
    if let Some(record) = state.store.session(&id).await? {
        state.sessions.insert(record.clone());
        return Ok(record);
    }
    let record = SessionRecord {
        id: id.clone(),
        user,
        metadata: BTreeMap::from([
            ("channel".to_owned(), channel.to_owned()),
            ("conversation".to_owned(), conversation.to_owned()),
        ]),
        created_at: time::OffsetDateTime::now_utc().truncate_to_millisecond(),
        // A platform cannot show a 409: every message of a conversation is answered in turn.
        double_texting: DoubleTexting::Enqueue,
        api_key: None,
    };
    match state.store.create_session(&record).await {
        Ok(()) => {
            telemetry::session_created();
            tracing::info!(event = "channel_session_created", channel, session_id = %id, "new conversation");
            state.sessions.insert(record.clone());
            Ok(record)
        }
        // Another gateway created it a moment earlier.
        Err(StoreError::Conflict(_)) => {
            let record = state.store.session(&id).await?.ok_or(ApiError::SessionNotFound)?;
            state.sessions.insert(record.clone());
            Ok(record)
        }
        Err(e) => Err(e.into()),
    }
}

/// The message id of a platform's idempotency key within the session: the same as a client's
/// `client_message_id` of that value would get (a longer or unprintable key is hashed first).
pub(crate) fn message_id(session: &SessionId, idempotency_key: &str) -> MessageId {
    let key = ClientMessageId::parse(idempotency_key).unwrap_or_else(|_| {
        let digest = Sha256::digest(idempotency_key.as_bytes());
        let hex: String = digest.iter().take(24).map(|b| format!("{b:02x}")).collect();
        ClientMessageId::parse(format!("sha256:{hex}")).expect("a hex digest is a valid key")
    });
    MessageId::for_client_key(session, &key)
}

/// What enqueueing a channel message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Submitted {
    pub(crate) message_id: MessageId,
    /// The bus had the message already: a platform's retry of an event.
    pub(crate) duplicate: bool,
}

/// Enqueues the text of a channel event in its conversation's session.
pub(crate) async fn submit(
    state: &AppState,
    session: &SessionRecord,
    idempotency_key: &str,
    text: String,
    origin: ChannelOrigin,
) -> Result<Submitted, ApiError> {
    let message_id = message_id(&session.id, idempotency_key);
    let channel = origin.channel.clone();
    // A platform's retry of an event a worker has already taken up is not enqueued again. NATS
    // would drop it within its duplicate window anyway, but RabbitMQ has none, and the worker
    // would announce the stored outcome again: a second Slack post, or a second webhook
    // delivery. (A retry that arrives before any worker recorded the message still goes through;
    // on RabbitMQ its outcome may then be delivered twice, under the same reply id.)
    if state.store.message(&session.id, message_id.as_str()).await?.is_some() {
        telemetry::channel_event_deduplicated(&channel);
        tracing::info!(event = "channel_message_repeated", channel, session_id = %session.id, message_id = %message_id);
        return Ok(Submitted { message_id, duplicate: true });
    }
    let message = UserMessage {
        v: schemas::ENVELOPE_VERSION,
        session_id: session.id.clone(),
        message_id: message_id.clone(),
        text,
        accepted_at: time::OffsetDateTime::now_utc(),
        double_texting: Some(session.double_texting),
        channel: Some(origin),
        cancel: None,
    };
    let started = Instant::now();
    let enqueued = state.bus.enqueue(&message).await?;
    telemetry::message_accepted(enqueued.duplicate, started.elapsed().as_secs_f64());
    if enqueued.duplicate {
        telemetry::channel_event_deduplicated(&channel);
    }
    tracing::info!(event = "channel_message_accepted", channel, session_id = %session.id, message_id = %message_id, duplicate = enqueued.duplicate);
    Ok(Submitted { message_id, duplicate: enqueued.duplicate })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conversation_maps_to_the_same_session_everywhere_and_channels_never_share_one() {
        let a = session_id("webhooks/acme", "c-1");

        assert_eq!(a, session_id("webhooks/acme", "c-1"));
        assert_ne!(a, session_id("webhooks/acme", "c-2"));
        assert_ne!(a, session_id("webhooks/other", "c-1"));
        assert!(a.as_str().starts_with("ch_"));
    }

    #[test]
    fn an_idempotency_key_gives_the_message_id_of_the_same_client_message_id() {
        let session = session_id("webhooks/acme", "c-1");
        let key = ClientMessageId::parse("msg_2KWPBgLlAfxdpx2AI54pPJ85f4W").unwrap();

        assert_eq!(message_id(&session, key.as_str()), MessageId::for_client_key(&session, &key));
        let long = "x".repeat(300);
        assert_eq!(message_id(&session, &long), message_id(&session, &long));
        assert_ne!(message_id(&session, &long), message_id(&session, &"x".repeat(301)));
    }
}
