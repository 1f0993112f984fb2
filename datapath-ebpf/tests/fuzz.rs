//! Property test: random frames and mutations of valid VIP frames through the
//! real program. Whatever comes in, the program never aborts, and nothing is
//! ever sent anywhere but (a) IPIP to a configured backend carrying the input
//! packet unchanged, or (b) an ICMP too-big back to the input's sender.
//! Everything else is dropped or passed to the kernel untouched. Needs root.

mod common;

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use common::{backend_addrs, Fixture};
use datapath_ebpf::{
    packet::{Packet, TCP_ACK, TCP_SYN},
    testrun::{verdict_name, RunResult, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX},
};
use proptest::{prelude::*, test_runner::TestRunner};

fn l2_len(f: &[u8]) -> Option<usize> {
    if f.len() < 14 {
        return None;
    }
    Some(if f[12..14] == [0x81, 0x00] { 18 } else { 14 })
}

fn ethertype(f: &[u8], l2: usize) -> u16 {
    u16::from_be_bytes([f[l2 - 2], f[l2 - 1]])
}

/// The input's network-layer source, if it has one we can read.
fn input_src(input: &[u8]) -> Option<IpAddr> {
    let l2 = l2_len(input)?;
    match ethertype(input, l2) {
        0x0800 if input.len() >= l2 + 20 => {
            let s: [u8; 4] = input[l2 + 12..l2 + 16].try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(s)))
        }
        0x86DD if input.len() >= l2 + 40 => {
            let s: [u8; 16] = input[l2 + 8..l2 + 24].try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(s)))
        }
        _ => None,
    }
}

/// Ok if `out` is an acceptable transmission for `input`, else why not.
fn verify_transmission(input: &[u8], out: &[u8], backends: &HashSet<IpAddr>) -> Result<(), String> {
    let l2 = l2_len(out).ok_or("output shorter than ethernet")?;
    let in_l2 = l2_len(input).ok_or("input shorter than ethernet")?;
    if l2 != in_l2 || out[12..l2 - 2] != input[12..in_l2 - 2] {
        return Err("L2 tag changed".into());
    }
    let (dst, proto, hdr): (IpAddr, u8, usize) = match ethertype(out, l2) {
        0x0800 => {
            let h = out.get(l2..l2 + 20).ok_or("truncated outer IPv4")?;
            let d: [u8; 4] = h[16..20].try_into().map_err(|_| "addr")?;
            (IpAddr::V4(Ipv4Addr::from(d)), h[9], 20)
        }
        0x86DD => {
            let h = out.get(l2..l2 + 40).ok_or("truncated outer IPv6")?;
            let d: [u8; 16] = h[24..40].try_into().map_err(|_| "addr")?;
            (IpAddr::V6(Ipv6Addr::from(d)), h[6], 40)
        }
        t => return Err(format!("sent a frame of ethertype {t:#x}")),
    };
    match proto {
        4 | 41 => {
            if !backends.contains(&dst) {
                return Err(format!("IPIP to {dst}, not a configured backend"));
            }
            if out[l2 + hdr..] != input[in_l2..] {
                return Err("inner packet differs from the input packet".into());
            }
            Ok(())
        }
        1 | 58 => {
            let icmp_type = *out.get(l2 + hdr).ok_or("truncated ICMP")?;
            let too_big = (proto == 1 && icmp_type == 3) || (proto == 58 && icmp_type == 2);
            if !too_big || Some(dst) != input_src(input) {
                return Err(format!(
                    "ICMP type {icmp_type} to {dst}, not too-big to the sender"
                ));
            }
            Ok(())
        }
        p => Err(format!("outer protocol {p} to {dst}")),
    }
}

fn check(fx: &Fixture, input: &[u8], backends: &HashSet<IpAddr>) -> Result<(), TestCaseError> {
    if input.len() < 14 {
        return Ok(()); // BPF_PROG_TEST_RUN refuses these; no driver delivers them
    }
    let r: RunResult = fx.run_frame(input);
    let verdict = match r.verdict {
        XDP_DROP => Ok(()),
        XDP_PASS if r.frame == input => Ok(()),
        XDP_PASS | XDP_TX | XDP_REDIRECT => verify_transmission(input, &r.frame, backends),
        v => Err(format!("verdict {}", verdict_name(v))),
    };
    match verdict {
        Ok(()) => Ok(()),
        Err(why) => Err(TestCaseError::fail(format!(
            "{why}: verdict {} input {:02x?} output {:02x?}",
            verdict_name(r.verdict),
            input,
            r.frame
        ))),
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let quoted = Packet::tcp("10.200.0.1", 80, "192.0.2.1", 999, TCP_ACK).l3()[..28].to_vec();
    let mut opts = Packet::udp("192.0.2.1", 1, "10.200.0.1", 53);
    opts.ip_options = vec![1, 1, 1, 0];
    vec![
        Packet::tcp("192.0.2.1", 1234, "10.200.0.1", 80, TCP_SYN).frame(),
        Packet::tcp("192.0.2.1", 1234, "10.200.0.1", 80, TCP_ACK).frame(),
        Packet::udp("192.0.2.1", 1234, "10.200.0.1", 53).frame(),
        Packet::tcp("192.0.2.1", 1234, "10.200.0.2", 5, TCP_SYN)
            .with_vlan(3)
            .frame(),
        Packet::tcp("2001:db8::1", 1234, "fd00:200::1", 80, TCP_SYN).frame(),
        Packet::udp("2001:db8::1", 1234, "fd00:200::1", 53).frame(),
        Packet::icmp("10.99.0.1", "10.200.0.1", 3, 4, [0, 0, 5, 0], quoted).frame(),
        Packet::tcp("192.0.2.1", 1, "10.200.0.3", 80, TCP_SYN).frame(),
        Packet::tcp("192.0.2.1", 1, "10.200.0.1", 80, TCP_ACK)
            .with_payload(vec![1; 1500])
            .frame(),
        opts.frame(),
    ]
}

#[test]
fn mutated_vip_frames_never_misforward() {
    let fx = Fixture::new("hffuzz1");
    let backends: HashSet<IpAddr> = backend_addrs()
        .into_iter()
        .map(|(_, a)| a.parse().expect("addr"))
        .collect();
    let seeds = seeds();
    let n = seeds.len();
    let strategy = (
        0..n,
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        prop::option::of(any::<prop::sample::Index>()),
    );
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 3000,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&strategy, |(seed, muts, cut)| {
            let mut f = seeds[seed].clone();
            for (idx, b) in muts {
                let i = idx.index(f.len());
                f[i] = b;
            }
            if let Some(c) = cut {
                f.truncate(c.index(f.len() + 1));
            }
            check(&fx, &f, &backends)
        })
        .expect("mutated frames");
}

#[test]
fn random_frames_never_misforward() {
    let fx = Fixture::new("hffuzz2");
    let backends: HashSet<IpAddr> = backend_addrs()
        .into_iter()
        .map(|(_, a)| a.parse().expect("addr"))
        .collect();
    let strategy = (
        prop::sample::select(vec![0x0800u16, 0x86DD, 0x8100, 0x0806, 0x1234]),
        prop::collection::vec(any::<u8>(), 0..300),
    );
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 3000,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&strategy, |(etype, body)| {
            let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
            f.extend_from_slice(&etype.to_be_bytes());
            f.extend_from_slice(&body);
            check(&fx, &f, &backends)
        })
        .expect("random frames");
}
