//! `[slack]`: the Slack app's signing secret and bot token, and the Web API's URL.

use serde::Deserialize;

use crate::channels::config::{Secret, checked_url, section};

/// The Web API's URL unless the file names another.
const DEFAULT_API_URL: &str = "https://slack.com/api/";

/// The Slack app.
#[derive(Debug, Clone)]
pub struct SlackConfig {
    /// Verifies inbound requests (v0 signatures).
    pub signing_secret: Secret,
    /// `xoxb-...`: authorizes Web API calls.
    pub bot_token: Secret,
    /// The Web API's base URL, ending in `/`; `https://`, or `http://` on a loopback host.
    pub api_url: reqwest::Url,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Section {
    signing_secret: Secret,
    bot_token: Secret,
    api_url: Option<String>,
}

impl SlackConfig {
    pub(crate) fn from_section(value: toml::Value) -> Result<Self, String> {
        let Section { signing_secret, bot_token, api_url } = section("slack", value)?;
        if signing_secret.expose().is_empty() || bot_token.expose().is_empty() {
            return Err("[slack]: signing_secret and bot_token must not be empty".into());
        }
        let mut api_url = api_url.unwrap_or_else(|| DEFAULT_API_URL.to_owned());
        if !api_url.ends_with('/') {
            api_url.push('/');
        }
        let api_url = checked_url("[slack] api_url", &api_url, false)?;
        Ok(Self { signing_secret, bot_token, api_url })
    }
}
