//! Checks that the test servers start, are the versions the project is written against, and
//! come back on the same port after a restart.

use std::time::Duration;

use chatfleet_testkit::{MongoServer, NatsServer, free_port};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;

/// Reads the `INFO {...}` line a NATS server sends to every new connection.
async fn nats_info_line(port: u16) -> String {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(5), BufReader::new(stream).read_line(&mut line)).await.unwrap().unwrap();
    line
}

#[test]
fn free_port_can_be_bound() {
    let port = free_port();

    let listener = std::net::TcpListener::bind(("127.0.0.1", port));

    assert!(port > 0);
    assert!(listener.is_ok(), "port {port} could not be bound: {listener:?}");
}

#[test]
fn free_ports_are_distinct_and_below_the_ephemeral_range() {
    let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();

    let distinct: std::collections::HashSet<u16> = ports.iter().copied().collect();
    assert_eq!(distinct.len(), ports.len(), "a port was handed out twice: {ports:?}");
    assert!(ports.iter().all(|p| (20_000..32_000).contains(p)), "a port outside 20000..32000: {ports:?}");
}

#[tokio::test]
async fn nats_server_is_version_2_14_with_jetstream() {
    let server = NatsServer::start().await;

    let info = nats_info_line(server.port()).await;

    assert!(info.starts_with("INFO "), "unexpected greeting: {info}");
    assert!(info.contains(r#""version":"2.14"#), "not nats-server 2.14: {info}");
    assert!(info.contains(r#""jetstream":true"#), "JetStream is off: {info}");
    assert_eq!(server.url(), format!("nats://127.0.0.1:{}", server.port()));
}

#[tokio::test]
async fn nats_server_restarts_on_the_same_port_and_store() {
    let mut server = NatsServer::start().await;
    let port = server.port();

    server.stop().await;
    let refused = TcpStream::connect(("127.0.0.1", port)).await;
    server.restart().await;

    assert!(refused.is_err(), "the stopped server still accepted a connection");
    assert_eq!(server.port(), port);
    assert!(server.store_dir().is_dir());
    assert!(nats_info_line(port).await.starts_with("INFO "));
}

#[tokio::test]
async fn mongo_server_accepts_connections_at_its_url() {
    let server = MongoServer::start().await;

    let connected = TcpStream::connect(("127.0.0.1", server.port())).await;

    assert!(connected.is_ok(), "{connected:?}\n{}", server.log_tail());
    assert_eq!(server.url(), format!("mongodb://127.0.0.1:{}/?directConnection=true&retryWrites=false", server.port()));
    assert_eq!(
        server.url_for_db("chat"),
        format!("mongodb://127.0.0.1:{}/chat?directConnection=true&retryWrites=false", server.port())
    );
}

#[tokio::test]
async fn dropping_a_server_kills_it() {
    let server = NatsServer::start().await;
    let port = server.port();

    drop(server);
    let connected = TcpStream::connect(("127.0.0.1", port)).await;

    assert!(connected.is_err(), "a dropped server still accepted a connection");
}
