//! The Slack Web API as chatfleet calls it (`chat.postMessage`, `chat.update`, `chat.delete`,
//! with the bot token), paced for the whole gateway: a `429` (or `ratelimited`) holds every
//! later call until its `Retry-After` has passed, and `chat.update` calls (Tier 3, about 50 a
//! minute per workspace) are spread out to `updates_per_minute`, so that under load the updates
//! of streamed messages are coalesced rather than refused.

use std::sync::Mutex;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use serde_json::Value;
use tokio::time::Instant;

use super::SlackConfig;

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
    "message_not_found",
    "cant_update_message",
];

/// The wait after a `429` that names none.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);
/// The longest pause a `Retry-After` imposes on this gateway's calls.
const MAX_PAUSE: Duration = Duration::from_secs(300);

/// Why a Web API call did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CallError {
    /// `429` or `ratelimited`: every call of this gateway now waits until `retry_after` passed.
    RateLimited { retry_after: Duration },
    /// A network error, a timeout, a server error or a Slack error a retry may fix.
    Failed { reason: &'static str, retry_after: Option<Duration> },
    /// A Slack error no retry fixes (`channel_not_found`, `token_revoked`, ...).
    Refused { error: String },
}

/// A gateway's client of the Slack Web API.
pub(crate) struct WebApi {
    slack: SlackConfig,
    http: reqwest::Client,
    /// No call leaves before this instant (the latest `Retry-After`).
    paused_until: Mutex<Instant>,
    /// The earliest instant the next `chat.update` may leave.
    next_update: Mutex<Instant>,
}

impl WebApi {
    pub(crate) fn new(slack: SlackConfig, http: reqwest::Client) -> Self {
        let now = Instant::now();
        Self { slack, http, paused_until: Mutex::new(now), next_update: Mutex::new(now) }
    }

    pub(crate) fn config(&self) -> &SlackConfig {
        &self.slack
    }

    /// Reserves a `chat.update` slot for a message still growing, no earlier than `earliest`:
    /// the instant the caller may send it. Slots are `60 s / updates_per_minute` apart across
    /// the gateway, so under load each message is updated less often (with all the text that
    /// arrived meanwhile).
    pub(crate) fn reserve_update(&self, earliest: Instant) -> Instant {
        let mut next = self.next_update.lock().expect("the pace lock is never poisoned");
        let slot = earliest.max(*next).max(Instant::now());
        *next = slot + self.update_spacing();
        slot
    }

    /// Takes a `chat.update` slot now, for a message's final text: finals go ahead of the updates
    /// of messages still growing, which are pushed back instead (429s are still honoured).
    pub(crate) fn take_final_update(&self) {
        let mut next = self.next_update.lock().expect("the pace lock is never poisoned");
        *next = (*next).max(Instant::now()) + self.update_spacing();
    }

    fn update_spacing(&self) -> Duration {
        Duration::from_secs(60) / self.slack.updates_per_minute
    }

    /// Calls `method` with the JSON `args`; the answer of a successful call.
    pub(crate) async fn call(&self, method: &str, args: &Value) -> Result<Value, CallError> {
        let paused_until = *self.paused_until.lock().expect("the pause lock is never poisoned");
        tokio::time::sleep_until(paused_until).await;
        let url = self.slack.api_url.join(method).expect("a method name joins the API URL");
        let sent = self
            .http
            .post(url)
            .header(AUTHORIZATION, format!("Bearer {}", self.slack.bot_token.expose()))
            .header(CONTENT_TYPE, "application/json;charset=utf-8")
            .json(args)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(e) => {
                let reason = if e.is_timeout() { "timeout" } else { "network" };
                tracing::info!(event = "slack_call_failed", method, reason, error = %e.without_url());
                return Err(CallError::Failed { reason, retry_after: None });
            }
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        if status == StatusCode::TOO_MANY_REQUESTS {
            return Err(self.rate_limited(method, retry_after));
        }
        if !status.is_success() {
            let reason = if status.is_server_error() { "http_5xx" } else { "http_4xx" };
            return Err(CallError::Failed { reason, retry_after });
        }
        let answer: Value = response.json().await.unwrap_or_default();
        if answer["ok"] == true {
            return Ok(answer);
        }
        let error = answer["error"].as_str().unwrap_or("unknown").to_owned();
        tracing::warn!(event = "slack_api_error", method, error, "Slack refused a call");
        if error == "ratelimited" {
            Err(self.rate_limited(method, retry_after))
        } else if PERMANENT.contains(&error.as_str()) {
            Err(CallError::Refused { error })
        } else {
            Err(CallError::Failed { reason: "slack_error", retry_after })
        }
    }

    /// Holds every later call until `Retry-After` has passed.
    fn rate_limited(&self, method: &str, retry_after: Option<Duration>) -> CallError {
        let retry_after = retry_after.unwrap_or(DEFAULT_RETRY_AFTER).min(MAX_PAUSE);
        tracing::info!(event = "slack_rate_limited", method, retry_after = ?retry_after);
        let mut paused_until = self.paused_until.lock().expect("the pause lock is never poisoned");
        *paused_until = (*paused_until).max(Instant::now() + retry_after);
        CallError::RateLimited { retry_after }
    }
}
