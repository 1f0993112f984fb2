//! t01: real TCP connections and UDP exchanges go client -> LB node (XDP,
//! IPIP) -> backend (decap, VIP on lo) -> straight back to the client, over
//! IPv4 and IPv6; every flow's conntrack entry names the backend that really
//! answered it. Needs root.

use std::{collections::HashSet, net::IpAddr};

use chaos::dplab::{backend_id, lab_config, lab_options, DpLab, TCP_PORT, UDP_PORT, VIP4, VIP6};
use datapath_ebpf::abi::{stat, CtKey, IPPROTO_TCP, IPPROTO_UDP};

const BACKENDS: usize = 3;

fn check_ct(
    lab: &mut DpLab,
    client: std::net::SocketAddr,
    vip: &str,
    port: u16,
    proto: u8,
    backend: usize,
) {
    let vip: IpAddr = vip.parse().expect("vip");
    let key = CtKey::new(client.ip(), client.port(), vip, port, proto);
    let entry = lab
        .dp()
        .expect("datapath")
        .ct_get(&key)
        .expect("ct lookup")
        .unwrap_or_else(|| panic!("no conntrack entry for {client} -> {vip}:{port}"));
    let want = backend_id(backend, vip.is_ipv6()) + if proto == IPPROTO_UDP { 1000 } else { 0 };
    assert_eq!(
        entry.backend_id, want,
        "{client}: conntrack says backend id {}, but be{backend} answered",
        entry.backend_id
    );
}

#[test]
fn t01_tcp_and_udp_through_xdp_and_back_by_dsr() {
    let mut lab = DpLab::up("hfe2e", BACKENDS).expect("lab up");
    lab.start_datapath(lab_options(None), lab_config(1, BACKENDS, &[]))
        .expect("datapath");

    for v6 in [false, true] {
        let vip = if v6 { VIP6 } else { VIP4 };
        let mut conns = lab.tcp_connect(30, v6).expect("30 TCP connections");
        let mut seen = HashSet::new();
        for round in 0..3 {
            for (i, c) in conns.iter_mut().enumerate() {
                let be = c
                    .exchange(&format!("conn {i} round {round}"))
                    .unwrap_or_else(|e| panic!("v6={v6} conn {i} round {round}: {e}"));
                seen.insert(be);
                let local = c.local().expect("local addr");
                check_ct(&mut lab, local, vip, TCP_PORT, IPPROTO_TCP, be);
            }
        }
        assert!(
            seen.len() >= 2,
            "v6={v6}: 30 connections all went to {seen:?}"
        );

        let mut useen = HashSet::new();
        // Held until the end: a closed socket's port may be handed to the
        // next one, whose flow would then be the same conntrack entry.
        let mut flows = Vec::new();
        for i in 0..30 {
            let flow = lab.udp_socket(v6).expect("udp socket");
            let be = flow
                .exchange(&format!("query {i}"))
                .unwrap_or_else(|e| panic!("v6={v6} udp {i}: {e}"));
            // The same flow gets the same backend again.
            assert_eq!(flow.exchange("again").expect("second answer"), be);
            useen.insert(be);
            check_ct(
                &mut lab,
                flow.local().expect("local"),
                vip,
                UDP_PORT,
                IPPROTO_UDP,
                be,
            );
            flows.push(flow);
        }
        assert!(
            useen.len() >= 2,
            "v6={v6}: 30 UDP flows all went to {useen:?}"
        );
    }

    let stats = lab.dp().expect("dp").stats().expect("stats");
    assert!(
        stats.c[stat::NEW_FLOWS] >= 120,
        "new flows {}",
        stats.c[stat::NEW_FLOWS]
    );
    assert!(stats.c[stat::FWD_PACKETS] >= 300);
    assert_eq!(
        stats.c[stat::MIDFLOW_MISS],
        0,
        "no established flow lost its entry"
    );
    let decapped: u64 = (1..=BACKENDS)
        .map(|i| lab.decap_ok(i).expect("decap stats"))
        .sum();
    assert!(
        decapped >= stats.c[stat::FWD_PACKETS] - 10,
        "backends decapsulated {decapped}"
    );
}
