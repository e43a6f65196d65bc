//! The embedded store, for `chatfleet dev` and single-node use: one redb file holding sessions,
//! messages and secrets, with the same uniqueness rules as the MongoDB store.
//!
//! redb is synchronous. Reads run on tokio's blocking pool, each in a read transaction of its
//! own. Writes go to one writer thread, which applies every write waiting for it, one after
//! the other, in a single write transaction and commits them together (group commit): one
//! disk sync answers them all, where one each would queue every writer behind the syncs of
//! the others. Each write still sees the ones before it, so every check-then-write here is
//! atomic; and no caller hears of its write before the commit that makes it durable.
//!
//! A write decides any refusal (a conflict, a missing message) before it changes anything,
//! so a refused write leaves nothing in the shared transaction. A storage fault abandons the
//! whole batch: nothing of it is written, and every write in it gets the error.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use schemas::{MessageId, SessionId};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{
    Counter, Failure, Inserted, MessageAndReply, PreparedAnswer, ReplyClaim, Role, SessionRecord, Store, StoreError,
    StoredMessage, to_stored_time,
};

/// Session id → JSON of the [`SessionRecord`].
const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
/// (session id, position) → JSON of the [`StoredMessage`]; the key order is conversation order.
const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
/// Message or reply id → where the message is in [`MESSAGES`]. Makes ids unique across the
/// file, as `_id` does in MongoDB.
const MESSAGE_IDS: TableDefinition<&str, (&str, u64)> = TableDefinition::new("message_ids");
/// Session id → JSON of its [`ReplyMarker`], while it has one. A table of its own rather than a
/// field of the session's record, so that records compare equal however the marker stands, and
/// so that files written before it existed need no conversion (it is created on opening).
const REPLY_MARKERS: TableDefinition<&str, &[u8]> = TableDefinition::new("reply_markers");
/// Secret name → value.
const SECRETS: TableDefinition<&str, &[u8]> = TableDefinition::new("secrets");
/// Channels' notes about the delivery of replies: key to value.
const DELIVERY_NOTES: TableDefinition<&str, &str> = TableDefinition::new("delivery_notes");
/// (group, member) → (value, expiry in Unix milliseconds) of the [`Counter`]s. Expired ones are
/// read as absent and dropped when the file is opened.
const COUNTERS: TableDefinition<(&str, &str), (i64, i64)> = TableDefinition::new("counters");
/// Facts about the file itself; today only its format version.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The layout of the tables above. Bump it when they change incompatibly, so that an older
/// build refuses a newer file instead of misreading it.
const FORMAT_VERSION: u64 = 1;

/// A [`Store`] in a local redb file. Cheap to clone; clones share the open file.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    path: PathBuf,
    writer: Arc<Writer>,
}

/// The writer thread and its queue. Dropping the last clone of the store closes the queue and
/// waits for the thread to commit what it holds, so that the file is closed when the drop
/// returns and can be opened again at once.
struct Writer {
    queue: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            // A panicking writer has answered nobody since; nothing more to report here.
            let _ = thread.join();
        }
    }
}

/// The most writes committed together: enough to absorb a burst, few enough that the first
/// of them does not wait long for the last.
const MAX_BATCH: usize = 256;

/// What a write decided, if it could decide: its answer, or a refusal decided before it changed
/// anything. The outer error is a storage fault, which abandons the batch.
type Applied<T> = Result<Result<T, StoreError>, StoreError>;

/// Answers a write's caller once its batch is committed (`Ok`) or abandoned (the fault).
type Deliver = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// A queued write. Given the batch's transaction, it applies itself and returns the storage
/// fault it hit, if any; given none, its batch was abandoned before its turn.
type Job = Box<dyn FnOnce(Option<&WriteTransaction>) -> (Deliver, Option<StoreError>) + Send>;

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").field("path", &self.path).finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    /// Opens the store file at `path`, creating it (and its parent directories) if missing.
    ///
    /// Only one process may have the file open; another one gets a [`StoreError::Fatal`]
    /// saying the file is in use. This blocks while redb opens the file (which includes a
    /// recovery after an unclean shutdown), so call it at start-up rather than per request.
    pub fn open(path: &Path) -> Result<EmbeddedStore, StoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::Fatal(format!(
                    "cannot create the directory {} for the embedded store: {e}",
                    parent.display()
                ))
            })?;
        }
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Fatal(format!(
                "the embedded store {} is in use by another chatfleet process",
                path.display()
            )),
            other => StoreError::Fatal(format!("cannot open the embedded store {}: {other}", path.display())),
        })?;
        prepare(&db).map_err(|e| match e {
            StoreError::Fatal(m) => StoreError::Fatal(format!("{}: {m}", path.display())),
            other => other,
        })?;
        let db = Arc::new(db);
        let writer = spawn_writer(Arc::clone(&db), path)?;
        Ok(EmbeddedStore { db, path: path.to_path_buf(), writer: Arc::new(writer) })
    }

    /// The file the store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `op` on the blocking pool with the database.
    async fn run<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || op(&db))
            .await
            .map_err(|e| StoreError::Fatal(format!("an embedded store operation did not finish: {e}")))?
    }

    /// Queues `op` for the writer thread and waits until the batch holding it is committed.
    async fn write<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Applied<T> + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |tx| {
            let (result, fault) = match tx.map(op) {
                Some(Ok(decided)) => (decided, None),
                Some(Err(fault)) => (Err(fault.clone()), Some(fault)),
                // Replaced by the batch's fault when answered.
                None => (Err(StoreError::Fatal("the write's batch was abandoned".into())), None),
            };
            let deliver: Deliver = Box::new(move |batch| {
                // The caller may have given up waiting; then nobody needs the answer.
                let _ = reply.send(batch.and(result));
            });
            (deliver, fault)
        });
        let stopped = || StoreError::Fatal("the embedded store's writer has stopped".into());
        let queue = self.writer.queue.as_ref().ok_or_else(stopped)?;
        queue.send(job).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// Starts the thread that applies and commits writes in batches (see the module's notes).
fn spawn_writer(db: Arc<Database>, path: &Path) -> Result<Writer, StoreError> {
    let (writes, queue) = mpsc::channel::<Job>();
    let thread = std::thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || {
            while let Ok(first) = queue.recv() {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match queue.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                commit_batch(&db, batch);
            }
        })
        .map_err(|e| {
            StoreError::Fatal(format!("cannot start the writer of the embedded store {}: {e}", path.display()))
        })?;
    Ok(Writer { queue: Some(writes), thread: Some(thread) })
}

/// Applies `batch` in one transaction and commits it, then answers every write in it.
fn commit_batch(db: &Database, batch: Vec<Job>) {
    let mut jobs = batch.into_iter();
    let mut answers = Vec::with_capacity(jobs.len());
    let outcome = match db.begin_write() {
        Err(e) => Err(fatal(e)),
        Ok(tx) => {
            let mut fault = None;
            for job in jobs.by_ref() {
                // A panicking write is a bug; it must not take the writer, and every later
                // write, with it. Its caller hears that the writer stopped; the batch is abandoned.
                let Ok((deliver, faulted)) = std::panic::catch_unwind(AssertUnwindSafe(|| job(Some(&tx)))) else {
                    fault = Some(StoreError::Fatal("embedded store: a write failed unexpectedly".into()));
                    break;
                };
                answers.push(deliver);
                if faulted.is_some() {
                    fault = faulted;
                    break;
                }
            }
            match fault {
                // Dropping the transaction without committing abandons it.
                Some(fault) => Err(fault),
                None => tx.commit().map_err(fatal),
            }
        }
    };
    answers.extend(jobs.map(|job| job(None).0));
    for deliver in answers {
        deliver(outcome.clone());
    }
}

/// Creates the tables on first use and checks the format version, so that read transactions
/// can open every table unconditionally.
fn prepare(db: &Database) -> Result<(), StoreError> {
    let tx = db.begin_write().map_err(fatal)?;
    {
        tx.open_table(SESSIONS).map_err(fatal)?;
        tx.open_table(MESSAGES).map_err(fatal)?;
        tx.open_table(MESSAGE_IDS).map_err(fatal)?;
        tx.open_table(REPLY_MARKERS).map_err(fatal)?;
        tx.open_table(SECRETS).map_err(fatal)?;
        tx.open_table(DELIVERY_NOTES).map_err(fatal)?;
        purge_expired_counters(&tx, unix_millis(OffsetDateTime::now_utc()))?;
        let mut meta = tx.open_table(META).map_err(fatal)?;
        let version = meta.get("format_version").map_err(fatal)?.map(|v| v.value());
        match version {
            None => {
                meta.insert("format_version", FORMAT_VERSION).map_err(fatal)?;
            }
            Some(FORMAT_VERSION) => {}
            Some(other) => {
                return Err(StoreError::Fatal(format!(
                    "the file has format version {other}, but this build reads version {FORMAT_VERSION}"
                )));
            }
        }
    }
    tx.commit().map_err(fatal)
}

/// Drops the counters that expired before `now` (Unix milliseconds).
fn purge_expired_counters(tx: &WriteTransaction, now: i64) -> Result<(), StoreError> {
    let mut counters = tx.open_table(COUNTERS).map_err(fatal)?;
    counters.retain(|_, (_, expires)| expires > now).map_err(fatal)
}

fn unix_millis(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos().div_euclid(1_000_000)).unwrap_or(i64::MAX)
}

/// A session's reply-in-progress marker ([`Store::begin_reply`]).
#[derive(Debug, Serialize, Deserialize)]
struct ReplyMarker {
    message: MessageId,
    #[serde(with = "time::serde::rfc3339")]
    since: OffsetDateTime,
}

/// redb errors are storage faults or bugs; retrying does not help.
fn fatal(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Fatal(format!("embedded store: {}", e.into()))
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Fatal(format!("cannot encode a record: {e}")))
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Fatal(format!("cannot decode a stored record: {e}")))
}

/// A session as stored: times in UTC to the millisecond, as MongoDB keeps them, so both
/// stores hand back the same values.
fn normalise_session(session: &SessionRecord) -> Result<SessionRecord, StoreError> {
    Ok(SessionRecord { created_at: to_stored_time(session.created_at)?, ..session.clone() })
}

fn normalise_message(message: &StoredMessage) -> Result<StoredMessage, StoreError> {
    Ok(StoredMessage { created_at: to_stored_time(message.created_at)?, ..message.clone() })
}

/// The messages of one session, in conversation order (newest first if `rev`), at most `limit`.
fn read_messages(
    tx: &redb::ReadTransaction,
    session: &str,
    rev: bool,
    limit: usize,
) -> Result<Vec<StoredMessage>, StoreError> {
    let table = tx.open_table(MESSAGES).map_err(fatal)?;
    let range = table.range((session, 0u64)..=(session, u64::MAX)).map_err(fatal)?;
    let entries: Box<dyn Iterator<Item = _>> = if rev { Box::new(range.rev()) } else { Box::new(range) };
    entries
        .take(limit)
        .map(|entry| {
            let (_, value) = entry.map_err(fatal)?;
            decode::<StoredMessage>(value.value())
        })
        .collect()
}

/// The newest `limit` messages of `session`, in conversation order.
fn read_recent(tx: &redb::ReadTransaction, session: &str, limit: usize) -> Result<Vec<StoredMessage>, StoreError> {
    let mut newest_first = read_messages(tx, session, true, limit)?;
    newest_first.reverse();
    Ok(newest_first)
}

/// Session `id`, if stored.
fn read_session(tx: &redb::ReadTransaction, id: &SessionId) -> Result<Option<SessionRecord>, StoreError> {
    let table = tx.open_table(SESSIONS).map_err(fatal)?;
    let value = table.get(id.as_str()).map_err(fatal)?;
    value.map(|v| decode(v.value())).transpose()
}

/// User message `message` of `session` and its reply, each if stored.
fn read_message_and_reply(
    tx: &redb::ReadTransaction,
    session: &SessionId,
    message: &MessageId,
) -> Result<MessageAndReply, StoreError> {
    let reply_id = schemas::ReplyId::for_message(message);
    Ok(MessageAndReply {
        message: read_message(tx, session, message.as_str())?,
        reply: read_message(tx, session, reply_id.as_str())?,
    })
}

/// Message `id` of `session`, if stored (under another session it does not count).
fn read_message(
    tx: &redb::ReadTransaction,
    session: &SessionId,
    id: &str,
) -> Result<Option<StoredMessage>, StoreError> {
    let ids = tx.open_table(MESSAGE_IDS).map_err(fatal)?;
    let Some(location) = ids.get(id).map_err(fatal)? else {
        return Ok(None);
    };
    let (owner, position) = location.value();
    if owner != session.as_str() {
        return Ok(None);
    }
    let messages = tx.open_table(MESSAGES).map_err(fatal)?;
    let value = messages.get((owner, position)).map_err(fatal)?;
    value.map(|v| decode(v.value())).transpose()
}

/// Applies `change` to user message `message_id` of `session` and writes it back, as one write.
/// A message that is missing, in another session or not a user message is a refusal
/// ([`StoreError::Fatal`]) saying that the store cannot `doing`; so is an error from `change`.
/// Both come before anything is written.
fn update_user_message<T>(
    tx: &WriteTransaction,
    session: &SessionId,
    message_id: &MessageId,
    doing: &str,
    change: impl FnOnce(&mut StoredMessage) -> Result<T, StoreError>,
) -> Applied<T> {
    let missing = || StoreError::Fatal(format!("cannot {doing}: session {session} has no such user message"));
    let ids = tx.open_table(MESSAGE_IDS).map_err(fatal)?;
    let mut messages = tx.open_table(MESSAGES).map_err(fatal)?;
    let location = ids.get(message_id.as_str()).map_err(fatal)?.map(|v| {
        let (owner, position) = v.value();
        (owner.to_owned(), position)
    });
    let Some((owner, position)) = location.filter(|(owner, _)| owner == session.as_str()) else {
        return Ok(Err(missing()));
    };
    let stored = messages.get((owner.as_str(), position)).map_err(fatal)?.map(|v| decode::<StoredMessage>(v.value()));
    let Some(mut stored) = stored.transpose()?.filter(|m| m.role == Role::User) else {
        return Ok(Err(missing()));
    };
    let result = match change(&mut stored) {
        Ok(result) => result,
        Err(refused) => return Ok(Err(refused)),
    };
    messages.insert((owner.as_str(), position), encode(&stored)?.as_slice()).map_err(fatal)?;
    Ok(Ok(result))
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn ping(&self) -> Result<(), StoreError> {
        self.run(|db| {
            let tx = db.begin_read().map_err(fatal)?;
            tx.open_table(META).map_err(fatal)?;
            Ok(())
        })
        .await
    }

    async fn create_session(&self, session: &SessionRecord) -> Result<(), StoreError> {
        let session = normalise_session(session)?;
        self.write(move |tx| {
            let mut table = tx.open_table(SESSIONS).map_err(fatal)?;
            let existing = table.get(session.id.as_str()).map_err(fatal)?.map(|v| decode::<SessionRecord>(v.value()));
            match existing.transpose()? {
                // A repeated create is not an error; a different session under the same id is.
                Some(existing) if existing == session => Ok(Ok(())),
                Some(_) => Ok(Err(StoreError::Conflict(format!("session {} already exists", session.id)))),
                None => {
                    table.insert(session.id.as_str(), encode(&session)?.as_slice()).map_err(fatal)?;
                    Ok(Ok(()))
                }
            }
        })
        .await
    }

    async fn session(&self, id: &SessionId) -> Result<Option<SessionRecord>, StoreError> {
        let id = id.clone();
        self.run(move |db| read_session(&db.begin_read().map_err(fatal)?, &id)).await
    }

    async fn delete_session(&self, id: &SessionId) -> Result<bool, StoreError> {
        let id = id.clone();
        self.write(move |tx| {
            let mut sessions = tx.open_table(SESSIONS).map_err(fatal)?;
            let mut messages = tx.open_table(MESSAGES).map_err(fatal)?;
            let mut ids = tx.open_table(MESSAGE_IDS).map_err(fatal)?;
            let mut markers = tx.open_table(REPLY_MARKERS).map_err(fatal)?;
            let existed = sessions.remove(id.as_str()).map_err(fatal)?.is_some();
            markers.remove(id.as_str()).map_err(fatal)?;
            let session = id.as_str();
            let mut removed =
                messages.extract_from_if((session, 0u64)..=(session, u64::MAX), |_, _| true).map_err(fatal)?;
            let mut message_ids = Vec::new();
            for entry in removed.by_ref() {
                let (_, value) = entry.map_err(fatal)?;
                message_ids.push(decode::<StoredMessage>(value.value())?.id);
            }
            drop(removed);
            for message_id in &message_ids {
                ids.remove(message_id.as_str()).map_err(fatal)?;
            }
            Ok(Ok(existed))
        })
        .await
    }

    async fn history(&self, id: &SessionId) -> Result<Vec<StoredMessage>, StoreError> {
        let id = id.clone();
        self.run(move |db| read_messages(&db.begin_read().map_err(fatal)?, id.as_str(), false, usize::MAX)).await
    }

    async fn recent(&self, id: &SessionId, limit: usize) -> Result<Vec<StoredMessage>, StoreError> {
        let id = id.clone();
        self.run(move |db| read_recent(&db.begin_read().map_err(fatal)?, id.as_str(), limit)).await
    }

    async fn message(&self, session: &SessionId, id: &str) -> Result<Option<StoredMessage>, StoreError> {
        let session = session.clone();
        let id = id.to_owned();
        self.run(move |db| read_message(&db.begin_read().map_err(fatal)?, &session, &id)).await
    }

    async fn message_and_reply(&self, session: &SessionId, message: &MessageId) -> Result<MessageAndReply, StoreError> {
        let session = session.clone();
        let message = message.clone();
        self.run(move |db| read_message_and_reply(&db.begin_read().map_err(fatal)?, &session, &message)).await
    }

    /// One read transaction, on one blocking thread, for the three reads.
    async fn prepare_answer(
        &self,
        session: &SessionId,
        message: &MessageId,
        recent: usize,
    ) -> Result<PreparedAnswer, StoreError> {
        let session = session.clone();
        let message = message.clone();
        self.run(move |db| {
            let tx = db.begin_read().map_err(fatal)?;
            Ok(PreparedAnswer {
                session: read_session(&tx, &session)?,
                found: read_message_and_reply(&tx, &session, &message)?,
                recent: if recent == 0 { None } else { Some(read_recent(&tx, session.as_str(), recent)?) },
            })
        })
        .await
    }

    async fn insert_message(&self, message: &StoredMessage) -> Result<Inserted, StoreError> {
        let message = normalise_message(message)?;
        self.write(move |tx| {
            let session = message.session_id.as_str();
            let position = message.position();
            let mut ids = tx.open_table(MESSAGE_IDS).map_err(fatal)?;
            let mut messages = tx.open_table(MESSAGES).map_err(fatal)?;
            let owner = ids.get(message.id.as_str()).map_err(fatal)?.map(|v| v.value().0.to_owned());
            match owner {
                Some(owner) if owner == session => return Ok(Ok(Inserted::AlreadyPresent)),
                Some(owner) => {
                    return Ok(Err(StoreError::Conflict(format!(
                        "message id {} already belongs to session {owner}",
                        message.id
                    ))));
                }
                None => {}
            }
            if messages.get((session, position)).map_err(fatal)?.is_some() {
                return Ok(Err(StoreError::Conflict(format!(
                    "session {session} already has another message at position {position} (turn {})",
                    message.turn
                ))));
            }
            let encoded = encode(&message)?;
            messages.insert((session, position), encoded.as_slice()).map_err(fatal)?;
            ids.insert(message.id.as_str(), (session, position)).map_err(fatal)?;
            Ok(Ok(Inserted::New))
        })
        .await
    }

    async fn mark_failed(&self, session: &SessionId, message: &MessageId, failure: &Failure) -> Result<(), StoreError> {
        let session = session.clone();
        let message = message.clone();
        let failure = failure.clone();
        self.write(move |tx| {
            update_user_message(tx, &session, &message, &format!("mark message {message} failed"), |stored| {
                stored.failure = Some(failure);
                Ok(())
            })
        })
        .await
    }

    async fn begin_generation(&self, session: &SessionId, message: &MessageId) -> Result<u32, StoreError> {
        let session = session.clone();
        let message = message.clone();
        // Read, increment and write back as one write; writes apply one after the other, so
        // concurrent callers each get their own count.
        self.write(move |tx| {
            update_user_message(
                tx,
                &session,
                &message,
                &format!("record a generation start for message {message}"),
                |stored| {
                    stored.starts = stored.starts.checked_add(1).ok_or_else(|| {
                        StoreError::Fatal(format!("message {} has been started too often to count", stored.id))
                    })?;
                    Ok(stored.starts)
                },
            )
        })
        .await
    }

    async fn begin_reply(&self, session: &SessionId, message: &MessageId) -> Result<ReplyClaim, StoreError> {
        let session = session.clone();
        let marker = ReplyMarker { message: message.clone(), since: to_stored_time(OffsetDateTime::now_utc())? };
        // Check and set as one write; writes apply one after the other, so of two racing
        // callers the second sees the first's marker.
        self.write(move |tx| {
            let sessions = tx.open_table(SESSIONS).map_err(fatal)?;
            if sessions.get(session.as_str()).map_err(fatal)?.is_none() {
                return Ok(Ok(ReplyClaim::NoSession));
            }
            let mut markers = tx.open_table(REPLY_MARKERS).map_err(fatal)?;
            let held = markers.get(session.as_str()).map_err(fatal)?.map(|v| decode::<ReplyMarker>(v.value()));
            let claim = match held.transpose()? {
                None => ReplyClaim::Taken,
                Some(held) if held.message == marker.message => ReplyClaim::AlreadyHeld,
                Some(held) => return Ok(Ok(ReplyClaim::HeldBy { message: held.message, since: held.since })),
            };
            markers.insert(session.as_str(), encode(&marker)?.as_slice()).map_err(fatal)?;
            Ok(Ok(claim))
        })
        .await
    }

    async fn end_reply(&self, session: &SessionId, message: &MessageId) -> Result<(), StoreError> {
        let session = session.clone();
        let message = message.clone();
        self.write(move |tx| {
            let mut markers = tx.open_table(REPLY_MARKERS).map_err(fatal)?;
            let held = markers.get(session.as_str()).map_err(fatal)?.map(|v| decode::<ReplyMarker>(v.value()));
            if held.transpose()?.is_some_and(|held| held.message == message) {
                markers.remove(session.as_str()).map_err(fatal)?;
            }
            Ok(Ok(()))
        })
        .await
    }

    async fn shared_secret(&self, name: &str, proposed: &[u8]) -> Result<Vec<u8>, StoreError> {
        let name = name.to_owned();
        let proposed = proposed.to_vec();
        self.write(move |tx| {
            let mut secrets = tx.open_table(SECRETS).map_err(fatal)?;
            let stored = secrets.get(name.as_str()).map_err(fatal)?.map(|v| v.value().to_vec());
            match stored {
                Some(stored) => Ok(Ok(stored)),
                None => {
                    secrets.insert(name.as_str(), proposed.as_slice()).map_err(fatal)?;
                    Ok(Ok(proposed))
                }
            }
        })
        .await
    }

    async fn delivery_note(&self, key: &str) -> Result<Option<String>, StoreError> {
        let key = key.to_owned();
        self.run(move |db| {
            let tx = db.begin_read().map_err(fatal)?;
            let table = tx.open_table(DELIVERY_NOTES).map_err(fatal)?;
            let value = table.get(key.as_str()).map_err(fatal)?;
            Ok(value.map(|v| v.value().to_owned()))
        })
        .await
    }

    async fn swap_delivery_note(&self, key: &str, expected: Option<&str>, value: &str) -> Result<bool, StoreError> {
        let (key, expected, value) = (key.to_owned(), expected.map(str::to_owned), value.to_owned());
        self.write(move |tx| {
            let mut notes = tx.open_table(DELIVERY_NOTES).map_err(fatal)?;
            let current = notes.get(key.as_str()).map_err(fatal)?.map(|v| v.value().to_owned());
            if current != expected {
                return Ok(Ok(false));
            }
            notes.insert(key.as_str(), value.as_str()).map_err(fatal)?;
            Ok(Ok(true))
        })
        .await
    }

    async fn add_to_counter(
        &self,
        counter: &Counter,
        delta: i64,
        expires_at: OffsetDateTime,
    ) -> Result<i64, StoreError> {
        let counter = counter.clone();
        let (now, expires_at) = (unix_millis(OffsetDateTime::now_utc()), unix_millis(expires_at));
        self.write(move |tx| {
            let mut counters = tx.open_table(COUNTERS).map_err(fatal)?;
            let key = (counter.group.as_str(), counter.member.as_str());
            let (value, expires) = match counters.get(key).map_err(fatal)?.map(|v| v.value()) {
                Some((value, expires)) if expires > now => (value, expires),
                _ => (0, expires_at),
            };
            let value = value.saturating_add(delta);
            counters.insert(key, (value, expires.max(expires_at))).map_err(fatal)?;
            Ok(Ok(value))
        })
        .await
    }

    async fn set_counter(&self, counter: &Counter, value: i64, expires_at: OffsetDateTime) -> Result<(), StoreError> {
        let counter = counter.clone();
        let expires_at = unix_millis(expires_at);
        self.write(move |tx| {
            let mut counters = tx.open_table(COUNTERS).map_err(fatal)?;
            counters.insert((counter.group.as_str(), counter.member.as_str()), (value, expires_at)).map_err(fatal)?;
            Ok(Ok(()))
        })
        .await
    }

    async fn counter_total(&self, group: &str, now: OffsetDateTime) -> Result<i64, StoreError> {
        let group = group.to_owned();
        let now = unix_millis(now);
        self.run(move |db| {
            let tx = db.begin_read().map_err(fatal)?;
            let counters = tx.open_table(COUNTERS).map_err(fatal)?;
            let mut total = 0_i64;
            for entry in counters.range((group.as_str(), "")..).map_err(fatal)? {
                let (key, value) = entry.map_err(fatal)?;
                if key.value().0 != group {
                    break;
                }
                let (value, expires) = value.value();
                if expires > now {
                    total = total.saturating_add(value);
                }
            }
            Ok(total)
        })
        .await
    }
}
