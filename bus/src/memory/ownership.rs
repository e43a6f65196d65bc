//! Partition ownership among the workers of one process: the same assignment and hand-over
//! rules as the brokers' protocol, kept in a table instead of leases.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use schemas::{Partition, PartitionCount};
use tokio::sync::mpsc;

use super::Inner;
use crate::{Membership, OwnershipEvent, assign};

#[derive(Default)]
pub(super) struct Registry {
    partitions: Option<PartitionCount>,
    /// Joined members and where their events go.
    members: HashMap<String, mpsc::UnboundedSender<OwnershipEvent>>,
    /// The current owner of each owned partition.
    owners: BTreeMap<Partition, String>,
    /// Partitions revoked and not yet released.
    revoking: BTreeMap<Partition, String>,
    /// Members leaving; their event channel closes once they hold nothing.
    leaving: HashMap<String, mpsc::UnboundedSender<OwnershipEvent>>,
}

impl Registry {
    pub(super) fn join(&mut self, member: &str, partitions: PartitionCount) -> mpsc::UnboundedReceiver<OwnershipEvent> {
        self.partitions = Some(partitions);
        let (tx, rx) = mpsc::unbounded_channel();
        self.members.insert(member.to_owned(), tx);
        self.rebalance();
        rx
    }

    pub(super) fn leave(&mut self, member: &str) {
        if let Some(tx) = self.members.remove(member) {
            // Revoke everything it holds; the channel closes once it has released all.
            for (partition, owner) in &self.owners {
                if owner == member && !self.revoking.contains_key(partition) {
                    self.revoking.insert(*partition, owner.clone());
                    let _ = tx.send(OwnershipEvent::Revoked(*partition));
                }
            }
            self.leaving.insert(member.to_owned(), tx);
        }
        self.close_finished();
        self.rebalance();
    }

    pub(super) fn release(&mut self, member: &str, partition: Partition) {
        if self.owners.get(&partition).is_some_and(|o| o == member) {
            self.owners.remove(&partition);
            self.revoking.remove(&partition);
        }
        self.close_finished();
        self.rebalance();
    }

    pub(super) fn status(&self, queues: &[Arc<super::consume::PartitionQueue>]) -> crate::FleetStatus {
        let mut workers: Vec<_> =
            self.members.keys().map(|w| crate::WorkerStatus { worker: w.clone(), seen_secs_ago: 0.0 }).collect();
        workers.sort_by(|a, b| a.worker.cmp(&b.worker));
        let partitions = queues
            .iter()
            .enumerate()
            .map(|(i, queue)| {
                let (pending, in_flight) = queue.counts();
                crate::PartitionStatus {
                    partition: i as u32,
                    owner: self.owners.get(&Partition::new(i as u32)).cloned(),
                    fence: None,
                    pending: Some(pending),
                    in_flight: Some(in_flight),
                }
            })
            .collect();
        crate::FleetStatus { workers, partitions, dead_letters: None }
    }

    fn close_finished(&mut self) {
        let owners = &self.owners;
        self.leaving.retain(|member, _| owners.values().any(|o| o == member));
    }

    /// Moves towards the target assignment: revoke what should move, grant what is free.
    fn rebalance(&mut self) {
        let Some(partitions) = self.partitions else { return };
        let members: Vec<String> = self.members.keys().cloned().collect();
        let target = assign(partitions, &members);
        for (partition, owner) in &self.owners {
            if target.get(partition) != Some(owner)
                && !self.revoking.contains_key(partition)
                && let Some(tx) = self.members.get(owner)
            {
                self.revoking.insert(*partition, owner.clone());
                let _ = tx.send(OwnershipEvent::Revoked(*partition));
            }
        }
        for (partition, member) in target {
            if !self.owners.contains_key(&partition)
                && let Some(tx) = self.members.get(&member)
            {
                self.owners.insert(partition, member);
                let _ = tx.send(OwnershipEvent::Acquired(partition));
            }
        }
    }
}

/// One in-process worker's membership.
pub(super) struct LocalMembership {
    id: String,
    events: mpsc::UnboundedReceiver<OwnershipEvent>,
    inner: Arc<Inner>,
}

impl LocalMembership {
    pub(super) fn new(id: &str, events: mpsc::UnboundedReceiver<OwnershipEvent>, inner: Arc<Inner>) -> Self {
        Self { id: id.to_owned(), events, inner }
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.inner.registry.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl Membership for LocalMembership {
    async fn next(&mut self) -> Option<OwnershipEvent> {
        self.events.recv().await
    }

    async fn release(&mut self, partition: Partition) {
        let id = self.id.clone();
        self.registry().release(&id, partition);
    }

    async fn leave(&mut self) {
        let id = self.id.clone();
        self.registry().leave(&id);
    }
}
