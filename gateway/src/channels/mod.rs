//! Channels: chat platforms and webhook integrations as edge adapters of the gateway
//! (`../shared/channels.md`). Each platform has a folder of the same shape:
//! - `config.rs`: its section of the channels file;
//! - `verify.rs`: checking that an inbound request comes from the platform;
//! - `inbound.rs`: the endpoint: verify, map the conversation to a session, enqueue;
//! - `deliver.rs`: delivering a finished reply back to the platform.
//!
//! What they share lives here: the channels file (`config.rs`), deterministic sessions and
//! idempotent enqueueing (`session.rs`), and the loop that takes finished replies from the bus's
//! durable queue of deliveries and hands each to its platform's `deliver.rs`, with retries
//! (`delivery.rs`). A fourth platform is a copy of a sibling folder plus a line in
//! [`routes`] and in [`Channels::new`].
//!
//! Invariant: workers know nothing of platforms. A channel message is an ordinary
//! `UserMessage` whose envelope names its origin; its outcome comes back as a
//! `ChannelDelivery` that only the origin's adapter reads.

pub mod config;
pub(crate) mod delivery;
mod session;
pub mod slack;
pub mod teams;
pub mod webhooks;

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::routing::post;

pub use config::{ChannelsConfig, ConfigError, DeliverySettings, Secret, load};
use delivery::Deliver;

use crate::AppState;
use crate::error::ApiError;

/// The channels a gateway serves: their settings and their delivery adapters, by channel name
/// (`webhooks/<name>`, ...).
pub(crate) struct Channels {
    pub(crate) config: ChannelsConfig,
    adapters: HashMap<String, Arc<dyn Deliver>>,
    /// Teams' signing keys and Connector client, which its endpoint uses too.
    pub(crate) teams: Option<Arc<teams::Teams>>,
    /// The Slack Web API client, shared by replies streamed and delivered (one pace for both).
    pub(crate) slack: Option<Arc<slack::WebApi>>,
}

impl Channels {
    pub(crate) fn new(config: ChannelsConfig, store: Arc<dyn store::Store>) -> Self {
        let mut adapters: HashMap<String, Arc<dyn Deliver>> = HashMap::new();
        if config.webhooks.is_empty() && config.slack.is_none() && config.teams.is_none() {
            return Self { config, adapters, teams: None, slack: None };
        }
        // Deliveries go to the operator's own endpoints and platform APIs: no redirects
        // (a signed delivery must not be forwarded elsewhere), bounded by the attempt timeout.
        // (The TLS crypto provider is installed by the binary before this runs.)
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.delivery.attempt_timeout)
            .user_agent(concat!("chatfleet/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("the HTTP client's settings are valid");
        for hook in config.webhooks.values() {
            let deliverer = webhooks::Deliverer::new(hook.clone(), http.clone());
            adapters.insert(webhooks::channel_name(&hook.name), Arc::new(deliverer));
        }
        let slack = config.slack.as_ref().map(|slack| Arc::new(slack::WebApi::new(slack.clone(), http.clone())));
        if let Some(api) = &slack {
            adapters.insert(slack::CHANNEL.to_owned(), Arc::new(slack::Deliverer::new(api.clone(), store)));
        }
        let teams = config.teams.clone().map(|teams| Arc::new(teams::Teams::new(teams, http.clone())));
        if let Some(teams) = &teams {
            adapters.insert(teams::CHANNEL.to_owned(), teams.deliverer.clone());
        }
        Self { config, adapters, teams, slack }
    }

    /// Whether any channel is configured (and so whether this gateway delivers replies).
    pub(crate) fn any(&self) -> bool {
        !self.adapters.is_empty()
    }

    pub(crate) fn adapter(&self, channel: &str) -> Option<&Arc<dyn Deliver>> {
        self.adapters.get(channel)
    }
}

/// The channel endpoints. A platform whose section is absent answers 404.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/channels/webhooks/{name}", post(webhooks::inbound::receive))
        .route("/v1/channels/slack/events", post(slack::inbound::receive))
        .route("/v1/channels/teams/messages", post(teams::inbound::receive))
}

/// Why an inbound channel request was refused; each is counted by its reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Rejection {
    #[error("the request is not signed")]
    MissingSignature,
    #[error("the request's signature does not match")]
    BadSignature,
    #[error("the request's timestamp is more than 5 minutes away")]
    StaleTimestamp,
    #[error("the request body is not valid JSON")]
    InvalidJson,
    #[error("{0}")]
    Invalid(String),
    #[error("the request body is too large")]
    TooLarge,
    #[error("the request has no Authorization: Bearer token")]
    MissingToken,
    #[error("the bearer token is not valid: {0}")]
    BadToken(String),
    #[error("the bearer token has expired or is not valid yet")]
    ExpiredToken,
    #[error("the bearer token is meant for another bot (audience)")]
    WrongAudience,
    #[error("the activity's serviceUrl is not the token's serviceurl claim")]
    ServiceUrlMismatch,
    #[error("the token's signing key is not endorsed for the activity's channelId")]
    NotEndorsed,
    #[error("the request body took too long to arrive")]
    TimedOut,
    #[error("the request body broke off")]
    Broken,
}

impl From<crate::body::BodyError> for Rejection {
    fn from(e: crate::body::BodyError) -> Self {
        match e {
            crate::body::BodyError::TooLarge { .. } => Self::TooLarge,
            crate::body::BodyError::TimedOut(_) => Self::TimedOut,
            crate::body::BodyError::Broken => Self::Broken,
        }
    }
}

impl Rejection {
    fn reason(&self) -> &'static str {
        match self {
            Self::MissingSignature => "missing_signature",
            Self::BadSignature => "bad_signature",
            Self::StaleTimestamp => "stale_timestamp",
            Self::InvalidJson => "invalid_json",
            Self::Invalid(_) => "invalid",
            Self::TooLarge => "too_large",
            Self::MissingToken => "missing_token",
            Self::BadToken(_) => "bad_token",
            Self::ExpiredToken => "expired_token",
            Self::WrongAudience => "wrong_audience",
            Self::ServiceUrlMismatch => "service_url_mismatch",
            Self::NotEndorsed => "not_endorsed",
            Self::TimedOut => "timed_out",
            Self::Broken => "broken",
        }
    }

    /// Counts the refusal and turns it into the response.
    pub(crate) fn refuse(self, channel: &str) -> ApiError {
        crate::telemetry::channel_event_rejected(channel, self.reason());
        tracing::info!(event = "channel_event_rejected", channel, reason = self.reason(), "refused a channel request");
        match self {
            Self::MissingSignature
            | Self::BadSignature
            | Self::StaleTimestamp
            | Self::MissingToken
            | Self::BadToken(_)
            | Self::ExpiredToken
            | Self::WrongAudience
            | Self::ServiceUrlMismatch => ApiError::Unauthorized(self.to_string()),
            Self::NotEndorsed => ApiError::Refused(self.to_string()),
            Self::InvalidJson => ApiError::InvalidJson(self.to_string()),
            Self::Invalid(message) => ApiError::Invalid(message),
            Self::TooLarge => ApiError::PayloadTooLarge(self.to_string()),
            Self::TimedOut => ApiError::RequestTimeout(self.to_string()),
            Self::Broken => ApiError::InvalidJson(self.to_string()),
        }
    }
}
