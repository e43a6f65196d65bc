//! `POST /v1/channels/teams/messages`: verify the Bot Framework's token, check the activity
//! against it, map the conversation to its session and enqueue `message` activities (the
//! activity `id` is the idempotency key, so a redelivered activity is never answered twice),
//! answering 200 at once: the model is never waited for. A typing indicator follows. Other
//! activity types, the bot's own messages and messages without text get 200 and are ignored.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use schemas::ChannelOrigin;
use serde::Deserialize;
use serde_json::json;

use super::CHANNEL;
use super::verify::Checked;
use crate::channels::config::checked_url;
use crate::channels::{Rejection, session};
use crate::routes::MAX_TEXT_BYTES;
use crate::{AppState, error::ApiError, telemetry};

/// Activities are small; this leaves room for the longest text and Teams' channel data.
const MAX_BODY_BYTES: usize = 256 * 1024;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Activity {
    #[serde(rename = "type")]
    kind: String,
    id: Option<String>,
    channel_id: String,
    service_url: String,
    conversation: Option<Conversation>,
    from: Option<Account>,
    recipient: Option<Account>,
    text: Option<String>,
    channel_data: Option<ChannelData>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Conversation {
    id: String,
    tenant_id: Option<String>,
    conversation_type: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Account {
    id: String,
    name: Option<String>,
    role: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChannelData {
    tenant: Option<Tenant>,
}

#[derive(Debug, Deserialize)]
struct Tenant {
    id: String,
}

/// A message the bot answers: its conversation (session), idempotency key, text, and where
/// the reply goes.
#[derive(Debug, Clone, PartialEq)]
struct Target {
    conversation: String,
    activity_id: String,
    user: String,
    text: String,
    address: serde_json::Value,
}

#[tracing::instrument(name = "teams_activity", skip_all)]
pub(crate) async fn receive(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Some(teams) = state.channels.teams.clone() else {
        return Err(ApiError::NotFound("Microsoft Teams is not configured on this gateway".into()));
    };
    telemetry::channel_event_received(CHANNEL);
    let body = axum::body::to_bytes(body, MAX_BODY_BYTES).await.map_err(|_| Rejection::TooLarge.refuse(CHANNEL))?;
    let verified = match teams.keys.check(&headers, &teams.config.app_id).await {
        Checked::Valid(verified) => verified,
        Checked::Refused(rejection) => return Err(rejection.refuse(CHANNEL)),
        Checked::KeysUnavailable(e) => {
            tracing::error!(event = "teams_keys_unavailable", error = %e, "cannot check a Teams request");
            return Err(ApiError::Internal(e.to_string()));
        }
    };
    let activity = parse(&body).map_err(|r| r.refuse(CHANNEL))?;
    verified.admits(&activity.service_url, &activity.channel_id).map_err(|r| r.refuse(CHANNEL))?;
    checked_url("serviceUrl", &activity.service_url, false).map_err(|e| Rejection::Invalid(e).refuse(CHANNEL))?;
    let Some(target) = target(activity).map_err(|r| r.refuse(CHANNEL))? else {
        tracing::debug!(event = "teams_activity_ignored", "not a message for the bot");
        return Ok(StatusCode::OK.into_response());
    };
    let record = session::open(&state, CHANNEL, &target.conversation, Some(target.user.clone())).await?;
    let origin = ChannelOrigin { channel: CHANNEL.into(), address: target.address.clone() };
    let submitted = session::submit(&state, &record, &target.activity_id, target.text, origin).await?;
    tracing::info!(
        event = "teams_activity_accepted",
        activity_id = target.activity_id,
        duplicate = submitted.duplicate
    );
    if !submitted.duplicate {
        let deliverer = teams.deliverer.clone();
        tokio::spawn(async move { deliverer.typing(&target.address).await });
    }
    Ok(StatusCode::OK.into_response())
}

fn parse(body: &[u8]) -> Result<Activity, Rejection> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|_| Rejection::InvalidJson)?;
    serde_json::from_value(value).map_err(|e| Rejection::Invalid(format!("invalid activity: {e}")))
}

/// The message of an activity the bot answers; None for any other activity.
fn target(activity: Activity) -> Result<Option<Target>, Rejection> {
    if activity.kind != "message" {
        return Ok(None);
    }
    let (Some(from), Some(bot), Some(conversation)) = (activity.from, activity.recipient, activity.conversation) else {
        return Err(Rejection::Invalid("a message activity needs from, recipient and conversation".into()));
    };
    if from.id == bot.id || from.role.as_deref() == Some("bot") {
        return Ok(None);
    }
    let Some(activity_id) = activity.id.filter(|id| !id.is_empty()) else {
        return Err(Rejection::Invalid("a message activity needs an id".into()));
    };
    let text = without_mentions(activity.text.as_deref().unwrap_or_default());
    if text.is_empty() || text.len() > MAX_TEXT_BYTES {
        return Ok(None);
    }
    let tenant = conversation
        .tenant_id
        .clone()
        .or_else(|| activity.channel_data.and_then(|d| d.tenant).map(|t| t.id))
        .unwrap_or_default();
    let address = json!({
        "service_url": activity.service_url,
        "activity_id": activity_id,
        "conversation": {
            "id": conversation.id,
            "tenantId": tenant,
            "conversationType": conversation.conversation_type,
        },
        "bot": {"id": bot.id, "name": bot.name},
        "user": {"id": from.id, "name": from.name},
    });
    Ok(Some(Target {
        conversation: format!("{tenant}/{}", conversation.id),
        activity_id,
        user: from.id,
        text,
        address,
    }))
}

/// The text without `<at>...</at>` mentions: in a channel, Teams writes the bot's name into the
/// message that mentions it, and it is no part of the question.
fn without_mentions(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("<at>") {
        out.push_str(&rest[..start]);
        match rest[start..].find("</at>") {
            Some(end) => rest = &rest[start + end + "</at>".len()..],
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

    fn activity(extra: serde_json::Value) -> Activity {
        let mut value = json!({
            "type": "message",
            "id": "1700000000001",
            "channelId": "msteams",
            "serviceUrl": "https://smba.trafficmanager.net/amer/",
            "from": {"id": "29:user", "name": "Ada"},
            "recipient": {"id": "28:bot", "name": "chatfleet"},
            "conversation": {"id": "a:1conv", "tenantId": "tenant-1", "conversationType": "personal"},
            "text": "hello",
        });
        value.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn a_message_maps_to_its_tenants_conversation_without_the_bots_mention() {
        let t = target(activity(json!({"text": "<at>chatfleet</at> what is up?"}))).unwrap().unwrap();

        assert_eq!(t.conversation, "tenant-1/a:1conv");
        assert_eq!(t.activity_id, "1700000000001");
        assert_eq!(t.text, "what is up?");
        assert_eq!(t.address["bot"]["id"], "28:bot");
        assert_eq!(t.address["user"]["id"], "29:user");
    }

    #[test]
    fn the_tenant_may_come_from_channel_data() {
        let a = activity(json!({
            "conversation": {"id": "19:c@thread.tacv2;messageid=1"},
            "channelData": {"tenant": {"id": "tenant-2"}},
        }));

        assert_eq!(target(a).unwrap().unwrap().conversation, "tenant-2/19:c@thread.tacv2;messageid=1");
    }

    #[test]
    fn other_activities_the_bots_own_and_empty_messages_are_ignored() {
        assert_eq!(target(activity(json!({"type": "conversationUpdate"}))).unwrap(), None);
        assert_eq!(target(activity(json!({"from": {"id": "28:bot"}}))).unwrap(), None);
        assert_eq!(target(activity(json!({"text": "<at>chatfleet</at>"}))).unwrap(), None);
        assert!(target(activity(json!({"id": null}))).is_err());
    }
}
