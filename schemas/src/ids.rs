//! Validated identifiers: parse once at the edge, and the type carries the guarantee inside.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{what} must not be empty")]
    Empty { what: &'static str },
    #[error("{what} is longer than {max} characters")]
    TooLong { what: &'static str, max: usize },
    #[error("{what} contains a character that is not allowed")]
    BadCharacter { what: &'static str },
}

/// True for the characters allowed in every chatfleet identifier: they are safe in URLs,
/// NATS subjects, RabbitMQ routing keys and MongoDB keys alike.
fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

fn validate(what: &'static str, max: usize, s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { what });
    }
    if s.len() > max {
        return Err(IdError::TooLong { what, max });
    }
    if !s.chars().all(is_id_char) {
        return Err(IdError::BadCharacter { what });
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $what:literal, $max:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, JsonSchema)]
        #[serde(transparent)]
        #[schemars(transparent)]
        pub struct $name(
            #[schemars(regex(pattern = r"^[A-Za-z0-9_-]+$"), length(min = 1, max = $max))] String,
        );

        impl $name {
            /// The longest accepted value, in bytes.
            pub const MAX_LEN: usize = $max;

            /// Validates `s` and wraps it.
            pub fn parse(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                validate($what, $max, &s)?;
                Ok(Self(s))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// A session's id: `^[A-Za-z0-9_-]{1,64}$`. Also the partitioning key.
    SessionId, "session id", 64
);
id_type!(
    /// A user message's id, unique across the deployment. Derived from the client's
    /// idempotency key when there is one, so a repeated request maps to the same id.
    MessageId, "message id", 64
);
id_type!(
    /// The id of an assistant reply. There is at most one reply per user message, so the
    /// reply id is derived from the message id ([`ReplyId::for_message`]).
    ReplyId, "reply id", 66
);
id_type!(
    /// A worker's name in ownership records, logs, metrics and `chatfleet status`:
    /// `^[A-Za-z0-9_-]{1,128}$`. It is part of keys on the bus, so every bus takes it validated.
    WorkerId, "worker id", 128
);

impl WorkerId {
    /// A worker id made from a host name: characters an id may not hold become `-` (so
    /// `node-1.example.com` is `node-1-example-com`), at most 100 of them, leaving room for a
    /// suffix such as a process id; `worker` when nothing is left.
    pub fn from_host_name(name: &str) -> Self {
        let safe: String = name.chars().take(100).map(|c| if is_id_char(c) { c } else { '-' }).collect();
        Self(if safe.is_empty() { "worker".to_owned() } else { safe })
    }
}

/// A client's idempotency key for a message (`client_message_id`): 1 to 64 characters,
/// anything printable. It never travels on the bus; it only seeds [`MessageId::for_client_key`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, JsonSchema)]
#[serde(transparent)]
pub struct ClientMessageId(#[schemars(length(min = 1, max = 64))] String);

impl ClientMessageId {
    pub const MAX_CHARS: usize = 64;

    pub fn parse(s: impl Into<String>) -> Result<Self, IdError> {
        let s = s.into();
        let what = "client_message_id";
        if s.is_empty() {
            return Err(IdError::Empty { what });
        }
        if s.chars().count() > Self::MAX_CHARS {
            return Err(IdError::TooLong { what, max: Self::MAX_CHARS });
        }
        if s.chars().any(char::is_control) {
            return Err(IdError::BadCharacter { what });
        }
        Ok(Self(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for ClientMessageId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::parse(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl SessionId {
    /// A fresh random session id (`s_` and 32 hex digits).
    pub fn generate() -> Self {
        Self(format!("s_{}", uuid::Uuid::new_v4().simple()))
    }
}

impl MessageId {
    /// A fresh, time-ordered message id for a message without an idempotency key.
    pub fn generate() -> Self {
        Self(format!("m_{}", uuid::Uuid::now_v7().simple()))
    }

    /// The message id for a client's idempotency key within a session: the same inputs
    /// always give the same id, and different sessions never share one.
    pub fn for_client_key(session: &SessionId, key: &ClientMessageId) -> Self {
        // UUIDv5 over the pair, with a separator that cannot occur in either part.
        let name = format!("{}/{}", session.as_str(), key.as_str());
        let id = uuid::Uuid::new_v5(&CLIENT_KEY_NAMESPACE, name.as_bytes());
        Self(format!("c_{}", id.simple()))
    }
}

impl MessageId {
    /// The id of the bus envelope that cancels `target` in `session`: the same for every cancel
    /// of that message, and unlike any message's id (`x_` prefix).
    pub fn for_cancel(session: &SessionId, target: &MessageId) -> Self {
        let name = format!("{}/cancel/{}", session.as_str(), target.as_str());
        let id = uuid::Uuid::new_v5(&CLIENT_KEY_NAMESPACE, name.as_bytes());
        Self(format!("x_{}", id.simple()))
    }
}

impl ReplyId {
    /// The one reply id a message can have.
    pub fn for_message(message: &MessageId) -> Self {
        Self(format!("r_{}", message.as_str()))
    }
}

/// Namespace of the UUIDv5 ids derived from idempotency keys; fixed forever, since
/// changing it would break deduplication across an upgrade.
const CLIENT_KEY_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6a1c_5e0b_3f7d_4c2a_9b1e_8d44_2f0a_c3d1);

#[cfg(test)]
mod tests {

    #[test]
    fn worker_ids_made_from_host_names_keep_only_allowed_characters() {
        assert_eq!(WorkerId::from_host_name("node-1.example.com").as_str(), "node-1-example-com");
        assert_eq!(WorkerId::from_host_name("pod_7").as_str(), "pod_7");
        assert_eq!(WorkerId::from_host_name("").as_str(), "worker");
        assert_eq!(WorkerId::from_host_name(&"x".repeat(300)).as_str().len(), 100);
        assert!(WorkerId::parse("a.b").is_err());
    }
    use super::*;

    #[test]
    fn session_id_accepts_the_documented_alphabet() {
        assert!(SessionId::parse("abc_DEF-123").is_ok());
        assert!(SessionId::parse("a".repeat(64)).is_ok());
    }

    #[test]
    fn session_id_rejects_empty_long_and_foreign_characters() {
        assert_eq!(SessionId::parse(""), Err(IdError::Empty { what: "session id" }));
        assert!(matches!(SessionId::parse("a".repeat(65)), Err(IdError::TooLong { .. })));
        assert!(matches!(SessionId::parse("a.b"), Err(IdError::BadCharacter { .. })));
        assert!(matches!(SessionId::parse("a b"), Err(IdError::BadCharacter { .. })));
        assert!(matches!(SessionId::parse("é"), Err(IdError::BadCharacter { .. })));
    }

    #[test]
    fn deserializing_validates() {
        let bad: Result<SessionId, _> = serde_json::from_str("\"a*b\"");
        assert!(bad.is_err());
        let good: SessionId = serde_json::from_str("\"ab\"").unwrap();
        assert_eq!(good.as_str(), "ab");
    }

    #[test]
    fn client_keys_map_to_stable_per_session_message_ids() {
        let s1 = SessionId::parse("s1").unwrap();
        let s2 = SessionId::parse("s2").unwrap();
        let k = ClientMessageId::parse("order #1: k-1").unwrap();
        let a = MessageId::for_client_key(&s1, &k);
        assert_eq!(a, MessageId::for_client_key(&s1, &k));
        assert_ne!(a, MessageId::for_client_key(&s2, &k));
        assert!(MessageId::parse(a.as_str()).is_ok());
    }

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let a = MessageId::generate();
        let b = MessageId::generate();
        assert_ne!(a, b);
        assert!(MessageId::parse(a.as_str()).is_ok());
        assert!(SessionId::parse(SessionId::generate().as_str()).is_ok());
        assert!(ReplyId::parse(ReplyId::for_message(&a).as_str()).is_ok());
    }
}
