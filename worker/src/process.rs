//! Answering one user message: record it, build the context, generate with retries while
//! streaming deltas, store the reply, announce it, and only then acknowledge the delivery.

use std::future::Future;
use std::time::{Duration, Instant};

use bus::{Acker, Delivery};
use futures::StreamExt;
use llm::{ChatChunk, ChatRequest, LlmError};
use schemas::{EventId, FinishReason, ReplyEvent, ReplyEventKind, ReplyId, SessionId, Usage, UserMessage};
use store::{Failure, Inserted, Role, StoreError, StoredMessage};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{Worker, context, telemetry};

/// How a delivery is settled.
enum Settlement {
    /// Done with it; the label says how, for metrics.
    Ack(&'static str),
    /// Shutdown interrupted it: leave it unsettled, the bus delivers it again.
    Abandon,
}

/// Handles one delivery. `stop` interrupts only waits on the store (shutdown); `abort` drops
/// the work at once, leaving the delivery unsettled for the partition's next owner.
pub(crate) async fn handle(worker: &Worker, delivery: Delivery, stop: &CancellationToken, abort: &CancellationToken) {
    let Ok(message) = delivery.message else {
        return;
    };
    let span = tracing::info_span!(
        "message",
        session_id = %message.session_id,
        message_id = %message.message_id,
        attempt = delivery.attempt,
        worker = %worker.config.worker_id,
    );
    let acker = delivery.acker;
    async {
        let handler = Handler { worker, message: &message, stop };
        let work = with_progress(acker.as_ref(), worker.config.progress_interval, handler.answer());
        let settlement = tokio::select! {
            settlement = work => settlement,
            _ = abort.cancelled() => Settlement::Abandon,
        };
        match settlement {
            Settlement::Ack(outcome) => {
                telemetry::message_settled(outcome);
                if let Err(e) = acker.ack().await {
                    // The outcome is stored, so a redelivery is recognised and not answered
                    // again; only the acknowledgement is lost.
                    tracing::warn!(event = "ack_failed", error = %e, "acknowledgement failed");
                }
            }
            Settlement::Abandon => {
                tracing::info!(event = "message_abandoned", "left for redelivery")
            }
        }
    }
    .instrument(span)
    .await
}

/// Runs `work` while telling the bus every `interval` that the delivery is still in
/// progress, so a long generation is not redelivered to someone else.
async fn with_progress<T>(acker: &dyn Acker, interval: Duration, work: impl Future<Output = T>) -> T {
    tokio::pin!(work);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = ticker.tick() => {
                if let Err(e) = acker.in_progress().await {
                    tracing::warn!(event = "progress_failed", error = %e);
                }
            }
        }
    }
}

/// A generated reply.
struct Reply {
    text: String,
    finish_reason: FinishReason,
    usage: Option<Usage>,
}

struct Handler<'a> {
    worker: &'a Worker,
    message: &'a UserMessage,
    stop: &'a CancellationToken,
}

/// The store call failed and shutdown began while waiting to retry it.
struct Stopped;

impl Handler<'_> {
    fn session(&self) -> &SessionId {
        &self.message.session_id
    }

    async fn answer(&self) -> Settlement {
        match self.try_answer().await {
            Ok(settlement) => settlement,
            Err(Stopped) => Settlement::Abandon,
        }
    }

    async fn try_answer(&self) -> Result<Settlement, Stopped> {
        let store = &self.worker.store;
        let (session, message_id) = (self.session(), &self.message.message_id);

        if self.store_call(|| store.session(session)).await?.is_none() {
            tracing::info!(event = "session_gone", "the session was deleted; dropping its message");
            return Ok(Settlement::Ack("session_gone"));
        }
        if let Some(outcome) = self.store_call(|| store.outcome(session, message_id)).await? {
            // Announce it again: a worker that stored it may have crashed before announcing.
            // The event has the turn's terminal id, so clients see it once.
            tracing::info!(
                event = "already_answered",
                "this message was answered before; announcing, not answering again"
            );
            if let Err(e) = self.worker.bus.publish_event(&outcome.terminal_event(session, message_id)).await {
                tracing::warn!(event = "event_publish_failed", error = %e);
            }
            return Ok(Settlement::Ack("duplicate"));
        }
        let (turn, start) = self.record_user_message().await?;

        let history = self.store_call(|| store.recent(session, self.worker.config.context.history_limit)).await?;
        let user_position = turn * 2;
        let history: Vec<_> = history.into_iter().filter(|m| m.position() <= user_position).collect();
        let request = ChatRequest { messages: context::build(&self.worker.config.context, &history), max_tokens: None };

        let mut events = EventWriter { worker: self.worker, message: self.message, turn, start, seq: 0 };
        if start > 1 {
            // An earlier start (on a worker that crashed or handed the partition over) may have
            // streamed part of a reply: clients discard it and follow this one.
            tracing::info!(event = "generation_restarted", start, "restarting a reply begun before");
            events
                .send(ReplyEventKind::Reset { reason: "the reply restarts after a hand-over between workers".into() })
                .await;
        }
        match self.generate(request, &mut events).await {
            Ok(reply) => {
                let reply_id = ReplyId::for_message(message_id);
                let stored = StoredMessage {
                    id: reply_id.as_str().to_owned(),
                    session_id: session.clone(),
                    turn,
                    role: Role::Assistant,
                    text: reply.text.clone(),
                    created_at: time::OffsetDateTime::now_utc(),
                    reply_to: Some(message_id.clone()),
                    finish_reason: Some(reply.finish_reason.clone()),
                    usage: reply.usage,
                    failure: None,
                    starts: 0,
                };
                if self.store_call(|| store.insert_message(&stored)).await? == Inserted::AlreadyPresent {
                    tracing::warn!(
                        event = "reply_already_stored",
                        "a reply to this message was stored meanwhile; not announcing a second one"
                    );
                    return Ok(Settlement::Ack("duplicate"));
                }
                events
                    .send(ReplyEventKind::Done {
                        reply_id,
                        text: reply.text,
                        finish_reason: reply.finish_reason,
                        usage: reply.usage,
                    })
                    .await;
                tracing::info!(event = "message_answered", turn, "answered");
                Ok(Settlement::Ack("replied"))
            }
            Err(error) => {
                let (code, text) = match &error {
                    LlmError::Permanent { code, message } => {
                        (code.clone(), format!("the model refused the request: {message}"))
                    }
                    LlmError::Transient { message, .. } => (
                        "model_unavailable".to_owned(),
                        format!(
                            "the model did not answer after {} attempts: {message}",
                            self.worker.config.retry.max_attempts
                        ),
                    ),
                };
                let failure = Failure { code: code.clone(), message: text.clone() };
                self.store_call(|| store.mark_failed(session, message_id, &failure)).await?;
                events.send(ReplyEventKind::Error { code, message: text }).await;
                tracing::warn!(event = "message_failed", error = %error, "gave up on this message");
                Ok(Settlement::Ack("failed"))
            }
        }
    }

    /// Stores the user message at the next turn of the conversation, unless a previous
    /// delivery already did; returns its turn and how many times its generation has started,
    /// this time included.
    async fn record_user_message(&self) -> Result<(u64, u32), Stopped> {
        let store = &self.worker.store;
        let session = self.session();
        let message_id = &self.message.message_id;
        loop {
            if let Some(existing) = self.store_call(|| store.message(session, message_id.as_str())).await? {
                let start = self.store_call(|| store.begin_generation(session, message_id)).await?;
                return Ok((existing.turn, start));
            }
            let last = self.store_call(|| store.recent(session, 1)).await?;
            let turn = last.last().map_or(1, |m| m.turn + 1);
            let record = StoredMessage {
                id: self.message.message_id.as_str().to_owned(),
                session_id: session.clone(),
                turn,
                role: Role::User,
                text: self.message.text.clone(),
                created_at: self.message.accepted_at,
                reply_to: None,
                finish_reason: None,
                usage: None,
                failure: None,
                starts: 1,
            };
            match store.insert_message(&record).await {
                Ok(Inserted::New) => return Ok((turn, 1)),
                // A previous delivery recorded it meanwhile; count this start.
                Ok(Inserted::AlreadyPresent) => continue,
                // Someone else took that position between our read and our write; read again.
                Err(StoreError::Conflict(reason)) => {
                    tracing::warn!(event = "turn_conflict", turn, reason = %reason, "conversation position taken; retrying");
                }
                Err(e) => {
                    telemetry::store_retry();
                    tracing::warn!(event = "store_retry", error = %e);
                    self.pause(Duration::from_millis(200)).await?;
                }
            }
        }
    }

    /// Generates the reply, retrying transient model errors with backoff. Deltas stream out
    /// as they arrive; when a retry follows streamed deltas, a `reset` event tells clients to
    /// discard them.
    async fn generate(&self, request: ChatRequest, events: &mut EventWriter<'_>) -> Result<Reply, LlmError> {
        let policy = &self.worker.config.retry;
        let started = Instant::now();
        let mut attempt = 1;
        loop {
            telemetry::inflight(1.0);
            let result = self.generate_once(request.clone(), events, started).await;
            telemetry::inflight(-1.0);
            match result {
                Ok(reply) => {
                    telemetry::reply_complete(started.elapsed().as_secs_f64());
                    return Ok(reply);
                }
                Err((error, streamed)) => {
                    let retry_after = match &error {
                        LlmError::Transient { retry_after, .. } if attempt < policy.max_attempts => *retry_after,
                        _ => return Err(error),
                    };
                    telemetry::llm_retry();
                    let delay = policy.delay(attempt, retry_after);
                    tracing::warn!(event = "llm_retry", attempt, delay = ?delay, error = %error, "transient model error; retrying");
                    if streamed {
                        events
                            .send(ReplyEventKind::Reset { reason: format!("retrying after a model error: {error}") })
                            .await;
                    }
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
            }
        }
    }

    /// One attempt. On error, also says whether any delta went out.
    async fn generate_once(
        &self,
        request: ChatRequest,
        events: &mut EventWriter<'_>,
        started: Instant,
    ) -> Result<Reply, (LlmError, bool)> {
        let mut stream = self.worker.model.stream(request).await.map_err(|e| (e, false))?;
        let mut text = String::new();
        let mut index = 0u32;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(ChatChunk::Delta(delta)) => {
                    if index == 0 {
                        telemetry::first_token(started.elapsed().as_secs_f64());
                    }
                    text.push_str(&delta);
                    events.send(ReplyEventKind::Delta { index, text: delta }).await;
                    index += 1;
                }
                Ok(ChatChunk::Finished { finish_reason, usage }) => {
                    return Ok(Reply { text, finish_reason, usage });
                }
                Err(e) => return Err((e, index > 0)),
            }
        }
        Err((
            LlmError::Transient {
                message: "the model's stream ended before the reply was complete".into(),
                retry_after: None,
            },
            index > 0,
        ))
    }

    /// Runs a store operation until it succeeds. A store outage holds the session's queue
    /// rather than skipping ahead, so the session's order is kept; shutdown ends the wait.
    async fn store_call<T, F, Fut>(&self, op: F) -> Result<T, Stopped>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let mut delay = Duration::from_millis(100);
        loop {
            match op().await {
                Ok(value) => return Ok(value),
                Err(e) => {
                    telemetry::store_retry();
                    tracing::warn!(event = "store_retry", error = %e, retry_in = ?delay, "store call failed; retrying");
                    self.pause(delay).await?;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn pause(&self, delay: Duration) -> Result<(), Stopped> {
        tokio::select! {
            _ = tokio::time::sleep(delay) => Ok(()),
            _ = self.stop.cancelled() => Err(Stopped),
        }
    }
}

/// Publishes a reply's events with increasing ids.
struct EventWriter<'a> {
    worker: &'a Worker,
    message: &'a UserMessage,
    turn: u64,
    start: u32,
    seq: u32,
}

impl EventWriter<'_> {
    async fn send(&mut self, kind: ReplyEventKind) {
        let event = ReplyEvent {
            v: schemas::ENVELOPE_VERSION,
            event_id: if kind.is_terminal() {
                EventId::terminal(self.turn)
            } else {
                EventId::new(self.turn, self.start, self.seq)
            },
            session_id: self.message.session_id.clone(),
            message_id: self.message.message_id.clone(),
            kind,
        };
        self.seq += 1;
        // Reply events are best effort: a listener that misses one still finds the stored
        // reply in the history.
        if let Err(e) = self.worker.bus.publish_event(&event).await {
            tracing::warn!(event = "event_publish_failed", error = %e);
        }
    }
}
