//! What only the embedded store does: live in a file that outlasts the process and that one
//! process at a time may open.

use std::collections::BTreeMap;

use chatfleet_store::{EmbeddedStore, Inserted, Role, SessionRecord, Store, StoreError, StoredMessage};
use schemas::{DoubleTexting, SessionId};
use time::macros::datetime;

fn session() -> SessionRecord {
    SessionRecord {
        id: SessionId::parse("s1").unwrap(),
        user: None,
        metadata: BTreeMap::new(),
        created_at: datetime!(2026-01-01 00:00:00 UTC),
        double_texting: DoubleTexting::Reject,
        api_key: None,
    }
}

fn user_message(turn: u64, text: &str) -> StoredMessage {
    StoredMessage {
        id: format!("m_{turn}"),
        session_id: SessionId::parse("s1").unwrap(),
        turn,
        role: Role::User,
        text: text.to_owned(),
        created_at: datetime!(2026-01-01 00:00:01 UTC),
        reply_to: None,
        finish_reason: None,
        usage: None,
        failure: None,
        starts: 0,
    }
}

#[tokio::test]
async fn data_survives_reopening_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let store = EmbeddedStore::open(&path).unwrap();
    store.create_session(&session()).await.unwrap();
    store.insert_message(&user_message(1, "kept")).await.unwrap();
    let secret = store.shared_secret("signing", b"first").await.unwrap();
    drop(store);

    let reopened = EmbeddedStore::open(&path).unwrap();

    assert_eq!(reopened.session(&session().id).await.unwrap(), Some(session()));
    assert_eq!(reopened.history(&session().id).await.unwrap(), [user_message(1, "kept")]);
    assert_eq!(reopened.shared_secret("signing", b"second").await.unwrap(), secret);
    assert_eq!(reopened.insert_message(&user_message(1, "kept")).await.unwrap(), Inserted::AlreadyPresent);
}

#[tokio::test]
async fn missing_parent_directories_are_created() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a").join("b").join("store.redb");

    let store = EmbeddedStore::open(&path).unwrap();

    assert!(path.is_file());
    assert_eq!(store.path(), path);
    assert!(store.ping().await.is_ok());
}

#[test]
fn a_file_already_open_is_reported_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let _first = EmbeddedStore::open(&path).unwrap();

    let second = EmbeddedStore::open(&path);

    match second {
        Err(StoreError::Fatal(message)) => {
            assert!(message.contains("is in use by another chatfleet process"), "{message}");
            assert!(message.contains(&path.display().to_string()), "{message}");
        }
        other => panic!("expected an in-use error, got {other:?}"),
    }
}

#[test]
fn a_file_that_is_not_a_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, "these are not the tables you are looking for".repeat(100)).unwrap();

    let opened = EmbeddedStore::open(&path);

    assert!(matches!(opened, Err(StoreError::Fatal(_))), "{opened:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_committed_together_keep_their_own_answers() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
    store.create_session(&session()).await.unwrap();

    // 100 turns, each written twice under different ids: one of each pair is stored, the other
    // refused as a conflict, however the writes are batched, and refusals leave no trace.
    let writes = (1..=100u64).flat_map(|turn| {
        let first = user_message(turn, "first");
        let second = StoredMessage { id: format!("m_{turn}_again"), text: "second".into(), ..user_message(turn, "x") };
        [first, second]
    });
    let tasks: Vec<_> = writes
        .map(|message| {
            let store = store.clone();
            tokio::spawn(async move { store.insert_message(&message).await })
        })
        .collect();
    let mut stored = 0;
    let mut refused = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(Inserted::New) => stored += 1,
            Err(StoreError::Conflict(_)) => refused += 1,
            other => panic!("unexpected answer: {other:?}"),
        }
    }

    assert_eq!((stored, refused), (100, 100));
    let history = store.history(&SessionId::parse("s1").unwrap()).await.unwrap();
    assert_eq!(history.len(), 100);
    assert!(history.iter().enumerate().all(|(i, m)| m.turn == i as u64 + 1));
    drop(store);
    // Every answered write was committed: the file, reopened at once, holds them all.
    let reopened = EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
    assert_eq!(reopened.history(&SessionId::parse("s1").unwrap()).await.unwrap().len(), 100);
}
