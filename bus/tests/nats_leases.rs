//! Lease cases of the NATS bus's ownership protocol that need the ownership bucket in hand: the
//! test writes to it beside the worker, as a renewal whose answer is still on its way would.

use std::collections::BTreeSet;
use std::time::Duration;

use chatfleet_bus::{Bus, NatsBus, NatsSettings, OwnershipEvent, OwnershipSettings};
use schemas::{Partition, PartitionCount, WorkerId};
use testkit::NatsServer;

const PARTITIONS: u32 = 4;

mod nats {
    use super::*;

    /// A release whose delete fails (here: the lease moved on since the worker last renewed it,
    /// as when a renewal's answer is lost or late) leaves the lease on the server. When the
    /// partition comes back to the same worker, it must take that lease by its revision; before,
    /// it forgot the lease, tried to create a key that existed, and never owned the partition
    /// again, nor did anyone else.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_partition_whose_lease_release_failed_is_taken_again_when_it_comes_back() {
        let server = NatsServer::start().await;
        // No lease expires during the test: only a take by revision can help.
        let Worker { names, _bus, mut membership, owned, bucket } = Worker::start(&server).await;
        for &partition in &owned {
            let key = names.lease_key(partition);
            let lease = bucket.entry(key.clone()).await.unwrap().expect("the worker's lease");
            bucket.update(&key, lease.value, lease.revision).await.expect("the lease moves on");
        }
        for &partition in &owned {
            membership.release(partition).await;
        }

        // The worker is still the only member: every partition is assigned to it again.
        let again = acquired(&mut membership, PARTITIONS as usize).await;
        assert_eq!(again, owned);
    }

    /// A worker's release can cross the coordinator's events: here the worker finishes with a
    /// partition while, unknown to it, the coordinator has lost the partition (someone wrote the
    /// lease) and taken it again (the lease was freed, and the target still names this worker).
    /// The release names the ownership it ends, so it must leave the new one alone; before, it
    /// deleted the fresh lease, and the worker went on to consume the partition on the strength
    /// of an `Acquired` for a lease that no longer existed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_release_of_an_ownership_that_already_ended_leaves_the_next_one_alone() {
        let server = NatsServer::start().await;
        let Worker { names, _bus, mut membership, owned, bucket } = Worker::start(&server).await;
        let partition = *owned.first().unwrap();
        let key = names.lease_key(partition);
        let lease = bucket.entry(key.clone()).await.unwrap().expect("the worker's lease");
        // Someone else writes the lease (the worker loses the partition), then frees it: the
        // worker, still the target owner, takes it again.
        let foreign = bucket.update(&key, r#"{"owner":"worker-z"}"#.into(), lease.revision).await.unwrap();
        bucket.delete_expect_revision(&key, Some(foreign)).await.unwrap();
        let retaken = wait_for_lease_of(&bucket, &key, "worker-a", foreign).await;
        // The worker has read neither the loss nor the new acquisition when it releases.
        tokio::time::sleep(Duration::from_millis(300)).await;
        membership.release(partition).await;
        tokio::time::sleep(Duration::from_secs(1)).await;

        let now = bucket.entry(key.clone()).await.unwrap().expect("the lease key");
        assert!(
            matches!(now.operation, async_nats::jetstream::kv::Operation::Put) && now.revision >= retaken,
            "the new ownership's lease must survive the stale release; the key is now {:?} at revision {}",
            now.operation,
            now.revision
        );
        let mut events = Vec::new();
        while let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(2), membership.next()).await {
            events.push(event);
        }
        assert_eq!(
            events,
            [OwnershipEvent::Lost(partition), OwnershipEvent::Acquired(partition)],
            "one loss and one new acquisition, and the new ownership stands"
        );
    }

    /// One worker, `worker-a`, the only member, holding every partition, with leases that do not
    /// expire during a test (20 s), and the ownership bucket in the test's hand.
    struct Worker {
        names: schemas::subjects::Names,
        _bus: NatsBus,
        membership: Box<dyn chatfleet_bus::Membership>,
        owned: BTreeSet<Partition>,
        bucket: async_nats::jetstream::kv::Store,
    }

    impl Worker {
        async fn start(server: &NatsServer) -> Self {
            let mut settings = NatsSettings::new(server.url(), PartitionCount::new(PARTITIONS).unwrap());
            settings.ownership = OwnershipSettings::with_lease_ttl(Duration::from_secs(20));
            let names = settings.names.clone();
            let bus = NatsBus::connect(settings).await.unwrap();
            let mut membership = bus.join(&WorkerId::parse("worker-a").unwrap()).await.unwrap();
            let owned = acquired(&mut membership, PARTITIONS as usize).await;
            let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
            let bucket = js.get_key_value(names.ownership_bucket()).await.unwrap();
            Self { names, _bus: bus, membership, owned, bucket }
        }
    }

    /// Waits up to 10 s for `key` to hold a lease of `owner` written after `after`; returns its
    /// revision.
    async fn wait_for_lease_of(bucket: &async_nats::jetstream::kv::Store, key: &str, owner: &str, after: u64) -> u64 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(entry)) = bucket.entry(key.to_owned()).await
                && entry.revision > after
                && matches!(entry.operation, async_nats::jetstream::kv::Operation::Put)
                && String::from_utf8_lossy(&entry.value).contains(&format!(r#""owner":"{owner}""#))
            {
                return entry.revision;
            }
            assert!(tokio::time::Instant::now() < deadline, "{owner} did not take {key} again within 10 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The next `n` partitions acquired, within 15 s.
    async fn acquired(membership: &mut Box<dyn chatfleet_bus::Membership>, n: usize) -> BTreeSet<Partition> {
        let mut partitions = BTreeSet::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while partitions.len() < n {
            match tokio::time::timeout_at(deadline, membership.next()).await {
                Ok(Some(OwnershipEvent::Acquired(partition))) => {
                    partitions.insert(partition);
                }
                Ok(Some(other)) => panic!("only acquisitions were due, got {other:?}"),
                Ok(None) => panic!("the membership ended"),
                Err(_) => panic!("{} of {n} partitions acquired within 15 s: {partitions:?}", partitions.len()),
            }
        }
        partitions
    }
}
