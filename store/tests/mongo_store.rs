//! What only the MongoDB store does: connect by URL, prepare its indexes, and report an
//! unreachable server as something to retry.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chatfleet_store::mongo::SESSION_POSITION_INDEX;
use chatfleet_store::{MongoStore, SessionRecord, Store, StoreError};
use mongodb::bson::{self, doc};
use schemas::{DoubleTexting, MessageId, SessionId};
use testkit::MongoServer;
use time::macros::datetime;

fn session() -> SessionRecord {
    SessionRecord {
        id: SessionId::parse("s1").unwrap(),
        user: Some("u".to_owned()),
        metadata: BTreeMap::new(),
        created_at: datetime!(2026-01-01 00:00:00 UTC),
        double_texting: DoubleTexting::Reject,
        api_key: None,
    }
}

#[tokio::test]
async fn connecting_to_a_closed_port_fails_quickly_as_unavailable_without_credentials() {
    let port = testkit::free_port();
    let url = format!("mongodb://chat:hunter2@127.0.0.1:{port}/chat?directConnection=true");
    let started = Instant::now();

    let result = MongoStore::connect(&url).await;

    let elapsed = started.elapsed();
    let Err(StoreError::Unavailable(message)) = result else {
        panic!("expected Unavailable, got {result:?}");
    };
    assert!(elapsed < Duration::from_secs(4), "took {elapsed:?}");
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
    assert!(!message.contains("hunter2"), "{message}");
}

#[tokio::test]
async fn a_malformed_url_is_fatal() {
    let result = MongoStore::connect("mongodb://127.0.0.1:27017/?directConnection=maybe").await;

    assert!(matches!(result, Err(StoreError::Fatal(_))), "{result:?}");
}

#[tokio::test]
async fn the_database_is_named_by_the_url_or_defaults_to_chatfleet() {
    let server = MongoServer::start().await;

    let named = MongoStore::connect(&server.url_for_db("tenant_a")).await.unwrap();
    let unnamed = MongoStore::connect(&server.url()).await.unwrap();
    named.create_session(&session()).await.unwrap();

    assert_eq!(named.database_name(), "tenant_a");
    assert_eq!(unnamed.database_name(), "chatfleet");
    assert_eq!(unnamed.session(&session().id).await.unwrap(), None);
}

#[tokio::test]
async fn connecting_prepares_the_position_index_and_can_be_repeated() {
    let server = MongoServer::start().await;
    MongoStore::connect(&server.url()).await.unwrap();

    let again = MongoStore::connect(&server.url()).await.unwrap();

    let indexes = again
        .client()
        .database(again.database_name())
        .collection::<mongodb::bson::Document>("messages")
        .list_index_names()
        .await
        .unwrap();
    assert!(indexes.iter().any(|name| name == SESSION_POSITION_INDEX), "{indexes:?}");
}

#[tokio::test]
async fn a_stopped_server_makes_the_store_unavailable_until_it_is_back() {
    let data = tempfile::tempdir().unwrap();
    let mut server = MongoServer::start_with_storage(data.path()).await;
    let store = MongoStore::connect(&server.url()).await.unwrap();
    store.create_session(&session()).await.unwrap();

    server.stop().await;
    let started = Instant::now();
    let while_down = store.ping().await;
    let waited = started.elapsed();
    server.restart().await;
    let after_restart = store.session(&session().id).await;

    assert!(matches!(while_down, Err(StoreError::Unavailable(_))), "{while_down:?}");
    assert!(waited < Duration::from_secs(4), "took {waited:?}");
    assert_eq!(after_restart.unwrap(), Some(session()), "{}", server.log_tail());
}

#[tokio::test]
async fn messages_stored_before_the_start_counter_read_as_never_started_and_can_be_counted() {
    let server = MongoServer::start().await;
    let store = MongoStore::connect(&server.url()).await.unwrap();
    let messages = store.client().database(store.database_name()).collection::<bson::Document>("messages");
    // A user message as written before `starts` existed.
    messages
        .insert_one(doc! {
            "_id": "m_old", "session_id": "s1", "position": 2_i64, "turn": 1_i64, "role": "user", "text": "old",
            "created_at": bson::DateTime::from_millis(1_767_225_600_000),
        })
        .await
        .unwrap();
    let id = SessionId::parse("s1").unwrap();

    let before = store.message(&id, "m_old").await.unwrap().unwrap();
    let first = store.begin_generation(&id, &MessageId::parse("m_old").unwrap()).await.unwrap();

    assert_eq!(before.starts, 0);
    assert_eq!(first, 1);
    let stored = messages.find_one(doc! { "_id": "m_old" }).await.unwrap().unwrap();
    assert_eq!(stored.get("starts"), Some(&bson::Bson::Int32(1)), "{stored}");
}

#[tokio::test]
async fn sessions_stored_before_the_policy_read_as_enqueue_and_can_mark_a_reply() {
    let server = MongoServer::start().await;
    let store = MongoStore::connect(&server.url()).await.unwrap();
    let sessions = store.client().database(store.database_name()).collection::<bson::Document>("sessions");
    // A session as written before `double_texting` and the reply marker existed.
    sessions
        .insert_one(doc! {
            "_id": "s_old", "metadata": [], "created_at": bson::DateTime::from_millis(1_767_225_600_000),
        })
        .await
        .unwrap();
    let id = SessionId::parse("s_old").unwrap();
    let message = MessageId::parse("m_1").unwrap();

    let read = store.session(&id).await.unwrap().unwrap();
    let claim = store.begin_reply(&id, &message).await.unwrap();
    let marked = sessions.find_one(doc! { "_id": "s_old" }).await.unwrap().unwrap();
    store.end_reply(&id, &message).await.unwrap();
    let cleared = sessions.find_one(doc! { "_id": "s_old" }).await.unwrap().unwrap();

    assert_eq!(read.double_texting, DoubleTexting::Enqueue);
    assert_eq!(claim, chatfleet_store::ReplyClaim::Taken);
    assert_eq!(marked.get_str("busy"), Ok("m_1"), "{marked}");
    assert!(marked.get_datetime("busy_since").is_ok(), "{marked}");
    assert!(!cleared.contains_key("busy") && !cleared.contains_key("busy_since"), "{cleared}");
    assert_eq!(store.session(&id).await.unwrap(), Some(read));
}
