//! Partition ownership on NATS: leases in a JetStream key-value bucket, with the revision of a
//! lease's entry as its fencing token.
//!
//! The bucket `<PREFIX>_OWNERSHIP` holds `members.<worker>` (a heartbeat per live worker) and
//! `leases.<partition>` (the owner of each partition). Every member watches the whole bucket and
//! computes the same target assignment from the live members ([`crate::assign`]). A member:
//! - renews its own member key and every lease it holds each heartbeat, by compare-and-set on
//!   the revision it last wrote, so a lease someone else took can never be renewed;
//! - stops working on a partition `safety_margin` before its lease could expire when renewals
//!   fail, so it has stopped before another member may take the partition ([`OwnershipEvent::Lost`]);
//! - asks the worker to hand over a partition that the target gives to someone else
//!   ([`OwnershipEvent::Revoked`]) and deletes the lease once the worker has drained it;
//! - takes a partition the target gives it once the lease is free (deleted) or expired (not
//!   renewed for `lease_ttl`), by create or compare-and-set, then recreates the partition's
//!   consumer, so that every message the previous owner left unacknowledged is delivered again
//!   at once and in stream order before anything newer.
//!
//! Liveness is judged by when a member last *saw* a key change, on its own clock: a delayed
//! watcher only makes leases look younger, which errs on the safe side.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;
use schemas::subjects::Names;
use schemas::{Partition, WorkerId};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::NatsBus;
use crate::ownership::{Acquisitions, ChannelMembership, Command, Held, Holding, revoke_moved};
use crate::{BusError, Membership, OwnershipEvent, OwnershipSettings, assign, telemetry};

/// What a lease says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LeaseValue {
    pub(crate) owner: String,
}

pub(crate) async fn bucket(bus: &NatsBus) -> Result<kv::Store, BusError> {
    let name = bus.settings.names.ownership_bucket();
    if let Ok(store) = bus.js.get_key_value(&name).await {
        return Ok(store);
    }
    let config = kv::Config {
        bucket: name.clone(),
        description: "chatfleet partition leases and worker heartbeats".into(),
        history: 1,
        storage: async_nats::jetstream::stream::StorageType::File,
        num_replicas: bus.replicas,
        ..Default::default()
    };
    match bus.js.create_key_value(config).await {
        Ok(store) => Ok(store),
        // Another member may have created it meanwhile.
        Err(create_error) => bus
            .js
            .get_key_value(&name)
            .await
            .map_err(|_| BusError::Unavailable(format!("cannot open the ownership bucket {name}: {create_error}"))),
    }
}

pub(super) async fn join(
    bus: &NatsBus,
    worker_id: &WorkerId,
    settings: OwnershipSettings,
) -> Result<Box<dyn Membership>, BusError> {
    let kv = bucket(bus).await?;
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (commands_tx, commands_rx) = mpsc::unbounded_channel();
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let coordinator = Coordinator {
        bus: bus.clone(),
        kv,
        me: worker_id.clone(),
        settings,
        members: HashMap::new(),
        leases: BTreeMap::new(),
        revisions: HashMap::new(),
        synced: false,
        owned: BTreeMap::new(),
        acquisitions: Acquisitions::default(),
        releasing: 0,
        taking: BTreeSet::new(),
        take_backoff: HashMap::new(),
        renewing: false,
        leaving: false,
        worker_gone: false,
        events: events_tx,
        done: done_tx,
    };
    tokio::spawn(coordinator.run(commands_rx, done_rx));
    Ok(Box::new(ChannelMembership::new(events_rx, commands_tx)))
}

/// A key as last seen by this member.
#[derive(Debug, Clone)]
struct Seen<T> {
    value: T,
    revision: u64,
    /// When this member saw the key change, on its own clock.
    at: Instant,
}

/// A lease this member holds.
#[derive(Debug, Clone)]
struct Owned {
    /// The revision of our last write: the fencing token.
    revision: u64,
    /// The last moment this member may work on the partition unless it renews.
    valid_until: Instant,
    holding: Holding,
    /// Which acquisition of the partition this is ([`Acquisitions`]).
    acquisition: u64,
}

impl Held for Owned {
    fn holding(&mut self) -> &mut Holding {
        &mut self.holding
    }
}

/// Everything that drives the coordinator, handled in one place ([`Coordinator::handle`]).
enum Event {
    /// Time to beat, renew the leases and report the backlog.
    Tick,
    /// The watcher saw a change of the bucket, failed, or ended.
    Watched(Option<Result<kv::Entry, kv::WatcherError>>),
    /// The worker asked for something; `None` once the worker dropped its membership.
    Command(Option<Command>),
    /// One lease renewal came back.
    Renewed(Renewal),
    /// A round of renewals (and the member heartbeat) is over.
    RoundOver,
    /// An attempt to take a partition came back.
    Took(Take),
    /// The deletion of a released lease came back.
    Released(Release),
    /// An attempt to open the watcher came back.
    WatchOpened(Result<Box<kv::Watch>, String>),
}

/// The outcome of deleting a released lease.
struct Release {
    partition: Partition,
    /// The revision the delete named.
    revision: u64,
    outcome: Result<(), String>,
}

/// The outcome of renewing one lease.
struct Renewal {
    partition: Partition,
    /// The revision the renewal was written against.
    sent: u64,
    /// When the write was sent: the lease is good for `lease_ttl` from here at the most.
    started: Instant,
    outcome: Renewed,
}

enum Renewed {
    /// Written; the new fencing token.
    Yes(u64),
    /// The write failed, but the server holds a newer write of ours (an earlier renewal whose
    /// answer was lost, e.g. to a timeout): continue from that revision.
    Adopt(u64),
    No(String),
}

/// The outcome of trying to take one partition.
struct Take {
    partition: Partition,
    outcome: Taken,
}

enum Taken {
    /// The lease is ours and the consumer fresh; the lease is good from `valid_from`.
    Yes {
        revision: u64,
        valid_from: Instant,
    },
    /// Someone else's, or the mirror was behind: here is the key as the server has it.
    Busy(Option<kv::Entry>),
    No(String),
}

struct Coordinator {
    bus: NatsBus,
    kv: kv::Store,
    me: WorkerId,
    settings: OwnershipSettings,
    members: HashMap<String, Seen<()>>,
    leases: BTreeMap<Partition, Seen<String>>,
    /// The newest revision seen of each key: the watcher may deliver an older change after a
    /// newer one this member wrote itself, and an older change must never overwrite a newer.
    revisions: HashMap<String, u64>,
    /// True once the watcher has delivered the bucket's current state.
    synced: bool,
    owned: BTreeMap<Partition, Owned>,
    acquisitions: Acquisitions,
    /// Released leases whose deletion is under way: a leaving member waits for them, so that
    /// the next owners need not wait for the leases to expire.
    releasing: usize,
    /// Partitions an attempt to take is under way for.
    taking: BTreeSet<Partition>,
    /// Partitions whose last attempt to take failed: when to try again, and the failures in a
    /// row. Without the pause a broker that fails fast (a stream without a leader) would be
    /// asked again at once, thousands of times a second, by every worker.
    take_backoff: HashMap<Partition, (Instant, u32)>,
    /// A round of renewals is under way; the next waits for it.
    renewing: bool,
    leaving: bool,
    /// The worker dropped its membership: nobody drains or releases partitions any more.
    worker_gone: bool,
    events: mpsc::UnboundedSender<OwnershipEvent>,
    /// Where the coordinator's own background writes report back.
    done: mpsc::UnboundedSender<Event>,
}

impl Coordinator {
    /// The loop. Every call to the server runs in a task of its own and reports back as an
    /// [`Event`], so that a slow broker delays no renewal behind another and never keeps
    /// [`Coordinator::fence`] from stopping a partition in time: the loop itself never waits
    /// on the server, except for its last word when it leaves.
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>, mut done: mpsc::UnboundedReceiver<Event>) {
        let mut ticker = tokio::time::interval(self.settings.heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watch = None;
        // Whether an attempt to open the watcher is under way, or may start: at once when the
        // last watcher ended, else once per tick while the server refuses.
        let mut watch_opening = false;
        let mut watch_may_open = true;
        let mut lag_report = Instant::now();
        loop {
            if watch.is_none() && !watch_opening && watch_may_open {
                watch_opening = true;
                watch_may_open = false;
                let (kv, done) = (self.kv.clone(), self.done.clone());
                tokio::spawn(async move {
                    let opened = kv.watch_with_history(">").await.map(Box::new).map_err(|e| e.to_string());
                    let _ = done.send(Event::WatchOpened(opened));
                });
            }
            let event = tokio::select! {
                _ = ticker.tick() => Event::Tick,
                entry = next_entry(&mut watch) => Event::Watched(entry),
                command = commands.recv(), if !self.worker_gone => Event::Command(command),
                Some(event) = done.recv() => event,
            };
            match event {
                Event::Watched(None | Some(Err(_))) => {
                    watch = None;
                    watch_may_open = true;
                }
                Event::Tick => watch_may_open = true,
                _ => {}
            }
            if matches!(event, Event::Tick) && lag_report.elapsed() >= Duration::from_secs(5) {
                lag_report = Instant::now();
                self.report_lag();
            }
            if let Event::WatchOpened(opened) = event {
                watch_opening = false;
                watch = self.watch_opened(opened);
                continue;
            }
            self.handle(event);
            self.fence();
            if self.synced {
                self.act();
            }
            if self.leaving && self.owned.is_empty() && self.taking.is_empty() && self.releasing == 0 {
                let _ = self.kv.delete(self.bus.settings.names.member_key(self.me.as_str())).await;
                tracing::info!(event = "ownership_left", worker = %self.me, "left the deployment");
                return;
            }
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Tick => self.tick(),
            Event::Watched(Some(Ok(entry))) => self.observe(entry),
            Event::Watched(Some(Err(e))) => tracing::warn!(event = "ownership_watch_error", error = %e),
            Event::Watched(None) => tracing::warn!(event = "ownership_watch_ended"),
            Event::Command(Some(Command::Release { partition, acquisition })) => self.release(partition, acquisition),
            Event::Command(Some(Command::Leave)) => self.begin_leaving(),
            Event::Command(None) => self.worker_dropped(),
            Event::Renewed(renewal) => self.renewed(renewal),
            Event::RoundOver => self.renewing = false,
            Event::Took(take) => self.took(take),
            Event::Released(release) => self.released(release),
            Event::WatchOpened(_) => unreachable!("handled in the loop, which holds the watcher"),
        }
    }

    /// The watcher watches the whole bucket, starting with the current value of every key: a
    /// member that joins must learn of leases that will never change again (a crashed owner's),
    /// or it could never take them.
    fn watch_opened(&mut self, opened: Result<Box<kv::Watch>, String>) -> Option<kv::Watch> {
        match opened {
            Ok(watch) => {
                self.synced = false;
                Some(*watch)
            }
            Err(e) => {
                tracing::warn!(event = "ownership_watch_failed", error = %e);
                None
            }
        }
    }

    /// Records a change the watcher delivered; the mirror is current once it delivers a change
    /// with nothing pending behind it.
    fn observe(&mut self, entry: kv::Entry) {
        if entry.delta == 0 {
            self.synced = true;
        }
        self.learn(entry);
    }

    /// Records a key as the server has it (from the watcher or a read of our own).
    fn learn(&mut self, entry: kv::Entry) {
        let newest = self.revisions.entry(entry.key.clone()).or_default();
        if entry.revision <= *newest {
            return;
        }
        *newest = entry.revision;
        let now = Instant::now();
        let deleted = !matches!(entry.operation, kv::Operation::Put);
        if let Some(member) = self.bus.settings.names.member_of_key(&entry.key) {
            if deleted {
                self.members.remove(member);
            } else {
                self.members.insert(member.to_owned(), Seen { value: (), revision: entry.revision, at: now });
            }
        } else if let Some(partition) = self.bus.settings.names.partition_of_key(&entry.key) {
            if deleted {
                self.leases.remove(&partition);
            } else {
                match serde_json::from_slice::<LeaseValue>(&entry.value) {
                    Ok(lease) => {
                        self.leases.insert(partition, Seen { value: lease.owner, revision: entry.revision, at: now });
                    }
                    Err(e) => tracing::warn!(event = "bad_lease", key = %entry.key, error = %e),
                }
            }
        }
    }

    /// Notes a lease write of our own, so that the watcher's older news cannot overwrite it.
    fn record_own_lease(&mut self, partition: Partition, revision: u64) {
        self.leases.insert(partition, Seen { value: self.me.to_string(), revision, at: Instant::now() });
        let newest = self.revisions.entry(self.bus.settings.names.lease_key(partition)).or_default();
        *newest = (*newest).max(revision);
    }

    fn alive<T>(&self, seen: &Seen<T>) -> bool {
        seen.at.elapsed() < self.settings.lease_ttl
    }

    /// Live members, this one included unless it is leaving.
    fn live_members(&self) -> Vec<String> {
        let mut live: BTreeSet<String> =
            self.members.iter().filter(|(_, seen)| self.alive(seen)).map(|(m, _)| m.clone()).collect();
        if self.leaving {
            live.remove(self.me.as_str());
        } else {
            live.insert(self.me.to_string());
        }
        live.into_iter().collect()
    }

    /// Starts a round of renewals (with the member heartbeat) unless the last one is still
    /// under way, and forgets members long gone so that the bucket does not grow without bound.
    fn tick(&mut self) {
        if self.renewing {
            tracing::debug!(event = "renewal_round_slow", worker = %self.me, "the last round of renewals is still under way");
        } else {
            self.renewing = true;
            let leases: Vec<(Partition, u64)> = self.owned.iter().map(|(p, o)| (*p, o.revision)).collect();
            let round = RenewRound { kv: self.kv.clone(), names: self.bus.settings.names.clone(), me: self.me.clone() };
            tokio::spawn(round.run(!self.leaving, leases, self.done.clone()));
        }
        let stale: Vec<(String, u64)> = self
            .members
            .iter()
            .filter(|(m, seen)| m.as_str() != self.me.as_str() && seen.at.elapsed() > self.settings.lease_ttl * 20)
            .map(|(m, seen)| (m.clone(), seen.revision))
            .collect();
        for (member, revision) in stale {
            self.members.remove(&member);
            let (kv, key) = (self.kv.clone(), self.bus.settings.names.member_key(&member));
            tokio::spawn(async move {
                let _ = kv.delete_expect_revision(key, Some(revision)).await;
            });
        }
    }

    fn renewed(&mut self, renewal: Renewal) {
        let Some(owned) = self.owned.get_mut(&renewal.partition) else { return };
        if owned.revision != renewal.sent {
            // Released, lost or adopted since the renewal went out: it says nothing now.
            return;
        }
        let revision = match renewal.outcome {
            Renewed::Yes(revision) => {
                owned.valid_until = renewal.started + self.settings.lease_ttl - self.settings.safety_margin;
                revision
            }
            Renewed::Adopt(revision) => {
                tracing::info!(event = "lease_revision_adopted", worker = %self.me, partition = renewal.partition.get(), fence = revision, "a renewal whose answer was lost had been written");
                revision
            }
            Renewed::No(e) => {
                tracing::warn!(event = "lease_renewal_failed", worker = %self.me, partition = renewal.partition.get(), error = %e);
                return;
            }
        };
        owned.revision = revision;
        self.record_own_lease(renewal.partition, revision);
    }

    /// Gives up, at once, every partition whose lease may no longer be ours.
    fn fence(&mut self) {
        let now = Instant::now();
        // Someone else wrote the lease after our last write: it is theirs now.
        let lost: Vec<Partition> = self
            .owned
            .iter()
            .filter(|(p, owned)| {
                let taken =
                    self.leases.get(p).is_some_and(|l| l.revision > owned.revision && l.value != self.me.as_str());
                now >= owned.valid_until || taken
            })
            .map(|(p, _)| *p)
            .collect();
        for partition in lost {
            self.owned.remove(&partition);
            telemetry::partition_lost(&self.me, partition, self.owned.len(), "the lease may be gone");
            let _ = self.events.send(OwnershipEvent::Lost(partition));
        }
    }

    /// Moves towards the target assignment: hands over what the target gives to others, and
    /// starts taking what it gives to us once it is free.
    fn act(&mut self) {
        let members = self.live_members();
        let target = assign(self.bus.settings.partitions, &members);
        revoke_moved(&mut self.owned, &target, &self.me, &self.events);
        if self.leaving {
            return;
        }
        let wanted: Vec<Partition> = target
            .iter()
            .filter(|(p, owner)| {
                owner.as_str() == self.me.as_str()
                    && !self.owned.contains_key(p)
                    && !self.taking.contains(p)
                    && self.take_backoff.get(p).is_none_or(|(retry_at, _)| Instant::now() >= *retry_at)
            })
            .map(|(p, _)| *p)
            .collect();
        for partition in wanted {
            let seen = match self.leases.get(&partition) {
                None => None,
                Some(lease) if lease.value == self.me.as_str() || !self.alive(lease) => Some(lease.revision),
                Some(_) => continue,
            };
            self.taking.insert(partition);
            let (bus, kv, me, done) = (self.bus.clone(), self.kv.clone(), self.me.clone(), self.done.clone());
            tokio::spawn(async move {
                let outcome = take(&bus, &kv, &me, partition, seen).await;
                let _ = done.send(Event::Took(Take { partition, outcome }));
            });
        }
    }

    fn took(&mut self, take: Take) {
        let partition = take.partition;
        self.taking.remove(&partition);
        match take.outcome {
            Taken::Yes { revision, valid_from } => {
                self.take_backoff.remove(&partition);
                let valid_until = valid_from + self.settings.lease_ttl - self.settings.safety_margin;
                let acquisition = self.acquisitions.next(partition);
                self.owned.insert(partition, Owned { revision, valid_until, holding: Holding::Active, acquisition });
                self.record_own_lease(partition, revision);
                telemetry::partition_acquired(&self.me, partition, self.owned.len(), Some(revision));
                let _ = self.events.send(OwnershipEvent::Acquired(partition));
            }
            Taken::Busy(entry) => {
                tracing::debug!(event = "partition_busy", worker = %self.me, partition = partition.get());
                if let Some(entry) = entry {
                    self.learn(entry);
                }
            }
            Taken::No(e) => {
                // 100 ms, doubling up to the heartbeat, with jitter so that workers spread out.
                let failures = self.take_backoff.get(&partition).map_or(0, |(_, n)| *n) + 1;
                let pause = Duration::from_millis(100)
                    .saturating_mul(1 << failures.min(6))
                    .min(self.settings.heartbeat)
                    .mul_f64(rand::random_range(0.5..1.0));
                self.take_backoff.insert(partition, (Instant::now() + pause, failures));
                tracing::warn!(event = "partition_take_failed", worker = %self.me, partition = partition.get(), failures, retry_in = ?pause, error = %e)
            }
        }
    }

    /// Hands the partition over, if `acquisition` names the ownership we hold: stops renewing
    /// the lease and deletes it (by its revision, in the background), so that the next owner
    /// may take it at once. A release of an ownership that already ended is ignored: the
    /// partition may be ours again, with its `Acquired` still on its way to the worker.
    fn release(&mut self, partition: Partition, acquisition: u64) {
        if self.owned.get(&partition).is_none_or(|owned| owned.acquisition != acquisition) {
            tracing::debug!(event = "stale_release_ignored", worker = %self.me, partition = partition.get(), acquisition);
            return;
        }
        let owned = self.owned.remove(&partition).expect("checked above");
        telemetry::partition_released(&self.me, partition, self.owned.len());
        self.releasing += 1;
        let (kv, key, done) = (self.kv.clone(), self.bus.settings.names.lease_key(partition), self.done.clone());
        tokio::spawn(async move {
            let outcome = kv.delete_expect_revision(key, Some(owned.revision)).await.map_err(|e| e.to_string());
            let _ = done.send(Event::Released(Release { partition, revision: owned.revision, outcome }));
        });
    }

    fn released(&mut self, release: Release) {
        self.releasing -= 1;
        let Release { partition, revision, outcome } = release;
        match outcome {
            // Unless the mirror already knows of something newer (we took the partition again).
            Ok(()) => {
                if self.leases.get(&partition).is_some_and(|lease| lease.revision == revision) {
                    self.leases.remove(&partition);
                }
            }
            // The lease may still be on the server (a renewal moved it on, or the delete timed
            // out), so the mirror keeps it as last seen: should the partition come back to us
            // before the lease expires, we take it by its revision. Forgetting it here would
            // leave us trying to create a key that exists, and a read of it no newer than what
            // we saw would never be learnt again: the partition would stay with nobody for good.
            Err(e) => {
                tracing::warn!(event = "lease_release_failed", worker = %self.me, partition = partition.get(), error = %e, "the lease will expire instead")
            }
        }
    }

    fn begin_leaving(&mut self) {
        if self.leaving {
            return;
        }
        self.leaving = true;
        // Others stop counting on us at once and plan without us.
        let (kv, key) = (self.kv.clone(), self.bus.settings.names.member_key(self.me.as_str()));
        tokio::spawn(async move {
            let _ = kv.delete(key).await;
        });
        tracing::info!(event = "ownership_leaving", worker = %self.me, owned = self.owned.len(), "leaving the deployment");
    }

    /// The worker is gone without releasing its partitions: nothing of ours runs on them any
    /// more, so their leases go at once rather than after their lifetime.
    fn worker_dropped(&mut self) {
        self.worker_gone = true;
        self.begin_leaving();
        let owned: Vec<(Partition, u64)> = self.owned.iter().map(|(p, o)| (*p, o.acquisition)).collect();
        for (partition, acquisition) in owned {
            self.release(partition, acquisition);
        }
    }

    /// Publishes each owned partition's backlog as a metric, in the background.
    fn report_lag(&self) {
        let (bus, partitions): (NatsBus, Vec<Partition>) = (self.bus.clone(), self.owned.keys().copied().collect());
        tokio::spawn(async move {
            for partition in partitions {
                if let Ok(info) = super::consume::consumer_info(&bus, partition).await {
                    telemetry::partition_backlog(partition, Some(info.num_pending), Some(info.num_ack_pending as u64));
                }
            }
        });
    }
}

/// One round of heartbeat and renewals, run beside the coordinator's loop.
struct RenewRound {
    kv: kv::Store,
    names: Names,
    me: WorkerId,
}

impl RenewRound {
    /// Beats (unless leaving) and renews each lease by compare-and-set, all at once, reporting
    /// each renewal as soon as it is answered.
    async fn run(self, beat: bool, leases: Vec<(Partition, u64)>, done: mpsc::UnboundedSender<Event>) {
        let heartbeat = async {
            if beat {
                let value = serde_json::json!({"worker": self.me}).to_string();
                if let Err(e) = self.kv.put(self.names.member_key(self.me.as_str()), value.into()).await {
                    tracing::warn!(event = "heartbeat_failed", worker = %self.me, error = %e);
                }
            }
        };
        let mut renewals: futures::stream::FuturesUnordered<_> =
            leases.into_iter().map(|(partition, sent)| self.renew(partition, sent)).collect();
        let report = async {
            while let Some(renewal) = renewals.next().await {
                let _ = done.send(Event::Renewed(renewal));
            }
        };
        tokio::join!(heartbeat, report);
        let _ = done.send(Event::RoundOver);
    }

    async fn renew(&self, partition: Partition, sent: u64) -> Renewal {
        let key = self.names.lease_key(partition);
        let started = Instant::now();
        let outcome = match self.kv.update(&key, lease_value(&self.me), sent).await {
            Ok(revision) => Renewed::Yes(revision),
            Err(e) => match self.kv.entry(key).await {
                Ok(Some(current)) if current.revision > sent && is_lease_of(&current, &self.me) => {
                    Renewed::Adopt(current.revision)
                }
                _ => Renewed::No(e.to_string()),
            },
        };
        Renewal { partition, sent, started, outcome }
    }
}

/// Takes a partition: writes the lease (create when free, compare-and-set on the revision
/// seen when it looks dead, after checking that it has not changed since), recreates the
/// partition's consumer, and renews once more so that the lease is good from after the reset,
/// however long that took.
async fn take(bus: &NatsBus, kv: &kv::Store, me: &WorkerId, partition: Partition, seen: Option<u64>) -> Taken {
    let key = bus.settings.names.lease_key(partition);
    let busy = async || Taken::Busy(kv.entry(key.clone()).await.ok().flatten());
    let written = match seen {
        None => kv.create(&key, lease_value(me)).await.map_err(|e| e.to_string()),
        Some(revision) => {
            // The watcher may lag: before taking a lease that looks dead, ask the server whether
            // it changed since we last saw it.
            match kv.entry(key.clone()).await {
                Ok(Some(current)) if current.revision != revision => return Taken::Busy(Some(current)),
                Ok(_) => {}
                Err(e) => return Taken::No(format!("cannot read the lease: {e}")),
            }
            kv.update(&key, lease_value(me), revision).await.map_err(|e| e.to_string())
        }
    };
    let Ok(revision) = written else { return busy().await };
    if let Err(e) = super::consume::reset_consumer(bus, partition).await {
        // Without a fresh consumer the order guarantee cannot be kept: let the lease go and
        // try again later.
        let _ = kv.delete_expect_revision(&key, Some(revision)).await;
        return Taken::No(format!("cannot recreate the partition's consumer: {e}"));
    }
    let valid_from = Instant::now();
    match kv.update(&key, lease_value(me), revision).await {
        Ok(revision) => Taken::Yes { revision, valid_from },
        Err(e) => {
            let _ = kv.delete_expect_revision(&key, Some(revision)).await;
            Taken::No(format!("cannot renew the lease after taking it: {e}"))
        }
    }
}

fn is_lease_of(entry: &kv::Entry, worker: &WorkerId) -> bool {
    matches!(entry.operation, kv::Operation::Put)
        && serde_json::from_slice::<LeaseValue>(&entry.value).is_ok_and(|lease| lease.owner == worker.as_str())
}

async fn next_entry(watch: &mut Option<kv::Watch>) -> Option<Result<kv::Entry, kv::WatcherError>> {
    match watch {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}

fn lease_value(worker: &WorkerId) -> bytes::Bytes {
    serde_json::to_vec(&LeaseValue { owner: worker.to_string() }).unwrap_or_default().into()
}

/// Reads the bucket and the consumers: who is alive, who owns what, and the backlogs.
pub(super) async fn status(bus: &NatsBus) -> Result<crate::FleetStatus, BusError> {
    let kv = bucket(bus).await?;
    let ttl = bus.settings.ownership.lease_ttl.as_secs_f64();
    let now = time::OffsetDateTime::now_utc();
    let age = |entry: &kv::Entry| (now - entry.created).as_seconds_f64().max(0.0);
    let mut keys =
        kv.keys().await.map_err(|e| BusError::Unavailable(format!("cannot list the ownership bucket: {e}")))?;
    let mut workers = Vec::new();
    let mut owners: BTreeMap<u32, (String, u64)> = BTreeMap::new();
    while let Some(key) = keys.next().await {
        let Ok(key) = key else { continue };
        let Ok(Some(entry)) = kv.entry(key.clone()).await else { continue };
        if !matches!(entry.operation, kv::Operation::Put) || age(&entry) >= ttl {
            continue;
        }
        if let Some(worker) = bus.settings.names.member_of_key(&key) {
            workers.push(crate::WorkerStatus { worker: worker.to_owned(), seen_secs_ago: age(&entry) });
        } else if let Some(p) = bus.settings.names.partition_of_key(&key).map(|p| p.get())
            && let Ok(lease) = serde_json::from_slice::<LeaseValue>(&entry.value)
        {
            owners.insert(p, (lease.owner, entry.revision));
        }
    }
    workers.sort_by(|a, b| a.worker.cmp(&b.worker));
    let mut partitions = Vec::new();
    for partition in bus.settings.partitions.all() {
        let info = super::consume::consumer_info(bus, partition).await.ok();
        let owner = owners.get(&partition.get());
        partitions.push(crate::PartitionStatus {
            partition: partition.get(),
            owner: owner.map(|(o, _)| o.clone()),
            fence: owner.map(|(_, f)| *f),
            pending: info.as_ref().map(|i| i.num_pending),
            in_flight: info.as_ref().map(|i| i.num_ack_pending as u64),
        });
    }
    Ok(crate::FleetStatus { workers, partitions, dead_letters: None })
}
