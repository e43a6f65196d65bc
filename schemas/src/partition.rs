//! The partition function: which partition a session belongs to.
//!
//! It is FNV-1a-32 of the session id modulo the partition count, the same function as
//! nats-server's `partition(N, ...)` subject transform, so a gateway and a server-side
//! transform would agree on every session.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The number of partitions of a deployment: fixed for its lifetime, between 1 and 4096.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PartitionCount(u32);

impl PartitionCount {
    pub const MAX: u32 = 4096;

    pub fn new(n: u32) -> Result<Self, String> {
        if n == 0 || n > Self::MAX {
            return Err(format!("the partition count must be between 1 and {}, not {n}", Self::MAX));
        }
        Ok(Self(n))
    }

    pub fn get(self) -> u32 {
        self.0
    }

    /// Every partition of the deployment, in order.
    pub fn all(self) -> impl Iterator<Item = Partition> {
        (0..self.0).map(Partition)
    }

    /// The partition of a session.
    pub fn of(self, session: &crate::SessionId) -> Partition {
        Partition(fnv1a_32(session.as_str().as_bytes()) % self.0)
    }
}

impl Default for PartitionCount {
    fn default() -> Self {
        Self(16)
    }
}

impl fmt::Display for PartitionCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One partition of the session space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct Partition(u32);

impl Partition {
    /// A partition number; the caller guarantees it is below the deployment's count.
    pub fn new(n: u32) -> Self {
        Self(n)
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// FNV-1a, 32 bits.
pub fn fnv1a_32(bytes: &[u8]) -> u32 {
    const OFFSET_BASIS: u32 = 0x811c_9dc5;
    const PRIME: u32 = 0x0100_0193;
    bytes.iter().fold(OFFSET_BASIS, |hash, &b| (hash ^ u32::from(b)).wrapping_mul(PRIME))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SessionId;

    #[test]
    fn fnv1a_matches_the_published_test_vectors() {
        // From the FNV reference test suite (draft-eastlake-fnv).
        assert_eq!(fnv1a_32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a_32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a_32(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn a_session_always_lands_in_the_same_partition_below_the_count() {
        let n = PartitionCount::new(16).unwrap();
        for i in 0..1000 {
            let s = SessionId::parse(format!("s{i}")).unwrap();
            let p = n.of(&s);
            assert!(p.get() < 16);
            assert_eq!(p, n.of(&s));
        }
    }

    #[test]
    fn sessions_spread_over_all_partitions() {
        let n = PartitionCount::new(8).unwrap();
        let mut seen = [0u32; 8];
        for _ in 0..800 {
            seen[n.of(&SessionId::generate()).get() as usize] += 1;
        }
        assert!(seen.iter().all(|&c| c > 50), "uneven spread: {seen:?}");
    }

    #[test]
    fn partition_count_is_bounded() {
        assert!(PartitionCount::new(0).is_err());
        assert!(PartitionCount::new(4097).is_err());
        assert_eq!(PartitionCount::new(4096).unwrap().all().count(), 4096);
    }
}
