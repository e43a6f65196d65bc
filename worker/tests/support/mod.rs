//! Fixtures shared by the worker's integration tests.

use std::collections::BTreeMap;

use schemas::{DoubleTexting, MessageId, SessionId, UserMessage};
use store::{SessionRecord, Store};

/// Creates a new session with the `enqueue` policy in `store` and returns its id.
pub async fn create_session(store: &dyn Store) -> SessionId {
    let session = SessionId::generate();
    let record = SessionRecord {
        id: session.clone(),
        user: None,
        metadata: BTreeMap::new(),
        created_at: time::OffsetDateTime::now_utc(),
        double_texting: DoubleTexting::Enqueue,
        api_key: None,
    };
    store.create_session(&record).await.unwrap();
    session
}

/// A user message of `session` with a fresh id, as the gateway would enqueue it.
// Not every test binary that includes this module sends messages this way.
#[allow(dead_code)]
pub fn message(session: &SessionId, text: &str) -> UserMessage {
    UserMessage {
        v: schemas::ENVELOPE_VERSION,
        session_id: session.clone(),
        message_id: MessageId::generate(),
        text: text.into(),
        accepted_at: time::OffsetDateTime::now_utc(),
        double_texting: None,
        channel: None,
        cancel: None,
    }
}
