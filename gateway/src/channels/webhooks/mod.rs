//! Signed webhooks (Standard Webhooks 1.0): `POST /v1/channels/webhooks/{name}` takes a signed
//! message of an integration's conversation, and each reply is delivered, signed with the same
//! secret, to the integration's URL (`webhook-id` = the reply id).

mod config;
mod deliver;
pub(crate) mod inbound;
pub(crate) mod verify;

pub use config::WebhookConfig;
pub(crate) use deliver::Deliverer;

/// The channel name of an integration: `webhooks/<name>`.
pub(crate) fn channel_name(integration: &str) -> String {
    format!("webhooks/{integration}")
}
