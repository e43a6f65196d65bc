//! Dead letters on the brokers that keep them (NATS JetStream, RabbitMQ): a message given up on
//! is listed with its session, message id and reason, counted by `status`, and a replay makes
//! it deliverable again and empties the list. Each test owns its broker (a private nats-server,
//! or a virtual host of its own on the shared RabbitMQ).

use std::sync::Arc;
use std::time::Duration;

use chatfleet_bus::{AmqpBus, AmqpSettings, Bus, Deliveries, Delivery, NatsBus, NatsSettings, Replay};
use futures::StreamExt;
use schemas::{MessageId, Partition, PartitionCount, SessionId, UserMessage};
use testkit::{NatsServer, RabbitVhost};
use time::macros::datetime;

const DEADLINE: Duration = Duration::from_secs(10);

fn partitions() -> PartitionCount {
    PartitionCount::new(3).unwrap()
}

fn message(session: &SessionId) -> UserMessage {
    UserMessage {
        v: schemas::ENVELOPE_VERSION,
        session_id: session.clone(),
        message_id: MessageId::generate(),
        text: "a message nobody can answer".into(),
        accepted_at: datetime!(2026-03-04 05:06:07 UTC),
        double_texting: None,
        channel: None,
        cancel: None,
    }
}

async fn next(deliveries: &mut Deliveries, what: &str) -> Delivery {
    tokio::time::timeout(DEADLINE, deliveries.next())
        .await
        .unwrap_or_else(|_| panic!("no delivery of {what} within {DEADLINE:?}"))
        .unwrap_or_else(|| panic!("the delivery stream ended before {what}"))
}

/// Polls `status` until it counts `expected` dead letters (RabbitMQ dead-letters asynchronously).
async fn wait_for_dead_letter_count(bus: &dyn Bus, expected: u64) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let counted = bus.status().await.expect("status").dead_letters;
        if counted == Some(expected) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "status counts {counted:?} dead letters, not {expected}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Rejects one message for `reason`, then checks the list, the count and a replay.
async fn a_rejected_message_is_listed_counted_and_deliverable_again_after_a_replay(bus: Arc<dyn Bus>, reason: &str) {
    let session = SessionId::generate();
    let partition: Partition = partitions().of(&session);
    let sent = message(&session);
    bus.enqueue(&sent).await.expect("enqueue");
    let mut deliveries = bus.consume(partition).await.expect("consume");

    let delivery = next(&mut deliveries, "the message").await;
    delivery.acker.dead_letter("too_many_starts").await.expect("dead-lettering");
    wait_for_dead_letter_count(bus.as_ref(), 1).await;

    let listed = bus.dead_letters(10).await.expect("list");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].session_id.as_deref(), Some(session.as_str()));
    assert_eq!(listed[0].message_id.as_deref(), Some(sent.message_id.as_str()));
    assert_eq!(listed[0].reason, reason);
    assert!(listed[0].at.is_some(), "{listed:?}");
    assert_eq!(bus.dead_letters(10).await.expect("list again"), listed, "listing leaves the dead letters in place");

    let replayed = bus.replay_dead_letters(&Replay::All).await.expect("replay");
    assert_eq!(replayed, listed);
    let again = next(&mut deliveries, "the replayed message").await;
    assert_eq!(again.message.as_ref().expect("readable").message_id, sent.message_id);
    assert!(bus.dead_letters(10).await.expect("list after replay").is_empty());
    wait_for_dead_letter_count(bus.as_ref(), 0).await;
    again.acker.ack().await.expect("ack");
}

async fn replaying_an_unknown_id_replays_nothing_and_keeps_the_dead_letter(bus: Arc<dyn Bus>) {
    let session = SessionId::generate();
    bus.enqueue(&message(&session)).await.expect("enqueue");
    let mut deliveries = bus.consume(partitions().of(&session)).await.expect("consume");
    next(&mut deliveries, "the message").await.acker.reject().await.expect("reject");
    wait_for_dead_letter_count(bus.as_ref(), 1).await;

    let replayed = bus.replay_dead_letters(&Replay::Ids(vec!["123456789".into()])).await.expect("replay");

    assert!(replayed.is_empty(), "{replayed:?}");
    assert_eq!(bus.dead_letters(10).await.expect("list").len(), 1);
}

async fn nats() -> (NatsServer, Arc<dyn Bus>) {
    let server = NatsServer::start().await;
    let bus = NatsBus::connect(NatsSettings::new(server.url(), partitions())).await.expect("connect");
    (server, Arc::new(bus))
}

async fn amqp() -> (RabbitVhost, Arc<dyn Bus>) {
    let vhost = RabbitVhost::create().await;
    let bus = AmqpBus::connect(AmqpSettings::new(vhost.url(), partitions())).await.expect("connect");
    (vhost, Arc::new(bus))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_nats_a_dead_lettered_message_is_listed_with_its_reason_counted_and_replayable() {
    let (_server, bus) = nats().await;
    a_rejected_message_is_listed_counted_and_deliverable_again_after_a_replay(bus, "too_many_starts").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_rabbitmq_a_rejected_message_is_listed_counted_and_replayable() {
    let (_vhost, bus) = amqp().await;
    // RabbitMQ records why a message died itself (`x-death`): a reject is `rejected`.
    a_rejected_message_is_listed_counted_and_deliverable_again_after_a_replay(bus, "rejected").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_nats_replaying_an_unknown_id_keeps_the_dead_letter() {
    let (_server, bus) = nats().await;
    replaying_an_unknown_id_replays_nothing_and_keeps_the_dead_letter(bus).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_rabbitmq_replaying_an_unknown_id_keeps_the_dead_letter() {
    let (_vhost, bus) = amqp().await;
    replaying_an_unknown_id_replays_nothing_and_keeps_the_dead_letter(bus).await;
}

/// Listing returns the messages it takes to the dead-letter queue by closing its channel; a
/// quorum queue's delivery limit must not count those returns and drop a dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_rabbitmq_listing_many_times_loses_no_dead_letter() {
    let (_vhost, bus) = amqp().await;
    let session = SessionId::generate();
    bus.enqueue(&message(&session)).await.expect("enqueue");
    let mut deliveries = bus.consume(partitions().of(&session)).await.expect("consume");
    next(&mut deliveries, "the message").await.acker.reject().await.expect("reject");
    wait_for_dead_letter_count(bus.as_ref(), 1).await;

    for _ in 0..25 {
        assert_eq!(bus.dead_letters(10).await.expect("list").len(), 1);
    }

    wait_for_dead_letter_count(bus.as_ref(), 1).await;
}
