//! The message bus between gateways and workers, behind one [`Bus`] trait: NATS JetStream
//! (`nats/`) and RabbitMQ (`amqp/`) for fleets, and an in-process bus (`memory/`) for
//! `chatfleet dev`. Each adapter
//! lives in its own folder with the same files (`mod.rs`: connect and the trait;
//! `consume.rs`: deliveries and acknowledgements), so a reader who knows one knows all.
//!
//! Two kinds of traffic cross the bus:
//! - user messages, durable and deduplicated by message id, routed to the partition of
//!   their session and consumed one partition at a time;
//! - reply events, ephemeral, on one subject per session, received by whichever gateway
//!   listens to that session at the moment;
//! - finished replies of channel messages (Slack, Teams, webhooks), durable, consumed by every
//!   gateway as competing consumers until one has delivered each (`deliveries.rs` of each
//!   adapter).
//!
//! Invariant: the bus knows nothing of HTTP, stores or models.

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use schemas::{ChannelDelivery, Partition, PartitionCount, ReplyEvent, SessionId, UserMessage, WorkerId};

pub mod amqp;
pub mod memory;
pub mod nats;
pub mod ownership;
pub mod retention;
pub mod security;
pub mod telemetry;
pub mod trace_context;

pub use amqp::{AmqpBus, AmqpNames, AmqpSettings};
pub use memory::MemoryBus;
pub use nats::{NatsBus, NatsSettings, Replicas};
pub use ownership::{OwnershipSettings, assign};
pub use retention::{DEFAULT_EVENT_RETENTION, Resumed};
pub use security::{NatsAuth, Secret, TlsFiles};

/// The dead-letter reason of a message whose bytes are not a user message.
pub const UNREADABLE: &str = "unreadable";

/// A bus error, typed by what the caller should do next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The broker is unreachable or did not answer in time: try again later.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    /// The broker cannot serve this deployment (too old, JetStream off, bad settings).
    #[error("{0}")]
    Unsupported(String),
    /// Anything else the broker refused.
    #[error("bus error: {0}")]
    Failed(String),
}

/// What the broker said about an enqueued message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    /// The broker had already accepted a message with the same id; nothing new was stored.
    pub duplicate: bool,
}

/// One delivery of a user message to a worker.
pub struct Delivery {
    /// The message, or why its bytes could not be read as one (such a message can only be
    /// rejected).
    pub message: Result<UserMessage, String>,
    /// How many times this message has been delivered, this time included. On NATS the count
    /// is per owner: a hand-over recreates the partition's consumer, and the new one counts from
    /// one again (the worker's store counts generation starts across owners).
    pub attempt: u64,
    /// The message's position in its partition: the same for every delivery of the same
    /// bus message, different for two messages even with the same message id.
    pub sequence: u64,
    /// Settles the delivery with the broker.
    pub acker: Box<dyn Acker>,
    /// The trace the message was enqueued in (W3C `traceparent`, `tracestate` from the broker
    /// message's headers, or kept beside the message by the in-process bus; empty when tracing
    /// is off).
    pub trace: trace_context::TraceHeaders,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery").field("message", &self.message).field("attempt", &self.attempt).finish()
    }
}

/// How a worker settles a delivery. Every delivery ends with exactly one of `ack`,
/// `retry_after` or `reject`; `in_progress` may be called any number of times before.
#[async_trait]
pub trait Acker: Send + Sync {
    /// Done: never deliver it again.
    async fn ack(&self) -> Result<(), BusError>;
    /// Not done: deliver it again after `delay`.
    async fn retry_after(&self, delay: Duration) -> Result<(), BusError>;
    /// Still working on it: do not redeliver yet.
    async fn in_progress(&self) -> Result<(), BusError>;
    /// It can never be processed: stop delivering it.
    async fn reject(&self) -> Result<(), BusError>;

    /// It can never be processed, for `reason` (a short label such as `unreadable` or
    /// `too_many_starts`): stop delivering it and keep it in the dead letters. A bus that can
    /// store the reason with the dead letter does; by default this is [`Acker::reject`].
    async fn dead_letter(&self, reason: &str) -> Result<(), BusError> {
        let _ = reason;
        self.reject().await
    }

    /// Not started, and this worker is handing the partition over: leave it for the next owner,
    /// who receives it before anything newer. By default it goes back at once; a bus that
    /// returns a consumer's unsettled messages in order when it lets the partition go does
    /// nothing here, since returning messages one by one could reorder them.
    async fn abandon(&self) -> Result<(), BusError> {
        self.retry_after(Duration::ZERO).await
    }
}

/// The deliveries of one partition, in the partition's order (redeliveries aside).
pub type Deliveries = BoxStream<'static, Delivery>;

/// The reply events of one session, from the moment of subscribing.
pub type EventStream = BoxStream<'static, ReplyEvent>;

/// A change in which partitions this worker owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnershipEvent {
    /// The partition is this worker's now: consume it.
    Acquired(Partition),
    /// Another worker should have it: stop taking its messages, finish or abandon what is in
    /// hand, then call [`Membership::release`].
    Revoked(Partition),
    /// Ownership ended without a hand-over (the lease could not be renewed in time): stop
    /// everything of this partition at once; its next owner answers what was in hand.
    Lost(Partition),
}

/// This worker's place in the deployment: which partitions it owns, and their hand-over.
#[async_trait]
pub trait Membership: Send {
    /// The next ownership change; None once the worker has left and released everything.
    async fn next(&mut self) -> Option<OwnershipEvent>;
    /// Hands a revoked partition over: its next owner may start at once.
    async fn release(&mut self, partition: Partition);
    /// Begins leaving: every owned partition is revoked, and after the last release `next`
    /// returns None.
    async fn leave(&mut self);
}

/// Who owns what, as the bus sees it now (`chatfleet status`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct FleetStatus {
    /// Workers that have reported recently.
    pub workers: Vec<WorkerStatus>,
    pub partitions: Vec<PartitionStatus>,
    /// User messages given up on and kept for operators (NATS' dead-letter stream, RabbitMQ's
    /// dead-letter queue); None where the bus keeps none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letters: Option<u64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkerStatus {
    pub worker: String,
    /// Seconds since its last heartbeat.
    pub seen_secs_ago: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PartitionStatus {
    pub partition: u32,
    /// The holder of a live lease, if any.
    pub owner: Option<String>,
    /// The lease's fencing token (revision).
    pub fence: Option<u64>,
    /// Messages waiting for delivery.
    pub pending: Option<u64>,
    /// Messages delivered and not yet acknowledged (being answered).
    pub in_flight: Option<u64>,
}

/// A user message given up on and kept for operators (`chatfleet dead-letters list`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeadLetter {
    /// What names it for a replay: the dead-letter stream's sequence on NATS, the message's
    /// `x-chatfleet-seq` header on RabbitMQ.
    pub id: String,
    /// Its session and message id, when its bytes are a readable user message.
    pub session_id: Option<String>,
    pub message_id: Option<String>,
    /// Why it was given up on (`unreadable`, `too_many_starts`, `delivery_limit`, `rejected`, ...).
    pub reason: String,
    /// When it was given up on, RFC 3339, where the broker says.
    pub at: Option<String>,
}

/// Which dead letters to replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replay {
    All,
    /// The dead letters with these ids ([`DeadLetter::id`]).
    Ids(Vec<String>),
}

impl Replay {
    pub fn includes(&self, id: &str) -> bool {
        match self {
            Self::All => true,
            Self::Ids(ids) => ids.iter().any(|i| i == id),
        }
    }
}

/// One finished channel reply handed to a gateway for delivery.
pub struct PendingDelivery {
    /// The delivery, or why its bytes could not be read as one (such a delivery can only be
    /// given up on).
    pub delivery: Result<ChannelDelivery, String>,
    /// Which attempt this is: 1 for the first, one more after each [`Acker::retry_after`]. A
    /// delivery whose gateway died mid-attempt is handed out again with the same count (on NATS
    /// one more).
    pub attempt: u64,
    /// Settles it: `ack` once delivered (or refused for good by the receiver), `retry_after`
    /// for the next attempt, `dead_letter` to keep it as undeliverable; `in_progress` while an
    /// attempt runs long.
    pub acker: Box<dyn Acker>,
}

impl std::fmt::Debug for PendingDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingDelivery").field("delivery", &self.delivery).field("attempt", &self.attempt).finish()
    }
}

/// Pending channel deliveries, shared by every gateway that consumes them.
pub type PendingDeliveries = BoxStream<'static, PendingDelivery>;

/// The queue of channel deliveries as the bus sees it now (`chatfleet status`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeliveryQueueStatus {
    /// Deliveries waiting for a gateway, being attempted, or waiting out a retry delay.
    pub pending: u64,
    /// Deliveries given up on after their last attempt, kept for operators.
    pub undeliverable: u64,
}

/// The bus.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// The number of partitions of this deployment.
    fn partitions(&self) -> PartitionCount;

    /// Stores a user message durably in its session's partition. Returns only once the
    /// broker has it; a message with an id seen before is not stored twice.
    async fn enqueue(&self, message: &UserMessage) -> Result<Enqueued, BusError>;

    /// Sends a reply event to whoever listens to its session now.
    async fn publish_event(&self, event: &ReplyEvent) -> Result<(), BusError>;

    /// Listens to a session's reply events. Every event published after this returns is
    /// delivered, in publication order.
    async fn subscribe_events(&self, session: &SessionId) -> Result<EventStream, BusError>;

    /// A session's reply events still within the retention window, then the live ones after
    /// them (see [`Resumed`]): what a client resuming a broken stream needs.
    async fn resume_events(&self, session: &SessionId) -> Result<Resumed, BusError> {
        let _ = session;
        Err(BusError::Unsupported(format!("{} keeps no reply events", self.describe())))
    }

    /// Starts consuming one partition. Call it only for a partition this worker owns.
    async fn consume(&self, partition: Partition) -> Result<Deliveries, BusError>;

    /// Joins the deployment's workers as `worker_id`; the partitions are shared among the
    /// members, each owned by exactly one at a time.
    async fn join(&self, worker_id: &WorkerId) -> Result<Box<dyn Membership>, BusError>;

    /// Succeeds while the broker is reachable.
    async fn ping(&self) -> Result<(), BusError>;

    /// Which worker owns which partition, and each partition's backlog.
    async fn status(&self) -> Result<FleetStatus, BusError>;

    /// One line for start-up logs (never credentials).
    fn describe(&self) -> String;

    /// Stores the finished reply of a channel message durably until a gateway has delivered it.
    /// Returns only once the broker has it. Repeats of the same reply ([`ChannelDelivery::key`])
    /// are dropped where the broker deduplicates (NATS, within its window); receivers dedupe on
    /// the key anyway.
    async fn publish_delivery(&self, delivery: &ChannelDelivery) -> Result<(), BusError> {
        let _ = delivery;
        Err(BusError::Unsupported(format!("{} has no channel deliveries", self.describe())))
    }

    /// Starts taking pending channel deliveries. Every gateway calls it: each delivery goes to
    /// one of them at a time, and one whose gateway went away unsettled goes to another.
    async fn consume_deliveries(&self) -> Result<PendingDeliveries, BusError> {
        Err(BusError::Unsupported(format!("{} has no channel deliveries", self.describe())))
    }

    /// How many channel deliveries are pending and how many were given up on.
    async fn delivery_status(&self) -> Result<DeliveryQueueStatus, BusError> {
        Err(BusError::Unsupported(format!("{} has no channel deliveries", self.describe())))
    }

    /// Up to `limit` dead letters, oldest first, leaving them where they are.
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BusError> {
        let _ = limit;
        Err(BusError::Unsupported(format!("{} keeps no dead letters", self.describe())))
    }

    /// Publishes the chosen dead letters' user messages to their partitions again, as new bus
    /// messages, and removes each from the dead letters once the broker has the new copy.
    /// Returns those replayed.
    async fn replay_dead_letters(&self, which: &Replay) -> Result<Vec<DeadLetter>, BusError> {
        let _ = which;
        Err(BusError::Unsupported(format!("{} keeps no dead letters", self.describe())))
    }
}
