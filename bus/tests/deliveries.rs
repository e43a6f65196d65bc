//! The queue of channel deliveries, on every bus: a published delivery reaches one consumer,
//! intact, as attempt 1; `retry_after` hands it out again as the next attempt, no earlier than
//! the delay; an acknowledged one is gone; one given up on is counted as undeliverable; one left
//! unsettled by a consumer that went away goes to another consumer (a gateway that died).

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use chatfleet_bus::{AmqpBus, AmqpSettings, Bus, MemoryBus, NatsBus, NatsSettings, PendingDeliveries, PendingDelivery};
use futures::StreamExt;
use schemas::{
    ChannelDelivery, ChannelOrigin, EventId, MessageId, PartitionCount, ReplyEvent, ReplyEventKind, SessionId,
};
use testkit::{NatsServer, RabbitVhost};
use tokio::time::Instant;

macro_rules! for_every_bus {
    ($($test:ident),* $(,)?) => {
        for_every_bus!(@on memory, Memory, [$($test),*]);
        for_every_bus!(@on nats, Nats, [$($test),*]);
        for_every_bus!(@on amqp, Amqp, [$($test),*]);
    };
    (@on $module:ident, $kind:ident, [$($test:ident),*]) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Kind::$kind).await
                }
            )*
        }
    };
}

for_every_bus![
    a_published_delivery_reaches_a_consumer_intact_as_attempt_one_and_once_acknowledged_is_gone,
    retry_after_hands_it_out_again_as_the_next_attempt_no_earlier_than_the_delay,
    a_delay_made_of_several_waits_is_kept_and_the_delivery_comes_once,
    a_delivery_given_up_on_is_counted_as_undeliverable,
    a_delivery_left_unsettled_by_a_consumer_that_went_away_goes_to_another,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Memory,
    Nats,
    Amqp,
}

/// Two handles on one deployment's bus (two gateways), and the servers behind them.
struct Fleet {
    a: Arc<dyn Bus>,
    b: Arc<dyn Bus>,
    _servers: Box<dyn Any + Send>,
}

async fn fleet(kind: Kind) -> Fleet {
    let partitions = PartitionCount::new(2).unwrap();
    match kind {
        Kind::Memory => {
            let bus = Arc::new(MemoryBus::new(partitions));
            Fleet { a: bus.clone(), b: bus, _servers: Box::new(()) }
        }
        Kind::Nats => {
            let server = NatsServer::start().await;
            let settings = NatsSettings::new(server.url(), partitions);
            let a = Arc::new(NatsBus::connect(settings.clone()).await.unwrap());
            let b = Arc::new(NatsBus::connect(settings).await.unwrap());
            Fleet { a, b, _servers: Box::new(server) }
        }
        Kind::Amqp => {
            let vhost = RabbitVhost::create().await;
            let settings = AmqpSettings::new(vhost.url(), partitions);
            let a = Arc::new(AmqpBus::connect(settings.clone()).await.unwrap());
            let b = Arc::new(AmqpBus::connect(settings).await.unwrap());
            Fleet { a, b, _servers: Box::new(vhost) }
        }
    }
}

fn delivery(text: &str) -> ChannelDelivery {
    let session = SessionId::parse("ch_test").unwrap();
    let message = MessageId::generate();
    ChannelDelivery {
        v: schemas::ENVELOPE_VERSION,
        origin: ChannelOrigin {
            channel: "webhooks/acme".into(),
            address: serde_json::json!({"conversation_id": "c-1"}),
        },
        event: ReplyEvent {
            v: schemas::ENVELOPE_VERSION,
            event_id: EventId::terminal(0),
            session_id: session,
            message_id: message.clone(),
            kind: ReplyEventKind::Error { code: schemas::ErrorCode::ModelUnavailable, message: text.into() },
        },
        finished_at: time::OffsetDateTime::now_utc().replace_nanosecond(0).unwrap(),
    }
}

async fn next(stream: &mut PendingDeliveries, within: Duration) -> Option<PendingDelivery> {
    tokio::time::timeout(within, stream.next()).await.ok().flatten()
}

async fn a_published_delivery_reaches_a_consumer_intact_as_attempt_one_and_once_acknowledged_is_gone(kind: Kind) {
    let fleet = fleet(kind).await;
    let sent = delivery("one");
    let mut stream = fleet.b.consume_deliveries().await.unwrap();

    fleet.a.publish_delivery(&sent).await.unwrap();
    let got = next(&mut stream, Duration::from_secs(5)).await.expect("the delivery");

    assert_eq!(got.delivery.as_ref().unwrap(), &sent);
    assert_eq!(got.attempt, 1);
    got.acker.ack().await.unwrap();
    assert!(next(&mut stream, Duration::from_millis(500)).await.is_none(), "acknowledged: gone");
    assert_eq!(fleet.a.delivery_status().await.unwrap().pending, 0);
}

/// Publishes a delivery, takes it, retries it after `delay`, and takes it again: what was sent,
/// how long the retry took to come, the retry, and the stream.
async fn retried_once(
    fleet: &Fleet,
    text: &str,
    delay: Duration,
) -> (ChannelDelivery, Duration, PendingDelivery, PendingDeliveries) {
    let sent = delivery(text);
    let mut stream = fleet.a.consume_deliveries().await.unwrap();
    fleet.a.publish_delivery(&sent).await.unwrap();
    let first = next(&mut stream, Duration::from_secs(5)).await.expect("the delivery");
    let retried_at = Instant::now();
    first.acker.retry_after(delay).await.unwrap();
    let second = next(&mut stream, delay + Duration::from_secs(8)).await.expect("the delivery again");
    (sent, retried_at.elapsed(), second, stream)
}

async fn retry_after_hands_it_out_again_as_the_next_attempt_no_earlier_than_the_delay(kind: Kind) {
    let fleet = fleet(kind).await;

    let (sent, waited, second, _stream) = retried_once(&fleet, "again", Duration::from_millis(700)).await;

    // RabbitMQ's wait queues hand a delivery out once less than half their shortest wait (250 ms)
    // is left, so it may come up to 125 ms early: 700 ms of waits of 250 ms whose hops back each
    // take some tens of milliseconds end with 120 ms left, handed out at once.
    assert!(waited >= Duration::from_millis(575), "after {waited:?}");
    assert_eq!(second.delivery.as_ref().unwrap(), &sent);
    assert_eq!(second.attempt, 2);
    second.acker.ack().await.unwrap();
}

/// On RabbitMQ a delay of 1.4 s waits in the 1 s queue, then in the 250 ms queue twice (the
/// copy that comes back early waits again): once handed out, it is the next attempt, at most
/// 125 ms early, and alone.
async fn a_delay_made_of_several_waits_is_kept_and_the_delivery_comes_once(kind: Kind) {
    let fleet = fleet(kind).await;

    let (sent, waited, second, mut stream) = retried_once(&fleet, "patient", Duration::from_millis(1400)).await;
    second.acker.ack().await.unwrap();
    let third = next(&mut stream, Duration::from_millis(1000)).await;

    assert!(waited >= Duration::from_millis(1275), "after {waited:?}");
    assert_eq!(second.delivery.as_ref().unwrap(), &sent);
    assert_eq!(second.attempt, 2);
    assert!(third.is_none(), "handed out a second time");
}

async fn a_delivery_given_up_on_is_counted_as_undeliverable(kind: Kind) {
    let fleet = fleet(kind).await;
    let mut stream = fleet.a.consume_deliveries().await.unwrap();
    fleet.a.publish_delivery(&delivery("lost")).await.unwrap();
    let got = next(&mut stream, Duration::from_secs(5)).await.expect("the delivery");

    got.acker.dead_letter("gave_up").await.unwrap();

    let status = fleet.b.delivery_status().await.unwrap();
    assert_eq!((status.pending, status.undeliverable), (0, 1));
    assert!(next(&mut stream, Duration::from_millis(500)).await.is_none());
}

async fn a_delivery_left_unsettled_by_a_consumer_that_went_away_goes_to_another(kind: Kind) {
    let fleet = fleet(kind).await;
    let sent = delivery("orphan");
    let mut first = fleet.a.consume_deliveries().await.unwrap();
    fleet.a.publish_delivery(&sent).await.unwrap();
    let held = next(&mut first, Duration::from_secs(5)).await.expect("the delivery");

    // The gateway holding it goes away: its stream, its delivery and (but for the in-process
    // bus, where both handles are one bus) its connection.
    drop(held);
    drop(first);
    let survivor = if kind == Kind::Memory { fleet.a.clone() } else { fleet.b.clone() };
    drop(fleet.a);
    let mut second = survivor.consume_deliveries().await.unwrap();
    // NATS hands it out again after its 10 s acknowledgement wait.
    let again = next(&mut second, Duration::from_secs(15)).await.expect("the delivery, to the other consumer");

    assert_eq!(again.delivery.as_ref().unwrap(), &sent);
    again.acker.ack().await.unwrap();
}
