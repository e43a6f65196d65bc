//! The behaviour every [`Bus`] promises, written once and run against every bus: the in-process
//! bus, NATS JetStream (a private nats-server per test) and RabbitMQ (a virtual host of its own
//! on the shared broker per test).
//!
//! What the suite holds each bus to, as `lib.rs` documents it:
//! - an enqueued message reaches the consumer of its session's partition, intact, on its first
//!   attempt, once (a repeated message id is stored once), and partitions keep enqueue order;
//! - settling: an acknowledged or rejected message is never delivered again, `retry_after`
//!   delivers the same message again as a later attempt no earlier than the delay, and what an
//!   owner leaves unsettled when it hands a partition over goes to the next owner first, as a
//!   later attempt;
//! - reply events reach every subscriber of their session, in order, from the moment of
//!   subscribing, and nobody else;
//! - membership: each partition is held by one member at a time, shared within a fair share
//!   plus one, and handed over completely when a member leaves;
//! - `ping` and `status` answer for the deployment.
//!
//! Workers are driven the way the worker crate drives them ([`Member`]): consume what is
//! acquired; on `Revoked`, stop consuming, drop the stream and every delivery not in the test's
//! hands, then release. Every member of a deployment records what it holds in one [`Ledger`],
//! which notes any moment two members held the same partition.
//!
//! Adding a bus: a variant of [`BusKind`], an arm in [`TestBus::start`] and a line in
//! [`for_every_bus!`].

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatfleet_bus::{
    AmqpBus, AmqpSettings, Bus, Delivery, EventStream, Membership, MemoryBus, NatsBus, NatsSettings, OwnershipEvent,
    OwnershipSettings,
};
use futures::StreamExt;
use futures::future::BoxFuture;
use schemas::{
    DoubleTexting, EventId, MessageId, Partition, PartitionCount, ReplyEvent, ReplyEventKind, SessionId, UserMessage,
};
use testkit::{NatsServer, RabbitVhost};
use time::macros::datetime;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Runs each named test, an `async fn(BusKind)`, once on every bus: one module per bus, one
/// test per behaviour (`memory::a_lone_member_acquires_every_partition`, ...).
macro_rules! for_every_bus {
    ($($test:ident),* $(,)?) => {
        for_every_bus!(@on memory, Memory, [$($test),*]);
        for_every_bus!(@on nats, Nats, [$($test),*]);
        for_every_bus!(@on amqp, Amqp, [$($test),*]);
    };
    (@on $module:ident, $kind:ident, [$($test:ident),*]) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::BusKind::$kind).await
                }
            )*
        }
    };
}

for_every_bus![
    an_enqueued_message_reaches_its_partition_intact_on_the_first_attempt_and_no_other,
    a_message_enqueued_twice_with_one_id_is_stored_once,
    messages_of_sessions_sharing_a_partition_come_out_in_enqueue_order,
    an_acknowledged_message_is_not_delivered_again_after_a_hand_over,
    retry_after_delivers_the_same_message_again_as_attempt_two_no_earlier_than_the_delay,
    a_rejected_message_is_never_delivered_again_even_after_a_hand_over,
    an_unsettled_delivery_goes_first_to_the_next_owner_after_a_hand_over,
    a_subscriber_receives_every_later_event_of_its_session_in_order,
    a_subscriber_receives_no_events_of_other_sessions,
    two_subscribers_of_one_session_each_receive_every_event,
    dropping_one_subscriber_does_not_disturb_another,
    a_lone_member_acquires_every_partition,
    a_second_member_gets_a_fair_share_and_no_partition_is_ever_held_twice,
    a_leaving_member_hands_everything_over_and_its_events_end,
    ping_succeeds_on_a_reachable_bus,
    status_lists_every_partition_and_names_its_owner,
    a_resume_on_a_new_handle_yields_the_sessions_earlier_events_then_later_ones_each_once,
    a_resume_keeps_nothing_of_other_sessions,
];

/// Retention by age needs a bus of its own with a short retention, so these run apart.
mod expiry {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_events_older_than_the_retention_are_no_longer_retained() {
        super::events_older_than_the_retention_are_no_longer_retained(super::BusKind::Memory).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nats_events_older_than_the_retention_are_no_longer_retained() {
        super::events_older_than_the_retention_are_no_longer_retained(super::BusKind::Nats).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn amqp_events_older_than_the_retention_are_no_longer_retained() {
        super::events_older_than_the_retention_are_no_longer_retained(super::BusKind::Amqp).await
    }
}

// ---------------------------------------------------------------------------------------------
// The buses.

/// Which bus a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BusKind {
    /// The in-process bus of `chatfleet dev`.
    Memory,
    /// NATS JetStream on a private nats-server.
    Nats,
    /// RabbitMQ, in a virtual host of the test's own.
    Amqp,
}

impl BusKind {
    /// Whether the bus itself drops a message whose id it has seen recently. RabbitMQ keeps no
    /// such window: there the worker's store check answers a repeated message id once.
    fn deduplicates(self) -> bool {
        !matches!(self, BusKind::Amqp)
    }

    /// Whether rejected messages are kept, and counted by `status`, for operators.
    fn keeps_dead_letters(self) -> bool {
        !matches!(self, BusKind::Memory)
    }

    /// Whether `Delivery::attempt` keeps counting when a partition changes owner. NATS recreates
    /// the partition's consumer on every hand-over, and JetStream counts per consumer.
    fn counts_attempts_across_owners(self) -> bool {
        !matches!(self, BusKind::Nats)
    }
}

/// Partitions of every deployment under test: enough for a split between two members to be
/// more than one each, few enough for hand-overs to be quick.
const PARTITIONS: u32 = 6;

/// Lease lifetime of the brokers' ownership protocol: short, so that heartbeats come often and
/// hand-overs are quick, yet long enough not to expire on a busy two-core machine.
const LEASE_TTL: Duration = Duration::from_secs(1);

/// How long anything the bus should do soon may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(5);

/// How long a test waits for something that must not happen.
const QUIET: Duration = Duration::from_millis(500);

/// How long a member takes to hand a revoked partition over.
const DRAIN: Duration = Duration::from_millis(100);

fn partitions() -> PartitionCount {
    PartitionCount::new(PARTITIONS).unwrap()
}

/// Makes a new bus handle on the deployment under test.
type Connect = Box<dyn Fn() -> BoxFuture<'static, Arc<dyn Bus>> + Send + Sync>;

/// One deployment of a bus, with the servers it needs kept alive for the test, and a ledger
/// of who holds which partition.
struct TestBus {
    kind: BusKind,
    connect: Connect,
    ledger: Arc<Ledger>,
    /// Servers and the like that must outlive every handle.
    _servers: Box<dyn Any + Send + Sync>,
}

impl TestBus {
    /// Starts a deployment of `kind` with [`PARTITIONS`] partitions.
    ///
    /// A new bus gets an arm here: start its servers, and hand [`TestBus::new`] the servers to
    /// keep alive and a closure that connects a new handle to them on each call.
    async fn start(kind: BusKind) -> TestBus {
        Self::start_retaining(kind, None).await
    }

    /// [`TestBus::start`] with reply events kept for `retention` (None: the default).
    async fn start_retaining(kind: BusKind, retention: Option<Duration>) -> TestBus {
        match kind {
            BusKind::Memory => {
                let bus = MemoryBus::with_event_retention(
                    partitions(),
                    retention.unwrap_or(chatfleet_bus::DEFAULT_EVENT_RETENTION),
                );
                // Gateways and workers of `chatfleet dev` share one bus, so every handle is it.
                TestBus::new(kind, (), move || {
                    let bus = bus.clone();
                    async move { Arc::new(bus) as Arc<dyn Bus> }
                })
            }
            BusKind::Nats => {
                let server = NatsServer::start().await;
                let mut settings = NatsSettings::new(server.url(), partitions());
                settings.ownership = OwnershipSettings::with_lease_ttl(LEASE_TTL);
                settings.event_retention = retention;
                // Each handle is a connection of its own, as each process has in a fleet.
                TestBus::new(kind, server, move || {
                    let settings = settings.clone();
                    async move {
                        let bus = NatsBus::connect(settings).await.unwrap_or_else(|e| panic!("connecting: {e}"));
                        Arc::new(bus) as Arc<dyn Bus>
                    }
                })
            }
            BusKind::Amqp => {
                let vhost = RabbitVhost::create().await;
                let mut settings = AmqpSettings::new(vhost.url(), partitions());
                settings.ownership = OwnershipSettings::with_lease_ttl(LEASE_TTL);
                settings.event_retention = retention;
                TestBus::new(kind, vhost, move || {
                    let settings = settings.clone();
                    async move {
                        let bus = AmqpBus::connect(settings).await.unwrap_or_else(|e| panic!("connecting: {e}"));
                        Arc::new(bus) as Arc<dyn Bus>
                    }
                })
            }
        }
    }

    fn new<F, Fut>(kind: BusKind, servers: impl Any + Send + Sync, connect: F) -> TestBus
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Arc<dyn Bus>> + Send + 'static,
    {
        TestBus {
            kind,
            connect: Box::new(move || Box::pin(connect())),
            ledger: Arc::new(Ledger::default()),
            _servers: Box::new(servers),
        }
    }

    /// Another handle on the same deployment, as a gateway or worker process would have.
    async fn connect(&self) -> Arc<dyn Bus> {
        let bus = (self.connect)().await;
        assert_eq!(bus.partitions(), partitions(), "{:?}", self.kind);
        bus
    }

    /// A worker joined as `id` on a handle of its own, driven by a [`Member`].
    async fn join(&self, id: &str) -> Member {
        Member::join(self.connect().await, id, self.ledger.clone()).await
    }

    fn assert_ownership_was_exclusive(&self) {
        self.ledger.assert_clean();
    }
}

// ---------------------------------------------------------------------------------------------
// Workers as the worker crate drives them.

/// Who holds which partition, across all members of a deployment, and every moment two held
/// the same one.
#[derive(Default)]
struct Ledger {
    state: Mutex<LedgerState>,
}

#[derive(Default)]
struct LedgerState {
    holders: BTreeMap<Partition, String>,
    problems: Vec<String>,
}

impl Ledger {
    fn state(&self) -> std::sync::MutexGuard<'_, LedgerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn acquired(&self, partition: Partition, member: &str) {
        let mut state = self.state();
        if let Some(holder) = state.holders.insert(partition, member.to_owned()) {
            state.problems.push(format!("{member} acquired partition {partition} while {holder} held it"));
        }
    }

    fn released(&self, partition: Partition, member: &str) {
        let mut state = self.state();
        match state.holders.get(&partition) {
            Some(holder) if holder == member => {
                state.holders.remove(&partition);
            }
            holder => {
                let problem = format!("{member} gave up partition {partition}, held by {holder:?}");
                state.problems.push(problem);
            }
        }
    }

    fn problem(&self, problem: String) {
        self.state().problems.push(problem);
    }

    fn assert_clean(&self) {
        let problems = &self.state().problems;
        assert!(problems.is_empty(), "ownership went wrong: {problems:#?}");
    }
}

/// What a member holds, as its driver last saw it.
#[derive(Debug, Clone, Default)]
struct Holdings {
    owned: BTreeSet<Partition>,
    /// Partitions whose ownership ended without a hand-over.
    lost: Vec<Partition>,
    /// `next` returned None.
    ended: bool,
}

/// Deliveries of a member's partitions, waiting for the test to take them.
#[derive(Default)]
struct Inbox {
    queue: Mutex<VecDeque<(Partition, Delivery)>>,
    arrived: Notify,
}

impl Inbox {
    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<(Partition, Delivery)>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, partition: Partition, delivery: Delivery) {
        self.queue().push_back((partition, delivery));
        self.arrived.notify_waiters();
    }

    /// Drops every delivery of `partition` the test has not taken, settling none of them.
    fn discard(&self, partition: Partition) {
        let discarded: VecDeque<_> = {
            let mut queue = self.queue();
            let (gone, kept) = queue.drain(..).partition(|(p, _)| *p == partition);
            *queue = kept;
            gone
        };
        drop(discarded);
    }

    /// The next delivery, if one arrives before `deadline`.
    async fn next(&self, deadline: Instant) -> Option<(Partition, Delivery)> {
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if let Some(next) = self.queue().pop_front() {
                return Some(next);
            }
            tokio::time::timeout_at(deadline, arrived).await.ok()?;
        }
    }
}

/// Aborts a partition's consumer when dropped, which drops its stream.
struct Consumer(JoinHandle<()>);

impl Drop for Consumer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A worker's membership driven as the worker drives it, with its deliveries in an inbox.
struct Member {
    id: String,
    inbox: Arc<Inbox>,
    holdings: watch::Receiver<Holdings>,
    leave: mpsc::UnboundedSender<()>,
    driver: JoinHandle<()>,
}

impl Drop for Member {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// What the driver does next.
enum Step {
    Event(Option<OwnershipEvent>),
    Leave,
}

impl Member {
    async fn join(bus: Arc<dyn Bus>, id: &str, ledger: Arc<Ledger>) -> Member {
        let worker = schemas::WorkerId::parse(id).expect("a valid worker id");
        let membership = bus.join(&worker).await.unwrap_or_else(|e| panic!("{id} cannot join: {e}"));
        let inbox = Arc::new(Inbox::default());
        let (holdings_tx, holdings) = watch::channel(Holdings::default());
        let (leave, leave_rx) = mpsc::unbounded_channel();
        let driver = tokio::spawn(drive(membership, bus, id.to_owned(), ledger, inbox.clone(), holdings_tx, leave_rx));
        Member { id: id.to_owned(), inbox, holdings, leave, driver }
    }

    fn holdings(&self) -> Holdings {
        self.holdings.borrow().clone()
    }

    /// Waits until what the member holds satisfies `done`; panics after [`DEADLINE`].
    async fn wait_until(&self, what: &str, done: impl FnMut(&Holdings) -> bool) -> Holdings {
        let mut holdings = self.holdings.clone();
        match tokio::time::timeout(DEADLINE, holdings.wait_for(done)).await {
            Ok(Ok(h)) => h.clone(),
            Ok(Err(_)) => panic!("{}: the driver stopped while waiting until {what}", self.id),
            Err(_) => panic!("{}: not {what} within {DEADLINE:?}; holds {:?}", self.id, self.holdings()),
        }
    }

    async fn wait_until_owning_everything(&self) {
        self.wait_until("owning every partition", |h| h.owned.len() == PARTITIONS as usize).await;
    }

    /// Asks the membership to leave; the driver keeps releasing what is revoked.
    fn leave(&self) {
        self.leave.send(()).unwrap_or_else(|_| panic!("{}: the driver is gone", self.id));
    }

    /// The next delivery of any of the member's partitions; panics after [`DEADLINE`].
    async fn delivery(&self, what: &str) -> (Partition, Delivery) {
        match self.inbox.next(Instant::now() + DEADLINE).await {
            Some(next) => next,
            None => panic!("{}: no delivery of {what} within {DEADLINE:?}; holds {:?}", self.id, self.holdings()),
        }
    }

    /// Asserts that nothing is delivered for [`QUIET`].
    async fn assert_nothing_delivered(&self, after: &str) {
        if let Some((partition, delivery)) = self.inbox.next(Instant::now() + QUIET).await {
            panic!("{}: unexpected delivery on partition {partition} after {after}: {delivery:?}", self.id);
        }
    }
}

/// The worker's loop, reduced to ownership: consume what is acquired; on `Revoked` stop
/// consuming, drop the stream and every delivery not yet taken, then release.
async fn drive(
    mut membership: Box<dyn Membership>,
    bus: Arc<dyn Bus>,
    me: String,
    ledger: Arc<Ledger>,
    inbox: Arc<Inbox>,
    holdings: watch::Sender<Holdings>,
    mut leave: mpsc::UnboundedReceiver<()>,
) {
    let mut consumers: HashMap<Partition, Consumer> = HashMap::new();
    loop {
        let step = tokio::select! {
            event = membership.next() => Step::Event(event),
            Some(()) = leave.recv() => Step::Leave,
        };
        match step {
            Step::Leave => membership.leave().await,
            Step::Event(Some(OwnershipEvent::Acquired(partition))) => {
                ledger.acquired(partition, &me);
                let consumer = tokio::spawn(consume(bus.clone(), partition, me.clone(), ledger.clone(), inbox.clone()));
                if consumers.insert(partition, Consumer(consumer)).is_some() {
                    ledger.problem(format!("{me} acquired partition {partition} twice"));
                }
                holdings.send_modify(|h| {
                    h.owned.insert(partition);
                });
            }
            Step::Event(Some(OwnershipEvent::Revoked(partition))) => {
                stop(consumers.remove(&partition)).await;
                // Finishing what is in hand takes a worker a while; a bus that lets the next
                // owner start before the release is caught holding the partition twice.
                tokio::time::sleep(DRAIN).await;
                inbox.discard(partition);
                ledger.released(partition, &me);
                holdings.send_modify(|h| {
                    h.owned.remove(&partition);
                });
                membership.release(partition).await;
            }
            Step::Event(Some(OwnershipEvent::Lost(partition))) => {
                stop(consumers.remove(&partition)).await;
                inbox.discard(partition);
                ledger.released(partition, &me);
                holdings.send_modify(|h| {
                    h.owned.remove(&partition);
                    h.lost.push(partition);
                });
            }
            Step::Event(None) => {
                if !consumers.is_empty() {
                    let left: Vec<_> = consumers.keys().collect();
                    ledger.problem(format!("{me}'s events ended while it still consumed {left:?}"));
                }
                holdings.send_modify(|h| h.ended = true);
                return;
            }
        }
    }
}

/// Stops a partition's consumer and waits until its stream is dropped.
async fn stop(consumer: Option<Consumer>) {
    if let Some(mut consumer) = consumer {
        consumer.0.abort();
        let _ = (&mut consumer.0).await;
    }
}

async fn consume(bus: Arc<dyn Bus>, partition: Partition, me: String, ledger: Arc<Ledger>, inbox: Arc<Inbox>) {
    let mut deliveries = match bus.consume(partition).await {
        Ok(deliveries) => deliveries,
        Err(e) => return ledger.problem(format!("{me} cannot consume partition {partition}: {e}")),
    };
    while let Some(delivery) = deliveries.next().await {
        inbox.push(partition, delivery);
    }
}

// ---------------------------------------------------------------------------------------------
// Messages and events.

/// A session of `partition`.
fn session_in(partition: Partition) -> SessionId {
    std::iter::repeat_with(SessionId::generate).find(|s| partitions().of(s) == partition).unwrap()
}

/// A user message with every field set, and text that JSON must escape.
fn message(session: &SessionId, text: &str) -> UserMessage {
    UserMessage {
        v: schemas::ENVELOPE_VERSION,
        session_id: session.clone(),
        message_id: MessageId::generate(),
        text: format!("{text}: \"héllo\" ✓\n\ttabs and \\ slashes"),
        accepted_at: datetime!(2026-03-04 05:06:07.890123 UTC),
        double_texting: Some(DoubleTexting::Interrupt),
        channel: None,
        cancel: None,
    }
}

async fn enqueue(bus: &dyn Bus, message: &UserMessage) {
    let enqueued = bus.enqueue(message).await.unwrap_or_else(|e| panic!("enqueueing {}: {e}", message.message_id));
    assert!(!enqueued.duplicate, "{} was reported a duplicate", message.message_id);
}

fn id_of(delivery: &Delivery) -> &MessageId {
    match &delivery.message {
        Ok(message) => &message.message_id,
        Err(e) => panic!("an unreadable delivery: {e}"),
    }
}

fn event(session: &SessionId, seq: u32) -> ReplyEvent {
    ReplyEvent {
        v: schemas::ENVELOPE_VERSION,
        event_id: EventId::new(1, 1, seq),
        session_id: session.clone(),
        message_id: MessageId::parse("m_conformance").unwrap(),
        kind: ReplyEventKind::Delta { index: seq, text: format!("chunk {seq} ✓") },
    }
}

async fn publish(bus: &dyn Bus, event: &ReplyEvent) {
    bus.publish_event(event).await.unwrap_or_else(|e| panic!("publishing {}: {e}", event.event_id));
}

/// The next `n` events of a stream; panics if they do not arrive within [`DEADLINE`].
async fn next_events(stream: &mut EventStream, n: usize) -> Vec<ReplyEvent> {
    let mut events = Vec::with_capacity(n);
    let deadline = Instant::now() + DEADLINE;
    while events.len() < n {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(event)) => events.push(event),
            Ok(None) => panic!("the event stream ended after {} of {n} events: {events:?}", events.len()),
            Err(_) => panic!("only {} of {n} events within {DEADLINE:?}: {events:?}", events.len()),
        }
    }
    events
}

async fn assert_no_more_events(stream: &mut EventStream) {
    if let Ok(Some(event)) = tokio::time::timeout(QUIET, stream.next()).await {
        panic!("an unexpected event: {event:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Delivery.

async fn an_enqueued_message_reaches_its_partition_intact_on_the_first_attempt_and_no_other(kind: BusKind) {
    let fleet = TestBus::start(kind).await;
    let gateway = fleet.connect().await;
    let worker = fleet.join("worker-a").await;
    worker.wait_until_owning_everything().await;
    let sent = message(&SessionId::generate(), "hello");

    enqueue(gateway.as_ref(), &sent).await;

    let (partition, delivery) = worker.delivery("the message").await;
    assert_eq!(partition, partitions().of(&sent.session_id), "delivered on the wrong partition");
    assert_eq!(delivery.message, Ok(sent), "the message changed on the way");
    assert_eq!(delivery.attempt, 1);
    worker.assert_nothing_delivered("the one message").await;
    fleet.assert_ownership_was_exclusive();
}

async fn a_message_enqueued_twice_with_one_id_is_stored_once(kind: BusKind) {
    let fleet = TestBus::start(kind).await;
    let gateway = fleet.connect().await;
    let worker = fleet.join("worker-a").await;
    worker.wait_until_owning_everything().await;
    let session = SessionId::generate();
    let first = message(&session, "first");
    let marker = message(&session, "marker");

    enqueue(gateway.as_ref(), &first).await;
    let again = gateway.enqueue(&first).await.unwrap();
    enqueue(gateway.as_ref(), &marker).await;

    if kind.deduplicates() {
        assert!(again.duplicate, "the second enqueue of one id was not reported a duplicate");
        let (_, one) = worker.delivery("the message").await;
        let (_, two) = worker.delivery("the marker").await;
        assert_eq!([id_of(&one), id_of(&two)], [&first.message_id, &marker.message_id]);
    } else {
        // Both copies arrive, as two bus messages the worker can tell apart from a redelivery.
        assert!(!again.duplicate, "a bus without deduplication cannot know a duplicate");
        let (_, one) = worker.delivery("the message").await;
        let (_, two) = worker.delivery("its copy").await;
        let (_, three) = worker.delivery("the marker").await;
        assert_eq!(
            [id_of(&one), id_of(&two), id_of(&three)],
            [&first.message_id, &first.message_id, &marker.message_id]
        );
        assert_ne!(one.sequence, two.sequence, "two enqueues are two bus messages");
    }
    worker.assert_nothing_delivered("the marker").await;
}

async fn messages_of_sessions_sharing_a_partition_come_out_in_enqueue_order(kind: BusKind) {
    let fleet = TestBus::start(kind).await;
    let gateway = fleet.connect().await;
    let shared = Partition::new(2);
    let sessions = [session_in(shared), session_in(shared), session_in(shared), session_in(Partition::new(5))];
    let sent: Vec<UserMessage> = (0..40).map(|i| message(&sessions[i % sessions.len()], &format!("#{i}"))).collect();

    // Half waits in the partitions before anyone consumes them, half arrives while consumed.
    for message in &sent[..20] {
        enqueue(gateway.as_ref(), message).await;
    }
    let worker = fleet.join("worker-a").await;
    worker.wait_until_owning_everything().await;
    for message in &sent[20..] {
        enqueue(gateway.as_ref(), message).await;
    }

    let mut received: BTreeMap<Partition, Vec<MessageId>> = BTreeMap::new();
    for i in 0..sent.len() {
        let (partition, delivery) = worker.delivery(&format!("message {i} of {}", sent.len())).await;
        assert_eq!(delivery.attempt, 1, "{delivery:?}");
        received.entry(partition).or_default().push(id_of(&delivery).clone());
        delivery.acker.ack().await.unwrap();
    }
    let mut expected: BTreeMap<Partition, Vec<MessageId>> = BTreeMap::new();
    for message in &sent {
        expected.entry(partitions().of(&message.session_id)).or_default().push(message.message_id.clone());
    }
    assert_eq!(received, expected);
    worker.assert_nothing_delivered("every message").await;
}

// ---------------------------------------------------------------------------------------------
// Settling.

/// Hands every partition of `from` over to a newly joined `to`: `to` joins, `from` leaves, and
/// this returns once `to` owns everything and `from`'s events have ended.
async fn hand_everything_over(fleet: &TestBus, from: &Member, to: &str) -> Member {
    let to = fleet.join(to).await;
    from.leave();
    to.wait_until_owning_everything().await;
    from.wait_until("done after leaving", |h| h.ended && h.owned.is_empty()).await;
    to
}

async fn an_acknowledged_message_is_not_delivered_again_after_a_hand_over(kind: BusKind) {
    let fleet = TestBus::start(kind).await;
    let gateway = fleet.connect().await;
    let first = fleet.join("worker-a").await;
    first.wait_until_owning_everything().await;
    let session = SessionId::generate();
    let answered = message(&session, "answered");
    enqueue(gateway.as_ref(), &answered).await;
    let (_, delivery) = first.delivery("the message").await;
    assert_eq!(id_of(&delivery), &answered.message_id);

    delivery.acker.in_progress().await.unwrap();
    delivery.acker.in_progress().await.unwrap();
    delivery.acker.ack().await.unwrap();
    drop(delivery);
    let next = hand_everything_over(&fleet, &first, "worker-b").await;
    let marker = message(&session, "marker");
    enqueue(gateway.as_ref(), &marker).await;

    // A redelivery of the acknowledged message would come before the later marker.
    let (_, delivery) = next.delivery("the marker").await;
    assert_eq!(id_of(&delivery), &marker.message_id, "the acknowledged message came again: {delivery:?}");
    next.assert_nothing_delivered("the marker").await;
    fleet.assert_ownership_was_exclusive();
}

async fn retry_after_delivers_the_same_message_again_as_attempt_two_no_earlier_than_the_delay(kind: BusKind) {
    const DELAY: Duration = Duration::from_millis(800);
    let fleet = TestBus::start(kind).await;
    let gateway = fleet.connect().await;
    let worker = fleet.join("worker-a").await;
    worker.wait_until_owning_everything().await;
    let sent = message(&SessionId::generate(), "again");
    enqueue(gateway.as_ref(), &sent).await;
    let (partition, first) = worker.delivery("the message").await;
    assert_eq!(first.attempt, 1);

    let asked = Instant::now();
    first.acker.retry_after(DELAY).await.unwrap();
    let (again_partition, again) = worker.delivery("the message again").await;
    let waited = asked.elapsed();

    assert!(waited >= DELAY - Duration::from_millis(20), "delivered again after {waited:?}, asked for {DELAY:?}");
    assert_eq!(again_partition, partition);
    assert_eq!(again.sequence, first.sequence, "a redelivery is the same bus message");
    assert_eq!(again.attempt, 2);
    assert_eq!(again.message, Ok(sent));
    again.acker.ack().await.unwrap();
    worker.assert_nothing_delivered("the acknowledged redelivery").await;
}

async fn a_rejected_message_is_never_delivered_again_even_after_a_hand_over(kind: BusKind) {
    let fleet = TestBus::start(kind).await;
    let gateway = fleet.connect().await;
    let first = fleet.join("worker-a").await;
    first.wait_until_owning_everything().await;
    let session = SessionId::generate();
    let poison = message(&session, "poison");
    enqueue(gateway.as_ref(), &poison).await;
    let (_, delivery) = first.delivery("the message").await;
    assert_eq!(id_of(&delivery), &poison.message_id);

    delivery.acker.reject().await.unwrap();
    drop(delivery);
    first.assert_nothing_delivered("the rejection").await;
    let next = hand_everything_over(&fleet, &first, "worker-b").await;
    let marker = message(&session, "marker");
    enqueue(gateway.as_ref(), &marker).await;

    // A redelivery of the rejected message would come before the later marker.
    let (_, delivery) = next.delivery("the marker").await;
    assert_eq!(id_of(&delivery), &marker.message_id, "the rejected message came again: {delivery:?}");
    next.assert_nothing_delivered("the marker").await;
    fleet.assert_ownership_was_exclusive();
    // Where the bus keeps rejected messages for operators, `status` counts them.
    let status = gateway.status().await.unwrap();
    if kind.keeps_dead_letters() {
        assert_eq!(status.dead_letters, Some(1), "the rejected message is in the dead-letter queue");
    } else {
        assert_eq!(status.dead_letters, None);
    }
}

async fn an_unsettled_delivery_goes_first_to_the_next_owner_after_a_hand_over(kind: BusKind) {
    let fleet = TestBus::start(kind).await;
    let gateway = fleet.connect().await;
    let first = fleet.join("worker-a").await;
    first.wait_until_owning_everything().await;
    let session = SessionId::generate();
    let sent: Vec<UserMessage> = (0..3).map(|i| message(&session, &format!("#{i}"))).collect();
    for message in &sent {
        enqueue(gateway.as_ref(), message).await;
    }
    let (_, in_hand) = first.delivery("the first message").await;
    assert_eq!(id_of(&in_hand), &sent[0].message_id);
    let sequence = in_hand.sequence;

    // The worker abandons it: no ack, no retry, no reject.
    drop(in_hand);
    let next = hand_everything_over(&fleet, &first, "worker-b").await;
    let later = message(&session, "after the hand-over");
    enqueue(gateway.as_ref(), &later).await;

    let mut received = Vec::new();
    for i in 0..4 {
        let (_, delivery) = next.delivery(&format!("message {i} of 4")).await;
        received.push(delivery);
    }
    let ids: Vec<&MessageId> = received.iter().map(id_of).collect();
    let expected: Vec<&MessageId> = sent.iter().chain([&later]).map(|m| &m.message_id).collect();
    assert_eq!(ids, expected, "order across the hand-over");
    assert_eq!(received[0].sequence, sequence, "the abandoned delivery is the same bus message");
    // `Delivery::attempt` counts every delivery of the message, whichever member consumed it,
    // except on NATS, whose count starts again with each owner's fresh consumer.
    if kind.counts_attempts_across_owners() {
        assert!(received[0].attempt >= 2, "the abandoned message came again as attempt {}", received[0].attempt);
    }
    next.assert_nothing_delivered("every message").await;
    fleet.assert_ownership_was_exclusive();
}

// ---------------------------------------------------------------------------------------------
// Reply events.

async fn a_subscriber_receives_every_later_event_of_its_session_in_order(kind: BusKind) {
    let fleet = TestBus::start(kind).await;
    let (gateway, worker) = (fleet.connect().await, fleet.connect().await);
    let session = SessionId::generate();
    let sent: Vec<ReplyEvent> = (0..50).map(|i| event(&session, i)).collect();

    let mut events = gateway.subscribe_events(&session).await.unwrap();
    for event in &sent {
        publish(worker.as_ref(), event).await;
    }

    assert_eq!(next_events(&mut events, sent.len()).await, sent);
    assert_no_more_events(&mut events).await;
}

async fn a_subscriber_receives_no_events_of_other_sessions(kind: BusKind) {
    let fleet = TestBus::start(kind).await;
    let (gateway, worker) = (fleet.connect().await, fleet.connect().await);
    let (mine, other) = (SessionId::generate(), SessionId::generate());
    let mut events = gateway.subscribe_events(&mine).await.unwrap();
    let _other_listener = gateway.subscribe_events(&other).await.unwrap();

    for i in 0..10 {
        publish(worker.as_ref(), &event(&other, i)).await;
        publish(worker.as_ref(), &event(&mine, i)).await;
    }
    publish(worker.as_ref(), &event(&other, 10)).await;

    let received = next_events(&mut events, 10).await;
    assert_eq!(received, (0..10).map(|i| event(&mine, i)).collect::<Vec<_>>());
    assert_no_more_events(&mut events).await;
}

async fn two_subscribers_of_one_session_each_receive_every_event(kind: BusKind) {
    let fleet = TestBus::start(kind).await;
    let (one_gateway, another_gateway, worker) = (fleet.connect().await, fleet.connect().await, fleet.connect().await);
    let session = SessionId::generate();
    let sent: Vec<ReplyEvent> = (0..20).map(|i| event(&session, i)).collect();

    let mut first = one_gateway.subscribe_events(&session).await.unwrap();
    let mut second = another_gateway.subscribe_events(&session).await.unwrap();
    let mut third = one_gateway.subscribe_events(&session).await.unwrap();
    for event in &sent {
        publish(worker.as_ref(), event).await;
    }

    assert_eq!(next_events(&mut first, sent.len()).await, sent, "the first subscriber");
    assert_eq!(next_events(&mut second, sent.len()).await, sent, "a subscriber on another handle");
    assert_eq!(next_events(&mut third, sent.len()).await, sent, "a second subscriber on one handle");
}

async fn dropping_one_subscriber_does_not_disturb_another(kind: BusKind) {
    let fleet = TestBus::start(kind).await;
    let (gateway, worker) = (fleet.connect().await, fleet.connect().await);
    let session = SessionId::generate();
    let sent: Vec<ReplyEvent> = (0..20).map(|i| event(&session, i)).collect();
    let mut staying = gateway.subscribe_events(&session).await.unwrap();
    let mut going = gateway.subscribe_events(&session).await.unwrap();
    for event in &sent[..10] {
        publish(worker.as_ref(), event).await;
    }
    assert_eq!(next_events(&mut going, 10).await, sent[..10]);

    drop(going);
    for event in &sent[10..] {
        publish(worker.as_ref(), event).await;
    }

    assert_eq!(next_events(&mut staying, sent.len()).await, sent);
    assert_no_more_events(&mut staying).await;
}

// ---------------------------------------------------------------------------------------------
// Membership.

async fn a_lone_member_acquires_every_partition(kind: BusKind) {
    let fleet = TestBus::start(kind).await;

    let worker = fleet.join("worker-a").await;

    worker.wait_until_owning_everything().await;
    let holdings = worker.holdings();
    assert_eq!(holdings.owned, partitions().all().collect());
    assert!(holdings.lost.is_empty() && !holdings.ended, "{holdings:?}");
    fleet.assert_ownership_was_exclusive();
}

async fn a_second_member_gets_a_fair_share_and_no_partition_is_ever_held_twice(kind: BusKind) {
    let fleet = TestBus::start(kind).await;
    let first = fleet.join("worker-a").await;
    first.wait_until_owning_everything().await;

    let second = fleet.join("worker-b").await;

    let at_most = PARTITIONS as usize / 2 + 1;
    let deadline = Instant::now() + DEADLINE;
    let (a, b) = loop {
        let (a, b) = (first.holdings().owned, second.holdings().owned);
        if !b.is_empty() && a.len() <= at_most && a.len() + b.len() == PARTITIONS as usize {
            break (a, b);
        }
        assert!(Instant::now() < deadline, "no fair split within {DEADLINE:?}: worker-a {a:?}, worker-b {b:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(b.len() <= at_most, "worker-b holds {b:?}");
    assert!(a.is_disjoint(&b), "worker-a {a:?}, worker-b {b:?}");
    assert!(first.holdings().lost.is_empty() && second.holdings().lost.is_empty(), "a partition was lost");
    fleet.assert_ownership_was_exclusive();
}

async fn a_leaving_member_hands_everything_over_and_its_events_end(kind: BusKind) {
    let fleet = TestBus::start(kind).await;
    let first = fleet.join("worker-a").await;
    first.wait_until_owning_everything().await;
    let second = fleet.join("worker-b").await;
    second.wait_until("owning a share", |h| !h.owned.is_empty()).await;

    first.leave();

    second.wait_until_owning_everything().await;
    let holdings = first.wait_until("done after leaving", |h| h.ended).await;
    assert!(holdings.owned.is_empty(), "worker-a's events ended while it held {:?}", holdings.owned);
    assert!(holdings.lost.is_empty() && second.holdings().lost.is_empty(), "a partition was lost, not handed over");
    fleet.assert_ownership_was_exclusive();
}

// ---------------------------------------------------------------------------------------------
// Health and status.

async fn ping_succeeds_on_a_reachable_bus(kind: BusKind) {
    let fleet = TestBus::start(kind).await;
    let bus = fleet.connect().await;

    let result = bus.ping().await;

    assert_eq!(result, Ok(()));
}

async fn status_lists_every_partition_and_names_its_owner(kind: BusKind) {
    let fleet = TestBus::start(kind).await;
    let cli = fleet.connect().await;
    let before = cli.status().await.unwrap();
    let listed: Vec<u32> = before.partitions.iter().map(|p| p.partition).collect();
    assert_eq!(listed, (0..PARTITIONS).collect::<Vec<_>>(), "one entry per partition, in order");

    let worker = fleet.join("worker-a").await;
    worker.wait_until_owning_everything().await;

    // A broker may learn of the owner only with its next heartbeat.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let status = cli.status().await.unwrap();
        let listed: Vec<u32> = status.partitions.iter().map(|p| p.partition).collect();
        assert_eq!(listed, (0..PARTITIONS).collect::<Vec<_>>(), "one entry per partition, in order");
        let owned = status.partitions.iter().all(|p| p.owner.as_deref() == Some("worker-a"));
        let listed = status.workers.iter().any(|w| w.worker == "worker-a");
        if owned && listed {
            break;
        }
        assert!(Instant::now() < deadline, "status does not name worker-a within {DEADLINE:?}: {status:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Retained reply events (resuming a stream).

/// A resume of `session` once `n` events are retained (a broker stores an event a moment after
/// it was published); panics if that takes longer than [`DEADLINE`].
async fn resume_once_retained(bus: &dyn Bus, session: &SessionId, n: usize) -> chatfleet_bus::Resumed {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let resumed = bus.resume_events(session).await.unwrap_or_else(|e| panic!("resuming: {e}"));
        if resumed.retained.len() >= n || Instant::now() > deadline {
            return resumed;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn a_resume_on_a_new_handle_yields_the_sessions_earlier_events_then_later_ones_each_once(kind: BusKind) {
    let fleet = TestBus::start(kind).await;
    let worker = fleet.connect().await;
    let session = SessionId::generate();
    let earlier: Vec<ReplyEvent> = (0..20).map(|i| event(&session, i)).collect();
    let later: Vec<ReplyEvent> = (20..30).map(|i| event(&session, i)).collect();
    for event in &earlier {
        publish(worker.as_ref(), event).await;
    }

    // A gateway that was not there when the events went out, as after a restart.
    let gateway = fleet.connect().await;
    let resumed = resume_once_retained(gateway.as_ref(), &session, earlier.len()).await;
    for event in &later {
        publish(worker.as_ref(), event).await;
    }

    assert_eq!(resumed.retained, earlier, "the retained events");
    let mut live = resumed.live;
    assert_eq!(next_events(&mut live, later.len()).await, later, "the live events after them");
    assert_no_more_events(&mut live).await;
}

async fn a_resume_keeps_nothing_of_other_sessions(kind: BusKind) {
    let fleet = TestBus::start(kind).await;
    let (gateway, worker) = (fleet.connect().await, fleet.connect().await);
    let (mine, other) = (SessionId::generate(), SessionId::generate());
    for i in 0..5 {
        publish(worker.as_ref(), &event(&other, i)).await;
        publish(worker.as_ref(), &event(&mine, i)).await;
    }

    let resumed = resume_once_retained(gateway.as_ref(), &mine, 5).await;
    publish(worker.as_ref(), &event(&other, 5)).await;

    assert_eq!(resumed.retained, (0..5).map(|i| event(&mine, i)).collect::<Vec<_>>());
    // An event still on its way when the resume ran may come live as well (see `Resumed`);
    // readers skip ids they have passed. Nothing else may come: no event of the other session.
    let last_retained = resumed.retained.last().map(|e| e.event_id);
    let mut live = resumed.live;
    while let Ok(Some(event)) = tokio::time::timeout(QUIET, live.next()).await {
        let repeat = event.session_id == mine && Some(event.event_id) <= last_retained;
        assert!(repeat, "an unexpected event: {event:?}");
    }
}

async fn events_older_than_the_retention_are_no_longer_retained(kind: BusKind) {
    let retention = Duration::from_secs(2);
    let fleet = TestBus::start_retaining(kind, Some(retention)).await;
    let (gateway, worker) = (fleet.connect().await, fleet.connect().await);
    let session = SessionId::generate();
    publish(worker.as_ref(), &event(&session, 0)).await;
    let before = resume_once_retained(gateway.as_ref(), &session, 1).await;

    tokio::time::sleep(retention + Duration::from_millis(1500)).await;
    publish(worker.as_ref(), &event(&session, 1)).await;
    let after = resume_once_retained(gateway.as_ref(), &session, 1).await;

    assert_eq!(before.retained, [event(&session, 0)], "kept within the retention");
    assert_eq!(after.retained, [event(&session, 1)], "only the event within the retention");
}
