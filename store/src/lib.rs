//! Where conversations live: sessions and their messages, behind one [`Store`] trait with two
//! implementations, MongoDB (`mongo/`, for fleets) and an embedded redb file (`embedded/`, for
//! `chatfleet dev`).
//!
//! Invariant: a store never decides anything about ordering or retries; it only guarantees
//! uniqueness (one user message per message id, one reply per user message, one message per
//! conversation position) so that redelivered work cannot produce a second answer.
//!
//! Both stores keep times in UTC to the millisecond (MongoDB's datetime precision), so a
//! record read back may differ from the one written by its sub-millisecond digits.

use std::collections::BTreeMap;

use async_trait::async_trait;
use schemas::{DoubleTexting, FinishReason, MessageId, SessionId, Usage};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

pub mod embedded;
pub mod mongo;
pub mod quota;

pub use embedded::EmbeddedStore;
pub use mongo::MongoStore;

/// A chat session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: SessionId,
    /// The client's opaque user id, if it gave one.
    pub user: Option<String>,
    pub metadata: BTreeMap<String, String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// What a message sent while an earlier one is still being answered does. Defaulted so that
    /// sessions recorded before the policy existed read as enqueue, which is what they did.
    #[serde(default)]
    pub double_texting: DoubleTexting,
    /// The name of the API key that created the session, when the gateway has keys: its
    /// quotas count the session's use, and revoking the key ends the session's access.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
}

/// Where a session's reply-in-progress marker stands after [`Store::begin_reply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyClaim {
    /// The marker was free and now names the message.
    Taken,
    /// The marker named the message already (a repeat of it); it still does.
    AlreadyHeld,
    /// Another message holds the marker, taken at `since` (UTC, to the millisecond); nothing
    /// was written.
    HeldBy { message: MessageId, since: OffsetDateTime },
    /// There is no such session; nothing was written.
    NoSession,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    User,
    Assistant,
}

/// Why a user message got no reply; stored on the user message so that a redelivery of it
/// is not generated again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub code: String,
    pub message: String,
}

/// One message of a conversation.
///
/// A conversation is a sequence of turns; turn `n` holds the user message at position
/// `2n` and its reply at `2n + 1` ([`StoredMessage::position`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// The message id (user) or reply id (assistant).
    pub id: String,
    pub session_id: SessionId,
    /// The conversation turn, from 1.
    pub turn: u64,
    pub role: Role,
    pub text: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// The user message this reply answers (assistant only).
    pub reply_to: Option<MessageId>,
    pub finish_reason: Option<FinishReason>,
    pub usage: Option<Usage>,
    /// Set on a user message that could not be answered.
    pub failure: Option<Failure>,
    /// How many times a worker has begun generating the reply to this user message (1 after the first start); 0 for
    /// replies.
    // Defaulted so that records written before the counter existed read as never started.
    #[serde(default)]
    pub starts: u32,
}

impl StoredMessage {
    /// The message's position in the conversation: `2 * turn` for the user message and
    /// `2 * turn + 1` for its reply. Unique within a session.
    pub fn position(&self) -> u64 {
        self.turn * 2 + u64::from(self.role == Role::Assistant)
    }
}

/// A user message and the reply to it, as [`Store::message_and_reply`] found them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MessageAndReply {
    pub message: Option<StoredMessage>,
    pub reply: Option<StoredMessage>,
}

impl MessageAndReply {
    /// What became of the message: its reply, else its recorded failure, else nothing yet.
    pub fn outcome(&self) -> Option<Outcome> {
        if let Some(reply) = &self.reply {
            return Some(Outcome::Replied(reply.clone()));
        }
        let message = self.message.as_ref()?;
        message.failure.clone().map(|failure| Outcome::Failed { turn: message.turn, failure })
    }
}

/// What answering a user message reads before anything else, as [`Store::prepare_answer`]
/// found it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PreparedAnswer {
    /// The session; `None` if it does not exist (it was deleted).
    pub session: Option<SessionRecord>,
    /// The user message and its reply, each if stored.
    pub found: MessageAndReply,
    /// The newest messages of the conversation, in conversation order, as many as asked for
    /// (`None` when none were asked for).
    pub recent: Option<Vec<StoredMessage>>,
}

/// What became of a user message.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// It has its reply.
    Replied(StoredMessage),
    /// It will not be answered.
    Failed { turn: u64, failure: Failure },
}

impl Outcome {
    /// The terminal reply event (`done` or `error`) that announces this outcome. Its id is
    /// the turn's terminal id, the same each time, so a client that receives it twice (a
    /// worker announcing again after another crashed between storing and acknowledging)
    /// sees one event.
    pub fn terminal_event(&self, session: &SessionId, message: &MessageId) -> schemas::ReplyEvent {
        let (turn, kind) = match self {
            Outcome::Replied(reply) => (
                reply.turn,
                schemas::ReplyEventKind::Done {
                    reply_id: schemas::ReplyId::for_message(message),
                    text: reply.text.clone(),
                    finish_reason: reply.finish_reason.clone().unwrap_or(FinishReason::Stop),
                    usage: reply.usage,
                },
            ),
            Outcome::Failed { turn, failure } => (
                *turn,
                schemas::ReplyEventKind::Error { code: failure.code.as_str().into(), message: failure.message.clone() },
            ),
        };
        schemas::ReplyEvent {
            v: schemas::ENVELOPE_VERSION,
            event_id: schemas::EventId::terminal(turn),
            session_id: session.clone(),
            message_id: message.clone(),
            kind,
        }
    }
}

/// Whether an insert wrote anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    New,
    /// A message with the same id already existed; nothing was written.
    AlreadyPresent,
}

/// A store error, typed by what the caller should do next.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or timed out: try again later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A uniqueness rule would be broken by something other than a repeat of the same
    /// message (for example another message at the same conversation position).
    #[error("conflict: {0}")]
    Conflict(String),
    /// Bad configuration or data the store cannot handle: retrying will not help.
    #[error("store error: {0}")]
    Fatal(String),
}

/// The conversation store.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Succeeds while the store is reachable.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Stores a new session. Repeating the call with the same record succeeds without
    /// writing; a different session under an existing id is a [`StoreError::Conflict`].
    async fn create_session(&self, session: &SessionRecord) -> Result<(), StoreError>;

    async fn session(&self, id: &SessionId) -> Result<Option<SessionRecord>, StoreError>;

    /// Deletes the session and its whole history; false if there was no such session.
    async fn delete_session(&self, id: &SessionId) -> Result<bool, StoreError>;

    /// The whole conversation, in order.
    async fn history(&self, id: &SessionId) -> Result<Vec<StoredMessage>, StoreError>;

    /// The newest `limit` messages of the conversation, in conversation order.
    async fn recent(&self, id: &SessionId, limit: usize) -> Result<Vec<StoredMessage>, StoreError>;

    /// A message of the session by id (message id or reply id).
    async fn message(&self, session: &SessionId, id: &str) -> Result<Option<StoredMessage>, StoreError>;

    /// Inserts a message unless one with the same id exists in the session
    /// ([`Inserted::AlreadyPresent`], and nothing is written). Another message at the same
    /// position of the same session, or the same id in another session, is a
    /// [`StoreError::Conflict`].
    async fn insert_message(&self, message: &StoredMessage) -> Result<Inserted, StoreError>;

    /// Records that a user message will not be answered. The message must have been
    /// inserted (as a user message of that session); otherwise this is a
    /// [`StoreError::Fatal`].
    async fn mark_failed(&self, session: &SessionId, message: &MessageId, failure: &Failure) -> Result<(), StoreError>;

    /// Records that a worker begins (again) generating the reply to user message `message` and returns the new
    /// start count: 1 the first time, 2 after a restart elsewhere, and so on. Atomic, so two workers racing
    /// get different counts. A message that does not exist in the session is `StoreError::Fatal`.
    /// So is a reply id: only user messages have replies generated.
    async fn begin_generation(&self, session: &SessionId, message: &MessageId) -> Result<u32, StoreError>;

    /// Marks message `message` as the session's reply in progress, unless another message
    /// is marked: one check-and-set, so of two racing callers with different messages exactly
    /// one gets [`ReplyClaim::Taken`]. Marking the message that is marked already succeeds
    /// ([`ReplyClaim::AlreadyHeld`]) and renews the time it was marked. The marker is not part of
    /// the [`SessionRecord`]; deleting the session removes it.
    async fn begin_reply(&self, session: &SessionId, message: &MessageId) -> Result<ReplyClaim, StoreError>;

    /// Clears the session's reply-in-progress marker if it names `message`; otherwise (another
    /// message, no marker, no session) does nothing.
    async fn end_reply(&self, session: &SessionId, message: &MessageId) -> Result<(), StoreError>;

    /// User message `message` of the session and the reply to it, each if stored. Stores that
    /// can fetch both in one round trip do; the default reads them one after the other.
    async fn message_and_reply(&self, session: &SessionId, message: &MessageId) -> Result<MessageAndReply, StoreError> {
        let reply_id = schemas::ReplyId::for_message(message);
        Ok(MessageAndReply {
            message: self.message(session, message.as_str()).await?,
            reply: self.message(session, reply_id.as_str()).await?,
        })
    }

    /// Everything a worker reads before answering user message `message`: the session, the
    /// message and its reply ([`Store::message_and_reply`]), and the newest `recent` messages
    /// of the conversation ([`Store::recent`]; not read when `recent` is 0). The default makes
    /// the three reads one after the other; the embedded store makes them in one read
    /// transaction.
    async fn prepare_answer(
        &self,
        session: &SessionId,
        message: &MessageId,
        recent: usize,
    ) -> Result<PreparedAnswer, StoreError> {
        Ok(PreparedAnswer {
            session: self.session(session).await?,
            found: self.message_and_reply(session, message).await?,
            recent: if recent == 0 { None } else { Some(self.recent(session, recent).await?) },
        })
    }

    /// What became of a user message: its reply, its failure, or nothing yet.
    async fn outcome(&self, session: &SessionId, message: &MessageId) -> Result<Option<Outcome>, StoreError> {
        Ok(self.message_and_reply(session, message).await?.outcome())
    }

    /// A deployment-wide secret named `name`: the stored one, or `proposed` stored now if
    /// there is none yet. Concurrent callers all get the same value.
    async fn shared_secret(&self, name: &str, proposed: &[u8]) -> Result<Vec<u8>, StoreError>;

    /// A channel's note about the delivery of one reply (such as the Slack message a reply is
    /// streamed into), under `key`; None if there is none.
    async fn delivery_note(&self, key: &str) -> Result<Option<String>, StoreError> {
        let _ = key;
        Err(StoreError::Fatal("this store keeps no delivery notes".into()))
    }

    /// Sets the note `key` to `value` if it is `expected` now (None: if there is no note): a
    /// compare-and-set, so of two racing writers exactly one succeeds. True if it wrote.
    async fn swap_delivery_note(&self, key: &str, expected: Option<&str>, value: &str) -> Result<bool, StoreError> {
        let _ = (key, expected, value);
        Err(StoreError::Fatal("this store keeps no delivery notes".into()))
    }

    /// Adds `delta` to `counter` (which starts at 0) and returns its new value, in one atomic
    /// step across every process sharing the store: of two racing callers, each sees the
    /// other's delta or neither's, never half. The counter may be dropped once `expires_at` is
    /// past (a later expiry given here extends it); callers name their counters so that none is
    /// added to after its expiry (a window's number, a day, a process instance in the name).
    async fn add_to_counter(
        &self,
        counter: &Counter,
        delta: i64,
        expires_at: OffsetDateTime,
    ) -> Result<i64, StoreError>;

    /// Sets `counter` to `value` (a member reporting its own count of a group) until `expires_at`.
    async fn set_counter(&self, counter: &Counter, value: i64, expires_at: OffsetDateTime) -> Result<(), StoreError>;

    /// The sum of the counters of `group` that expire after `now`: every member's, so one
    /// counter's value when the group has a single member.
    async fn counter_total(&self, group: &str, now: OffsetDateTime) -> Result<i64, StoreError>;
}

/// A counter of the store ([`Store::add_to_counter`]): one member's count within a group whose
/// members' counts add up ([`Store::counter_total`]). A counter that stands alone is the only
/// member of its group, named `""`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Counter {
    pub group: String,
    pub member: String,
}

impl Counter {
    /// The counter that is its group's only member.
    pub fn single(group: impl Into<String>) -> Self {
        Self { group: group.into(), member: String::new() }
    }

    pub fn member(group: impl Into<String>, member: impl Into<String>) -> Self {
        Self { group: group.into(), member: member.into() }
    }

    /// One string naming the counter, unambiguously whatever the names hold: the group's
    /// length in bytes, `:`, the group, then the member.
    pub(crate) fn key(&self) -> String {
        format!("{}:{}{}", self.group.len(), self.group, self.member)
    }
}

/// `t` as the stores keep it: in UTC, to the millisecond.
pub(crate) fn to_stored_time(t: OffsetDateTime) -> Result<OffsetDateTime, StoreError> {
    let utc = t
        .checked_to_offset(time::UtcOffset::UTC)
        .ok_or_else(|| StoreError::Fatal(format!("time {t} cannot be stored")))?;
    utc.replace_nanosecond(utc.nanosecond() / 1_000_000 * 1_000_000)
        .map_err(|e| StoreError::Fatal(format!("time {t} cannot be stored: {e}")))
}

#[cfg(test)]
mod tests {
    use super::{Role, SessionRecord, StoredMessage};
    use schemas::DoubleTexting;

    #[test]
    fn a_session_recorded_without_a_policy_reads_as_enqueue() {
        let written_before_the_policy = r#"{
            "id": "s1", "user": null, "metadata": {}, "created_at": "2026-01-01T00:00:00Z"
        }"#;

        let session: SessionRecord = serde_json::from_str(written_before_the_policy).unwrap();

        assert_eq!(session.double_texting, DoubleTexting::Enqueue);
    }

    #[test]
    fn a_message_recorded_without_a_start_count_reads_as_never_started() {
        let written_before_the_counter = r#"{
            "id": "m_1", "session_id": "s1", "turn": 1, "role": "user", "text": "hello",
            "created_at": "2026-01-01T00:00:00Z", "reply_to": null, "finish_reason": null, "usage": null,
            "failure": null
        }"#;

        let message: StoredMessage = serde_json::from_str(written_before_the_counter).unwrap();

        assert_eq!(message.role, Role::User);
        assert_eq!(message.starts, 0);
    }
}
