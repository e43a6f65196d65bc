//! `chatfleet dead-letters` as an operator runs it: the real binary lists a dead letter kept on
//! NATS with its session, message and reason, and `replay ID` sends it back to its partition
//! and empties the list.

use std::process::{Command, Output};
use std::time::Duration;

use bus::{Bus, NatsBus, NatsSettings};
use futures::StreamExt;
use schemas::{MessageId, PartitionCount, SessionId, UserMessage};
use testkit::NatsServer;

const PARTITIONS: u32 = 4;

fn chatfleet(url: &str, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_chatfleet"))
        .args(args)
        .args(["--bus", url, "--partitions", &PARTITIONS.to_string()])
        .env("RUST_LOG", "off")
        .output()
        .expect("the binary runs");
    assert!(out.status.success(), "chatfleet {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn listed(url: &str) -> Vec<serde_json::Value> {
    let out = chatfleet(url, &["dead-letters", "list", "--json"]);
    serde_json::from_slice(&out.stdout).expect("list --json prints a JSON array")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_lists_a_dead_letter_and_replays_it_to_its_partition() {
    let server = NatsServer::start().await;
    let url = server.url();
    let partitions = PartitionCount::new(PARTITIONS).unwrap();
    let bus = NatsBus::connect(NatsSettings::new(url.clone(), partitions)).await.expect("connect");
    let session = SessionId::generate();
    let message = UserMessage {
        v: schemas::ENVELOPE_VERSION,
        session_id: session.clone(),
        message_id: MessageId::generate(),
        text: "given up on".into(),
        accepted_at: time::OffsetDateTime::now_utc(),
        double_texting: None,
        channel: None,
        cancel: None,
    };
    bus.enqueue(&message).await.expect("enqueue");
    let mut deliveries = bus.consume(partitions.of(&session)).await.expect("consume");
    let first = tokio::time::timeout(Duration::from_secs(10), deliveries.next()).await.unwrap().unwrap();
    first.acker.dead_letter("too_many_starts").await.expect("dead-lettering");

    let before = listed(&url);
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0]["session_id"], session.as_str());
    assert_eq!(before[0]["message_id"], message.message_id.as_str());
    assert_eq!(before[0]["reason"], "too_many_starts");
    let id = before[0]["id"].as_str().expect("an id").to_owned();

    let out = chatfleet(&url, &["dead-letters", "replay", &id]);

    assert!(String::from_utf8_lossy(&out.stdout).contains("replayed 1"), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(listed(&url).is_empty());
    let again = tokio::time::timeout(Duration::from_secs(10), deliveries.next()).await.unwrap().unwrap();
    assert_eq!(again.message.expect("readable").message_id, message.message_id);
}
