//! How many copies of each JetStream stream chatfleet creates (the input stream and the
//! ownership bucket) a NATS cluster keeps, and what happens to a stream that exists with
//! another count.

use std::fmt;
use std::str::FromStr;

use async_nats::jetstream::{self, stream};

use crate::BusError;

/// The replica count production clusters use: a stream survives the loss of any one server,
/// and a majority (two of three) is all it needs to go on accepting messages.
pub const PRODUCTION_REPLICAS: usize = 3;

/// JetStream's own upper bound on a stream's replicas.
pub const MAX_REPLICAS: usize = 5;

/// The `--nats-replicas` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Replicas {
    /// [`PRODUCTION_REPLICAS`], or fewer when the cluster has fewer servers (1 on a server
    /// outside a cluster). An existing stream with fewer replicas is raised to that; one with
    /// more keeps them, so a process that starts while a server is down never shrinks a stream.
    #[default]
    Auto,
    /// Exactly this many (1 to [`MAX_REPLICAS`]); an existing stream with another count is
    /// changed to it in place.
    Exactly(usize),
}

impl FromStr for Replicas {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.eq_ignore_ascii_case("auto") {
            return Ok(Replicas::Auto);
        }
        match text.parse::<usize>() {
            Ok(n) if (1..=MAX_REPLICAS).contains(&n) => Ok(Replicas::Exactly(n)),
            _ => Err(format!("{text:?} is not a replica count: use auto or a number from 1 to {MAX_REPLICAS}")),
        }
    }
}

impl fmt::Display for Replicas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Replicas::Auto => f.write_str("auto"),
            Replicas::Exactly(n) => write!(f, "{n}"),
        }
    }
}

impl Replicas {
    /// The count for a stream created now, given what the connected server says about itself.
    /// More than one copy on a server outside a cluster is refused: such a server accepts the
    /// setting and keeps one copy.
    pub(crate) fn for_new_stream(self, info: &async_nats::ServerInfo, shown: &str) -> Result<usize, BusError> {
        match self {
            Replicas::Exactly(n) if n > 1 && info.cluster.is_none() => Err(BusError::Unsupported(format!(
                "--nats-replicas / CHATFLEET_NATS_REPLICAS: {n} replicas need a NATS cluster, and the server at {shown} \
                 is not part of one; use 1 (or auto)"
            ))),
            Replicas::Exactly(n) => Ok(n),
            Replicas::Auto => Ok(cluster_size(info).min(PRODUCTION_REPLICAS)),
        }
    }

    /// The count an existing stream with `current` replicas should have, when new streams get
    /// `wanted`.
    pub(crate) fn for_existing_stream(self, wanted: usize, current: usize) -> usize {
        match self {
            Replicas::Exactly(n) => n,
            Replicas::Auto => current.max(wanted),
        }
    }
}

/// How many servers the connected server's cluster has: the server gossips every member's
/// client address to its clients (its own included). A server outside a cluster is alone; a
/// cluster that does not advertise its members is assumed to be a production one.
fn cluster_size(info: &async_nats::ServerInfo) -> usize {
    match (&info.cluster, info.connect_urls.len()) {
        (None, _) => 1,
        (Some(_), 0) => PRODUCTION_REPLICAS,
        (Some(_), n) => n,
    }
}

/// Gives an existing stream the replica count `replicas` asks for, changing it in place if it
/// differs; a stream that does not exist yet is left to its creator.
pub(crate) async fn reconcile(
    js: &jetstream::Context,
    name: &str,
    replicas: Replicas,
    wanted: usize,
) -> Result<(), BusError> {
    let Ok(existing) = js.get_stream(name).await else {
        return Ok(());
    };
    let mut config: stream::Config = existing.cached_info().config.clone();
    let target = replicas.for_existing_stream(wanted, config.num_replicas.max(1));
    if target == config.num_replicas.max(1) {
        return Ok(());
    }
    tracing::info!(event = "stream_replicas_changed", stream = name, from = config.num_replicas, to = target);
    config.num_replicas = target;
    let updated = js.update_stream(config).await.map_err(|e| refused(name, target, e))?;
    // A server outside a cluster accepts any count and keeps one copy.
    match updated.config.num_replicas.max(1) {
        kept if kept == target => Ok(()),
        kept => Err(refused(name, target, format!("the server keeps {kept}"))),
    }
}

/// One line for a stream the server would not create or change, naming the setting when the
/// replica count is the likely cause.
pub(crate) fn refused(name: &str, replicas: usize, error: impl fmt::Display) -> BusError {
    let text = error.to_string();
    let hint = if replicas > 1 {
        format!(
            " (--nats-replicas / CHATFLEET_NATS_REPLICAS: {replicas} replicas need a NATS cluster with at least \
             {replicas} JetStream servers up; use 1 for a single server)"
        )
    } else {
        String::new()
    };
    BusError::Unsupported(format!("cannot keep stream {name} at {replicas} replicas: {text}{hint}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(cluster: Option<&str>, peers: usize) -> async_nats::ServerInfo {
        async_nats::ServerInfo {
            cluster: cluster.map(str::to_owned),
            connect_urls: (0..peers).map(|i| format!("127.0.0.1:{}", 4222 + i)).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn auto_keeps_one_copy_on_a_server_outside_a_cluster() {
        assert_eq!(Replicas::Auto.for_new_stream(&server(None, 0), "s").unwrap(), 1);
    }

    #[test]
    fn auto_keeps_three_copies_in_a_cluster_of_three_or_more() {
        assert_eq!(Replicas::Auto.for_new_stream(&server(Some("c"), 3), "s").unwrap(), 3);
        assert_eq!(Replicas::Auto.for_new_stream(&server(Some("c"), 7), "s").unwrap(), 3);
        assert_eq!(Replicas::Auto.for_new_stream(&server(Some("c"), 0), "s").unwrap(), 3);
    }

    #[test]
    fn auto_keeps_as_many_copies_as_a_smaller_cluster_has_servers() {
        assert_eq!(Replicas::Auto.for_new_stream(&server(Some("c"), 2), "s").unwrap(), 2);
    }

    #[test]
    fn more_than_one_copy_on_a_server_outside_a_cluster_is_refused_with_a_line_naming_the_setting() {
        let error = Replicas::Exactly(3).for_new_stream(&server(None, 0), "nats://h:4222").unwrap_err().to_string();
        assert!(error.contains("--nats-replicas") && error.contains("nats://h:4222"), "{error}");
        assert_eq!(Replicas::Exactly(1).for_new_stream(&server(None, 0), "s").unwrap(), 1);
    }

    #[test]
    fn auto_raises_an_existing_stream_but_never_lowers_it() {
        assert_eq!(Replicas::Auto.for_existing_stream(3, 1), 3);
        assert_eq!(Replicas::Auto.for_existing_stream(2, 3), 3);
    }

    #[test]
    fn an_explicit_count_is_applied_to_existing_streams_either_way() {
        assert_eq!(Replicas::Exactly(1).for_existing_stream(1, 3), 1);
        assert_eq!(Replicas::Exactly(3).for_existing_stream(3, 1), 3);
        assert_eq!(Replicas::Exactly(5).for_new_stream(&server(Some("c"), 3), "s").unwrap(), 5);
    }

    #[test]
    fn the_setting_reads_auto_or_a_count_from_one_to_five() {
        assert_eq!("auto".parse(), Ok(Replicas::Auto));
        assert_eq!("3".parse(), Ok(Replicas::Exactly(3)));
        assert!("0".parse::<Replicas>().is_err());
        assert!("6".parse::<Replicas>().is_err());
        assert!("three".parse::<Replicas>().is_err());
    }
}
