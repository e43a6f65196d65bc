//! The in-process bus's reply-event log: each session's events of the last retention window,
//! in memory (gone when `chatfleet dev` stops, like its waiting messages).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use schemas::{ReplyEvent, SessionId};

/// How many publishes pass between sweeps of sessions nobody publishes to any more.
const SWEEP_EVERY: u64 = 4096;

/// Each session's recent reply events, oldest first, with when they were published.
pub(super) struct EventLog {
    retention: Duration,
    sessions: HashMap<SessionId, VecDeque<(Instant, ReplyEvent)>>,
    published: u64,
}

impl EventLog {
    pub(super) fn new(retention: Duration) -> Self {
        Self { retention, sessions: HashMap::new(), published: 0 }
    }

    pub(super) fn push(&mut self, event: &ReplyEvent) {
        let now = Instant::now();
        let events = self.sessions.entry(event.session_id.clone()).or_default();
        events.push_back((now, event.clone()));
        expire(events, now, self.retention);
        self.published += 1;
        if self.published.is_multiple_of(SWEEP_EVERY) {
            let retention = self.retention;
            self.sessions.retain(|_, events| {
                expire(events, now, retention);
                !events.is_empty()
            });
        }
    }

    /// The session's events still within the window, oldest first.
    pub(super) fn retained(&mut self, session: &SessionId) -> Vec<ReplyEvent> {
        let Some(events) = self.sessions.get_mut(session) else { return Vec::new() };
        expire(events, Instant::now(), self.retention);
        events.iter().map(|(_, e)| e.clone()).collect()
    }
}

fn expire(events: &mut VecDeque<(Instant, ReplyEvent)>, now: Instant, retention: Duration) {
    while events.front().is_some_and(|(at, _)| now.duration_since(*at) >= retention) {
        events.pop_front();
    }
}
