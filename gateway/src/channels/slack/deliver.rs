//! Posting a reply into its Slack conversation: `chat.postMessage` with the bot token, in the
//! thread the conversation lives in; the text is the complete reply. A model error becomes a
//! short, polite message. Slack's rate limits (`429` with `Retry-After`, or `ratelimited`) and
//! server errors are retried by the delivery loop; errors that no retry can fix (the bot was
//! removed from the channel, the token was revoked) end the attempts.

use async_trait::async_trait;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use schemas::{ChannelDelivery, ReplyEventKind};

use super::SlackConfig;
use crate::channels::delivery::{Attempt, Deliver};

/// Slack errors that no retry can fix.
const PERMANENT: &[&str] = &[
    "channel_not_found",
    "not_in_channel",
    "is_archived",
    "invalid_auth",
    "account_inactive",
    "token_revoked",
    "not_authed",
    "missing_scope",
];

/// Posts replies with the bot token.
pub(crate) struct Deliverer {
    slack: SlackConfig,
    http: reqwest::Client,
}

impl Deliverer {
    pub(crate) fn new(slack: SlackConfig, http: reqwest::Client) -> Self {
        Self { slack, http }
    }
}

/// The `chat.postMessage` arguments of a delivery; None for an event that is not an outcome.
pub(crate) fn message(delivery: &ChannelDelivery) -> Option<serde_json::Value> {
    let address = &delivery.origin.address;
    let text = match &delivery.event.kind {
        ReplyEventKind::Done { text, .. } => text.clone(),
        ReplyEventKind::Error { .. } => {
            "Sorry, I could not answer that just now. Please try again in a moment.".to_owned()
        }
        _ => return None,
    };
    let mut message = serde_json::json!({"channel": address.get("channel")?, "text": text});
    if let Some(thread) = address.get("thread_ts").filter(|t| !t.is_null()) {
        message["thread_ts"] = thread.clone();
    }
    Some(message)
}

#[async_trait]
impl Deliver for Deliverer {
    async fn deliver(&self, delivery: &ChannelDelivery) -> Attempt {
        let Some(message) = message(delivery) else {
            return Attempt::Failed { reason: "not_an_outcome", retry_after: None };
        };
        let url = self.slack.api_url.join("chat.postMessage").expect("a method name joins the API URL");
        let sent = self
            .http
            .post(url)
            .header(AUTHORIZATION, format!("Bearer {}", self.slack.bot_token.expose()))
            .header(CONTENT_TYPE, "application/json;charset=utf-8")
            .json(&message)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(e) => {
                let reason = if e.is_timeout() { "timeout" } else { "network" };
                tracing::info!(event = "slack_post_failed", reason, error = %e.without_url());
                return Attempt::Failed { reason, retry_after: None };
            }
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(std::time::Duration::from_secs);
        if status == StatusCode::TOO_MANY_REQUESTS {
            tracing::info!(event = "slack_rate_limited", retry_after = ?retry_after);
            return Attempt::Failed { reason: "http_429", retry_after };
        }
        if !status.is_success() {
            let reason = if status.is_server_error() { "http_5xx" } else { "http_4xx" };
            return Attempt::Failed { reason, retry_after };
        }
        let answer: serde_json::Value = response.json().await.unwrap_or_default();
        if answer["ok"] == true {
            return Attempt::Delivered;
        }
        let error = answer["error"].as_str().unwrap_or("unknown").to_owned();
        tracing::warn!(event = "slack_api_error", error, "Slack refused chat.postMessage");
        if error == "ratelimited" {
            Attempt::Failed { reason: "http_429", retry_after }
        } else if PERMANENT.contains(&error.as_str()) {
            Attempt::Gone
        } else {
            Attempt::Failed { reason: "slack_error", retry_after }
        }
    }
}
