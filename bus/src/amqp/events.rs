//! Reply events on RabbitMQ: one exclusive, server-named queue per process that listens (a
//! gateway), bound to the events exchange once per session someone listens to, and unbound when
//! the last listener of that session goes. The broker deletes the queue, with its bindings, when
//! the process's connection ends, so nothing is left behind.
//!
//! If the connection breaks, the queue is declared again on a new one and every session still
//! listened to is bound again; events published in between are lost, as events are on NATS.

use std::collections::HashMap;
use std::sync::{Arc, Mutex as SyncMutex, Weak};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::QueueBindOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use schemas::{ReplyEvent, SessionId};
use tokio::sync::{Mutex, mpsc};

use super::{AmqpBus, unavailable};
use crate::{BusError, EventStream};

/// This process's event queue and who listens to what.
#[derive(Default)]
pub(super) struct Router {
    /// The queue and its channel, once someone has listened; replaced after a broken link.
    link: Mutex<Option<Link>>,
    /// The listeners of each session. A plain mutex: the dispatcher reads it for every event
    /// and never holds it across an await.
    listeners: Arc<SyncMutex<Listeners>>,
    /// Serializes binding changes per session, so that an unbind of a session's last listener
    /// never undoes the bind of a new one.
    bindings: SyncMutex<HashMap<SessionId, Arc<Mutex<Bound>>>>,
}

#[derive(Default)]
struct Listeners {
    next_id: u64,
    by_session: HashMap<SessionId, Vec<(u64, mpsc::UnboundedSender<ReplyEvent>)>>,
}

/// Which link generation a session is bound on (0: none).
#[derive(Default)]
struct Bound(u64);

#[derive(Clone)]
struct Link {
    channel: Channel,
    queue: String,
    generation: u64,
}

pub(super) async fn subscribe(bus: &AmqpBus, session: &SessionId) -> Result<EventStream, BusError> {
    let router = &bus.inner.router;
    let (tx, rx) = mpsc::unbounded_channel();
    let id = {
        let mut listeners = router.listeners.lock().unwrap_or_else(|e| e.into_inner());
        listeners.next_id += 1;
        let id = listeners.next_id;
        listeners.by_session.entry(session.clone()).or_default().push((id, tx));
        id
    };
    let guard = ListenerGuard { bus: bus.clone(), session: session.clone(), id };
    // If binding fails, the guard removes the listener again on the way out.
    ensure_bound(bus, session).await?;
    let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(move |event| {
        let _ = &guard;
        event
    });
    Ok(stream.boxed())
}

/// The current link, set up if there is none or it broke. Boxed: setting up a link starts a
/// dispatcher, which may set up a link again.
fn link(bus: &AmqpBus) -> futures::future::BoxFuture<'_, Result<Link, BusError>> {
    Box::pin(open_link(bus))
}

async fn open_link(bus: &AmqpBus) -> Result<Link, BusError> {
    let router = &bus.inner.router;
    let mut slot = router.link.lock().await;
    if let Some(link) = slot.as_ref()
        && link.channel.status().connected()
    {
        return Ok(link.clone());
    }
    let generation = slot.as_ref().map_or(0, |l| l.generation) + 1;
    *slot = None;
    // Bound per session later, as sessions are listened to.
    let (channel, queue, consumer) = super::listen_queue(bus, "", None, "set up the reply-event queue").await?;
    // The dispatcher holds the bus weakly: dropping the last handle of the bus closes its
    // connection, which ends the consumer and the dispatcher with it.
    tokio::spawn(dispatch(Arc::downgrade(&bus.inner), consumer));
    let link = Link { channel, queue, generation };
    *slot = Some(link.clone());
    tracing::debug!(event = "event_queue_ready", queue = %link.queue, generation, "listening for reply events");
    Ok(link)
}

fn binding(bus: &AmqpBus, session: &SessionId) -> Arc<Mutex<Bound>> {
    let mut bindings = bus.inner.router.bindings.lock().unwrap_or_else(|e| e.into_inner());
    bindings.entry(session.clone()).or_default().clone()
}

fn has_listeners(bus: &AmqpBus, session: &SessionId) -> bool {
    let listeners = bus.inner.router.listeners.lock().unwrap_or_else(|e| e.into_inner());
    listeners.by_session.get(session).is_some_and(|l| !l.is_empty())
}

/// Binds the session on the current link unless it is bound there already. Returns once the
/// broker has confirmed the binding: every event published afterwards reaches the queue.
async fn ensure_bound(bus: &AmqpBus, session: &SessionId) -> Result<(), BusError> {
    let binding = binding(bus, session);
    let mut bound = binding.lock().await;
    let link = link(bus).await?;
    if bound.0 == link.generation {
        return Ok(());
    }
    let timeout = bus.settings().publish_timeout;
    let exchange = bus.settings().names.events_exchange();
    tokio::time::timeout(
        timeout,
        link.channel.queue_bind(
            link.queue.as_str().into(),
            exchange.as_str().into(),
            session.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .map_err(|_| BusError::Unavailable("RabbitMQ did not confirm the subscription in time".into()))?
    .map_err(unavailable("bind the session's reply events"))?;
    bound.0 = link.generation;
    Ok(())
}

/// Unbinds the session if nobody listens to it any more.
async fn release_binding(bus: AmqpBus, session: SessionId) {
    let binding = binding(&bus, &session);
    let mut bound = binding.lock().await;
    if has_listeners(&bus, &session) {
        return;
    }
    let current = bus.inner.router.link.lock().await.clone();
    if let Some(link) = current
        && bound.0 == link.generation
        && link.channel.status().connected()
    {
        let exchange = bus.settings().names.events_exchange();
        let result = link
            .channel
            .queue_unbind(
                link.queue.as_str().into(),
                exchange.as_str().into(),
                session.as_str().into(),
                FieldTable::default(),
            )
            .await;
        if let Err(e) = result {
            tracing::debug!(event = "event_unbind_failed", session_id = %session, error = %e);
        }
    }
    bound.0 = 0;
    drop(bound);
    // Forget the session's entry unless someone started listening meanwhile.
    let mut bindings = bus.inner.router.bindings.lock().unwrap_or_else(|e| e.into_inner());
    if !has_listeners(&bus, &session) && Arc::strong_count(&binding) <= 2 {
        bindings.remove(&session);
    }
}

/// Hands every event from the queue to its session's listeners; when the link breaks, sets up
/// a new one and binds every session still listened to.
async fn dispatch(bus: Weak<super::Inner>, mut consumer: Consumer) {
    while let Some(Ok(delivery)) = consumer.next().await {
        let Some(inner) = bus.upgrade() else { return };
        let event = match serde_json::from_slice::<ReplyEvent>(&delivery.data) {
            Ok(event) => event,
            Err(e) => {
                tracing::warn!(event = "bad_reply_event", routing_key = %delivery.routing_key, error = %e, "skipping an unreadable reply event");
                continue;
            }
        };
        let listeners = inner.router.listeners.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(listeners) = listeners.by_session.get(&event.session_id) {
            for (_, tx) in listeners {
                let _ = tx.send(event.clone());
            }
        }
    }
    let Some(inner) = bus.upgrade() else { return };
    let bus = AmqpBus { inner };
    tracing::warn!(event = "event_queue_lost", "the reply-event queue's consumer stopped; listening again");
    let mut delay = Duration::from_millis(100);
    loop {
        let sessions: Vec<SessionId> = {
            let listeners = bus.inner.router.listeners.lock().unwrap_or_else(|e| e.into_inner());
            listeners.by_session.keys().cloned().collect()
        };
        if sessions.is_empty() {
            // The next subscriber sets up a new link.
            return;
        }
        let mut ok = true;
        for session in sessions {
            if let Err(e) = ensure_bound(&bus, &session).await {
                tracing::debug!(event = "event_rebind_failed", error = %e);
                ok = false;
                break;
            }
        }
        if ok {
            return;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Removes its listener when the event stream is dropped.
struct ListenerGuard {
    bus: AmqpBus,
    session: SessionId,
    id: u64,
}

impl Drop for ListenerGuard {
    fn drop(&mut self) {
        let last = {
            let mut listeners = self.bus.inner.router.listeners.lock().unwrap_or_else(|e| e.into_inner());
            match listeners.by_session.get_mut(&self.session) {
                Some(list) => {
                    list.retain(|(id, _)| *id != self.id);
                    if list.is_empty() {
                        listeners.by_session.remove(&self.session);
                        true
                    } else {
                        false
                    }
                }
                None => false,
            }
        };
        if last && let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(release_binding(self.bus.clone(), self.session.clone()));
        }
    }
}
