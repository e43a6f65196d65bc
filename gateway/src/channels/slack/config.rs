//! `[slack]`: the Slack app's signing secret and bot token, the Web API's URL, and how replies
//! are streamed.

use std::time::Duration;

use serde::Deserialize;

use crate::channels::config::{Secret, checked_url, parse_duration, section};

/// The Web API's URL unless the file names another.
const DEFAULT_API_URL: &str = "https://slack.com/api/";
/// One update of a streamed message a second at most...
const DEFAULT_STREAM_INTERVAL: Duration = Duration::from_secs(1);
/// ...and 40 `chat.update` calls a minute per gateway, under Slack's Tier 3 (about 50 a minute
/// per workspace) with room for a second gateway's final updates.
const DEFAULT_UPDATES_PER_MINUTE: u32 = 40;

/// The Slack app.
#[derive(Debug, Clone)]
pub struct SlackConfig {
    /// Verifies inbound requests (v0 signatures).
    pub signing_secret: Secret,
    /// `xoxb-...`: authorizes Web API calls.
    pub bot_token: Secret,
    /// The Web API's base URL, ending in `/`; `https://`, or `http://` on a loopback host.
    pub api_url: reqwest::Url,
    /// Whether replies are streamed into Slack while they are generated (a message posted at
    /// the first tokens, then updated); otherwise the complete reply is posted once finished.
    pub stream: bool,
    /// The shortest time between two updates of one streamed message.
    pub stream_interval: Duration,
    /// `chat.update` calls this gateway makes per minute at most, all messages together (Slack
    /// allows about 50 per minute per workspace).
    pub updates_per_minute: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Section {
    signing_secret: Secret,
    bot_token: Secret,
    api_url: Option<String>,
    stream: Option<bool>,
    stream_interval: Option<String>,
    updates_per_minute: Option<u32>,
}

impl SlackConfig {
    pub(crate) fn from_section(value: toml::Value) -> Result<Self, String> {
        let Section { signing_secret, bot_token, api_url, stream, stream_interval, updates_per_minute } =
            section("slack", value)?;
        if signing_secret.expose().is_empty() || bot_token.expose().is_empty() {
            return Err("[slack]: signing_secret and bot_token must not be empty".into());
        }
        let mut api_url = api_url.unwrap_or_else(|| DEFAULT_API_URL.to_owned());
        if !api_url.ends_with('/') {
            api_url.push('/');
        }
        let api_url = checked_url("[slack] api_url", &api_url, false)?;
        let stream_interval = match stream_interval {
            Some(text) => parse_duration(&text).map_err(|e| format!("[slack] stream_interval: {e}"))?,
            None => DEFAULT_STREAM_INTERVAL,
        };
        let updates_per_minute = updates_per_minute.unwrap_or(DEFAULT_UPDATES_PER_MINUTE);
        if updates_per_minute == 0 {
            return Err("[slack] updates_per_minute must be at least 1".into());
        }
        Ok(Self {
            signing_secret,
            bot_token,
            api_url,
            stream: stream.unwrap_or(true),
            stream_interval,
            updates_per_minute,
        })
    }
}
