//! Deliveries and acknowledgements of the in-process bus.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use schemas::UserMessage;
use tokio::sync::Notify;

use super::QueueState;
use crate::{Acker, BusError, Deliveries, Delivery};

/// A message in a partition queue.
#[derive(Clone)]
pub(super) struct Entry {
    message: UserMessage,
    deliveries: u64,
    /// The trace the message was enqueued in, as a broker's headers would carry it.
    trace: crate::trace_context::TraceHeaders,
}

/// One partition: a queue whose messages stay until they are acknowledged.
#[derive(Default)]
pub(super) struct PartitionQueue {
    state: Mutex<QueueState>,
    ready: Notify,
}

impl PartitionQueue {
    fn state(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Messages waiting, and messages delivered but not settled.
    pub(super) fn counts(&self) -> (u64, u64) {
        let state = self.state();
        (state.ready.len() as u64, state.unsettled.len() as u64)
    }

    pub(super) fn push(&self, message: UserMessage) {
        let trace = crate::trace_context::current();
        let mut state = self.state();
        let seq = state.next_seq;
        state.next_seq += 1;
        state.ready.insert(seq, Entry { message, deliveries: 0, trace });
        drop(state);
        self.ready.notify_one();
    }

    /// Takes over the partition: whatever an earlier consumer left unsettled is delivered
    /// again, in order, to the new one.
    fn take_over(&self) -> u64 {
        let mut state = self.state();
        state.generation += 1;
        let unsettled = std::mem::take(&mut state.unsettled);
        state.ready.extend(unsettled);
        state.generation
    }

    /// The next ready message, marked unsettled; None when the consumer was replaced.
    async fn next(self: &Arc<Self>, generation: u64) -> Option<(u64, Entry)> {
        loop {
            let notified = self.ready.notified();
            {
                let mut state = self.state();
                if state.generation != generation {
                    return None;
                }
                if let Some((seq, mut entry)) = state.ready.pop_first() {
                    entry.deliveries += 1;
                    state.unsettled.insert(seq, entry.clone());
                    return Some((seq, entry));
                }
            }
            notified.await;
        }
    }

    fn settle(&self, seq: u64, generation: u64, requeue: bool) {
        let mut state = self.state();
        if state.generation != generation {
            return;
        }
        if let Some(entry) = state.unsettled.remove(&seq)
            && requeue
        {
            state.ready.insert(seq, entry);
            drop(state);
            self.ready.notify_one();
        }
    }
}

pub(super) fn deliveries(queue: Arc<PartitionQueue>) -> Deliveries {
    let generation = queue.take_over();
    // Wake a consumer this one replaces, so that its stream ends.
    queue.ready.notify_waiters();
    futures::stream::unfold(queue, move |queue| async move {
        let (seq, entry) = queue.next(generation).await?;
        let delivery = Delivery {
            message: Ok(entry.message),
            attempt: entry.deliveries,
            sequence: seq,
            acker: Box::new(MemoryAcker { queue: queue.clone(), seq, generation }),
            trace: entry.trace,
        };
        Some((delivery, queue))
    })
    .boxed()
}

struct MemoryAcker {
    queue: Arc<PartitionQueue>,
    seq: u64,
    generation: u64,
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(&self) -> Result<(), BusError> {
        self.queue.settle(self.seq, self.generation, false);
        Ok(())
    }

    async fn retry_after(&self, delay: Duration) -> Result<(), BusError> {
        let queue = self.queue.clone();
        let (seq, generation) = (self.seq, self.generation);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            queue.settle(seq, generation, true);
        });
        Ok(())
    }

    async fn in_progress(&self) -> Result<(), BusError> {
        Ok(())
    }

    async fn reject(&self) -> Result<(), BusError> {
        self.queue.settle(self.seq, self.generation, false);
        Ok(())
    }
}
