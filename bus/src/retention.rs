//! Reply events kept for a retention window, so that a client whose stream broke can resume it
//! from its last event id on any gateway: what [`crate::Bus::resume_events`] returns, and the
//! default window.
//!
//! Each adapter keeps the events where its broker keeps things: NATS in the JetStream stream
//! `<PREFIX>_OUT` (subjects `<prefix>.out.<session>`, limited by age), RabbitMQ in the stream
//! queue `<prefix>.out.log`, the in-process bus in memory. Reading them back is per session
//! and in publication order; the gateway decides what a client missed by event id.

use std::time::Duration;

use schemas::ReplyEvent;

use crate::EventStream;

/// How long reply events stay resumable unless configured otherwise.
pub const DEFAULT_EVENT_RETENTION: Duration = Duration::from_secs(10 * 60);

/// A session's reply events as the bus has them: those still retained, oldest first, and after
/// them every event published later, live.
///
/// Every event of the session published before [`crate::Bus::resume_events`] returned and not
/// yet past the retention window is in `retained`; every event published after it returned is
/// in `live`. An event published while it ran may be in both: readers skip ids they have
/// passed (ids increase within a session, and a repeated `done` keeps its id).
pub struct Resumed {
    pub retained: Vec<ReplyEvent>,
    pub live: EventStream,
}

impl std::fmt::Debug for Resumed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resumed").field("retained", &self.retained.len()).finish_non_exhaustive()
    }
}
