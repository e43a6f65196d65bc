//! The wire contract's parsers against hostile input: property-based tests (proptest) that
//! every parser of an identifier, an event id or an envelope never panics on arbitrary input,
//! accepts exactly what the contract allows, and round-trips what it accepts; and that no value
//! a client controls can change the shape of a NATS subject or a RabbitMQ routing key, because
//! every one of them reaches a name only as a validated id.
//!
//! A failing case is printed by proptest with the input that broke it (shrunk), and the seed
//! is kept in `proptest-regressions/` next to this file so it is replayed on the next run.

use chatfleet_schemas as schemas;
use proptest::prelude::*;
use schemas::subjects::{AmqpNames, Names};
use schemas::{
    ChannelDelivery, ClientMessageId, ErrorCode, EventId, MessageId, Partition, PartitionCount, ReplyEvent, ReplyId,
    SessionId, UserMessage, WorkerId,
};

/// What each kind of id accepts: 1 to `max` of `[A-Za-z0-9_-]`.
fn allowed(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The values a client sends where an id goes, made to break a subject or a routing key: the
/// separators and wildcards of NATS (`.`, `*`, `>`) and AMQP topics (`.`, `*`, `#`), white
/// space, control characters, Unicode look-alikes and lengths beyond the limit.
const INJECTIONS: &[&str] = &[
    "",
    ".",
    "a.b",
    "s_1.>",
    "*",
    ">",
    "#",
    "s_1.*",
    "chatfleet.in.3.s_1",
    "a b",
    " s_1",
    "s_1 ",
    "s_1\t",
    "s_1\n",
    "s_1\r\nX-Injected: 1",
    "s_1\0",
    "s\u{00a0}1",
    "s\u{2024}1",
    "s\u{ff0e}1",
    "s\u{2217}1",
    "séance",
    "ß",
    "🙂",
    "../etc",
    "%2e",
    "s_1/other",
];

fn any_id_like() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9_-]{0,80}",
        "[A-Za-z0-9_.*>#-]{0,20}",
        any::<String>(),
        proptest::sample::select(INJECTIONS).prop_map(str::to_owned),
        ("[A-Za-z0-9_-]{1,10}", proptest::sample::select(INJECTIONS), "[A-Za-z0-9_-]{0,10}")
            .prop_map(|(a, b, c)| format!("{a}{b}{c}")),
    ]
}

fn session_id() -> impl Strategy<Value = SessionId> {
    "[A-Za-z0-9_-]{1,64}".prop_map(|s| SessionId::parse(s).unwrap())
}

fn message_id() -> impl Strategy<Value = MessageId> {
    "[A-Za-z0-9_-]{1,64}".prop_map(|s| MessageId::parse(s).unwrap())
}

fn event_id() -> impl Strategy<Value = EventId> {
    (any::<u64>(), any::<u32>(), any::<u32>()).prop_map(|(t, a, q)| EventId::new(t, a, q))
}

fn reply_event() -> impl Strategy<Value = ReplyEvent> {
    let kind = prop_oneof![
        (any::<u32>(), any::<String>()).prop_map(|(index, text)| schemas::ReplyEventKind::Delta { index, text }),
        any::<String>().prop_map(|reason| schemas::ReplyEventKind::Reset { reason }),
        (message_id(), any::<String>(), "[a-z_]{1,20}").prop_map(|(m, text, reason)| schemas::ReplyEventKind::Done {
            reply_id: ReplyId::for_message(&m),
            text,
            finish_reason: serde_json::from_value(serde_json::Value::String(reason)).unwrap(),
            usage: None,
        }),
        ("[a-z_]{1,30}", any::<String>())
            .prop_map(|(code, message)| schemas::ReplyEventKind::Error { code: ErrorCode::from(code), message }),
    ];
    (event_id(), session_id(), message_id(), kind).prop_map(|(event_id, session_id, message_id, kind)| ReplyEvent {
        v: schemas::ENVELOPE_VERSION,
        event_id,
        session_id,
        message_id,
        kind,
    })
}

fn user_message() -> impl Strategy<Value = UserMessage> {
    (session_id(), message_id(), any::<String>(), proptest::option::of(message_id()), 0i64..4_000_000_000).prop_map(
        |(session_id, message_id, text, cancel, seconds)| UserMessage {
            v: schemas::ENVELOPE_VERSION,
            session_id,
            message_id,
            text,
            accepted_at: time::OffsetDateTime::from_unix_timestamp(seconds).unwrap(),
            double_texting: Some(schemas::DoubleTexting::Reject),
            channel: None,
            cancel,
        },
    )
}

/// Arbitrary JSON text that looks enough like an envelope to reach the field parsers.
fn envelope_like_json() -> impl Strategy<Value = String> {
    let value = prop_oneof![
        any::<String>().prop_map(serde_json::Value::String),
        any::<i64>().prop_map(serde_json::Value::from),
        Just(serde_json::Value::Null),
        proptest::sample::select(INJECTIONS).prop_map(serde_json::Value::from),
    ];
    let fields = proptest::sample::subsequence(
        vec![
            "v",
            "session_id",
            "message_id",
            "text",
            "accepted_at",
            "event_id",
            "type",
            "index",
            "reply_id",
            "cancel",
            "channel",
            "code",
        ],
        0..12,
    );
    (fields, proptest::collection::vec(value, 12)).prop_map(|(names, values)| {
        let object: serde_json::Map<String, serde_json::Value> =
            names.into_iter().map(str::to_owned).zip(values).collect();
        serde_json::Value::Object(object).to_string()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn every_id_parser_accepts_exactly_letters_digits_underscore_and_hyphen(s in any_id_like()) {
        prop_assert_eq!(SessionId::parse(s.as_str()).is_ok(), allowed(&s, 64));
        prop_assert_eq!(MessageId::parse(s.as_str()).is_ok(), allowed(&s, 64));
        prop_assert_eq!(ReplyId::parse(s.as_str()).is_ok(), allowed(&s, 66));
        prop_assert_eq!(WorkerId::parse(s.as_str()).is_ok(), allowed(&s, 128));
        // The same through serde, as envelopes and request bodies read them.
        let json = serde_json::Value::String(s.clone());
        prop_assert_eq!(serde_json::from_value::<SessionId>(json.clone()).is_ok(), allowed(&s, 64));
        prop_assert_eq!(serde_json::from_value::<MessageId>(json).is_ok(), allowed(&s, 64));
    }

    #[test]
    fn an_accepted_id_round_trips_through_its_text_and_json(id in session_id()) {
        prop_assert_eq!(SessionId::parse(id.to_string()).unwrap(), id.clone());
        let json = serde_json::to_string(&id).unwrap();
        prop_assert_eq!(serde_json::from_str::<SessionId>(&json).unwrap(), id);
    }

    #[test]
    fn a_client_message_id_is_one_to_64_characters_without_control_characters(s in any_id_like()) {
        let valid = (1..=64).contains(&s.chars().count()) && !s.chars().any(char::is_control);
        prop_assert_eq!(ClientMessageId::parse(s.as_str()).is_ok(), valid);
    }

    #[test]
    fn ids_derived_from_client_keys_are_valid_ids_and_the_same_every_time(session in session_id(), key in "\\PC{1,64}") {
        let key = ClientMessageId::parse(key).unwrap();
        let id = MessageId::for_client_key(&session, &key);
        prop_assert!(MessageId::parse(id.as_str()).is_ok());
        prop_assert_eq!(&id, &MessageId::for_client_key(&session, &key));
        let cancel = MessageId::for_cancel(&session, &id);
        prop_assert!(MessageId::parse(cancel.as_str()).is_ok());
        prop_assert!(ReplyId::parse(ReplyId::for_message(&id).as_str()).is_ok());
    }

    #[test]
    fn a_worker_id_made_from_any_host_name_is_a_valid_id(name in any::<String>()) {
        let id = WorkerId::from_host_name(&name);
        prop_assert!(WorkerId::parse(id.as_str()).is_ok(), "{:?} gave {:?}", name, id);
    }

    #[test]
    fn an_event_id_round_trips_through_its_text(id in event_id()) {
        prop_assert_eq!(id.to_string().parse::<EventId>().unwrap(), id);
        let json = serde_json::to_string(&id).unwrap();
        prop_assert_eq!(serde_json::from_str::<EventId>(&json).unwrap(), id);
    }

    #[test]
    fn event_ids_in_their_documented_ranges_sort_the_same_as_text_and_as_values(
        a in (0u64..10_000_000_000, 0u32..1000, 0u32..1_000_000),
        b in (0u64..10_000_000_000, 0u32..1000, 0u32..1_000_000),
    ) {
        let (a, b) = (EventId::new(a.0, a.1, a.2), EventId::new(b.0, b.1, b.2));
        prop_assert_eq!(a.cmp(&b), a.to_string().cmp(&b.to_string()));
    }

    #[test]
    fn parsing_any_text_as_an_event_id_never_panics(s in any_id_like()) {
        if let Ok(id) = s.parse::<EventId>() {
            // Whatever parsed renders to an id that parses back to itself.
            prop_assert_eq!(id.to_string().parse::<EventId>().unwrap(), id);
        }
    }

    #[test]
    fn envelopes_round_trip_through_json(message in user_message(), event in reply_event()) {
        let text = serde_json::to_vec(&message).unwrap();
        prop_assert_eq!(serde_json::from_slice::<UserMessage>(&text).unwrap(), message);
        let text = serde_json::to_vec(&event).unwrap();
        prop_assert_eq!(serde_json::from_slice::<ReplyEvent>(&text).unwrap(), event);
    }

    #[test]
    fn reading_any_bytes_or_envelope_like_json_as_an_envelope_never_panics(
        bytes in proptest::collection::vec(any::<u8>(), 0..256),
        json in envelope_like_json(),
    ) {
        for input in [bytes.as_slice(), json.as_bytes()] {
            let _ = serde_json::from_slice::<UserMessage>(input);
            let _ = serde_json::from_slice::<ReplyEvent>(input);
            let _ = serde_json::from_slice::<ChannelDelivery>(input);
            let _ = serde_json::from_slice::<ErrorCode>(input);
        }
    }

    #[test]
    fn an_envelope_naming_a_session_that_is_no_id_is_refused(message in user_message(), bad in any_id_like()) {
        prop_assume!(!allowed(&bad, 64));
        let mut json = serde_json::to_value(&message).unwrap();
        json["session_id"] = bad.clone().into();
        prop_assert!(serde_json::from_value::<UserMessage>(json.clone()).is_err());
        json["session_id"] = message.session_id.as_str().into();
        json["message_id"] = bad.into();
        prop_assert!(serde_json::from_value::<UserMessage>(json).is_err());
    }

    #[test]
    fn a_session_reaches_every_subject_and_routing_key_as_exactly_one_token(
        session in session_id(),
        partitions in 1u32..=4096,
    ) {
        let (nats, amqp) = (Names::default(), AmqpNames::default());
        let partition = PartitionCount::new(partitions).unwrap().of(&session);
        prop_assert!(partition.get() < partitions);
        for subject in [nats.input_subject(partition, &session), nats.events_subject(&session)] {
            let tokens: Vec<&str> = subject.split('.').collect();
            prop_assert_eq!(*tokens.last().unwrap(), session.as_str());
            prop_assert!(tokens.iter().all(|t| !t.is_empty() && *t != "*" && *t != ">" && *t != "#"));
            prop_assert!(!subject.contains(char::is_whitespace));
        }
        prop_assert_eq!(nats.input_subject(partition, &session).split('.').count(), 4);
        prop_assert_eq!(nats.events_subject(&session).split('.').count(), 3);
        // On RabbitMQ the session id alone is the reply events' routing key, one word of a
        // topic exchange's key.
        prop_assert_eq!(amqp.events_exchange().split('.').count(), 2);
        prop_assert!(!session.as_str().contains(['.', '*', '#']));
    }

    #[test]
    fn error_codes_from_any_text_read_back_as_they_were(code in any::<String>()) {
        let parsed = ErrorCode::from(code.as_str());
        prop_assert_eq!(parsed.as_str(), code.as_str());
        let json = serde_json::to_string(&parsed).unwrap();
        prop_assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), parsed);
    }
}

#[test]
fn every_injection_attempt_is_refused_as_a_session_message_worker_id_and_bus_prefix() {
    let long = "a".repeat(129);
    let attempts = INJECTIONS.iter().copied().chain([long.as_str()]);
    for attempt in attempts {
        assert!(SessionId::parse(attempt).is_err(), "session id {attempt:?}");
        assert!(MessageId::parse(attempt).is_err(), "message id {attempt:?}");
        assert!(WorkerId::parse(attempt).is_err(), "worker id {attempt:?}");
        assert!(Names::new(attempt).is_err(), "NATS prefix {attempt:?}");
        assert!(AmqpNames::new(attempt).is_err(), "RabbitMQ prefix {attempt:?}");
    }
}

#[test]
fn an_over_long_id_is_refused_one_byte_past_its_limit() {
    assert!(SessionId::parse("a".repeat(64)).is_ok());
    assert!(SessionId::parse("a".repeat(65)).is_err());
    assert!(WorkerId::parse("w".repeat(128)).is_ok());
    assert!(WorkerId::parse("w".repeat(129)).is_err());
    assert_eq!(Partition::new(7).get(), 7);
}
