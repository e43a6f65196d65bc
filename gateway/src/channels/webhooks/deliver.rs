//! Delivering a reply to an integration's URL: `POST` of `message.reply` (or `message.error`)
//! JSON, signed like inbound requests, `webhook-id` = the reply id on every attempt.

use async_trait::async_trait;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};
use schemas::{ChannelDelivery, ReplyEventKind};

use super::WebhookConfig;
use crate::channels::delivery::{Attempt, Deliver};

/// Delivers the replies of one integration.
pub(crate) struct Deliverer {
    hook: WebhookConfig,
    http: reqwest::Client,
}

impl Deliverer {
    pub(crate) fn new(hook: WebhookConfig, http: reqwest::Client) -> Self {
        Self { hook, http }
    }
}

/// The JSON body of a delivery; None for an event that is not an outcome.
pub(crate) fn body(delivery: &ChannelDelivery) -> Option<serde_json::Value> {
    let conversation_id = delivery.origin.address.get("conversation_id").cloned().unwrap_or_default();
    let (message_id, reply_id) = (&delivery.event.message_id, delivery.key());
    match &delivery.event.kind {
        ReplyEventKind::Done { text, finish_reason, .. } => Some(serde_json::json!({
            "type": "message.reply",
            "conversation_id": conversation_id,
            "message_id": message_id,
            "reply_id": reply_id,
            "text": text,
            "finish_reason": finish_reason,
        })),
        ReplyEventKind::Error { code, message } => Some(serde_json::json!({
            "type": "message.error",
            "conversation_id": conversation_id,
            "message_id": message_id,
            "reply_id": reply_id,
            "code": code,
            "message": message,
        })),
        _ => None,
    }
}

#[async_trait]
impl Deliver for Deliverer {
    async fn deliver(&self, delivery: &ChannelDelivery) -> Attempt {
        let Some(body) = body(delivery) else {
            // Workers hand over terminal events only; anything else cannot be delivered.
            return Attempt::Failed { reason: "not_an_outcome", retry_after: None };
        };
        let payload = serde_json::to_vec(&body).expect("JSON values serialize");
        let id = delivery.key();
        let timestamp = time::OffsetDateTime::now_utc().unix_timestamp();
        let signature = self.hook.key.sign(&id, timestamp, &payload);
        let sent = self
            .http
            .post(self.hook.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(payload)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(e) => {
                let reason = if e.is_timeout() { "timeout" } else { "network" };
                tracing::info!(event = "webhook_delivery_failed", reason, error = %e.without_url());
                return Attempt::Failed { reason, retry_after: None };
            }
        };
        let status = response.status();
        if status.is_success() {
            return Attempt::Delivered;
        }
        if status == StatusCode::GONE {
            return Attempt::Gone;
        }
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(std::time::Duration::from_secs);
        let reason = match status.as_u16() {
            429 => "http_429",
            500..=599 => "http_5xx",
            _ => "http_4xx",
        };
        tracing::info!(event = "webhook_delivery_failed", reason, status = status.as_u16());
        Attempt::Failed { reason, retry_after }
    }
}
