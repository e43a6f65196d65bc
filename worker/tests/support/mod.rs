//! Fixtures shared by the worker's integration tests.

use std::collections::BTreeMap;

use schemas::{DoubleTexting, SessionId};
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
