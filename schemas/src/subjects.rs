//! Names on the bus. Every bus adapter takes its names from here, so a gateway and a worker
//! built from the same contract always meet.
//!
//! NATS layout (the default prefix is `chatfleet`):
//! - stream `CHATFLEET_IN`, subjects `chatfleet.in.<partition>.<session_id>`: user messages;
//! - consumer `chatfleet-p<partition>` filtered on `chatfleet.in.<partition>.*`;
//! - core subject `chatfleet.out.<session_id>`: reply events of one session;
//! - stream `CHATFLEET_DEAD`, subjects `chatfleet.dead.<partition>`: user messages given up on
//!   (dead letters), kept for operators to inspect and replay;
//! - core subject `chatfleet.barrier`: requests nobody answers, to learn that the server has
//!   processed what a connection sent before them;
//! - key-value bucket `CHATFLEET_OWNERSHIP`: `members.<worker>` and `leases.<partition>`;
//! - the priority group `owner` that pins each partition consumer to one puller;
//! - stream `CHATFLEET_DELIVERIES`, subject `chatfleet.deliveries.pending`, consumer
//!   `chatfleet-deliveries`: finished channel replies waiting for a gateway to deliver them;
//!   stream `CHATFLEET_UNDELIVERABLE`, subject `chatfleet.undeliverable`: those given up on.
//!
//! RabbitMQ layout ([`AmqpNames`]): exchanges `chatfleet.in`, `chatfleet.out`,
//! `chatfleet.members`, `chatfleet.dead`; queues `chatfleet.in.<partition>` and `chatfleet.dead`;
//! channel deliveries in the quorum queue `chatfleet.deliveries`, waiting out retry delays in
//! the quorum queues `chatfleet.deliveries.wait.<ms>`, given up on in `chatfleet.undeliverable`;
//! each user message carries the header [`SEQUENCE_HEADER`].

use crate::{Partition, SessionId};

/// The priority group every NATS partition consumer is pinned through.
pub const PINNED_GROUP: &str = "owner";

/// The RabbitMQ header carrying a message's publish-unique sequence number: RabbitMQ numbers
/// deliveries, not messages, and a worker needs to tell a redelivery from a new message with
/// the same id.
pub const SEQUENCE_HEADER: &str = "x-chatfleet-seq";

/// The names of one deployment's bus objects, derived from a prefix so that several
/// deployments can share a broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    prefix: String,
}

impl Default for Names {
    fn default() -> Self {
        Self { prefix: "chatfleet".into() }
    }
}

impl Names {
    /// Names under `prefix`, which must be a valid identifier (letters, digits, `_`, `-`).
    pub fn new(prefix: &str) -> Result<Self, crate::IdError> {
        crate::SessionId::parse(prefix)?;
        Ok(Self { prefix: prefix.to_owned() })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The durable input stream.
    pub fn input_stream(&self) -> String {
        format!("{}_IN", self.prefix.to_ascii_uppercase().replace('-', "_"))
    }

    /// Every subject of the input stream.
    pub fn input_wildcard(&self) -> String {
        format!("{}.in.>", self.prefix)
    }

    /// Where a user message of `session` is published.
    pub fn input_subject(&self, partition: Partition, session: &SessionId) -> String {
        format!("{}.in.{}.{}", self.prefix, partition, session)
    }

    /// The filter of one partition's consumer.
    pub fn partition_filter(&self, partition: Partition) -> String {
        format!("{}.in.{}.*", self.prefix, partition)
    }

    /// The durable consumer of one partition.
    pub fn partition_consumer(&self, partition: Partition) -> String {
        format!("{}-p{}", self.prefix, partition)
    }

    /// The stream of dead letters: user messages given up on, kept for operators.
    pub fn dead_stream(&self) -> String {
        format!("{}_DEAD", self.prefix.to_ascii_uppercase().replace('-', "_"))
    }

    /// Every subject of the dead-letter stream.
    pub fn dead_wildcard(&self) -> String {
        format!("{}.dead.>", self.prefix)
    }

    /// Where a dead letter of `partition` is kept.
    pub fn dead_subject(&self, partition: Partition) -> String {
        format!("{}.dead.{}", self.prefix, partition)
    }

    /// The subject carrying the reply events of one session.
    pub fn events_subject(&self, session: &SessionId) -> String {
        format!("{}.out.{}", self.prefix, session)
    }

    /// The stream that keeps every session's reply events for the retention window, so that a
    /// client can resume a stream from its last event id.
    pub fn events_stream(&self) -> String {
        format!("{}_OUT", self.prefix.to_ascii_uppercase().replace('-', "_"))
    }

    /// Every reply-event subject: what [`Names::events_stream`] captures.
    pub fn events_wildcard(&self) -> String {
        format!("{}.out.>", self.prefix)
    }

    /// The subject a connection sends a request to, which nobody ever answers, so that the
    /// server's "no responders" reply tells it the server has processed everything it sent
    /// before (a subscription, say).
    pub fn barrier_subject(&self) -> String {
        format!("{}.barrier", self.prefix)
    }

    /// The stream of finished channel replies waiting for a gateway to deliver them.
    pub fn deliveries_stream(&self) -> String {
        format!("{}_DELIVERIES", self.prefix.to_ascii_uppercase().replace('-', "_"))
    }

    /// The subject of pending channel deliveries.
    pub fn deliveries_subject(&self) -> String {
        format!("{}.deliveries.pending", self.prefix)
    }

    /// The durable consumer every gateway pulls pending deliveries from, as competing consumers.
    pub fn deliveries_consumer(&self) -> String {
        format!("{}-deliveries", self.prefix)
    }

    /// The stream of channel deliveries given up on after their last attempt, kept for operators.
    pub fn undeliverable_stream(&self) -> String {
        format!("{}_UNDELIVERABLE", self.prefix.to_ascii_uppercase().replace('-', "_"))
    }

    /// The subject of undeliverable channel deliveries.
    pub fn undeliverable_subject(&self) -> String {
        format!("{}.undeliverable", self.prefix)
    }

    /// The key-value bucket of worker heartbeats and partition leases.
    pub fn ownership_bucket(&self) -> String {
        format!("{}_OWNERSHIP", self.prefix.to_ascii_uppercase().replace('-', "_"))
    }

    /// A worker's heartbeat key in the ownership bucket.
    pub fn member_key(&self, worker: &str) -> String {
        format!("members.{worker}")
    }

    /// A partition's lease key in the ownership bucket.
    pub fn lease_key(&self, partition: Partition) -> String {
        format!("leases.{partition}")
    }

    /// The worker a heartbeat key names, if it is one.
    pub fn member_of_key<'k>(&self, key: &'k str) -> Option<&'k str> {
        key.strip_prefix("members.")
    }

    /// The partition a lease key names, if it is one.
    pub fn partition_of_key(&self, key: &str) -> Option<Partition> {
        key.strip_prefix("leases.").and_then(|p| p.parse::<u32>().ok()).map(Partition::new)
    }
}

/// The names of one deployment's RabbitMQ objects, derived from a prefix so that several
/// deployments can share a virtual host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpNames {
    prefix: String,
}

impl Default for AmqpNames {
    fn default() -> Self {
        Self { prefix: "chatfleet".into() }
    }
}

impl AmqpNames {
    /// Names under `prefix` (1 to 64 letters, digits, `_`, `-`).
    pub fn new(prefix: &str) -> Result<Self, crate::IdError> {
        crate::SessionId::parse(prefix)?;
        Ok(Self { prefix: prefix.to_owned() })
    }

    /// The exchange user messages are published to.
    pub fn input_exchange(&self) -> String {
        format!("{}.in", self.prefix)
    }

    /// The queue of one partition.
    pub fn partition_queue(&self, partition: Partition) -> String {
        format!("{}.in.{}", self.prefix, partition)
    }

    /// The exchange reply events are published to, with the session id as routing key.
    pub fn events_exchange(&self) -> String {
        format!("{}.out", self.prefix)
    }

    /// The fanout exchange workers publish reply events to: it forwards each to
    /// [`AmqpNames::events_exchange`] (routed by session to the gateways listening) and to
    /// the stream queue [`AmqpNames::events_log`].
    pub fn events_fanout(&self) -> String {
        format!("{}.out.all", self.prefix)
    }

    /// The stream queue that keeps every reply event for the retention window, so that a
    /// client can resume a stream from its last event id.
    pub fn events_log(&self) -> String {
        format!("{}.out.log", self.prefix)
    }

    /// The exchange and queue of dead-lettered user messages.
    pub fn dead_letters(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// The fanout exchange of worker heartbeats.
    pub fn members_exchange(&self) -> String {
        format!("{}.members", self.prefix)
    }

    /// The quorum queue of finished channel replies waiting for a gateway to deliver them.
    pub fn deliveries_queue(&self) -> String {
        format!("{}.deliveries", self.prefix)
    }

    /// The quorum queue where a delivery waits `delay_ms` before it dead-letters back to
    /// [`AmqpNames::deliveries_queue`] (a retry's delay is made of one or more such waits).
    pub fn delivery_wait_queue(&self, delay_ms: u64) -> String {
        format!("{}.deliveries.wait.{delay_ms}", self.prefix)
    }

    /// The quorum queue of channel deliveries given up on, kept for operators.
    pub fn undeliverable_queue(&self) -> String {
        format!("{}.undeliverable", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::WorkerId;

    #[test]
    fn input_subjects_fall_under_their_partition_filter_and_the_stream_wildcard() {
        let n = Names::default();
        let s = SessionId::parse("abc").unwrap();
        let subject = n.input_subject(Partition::new(3), &s);
        assert_eq!(subject, "chatfleet.in.3.abc");
        assert_eq!(n.partition_filter(Partition::new(3)), "chatfleet.in.3.*");
        assert_eq!(n.input_wildcard(), "chatfleet.in.>");
        assert_eq!(n.input_stream(), "CHATFLEET_IN");
        assert_eq!(n.events_subject(&s), "chatfleet.out.abc");
    }

    #[test]
    fn ownership_keys_name_their_worker_and_partition() {
        let n = Names::default();
        assert_eq!(n.ownership_bucket(), "CHATFLEET_OWNERSHIP");
        let key = n.lease_key(Partition::new(7));
        assert_eq!(key, "leases.7");
        assert_eq!(n.partition_of_key(&key), Some(Partition::new(7)));
        let worker = WorkerId::parse("w-1").unwrap();
        assert_eq!(n.member_of_key(&n.member_key(worker.as_str())), Some("w-1"));
        assert_eq!(n.partition_of_key("members.w-1"), None);
    }

    #[test]
    fn amqp_names_derive_from_their_prefix() {
        let names = AmqpNames::new("fleet-a").unwrap();
        assert_eq!(names.input_exchange(), "fleet-a.in");
        assert_eq!(names.partition_queue(Partition::new(3)), "fleet-a.in.3");
        assert_eq!(names.events_exchange(), "fleet-a.out");
        assert_eq!(names.dead_letters(), "fleet-a.dead");
        assert_eq!(names.members_exchange(), "fleet-a.members");
        assert!(AmqpNames::new("has space").is_err());
        assert!(AmqpNames::new("").is_err());
    }

    #[test]
    fn dead_letters_have_their_own_stream_outside_the_input_wildcard() {
        let n = Names::default();
        assert_eq!(n.dead_stream(), "CHATFLEET_DEAD");
        assert_eq!(n.dead_subject(Partition::new(3)), "chatfleet.dead.3");
        assert_eq!(n.dead_wildcard(), "chatfleet.dead.>");
        assert!(!n.dead_subject(Partition::new(3)).starts_with("chatfleet.in."));
    }

    #[test]
    fn prefixes_are_validated_and_upper_cased_for_the_stream() {
        assert!(Names::new("a.b").is_err());
        assert_eq!(Names::new("t-1").unwrap().input_stream(), "T_1_IN");
    }
}
