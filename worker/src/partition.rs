//! A partition runner: pulls one partition's deliveries and hands each to its session's
//! queue, so that a session's messages run one at a time while sessions run side by side.
//!
//! Everything that happens to a runner is an [`Event`]; [`Runner::run`] waits for the next one
//! and hands it to the method of its kind. What outlives one event is a field of the runner.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bus::{Deliveries, Delivery};
use futures::StreamExt;
use schemas::{DoubleTexting, MessageId, Partition, SessionId, UserMessage};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::cache::CacheScope;
use crate::job::Job;
use crate::settle::{Decision, Outcome, settle};
use crate::{Worker, session};

/// The shortest wait before a delivery stream is opened again; it doubles up to five seconds
/// while opening fails.
const REOPEN_DELAY: Duration = Duration::from_millis(100);

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
    tx: mpsc::UnboundedSender<Job>,
    /// Messages handed to the queue and not yet finished; the queue is closed at zero.
    outstanding: usize,
    /// Messages handed to the queue so far: the place of the next one.
    handed: u64,
    /// The messages at places before this one are interrupted ([`crate::job::Interruption`]).
    interrupted_before: watch::Sender<u64>,
    /// The places of the messages a cancel request stopped.
    cancelled: watch::Sender<BTreeSet<u64>>,
    /// The bus sequence and message id of each outstanding message, to recognise another copy
    /// of one of them.
    unanswered: Vec<(u64, MessageId)>,
    /// The place of each outstanding message, for a cancel request naming it.
    places: HashMap<MessageId, u64>,
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
    /// The queues of the sessions with messages in hand.
    sessions: HashMap<SessionId, SessionQueue>,
    /// Bus messages queued or being handled here: a redelivery of one of them (the bus lost
    /// patience) must not be handled a second time. (Two bus messages with the same message id
    /// are both handled, one after the other; the second finds the outcome.)
    in_hand: HashSet<u64>,
    /// The open delivery stream; None while it is being (re)opened or once pulling stopped.
    deliveries: Option<Deliveries>,
    /// No more messages are taken; the runner ends once the sessions' queues are empty.
    stopping: bool,
    /// How long to wait before opening the delivery stream again.
    reopen_delay: Duration,
    /// Where session queues report a finished delivery, and where the runner hears of it.
    finished_tx: mpsc::UnboundedSender<(SessionId, u64)>,
    finished_rx: mpsc::UnboundedReceiver<(SessionId, u64)>,
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
        let (finished_tx, finished_rx) = mpsc::unbounded_channel();
        Self {
            worker,
            partition,
            cache,
            permits,
            stop,
            abort,
            sessions: HashMap::new(),
            in_hand: HashSet::new(),
            deliveries: None,
            stopping: false,
            reopen_delay: REOPEN_DELAY,
            finished_tx,
            finished_rx,
        }
    }

    pub(crate) async fn run(mut self) {
        while !(self.stopping && self.sessions.is_empty()) {
            if self.abort.is_cancelled() {
                self.stop_pulling();
            }
            if self.deliveries.is_none() && !self.stopping && !self.open().await {
                continue;
            }
            match self.next_event().await {
                Event::Delivered(delivery) => self.delivered(delivery).await,
                Event::Finished(session, sequence) => self.finished(&session, sequence),
                Event::StreamEnded => self.stream_ended().await,
                Event::Stop => self.stop_pulling(),
            }
        }
    }

    async fn next_event(&mut self) -> Event {
        tokio::select! {
            biased;
            _ = self.stop.cancelled(), if !self.stopping => Event::Stop,
            Some((session, sequence)) = self.finished_rx.recv() => Event::Finished(session, sequence),
            next = next_delivery(&mut self.deliveries), if !self.stopping => match next {
                Some(delivery) => Event::Delivered(delivery),
                None => Event::StreamEnded,
            },
        }
    }

    /// Opens the partition's delivery stream; false (after a wait, shortened by a stop) if the
    /// bus refused.
    async fn open(&mut self) -> bool {
        match self.worker.bus.consume(self.partition).await {
            Ok(stream) => {
                self.reopen_delay = REOPEN_DELAY;
                self.deliveries = Some(stream);
                true
            }
            Err(e) => {
                tracing::warn!(event = "consume_failed", partition = self.partition.get(), error = %e, retry_in = ?self.reopen_delay, "cannot consume partition");
                tokio::select! {
                    _ = tokio::time::sleep(self.reopen_delay) => {}
                    _ = self.stop.cancelled() => {}
                }
                self.reopen_delay = (self.reopen_delay * 2).min(Duration::from_secs(5));
                if self.stop.is_cancelled() {
                    self.stopping = true;
                }
                false
            }
        }
    }

    /// Reads the delivery into a job for its session's queue, unless it is unreadable (dead
    /// letters), a redelivery of a message in hand (ignored), or a second copy of a message
    /// being answered (settled at once).
    async fn delivered(&mut self, delivery: Delivery) {
        let Delivery { message, attempt, sequence, acker, trace } = delivery;
        let message = match message {
            Ok(message) => message,
            Err(detail) => {
                let span = tracing::info_span!("delivery", partition = self.partition.get(), sequence);
                let decision = Decision::Reject { reason: bus::UNREADABLE, detail };
                return settle(acker.as_ref(), decision).instrument(span).await;
            }
        };
        if let Some(target) = message.cancel.clone() {
            return self.cancel(&message.session_id, &target, acker).await;
        }
        if !self.in_hand.insert(sequence) {
            tracing::debug!(event = "redelivery_in_hand", session_id = %message.session_id, message_id = %message.message_id);
            return;
        }
        if self.is_being_answered(&message) {
            // Another copy of a message this worker is answering right now (a bus without
            // deduplication carries a client's resend): the copy in hand answers it, so this one
            // is settled as is, and the client sees one reply. A copy arriving after the answer
            // finds the outcome instead.
            self.in_hand.remove(&sequence);
            tracing::info!(event = "duplicate_in_hand", session_id = %message.session_id, message_id = %message.message_id, "settling a second copy of a message being answered");
            return settle(acker.as_ref(), Decision::Ack(Outcome::Duplicate)).await;
        }
        self.enqueue(Job { place: 0, sequence, attempt, message, acker, trace });
    }

    /// A cancel request: the message it names stops (waiting or being answered; what was
    /// generated is kept as its reply, finish reason `cancelled`). The request travels behind
    /// its message in the partition, so a message it does not find here was answered already.
    /// It is settled at once: a crash before the stopped reply is stored loses the cancel, and
    /// the next owner answers the message in full.
    async fn cancel(&mut self, session: &SessionId, target: &MessageId, acker: Box<dyn bus::Acker>) {
        let span = tracing::info_span!("cancel", session_id = %session, message_id = %target);
        match self.sessions.get(session).and_then(|queue| Some((queue, *queue.places.get(target)?))) {
            Some((queue, place)) => {
                tracing::info!(parent: &span, event = "cancel_requested", "stopping the message's reply");
                queue.cancelled.send_modify(|places| {
                    places.insert(place);
                });
            }
            None => {
                tracing::info!(parent: &span, event = "cancel_found_nothing", "the message is not in hand (answered already)")
            }
        }
        settle(acker.as_ref(), Decision::Ack(Outcome::CancelRequest)).instrument(span).await;
    }

    fn is_being_answered(&self, message: &UserMessage) -> bool {
        self.sessions
            .get(&message.session_id)
            .is_some_and(|queue| queue.unanswered.iter().any(|(_, id)| *id == message.message_id))
    }

    /// Hands `job` to its session's queue, at the queue's next place, starting the queue if the
    /// session has none.
    fn enqueue(&mut self, mut job: Job) {
        let session = job.message.session_id.clone();
        if !self.sessions.contains_key(&session) {
            let queue = self.start_session(&session);
            self.sessions.insert(session.clone(), queue);
        }
        let queue = self.sessions.get_mut(&session).expect("inserted above");
        job.place = queue.handed;
        if job.message.policy() == DoubleTexting::Interrupt && queue.outstanding > 0 {
            // The new message supersedes whatever of the session is still unanswered here: the
            // reply being generated stops where it is, and a message still waiting gets no reply
            // text at all.
            tracing::info!(
                event = "interrupting",
                session_id = %session,
                message_id = %job.message.message_id,
                unanswered = queue.outstanding,
                "a newer message interrupts the session's unanswered ones"
            );
            queue.interrupted_before.send_replace(job.place);
        }
        queue.handed += 1;
        queue.outstanding += 1;
        queue.unanswered.push((job.sequence, job.message.message_id.clone()));
        queue.places.insert(job.message.message_id.clone(), job.place);
        if queue.tx.send(job).is_err() {
            tracing::error!(event = "session_queue_closed", session_id = %session);
        }
    }

    /// Starts the task that works through `session`'s queue.
    fn start_session(&self, session: &SessionId) -> SessionQueue {
        let (tx, rx) = mpsc::unbounded_channel();
        let (interrupted_before, interruptions) = watch::channel(0);
        let (cancelled, cancels) = watch::channel(BTreeSet::new());
        let ownership =
            session::Ownership { cache: self.cache.clone(), stop: self.stop.clone(), abort: self.abort.clone() };
        tokio::spawn(session::run(
            self.worker.clone(),
            ownership,
            session.clone(),
            rx,
            interruptions,
            cancels,
            self.finished_tx.clone(),
            self.permits.clone(),
        ));
        SessionQueue {
            tx,
            outstanding: 0,
            handed: 0,
            interrupted_before,
            cancelled,
            unanswered: Vec::new(),
            places: HashMap::new(),
        }
    }

    fn finished(&mut self, session: &SessionId, sequence: u64) {
        self.in_hand.remove(&sequence);
        if let Some(queue) = self.sessions.get_mut(session) {
            queue.outstanding -= 1;
            if let Some(index) = queue.unanswered.iter().position(|(s, _)| *s == sequence) {
                let (_, message) = queue.unanswered.remove(index);
                queue.places.remove(&message);
            }
            if queue.outstanding == 0 {
                // Dropping the sender ends the session's task.
                self.sessions.remove(session);
            }
        }
    }

    async fn stream_ended(&mut self) {
        tracing::warn!(
            event = "deliveries_ended",
            partition = self.partition.get(),
            "delivery stream ended; reopening"
        );
        self.deliveries = None;
        tokio::time::sleep(self.reopen_delay).await;
    }

    /// Stops pulling: dropping the stream means nothing new is taken from here on.
    fn stop_pulling(&mut self) {
        self.stopping = true;
        self.deliveries = None;
    }
}

async fn next_delivery(deliveries: &mut Option<Deliveries>) -> Option<Delivery> {
    match deliveries {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}
