//! The RabbitMQ bus (AMQP 0-9-1): user messages in one durable quorum queue per partition,
//! published with publisher confirms; reply events through a direct exchange to one exclusive
//! queue per listening gateway, bound per session while someone listens.
//!
//! Layout under the prefix `chatfleet` (see [`AmqpNames`]):
//! - direct exchange `chatfleet.in`, bound to quorum queue `chatfleet.in.<p>` with routing key
//!   `<p>`: the gateway computes the partition ([`PartitionCount::of`]) like on NATS, so no
//!   exchange plugin is needed;
//! - each partition queue has single active consumer on (at most one worker receives from it,
//!   whoever else is attached waits), a delivery limit, and dead-letters to the fanout exchange
//!   `chatfleet.dead`, bound to the quorum queue `chatfleet.dead` that operators inspect;
//! - direct exchange `chatfleet.out`, routing key = session id: reply events, which workers
//!   publish to the fanout exchange `chatfleet.out.all`, bound to it and to the stream queue
//!   `chatfleet.out.log` that keeps them for resuming (`replies.rs`);
//! - fanout exchange `chatfleet.members`: worker heartbeats (`ownership.rs`).
//!
//! Every process declares the whole layout when it connects (declaring is idempotent), so
//! gateways and workers may start in any order.

mod consume;
mod dead_letters;
mod deliveries;
mod events;
mod ownership;
mod replies;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use schemas::{Partition, PartitionCount, ReplyEvent, SessionId, UserMessage};
use tokio::sync::Mutex;
use tracing::Instrument;

use crate::{Bus, BusError, Deliveries, Enqueued, EventStream};
use schemas::redact_url;

pub use schemas::subjects::AmqpNames;
use schemas::subjects::SEQUENCE_HEADER;

/// How the RabbitMQ bus is set up.
#[derive(Debug, Clone)]
pub struct AmqpSettings {
    /// `amqp://user:password@host:5672/vhost`, or several nodes of a cluster separated by
    /// commas (credentials are never logged).
    pub url: String,
    pub names: AmqpNames,
    pub partitions: PartitionCount,
    /// How long an enqueue may wait for the publisher confirm before the gateway answers 503.
    pub publish_timeout: Duration,
    /// How many times a message is delivered before the broker dead-letters it.
    pub delivery_limit: u32,
    /// How many unacknowledged deliveries a partition may have out at once; bounds a worker's
    /// in-flight generations per partition.
    pub prefetch: u16,
    /// AMQP heartbeat, in seconds, unless the URL sets `heartbeat`: how soon a silent peer
    /// counts as gone, on both sides.
    pub heartbeat_secs: u16,
    /// Label of this client in the broker's connection list.
    pub client_name: String,
    /// Timing of partition ownership among workers.
    pub ownership: crate::OwnershipSettings,
    /// For `amqps://`: a CA to trust besides the system's, and a client certificate (mutual
    /// TLS). Read at every connection, so renewed files take effect at the next reconnect.
    pub tls: crate::TlsFiles,
    /// How long reply events stay in the stream queue `<prefix>.out.log` for clients to resume
    /// from, set when the queue is first declared (None: [`crate::DEFAULT_EVENT_RETENTION`]).
    pub event_retention: Option<Duration>,
}

impl AmqpSettings {
    pub fn new(url: impl Into<String>, partitions: PartitionCount) -> Self {
        Self {
            url: url.into(),
            names: AmqpNames::default(),
            partitions,
            publish_timeout: Duration::from_millis(1500),
            delivery_limit: 20,
            prefetch: 1000,
            heartbeat_secs: 5,
            client_name: "chatfleet".into(),
            ownership: crate::OwnershipSettings::default(),
            tls: crate::TlsFiles::default(),
            event_retention: None,
        }
    }
}

/// How long declaring the exchanges and queues on a new connection may take.
const LAYOUT_TIMEOUT: Duration = Duration::from_secs(10);

/// The RabbitMQ bus. Cloning shares the connection.
#[derive(Clone)]
pub struct AmqpBus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AmqpBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpBus").field("broker", &redact_url(&self.inner.settings.url)).finish()
    }
}

struct Inner {
    settings: AmqpSettings,
    /// The connection, replaced when it breaks.
    connection: Mutex<Option<Arc<Connection>>>,
    /// The channel user messages are published on, in confirm mode.
    publisher: Mutex<Option<Channel>>,
    /// The channel reply events are published on (no confirms: events are ephemeral).
    events_out: Mutex<Option<Channel>>,
    /// Routes reply events to this process's listeners.
    router: events::Router,
    /// Deliveries handed out and not yet settled, per partition (status and metrics).
    in_flight: Vec<AtomicU64>,
    /// Consuming channels of each partition not yet closed: a partition is released only once
    /// its channel has closed and so returned whatever was left unsettled.
    open_channels: std::sync::Mutex<std::collections::HashMap<Partition, usize>>,
    /// Woken whenever a partition channel closes.
    channel_closed: tokio::sync::Notify,
    /// Which of the listed nodes to try first: the last one that answered.
    preferred_node: AtomicUsize,
}

impl AmqpBus {
    /// Connects and declares the deployment's exchanges and queues. Fails with a clear error
    /// when the broker is unreachable or holds objects of the same names with other settings.
    pub async fn connect(settings: AmqpSettings) -> Result<Self, BusError> {
        let in_flight = settings.partitions.all().map(|_| AtomicU64::new(0)).collect();
        let bus = Self {
            inner: Arc::new(Inner {
                settings,
                connection: Mutex::new(None),
                publisher: Mutex::new(None),
                events_out: Mutex::new(None),
                router: events::Router::default(),
                in_flight,
                open_channels: Default::default(),
                channel_closed: tokio::sync::Notify::new(),
                preferred_node: AtomicUsize::new(0),
            }),
        };
        bus.connection().await?;
        Ok(bus)
    }

    pub fn settings(&self) -> &AmqpSettings {
        &self.inner.settings
    }

    fn shown_url(&self) -> String {
        redact_url(&self.inner.settings.url)
    }

    /// The live connection, connecting (and declaring the layout) if there is none.
    pub(crate) async fn connection(&self) -> Result<Arc<Connection>, BusError> {
        {
            let slot = self.inner.connection.lock().await;
            if let Some(connection) = slot.as_ref()
                && connection.status().connected()
            {
                return Ok(connection.clone());
            }
        }
        // Connect in a task of its own, which keeps what it opens: callers bound their waits (an
        // enqueue by the publish timeout), and a handshake cut short by one caller's deadline
        // after another would never reach a broker that answers slowly, as one does for a while
        // after it restarts.
        let bus = self.clone();
        tokio::spawn(async move {
            let mut slot = bus.inner.connection.lock().await;
            if let Some(connection) = slot.as_ref()
                && connection.status().connected()
            {
                return Ok(connection.clone());
            }
            *slot = None;
            let connection = Arc::new(bus.open_connection().await?);
            *slot = Some(connection.clone());
            Ok(connection)
        })
        .await
        .map_err(|e| BusError::Unavailable(format!("connecting to RabbitMQ failed: {e}")))?
    }

    /// Connects to the first listed node that answers, starting with the last one that did.
    async fn open_connection(&self) -> Result<Connection, BusError> {
        let urls: Vec<&str> = self.inner.settings.url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
        let first = self.inner.preferred_node.load(Ordering::Relaxed);
        let mut failure = BusError::Unsupported("--bus names no RabbitMQ node".into());
        for i in (0..urls.len()).map(|k| (first + k) % urls.len()) {
            match self.open_connection_to(urls[i]).await {
                Ok(connection) => {
                    self.inner.preferred_node.store(i, Ordering::Relaxed);
                    return Ok(connection);
                }
                Err(e @ BusError::Unsupported(_)) => return Err(e),
                Err(e) => failure = e,
            }
        }
        Err(failure)
    }

    async fn open_connection_to(&self, url: &str) -> Result<Connection, BusError> {
        let settings = &self.inner.settings;
        let shown = redact_url(url);
        let mut uri: lapin::uri::AMQPUri =
            url.parse().map_err(|e| BusError::Unsupported(format!("{shown} is not a valid amqp:// URL: {e}")))?;
        if uri.query.heartbeat.is_none() {
            uri.query.heartbeat = Some(settings.heartbeat_secs);
        }
        if uri.query.connection_timeout.is_none() {
            uri.query.connection_timeout = Some(2000);
        }
        if settings.tls.any() && uri.scheme != lapin::uri::AMQPScheme::AMQPS {
            return Err(BusError::Unsupported(format!(
                "{shown}: TLS files are set (--bus-tls-*), so the URL must be amqps://"
            )));
        }
        let tls = settings.tls.read_for_amqp()?;
        let runtime = lapin::runtime::default_runtime()
            .map_err(|e| BusError::Unavailable(format!("no runtime for RabbitMQ's connection: {e}")))?;
        let properties = ConnectionProperties::default().with_connection_name(settings.client_name.clone().into());
        let connect = Connection::connect_uri_with_config(uri, properties, tls, runtime);
        let connection = tokio::time::timeout(Duration::from_secs(3), connect)
            .await
            .map_err(|_| BusError::Unavailable(format!("RabbitMQ at {shown} did not answer within 3 s")))?
            .map_err(|e| connect_error(&e, &shown))?;
        // A broker that has just restarted can leave a declaration unanswered (seen with the
        // reply-event stream queue whose home node was still coming up): the connection is then
        // dropped and the next caller connects afresh, rather than every caller waiting forever.
        tokio::time::timeout(LAYOUT_TIMEOUT, self.declare_layout(&connection)).await.map_err(|_| {
            BusError::Unavailable(format!(
                "RabbitMQ at {shown} did not finish declaring the layout within {LAYOUT_TIMEOUT:?}"
            ))
        })??;
        tracing::info!(event = "bus_connected", broker = %shown, "connected to RabbitMQ");
        Ok(connection)
    }

    /// Declares every exchange and queue of the deployment; idempotent.
    async fn declare_layout(&self, connection: &Connection) -> Result<(), BusError> {
        let settings = &self.inner.settings;
        let names = &settings.names;
        let channel = connection.create_channel().await.map_err(unavailable("open a channel"))?;
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        for (exchange, kind) in [
            (names.input_exchange(), ExchangeKind::Direct),
            (names.events_exchange(), ExchangeKind::Direct),
            (names.dead_letters(), ExchangeKind::Fanout),
            (names.members_exchange(), ExchangeKind::Fanout),
        ] {
            channel
                .exchange_declare(exchange.as_str().into(), kind, durable, FieldTable::default())
                .await
                .map_err(layout_error(&exchange))?;
        }
        let queue_options = QueueDeclareOptions { durable: true, ..Default::default() };
        let dead = names.dead_letters();
        channel
            .queue_declare(dead.as_str().into(), queue_options, quorum(FieldTable::default()))
            .await
            .map_err(layout_error(&dead))?;
        channel
            .queue_bind(
                dead.as_str().into(),
                dead.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(layout_error(&dead))?;
        for partition in settings.partitions.all() {
            let queue = names.partition_queue(partition);
            channel
                .queue_declare(queue.as_str().into(), queue_options, self.partition_queue_arguments())
                .await
                .map_err(layout_error(&queue))?;
            channel
                .queue_bind(
                    queue.as_str().into(),
                    names.input_exchange().as_str().into(),
                    partition.to_string().as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(layout_error(&queue))?;
        }
        deliveries::declare(&channel, self).await?;
        replies::declare(self, connection, &channel).await?;
        let _ = channel.close(200, "layout declared".into()).await;
        Ok(())
    }

    fn partition_queue_arguments(&self) -> FieldTable {
        let settings = &self.inner.settings;
        let mut arguments = FieldTable::default();
        // At most one worker receives from a partition at a time, whatever the ownership
        // protocol believes: the broker's own guarantee under the leases.
        arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        arguments.insert("x-delivery-limit".into(), AMQPValue::LongInt(settings.delivery_limit as i32));
        arguments.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(settings.names.dead_letters().into()));
        quorum(arguments)
    }

    /// A channel kept in `slot`, opened (with `setup`) when there is none or it broke.
    async fn channel_in(&self, slot: &Mutex<Option<Channel>>, confirms: bool) -> Result<Channel, BusError> {
        let mut slot = slot.lock().await;
        if let Some(channel) = slot.as_ref()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        *slot = None;
        let connection = self.connection().await?;
        let channel = connection.create_channel().await.map_err(unavailable("open a channel"))?;
        if confirms {
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(unavailable("enable publisher confirms"))?;
        }
        *slot = Some(channel.clone());
        Ok(channel)
    }

    async fn forget_channel(slot: &Mutex<Option<Channel>>) {
        *slot.lock().await = None;
    }

    fn channel_opened(&self, partition: Partition) {
        let mut open = self.inner.open_channels.lock().unwrap_or_else(|e| e.into_inner());
        *open.entry(partition).or_default() += 1;
    }

    fn channel_closed(&self, partition: Partition) {
        let mut open = self.inner.open_channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&partition) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&partition);
            }
        }
        drop(open);
        self.inner.channel_closed.notify_waiters();
    }

    /// Waits, at most `limit`, until no channel of this process consumes the partition.
    pub(crate) async fn wait_channels_closed(&self, partition: Partition, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let closed = self.inner.channel_closed.notified();
            if !self.inner.open_channels.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&partition) {
                return true;
            }
            if tokio::time::timeout_at(deadline, closed).await.is_err() {
                return false;
            }
        }
    }

    pub(crate) fn in_flight(&self, partition: Partition) -> Option<&AtomicU64> {
        self.inner.in_flight.get(partition.get() as usize)
    }
}

/// A fresh channel consuming a new exclusive, server-named queue, without acknowledgements,
/// bound to `exchange` with `routing_key` unless that is None. The broker deletes the queue with
/// the channel's connection. Returns the channel, the queue's name and its consumer.
async fn listen_queue(
    bus: &AmqpBus,
    exchange: &str,
    routing_key: Option<&str>,
    what: &'static str,
) -> Result<(Channel, String, lapin::Consumer), BusError> {
    let connection = bus.connection().await?;
    let channel = connection.create_channel().await.map_err(unavailable("open a channel"))?;
    let exclusive = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
    let queue = channel.queue_declare("".into(), exclusive, FieldTable::default()).await.map_err(unavailable(what))?;
    let queue = queue.name().to_string();
    if let Some(key) = routing_key {
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(unavailable(what))?;
    }
    let no_ack = lapin::options::BasicConsumeOptions { no_ack: true, exclusive: true, ..Default::default() };
    let consumer = channel
        .basic_consume(queue.as_str().into(), "".into(), no_ack, FieldTable::default())
        .await
        .map_err(unavailable(what))?;
    Ok((channel, queue, consumer))
}

/// Seconds since the Unix epoch: AMQP's timestamp property.
fn unix_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs()
}

fn quorum(mut arguments: FieldTable) -> FieldTable {
    arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    arguments
}

/// One line saying why a connection failed. A refused login or a failed TLS handshake will
/// not fix itself, so they stop start-up at once rather than being retried on other nodes.
fn connect_error(error: &lapin::Error, shown: &str) -> BusError {
    let text = error.to_string();
    let lower = text.to_ascii_lowercase();
    if lower.contains("access_refused") || lower.contains("access-refused") || lower.contains("authentication") {
        BusError::Unsupported(format!(
            "RabbitMQ at {shown} refused the credentials ({text}); check the URL's user and password"
        ))
    } else if lower.contains("certificate") || lower.contains("unknownissuer") {
        // Only what a certificate check says: a handshake cut short by a node that is restarting
        // must stay `Unavailable`, so that the other listed nodes are tried.
        BusError::Unsupported(format!(
            "TLS with RabbitMQ at {shown} failed ({text}); check the CA (--bus-tls-ca) and the client certificate"
        ))
    } else {
        BusError::Unavailable(format!("cannot reach RabbitMQ at {shown}: {text}"))
    }
}

fn unavailable(what: &'static str) -> impl Fn(lapin::Error) -> BusError {
    move |e| BusError::Unavailable(format!("cannot {what}: {e}"))
}

fn layout_error(object: &str) -> impl Fn(lapin::Error) -> BusError + '_ {
    move |e| {
        let text = e.to_string();
        if text.contains("PRECONDITION_FAILED") || text.contains("inequivalent") {
            BusError::Unsupported(format!(
                "RabbitMQ already has {object} with other settings ({text}); chatfleet needs it as it declares it \
                 (a durable quorum queue with single active consumer, or a durable exchange): delete it or use \
                 another vhost"
            ))
        } else {
            BusError::Unavailable(format!("cannot declare {object}: {text}"))
        }
    }
}

fn sequence_number() -> u64 {
    // Random rather than counted: gateways share no counter, and 63 random bits never collide
    // among the messages in flight.
    rand::random::<u64>() >> 1
}

#[async_trait]
impl Bus for AmqpBus {
    fn partitions(&self) -> PartitionCount {
        self.inner.settings.partitions
    }

    async fn enqueue(&self, message: &UserMessage) -> Result<Enqueued, BusError> {
        let settings = &self.inner.settings;
        let partition = settings.partitions.of(&message.session_id);
        let payload = serde_json::to_vec(message).map_err(|e| BusError::Failed(e.to_string()))?;
        let mut headers = FieldTable::default();
        headers.insert(SEQUENCE_HEADER.into(), AMQPValue::LongLongInt(sequence_number() as i64));
        let span = tracing::info_span!("bus.publish", otel.kind = "producer", partition = partition.get());
        for (name, value) in span.in_scope(crate::trace_context::current) {
            headers.insert(name.as_str().into(), AMQPValue::LongString(value.as_str().into()));
        }
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(message.message_id.as_str().into())
            .with_headers(headers);
        let timeout = settings.publish_timeout;
        let result = tokio::time::timeout(timeout, async {
            let channel = self.channel_in(&self.inner.publisher, true).await?;
            channel
                .basic_publish(
                    settings.names.input_exchange().as_str().into(),
                    partition.to_string().as_str().into(),
                    BasicPublishOptions { mandatory: true, ..Default::default() },
                    &payload,
                    properties,
                )
                .await
                .map_err(unavailable("publish"))?
                .await
                .map_err(unavailable("get a publisher confirm"))
        })
        .instrument(span)
        .await
        .map_err(|_| BusError::Unavailable(format!("RabbitMQ did not confirm within {timeout:?}")))
        .and_then(|r| r);
        match result {
            // The broker has the message on disk in its partition queue.
            Ok(Confirmation::Ack(None)) => Ok(Enqueued { duplicate: false }),
            Ok(Confirmation::Ack(Some(returned))) => Err(BusError::Failed(format!(
                "RabbitMQ has no queue for partition {partition} (returned: {}); was it deleted?",
                returned.reply_text
            ))),
            Ok(Confirmation::Nack(_)) => {
                // A channel that published to a quorum queue while its leader was moving can go
                // on refusing every later message (seen after the node leading every queue
                // died: nacks for over a minute, on a connection to a healthy node); the next
                // message goes out on a fresh channel.
                Self::forget_channel(&self.inner.publisher).await;
                Err(BusError::Unavailable("RabbitMQ refused the message (nack)".into()))
            }
            Ok(Confirmation::NotRequested) => Err(BusError::Failed("publisher confirms are off".into())),
            Err(e) => {
                Self::forget_channel(&self.inner.publisher).await;
                Err(e)
            }
        }
    }

    async fn publish_event(&self, event: &ReplyEvent) -> Result<(), BusError> {
        let payload = serde_json::to_vec(event).map_err(|e| BusError::Failed(e.to_string()))?;
        let channel = self.channel_in(&self.inner.events_out, false).await?;
        let published = channel
            .basic_publish(
                self.inner.settings.names.events_fanout().as_str().into(),
                event.session_id.as_str().into(),
                BasicPublishOptions::default(),
                &payload,
                // The timestamp lets a resume leave out events older than the retention, which
                // the stream queue drops only a whole segment at a time.
                BasicProperties::default().with_content_type("application/json".into()).with_timestamp(unix_secs()),
            )
            .await;
        if let Err(e) = published {
            Self::forget_channel(&self.inner.events_out).await;
            return Err(BusError::Unavailable(format!("cannot publish a reply event: {e}")));
        }
        Ok(())
    }

    async fn subscribe_events(&self, session: &SessionId) -> Result<EventStream, BusError> {
        events::subscribe(self, session).await
    }

    async fn resume_events(&self, session: &SessionId) -> Result<crate::Resumed, BusError> {
        replies::resume(self, session).await
    }

    async fn consume(&self, partition: Partition) -> Result<Deliveries, BusError> {
        consume::deliveries(self, partition).await
    }

    async fn join(&self, worker_id: &schemas::WorkerId) -> Result<Box<dyn crate::Membership>, BusError> {
        ownership::join(self, worker_id).await
    }

    async fn ping(&self) -> Result<(), BusError> {
        let connection = self.connection().await?;
        if connection.status().connected() {
            Ok(())
        } else {
            Err(BusError::Unavailable(format!("not connected to RabbitMQ at {}", self.shown_url())))
        }
    }

    async fn status(&self) -> Result<crate::FleetStatus, BusError> {
        ownership::status(self).await
    }

    async fn publish_delivery(&self, delivery: &schemas::ChannelDelivery) -> Result<(), BusError> {
        deliveries::publish(self, delivery).await
    }

    async fn consume_deliveries(&self) -> Result<crate::PendingDeliveries, BusError> {
        deliveries::consume(self).await
    }

    async fn delivery_status(&self) -> Result<crate::DeliveryQueueStatus, BusError> {
        deliveries::status(self).await
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<crate::DeadLetter>, BusError> {
        dead_letters::list(self, limit).await
    }

    async fn replay_dead_letters(&self, which: &crate::Replay) -> Result<Vec<crate::DeadLetter>, BusError> {
        dead_letters::replay(self, which).await
    }

    fn describe(&self) -> String {
        format!(
            "RabbitMQ at {} (queues {}.*, {} partitions)",
            self.shown_url(),
            self.inner.settings.names.input_exchange(),
            self.inner.settings.partitions
        )
    }
}

/// Counts a delivery in flight until it is settled or dropped.
pub(crate) struct InFlight {
    bus: AmqpBus,
    partition: Partition,
}

impl InFlight {
    fn start(bus: &AmqpBus, partition: Partition) -> Self {
        if let Some(counter) = bus.in_flight(partition) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        Self { bus: bus.clone(), partition }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(counter) = self.bus.in_flight(self.partition) {
            counter.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_fit_in_a_signed_header() {
        for _ in 0..1000 {
            assert!(i64::try_from(sequence_number()).is_ok());
        }
    }
}
