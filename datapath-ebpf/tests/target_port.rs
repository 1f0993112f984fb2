//! DSR to a backend that listens on another port (Kubernetes targetPort):
//! the inner destination port becomes the backend's, and the outer header
//! carries the service port for the backend's decap agent (IPv4 ID with
//! DF; the low 16 bits of the IPv6 flow label). Whole output frames are
//! compared with frames built from scratch.

mod common;

use common::*;

use datapath_ebpf::{
    packet::{checksum, ipip_frame, Packet, L4, TCP_ACK, TCP_SYN},
    testrun::{verdict_name, XDP_TX},
    Proto,
};

/// The encapsulated frame of `pkt` to backend `id` listening on `port`,
/// with `svc_port` in the outer header.
fn expected(fx: &Fixture, pkt: &Packet, id: u32, port: u16) -> Vec<u8> {
    let svc_port = match pkt.l4 {
        L4::Tcp { dport, .. } | L4::Udp { dport, .. } => dport,
        _ => unreachable!("TCP or UDP"),
    };
    let mut inner = pkt.clone();
    match &mut inner.l4 {
        L4::Tcp { dport, .. } | L4::Udp { dport, .. } => *dport = port,
        _ => unreachable!(),
    }
    // The frame the untranslated packet would give, with the translated
    // inner packet and the service port in the outer header.
    let plain = fx.expected_encap(pkt, id);
    let addr = Fixture::backend_addr(id);
    let sport = match pkt.l4 {
        L4::Tcp { sport, .. } | L4::Udp { sport, .. } => sport,
        _ => 0,
    };
    let mut f = ipip_frame(
        plain[0..6].try_into().unwrap(),
        plain[6..12].try_into().unwrap(),
        pkt.vlan,
        addr,
        pkt.src,
        sport,
        pkt.tos,
        &inner.l3(),
    );
    if addr.is_ipv4() {
        f[18..20].copy_from_slice(&svc_port.to_be_bytes());
        f[20..22].copy_from_slice(&0x4000u16.to_be_bytes());
        f[24..26].copy_from_slice(&[0, 0]);
        let c = checksum(&f[14..34]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
    } else {
        f[15] &= 0xf0;
        f[16..18].copy_from_slice(&svc_port.to_be_bytes());
    }
    f
}

fn run(fx: &Fixture, pkt: &Packet, id: u32, port: u16, what: &str) {
    let r = fx.run(pkt);
    assert_eq!(r.verdict, XDP_TX, "{what}: {}", verdict_name(r.verdict));
    let want = expected(fx, pkt, id, port);
    assert!(
        r.frame == want,
        "{what}: frame differs\n got {:02x?}\nwant {:02x?}",
        r.frame,
        want
    );
}

#[test]
fn dsr_to_a_target_port_rewrites_the_inner_port_and_tells_the_backend() {
    let mut fx = Fixture::new("hftport1");
    let mut cfg = fx.cfg.clone();
    cfg.epoch += 1;
    for s in &mut cfg.services {
        let port = match (s.vip.to_string().as_str(), s.port, s.proto) {
            ("10.200.0.3", 80, Proto::Tcp) => 8080,
            ("10.200.0.1", 53, Proto::Udp) => 5353,
            ("fd00:200::1", 80, Proto::Tcp) => 8080,
            _ => continue,
        };
        for b in &mut s.backends {
            b.port = port;
        }
    }
    fx.apply(cfg);

    let syn = Packet::tcp("192.0.2.10", 40_000, "10.200.0.3", 80, TCP_SYN);
    run(&fx, &syn, 10, 8080, "SYN");
    let ack = Packet::tcp("192.0.2.10", 40_000, "10.200.0.3", 80, TCP_ACK)
        .with_payload(b"GET / HTTP/1.0\r\n\r\n".to_vec());
    run(&fx, &ack, 10, 8080, "established, with data");
    let tos = Packet::tcp("192.0.2.11", 40_000, "10.200.0.3", 80, TCP_SYN).with_tos(0xb8);
    run(&fx, &tos, 10, 8080, "SYN with a TOS");

    // UDP (checksum updated) and UDP without a checksum (stays 0).
    let q = Packet::udp("192.0.2.10", 40_001, "10.200.0.1", 53).with_payload(vec![7; 33]);
    let r = fx.run(&q);
    assert_eq!(r.verdict, XDP_TX);
    let id = fx
        .dp
        .conntrack()
        .get(&datapath_ebpf::abi::CtKey::new(
            q.src,
            40_001,
            q.dst,
            53,
            datapath_ebpf::abi::IPPROTO_UDP,
        ))
        .expect("lookup")
        .expect("entry")
        .backend_id;
    let want = expected(&fx, &q, id, 5353);
    assert_eq!(r.frame, want, "UDP query");
    let mut zero = q.frame();
    // The UDP checksum of the frame (14 + 20 + 6) set to 0: "none".
    zero[40..42].copy_from_slice(&[0, 0]);
    let r = fx.run_frame(&zero);
    assert_eq!(r.verdict, XDP_TX);
    let inner_udp = 14 + 20 + 20;
    assert_eq!(
        &r.frame[inner_udp + 2..inner_udp + 4],
        &5353u16.to_be_bytes()
    );
    assert_eq!(
        &r.frame[inner_udp + 6..inner_udp + 8],
        &[0, 0],
        "no checksum stays none"
    );

    // IPv6.
    let syn6 = Packet::tcp("2001:db8::10", 40_000, "fd00:200::1", 80, TCP_SYN);
    let r = fx.run(&syn6);
    assert_eq!(r.verdict, XDP_TX);
    let id6 = fx
        .dp
        .conntrack()
        .get(&datapath_ebpf::abi::CtKey::new(
            syn6.src,
            40_000,
            syn6.dst,
            80,
            datapath_ebpf::abi::IPPROTO_TCP,
        ))
        .expect("lookup")
        .expect("entry")
        .backend_id;
    assert_eq!(r.frame, expected(&fx, &syn6, id6, 8080), "IPv6 SYN");

    // A backend on the service's own port: the frame as ever (no port in
    // the outer header).
    let plain = Packet::tcp("192.0.2.10", 40_000, "10.200.0.4", 80, TCP_SYN);
    let r = fx.run(&plain);
    assert!(
        r.verdict == XDP_TX || r.verdict == datapath_ebpf::testrun::XDP_REDIRECT,
        "{}",
        verdict_name(r.verdict)
    );
    assert_eq!(r.frame, fx.expected_encap(&plain, 11), "untranslated");
}
