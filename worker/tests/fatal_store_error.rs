//! A message the store refuses for good (`StoreError::Fatal`, one bad record) is given up on:
//! the client gets a `store_failed` error event, the delivery is acknowledged, and the
//! session's next message is answered. Before, the worker retried such a call forever and held
//! the session's queue behind it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bus::{Bus, EventStream, MemoryBus};
use chatfleet_worker::{Worker, WorkerConfig};
use futures::StreamExt;
use llm::mock_reply::MockSettings;
use llm::stand_in::StandInModel;
use schemas::{MessageId, PartitionCount, ReplyEventKind, SessionId, UserMessage};
use store::{EmbeddedStore, Failure, Inserted, ReplyClaim, SessionRecord, Store, StoreError, StoredMessage};
use tokio_util::sync::CancellationToken;

mod support;

/// The text of the message whose record the store refuses.
const POISON: &str = "a record this store cannot take";

/// The embedded store, except that it refuses for good to insert a message with the text
/// [`POISON`], and counts how often it was asked to.
struct RefusingStore {
    inner: EmbeddedStore,
    poison_inserts: AtomicUsize,
}

#[async_trait]
impl Store for RefusingStore {
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
        if message.text == POISON {
            self.poison_inserts.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::Fatal("this record cannot be stored".into()));
        }
        self.inner.insert_message(message).await
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

/// The terminal event (`done` or `error`) of the reply to `message`.
async fn terminal_event_of(events: &mut EventStream, message: &UserMessage) -> ReplyEventKind {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let event = events.next().await.expect("the event stream ended");
            if event.message_id == message.message_id && event.kind.is_terminal() {
                return event.kind;
            }
        }
    })
    .await
    .expect("no terminal event within 10 s: the message is still held")
}

#[tokio::test]
async fn a_message_the_store_refuses_for_good_ends_in_a_store_failed_error_and_the_next_one_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let inner = EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
    let store = Arc::new(RefusingStore { inner, poison_inserts: AtomicUsize::new(0) });
    let bus = Arc::new(MemoryBus::new(PartitionCount::new(2).unwrap()));
    let model = Arc::new(StandInModel::new(MockSettings::default()));
    let worker = Worker::new(bus.clone(), store.clone(), model, WorkerConfig::default());
    let session = support::create_session(store.as_ref()).await;
    let mut events = bus.subscribe_events(&session).await.unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(worker.run(stop.clone().cancelled_owned()));
    let (poison, next) = (support::message(&session, POISON), support::message(&session, "hello"));

    bus.enqueue(&poison).await.unwrap();
    bus.enqueue(&next).await.unwrap();
    let refused = terminal_event_of(&mut events, &poison).await;
    let answered = terminal_event_of(&mut events, &next).await;

    assert!(
        matches!(&refused, ReplyEventKind::Error { code, .. } if code == "store_failed"),
        "expected a store_failed error, got {refused:?}"
    );
    assert!(matches!(answered, ReplyEventKind::Done { .. }), "the next message was not answered: {answered:?}");
    assert_eq!(store.poison_inserts.load(Ordering::SeqCst), 1, "a fatal store error must not be retried");
    stop.cancel();
}
