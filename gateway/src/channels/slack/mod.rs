//! Slack (Events API): `POST /v1/channels/slack/events` takes signed events (`app_mention`, and
//! messages in direct messages), and each reply is posted into the conversation's thread with
//! the bot token through the Web API (`chat.postMessage`).

mod config;
mod deliver;
pub(crate) mod inbound;
pub(crate) mod verify;

pub use config::SlackConfig;
pub(crate) use deliver::Deliverer;

/// The channel name of Slack.
pub(crate) const CHANNEL: &str = "slack";
