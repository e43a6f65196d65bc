//! Microsoft Teams (Bot Framework): `POST /v1/channels/teams/messages` takes activities signed
//! by the Bot Framework (a JWT checked against its published keys), and each reply is posted
//! into the conversation through the Connector API with the bot's client-credentials token.

mod config;
mod deliver;
pub(crate) mod inbound;
mod verify;

use std::sync::Arc;

pub use config::TeamsConfig;
pub(crate) use deliver::Deliverer;

/// The channel name of Teams.
pub(crate) const CHANNEL: &str = "teams";

/// What a gateway keeps for Teams: the settings, the cached signing keys, and the Connector
/// client with its cached token (shared by the typing indicator and the deliveries).
pub(crate) struct Teams {
    pub(crate) config: TeamsConfig,
    keys: verify::Keys,
    pub(crate) deliverer: Arc<Deliverer>,
}

impl Teams {
    pub(crate) fn new(config: TeamsConfig, http: reqwest::Client) -> Self {
        let keys = verify::Keys::new(config.openid_metadata_url.clone(), http.clone());
        let deliverer = Arc::new(Deliverer::new(config.clone(), http));
        Self { config, keys, deliverer }
    }
}
