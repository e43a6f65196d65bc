//! The gateway's parsers against hostile input, as property-based tests (proptest): session
//! tokens, bearer credentials, `Last-Event-ID` cursors, the Server-Sent Events encoding of reply
//! events (read back by a real SSE client parser), and the channels' signatures (Standard
//! Webhooks, Slack v0). Each parser round-trips what it issues and never panics on what a client
//! may send. The HTTP-level fuzzer is `tests/hostile_http.rs`.

use std::convert::Infallible;

use axum::http::{HeaderMap, HeaderValue};
use axum::response::IntoResponse;
use axum::response::sse::Sse;
use base64::Engine;
use futures::StreamExt;
use hmac::{Hmac, Mac};
use proptest::prelude::*;
use schemas::{ErrorCode, EventId, MessageId, ReplyEvent, ReplyEventKind, ReplyId, SessionId};
use sha2::Sha256;

use crate::auth::{self, TokenKey};
use crate::channels::Rejection;
use crate::channels::config::Secret;
use crate::channels::webhooks::verify::SigningKey;

fn session_id() -> impl Strategy<Value = SessionId> {
    "[A-Za-z0-9_-]{1,64}".prop_map(|s| SessionId::parse(s).unwrap())
}

fn reply_event() -> impl Strategy<Value = ReplyEvent> {
    let text =
        prop_oneof![any::<String>(), "[a-z \\r\\n:]{0,40}", Just("data: forged\n\nevent: done\nid: 9".to_owned())];
    let kind = prop_oneof![
        (any::<u32>(), text.clone()).prop_map(|(index, text)| ReplyEventKind::Delta { index, text }),
        text.clone().prop_map(|reason| ReplyEventKind::Reset { reason }),
        text.clone().prop_map(|text| ReplyEventKind::Done {
            reply_id: ReplyId::parse("r_m").unwrap(),
            text,
            finish_reason: schemas::FinishReason::Stop,
            usage: None,
        }),
        ("[a-z_]{1,20}", text)
            .prop_map(|(code, message)| ReplyEventKind::Error { code: ErrorCode::from(code), message }),
    ];
    (any::<(u64, u32, u32)>(), session_id(), "[A-Za-z0-9_-]{1,64}", kind).prop_map(
        |((t, a, q), session, message, kind)| ReplyEvent {
            v: schemas::ENVELOPE_VERSION,
            event_id: EventId::new(t, a, q),
            session_id: session,
            message_id: MessageId::parse(message).unwrap(),
            kind,
        },
    )
}

/// Header values as a client may send them: any bytes a header can carry.
fn header_value() -> impl Strategy<Value = HeaderValue> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..80),
        "\\PC{0,80}".prop_map(String::into_bytes),
        "v1\\.[A-Za-z0-9_.-]{0,60}".prop_map(String::into_bytes),
    ]
    .prop_filter_map("not a header value", |bytes| HeaderValue::from_bytes(&bytes).ok())
}

/// A body to verify signatures over.
const EMPTY_OBJECT: &[u8] = b"{}";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// The bytes the gateway sends for `event` on a reply stream, read back by `eventsource-stream`,
/// the SSE parser the project's clients use.
fn encode_and_read_back(event: &ReplyEvent) -> Vec<eventsource_stream::Event> {
    runtime().block_on(async {
        let stream = futures::stream::iter([Ok::<_, Infallible>(crate::sse::to_sse(event))]);
        let body = Sse::new(stream).into_response().into_body();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        use eventsource_stream::Eventsource;
        futures::stream::iter([Ok::<_, Infallible>(bytes)]).eventsource().map(Result::unwrap).collect().await
    })
}

fn slack_signature(secret: &str, timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("v0:{timestamp}:").as_bytes());
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    format!("v0={}", digest.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn a_session_token_verifies_as_its_own_session_and_no_other(
        key in proptest::collection::vec(any::<u8>(), 1..64),
        session in session_id(),
        other in session_id(),
    ) {
        let key = TokenKey::new(key);
        let token = key.issue(&session);
        prop_assert_eq!(key.verify(&token), Some(session.clone()));
        let authorized = auth::authorize_session(&key, Some(token), other.as_str());
        if other == session {
            prop_assert!(authorized.is_ok());
        } else {
            prop_assert!(matches!(authorized, Err(crate::ApiError::Forbidden)));
        }
    }

    #[test]
    fn a_session_token_with_any_one_character_changed_verifies_as_nothing(
        session in session_id(),
        position in any::<proptest::sample::Index>(),
        replacement in proptest::char::any(),
    ) {
        let key = TokenKey::new(b"the deployment's key".to_vec());
        let token = key.issue(&session);
        let at = position.index(token.chars().count());
        let original = token.chars().nth(at).unwrap();
        prop_assume!(replacement != original);
        let forged: String = token.chars().enumerate().map(|(i, c)| if i == at { replacement } else { c }).collect();
        prop_assert_eq!(key.verify(&forged), None);
    }

    #[test]
    fn verifying_any_text_as_a_session_token_never_panics_nor_accepts_it(
        text in prop_oneof![any::<String>(), "v1\\.[A-Za-z0-9_.-]{0,100}"],
    ) {
        let key = TokenKey::new(b"the deployment's key".to_vec());
        prop_assert_eq!(key.verify(&text), None);
    }

    #[test]
    fn any_authorization_header_or_access_token_is_read_without_panicking(
        value in header_value(),
        query in proptest::option::of(any::<String>()),
    ) {
        let mut headers = HeaderMap::new();
        headers.insert(axum::http::header::AUTHORIZATION, value);
        if let Some(token) = auth::bearer(&headers, query.as_deref()) {
            prop_assert!(!token.is_empty());
        }
        let key = TokenKey::new(b"k".to_vec());
        prop_assert!(auth::authorize_session(&key, auth::bearer(&headers, query.as_deref()), "s_1").is_err());
    }

    #[test]
    fn a_last_event_id_is_an_event_id_or_refused_and_never_a_panic(value in header_value(), query in any::<String>()) {
        let mut headers = HeaderMap::new();
        headers.insert("last-event-id", value.clone());
        let from_header = crate::routes::resume::cursor(&headers, None);
        let expected = value.to_str().ok().map(str::trim).filter(|v| !v.is_empty()).map(str::parse::<EventId>);
        match (from_header, expected) {
            (Ok(None), None) => {}
            (Ok(Some(cursor)), Some(Ok(id))) => prop_assert_eq!(cursor, id),
            (Err(e), Some(Err(_)) | None) => prop_assert!(matches!(e, crate::ApiError::Invalid(_))),
            (got, want) => prop_assert!(false, "{:?} read as {:?}, expected {:?}", value, got, want),
        }
        let _ = crate::routes::resume::cursor(&HeaderMap::new(), Some(&query));
    }

    #[test]
    fn a_cursor_the_gateway_sent_is_read_back_as_the_same_event_id(id in any::<(u64, u32, u32)>()) {
        let id = EventId::new(id.0, id.1, id.2);
        let mut headers = HeaderMap::new();
        headers.insert("last-event-id", id.to_string().parse().unwrap());
        prop_assert_eq!(crate::routes::resume::cursor(&headers, None).unwrap(), Some(id));
        prop_assert_eq!(crate::routes::resume::cursor(&HeaderMap::new(), Some(&id.to_string())).unwrap(), Some(id));
    }

    #[test]
    fn every_reply_event_is_one_sse_event_that_a_client_reads_back_whole(event in reply_event()) {
        let read = encode_and_read_back(&event);

        prop_assert_eq!(read.len(), 1, "{:?}", read);
        prop_assert_eq!(&read[0].event, event.kind.name());
        prop_assert_eq!(&read[0].id, &event.event_id.to_string());
        prop_assert_eq!(read[0].id.parse::<EventId>().unwrap(), event.event_id);
        let data: serde_json::Value = serde_json::from_str(&read[0].data).unwrap();
        prop_assert_eq!(data, event.client_payload());
    }

    #[test]
    fn a_standard_webhooks_signature_verifies_for_its_message_only(
        id in "[A-Za-z0-9_-]{1,40}",
        at in -10_000_000_000i64..10_000_000_000,
        body in proptest::collection::vec(any::<u8>(), 0..200),
        flip in any::<proptest::sample::Index>(),
    ) {
        let key = SigningKey::from_secret(&Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("webhook-id", id.parse().unwrap());
        headers.insert("webhook-timestamp", at.to_string().parse().unwrap());
        headers.insert("webhook-signature", key.sign(&id, at, &body).parse().unwrap());

        prop_assert_eq!(key.verify(&headers, &body, at + 10).unwrap(), id.as_str());
        let mut tampered = body.clone();
        if tampered.is_empty() { tampered.push(b'x') } else { let i = flip.index(tampered.len()); tampered[i] ^= 1; }
        prop_assert_eq!(key.verify(&headers, &tampered, at), Err(Rejection::BadSignature));
    }

    #[test]
    fn any_webhook_headers_are_refused_without_panicking(
        id in header_value(),
        timestamp in prop_oneof![header_value(), any::<i64>().prop_map(|t| HeaderValue::from_str(&t.to_string()).unwrap())],
        signature in prop_oneof![header_value(), "(v1,[A-Za-z0-9+/=]{0,50} ?){0,4}".prop_map(|s| HeaderValue::from_str(&s).unwrap())],
        now in any::<i64>(),
    ) {
        let key = SigningKey::from_secret(&Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("webhook-id", id);
        headers.insert("webhook-timestamp", timestamp);
        headers.insert("webhook-signature", signature);
        let refused = key.verify(&headers, EMPTY_OBJECT, now).is_err();
        prop_assert!(refused);
    }

    #[test]
    fn a_slack_v0_signature_verifies_for_its_request_only(
        at in 0i64..10_000_000_000,
        body in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let secret = "8f742231b10e8888abcd99yyyzzz85a5";
        let mut headers = HeaderMap::new();
        headers.insert("x-slack-request-timestamp", at.to_string().parse().unwrap());
        headers.insert("x-slack-signature", slack_signature(secret, &at.to_string(), &body).parse().unwrap());

        prop_assert_eq!(crate::channels::slack::verify::verify(&Secret::new(secret), &headers, &body, at - 20), Ok(()));
        let mut tampered = body.clone();
        tampered.push(b' ');
        prop_assert_eq!(
            crate::channels::slack::verify::verify(&Secret::new(secret), &headers, &tampered, at),
            Err(Rejection::BadSignature)
        );
    }

    #[test]
    fn any_slack_headers_are_refused_without_panicking(
        timestamp in prop_oneof![header_value(), any::<i64>().prop_map(|t| HeaderValue::from_str(&t.to_string()).unwrap())],
        signature in prop_oneof![header_value(), "v0=[0-9a-fé]{0,70}".prop_map(|s| HeaderValue::from_bytes(s.as_bytes()).unwrap())],
        now in any::<i64>(),
    ) {
        let mut headers = HeaderMap::new();
        headers.insert("x-slack-request-timestamp", timestamp);
        headers.insert("x-slack-signature", signature);
        let refused = crate::channels::slack::verify::verify(&Secret::new("secret"), &headers, EMPTY_OBJECT, now).is_err();
        prop_assert!(refused);
    }

    #[test]
    fn a_standard_webhooks_secret_of_any_text_is_read_or_refused_without_panicking(secret in any::<String>()) {
        let encoded = format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(secret.as_bytes()));
        prop_assert_eq!(SigningKey::from_secret(&Secret::new(encoded)).is_ok(), secret.len() >= 16);
        let _ = SigningKey::from_secret(&Secret::new(secret));
    }
}
