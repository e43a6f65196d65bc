//! The in-process bus of `chatfleet dev`: the same guarantees as the brokers (durable until
//! acknowledged, deduplicated by message id, per-partition order, per-session reply fan-out)
//! within one process.

mod consume;
mod deliveries;
mod ownership;
mod retention;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use schemas::{MessageId, Partition, PartitionCount, ReplyEvent, SessionId, UserMessage};
use tokio::sync::mpsc;

use crate::{Bus, BusError, Deliveries, Enqueued, EventStream};

/// How long a message id is remembered for deduplication, as on the brokers.
const DEDUP_WINDOW: Duration = Duration::from_secs(10 * 60);

/// The in-process bus. Cloning shares it.
#[derive(Clone)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

struct Inner {
    partitions: PartitionCount,
    /// One queue per partition.
    queues: Vec<Arc<consume::PartitionQueue>>,
    /// Message ids seen recently, with when they were first seen.
    seen: Mutex<HashMap<MessageId, Instant>>,
    /// The live listeners of each session's reply events. An event is shared, not copied, on
    /// its way to them, and the channels hold pointers: a channel's first block of slots is
    /// allocated with it, so a listener's idle cost follows the size of what it carries.
    listeners: Mutex<HashMap<SessionId, Vec<mpsc::UnboundedSender<Arc<ReplyEvent>>>>>,
    /// Each session's reply events of the retention window. Always locked inside `listeners`,
    /// so that a resume sees every event either in the log or live.
    log: Mutex<retention::EventLog>,
    /// Which in-process worker owns which partition.
    registry: Mutex<ownership::Registry>,
    /// Finished channel replies waiting for the gateway to deliver them.
    deliveries: Arc<deliveries::DeliveryQueue>,
}

impl MemoryBus {
    pub fn new(partitions: PartitionCount) -> Self {
        Self::with_event_retention(partitions, crate::DEFAULT_EVENT_RETENTION)
    }

    /// A bus that keeps each session's reply events for `retention`.
    pub fn with_event_retention(partitions: PartitionCount, retention: Duration) -> Self {
        let queues = partitions.all().map(|_| Arc::new(consume::PartitionQueue::default())).collect();
        Self {
            inner: Arc::new(Inner {
                partitions,
                queues,
                seen: Mutex::new(HashMap::new()),
                listeners: Mutex::new(HashMap::new()),
                log: Mutex::new(retention::EventLog::new(retention)),
                registry: Mutex::new(ownership::Registry::default()),
                deliveries: Arc::default(),
            }),
        }
    }

    fn queue(&self, partition: Partition) -> Result<&Arc<consume::PartitionQueue>, BusError> {
        self.inner
            .queues
            .get(partition.get() as usize)
            .ok_or_else(|| BusError::Failed(format!("no partition {partition}")))
    }
}

impl std::fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBus").field("partitions", &self.inner.partitions).finish()
    }
}

/// A listener's events, each taken out of its shared copy (copied only while another listener
/// still holds it).
fn live_events(rx: mpsc::UnboundedReceiver<Arc<ReplyEvent>>) -> EventStream {
    tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(Arc::unwrap_or_clone).boxed()
}

#[async_trait]
impl Bus for MemoryBus {
    fn partitions(&self) -> PartitionCount {
        self.inner.partitions
    }

    async fn enqueue(&self, message: &UserMessage) -> Result<Enqueued, BusError> {
        {
            let mut seen = self.inner.seen.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            if seen.len() > 10_000 {
                seen.retain(|_, at| now.duration_since(*at) < DEDUP_WINDOW);
            }
            match seen.get(&message.message_id) {
                Some(at) if now.duration_since(*at) < DEDUP_WINDOW => {
                    return Ok(Enqueued { duplicate: true });
                }
                _ => {
                    seen.insert(message.message_id.clone(), now);
                }
            }
        }
        let partition = self.inner.partitions.of(&message.session_id);
        self.queue(partition)?.push(message.clone());
        Ok(Enqueued { duplicate: false })
    }

    async fn publish_event(&self, event: &ReplyEvent) -> Result<(), BusError> {
        let mut listeners = self.inner.listeners.lock().unwrap_or_else(|e| e.into_inner());
        self.inner.log.lock().unwrap_or_else(|e| e.into_inner()).push(event);
        if let Some(senders) = listeners.get_mut(&event.session_id) {
            let event = Arc::new(event.clone());
            // Sending fails only for listeners that went away; forget those.
            senders.retain(|tx| tx.send(Arc::clone(&event)).is_ok());
            if senders.is_empty() {
                listeners.remove(&event.session_id);
            }
        }
        Ok(())
    }

    async fn subscribe_events(&self, session: &SessionId) -> Result<EventStream, BusError> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.inner.listeners.lock().unwrap_or_else(|e| e.into_inner()).entry(session.clone()).or_default().push(tx);
        Ok(live_events(rx))
    }

    async fn resume_events(&self, session: &SessionId) -> Result<crate::Resumed, BusError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut listeners = self.inner.listeners.lock().unwrap_or_else(|e| e.into_inner());
        let retained = self.inner.log.lock().unwrap_or_else(|e| e.into_inner()).retained(session);
        listeners.entry(session.clone()).or_default().push(tx);
        Ok(crate::Resumed { retained, live: live_events(rx) })
    }

    async fn consume(&self, partition: Partition) -> Result<Deliveries, BusError> {
        Ok(consume::deliveries(self.queue(partition)?.clone()))
    }

    async fn join(&self, worker_id: &schemas::WorkerId) -> Result<Box<dyn crate::Membership>, BusError> {
        let events = self
            .inner
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join(worker_id.as_str(), self.inner.partitions);
        Ok(Box::new(ownership::LocalMembership::new(worker_id.as_str(), events, self.inner.clone())))
    }

    async fn ping(&self) -> Result<(), BusError> {
        Ok(())
    }

    async fn status(&self) -> Result<crate::FleetStatus, BusError> {
        let registry = self.inner.registry.lock().unwrap_or_else(|e| e.into_inner());
        Ok(registry.status(&self.inner.queues))
    }

    async fn publish_delivery(&self, delivery: &schemas::ChannelDelivery) -> Result<(), BusError> {
        self.inner.deliveries.publish(delivery);
        Ok(())
    }

    async fn consume_deliveries(&self) -> Result<crate::PendingDeliveries, BusError> {
        Ok(self.inner.deliveries.consume())
    }

    async fn delivery_status(&self) -> Result<crate::DeliveryQueueStatus, BusError> {
        Ok(self.inner.deliveries.status())
    }

    fn describe(&self) -> String {
        format!("the in-process bus ({} partitions)", self.inner.partitions)
    }
}

/// Shared between the queue and its consumer: what is waiting and what is out for delivery.
#[derive(Default)]
struct QueueState {
    next_seq: u64,
    /// Waiting for delivery, by sequence, so a message put back keeps its place in line.
    ready: BTreeMap<u64, consume::Entry>,
    /// Delivered and not yet settled.
    unsettled: BTreeMap<u64, consume::Entry>,
    /// Bumped whenever a new consumer takes over the partition; deliveries of an earlier
    /// consumer can no longer be settled.
    generation: u64,
}
