//! The sticky context cache, seen from outside: a real worker over the in-process bus, the
//! embedded store and the stand-in model, with the store wrapped to count history reads.
//!
//! Each turn waits for the reply's terminal event, which the worker publishes only after it
//! has stored the outcome and updated its cache, so the cache can be compared with the store
//! at that point.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bus::{Bus, EventStream, MemoryBus};
use chatfleet_worker::{Worker, WorkerConfig};
use futures::StreamExt;
use llm::mock_reply::MockSettings;
use llm::stand_in::StandInModel;
use schemas::{DoubleTexting, FinishReason, MessageId, PartitionCount, ReplyEventKind, SessionId, UserMessage};
use store::{
    EmbeddedStore, Failure, Inserted, Outcome, ReplyClaim, Role, SessionRecord, Store, StoreError, StoredMessage,
};
use tokio_util::sync::CancellationToken;

mod support;

/// Delegates everything to the real store and counts the history reads (`recent`).
struct CountingStore {
    inner: EmbeddedStore,
    recent_calls: AtomicUsize,
}

impl CountingStore {
    fn recent_calls(&self) -> usize {
        self.recent_calls.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Store for CountingStore {
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
        self.recent_calls.fetch_add(1, Ordering::SeqCst);
        self.inner.recent(id, limit).await
    }

    async fn message(&self, session: &SessionId, id: &str) -> Result<Option<StoredMessage>, StoreError> {
        self.inner.message(session, id).await
    }

    async fn insert_message(&self, message: &StoredMessage) -> Result<Inserted, StoreError> {
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

    async fn outcome(&self, session: &SessionId, message: &MessageId) -> Result<Option<Outcome>, StoreError> {
        self.inner.outcome(session, message).await
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

/// How many messages the worker reads for context.
const HISTORY_LIMIT: usize = 64;

/// A running worker and what it works with.
struct Fleet {
    bus: Arc<MemoryBus>,
    store: Arc<CountingStore>,
    worker: Worker,
    session: SessionId,
    events: EventStream,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Fleet {
    async fn start(context_cache_bytes: usize) -> Fleet {
        let model = MockSettings {
            first_token_delay: Duration::from_millis(1),
            token_delay: Duration::ZERO,
            reply_tokens: 4,
            echo_chars: 48,
        };
        Self::start_with_model(context_cache_bytes, model).await
    }

    async fn start_with_model(context_cache_bytes: usize, model: MockSettings) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let inner = EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
        let store = Arc::new(CountingStore { inner, recent_calls: AtomicUsize::new(0) });
        let bus = Arc::new(MemoryBus::new(PartitionCount::new(2).unwrap()));
        let model = Arc::new(StandInModel::new(model));
        let mut config = WorkerConfig {
            worker_id: schemas::WorkerId::parse("cache-test").unwrap(),
            context_cache_bytes,
            ..WorkerConfig::default()
        };
        config.context.history_limit = HISTORY_LIMIT;
        let worker = Worker::new(bus.clone(), store.clone(), model, config);

        let session = support::create_session(store.as_ref()).await;
        let events = bus.subscribe_events(&session).await.unwrap();

        let stop = CancellationToken::new();
        tokio::spawn(worker.clone().run(stop.clone().cancelled_owned()));
        Fleet { bus, store, worker, session, events, stop, _dir: dir }
    }

    /// Sends `text` to the session and waits for its terminal event (`done` or `error`).
    async fn send(&mut self, text: &str) -> ReplyEventKind {
        let message = self.message(text, None);
        self.send_message(&message).await
    }

    fn message(&self, text: &str, double_texting: Option<DoubleTexting>) -> UserMessage {
        UserMessage {
            v: schemas::ENVELOPE_VERSION,
            session_id: self.session.clone(),
            message_id: MessageId::generate(),
            text: text.into(),
            accepted_at: time::OffsetDateTime::now_utc(),
            double_texting,
            channel: None,
            cancel: None,
        }
    }

    /// Waits for the first delta of the reply to `message`.
    async fn first_delta_of(&mut self, message: &UserMessage) {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let event = self.events.next().await.expect("the event stream ended");
                if event.message_id == message.message_id && matches!(event.kind, ReplyEventKind::Delta { .. }) {
                    return;
                }
            }
        })
        .await
        .expect("no delta within 10 s")
    }

    async fn send_message(&mut self, message: &UserMessage) -> ReplyEventKind {
        self.bus.enqueue(message).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let event = self.events.next().await.expect("the event stream ended");
                if event.message_id == message.message_id && event.kind.is_terminal() {
                    return event.kind;
                }
            }
        })
        .await
        .expect("no terminal event within 10 s")
    }

    /// What the store holds as the recent history, read past the counter.
    async fn stored_recent(&self) -> Vec<StoredMessage> {
        self.store.inner.recent(&self.session, HISTORY_LIMIT).await.unwrap()
    }

    async fn history(&self) -> Vec<StoredMessage> {
        self.store.inner.history(&self.session).await.unwrap()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn done_text(kind: &ReplyEventKind) -> &str {
    match kind {
        ReplyEventKind::Done { text, .. } => text,
        other => panic!("expected a reply, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_messages_of_a_session_read_its_history_from_the_store_at_most_once() {
    let mut fleet = Fleet::start(1024 * 1024).await;

    for text in ["first question", "second question", "third question"] {
        let reply = fleet.send(text).await;

        assert!(done_text(&reply).contains(text), "the reply should echo {text:?}: {reply:?}");
        assert_eq!(fleet.worker.cached_history(&fleet.session), Some(fleet.stored_recent().await));
    }

    assert_eq!(fleet.store.recent_calls(), 1, "only the first message should read the history");
    let history = fleet.history().await;
    let shape: Vec<_> = history.iter().map(|m| (m.turn, m.role)).collect();
    assert_eq!(
        shape,
        [
            (1, Role::User),
            (1, Role::Assistant),
            (2, Role::User),
            (2, Role::Assistant),
            (3, Role::User),
            (3, Role::Assistant)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_message_is_cached_as_the_store_records_it() {
    let mut fleet = Fleet::start(1024 * 1024).await;
    fleet.send("hello").await;

    // The stand-in refuses a message carrying this directive, permanently.
    let refused = fleet.send("[mock:status=400] please refuse").await;

    assert!(matches!(refused, ReplyEventKind::Error { .. }), "expected an error, got {refused:?}");
    let cached = fleet.worker.cached_history(&fleet.session).expect("the session should stay cached");
    assert!(cached.last().unwrap().failure.is_some());
    assert_eq!(cached, fleet.stored_recent().await);
    fleet.send("and now?").await;
    assert_eq!(fleet.worker.cached_history(&fleet.session), Some(fleet.stored_recent().await));
    assert_eq!(fleet.store.recent_calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_already_recorded_by_an_earlier_delivery_drops_the_cached_history() {
    let mut fleet = Fleet::start(1024 * 1024).await;
    fleet.send("hello").await;
    assert!(fleet.worker.cached_history(&fleet.session).is_some());
    // As if an earlier delivery had recorded the message, on a worker that then went away.
    let message = UserMessage {
        v: schemas::ENVELOPE_VERSION,
        session_id: fleet.session.clone(),
        message_id: MessageId::generate(),
        text: "recorded before".into(),
        accepted_at: time::OffsetDateTime::now_utc(),
        double_texting: None,
        channel: None,
        cancel: None,
    };
    let earlier = StoredMessage {
        id: message.message_id.as_str().to_owned(),
        session_id: fleet.session.clone(),
        turn: 2,
        role: Role::User,
        text: message.text.clone(),
        created_at: message.accepted_at,
        reply_to: None,
        finish_reason: None,
        usage: None,
        failure: None,
        starts: 1,
    };
    fleet.store.inner.insert_message(&earlier).await.unwrap();

    fleet.send_message(&message).await;

    assert_eq!(fleet.worker.cached_history(&fleet.session), None);
    let reads = fleet.store.recent_calls();
    fleet.send("after that").await;
    assert!(fleet.store.recent_calls() > reads, "the next message should read the store again");
    assert_eq!(fleet.worker.cached_history(&fleet.session), Some(fleet.stored_recent().await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_taken_behind_the_cache_is_noticed_and_the_store_decides_the_turn() {
    let mut fleet = Fleet::start(1024 * 1024).await;
    fleet.send("hello").await;
    // Written by someone else: the cache still says the next turn is 2.
    let other = StoredMessage {
        id: MessageId::generate().as_str().to_owned(),
        session_id: fleet.session.clone(),
        turn: 2,
        role: Role::User,
        text: "written elsewhere".into(),
        created_at: time::OffsetDateTime::now_utc(),
        reply_to: None,
        finish_reason: None,
        usage: None,
        failure: Some(Failure { code: "test".into(), message: "not answered".into() }),
        starts: 1,
    };
    fleet.store.inner.insert_message(&other).await.unwrap();

    fleet.send("next").await;

    let turns: Vec<_> = fleet.history().await.iter().map(|m| (m.turn, m.role, m.text.clone())).collect();
    assert_eq!(turns[3], (3, Role::User, "next".to_owned()));
    assert_eq!(fleet.worker.cached_history(&fleet.session), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_cache_disabled_every_message_reads_the_store() {
    let mut fleet = Fleet::start(0).await;

    for text in ["one", "two", "three"] {
        fleet.send(text).await;
    }

    assert_eq!(fleet.worker.cached_history(&fleet.session), None);
    assert!(fleet.store.recent_calls() >= 3, "read {} times", fleet.store.recent_calls());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_reply_is_cached_as_the_store_records_it() {
    let slow = MockSettings {
        first_token_delay: Duration::from_millis(1),
        token_delay: Duration::from_millis(20),
        reply_tokens: 60,
        echo_chars: 48,
    };
    let mut fleet = Fleet::start_with_model(1024 * 1024, slow).await;
    let long = fleet.message("a long story please", Some(DoubleTexting::Interrupt));
    let short = fleet.message("no, a short one", Some(DoubleTexting::Interrupt));
    fleet.bus.enqueue(&long).await.unwrap();
    fleet.first_delta_of(&long).await;

    let answer = fleet.send_message(&short).await;

    assert!(done_text(&answer).contains("no, a short one"), "{answer:?}");
    let history = fleet.history().await;
    let cut = &history[1];
    assert_eq!(cut.reply_to.as_ref(), Some(&long.message_id));
    assert_eq!(cut.finish_reason, Some(FinishReason::interrupted()));
    assert!(!cut.text.is_empty() && cut.text.len() < history[3].text.len(), "{history:#?}");
    assert_eq!(fleet.worker.cached_history(&fleet.session), Some(fleet.stored_recent().await));
    assert_eq!(fleet.store.recent_calls(), 1, "the second message should take its history from the cache");
}
