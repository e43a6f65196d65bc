//! Checks that a private RabbitMQ node starts, takes AMQP connections and keeps a durable quorum
//! queue's messages across a crash and restart, and that a vhost on the shared broker is usable
//! and removed on drop.

use std::time::{Duration, Instant};

use chatfleet_testkit::{RabbitMqServer, RabbitVhost};
use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::net::TcpStream;

/// How long a quorum queue must exist before a crash cannot lose it (see
/// [`RabbitMqServer`]'s documentation).
const QUORUM_QUEUE_SETTLE: Duration = Duration::from_millis(1500);

async fn open(url: &str) -> (Connection, Channel) {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    let channel = connection.create_channel().await.unwrap();
    (connection, channel)
}

fn quorum_queue() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    arguments
}

/// The body of the next message on `queue`, acknowledged as it is taken. A restarted node
/// recovers its quorum queues in the background, so a get is retried for a while, each time on
/// a new connection since a failed get may close it.
async fn take_message(url: &str, queue: &str) -> Result<Option<Vec<u8>>, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_connection, channel) = open(url).await;
        match channel.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await {
            Ok(message) => return Ok(message.map(|m| m.delivery.data)),
            Err(e) if Instant::now() < deadline => {
                eprintln!("basic.get on {queue} failed, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(format!("basic.get on {queue} failed: {e}")),
        }
    }
}

#[tokio::test]
async fn a_private_rabbitmq_node_takes_amqp_connections() {
    let server = RabbitMqServer::start().await;

    let (connection, channel) = open(&server.url()).await;
    let queue = channel.queue_declare("probe".into(), QueueDeclareOptions::default(), FieldTable::default()).await;

    assert!(queue.is_ok(), "{queue:?}\n{}", server.log_tail());
    assert_eq!(server.url(), format!("amqp://guest:guest@127.0.0.1:{}/%2f", server.port()));
    assert_eq!(server.node_name(), format!("chatfleet-{}@localhost", server.port()));
    connection.close(200, "done".into()).await.unwrap();
}

#[tokio::test]
async fn a_durable_quorum_queue_keeps_its_messages_across_a_crash_and_restart() {
    let mut server = RabbitMqServer::start().await;
    let port = server.port();
    let (_connection, channel) = open(&server.url()).await;
    channel.queue_declare("jobs".into(), QueueDeclareOptions::durable(), quorum_queue()).await.unwrap();
    // RabbitMQ 3.10 records a new quorum queue's directory entry on disk only after half a second
    // without further changes; a crash before that loses the whole queue, confirmed messages too.
    tokio::time::sleep(QUORUM_QUEUE_SETTLE).await;
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let confirmation = channel
        .basic_publish(
            "".into(),
            "jobs".into(),
            BasicPublishOptions::default(),
            b"survives",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirmation.is_ack(), "the broker did not confirm the message: {confirmation:?}");

    server.stop().await;
    let refused = TcpStream::connect(("127.0.0.1", port)).await;
    server.restart().await;
    let message = take_message(&server.url(), "jobs").await;

    assert!(refused.is_err(), "the stopped node still accepted a connection");
    assert_eq!(server.port(), port);
    assert_eq!(message, Ok(Some(b"survives".to_vec())), "{}", server.log_tail());
}

#[tokio::test]
async fn dropping_a_private_node_kills_it() {
    let server = RabbitMqServer::start().await;
    let port = server.port();

    drop(server);
    let connected = TcpStream::connect(("127.0.0.1", port)).await;

    assert!(connected.is_err(), "a dropped node still accepted a connection");
}

#[tokio::test]
async fn a_vhost_on_the_shared_broker_is_usable_and_removed_on_drop() {
    let vhost = RabbitVhost::create().await;
    let name = vhost.name().to_owned();
    let existed = RabbitVhost::exists(&name).await;

    let (connection, channel) = open(&vhost.url()).await;
    let queue = channel.queue_declare("probe".into(), QueueDeclareOptions::durable(), quorum_queue()).await;
    connection.close(200, "done".into()).await.unwrap();
    drop(vhost);

    assert!(name.starts_with("chatfleet-test-"), "{name}");
    assert!(existed, "the vhost {name} was not created");
    assert!(queue.is_ok(), "{queue:?}");
    assert!(!RabbitVhost::exists(&name).await, "the vhost {name} is still there after drop");
}

#[tokio::test]
async fn vhosts_do_not_see_each_other_s_queues() {
    let (first, second) = (RabbitVhost::create().await, RabbitVhost::create().await);
    let (_first_connection, first_channel) = open(&first.url()).await;
    let (_second_connection, second_channel) = open(&second.url()).await;
    first_channel.queue_declare("mine".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();

    let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let in_first = first_channel.queue_declare("mine".into(), passive, FieldTable::default()).await;
    let in_second = second_channel.queue_declare("mine".into(), passive, FieldTable::default()).await;

    assert_ne!(first.url(), second.url());
    assert!(in_first.is_ok(), "{in_first:?}");
    assert!(in_second.is_err(), "a queue declared in one vhost is visible in another");
}

#[test]
fn a_vhost_can_be_dropped_outside_a_runtime() {
    let vhost = tokio::runtime::Runtime::new().unwrap().block_on(RabbitVhost::create());
    let name = vhost.name().to_owned();

    drop(vhost);

    let exists = tokio::runtime::Runtime::new().unwrap().block_on(RabbitVhost::exists(&name));
    assert!(!exists, "the vhost {name} is still there after drop");
}
