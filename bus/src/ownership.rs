//! What every bus shares about partition ownership: the settings and the assignment function.
//!
//! The assignment is a pure function of the live members, so every worker that sees the same
//! members computes the same owners without talking to the others: capacity-bounded
//! rendezvous hashing. Each partition goes to the member with the highest hash score among
//! those not yet holding their share, which keeps every member within its fair share plus one
//! and moves few partitions when a member joins or leaves.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_trait::async_trait;
use schemas::{Partition, PartitionCount, WorkerId, fnv1a_32};
use tokio::sync::mpsc;

use crate::{Membership, OwnershipEvent, telemetry};

/// Timing of the ownership protocol.
#[derive(Debug, Clone)]
pub struct OwnershipSettings {
    /// How often a member says it is alive and renews its leases.
    pub heartbeat: Duration,
    /// A member or lease not renewed for this long is dead; a crashed worker's partitions move
    /// after about this long.
    pub lease_ttl: Duration,
    /// An owner stops working on a partition this long before its lease could expire, so
    /// that it has stopped before anyone else may start.
    pub safety_margin: Duration,
}

impl Default for OwnershipSettings {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(500),
            lease_ttl: Duration::from_secs(3),
            safety_margin: Duration::from_millis(750),
        }
    }
}

impl OwnershipSettings {
    /// Settings for a lease lifetime, with heartbeats and margin scaled to it.
    pub fn with_lease_ttl(lease_ttl: Duration) -> Self {
        let lease_ttl = lease_ttl.max(Duration::from_millis(600));
        Self { heartbeat: lease_ttl / 6, lease_ttl, safety_margin: lease_ttl / 4 }
    }
}

/// What a worker asks of its bus's ownership coordinator.
pub(crate) enum Command {
    /// Hand over the partition as held since its acquisition number `acquisition`.
    Release {
        partition: Partition,
        acquisition: u64,
    },
    Leave,
}

/// A [`Membership`] that talks to a coordinator task over channels: how both brokers' protocols
/// hand their events to the worker.
///
/// Events and commands cross in flight: a worker may release a partition for an ownership that
/// has already ended, after the coordinator lost it and took it again, with the new
/// [`OwnershipEvent::Acquired`] still on its way. Handing over the new ownership would leave the
/// worker consuming a partition the coordinator no longer holds. So each release names the
/// ownership it ends: the number of `Acquired` events of its partition the worker had read
/// (counted here, as they pass), which the coordinator compares with the number it sent
/// ([`Acquisitions`]) and ignores the release on a mismatch.
pub(crate) struct ChannelMembership {
    events: mpsc::UnboundedReceiver<OwnershipEvent>,
    commands: mpsc::UnboundedSender<Command>,
    /// `Acquired` events read so far, per partition.
    acquired: HashMap<Partition, u64>,
}

impl ChannelMembership {
    pub(crate) fn new(
        events: mpsc::UnboundedReceiver<OwnershipEvent>,
        commands: mpsc::UnboundedSender<Command>,
    ) -> Self {
        Self { events, commands, acquired: HashMap::new() }
    }
}

#[async_trait]
impl Membership for ChannelMembership {
    async fn next(&mut self) -> Option<OwnershipEvent> {
        let event = self.events.recv().await;
        if let Some(OwnershipEvent::Acquired(partition)) = event {
            *self.acquired.entry(partition).or_default() += 1;
        }
        event
    }

    async fn release(&mut self, partition: Partition) {
        let acquisition = self.acquired.get(&partition).copied().unwrap_or_default();
        let _ = self.commands.send(Command::Release { partition, acquisition });
    }

    async fn leave(&mut self) {
        let _ = self.commands.send(Command::Leave);
    }
}

/// The coordinator's side of [`ChannelMembership`]'s count: how many times it has sent
/// [`OwnershipEvent::Acquired`] for each partition.
#[derive(Debug, Default)]
pub(crate) struct Acquisitions(HashMap<Partition, u64>);

impl Acquisitions {
    /// Counts a new acquisition of `partition` and returns its number, which a release of this
    /// ownership will name.
    pub(crate) fn next(&mut self, partition: Partition) -> u64 {
        let count = self.0.entry(partition).or_default();
        *count += 1;
        *count
    }
}

/// How a coordinator holds a partition it owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Holding {
    Active,
    /// Revoked; the worker is draining it.
    Revoking,
}

/// What every coordinator keeps of a partition it owns.
pub(crate) trait Held {
    fn holding(&mut self) -> &mut Holding;
}

/// Starts handing over every partition held actively that the target gives to someone else:
/// marks it revoking and tells the worker, once. The same step on every bus.
pub(crate) fn revoke_moved<T: Held>(
    owned: &mut BTreeMap<Partition, T>,
    target: &BTreeMap<Partition, String>,
    me: &WorkerId,
    events: &mpsc::UnboundedSender<OwnershipEvent>,
) {
    for (partition, held) in owned.iter_mut() {
        let holding = held.holding();
        if *holding == Holding::Active && target.get(partition).map(String::as_str) != Some(me.as_str()) {
            *holding = Holding::Revoking;
            telemetry::partition_revoked(me, *partition);
            let _ = events.send(OwnershipEvent::Revoked(*partition));
        }
    }
}

/// Which member should own each partition, given the live members. Deterministic; every
/// member gets `ceil(partitions / members)` at most.
pub fn assign(partitions: PartitionCount, members: &[String]) -> BTreeMap<Partition, String> {
    let mut owners = BTreeMap::new();
    if members.is_empty() {
        return owners;
    }
    let mut sorted: Vec<&String> = members.iter().collect();
    sorted.sort();
    sorted.dedup();
    let cap = (partitions.get() as usize).div_ceil(sorted.len());
    let mut load: BTreeMap<&String, usize> = sorted.iter().map(|m| (*m, 0)).collect();
    for partition in partitions.all() {
        let mut ranked: Vec<(u32, &String)> = sorted.iter().map(|m| (score(m, partition), *m)).collect();
        // Highest score first; ties broken by name so every member agrees.
        ranked.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
        if let Some((_, member)) = ranked.into_iter().find(|(_, m)| load[m] < cap) {
            *load.get_mut(member).expect("every member has a load") += 1;
            owners.insert(partition, member.clone());
        }
    }
    owners
}

fn score(member: &str, partition: Partition) -> u32 {
    // Mix the partition in after the member name so that scores differ per partition.
    let mut bytes = member.as_bytes().to_vec();
    bytes.push(0);
    bytes.extend_from_slice(&partition.get().to_be_bytes());
    let h = fnv1a_32(&bytes);
    // A final avalanche step: FNV's low bits vary little for similar inputs.
    let h = (h ^ (h >> 16)).wrapping_mul(0x7feb_352d);
    let h = (h ^ (h >> 15)).wrapping_mul(0x846c_a68b);
    h ^ (h >> 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("worker-{i}")).collect()
    }

    #[test]
    fn every_partition_has_exactly_one_owner() {
        let p = PartitionCount::new(16).unwrap();
        for n in 1..=20 {
            let owners = assign(p, &members(n));
            assert_eq!(owners.len(), 16, "{n} members");
        }
    }

    #[test]
    fn no_member_holds_more_than_its_fair_share_plus_one() {
        for (partitions, n) in [(16, 3), (16, 5), (64, 7), (10, 4), (3, 5)] {
            let owners = assign(PartitionCount::new(partitions).unwrap(), &members(n));
            let mut load: BTreeMap<&String, usize> = BTreeMap::new();
            for m in owners.values() {
                *load.entry(m).or_default() += 1;
            }
            let fair = partitions as usize / n;
            assert!(load.values().all(|&l| l <= fair + 1), "{partitions}/{n}: {load:?}");
            if partitions as usize >= n {
                assert_eq!(load.len(), n, "every member gets work: {load:?}");
            }
        }
    }

    #[test]
    fn every_member_computes_the_same_assignment_whatever_the_order() {
        let p = PartitionCount::new(32).unwrap();
        let mut shuffled = members(5);
        shuffled.reverse();
        assert_eq!(assign(p, &members(5)), assign(p, &shuffled));
    }

    #[test]
    fn a_joining_member_moves_few_partitions() {
        let p = PartitionCount::new(64).unwrap();
        let before = assign(p, &members(4));
        let after = assign(p, &members(5));
        let moved = before.iter().filter(|(k, v)| after[*k] != **v).count();
        // The newcomer needs about 64 / 5 = 13; a full reshuffle would move about 51.
        assert!(moved <= 30, "{moved} partitions moved");
    }
}
