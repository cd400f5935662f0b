//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software
//! Network Load Balancer", NSDI 2016), pure and deterministic.
//!
//! Every node computes the table from the same backend set, so every node must get the
//! same table whatever order it learnt the backends in, and whatever Rust version built
//! it. Hence:
//! - backends are sorted by identity (their name, e.g. the IP) before populating;
//! - the permutation of a backend comes from a hash written out here, not from std's
//!   `DefaultHasher` (whose output is allowed to change between releases):
//!   `h(seed, name) = fmix64(fnv1a64([seed] ++ name))` — 64-bit FNV-1a (offset basis
//!   `0xcbf29ce484222325`, prime `0x100000001b3`) over one seed byte followed by the
//!   name's UTF-8 bytes, then MurmurHash3's 64-bit finalizer for avalanche.
//!   `offset = h(0, name) % M`, `skip = h(1, name) % (M - 1) + 1`.
//! - with weights, each backend accrues its weight in credit per round and takes one
//!   preferred slot per `max_weight` of credit; with equal weights this is exactly the
//!   paper's round-robin, so every backend owns ⌊M/N⌋ or ⌈M/N⌉ slots.
//!
//! The table holds indices into the caller's slice, or [`NONE`] when there are no
//! backends.

use std::collections::BTreeSet;

/// Table entry meaning "no backend".
pub const NONE: u32 = vip_common::NO_BACKEND;
/// Default table size: prime, and large enough that 1000 backends stay within 1 %
/// of each other.
pub const DEFAULT_M: u32 = vip_common::MAGLEV_MAX_M;

/// A backend as Maglev sees it: a stable name and an integer weight ≥ 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Weighted<'a> {
    pub name: &'a str,
    pub weight: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MaglevError {
    #[error("Maglev table size {m} is not prime")]
    NotPrime { m: u32 },
    #[error("Maglev table size {m} is out of range (3..={max})")]
    OutOfRange { m: u32, max: u32 },
    #[error("backend {name:?} has weight 0 (weights start at 1)")]
    ZeroWeight { name: String },
    #[error("backend {name:?} is listed twice")]
    Duplicate { name: String },
    #[error("{n} backends do not fit a Maglev table of {m} slots")]
    TooManyBackends { n: usize, m: u32 },
}

/// Checks that `m` can be a table size: a prime in `3..=MAGLEV_MAX_M`.
pub fn validate_size(m: u32) -> Result<(), MaglevError> {
    if !(3..=vip_common::MAGLEV_MAX_M).contains(&m) {
        return Err(MaglevError::OutOfRange { m, max: vip_common::MAGLEV_MAX_M });
    }
    if !is_prime(m) {
        return Err(MaglevError::NotPrime { m });
    }
    Ok(())
}

fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = u64::from(n);
    let mut d = 2u64;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 1;
    }
    true
}

/// The version of how a flow finds its backend: this module's table and the data plane's
/// flow hash (`vip_common::flow_hash`). Raised whenever either changes, so that nodes
/// running both versions say they disagree (see [`placement`]).
pub const PLACEMENT_VERSION: u32 = 1;

/// How this node places flows on backends, as the nodes compare it
/// (`election::ANNOTATION_FLOW_PLACEMENT`): `maglev<version> m=<M> seed-check=<3 hex
/// digits>`. Two nodes with the same backends place every flow alike exactly when these
/// agree (up to a 1 in 4,096 chance that two seeds share a check).
///
/// The check is the first 12 bits of SHA-256 over `"vip flow-hash seed"` and the seed's 4
/// bytes, little-endian: enough to tell two seeds apart almost always, while a Lease
/// reader learns 12 of the seed's 32 bits at most (2^20 seeds share each check).
pub fn placement(seed: u32, m: u32) -> String {
    let mut input = b"vip flow-hash seed".to_vec();
    input.extend_from_slice(&seed.to_le_bytes());
    let d = ring::digest::digest(&ring::digest::SHA256, &input);
    let check = u16::from_be_bytes([d.as_ref()[0], d.as_ref()[1]]) >> 4;
    format!("maglev{PLACEMENT_VERSION} m={m} seed-check={check:03x}")
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The documented backend hash: `fmix64(fnv1a64([seed] ++ name))`.
pub fn name_hash(seed: u8, name: &str) -> u64 {
    let mut h = FNV_OFFSET;
    for &b in std::iter::once(&seed).chain(name.as_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    fmix64(h)
}

fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

/// Builds the lookup table of size `m` for `backends`. Entry `i` is the index (into
/// `backends`) of the backend that owns slot `i`, or [`NONE`] if `backends` is empty.
pub fn build(backends: &[Weighted<'_>], m: u32) -> Result<Vec<u32>, MaglevError> {
    validate_size(m)?;
    let mut names = BTreeSet::new();
    for b in backends {
        if b.weight == 0 {
            return Err(MaglevError::ZeroWeight { name: b.name.to_owned() });
        }
        if !names.insert(b.name) {
            return Err(MaglevError::Duplicate { name: b.name.to_owned() });
        }
    }
    if backends.len() > m as usize {
        return Err(MaglevError::TooManyBackends { n: backends.len(), m });
    }
    let mut table = vec![NONE; m as usize];
    if backends.is_empty() {
        return Ok(table);
    }
    // Populate in name order, so the input order cannot matter.
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by_key(|&i| backends[i].name);
    let m64 = u64::from(m);
    let mut next: Vec<u64> = order.iter().map(|&i| name_hash(0, backends[i].name) % m64).collect();
    let skip: Vec<u64> = order.iter().map(|&i| name_hash(1, backends[i].name) % (m64 - 1) + 1).collect();
    let weight: Vec<u64> = order.iter().map(|&i| u64::from(backends[i].weight)).collect();
    let max_weight = weight.iter().copied().max().unwrap_or(1);
    let mut credit = vec![0u64; order.len()];
    // One bit per slot: 8 KiB for M = 65537, so the probe loop stays in L1.
    let mut filled = vec![0u64; (m as usize).div_ceil(64)];
    let mut left = m as usize;
    loop {
        for k in 0..order.len() {
            credit[k] += weight[k];
            while credit[k] >= max_weight {
                credit[k] -= max_weight;
                // Walk this backend's permutation to its next free slot. A permutation
                // of a prime M visits every slot, so this ends while slots are left.
                let mut c = next[k];
                while filled[(c / 64) as usize] & (1 << (c % 64)) != 0 {
                    c += skip[k];
                    if c >= m64 {
                        c -= m64;
                    }
                }
                filled[(c / 64) as usize] |= 1 << (c % 64);
                table[c as usize] = order[k] as u32;
                c += skip[k];
                if c >= m64 {
                    c -= m64;
                }
                next[k] = c;
                left -= 1;
                if left == 0 {
                    return Ok(table);
                }
            }
        }
    }
}

/// How many slots each backend owns, indexed like the input slice.
pub fn shares(table: &[u32], n: usize) -> Vec<usize> {
    let mut counts = vec![0usize; n];
    for &e in table {
        if let Some(c) = counts.get_mut(e as usize) {
            *c += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    /// The placement names the table size and a 12-bit check of the seed: the same for
    /// the same configuration, different when either differs, never the seed itself.
    #[test]
    fn the_placement_tells_table_sizes_and_seeds_apart_without_the_seed() {
        let p = super::placement(0xdead_beef, 65537);
        assert_eq!(p, super::placement(0xdead_beef, 65537));
        assert!(p.starts_with("maglev1 m=65537 seed-check="), "{p}");
        assert_eq!(p.rsplit('=').next().map(str::len), Some(3), "{p}");
        assert_ne!(p, super::placement(0xdead_beef, 251), "another table size");
        let checks: std::collections::HashSet<String> = (0..64).map(|seed| super::placement(seed, 65537)).collect();
        assert!(checks.len() > 60, "64 seeds gave {} checks", checks.len());
        assert!(!p.contains("deadbeef"));
    }

    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256)).collect()
    }

    fn equal(names: &[String]) -> Vec<Weighted<'_>> {
        names.iter().map(|n| Weighted { name: n, weight: 1 }).collect()
    }

    /// Maps a table of input indices to names, so tables from differently ordered inputs
    /// can be compared.
    fn by_name<'a>(table: &[u32], backends: &[Weighted<'a>]) -> Vec<&'a str> {
        table.iter().map(|&i| backends[i as usize].name).collect()
    }

    #[test]
    fn rejects_bad_sizes_with_the_value() {
        assert_eq!(validate_size(65536), Err(MaglevError::NotPrime { m: 65536 }));
        assert_eq!(build(&[], 100).unwrap_err().to_string(), "Maglev table size 100 is not prime");
        assert_eq!(validate_size(2), Err(MaglevError::OutOfRange { m: 2, max: 65537 }));
        assert_eq!(validate_size(65539), Err(MaglevError::OutOfRange { m: 65539, max: 65537 }));
        for p in [3, 13, 251, 4099, 65521, 65537] {
            validate_size(p).unwrap();
        }
    }

    #[test]
    fn rejects_zero_weights_and_duplicates() {
        let b = [Weighted { name: "a", weight: 1 }, Weighted { name: "a", weight: 2 }];
        assert_eq!(build(&b, 13), Err(MaglevError::Duplicate { name: "a".into() }));
        let b = [Weighted { name: "a", weight: 0 }];
        assert_eq!(build(&b, 13), Err(MaglevError::ZeroWeight { name: "a".into() }));
        let many = names(20);
        assert_eq!(build(&equal(&many), 13), Err(MaglevError::TooManyBackends { n: 20, m: 13 }));
    }

    #[test]
    fn no_backends_gives_an_empty_table() {
        assert!(build(&[], 13).unwrap().iter().all(|&e| e == NONE));
    }

    #[test]
    fn same_table_whatever_the_input_order() {
        let n = names(7);
        let forward = equal(&n);
        let mut reversed = forward.clone();
        reversed.reverse();
        let mut shuffled = forward.clone();
        shuffled.swap(0, 4);
        shuffled.swap(2, 6);
        let reference = by_name(&build(&forward, 65537).unwrap(), &forward);
        for other in [&reversed, &shuffled] {
            assert_eq!(by_name(&build(other, 65537).unwrap(), other), reference);
        }
    }

    #[test]
    fn equal_weights_balance_within_one_slot() {
        for (n, m) in [(1, 13), (3, 65537), (7, 65537), (10, 4099), (100, 65537), (1000, 65537)] {
            let names = names(n);
            let b = equal(&names);
            let counts = shares(&build(&b, m).unwrap(), n);
            let (lo, hi) = (m as usize / n, (m as usize).div_ceil(n));
            assert!(
                counts.iter().all(|&c| c == lo || c == hi),
                "n={n} m={m}: {:?}..{:?}",
                counts.iter().min(),
                counts.iter().max()
            );
            assert_eq!(counts.iter().sum::<usize>(), m as usize);
        }
    }

    #[test]
    fn weights_share_slots_in_proportion() {
        let b =
            [Weighted { name: "a", weight: 1 }, Weighted { name: "b", weight: 2 }, Weighted { name: "c", weight: 1 }];
        let counts = shares(&build(&b, 65537).unwrap(), 3);
        // b gets twice a's share, within a slot per round of rounding.
        assert!((counts[1] as i64 - 2 * counts[0] as i64).abs() <= 2, "{counts:?}");
        assert!((counts[0] as i64 - counts[2] as i64).abs() <= 1, "{counts:?}");
    }

    /// Removing one of N backends moves its own slots, and only a small fraction of the
    /// others'. Measured (M = 65537): 0.01–0.06 % of the others' slots for N = 3,
    /// 0.22–0.26 % for N = 10, 0.57–0.63 % for N = 100; asserted: at most 1 %.
    #[test]
    fn removing_a_backend_moves_few_other_slots() {
        for n in [3, 5, 7, 10, 25, 100] {
            let names = names(n);
            let all = equal(&names);
            let before = by_name(&build(&all, 65537).unwrap(), &all);
            for removed in [0, n / 2, n - 1] {
                let rest: Vec<_> = all.iter().copied().filter(|b| b.name != names[removed]).collect();
                let after = by_name(&build(&rest, 65537).unwrap(), &rest);
                let kept_before = before.iter().filter(|&&o| o != names[removed]).count();
                let moved = before.iter().zip(&after).filter(|(b, a)| **b != names[removed] && b != a).count();
                let frac = moved as f64 / kept_before as f64;
                assert!(frac <= 0.01, "n={n} removing {removed}: {:.2}% of the others' slots moved", frac * 100.0);
                // The removed backend's slots all went somewhere.
                assert!(after.iter().all(|a| *a != names[removed]));
            }
        }
    }

    /// Pins the exact table for one input: any change of hash or algorithm must fail
    /// here, because every node of a cluster has to agree on it.
    #[test]
    fn golden_vector() {
        let b = [
            Weighted { name: "10.0.0.11", weight: 1 },
            Weighted { name: "10.0.0.12", weight: 1 },
            Weighted { name: "10.0.0.13", weight: 1 },
        ];
        let table = build(&b, 31).unwrap();
        assert_eq!(table, GOLDEN_31, "table for M=31 changed: {table:?}");
        assert_eq!(name_hash(0, "10.0.0.11"), GOLDEN_HASH);
        // And the full-size table, by a digest of its bytes.
        let names = names(7);
        let big = build(&equal(&names), 65537).unwrap();
        let digest = big.iter().fold(FNV_OFFSET, |h, &e| (h ^ u64::from(e)).wrapping_mul(FNV_PRIME));
        assert_eq!(digest, GOLDEN_DIGEST_65537_7, "digest {digest:#x}");
    }

    // Computed independently from the algorithm as documented in the module header (a
    // separate Python transcription), not copied from this implementation's output.
    const GOLDEN_31: [u32; 31] =
        [2, 0, 2, 2, 0, 1, 2, 1, 0, 2, 1, 0, 0, 1, 1, 0, 2, 2, 0, 1, 2, 1, 0, 2, 1, 0, 0, 1, 1, 0, 2];
    const GOLDEN_HASH: u64 = 0x5d47_cdf2_a916_36ec;
    const GOLDEN_DIGEST_65537_7: u64 = 0x8cb9_8ae5_600c_1ffa;
}
