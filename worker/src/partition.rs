//! A partition runner: pulls one partition's deliveries and hands each to its session's
//! queue, so that a session's messages run one at a time while sessions run side by side.
//!
//! Everything that happens to a runner is an [`Event`], handled in one place
//! ([`Runner::run`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bus::{Deliveries, Delivery};
use futures::StreamExt;
use schemas::{DoubleTexting, MessageId, Partition, SessionId};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::cache::CacheScope;
use crate::{Worker, session, telemetry};

/// What drives a partition runner.
enum Event {
    /// The bus delivered a message.
    Delivered(Delivery),
    /// A session queue finished with a delivery (settled it, or put it back at shutdown).
    Finished(SessionId, u64),
    /// The delivery stream ended (the broker went away); it is opened again.
    StreamEnded,
    /// The worker is shutting down: take no more messages.
    Stop,
}

/// A session's queue as the runner sees it.
struct SessionQueue {
    tx: mpsc::UnboundedSender<session::Queued>,
    /// Messages handed to the queue and not yet finished; the queue is closed at zero.
    outstanding: usize,
    /// Messages handed to the queue so far: the place of the next one.
    handed: u64,
    /// The messages at places before this one are interrupted ([`session::Interruption`]).
    interrupted_before: watch::Sender<u64>,
    /// The bus sequence and message id of each outstanding message, to recognise another copy
    /// of one of them.
    unanswered: Vec<(u64, MessageId)>,
}

/// A partition runner. `stop` ends pulling and lets what is in hand finish; `abort` also
/// abandons what is in hand, unsettled, for the partition's next owner.
pub(crate) struct Runner {
    worker: Worker,
    partition: Partition,
    /// This ownership's share of the context cache.
    cache: CacheScope,
    permits: Arc<Semaphore>,
    stop: CancellationToken,
    abort: CancellationToken,
}

impl Runner {
    pub(crate) fn new(
        worker: Worker,
        partition: Partition,
        cache: CacheScope,
        permits: Arc<Semaphore>,
        stop: CancellationToken,
        abort: CancellationToken,
    ) -> Self {
        Self { worker, partition, cache, permits, stop, abort }
    }

    pub(crate) async fn run(self) {
        let (finished_tx, mut finished_rx) = mpsc::unbounded_channel();
        let mut sessions: HashMap<SessionId, SessionQueue> = HashMap::new();
        // Bus messages queued or being handled here: a redelivery of one of them (the bus
        // lost patience) must not be handled a second time. (Two bus messages with the same
        // message id are both handled, one after the other; the second finds the outcome.)
        let mut in_hand: HashSet<u64> = HashSet::new();
        let mut deliveries: Option<Deliveries> = None;
        let mut stopping = false;
        let mut reopen_delay = Duration::from_millis(100);

        loop {
            if stopping && sessions.is_empty() {
                break;
            }
            if self.abort.is_cancelled() {
                stopping = true;
                deliveries = None;
            }
            if deliveries.is_none() && !stopping {
                match self.worker.bus.consume(self.partition).await {
                    Ok(stream) => {
                        reopen_delay = Duration::from_millis(100);
                        deliveries = Some(stream);
                    }
                    Err(e) => {
                        tracing::warn!(event = "consume_failed", partition = self.partition.get(), error = %e, retry_in = ?reopen_delay, "cannot consume partition");
                        tokio::select! {
                            _ = tokio::time::sleep(reopen_delay) => {}
                            _ = self.stop.cancelled() => {}
                        }
                        reopen_delay = (reopen_delay * 2).min(Duration::from_secs(5));
                        if self.stop.is_cancelled() {
                            stopping = true;
                        }
                        continue;
                    }
                }
            }

            let event = tokio::select! {
                biased;
                _ = self.stop.cancelled(), if !stopping => Event::Stop,
                Some((session, message)) = finished_rx.recv() => Event::Finished(session, message),
                next = next_delivery(&mut deliveries), if !stopping => match next {
                    Some(delivery) => Event::Delivered(delivery),
                    None => Event::StreamEnded,
                },
            };

            match event {
                Event::Delivered(delivery) => {
                    let message = match &delivery.message {
                        Ok(message) => message.clone(),
                        Err(reason) => {
                            tracing::error!(event = "message_rejected", partition = self.partition.get(), reason = %reason, "rejecting an unreadable message");
                            telemetry::message_settled("rejected");
                            if let Err(e) = delivery.acker.reject().await {
                                tracing::warn!(event = "settle_failed", error = %e);
                            }
                            continue;
                        }
                    };
                    if !in_hand.insert(delivery.sequence) {
                        tracing::debug!(event = "redelivery_in_hand", session_id = %message.session_id, message_id = %message.message_id);
                        continue;
                    }
                    if sessions
                        .get(&message.session_id)
                        .is_some_and(|q| q.unanswered.iter().any(|(_, id)| *id == message.message_id))
                    {
                        // Another copy of a message this worker is answering right now (a bus
                        // without deduplication carries a client's resend): the copy in hand
                        // answers it, so this one is settled as is, and the client sees one
                        // reply. A copy arriving after the answer finds the outcome instead.
                        in_hand.remove(&delivery.sequence);
                        tracing::info!(event = "duplicate_in_hand", session_id = %message.session_id, message_id = %message.message_id, "settling a second copy of a message being answered");
                        telemetry::message_settled("duplicate");
                        if let Err(e) = delivery.acker.ack().await {
                            tracing::warn!(event = "settle_failed", error = %e);
                        }
                        continue;
                    }
                    let queue = sessions.entry(message.session_id.clone()).or_insert_with(|| {
                        let (tx, rx) = mpsc::unbounded_channel();
                        let (interrupted_before, interruptions) = watch::channel(0);
                        let ownership = session::Ownership {
                            cache: self.cache.clone(),
                            stop: self.stop.clone(),
                            abort: self.abort.clone(),
                        };
                        tokio::spawn(session::run(
                            self.worker.clone(),
                            ownership,
                            message.session_id.clone(),
                            rx,
                            interruptions,
                            finished_tx.clone(),
                            self.permits.clone(),
                        ));
                        SessionQueue { tx, outstanding: 0, handed: 0, interrupted_before, unanswered: Vec::new() }
                    });
                    let place = queue.handed;
                    if message.policy() == DoubleTexting::Interrupt && queue.outstanding > 0 {
                        // The new message supersedes whatever of the session is still
                        // unanswered here: the reply being generated stops where it is, and a
                        // message still waiting gets no reply text at all.
                        tracing::info!(
                            event = "interrupting",
                            session_id = %message.session_id,
                            message_id = %message.message_id,
                            unanswered = queue.outstanding,
                            "a newer message interrupts the session's unanswered ones"
                        );
                        queue.interrupted_before.send_replace(place);
                    }
                    queue.handed += 1;
                    queue.outstanding += 1;
                    queue.unanswered.push((delivery.sequence, message.message_id.clone()));
                    if queue.tx.send(session::Queued { place, delivery }).is_err() {
                        tracing::error!(event = "session_queue_closed", session_id = %message.session_id);
                    }
                }
                Event::Finished(session, sequence) => {
                    in_hand.remove(&sequence);
                    if let Some(queue) = sessions.get_mut(&session) {
                        queue.outstanding -= 1;
                        queue.unanswered.retain(|(s, _)| *s != sequence);
                        if queue.outstanding == 0 {
                            // Dropping the sender ends the session's task.
                            sessions.remove(&session);
                        }
                    }
                }
                Event::StreamEnded => {
                    tracing::warn!(
                        event = "deliveries_ended",
                        partition = self.partition.get(),
                        "delivery stream ended; reopening"
                    );
                    deliveries = None;
                    tokio::time::sleep(reopen_delay).await;
                }
                Event::Stop => {
                    stopping = true;
                    // Dropping the stream stops pulling: nothing new is taken from here on.
                    deliveries = None;
                }
            }
        }
    }
}

async fn next_delivery(deliveries: &mut Option<Deliveries>) -> Option<Delivery> {
    match deliveries {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}
