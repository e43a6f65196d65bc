//! Replying in a Teams conversation through the Bot Framework Connector API: an access token
//! from the token endpoint (OAuth 2.0 client credentials: the App ID and its password, scope
//! `https://api.botframework.com/.default`), cached until five minutes before it expires; then
//! the reply, a `message` activity answering the user's (`replyToId`), `POST`ed to
//! `{serviceUrl}/v3/conversations/{conversation id}/activities/{activity id}`. A model error
//! becomes a short, polite message. A typing indicator is sent the same way as soon as a message
//! is taken (best effort: it is worthless once late, so it is not queued).
//!
//! The Connector's `429` (with `Retry-After`) and server errors are retried by the delivery
//! loop; a `401` drops the cached token and is retried with a new one; `400`, `403` (the bot is
//! no longer in the conversation) and `404` (no such conversation) end the attempts.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use schemas::{ChannelDelivery, ReplyEventKind};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use super::TeamsConfig;
use crate::channels::config::Secret;
use crate::channels::delivery::{Attempt, Deliver};

/// The scope of Connector API tokens.
const SCOPE: &str = "https://api.botframework.com/.default";
/// A token is renewed this long before it expires.
const RENEW_BEFORE: Duration = Duration::from_secs(5 * 60);
/// A character of a path segment that is sent as is; every other one is percent-encoded (Teams
/// conversation ids hold `:`, `@` and `;`).
const SEGMENT: &percent_encoding::AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

/// Posts activities to the Connector API with the bot's access token.
pub(crate) struct Deliverer {
    teams: TeamsConfig,
    http: reqwest::Client,
    /// The cached access token; held while a new one is fetched, so that one fetch serves all.
    token: Mutex<Option<AccessToken>>,
}

struct AccessToken {
    value: Secret,
    renew_at: Instant,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: Secret,
    expires_in: u64,
}

impl Deliverer {
    pub(crate) fn new(teams: TeamsConfig, http: reqwest::Client) -> Self {
        Self { teams, http, token: Mutex::new(None) }
    }

    /// The access token: the cached one while it is fresh, otherwise a new one. The error is
    /// the failed attempt.
    async fn token(&self) -> Result<Secret, Attempt> {
        let mut cached = self.token.lock().await;
        if let Some(token) = cached.as_ref().filter(|t| Instant::now() < t.renew_at) {
            return Ok(token.value.clone());
        }
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.teams.app_id.as_str()),
            ("client_secret", self.teams.app_password.expose()),
            ("scope", SCOPE),
        ];
        let failed = |reason: &'static str, retry_after| Attempt::Failed { reason, retry_after };
        let body = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(form).finish();
        let request =
            self.http.post(self.teams.token_url.clone()).header(CONTENT_TYPE, "application/x-www-form-urlencoded");
        let response = request.body(body).send().await.map_err(|e| {
            let reason = if e.is_timeout() { "timeout" } else { "network" };
            tracing::warn!(event = "teams_token_failed", error = %e.without_url(), "cannot reach the token endpoint");
            failed(reason, None)
        })?;
        let status = response.status();
        if !status.is_success() {
            // The body may say why (a wrong password: `invalid_client`); it never holds a secret.
            let detail: Value = response.json().await.unwrap_or_default();
            tracing::warn!(event = "teams_token_refused", status = status.as_u16(), error = %detail["error"], "the token endpoint refused the bot's credentials");
            return Err(failed("token_refused", None));
        }
        let token: TokenResponse = response.json().await.map_err(|e| {
            tracing::warn!(event = "teams_token_unreadable", error = %e.without_url());
            failed("token_refused", None)
        })?;
        let lifetime = Duration::from_secs(token.expires_in);
        let renew_in = lifetime.checked_sub(RENEW_BEFORE).unwrap_or(lifetime / 2);
        tracing::info!(event = "teams_token_fetched", expires_in = token.expires_in);
        *cached = Some(AccessToken { value: token.access_token.clone(), renew_at: Instant::now() + renew_in });
        Ok(token.access_token)
    }

    /// Sends a typing indicator into the conversation of an accepted message (best effort).
    pub(crate) async fn typing(&self, address: &Value) {
        let Some(url) = activities_url(address, None) else { return };
        let activity = json!({
            "type": "typing",
            "from": address["bot"],
            "recipient": address["user"],
            "conversation": address["conversation"],
        });
        let attempt = self.post(url, &activity).await;
        if attempt != Attempt::Delivered {
            tracing::info!(event = "teams_typing_failed", ?attempt, "the typing indicator was not sent");
        }
    }

    async fn post(&self, url: reqwest::Url, activity: &Value) -> Attempt {
        let token = match self.token().await {
            Ok(token) => token,
            Err(failed) => return failed,
        };
        let sent =
            self.http.post(url).header(AUTHORIZATION, format!("Bearer {}", token.expose())).json(activity).send().await;
        let response = match sent {
            Ok(response) => response,
            Err(e) => {
                let reason = if e.is_timeout() { "timeout" } else { "network" };
                tracing::info!(event = "teams_post_failed", reason, error = %e.without_url());
                return Attempt::Failed { reason, retry_after: None };
            }
        };
        let status = response.status();
        if status.is_success() {
            return Attempt::Delivered;
        }
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        tracing::info!(event = "teams_post_refused", status = status.as_u16(), "the Connector API refused an activity");
        match status {
            StatusCode::TOO_MANY_REQUESTS => Attempt::Failed { reason: "http_429", retry_after },
            StatusCode::UNAUTHORIZED => {
                // The token was revoked or has expired early: the next attempt takes a new one.
                *self.token.lock().await = None;
                Attempt::Failed { reason: "http_4xx", retry_after }
            }
            StatusCode::BAD_REQUEST | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND | StatusCode::GONE => Attempt::Gone,
            s if s.is_server_error() => Attempt::Failed { reason: "http_5xx", retry_after },
            _ => Attempt::Failed { reason: "http_4xx", retry_after },
        }
    }
}

/// `{serviceUrl}/v3/conversations/{conversation id}/activities`, and `/{activity id}` when
/// replying to one; None if the address lacks them.
pub(crate) fn activities_url(address: &Value, reply_to: Option<&str>) -> Option<reqwest::Url> {
    let service_url = address["service_url"].as_str()?;
    let conversation = address["conversation"]["id"].as_str()?;
    let mut url = format!(
        "{}/v3/conversations/{}/activities",
        service_url.trim_end_matches('/'),
        utf8_percent_encode(conversation, SEGMENT)
    );
    if let Some(id) = reply_to {
        url = format!("{url}/{}", utf8_percent_encode(id, SEGMENT));
    }
    reqwest::Url::parse(&url).ok()
}

/// The reply activity of a delivery and where it goes; None for an event that is not an outcome.
pub(crate) fn reply(delivery: &ChannelDelivery) -> Option<(reqwest::Url, Value)> {
    let address = &delivery.origin.address;
    let text = match &delivery.event.kind {
        ReplyEventKind::Done { text, .. } => text.clone(),
        ReplyEventKind::Error { .. } => {
            "Sorry, I could not answer that just now. Please try again in a moment.".to_owned()
        }
        _ => return None,
    };
    let activity_id = address["activity_id"].as_str()?;
    let url = activities_url(address, Some(activity_id))?;
    let activity = json!({
        "type": "message",
        "from": address["bot"],
        "recipient": address["user"],
        "conversation": address["conversation"],
        "replyToId": activity_id,
        "textFormat": "markdown",
        "text": text,
    });
    Some((url, activity))
}

#[async_trait]
impl Deliver for Deliverer {
    async fn deliver(&self, delivery: &ChannelDelivery) -> Attempt {
        let Some((url, activity)) = reply(delivery) else {
            return Attempt::Failed { reason: "not_an_outcome", retry_after: None };
        };
        self.post(url, &activity).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_teams_conversation_id_is_one_encoded_path_segment() {
        let address = json!({
            "service_url": "https://smba.trafficmanager.net/amer/",
            "conversation": {"id": "19:abc@thread.tacv2;messageid=1700000000000"},
        });

        let url = activities_url(&address, Some("1700000000001")).unwrap();

        assert_eq!(
            url.as_str(),
            "https://smba.trafficmanager.net/amer/v3/conversations/19%3Aabc%40thread.tacv2%3Bmessageid%3D1700000000000/activities/1700000000001"
        );
        assert_eq!(activities_url(&json!({"service_url": "https://x.example/"}), None), None);
    }
}
