//! A short-lived cache of session records, so that most per-session requests (a message, the
//! history, the events stream) need no store read to learn that their session exists.
//!
//! Why this is safe to cache: a session record never changes after it is created; the only
//! change it sees is its deletion. A cached record can therefore only ever be stale in one
//! way: it may still be there after the session was deleted.
//!
//! The staleness bound: the gateway that deletes a session evicts it from its own cache at
//! once, so its later requests for the session get 404. Another gateway replica may hold the
//! record for up to the time-to-live (`GatewayConfig::session_cache_ttl`, 2 seconds by
//! default) and, until it expires, keeps accepting messages for the deleted session. Those
//! messages are dropped by the worker, which reads the session from the store before
//! answering (it logs `session_gone` and sends an `error` event with code `session_not_found`);
//! so nothing is written for a deleted session, but within that window such a replica answers
//! `202` to a message that will never be answered (a streamed request ends with that error
//! event), lists an empty history rather than 404, and opens an events stream that stays
//! silent. A request whose
//! store read raced with a delete on the same gateway may put the record back just after the
//! eviction; the same time-to-live bounds that too.
//!
//! A zero time-to-live disables the cache: every lookup misses and nothing is kept, so every
//! request reads the store as before.

use std::time::Duration;

use moka::sync::Cache;
use schemas::SessionId;
use store::SessionRecord;

/// Most bytes of session records held (approximately, see [`weight`]). A session record is
/// at most about 4.5 KiB (4 KiB of metadata, a 128-character user), so this holds at least
/// some 14,000 sessions and typically far more; entries beyond it are evicted early, which
/// only costs store reads.
const MAX_BYTES: u64 = 64 * 1024 * 1024;

/// The longest time-to-live accepted; a longer one is cut to this. The bound keeps the
/// documented staleness meaningful (and the cache library refuses absurd durations).
pub(crate) const MAX_TTL: Duration = Duration::from_secs(60 * 60);

/// Session records by id, each kept for at most the time-to-live after it was inserted.
/// Cloning shares the cache.
#[derive(Clone)]
pub(crate) struct SessionCache {
    /// None when the cache is disabled (a zero time-to-live).
    records: Option<Cache<SessionId, SessionRecord>>,
}

impl std::fmt::Debug for SessionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionCache")
            .field("enabled", &self.records.is_some())
            .field("entries", &self.records.as_ref().map(Cache::entry_count))
            .finish()
    }
}

impl SessionCache {
    /// A cache keeping each record for `ttl` (at most [`MAX_TTL`]); a zero `ttl` disables it.
    pub(crate) fn new(ttl: Duration) -> Self {
        if ttl.is_zero() {
            return Self { records: None };
        }
        let records = Cache::builder()
            .max_capacity(MAX_BYTES)
            .weigher(|_: &SessionId, record: &SessionRecord| weight(record))
            // Time to live, not time to idle: the bound on staleness counts from when the
            // record was read from the store, however often it is used meanwhile.
            .time_to_live(ttl.min(MAX_TTL))
            .build();
        Self { records: Some(records) }
    }

    /// The cached record of `id`, if there is one younger than the time-to-live.
    pub(crate) fn get(&self, id: &SessionId) -> Option<SessionRecord> {
        self.records.as_ref()?.get(id)
    }

    /// Caches `record` exactly as the store holds it (a later [`store::Store::session`] read
    /// would return an equal value). Only existing sessions are cached, never an absence: a
    /// session created on another replica must be usable at once.
    pub(crate) fn insert(&self, record: SessionRecord) {
        if let Some(records) = &self.records {
            records.insert(record.id.clone(), record);
        }
    }

    /// Forgets `id`, so that the next lookup reads the store.
    pub(crate) fn remove(&self, id: &SessionId) {
        if let Some(records) = &self.records {
            records.invalidate(id);
        }
    }
}

/// Roughly how many bytes `record` takes, counting its strings and a share of overhead per
/// metadata entry; what the cache's byte budget is spent in.
fn weight(record: &SessionRecord) -> u32 {
    const PER_ENTRY: usize = 64;
    let metadata: usize = record.metadata.iter().map(|(k, v)| k.len() + v.len() + PER_ENTRY).sum();
    let bytes = std::mem::size_of::<SessionRecord>()
        + record.id.as_str().len()
        + record.user.as_ref().map_or(0, String::len)
        + metadata;
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use schemas::{DoubleTexting, SessionId};
    use store::SessionRecord;

    use super::SessionCache;

    fn record(id: &str) -> SessionRecord {
        SessionRecord {
            id: SessionId::parse(id.to_owned()).unwrap(),
            user: Some("u-1".into()),
            metadata: BTreeMap::from([("plan".to_owned(), "pro".to_owned())]),
            created_at: time::OffsetDateTime::now_utc().truncate_to_millisecond(),
            double_texting: DoubleTexting::Reject,
            api_key: None,
        }
    }

    #[test]
    fn an_inserted_record_is_returned_as_inserted() {
        let cache = SessionCache::new(Duration::from_secs(60));
        let session = record("s-hit");

        cache.insert(session.clone());

        assert_eq!(cache.get(&session.id), Some(session));
    }

    #[test]
    fn a_session_never_inserted_misses() {
        let cache = SessionCache::new(Duration::from_secs(60));
        cache.insert(record("s-other"));

        let found = cache.get(&record("s-missing").id);

        assert_eq!(found, None);
    }

    #[test]
    fn a_zero_ttl_disables_the_cache() {
        let cache = SessionCache::new(Duration::ZERO);
        let session = record("s-disabled");

        cache.insert(session.clone());
        cache.remove(&session.id);
        cache.insert(session.clone());

        assert_eq!(cache.get(&session.id), None);
    }

    #[test]
    fn a_removed_record_misses() {
        let cache = SessionCache::new(Duration::from_secs(60));
        let (gone, kept) = (record("s-gone"), record("s-kept"));
        cache.insert(gone.clone());
        cache.insert(kept.clone());

        cache.remove(&gone.id);

        assert_eq!(cache.get(&gone.id), None);
        assert_eq!(cache.get(&kept.id), Some(kept));
    }

    #[test]
    fn a_record_expires_after_the_ttl() {
        let cache = SessionCache::new(Duration::from_millis(30));
        let session = record("s-expiring");
        cache.insert(session.clone());

        std::thread::sleep(Duration::from_millis(60));

        assert_eq!(cache.get(&session.id), None);
    }

    #[test]
    fn an_absurd_ttl_is_cut_rather_than_refused() {
        let cache = SessionCache::new(Duration::MAX);
        let session = record("s-long");

        cache.insert(session.clone());

        assert_eq!(cache.get(&session.id), Some(session));
    }
}
