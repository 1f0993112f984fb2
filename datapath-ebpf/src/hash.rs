//! Bit-exact mirror of `bpf/jhash.h`: the flow hash every LB node uses to
//! index a service's Maglev table. Tests compare it with the datapath's
//! choices, and tools use it to predict which backend a flow lands on.

use crate::abi::{CtKey, FAMILY_V4};

const JHASH_INITVAL: u32 = 0xdead_beef;

#[inline]
fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

#[inline]
fn fin(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(14));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(11));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(25));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(16));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(4));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(14));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(24));
}

pub fn jhash_3words(a: u32, b: u32, c: u32, initval: u32) -> u32 {
    let init = JHASH_INITVAL.wrapping_add(3 << 2).wrapping_add(initval);
    let (mut a, mut b, mut c) = (
        a.wrapping_add(init),
        b.wrapping_add(init),
        c.wrapping_add(init),
    );
    fin(&mut a, &mut b, &mut c);
    c
}

pub fn jhash_9words(k: &[u32; 9], initval: u32) -> u32 {
    let init = JHASH_INITVAL.wrapping_add(9 << 2).wrapping_add(initval);
    let (mut a, mut b, mut c) = (init, init, init);
    for chunk in [&k[0..3], &k[3..6]] {
        a = a.wrapping_add(chunk[0]);
        b = b.wrapping_add(chunk[1]);
        c = c.wrapping_add(chunk[2]);
        mix(&mut a, &mut b, &mut c);
    }
    a = a.wrapping_add(k[6]);
    b = b.wrapping_add(k[7]);
    c = c.wrapping_add(k[8]);
    fin(&mut a, &mut b, &mut c);
    c
}

fn word(bytes: &[u8]) -> u32 {
    u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

/// The datapath's `lb_flow_hash`: words are the key bytes read little-endian.
pub fn flow_hash(k: &CtKey, seed: u32) -> u32 {
    let init = seed ^ u32::from(k.proto);
    let mut ports = [0u8; 4];
    ports[..2].copy_from_slice(&k.sport.to_ne_bytes());
    ports[2..].copy_from_slice(&k.dport.to_ne_bytes());
    let ports = u32::from_le_bytes(ports);
    if k.family == FAMILY_V4 {
        return jhash_3words(word(&k.saddr), word(&k.daddr), ports, init);
    }
    let mut w = [0u32; 9];
    for i in 0..4 {
        w[i] = word(&k.saddr[i * 4..]);
        w[4 + i] = word(&k.daddr[i * 4..]);
    }
    w[8] = ports;
    jhash_9words(&w, init)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers of bpf/jhash.h compiled natively with gcc (see the commit that
    /// added them): the Rust mirror must agree bit for bit, or nodes running
    /// the two would pick different backends.
    #[test]
    fn jhash_matches_c() {
        assert_eq!(jhash_3words(1, 2, 3, 0), 0xa461_58f5);
        assert_eq!(
            jhash_3words(0x0100_000a, 0x0200_000a, 0x5000_1234, 0x686f_6c64 ^ 6),
            0x26c8_03be
        );
        assert_eq!(jhash_9words(&[1, 2, 3, 4, 5, 6, 7, 8, 9], 7), 0x50b6_a3ae);
    }
}
