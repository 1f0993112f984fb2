//! Table-driven packet tests: each case runs one whole frame through the
//! verified XDP program with BPF_PROG_TEST_RUN and compares the verdict and
//! the entire output frame (and, where it matters, a counter) with what the
//! design says must happen. Run as root (`cargo test -p datapath-ebpf`).

mod common;

use common::{Fixture, NODE_ID};
use datapath_ebpf::{
    abi::{
        stat, CtKey, CtVal, SvcKey, CT_F_CLOSING, CT_F_REMOTE, CT_F_SHARED, IPPROTO_TCP,
        IPPROTO_UDP,
    },
    maps::monotonic_now,
    packet::{
        eth, ipip_frame, ipv4_header, ipv6_packet, Packet, CLIENT_MAC, ETH_P_ARP, ETH_P_IP,
        ETH_P_IPV6, L4, LB_MAC, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN,
    },
    testrun::{verdict_name, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX},
    BackendSpec, BackendState, Proto,
};

#[derive(Debug)]
enum Expect {
    /// XDP_PASS with the frame untouched.
    PassUnchanged,
    Drop,
    /// XDP_TX, IPIP to this backend id.
    Tx(u32),
    /// XDP_REDIRECT, IPIP to this backend id.
    Redirect(u32),
    /// XDP_PASS of the IPIP frame with the original MACs (next hop unresolved).
    PassEncap(u32),
    /// This verdict and exactly this frame.
    Frame(u32, Vec<u8>),
}

struct Case {
    name: String,
    frame: Vec<u8>,
    pkt: Option<Packet>,
    expect: Expect,
    /// Counter index and its expected increase.
    stat: Option<(usize, u64)>,
}

fn case(name: &str, pkt: Packet, expect: Expect) -> Case {
    Case {
        name: name.into(),
        frame: pkt.frame(),
        pkt: Some(pkt),
        expect,
        stat: None,
    }
}

fn raw(name: &str, frame: Vec<u8>, expect: Expect) -> Case {
    Case {
        name: name.into(),
        frame,
        pkt: None,
        expect,
        stat: None,
    }
}

impl Case {
    fn counts(mut self, idx: usize, n: u64) -> Self {
        self.stat = Some((idx, n));
        self
    }
}

fn hex(b: &[u8]) -> String {
    b.chunks(16)
        .map(|c| {
            c.iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn assert_frame(name: &str, got: &[u8], want: &[u8]) {
    assert!(
        got == want,
        "{name}: output frame differs\n got ({} bytes):\n{}\nwant ({} bytes):\n{}",
        got.len(),
        hex(got),
        want.len(),
        hex(want)
    );
}

fn key(p: &Packet) -> CtKey {
    match p.l4 {
        L4::Tcp { sport, dport, .. } => CtKey::new(p.src, sport, p.dst, dport, IPPROTO_TCP),
        L4::Udp { sport, dport } => CtKey::new(p.src, sport, p.dst, dport, IPPROTO_UDP),
        _ => panic!("no flow key for {p:?}"),
    }
}

/// The same TCP packet with other flags.
fn with_flags(p: &Packet, flags: u8) -> Packet {
    let mut q = p.clone();
    if let L4::Tcp { flags: f, .. } = &mut q.l4 {
        *f = flags;
    }
    q
}

fn skey(vip: &str, port: u16, proto: u8) -> SvcKey {
    SvcKey::new(vip.parse().expect("vip"), port, proto)
}

fn check(fx: &Fixture, c: &Case) {
    let before = fx.dp.stats().expect("stats");
    let r = fx.run_frame(&c.frame);
    let name = &c.name;
    let want_verdict = |v: u32| {
        assert_eq!(
            r.verdict,
            v,
            "{name}: verdict {} but expected {}",
            verdict_name(r.verdict),
            verdict_name(v)
        )
    };
    match &c.expect {
        Expect::PassUnchanged => {
            want_verdict(XDP_PASS);
            assert_frame(name, &r.frame, &c.frame);
        }
        Expect::Drop => want_verdict(XDP_DROP),
        Expect::Tx(id) => {
            want_verdict(XDP_TX);
            let pkt = c.pkt.as_ref().expect("Tx cases carry a packet");
            assert_frame(name, &r.frame, &fx.expected_encap(pkt, *id));
        }
        Expect::Redirect(id) => {
            want_verdict(XDP_REDIRECT);
            let pkt = c.pkt.as_ref().expect("Redirect cases carry a packet");
            assert_frame(name, &r.frame, &fx.expected_encap(pkt, *id));
        }
        Expect::PassEncap(id) => {
            want_verdict(XDP_PASS);
            let pkt = c.pkt.as_ref().expect("PassEncap cases carry a packet");
            let sport = match pkt.l4 {
                L4::Tcp { sport, .. } | L4::Udp { sport, .. } => sport,
                _ => 0,
            };
            let want = ipip_frame(
                pkt.dst_mac,
                pkt.src_mac,
                pkt.vlan,
                Fixture::backend_addr(*id),
                pkt.src,
                sport,
                pkt.tos,
                &pkt.l3(),
            );
            assert_frame(name, &r.frame, &want);
        }
        Expect::Frame(v, want) => {
            want_verdict(*v);
            assert_frame(name, &r.frame, want);
        }
    }
    if let Some((idx, n)) = c.stat {
        let after = fx.dp.stats().expect("stats");
        assert_eq!(
            after.c[idx] - before.c[idx],
            n,
            "{name}: counter {idx} moved by {} instead of {n}",
            after.c[idx] - before.c[idx]
        );
    }
}

fn run_table(fx: &Fixture, cases: &[Case]) {
    for c in cases {
        check(fx, c);
    }
}

const VIP: &str = "10.200.0.1";
const VIP6: &str = "fd00:200::1";
const CLIENT: &str = "192.0.2.10";
const CLIENT6: &str = "2001:db8::10";

/// Basic IPv4 forwarding, L2 variants, non-VIP and malformed traffic.
#[test]
fn t01_ipv4_table() {
    let fx = Fixture::new("hfpkt1");
    let svc80 = skey(VIP, 80, IPPROTO_TCP);
    let svc53 = skey(VIP, 53, IPPROTO_UDP);
    let syn = Packet::tcp(CLIENT, 40000, VIP, 80, TCP_SYN);
    let pick = fx.predict(&key(&syn), &svc80);
    let udp = Packet::udp(CLIENT, 5353, VIP, 53);
    let upick = fx.predict(&key(&udp), &svc53);
    let tos = Packet::tcp(CLIENT, 40001, VIP, 80, TCP_SYN).with_tos(0xb8);
    let tpick = fx.predict(&key(&tos), &svc80);
    let vlan = Packet::tcp(CLIENT, 40002, VIP, 80, TCP_SYN).with_vlan(42);
    let vpick = fx.predict(&key(&vlan), &svc80);
    let mut opts = Packet::tcp(CLIENT, 40003, VIP, 80, TCP_SYN);
    opts.ip_options = vec![1, 1, 1, 0]; // NOP NOP NOP EOL
    let opick = fx.predict(&key(&opts), &svc80);
    let port0 = Packet::tcp(CLIENT, 40004, "10.200.0.2", 12345, TCP_SYN);
    let midflow = Packet::tcp(CLIENT, 40005, VIP, 80, TCP_ACK | TCP_PSH);
    let mpick = fx.predict(&key(&midflow), &svc80);

    let mut arp = eth([0xff; 6], CLIENT_MAC, None, ETH_P_ARP);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&[0u8; 20]);

    let mut frag_mf = Packet::udp(CLIENT, 5000, VIP, 53);
    frag_mf.frag = 0x2000;
    let mut frag_off = Packet::udp(CLIENT, 5000, VIP, 53);
    frag_off.frag = 0x0010;
    let mut frag_df = Packet::udp(CLIENT, 5001, VIP, 53); // DF alone is no fragment
    frag_df.frag = 0x4000;
    let dfpick = fx.predict(&key(&frag_df), &svc53);
    let mut frag_other = Packet::udp(CLIENT, 5000, "198.51.100.1", 53);
    frag_other.frag = 0x2000;

    // A TCP packet whose IP length ends 10 bytes into the TCP header.
    let short_tcp = {
        let full = Packet::tcp(CLIENT, 40006, VIP, 80, TCP_SYN).with_payload(vec![]);
        let l3 = full.l3();
        let mut f = eth(LB_MAC, CLIENT_MAC, None, ETH_P_IP);
        f.extend_from_slice(&ipv4_header(
            CLIENT.parse().expect("a"),
            VIP.parse().expect("a"),
            6,
            0,
            64,
            0,
            &[],
            &l3[20..30],
        ));
        f
    };
    let short_udp = {
        let mut f = eth(LB_MAC, CLIENT_MAC, None, ETH_P_IP);
        f.extend_from_slice(&ipv4_header(
            CLIENT.parse().expect("a"),
            VIP.parse().expect("a"),
            17,
            0,
            64,
            0,
            &[],
            &[0x13, 0x88, 0x00, 0x35],
        ));
        f
    };
    let syn_frame = syn.frame();
    let mut bad_len = syn_frame.clone();
    bad_len[16..18].copy_from_slice(&2000u16.to_be_bytes());
    let mut bad_ihl = syn_frame.clone();
    bad_ihl[14] = 0x44;
    let mut bad_version = syn_frame.clone();
    bad_version[14] = 0x55;
    let echo = Packet::icmp(CLIENT, VIP, 8, 0, [0, 1, 0, 1], b"ping".to_vec());
    let gre = Packet {
        l4: L4::Raw {
            proto: 47,
            bytes: vec![0; 8],
        },
        ..Packet::udp(CLIENT, 1, VIP, 1)
    };
    // Ethernet padding after a short IP packet is not a length error.
    let mut padded = Packet::udp(CLIENT, 5002, VIP, 53)
        .with_payload(vec![])
        .frame();
    let padded_pkt = Packet::udp(CLIENT, 5002, VIP, 53).with_payload(vec![]);
    let ppick = fx.predict(&key(&padded_pkt), &svc53);
    padded.extend_from_slice(&[0u8; 18]);
    let mut padded_want = fx.expected_encap(&padded_pkt, ppick);
    padded_want.extend_from_slice(&[0u8; 18]);

    let cases = vec![
        case(
            "tcp syn to vip: new flow, IPIP to the Maglev pick",
            syn.clone(),
            Expect::Tx(pick),
        )
        .counts(stat::NEW_FLOWS, 1),
        case(
            "tcp ack of that flow: conntrack hit",
            Packet::tcp(CLIENT, 40000, VIP, 80, TCP_ACK),
            Expect::Tx(pick),
        )
        .counts(stat::CT_HITS, 1),
        case("udp to vip:53", udp.clone(), Expect::Tx(upick)).counts(stat::NEW_FLOWS, 1),
        case("udp again: conntrack hit", udp, Expect::Tx(upick)).counts(stat::CT_HITS, 1),
        case("tos is copied to the outer header", tos, Expect::Tx(tpick)),
        case("802.1Q tag is parsed and kept", vlan, Expect::Tx(vpick)),
        case(
            "ipv4 options: inner packet forwarded whole",
            opts,
            Expect::Tx(opick),
        ),
        case("port-0 service matches any port", port0, Expect::Tx(6)),
        case(
            "tcp mid-flow packet without entry: forwarded and counted",
            midflow,
            Expect::Tx(mpick),
        )
        .counts(stat::MIDFLOW_MISS, 1),
        case(
            "non-vip tcp passes untouched",
            Packet::tcp(CLIENT, 40000, "198.51.100.1", 80, TCP_SYN),
            Expect::PassUnchanged,
        ),
        case(
            "vip on a port without service passes",
            Packet::tcp(CLIENT, 40000, VIP, 81, TCP_SYN),
            Expect::PassUnchanged,
        ),
        case(
            "vip with udp on a tcp-only port passes",
            Packet::udp(CLIENT, 40000, VIP, 80),
            Expect::PassUnchanged,
        ),
        raw("arp passes untouched", arp, Expect::PassUnchanged),
        case(
            "icmp echo to vip passes (counted)",
            echo,
            Expect::PassUnchanged,
        )
        .counts(stat::PASS_VIP_OTHER, 1),
        case("gre to vip passes (counted)", gre, Expect::PassUnchanged)
            .counts(stat::PASS_VIP_OTHER, 1),
        case(
            "first fragment (MF) to vip is dropped",
            frag_mf,
            Expect::Drop,
        )
        .counts(stat::DROP_FRAGMENT, 1),
        case(
            "later fragment (offset) to vip is dropped",
            frag_off,
            Expect::Drop,
        )
        .counts(stat::DROP_FRAGMENT, 1),
        case(
            "DF without fragmentation is forwarded",
            frag_df,
            Expect::Tx(dfpick),
        ),
        case(
            "fragment to non-vip passes",
            frag_other,
            Expect::PassUnchanged,
        ),
        raw(
            "vip tcp with truncated tcp header is dropped",
            short_tcp,
            Expect::Drop,
        )
        .counts(stat::DROP_MALFORMED, 1),
        raw(
            "vip udp with truncated udp header is dropped",
            short_udp,
            Expect::Drop,
        )
        .counts(stat::DROP_MALFORMED, 1),
        raw(
            "ip total length beyond the frame passes (kernel drops)",
            bad_len,
            Expect::PassUnchanged,
        )
        .counts(stat::PASS_MALFORMED, 1),
        raw("ihl below 5 passes", bad_ihl, Expect::PassUnchanged).counts(stat::PASS_MALFORMED, 1),
        raw(
            "ip version 5 in an ipv4 frame passes",
            bad_version,
            Expect::PassUnchanged,
        )
        .counts(stat::PASS_MALFORMED, 1),
        raw(
            "frame of a bare ethernet header passes",
            syn_frame[..14].to_vec(),
            Expect::PassUnchanged,
        )
        .counts(stat::PASS_MALFORMED, 1),
        raw(
            "frame ending inside the ip header passes",
            syn_frame[..24].to_vec(),
            Expect::PassUnchanged,
        )
        .counts(stat::PASS_MALFORMED, 1),
        Case {
            name: "ethernet padding is kept and ignored".into(),
            frame: padded,
            pkt: Some(padded_pkt),
            expect: Expect::Frame(XDP_TX, padded_want),
            stat: None,
        },
    ];
    run_table(&fx, &cases);

    // The first case created exactly this entry, and announced it.
    let entry = fx
        .dp
        .ct_get(&key(&syn))
        .expect("ct lookup")
        .expect("entry of the first flow");
    assert_eq!(entry.backend_id, pick);
    assert_eq!(entry.origin, NODE_ID);
    assert_eq!(entry.flags, CT_F_SHARED, "announced to peers (all mode)");
    let now = monotonic_now().as_nanos() as u64;
    assert!(entry.created_ns <= now && now - entry.created_ns < 60_000_000_000);
}

/// Next-hop outcomes of bpf_fib_lookup.
#[test]
fn t02_next_hop_table() {
    let fx = Fixture::new("hfpkt2");
    let cases = vec![
        case(
            "backend behind another interface: redirect",
            Packet::tcp(CLIENT, 1000, "10.200.0.4", 80, TCP_SYN),
            Expect::Redirect(11),
        ),
        case(
            "backend neighbour unresolved: encapsulated frame to the kernel",
            Packet::tcp(CLIENT, 1000, "10.200.0.5", 80, TCP_SYN),
            Expect::PassEncap(12),
        )
        .counts(stat::FIB_NO_NEIGH, 1),
        case(
            "backend without route: dropped",
            Packet::tcp(CLIENT, 1000, "10.200.0.6", 80, TCP_SYN),
            Expect::Drop,
        )
        .counts(stat::FIB_FAIL, 1),
        case(
            "service with only draining backends: no new flow",
            Packet::tcp(CLIENT, 1000, "10.200.0.7", 80, TCP_SYN),
            Expect::Drop,
        )
        .counts(stat::DROP_NO_BACKEND, 1),
        case(
            "ipv4 client, ipv6 backend: ipv4-in-ipv6",
            Packet::tcp(CLIENT, 1000, "10.200.0.3", 80, TCP_SYN),
            Expect::Tx(10),
        ),
    ];
    run_table(&fx, &cases);
    let r = fx.run(&Packet::tcp(CLIENT, 1000, "10.200.0.4", 80, TCP_SYN));
    assert_eq!(r.verdict, XDP_REDIRECT);
    assert_eq!(
        &r.frame[6..12],
        &fx.lb_mac_f1,
        "source MAC of the egress interface"
    );
}

/// IPv6 forwarding and malformed IPv6.
#[test]
fn t03_ipv6_table() {
    let fx = Fixture::new("hfpkt3");
    let svc80 = skey(VIP6, 80, IPPROTO_TCP);
    let syn = Packet::tcp(CLIENT6, 50000, VIP6, 80, TCP_SYN);
    let pick = fx.predict(&key(&syn), &svc80);
    let udp = Packet::udp(CLIENT6, 50001, VIP6, 53);
    let tc = Packet::tcp(CLIENT6, 50002, VIP6, 80, TCP_SYN).with_tos(0x2e);
    let tcpick = fx.predict(&key(&tc), &svc80);

    // Hop-by-hop options header (8 bytes of PadN) before TCP.
    let hbh = {
        let inner = Packet::tcp(CLIENT6, 50003, VIP6, 80, TCP_SYN);
        let l3 = inner.l3();
        let mut payload = vec![6, 0, 1, 4, 0, 0, 0, 0]; // next=TCP, len=0, PadN(4)
        payload.extend_from_slice(&l3[40..]);
        let mut f = eth(LB_MAC, CLIENT_MAC, None, ETH_P_IPV6);
        let l3 = ipv6_packet(
            CLIENT6.parse().expect("a"),
            VIP6.parse().expect("a"),
            0,
            0,
            64,
            &payload,
        );
        f.extend_from_slice(&l3);
        (f, l3, fx.predict(&key(&inner), &svc80))
    };
    let hbh_want = ipip_frame(
        [0x02, 0, 0, 0, 0, if hbh.2 == 7 { 0x11 } else { 0x12 }],
        fx.lb_mac,
        None,
        Fixture::backend_addr(hbh.2),
        CLIENT6.parse().expect("a"),
        50003,
        0,
        &hbh.1,
    );
    let frag6 = {
        let inner = Packet::udp(CLIENT6, 50004, VIP6, 53);
        let l3 = inner.l3();
        let mut payload = vec![17, 0, 0, 1, 0, 0, 0, 42]; // fragment header, MF
        payload.extend_from_slice(&l3[40..]);
        let mut f = eth(LB_MAC, CLIENT_MAC, None, ETH_P_IPV6);
        f.extend_from_slice(&ipv6_packet(
            CLIENT6.parse().expect("a"),
            VIP6.parse().expect("a"),
            44,
            0,
            64,
            &payload,
        ));
        f
    };
    let syn_frame = syn.frame();
    let mut bad_plen = syn_frame.clone();
    bad_plen[18..20].copy_from_slice(&3000u16.to_be_bytes());

    let cases = vec![
        case(
            "ipv6 tcp syn: ipv6-in-ipv6 to the pick",
            syn,
            Expect::Tx(pick),
        )
        .counts(stat::NEW_FLOWS, 1),
        case(
            "ipv6 tcp ack: conntrack hit",
            Packet::tcp(CLIENT6, 50000, VIP6, 80, TCP_ACK),
            Expect::Tx(pick),
        )
        .counts(stat::CT_HITS, 1),
        case("ipv6 udp", udp, Expect::Tx(9)),
        case("ipv6 traffic class copied", tc, Expect::Tx(tcpick)),
        raw(
            "hop-by-hop header is stepped over",
            hbh.0,
            Expect::Frame(XDP_TX, hbh_want),
        ),
        raw("ipv6 fragment to vip is dropped", frag6, Expect::Drop).counts(stat::DROP_FRAGMENT, 1),
        case(
            "ipv6 non-vip passes",
            Packet::tcp(CLIENT6, 1, "2001:db8::99", 80, TCP_SYN),
            Expect::PassUnchanged,
        ),
        raw(
            "ipv6 header truncated passes",
            syn_frame[..40].to_vec(),
            Expect::PassUnchanged,
        )
        .counts(stat::PASS_MALFORMED, 1),
        raw(
            "ipv6 payload length beyond frame passes",
            bad_plen,
            Expect::PassUnchanged,
        )
        .counts(stat::PASS_MALFORMED, 1),
        case(
            "ipv6 icmp echo to vip passes",
            Packet::icmp(CLIENT6, VIP6, 128, 0, [0, 1, 0, 1], vec![]),
            Expect::PassUnchanged,
        )
        .counts(stat::PASS_VIP_OTHER, 1),
    ];
    run_table(&fx, &cases);
}

/// Frames too big after encapsulation, and ICMP errors about VIP flows.
#[test]
fn t04_mtu_and_icmp_table() {
    let fx = Fixture::new("hfpkt4");
    let svc80 = skey(VIP, 80, IPPROTO_TCP);

    // 1480 bytes of L3 + 20 = 1500: fits. 1481: too big.
    let fits = Packet::tcp(CLIENT, 2000, VIP, 80, TCP_ACK).with_payload(vec![7; 1480 - 40]);
    let fpick = fx.predict(&key(&fits), &svc80);
    let big = Packet::tcp(CLIENT, 2001, VIP, 80, TCP_ACK).with_payload(vec![7; 1481 - 40]);
    let big_l3 = big.l3();
    let mut want_icmp = Packet::icmp(
        VIP,
        CLIENT,
        3,
        4,
        [0, 0, (1480u16 >> 8) as u8, (1480u16 & 0xff) as u8],
        big_l3[..128].to_vec(),
    );
    want_icmp.dst_mac = CLIENT_MAC;
    want_icmp.src_mac = LB_MAC;
    let big_vlan = big.clone().with_vlan(7);
    let mut want_icmp_vlan = want_icmp.clone();
    want_icmp_vlan.vlan = Some(7);

    let big6 = Packet::tcp(CLIENT6, 2002, VIP6, 80, TCP_ACK).with_payload(vec![9; 1461 - 60]);
    let big6_l3 = big6.l3();
    let mut want_ptb = Packet::icmp(
        VIP6,
        CLIENT6,
        2,
        0,
        1460u32.to_be_bytes(),
        big6_l3[..128].to_vec(),
    );
    want_ptb.dst_mac = CLIENT_MAC;
    want_ptb.src_mac = LB_MAC;

    // ICMP frag-needed from a router about a packet the backend sent to the client.
    let client_port = 2003;
    let flow = Packet::tcp(CLIENT, client_port, VIP, 80, TCP_SYN);
    let flow_pick = fx.predict(&key(&flow), &svc80);
    let quoted = Packet::tcp(VIP, 80, CLIENT, client_port, TCP_ACK).l3()[..28].to_vec();
    let icmp_err = Packet::icmp("10.99.0.1", VIP, 3, 4, [0, 0, 0x05, 0x00], quoted);
    let icmp_err_want = ipip_frame(
        [0x02, 0, 0, 0, 0, 0x10 + flow_pick as u8],
        fx.lb_mac,
        None,
        Fixture::backend_addr(flow_pick),
        CLIENT.parse().expect("a"),
        client_port,
        0,
        &icmp_err.l3(),
    );
    // ... about a flow we have no entry for: goes to the Maglev pick, creates nothing.
    let other_port = 2004;
    let other = Packet::tcp(CLIENT, other_port, VIP, 80, TCP_SYN);
    let other_pick = fx.predict(&key(&other), &svc80);
    let quoted2 = Packet::tcp(VIP, 80, CLIENT, other_port, TCP_ACK).l3()[..28].to_vec();
    let icmp_err2 = Packet::icmp("10.99.0.1", VIP, 11, 0, [0; 4], quoted2);
    let icmp_err2_want = ipip_frame(
        [0x02, 0, 0, 0, 0, 0x10 + other_pick as u8],
        fx.lb_mac,
        None,
        Fixture::backend_addr(other_pick),
        CLIENT.parse().expect("a"),
        other_port,
        0,
        &icmp_err2.l3(),
    );
    // ... quoting a packet that did not come from the VIP it is addressed to.
    let quoted3 = Packet::tcp("10.200.0.9", 80, CLIENT, 2005, TCP_ACK).l3()[..28].to_vec();
    let icmp_err3 = Packet::icmp("10.99.0.1", VIP, 3, 4, [0; 4], quoted3);
    // ICMPv6 packet-too-big about a VIP6 flow.
    let flow6 = Packet::tcp(CLIENT6, 2006, VIP6, 80, TCP_SYN);
    let flow6_pick = fx.predict(&key(&flow6), &skey(VIP6, 80, IPPROTO_TCP));
    let quoted6 = Packet::tcp(VIP6, 80, CLIENT6, 2006, TCP_ACK).l3()[..48].to_vec();
    let ptb_in = Packet::icmp("fd00:99::1", VIP6, 2, 0, 1400u32.to_be_bytes(), quoted6);
    let ptb_in_want = ipip_frame(
        [0x02, 0, 0, 0, 0, if flow6_pick == 7 { 0x11 } else { 0x12 }],
        fx.lb_mac,
        None,
        Fixture::backend_addr(flow6_pick),
        CLIENT6.parse().expect("a"),
        2006,
        0,
        &ptb_in.l3(),
    );

    let cases = vec![
        case(
            "1480-byte packet fits the 1500 MTU after encapsulation",
            fits,
            Expect::Tx(fpick),
        ),
        case(
            "1481-byte packet: ICMP frag-needed (mtu 1480) to the client",
            big,
            Expect::Frame(XDP_TX, want_icmp.frame()),
        )
        .counts(stat::ICMP_TOO_BIG, 1),
        case(
            "too big with a VLAN tag: reply keeps the tag",
            big_vlan,
            Expect::Frame(XDP_TX, want_icmp_vlan.frame()),
        ),
        case(
            "ipv6 too big: ICMPv6 packet-too-big (mtu 1460)",
            big6,
            Expect::Frame(XDP_TX, want_ptb.frame()),
        )
        .counts(stat::ICMP_TOO_BIG, 1),
        case(
            "open the flow the next ICMP error is about",
            flow,
            Expect::Tx(flow_pick),
        ),
        case(
            "icmp frag-needed about a vip flow goes to its backend",
            icmp_err,
            Expect::Frame(XDP_TX, icmp_err_want),
        )
        .counts(stat::ICMP_ERR_FWD, 1),
        case(
            "icmp time-exceeded about an unknown flow goes to the Maglev pick",
            icmp_err2,
            Expect::Frame(XDP_TX, icmp_err2_want),
        )
        .counts(stat::NEW_FLOWS, 0),
        case(
            "icmp error quoting another source passes",
            icmp_err3,
            Expect::PassUnchanged,
        ),
        case(
            "icmpv6 packet-too-big about a vip6 flow goes to its backend",
            ptb_in,
            Expect::Frame(XDP_TX, ptb_in_want),
        ),
    ];
    run_table(&fx, &cases);
    assert!(
        fx.dp.ct_get(&key(&other)).expect("ct lookup").is_none(),
        "an ICMP error must not create conntrack state"
    );
}

/// Conntrack against config changes: flows keep their backend when Maglev
/// changes, follow a draining backend, leave a removed one; SYNs re-pick
/// stale entries; replicated entries are followed.
#[test]
fn t05_backend_changes() {
    let mut fx = Fixture::new("hfpkt5");
    let svc80 = skey(VIP, 80, IPPROTO_TCP);
    let flows: Vec<Packet> = (10_000..10_300)
        .map(|p| Packet::tcp(CLIENT, p, VIP, 80, TCP_SYN))
        .collect();
    let mut pinned = Vec::new();
    for f in &flows {
        let pick = fx.predict(&key(f), &svc80);
        check(&fx, &case("syn opens a flow", f.clone(), Expect::Tx(pick)));
        pinned.push(pick);
    }

    // Add backend 15: the table changes, established flows must not move.
    let mut cfg = fx.cfg.clone();
    cfg.epoch = 2;
    cfg.services[0].backends.push(BackendSpec {
        id: 15,
        addr: "10.99.0.12".parse().expect("a"),
        weight: 1,
        state: BackendState::Active,
        port: 0,
    });
    fx.apply(cfg.clone());
    let mut moved = 0;
    for (f, &was) in flows.iter().zip(&pinned) {
        let now = fx.predict(&key(f), &svc80);
        if now != was {
            moved += 1;
        }
        let ack = with_flags(f, TCP_ACK);
        check(
            &fx,
            &case(
                "known flow after a backend was added stays",
                ack,
                Expect::Tx(was),
            ),
        );
    }
    assert!(
        moved > 30,
        "adding a 4th backend should change the Maglev pick of ~1/4 of 300 flows, got {moved}"
    );
    let fresh = Packet::tcp(CLIENT, 20_000, VIP, 80, TCP_SYN);
    let fresh_pick = fx.predict(&key(&fresh), &svc80);
    check(
        &fx,
        &case("new flow uses the new table", fresh, Expect::Tx(fresh_pick)),
    );

    // Drain backend 1: its flows continue; SYNs on its tuples and new flows go elsewhere.
    cfg.epoch = 3;
    cfg.services[0].backends[0].state = BackendState::Draining;
    fx.apply(cfg.clone());
    let on1: Vec<usize> = (0..flows.len()).filter(|&i| pinned[i] == 1).collect();
    assert!(!on1.is_empty(), "some flows were on backend 1");
    for &i in &on1 {
        let ack = with_flags(&flows[i], TCP_ACK);
        check(
            &fx,
            &case("flow on a draining backend continues", ack, Expect::Tx(1)),
        );
    }
    let i = on1[0];
    let repick = fx.predict(&key(&flows[i]), &svc80);
    assert_ne!(repick, 1, "a draining backend is not in the table");
    check(
        &fx,
        &case(
            "syn on a tuple of a draining backend re-picks",
            flows[i].clone(),
            Expect::Tx(repick),
        )
        .counts(stat::REPICK_STALE, 1),
    );
    for p in 30_000..30_100 {
        let f = Packet::tcp(CLIENT, p, VIP, 80, TCP_SYN);
        let r = fx.run(&f);
        assert_eq!(r.verdict, XDP_TX);
        let entry = fx.dp.ct_get(&key(&f)).expect("ct").expect("entry");
        assert_ne!(entry.backend_id, 1, "new flow sent to a draining backend");
    }

    // Remove backend 2: its flows re-pick (they cannot be saved).
    cfg.epoch = 4;
    cfg.services[0].backends.retain(|b| b.id != 2);
    fx.apply(cfg.clone());
    let on2 = (0..flows.len())
        .find(|&i| pinned[i] == 2)
        .expect("some flow was on backend 2");
    let ack = with_flags(&flows[on2], TCP_ACK);
    let np = fx.predict(&key(&ack), &svc80);
    check(
        &fx,
        &case(
            "flow of a removed backend re-picks",
            ack.clone(),
            Expect::Tx(np),
        )
        .counts(stat::REPICK_GONE, 1),
    );
    assert_eq!(
        fx.dp
            .ct_get(&key(&ack))
            .expect("ct")
            .expect("entry")
            .backend_id,
        np,
        "the entry now points at the new backend"
    );

    // RST marks the entry closing; the next SYN on the tuple is a new connection.
    let j = (0..flows.len())
        .find(|&i| pinned[i] == 3)
        .expect("a flow on backend 3");
    let rst = with_flags(&flows[j], TCP_RST | TCP_ACK);
    check(&fx, &case("rst follows the entry", rst, Expect::Tx(3)));
    let e = fx.dp.ct_get(&key(&flows[j])).expect("ct").expect("entry");
    assert_eq!(
        e.flags & CT_F_CLOSING,
        CT_F_CLOSING,
        "RST marks the entry closing"
    );
    let jp = fx.predict(&key(&flows[j]), &svc80);
    check(
        &fx,
        &case("syn after rst re-picks", flows[j].clone(), Expect::Tx(jp))
            .counts(stat::REPICK_STALE, 1),
    );
    let fin = with_flags(&flows[j], TCP_FIN | TCP_ACK);
    check(&fx, &case("fin follows the entry", fin, Expect::Tx(jp)));

    // A retransmitted SYN of a live entry follows it.
    let k = (0..flows.len())
        .find(|&i| pinned[i] == 3 && i != j)
        .expect("another flow on backend 3");
    check(
        &fx,
        &case(
            "retransmitted syn follows a fresh entry",
            flows[k].clone(),
            Expect::Tx(3),
        ),
    );

    // A peer's entry is followed even where Maglev would choose otherwise.
    let peer_flow = Packet::tcp("192.0.2.77", 44_000, VIP, 80, TCP_ACK);
    let natural = fx.predict(&key(&peer_flow), &svc80);
    let forced = if natural == 3 { 15 } else { 3 };
    let now = monotonic_now().as_nanos() as u64;
    fx.dp
        .ct_insert_batch(&[(
            key(&peer_flow),
            CtVal {
                backend_id: forced,
                flags: CT_F_REMOTE,
                origin: 3,
                created_ns: now,
                last_seen_ns: now,
                ..Default::default()
            },
        )])
        .expect("insert replicated entry");
    check(
        &fx,
        &case(
            "replicated entry from a peer is followed",
            peer_flow,
            Expect::Tx(forced),
        )
        .counts(stat::MIDFLOW_MISS, 0),
    );

    // A UDP entry idle past the UDP timeout is a new flow: re-pick.
    let udp = Packet::udp(CLIENT, 6000, VIP, 53);
    let upick = fx.predict(&key(&udp), &skey(VIP, 53, IPPROTO_UDP));
    let stale_backend = if upick == 4 { 5 } else { 4 };
    let long_ago = now.saturating_sub(600_000_000_000);
    fx.dp
        .ct_insert_batch(&[(
            key(&udp),
            CtVal {
                backend_id: stale_backend,
                flags: 0,
                origin: NODE_ID,
                created_ns: long_ago,
                last_seen_ns: long_ago,
                ..Default::default()
            },
        )])
        .expect("insert stale entry");
    check(
        &fx,
        &case(
            "udp entry past its idle timeout re-picks",
            udp,
            Expect::Tx(upick),
        )
        .counts(stat::REPICK_STALE, 1),
    );
}

/// Every new flow is announced on the ring buffer exactly as it was written
/// to conntrack, and an own entry turning CLOSING once more.
#[test]
fn t06_ring_events_match_conntrack() {
    let mut fx = Fixture::new("hfpkt6");
    let mut events = fx.dp.take_flow_events().expect("ring buffer");
    let mut drained = Vec::new();
    events.drain(&mut drained, usize::MAX); // events of other cases: none expected
    assert!(drained.is_empty());
    let mut keys = Vec::new();
    for p in 0..50u16 {
        let f = Packet::udp(CLIENT, 7000 + p, VIP, 53);
        assert_eq!(fx.run(&f).verdict, XDP_TX);
        assert_eq!(fx.run(&f).verdict, XDP_TX); // second packet: no new event
        keys.push(key(&f));
    }
    let syn6 = Packet::tcp(CLIENT6, 7100, VIP6, 80, TCP_SYN);
    assert_eq!(fx.run(&syn6).verdict, XDP_TX);
    keys.push(key(&syn6));
    events.drain(&mut drained, usize::MAX);
    assert_eq!(drained.len(), keys.len(), "one event per new flow");
    for (ev, k) in drained.iter().zip(&keys) {
        assert_eq!(&ev.key, k);
        let entry = fx.dp.ct_get(k).expect("ct").expect("entry");
        assert_eq!(
            ev.val(),
            CtVal {
                flags: entry.flags & !CT_F_SHARED,
                ..entry
            },
            "event equals the conntrack entry (SHARED marks walk records only)"
        );
        assert_eq!(ev.origin, NODE_ID);
    }
    // A client FIN turns the entry CLOSING: one event with the flag, once.
    let fin6 = Packet::tcp(CLIENT6, 7100, VIP6, 80, TCP_ACK | TCP_FIN);
    assert_eq!(fx.run(&fin6).verdict, XDP_TX);
    assert_eq!(fx.run(&fin6).verdict, XDP_TX);
    events.drain(&mut drained, usize::MAX);
    assert_eq!(drained.len(), keys.len() + 1, "one closing event");
    let ev = drained.last().expect("closing event");
    let entry = fx.dp.ct_get(&key(&syn6)).expect("ct").expect("entry");
    assert_eq!(ev.key, key(&syn6));
    assert_eq!(ev.flags, CT_F_CLOSING);
    assert_eq!(entry.flags & CT_F_CLOSING, CT_F_CLOSING);
    assert_eq!(
        (ev.backend_id, ev.origin, ev.created_ns),
        (entry.backend_id, entry.origin, entry.created_ns)
    );
    // Another node's entry closing here: not announced (its origin does).
    let rst = Packet::tcp(CLIENT, 7200, VIP, 80, TCP_RST);
    let now = monotonic_now().as_nanos() as u64;
    fx.dp
        .ct_insert_batch(&[(
            key(&rst),
            CtVal {
                backend_id: entry.backend_id,
                flags: CT_F_REMOTE,
                origin: NODE_ID + 1,
                created_ns: now,
                last_seen_ns: now,
                ..Default::default()
            },
        )])
        .expect("insert a peer's entry");
    fx.run(&rst);
    let peer_entry = fx.dp.ct_get(&key(&rst)).expect("ct").expect("entry");
    assert_eq!(
        peer_entry.flags & CT_F_CLOSING,
        CT_F_CLOSING,
        "the RST hit it"
    );
    events.drain(&mut drained, usize::MAX);
    assert_eq!(drained.len(), keys.len() + 1, "no event for a peer's entry");
    assert_eq!(fx.stat(stat::RING_LOST), 0);
}

/// A frame cut at every length: never forwarded anywhere but to a backend,
/// and every verdict is the documented one for its cut.
#[test]
fn t07_truncated_at_every_length() {
    let fx = Fixture::new("hfpkt7");
    for (name, pkt) in [
        ("tcp4", Packet::tcp(CLIENT, 3000, VIP, 80, TCP_SYN)),
        ("udp4", Packet::udp(CLIENT, 3001, VIP, 53)),
        ("tcp6", Packet::tcp(CLIENT6, 3002, VIP6, 80, TCP_SYN)),
        ("vlan-udp4", Packet::udp(CLIENT, 3003, VIP, 53).with_vlan(9)),
    ] {
        let full = pkt.frame();
        // BPF_PROG_TEST_RUN refuses frames under 14 bytes (no driver delivers them).
        for len in 14..full.len() {
            let r = fx.run_frame(&full[..len]);
            // The IP length field always claims the full packet, so every cut
            // frame is an L2/L3 length error: passed untouched to the kernel.
            assert_eq!(
                r.verdict,
                XDP_PASS,
                "{name} cut at {len}: {}",
                verdict_name(r.verdict)
            );
            assert_eq!(r.frame, full[..len], "{name} cut at {len}: frame modified");
        }
    }
    // Cut at every L4 boundary with a consistent IP length: dropped as malformed VIP traffic.
    for l4_len in 0..20usize {
        let tcp = Packet::tcp(CLIENT, 3004, VIP, 80, TCP_SYN)
            .with_payload(vec![])
            .l3();
        let mut f = eth(LB_MAC, CLIENT_MAC, None, ETH_P_IP);
        f.extend_from_slice(&ipv4_header(
            CLIENT.parse().expect("a"),
            VIP.parse().expect("a"),
            6,
            0,
            64,
            0,
            &[],
            &tcp[20..20 + l4_len],
        ));
        let r = fx.run_frame(&f);
        assert_eq!(r.verdict, XDP_DROP, "tcp header of {l4_len} bytes");
    }
}

#[test]
fn t08_bad_config_is_refused_and_changes_nothing() {
    let mut fx = Fixture::new("hfpkt8");
    let before = fx.dp.table(&skey(VIP, 80, IPPROTO_TCP)).expect("t");
    let mut bad = fx.cfg.clone();
    bad.epoch = 9;
    bad.services[0].backends[1].weight = 0;
    let e = fx.dp.apply(&bad).unwrap_err().to_string();
    assert!(e.contains("backend 2.weight"), "{e}");
    let mut bad2 = fx.cfg.clone();
    bad2.services[0].table_size = 250;
    let e = fx.dp.apply(&bad2).unwrap_err().to_string();
    assert!(e.contains("table_size"), "{e}");
    let mut bad3 = fx.cfg.clone();
    bad3.services[0].backends[0].id = 10_000;
    let e = fx.dp.apply(&bad3).unwrap_err().to_string();
    assert!(e.contains("max_backends"), "{e}");
    let mut bad4 = fx.cfg.clone();
    bad4.services[3].backends[0].addr = "10.1.1.1".parse().expect("a");
    let e = fx.dp.apply(&bad4).unwrap_err().to_string();
    assert!(e.contains("IPv6 service"), "{e}");
    let mut bad5 = fx.cfg.clone();
    for i in 0..20 {
        bad5.services.push(common::svc(
            &format!("10.201.0.{i}"),
            80,
            Proto::Tcp,
            vec![],
        ));
    }
    let e = fx.dp.apply(&bad5).unwrap_err().to_string();
    assert!(e.contains("max_services"), "{e}");
    assert!(datapath_ebpf::ServiceSpec::parse("10.0.0.300", 80, "tcp")
        .unwrap_err()
        .to_string()
        .contains("vip"));
    assert_eq!(fx.dp.table(&skey(VIP, 80, IPPROTO_TCP)).expect("t"), before);
    assert_eq!(fx.dp.applied_epoch().expect("epoch"), 1);
    // And forwarding still works exactly as before.
    let syn = Packet::tcp(CLIENT, 3100, VIP, 80, TCP_SYN);
    let pick = fx.predict(&key(&syn), &skey(VIP, 80, IPPROTO_TCP));
    check(&fx, &case("still forwarding", syn, Expect::Tx(pick)));
}

/// A backend id that moves to another address is forwarded to the new
/// address (and its MAC) from the very next packet: the next-hop cache of
/// the old address is invalidated by the loader.
#[test]
fn t09_backend_address_change_invalidates_next_hop() {
    let mut fx = Fixture::new("hfpkt9");
    let flow = Packet::tcp(CLIENT, 4000, "10.200.0.2", 5555, TCP_SYN);
    check(
        &fx,
        &case(
            "flow to backend 6 at 10.99.0.13",
            flow.clone(),
            Expect::Tx(6),
        ),
    );
    let mut cfg = fx.cfg.clone();
    cfg.epoch = 2;
    cfg.services[2].backends[0].addr = "10.99.0.12".parse().expect("a");
    fx.apply(cfg);
    let ack = with_flags(&flow, TCP_ACK);
    let r = fx.run(&ack);
    assert_eq!(r.verdict, XDP_TX);
    let want = ipip_frame(
        [0x02, 0, 0, 0, 0, 0x12],
        fx.lb_mac,
        None,
        "10.99.0.12".parse().expect("a"),
        CLIENT.parse().expect("a"),
        4000,
        0,
        &ack.l3(),
    );
    assert_eq!(
        r.frame, want,
        "moved backend: new address and new MAC at once"
    );
}

/// The ring buffer is consumed asynchronously on tokio: `recv` waits (epoll)
/// until the datapath writes, and then returns the new flows.
#[test]
fn t10_flow_events_async_on_tokio() {
    let mut fx = Fixture::new("hfpkt10");
    let mut events = fx.dp.take_flow_events().expect("ring buffer");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let prog_fd = fx.dp.program().fd().expect("fd").try_clone().expect("dup");
    let ifindex = fx.ifindex;
    // A packet arrives 200 ms after recv started waiting, from another thread.
    let sender = fx.net.ns.spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let syn = Packet::tcp(CLIENT, 4100, VIP, 80, TCP_SYN);
        datapath_ebpf::testrun::run_fd(std::os::fd::AsFd::as_fd(&prog_fd), &syn.frame(), ifindex)
            .expect("test run")
            .verdict
    });
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let n = rt
        .block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(5), events.recv(&mut got, 64)).await
        })
        .expect("an event within 5 s")
        .expect("recv");
    assert_eq!(sender.join().expect("sender"), XDP_TX);
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(150),
        "recv returned before the packet"
    );
    assert_eq!(n, 1);
    let syn = Packet::tcp(CLIENT, 4100, VIP, 80, TCP_SYN);
    assert_eq!(got[0].key, key(&syn));
}

/// Attached to an interface, the program handles only frames addressed to
/// that interface's MAC (or multicast/broadcast): a switch flooding a dead
/// LB node's MAC, or a port in promiscuous mode, must not make this node
/// forward another node's traffic. Detached, the filter goes away.
#[test]
fn t11_frames_for_other_macs_are_not_ours() {
    let mut fx = Fixture::new("hfpkt11");
    fx.dp
        .attach("f0", datapath_ebpf::AttachMode::Generic)
        .expect("attach to f0");
    let svc80 = skey(VIP, 80, IPPROTO_TCP);
    let mut mine = Packet::tcp(CLIENT, 41000, VIP, 80, TCP_SYN);
    mine.dst_mac = fx.lb_mac;
    let pick = fx.predict(&key(&mine), &svc80);
    let mut other = Packet::tcp(CLIENT, 41001, VIP, 80, TCP_SYN);
    other.dst_mac = [0x02, 0, 0, 0, 0, 0x77];
    let mut bcast = Packet::tcp(CLIENT, 41002, VIP, 80, TCP_SYN);
    bcast.dst_mac = [0xff; 6];
    let bpick = fx.predict(&key(&bcast), &svc80);
    run_table(
        &fx,
        &[
            case("addressed to f0", mine.clone(), Expect::Tx(pick)),
            case("another unicast MAC", other.clone(), Expect::PassUnchanged)
                .counts(stat::PASS_OTHERHOST, 1),
            case("broadcast", bcast, Expect::Tx(bpick)),
        ],
    );
    assert!(
        fx.dp.ct_get(&key(&other)).expect("ct lookup").is_none(),
        "a frame for another MAC created a conntrack entry"
    );
    fx.dp.detach("f0").expect("detach");
    let opick = fx.predict(&key(&other), &svc80);
    run_table(
        &fx,
        &[case("detached: no filter", other, Expect::Tx(opick)).counts(stat::PASS_OTHERHOST, 0)],
    );
}

/// A table change writes only the Maglev slots that differ from what the
/// (inactive) region holds, and the active table is always exactly the
/// Maglev table of the active backends — through adds, drains and removals
/// that alternate the two regions, and a service removed and re-added.
#[test]
fn t12_table_changes_write_only_the_differing_slots() {
    use datapath_ebpf::maglev::{build_table, MaglevBackend};
    let mut fx = Fixture::new("hfpkt12");
    let key = skey(VIP, 80, IPPROTO_TCP);
    let steps: Vec<Vec<(u32, BackendState)>> = vec![
        vec![
            (1, BackendState::Active),
            (2, BackendState::Active),
            (3, BackendState::Active),
        ],
        vec![
            (1, BackendState::Active),
            (2, BackendState::Active),
            (3, BackendState::Active),
            (4, BackendState::Active),
        ],
        vec![
            (1, BackendState::Active),
            (2, BackendState::Draining),
            (3, BackendState::Active),
            (4, BackendState::Active),
        ],
        vec![
            (1, BackendState::Active),
            (3, BackendState::Active),
            (4, BackendState::Active),
        ],
        vec![
            (1, BackendState::Active),
            (3, BackendState::Active),
            (4, BackendState::Active),
            (5, BackendState::Active),
        ],
    ];
    let mut epoch = 10;
    let mut written = Vec::new();
    for (k, backends) in steps.iter().enumerate() {
        epoch += 1;
        let mut cfg = fx.cfg.clone();
        cfg.epoch = epoch;
        // Only this service: the other fixture services use ids 4 and up.
        cfg.services.truncate(1);
        cfg.services[0].backends = backends
            .iter()
            .map(|(id, st)| common::be(*id, *st))
            .collect();
        let report = fx.dp.apply(&cfg).expect("apply");
        fx.cfg = cfg;
        let want = build_table(
            &backends
                .iter()
                .filter(|(_, st)| *st == BackendState::Active)
                .map(|(id, _)| MaglevBackend { id: *id, weight: 1 })
                .collect::<Vec<_>>(),
            common::TABLE,
        )
        .expect("table");
        assert_eq!(
            fx.dp.table(&key).expect("read").expect("service"),
            want,
            "step {k}: the active table is not the Maglev table"
        );
        written.push(report.slots_written);
    }
    // Step 0 changes nothing for this service (the base config has 1,2,3).
    // Each later step writes only the slots where the inactive region
    // differs from the new table.
    assert!(written[1] > 0 && written[2] > 0, "{written:?}");
    for (k, w) in written.iter().enumerate().skip(3) {
        assert!(
            *w < common::TABLE as usize / 2,
            "step {k} wrote {w} of {} slots",
            common::TABLE
        );
    }
    // Removed and re-added: a fresh slot id is written whole and right.
    let mut cfg = fx.cfg.clone();
    let saved = cfg.services.remove(0);
    cfg.epoch += 1;
    fx.dp.apply(&cfg).expect("remove");
    assert!(fx.dp.table(&key).expect("read").is_none());
    cfg.services.insert(0, saved.clone());
    cfg.epoch += 1;
    // Its regions still hold the old tables: the new one is written over
    // them (only where they differ) and must come out right.
    fx.dp.apply(&cfg).expect("re-add");
    let want = build_table(
        &saved
            .backends
            .iter()
            .filter(|b| b.state == BackendState::Active)
            .map(|b| MaglevBackend {
                id: b.id,
                weight: 1,
            })
            .collect::<Vec<_>>(),
        common::TABLE,
    )
    .expect("table");
    assert_eq!(fx.dp.table(&key).expect("read").expect("service"), want);
}

/// Idle expiry: an open TCP entry lives `tcp_idle_timeout`, a closing one
/// (its client sent FIN or RST) only `tcp_closing_timeout`, a UDP one
/// `udp_idle_timeout` — so short connections at hundreds a second do not
/// fill the map for an hour.
#[test]
fn t13_closing_tcp_entries_expire_sooner() {
    let f = Fixture::new("hfx13");
    let now = datapath_ebpf::maps::monotonic_now().as_nanos() as u64;
    let key = |port: u16, proto: u8| {
        CtKey::new(
            "192.0.2.1".parse().expect("ip"),
            port,
            "10.200.0.1".parse().expect("vip"),
            80,
            proto,
        )
    };
    let val = |flags: u16, idle_s: u64| CtVal {
        backend_id: 1,
        flags,
        origin: 1,
        created_ns: now - idle_s * 1_000_000_000,
        last_seen_ns: now - idle_s * 1_000_000_000,
        ..Default::default()
    };
    let entries = [
        (key(1, IPPROTO_TCP), val(0, 60)), // open, idle 60 s: stays
        (key(2, IPPROTO_TCP), val(CT_F_CLOSING, 60)), // closing, idle 60 s: goes
        (key(3, IPPROTO_TCP), val(CT_F_CLOSING, 10)), // closing, idle 10 s: stays
        (key(4, IPPROTO_UDP), val(0, 60)), // UDP, idle 60 s: stays
        (key(5, IPPROTO_UDP), val(0, 400)), // UDP, idle 400 s: goes
    ];
    f.dp.ct_insert_batch(&entries).expect("insert");
    assert_eq!(f.dp.ct_expire(now).expect("expire"), 2);
    let left: Vec<u16> =
        f.dp.ct_dump()
            .expect("dump")
            .iter()
            .map(|(k, _)| u16::from_be(k.sport))
            .collect();
    let mut left = left;
    left.sort();
    assert_eq!(left, vec![1, 3, 4]);
}
