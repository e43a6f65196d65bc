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
        let mut settings = NatsSettings::new(server.url(), PartitionCount::new(PARTITIONS).unwrap());
        // Long enough that no lease expires during the test: only a take by revision can help.
        settings.ownership = OwnershipSettings::with_lease_ttl(Duration::from_secs(20));
        let names = settings.names.clone();
        let bus = NatsBus::connect(settings).await.unwrap();
        let mut membership = bus.join(&WorkerId::parse("worker-a").unwrap()).await.unwrap();
        let owned = acquired(&mut membership, PARTITIONS as usize).await;

        let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
        let bucket = js.get_key_value(names.ownership_bucket()).await.unwrap();
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
