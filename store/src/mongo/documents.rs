//! The MongoDB document shapes of sessions, messages and secrets, and their conversion to and
//! from the store's records.

use std::collections::BTreeMap;

use mongodb::bson::{self, Binary};
use schemas::{DoubleTexting, FinishReason, MessageId, SessionId, Usage};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{Failure, Role, SessionRecord, StoreError, StoredMessage};

/// A document of the `sessions` collection, keyed by the session id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SessionDoc {
    #[serde(rename = "_id")]
    pub id: SessionId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Key/value pairs rather than a sub-document: metadata keys come from clients, and a key
    /// such as `$where` or `a.b` is not a safe MongoDB field name.
    #[serde(default)]
    pub metadata: Vec<MetadataEntry>,
    pub created_at: bson::DateTime,
    /// Missing on sessions written before the policy existed, which read as enqueue.
    #[serde(default)]
    pub double_texting: DoubleTexting,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// The reply-in-progress marker (`Store::begin_reply`): the message it names and when it was
    /// set. Set and cleared by conditional updates, never by writing the whole document, and not
    /// part of the [`SessionRecord`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub busy: Option<MessageId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub busy_since: Option<bson::DateTime>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct MetadataEntry {
    pub key: String,
    pub value: String,
}

/// A document of the `messages` collection, keyed by the message id or reply id.
///
/// `position` is stored (rather than derived on read) because the unique
/// `{session_id, position}` index is what keeps two messages off one conversation position.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct MessageDoc {
    #[serde(rename = "_id")]
    pub id: String,
    pub session_id: SessionId,
    pub position: i64,
    pub turn: i64,
    pub role: Role,
    pub text: String,
    pub created_at: bson::DateTime,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<MessageId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<FinishReason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    /// The generation start counter, a BSON int that `$inc` updates in place. Missing on documents written before
    /// it existed, which read as 0.
    #[serde(default)]
    pub starts: i32,
}

/// A document of the `secrets` collection, keyed by the secret's name.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SecretDoc {
    #[serde(rename = "_id")]
    pub name: String,
    pub value: Binary,
}

/// A channel's note about the delivery of one reply (`Store::delivery_note`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct NoteDoc {
    #[serde(rename = "_id")]
    pub key: String,
    pub value: String,
}

/// A [`crate::Counter`]: `_id` names it unambiguously ([`crate::Counter::key`]), `group` is what
/// [`crate::Store::counter_total`] selects by. A TTL index drops it once `expires_at` is past.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct CounterDoc {
    #[serde(rename = "_id")]
    pub id: String,
    pub group: String,
    pub n: i64,
    pub expires_at: bson::DateTime,
}

/// A time as a BSON datetime, which has millisecond precision; finer digits are dropped.
pub(crate) fn to_bson_time(t: OffsetDateTime) -> Result<bson::DateTime, StoreError> {
    let millis = t.unix_timestamp_nanos().div_euclid(1_000_000);
    i64::try_from(millis)
        .map(bson::DateTime::from_millis)
        .map_err(|_| StoreError::Fatal(format!("time {t} cannot be stored")))
}

pub(crate) fn from_bson_time(t: bson::DateTime) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(t.timestamp_millis()) * 1_000_000)
        .map_err(|e| StoreError::Fatal(format!("stored time {t} is out of range: {e}")))
}

fn to_i64(n: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(n).map_err(|_| StoreError::Fatal(format!("{what} {n} is too large to store")))
}

fn to_u64(n: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(n).map_err(|_| StoreError::Fatal(format!("stored {what} {n} is negative")))
}

/// A stored start count as the record's `u32`.
pub(crate) fn starts_value(n: i32) -> Result<u32, StoreError> {
    u32::try_from(n).map_err(|_| StoreError::Fatal(format!("stored start count {n} is out of range")))
}

pub(crate) fn position_value(position: u64) -> Result<i64, StoreError> {
    to_i64(position, "position")
}

impl SessionDoc {
    pub(crate) fn from_record(record: &SessionRecord) -> Result<Self, StoreError> {
        Ok(Self {
            id: record.id.clone(),
            user: record.user.clone(),
            metadata: record
                .metadata
                .iter()
                .map(|(key, value)| MetadataEntry { key: key.clone(), value: value.clone() })
                .collect(),
            created_at: to_bson_time(record.created_at)?,
            double_texting: record.double_texting,
            api_key: record.api_key.clone(),
            busy: None,
            busy_since: None,
        })
    }

    pub(crate) fn into_record(self) -> Result<SessionRecord, StoreError> {
        Ok(SessionRecord {
            id: self.id,
            user: self.user,
            metadata: self.metadata.into_iter().map(|e| (e.key, e.value)).collect::<BTreeMap<_, _>>(),
            created_at: from_bson_time(self.created_at)?,
            double_texting: self.double_texting,
            api_key: self.api_key,
        })
    }
}

impl MessageDoc {
    pub(crate) fn from_record(message: &StoredMessage) -> Result<Self, StoreError> {
        Ok(Self {
            id: message.id.clone(),
            session_id: message.session_id.clone(),
            position: position_value(message.position())?,
            turn: to_i64(message.turn, "turn")?,
            role: message.role,
            text: message.text.clone(),
            created_at: to_bson_time(message.created_at)?,
            reply_to: message.reply_to.clone(),
            finish_reason: message.finish_reason.clone(),
            usage: message.usage,
            failure: message.failure.clone(),
            starts: i32::try_from(message.starts)
                .map_err(|_| StoreError::Fatal(format!("start count {} is too large to store", message.starts)))?,
        })
    }

    pub(crate) fn into_record(self) -> Result<StoredMessage, StoreError> {
        Ok(StoredMessage {
            id: self.id,
            session_id: self.session_id,
            turn: to_u64(self.turn, "turn")?,
            role: self.role,
            text: self.text,
            created_at: from_bson_time(self.created_at)?,
            reply_to: self.reply_to,
            finish_reason: self.finish_reason,
            usage: self.usage,
            failure: self.failure,
            starts: starts_value(self.starts)?,
        })
    }
}
