//! Partition ownership on RabbitMQ: heartbeats on a fanout exchange for membership, the shared
//! assignment function for balance, and single active consumer for exclusivity.
//!
//! Every worker binds an exclusive queue to `<prefix>.members` and publishes a heartbeat there
//! every `heartbeat`: its id, the partitions it holds, and whether it is leaving. Every member
//! thus sees the same live members (heard from within `lease_ttl`) and computes the same target
//! with [`crate::assign`]. A member:
//! - takes a partition the target gives it once no live member's latest heartbeat says it holds
//!   it ([`OwnershipEvent::Acquired`]); a member that releases a partition beats at once, so a
//!   hand-over takes milliseconds. Should two members ever consume one queue at once (views
//!   differ for a moment), the broker still delivers to one of them only (single active
//!   consumer), and the other receives nothing until the first one's channel closes, which
//!   returns the first one's unsettled messages to the head of the queue before anything
//!   newer: exclusivity and order never rest on timing alone;
//! - hands over a partition the target gives to someone else ([`OwnershipEvent::Revoked`]): the
//!   worker drains it, releases it, and its channel closes;
//! - when its connection breaks, stops every partition at once ([`OwnershipEvent::Lost`]): the
//!   broker has already returned their messages for the next consumer.
//!
//! A crashed worker's connection closes with its process, so its queues pass at once to a
//! member already waiting on them; otherwise they move once its heartbeats have been missing for
//! `lease_ttl` and the target no longer names it. The broker's AMQP heartbeat bounds how long a
//! silent, unreachable worker may keep a queue.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Consumer};
use schemas::{Partition, WorkerId};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{AmqpBus, unavailable};
use crate::ownership::{Acquisitions, ChannelMembership, Command, Held, Holding, revoke_moved};
use crate::telemetry::{self, OWNED_PARTITIONS};
use crate::{BusError, Membership, OwnershipEvent, assign};

/// What a worker says of itself every heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Heartbeat {
    worker: String,
    /// Partitions it consumes, with how long it has held each, in milliseconds: of two workers
    /// consuming one queue during a hand-over, the one holding it longer is the active one.
    #[serde(default)]
    holding: Vec<(u32, u64)>,
    /// Deliveries of each held partition not yet settled.
    #[serde(default)]
    in_flight: Vec<(u32, u64)>,
    /// It is handing everything over and must no longer be given partitions.
    #[serde(default)]
    leaving: bool,
}

pub(super) async fn join(bus: &AmqpBus, worker_id: &WorkerId) -> Result<Box<dyn Membership>, BusError> {
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (commands_tx, commands_rx) = mpsc::unbounded_channel();
    let mut coordinator = Coordinator {
        bus: bus.clone(),
        me: worker_id.clone(),
        members: HashMap::new(),
        owned: BTreeMap::new(),
        acquisitions: Acquisitions::default(),
        leaving: false,
        events: events_tx,
        link: None,
        echoed: Instant::now(),
        answer: false,
    };
    // Fail the join, rather than retry in the background, if the broker is not there now.
    coordinator.connect().await?;
    tokio::spawn(coordinator.run(commands_rx));
    Ok(Box::new(ChannelMembership::new(events_rx, commands_tx)))
}

#[derive(Debug, Clone, Copy)]
struct Owned {
    since: Instant,
    holding: Holding,
    /// Which acquisition of the partition this is ([`Acquisitions`]).
    acquisition: u64,
}

impl Held for Owned {
    fn holding(&mut self) -> &mut Holding {
        &mut self.holding
    }
}

/// The channel heartbeats go out on and the consumer they come in on.
struct Link {
    channel: Channel,
    heartbeats: Consumer,
    /// When the link was set up: the member acts once it has heard the others.
    since: Instant,
}

/// A member's latest heartbeat.
struct Heard {
    at: Instant,
    leaving: bool,
    holding: Vec<u32>,
}

struct Coordinator {
    bus: AmqpBus,
    me: WorkerId,
    /// What each other member said last, and when.
    members: HashMap<String, Heard>,
    owned: BTreeMap<Partition, Owned>,
    acquisitions: Acquisitions,
    leaving: bool,
    events: mpsc::UnboundedSender<OwnershipEvent>,
    link: Option<Link>,
    /// When our own latest heartbeat came back through the exchange.
    echoed: Instant,
    /// A newcomer was heard: beat at once so that it learns of us.
    answer: bool,
}

impl Coordinator {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let settings = self.bus.settings().ownership.clone();
        let mut ticker = tokio::time::interval(settings.heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry_at = Instant::now();
        let mut lag_report = Instant::now();
        loop {
            if self.link.is_none()
                && Instant::now() >= retry_at
                && let Err(e) = self.connect().await
            {
                tracing::warn!(event = "ownership_link_failed", error = %e, "cannot reach RabbitMQ; retrying");
                retry_at = Instant::now() + Duration::from_millis(500);
            }
            tokio::select! {
                _ = ticker.tick() => {
                    self.heartbeat().await;
                    if lag_report.elapsed() >= Duration::from_secs(5) {
                        lag_report = Instant::now();
                        self.report_lag().await;
                    }
                }
                beat = next_heartbeat(&mut self.link) => match beat {
                    Some(beat) => self.observe(beat),
                    None => self.link_lost(),
                },
                command = commands.recv() => match command {
                    Some(Command::Release { partition, acquisition }) => self.release(partition, acquisition).await,
                    Some(Command::Leave) | None => self.begin_leaving().await,
                },
            }
            // Act on everything the broker has handed over, not on a view that a busy moment
            // left behind: a member that looks silent may only have beaten unread.
            while let Some(beat) = futures::FutureExt::now_or_never(next_heartbeat(&mut self.link)) {
                match beat {
                    Some(beat) => self.observe(beat),
                    None => self.link_lost(),
                }
            }
            if std::mem::take(&mut self.answer) {
                self.heartbeat().await;
            }
            self.fence();
            if self.synced() {
                self.act();
            }
            if self.leaving && self.owned.is_empty() {
                self.heartbeat().await;
                if let Some(link) = self.link.take() {
                    let _ = link.channel.close(200, "left".into()).await;
                }
                tracing::info!(event = "ownership_left", worker = %self.me, "left the deployment");
                return;
            }
        }
    }

    /// Binds a fresh heartbeat queue and announces this member.
    async fn connect(&mut self) -> Result<(), BusError> {
        let exchange = self.bus.settings().names.members_exchange();
        let (channel, _, heartbeats) =
            super::listen_queue(&self.bus, &exchange, Some(""), "listen to heartbeats").await?;
        self.link = Some(Link { channel, heartbeats, since: Instant::now() });
        self.echoed = Instant::now();
        // Announce at once: every member answers a newcomer with its own heartbeat, so that
        // this one knows the deployment within milliseconds.
        self.heartbeat().await;
        Ok(())
    }

    /// Whether this member has listened long enough to know the others.
    fn synced(&self) -> bool {
        let settle = self.bus.settings().ownership.heartbeat.min(Duration::from_millis(300));
        self.link.as_ref().is_some_and(|l| l.since.elapsed() >= settle)
    }

    fn link_lost(&mut self) {
        self.link = None;
        // The partition channels shared the broken connection: the broker has returned their
        // messages and may already deliver them elsewhere.
        let lost: Vec<Partition> = self.owned.keys().copied().collect();
        self.owned.clear();
        for partition in &lost {
            telemetry::partition_lost(&self.me, *partition, 0, "the connection to RabbitMQ was lost");
            let _ = self.events.send(OwnershipEvent::Lost(*partition));
        }
        metrics::gauge!(OWNED_PARTITIONS).set(0.0);
        self.members.clear();
    }

    async fn heartbeat(&mut self) {
        let Some(link) = self.link.as_ref() else { return };
        let beat = Heartbeat {
            worker: self.me.to_string(),
            holding: self.owned.iter().map(|(p, o)| (p.get(), o.since.elapsed().as_millis() as u64)).collect(),
            in_flight: self
                .owned
                .keys()
                .filter_map(|p| self.bus.in_flight(*p).map(|c| (p.get(), c.load(Ordering::Relaxed))))
                .collect(),
            leaving: self.leaving,
        };
        let payload = serde_json::to_vec(&beat).unwrap_or_default();
        let exchange = self.bus.settings().names.members_exchange();
        let published = link
            .channel
            .basic_publish(
                exchange.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                &payload,
                BasicProperties::default().with_expiration(self.expiration().into()),
            )
            .await;
        if let Err(e) = published {
            tracing::warn!(event = "heartbeat_failed", error = %e);
            self.link_lost();
        }
    }

    /// Heartbeats older than a lease are worthless: let the broker drop them.
    fn expiration(&self) -> String {
        self.bus.settings().ownership.lease_ttl.as_millis().to_string()
    }

    fn observe(&mut self, beat: Heartbeat) {
        if beat.worker == self.me.as_str() {
            // Our own heartbeat came back: the others have it too.
            self.echoed = Instant::now();
            return;
        }
        let known = self.members.contains_key(&beat.worker);
        let holding = beat.holding.iter().map(|(p, _)| *p).collect();
        self.members.insert(beat.worker.clone(), Heard { at: Instant::now(), leaving: beat.leaving, holding });
        if !known && !beat.leaving {
            self.answer = true;
        }
    }

    /// Gives up every partition at once when our own heartbeats have not come back for longer
    /// than the others wait before they count us dead (less a margin): they may be about to take
    /// our partitions.
    fn fence(&mut self) {
        let ownership = &self.bus.settings().ownership;
        if self.owned.is_empty() || self.echoed.elapsed() < ownership.lease_ttl - ownership.safety_margin {
            return;
        }
        for partition in std::mem::take(&mut self.owned).into_keys() {
            telemetry::partition_lost(&self.me, partition, 0, "our heartbeats are not getting through");
            let _ = self.events.send(OwnershipEvent::Lost(partition));
        }
        metrics::gauge!(OWNED_PARTITIONS).set(0.0);
    }

    /// Live members, this one included unless it is leaving.
    fn live_members(&self) -> Vec<String> {
        let ttl = self.bus.settings().ownership.lease_ttl;
        let mut live: Vec<String> = self
            .members
            .iter()
            .filter(|(_, heard)| !heard.leaving && heard.at.elapsed() < ttl)
            .map(|(m, _)| m.clone())
            .collect();
        if !self.leaving {
            live.push(self.me.to_string());
        }
        live
    }

    /// Moves towards the target assignment.
    fn act(&mut self) {
        let target = assign(self.bus.settings().partitions, &self.live_members());
        revoke_moved(&mut self.owned, &target, &self.me, &self.events);
        if self.leaving {
            return;
        }
        let ttl = self.bus.settings().ownership.lease_ttl;
        let held_elsewhere = |p: Partition| {
            self.members.values().any(|heard| heard.at.elapsed() < ttl && heard.holding.contains(&p.get()))
        };
        let free: Vec<Partition> = target
            .iter()
            .filter(|(p, owner)| {
                owner.as_str() == self.me.as_str() && !self.owned.contains_key(p) && !held_elsewhere(**p)
            })
            .map(|(p, _)| *p)
            .collect();
        for partition in free {
            let acquisition = self.acquisitions.next(partition);
            self.owned.insert(partition, Owned { since: Instant::now(), holding: Holding::Active, acquisition });
            telemetry::partition_acquired(&self.me, partition, self.owned.len(), None);
            let _ = self.events.send(OwnershipEvent::Acquired(partition));
        }
    }

    async fn release(&mut self, partition: Partition, acquisition: u64) {
        if self.owned.get(&partition).is_none_or(|owned| owned.acquisition != acquisition) {
            // An ownership that already ended (the connection broke); the partition may be ours
            // again, in a new ownership the worker has not started yet.
            tracing::debug!(event = "stale_release_ignored", worker = %self.me, partition = partition.get(), acquisition);
            return;
        }
        // The next owner may attach only once our channel has closed and so returned what we
        // left unsettled: then it receives those messages before anything newer.
        // Closing takes milliseconds; waiting is bounded well within a lease so that heartbeats
        // go on.
        let limit = self.bus.settings().ownership.safety_margin;
        if !self.bus.wait_channels_closed(partition, limit).await {
            tracing::warn!(event = "partition_channel_still_open", worker = %self.me, partition = partition.get(), "releasing a partition whose channel has not closed yet");
        }
        if self.owned.remove(&partition).is_some() {
            telemetry::partition_released(&self.me, partition, self.owned.len());
            // The next owner waits for our word that we no longer hold it.
            self.heartbeat().await;
        }
    }

    async fn begin_leaving(&mut self) {
        if self.leaving {
            return;
        }
        self.leaving = true;
        // Others plan without us at once.
        self.heartbeat().await;
        tracing::info!(event = "ownership_leaving", worker = %self.me, owned = self.owned.len(), "leaving the deployment");
    }

    /// Publishes each owned partition's backlog as metrics.
    async fn report_lag(&self) {
        for partition in self.owned.keys() {
            let ready = queue_counts(&self.bus, *partition).await.ok().map(|(ready, _)| u64::from(ready));
            let in_hand = self.bus.in_flight(*partition).map(|counter| counter.load(Ordering::Relaxed));
            telemetry::partition_backlog(*partition, ready, in_hand);
        }
    }
}

async fn next_heartbeat(link: &mut Option<Link>) -> Option<Heartbeat> {
    let Some(link) = link.as_mut() else {
        return std::future::pending().await;
    };
    loop {
        match link.heartbeats.next().await {
            Some(Ok(delivery)) => match serde_json::from_slice::<Heartbeat>(&delivery.data) {
                Ok(beat) => return Some(beat),
                Err(e) => tracing::warn!(event = "bad_heartbeat", error = %e),
            },
            Some(Err(e)) => {
                tracing::warn!(event = "heartbeat_link_error", error = %e);
                return None;
            }
            None => return None,
        }
    }
}

/// A queue's ready messages and consumers, by a passive declare on a throwaway channel (a
/// missing queue closes the channel).
async fn queue_counts(bus: &AmqpBus, partition: Partition) -> Result<(u32, u32), BusError> {
    count(bus, &bus.settings().names.partition_queue(partition)).await
}

async fn count(bus: &AmqpBus, queue: &str) -> Result<(u32, u32), BusError> {
    let connection = bus.connection().await?;
    let channel = connection.create_channel().await.map_err(unavailable("open a channel"))?;
    let declared = channel
        .queue_declare(queue.into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await
        .map_err(|e| BusError::Unavailable(format!("cannot inspect queue {queue}: {e}")));
    let _ = channel.close(200, "inspected".into()).await;
    let declared = declared?;
    Ok((declared.message_count(), declared.consumer_count()))
}

/// Listens to heartbeats for a while and reads the queues: who is alive, who owns what, the
/// backlogs and the dead letters.
pub(super) async fn status(bus: &AmqpBus) -> Result<crate::FleetStatus, BusError> {
    let settings = bus.settings();
    let exchange = settings.names.members_exchange();
    let (channel, _, mut consumer) = super::listen_queue(bus, &exchange, Some(""), "listen to heartbeats").await?;
    // Every live worker beats within one heartbeat interval; listen for a little longer.
    let listen = settings.ownership.heartbeat * 2 + Duration::from_millis(100);
    let started = Instant::now();
    let mut beats: BTreeMap<String, (Heartbeat, Instant)> = BTreeMap::new();
    while let Ok(Some(Ok(delivery))) = tokio::time::timeout_at(started + listen, consumer.next()).await {
        if let Ok(beat) = serde_json::from_slice::<Heartbeat>(&delivery.data) {
            beats.insert(beat.worker.clone(), (beat, Instant::now()));
        }
    }
    let _ = channel.close(200, "status read".into()).await;

    let mut workers = Vec::new();
    // Per partition, the holder that has held it longest: the broker's active consumer.
    let mut owners: BTreeMap<u32, (String, u64)> = BTreeMap::new();
    let mut in_flight: BTreeMap<u32, u64> = BTreeMap::new();
    for (worker, (beat, heard)) in &beats {
        if beat.leaving {
            continue;
        }
        workers.push(crate::WorkerStatus { worker: worker.clone(), seen_secs_ago: heard.elapsed().as_secs_f64() });
        for (partition, held_ms) in &beat.holding {
            let longer = owners.get(partition).is_none_or(|(_, other)| held_ms > other);
            if longer {
                owners.insert(*partition, (worker.clone(), *held_ms));
                if let Some((_, n)) = beat.in_flight.iter().find(|(p, _)| p == partition) {
                    in_flight.insert(*partition, *n);
                }
            }
        }
    }
    let mut partitions = Vec::new();
    for partition in settings.partitions.all() {
        let counts = queue_counts(bus, partition).await.ok();
        partitions.push(crate::PartitionStatus {
            partition: partition.get(),
            owner: owners.get(&partition.get()).map(|(w, _)| w.clone()),
            fence: None,
            pending: counts.map(|(ready, _)| u64::from(ready)),
            in_flight: in_flight.get(&partition.get()).copied(),
        });
    }
    let dead_letters = count(bus, &settings.names.dead_letters()).await.ok().map(|(n, _)| u64::from(n));
    Ok(crate::FleetStatus { workers, partitions, dead_letters })
}
