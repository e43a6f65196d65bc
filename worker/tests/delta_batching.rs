//! Delta batching: under load a worker publishes a reply's chunks in fewer, larger `delta`
//! events, and otherwise one event per chunk; either way the first chunk goes out alone and at
//! once, the indexes count up from 0, and the deltas concatenate to the `done` text.

use std::sync::Arc;
use std::time::Duration;

use bus::{Bus, MemoryBus};
use chatfleet_worker::{Worker, WorkerConfig};
use futures::StreamExt;
use llm::mock_reply::{MockSettings, reply_tokens};
use llm::stand_in::StandInModel;
use schemas::{MessageId, PartitionCount, ReplyEventKind, UserMessage};
use store::EmbeddedStore;
use tokio_util::sync::CancellationToken;

mod support;

/// The model: 20 chunks, 10 ms apart.
fn model() -> MockSettings {
    MockSettings {
        first_token_delay: Duration::from_millis(1),
        token_delay: Duration::from_millis(10),
        reply_tokens: 20,
        echo_chars: 0,
    }
}

/// The `delta` texts of the reply to one message, and its `done` text.
struct Reply {
    deltas: Vec<String>,
    done: String,
}

/// Answers one message with a worker configured by `configure`.
async fn reply_with(configure: impl FnOnce(&mut WorkerConfig)) -> Reply {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("store.redb")).unwrap());
    let bus = Arc::new(MemoryBus::new(PartitionCount::new(2).unwrap()));
    let mut config =
        WorkerConfig { worker_id: schemas::WorkerId::parse("batching-test").unwrap(), ..WorkerConfig::default() };
    configure(&mut config);
    let worker = Worker::new(bus.clone(), store.clone(), Arc::new(StandInModel::new(model())), config);
    let session = support::create_session(store.as_ref()).await;
    let mut events = bus.subscribe_events(&session).await.unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(worker.run(stop.clone().cancelled_owned()));

    let message = UserMessage {
        v: schemas::ENVELOPE_VERSION,
        session_id: session,
        message_id: MessageId::generate(),
        text: "hello".into(),
        accepted_at: time::OffsetDateTime::now_utc(),
        double_texting: None,
        channel: None,
        cancel: None,
    };
    bus.enqueue(&message).await.unwrap();
    let mut deltas = Vec::new();
    let done = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let event = events.next().await.expect("the event stream ended");
            match event.kind {
                ReplyEventKind::Delta { index, text } => {
                    assert_eq!(index as usize, deltas.len(), "delta indexes must count up from 0");
                    deltas.push(text);
                }
                ReplyEventKind::Done { text, .. } => return text,
                other => panic!("unexpected event: {other:?}"),
            }
        }
    })
    .await
    .expect("no done event within 10 s");
    stop.cancel();
    Reply { deltas, done }
}

#[tokio::test]
async fn a_busy_worker_batches_chunks_after_sending_the_first_alone() {
    let chunks = reply_tokens("hello", &model());

    // Any load counts as busy here, and a batch spans the whole reply after the first chunk.
    let reply = reply_with(|config| {
        config.delta_batch = Duration::from_secs(5);
        config.delta_batch_above = 0;
    })
    .await;

    assert_eq!(reply.deltas.concat(), reply.done, "the deltas must add up to the reply");
    assert_eq!(reply.deltas.first(), chunks.first(), "the first chunk goes out alone");
    assert_eq!(reply.deltas.len(), 2, "the rest should go out as one batch: {:?}", reply.deltas);
}

#[tokio::test]
async fn a_quiet_worker_sends_every_chunk_as_it_comes() {
    let chunks = reply_tokens("hello", &model());

    // The default threshold: one generation is far below it.
    let reply = reply_with(|config| config.delta_batch = Duration::from_secs(5)).await;

    assert_eq!(reply.deltas, chunks);
    assert_eq!(reply.deltas.concat(), reply.done);
}

#[tokio::test]
async fn a_zero_window_sends_every_chunk_even_when_busy() {
    let chunks = reply_tokens("hello", &model());

    let reply = reply_with(|config| {
        config.delta_batch = Duration::ZERO;
        config.delta_batch_above = 0;
    })
    .await;

    assert_eq!(reply.deltas, chunks);
}
