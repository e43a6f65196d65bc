//! A message whose generation was started too many times across workers (the store's count,
//! which survives hand-overs) is not generated again: its session gets a
//! `message_dead_lettered` error and the delivery goes to the dead letters, with no reply or
//! failure stored, so that a replay can still answer it.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bus::{Bus, MemoryBus};
use chatfleet_worker::{Worker, WorkerConfig};
use futures::StreamExt;
use llm::mock_reply::MockSettings;
use llm::stand_in::StandInModel;
use schemas::{MessageId, PartitionCount, ReplyEventKind, UserMessage};
use store::{EmbeddedStore, Role, Store, StoredMessage};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn a_message_started_more_times_than_allowed_ends_in_a_dead_letter_error_and_no_stored_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("store.redb")).unwrap());
    let bus = Arc::new(MemoryBus::new(PartitionCount::new(2).unwrap()));
    let model = Arc::new(StandInModel::new(MockSettings::default()));
    let config = WorkerConfig { max_generation_starts: 2, ..WorkerConfig::default() };
    let worker = Worker::new(bus.clone(), store.clone(), model, config);
    let session = support::create_session(store.as_ref()).await;
    let message = UserMessage {
        v: schemas::ENVELOPE_VERSION,
        session_id: session.clone(),
        message_id: MessageId::generate(),
        text: "a reply that keeps crashing its workers".into(),
        accepted_at: time::OffsetDateTime::now_utc(),
        double_texting: None,
        channel: None,
        cancel: None,
    };
    // As if two workers had started its reply and died: the next start is the third.
    let recorded = StoredMessage {
        id: message.message_id.as_str().to_owned(),
        session_id: session.clone(),
        turn: 1,
        role: Role::User,
        text: message.text.clone(),
        created_at: message.accepted_at,
        reply_to: None,
        finish_reason: None,
        usage: None,
        failure: None,
        starts: 2,
    };
    store.insert_message(&recorded).await.unwrap();
    let mut events = bus.subscribe_events(&session).await.unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(worker.run(stop.clone().cancelled_owned()));

    bus.enqueue(&message).await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), events.next()).await.expect("no event within 10 s");

    let event = event.expect("the event stream ended");
    assert_eq!(event.message_id, message.message_id);
    assert!(
        matches!(&event.kind, ReplyEventKind::Error { code, .. } if code == "message_dead_lettered"),
        "expected a message_dead_lettered error, got {:?}",
        event.kind
    );
    assert!(
        store.outcome(&session, &message.message_id).await.unwrap().is_none(),
        "nothing may be stored as its outcome"
    );
    stop.cancel();
}
