//! Channel deliveries of the in-process bus: a queue in memory that the one gateway of `dev`
//! consumes. A retry waits out its delay in a timer task; a delivery whose acker is dropped
//! unsettled goes back to the queue, as a broker returns one whose consumer went away. Like the
//! rest of the in-process bus, pending deliveries are lost when the process stops.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use schemas::ChannelDelivery;
use tokio::sync::Notify;

use crate::{Acker, BusError, DeliveryQueueStatus, PendingDeliveries, PendingDelivery};

/// One delivery and its attempt number.
#[derive(Clone)]
struct Entry {
    delivery: ChannelDelivery,
    attempt: u64,
}

/// The queue, shared by the bus, its consumers and their ackers.
#[derive(Default)]
pub(super) struct DeliveryQueue {
    state: Mutex<State>,
    ready: Notify,
}

#[derive(Default)]
struct State {
    waiting: VecDeque<Entry>,
    /// Handed out or waiting out a retry delay.
    out: u64,
    undeliverable: Vec<(ChannelDelivery, String)>,
}

impl DeliveryQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn publish(&self, delivery: &ChannelDelivery) {
        self.push(Entry { delivery: delivery.clone(), attempt: 1 });
    }

    fn push(&self, entry: Entry) {
        self.lock().waiting.push_back(entry);
        self.ready.notify_one();
    }

    pub(super) fn consume(self: &Arc<Self>) -> PendingDeliveries {
        futures::stream::unfold(self.clone(), |queue| async move {
            loop {
                // Registered before looking, so that a push in between still wakes this loop.
                let notified = queue.ready.notified();
                if let Some(entry) = queue.take() {
                    drop(notified);
                    let acker = MemoryDeliveryAcker { queue: queue.clone(), entry: Mutex::new(Some(entry.clone())) };
                    let pending = PendingDelivery {
                        delivery: Ok(entry.delivery),
                        attempt: entry.attempt,
                        acker: Box::new(acker),
                    };
                    return Some((pending, queue));
                }
                notified.await;
            }
        })
        .boxed()
    }

    /// The next waiting delivery, counted as handed out.
    fn take(&self) -> Option<Entry> {
        let mut state = self.lock();
        let next = state.waiting.pop_front();
        if next.is_some() {
            state.out += 1;
        }
        next
    }

    pub(super) fn status(&self) -> DeliveryQueueStatus {
        let state = self.lock();
        DeliveryQueueStatus {
            pending: state.waiting.len() as u64 + state.out,
            undeliverable: state.undeliverable.len() as u64,
        }
    }
}

/// Settles one delivery; dropped unsettled, it returns the delivery to the queue.
struct MemoryDeliveryAcker {
    queue: Arc<DeliveryQueue>,
    /// None once settled.
    entry: Mutex<Option<Entry>>,
}

impl MemoryDeliveryAcker {
    fn settle(&self) -> Option<Entry> {
        let entry = self.entry.lock().unwrap_or_else(|e| e.into_inner()).take();
        if entry.is_some() {
            self.queue.lock().out -= 1;
        }
        entry
    }
}

impl Drop for MemoryDeliveryAcker {
    fn drop(&mut self) {
        if let Some(entry) = self.settle() {
            self.queue.push(entry);
        }
    }
}

#[async_trait]
impl Acker for MemoryDeliveryAcker {
    async fn ack(&self) -> Result<(), BusError> {
        self.settle();
        Ok(())
    }

    async fn retry_after(&self, delay: Duration) -> Result<(), BusError> {
        if let Some(mut entry) = self.settle() {
            entry.attempt += 1;
            let queue = self.queue.clone();
            // Counted as pending while it waits.
            queue.lock().out += 1;
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                queue.lock().out -= 1;
                queue.push(entry);
            });
        }
        Ok(())
    }

    async fn in_progress(&self) -> Result<(), BusError> {
        Ok(())
    }

    async fn reject(&self) -> Result<(), BusError> {
        self.dead_letter("rejected").await
    }

    async fn dead_letter(&self, reason: &str) -> Result<(), BusError> {
        if let Some(entry) = self.settle() {
            self.queue.lock().undeliverable.push((entry.delivery, reason.to_owned()));
        }
        Ok(())
    }
}
