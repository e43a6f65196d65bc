//! Delivering a finished reply into its Slack conversation, from the durable queue: the final
//! word on what the reply's message says. If no gateway streamed the reply, the complete text
//! is posted (`chat.postMessage`, in the conversation's thread); if one streamed it, that
//! gateway finishes its message and this waits for it, writing the complete text into the
//! streamed message itself (`chat.update`) should it go silent (see `note.rs`). A model error
//! becomes a short, polite message. Rate limits (`429` with `Retry-After`, or `ratelimited`)
//! and server errors are retried by the delivery loop; errors that no retry can fix (the bot was
//! removed from the channel, the token was revoked) end the attempts.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use schemas::{ChannelDelivery, ReplyEventKind};
use store::Store;
use tokio::time::Instant;

use super::api::{CallError, WebApi};
use super::note::{Note, Notes};
use crate::channels::delivery::{Attempt, Deliver};

/// How long a streaming gateway may stay silent (its message neither final nor changed) before
/// the durable delivery finishes the message itself.
const TAKE_OVER_AFTER: Duration = Duration::from_secs(10);
/// How often the note is read while waiting for the streaming gateway.
const POLL_EVERY: Duration = Duration::from_millis(200);

/// What a model error looks like in Slack.
pub(crate) const APOLOGY: &str = "Sorry, I could not answer that just now. Please try again in a moment.";

/// Delivers replies with the bot token.
pub(crate) struct Deliverer {
    api: Arc<WebApi>,
    store: Arc<dyn Store>,
}

impl Deliverer {
    pub(crate) fn new(api: Arc<WebApi>, store: Arc<dyn Store>) -> Self {
        Self { api, store }
    }
}

/// The text of an outcome in Slack; None for an event that is not an outcome.
pub(crate) fn reply_text(kind: &ReplyEventKind) -> Option<String> {
    match kind {
        ReplyEventKind::Done { text, .. } => Some(text.clone()),
        ReplyEventKind::Error { .. } => Some(APOLOGY.to_owned()),
        _ => None,
    }
}

/// The `chat.postMessage` arguments of `text` in the conversation of `address`.
pub(crate) fn message(address: &serde_json::Value, text: &str) -> Option<serde_json::Value> {
    let mut message = serde_json::json!({"channel": address.get("channel")?, "text": text});
    if let Some(thread) = address.get("thread_ts").filter(|t| !t.is_null()) {
        message["thread_ts"] = thread.clone();
    }
    Some(message)
}

#[async_trait]
impl Deliver for Deliverer {
    async fn deliver(&self, delivery: &ChannelDelivery) -> Attempt {
        let (Some(text), Some(channel)) = (reply_text(&delivery.event.kind), delivery.origin.address.get("channel"))
        else {
            return Attempt::Failed { reason: "not_an_outcome", retry_after: None };
        };
        let notes = Notes::of_delivery(self.store.clone(), delivery);
        let mut seen: Option<(Note, Instant)> = None;
        loop {
            let note = match notes.read().await {
                Ok(note) => note,
                Err(e) => return store_failed(&e),
            };
            let claim = match &note {
                None => notes.swap(None, &Note::Durable).await,
                Some(Note::Durable) => Ok(true),
                Some(Note::Final(_)) => return Attempt::Delivered,
                Some(Note::Claimed | Note::Streaming(_)) => {
                    // Waiting while the streaming gateway makes progress; its silence is timed
                    // from the last change seen.
                    let since = match seen.take() {
                        Some((before, since)) if Some(&before) == note.as_ref() => since,
                        _ => Instant::now(),
                    };
                    if since.elapsed() < TAKE_OVER_AFTER {
                        seen = note.clone().map(|n| (n, since));
                        tokio::time::sleep(POLL_EVERY).await;
                        continue;
                    }
                    if let Some(Note::Streaming(ts)) = &note {
                        tracing::info!(
                            event = "slack_stream_taken_over",
                            "the streaming gateway went silent; finishing its message"
                        );
                        return self.finish(&notes, channel, ts, &text).await;
                    }
                    notes.swap(note.as_ref(), &Note::Durable).await
                }
            };
            match claim {
                Ok(true) => return self.post(&notes, delivery, &text).await,
                Ok(false) => continue,
                Err(e) => return store_failed(&e),
            }
        }
    }
}

impl Deliverer {
    /// Posts the complete reply and records it as final.
    async fn post(&self, notes: &Notes, delivery: &ChannelDelivery, text: &str) -> Attempt {
        let args = message(&delivery.origin.address, text).expect("the address has a channel");
        match self.api.call("chat.postMessage", &args).await {
            Ok(answer) => {
                let ts = answer["ts"].as_str().unwrap_or_default().to_owned();
                record_final(notes, Note::Durable, ts).await;
                Attempt::Delivered
            }
            Err(e) => failed(e),
        }
    }

    /// Writes the complete reply into the streamed message `ts` and records it as final.
    async fn finish(&self, notes: &Notes, channel: &serde_json::Value, ts: &str, text: &str) -> Attempt {
        let args = serde_json::json!({"channel": channel, "ts": ts, "text": text});
        self.api.take_final_update();
        match self.api.call("chat.update", &args).await {
            Ok(_) => {
                record_final(notes, Note::Streaming(ts.to_owned()), ts.to_owned()).await;
                Attempt::Delivered
            }
            Err(e) => failed(e),
        }
    }
}

/// Records the message as final; a store failure here only means a repeated hand-over of the
/// reply would write it again.
async fn record_final(notes: &Notes, from: Note, ts: String) {
    if let Err(e) = notes.swap(Some(&from), &Note::Final(ts)).await {
        tracing::warn!(event = "slack_note_failed", error = %e, "could not record the Slack message as final");
    }
}

fn failed(error: CallError) -> Attempt {
    match error {
        CallError::RateLimited { retry_after } => {
            Attempt::Failed { reason: "http_429", retry_after: Some(retry_after) }
        }
        CallError::Failed { reason, retry_after } => Attempt::Failed { reason, retry_after },
        CallError::Refused { .. } => Attempt::Gone,
    }
}

fn store_failed(error: &store::StoreError) -> Attempt {
    tracing::warn!(event = "slack_note_failed", error = %error, "cannot read or write the reply's Slack note");
    Attempt::Failed { reason: "store", retry_after: None }
}
