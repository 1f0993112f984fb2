//! SNAT forwarding through BPF_PROG_TEST_RUN, whole output frames compared
//! with frames built from scratch (so every checksum is checked against a
//! full computation, not the datapath's incremental one):
//! - a client's packet to a SNAT VIP leaves from the node's SNAT address and
//!   a bound port to the backend's port, and the backend's reply goes back
//!   to the client from the VIP (IPv4 and IPv6, TCP and UDP, a UDP checksum
//!   of 0 kept 0), TTL / hop limit decremented;
//! - ICMP errors both ways, quoted headers translated;
//! - a reply with no binding goes to the kernel, counted; a SNAT address's
//!   reply is not a VIP's;
//! - ports: distinct per flow, exhaustion counted and the SYN dropped (no
//!   binding is ever shared);
//! - a FIN from either side turns the entry CLOSING; SYN flood mode binds
//!   half-open and the handshake's ACK makes the entry and binding;
//! - a SNAT service beside a DSR one on the same node.

mod common;

use std::{collections::HashSet, net::IpAddr};

use common::{require_root, Fixture, NODE_ID};
use datapath_ebpf::{
    abi::{stat, svc_stat, CtKey, CtVal, CT_F_CLOSING, CT_F_SNAT, IPPROTO_TCP, IPPROTO_UDP},
    packet::{Mac, Packet, L4, TCP_ACK, TCP_FIN, TCP_SYN},
    testbed::{NEIGHBOURS, ROUTER_MAC},
    testrun::{verdict_name, XDP_DROP, XDP_PASS, XDP_TX},
    BackendSpec, BackendState, DatapathConfig, DatapathOptions, Forwarding, Proto, ServiceSpec,
    SnatConfig, SnatSlot,
};

const VIP: &str = "10.200.1.1";
const VIP6: &str = "fd00:200:1::1";
const SNAT4: &str = "10.97.0.3";
const SNAT6: &str = "fd00:97::3";
const PEER4: &str = "10.97.0.5";
const CLIENT: &str = "172.20.0.7";
const CLIENT6: &str = "fd00:20::7";

fn backend(id: u32, addr: &str, port: u16) -> BackendSpec {
    BackendSpec {
        id,
        addr: addr.parse().expect("address"),
        port,
        weight: 1,
        state: BackendState::Active,
    }
}

fn snat_service(vip: &str, port: u16, proto: Proto, backends: Vec<BackendSpec>) -> ServiceSpec {
    ServiceSpec {
        source_ranges: Vec::new(),
        vip: vip.parse().expect("vip"),
        port,
        proto,
        table_size: common::TABLE,
        forwarding: Forwarding::Snat,
        affinity_timeout_s: None,
        backends,
    }
}

/// The base config plus SNAT services, this node in slot 3, a peer in 5.
fn snat_config(fx: &Fixture, own: Option<u16>) -> DatapathConfig {
    let mut cfg = fx.cfg.clone();
    cfg.epoch += 1;
    cfg.services.push(snat_service(
        VIP,
        80,
        Proto::Tcp,
        vec![backend(40, "10.99.0.11", 8080)],
    ));
    cfg.services.push(snat_service(
        VIP,
        53,
        Proto::Udp,
        vec![backend(41, "10.99.0.12", 5353)],
    ));
    cfg.services.push(snat_service(
        VIP6,
        80,
        Proto::Tcp,
        vec![backend(42, "fd00:99::13", 8080)],
    ));
    cfg.snat = SnatConfig {
        slots: vec![
            SnatSlot {
                slot: 3,
                v4: Some(SNAT4.parse().expect("addr")),
                v6: Some(SNAT6.parse().expect("addr")),
            },
            SnatSlot {
                slot: 5,
                v4: Some(PEER4.parse().expect("addr")),
                v6: None,
            },
        ],
        own,
    };
    cfg
}

fn fixture(prefix: &str) -> Fixture {
    fixture_with(prefix, common::options())
}

fn fixture_with(prefix: &str, opts: DatapathOptions) -> Fixture {
    require_root();
    let mut fx = Fixture::with_options(prefix, opts);
    let cfg = snat_config(&fx, Some(3));
    fx.apply(cfg);
    fx
}

fn mac_of(addr: &str) -> Mac {
    NEIGHBOURS
        .iter()
        .find(|(a, _, _)| *a == addr)
        .map(|(_, _, m)| *m)
        .expect("a neighbour of the test network")
}

/// The frame a packet becomes: new addresses and ports, TTL - 1, MACs of
/// the next hop, every checksum computed from scratch by the builder.
fn rewritten(
    p: &Packet,
    src: &str,
    sport: u16,
    dst: &str,
    dport: u16,
    dmac: Mac,
    smac: Mac,
) -> Vec<u8> {
    let mut q = p.clone();
    q.src = src.parse().expect("addr");
    q.dst = dst.parse().expect("addr");
    q.ttl -= 1;
    q.dst_mac = dmac;
    q.src_mac = smac;
    q.l4 = match q.l4 {
        L4::Tcp { flags, .. } => L4::Tcp {
            sport,
            dport,
            flags,
        },
        L4::Udp { .. } => L4::Udp { sport, dport },
        other => other,
    };
    q.frame()
}

fn entry(fx: &Fixture, key: &CtKey) -> CtVal {
    fx.dp
        .conntrack()
        .get(key)
        .expect("conntrack lookup")
        .expect("the flow has an entry")
}

#[track_caller]
fn expect_frame(r: &datapath_ebpf::testrun::RunResult, verdict: u32, want: &[u8], what: &str) {
    assert_eq!(
        r.verdict,
        verdict,
        "{what}: verdict {}",
        verdict_name(r.verdict)
    );
    assert_eq!(r.frame, want, "{what}: output frame");
}

#[test]
fn snat_tcp_both_ways_ipv4() {
    let fx = fixture("hsn4");
    let lb = fx.lb_mac;
    let syn = Packet::tcp(CLIENT, 40001, VIP, 80, TCP_SYN);
    let r = fx.run(&syn);
    let key = CtKey::new(
        CLIENT.parse().unwrap(),
        40001,
        VIP.parse().unwrap(),
        80,
        IPPROTO_TCP,
    );
    let e = entry(&fx, &key);
    assert_eq!(e.flags & CT_F_SNAT, CT_F_SNAT, "a SNAT entry");
    assert_eq!((e.backend_id, e.snat_slot, e.origin), (40, 3, NODE_ID));
    let port = u16::from_be(e.snat_port);
    assert!((1024..65535).contains(&port), "port {port}");
    expect_frame(
        &r,
        XDP_TX,
        &rewritten(
            &syn,
            SNAT4,
            port,
            "10.99.0.11",
            8080,
            mac_of("10.99.0.11"),
            lb,
        ),
        "client SYN to the backend",
    );
    // The binding, as the backend's reply will arrive.
    let bindings = fx.dp.conntrack().bindings().expect("bindings");
    let (rk, rv) = bindings
        .iter()
        .find(|(_, v)| v.flow == key)
        .expect("a binding of the flow");
    assert_eq!(
        *rk,
        datapath_ebpf::snat::rev_key(
            "10.99.0.11".parse().unwrap(),
            8080,
            SNAT4.parse().unwrap(),
            port,
            IPPROTO_TCP
        )
    );
    assert_eq!(rv.backend_id, 40);

    // The backend answers the SNAT address; the client gets it from the VIP.
    let synack = Packet::tcp("10.99.0.11", 8080, SNAT4, port, TCP_SYN | TCP_ACK);
    let r = fx.run(&synack);
    expect_frame(
        &r,
        XDP_TX,
        &rewritten(&synack, VIP, 80, CLIENT, 40001, ROUTER_MAC, lb),
        "backend SYN-ACK to the client",
    );
    // Established both ways, with a payload.
    let ack = Packet::tcp(CLIENT, 40001, VIP, 80, TCP_ACK).with_payload(vec![7; 300]);
    let r = fx.run(&ack);
    expect_frame(
        &r,
        XDP_TX,
        &rewritten(
            &ack,
            SNAT4,
            port,
            "10.99.0.11",
            8080,
            mac_of("10.99.0.11"),
            lb,
        ),
        "client data",
    );
    let data = Packet::tcp("10.99.0.11", 8080, SNAT4, port, TCP_ACK).with_payload(vec![9; 999]);
    let r = fx.run(&data);
    expect_frame(
        &r,
        XDP_TX,
        &rewritten(&data, VIP, 80, CLIENT, 40001, ROUTER_MAC, lb),
        "backend data",
    );
    assert_eq!(fx.stat(stat::SNAT_FWD), 2);
    assert_eq!(fx.stat(stat::SNAT_REPLIES), 2);
    let ss = fx.svc_stats(VIP, 80, IPPROTO_TCP);
    assert_eq!(ss[svc_stat::NEW_FLOWS], 1);
    assert_eq!(ss[svc_stat::REPLIES], 2);
    assert_eq!(ss[svc_stat::PACKETS], 2);

    // A FIN from the backend turns the entry CLOSING.
    let fin = Packet::tcp("10.99.0.11", 8080, SNAT4, port, TCP_FIN | TCP_ACK);
    let r = fx.run(&fin);
    assert_eq!(r.verdict, XDP_TX);
    assert_eq!(entry(&fx, &key).flags & CT_F_CLOSING, CT_F_CLOSING);

    // TTL 1 cannot be forwarded: dropped, counted.
    let mut last = Packet::tcp(CLIENT, 40001, VIP, 80, TCP_ACK);
    last.ttl = 1;
    assert_eq!(fx.run(&last).verdict, XDP_DROP);
    assert_eq!(fx.stat(stat::DROP_TTL), 1);

    // The client closes too and connects again from the same port: the
    // new connection gets its old port back (one binding, not two).
    let fin = Packet::tcp(CLIENT, 40001, VIP, 80, TCP_FIN | TCP_ACK);
    assert_eq!(fx.run(&fin).verdict, XDP_TX);
    let r = fx.run(&syn);
    expect_frame(
        &r,
        XDP_TX,
        &rewritten(
            &syn,
            SNAT4,
            port,
            "10.99.0.11",
            8080,
            mac_of("10.99.0.11"),
            lb,
        ),
        "the same tuple's next SYN, from the same port",
    );
    let e = entry(&fx, &key);
    assert_eq!(e.flags & CT_F_CLOSING, 0, "a new connection");
    assert_eq!(u16::from_be(e.snat_port), port);
    let bindings = fx.dp.conntrack().bindings().expect("bindings");
    assert_eq!(bindings.iter().filter(|(_, v)| v.flow == key).count(), 1);
    assert_eq!(bindings.len(), 1);
}

#[test]
fn snat_udp_and_ipv6() {
    let fx = fixture("hsn6");
    let lb = fx.lb_mac;
    // UDP with a checksum.
    let q = Packet::udp(CLIENT, 5000, VIP, 53).with_payload(b"query".to_vec());
    let r = fx.run(&q);
    let key = CtKey::new(
        CLIENT.parse().unwrap(),
        5000,
        VIP.parse().unwrap(),
        53,
        IPPROTO_UDP,
    );
    let port = u16::from_be(entry(&fx, &key).snat_port);
    expect_frame(
        &r,
        XDP_TX,
        &rewritten(
            &q,
            SNAT4,
            port,
            "10.99.0.12",
            5353,
            mac_of("10.99.0.12"),
            lb,
        ),
        "UDP query",
    );
    let a = Packet::udp("10.99.0.12", 5353, SNAT4, port).with_payload(b"answer".to_vec());
    expect_frame(
        &fx.run(&a),
        XDP_TX,
        &rewritten(&a, VIP, 53, CLIENT, 5000, ROUTER_MAC, lb),
        "UDP answer",
    );
    // An IPv4 UDP checksum of 0 stays 0.
    let plain = Packet::udp(CLIENT, 5000, VIP, 53);
    let mut frame = plain.frame();
    frame[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
    let mut want = rewritten(
        &plain,
        SNAT4,
        port,
        "10.99.0.12",
        5353,
        mac_of("10.99.0.12"),
        lb,
    );
    want[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
    expect_frame(
        &fx.run_frame(&frame),
        XDP_TX,
        &want,
        "UDP without a checksum",
    );

    // IPv6 TCP both ways.
    let syn = Packet::tcp(CLIENT6, 41000, VIP6, 80, TCP_SYN);
    let r = fx.run(&syn);
    let key6 = CtKey::new(
        CLIENT6.parse().unwrap(),
        41000,
        VIP6.parse().unwrap(),
        80,
        IPPROTO_TCP,
    );
    let e = entry(&fx, &key6);
    let port6 = u16::from_be(e.snat_port);
    assert_eq!((e.backend_id, e.snat_slot), (42, 3));
    expect_frame(
        &r,
        XDP_TX,
        &rewritten(
            &syn,
            SNAT6,
            port6,
            "fd00:99::13",
            8080,
            mac_of("fd00:99::13"),
            lb,
        ),
        "IPv6 SYN",
    );
    let synack = Packet::tcp("fd00:99::13", 8080, SNAT6, port6, TCP_SYN | TCP_ACK);
    expect_frame(
        &fx.run(&synack),
        XDP_TX,
        &rewritten(&synack, VIP6, 80, CLIENT6, 41000, ROUTER_MAC, lb),
        "IPv6 SYN-ACK",
    );
    let u6 = Packet::udp("fd00:99::13", 8080, SNAT6, port6);
    assert_ne!(
        fx.run(&u6).verdict,
        XDP_TX,
        "a UDP packet to a TCP binding's port is no reply"
    );
}

/// An ICMP error quoting `inner` (its first `quote` bytes).
fn icmp_quoting(
    src: &str,
    dst: &str,
    typ: u8,
    code: u8,
    rest: [u8; 4],
    inner: &Packet,
    quote: usize,
) -> Packet {
    let mut l3 = inner.l3();
    l3.truncate(quote);
    Packet::icmp(src, dst, typ, code, rest, l3)
}

#[test]
fn snat_icmp_errors_both_ways() {
    let fx = fixture("hsni");
    let lb = fx.lb_mac;
    for (quote, proto) in [(28usize, IPPROTO_UDP), (48, IPPROTO_TCP), (28, IPPROTO_TCP)] {
        let cport = 42000 + quote as u16 + u16::from(proto);
        let (first, dport, bport, backend) = if proto == IPPROTO_TCP {
            (
                Packet::tcp(CLIENT, cport, VIP, 80, TCP_SYN),
                80,
                8080,
                "10.99.0.11",
            )
        } else {
            (Packet::udp(CLIENT, cport, VIP, 53), 53, 5353, "10.99.0.12")
        };
        assert_eq!(fx.run(&first).verdict, XDP_TX);
        let key = CtKey::new(
            CLIENT.parse().unwrap(),
            cport,
            VIP.parse().unwrap(),
            dport,
            proto,
        );
        let port = u16::from_be(entry(&fx, &key).snat_port);
        let pkt = |src: &str, sp: u16, dst: &str, dp: u16| -> Packet {
            if proto == IPPROTO_TCP {
                Packet::tcp(src, sp, dst, dp, TCP_ACK).with_payload(vec![1; 40])
            } else {
                Packet::udp(src, sp, dst, dp).with_payload(vec![1; 40])
            }
        };

        // From the backend's side: frag-needed about the packet the LB sent
        // it (SNAT -> backend) reaches the client as if from the VIP, about
        // the packet the client sent (client -> VIP).
        let sent = pkt(SNAT4, port, backend, bport);
        let err = icmp_quoting(backend, SNAT4, 3, 4, [0, 0, 0x05, 0x00], &sent, quote);
        let r = fx.run(&err);
        let mut want = icmp_quoting(
            VIP,
            CLIENT,
            3,
            4,
            [0, 0, 0x05, 0x00],
            &pkt(CLIENT, cport, VIP, dport),
            quote,
        );
        want.ttl = 63;
        want.dst_mac = ROUTER_MAC;
        want.src_mac = lb;
        expect_frame(
            &r,
            XDP_TX,
            &want.frame(),
            &format!("backend-side error, quote {quote}, proto {proto}"),
        );

        // From the client's side: an error about the VIP's packet to the
        // client reaches the backend about its own packet to the SNAT address.
        let replied = pkt(VIP, dport, CLIENT, cport);
        let err = icmp_quoting("172.20.0.1", VIP, 3, 3, [0; 4], &replied, quote);
        let r = fx.run(&err);
        let mut want = icmp_quoting(
            SNAT4,
            backend,
            3,
            3,
            [0; 4],
            &pkt(backend, bport, SNAT4, port),
            quote,
        );
        want.ttl = 63;
        want.dst_mac = mac_of(backend);
        want.src_mac = lb;
        expect_frame(
            &r,
            XDP_TX,
            &want.frame(),
            &format!("client-side error, quote {quote}, proto {proto}"),
        );
    }
    assert_eq!(fx.stat(stat::SNAT_ICMP), 6);

    // IPv6: packet-too-big from the backend's side.
    let syn = Packet::tcp(CLIENT6, 43000, VIP6, 80, TCP_SYN);
    assert_eq!(fx.run(&syn).verdict, XDP_TX);
    let key6 = CtKey::new(
        CLIENT6.parse().unwrap(),
        43000,
        VIP6.parse().unwrap(),
        80,
        IPPROTO_TCP,
    );
    let port6 = u16::from_be(entry(&fx, &key6).snat_port);
    let sent = Packet::tcp(SNAT6, port6, "fd00:99::13", 8080, TCP_ACK).with_payload(vec![2; 64]);
    let ptb = icmp_quoting(
        "fd00:99::13",
        SNAT6,
        2,
        0,
        1400u32.to_be_bytes(),
        &sent,
        104,
    );
    let mut want = icmp_quoting(
        VIP6,
        CLIENT6,
        2,
        0,
        1400u32.to_be_bytes(),
        &Packet::tcp(CLIENT6, 43000, VIP6, 80, TCP_ACK).with_payload(vec![2; 64]),
        104,
    );
    want.ttl = 63;
    want.dst_mac = ROUTER_MAC;
    want.src_mac = lb;
    expect_frame(&fx.run(&ptb), XDP_TX, &want.frame(), "IPv6 packet-too-big");
}

#[test]
fn snat_midflow_packets_without_an_entry_are_dropped_not_rebound() {
    let fx = fixture("hsnm");
    // An ACK of a flow this node never saw (ECMP moved it here before its
    // entry arrived): a new port would make the backend reset it.
    let ack = Packet::tcp(CLIENT, 45000, VIP, 80, TCP_ACK).with_payload(vec![1; 20]);
    assert_eq!(fx.run(&ack).verdict, XDP_DROP);
    assert_eq!(fx.stat(stat::SNAT_MIDFLOW), 1);
    assert_eq!(fx.stat(stat::SNAT_FWD), 0);
    let key = CtKey::new(
        CLIENT.parse().unwrap(),
        45000,
        VIP.parse().unwrap(),
        80,
        IPPROTO_TCP,
    );
    assert!(
        fx.dp.conntrack().get(&key).unwrap().is_none(),
        "no entry made"
    );
    assert!(
        fx.dp.conntrack().bindings().unwrap().is_empty(),
        "no port bound"
    );
    // Once the flow's entry exists here, its packets go through with it.
    assert_eq!(
        fx.run(&Packet::tcp(CLIENT, 45000, VIP, 80, TCP_SYN))
            .verdict,
        XDP_TX
    );
    let port = entry(&fx, &key).snat_port;
    let r = fx.run(&ack);
    assert_eq!(r.verdict, XDP_TX);
    assert_eq!(
        u16::from_be_bytes([r.frame[34], r.frame[35]]),
        u16::from_be(port)
    );
    assert_eq!(fx.stat(stat::SNAT_MIDFLOW), 1);
}

#[test]
fn snat_replies_without_a_binding_and_bad_input() {
    let fx = fixture("hsnb");
    // To this node's SNAT address, no binding: the kernel, counted.
    let stray = Packet::tcp("10.99.0.11", 8080, SNAT4, 2000, TCP_ACK);
    let r = fx.run(&stray);
    assert_eq!(r.verdict, XDP_PASS);
    assert_eq!(r.frame, stray.frame(), "passed untouched");
    // A peer's SNAT address too.
    let r = fx.run(&Packet::udp("10.99.0.11", 53, PEER4, 3000));
    assert_eq!(r.verdict, XDP_PASS);
    assert_eq!(fx.stat(stat::SNAT_NO_ENTRY), 2);
    // A binding's port from another backend is not the binding's.
    let syn = Packet::tcp(CLIENT, 44000, VIP, 80, TCP_SYN);
    fx.run(&syn);
    let key = CtKey::new(
        CLIENT.parse().unwrap(),
        44000,
        VIP.parse().unwrap(),
        80,
        IPPROTO_TCP,
    );
    let port = u16::from_be(entry(&fx, &key).snat_port);
    let r = fx.run(&Packet::tcp("10.99.0.12", 8080, SNAT4, port, TCP_ACK));
    assert_eq!(r.verdict, XDP_PASS, "another backend's packet is no reply");
    // An ICMP error from the client side about a flow that has no entry.
    let ghost = Packet::tcp(VIP, 80, CLIENT, 44999, TCP_ACK);
    let r = fx.run(&icmp_quoting("172.20.0.1", VIP, 3, 1, [0; 4], &ghost, 28));
    assert_eq!(r.verdict, XDP_DROP);
    // Truncated replies are not translated.
    let frame = Packet::tcp("10.99.0.11", 8080, SNAT4, port, TCP_ACK).frame();
    for len in [14 + 20, 14 + 24, 14 + 33] {
        let r = fx.run_frame(&frame[..len]);
        assert_ne!(r.verdict, XDP_TX, "truncated at {len}");
    }
}

#[test]
fn snat_ports_are_never_shared_and_exhaustion_is_counted() {
    // 64 ports: 48 for flows, the top 16 for SYN flood mode.
    let opts = DatapathOptions {
        snat_port_min: 20000,
        snat_port_max: 20063,
        ..common::options()
    };
    let fx = fixture_with("hsnx", opts);
    let mut ports = HashSet::new();
    let (mut ok, mut dropped) = (0, 0);
    for i in 0..200u32 {
        let client = format!("172.20.{}.{}", i / 200, i % 200 + 1);
        let r = fx.run(&Packet::tcp(&client, 33000, VIP, 80, TCP_SYN));
        match r.verdict {
            XDP_TX => {
                ok += 1;
                let key = CtKey::new(
                    client.parse().unwrap(),
                    33000,
                    VIP.parse().unwrap(),
                    80,
                    IPPROTO_TCP,
                );
                let port = u16::from_be(entry(&fx, &key).snat_port);
                assert!(
                    (20000..20048).contains(&port),
                    "port {port} outside the flows' range"
                );
                assert!(ports.insert(port), "port {port} bound twice");
                // The output frame says the same port.
                assert_eq!(u16::from_be_bytes([r.frame[34], r.frame[35]]), port);
            }
            XDP_DROP => dropped += 1,
            v => panic!("verdict {}", verdict_name(v)),
        }
    }
    assert!(ok >= 44, "only {ok} of 48 ports were bound");
    assert_eq!(ok + dropped, 200);
    let full = fx.dp.conntrack().bindings().expect("bindings").len();
    // With every port taken, a bound client that closes and connects again
    // from the same port gets its own port back; nobody else gets one.
    let first = CtKey::new(
        "172.20.0.1".parse().unwrap(),
        33000,
        VIP.parse().unwrap(),
        80,
        IPPROTO_TCP,
    );
    let port0 = entry(&fx, &first).snat_port;
    let fin = Packet::tcp("172.20.0.1", 33000, VIP, 80, TCP_FIN | TCP_ACK);
    assert_eq!(fx.run(&fin).verdict, XDP_TX);
    let r = fx.run(&Packet::tcp("172.20.0.1", 33000, VIP, 80, TCP_SYN));
    assert_eq!(r.verdict, XDP_TX, "the reconnect binds its old port");
    assert_eq!(entry(&fx, &first).snat_port, port0);
    let r = fx.run(&Packet::tcp("172.20.7.7", 33000, VIP, 80, TCP_SYN));
    assert_eq!(r.verdict, XDP_DROP, "a new client still finds no port");
    dropped += 1;
    assert_eq!(fx.dp.conntrack().bindings().expect("bindings").len(), full);
    assert_eq!(fx.stat(stat::SNAT_EXHAUSTED), dropped as u64);
    assert_eq!(
        fx.svc_stats(VIP, 80, IPPROTO_TCP)[svc_stat::SNAT_EXHAUSTED],
        dropped as u64
    );
    // The same port towards another backend port is another binding.
    let r = fx.run(&Packet::udp("172.20.9.9", 1, VIP, 53));
    assert_eq!(r.verdict, XDP_TX, "the UDP service's range is its own");
    let bindings = fx.dp.conntrack().bindings().expect("bindings");
    assert_eq!(bindings.len(), ok + 1);
}

#[test]
fn snat_without_an_address_drops_and_dsr_runs_beside() {
    require_root();
    let mut fx = Fixture::new("hsnd");
    let cfg = snat_config(&fx, None);
    fx.apply(cfg);
    let r = fx.run(&Packet::tcp(CLIENT, 45000, VIP, 80, TCP_SYN));
    assert_eq!(r.verdict, XDP_DROP, "no SNAT address: nothing to bind");
    assert_eq!(fx.stat(stat::SNAT_NO_ADDR), 1);
    // The DSR services of the same node are untouched by SNAT.
    let dsr = Packet::tcp(CLIENT, 45001, "10.200.0.1", 80, TCP_SYN);
    let r = fx.run(&dsr);
    assert_eq!(r.verdict, XDP_TX);
    assert_eq!(&r.frame[12..14], &[0x08, 0x00]);
    assert_eq!(r.frame[14 + 9], 4, "IPIP");
    let key = CtKey::new(
        CLIENT.parse().unwrap(),
        45001,
        "10.200.0.1".parse().unwrap(),
        80,
        IPPROTO_TCP,
    );
    assert_eq!(entry(&fx, &key).flags & CT_F_SNAT, 0, "a DSR entry");
    // A mode change applies to new flows; an entry keeps its mode.
    let mut cfg = fx.cfg.clone();
    cfg.epoch += 1;
    cfg.snat.own = Some(3);
    if let Some(s) = cfg
        .services
        .iter_mut()
        .find(|s| s.vip == "10.200.0.1".parse::<IpAddr>().unwrap() && s.port == 80)
    {
        s.forwarding = Forwarding::Snat;
    }
    fx.apply(cfg);
    let r = fx.run(&Packet::tcp(CLIENT, 45001, "10.200.0.1", 80, TCP_ACK));
    assert_eq!(r.frame[14 + 9], 4, "the DSR flow stays IPIP");
    let r = fx.run(&Packet::tcp(CLIENT, 45002, "10.200.0.1", 80, TCP_SYN));
    assert_eq!(r.verdict, XDP_TX);
    assert_eq!(r.frame[14 + 9], 6, "a new flow is SNAT'd (plain TCP)");
}

#[test]
fn snat_syn_flood_binds_half_open_and_the_ack_completes() {
    // Flood mode from the first SYN on (a window of 1 SYN per CPU).
    let opts = DatapathOptions {
        syn_flood_rate: 10,
        ..common::options()
    };
    let fx = fixture_with("hsnf", opts);
    let lb = fx.lb_mac;
    // Two SYNs: the second is flooded.
    fx.run(&Packet::tcp(CLIENT, 46000, VIP, 80, TCP_SYN));
    let syn = Packet::tcp(CLIENT, 46001, VIP, 80, TCP_SYN);
    let r = fx.run(&syn);
    assert_eq!(r.verdict, XDP_TX);
    assert!(
        fx.stat(stat::SNAT_HALF_OPEN) >= 1,
        "flood mode bound half-open"
    );
    let key = CtKey::new(
        CLIENT.parse().unwrap(),
        46001,
        VIP.parse().unwrap(),
        80,
        IPPROTO_TCP,
    );
    assert!(
        fx.dp.conntrack().get(&key).expect("lookup").is_none(),
        "no entry yet"
    );
    let half = fx.dp.conntrack().half_open().expect("half-open");
    let (hk, hv) = half
        .iter()
        .find(|(_, v)| v.flow == key)
        .expect("a half-open binding");
    let port = u16::from_be(hk.dport);
    assert!(
        port >= 65535 - 16127,
        "the flood range (top quarter): {port}"
    );
    assert_eq!(hv.pad, 1001, "the client's ISN + 1");
    expect_frame(
        &r,
        XDP_TX,
        &rewritten(
            &syn,
            SNAT4,
            port,
            "10.99.0.11",
            8080,
            mac_of("10.99.0.11"),
            lb,
        ),
        "flooded SYN",
    );
    // The backend's SYN-ACK must acknowledge the client's ISN.
    let mut frame = Packet::tcp("10.99.0.11", 8080, SNAT4, port, TCP_SYN | TCP_ACK).frame();
    frame[14 + 20 + 8..14 + 20 + 12].copy_from_slice(&5u32.to_be_bytes());
    assert_eq!(
        fx.run_frame(&frame).verdict,
        XDP_DROP,
        "a SYN-ACK for another ISN"
    );
    assert_eq!(fx.stat(stat::SNAT_STRAY), 1);
    // The real one (ack = ISN + 1 = 1001) goes to the client.
    let mut sa = Packet::tcp("10.99.0.11", 8080, SNAT4, port, TCP_SYN | TCP_ACK);
    sa.payload.clear();
    let mut f = sa.frame();
    f[14 + 20 + 8..14 + 20 + 12].copy_from_slice(&1001u32.to_be_bytes());
    // (fix the TCP checksum for the changed ack field)
    let c = datapath_ebpf::packet::l4_checksum(
        "10.99.0.11".parse().unwrap(),
        SNAT4.parse().unwrap(),
        6,
        &{
            let mut t = f[34..].to_vec();
            t[16] = 0;
            t[17] = 0;
            t
        },
    );
    f[34 + 16..34 + 18].copy_from_slice(&c.to_be_bytes());
    assert_eq!(fx.run_frame(&f).verdict, XDP_TX, "the handshake's SYN-ACK");
    // The client's ACK completes it: entry and binding with the same port.
    let ack = Packet::tcp(CLIENT, 46001, VIP, 80, TCP_ACK);
    let r = fx.run(&ack);
    expect_frame(
        &r,
        XDP_TX,
        &rewritten(
            &ack,
            SNAT4,
            port,
            "10.99.0.11",
            8080,
            mac_of("10.99.0.11"),
            lb,
        ),
        "handshake ACK",
    );
    let e = entry(&fx, &key);
    assert_eq!(u16::from_be(e.snat_port), port);
    assert!(fx
        .dp
        .conntrack()
        .half_open()
        .expect("half-open")
        .iter()
        .all(|(_, v)| v.flow != key));
    assert!(fx
        .dp
        .conntrack()
        .bindings()
        .expect("bindings")
        .iter()
        .any(|(k, v)| v.flow == key && k == hk));
}
