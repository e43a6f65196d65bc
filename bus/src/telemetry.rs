//! The bus's metrics and ownership log events, named in one place for every adapter.

use schemas::{Partition, WorkerId};

/// Partitions this worker owns.
pub const OWNED_PARTITIONS: &str = "chatfleet_worker_owned_partitions";
/// Messages of an owned partition not yet delivered.
pub const PARTITION_PENDING: &str = "chatfleet_partition_pending_messages";
/// Messages of an owned partition delivered and not yet acknowledged.
pub const PARTITION_ACK_PENDING: &str = "chatfleet_partition_ack_pending_messages";
/// Partitions this worker took (at start-up, after a join or leave, or after another worker died).
pub const PARTITIONS_ACQUIRED: &str = "chatfleet_worker_partitions_acquired_total";
/// Partitions this worker stopped at once because its hold on them may be gone (a lease it could
/// not renew, a lost connection): the other half of a failover.
pub const PARTITIONS_LOST: &str = "chatfleet_worker_partitions_lost_total";

/// The worker now owns `partition` (`fence`: its fencing token, where the bus has one).
pub(crate) fn partition_acquired(worker: &WorkerId, partition: Partition, owned: usize, fence: Option<u64>) {
    tracing::info!(event = "partition_acquired", worker = %worker, partition = partition.get(), fence, "took the partition");
    metrics::gauge!(OWNED_PARTITIONS).set(owned as f64);
    metrics::counter!(PARTITIONS_ACQUIRED).increment(1);
}

/// The target gives `partition` to another worker: this one starts handing it over.
pub(crate) fn partition_revoked(worker: &WorkerId, partition: Partition) {
    tracing::info!(event = "partition_revoked", worker = %worker, partition = partition.get(), "handing the partition over");
}

/// The worker handed `partition` over.
pub(crate) fn partition_released(worker: &WorkerId, partition: Partition, owned: usize) {
    tracing::info!(event = "partition_released", worker = %worker, partition = partition.get(), "handed the partition over");
    metrics::gauge!(OWNED_PARTITIONS).set(owned as f64);
}

/// The worker stopped `partition` at once, because its hold on it may be gone (`why`).
pub(crate) fn partition_lost(worker: &WorkerId, partition: Partition, owned: usize, why: &str) {
    tracing::warn!(event = "partition_lost", worker = %worker, partition = partition.get(), why, "stopping the partition");
    metrics::gauge!(OWNED_PARTITIONS).set(owned as f64);
    metrics::counter!(PARTITIONS_LOST).increment(1);
}

/// An owned partition's backlog: messages waiting, and messages in hand.
pub(crate) fn partition_backlog(partition: Partition, pending: Option<u64>, ack_pending: Option<u64>) {
    let labels = [("partition", partition.get().to_string())];
    if let Some(pending) = pending {
        metrics::gauge!(PARTITION_PENDING, &labels).set(pending as f64);
    }
    if let Some(ack_pending) = ack_pending {
        metrics::gauge!(PARTITION_ACK_PENDING, &labels).set(ack_pending as f64);
    }
}

/// Deliveries of a partition that went missing on their way to this worker (a broken
/// connection), each time followed by a fresh consumer that delivers them again in order.
pub const DELIVERY_GAPS: &str = "chatfleet_partition_delivery_gaps_total";

/// A delivery of `partition` went missing: the consumer sent sequence `got` while this pull
/// expected `expected`.
pub(crate) fn delivery_gap(partition: Partition, expected: u64, got: u64) {
    tracing::warn!(
        event = "delivery_gap",
        partition = partition.get(),
        expected,
        got,
        "deliveries went missing; replacing the consumer so they come again in order"
    );
    metrics::counter!(DELIVERY_GAPS, "partition" => partition.get().to_string()).increment(1);
}

/// Pulls of a partition replaced by a fresh consumer and pull, by reason.
pub const PULL_RESTARTS: &str = "chatfleet_partition_pull_restarts_total";

/// The pull of `partition` is replaced with a fresh consumer and pull (`why`).
pub(crate) fn pull_restarted(partition: Partition, why: &'static str) {
    tracing::warn!(
        event = "pull_restarted",
        partition = partition.get(),
        why,
        "replacing the partition's consumer and pull"
    );
    metrics::counter!(PULL_RESTARTS, "partition" => partition.get().to_string(), "why" => why).increment(1);
}
