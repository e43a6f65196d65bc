//! The NATS JetStream bus: user messages in a durable work-queue stream with one subject and
//! one pinned pull consumer per partition, deduplicated by `Nats-Msg-Id`; reply events on core
//! NATS subjects, one per session, kept for resuming in the stream `<PREFIX>_OUT` (`replies.rs`).

mod consume;
mod dead_letters;
mod deliveries;
pub(crate) mod ownership;
mod replicas;
mod replies;

use schemas::redact_url;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_trait::async_trait;
use futures::StreamExt;
use schemas::subjects::Names;
use schemas::{Partition, PartitionCount, ReplyEvent, SessionId, UserMessage};
use tracing::Instrument;

use crate::{Bus, BusError, Deliveries, Enqueued, EventStream};

pub use replicas::{MAX_REPLICAS, PRODUCTION_REPLICAS, Replicas};

/// The oldest nats-server that chatfleet runs on: pinned-client priority groups, which the
/// partition consumers rely on, arrived in 2.11, and older servers silently ignore them.
pub const MIN_SERVER_VERSION: semver::Version = semver::Version::new(2, 11, 0);

/// How long creating or changing a stream may take: a cluster places every replica first.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long start-up goes on trying a layout whose requests time out (see [`NatsBus::connect`]).
const LAYOUT_DEADLINE: Duration = Duration::from_secs(60);

/// Whether a layout step failed because a JetStream request got no answer in time. The
/// client's errors differ in type from one API to the next (streams, consumers, buckets), and
/// the layout steps keep only their text; each says a timeout the same way.
fn timed_out(error: &BusError) -> bool {
    error.to_string().contains("timed out")
}

/// How the NATS bus is set up.
#[derive(Debug, Clone)]
pub struct NatsSettings {
    /// `nats://host:port`, or several of a cluster's servers separated by commas (credentials
    /// in the URL are allowed and never logged).
    pub url: String,
    pub names: Names,
    pub partitions: PartitionCount,
    /// How long an enqueue may wait for the broker before the gateway answers 503.
    pub publish_timeout: Duration,
    /// How long a message id is remembered for deduplication.
    pub duplicate_window: Duration,
    /// How long a delivery may go unacknowledged before JetStream redelivers it; workers
    /// report progress well within it while they generate.
    pub ack_wait: Duration,
    /// How many times a partition's consumer delivers a message before JetStream gives up on
    /// it; -1, the default, is no limit. A message JetStream gives up on stays in the work-queue
    /// stream, never delivered again and never settled, so the worker's own limit
    /// (`--max-generation-starts`, counted in the store across owners) decides instead, and sends
    /// the message to the dead letters.
    pub max_deliver: i64,
    /// How many unacknowledged deliveries a partition may have out at once; bounds a
    /// worker's in-flight generations per partition.
    pub max_ack_pending: i64,
    /// After how long without pulls a pinned consumer's pin moves to a standby worker.
    pub pin_timeout: Duration,
    /// Label of this client in the server's connection list.
    pub client_name: String,
    /// How many copies of each stream (and of the ownership bucket) a cluster keeps.
    pub replicas: Replicas,
    /// Timing of partition ownership among workers.
    pub ownership: crate::OwnershipSettings,
    /// Credentials beyond those in the URL: user and password, token, NKey or `.creds` file.
    pub auth: crate::NatsAuth,
    /// A CA to trust and a client certificate (mutual TLS); any of them makes TLS required.
    pub tls: crate::TlsFiles,
    /// How long reply events stay in the stream `<PREFIX>_OUT` for clients to resume from.
    /// None: [`crate::DEFAULT_EVENT_RETENTION`] for a new stream, and an existing stream keeps
    /// its own (so that `chatfleet status` never changes a deployment's retention).
    pub event_retention: Option<Duration>,
}

impl NatsSettings {
    pub fn new(url: impl Into<String>, partitions: PartitionCount) -> Self {
        Self {
            url: url.into(),
            names: Names::default(),
            partitions,
            publish_timeout: Duration::from_millis(1500),
            duplicate_window: Duration::from_secs(10 * 60),
            ack_wait: Duration::from_secs(30),
            max_deliver: -1,
            max_ack_pending: 10_000,
            pin_timeout: Duration::from_secs(5),
            client_name: "chatfleet".into(),
            replicas: Replicas::Auto,
            ownership: crate::OwnershipSettings::default(),
            auth: crate::NatsAuth::default(),
            tls: crate::TlsFiles::default(),
            event_retention: None,
        }
    }
}

/// The NATS JetStream bus. Cloning shares the connection.
#[derive(Clone)]
pub struct NatsBus {
    client: async_nats::Client,
    js: jetstream::Context,
    settings: NatsSettings,
    /// The replica count of the streams this process creates, resolved from
    /// [`NatsSettings::replicas`] at connection.
    replicas: usize,
}

impl std::fmt::Debug for NatsBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBus").field("server", &redact_url(&self.settings.url)).finish()
    }
}

impl NatsBus {
    /// Connects, checks that the server can serve chatfleet, and makes sure the input stream
    /// exists with the expected settings.
    pub async fn connect(settings: NatsSettings) -> Result<Self, BusError> {
        let shown = redact_url(&settings.url);
        let options = async_nats::ConnectOptions::new()
            .name(&settings.client_name)
            .connection_timeout(Duration::from_secs(2))
            .ping_interval(Duration::from_secs(5))
            .max_reconnects(None)
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Disconnected => {
                        tracing::warn!(event = "bus_disconnected", "lost the NATS connection; reconnecting")
                    }
                    async_nats::Event::Connected => {
                        tracing::info!(event = "bus_connected", "connected to NATS")
                    }
                    other => tracing::debug!(event = "bus_event", detail = %other),
                }
            });
        let options = security_options(options, &settings).await?;
        // Every server of a cluster may be listed; the client picks one and fails over to the
        // others (and to those the servers announce).
        let servers: Vec<String> = settings
            .url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(crate::security::without_credentials)
            .collect();
        let client = options.connect(servers).await.map_err(|e| connect_error(&e, &shown))?;

        let info = client.server_info();
        check_server(&info, &shown)?;

        let replicas = settings.replicas.for_new_stream(&info, &shown)?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(settings.publish_timeout);
        let bus = Self { client, js, settings, replicas };
        // Placing a replicated stream takes a cluster longer than a publish may.
        let mut admin = bus.clone();
        admin.js.set_timeout(ADMIN_TIMEOUT);
        // A cluster that is still electing a stream's leader (one just started, or one whose
        // servers are starved of CPU) leaves requests about that stream unanswered: a request
        // that timed out is tried again, the whole layout being idempotent, until
        // LAYOUT_DEADLINE. Anything else the server refuses stops start-up at once.
        let deadline = tokio::time::Instant::now() + LAYOUT_DEADLINE;
        loop {
            match admin.lay_out().await {
                Ok(()) => return Ok(bus),
                Err(e) if timed_out(&e) && tokio::time::Instant::now() + ADMIN_TIMEOUT < deadline => {
                    tracing::warn!(event = "bus_layout_retry", error = %e, "a JetStream request of the start-up layout timed out; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Creates, or checks and updates, every stream, consumer and bucket chatfleet uses.
    async fn lay_out(&self) -> Result<(), BusError> {
        self.ensure_stream().await?;
        // The partition consumers exist from the first process on, workers or not, so that the
        // backlog is visible to autoscalers (deploy/, KEDA) before any worker runs.
        consume::ensure_consumers(self).await?;
        let bucket_stream = format!("KV_{}", self.settings.names.ownership_bucket());
        replicas::reconcile(&self.js, &bucket_stream, self.settings.replicas, self.replicas).await?;
        // Created here rather than on first use, so that a replica count the cluster cannot
        // hold stops start-up.
        ownership::bucket(self).await?;
        dead_letters::ensure_stream(self).await?;
        deliveries::ensure(self).await?;
        replies::ensure_stream(self).await
    }

    /// Returns once the server has processed everything this connection sent before: a
    /// request to a subject nobody answers comes back as the server's own "no responders"
    /// reply, after it has handled what came first on the connection.
    async fn barrier(&self) -> Result<(), String> {
        let subject = self.settings.names.barrier_subject();
        let request = async_nats::Request::new().timeout(Some(self.settings.publish_timeout));
        match self.client.send_request(subject, request).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
            Err(e) if e.kind() == async_nats::RequestErrorKind::TimedOut => {
                Err(format!("NATS did not answer within {:?}", self.settings.publish_timeout))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    async fn ensure_stream(&self) -> Result<(), BusError> {
        let names = &self.settings.names;
        let config = stream::Config {
            name: names.input_stream(),
            subjects: vec![names.input_wildcard()],
            // A work queue keeps a message only until its partition's consumer acknowledges
            // it, so the stream holds exactly the backlog.
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: self.settings.duplicate_window,
            max_age: Duration::from_secs(7 * 24 * 3600),
            num_replicas: self.replicas,
            ..Default::default()
        };
        // Creating is idempotent for an identical config; a stream created with other
        // settings by an earlier version is updated in place, its replica count included.
        let existing = self
            .js
            .get_or_create_stream(config.clone())
            .await
            .map_err(|e| replicas::refused(&config.name, self.replicas, e))?;
        let current = &existing.cached_info().config;
        if current.duplicate_window != config.duplicate_window || current.subjects != config.subjects {
            let update = stream::Config { num_replicas: current.num_replicas, ..config.clone() };
            self.js
                .update_stream(update)
                .await
                .map_err(|e| BusError::Failed(format!("cannot update stream {}: {e}", config.name)))?;
        }
        replicas::reconcile(&self.js, &config.name, self.settings.replicas, self.replicas).await
    }

    /// The replica count of the streams this process creates.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    pub fn settings(&self) -> &NatsSettings {
        &self.settings
    }

    fn connected(&self) -> Result<(), BusError> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            _ => Err(BusError::Unavailable(format!("not connected to NATS at {}", redact_url(&self.settings.url)))),
        }
    }
}

/// Refuses servers that would silently break chatfleet's guarantees.
/// Adds the configured credentials and TLS files to the client's options.
async fn security_options(
    options: async_nats::ConnectOptions,
    settings: &NatsSettings,
) -> Result<async_nats::ConnectOptions, BusError> {
    let auth = match &settings.auth {
        crate::NatsAuth::FromUrl => {
            let servers: Vec<&str> = settings.url.split(',').map(str::trim).collect();
            crate::NatsAuth::in_urls(&servers)
        }
        given => given.clone(),
    };
    let mut options = auth.apply(options).await?;
    let tls = &settings.tls;
    tls.check()?;
    if let Some(ca) = &tls.ca {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    Ok(options.require_tls(tls.any()))
}

/// One line saying why the first connection failed. A refused login or a failed handshake
/// will not fix itself, so they are told apart from an unreachable server.
fn connect_error(error: &async_nats::ConnectError, shown: &str) -> BusError {
    use async_nats::ConnectErrorKind as Kind;
    match error.kind() {
        Kind::AuthorizationViolation | Kind::Authentication => BusError::Unsupported(format!(
            "NATS at {shown} refused the credentials ({error}); check the user, password, token, NKey or .creds file"
        )),
        kind @ (Kind::Tls | Kind::Io) if matches!(kind, Kind::Tls) || is_tls_failure(&error.to_string()) => {
            BusError::Unsupported(format!(
                "TLS with NATS at {shown} failed ({error}); check the CA (--bus-tls-ca) and the client certificate"
            ))
        }
        _ => BusError::Unavailable(format!("cannot reach NATS at {shown}: {error}")),
    }
}

/// True for a connection error that a TLS handshake raised (the client reports most of them
/// as I/O errors).
fn is_tls_failure(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    ["certificate", "tls", "handshake", "unknownissuer", "bad record"].iter().any(|word| lower.contains(word))
}

fn check_server(info: &async_nats::ServerInfo, shown: &str) -> Result<(), BusError> {
    let version = semver::Version::parse(info.version.trim_start_matches('v')).map_err(|_| {
        BusError::Unsupported(format!("NATS at {shown} reports an unreadable version {:?}", info.version))
    })?;
    if version < MIN_SERVER_VERSION {
        return Err(BusError::Unsupported(format!(
            "nats-server {version} at {shown} is too old: chatfleet needs nats-server {MIN_SERVER_VERSION} or newer \
             (pinned-client priority groups)"
        )));
    }
    if !info.jetstream {
        return Err(BusError::Unsupported(format!(
            "JetStream is not enabled on the NATS server at {shown}: start nats-server with -js"
        )));
    }
    Ok(())
}

#[async_trait]
impl Bus for NatsBus {
    fn partitions(&self) -> PartitionCount {
        self.settings.partitions
    }

    async fn enqueue(&self, message: &UserMessage) -> Result<Enqueued, BusError> {
        // Fail fast rather than let the client buffer a publish for a connection that is
        // gone: the gateway owes its caller an answer within two seconds.
        self.connected()?;
        let partition = self.settings.partitions.of(&message.session_id);
        let subject = self.settings.names.input_subject(partition, &message.session_id);
        let payload = serde_json::to_vec(message).map_err(|e| BusError::Failed(e.to_string()))?;
        let span = tracing::info_span!("bus.publish", otel.kind = "producer", partition = partition.get());
        let mut publish =
            jetstream::message::PublishMessage::build().payload(payload.into()).message_id(message.message_id.as_str());
        for (name, value) in span.in_scope(crate::trace_context::current) {
            publish = publish.header(name.as_str(), value.as_str());
        }
        let timeout = self.settings.publish_timeout;
        let ack = tokio::time::timeout(timeout, async {
            self.js
                .send_publish(subject, publish)
                .await
                .map_err(|e| BusError::Unavailable(format!("publish failed: {e}")))?
                .await
                .map_err(|e| BusError::Unavailable(format!("no publish acknowledgement: {e}")))
        })
        .instrument(span)
        .await
        .map_err(|_| BusError::Unavailable(format!("NATS did not acknowledge within {timeout:?}")))??;
        Ok(Enqueued { duplicate: ack.duplicate })
    }

    async fn publish_event(&self, event: &ReplyEvent) -> Result<(), BusError> {
        let subject = self.settings.names.events_subject(&event.session_id);
        let payload = serde_json::to_vec(event).map_err(|e| BusError::Failed(e.to_string()))?;
        self.client
            .publish(subject, payload.into())
            .await
            .map_err(|e| BusError::Unavailable(format!("cannot publish a reply event: {e}")))
    }

    async fn subscribe_events(&self, session: &SessionId) -> Result<EventStream, BusError> {
        self.connected()?;
        let subject = self.settings.names.events_subject(session);
        let subscriber = self
            .client
            .subscribe(subject)
            .await
            .map_err(|e| BusError::Unavailable(format!("cannot subscribe: {e}")))?;
        // A SUB that has been sent is not yet registered: the server reads each connection on
        // its own, so an event another connection publishes right after this returns could
        // overtake it. The server handles one connection's operations in order, so once it
        // has answered a request sent after the SUB, the interest is in place.
        self.barrier().await.map_err(|e| BusError::Unavailable(format!("cannot confirm the subscription: {e}")))?;
        Ok(subscriber
            .filter_map(|message| async move {
                match serde_json::from_slice::<ReplyEvent>(&message.payload) {
                    Ok(event) => Some(event),
                    Err(e) => {
                        tracing::warn!(event = "bad_reply_event", subject = %message.subject, error = %e, "skipping an unreadable reply event");
                        None
                    }
                }
            })
            .boxed())
    }

    async fn resume_events(&self, session: &SessionId) -> Result<crate::Resumed, BusError> {
        replies::resume(self, session).await
    }

    async fn consume(&self, partition: Partition) -> Result<Deliveries, BusError> {
        consume::deliveries(self, partition).await
    }

    async fn join(&self, worker_id: &schemas::WorkerId) -> Result<Box<dyn crate::Membership>, BusError> {
        ownership::join(self, worker_id, self.settings.ownership.clone()).await
    }

    async fn ping(&self) -> Result<(), BusError> {
        self.connected()
    }

    async fn status(&self) -> Result<crate::FleetStatus, BusError> {
        let mut status = ownership::status(self).await?;
        status.dead_letters = dead_letters::count(self).await.ok();
        Ok(status)
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
            "NATS JetStream at {} (stream {}, {} partitions)",
            redact_url(&self.settings.url),
            self.settings.names.input_stream(),
            self.settings.partitions
        )
    }
}
