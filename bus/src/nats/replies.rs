//! Reply events kept for resuming: the stream `<PREFIX>_OUT` captures every reply-event subject
//! (`<prefix>.out.<session>`) for the retention window, while workers go on publishing with
//! plain core-NATS publishes and gateways go on listening with plain subscriptions. A resume
//! reads one session's subject from the stream with an ordered consumer, which then goes on
//! delivering live, so retained and live events come from one ordered source with nothing
//! between them.

use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::stream;
use futures::StreamExt;
use schemas::{ReplyEvent, SessionId};

use super::NatsBus;
use crate::{BusError, Resumed};

/// How long reading a session's retained events may take before the resume fails.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(5);

/// Makes sure the reply-event stream exists and keeps events for the configured retention.
pub(super) async fn ensure_stream(bus: &NatsBus) -> Result<(), BusError> {
    let names = &bus.settings.names;
    let retention = bus.settings.event_retention.unwrap_or(crate::DEFAULT_EVENT_RETENTION);
    let config = stream::Config {
        name: names.events_stream(),
        subjects: vec![names.events_wildcard()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        max_age: retention,
        // Events carry no message ids; the window only has to fit inside the retention.
        duplicate_window: retention.min(Duration::from_secs(60)),
        discard: stream::DiscardPolicy::Old,
        allow_direct: true,
        num_replicas: bus.replicas,
        ..Default::default()
    };
    let existing = bus
        .js
        .get_or_create_stream(config.clone())
        .await
        .map_err(|e| super::replicas::refused(&config.name, bus.replicas, e))?;
    let current = &existing.cached_info().config;
    let retention_changed = bus.settings.event_retention.is_some() && current.max_age != config.max_age;
    if retention_changed || current.subjects != config.subjects {
        // The retention is a deployment setting: the last process started with it decides.
        let max_age = if retention_changed { config.max_age } else { current.max_age };
        let duplicate_window = max_age.min(config.duplicate_window);
        let update = stream::Config { num_replicas: current.num_replicas, max_age, duplicate_window, ..config.clone() };
        bus.js
            .update_stream(update)
            .await
            .map_err(|e| BusError::Failed(format!("cannot update stream {}: {e}", config.name)))?;
    }
    super::replicas::reconcile(&bus.js, &config.name, bus.settings.replicas, bus.replicas).await
}

/// The session's retained events, then the live ones, from one ordered consumer.
pub(super) async fn resume(bus: &NatsBus, session: &SessionId) -> Result<Resumed, BusError> {
    bus.connected()?;
    let stream = bus
        .js
        .get_stream_no_info(bus.settings.names.events_stream())
        .await
        .map_err(|e| BusError::Unavailable(format!("cannot open the reply-event stream: {e}")))?;
    let config = pull::OrderedConfig {
        filter_subject: bus.settings.names.events_subject(session),
        deliver_policy: DeliverPolicy::All,
        ..Default::default()
    };
    let consumer = stream
        .create_consumer(config)
        .await
        .map_err(|e| BusError::Unavailable(format!("cannot read the reply-event stream: {e}")))?;
    let pending = consumer.cached_info().num_pending;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| BusError::Unavailable(format!("cannot read the reply-event stream: {e}")))?;
    let mut retained = Vec::with_capacity(pending.min(10_000) as usize);
    // The consumer was created with `pending` events ahead of it; each delivery says how many
    // remain after it, so the catch-up ends at zero whatever was published meanwhile.
    let catch_up = async {
        let mut left = pending;
        while left > 0 {
            let message = messages
                .next()
                .await
                .ok_or_else(|| BusError::Unavailable("the reply-event stream ended".into()))?
                .map_err(|e| BusError::Unavailable(format!("cannot read the reply-event stream: {e}")))?;
            left = message.info().map(|i| i.pending).unwrap_or(0);
            retained.extend(parse(&message.payload));
        }
        Ok::<_, BusError>(())
    };
    tokio::time::timeout(CATCH_UP_TIMEOUT, catch_up).await.map_err(|_| {
        BusError::Unavailable(format!("the reply-event stream did not answer within {CATCH_UP_TIMEOUT:?}"))
    })??;
    let live = messages
        .filter_map(|message| async move {
            let message = message
                .inspect_err(|e| tracing::warn!(event = "reply_log_read_failed", error = %e, "reading reply events"))
                .ok()?;
            parse(&message.payload)
        })
        .boxed();
    Ok(Resumed { retained, live })
}

fn parse(payload: &[u8]) -> Option<ReplyEvent> {
    serde_json::from_slice::<ReplyEvent>(payload)
        .inspect_err(|e| tracing::warn!(event = "bad_reply_event", error = %e, "skipping an unreadable reply event"))
        .ok()
}
