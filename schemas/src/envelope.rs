//! The bus envelopes: a user message on its way to a worker, and the reply events on their
//! way back to whichever gateway holds the user's stream.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{ErrorCode, MessageId, ReplyId, SessionId};

/// A user message accepted by a gateway, published to the session's partition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(title = "UserMessage", description = "chatfleet bus envelope: a user message for a worker")]
pub struct UserMessage {
    /// Envelope version ([`crate::ENVELOPE_VERSION`]).
    pub v: u32,
    pub session_id: SessionId,
    /// Unique per message; the bus deduplicates on it and the store keys on it.
    pub message_id: MessageId,
    /// The user's text, 1 to 16384 bytes of UTF-8.
    pub text: String,
    /// When the gateway accepted the message.
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String", extend("format" = "date-time"))]
    pub accepted_at: OffsetDateTime,
    /// The session's double-texting policy, so that a worker knows what a message arriving
    /// behind an unfinished one means without reading the session. Absent (as in envelopes
    /// written before the field existed): `enqueue`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub double_texting: Option<DoubleTexting>,
    /// The chat platform or webhook integration that brought the message, whose reply a
    /// gateway delivers back there. Absent for messages of the HTTP API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<crate::ChannelOrigin>,
    /// Set, this envelope is no message but a request to cancel the session's message with this
    /// id (its `text` is empty and it gets no reply): it travels through the session's
    /// partition behind the message it cancels, so it reaches whichever worker holds that
    /// message, waiting or being answered. Absent in every ordinary message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel: Option<MessageId>,
}

impl UserMessage {
    /// A request to cancel `target` in `session`, accepted now. Its own id derives from the
    /// target's, so repeated cancels are one bus message wherever the bus deduplicates.
    pub fn cancel_request(session: &SessionId, target: &MessageId) -> Self {
        Self {
            v: crate::ENVELOPE_VERSION,
            session_id: session.clone(),
            message_id: MessageId::for_cancel(session, target),
            text: String::new(),
            accepted_at: OffsetDateTime::now_utc(),
            double_texting: None,
            channel: None,
            cancel: Some(target.clone()),
        }
    }

    /// The policy the message was accepted under; an envelope that names none means enqueue.
    pub fn policy(&self) -> DoubleTexting {
        self.double_texting.unwrap_or_default()
    }
}

/// What happens when a user sends a message while an earlier one of the session is still
/// being answered ("double texting"). Chosen per session when it is created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DoubleTexting {
    /// Answer each message in turn, each with the previous answers in context.
    #[default]
    Enqueue,
    /// Refuse the new message while an earlier one has no outcome yet.
    Reject,
    /// Stop the reply in progress, keep its text so far as its reply, then answer the new one.
    Interrupt,
}

impl DoubleTexting {
    /// Every policy, in the order documentation lists them.
    pub const ALL: [DoubleTexting; 3] = [Self::Enqueue, Self::Reject, Self::Interrupt];

    /// The policy's name on the wire and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enqueue => "enqueue",
            Self::Reject => "reject",
            Self::Interrupt => "interrupt",
        }
    }
}

impl fmt::Display for DoubleTexting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DoubleTexting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|p| p.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|p| p.as_str()).collect();
            format!("unknown double-texting policy {s:?}; expected one of {}", names.join(", "))
        })
    }
}

/// Position of a reply event within its session: the conversation turn of the message it
/// answers, how many times generating that reply has started (a reply restarted by another
/// worker after a crash or hand-over starts again with a higher count), then the event's
/// sequence within that start. Rendered as `TTTTTTTTTT-SSS-QQQQQQ`, so ids sort correctly as
/// strings as well as field by field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId {
    pub turn: u64,
    pub start: u32,
    pub seq: u32,
}

impl EventId {
    pub fn new(turn: u64, start: u32, seq: u32) -> Self {
        Self { turn, start, seq }
    }

    /// The id of a turn's terminal event (`done` or `error`): above every other event of the
    /// turn, and the same however often the outcome is announced.
    pub fn terminal(turn: u64) -> Self {
        Self { turn, start: 999, seq: 999_999 }
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:010}-{:03}-{:06}", self.turn, self.start, self.seq)
    }
}

impl std::str::FromStr for EventId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("not an event id: {s:?}");
        let mut parts = s.split('-');
        let (Some(t), Some(a), Some(q), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(bad());
        };
        Ok(Self {
            turn: t.parse().map_err(|_| bad())?,
            start: a.parse().map_err(|_| bad())?,
            seq: q.parse().map_err(|_| bad())?,
        })
    }
}

impl Serialize for EventId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EventId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for EventId {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "EventId".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string", "pattern": "^[0-9]{10,}-[0-9]{3,}-[0-9]{6,}$"})
    }
}

/// One event of a reply, published on the session's reply subject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(title = "ReplyEvent", description = "chatfleet bus envelope: one event of a reply")]
pub struct ReplyEvent {
    /// Envelope version ([`crate::ENVELOPE_VERSION`]).
    pub v: u32,
    /// Increasing within the session; becomes the SSE `id`.
    pub event_id: EventId,
    pub session_id: SessionId,
    /// The user message this event answers.
    pub message_id: MessageId,
    #[serde(flatten)]
    pub kind: ReplyEventKind,
}

/// What a reply event says. The tag is the SSE event type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ReplyEventKind {
    /// A chunk of the reply; `index` counts 0, 1, 2, ... within the reply.
    Delta { index: u32, text: String },
    /// The deltas sent so far for this message are void: generation restarted (after a
    /// transient model error) and the reply begins again at index 0.
    Reset { reason: String },
    /// The reply is complete and stored.
    Done {
        reply_id: ReplyId,
        text: String,
        finish_reason: FinishReason,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        usage: Option<Usage>,
    },
    /// The message could not be answered; it will not be retried. (Any string is a valid code
    /// on the wire: readers keep codes they do not know.)
    Error {
        #[schemars(with = "String")]
        code: ErrorCode,
        message: String,
    },
}

impl ReplyEventKind {
    /// The SSE event type.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Delta { .. } => "delta",
            Self::Reset { .. } => "reset",
            Self::Done { .. } => "done",
            Self::Error { .. } => "error",
        }
    }

    /// True for the last event of a reply.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Done { .. } | Self::Error { .. })
    }
}

impl ReplyEvent {
    /// The SSE `data:` payload of this event as http-api.md defines it: the session and
    /// message ids plus the event's own fields, without the bus-only `v`, `event_id`, `type`.
    pub fn client_payload(&self) -> serde_json::Value {
        serde_json::to_value(ClientPayload(self)).unwrap_or_default()
    }

    /// [`Self::client_payload`] as JSON text, written straight from the event (no intermediate
    /// value): what a gateway sends for every event of every reply.
    pub fn client_payload_json(&self) -> String {
        serde_json::to_string(&ClientPayload(self)).unwrap_or_default()
    }
}

/// The client's view of a reply event (see [`ReplyEvent::client_payload`]). Every variant's
/// fields are named here, so a field added to one fails to compile until it is placed.
struct ClientPayload<'a>(&'a ReplyEvent);

impl Serialize for ClientPayload<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let event = self.0;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("session_id", &event.session_id)?;
        map.serialize_entry("message_id", &event.message_id)?;
        match &event.kind {
            ReplyEventKind::Delta { index, text } => {
                map.serialize_entry("index", index)?;
                map.serialize_entry("text", text)?;
            }
            ReplyEventKind::Reset { reason } => map.serialize_entry("reason", reason)?,
            ReplyEventKind::Done { reply_id, text, finish_reason, usage } => {
                map.serialize_entry("reply_id", reply_id)?;
                map.serialize_entry("text", text)?;
                map.serialize_entry("finish_reason", finish_reason)?;
                if let Some(usage) = usage {
                    map.serialize_entry("usage", usage)?;
                }
            }
            ReplyEventKind::Error { code, message } => {
                map.serialize_entry("code", code)?;
                map.serialize_entry("message", message)?;
            }
        }
        map.end()
    }
}

/// Why the model stopped. Unknown reasons from a model are kept as they are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
    ContentFilter,
    #[serde(untagged)]
    Other(String),
}

impl FinishReason {
    /// The finish reason of a reply cut short by a newer message of its session (the
    /// [`DoubleTexting::Interrupt`] policy). Kept as [`FinishReason::Other`] so that readers
    /// built before it existed read it the same way.
    pub const INTERRUPTED: &str = "interrupted";

    pub fn interrupted() -> Self {
        Self::Other(Self::INTERRUPTED.to_owned())
    }

    pub fn is_interrupted(&self) -> bool {
        matches!(self, Self::Other(reason) if reason == Self::INTERRUPTED)
    }

    /// The finish reason of a reply stopped by a cancel request
    /// (`POST .../messages/{id}/cancel`), kept as [`FinishReason::Other`] like `interrupted`.
    pub const CANCELLED: &str = "cancelled";

    pub fn cancelled() -> Self {
        Self::Other(Self::CANCELLED.to_owned())
    }

    pub fn is_cancelled(&self) -> bool {
        matches!(self, Self::Other(reason) if reason == Self::CANCELLED)
    }

    /// Whether the reply was cut short by the session's user (interrupted or cancelled) rather
    /// than finished by the model.
    pub fn is_cut_short(&self) -> bool {
        self.is_interrupted() || self.is_cancelled()
    }
}

/// Token counts as the model reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: ReplyEventKind) -> ReplyEvent {
        ReplyEvent {
            v: crate::ENVELOPE_VERSION,
            event_id: EventId::new(3, 1, 7),
            session_id: SessionId::parse("s1").unwrap(),
            message_id: MessageId::parse("m1").unwrap(),
            kind,
        }
    }

    #[test]
    fn event_ids_sort_as_strings_and_round_trip() {
        let a = EventId::new(2, 1, 999_999);
        let b = EventId::new(10, 1, 0);
        let c = EventId::new(10, 2, 0);
        assert!(a.to_string() < b.to_string());
        assert!(b.to_string() < c.to_string());
        assert!(b < c);
        assert_eq!(a.to_string().parse::<EventId>().unwrap(), a);
        assert!("x".parse::<EventId>().is_err());
    }

    #[test]
    fn reply_events_round_trip_through_json() {
        let e = event(ReplyEventKind::Done {
            reply_id: ReplyId::parse("r_m1").unwrap(),
            text: "hi".into(),
            finish_reason: FinishReason::Other("tool_calls".into()),
            usage: Some(Usage { prompt_tokens: 1, completion_tokens: 2 }),
        });
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<ReplyEvent>(&json).unwrap(), e);
    }

    #[test]
    fn client_payload_has_exactly_the_documented_delta_fields() {
        let e = event(ReplyEventKind::Delta { index: 4, text: "abc".into() });
        let payload = e.client_payload();
        let mut keys: Vec<_> = payload.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["index", "message_id", "session_id", "text"]);
        assert_eq!(payload["index"], 4);
        assert_eq!(e.kind.name(), "delta");
    }

    #[test]
    fn the_client_payload_is_the_kind_without_its_tag_plus_the_ids_for_every_kind() {
        let kinds = [
            ReplyEventKind::Delta { index: 4, text: "a \"quoted\"\nline".into() },
            ReplyEventKind::Reset { reason: "model_unavailable".into() },
            ReplyEventKind::Done {
                reply_id: ReplyId::for_message(&MessageId::parse("m1").unwrap()),
                text: "whole".into(),
                finish_reason: FinishReason::interrupted(),
                usage: Some(Usage { prompt_tokens: 3, completion_tokens: 5 }),
            },
            ReplyEventKind::Done {
                reply_id: ReplyId::for_message(&MessageId::parse("m2").unwrap()),
                text: String::new(),
                finish_reason: FinishReason::Stop,
                usage: None,
            },
            ReplyEventKind::Error { code: ErrorCode::ModelUnavailable, message: "down".into() },
        ];
        for kind in kinds {
            let e = event(kind.clone());
            let mut expected = serde_json::to_value(&kind).unwrap();
            let map = expected.as_object_mut().unwrap();
            map.remove("type");
            map.insert("session_id".into(), e.session_id.as_str().into());
            map.insert("message_id".into(), e.message_id.as_str().into());
            assert_eq!(e.client_payload(), expected);
            assert_eq!(serde_json::from_str::<serde_json::Value>(&e.client_payload_json()).unwrap(), expected);
        }
    }

    fn user_message(json: &str) -> UserMessage {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn an_envelope_without_a_policy_reads_as_enqueue_and_is_written_without_one() {
        let old = r#"{"v": 1, "session_id": "s1", "message_id": "m1", "text": "hi",
            "accepted_at": "2026-01-01T00:00:00Z"}"#;

        let message = user_message(old);

        assert_eq!(message.double_texting, None);
        assert_eq!(message.policy(), DoubleTexting::Enqueue);
        assert!(!serde_json::to_string(&message).unwrap().contains("double_texting"));
    }

    #[test]
    fn a_policy_travels_in_the_envelope_by_its_snake_case_name() {
        let message = UserMessage {
            double_texting: Some(DoubleTexting::Interrupt),
            channel: None,
            ..user_message(
                r#"{"v": 1, "session_id": "s1", "message_id": "m1", "text": "hi",
                "accepted_at": "2026-01-01T00:00:00Z"}"#,
            )
        };

        let json = serde_json::to_value(&message).unwrap();

        assert_eq!(json["double_texting"], "interrupt");
        assert_eq!(serde_json::from_value::<UserMessage>(json).unwrap().policy(), DoubleTexting::Interrupt);
    }

    #[test]
    fn policies_parse_from_their_names_only() {
        for policy in DoubleTexting::ALL {
            assert_eq!(policy.as_str().parse::<DoubleTexting>(), Ok(policy));
            assert_eq!(serde_json::to_value(policy).unwrap(), policy.as_str());
        }
        let unknown = "later".parse::<DoubleTexting>().unwrap_err();
        assert!(unknown.contains("enqueue, reject, interrupt"), "{unknown}");
    }

    #[test]
    fn an_interrupted_reply_has_a_plain_string_finish_reason() {
        let reason = FinishReason::interrupted();

        assert_eq!(serde_json::to_string(&reason).unwrap(), "\"interrupted\"");
        assert!(serde_json::from_str::<FinishReason>("\"interrupted\"").unwrap().is_interrupted());
        assert!(!FinishReason::Stop.is_interrupted());
    }

    #[test]
    fn finish_reasons_serialize_as_plain_strings() {
        assert_eq!(serde_json::to_string(&FinishReason::Stop).unwrap(), "\"stop\"");
        assert_eq!(serde_json::to_string(&FinishReason::Other("x".into())).unwrap(), "\"x\"");
        assert_eq!(serde_json::from_str::<FinishReason>("\"length\"").unwrap(), FinishReason::Length);
        assert_eq!(serde_json::from_str::<FinishReason>("\"odd\"").unwrap(), FinishReason::Other("odd".into()));
    }
}
