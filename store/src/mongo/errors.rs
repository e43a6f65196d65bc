//! How MongoDB driver errors become [`StoreError`]s: whatever a later retry could cure is
//! `Unavailable`, everything else is `Fatal`.

use mongodb::error::{Error, ErrorKind, WriteFailure};

use crate::StoreError;

/// The server's duplicate key error.
pub(crate) const DUPLICATE_KEY: i32 = 11000;

/// Server error codes that mean "not now" rather than "not ever": the server is stepping down,
/// shutting down, overloaded or timed out.
const TRANSIENT_CODES: &[i32] = &[
    6,     // HostUnreachable
    7,     // HostNotFound
    50,    // MaxTimeMSExpired
    64,    // WriteConcernFailed
    89,    // NetworkTimeout
    91,    // ShutdownInProgress
    189,   // PrimarySteppedDown
    262,   // ExceededTimeLimit
    9001,  // SocketException
    10107, // NotWritablePrimary
    11600, // InterruptedAtShutdown
    11602, // InterruptedDueToReplStateChange
    13435, // NotPrimaryNoSecondaryOk
    13436, // NotPrimaryOrSecondary
];

/// Labels the driver or server attach to errors that are safe and useful to retry.
const TRANSIENT_LABELS: &[&str] = &[
    mongodb::error::RETRYABLE_WRITE_ERROR,
    mongodb::error::TRANSIENT_TRANSACTION_ERROR,
    mongodb::error::RETRYABLE_ERROR,
    mongodb::error::SYSTEM_OVERLOADED_ERROR,
];

/// The server error code carried by `error`, if it is a command or write error.
pub(crate) fn server_code(error: &Error) -> Option<i32> {
    match error.kind.as_ref() {
        ErrorKind::Command(e) => Some(e.code),
        ErrorKind::Write(WriteFailure::WriteError(e)) => Some(e.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(e)) => Some(e.code),
        _ => None,
    }
}

pub(crate) fn is_duplicate_key(error: &Error) -> bool {
    server_code(error) == Some(DUPLICATE_KEY)
}

/// Classifies a driver error; `doing` says what the store was doing, for the message.
pub(crate) fn classify(error: Error, doing: &str) -> StoreError {
    let transient = match error.kind.as_ref() {
        ErrorKind::Io(_)
        | ErrorKind::ServerSelection { .. }
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::DnsResolve { .. } => true,
        _ => {
            server_code(&error).is_some_and(|code| TRANSIENT_CODES.contains(&code))
                || TRANSIENT_LABELS.iter().any(|label| error.contains_label(label))
        }
    };
    // The kind alone reads well; the full error repeats the topology and labels at length.
    let message = format!("MongoDB failed while {doing}: {}", error.kind);
    if transient { StoreError::Unavailable(message) } else { StoreError::Fatal(message) }
}
