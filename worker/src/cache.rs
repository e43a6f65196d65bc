//! The sticky context cache: the recent messages of the sessions of the partitions this worker
//! owns, kept exactly as the store holds them, so that a session's next message needs no
//! history read.
//!
//! Only the partition's owner writes a session's messages, and it handles them one at a time,
//! so while ownership lasts the owner can keep its copy equal to the store by applying its own
//! writes. Ownership is what makes that true, so entries live no longer than it: each entry
//! belongs to one ownership of its partition (a partition runner's generation), and when that
//! ownership ends (revoked, lost, runner ended) its entries are dropped and writes through its
//! [`CacheScope`] are ignored from then on.
//!
//! One cache serves all the worker's partitions, so that one byte budget covers them all and the
//! least recently used sessions, whichever partition they are in, are evicted first.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use schemas::{Partition, SessionId};
use store::StoredMessage;

use crate::telemetry;

/// What a cached message costs beyond its text: ids, times and the other fields, plus the
/// cache's own bookkeeping. An estimate; it keeps many tiny messages from looking free.
pub const MESSAGE_OVERHEAD_BYTES: usize = 200;

/// The bytes `messages` are counted as.
pub fn size_of(messages: &[StoredMessage]) -> usize {
    messages.iter().map(|m| m.text.len() + MESSAGE_OVERHEAD_BYTES).sum()
}

/// The worker's cache of recent conversation history, bounded in bytes.
pub(crate) struct ContextCache {
    /// The byte budget; 0 disables the cache.
    limit: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<SessionId, Entry>,
    /// The sessions by last use, oldest first; the key is the entry's `used` tick.
    by_use: BTreeMap<u64, SessionId>,
    tick: u64,
    bytes: usize,
    /// For each partition, the ownership (runner generation) whose entries may exist now.
    owners: HashMap<Partition, u64>,
}

struct Entry {
    partition: Partition,
    generation: u64,
    messages: Vec<StoredMessage>,
    bytes: usize,
    used: u64,
}

impl ContextCache {
    pub(crate) fn new(limit_bytes: usize) -> Self {
        Self { limit: limit_bytes, inner: Mutex::new(Inner::default()) }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.limit > 0
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave an entry half-written that matters more
        // than a wrong byte count, and the cache is only ever an optimisation.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts an ownership of `partition`: whatever was cached for it before is dropped, since
    /// another worker may have changed its conversations meanwhile.
    pub(crate) fn open(self: &Arc<Self>, partition: Partition, generation: u64) -> CacheScope {
        if self.enabled() {
            let mut inner = self.lock();
            let before = inner.bytes;
            inner.drop_partition(partition);
            inner.owners.insert(partition, generation);
            telemetry::context_cache_resized(before, inner.bytes);
        }
        CacheScope { cache: self.clone(), partition, generation }
    }

    /// Ends an ownership of `partition` (revoked, lost, or its runner ended): its entries are
    /// dropped and its scope writes nothing more. Ending an ownership that a newer one has
    /// already replaced does nothing.
    pub(crate) fn close(&self, partition: Partition, generation: u64) {
        if !self.enabled() {
            return;
        }
        let mut inner = self.lock();
        if inner.owners.get(&partition) == Some(&generation) {
            let before = inner.bytes;
            inner.owners.remove(&partition);
            inner.drop_partition(partition);
            telemetry::context_cache_resized(before, inner.bytes);
        }
    }

    /// What is cached for `session`, without counting it as a use.
    pub(crate) fn peek(&self, session: &SessionId) -> Option<Vec<StoredMessage>> {
        self.lock().entries.get(session).map(|entry| entry.messages.clone())
    }

    /// The bytes cached now.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

impl Drop for ContextCache {
    fn drop(&mut self) {
        // The worker is gone: its share of the process's gauge goes with it.
        telemetry::context_cache_resized(self.lock().bytes, 0);
    }
}

impl Inner {
    fn remove(&mut self, session: &SessionId) {
        if let Some(entry) = self.entries.remove(session) {
            self.by_use.remove(&entry.used);
            self.bytes -= entry.bytes;
        }
    }

    fn drop_partition(&mut self, partition: Partition) {
        let doomed: Vec<SessionId> =
            self.entries.iter().filter(|(_, e)| e.partition == partition).map(|(s, _)| s.clone()).collect();
        for session in &doomed {
            self.remove(session);
        }
    }

    fn touch(&mut self, session: &SessionId) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(entry) = self.entries.get_mut(session) {
            self.by_use.remove(&entry.used);
            entry.used = tick;
            self.by_use.insert(tick, session.clone());
        }
    }
}

/// One ownership's view of the cache: what a partition runner and its sessions use.
#[derive(Clone)]
pub(crate) struct CacheScope {
    cache: Arc<ContextCache>,
    partition: Partition,
    generation: u64,
}

impl CacheScope {
    pub(crate) fn enabled(&self) -> bool {
        self.cache.enabled()
    }

    /// The session's cached history, counted as a hit or a miss.
    pub(crate) fn get(&self, session: &SessionId) -> Option<Vec<StoredMessage>> {
        if !self.enabled() {
            return None;
        }
        let mut inner = self.cache.lock();
        let found = inner
            .entries
            .get(session)
            .filter(|e| e.partition == self.partition && e.generation == self.generation)
            .map(|e| e.messages.clone());
        if found.is_some() {
            inner.touch(session);
            telemetry::context_cache_hit();
        } else {
            telemetry::context_cache_miss();
        }
        found
    }

    /// Caches `messages` as the session's history (what the store holds now), then evicts the
    /// least recently used sessions while over budget. Ignored once this ownership has ended.
    pub(crate) fn put(&self, session: &SessionId, messages: Vec<StoredMessage>) {
        if !self.enabled() {
            return;
        }
        let mut inner = self.cache.lock();
        if inner.owners.get(&self.partition) != Some(&self.generation) {
            return;
        }
        let before = inner.bytes;
        inner.remove(session);
        let bytes = size_of(&messages);
        // A history bigger than the whole budget would only evict everything, itself included.
        if bytes <= self.cache.limit {
            inner.tick += 1;
            let used = inner.tick;
            inner.by_use.insert(used, session.clone());
            inner.entries.insert(
                session.clone(),
                Entry { partition: self.partition, generation: self.generation, messages, bytes, used },
            );
            inner.bytes += bytes;
            while inner.bytes > self.cache.limit {
                let Some((_, oldest)) = inner.by_use.pop_first() else { break };
                if let Some(entry) = inner.entries.remove(&oldest) {
                    inner.bytes -= entry.bytes;
                }
            }
        }
        telemetry::context_cache_resized(before, inner.bytes);
    }

    /// Forgets the session: its next message reads the store.
    pub(crate) fn invalidate(&self, session: &SessionId) {
        if !self.enabled() {
            return;
        }
        let mut inner = self.cache.lock();
        let before = inner.bytes;
        inner.remove(session);
        telemetry::context_cache_resized(before, inner.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use store::Role;

    fn session(name: &str) -> SessionId {
        SessionId::parse(name).unwrap()
    }

    fn partition(n: u32) -> Partition {
        Partition::new(n)
    }

    /// A one-message history of `text_len` bytes of text.
    fn history(session_name: &str, text_len: usize) -> Vec<StoredMessage> {
        vec![StoredMessage {
            id: format!("m_{session_name}"),
            session_id: session(session_name),
            turn: 1,
            role: Role::User,
            text: "x".repeat(text_len),
            created_at: time::OffsetDateTime::UNIX_EPOCH,
            reply_to: None,
            finish_reason: None,
            usage: None,
            failure: None,
            starts: 1,
        }]
    }

    /// Room for exactly three one-message histories of 100 bytes of text.
    const THREE: usize = 3 * (100 + MESSAGE_OVERHEAD_BYTES);

    #[test]
    fn a_put_history_is_got_back_by_the_same_ownership() {
        let cache = Arc::new(ContextCache::new(THREE));
        let scope = cache.open(partition(0), 1);

        scope.put(&session("a"), history("a", 100));

        assert_eq!(scope.get(&session("a")), Some(history("a", 100)));
        assert_eq!(cache.bytes(), 100 + MESSAGE_OVERHEAD_BYTES);
    }

    #[test]
    fn the_least_recently_used_session_is_evicted_when_over_the_byte_budget() {
        let cache = Arc::new(ContextCache::new(THREE));
        let scope = cache.open(partition(0), 1);
        for name in ["a", "b", "c"] {
            scope.put(&session(name), history(name, 100));
        }
        // Using "a" makes "b" the least recently used.
        assert!(scope.get(&session("a")).is_some());

        scope.put(&session("d"), history("d", 100));

        assert!(scope.get(&session("b")).is_none());
        for name in ["a", "c", "d"] {
            assert!(scope.get(&session(name)).is_some(), "{name} should still be cached");
        }
        assert_eq!(cache.bytes(), THREE);
    }

    #[test]
    fn replacing_a_history_counts_only_its_new_size() {
        let cache = Arc::new(ContextCache::new(THREE));
        let scope = cache.open(partition(0), 1);

        scope.put(&session("a"), history("a", 100));
        scope.put(&session("a"), history("a", 50));

        assert_eq!(cache.bytes(), 50 + MESSAGE_OVERHEAD_BYTES);
    }

    #[test]
    fn a_history_bigger_than_the_whole_budget_is_not_kept_and_evicts_nothing() {
        let cache = Arc::new(ContextCache::new(THREE));
        let scope = cache.open(partition(0), 1);
        scope.put(&session("a"), history("a", 100));

        scope.put(&session("big"), history("big", THREE));

        assert!(scope.get(&session("big")).is_none());
        assert!(scope.get(&session("a")).is_some());
    }

    #[test]
    fn closing_a_partition_drops_its_sessions_and_keeps_the_others() {
        let cache = Arc::new(ContextCache::new(THREE));
        let first = cache.open(partition(0), 1);
        let second = cache.open(partition(1), 2);
        first.put(&session("a"), history("a", 100));
        second.put(&session("b"), history("b", 100));

        cache.close(partition(0), 1);

        assert!(cache.peek(&session("a")).is_none());
        assert!(second.get(&session("b")).is_some());
        assert_eq!(cache.bytes(), 100 + MESSAGE_OVERHEAD_BYTES);
    }

    #[test]
    fn an_ended_ownership_can_neither_write_nor_read() {
        let cache = Arc::new(ContextCache::new(THREE));
        let old = cache.open(partition(0), 1);
        cache.close(partition(0), 1);

        old.put(&session("a"), history("a", 100));

        assert!(cache.peek(&session("a")).is_none());
        // Owned again: the old ownership's late writes and reads stay out of the new one's way.
        let new = cache.open(partition(0), 2);
        new.put(&session("b"), history("b", 100));
        old.put(&session("c"), history("c", 100));
        assert!(old.get(&session("b")).is_none());
        assert!(cache.peek(&session("c")).is_none());
        assert!(new.get(&session("b")).is_some());
    }

    #[test]
    fn reacquiring_a_partition_drops_what_the_previous_ownership_cached() {
        let cache = Arc::new(ContextCache::new(THREE));
        let old = cache.open(partition(0), 1);
        old.put(&session("a"), history("a", 100));

        let new = cache.open(partition(0), 2);
        // The old runner ends after the new one started: that must not touch the new one.
        new.put(&session("b"), history("b", 100));
        cache.close(partition(0), 1);

        assert!(new.get(&session("a")).is_none());
        assert!(new.get(&session("b")).is_some());
    }

    #[test]
    fn invalidating_forgets_the_session() {
        let cache = Arc::new(ContextCache::new(THREE));
        let scope = cache.open(partition(0), 1);
        scope.put(&session("a"), history("a", 100));

        scope.invalidate(&session("a"));

        assert!(scope.get(&session("a")).is_none());
        assert_eq!(cache.bytes(), 0);
    }

    #[test]
    fn a_budget_of_zero_disables_the_cache() {
        let cache = Arc::new(ContextCache::new(0));
        let scope = cache.open(partition(0), 1);

        scope.put(&session("a"), history("a", 0));

        assert!(!scope.enabled());
        assert!(scope.get(&session("a")).is_none());
        assert_eq!(cache.bytes(), 0);
    }
}
