//! What the RabbitMQ bus leaves on the broker, read through the management API: the declared
//! layout operators rely on, and nothing left behind by reply streams once they close.

use std::time::Duration;

use chatfleet_bus::{AmqpBus, AmqpSettings, Bus};
use schemas::{PartitionCount, SessionId};
use serde_json::Value;
use testkit::RabbitVhost;

async fn bus_on(vhost: &RabbitVhost) -> AmqpBus {
    AmqpBus::connect(AmqpSettings::new(vhost.url(), PartitionCount::new(4).unwrap())).await.unwrap()
}

fn named<'a>(items: &'a Value, name: &str) -> &'a Value {
    items.as_array().unwrap().iter().find(|q| q["name"] == name).unwrap_or_else(|| panic!("no {name} in {items:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_are_durable_quorum_queues_with_one_active_consumer_and_a_dead_letter_queue() {
    let vhost = RabbitVhost::create().await;
    let _bus = bus_on(&vhost).await;

    let queues = vhost.api_get("queues").await;
    for p in 0..4 {
        let queue = named(&queues, &format!("chatfleet.in.{p}"));
        assert_eq!(queue["durable"], true);
        assert_eq!(queue["arguments"]["x-queue-type"], "quorum");
        assert_eq!(queue["arguments"]["x-single-active-consumer"], true);
        assert_eq!(queue["arguments"]["x-dead-letter-exchange"], "chatfleet.dead");
        assert!(queue["arguments"]["x-delivery-limit"].as_u64().unwrap() > 1);
    }
    assert_eq!(named(&queues, "chatfleet.dead")["durable"], true);
    let bindings = vhost.api_get("bindings").await;
    let routed: Vec<(&str, &str)> = bindings
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["source"] == "chatfleet.in")
        .map(|b| (b["routing_key"].as_str().unwrap(), b["destination"].as_str().unwrap()))
        .collect();
    assert_eq!(routed.len(), 4, "{routed:?}");
    assert!(routed.contains(&("2", "chatfleet.in.2")), "{routed:?}");
}

/// The bindings of `chatfleet.out`, by routing key (session id).
async fn event_bindings(vhost: &RabbitVhost) -> Vec<String> {
    let bindings = vhost.api_get("bindings").await;
    bindings
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["source"] == "chatfleet.out")
        .map(|b| b["routing_key"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_streams_leave_no_binding_behind_once_closed() {
    let vhost = RabbitVhost::create().await;
    let gateway = bus_on(&vhost).await;
    let sessions: Vec<SessionId> = (0..20).map(|_| SessionId::generate()).collect();

    let mut first = Vec::new();
    let mut second = Vec::new();
    for session in &sessions {
        // Two listeners on each session share one binding.
        first.push(gateway.subscribe_events(session).await.unwrap());
        second.push(gateway.subscribe_events(session).await.unwrap());
    }
    let open = event_bindings(&vhost).await;
    drop(second);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let half = event_bindings(&vhost).await;
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut closed = event_bindings(&vhost).await;
    while !closed.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        closed = event_bindings(&vhost).await;
    }

    assert_eq!(open.len(), sessions.len(), "one binding per session listened to: {open:?}");
    assert_eq!(half.len(), sessions.len(), "a session's binding stays while it has a listener");
    assert!(closed.is_empty(), "bindings left after every stream closed: {closed:?}");
    // The gateway's one event queue is exclusive: the broker deletes it with the connection.
    let queues = vhost.api_get("queues").await;
    let exclusive: Vec<&Value> = queues.as_array().unwrap().iter().filter(|q| q["exclusive"] == true).collect();
    assert_eq!(exclusive.len(), 1, "one event queue per gateway: {exclusive:#?}");
    assert_eq!(exclusive[0]["auto_delete"], true);
}
