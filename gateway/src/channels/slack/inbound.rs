//! `POST /v1/channels/slack/events`: verify the signature, answer `url_verification`, and
//! enqueue `app_mention`s and direct messages (the outer `event_id` is the idempotency key, so
//! Slack's retries are never answered twice), answering 200 at once: the model is never waited
//! for. Messages from bots (this one included), edits and other subtypes get 200 and are ignored.
//! With streaming on, the gateway listens to the conversation's reply events before enqueueing,
//! and streams the reply into Slack as it is generated (`stream.rs`).

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use schemas::ChannelOrigin;
use serde::Deserialize;

use super::CHANNEL;
use super::stream::Streamer;
use crate::channels::{Rejection, session};
use crate::routes::MAX_TEXT_BYTES;
use crate::{AppState, error::ApiError, telemetry};

/// Slack's events are small; this leaves room for the longest text.
const MAX_BODY_BYTES: usize = 256 * 1024;

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Envelope {
    UrlVerification {
        challenge: String,
    },
    EventCallback {
        team_id: String,
        event_id: String,
        event: Box<Event>,
    },
    #[serde(other)]
    Other,
}

#[derive(Debug, Deserialize)]
struct Event {
    #[serde(rename = "type")]
    kind: String,
    subtype: Option<String>,
    bot_id: Option<String>,
    user: Option<String>,
    text: Option<String>,
    channel: Option<String>,
    channel_type: Option<String>,
    ts: Option<String>,
    thread_ts: Option<String>,
}

/// Where a Slack event's reply goes, and which conversation (session) it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    conversation: String,
    channel: String,
    thread_ts: Option<String>,
    user: String,
    text: String,
}

#[tracing::instrument(name = "slack_event", skip_all)]
pub(crate) async fn receive(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Some(slack) = &state.channels.config.slack else {
        return Err(ApiError::NotFound("Slack is not configured on this gateway".into()));
    };
    telemetry::channel_event_received(CHANNEL);
    let body = crate::body::read(body, MAX_BODY_BYTES, state.config.http.body_read_timeout)
        .await
        .map_err(|e| Rejection::from(e).refuse(CHANNEL))?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    super::verify::verify(&slack.signing_secret, &headers, &body, now).map_err(|r| r.refuse(CHANNEL))?;
    let envelope: Envelope = serde_json::from_slice(&body).map_err(|_| Rejection::InvalidJson.refuse(CHANNEL))?;
    let (team, event_id, event) = match envelope {
        Envelope::UrlVerification { challenge } => {
            return Ok(Json(serde_json::json!({"challenge": challenge})).into_response());
        }
        Envelope::EventCallback { team_id, event_id, event } => (team_id, event_id, event),
        Envelope::Other => return Ok(StatusCode::OK.into_response()),
    };
    let Some(target) = target(&team, *event) else {
        tracing::debug!(event = "slack_event_ignored", event_id, "not a message for the bot");
        return Ok(StatusCode::OK.into_response());
    };
    if target.text.trim().is_empty() || target.text.len() > MAX_TEXT_BYTES {
        return Ok(StatusCode::OK.into_response());
    }
    let retry = headers.get("x-slack-retry-num").and_then(|v| v.to_str().ok()).unwrap_or("0").to_owned();
    let record = session::open(&state, CHANNEL, &target.conversation, Some(target.user.clone())).await?;
    let origin = ChannelOrigin {
        channel: CHANNEL.into(),
        address: serde_json::json!({"channel": target.channel, "thread_ts": target.thread_ts}),
    };
    // Listen before enqueueing, so that no event of the reply can be missed.
    let events = match (&state.channels.slack, slack.stream) {
        (Some(_), true) => match state.bus.subscribe_events(&record.id).await {
            Ok(events) => Some(events),
            Err(e) => {
                tracing::warn!(event = "slack_stream_unavailable", error = %e, "not streaming this reply");
                None
            }
        },
        _ => None,
    };
    let address = origin.address.clone();
    let submitted = session::submit(&state, &record, &event_id, target.text, origin).await?;
    tracing::info!(event = "slack_event_accepted", event_id, retry, duplicate = submitted.duplicate);
    if let (Some(events), Some(api), false) = (events, &state.channels.slack, submitted.duplicate) {
        let streamer = Streamer::new(api.clone(), state.store.clone(), address, submitted.message_id);
        tokio::spawn(tracing::Instrument::in_current_span(streamer.run(events, state.closing.clone())));
    }
    Ok(StatusCode::OK.into_response())
}

/// The conversation and reply target of an event the bot answers; None for any other event.
/// A mention starts (or continues) a thread under the mentioning message; a direct message
/// belongs to the direct-message conversation (and its thread, if it was sent in one).
fn target(team: &str, event: Event) -> Option<Target> {
    if event.bot_id.is_some() || event.subtype.is_some() {
        return None;
    }
    let (user, channel, ts, text) = (event.user?, event.channel?, event.ts?, event.text?);
    match (event.kind.as_str(), event.channel_type.as_deref()) {
        ("app_mention", _) => {
            let thread = event.thread_ts.unwrap_or(ts);
            Some(Target {
                conversation: format!("{team}/{channel}/{thread}"),
                channel,
                thread_ts: Some(thread),
                user,
                text: without_mentions(&text),
            })
        }
        ("message", Some("im")) => {
            Some(Target { conversation: format!("{team}/{channel}"), channel, thread_ts: event.thread_ts, user, text })
        }
        _ => None,
    }
}

/// The text without user mentions (`<@U123>`): the bot's own name is no part of the question.
fn without_mentions(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("<@") {
        out.push_str(&rest[..start]);
        match rest[start..].find('>') {
            Some(end) => rest = &rest[start + end + 1..],
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(json: serde_json::Value) -> Event {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_mention_is_answered_in_its_thread_without_the_mention() {
        let e = event(
            serde_json::json!({"type": "app_mention", "user": "U1", "text": "<@UBOT> what is up?", "ts": "1.5", "channel": "C1"}),
        );

        let t = target("T1", e).unwrap();

        assert_eq!(t.conversation, "T1/C1/1.5");
        assert_eq!(t.thread_ts.as_deref(), Some("1.5"));
        assert_eq!(t.text, "what is up?");
    }

    #[test]
    fn a_mention_inside_a_thread_continues_that_thread() {
        let e = event(
            serde_json::json!({"type": "app_mention", "user": "U1", "text": "<@UBOT> more", "ts": "2.0", "thread_ts": "1.5", "channel": "C1"}),
        );

        assert_eq!(target("T1", e).unwrap().conversation, "T1/C1/1.5");
    }

    #[test]
    fn bots_edits_and_channel_messages_are_ignored_and_direct_messages_answered() {
        let bot = event(
            serde_json::json!({"type": "message", "channel_type": "im", "bot_id": "B1", "user": "UBOT", "text": "hi", "ts": "1", "channel": "D1"}),
        );
        let edit = event(
            serde_json::json!({"type": "message", "channel_type": "im", "subtype": "message_changed", "ts": "1", "channel": "D1"}),
        );
        let channel = event(
            serde_json::json!({"type": "message", "channel_type": "channel", "user": "U1", "text": "hi", "ts": "1", "channel": "C1"}),
        );
        let direct = event(
            serde_json::json!({"type": "message", "channel_type": "im", "user": "U1", "text": "hi", "ts": "1", "channel": "D1"}),
        );

        assert_eq!(target("T1", bot), None);
        assert_eq!(target("T1", edit), None);
        assert_eq!(target("T1", channel), None);
        let t = target("T1", direct).unwrap();
        assert_eq!((t.conversation.as_str(), t.thread_ts), ("T1/D1", None));
    }
}
