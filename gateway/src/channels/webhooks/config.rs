//! `[webhooks.<name>]`: one signed-webhook integration.

use serde::Deserialize;

use super::verify::SigningKey;
use crate::channels::config::{Secret, checked_url, section};

/// One webhook integration.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// The integration's name: the last part of its inbound URL, and of its channel's name
    /// (`webhooks/<name>`).
    pub name: String,
    /// The Standard Webhooks secret (`whsec_` and base64): verifies inbound requests and signs
    /// deliveries.
    pub secret: Secret,
    /// The HMAC key: the base64-decoded part of the secret after `whsec_`.
    pub(crate) key: SigningKey,
    /// Where replies are delivered. Either scheme: it is the operator's own endpoint.
    pub url: reqwest::Url,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Section {
    secret: Secret,
    url: String,
}

impl WebhookConfig {
    pub(crate) fn from_section(name: &str, value: toml::Value) -> Result<Self, String> {
        let here = format!("webhooks.{name}");
        let valid_name = !name.is_empty()
            && name.len() <= 64
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid_name {
            return Err(format!("[{here}]: an integration's name is 1 to 64 letters, digits, '_' or '-'"));
        }
        let Section { secret, url } = section(&here, value)?;
        let key = SigningKey::from_secret(&secret).map_err(|problem| format!("[{here}] secret: {problem}"))?;
        let url = checked_url(&format!("[{here}] url"), &url, true)?;
        Ok(Self { name: name.to_owned(), secret, key, url })
    }
}
