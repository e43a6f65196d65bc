//! Answering one user message: record it, build the context, generate with retries while
//! streaming deltas, store the reply, announce it, and only then acknowledge the delivery.
//!
//! The conversation's recent history comes from the context cache when it holds the session
//! (`cache.rs`); each write here is applied to the cached copy too, so it stays equal to what
//! the store holds. Whenever the handling meets something it did not write itself (a message
//! recorded by an earlier delivery, a taken position, a reply stored meanwhile), it drops the
//! session's cached copy and reads the store instead of guessing.
//!
//! Double texting: under `interrupt`, a newer message of the session ends the generation where
//! it is ([`Interruption`]); the text so far becomes the reply, stored and announced like any
//! other, with the finish reason `interrupted`. Under `reject`, the gateway marked the message
//! as the session's reply in progress; the marker is cleared once the outcome is stored and
//! before it is announced, so that a client sending its next message on seeing `done` is not
//! refused.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bus::Acker;
use futures::StreamExt;
use llm::{ChatChunk, ChatRequest, LlmError};
use schemas::{
    DoubleTexting, ErrorCode, EventId, FinishReason, ReplyEvent, ReplyEventKind, ReplyId, SessionId, Usage, UserMessage,
};
use store::{Failure, Inserted, Outcome as StoredOutcome, Role, SessionRecord, StoreError, StoredMessage};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::cache::CacheScope;
use crate::events::{DeltaBatch, EventWriter};
use crate::job::{Interruption, Job};
use crate::settle::{Decision, Outcome, settle};
use crate::{Worker, channel, context, telemetry};

/// Handles one job and settles its delivery. `stop` interrupts only waits on the store
/// (shutdown); `abort` drops the work at once, leaving the delivery unsettled for the
/// partition's next owner.
pub(crate) async fn handle(
    worker: &Worker,
    cache: &CacheScope,
    job: &Job,
    interruption: &Interruption,
    stop: &CancellationToken,
    abort: &CancellationToken,
) {
    let Job { message, attempt, acker, trace, .. } = job;
    let attempt = *attempt;
    let span = tracing::info_span!(
        "message",
        otel.kind = "consumer",
        session_id = %message.session_id,
        message_id = %message.message_id,
        attempt,
        worker = %worker.config.worker_id,
        trace_id = tracing::field::Empty,
    );
    // The handling continues the trace of the request that enqueued the message.
    bus::trace_context::continue_trace(&span, trace);
    bus::trace_context::record_trace_id(&span);
    async {
        let handler = Handler::new(worker, cache, message, interruption, stop);
        let work = with_progress(acker.as_ref(), worker.config.progress_interval, handler.answer());
        let decision = tokio::select! {
            biased;
            // Checked first: work abandoned before it starts is not counted as a start.
            _ = abort.cancelled() => Decision::Abandon,
            decision = work => decision,
        };
        settle(acker.as_ref(), decision).await;
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

/// One generation counted as running ([`Worker::delta_batch`] and the in-flight gauge) for as
/// long as it lives: the count comes down however the generation ends, also when its future is
/// dropped (the partition's work was abandoned) or unwinds.
struct Generating<'a>(&'a Worker);

impl<'a> Generating<'a> {
    fn start(worker: &'a Worker) -> Self {
        telemetry::inflight(1.0);
        worker.generating.fetch_add(1, Ordering::Relaxed);
        Self(worker)
    }
}

impl Drop for Generating<'_> {
    fn drop(&mut self) {
        self.0.generating.fetch_sub(1, Ordering::Relaxed);
        telemetry::inflight(-1.0);
    }
}

/// A generated reply.
struct Reply {
    text: String,
    finish_reason: FinishReason,
    usage: Option<Usage>,
}

impl Reply {
    /// The reply to a message interrupted by a newer one or cancelled (`finish_reason` says
    /// which): what had been generated of it.
    fn cut_short(text: String, finish_reason: FinishReason) -> Self {
        Self { text, finish_reason, usage: None }
    }
}

struct Handler<'a> {
    worker: &'a Worker,
    cache: &'a CacheScope,
    message: &'a UserMessage,
    interruption: &'a Interruption,
    stop: &'a CancellationToken,
    /// Whether this handling keeps the session's cached history; cleared, and the cached copy
    /// dropped, as soon as what the store holds is no longer known for certain.
    caching: AtomicBool,
    /// The message's conversation turn once it is recorded; 0 before.
    turn: AtomicU64,
}

/// Why the handling of a message ended without an outcome.
enum Halt {
    /// A store call failed and shutdown began while waiting to retry it.
    Stopped,
    /// The store refused a call for good ([`StoreError::Fatal`]): retrying cannot help.
    StoreRefused(StoreError),
}

/// The user message, recorded.
struct Recorded {
    turn: u64,
    /// How many times its generation has started, this time included.
    start: u32,
    /// The conversation's recent history as the store now holds it, the user message
    /// included, when known without reading the store again (the cache is in use).
    history: Option<Vec<StoredMessage>>,
}

impl<'a> Handler<'a> {
    fn new(
        worker: &'a Worker,
        cache: &'a CacheScope,
        message: &'a UserMessage,
        interruption: &'a Interruption,
        stop: &'a CancellationToken,
    ) -> Self {
        // With no history to read there is nothing to cache, and the cache could not tell the
        // next turn either.
        let caching = AtomicBool::new(cache.enabled() && worker.config.context.history_limit > 0);
        Self { worker, cache, message, interruption, stop, caching, turn: AtomicU64::new(0) }
    }
}

impl Handler<'_> {
    fn session(&self) -> &SessionId {
        &self.message.session_id
    }

    fn caching(&self) -> bool {
        self.caching.load(Ordering::Relaxed)
    }

    /// Stops using the cache for this message and drops the session's cached history: the
    /// next read goes to the store.
    fn distrust_cache(&self) {
        self.caching.store(false, Ordering::Relaxed);
        self.cache.invalidate(self.session());
    }

    /// Caches `history` (what the store now holds) with `written` applied, trimmed to the
    /// history limit. A write the store would record differently than given is not guessed at.
    fn cache_with(&self, history: &mut Vec<StoredMessage>, written: &StoredMessage) {
        if !self.caching() {
            return;
        }
        let Some(stored) = as_stored(written) else {
            self.distrust_cache();
            return;
        };
        history.push(stored);
        let limit = self.worker.config.context.history_limit;
        if history.len() > limit {
            history.drain(..history.len() - limit);
        }
        self.cache.put(self.session(), history.clone());
    }

    /// The events of this message's reply at `turn`, generation start `start`.
    fn events(&self, turn: u64, start: u32) -> EventWriter<'_> {
        EventWriter::new(self.worker.bus.as_ref(), self.message, turn, start)
    }

    /// What to do with the delivery, once the message has an outcome or cannot get one here.
    async fn answer(&self) -> Decision {
        match self.try_answer().await {
            Ok(decision) => decision,
            Err(Halt::Stopped) => Decision::Abandon,
            Err(Halt::StoreRefused(error)) => self.give_up_on_store(error).await,
        }
    }

    async fn try_answer(&self) -> Result<Decision, Halt> {
        let store = &self.worker.store;
        let (session, message_id) = (self.session(), &self.message.message_id);
        // What comes before the answer, in one read where the store allows it: the session, the
        // message and its reply (the outcome, and whether an earlier delivery recorded the
        // message), and what tells the message's turn: the recent history the context needs
        // unless the cache holds it, else the newest message alone.
        let cached = if self.caching() { self.cache.get(session) } else { None };
        let recent = match &cached {
            Some(_) => 0,
            None if self.caching() => self.worker.config.context.history_limit,
            None => 1,
        };
        let prepared = self.store_call(|| store.prepare_answer(session, message_id, recent)).await?;
        let Some(record) = prepared.session else {
            return Ok(self.session_gone().await);
        };
        if let Some(outcome) = prepared.found.outcome() {
            return self.announce_again(outcome).await;
        }
        let Recorded { turn, start, history } =
            self.record_user_message(prepared.found.message, cached.or(prepared.recent)).await?;
        self.turn.store(turn, Ordering::Relaxed);
        if start % (self.worker.config.max_generation_starts + 1) == 0 {
            return Ok(self.dead_letter(turn, start).await);
        }
        let mut history = match history {
            Some(history) => history,
            None => self.store_call(|| store.recent(session, self.worker.config.context.history_limit)).await?,
        };
        // The history is in conversation order: what the model sees ends with the user message.
        let upto = history.partition_point(|m| m.position() <= turn * 2);
        let request =
            ChatRequest { messages: context::build(&self.worker.config.context, &history[..upto]), max_tokens: None };

        let mut events = self.events(turn, start);
        if start > 1 {
            // An earlier start (on a worker that crashed or handed the partition over) may have
            // streamed part of a reply: clients discard it and follow this one.
            tracing::info!(event = "generation_restarted", start, "restarting a reply begun before");
            events
                .send(ReplyEventKind::Reset { reason: "the reply restarts after a hand-over between workers".into() })
                .await;
        }
        match self.generate(request, &mut events).await {
            Ok(reply) => self.store_reply(reply, turn, &record, &mut history, &mut events).await,
            Err(error) => self.store_failure(&error, history, &mut events).await,
        }
    }

    /// Adds the reply's model tokens to its API key's and end user's counters of the day, which
    /// the gateway checks against their `tokens_per_day` limits. Only for a reply this worker
    /// stored (so each reply counts once), and only for sessions created with an API key. A
    /// failure is logged, not retried: the reply matters more than its count.
    async fn count_tokens(&self, record: &SessionRecord, usage: Option<&Usage>) {
        let (Some(key), Some(usage)) = (record.api_key.as_deref(), usage) else { return };
        let tokens = i64::from(usage.prompt_tokens).saturating_add(i64::from(usage.completion_tokens));
        let day = store::quota::day(time::OffsetDateTime::now_utc());
        let mut scopes = vec![store::quota::Scope::Key(key)];
        if let Some(user) = record.user.as_deref() {
            scopes.push(store::quota::Scope::User { key, user });
        }
        for scope in scopes {
            let counter = store::quota::tokens(scope, day);
            if let Err(e) = self.worker.store.add_to_counter(&counter, tokens, store::quota::tokens_expiry(day)).await {
                tracing::warn!(event = "tokens_not_counted", error = %e, tokens, "the reply's tokens are not counted");
            }
        }
    }

    /// The message's generation was started too many times across workers (a reply that crashes
    /// its worker, say): it goes to the dead letters, unanswered and with no failure stored, so
    /// that an operator's replay answers it. The client gets an `error` event, and a
    /// reply-in-progress marker of this message is cleared so the session can go on.
    async fn dead_letter(&self, turn: u64, start: u32) -> Decision {
        let limit = self.worker.config.max_generation_starts;
        tracing::error!(event = "too_many_starts", start, limit, "giving up on the message: to the dead letters");
        let (store, session, message_id) = (&self.worker.store, self.session(), &self.message.message_id);
        if self.message.policy() == DoubleTexting::Reject
            && let Err(e) = store.end_reply(session, message_id).await
        {
            tracing::warn!(event = "marker_not_cleared", error = %e, "could not clear the reply-in-progress marker");
        }
        let message =
            format!("the message was given up on after {limit} attempts to answer it and kept for an operator");
        self.events(turn, start).send(ReplyEventKind::Error { code: ErrorCode::MessageDeadLettered, message }).await;
        Decision::Reject { reason: "too_many_starts", detail: format!("generation start {start}, limit {limit}") }
    }

    /// The session was deleted: the message is dropped unrecorded. A client still streaming the
    /// reply (through a gateway that had not yet heard of the deletion) learns why none comes.
    async fn session_gone(&self) -> Decision {
        tracing::info!(event = "session_gone", "the session was deleted; dropping its message");
        self.distrust_cache();
        // The session has no turns left, so turn 0.
        self.events(0, 1)
            .send(ReplyEventKind::Error {
                code: ErrorCode::SessionNotFound,
                message: "the session was deleted before this message was answered".into(),
            })
            .await;
        Decision::Ack(Outcome::SessionGone)
    }

    /// The message was answered before, perhaps by another worker that may have crashed before
    /// announcing it: announce it again, under the turn's terminal id, so clients see it once.
    async fn announce_again(&self, outcome: StoredOutcome) -> Result<Decision, Halt> {
        // What else the earlier handling wrote is not known here.
        self.distrust_cache();
        tracing::info!(event = "already_answered", "this message was answered before; announcing, not answering again");
        // Whoever stored it may have stopped before clearing the marker, too.
        self.end_reply().await?;
        let event = outcome.terminal_event(self.session(), &self.message.message_id);
        if let Err(e) = self.worker.bus.publish_event(&event).await {
            tracing::warn!(event = "event_publish_failed", error = %e);
        }
        self.hand_to_channel(&event).await?;
        Ok(Decision::Ack(Outcome::Duplicate))
    }

    /// Stores the generated reply, then announces it with `done`.
    async fn store_reply(
        &self,
        reply: Reply,
        turn: u64,
        record: &SessionRecord,
        history: &mut Vec<StoredMessage>,
        events: &mut EventWriter<'_>,
    ) -> Result<Decision, Halt> {
        let (store, session, message_id) = (&self.worker.store, self.session(), &self.message.message_id);
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
            self.distrust_cache();
            self.end_reply().await?;
            // Another owner stored one, or this very insert did before the store died without
            // answering (a retried write): listeners may have no `done` yet, so the stored reply
            // is announced, under the turn's terminal id as every announcement of it is, and
            // clients see it once.
            tracing::warn!(
                event = "reply_already_stored",
                "a reply to this message was stored meanwhile; announcing the stored one"
            );
            if let Some(outcome) = self.store_call(|| store.outcome(session, message_id)).await? {
                let event = outcome.terminal_event(session, message_id);
                if let Err(e) = self.worker.bus.publish_event(&event).await {
                    tracing::warn!(event = "event_publish_failed", error = %e);
                }
                self.hand_to_channel(&event).await?;
            }
            return Ok(Decision::Ack(Outcome::Duplicate));
        }
        self.cache_with(history, &stored);
        self.count_tokens(record, reply.usage.as_ref()).await;
        self.end_reply().await?;
        let (interrupted, cancelled) = (reply.finish_reason.is_interrupted(), reply.finish_reason.is_cancelled());
        let Reply { text, finish_reason, usage } = reply;
        events.send(ReplyEventKind::Done { reply_id, text, finish_reason, usage }).await;
        self.hand_to_channel(&StoredOutcome::Replied(stored).terminal_event(session, message_id)).await?;
        if cancelled {
            tracing::info!(event = "message_cancelled", turn, "a cancel request stopped this reply");
            Ok(Decision::Ack(Outcome::Cancelled))
        } else if interrupted {
            tracing::info!(event = "message_interrupted", turn, "a newer message cut this reply short");
            Ok(Decision::Ack(Outcome::Interrupted))
        } else {
            tracing::info!(event = "message_answered", turn, "answered");
            Ok(Decision::Ack(Outcome::Replied))
        }
    }

    /// The model failed the message for good: stores the failure, then announces it with an
    /// `error` event.
    async fn store_failure(
        &self,
        error: &LlmError,
        mut history: Vec<StoredMessage>,
        events: &mut EventWriter<'_>,
    ) -> Result<Decision, Halt> {
        let (store, session, message_id) = (&self.worker.store, self.session(), &self.message.message_id);
        let (code, text) = match error {
            LlmError::Permanent { code, message } => {
                (code.clone(), format!("the model refused the request: {message}"))
            }
            LlmError::Transient { message, .. } => (
                ErrorCode::ModelUnavailable,
                format!("the model did not answer after {} attempts: {message}", self.worker.config.retry.max_attempts),
            ),
        };
        let failure = Failure { code: code.to_string(), message: text.clone() };
        self.store_call(|| store.mark_failed(session, message_id, &failure)).await?;
        if self.caching() {
            match history.iter_mut().rev().find(|m| m.id == message_id.as_str() && m.role == Role::User) {
                Some(user) => {
                    user.failure = Some(failure);
                    self.cache.put(session, history);
                }
                None => self.distrust_cache(),
            }
        }
        self.end_reply().await?;
        events.send(ReplyEventKind::Error { code: code.clone(), message: text.clone() }).await;
        self.hand_to_channel(&self.terminal_error(code, text)).await?;
        tracing::warn!(event = "message_failed", error = %error, "gave up on this message");
        Ok(Decision::Ack(Outcome::Failed))
    }

    /// The store refused one of this message's calls for good. Waiting would hold the session's
    /// queue forever behind one bad record, so the message is given up on: the failure is
    /// recorded and the reply-in-progress marker cleared if the store takes them (one try each),
    /// the client gets an `error` event, and the delivery is acknowledged.
    async fn give_up_on_store(&self, error: StoreError) -> Decision {
        tracing::error!(event = "store_refused", error = %error, "the store refused this message for good; giving up on it");
        self.distrust_cache();
        let (store, session, message_id) = (&self.worker.store, self.session(), &self.message.message_id);
        let code = ErrorCode::StoreFailed;
        let message = "the conversation store could not record this message".to_owned();
        let failure = Failure { code: code.to_string(), message: message.clone() };
        if let Err(e) = store.mark_failed(session, message_id, &failure).await {
            tracing::warn!(event = "failure_not_recorded", error = %e, "could not record the failure either");
        }
        if self.message.policy() == DoubleTexting::Reject
            && let Err(e) = store.end_reply(session, message_id).await
        {
            tracing::warn!(event = "marker_not_cleared", error = %e, "could not clear the reply-in-progress marker");
        }
        self.events(self.turn.load(Ordering::Relaxed), 1)
            .send(ReplyEventKind::Error { code: code.clone(), message: message.clone() })
            .await;
        if self.hand_to_channel(&self.terminal_error(code, message)).await.is_err() {
            // Stopping: the message's next handling hands its recorded failure over.
            return Decision::Abandon;
        }
        Decision::Ack(Outcome::StoreFailed)
    }

    /// Stores the user message at the next turn of the conversation, unless a previous
    /// delivery already did. `known` is the message as just read from the store, if it was
    /// there; `newest` the conversation's newest messages read with it (the recent history
    /// when the cache is in use, else at least the newest message), if they were.
    async fn record_user_message(
        &self,
        known: Option<StoredMessage>,
        mut newest: Option<Vec<StoredMessage>>,
    ) -> Result<Recorded, Halt> {
        let store = &self.worker.store;
        let session = self.session();
        let message_id = &self.message.message_id;
        let mut known = Some(known);
        loop {
            let existing = match known.take() {
                Some(known) => known,
                None => self.store_call(|| store.message(session, message_id.as_str())).await?,
            };
            if let Some(existing) = existing {
                // An earlier delivery recorded it, and its generation may have gone on elsewhere
                // (a crash, a hand-over): the cached history may miss what that wrote.
                self.distrust_cache();
                let start = self.store_call(|| store.begin_generation(session, message_id)).await?;
                return Ok(Recorded { turn: existing.turn, start, history: None });
            }
            // The newest message tells the next turn. With the cache in use the whole recent
            // history is needed anyway: it was read with the message, or comes from the cache,
            // or is read once here. What was read with the message holds only for the first
            // try: a retry follows a write it did not see.
            let (before, newest) = match newest.take() {
                Some(history) if self.caching() => (Some(history), None),
                _ if self.caching() => (Some(self.recent_history().await?), None),
                newest => (None, newest),
            };
            let turn = match (&before, newest) {
                (Some(history), _) => history.last().map_or(1, |m| m.turn + 1),
                (None, Some(newest)) => newest.last().map_or(1, |m| m.turn + 1),
                (None, None) => self.store_call(|| store.recent(session, 1)).await?.last().map_or(1, |m| m.turn + 1),
            };
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
            match store.insert_message(&record).instrument(tracing::info_span!("store")).await {
                Ok(Inserted::New) => {
                    let mut history = before;
                    if let Some(history) = &mut history {
                        self.cache_with(history, &record);
                    }
                    // `cache_with` may have given up on the cache; then the history is read.
                    let history = history.filter(|_| self.caching());
                    return Ok(Recorded { turn, start: 1, history });
                }
                // A previous delivery recorded it meanwhile; count this start.
                Ok(Inserted::AlreadyPresent) => continue,
                // Someone else took that position between our read and our write; read again.
                Err(StoreError::Conflict(reason)) => {
                    tracing::warn!(event = "turn_conflict", turn, reason = %reason, "conversation position taken; retrying");
                    self.distrust_cache();
                }
                Err(e @ StoreError::Fatal(_)) => return Err(Halt::StoreRefused(e)),
                Err(e) => {
                    telemetry::store_retry();
                    tracing::warn!(event = "store_retry", error = %e);
                    self.pause(Duration::from_millis(200)).await?;
                }
            }
        }
    }

    /// The conversation's recent history as the store holds it: the cached copy, or else read
    /// from the store (and cached once the user message is recorded).
    async fn recent_history(&self) -> Result<Vec<StoredMessage>, Halt> {
        if let Some(history) = self.cache.get(self.session()) {
            return Ok(history);
        }
        let limit = self.worker.config.context.history_limit;
        self.store_call(|| self.worker.store.recent(self.session(), limit)).await
    }

    /// Clears the session's reply-in-progress marker, which the gateway set for this message
    /// (`double_texting: reject`). Called once the outcome is stored and before it is announced.
    /// Other policies set no marker, so they save the write.
    async fn end_reply(&self) -> Result<(), Halt> {
        if self.message.policy() == DoubleTexting::Reject {
            let (store, session, message_id) = (&self.worker.store, self.session(), &self.message.message_id);
            self.store_call(|| store.end_reply(session, message_id)).await?;
        }
        Ok(())
    }

    /// Generates the reply, retrying transient model errors with backoff. Deltas stream out
    /// as they arrive; when a retry follows streamed deltas, a `reset` event tells clients to
    /// discard them. An interruption ends it at once, with the text of the current attempt
    /// (which is what the deltas since the last `reset` add up to) as the reply.
    async fn generate(&self, request: ChatRequest, events: &mut EventWriter<'_>) -> Result<Reply, LlmError> {
        let policy = &self.worker.config.retry;
        let started = Instant::now();
        let mut attempt = 1;
        loop {
            if self.interruption.is_interrupted() {
                // Interrupted while waiting in the queue, or between attempts: nothing of this
                // attempt was said.
                return Ok(Reply::cut_short(String::new(), self.interruption.finish_reason()));
            }
            let generating = Generating::start(self.worker);
            let span = tracing::info_span!("llm.generate", attempt);
            let result = self.generate_once(request.clone(), events, started).instrument(span).await;
            drop(generating);
            match result {
                Ok(reply) => {
                    if !reply.finish_reason.is_cut_short() {
                        telemetry::reply_complete(started.elapsed().as_secs_f64());
                    }
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
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.interruption.interrupted() => {}
                    }
                    attempt += 1;
                }
            }
        }
    }

    /// One attempt. On error, also says whether any delta went out. An interruption ends the
    /// attempt with what it has generated so far; dropping the model's stream stops the model.
    ///
    /// Chunks go out as `delta` events as they come, except under load ([`Worker::delta_batch`]):
    /// then a chunk arriving sooner than the batch window after the previous event waits, with
    /// any others, until the window has passed. The first chunk never waits, and whatever waits
    /// goes out before the attempt ends with a reply, so the deltas still add up to it.
    async fn generate_once(
        &self,
        request: ChatRequest,
        events: &mut EventWriter<'_>,
        started: Instant,
    ) -> Result<Reply, (LlmError, bool)> {
        let interrupted = self.interruption.interrupted();
        tokio::pin!(interrupted);
        let mut stream = tokio::select! {
            biased;
            _ = &mut interrupted => return Ok(Reply::cut_short(String::new(), self.interruption.finish_reason())),
            stream = self.worker.model.stream(request) => stream.map_err(|e| (e, false))?,
        };
        let mut text = String::new();
        let mut deltas = DeltaBatch::default();
        let mut first = true;
        loop {
            let due = deltas.due();
            let chunk = tokio::select! {
                biased;
                _ = &mut interrupted => {
                    deltas.flush(events).await;
                    return Ok(Reply::cut_short(text, self.interruption.finish_reason()));
                }
                _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                    deltas.flush(events).await;
                    continue;
                }
                chunk = stream.next() => chunk,
            };
            let Some(chunk) = chunk else { break };
            match chunk {
                Ok(ChatChunk::Delta(delta)) => {
                    if first {
                        first = false;
                        telemetry::first_token(started.elapsed().as_secs_f64());
                        telemetry::first_token_event(started.elapsed());
                    }
                    text.push_str(&delta);
                    deltas.add(&delta, self.worker.delta_batch(), events).await;
                }
                Ok(ChatChunk::Finished { finish_reason, usage }) => {
                    deltas.flush(events).await;
                    return Ok(Reply { text, finish_reason, usage });
                }
                Err(e) => return Err((e, deltas.any_sent())),
            }
        }
        Err((
            LlmError::Transient {
                message: "the model's stream ended before the reply was complete".into(),
                retry_after: None,
            },
            deltas.any_sent(),
        ))
    }

    /// Runs a store operation until it succeeds. A store outage holds the session's queue
    /// rather than skipping ahead, so the session's order is kept; shutdown ends the wait. A
    /// fatal error is not retried: it ends the handling of the message.
    async fn store_call<T, F, Fut>(&self, op: F) -> Result<T, Halt>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let mut delay = Duration::from_millis(100);
        loop {
            match op().instrument(tracing::info_span!("store")).await {
                Ok(value) => return Ok(value),
                Err(e @ StoreError::Fatal(_)) => return Err(Halt::StoreRefused(e)),
                Err(e) => {
                    telemetry::store_retry();
                    tracing::warn!(event = "store_retry", error = %e, retry_in = ?delay, "store call failed; retrying");
                    self.pause(delay).await?;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Queues the outcome for delivery to the message's channel, if it came from one.
    async fn hand_to_channel(&self, event: &ReplyEvent) -> Result<(), Halt> {
        channel::hand_over(self.worker.bus.as_ref(), self.message, event, self.stop).await.map_err(|_| Halt::Stopped)
    }

    /// The terminal `error` event of this message's turn, as its announcement carries it.
    fn terminal_error(&self, code: ErrorCode, message: String) -> ReplyEvent {
        ReplyEvent {
            v: schemas::ENVELOPE_VERSION,
            event_id: EventId::terminal(self.turn.load(Ordering::Relaxed)),
            session_id: self.session().clone(),
            message_id: self.message.message_id.clone(),
            kind: ReplyEventKind::Error { code, message },
        }
    }

    async fn pause(&self, delay: Duration) -> Result<(), Halt> {
        tokio::select! {
            _ = tokio::time::sleep(delay) => Ok(()),
            _ = self.stop.cancelled() => Err(Halt::Stopped),
        }
    }
}

/// `message` as the store keeps it, and so as it reads back: its time in UTC to the
/// millisecond. `None` if the store could not keep it.
fn as_stored(message: &StoredMessage) -> Option<StoredMessage> {
    let utc = message.created_at.checked_to_offset(time::UtcOffset::UTC)?;
    let created_at = utc.replace_nanosecond(utc.nanosecond() / 1_000_000 * 1_000_000).ok()?;
    Some(StoredMessage { created_at, ..message.clone() })
}
