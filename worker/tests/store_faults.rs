//! A store that dies after applying a write but before answering it: the worker retries the
//! write, finds it applied, and still announces the reply, once.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bus::{Bus, MemoryBus};
use chatfleet_worker::{Worker, WorkerConfig};
use futures::StreamExt;
use llm::mock_reply::MockSettings;
use llm::stand_in::StandInModel;
use schemas::{MessageId, PartitionCount, ReplyEventKind, SessionId, UserMessage};
use store::{
    EmbeddedStore, Failure, Inserted, MessageAndReply, ReplyClaim, Role, SessionRecord, Store, StoreError,
    StoredMessage,
};
use tokio_util::sync::CancellationToken;

/// An embedded store whose first reply insert is applied but answered with `Unavailable`, as
/// a MongoDB server killed between its commit and its answer would.
struct LosesFirstReplyAnswer {
    inner: EmbeddedStore,
    lost: AtomicBool,
}

#[async_trait]
impl Store for LosesFirstReplyAnswer {
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    async fn create_session(&self, session: &SessionRecord) -> Result<(), StoreError> {
        self.inner.create_session(session).await
    }
    async fn session(&self, id: &SessionId) -> Result<Option<SessionRecord>, StoreError> {
        self.inner.session(id).await
    }
    async fn delete_session(&self, id: &SessionId) -> Result<bool, StoreError> {
        self.inner.delete_session(id).await
    }
    async fn history(&self, id: &SessionId) -> Result<Vec<StoredMessage>, StoreError> {
        self.inner.history(id).await
    }
    async fn recent(&self, id: &SessionId, limit: usize) -> Result<Vec<StoredMessage>, StoreError> {
        self.inner.recent(id, limit).await
    }
    async fn message(&self, session: &SessionId, id: &str) -> Result<Option<StoredMessage>, StoreError> {
        self.inner.message(session, id).await
    }
    async fn insert_message(&self, message: &StoredMessage) -> Result<Inserted, StoreError> {
        let inserted = self.inner.insert_message(message).await?;
        if message.role == Role::Assistant && !self.lost.swap(true, Ordering::SeqCst) {
            return Err(StoreError::Unavailable("the connection closed before the answer".into()));
        }
        Ok(inserted)
    }
    async fn mark_failed(&self, session: &SessionId, message: &MessageId, failure: &Failure) -> Result<(), StoreError> {
        self.inner.mark_failed(session, message, failure).await
    }
    async fn begin_generation(&self, session: &SessionId, message: &MessageId) -> Result<u32, StoreError> {
        self.inner.begin_generation(session, message).await
    }
    async fn begin_reply(&self, session: &SessionId, message: &MessageId) -> Result<ReplyClaim, StoreError> {
        self.inner.begin_reply(session, message).await
    }
    async fn end_reply(&self, session: &SessionId, message: &MessageId) -> Result<(), StoreError> {
        self.inner.end_reply(session, message).await
    }
    async fn message_and_reply(&self, session: &SessionId, message: &MessageId) -> Result<MessageAndReply, StoreError> {
        self.inner.message_and_reply(session, message).await
    }
    async fn shared_secret(&self, name: &str, proposed: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.inner.shared_secret(name, proposed).await
    }

    async fn add_to_counter(
        &self,
        counter: &store::Counter,
        delta: i64,
        expires_at: time::OffsetDateTime,
    ) -> Result<i64, StoreError> {
        self.inner.add_to_counter(counter, delta, expires_at).await
    }

    async fn set_counter(
        &self,
        counter: &store::Counter,
        value: i64,
        expires_at: time::OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.inner.set_counter(counter, value, expires_at).await
    }

    async fn counter_total(&self, group: &str, now: time::OffsetDateTime) -> Result<i64, StoreError> {
        self.inner.counter_total(group, now).await
    }
}

#[tokio::test]
async fn a_reply_stored_by_a_write_whose_answer_was_lost_is_announced_once() {
    let dir = tempfile::tempdir().unwrap();
    let inner = EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
    let store = Arc::new(LosesFirstReplyAnswer { inner, lost: AtomicBool::new(false) });
    let bus = Arc::new(MemoryBus::new(PartitionCount::new(2).unwrap()));
    let model = Arc::new(StandInModel::new(MockSettings::default()));
    let worker = Worker::new(bus.clone(), store.clone(), model, WorkerConfig::default());
    let session = support::create_session(store.as_ref()).await;
    let mut events = bus.subscribe_events(&session).await.unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(worker.run(stop.clone().cancelled_owned()));
    let message = UserMessage {
        v: schemas::ENVELOPE_VERSION,
        session_id: session.clone(),
        message_id: MessageId::generate(),
        text: "hello".into(),
        accepted_at: time::OffsetDateTime::now_utc(),
        double_texting: None,
        channel: None,
        cancel: None,
    };

    bus.enqueue(&message).await.unwrap();
    let mut terminals = Vec::new();
    while terminals.is_empty() {
        let event = tokio::time::timeout(Duration::from_secs(10), events.next()).await.expect("no done within 10 s");
        let event = event.expect("the event stream ended");
        if event.kind.is_terminal() {
            terminals.push(event);
        }
    }
    // Anything more would have come by now: the reply is stored and the write retried.
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(500), events.next()).await {
        if event.kind.is_terminal() {
            terminals.push(event);
        }
    }
    let history = store.history(&session).await.unwrap();

    assert!(store.lost.load(Ordering::SeqCst), "the reply's write was answered with an error");
    assert_eq!(history.len(), 2, "{history:#?}");
    let ids: Vec<schemas::EventId> = terminals.iter().map(|e| e.event_id).collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "repeats keep the terminal id: {ids:?}");
    match &terminals[0].kind {
        ReplyEventKind::Done { text, .. } => assert_eq!(text, &history[1].text, "the stored reply is announced"),
        other => panic!("expected done, got {other:?}"),
    }
    stop.cancel();
}
