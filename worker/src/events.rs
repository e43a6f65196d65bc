//! A reply's events on their way out: [`EventWriter`] numbers and publishes them, and
//! [`DeltaBatch`] holds a generation's chunks back under load so that they go out together.

use std::time::Duration;

use bus::Bus;
use schemas::{EventId, ReplyEvent, ReplyEventKind, UserMessage};

/// Publishes a reply's events with increasing ids.
pub(crate) struct EventWriter<'a> {
    bus: &'a dyn Bus,
    message: &'a UserMessage,
    turn: u64,
    start: u32,
    seq: u32,
}

impl<'a> EventWriter<'a> {
    /// The events of the reply to `message`, at conversation turn `turn`, generation start
    /// `start` (1 for the first).
    pub(crate) fn new(bus: &'a dyn Bus, message: &'a UserMessage, turn: u64, start: u32) -> Self {
        Self { bus, message, turn, start, seq: 0 }
    }

    pub(crate) async fn send(&mut self, kind: ReplyEventKind) {
        let event = ReplyEvent {
            v: schemas::ENVELOPE_VERSION,
            event_id: if kind.is_terminal() {
                EventId::terminal(self.turn)
            } else {
                EventId::new(self.turn, self.start, self.seq)
            },
            session_id: self.message.session_id.clone(),
            message_id: self.message.message_id.clone(),
            kind,
        };
        self.seq += 1;
        // Reply events are best effort: a listener that misses one still finds the stored
        // reply in the history.
        if let Err(e) = self.bus.publish_event(&event).await {
            tracing::warn!(event = "event_publish_failed", error = %e);
        }
    }
}

/// The chunks of one attempt not yet published, and when the last `delta` event went out.
#[derive(Default)]
pub(crate) struct DeltaBatch {
    /// Text of the chunks held back.
    pending: String,
    /// `delta` events published so far in this attempt; the next one's index.
    sent: u32,
    /// When the last `delta` event went out.
    last_sent: Option<tokio::time::Instant>,
    /// When the held chunks must go out.
    due: Option<tokio::time::Instant>,
}

impl DeltaBatch {
    /// When the held chunks must go out; None while none are held.
    pub(crate) fn due(&self) -> Option<tokio::time::Instant> {
        self.due
    }

    /// Whether any `delta` event of this attempt went out.
    pub(crate) fn any_sent(&self) -> bool {
        self.sent > 0
    }

    /// Publishes `chunk` now if the `window` since the last event has passed (or this is the
    /// first), else holds it until then.
    pub(crate) async fn add(&mut self, chunk: &str, window: Duration, events: &mut EventWriter<'_>) {
        self.pending.push_str(chunk);
        let now = tokio::time::Instant::now();
        match self.last_sent.map(|last| last + window).filter(|&next| next > now) {
            None => self.flush(events).await,
            Some(next) => {
                self.due.get_or_insert(next);
            }
        }
    }

    /// Publishes the held chunks as one `delta` event.
    pub(crate) async fn flush(&mut self, events: &mut EventWriter<'_>) {
        self.due = None;
        if self.pending.is_empty() {
            return;
        }
        let text = std::mem::take(&mut self.pending);
        events.send(ReplyEventKind::Delta { index: self.sent, text }).await;
        self.sent += 1;
        self.last_sent = Some(tokio::time::Instant::now());
    }
}
