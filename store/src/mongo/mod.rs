//! The MongoDB store, for fleets: one document per session, message and secret, with
//! uniqueness enforced by the server's indexes so that concurrent workers cannot write two
//! answers to one message.
//!
//! Nothing here uses transactions: every operation is a single-document write, or (for
//! deleting a session) a sequence of writes that is safe to repeat.

mod documents;
mod errors;

use schemas::redact_url;
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use mongodb::bson::{Binary, doc, spec::BinarySubtype};
use mongodb::options::{ClientOptions, IndexOptions, ReturnDocument};
use mongodb::{Client, Collection, Database, IndexModel};
use schemas::{MessageId, SessionId};

use crate::{Counter, Failure, Inserted, MessageAndReply, ReplyClaim, SessionRecord, Store, StoreError, StoredMessage};
use documents::{CounterDoc, MessageDoc, NoteDoc, SecretDoc, SessionDoc, from_bson_time, starts_value, to_bson_time};
use errors::{classify, is_duplicate_key};

/// The database used when the URL names none.
pub const DEFAULT_DATABASE: &str = "chatfleet";

/// The name of the unique index on `messages` that allows one message per conversation
/// position.
pub const SESSION_POSITION_INDEX: &str = "session_position_unique";

/// How long an operation waits for a usable server unless the URL says otherwise
/// (`serverSelectionTimeoutMS`). Short, so that an unreachable store fails a request quickly
/// and the caller's own retry takes over, instead of every request hanging for the driver's
/// default 30 seconds.
const SERVER_SELECTION_TIMEOUT: Duration = Duration::from_secs(2);

/// How long opening a connection may take unless the URL says otherwise (`connectTimeoutMS`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How often [`Store::begin_reply`] tries its update when the marker changes under it.
const CLAIM_ATTEMPTS: usize = 5;

/// A [`Store`] on a MongoDB deployment. Cheap to clone; clones share one connection pool.
#[derive(Clone)]
pub struct MongoStore {
    client: Client,
    db: Database,
    sessions: Collection<SessionDoc>,
    messages: Collection<MessageDoc>,
    secrets: Collection<SecretDoc>,
    notes: Collection<NoteDoc>,
    counters: Collection<CounterDoc>,
}

impl std::fmt::Debug for MongoStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MongoStore").field("database", &self.db.name()).finish_non_exhaustive()
    }
}

impl MongoStore {
    /// Connects to the deployment at `url` and creates the indexes the store relies on.
    ///
    /// The database is the one named in the URL's path, or [`DEFAULT_DATABASE`]. Fails with
    /// [`StoreError::Unavailable`] if no server answers within the server-selection timeout
    /// (2 s unless the URL sets `serverSelectionTimeoutMS`), and with [`StoreError::Fatal`]
    /// for a malformed URL. Messages name the URL without its credentials.
    pub async fn connect(url: &str) -> Result<MongoStore, StoreError> {
        let shown = redact_url(url);
        let mut options = ClientOptions::parse(url)
            .await
            .map_err(|e| StoreError::Fatal(format!("invalid MongoDB URL {shown}: {}", e.kind)))?;
        options.server_selection_timeout.get_or_insert(SERVER_SELECTION_TIMEOUT);
        options.connect_timeout.get_or_insert(CONNECT_TIMEOUT);
        options.app_name.get_or_insert_with(|| "chatfleet".to_owned());
        let db_name = options.default_database.clone().unwrap_or_else(|| DEFAULT_DATABASE.to_owned());
        let client = Client::with_options(options)
            .map_err(|e| StoreError::Fatal(format!("cannot configure a MongoDB client for {shown}: {}", e.kind)))?;
        let db = client.database(&db_name);
        let store = MongoStore {
            sessions: db.collection("sessions"),
            messages: db.collection("messages"),
            secrets: db.collection("secrets"),
            notes: db.collection("delivery_notes"),
            counters: db.collection("counters"),
            client,
            db,
        };
        // Creating the index is also the first round trip, so an unreachable server is found
        // here rather than at the first request.
        store.create_indexes().await.map_err(|e| match e {
            StoreError::Unavailable(m) => StoreError::Unavailable(format!("cannot reach MongoDB at {shown}: {m}")),
            StoreError::Fatal(m) => StoreError::Fatal(format!("cannot prepare MongoDB at {shown}: {m}")),
            other => other,
        })?;
        Ok(store)
    }

    /// The name of the database in use.
    pub fn database_name(&self) -> &str {
        self.db.name()
    }

    /// The driver's client, for callers that need more than the [`Store`] trait (metrics,
    /// administration in tests).
    pub fn client(&self) -> &Client {
        &self.client
    }

    async fn create_indexes(&self) -> Result<(), StoreError> {
        // Sessions and secrets are keyed by `_id`, which is unique already; messages are too
        // (message id or reply id, so one reply per message), and need one more rule.
        let index = IndexModel::builder()
            .keys(doc! { "session_id": 1, "position": 1 })
            .options(IndexOptions::builder().unique(true).name(SESSION_POSITION_INDEX.to_owned()).build())
            .build();
        self.messages.create_index(index).await.map_err(|e| classify(e, "creating the messages index"))?;
        // Counters are read by group, and dropped by the server once expired.
        let by_group = IndexModel::builder().keys(doc! { "group": 1 }).build();
        self.counters.create_index(by_group).await.map_err(|e| classify(e, "creating the counters index"))?;
        let expiry = IndexModel::builder()
            .keys(doc! { "expires_at": 1 })
            .options(IndexOptions::builder().expire_after(Duration::ZERO).build())
            .build();
        self.counters.create_index(expiry).await.map_err(|e| classify(e, "creating the counters' expiry index"))?;
        Ok(())
    }

    async fn find_message_by_id(&self, id: &str) -> Result<Option<MessageDoc>, StoreError> {
        self.messages.find_one(doc! { "_id": id }).await.map_err(|e| classify(e, "reading a message"))
    }

    async fn find_messages(
        &self,
        session: &SessionId,
        newest_first: bool,
        limit: Option<i64>,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let order = if newest_first { -1 } else { 1 };
        let mut find = self.messages.find(doc! { "session_id": session.as_str() }).sort(doc! { "position": order });
        if let Some(limit) = limit {
            find = find.limit(limit);
        }
        let docs: Vec<MessageDoc> = find
            .await
            .map_err(|e| classify(e, "reading a conversation"))?
            .try_collect()
            .await
            .map_err(|e| classify(e, "reading a conversation"))?;
        docs.into_iter().map(MessageDoc::into_record).collect()
    }
}

#[async_trait]
impl Store for MongoStore {
    async fn ping(&self) -> Result<(), StoreError> {
        self.db.run_command(doc! { "ping": 1 }).await.map(drop).map_err(|e| classify(e, "pinging"))
    }

    async fn create_session(&self, session: &SessionRecord) -> Result<(), StoreError> {
        let doc = SessionDoc::from_record(session)?;
        match self.sessions.insert_one(&doc).await {
            Ok(_) => Ok(()),
            Err(e) if is_duplicate_key(&e) => {
                // A repeated create (say, after a lost acknowledgement) is not an error;
                // a different session under the same id is.
                let existing = self.session(&session.id).await?;
                if existing.as_ref() == Some(&doc.into_record()?) {
                    Ok(())
                } else {
                    Err(StoreError::Conflict(format!("session {} already exists", session.id)))
                }
            }
            Err(e) => Err(classify(e, "creating a session")),
        }
    }

    async fn session(&self, id: &SessionId) -> Result<Option<SessionRecord>, StoreError> {
        self.sessions
            .find_one(doc! { "_id": id.as_str() })
            .await
            .map_err(|e| classify(e, "reading a session"))?
            .map(SessionDoc::into_record)
            .transpose()
    }

    async fn delete_session(&self, id: &SessionId) -> Result<bool, StoreError> {
        // Messages go first: if this is interrupted, the session is still there and a repeat
        // of the delete finishes the job; the other order could leave history that no
        // session owns.
        self.messages
            .delete_many(doc! { "session_id": id.as_str() })
            .await
            .map_err(|e| classify(e, "deleting a conversation"))?;
        let deleted = self
            .sessions
            .delete_one(doc! { "_id": id.as_str() })
            .await
            .map_err(|e| classify(e, "deleting a session"))?;
        Ok(deleted.deleted_count > 0)
    }

    async fn history(&self, id: &SessionId) -> Result<Vec<StoredMessage>, StoreError> {
        self.find_messages(id, false, None).await
    }

    async fn recent(&self, id: &SessionId, limit: usize) -> Result<Vec<StoredMessage>, StoreError> {
        // A limit of 0 means "no limit" to MongoDB.
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut newest_first = self.find_messages(id, true, Some(limit)).await?;
        newest_first.reverse();
        Ok(newest_first)
    }

    async fn message(&self, session: &SessionId, id: &str) -> Result<Option<StoredMessage>, StoreError> {
        self.messages
            .find_one(doc! { "_id": id, "session_id": session.as_str() })
            .await
            .map_err(|e| classify(e, "reading a message"))?
            .map(MessageDoc::into_record)
            .transpose()
    }

    async fn message_and_reply(&self, session: &SessionId, message: &MessageId) -> Result<MessageAndReply, StoreError> {
        let reply_id = schemas::ReplyId::for_message(message);
        let ids = [message.as_str(), reply_id.as_str()];
        let docs: Vec<MessageDoc> = self
            .messages
            .find(doc! { "_id": { "$in": ids.as_slice() }, "session_id": session.as_str() })
            .await
            .map_err(|e| classify(e, "reading a message and its reply"))?
            .try_collect()
            .await
            .map_err(|e| classify(e, "reading a message and its reply"))?;
        let mut found = MessageAndReply::default();
        for doc in docs {
            let record = doc.into_record()?;
            if record.id == reply_id.as_str() {
                found.reply = Some(record);
            } else {
                found.message = Some(record);
            }
        }
        Ok(found)
    }

    async fn insert_message(&self, message: &StoredMessage) -> Result<Inserted, StoreError> {
        let doc = MessageDoc::from_record(message)?;
        match self.messages.insert_one(&doc).await {
            Ok(_) => Ok(Inserted::New),
            // Either the id or the position is taken; which one decides the answer.
            Err(e) if is_duplicate_key(&e) => match self.find_message_by_id(&message.id).await? {
                Some(existing) if existing.session_id == message.session_id => Ok(Inserted::AlreadyPresent),
                Some(existing) => Err(StoreError::Conflict(format!(
                    "message id {} already belongs to session {}",
                    message.id, existing.session_id
                ))),
                None => Err(StoreError::Conflict(format!(
                    "session {} already has another message at position {} (turn {})",
                    message.session_id,
                    message.position(),
                    message.turn
                ))),
            },
            Err(e) => Err(classify(e, "inserting a message")),
        }
    }

    async fn mark_failed(&self, session: &SessionId, message: &MessageId, failure: &Failure) -> Result<(), StoreError> {
        let failure_doc = doc! { "code": &failure.code, "message": &failure.message };
        let updated = self
            .messages
            .update_one(
                doc! { "_id": message.as_str(), "session_id": session.as_str(), "role": "user" },
                doc! { "$set": { "failure": failure_doc } },
            )
            .await
            .map_err(|e| classify(e, "marking a message failed"))?;
        if updated.matched_count == 0 {
            return Err(StoreError::Fatal(format!(
                "cannot mark message {message} failed: session {session} has no such user message"
            )));
        }
        Ok(())
    }

    async fn begin_generation(&self, session: &SessionId, message: &MessageId) -> Result<u32, StoreError> {
        // One `$inc` on one document: the server serialises concurrent increments, so racing workers each see their
        // own count. The driver retries it only where the server applies it exactly once (retryable writes); a
        // caller repeating the call after `Unavailable` may count one start twice, which errs on the high side.
        let updated = self
            .messages
            .find_one_and_update(
                doc! { "_id": message.as_str(), "session_id": session.as_str(), "role": "user" },
                doc! { "$inc": { "starts": 1_i32 } },
            )
            .return_document(ReturnDocument::After)
            .await
            .map_err(|e| classify(e, "recording a generation start"))?;
        let Some(updated) = updated else {
            return Err(StoreError::Fatal(format!(
                "cannot record a generation start for message {message}: session {session} has no such user message"
            )));
        };
        starts_value(updated.starts)
    }

    async fn begin_reply(&self, session: &SessionId, message: &MessageId) -> Result<ReplyClaim, StoreError> {
        // One conditional update of one document: the server applies racing updates one after
        // the other, and the second no longer matches the filter. When it does not match, a
        // read tells why; should the marker be cleared between the two, the update is tried
        // again, a few times at most.
        for _ in 0..CLAIM_ATTEMPTS {
            let since = to_bson_time(time::OffsetDateTime::now_utc())?;
            let before = self
                .sessions
                .find_one_and_update(
                    doc! {
                        "_id": session.as_str(),
                        "$or": [ { "busy": null }, { "busy": message.as_str() } ],
                    },
                    doc! { "$set": { "busy": message.as_str(), "busy_since": since } },
                )
                .return_document(ReturnDocument::Before)
                .await
                .map_err(|e| classify(e, "marking a reply in progress"))?;
            if let Some(before) = before {
                return Ok(if before.busy.as_ref() == Some(message) {
                    ReplyClaim::AlreadyHeld
                } else {
                    ReplyClaim::Taken
                });
            }
            let current = self
                .sessions
                .find_one(doc! { "_id": session.as_str() })
                .await
                .map_err(|e| classify(e, "reading a reply in progress"))?;
            let Some(current) = current else {
                return Ok(ReplyClaim::NoSession);
            };
            if let (Some(holder), Some(since)) = (current.busy, current.busy_since)
                && &holder != message
            {
                return Ok(ReplyClaim::HeldBy { message: holder, since: from_bson_time(since)? });
            }
        }
        Err(StoreError::Unavailable(format!(
            "the reply-in-progress marker of session {session} kept changing; try again"
        )))
    }

    async fn end_reply(&self, session: &SessionId, message: &MessageId) -> Result<(), StoreError> {
        self.sessions
            .update_one(
                doc! { "_id": session.as_str(), "busy": message.as_str() },
                doc! { "$unset": { "busy": "", "busy_since": "" } },
            )
            .await
            .map(drop)
            .map_err(|e| classify(e, "clearing a reply in progress"))
    }

    async fn shared_secret(&self, name: &str, proposed: &[u8]) -> Result<Vec<u8>, StoreError> {
        let doc = SecretDoc {
            name: name.to_owned(),
            value: Binary { subtype: BinarySubtype::Generic, bytes: proposed.to_vec() },
        };
        match self.secrets.insert_one(&doc).await {
            Ok(_) => return Ok(proposed.to_vec()),
            // Someone stored it first: theirs wins.
            Err(e) if is_duplicate_key(&e) => {}
            Err(e) => return Err(classify(e, "storing a secret")),
        }
        let stored = self.secrets.find_one(doc! { "_id": name }).await.map_err(|e| classify(e, "reading a secret"))?;
        stored
            .map(|s| s.value.bytes)
            .ok_or_else(|| StoreError::Fatal(format!("secret {name} was reported present but cannot be read")))
    }

    async fn delivery_note(&self, key: &str) -> Result<Option<String>, StoreError> {
        let note =
            self.notes.find_one(doc! { "_id": key }).await.map_err(|e| classify(e, "reading a delivery note"))?;
        Ok(note.map(|n| n.value))
    }

    async fn swap_delivery_note(&self, key: &str, expected: Option<&str>, value: &str) -> Result<bool, StoreError> {
        let Some(expected) = expected else {
            let note = NoteDoc { key: key.to_owned(), value: value.to_owned() };
            return match self.notes.insert_one(&note).await {
                Ok(_) => Ok(true),
                Err(e) if is_duplicate_key(&e) => Ok(false),
                Err(e) => Err(classify(e, "writing a delivery note")),
            };
        };
        let updated = self
            .notes
            .update_one(doc! { "_id": key, "value": expected }, doc! { "$set": { "value": value } })
            .await
            .map_err(|e| classify(e, "changing a delivery note"))?;
        Ok(updated.matched_count == 1)
    }

    async fn add_to_counter(
        &self,
        counter: &Counter,
        delta: i64,
        expires_at: time::OffsetDateTime,
    ) -> Result<i64, StoreError> {
        // An `$inc` on the existing document, which the server applies atomically; if there is
        // none yet, an insert of the first value, and if another caller inserted it first (a
        // duplicate `_id`), the `$inc` again. Exactly one of them applies this call's delta.
        // (Not an upsert: two upserts racing to create a document can fail or, on some servers,
        // answer without the document, and then whether the delta was applied is unknown.)
        let expires_at = to_bson_time(expires_at)?;
        for _ in 0..3 {
            let updated = self
                .counters
                .find_one_and_update(
                    doc! { "_id": counter.key() },
                    doc! { "$inc": { "n": delta }, "$max": { "expires_at": expires_at } },
                )
                .return_document(ReturnDocument::After)
                .await
                .map_err(|e| classify(e, "adding to a counter"))?;
            if let Some(doc) = updated {
                return Ok(doc.n);
            }
            let first = CounterDoc { id: counter.key(), group: counter.group.clone(), n: delta, expires_at };
            match self.counters.insert_one(&first).await {
                Ok(_) => return Ok(delta),
                Err(e) if is_duplicate_key(&e) => continue,
                Err(e) => return Err(classify(e, "creating a counter")),
            }
        }
        Err(StoreError::Unavailable(format!("counter {} kept changing under its update", counter.group)))
    }

    async fn set_counter(
        &self,
        counter: &Counter,
        value: i64,
        expires_at: time::OffsetDateTime,
    ) -> Result<(), StoreError> {
        let doc = CounterDoc {
            id: counter.key(),
            group: counter.group.clone(),
            n: value,
            expires_at: to_bson_time(expires_at)?,
        };
        self.counters
            .replace_one(doc! { "_id": counter.key() }, &doc)
            .upsert(true)
            .await
            .map(drop)
            .map_err(|e| classify(e, "setting a counter"))
    }

    async fn counter_total(&self, group: &str, now: time::OffsetDateTime) -> Result<i64, StoreError> {
        // A group has a member per gateway at most: few documents, summed here rather than by
        // an aggregation.
        let docs: Vec<CounterDoc> = self
            .counters
            .find(doc! { "group": group, "expires_at": { "$gt": to_bson_time(now)? } })
            .await
            .map_err(|e| classify(e, "reading counters"))?
            .try_collect()
            .await
            .map_err(|e| classify(e, "reading counters"))?;
        Ok(docs.iter().fold(0_i64, |total, doc| total.saturating_add(doc.n)))
    }
}

#[cfg(test)]
mod tests {
    use schemas::redact_url;

    #[test]
    fn redacted_urls_keep_hosts_and_options_but_not_credentials() {
        assert_eq!(
            redact_url("mongodb://alice:s3cr@t/x@db1:27017,db2/chat?replicaSet=rs0"),
            "mongodb://***@db1:27017,db2/chat?replicaSet=rs0"
        );
        assert_eq!(
            redact_url("mongodb://127.0.0.1:27017/?directConnection=true"),
            "mongodb://127.0.0.1:27017/?directConnection=true"
        );
        assert_eq!(redact_url("not a url"), "(malformed URL)");
    }
}
