//! Proof that every user got their own reply and nobody else's.
//!
//! Each message opens with a marker naming its run, user and turn. The mock model (and the
//! fleet's stand-in) begin a reply with an echo of the start of the message, so a reply must
//! begin with the echo of its own message, and must not carry any other user's marker. A real
//! model does not echo: `--echo-chars 0` turns the echo check off and keeps the marker check.

use serde::ser::{Serialize, SerializeStruct, Serializer};

/// How one reply broke isolation; a reply may break it in several ways at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Violations {
    /// The reply does not begin with the echo of the message it answers.
    pub wrong_echo: u64,
    /// The reply carries another user's marker.
    pub foreign_marker: u64,
    /// A reply event named another session (gateway target only).
    pub foreign_session: u64,
}

impl Violations {
    pub fn total(&self) -> u64 {
        self.wrong_echo + self.foreign_marker + self.foreign_session
    }

    pub fn add(&mut self, other: &Violations) {
        self.wrong_echo += other.wrong_echo;
        self.foreign_marker += other.foreign_marker;
        self.foreign_session += other.foreign_session;
    }
}

/// Serialized with the total beside the kinds, so that a script reading the JSON report needs
/// one field to know whether isolation held.
impl Serialize for Violations {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut fields = serializer.serialize_struct("Violations", 4)?;
        fields.serialize_field("violations", &self.total())?;
        fields.serialize_field("wrong_echo", &self.wrong_echo)?;
        fields.serialize_field("foreign_marker", &self.foreign_marker)?;
        fields.serialize_field("foreign_session", &self.foreign_session)?;
        fields.end()
    }
}

/// The start of the reply the mock model gives to `message`: `You said: "<echo>".`, the echo
/// being the first `echo_chars` characters of the message with its whitespace collapsed.
///
/// The space the mock puts after the closing full stop is left out: when the echo is the whole
/// reply, the mock trims it.
pub fn expected_echo(message: &str, echo_chars: usize) -> String {
    let collapsed = message.split_whitespace().collect::<Vec<_>>().join(" ");
    let echoed: String = collapsed.chars().take(echo_chars).collect();
    format!("You said: \"{}\".", echoed.trim_end())
}

/// The users whose markers appear in `reply`, in order of appearance.
pub fn markers_in(reply: &str, marker_prefix: &str) -> Vec<u64> {
    let mut users = Vec::new();
    let mut rest = reply;
    while let Some(at) = rest.find(marker_prefix) {
        rest = &rest[at + marker_prefix.len()..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        // A prefix without a number is not a marker, just text that looks like one.
        if let Ok(user) = rest[..digits].parse() {
            users.push(user);
        }
        rest = &rest[digits..];
    }
    users
}

/// Checks the reply of `user` to `message`.
pub fn check_reply(reply: &str, message: &str, user: u64, marker_prefix: &str, echo_chars: usize) -> Violations {
    let mut violations = Violations::default();
    if echo_chars > 0 && !reply.starts_with(&expected_echo(message, echo_chars)) {
        violations.wrong_echo = 1;
    }
    if markers_in(reply, marker_prefix).into_iter().any(|other| other != user) {
        violations.foreign_marker = 1;
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expected_echo_matches_the_mock_model() {
        let message = "user-abc-7 turn 0:   hello\n fleet, this message is rather longer than the echo";

        let echo = expected_echo(message, 48);

        assert_eq!(echo, "You said: \"user-abc-7 turn 0: hello fleet, this message is\".");
    }

    #[test]
    fn a_reply_echoing_its_own_message_passes() {
        let message = "user-abc-7 turn 2: hello";
        let reply = "You said: \"user-abc-7 turn 2: hello\". This is a stand-in reply";

        assert_eq!(check_reply(reply, message, 7, "user-abc-", 48), Violations::default());
    }

    #[test]
    fn a_reply_carrying_another_users_marker_is_a_violation() {
        let message = "user-abc-7 turn 0: hello";
        let reply = "You said: \"user-abc-7 turn 0: hello\". and user-abc-71 turn 0 too";

        let violations = check_reply(reply, message, 7, "user-abc-", 48);

        assert_eq!(violations.foreign_marker, 1);
        assert_eq!(violations.wrong_echo, 0);
    }

    #[test]
    fn a_reply_echoing_another_message_is_a_violation() {
        let reply = "You said: \"user-abc-8 turn 0: hello\". This";

        let violations = check_reply(reply, "user-abc-7 turn 0: hello", 7, "user-abc-", 48);

        assert_eq!(violations, Violations { wrong_echo: 1, foreign_marker: 1, foreign_session: 0 });
    }

    #[test]
    fn without_the_echo_check_only_markers_count() {
        let reply = "Hello! How can I help you today?";

        assert_eq!(check_reply(reply, "user-abc-7 turn 0: hello", 7, "user-abc-", 0).total(), 0);
    }

    #[test]
    fn markers_of_other_runs_are_not_counted() {
        assert_eq!(markers_in("user-xyz-3 turn 0, user-abc-4 turn 1, user-abc-x", "user-abc-"), vec![4]);
    }
}
