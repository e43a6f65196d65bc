//! The wire contract of chatfleet: what travels on the bus, how it is named and partitioned.
//!
//! Invariant: this crate does no IO. It is the one home of the envelopes that gateways and
//! workers exchange, of subject names and of the partition function. A change here is a
//! compatibility change: add optional fields rather than change existing ones, and bump
//! [`ENVELOPE_VERSION`] when a reader could misunderstand an old envelope.

pub mod channel;
pub mod envelope;
pub mod error_code;
pub mod ids;
pub mod partition;
pub mod redact;
pub mod subjects;

pub use channel::{ChannelDelivery, ChannelOrigin};
pub use envelope::{DoubleTexting, EventId, FinishReason, ReplyEvent, ReplyEventKind, Usage, UserMessage};
pub use error_code::ErrorCode;
pub use ids::{ClientMessageId, IdError, MessageId, ReplyId, SessionId, WorkerId};
pub use partition::{Partition, PartitionCount, fnv1a_32};
pub use redact::redact_url;

/// Version of the bus envelopes written by this build. Readers accept this version and
/// older ones; they reject newer ones rather than guess.
pub const ENVELOPE_VERSION: u32 = 1;
