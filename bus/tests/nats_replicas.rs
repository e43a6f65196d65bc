//! The replica count of the streams the NATS bus creates: on a three-node cluster, on a single
//! server, and for streams that already exist with another count.

use std::time::Duration;

use chatfleet_bus::{Bus, NatsBus, NatsSettings, Replicas};
use schemas::PartitionCount;
use testkit::{NatsCluster, NatsServer};

mod nats {
    use super::*;

    fn settings(url: String, replicas: Replicas) -> NatsSettings {
        let mut settings = NatsSettings::new(url, PartitionCount::new(4).unwrap());
        settings.replicas = replicas;
        settings
    }

    /// The replica count of a stream as the cluster reports it.
    async fn replicas_of(url: &str, stream: &str) -> usize {
        let servers: Vec<&str> = url.split(',').collect();
        let js = async_nats::jetstream::new(async_nats::connect(servers).await.unwrap());
        let mut stream = js.get_stream(stream).await.unwrap();
        stream.info().await.unwrap().config.num_replicas
    }

    /// Creates the ownership bucket, which the bus makes on first use.
    async fn touch_bucket(bus: &NatsBus) {
        bus.status().await.expect("the ownership bucket opens");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_a_three_node_cluster_every_stream_gets_three_replicas_by_default() {
        let cluster = NatsCluster::start().await;
        let bus = NatsBus::connect(settings(cluster.url(), Replicas::Auto)).await.unwrap();
        touch_bucket(&bus).await;

        assert_eq!(bus.replicas(), 3);
        assert_eq!(replicas_of(&cluster.url(), "CHATFLEET_IN").await, 3);
        assert_eq!(replicas_of(&cluster.url(), "KV_CHATFLEET_OWNERSHIP").await, 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streams_created_with_one_replica_are_raised_to_three_by_the_default_and_lowered_only_explicitly() {
        let cluster = NatsCluster::start().await;
        let first = NatsBus::connect(settings(cluster.url(), Replicas::Exactly(1))).await.unwrap();
        touch_bucket(&first).await;
        assert_eq!(replicas_of(&cluster.url(), "CHATFLEET_IN").await, 1);

        NatsBus::connect(settings(cluster.url(), Replicas::Auto)).await.unwrap();
        assert_eq!(replicas_of(&cluster.url(), "CHATFLEET_IN").await, 3);
        assert_eq!(replicas_of(&cluster.url(), "KV_CHATFLEET_OWNERSHIP").await, 3);

        NatsBus::connect(settings(cluster.url(), Replicas::Exactly(2))).await.unwrap();
        assert_eq!(replicas_of(&cluster.url(), "CHATFLEET_IN").await, 2);
        assert_eq!(replicas_of(&cluster.url(), "KV_CHATFLEET_OWNERSHIP").await, 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_single_server_gets_one_replica_by_default_and_refuses_three_with_a_line_naming_the_setting() {
        let server = NatsServer::start().await;
        let bus = NatsBus::connect(settings(server.url(), Replicas::Auto)).await.unwrap();
        assert_eq!(bus.replicas(), 1);
        drop(bus);

        let error = tokio::time::timeout(
            Duration::from_secs(10),
            NatsBus::connect(settings(server.url(), Replicas::Exactly(3))),
        )
        .await
        .expect("the refusal comes at once")
        .expect_err("a single server cannot hold three replicas");
        let line = error.to_string();
        assert!(!line.contains('\n'), "one line: {line}");
        assert!(line.contains("--nats-replicas") && line.contains(&server.url()), "{line}");
    }
}
