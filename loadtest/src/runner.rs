//! Runs a plan: starts every user on its schedule, sends their messages, gathers the figures
//! as replies complete, and checks the gateway's histories afterwards.
//!
//! The schedule is open loop. One scheduler task sleeps until each user's start, computed up
//! front from the run's start, and spawns that user; it never waits for an earlier user to
//! finish. Every latency is measured from when the message was due, not from when it was sent,
//! so a generator or a target that falls behind shows up in the figures instead of quietly
//! slowing the load down (coordinated omission).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until, timeout};

use crate::client::{Client, ErrorKind, Exchange, HistoryMessage, Reply, Session};
use crate::isolation::{Violations, check_reply};
use crate::plan::{self, Scenario, Target, TargetKind};
use crate::report::{
    Counts, Histograms, HistoryCheck, LatencySummaries, MessageRecord, Outcome, Problems, Report, TargetInfo,
    Throughput,
};

/// Everything a run needs to know.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub target: Target,
    pub scenario: Scenario,
    /// Names this run's markers and idempotency keys; see [`plan::new_run_id`].
    pub run_id: String,
    /// The words after the marker in every message.
    pub words: String,
    /// Characters of a message the model echoes at the start of its reply; 0 when it does not.
    pub echo_chars: usize,
    /// Longest wait for a complete reply, and for any other request.
    pub timeout: Duration,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

/// The words a message carries after its marker unless told otherwise.
pub const DEFAULT_WORDS: &str = "hello fleet, how are you today?";

/// Gateway histories fetched at once after a run.
const HISTORY_CONCURRENCY: usize = 32;

/// Runs the plan to the end, or until `shutdown` completes, and reports what it found.
///
/// Errors only for a run that cannot start: bad settings or an unreachable target. Everything
/// that goes wrong once it runs is counted in the report.
pub async fn run(config: &RunConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<Report> {
    plan::validate(&config.scenario, config.echo_chars, &config.run_id)?;
    let client = Client::new(config.target.clone(), config.timeout)?;
    client.check_reachable().await?;

    let planned = config.scenario.planned_messages();
    let progress = progress_bar(config.progress, planned);
    let in_flight = Arc::new(AtomicI64::new(0));
    let (updates, mut received) = mpsc::unbounded_channel();

    let start = Instant::now();
    let started_at = OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_default();
    let shared = Arc::new(UserContext { client, config: config.clone(), start, in_flight: in_flight.clone() });
    let scheduler = tokio::spawn(schedule_users(shared.clone(), config.scenario.start_offsets(), updates));

    let mut collector = Collector::new(planned);
    tokio::pin!(shutdown);
    let mut interrupted = false;
    loop {
        tokio::select! {
            update = received.recv() => {
                let Some(update) = update else { break };
                collector.absorb(update);
                progress.set_position(collector.finished);
                progress.set_message(format!(
                    "{} ok, {} failed, {} in flight",
                    collector.counts.answered,
                    collector.counts.failed,
                    in_flight.load(Ordering::Relaxed).max(0)
                ));
            }
            () = &mut shutdown, if !interrupted => {
                // Aborting the scheduler drops its set of user tasks, which aborts them; their
                // senders go with them and the loop ends once the last is gone.
                interrupted = true;
                scheduler.abort();
            }
        }
    }
    let duration = collector.last_finish.map_or_else(|| start.elapsed(), |end| end - start);
    progress.finish_and_clear();

    let mut history = HistoryCheck {
        applies: config.target.kind == TargetKind::Gateway && matches!(config.scenario, Scenario::Conversation { .. }),
        ..HistoryCheck::default()
    };
    if history.applies && !interrupted {
        check_histories(&shared.client, std::mem::take(&mut collector.sessions), &mut history, config.progress).await;
    }

    Ok(collector.into_report(config, started_at, duration, interrupted, history))
}

/// What every user task shares.
struct UserContext {
    client: Client,
    config: RunConfig,
    /// The instant every start offset counts from.
    start: Instant,
    in_flight: Arc<AtomicI64>,
}

/// What a user task tells the collector.
enum Update {
    Message {
        record: MessageRecord,
        gaps: Vec<Duration>,
        violations: Violations,
        problems: Vec<String>,
    },
    SessionCreated(Duration),
    /// A gateway conversation that ended, for the history check.
    Conversation(SessionLog),
}

/// What a gateway conversation sent and received, to compare with its history.
#[derive(Debug, Clone)]
pub struct SessionLog {
    pub session: Session,
    pub turns: Vec<TurnLog>,
}

/// One turn of a [`SessionLog`]: `reply` is `None` when the turn failed.
#[derive(Debug, Clone)]
pub struct TurnLog {
    pub text: String,
    pub message_id: Option<String>,
    pub reply: Option<String>,
}

/// Starts each user at its offset, never waiting for earlier users, then waits for them all.
async fn schedule_users(context: Arc<UserContext>, offsets: Vec<Duration>, updates: mpsc::UnboundedSender<Update>) {
    let mut users = JoinSet::new();
    for (user, offset) in (0u64..).zip(offsets) {
        let due = context.start + offset;
        // `sleep_until` an absolute instant, so a late wake-up for one user does not push back
        // the users after it.
        sleep_until(due).await;
        users.spawn(run_user(context.clone(), user, due, updates.clone()));
    }
    drop(updates);
    while users.join_next().await.is_some() {}
}

/// One user: a session on the gateway, then each turn in order.
async fn run_user(context: Arc<UserContext>, user: u64, due: Instant, updates: mpsc::UnboundedSender<Update>) {
    let config = &context.config;
    let turns = config.scenario.turns();
    let send = |update: Update| {
        // The collector only goes away when the run is over; nothing is left to tell then.
        let _ = updates.send(update);
    };
    let record = |turn: u32, due: Instant, lag: Duration, outcome: Outcome| MessageRecord {
        user,
        turn,
        scheduled: due - context.start,
        start_lag: lag,
        outcome,
    };

    let lag = due.elapsed();
    let session = match config.target.kind {
        TargetKind::Openai => None,
        TargetKind::Gateway => {
            let began = Instant::now();
            let label = format!("loadtest-{}-{user}", config.run_id);
            let created = timeout(config.timeout, context.client.create_session(&label)).await;
            match created.unwrap_or(Err(ErrorKind::Timeout)) {
                Ok(session) => {
                    send(Update::SessionCreated(began.elapsed()));
                    Some(session)
                }
                Err(kind) => {
                    let failed = Outcome::Failed { error: format!("create session: {kind}") };
                    send(Update::Message {
                        record: record(0, due, lag, failed),
                        gaps: Vec::new(),
                        violations: Violations::default(),
                        problems: Vec::new(),
                    });
                    for turn in 1..turns {
                        let not_sent = Outcome::NotSent { reason: "no session".into() };
                        send(Update::Message {
                            record: record(turn, due, Duration::ZERO, not_sent),
                            gaps: Vec::new(),
                            violations: Violations::default(),
                            problems: Vec::new(),
                        });
                    }
                    return;
                }
            }
        }
    };

    let marker_prefix = plan::marker_prefix(&config.run_id);
    let mut exchanges: Vec<Exchange> = Vec::new();
    let mut log = Vec::with_capacity(usize::try_from(turns).unwrap_or(0));
    let mut due = due;
    let mut lag = lag;
    for turn in 0..turns {
        if turn > 0 {
            sleep_until(due).await;
            lag = due.elapsed();
        }
        let text = plan::message_text(&config.run_id, user, turn, &config.words);
        context.in_flight.fetch_add(1, Ordering::Relaxed);
        let attempt = async {
            match &session {
                Some(session) => {
                    let key = plan::client_message_id(&config.run_id, user, turn);
                    context.client.gateway_message(session, &text, &key, due).await
                }
                None => context.client.openai_message(&exchanges, &text, due).await,
            }
        };
        let result = timeout(config.timeout, attempt).await.unwrap_or(Err(ErrorKind::Timeout));
        context.in_flight.fetch_sub(1, Ordering::Relaxed);

        match result {
            Ok(reply) => {
                let mut violations = check_reply(&reply.text, &text, user, &marker_prefix, config.echo_chars);
                violations.foreign_session += reply.foreign_session_events;
                let problems: Vec<String> =
                    reply.stream_problems.iter().map(|problem| format!("user {user} turn {turn}: {problem}")).collect();
                let Reply { first_token, total, gaps, tokens, resets, text: reply_text, message_id, .. } = reply;
                let outcome = Outcome::Answered {
                    first_token,
                    total,
                    tokens,
                    resets,
                    isolation_violations: violations.total(),
                    stream_problems: problems.len(),
                };
                send(Update::Message { record: record(turn, due, lag, outcome), gaps, violations, problems });
                log.push(TurnLog { text: text.clone(), message_id, reply: Some(reply_text.clone()) });
                exchanges.push(Exchange { user: text, assistant: reply_text });
            }
            Err(kind) => {
                let outcome = Outcome::Failed { error: kind.to_string() };
                send(Update::Message {
                    record: record(turn, due, lag, outcome),
                    gaps: Vec::new(),
                    violations: Violations::default(),
                    problems: Vec::new(),
                });
                // The user carries on with the next turn, as a person would after an error.
                log.push(TurnLog { text, message_id: None, reply: None });
            }
        }
        due = Instant::now() + config.scenario.think();
    }

    if let Some(session) = session
        && matches!(config.scenario, Scenario::Conversation { .. })
    {
        send(Update::Conversation(SessionLog { session, turns: log }));
    }
}

/// Gathers the figures as updates arrive.
struct Collector {
    planned: u64,
    counts: Counts,
    /// Messages done one way or another, for the progress bar.
    finished: u64,
    histograms: Histograms,
    errors: BTreeMap<String, u64>,
    isolation: Violations,
    stream_problems: Problems,
    records: Vec<MessageRecord>,
    sessions: Vec<SessionLog>,
    last_finish: Option<Instant>,
}

impl Collector {
    fn new(planned: u64) -> Self {
        Self {
            planned,
            counts: Counts { planned, ..Counts::default() },
            finished: 0,
            histograms: Histograms::default(),
            errors: BTreeMap::new(),
            isolation: Violations::default(),
            stream_problems: Problems::default(),
            records: Vec::with_capacity(usize::try_from(planned.min(1 << 20)).unwrap_or(0)),
            sessions: Vec::new(),
            last_finish: None,
        }
    }

    fn absorb(&mut self, update: Update) {
        match update {
            Update::SessionCreated(latency) => self.histograms.session_create.record(latency),
            Update::Conversation(log) => self.sessions.push(log),
            Update::Message { record, gaps, violations, problems } => {
                self.finished += 1;
                match &record.outcome {
                    Outcome::Answered { first_token, total, tokens, resets, .. } => {
                        self.counts.sent += 1;
                        self.counts.answered += 1;
                        self.counts.tokens += tokens;
                        self.counts.resets += u64::from(*resets);
                        if let Some(first_token) = first_token {
                            self.histograms.first_token.record(*first_token);
                        }
                        self.histograms.full_reply.record(*total);
                        self.histograms.start_lag.record(record.start_lag);
                        self.last_finish = Some(Instant::now());
                    }
                    Outcome::Failed { error } => {
                        self.counts.sent += 1;
                        self.counts.failed += 1;
                        *self.errors.entry(error.clone()).or_default() += 1;
                        self.histograms.start_lag.record(record.start_lag);
                        self.last_finish = Some(Instant::now());
                    }
                    Outcome::NotSent { .. } => self.counts.not_sent += 1,
                }
                for gap in gaps {
                    self.histograms.inter_token.record(gap);
                }
                self.isolation.add(&violations);
                for problem in problems {
                    self.stream_problems.add(problem);
                }
                self.records.push(record);
            }
        }
    }

    fn into_report(
        mut self,
        config: &RunConfig,
        started_at: String,
        duration: Duration,
        interrupted: bool,
        history: HistoryCheck,
    ) -> Report {
        // Messages an interruption kept from being sent have no record; they count as not sent.
        self.counts.not_sent = self.planned.saturating_sub(self.counts.answered + self.counts.failed);
        self.records.sort_by_key(|record| (record.user, record.turn));
        let seconds = duration.as_secs_f64();
        let per_second = |count: u64| if seconds > 0.0 { count as f64 / seconds } else { 0.0 };
        let histograms = self.histograms;
        let mut report = Report {
            run_id: config.run_id.clone(),
            scenario: config.scenario.clone(),
            target: TargetInfo {
                kind: config.target.kind,
                url: config.target.url.clone(),
                model: (config.target.kind == TargetKind::Openai).then(|| config.target.model.clone()),
            },
            started_at,
            duration,
            interrupted,
            counts: self.counts,
            throughput: Throughput {
                messages_per_s: per_second(self.counts.answered),
                tokens_per_s: per_second(self.counts.tokens),
            },
            latency: LatencySummaries {
                first_token: histograms.first_token.summary(),
                full_reply: histograms.full_reply.summary(),
                inter_token: histograms.inter_token.summary(),
                session_create: histograms.session_create.summary(),
                start_lag: histograms.start_lag.summary(),
            },
            errors: self.errors,
            isolation: self.isolation,
            stream_problems: self.stream_problems,
            history,
            passed: false,
            records: self.records,
            histograms,
        };
        report.passed = report.compute_passed();
        report
    }
}

/// Fetches each finished gateway conversation's history and compares it with the log.
async fn check_histories(client: &Client, sessions: Vec<SessionLog>, check: &mut HistoryCheck, show_progress: bool) {
    let (complete, incomplete): (Vec<_>, Vec<_>) =
        sessions.into_iter().partition(|log| log.turns.iter().all(|turn| turn.reply.is_some()));
    check.skipped = incomplete.len() as u64;
    let progress = progress_bar(show_progress, complete.len() as u64);
    progress.set_message("histories checked");
    let mut results = futures::stream::iter(complete)
        .map(|log| async move {
            let outcome = match client.history(&log.session).await {
                Ok(history) => compare_history(&log, &history),
                Err(kind) => Err(format!("fetching the history failed: {kind}")),
            };
            (log.session.id, outcome)
        })
        .buffer_unordered(HISTORY_CONCURRENCY);
    while let Some((session_id, outcome)) = results.next().await {
        check.checked += 1;
        progress.inc(1);
        if let Err(problem) = outcome {
            check.problems.add(format!("session {session_id}: {problem}"));
        }
    }
    progress.finish_and_clear();
}

/// Checks that a history holds exactly the conversation that was had: each message sent, in
/// order, each followed by its reply. The first discrepancy is the error.
pub fn compare_history(log: &SessionLog, history: &[HistoryMessage]) -> Result<(), String> {
    let expected = log.turns.len() * 2;
    if history.len() != expected {
        return Err(format!("{} messages where {expected} were expected", history.len()));
    }
    for (turn, (pair, sent)) in history.chunks(2).zip(&log.turns).enumerate() {
        let [question, answer] = pair else { return Err(format!("turn {turn} has no reply")) };
        if question.role != "user" {
            return Err(format!("turn {turn} begins with a {} message", question.role));
        }
        if question.text != sent.text {
            return Err(format!("turn {turn}'s message is {:?}, but {:?} was sent", question.text, sent.text));
        }
        if let Some(message_id) = &sent.message_id
            && &question.message_id != message_id
        {
            let stored = &question.message_id;
            return Err(format!("turn {turn}'s message id is {stored}, but its reply events named {message_id}"));
        }
        if answer.role != "assistant" {
            return Err(format!("turn {turn}'s message is followed by a {} message", answer.role));
        }
        if answer.reply_to.as_deref() != Some(question.message_id.as_str()) {
            return Err(format!(
                "turn {turn}'s reply answers {}, not {}",
                answer.reply_to.as_deref().unwrap_or("nothing"),
                question.message_id
            ));
        }
        if Some(&answer.text) != sent.reply.as_ref() {
            return Err(format!("turn {turn}'s stored reply differs from the streamed one"));
        }
    }
    Ok(())
}

fn progress_bar(show: bool, length: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(length), ProgressDrawTarget::stderr());
    // The bar takes what the counts leave of the terminal's width, so the line never wraps.
    if let Ok(style) = ProgressStyle::with_template("{elapsed_precise} [{wide_bar}] {pos}/{len} {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    // Redraws the elapsed time while nothing completes, so a stalled target is visible.
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log() -> SessionLog {
        SessionLog {
            session: Session { id: "s_1".into(), token: "t".into() },
            turns: vec![
                TurnLog { text: "one".into(), message_id: Some("m1".into()), reply: Some("r1".into()) },
                TurnLog { text: "two".into(), message_id: Some("m2".into()), reply: Some("r2".into()) },
            ],
        }
    }

    fn message(id: &str, role: &str, text: &str, reply_to: Option<&str>) -> HistoryMessage {
        HistoryMessage {
            message_id: id.into(),
            role: role.into(),
            text: text.into(),
            reply_to: reply_to.map(Into::into),
        }
    }

    #[test]
    fn a_complete_history_in_order_passes() {
        let history = [
            message("m1", "user", "one", None),
            message("a1", "assistant", "r1", Some("m1")),
            message("m2", "user", "two", None),
            message("a2", "assistant", "r2", Some("m2")),
        ];

        assert_eq!(compare_history(&log(), &history), Ok(()));
    }

    #[test]
    fn a_history_missing_a_reply_is_a_problem() {
        let history = [
            message("m1", "user", "one", None),
            message("m2", "user", "two", None),
            message("a2", "assistant", "r2", Some("m2")),
        ];

        assert!(compare_history(&log(), &history).is_err());
    }

    #[test]
    fn a_history_with_swapped_turns_is_a_problem() {
        let history = [
            message("m2", "user", "two", None),
            message("a2", "assistant", "r2", Some("m2")),
            message("m1", "user", "one", None),
            message("a1", "assistant", "r1", Some("m1")),
        ];

        let problem = compare_history(&log(), &history).unwrap_err();

        assert!(problem.contains("turn 0"), "{problem}");
    }

    #[test]
    fn a_reply_pointing_at_the_wrong_message_is_a_problem() {
        let history = [
            message("m1", "user", "one", None),
            message("a1", "assistant", "r1", Some("m2")),
            message("m2", "user", "two", None),
            message("a2", "assistant", "r2", Some("m2")),
        ];

        assert!(compare_history(&log(), &history).unwrap_err().contains("answers m2"));
    }
}
