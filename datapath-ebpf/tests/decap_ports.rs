//! The decap program and target ports: an IPIP packet from a Holdfast LB
//! that names a service port (outer source in the encapsulation prefix,
//! IPv4 ID with DF, or the IPv6 flow label) is recorded, and decapsulated
//! like any other; the same packet from another sender (a health check's
//! raw socket: its own address, the kernel's ID or flow label) is only
//! decapsulated. Counted by the program's counters.

mod common;

use datapath_ebpf::{
    abi::decap_stat,
    decap::Decap,
    packet::{checksum, eth, ipv4_header, ipv6_packet, Packet, TCP_SYN},
    testbed::TestNet,
    testrun::{self, XDP_PASS},
};

const VIP: &str = "10.200.0.1";
const VIP6: &str = "fd00:200::1";

/// IPv4-in-IPv4 from `outer_src` with this ID and DF, around a SYN to
/// VIP:8080.
fn ipip4(outer_src: &str, id: u16, df: bool) -> Vec<u8> {
    let inner = Packet::tcp("192.0.2.10", 40_000, VIP, 8080, TCP_SYN).l3();
    let mut h = ipv4_header(
        outer_src.parse().unwrap(),
        "10.99.0.11".parse().unwrap(),
        4,
        0,
        64,
        if df { 0x4000 } else { 0 },
        &[],
        &inner,
    );
    h[4..6].copy_from_slice(&id.to_be_bytes());
    h[10..12].copy_from_slice(&[0, 0]);
    let c = checksum(&h[..20]);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = eth([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1], None, 0x0800);
    f.extend_from_slice(&h);
    f
}

/// IPv6-in-IPv6 from `outer_src` with this flow label, around a SYN to
/// [VIP6]:8080.
fn ipip6(outer_src: &str, label: u32) -> Vec<u8> {
    let inner = Packet::tcp("2001:db8::10", 40_000, VIP6, 8080, TCP_SYN).l3();
    let mut p = ipv6_packet(
        outer_src.parse().unwrap(),
        "fd00:99::11".parse().unwrap(),
        41,
        0,
        64,
        &inner,
    );
    let word = (6u32 << 28) | (label & 0xfffff);
    p[0..4].copy_from_slice(&word.to_be_bytes());
    let mut f = eth([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1], None, 0x86dd);
    f.extend_from_slice(&p);
    f
}

#[test]
fn only_a_holdfast_lb_names_a_service_port() {
    common::require_root();
    let net = TestNet::new("hfdecap1").expect("namespace");
    let _g = net.enter().expect("enter");
    let mut d = Decap::load().expect("load decap");
    d.add_vip(VIP.parse().unwrap()).unwrap();
    d.add_vip(VIP6.parse().unwrap()).unwrap();
    let run = |f: &[u8]| {
        let r = testrun::run(d.program(), f, net.ifindex).expect("test run");
        assert_eq!(r.verdict, XDP_PASS);
        r
    };
    let flows = |d: &Decap| d.stats().expect("stats").c[decap_stat::PORT_FLOWS];
    let ok = |d: &Decap| d.stats().expect("stats").c[decap_stat::OK];

    // A health check's raw IPIP: the LB node's own address, the kernel's
    // ID, DF: decapsulated, no port recorded.
    let r = run(&ipip4("10.88.0.11", 0x1234, true));
    assert_eq!(r.frame.len(), ipip4("10.88.0.11", 0x1234, true).len() - 20);
    assert_eq!((ok(&d), flows(&d)), (1, 0));
    // The LB's encapsulation without a port (ID 0): no port.
    run(&ipip4("172.16.1.2", 0, false));
    assert_eq!((ok(&d), flows(&d)), (2, 0));
    // ... with a port but no DF: not the LB's marking.
    run(&ipip4("172.16.1.2", 80, false));
    assert_eq!((ok(&d), flows(&d)), (3, 0));
    // ... with DF and the port: recorded once (the same flow again is not
    // a new record).
    run(&ipip4("172.16.1.2", 80, true));
    run(&ipip4("172.16.1.2", 80, true));
    assert_eq!((ok(&d), flows(&d)), (5, 1));

    // IPv6: the kernel's flow label from another source: no port; the
    // LB's prefix with the port in the label's low 16 bits: recorded.
    run(&ipip6("fd88::11", 0x5_1234));
    assert_eq!(flows(&d), 1);
    run(&ipip6("100::c000:20a", 80));
    assert_eq!((ok(&d), flows(&d)), (7, 2));
}
