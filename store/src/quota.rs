//! The names of the quota counters ([`crate::Counter`]) that the gateway checks and the worker
//! adds to, in one place so that both spell them alike. A scope is an API key (by name), or an
//! end user of a key; users are named by a digest of their id, which may hold any characters
//! and should not be spread across counter names in the clear.

use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::Counter;

/// Whose use a counter counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// Everything done under an API key.
    Key(&'a str),
    /// What one end user (`user` of their sessions) did under an API key.
    User { key: &'a str, user: &'a str },
}

impl Scope<'_> {
    fn name(&self) -> String {
        match self {
            Scope::Key(key) => format!("key:{key}"),
            Scope::User { key, user } => {
                let digest = Sha256::digest(user.as_bytes());
                let short: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
                format!("user:{key}:{short}")
            }
        }
    }
}

/// The UTC day of `t`, as days since the Unix epoch.
pub fn day(t: OffsetDateTime) -> i64 {
    t.unix_timestamp().div_euclid(86_400)
}

/// Model tokens used by `scope` on `day` ([`day`]); the worker adds each reply's usage.
pub fn tokens(scope: Scope<'_>, day: i64) -> Counter {
    Counter::single(format!("tokens:{}:{day}", scope.name()))
}

/// When a day's token counter may be dropped: a day after the day ends.
pub fn tokens_expiry(day: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp((day + 2) * 86_400).unwrap_or(OffsetDateTime::now_utc())
}

/// Messages accepted for `scope` in UTC minute `minute` (minutes since the Unix epoch).
pub fn messages(scope: Scope<'_>, minute: i64) -> Counter {
    Counter::single(format!("messages:{}:{minute}", scope.name()))
}

/// Messages accepted for one session in UTC minute `minute`.
pub fn session_messages(session: &schemas::SessionId, minute: i64) -> Counter {
    Counter::single(format!("messages:session:{session}:{minute}"))
}

/// Sessions existing under `scope`.
pub fn sessions(scope: Scope<'_>) -> Counter {
    Counter::single(format!("sessions:{}", scope.name()))
}

/// The group of `scope`'s open-stream counters; each gateway reports its own count as a member.
pub fn open_streams_group(scope: Scope<'_>) -> String {
    format!("streams:{}", scope.name())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_of_different_keys_and_different_users_get_different_counters() {
        let a = tokens(Scope::User { key: "k1", user: "alice" }, 7);
        assert_ne!(a, tokens(Scope::User { key: "k2", user: "alice" }, 7));
        assert_ne!(a, tokens(Scope::User { key: "k1", user: "bob" }, 7));
        assert_ne!(a, tokens(Scope::User { key: "k1", user: "alice" }, 8));
        assert_ne!(a, tokens(Scope::Key("k1"), 7));
        assert!(!a.group.contains("alice"), "the user id is spelled out: {}", a.group);
    }
}
