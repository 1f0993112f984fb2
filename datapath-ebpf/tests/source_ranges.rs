//! Source ranges (Kubernetes loadBalancerSourceRanges): a service with
//! ranges serves clients inside them and drops every packet from outside,
//! of new and established flows alike; narrowing the ranges stops flows
//! already open from outside them; lifting them opens the service again.
//! Checked by verdicts, counters and conntrack contents.

mod common;

use common::*;

use datapath_ebpf::{
    abi::{stat, svc_stat, CtKey, IPPROTO_TCP, IPPROTO_UDP},
    packet::{Packet, TCP_ACK, TCP_SYN},
    testrun::{verdict_name, XDP_DROP, XDP_TX},
    Proto, SourceRange,
};

fn ranges(v: &[&str]) -> Vec<SourceRange> {
    v.iter().map(|r| r.parse().expect("range")).collect()
}

fn set_ranges(fx: &mut Fixture, vip: &str, port: u16, proto: Proto, r: &[&str]) {
    let mut cfg = fx.cfg.clone();
    cfg.epoch += 1;
    let vip: std::net::IpAddr = vip.parse().expect("vip");
    let svc = cfg
        .services
        .iter_mut()
        .find(|s| s.vip == vip && s.port == port && s.proto == proto)
        .expect("the service");
    svc.source_ranges = ranges(r);
    fx.apply(cfg);
}

fn refused(fx: &Fixture, vip: &str, port: u16, proto: u8) -> u64 {
    fx.svc_stats(vip, port, proto)[svc_stat::SRC_REFUSED]
}

fn expect(fx: &Fixture, p: &Packet, want: u32, what: &str) {
    let r = fx.run(p);
    assert_eq!(
        r.verdict,
        want,
        "{what}: {} instead of {}",
        verdict_name(r.verdict),
        verdict_name(want)
    );
}

#[test]
fn only_clients_inside_the_ranges_reach_the_service() {
    let mut fx = Fixture::new("hfsrc1");
    set_ranges(
        &mut fx,
        "10.200.0.1",
        80,
        Proto::Tcp,
        &["192.0.2.0/24", "2001:db8::/32"],
    );
    let inside = Packet::tcp("192.0.2.10", 40_000, "10.200.0.1", 80, TCP_SYN);
    let outside = Packet::tcp("198.51.100.7", 40_000, "10.200.0.1", 80, TCP_SYN);
    expect(&fx, &inside, XDP_TX, "SYN from inside");
    expect(&fx, &outside, XDP_DROP, "SYN from outside");
    assert_eq!(refused(&fx, "10.200.0.1", 80, IPPROTO_TCP), 1);
    assert_eq!(fx.dp.stats().expect("stats").c[stat::SRC_REFUSED], 1);
    let ct = fx.dp.conntrack();
    let out_key = CtKey::new(
        "198.51.100.7".parse().unwrap(),
        40_000,
        "10.200.0.1".parse().unwrap(),
        80,
        IPPROTO_TCP,
    );
    assert_eq!(
        ct.get(&out_key).expect("lookup"),
        None,
        "no state for a refused flow"
    );
    // A mid-flow packet from outside is refused too (no entry, no re-pick).
    let out_ack = Packet::tcp("198.51.100.7", 40_001, "10.200.0.1", 80, TCP_ACK);
    expect(&fx, &out_ack, XDP_DROP, "ACK from outside");
    assert_eq!(refused(&fx, "10.200.0.1", 80, IPPROTO_TCP), 2);

    // The established flow from inside: its entry remembers the check.
    let in_ack = Packet::tcp("192.0.2.10", 40_000, "10.200.0.1", 80, TCP_ACK);
    for _ in 0..3 {
        expect(&fx, &in_ack, XDP_TX, "established from inside");
    }
    let in_key = CtKey::new(
        "192.0.2.10".parse().unwrap(),
        40_000,
        "10.200.0.1".parse().unwrap(),
        80,
        IPPROTO_TCP,
    );
    let gen = ct.get(&in_key).expect("lookup").expect("entry").ranges_gen;
    assert_ne!(
        gen, 0,
        "the entry caches the generation its source was found in"
    );

    // Other services are not restricted.
    let other = Packet::tcp("198.51.100.7", 40_000, "10.200.0.3", 80, TCP_SYN);
    expect(&fx, &other, XDP_TX, "a service without ranges");

    // Narrowed: the open flow from 192.0.2.10 is now outside and stops at
    // once, though its entry is still there; a client in the new range is
    // served.
    set_ranges(&mut fx, "10.200.0.1", 80, Proto::Tcp, &["192.0.2.128/25"]);
    expect(&fx, &in_ack, XDP_DROP, "established flow after narrowing");
    assert!(
        ct.get(&in_key).expect("lookup").is_some(),
        "the entry stays"
    );
    assert_eq!(refused(&fx, "10.200.0.1", 80, IPPROTO_TCP), 3);
    let new_inside = Packet::tcp("192.0.2.200", 40_000, "10.200.0.1", 80, TCP_SYN);
    expect(&fx, &new_inside, XDP_TX, "SYN from the narrowed range");
    let new_ack = Packet::tcp("192.0.2.200", 40_000, "10.200.0.1", 80, TCP_ACK);
    expect(&fx, &new_ack, XDP_TX, "established in the narrowed range");

    // Widened again: the old flow goes on with its entry.
    set_ranges(&mut fx, "10.200.0.1", 80, Proto::Tcp, &["192.0.2.0/24"]);
    expect(&fx, &in_ack, XDP_TX, "established flow after widening");
    let gen2 = ct.get(&in_key).expect("lookup").expect("entry").ranges_gen;
    assert!(gen2 > gen, "a new generation ({gen} -> {gen2})");

    // Lifted: every client.
    set_ranges(&mut fx, "10.200.0.1", 80, Proto::Tcp, &[]);
    expect(&fx, &outside, XDP_TX, "SYN from anywhere once lifted");
    assert_eq!(refused(&fx, "10.200.0.1", 80, IPPROTO_TCP), 3);
}

#[test]
fn udp_and_ipv6_services_and_many_ranges() {
    let mut fx = Fixture::new("hfsrc2");
    set_ranges(&mut fx, "10.200.0.1", 53, Proto::Udp, &["192.0.2.0/24"]);
    let q_in = Packet::udp("192.0.2.9", 5353, "10.200.0.1", 53);
    let q_out = Packet::udp("203.0.113.9", 5353, "10.200.0.1", 53);
    expect(&fx, &q_in, XDP_TX, "UDP from inside");
    expect(&fx, &q_in, XDP_TX, "UDP from inside, entry found");
    expect(&fx, &q_out, XDP_DROP, "UDP from outside");
    assert_eq!(refused(&fx, "10.200.0.1", 53, IPPROTO_UDP), 1);

    set_ranges(
        &mut fx,
        "fd00:200::1",
        80,
        Proto::Tcp,
        &["2001:db8:1::/48", "192.0.2.0/24"],
    );
    let v6_in = Packet::tcp("2001:db8:1::5", 40_000, "fd00:200::1", 80, TCP_SYN);
    let v6_out = Packet::tcp("2001:db8:2::5", 40_000, "fd00:200::1", 80, TCP_SYN);
    expect(&fx, &v6_in, XDP_TX, "IPv6 from inside");
    expect(&fx, &v6_out, XDP_DROP, "IPv6 from outside");
    assert_eq!(refused(&fx, "fd00:200::1", 80, IPPROTO_TCP), 1);

    // 1,000 ranges (a /32 each, and the one client's /24 among them).
    let many: Vec<String> = (0..999u32)
        .map(|i| format!("100.{}.{}.1/32", 64 + i / 250, i % 250))
        .chain(["192.0.2.0/24".to_string()])
        .collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    set_ranges(&mut fx, "10.200.0.3", 80, Proto::Tcp, &refs);
    for (client, want) in [
        ("100.64.0.1", XDP_TX),
        ("100.67.248.1", XDP_TX),
        ("100.64.0.2", XDP_DROP),
        ("192.0.2.77", XDP_TX),
        ("192.0.3.77", XDP_DROP),
    ] {
        let p = Packet::tcp(client, 40_000, "10.200.0.3", 80, TCP_SYN);
        expect(&fx, &p, want, client);
    }
    // The other restricted services kept theirs.
    expect(&fx, &q_out, XDP_DROP, "UDP service still restricted");
}
