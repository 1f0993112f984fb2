//! SYN flood protection: above the per-CPU SYN rate, a SYN is forwarded by
//! Maglev without a conntrack entry (nor a ring event), and the handshake's
//! first non-SYN packet makes the entry; a flood of SYNs that never complete
//! leaves the established flows in conntrack alone.

mod common;

use common::{be, svc, Fixture};
use datapath_ebpf::{
    abi::{stat, CtKey, CtVal, SvcKey, CT_F_REMOTE, IPPROTO_TCP},
    maps::monotonic_now,
    packet::{Packet, TCP_ACK, TCP_SYN},
    testrun::XDP_TX,
    BackendState, DatapathOptions, Proto,
};

const VIP: &str = "10.200.0.1";

/// The SYN window is per CPU: keep the test thread on one.
fn pin_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity"
        );
    }
}

fn key(p: &Packet) -> CtKey {
    match p.l4 {
        datapath_ebpf::packet::L4::Tcp { sport, dport, .. } => {
            CtKey::new(p.src, sport, p.dst, dport, IPPROTO_TCP)
        }
        _ => panic!("TCP only"),
    }
}

fn options(rate: u32) -> DatapathOptions {
    DatapathOptions {
        syn_flood_rate: rate,
        ..common::options()
    }
}

/// Send SYNs of throw-away clients until this CPU is in flood mode.
fn enter_flood(fx: &Fixture) {
    for i in 0..1000u32 {
        let src = std::net::Ipv4Addr::from(0xC633_0000u32 + i).to_string(); // 198.51.0.0/16
        assert_eq!(
            fx.run(&Packet::tcp(&src, 1000, VIP, 80, TCP_SYN)).verdict,
            XDP_TX
        );
        if fx.stat(stat::SYN_FLOOD) > 0 {
            return;
        }
    }
    panic!("1000 SYNs at once never reached flood mode (rate 10/s)");
}

#[test]
fn a_flooded_syn_makes_no_state_and_its_handshake_makes_the_entry() {
    pin_to_cpu0();
    let mut fx = Fixture::with_options("hfsyn1", options(10));
    let mut events = fx.dp.take_flow_events().expect("ring");
    enter_flood(&fx);
    let mut drained = Vec::new();
    events.drain(&mut drained, usize::MAX);
    let announced = drained.len() as u64;
    assert_eq!(
        announced,
        fx.stat(stat::NEW_FLOWS),
        "only SYNs below the rate made entries and events"
    );

    let syn = Packet::tcp("192.0.2.77", 5555, VIP, 80, TCP_SYN);
    let sk = SvcKey::new(VIP.parse().expect("vip"), 80, IPPROTO_TCP);
    let pick = fx.predict(&key(&syn), &sk);
    let flooded = fx.stat(stat::SYN_FLOOD);
    let r = fx.run(&syn);
    assert_eq!(r.verdict, XDP_TX);
    assert_eq!(
        r.frame,
        fx.expected_encap(&syn, pick),
        "forwarded by Maglev"
    );
    assert_eq!(fx.stat(stat::SYN_FLOOD), flooded + 1);
    assert!(
        fx.dp.ct_get(&key(&syn)).expect("ct").is_none(),
        "a flooded SYN makes no conntrack entry"
    );
    events.drain(&mut drained, usize::MAX);
    assert_eq!(drained.len() as u64, announced, "and no event for peers");

    // The client's ACK: the same backend, now entered and announced, and
    // counted as a handshake, not as a broken flow.
    let ack = Packet::tcp("192.0.2.77", 5555, VIP, 80, TCP_ACK);
    let r = fx.run(&ack);
    assert_eq!(r.verdict, XDP_TX);
    assert_eq!(r.frame, fx.expected_encap(&ack, pick), "the SYN's backend");
    let e = fx
        .dp
        .ct_get(&key(&ack))
        .expect("ct")
        .expect("entered by the handshake");
    assert_eq!(e.backend_id, pick);
    assert_eq!(fx.stat(stat::FLOOD_HANDSHAKE), 1);
    assert_eq!(fx.stat(stat::MIDFLOW_MISS), 0, "no mid-flow miss");
    events.drain(&mut drained, usize::MAX);
    assert_eq!(
        drained.len() as u64,
        announced + 1,
        "announced once established"
    );
    let ev = drained.last().expect("event");
    assert_eq!((ev.key, ev.backend_id), (key(&ack), pick));
    let hits = fx.stat(stat::CT_HITS);
    assert_eq!(fx.run(&ack).frame, fx.expected_encap(&ack, pick));
    assert_eq!(fx.stat(stat::CT_HITS), hits + 1, "then an ordinary hit");

    // Two quiet windows later the CPU is out of flood mode: a SYN makes its
    // entry again, and a non-SYN packet without one is a mid-flow miss.
    std::thread::sleep(std::time::Duration::from_millis(250));
    let lost = Packet::tcp("192.0.2.78", 5556, VIP, 80, TCP_ACK);
    let want = fx.predict(&key(&lost), &sk);
    assert_eq!(fx.run(&lost).frame, fx.expected_encap(&lost, want));
    assert_eq!(fx.stat(stat::MIDFLOW_MISS), 1);
    assert_eq!(fx.stat(stat::FLOOD_HANDSHAKE), 1);
    let syn2 = Packet::tcp("192.0.2.79", 5557, VIP, 80, TCP_SYN);
    assert_eq!(fx.run(&syn2).verdict, XDP_TX);
    assert!(
        fx.dp.ct_get(&key(&syn2)).expect("ct").is_some(),
        "out of flood mode"
    );
    // Configuration: 0 is off, the window's budget is the rate's tenth.
    assert_eq!(options(0).syn_window_max(), 0);
    assert_eq!(options(10).syn_window_max(), 1);
    assert_eq!(DatapathOptions::default().syn_window_max(), 2000);
    let mut bad = options(10);
    bad.syn_flood_rate = 200_000_000;
    let e = bad.validate().expect_err("too high").to_string();
    assert!(e.contains("syn_flood_rate"), "{e}");
}

/// Conntrack (4096 entries) holds 3000 established flows; 20 000 SYNs of
/// spoofed clients arrive on one CPU. With the protection every
/// established entry survives; without it, the flood evicts most of them.
#[test]
fn a_syn_flood_does_not_evict_established_flows() {
    pin_to_cpu0();
    let now = monotonic_now().as_nanos() as u64;
    let established: Vec<(CtKey, CtVal)> = (0..3000u32)
        .map(|i| {
            let client = std::net::Ipv4Addr::from(0xC000_0200u32 + i); // from 192.0.2.0
            let k = CtKey::new(
                client.into(),
                40000,
                VIP.parse().expect("vip"),
                80,
                IPPROTO_TCP,
            );
            let v = CtVal {
                backend_id: 1,
                flags: CT_F_REMOTE,
                origin: 2,
                created_ns: now,
                last_seen_ns: now,
                ..Default::default()
            };
            (k, v)
        })
        .collect();
    let flood: Vec<Vec<u8>> = (0..20_000u32)
        .map(|i| {
            let src = std::net::Ipv4Addr::from(0x6440_0000u32 + i).to_string(); // 100.64.0.0/10
            Packet::tcp(&src, 2000, VIP, 80, TCP_SYN).frame()
        })
        .collect();
    let mut survivors = Vec::new();
    for rate in [10u32, 0] {
        let mut fx = Fixture::with_options(&format!("hfsyn{rate}"), options(rate));
        let mut cfg = fx.cfg.clone();
        cfg.services
            .retain(|s| !(s.vip.to_string() == VIP && s.port == 80));
        cfg.services.push(svc(
            VIP,
            80,
            Proto::Tcp,
            vec![
                be(1, BackendState::Active),
                be(2, BackendState::Active),
                be(3, BackendState::Active),
            ],
        ));
        cfg.epoch += 1;
        fx.apply(cfg);
        assert_eq!(
            fx.dp.ct_insert_batch(&established).expect("fill"),
            established.len()
        );
        for f in &flood {
            assert_eq!(fx.run_frame(f).verdict, XDP_TX);
        }
        let alive = established
            .iter()
            .filter(|(k, _)| fx.dp.ct_get(k).expect("ct").is_some())
            .count();
        eprintln!(
            "syn_flood: rate {rate}: {alive} of {} established entries survived 20000 SYNs \
             ({} without state, {} new entries)",
            established.len(),
            fx.stat(stat::SYN_FLOOD),
            fx.stat(stat::NEW_FLOWS)
        );
        survivors.push((rate, alive, fx.stat(stat::SYN_FLOOD)));
    }
    let (_, on, flooded) = survivors[0];
    assert_eq!(
        on, 3000,
        "with the protection every established flow survives"
    );
    assert!(flooded >= 19_990, "the flood made no state: {flooded}");
    let (_, off, flooded) = survivors[1];
    assert_eq!(flooded, 0, "protection off: every SYN enters conntrack");
    assert!(
        off < 1500,
        "without it the flood evicts them ({off} survived)"
    );
}
