//! Channel envelopes: where a message brought by a chat platform or a webhook integration came
//! from, and the finished reply that waits, durably, for a gateway to deliver it back there.
//!
//! Workers stay platform-agnostic: they copy a message's [`ChannelOrigin`] into a
//! [`ChannelDelivery`] without looking inside it. Only the gateway's channel adapters read the
//! address.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ReplyEvent;

/// Where a channel message came from, so that its reply can be delivered back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ChannelOrigin {
    /// The channel that brought the message: `slack`, `teams`, or `webhooks/<integration>`.
    pub channel: String,
    /// What the channel's adapter needs to address the reply (a conversation, a thread, a
    /// service URL...). Opaque to workers; written and read by the same adapter.
    #[serde(default)]
    pub address: serde_json::Value,
}

/// The finished reply of a channel message, on the bus's durable queue of pending deliveries
/// until a gateway has delivered it (or given up on it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(title = "ChannelDelivery", description = "chatfleet bus envelope: a finished reply to deliver to a channel")]
pub struct ChannelDelivery {
    /// Envelope version ([`crate::ENVELOPE_VERSION`]).
    pub v: u32,
    /// The origin of the message this answers, as its envelope carried it.
    pub origin: ChannelOrigin,
    /// The reply's terminal event: `done` with the complete text, or `error`. Its message id
    /// names the message; `done` carries the reply id.
    pub event: ReplyEvent,
    /// When the worker handed the outcome over (delivery latency is measured from here).
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String", extend("format" = "date-time"))]
    pub finished_at: time::OffsetDateTime,
}

impl ChannelDelivery {
    /// The key a delivery is deduplicated by on the bus and that receivers see as its id: the
    /// reply id, the same however often the outcome is announced.
    pub fn key(&self) -> String {
        crate::ReplyId::for_message(&self.event.message_id).into_string()
    }
}
