//! A message whose session was deleted before a worker took it up is dropped, and whoever
//! still streams its reply gets an `error` event saying why, not silence.

use std::sync::Arc;
use std::time::Duration;

use bus::{Bus, MemoryBus};
use chatfleet_worker::{Worker, WorkerConfig};
use futures::StreamExt;
use llm::mock_reply::MockSettings;
use llm::stand_in::StandInModel;
use schemas::{MessageId, PartitionCount, ReplyEventKind, SessionId, UserMessage};
use store::{EmbeddedStore, Store};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn a_message_of_a_deleted_session_ends_in_a_session_not_found_error_and_is_not_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("store.redb")).unwrap());
    let bus = Arc::new(MemoryBus::new(PartitionCount::new(2).unwrap()));
    let model = Arc::new(StandInModel::new(MockSettings::default()));
    let worker = Worker::new(bus.clone(), store.clone(), model, WorkerConfig::default());
    // Never created, as if deleted between the gateway's check and the worker's.
    let session = SessionId::generate();
    let mut events = bus.subscribe_events(&session).await.unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(worker.run(stop.clone().cancelled_owned()));
    let message = UserMessage {
        v: schemas::ENVELOPE_VERSION,
        session_id: session.clone(),
        message_id: MessageId::generate(),
        text: "hello".into(),
        accepted_at: time::OffsetDateTime::now_utc(),
        double_texting: None,
        channel: None,
        cancel: None,
    };

    bus.enqueue(&message).await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), events.next()).await.expect("no event within 10 s");

    let event = event.expect("the event stream ended");
    assert_eq!(event.message_id, message.message_id);
    assert!(
        matches!(&event.kind, ReplyEventKind::Error { code, .. } if code == "session_not_found"),
        "expected a session_not_found error, got {:?}",
        event.kind
    );
    assert!(store.history(&session).await.unwrap().is_empty(), "nothing may be recorded for a deleted session");
    stop.cancel();
}
