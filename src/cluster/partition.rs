//! Which partition an action belongs to: the one function every instance, producer and tool
//! must agree on, so it is written down in README ("Running several instances") with test
//! vectors, for producers in other languages.
//!
//! The partition of an action is FNV-1a 64 of its ref's UTF-8 bytes, modulo the partition
//! count (`cluster.partitions`). FNV-1a: start from the offset basis 0xcbf29ce484222325; for
//! each byte, XOR it into the hash, then multiply by the prime 0x100000001b3, wrapping at
//! 2^64.

use crate::model::ActionRef;

/// FNV-1a 64's offset basis.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64's prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The default of `cluster.partitions`.
pub const DEFAULT_PARTITIONS: u16 = 16;

/// The most partitions a cluster may have: each is a quorum queue and a consumer on every
/// instance, and a partition count is hard to change later (every action moves).
pub const MAX_PARTITIONS: u16 = 1024;

/// A partition number, `0..partitions`.
pub type Partition = u16;

/// FNV-1a 64 of `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(FNV_PRIME)
    })
}

/// The partition of the action `action_ref` among `partitions` (at least 1).
pub fn partition_of_ref(action_ref: &str, partitions: u16) -> Partition {
    let n = u64::from(partitions.max(1));
    // The remainder is below `partitions`, a u16.
    u16::try_from(fnv1a64(action_ref.as_bytes()) % n).unwrap_or(0)
}

/// The partition of `action` among `partitions`.
pub fn partition_of(action: &ActionRef, partitions: u16) -> Partition {
    partition_of_ref(action.as_str(), partitions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_the_published_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn the_readme_vectors_hold() {
        // The same table is in README; a producer in another language checks itself on it.
        for (action, hash, of16, of3) in [
            ("core.http.get", 0x1e01_d2a3_c776_3236_u64, 6, 0),
            ("core.local", 0xf552_187d_6548_498b, 11, 0),
            ("kill.action-07", 0x120e_1c77_1c34_e70f, 15, 1),
            ("wide.action-0001", 0xec60_d063_3533_3bc6, 6, 1),
        ] {
            assert_eq!(fnv1a64(action.as_bytes()), hash, "{action}");
            assert_eq!(partition_of_ref(action, 16), of16, "{action}");
            assert_eq!(partition_of_ref(action, 3), of3, "{action}");
        }
    }

    #[test]
    fn one_partition_holds_every_action_and_zero_counts_as_one() {
        for action in ["a", "core.http.get", "x.y.z"] {
            assert_eq!(partition_of_ref(action, 1), 0);
            assert_eq!(partition_of_ref(action, 0), 0);
        }
    }

    #[test]
    fn actions_spread_over_the_partitions() {
        let mut seen = [0u32; 16];
        for i in 0..1600 {
            seen[usize::from(partition_of_ref(&format!("wide.action-{i:04}"), 16))] += 1;
        }
        assert!(seen.iter().all(|&n| (50..=150).contains(&n)), "{seen:?}");
    }
}
