//! A panic while a message is handled (a bug: here, the model's client panics) is caught and
//! the message handled again in place, after a pause: it is answered once, the session's later
//! messages wait for it, and the other sessions of the partition go on. A message that panics
//! every time is given up on by the store's count of generation starts (dead letters, with an
//! error event for the client). Before, the panic killed the session's task: its message was
//! never settled and the session's queue never emptied, so the partition could never be handed
//! over, its lease was renewed for good, and the session never got another reply.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bus::{Bus, BusError, Deliveries, EventStream, Membership, MemoryBus};
use chatfleet_worker::{Worker, WorkerConfig};
use futures::StreamExt;
use llm::mock_reply::MockSettings;
use llm::stand_in::StandInModel;
use llm::{ChatModel, ChatRequest, ChunkStream, LlmError};
use schemas::{MessageId, Partition, PartitionCount, ReplyEvent, ReplyEventKind, SessionId, UserMessage, WorkerId};
use store::{EmbeddedStore, Role, Store};
use tokio_util::sync::CancellationToken;

/// A message the model panics on the first time it is asked to answer it.
const PANICS_ONCE: &str = "a message the model panics on once";
/// A message the model panics on every time.
const PANICS_ALWAYS: &str = "a message the model panics on every time";

/// The stand-in model, except for the messages above.
struct PanickingModel {
    inner: StandInModel,
    panicked_once: AtomicBool,
}

#[async_trait]
impl ChatModel for PanickingModel {
    async fn stream(&self, request: ChatRequest) -> Result<ChunkStream, LlmError> {
        let last = request.messages.last().map(|m| m.content.as_str()).unwrap_or_default();
        if last == PANICS_ALWAYS || (last == PANICS_ONCE && !self.panicked_once.swap(true, Ordering::SeqCst)) {
            panic!("the model's client met a bug on {last:?}");
        }
        self.inner.stream(request).await
    }

    fn describe(&self) -> String {
        "a stand-in model that panics on some messages".into()
    }
}

struct Fixture {
    bus: Arc<MemoryBus>,
    store: Arc<EmbeddedStore>,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

/// A worker on one partition (every session shares it), with a model that panics.
async fn fixture(max_generation_starts: u32) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("store.redb")).unwrap());
    let bus = Arc::new(MemoryBus::new(PartitionCount::new(1).unwrap()));
    let model = Arc::new(PanickingModel {
        inner: StandInModel::new(MockSettings::default()),
        panicked_once: AtomicBool::new(false),
    });
    let config = WorkerConfig { max_generation_starts, ..WorkerConfig::default() };
    let worker = Worker::new(bus.clone(), store.clone(), model, config);
    let stop = CancellationToken::new();
    tokio::spawn(worker.run(stop.clone().cancelled_owned()));
    Fixture { bus, store, stop, _dir: dir }
}

/// The terminal event (`done` or `error`) of each of `messages`, in the order they come; fails
/// after 20 s.
async fn terminal_events(events: &mut EventStream, messages: &[&UserMessage]) -> Vec<(MessageId, ReplyEventKind)> {
    let mut terminal = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while terminal.len() < messages.len() {
        let event = tokio::time::timeout_at(deadline, events.next())
            .await
            .unwrap_or_else(|_| {
                panic!("{} of {} replies ended within 20 s: {terminal:?}", terminal.len(), messages.len())
            })
            .expect("the event stream ended");
        if matches!(event.kind, ReplyEventKind::Done { .. } | ReplyEventKind::Error { .. }) {
            terminal.push((event.message_id, event.kind));
        }
    }
    terminal
}

/// The session's stored history as (role, text) pairs.
async fn history(store: &EmbeddedStore, session: &SessionId) -> Vec<(Role, String)> {
    store.history(session).await.unwrap().into_iter().map(|m| (m.role, m.text)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_handling_panics_once_is_answered_once_in_order_and_the_partition_goes_on() {
    let f = fixture(WorkerConfig::default().max_generation_starts).await;
    let (a, b) = (support::create_session(f.store.as_ref()).await, support::create_session(f.store.as_ref()).await);
    let mut a_events = f.bus.subscribe_events(&a).await.unwrap();
    let mut b_events = f.bus.subscribe_events(&b).await.unwrap();
    let (first, second) = (support::message(&a, PANICS_ONCE), support::message(&a, "and then this one"));
    let other = support::message(&b, "another session of the same partition");
    for m in [&first, &second, &other] {
        f.bus.enqueue(m).await.unwrap();
    }

    let a_terminal = terminal_events(&mut a_events, &[&first, &second]).await;
    let b_terminal = terminal_events(&mut b_events, &[&other]).await;
    let done = |id: &MessageId| (id.clone(), "done");
    let kinds: Vec<(MessageId, &str)> = a_terminal
        .iter()
        .chain(&b_terminal)
        .map(|(id, kind)| (id.clone(), if matches!(kind, ReplyEventKind::Done { .. }) { "done" } else { "error" }))
        .collect();
    assert_eq!(kinds, [done(&first.message_id), done(&second.message_id), done(&other.message_id)]);

    let a_history = history(&f.store, &a).await;
    let roles: Vec<Role> = a_history.iter().map(|(role, _)| *role).collect();
    assert_eq!(roles, [Role::User, Role::Assistant, Role::User, Role::Assistant], "{a_history:?}");
    assert_eq!((a_history[0].1.as_str(), a_history[2].1.as_str()), (PANICS_ONCE, "and then this one"));
    assert_eq!(history(&f.store, &b).await.len(), 2);
    f.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_handling_always_panics_ends_in_a_dead_letter_and_the_session_goes_on() {
    let f = fixture(2).await;
    let (a, b) = (support::create_session(f.store.as_ref()).await, support::create_session(f.store.as_ref()).await);
    let mut a_events = f.bus.subscribe_events(&a).await.unwrap();
    let mut b_events = f.bus.subscribe_events(&b).await.unwrap();
    let (poison, next) = (support::message(&a, PANICS_ALWAYS), support::message(&a, "after the poison"));
    let other = support::message(&b, "another session of the same partition");
    for m in [&poison, &next, &other] {
        f.bus.enqueue(m).await.unwrap();
    }

    let a_terminal = terminal_events(&mut a_events, &[&poison, &next]).await;
    assert_eq!(a_terminal[0].0, poison.message_id);
    assert!(
        matches!(&a_terminal[0].1, ReplyEventKind::Error { code, .. } if code == "message_dead_lettered"),
        "the poison message ends in a dead-letter error, got {:?}",
        a_terminal[0].1
    );
    assert_eq!(a_terminal[1].0, next.message_id);
    assert!(matches!(a_terminal[1].1, ReplyEventKind::Done { .. }), "got {:?}", a_terminal[1].1);
    let b_terminal = terminal_events(&mut b_events, &[&other]).await;
    assert!(matches!(b_terminal[0].1, ReplyEventKind::Done { .. }), "got {:?}", b_terminal[0].1);
    assert!(f.store.outcome(&a, &poison.message_id).await.unwrap().is_none(), "no outcome stored for the poison");
    f.stop.cancel();
}

/// The in-process bus, except that the first delivery stream it opens panics when first polled:
/// the partition runner reading it panics.
struct FirstStreamPanics {
    inner: MemoryBus,
    opened: AtomicBool,
}

#[async_trait]
impl Bus for FirstStreamPanics {
    fn partitions(&self) -> PartitionCount {
        self.inner.partitions()
    }

    async fn enqueue(&self, message: &UserMessage) -> Result<bus::Enqueued, BusError> {
        self.inner.enqueue(message).await
    }

    async fn publish_event(&self, event: &ReplyEvent) -> Result<(), BusError> {
        self.inner.publish_event(event).await
    }

    async fn subscribe_events(&self, session: &SessionId) -> Result<EventStream, BusError> {
        self.inner.subscribe_events(session).await
    }

    async fn consume(&self, partition: Partition) -> Result<Deliveries, BusError> {
        if self.opened.swap(true, Ordering::SeqCst) {
            return self.inner.consume(partition).await;
        }
        Ok(futures::stream::once(async { panic!("a delivery stream met a bug") }).boxed())
    }

    async fn join(&self, worker_id: &WorkerId) -> Result<Box<dyn Membership>, BusError> {
        self.inner.join(worker_id).await
    }

    async fn ping(&self) -> Result<(), BusError> {
        self.inner.ping().await
    }

    async fn status(&self) -> Result<bus::FleetStatus, BusError> {
        self.inner.status().await
    }

    fn describe(&self) -> String {
        "an in-process bus whose first delivery stream panics".into()
    }
}

/// A partition runner that panics hands its partition over; the partition is taken again and
/// its messages answered. Before, the worker ignored the runner's end and kept the partition,
/// unconsumed, for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_whose_runner_panics_is_handed_over_and_consumed_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("store.redb")).unwrap());
    let bus = Arc::new(FirstStreamPanics {
        inner: MemoryBus::new(PartitionCount::new(1).unwrap()),
        opened: AtomicBool::new(false),
    });
    let model = Arc::new(StandInModel::new(MockSettings::default()));
    let worker = Worker::new(bus.clone(), store.clone(), model, WorkerConfig::default());
    let stop = CancellationToken::new();
    tokio::spawn(worker.run(stop.clone().cancelled_owned()));
    let session = support::create_session(store.as_ref()).await;
    let mut events = bus.subscribe_events(&session).await.unwrap();
    let hello = support::message(&session, "hello after a runner's panic");
    bus.enqueue(&hello).await.unwrap();

    let terminal = terminal_events(&mut events, &[&hello]).await;
    assert!(matches!(terminal[0].1, ReplyEventKind::Done { .. }), "got {:?}", terminal[0].1);
    assert!(bus.opened.load(Ordering::SeqCst), "the first delivery stream was opened, and panicked");
    stop.cancel();
}
