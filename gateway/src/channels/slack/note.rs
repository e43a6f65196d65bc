//! Who writes a reply's Slack message, agreed through a note in the store (one per reply,
//! changed only by compare-and-set), so that a reply is one message however its delivery goes:
//!
//! - absent: nobody has written anything yet;
//! - `claimed`: the gateway streaming the reply is posting its first message;
//! - `ts:<ts>`: the streamed message exists and is being updated;
//! - `durable`: the durable delivery posts the reply (nothing was streamed, or the streaming
//!   gateway gave up or went silent before its first message was known);
//! - `final:<ts>`: the message holds the complete reply.
//!
//! The streaming gateway claims an absent note before its first post, and finalizes the
//! message when the reply is done. The gateway that takes the reply from the durable queue
//! claims an absent note and posts the reply, finds it final and is done, or waits for the
//! streaming gateway to finish; if that one goes silent (it died), it writes the complete text
//! into the streamed message itself (`chat.update` replaces the whole text, so either gateway
//! can finish it).

use std::sync::Arc;

use schemas::{ChannelDelivery, MessageId, ReplyId};
use store::{Store, StoreError};

/// The state of a reply's Slack message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Note {
    Claimed,
    Streaming(String),
    Durable,
    Final(String),
}

impl Note {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "claimed" => Some(Self::Claimed),
            "durable" => Some(Self::Durable),
            _ => {
                if let Some(ts) = text.strip_prefix("ts:") {
                    Some(Self::Streaming(ts.to_owned()))
                } else {
                    text.strip_prefix("final:").map(|ts| Self::Final(ts.to_owned()))
                }
            }
        }
    }

    fn encode(&self) -> String {
        match self {
            Self::Claimed => "claimed".into(),
            Self::Durable => "durable".into(),
            Self::Streaming(ts) => format!("ts:{ts}"),
            Self::Final(ts) => format!("final:{ts}"),
        }
    }
}

/// The note of one reply.
#[derive(Clone)]
pub(crate) struct Notes {
    store: Arc<dyn Store>,
    key: String,
}

impl Notes {
    pub(crate) fn of_message(store: Arc<dyn Store>, message: &MessageId) -> Self {
        Self { store, key: format!("slack/{}", ReplyId::for_message(message).into_string()) }
    }

    pub(crate) fn of_delivery(store: Arc<dyn Store>, delivery: &ChannelDelivery) -> Self {
        Self::of_message(store, &delivery.event.message_id)
    }

    pub(crate) async fn read(&self) -> Result<Option<Note>, StoreError> {
        let text = self.store.delivery_note(&self.key).await?;
        // A note this version cannot read is left to the durable delivery.
        Ok(text.map(|t| Note::parse(&t).unwrap_or(Note::Durable)))
    }

    /// Moves the note from `from` to `to`; false if it was not `from`.
    pub(crate) async fn swap(&self, from: Option<&Note>, to: &Note) -> Result<bool, StoreError> {
        let from = from.map(Note::encode);
        self.store.swap_delivery_note(&self.key, from.as_deref(), &to.encode()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_read_back_as_written() {
        for note in [Note::Claimed, Note::Durable, Note::Streaming("1.5".into()), Note::Final("2.25".into())] {
            assert_eq!(Note::parse(&note.encode()), Some(note));
        }
        assert_eq!(Note::parse("something else"), None);
    }
}
