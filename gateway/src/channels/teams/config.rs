//! `[teams]`: the bot's Microsoft App ID and password, and the Bot Framework's URLs.

use serde::Deserialize;

use crate::channels::config::{Secret, checked_url, section};

/// Where the Bot Framework publishes the keys that sign its requests, unless the file names
/// another.
const DEFAULT_OPENID_METADATA_URL: &str = "https://login.botframework.com/v1/.well-known/openidconfiguration";
/// Where a multi-tenant bot gets its Connector API tokens, unless the file names another (a
/// single-tenant bot names its tenant's: `https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token`).
const DEFAULT_TOKEN_URL: &str = "https://login.microsoftonline.com/botframework.com/oauth2/v2.0/token";

/// The Teams bot (an Azure Bot registration).
#[derive(Debug, Clone)]
pub struct TeamsConfig {
    /// The bot's Microsoft App ID: the audience of inbound tokens, and the client id of the
    /// Connector API's tokens.
    pub app_id: String,
    /// The App ID's client secret, for the Connector API's tokens.
    pub app_password: Secret,
    /// The Bot Framework's OpenID metadata, which names the JWKS of its signing keys.
    pub openid_metadata_url: reqwest::Url,
    /// The OAuth 2.0 token endpoint of the client-credentials grant.
    pub token_url: reqwest::Url,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Section {
    app_id: String,
    app_password: Secret,
    openid_metadata_url: Option<String>,
    token_url: Option<String>,
}

impl TeamsConfig {
    pub(crate) fn from_section(value: toml::Value) -> Result<Self, String> {
        let Section { app_id, app_password, openid_metadata_url, token_url } = section("teams", value)?;
        if app_id.trim().is_empty() || app_password.expose().is_empty() {
            return Err("[teams]: app_id and app_password must not be empty".into());
        }
        let metadata = openid_metadata_url.as_deref().unwrap_or(DEFAULT_OPENID_METADATA_URL);
        let openid_metadata_url = checked_url("[teams] openid_metadata_url", metadata, false)?;
        let token_url = checked_url("[teams] token_url", token_url.as_deref().unwrap_or(DEFAULT_TOKEN_URL), false)?;
        Ok(Self { app_id: app_id.trim().to_owned(), app_password, openid_metadata_url, token_url })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channels::config::parse;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn a_teams_section_needs_the_app_id_and_password_and_defaults_to_microsofts_urls() {
        let good = "[teams]\napp_id = \"6c3bf1e4\"\napp_password = \"hunter2-teams\"\n";

        let teams = parse(good, no_env).unwrap().teams.unwrap();

        assert_eq!(teams.openid_metadata_url.as_str(), DEFAULT_OPENID_METADATA_URL);
        assert_eq!(teams.token_url.as_str(), DEFAULT_TOKEN_URL);
        assert!(parse("[teams]\napp_id = \"6c3bf1e4\"\n", no_env).unwrap_err().contains("app_password"));
        let plain = format!("{good}token_url = \"http://login.example.com/token\"\n");
        assert!(parse(&plain, no_env).unwrap_err().contains("https://"));
        let local = format!("{good}openid_metadata_url = \"http://127.0.0.1:9/metadata\"\n");
        assert!(parse(&local, no_env).is_ok());
        assert!(!format!("{:?}", parse(good, no_env).unwrap()).contains("hunter2"));
    }
}
