//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4), with
//! weights in the style of Katran's MaglevV2.
//!
//! The table depends only on the backends' cluster-wide ids, their weights
//! and the table size — never on the order they are given in or on the node
//! computing it — so every LB node builds the same table for a config epoch.

use crate::{
    abi::NO_BACKEND,
    error::{Error, Result},
};

/// Default table size: a prime well above 100 × the backend count that
/// serves up to a few hundred backends with < 1% imbalance.
pub const DEFAULT_TABLE_SIZE: u32 = 65_537;

/// One backend's place in a service's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevBackend {
    /// Cluster-wide backend id (the value stored in table slots).
    pub id: u32,
    /// Relative weight, at least 1.
    pub weight: u32,
}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let n = u64::from(n);
    let mut d = 3u64;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// SplitMix64 finaliser: a fixed, platform-independent 64-bit mixer.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// (offset, skip) of a backend's permutation for a table of `m` slots.
fn permutation(id: u32, m: u64) -> (u64, u64) {
    let h1 = mix64(u64::from(id) ^ 0x6d61_676c_6576_0001);
    let h2 = mix64(u64::from(id) ^ 0x6d61_676c_6576_0002);
    (h1 % m, h2 % (m - 1) + 1)
}

/// Build the lookup table of `size` slots (a prime). Every slot holds a
/// backend id, or [`NO_BACKEND`] when `backends` is empty.
///
/// Each round every backend earns its weight in credit; a backend places one
/// slot (its next free preferred slot) per `max_weight` of credit. With equal
/// weights this is exactly the paper's round-robin population.
pub fn build_table(backends: &[MaglevBackend], size: u32) -> Result<Vec<u32>> {
    if !is_prime(size) {
        return Err(Error::invalid(
            "table_size",
            format!("{size} is not a prime number"),
        ));
    }
    let mut sorted = backends.to_vec();
    sorted.sort_by_key(|b| b.id);
    for pair in sorted.windows(2) {
        if pair[0].id == pair[1].id {
            return Err(Error::invalid(
                "backends",
                format!("backend id {} appears twice", pair[0].id),
            ));
        }
    }
    if let Some(b) = sorted.iter().find(|b| b.weight == 0) {
        return Err(Error::invalid(
            format!("backend {}.weight", b.id),
            "weight must be at least 1",
        ));
    }
    if let Some(b) = sorted.iter().find(|b| b.id == NO_BACKEND) {
        return Err(Error::invalid(
            format!("backend {}.id", b.id),
            "id 0xFFFFFFFF is reserved",
        ));
    }

    let m = u64::from(size);
    let mut table = vec![NO_BACKEND; size as usize];
    if sorted.is_empty() {
        return Ok(table);
    }
    let perms: Vec<(u64, u64)> = sorted.iter().map(|b| permutation(b.id, m)).collect();
    let max_weight = u64::from(sorted.iter().map(|b| b.weight).max().unwrap_or(1));
    // pos[i] = (offset + next * skip) % m, advanced by one addition and a
    // conditional subtraction instead of a division per probe (skip < m).
    let mut pos: Vec<u64> = perms.iter().map(|(offset, _)| *offset).collect();
    let mut credit = vec![0u64; sorted.len()];
    let mut filled = 0u64;

    loop {
        for (i, b) in sorted.iter().enumerate() {
            credit[i] += u64::from(b.weight);
            if credit[i] < max_weight {
                continue;
            }
            credit[i] -= max_weight;
            let skip = perms[i].1;
            let advance = |p: &mut u64| {
                *p += skip;
                if *p >= m {
                    *p -= m;
                }
            };
            while table[pos[i] as usize] != NO_BACKEND {
                advance(&mut pos[i]);
            }
            table[pos[i] as usize] = b.id;
            advance(&mut pos[i]);
            filled += 1;
            if filled == m {
                return Ok(table);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primes() {
        assert!(is_prime(65_537));
        assert!(is_prime(251));
        assert!(!is_prime(65_536));
        assert!(!is_prime(1));
        assert!(!is_prime(0));
        assert!(is_prime(2));
        assert!(!is_prime(9));
    }

    #[test]
    fn bad_input_names_the_field() {
        let e = build_table(&[MaglevBackend { id: 1, weight: 1 }], 100).unwrap_err();
        assert!(e.to_string().contains("table_size"), "{e}");
        let e = build_table(&[MaglevBackend { id: 7, weight: 0 }], 251).unwrap_err();
        assert!(e.to_string().contains("backend 7.weight"), "{e}");
        let dup = [
            MaglevBackend { id: 3, weight: 1 },
            MaglevBackend { id: 3, weight: 2 },
        ];
        let e = build_table(&dup, 251).unwrap_err();
        assert!(e.to_string().contains("appears twice"), "{e}");
    }

    #[test]
    fn empty_service_has_no_backend() {
        let t = build_table(&[], 251).unwrap();
        assert!(t.iter().all(|&s| s == NO_BACKEND));
    }
}
