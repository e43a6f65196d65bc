//! The behaviour every [`Store`] promises, written once and run against both implementations:
//! the embedded redb file and MongoDB (a SecantusDB server per test).

use std::any::Any;
use std::collections::BTreeMap;

use chatfleet_store::{
    Counter, EmbeddedStore, Failure, Inserted, MongoStore, Outcome, ReplyClaim, Role, SessionRecord, Store, StoreError,
    StoredMessage,
};
use schemas::{DoubleTexting, FinishReason, MessageId, ReplyId, SessionId, Usage};
use time::OffsetDateTime;
use time::macros::datetime;

/// A store under test, with whatever must stay alive while it is used.
struct Fixture {
    store: Box<dyn Store>,
    _keep: Box<dyn Any>,
}

async fn embedded() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
    Fixture { store: Box::new(store), _keep: Box::new(dir) }
}

async fn mongo() -> Fixture {
    let server = testkit::MongoServer::start().await;
    let store = MongoStore::connect(&server.url_for_db("behaviour")).await.unwrap();
    Fixture { store: Box::new(store), _keep: Box::new(server) }
}

/// Runs each named behaviour against one implementation, as one test per behaviour.
macro_rules! suite {
    ($backend:ident, $fixture:path, [$($behaviour:ident),* $(,)?]) => {
        mod $backend {
            $(
                #[tokio::test]
                async fn $behaviour() {
                    let fixture = $fixture().await;
                    super::$behaviour(fixture.store.as_ref()).await;
                }
            )*
        }
    };
}

macro_rules! behaviours {
    ($($behaviour:ident),* $(,)?) => {
        suite!(embedded_store, super::embedded, [$($behaviour),*]);
        suite!(mongo_store, super::mongo, [$($behaviour),*]);
    };
}

behaviours![
    ping_succeeds_on_a_reachable_store,
    created_sessions_are_returned_and_unknown_ones_are_not,
    creating_a_session_again_is_accepted_but_a_different_one_conflicts,
    deleting_a_session_removes_its_history_and_nothing_else,
    history_is_returned_in_conversation_order,
    records_round_trip_with_times_kept_to_the_millisecond,
    a_repeated_message_id_is_reported_already_present_and_changes_nothing,
    a_different_message_at_a_taken_position_is_a_conflict,
    a_message_id_taken_in_another_session_is_a_conflict,
    messages_are_found_only_in_their_own_session,
    recent_returns_the_newest_messages_in_conversation_order,
    outcome_is_the_reply_the_failure_or_nothing,
    a_message_and_its_reply_are_read_together_from_their_own_session_only,
    preparing_an_answer_reads_the_session_the_message_its_reply_and_the_newest_messages,
    marking_an_unknown_message_failed_is_an_error,
    shared_secret_gives_every_caller_the_first_value,
    generation_starts_are_counted_from_one_and_kept_on_the_user_message,
    beginning_generation_of_an_unknown_message_is_an_error,
    concurrent_generation_starts_get_distinct_counts,
    a_session_keeps_its_double_texting_policy,
    the_reply_marker_is_held_by_one_message_until_that_message_ends_it,
    racing_claims_of_the_reply_marker_have_exactly_one_winner,
    the_reply_marker_of_an_unknown_session_cannot_be_taken,
    the_reply_marker_leaves_the_session_record_as_created,
    deleting_a_session_removes_its_reply_marker,
    a_delivery_note_changes_only_from_the_value_its_writer_expects,
    racing_additions_to_a_counter_each_see_a_distinct_total,
    a_counter_total_adds_up_its_group_s_unexpired_members_only,
    a_set_counter_replaces_its_value,
];

const CREATED: OffsetDateTime = datetime!(2026-03-04 05:06:07.890 UTC);

fn session_id(name: &str) -> SessionId {
    SessionId::parse(name).unwrap()
}

fn session(name: &str) -> SessionRecord {
    SessionRecord {
        id: session_id(name),
        user: Some("u-1".to_owned()),
        metadata: BTreeMap::from([("plan".to_owned(), "free".to_owned())]),
        created_at: CREATED,
        double_texting: DoubleTexting::Enqueue,
        api_key: None,
    }
}

fn message_id(session: &str, turn: u64) -> MessageId {
    MessageId::parse(format!("m_{session}_{turn}")).unwrap()
}

fn user_message(session: &str, turn: u64, text: &str) -> StoredMessage {
    StoredMessage {
        id: message_id(session, turn).into_string(),
        session_id: session_id(session),
        turn,
        role: Role::User,
        text: text.to_owned(),
        created_at: CREATED,
        reply_to: None,
        finish_reason: None,
        usage: None,
        failure: None,
        starts: 0,
    }
}

fn reply(session: &str, turn: u64, text: &str) -> StoredMessage {
    let to = message_id(session, turn);
    StoredMessage {
        id: ReplyId::for_message(&to).into_string(),
        session_id: session_id(session),
        turn,
        role: Role::Assistant,
        text: text.to_owned(),
        created_at: CREATED,
        reply_to: Some(to),
        finish_reason: Some(FinishReason::Stop),
        usage: Some(Usage { prompt_tokens: 12, completion_tokens: 34 }),
        failure: None,
        starts: 0,
    }
}

fn texts(messages: &[StoredMessage]) -> Vec<&str> {
    messages.iter().map(|m| m.text.as_str()).collect()
}

async fn insert(store: &dyn Store, message: StoredMessage) {
    assert_eq!(store.insert_message(&message).await.unwrap(), Inserted::New, "inserting {}", message.id);
}

async fn ping_succeeds_on_a_reachable_store(store: &dyn Store) {
    let result = store.ping().await;

    assert!(result.is_ok(), "{result:?}");
}

async fn created_sessions_are_returned_and_unknown_ones_are_not(store: &dyn Store) {
    let created = session("s1");

    store.create_session(&created).await.unwrap();

    assert_eq!(store.session(&session_id("s1")).await.unwrap(), Some(created));
    assert_eq!(store.session(&session_id("s2")).await.unwrap(), None);
}

async fn creating_a_session_again_is_accepted_but_a_different_one_conflicts(store: &dyn Store) {
    let first = session("s1");
    let different = SessionRecord { user: Some("someone-else".to_owned()), ..session("s1") };
    store.create_session(&first).await.unwrap();

    let repeated = store.create_session(&first).await;
    let clashing = store.create_session(&different).await;

    assert!(repeated.is_ok(), "{repeated:?}");
    assert!(matches!(clashing, Err(StoreError::Conflict(_))), "{clashing:?}");
    assert_eq!(store.session(&first.id).await.unwrap(), Some(first));
}

async fn deleting_a_session_removes_its_history_and_nothing_else(store: &dyn Store) {
    for name in ["doomed", "kept"] {
        store.create_session(&session(name)).await.unwrap();
        insert(store, user_message(name, 1, "hello")).await;
        insert(store, reply(name, 1, "hi")).await;
    }

    let deleted = store.delete_session(&session_id("doomed")).await.unwrap();
    let deleted_again = store.delete_session(&session_id("doomed")).await.unwrap();

    assert!(deleted);
    assert!(!deleted_again);
    assert_eq!(store.session(&session_id("doomed")).await.unwrap(), None);
    assert!(store.history(&session_id("doomed")).await.unwrap().is_empty());
    let gone = store.message(&session_id("doomed"), message_id("doomed", 1).as_str()).await.unwrap();
    assert_eq!(gone, None);
    assert!(store.session(&session_id("kept")).await.unwrap().is_some());
    assert_eq!(texts(&store.history(&session_id("kept")).await.unwrap()), ["hello", "hi"]);
    // Nothing of the deleted session lingers to make a new message look like a repeat.
    assert_eq!(store.insert_message(&user_message("doomed", 1, "again")).await.unwrap(), Inserted::New);
}

async fn history_is_returned_in_conversation_order(store: &dyn Store) {
    store.create_session(&session("s1")).await.unwrap();
    // Written out of order, as concurrent workers and redeliveries may.
    insert(store, user_message("s1", 2, "u2")).await;
    insert(store, user_message("s1", 1, "u1")).await;
    insert(store, reply("s1", 2, "r2")).await;
    insert(store, reply("s1", 1, "r1")).await;
    insert(store, user_message("s1", 10, "u10")).await;

    let history = store.history(&session_id("s1")).await.unwrap();

    assert_eq!(texts(&history), ["u1", "r1", "u2", "r2", "u10"]);
    assert!(store.history(&session_id("empty")).await.unwrap().is_empty());
}

async fn records_round_trip_with_times_kept_to_the_millisecond(store: &dyn Store) {
    let precise = datetime!(2026-03-04 05:06:07.123_456_789 +02:00);
    let kept = datetime!(2026-03-04 03:06:07.123 UTC);
    let awkward_metadata = BTreeMap::from([
        ("$where".to_owned(), "1".to_owned()),
        ("a.b".to_owned(), "dotted".to_owned()),
        (String::new(), "empty key".to_owned()),
    ]);
    let created = SessionRecord { metadata: awkward_metadata, user: None, created_at: precise, ..session("s1") };
    let answer = StoredMessage {
        created_at: precise,
        finish_reason: Some(FinishReason::Other("tool_calls".to_owned())),
        text: "multi\nline ✓".to_owned(),
        ..reply("s1", 7, "")
    };

    store.create_session(&created).await.unwrap();
    insert(store, answer.clone()).await;
    let read_session = store.session(&created.id).await.unwrap().unwrap();
    let read_message = store.message(&created.id, &answer.id).await.unwrap().unwrap();

    assert_eq!(read_session, SessionRecord { created_at: kept, ..created });
    assert_eq!(read_session.created_at.offset(), time::UtcOffset::UTC);
    assert_eq!(read_message, StoredMessage { created_at: kept, ..answer });
    assert_eq!(read_message.position(), 15);
}

async fn a_repeated_message_id_is_reported_already_present_and_changes_nothing(store: &dyn Store) {
    store.create_session(&session("s1")).await.unwrap();
    let original = reply("s1", 1, "first answer");
    insert(store, original.clone()).await;
    let regenerated = StoredMessage { text: "second answer".to_owned(), ..original.clone() };

    let result = store.insert_message(&regenerated).await.unwrap();

    assert_eq!(result, Inserted::AlreadyPresent);
    assert_eq!(store.history(&session_id("s1")).await.unwrap(), [original]);
}

async fn a_different_message_at_a_taken_position_is_a_conflict(store: &dyn Store) {
    store.create_session(&session("s1")).await.unwrap();
    let first = user_message("s1", 1, "first");
    insert(store, first.clone()).await;
    let other = StoredMessage { id: "m_other".to_owned(), text: "other".to_owned(), ..first.clone() };

    let result = store.insert_message(&other).await;

    assert!(matches!(result, Err(StoreError::Conflict(_))), "{result:?}");
    assert_eq!(store.history(&session_id("s1")).await.unwrap(), [first]);
    assert_eq!(store.message(&session_id("s1"), "m_other").await.unwrap(), None);
}

async fn a_message_id_taken_in_another_session_is_a_conflict(store: &dyn Store) {
    let first = user_message("s1", 1, "first");
    insert(store, first.clone()).await;
    let elsewhere = StoredMessage { session_id: session_id("s2"), ..first.clone() };

    let result = store.insert_message(&elsewhere).await;

    assert!(matches!(result, Err(StoreError::Conflict(_))), "{result:?}");
    assert!(store.history(&session_id("s2")).await.unwrap().is_empty());
}

async fn messages_are_found_only_in_their_own_session(store: &dyn Store) {
    let message = user_message("s1", 1, "hello");
    insert(store, message.clone()).await;

    let own = store.message(&session_id("s1"), &message.id).await.unwrap();
    let foreign = store.message(&session_id("s2"), &message.id).await.unwrap();
    let unknown = store.message(&session_id("s1"), "m_unknown").await.unwrap();

    assert_eq!(own, Some(message));
    assert_eq!(foreign, None);
    assert_eq!(unknown, None);
}

async fn recent_returns_the_newest_messages_in_conversation_order(store: &dyn Store) {
    for turn in 1..=3 {
        insert(store, user_message("s1", turn, &format!("u{turn}"))).await;
        insert(store, reply("s1", turn, &format!("r{turn}"))).await;
    }
    insert(store, user_message("other", 9, "not mine")).await;
    let id = session_id("s1");

    let newest_three = store.recent(&id, 3).await.unwrap();
    let more_than_all = store.recent(&id, 100).await.unwrap();
    let none = store.recent(&id, 0).await.unwrap();

    assert_eq!(texts(&newest_three), ["r2", "u3", "r3"]);
    assert_eq!(texts(&more_than_all), ["u1", "r1", "u2", "r2", "u3", "r3"]);
    assert!(none.is_empty());
}

async fn outcome_is_the_reply_the_failure_or_nothing(store: &dyn Store) {
    let id = session_id("s1");
    let answered = reply("s1", 1, "answer");
    insert(store, user_message("s1", 1, "q1")).await;
    insert(store, answered.clone()).await;
    insert(store, user_message("s1", 2, "q2")).await;
    insert(store, user_message("s1", 3, "q3")).await;
    let failure = Failure { code: "model_unavailable".to_owned(), message: "the model did not answer".to_owned() };

    store.mark_failed(&id, &message_id("s1", 2), &failure).await.unwrap();

    assert_eq!(store.outcome(&id, &message_id("s1", 1)).await.unwrap(), Some(Outcome::Replied(answered)));
    assert_eq!(
        store.outcome(&id, &message_id("s1", 2)).await.unwrap(),
        Some(Outcome::Failed { turn: 2, failure: failure.clone() })
    );
    assert_eq!(store.outcome(&id, &message_id("s1", 3)).await.unwrap(), None);
    assert_eq!(store.outcome(&id, &message_id("s1", 4)).await.unwrap(), None);
    let failed = store.message(&id, message_id("s1", 2).as_str()).await.unwrap().unwrap();
    assert_eq!(failed.failure, Some(failure));
    assert_eq!(failed.text, "q2");
}

async fn a_message_and_its_reply_are_read_together_from_their_own_session_only(store: &dyn Store) {
    let (question, answer) = (user_message("s1", 1, "q1"), reply("s1", 1, "a1"));
    insert(store, question.clone()).await;
    insert(store, answer.clone()).await;
    insert(store, user_message("s1", 2, "q2")).await;
    let id = session_id("s1");

    let both = store.message_and_reply(&id, &message_id("s1", 1)).await.unwrap();
    let unanswered = store.message_and_reply(&id, &message_id("s1", 2)).await.unwrap();
    let unknown = store.message_and_reply(&id, &message_id("s1", 3)).await.unwrap();
    let elsewhere = store.message_and_reply(&session_id("other"), &message_id("s1", 1)).await.unwrap();

    assert_eq!((both.message, both.reply), (Some(question), Some(answer)));
    assert_eq!(unanswered.message.map(|m| m.text), Some("q2".to_owned()));
    assert_eq!(unanswered.reply, None);
    assert_eq!((unknown.message, unknown.reply), (None, None));
    assert_eq!((elsewhere.message, elsewhere.reply), (None, None));
}

async fn preparing_an_answer_reads_the_session_the_message_its_reply_and_the_newest_messages(store: &dyn Store) {
    store.create_session(&session("s1")).await.unwrap();
    store.create_session(&session("other")).await.unwrap();
    // A reply in progress: the marker is kept on the session's document, not in its record.
    store.begin_reply(&session_id("s1"), &message_id("s1", 3)).await.unwrap();
    for turn in 1..=2 {
        insert(store, user_message("s1", turn, &format!("q{turn}"))).await;
        insert(store, reply("s1", turn, &format!("a{turn}"))).await;
    }
    insert(store, user_message("s1", 3, "q3")).await;
    insert(store, user_message("other", 1, "elsewhere")).await;
    insert(store, user_message("gone", 1, "orphan")).await;
    let id = session_id("s1");

    let answered = store.prepare_answer(&id, &message_id("s1", 2), 3).await.unwrap();
    let pending = store.prepare_answer(&id, &message_id("s1", 3), 10).await.unwrap();
    let unknown = store.prepare_answer(&id, &message_id("s1", 4), 0).await.unwrap();
    let elsewhere = store.prepare_answer(&session_id("other"), &message_id("s1", 1), 5).await.unwrap();
    let deleted = store.prepare_answer(&session_id("gone"), &message_id("gone", 1), 1).await.unwrap();

    assert_eq!(answered.session, Some(session("s1")));
    assert_eq!(answered.found.message.map(|m| m.text), Some("q2".to_owned()));
    assert_eq!(answered.found.reply.map(|m| m.text), Some("a2".to_owned()));
    assert_eq!(answered.recent.as_deref().map(texts), Some(vec!["q2", "a2", "q3"]));
    assert_eq!(pending.found.message.map(|m| m.text), Some("q3".to_owned()));
    assert_eq!(pending.found.reply, None);
    assert_eq!(pending.recent.as_deref().map(texts), Some(vec!["q1", "a1", "q2", "a2", "q3"]));
    assert_eq!(unknown.session, Some(session("s1")));
    assert_eq!((unknown.found.message, unknown.found.reply, unknown.recent), (None, None, None));
    assert_eq!(elsewhere.session, Some(session("other")));
    assert_eq!((elsewhere.found.message, elsewhere.found.reply), (None, None));
    assert_eq!(elsewhere.recent.as_deref().map(texts), Some(vec!["elsewhere"]));
    assert_eq!(deleted.session, None);
    assert_eq!(deleted.found.message.map(|m| m.text), Some("orphan".to_owned()));
    assert_eq!(deleted.recent.as_deref().map(texts), Some(vec!["orphan"]));
}

async fn marking_an_unknown_message_failed_is_an_error(store: &dyn Store) {
    insert(store, user_message("s1", 1, "q1")).await;
    insert(store, reply("s1", 1, "a1")).await;
    let failure = Failure { code: "x".to_owned(), message: "y".to_owned() };
    let reply_as_message_id = MessageId::parse(ReplyId::for_message(&message_id("s1", 1)).into_string()).unwrap();

    let unknown = store.mark_failed(&session_id("s1"), &message_id("s1", 5), &failure).await;
    let wrong_session = store.mark_failed(&session_id("s2"), &message_id("s1", 1), &failure).await;
    let not_a_user_message = store.mark_failed(&session_id("s1"), &reply_as_message_id, &failure).await;

    assert!(matches!(unknown, Err(StoreError::Fatal(_))), "{unknown:?}");
    assert!(matches!(wrong_session, Err(StoreError::Fatal(_))), "{wrong_session:?}");
    assert!(matches!(not_a_user_message, Err(StoreError::Fatal(_))), "{not_a_user_message:?}");
    assert!(store.history(&session_id("s1")).await.unwrap().iter().all(|m| m.failure.is_none()));
}

async fn shared_secret_gives_every_caller_the_first_value(store: &dyn Store) {
    let proposals: Vec<Vec<u8>> = (0u8..8).map(|i| vec![i; 32]).collect();

    let concurrent = futures::future::join_all(proposals.iter().map(|p| store.shared_secret("signing", p))).await;
    let later = store.shared_secret("signing", b"too late").await.unwrap();
    let other_name = store.shared_secret("other", b"independent").await.unwrap();

    let winner = concurrent[0].as_ref().unwrap().clone();
    assert!(proposals.contains(&winner));
    for result in &concurrent {
        assert_eq!(result.as_ref().unwrap(), &winner);
    }
    assert_eq!(later, winner);
    assert_eq!(other_name, b"independent");
}

async fn generation_starts_are_counted_from_one_and_kept_on_the_user_message(store: &dyn Store) {
    let id = session_id("s1");
    let question = message_id("s1", 1);
    insert(store, user_message("s1", 1, "q1")).await;
    insert(store, reply("s1", 1, "a1")).await;
    insert(store, user_message("s1", 2, "q2")).await;
    let before = store.message(&id, question.as_str()).await.unwrap().unwrap();

    let first = store.begin_generation(&id, &question).await.unwrap();
    let second = store.begin_generation(&id, &question).await.unwrap();

    assert_eq!(before.starts, 0);
    assert_eq!((first, second), (1, 2));
    let read = store.message(&id, question.as_str()).await.unwrap().unwrap();
    assert_eq!(read, StoredMessage { starts: 2, ..user_message("s1", 1, "q1") });
    let starts: Vec<u32> = store.history(&id).await.unwrap().iter().map(|m| m.starts).collect();
    assert_eq!(starts, [2, 0, 0], "only the started user message counts");
    // Other updates of the message keep the count.
    let failure = Failure { code: "x".to_owned(), message: "y".to_owned() };
    store.mark_failed(&id, &question, &failure).await.unwrap();
    assert_eq!(store.message(&id, question.as_str()).await.unwrap().unwrap().starts, 2);
}

async fn beginning_generation_of_an_unknown_message_is_an_error(store: &dyn Store) {
    insert(store, user_message("s1", 1, "q1")).await;
    insert(store, reply("s1", 1, "a1")).await;
    let reply_as_message_id = MessageId::parse(ReplyId::for_message(&message_id("s1", 1)).into_string()).unwrap();

    let unknown = store.begin_generation(&session_id("s1"), &message_id("s1", 5)).await;
    let wrong_session = store.begin_generation(&session_id("s2"), &message_id("s1", 1)).await;
    let not_a_user_message = store.begin_generation(&session_id("s1"), &reply_as_message_id).await;

    assert!(matches!(unknown, Err(StoreError::Fatal(_))), "{unknown:?}");
    assert!(matches!(wrong_session, Err(StoreError::Fatal(_))), "{wrong_session:?}");
    assert!(matches!(not_a_user_message, Err(StoreError::Fatal(_))), "{not_a_user_message:?}");
    assert!(store.history(&session_id("s1")).await.unwrap().iter().all(|m| m.starts == 0));
    assert!(store.history(&session_id("s2")).await.unwrap().is_empty());
}

async fn concurrent_generation_starts_get_distinct_counts(store: &dyn Store) {
    let id = session_id("s1");
    let question = message_id("s1", 1);
    insert(store, user_message("s1", 1, "q1")).await;

    let racing = futures::future::join_all((0..20).map(|_| store.begin_generation(&id, &question))).await;

    let mut counts: Vec<u32> = racing.into_iter().map(Result::unwrap).collect();
    counts.sort_unstable();
    assert_eq!(counts, (1..=20).collect::<Vec<u32>>());
    assert_eq!(store.message(&id, question.as_str()).await.unwrap().unwrap().starts, 20);
}

async fn a_session_keeps_its_double_texting_policy(store: &dyn Store) {
    let created: Vec<SessionRecord> = DoubleTexting::ALL
        .into_iter()
        .map(|policy| SessionRecord { double_texting: policy, ..session(&format!("s-{policy}")) })
        .collect();
    for record in &created {
        store.create_session(record).await.unwrap();
    }
    let interrupting = created.last().unwrap().clone();

    let same_again = store.create_session(&interrupting).await;
    let other_policy =
        store.create_session(&SessionRecord { double_texting: DoubleTexting::Reject, ..interrupting }).await;

    for record in &created {
        assert_eq!(store.session(&record.id).await.unwrap().as_ref(), Some(record));
    }
    assert!(same_again.is_ok(), "{same_again:?}");
    assert!(matches!(other_policy, Err(StoreError::Conflict(_))), "{other_policy:?}");
}

async fn the_reply_marker_is_held_by_one_message_until_that_message_ends_it(store: &dyn Store) {
    let id = session_id("s1");
    let (first, second) = (message_id("s1", 1), message_id("s1", 2));
    store.create_session(&session("s1")).await.unwrap();

    let taken = store.begin_reply(&id, &first).await.unwrap();
    let repeated = store.begin_reply(&id, &first).await.unwrap();
    let refused = store.begin_reply(&id, &second).await.unwrap();
    store.end_reply(&id, &second).await.unwrap();
    let still_refused = store.begin_reply(&id, &second).await.unwrap();
    store.end_reply(&id, &first).await.unwrap();
    let taken_after = store.begin_reply(&id, &second).await.unwrap();

    assert_eq!(taken, ReplyClaim::Taken);
    assert_eq!(repeated, ReplyClaim::AlreadyHeld);
    let ReplyClaim::HeldBy { message, since } = refused else {
        panic!("expected the marker held by the first message, got {refused:?}");
    };
    assert_eq!(message, first);
    let age = OffsetDateTime::now_utc() - since;
    assert!(age >= time::Duration::seconds(-5) && age < time::Duration::seconds(60), "marked at {since}");
    assert_eq!(since.offset(), time::UtcOffset::UTC);
    assert!(matches!(still_refused, ReplyClaim::HeldBy { ref message, .. } if *message == first), "{still_refused:?}");
    assert_eq!(taken_after, ReplyClaim::Taken);
}

async fn racing_claims_of_the_reply_marker_have_exactly_one_winner(store: &dyn Store) {
    let id = session_id("s1");
    store.create_session(&session("s1")).await.unwrap();
    let contenders: Vec<MessageId> = (1..=20).map(|turn| message_id("s1", turn)).collect();

    let claims = futures::future::join_all(contenders.iter().map(|m| store.begin_reply(&id, m))).await;

    let claims: Vec<ReplyClaim> = claims.into_iter().map(Result::unwrap).collect();
    let winners: Vec<&MessageId> =
        contenders.iter().zip(&claims).filter(|(_, c)| **c == ReplyClaim::Taken).map(|(m, _)| m).collect();
    assert_eq!(winners.len(), 1, "{claims:?}");
    for claim in &claims {
        match claim {
            ReplyClaim::Taken => {}
            ReplyClaim::HeldBy { message, .. } => assert_eq!(message, winners[0]),
            other => panic!("unexpected claim {other:?}"),
        }
    }
}

async fn the_reply_marker_of_an_unknown_session_cannot_be_taken(store: &dyn Store) {
    let id = session_id("nobody");

    let claim = store.begin_reply(&id, &message_id("nobody", 1)).await.unwrap();
    let ended = store.end_reply(&id, &message_id("nobody", 1)).await;

    assert_eq!(claim, ReplyClaim::NoSession);
    assert!(ended.is_ok(), "{ended:?}");
    assert_eq!(store.session(&id).await.unwrap(), None);
}

async fn the_reply_marker_leaves_the_session_record_as_created(store: &dyn Store) {
    let created = session("s1");
    store.create_session(&created).await.unwrap();

    store.begin_reply(&created.id, &message_id("s1", 1)).await.unwrap();
    let read = store.session(&created.id).await.unwrap();
    let created_again = store.create_session(&created).await;

    assert_eq!(read, Some(created.clone()));
    assert!(created_again.is_ok(), "{created_again:?}");
}

async fn deleting_a_session_removes_its_reply_marker(store: &dyn Store) {
    let id = session_id("s1");
    store.create_session(&session("s1")).await.unwrap();
    store.begin_reply(&id, &message_id("s1", 1)).await.unwrap();

    store.delete_session(&id).await.unwrap();
    store.create_session(&session("s1")).await.unwrap();
    let claim = store.begin_reply(&id, &message_id("s1", 2)).await.unwrap();

    assert_eq!(claim, ReplyClaim::Taken);
}

async fn a_delivery_note_changes_only_from_the_value_its_writer_expects(store: &dyn Store) {
    let racing = futures::future::join_all(
        (0..8).map(|i| async move { (i, store.swap_delivery_note("slack/r_1", None, &format!("claim {i}")).await) }),
    )
    .await;
    let winners: Vec<usize> = racing.iter().filter(|(_, won)| *won.as_ref().unwrap()).map(|(i, _)| *i).collect();
    let stale = store.swap_delivery_note("slack/r_1", Some("claim 99"), "ts:1").await.unwrap();
    let claimed = store.delivery_note("slack/r_1").await.unwrap();
    let moved = store.swap_delivery_note("slack/r_1", claimed.as_deref(), "ts:1.5").await.unwrap();

    assert_eq!(winners.len(), 1, "{racing:?}");
    assert_eq!(claimed, Some(format!("claim {}", winners[0])));
    assert!(!stale);
    assert!(moved);
    assert_eq!(store.delivery_note("slack/r_1").await.unwrap().as_deref(), Some("ts:1.5"));
    assert_eq!(store.delivery_note("slack/r_2").await.unwrap(), None);
}

async fn racing_additions_to_a_counter_each_see_a_distinct_total(store: &dyn Store) {
    let counter = Counter::single("messages:key:acme:29400000");
    let expires = OffsetDateTime::now_utc() + time::Duration::minutes(5);

    let racing = futures::future::join_all((0..20).map(|_| store.add_to_counter(&counter, 1, expires))).await;

    let mut totals: Vec<i64> = racing.into_iter().map(Result::unwrap).collect();
    totals.sort_unstable();
    assert_eq!(totals, (1..=20).collect::<Vec<i64>>());
    assert_eq!(store.add_to_counter(&counter, -5, expires).await.unwrap(), 15);
    assert_eq!(store.counter_total(&counter.group, OffsetDateTime::now_utc()).await.unwrap(), 15);
}

async fn a_counter_total_adds_up_its_group_s_unexpired_members_only(store: &dyn Store) {
    let now = OffsetDateTime::now_utc();
    let live = now + time::Duration::minutes(5);
    store.set_counter(&Counter::member("streams:key:acme", "gateway-a"), 3, live).await.unwrap();
    store.add_to_counter(&Counter::member("streams:key:acme", "gateway-b"), 4, live).await.unwrap();
    // A gateway that stopped reporting: its count no longer holds anyone's streams.
    store
        .set_counter(&Counter::member("streams:key:acme", "gateway-c"), 50, now - time::Duration::seconds(1))
        .await
        .unwrap();
    // Another group, whose name extends this one's.
    store.set_counter(&Counter::member("streams:key:acme2", "gateway-a"), 7, live).await.unwrap();
    store.set_counter(&Counter::single("streams:key:acm"), 9, live).await.unwrap();

    assert_eq!(store.counter_total("streams:key:acme", now).await.unwrap(), 7);
    assert_eq!(store.counter_total("streams:key:acme2", now).await.unwrap(), 7);
    assert_eq!(store.counter_total("streams:key:nobody", now).await.unwrap(), 0);
}

async fn a_set_counter_replaces_its_value(store: &dyn Store) {
    let counter = Counter::member("streams:user:u1", "gateway-a");
    let live = OffsetDateTime::now_utc() + time::Duration::minutes(5);
    store.set_counter(&counter, 5, live).await.unwrap();

    store.set_counter(&counter, 2, live).await.unwrap();

    assert_eq!(store.counter_total("streams:user:u1", OffsetDateTime::now_utc()).await.unwrap(), 2);
}
