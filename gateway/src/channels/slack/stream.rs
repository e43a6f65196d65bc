//! Streaming a reply into Slack while it is generated, from the gateway that took the event:
//! it listens to the session's reply events before enqueueing the message, posts the first
//! message into the thread (`chat.postMessage`) as soon as the first text arrives, updates it
//! (`chat.update`) as the reply grows, at most once per `stream_interval` and within the
//! gateway's `updates_per_minute`, and writes the complete text when the reply is done.
//!
//! Streaming is best effort: the durable delivery is the final word (`deliver.rs`). Whoever
//! writes the message is agreed through the reply's note (`note.rs`); if this gateway dies, or
//! the reply's events stop reaching it, the durable delivery finishes the message.

use std::sync::Arc;
use std::time::Duration;

use bus::EventStream;
use futures::StreamExt;
use schemas::{MessageId, ReplyEventKind};
use serde_json::Value;
use store::Store;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::api::{CallError, WebApi};
use super::deliver::{APOLOGY, message};
use super::note::{Note, Notes};

/// A reply whose events stop for this long is left to the durable delivery.
const IDLE: Duration = Duration::from_secs(120);
/// How often a call that failed (other than by a rate limit) is tried again.
const ATTEMPTS: usize = 5;

/// Whether following the reply goes on.
enum Step {
    Go,
    Stop,
}

/// What woke the loop.
enum Input {
    Event(Option<schemas::ReplyEvent>),
    Slot,
    Idle,
}

/// One reply streamed into one Slack message.
pub(crate) struct Streamer {
    api: Arc<WebApi>,
    notes: Notes,
    /// The conversation (`channel`, `thread_ts`), as the message's origin carries it.
    address: Value,
    message_id: MessageId,
    /// The reply so far.
    text: String,
    /// The streamed message, once posted.
    ts: Option<String>,
    /// What the message shows.
    shown: String,
    /// When the message was last written.
    written_at: Instant,
    /// The update slot reserved, while the message is behind the reply.
    slot: Option<Instant>,
}

impl Streamer {
    pub(crate) fn new(api: Arc<WebApi>, store: Arc<dyn Store>, address: Value, message_id: MessageId) -> Self {
        let notes = Notes::of_message(store, &message_id);
        Self {
            api,
            notes,
            address,
            message_id,
            text: String::new(),
            ts: None,
            shown: String::new(),
            written_at: Instant::now(),
            slot: None,
        }
    }

    /// Follows the session's reply events until this message's reply is done (or the events
    /// stop, or the gateway closes).
    pub(crate) async fn run(mut self, mut events: EventStream, closing: CancellationToken) {
        loop {
            let slot = self.slot;
            let input = tokio::select! {
                event = tokio::time::timeout(IDLE, events.next()) => event.map_or(Input::Idle, Input::Event),
                _ = until(slot) => Input::Slot,
                _ = closing.cancelled() => return,
            };
            let step = match input {
                Input::Event(Some(event)) if event.message_id == self.message_id => self.on_event(event.kind).await,
                // Another message of the same conversation.
                Input::Event(Some(_)) => Step::Go,
                Input::Event(None) | Input::Idle => {
                    tracing::info!(
                        event = "slack_stream_abandoned",
                        "the reply's events stopped; the durable delivery finishes it"
                    );
                    Step::Stop
                }
                Input::Slot => self.on_slot().await,
            };
            if let Step::Stop = step {
                return;
            }
        }
    }

    async fn on_event(&mut self, kind: ReplyEventKind) -> Step {
        match kind {
            ReplyEventKind::Delta { text, .. } => {
                self.text.push_str(&text);
                if self.ts.is_some() {
                    self.schedule();
                    Step::Go
                } else if self.text.trim().is_empty() {
                    Step::Go
                } else {
                    self.start().await
                }
            }
            ReplyEventKind::Reset { .. } => {
                self.text.clear();
                Step::Go
            }
            ReplyEventKind::Done { text, .. } => {
                self.finish(&text).await;
                Step::Stop
            }
            ReplyEventKind::Error { .. } => {
                self.finish(APOLOGY).await;
                Step::Stop
            }
        }
    }

    /// Claims the reply's message and posts it with the first text.
    async fn start(&mut self) -> Step {
        match self.notes.swap(None, &Note::Claimed).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!(event = "slack_stream_not_claimed", "another gateway writes this reply");
                return Step::Stop;
            }
            Err(e) => {
                tracing::warn!(event = "slack_note_failed", error = %e, "not streaming: the reply's note is unavailable");
                return Step::Stop;
            }
        }
        let mut posted = None;
        for _ in 0..ATTEMPTS {
            let args = message(&self.address, &self.text).expect("a Slack origin names its channel");
            match self.api.call("chat.postMessage", &args).await {
                Ok(answer) => {
                    posted = answer["ts"].as_str().map(str::to_owned);
                    break;
                }
                // The next call waits out the pause.
                Err(CallError::RateLimited { .. }) => continue,
                Err(CallError::Failed { .. }) => tokio::time::sleep(Duration::from_secs(1)).await,
                Err(CallError::Refused { .. }) => break,
            }
        }
        let Some(ts) = posted else {
            // Nothing was posted: the durable delivery posts the reply.
            if let Err(e) = self.notes.swap(Some(&Note::Claimed), &Note::Durable).await {
                tracing::warn!(event = "slack_note_failed", error = %e);
            }
            return Step::Stop;
        };
        match self.notes.swap(Some(&Note::Claimed), &Note::Streaming(ts.clone())).await {
            Ok(true) => {
                tracing::info!(event = "slack_stream_started", ts = %ts, "streaming the reply into Slack");
                self.shown = self.text.clone();
                self.written_at = Instant::now();
                self.ts = Some(ts);
                Step::Go
            }
            // The durable delivery took the reply over meanwhile (this gateway was too slow):
            // one message only.
            _ => {
                tracing::info!(
                    event = "slack_stream_superseded",
                    "the durable delivery posted the reply; removing the streamed message"
                );
                let channel = self.address.get("channel").cloned().unwrap_or_default();
                let _ = self.api.call("chat.delete", &serde_json::json!({"channel": channel, "ts": ts})).await;
                Step::Stop
            }
        }
    }

    /// Reserves the next update of a message that is behind the reply.
    fn schedule(&mut self) {
        if self.slot.is_none() {
            let earliest = self.written_at + self.api.config().stream_interval;
            self.slot = Some(self.api.reserve_update(earliest));
        }
    }

    /// Brings the message up to the reply so far.
    async fn on_slot(&mut self) -> Step {
        self.slot = None;
        let Some(ts) = self.ts.clone() else { return Step::Go };
        if self.text == self.shown || self.text.trim().is_empty() {
            return Step::Go;
        }
        let text = self.text.clone();
        match self.update(&ts, &text).await {
            Ok(()) => {
                self.shown = text;
                Step::Go
            }
            Err(CallError::Refused { .. }) => Step::Stop,
            Err(_) => {
                self.schedule();
                Step::Go
            }
        }
    }

    /// Writes the complete reply into the message and records it as final. Without a message
    /// yet, nothing is written here: the durable delivery posts the reply.
    async fn finish(&mut self, text: &str) {
        let Some(ts) = self.ts.clone() else { return };
        for _ in 0..ATTEMPTS {
            self.api.take_final_update();
            match self.update(&ts, text).await {
                Ok(()) => {
                    if let Err(e) = self.notes.swap(Some(&Note::Streaming(ts.clone())), &Note::Final(ts.clone())).await
                    {
                        tracing::warn!(event = "slack_note_failed", error = %e);
                    }
                    tracing::info!(
                        event = "slack_stream_finished",
                        ts = %ts,
                        "the streamed message holds the complete reply"
                    );
                    return;
                }
                Err(CallError::RateLimited { .. }) => continue,
                Err(CallError::Failed { .. }) => tokio::time::sleep(Duration::from_secs(1)).await,
                Err(CallError::Refused { .. }) => return,
            }
        }
    }

    async fn update(&mut self, ts: &str, text: &str) -> Result<(), CallError> {
        let channel = self.address.get("channel").cloned().unwrap_or_default();
        let args = serde_json::json!({"channel": channel, "ts": ts, "text": text});
        self.api.call("chat.update", &args).await?;
        self.written_at = Instant::now();
        Ok(())
    }
}

/// Resolves at `slot`, or never without one.
async fn until(slot: Option<Instant>) {
    match slot {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
