//! Quotas and rate limits per API key, per end user of a key and per session, held fleet-wide
//! by counters in the store, which every gateway replica shares (ARCHITECTURE.md, "Quotas").
//!
//! - Messages per minute: a counter per scope and fixed UTC minute, incremented atomically by
//!   whichever gateway accepts the message; a message that would pass the limit is refused and
//!   its increments taken back. Exact across any number of gateways within a minute (a client
//!   may send up to twice the limit in 60 s that straddle two minutes).
//! - Open streams: each gateway reports how many streams it holds per scope, as its own member
//!   of the scope's counter group, renewed every [`STREAM_REPORT_EVERY`] and expiring after
//!   [`STREAM_REPORT_TTL`]; a new stream is admitted if the group's total stays within the limit.
//!   A gateway that dies stops counting once its report expires.
//! - Sessions: a counter per scope, up at creation and down at deletion.
//! - Model tokens per day: the worker adds each reply's usage to the day's counters; a message
//!   is refused once the day's total reached the limit, so replies in flight can pass it by
//!   what they generate.
//!
//! A session created without a key (or before keys were configured) is not limited. Nothing
//! here costs anything for limits that are not configured.

pub mod keys;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use store::quota::{self, Scope};
use store::{Counter, SessionRecord, Store};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::telemetry;
pub use keys::{ApiKey, KeyRing, KeysError, Limits};

/// How often a gateway renews its open-stream reports.
pub const STREAM_REPORT_EVERY: Duration = Duration::from_secs(10);
/// How long an open-stream report counts if it is not renewed.
pub const STREAM_REPORT_TTL: Duration = Duration::from_secs(30);
/// How long a session counter is kept: as long as sessions are.
const SESSION_COUNTER_YEARS: i64 = 100;

/// A limit that refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceeded {
    pub code: schemas::ErrorCode,
    /// What was limited, for a person: "API key acme", "user u-1 of API key acme", "this session".
    pub scope: String,
    /// `key`, `user` or `session`, for metrics.
    pub kind: &'static str,
    pub limit: u64,
    pub retry_after: Duration,
}

/// The limits in force, and what this gateway counts of them.
pub(crate) struct Quotas {
    pub(crate) keys: KeyRing,
    store: Arc<dyn Store>,
    /// This gateway process, as a member of the open-stream counter groups.
    instance: String,
    /// Streams this gateway holds open, by counter group.
    streams: Mutex<HashMap<String, i64>>,
    /// One lock per counter group, so that this gateway's reports of a group reach the store in
    /// the order of its counts.
    reporting: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for Quotas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quotas").field("keys", &self.keys).field("instance", &self.instance).finish_non_exhaustive()
    }
}

impl Quotas {
    pub(crate) fn new(keys: KeyRing, store: Arc<dyn Store>) -> Self {
        Self {
            keys,
            store,
            instance: uuid::Uuid::new_v4().simple().to_string(),
            streams: Mutex::default(),
            reporting: Mutex::default(),
        }
    }

    /// The key a session's use counts against: None for a session created without one. A
    /// session whose key was revoked is refused.
    fn key_of(&self, record: &SessionRecord) -> Result<Option<ApiKey>, ApiError> {
        let Some(name) = &record.api_key else { return Ok(None) };
        if !self.keys.enforced() {
            return Ok(None);
        }
        self.keys.by_name(name).map(Some).ok_or(ApiError::ApiKeyRevoked)
    }

    /// Checks that `record`'s session may be used at all (its key was not revoked).
    pub(crate) fn check_session(&self, record: &SessionRecord) -> Result<(), ApiError> {
        self.key_of(record).map(drop)
    }

    /// Counts a session created with `key` for `user`; refused past the key's or the user's
    /// session limit. Undone by [`Quotas::session_deleted`].
    pub(crate) async fn admit_session(&self, key: &ApiKey, user: Option<&str>) -> Result<(), ApiError> {
        let expires = OffsetDateTime::now_utc() + time::Duration::days(365 * SESSION_COUNTER_YEARS);
        let mut counted = Vec::new();
        for (scope, limit) in scopes(key, user, |l| l.sessions) {
            let counter = quota::sessions(scope);
            let total = self.store.add_to_counter(&counter, 1, expires).await;
            let total = match total {
                Ok(total) => total,
                Err(e) => {
                    self.take_back(&counted, expires).await;
                    return Err(e.into());
                }
            };
            counted.push(counter);
            if let Some(limit) = limit
                && exceeds(total, limit)
            {
                self.take_back(&counted, expires).await;
                return Err(self.refuse(schemas::ErrorCode::SessionsExceeded, scope, limit, Duration::ZERO));
            }
        }
        Ok(())
    }

    /// Uncounts a deleted session.
    pub(crate) async fn session_deleted(&self, record: &SessionRecord) {
        let Some(name) = &record.api_key else { return };
        let expires = OffsetDateTime::now_utc() + time::Duration::days(365 * SESSION_COUNTER_YEARS);
        let mut scopes = vec![Scope::Key(name)];
        if let Some(user) = &record.user {
            scopes.push(Scope::User { key: name, user });
        }
        for scope in scopes {
            if let Err(e) = self.store.add_to_counter(&quota::sessions(scope), -1, expires).await {
                tracing::warn!(event = "session_uncount_failed", error = %e, "a deleted session is still counted");
            }
        }
    }

    /// Admits a message of `record`'s session against its key's, its user's and the
    /// session's own limits.
    pub(crate) async fn admit_message(&self, record: &SessionRecord) -> Result<(), ApiError> {
        let Some(key) = self.key_of(record)? else { return Ok(()) };
        let user = record.user.as_deref();
        let now = OffsetDateTime::now_utc();

        let day = quota::day(now);
        for (scope, limit) in scopes(&key, user, |l| l.tokens_per_day) {
            let Some(limit) = limit else { continue };
            let used = self.store.counter_total(&quota::tokens(scope, day).group, now).await?;
            if used >= i64::try_from(limit).unwrap_or(i64::MAX) {
                let midnight = (day + 1) * 86_400 - now.unix_timestamp();
                return Err(self.refuse(schemas::ErrorCode::TokensPerDayExceeded, scope, limit, secs(midnight)));
            }
        }

        let minute = now.unix_timestamp().div_euclid(60);
        let retry_after = secs((minute + 1) * 60 - now.unix_timestamp());
        let expires = OffsetDateTime::from_unix_timestamp((minute + 2) * 60).unwrap_or(now);
        let mut checks: Vec<(Counter, u64, schemas::ErrorCode, String)> = Vec::new();
        for (scope, limit) in scopes(&key, user, |l| l.messages_per_minute) {
            if let Some(limit) = limit {
                checks.push((
                    quota::messages(scope, minute),
                    limit,
                    schemas::ErrorCode::MessagesPerMinuteExceeded,
                    describe(scope),
                ));
            }
        }
        if let Some(limit) = key.session_messages_per_minute {
            checks.push((
                quota::session_messages(&record.id, minute),
                limit,
                schemas::ErrorCode::SessionMessagesPerMinuteExceeded,
                "this session".to_owned(),
            ));
        }
        let totals = futures::future::join_all(
            checks.iter().map(|(counter, ..)| self.store.add_to_counter(counter, 1, expires)),
        )
        .await;
        let counted: Vec<Counter> =
            checks.iter().zip(&totals).filter(|(_, total)| total.is_ok()).map(|((c, ..), _)| c.clone()).collect();
        let mut refusal = None;
        for ((_, limit, code, scope), total) in checks.iter().zip(totals) {
            match total {
                Err(e) => {
                    refusal = Some(ApiError::from(e));
                    break;
                }
                Ok(total) if exceeds(total, *limit) => {
                    let kind = if *code == schemas::ErrorCode::SessionMessagesPerMinuteExceeded {
                        "session"
                    } else if scope.starts_with("this user") {
                        "user"
                    } else {
                        "key"
                    };
                    refusal = Some(self.refuse_named(code.clone(), scope.clone(), kind, *limit, retry_after));
                    break;
                }
                Ok(_) => {}
            }
        }
        match refusal {
            Some(refusal) => {
                // A refused message takes no one's budget.
                self.take_back(&counted, expires).await;
                Err(refusal)
            }
            None => Ok(()),
        }
    }

    /// Admits a reply stream of `record`'s session against its key's and its user's open-stream
    /// limits; the slot is given back when the returned guard is dropped.
    pub(crate) async fn open_stream(self: &Arc<Self>, record: &SessionRecord) -> Result<StreamSlot, ApiError> {
        let Some(key) = self.key_of(record)? else { return Ok(StreamSlot::none()) };
        let mut held = Vec::new();
        for (scope, limit) in scopes(&key, record.user.as_deref(), |l| l.open_streams) {
            let Some(limit) = limit else { continue };
            let group = quota::open_streams_group(scope);
            match self.take_stream(&group, limit).await {
                Ok(()) => held.push(group),
                Err(e) => {
                    let e = match e {
                        Some(e) => e,
                        None => self.refuse(schemas::ErrorCode::OpenStreamsExceeded, scope, limit, secs(1)),
                    };
                    StreamSlot { quotas: Some(Arc::clone(self)), groups: held }.release_now().await;
                    return Err(e);
                }
            }
        }
        Ok(StreamSlot { quotas: Some(Arc::clone(self)), groups: held })
    }

    /// Takes a stream of `group` if its fleet-wide total stays within `limit`. `Err(None)`: the
    /// limit refused it.
    async fn take_stream(&self, group: &str, limit: u64) -> Result<(), Option<ApiError>> {
        let lock = self.report_lock(group);
        let _ordered = lock.lock().await;
        let count = self.local_streams(group, 1);
        let now = OffsetDateTime::now_utc();
        let reported = async {
            self.report(group, count, now).await?;
            self.store.counter_total(group, now).await
        };
        match reported.await {
            Ok(total) if !exceeds(total, limit) => Ok(()),
            outcome => {
                let count = self.local_streams(group, -1);
                if let Err(e) = self.report(group, count, OffsetDateTime::now_utc()).await {
                    tracing::warn!(event = "stream_report_failed", error = %e);
                }
                Err(outcome.err().map(ApiError::from))
            }
        }
    }

    async fn release_stream(&self, group: &str) {
        let lock = self.report_lock(group);
        let _ordered = lock.lock().await;
        let count = self.local_streams(group, -1);
        if let Err(e) = self.report(group, count, OffsetDateTime::now_utc()).await {
            // The renewal reports the right count again; until then the group counts one too many.
            tracing::warn!(event = "stream_report_failed", error = %e);
        }
    }

    fn local_streams(&self, group: &str, delta: i64) -> i64 {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let count = streams.entry(group.to_owned()).or_default();
        *count += delta;
        *count
    }

    fn report_lock(&self, group: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.reporting.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(locks.entry(group.to_owned()).or_default())
    }

    async fn report(&self, group: &str, count: i64, now: OffsetDateTime) -> Result<(), store::StoreError> {
        let expires = now + STREAM_REPORT_TTL;
        self.store.set_counter(&Counter::member(group, self.instance.as_str()), count, expires).await
    }

    /// Renews this gateway's open-stream reports until `closing`, and forgets groups it no
    /// longer holds streams of.
    pub(crate) async fn renew_stream_reports(self: Arc<Self>, closing: CancellationToken) {
        loop {
            tokio::select! {
                () = closing.cancelled() => return,
                () = tokio::time::sleep(STREAM_REPORT_EVERY) => {}
            }
            let groups: Vec<String> = self.streams.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
            for group in groups {
                let lock = self.report_lock(&group);
                let _ordered = lock.lock().await;
                let count = self.local_streams(&group, 0);
                if let Err(e) = self.report(&group, count, OffsetDateTime::now_utc()).await {
                    tracing::warn!(event = "stream_report_failed", error = %e);
                }
                if count == 0 {
                    self.streams.lock().unwrap_or_else(|e| e.into_inner()).retain(|g, c| g != &group || *c != 0);
                }
            }
        }
    }

    async fn take_back(&self, counters: &[Counter], expires: OffsetDateTime) {
        for counter in counters {
            if let Err(e) = self.store.add_to_counter(counter, -1, expires).await {
                tracing::warn!(event = "quota_take_back_failed", error = %e, "a refused request still counts");
            }
        }
    }

    fn refuse(&self, code: schemas::ErrorCode, scope: Scope<'_>, limit: u64, retry_after: Duration) -> ApiError {
        let kind = match scope {
            Scope::Key(_) => "key",
            Scope::User { .. } => "user",
        };
        self.refuse_named(code, describe(scope), kind, limit, retry_after)
    }

    fn refuse_named(
        &self,
        code: schemas::ErrorCode,
        scope: String,
        kind: &'static str,
        limit: u64,
        retry_after: Duration,
    ) -> ApiError {
        let exceeded = Exceeded { code, scope, kind, limit, retry_after };
        telemetry::limit_exceeded(&exceeded);
        ApiError::LimitExceeded(exceeded)
    }
}

/// The scopes of a key's limit chosen by `pick`: the key's own, then the user's when the
/// session has a user. Every scope is listed, limited or not.
fn scopes<'a>(
    key: &'a ApiKey,
    user: Option<&'a str>,
    pick: fn(&Limits) -> Option<u64>,
) -> Vec<(Scope<'a>, Option<u64>)> {
    let mut scopes = vec![(Scope::Key(&key.name), pick(&key.limits))];
    if let Some(user) = user {
        scopes.push((Scope::User { key: &key.name, user }, pick(&key.per_user)));
    }
    scopes
}

fn describe(scope: Scope<'_>) -> String {
    match scope {
        Scope::Key(key) => format!("API key {key}"),
        Scope::User { key, .. } => format!("this user of API key {key}"),
    }
}

fn exceeds(total: i64, limit: u64) -> bool {
    total > i64::try_from(limit).unwrap_or(i64::MAX)
}

fn secs(n: i64) -> Duration {
    Duration::from_secs(u64::try_from(n.max(1)).unwrap_or(1))
}

/// A reply stream's place within its open-stream limits; given back when dropped.
#[derive(Debug)]
pub(crate) struct StreamSlot {
    quotas: Option<Arc<Quotas>>,
    groups: Vec<String>,
}

impl StreamSlot {
    fn none() -> Self {
        Self { quotas: None, groups: Vec::new() }
    }

    async fn release_now(mut self) {
        if let Some(quotas) = self.quotas.take() {
            for group in std::mem::take(&mut self.groups) {
                quotas.release_stream(&group).await;
            }
        }
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let Some(quotas) = self.quotas.take() else { return };
        let groups = std::mem::take(&mut self.groups);
        if groups.is_empty() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                for group in groups {
                    quotas.release_stream(&group).await;
                }
            });
        }
    }
}
