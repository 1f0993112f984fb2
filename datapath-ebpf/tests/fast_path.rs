//! The program's cheap checks before a packet reaches the service lookup:
//! the VIP prefilter (one array read for non-VIP packets), the interface
//! slots (the MAC filter of attached interfaces, open addressing) and the
//! conntrack-hit clock the agent publishes. Each is checked by outcome:
//! verdicts, counters, conntrack contents.

mod common;

use common::*;
use std::collections::HashMap;

use datapath_ebpf::{
    abi::{stat, svc_stat, vip_filter_bit, Backend, CtKey, CtVal, SvcKey, SvcStats, IPPROTO_TCP},
    maps::{monotonic_now, CLOCK_PERIOD},
    packet::{Packet, L4, TCP_ACK, TCP_SYN},
    testrun::{self, XDP_PASS, XDP_REDIRECT, XDP_TX},
    AttachMode, BackendState, Proto,
};

fn key(p: &Packet) -> CtKey {
    match p.l4 {
        L4::Tcp { sport, dport, .. } => CtKey::new(p.src, sport, p.dst, dport, IPPROTO_TCP),
        _ => panic!("TCP only here: {p:?}"),
    }
}

fn bit_of(addr: std::net::IpAddr) -> (u32, u32) {
    let (bytes, family) = datapath_ebpf::abi::addr_bytes(addr);
    vip_filter_bit(&bytes, family)
}

/// Many VIPs of both families are all balanced (the Rust and C hashes of
/// the prefilter agree, or these would pass); an address that shares a
/// VIP's filter bit is still passed (the service lookup decides); a VIP
/// whose services are removed is passed again, and balanced again when
/// they come back.
#[test]
fn vip_prefilter_follows_the_config() {
    // Room for the base config's services and these while one replaces
    // the other.
    let mut fx = Fixture::with_options(
        "hffast1",
        datapath_ebpf::DatapathOptions {
            max_services: 32,
            ..options()
        },
    );
    let mut cfg = base_config();
    cfg.epoch = 2;
    // 8 IPv4 and 5 IPv6 VIPs.
    cfg.services.clear();
    // Backend ids are per service; these resolve on f0.
    for (i, id) in [1u32, 2, 3, 4, 5, 6, 14, 15].into_iter().enumerate() {
        cfg.services.push(svc(
            &format!("10.201.{}.{}", i / 3, 10 + i),
            443,
            Proto::Tcp,
            vec![be(id, BackendState::Active)],
        ));
    }
    for (i, id) in [7u32, 8, 9, 10, 16].into_iter().enumerate() {
        cfg.services.push(svc(
            &format!("fd00:201::{:x}", 0x100 + i * 17),
            443,
            Proto::Tcp,
            vec![be(id, BackendState::Active)],
        ));
    }
    fx.apply(cfg.clone());
    for s in &cfg.services {
        let client = if s.vip.is_ipv4() {
            "192.0.2.10"
        } else {
            "2001:db8::10"
        };
        let p = Packet::tcp(client, 40_000, &s.vip.to_string(), s.port, TCP_SYN);
        let r = fx.run(&p);
        assert_eq!(r.verdict, XDP_TX, "SYN to VIP {} was not balanced", s.vip);
    }

    // An address outside every VIP that hashes to a VIP's bit.
    let vip: std::net::IpAddr = "10.201.0.10".parse().unwrap();
    let want = bit_of(vip);
    let twin = (0..=u16::MAX)
        .map(|n| std::net::IpAddr::from([10, 77, (n >> 8) as u8, n as u8]))
        .find(|a| bit_of(*a) == want)
        .expect("a colliding address among 65536");
    let p = Packet::tcp("192.0.2.10", 40_001, &twin.to_string(), 443, TCP_SYN);
    let r = fx.run(&p);
    assert_eq!(r.verdict, XDP_PASS, "{twin} shares a filter bit, is no VIP");
    assert_eq!(r.frame, p.frame(), "a non-VIP packet was changed");
    assert!(fx.dp.ct_get(&key(&p)).expect("ct").is_none());

    // Now take the VIP's only service away.
    let to_vip = Packet::tcp("192.0.2.10", 40_002, "10.201.0.10", 443, TCP_SYN);
    let mut without = cfg.clone();
    without.epoch = 3;
    without.services.retain(|s| s.vip != vip);
    fx.apply(without);
    let r = fx.run(&to_vip);
    assert_eq!(r.verdict, XDP_PASS, "a removed VIP is still balanced");
    assert_eq!(r.frame, to_vip.frame());
    let mut back = cfg;
    back.epoch = 4;
    fx.apply(back);
    assert_eq!(fx.run(&to_vip).verdict, XDP_TX, "a re-added VIP is passed");
}

/// Interfaces whose ifindexes share a slot all get their MAC filter (probe
/// sequences), a detached one in the middle leaves the later ones filtered
/// (tombstone), its slot is reused, and one interface more than the probes
/// reach is refused with a clear error without disturbing the others.
#[test]
fn interfaces_sharing_slots_keep_their_mac_filters() {
    let mut fx = Fixture::new("hffast2");
    let base = fx.ifindex;
    let mut names = vec!["f0".to_string()];
    for k in 1..=4u32 {
        let (a, b) = (format!("hc{k}"), format!("hd{k}"));
        fx.net
            .ns
            .ip(&format!(
                "link add {a} index {} type veth peer name {b} index {}",
                base + 64 * k,
                base + 64 * k + 1000
            ))
            .expect("create a colliding veth");
        fx.net.ns.ip(&format!("link set {a} up")).expect("up");
        fx.net.ns.ip(&format!("link set {b} up")).expect("up");
        names.push(a);
    }
    let ifx: Vec<u32> = names
        .iter()
        .map(|n| fx.net.ns.ifindex(n).expect("ifindex"))
        .collect();
    assert!(ifx.iter().all(|i| i % 64 == base % 64), "{ifx:?} collide");
    let macs: Vec<_> = names
        .iter()
        .map(|n| fx.net.ns.mac(n).expect("mac"))
        .collect();

    // Frames to a VIP, addressed to the interface's MAC or to another one:
    // balanced (sent back out, or redirected to f0 where the backends are:
    // FWD) or left to the kernel (PASS).
    const FWD: u32 = 0;
    let on = |fx: &Fixture, i: usize, own: bool, port: u16| {
        let mut p = Packet::tcp("192.0.2.10", port, "10.200.0.1", 80, TCP_SYN);
        p.dst_mac = if own {
            macs[i]
        } else {
            [0x02, 0, 0, 0, 0, 0x77]
        };
        match testrun::run(fx.dp.program(), &p.frame(), ifx[i])
            .expect("test run")
            .verdict
        {
            XDP_TX | XDP_REDIRECT => FWD,
            v => v,
        }
    };
    for n in &names[..4] {
        fx.dp.attach(n, AttachMode::Generic).expect("attach");
    }
    let err = fx
        .dp
        .attach(&names[4], AttachMode::Generic)
        .expect_err("a fifth colliding interface must be refused");
    assert!(err.to_string().contains("collide"), "unclear error: {err}");
    assert!(!fx.dp.attached().contains(&names[4]));
    let mut port = 41_000;
    let mut next = || {
        port += 1;
        port
    };
    for (i, name) in names.iter().enumerate().take(4) {
        assert_eq!(on(&fx, i, true, next()), FWD, "{name} own MAC");
        let before = fx.stat(stat::PASS_OTHERHOST);
        assert_eq!(on(&fx, i, false, next()), XDP_PASS, "{name} other MAC");
        assert_eq!(fx.stat(stat::PASS_OTHERHOST), before + 1);
    }
    // Not attached: no filter on the fifth.
    assert_eq!(on(&fx, 4, false, next()), FWD);

    // Detach the second: the third and fourth stay filtered behind it.
    fx.dp.detach(&names[1]).expect("detach");
    assert_eq!(on(&fx, 1, false, next()), FWD, "detached: no filter");
    for i in [0, 2, 3] {
        assert_eq!(
            on(&fx, i, false, next()),
            XDP_PASS,
            "{} lost its filter",
            names[i]
        );
    }
    // Its slot is free again: the fifth fits now.
    fx.dp
        .attach(&names[4], AttachMode::Generic)
        .expect("attach into the freed slot");
    for i in [0, 2, 3, 4] {
        assert_eq!(
            on(&fx, i, false, next()),
            XDP_PASS,
            "{} other MAC",
            names[i]
        );
        assert_eq!(on(&fx, i, true, next()), FWD, "{} own MAC", names[i]);
    }
    for n in [&names[0], &names[2], &names[3], &names[4]] {
        fx.dp.detach(n).expect("detach");
    }
}

/// A conntrack hit refreshes last_seen with the clock the agent publishes:
/// current to within a few publishing periods (a clock published once at
/// load would be 300 ms old here), never from the future.
#[test]
fn conntrack_hits_refresh_last_seen_with_the_published_clock() {
    // The kernel-clock check is every 64th hit of a CPU: stay on one, and
    // make the timed hit the second.
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
    let fx = Fixture::new("hffast3");
    let warm = Packet::tcp("192.0.2.10", 42_001, "10.200.0.1", 80, TCP_SYN);
    assert_eq!(fx.run(&warm).verdict, XDP_TX);
    assert_eq!(
        fx.run(&Packet::tcp(
            "192.0.2.10",
            42_001,
            "10.200.0.1",
            80,
            TCP_ACK
        ))
        .verdict,
        XDP_TX
    );
    assert_eq!(fx.stat(stat::CT_HITS), 1, "one hit so far");
    let p = Packet::tcp("192.0.2.10", 42_000, "10.200.0.1", 80, TCP_ACK);
    let old = monotonic_now().as_nanos() as u64 - 5_000_000_000;
    fx.dp
        .ct_insert_batch(&[(
            key(&p),
            CtVal {
                backend_id: 1,
                flags: 0,
                origin: NODE_ID,
                created_ns: old,
                last_seen_ns: old,
                ..Default::default()
            },
        )])
        .expect("insert");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let before = monotonic_now().as_nanos() as u64;
    let r = fx.run(&p);
    let after = monotonic_now().as_nanos() as u64;
    assert_eq!(r.verdict, XDP_TX);
    assert_eq!(fx.stat(stat::CT_HITS), 2);
    let seen = fx
        .dp
        .ct_get(&key(&p))
        .expect("ct")
        .expect("entry")
        .last_seen_ns;
    let slack = 25 * CLOCK_PERIOD.as_nanos() as u64;
    assert!(
        seen + slack >= before && seen <= after,
        "last_seen {seen} not within [{before} - {slack}, {after}] (was {old})"
    );
}

/// A bpffs directory for one test's pins, removed (with its pins) on drop.
struct PinDir(std::path::PathBuf);

impl PinDir {
    fn new(name: &str) -> Self {
        let dir = std::path::PathBuf::from(format!("/sys/fs/bpf/{name}-{}", std::process::id()));
        datapath_ebpf::maps::ensure_bpffs_dir(&dir).expect("bpffs pin directory");
        Self(dir)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = datapath_ebpf::loader::remove_pins(&self.0);
    }
}

fn svc_counters(fx: &Fixture) -> HashMap<SvcKey, SvcStats> {
    fx.dp
        .service_stats()
        .expect("service stats")
        .into_iter()
        .collect()
}

/// A conntrack hit is followed before any service lookup and counts in the
/// stats slot its backend carries (svc_ref = slot + 1): exactly in its own
/// service's counters. A backend without svc_ref (maps pinned by a build
/// before it) still counts right, through the service lookup. A removed
/// service's entries are not followed: its packets go to the kernel.
#[test]
fn conntrack_hits_count_in_their_backends_service() {
    let pins = PinDir::new("hffast4");
    let mut fx = Fixture::with_options(
        "hffast4",
        datapath_ebpf::DatapathOptions {
            pin_dir: Some(pins.0.clone()),
            ..options()
        },
    );
    for s in &fx.cfg.services {
        let k = SvcKey::new(s.vip, s.port, s.proto.number());
        let slot = fx.dp.service(&k).expect("lookup").expect("service").id;
        for b in &s.backends {
            let v = fx.dp.backend(b.id).expect("backend");
            assert_eq!(v.svc_ref, slot + 1, "backend {} of {}", b.id, s.name());
        }
    }
    let key3 = SvcKey::new("10.200.0.3".parse().unwrap(), 80, IPPROTO_TCP);
    let ack = Packet::tcp("192.0.2.10", 43_000, "10.200.0.3", 80, TCP_ACK);
    let syn = Packet::tcp("192.0.2.10", 43_000, "10.200.0.3", 80, TCP_SYN);
    assert_eq!(fx.run(&syn).verdict, XDP_TX);
    let before = svc_counters(&fx);
    let hits = fx.stat(stat::CT_HITS);
    for _ in 0..5 {
        let r = fx.run(&ack);
        assert_eq!(r.verdict, XDP_TX);
        assert_eq!(r.frame, fx.expected_encap(&ack, 10));
    }
    assert_eq!(fx.stat(stat::CT_HITS), hits + 5);
    let after = svc_counters(&fx);
    for (k, st) in &after {
        let was = &before[k];
        if *k == key3 {
            assert_eq!(st.c[svc_stat::CT_HITS], was.c[svc_stat::CT_HITS] + 5);
            assert_eq!(st.c[svc_stat::PACKETS], was.c[svc_stat::PACKETS] + 5);
        } else {
            assert_eq!(st, was, "hits of 10.200.0.3:80 counted in {k:?}");
        }
    }

    // The pins of an older build: backend 10 without svc_ref.
    {
        let md = aya::maps::MapData::from_pin(pins.0.join("lb_backends")).expect("pinned map");
        let mut arr: aya::maps::Array<_, Backend> =
            aya::maps::Array::try_from(aya::maps::Map::Array(md)).expect("array");
        let mut v = fx.dp.backend(10).expect("backend");
        v.svc_ref = 0;
        arr.set(10, v, 0).expect("write backend");
    }
    let r = fx.run(&ack);
    assert_eq!(r.verdict, XDP_TX);
    assert_eq!(r.frame, fx.expected_encap(&ack, 10));
    let old = svc_counters(&fx);
    assert_eq!(
        old[&key3].c[svc_stat::CT_HITS],
        after[&key3].c[svc_stat::CT_HITS] + 1,
        "a hit on a backend without svc_ref counts in its service"
    );
    for (k, st) in &old {
        if *k != key3 {
            assert_eq!(st, &after[k], "counted in {k:?}");
        }
    }

    // The service goes (its backend with it): the entry is not followed.
    let mut cfg = fx.cfg.clone();
    cfg.epoch += 1;
    cfg.services.retain(|s| s.vip.to_string() != "10.200.0.3");
    fx.apply(cfg);
    assert!(
        fx.dp.ct_get(&key(&ack)).expect("ct").is_some(),
        "entry kept"
    );
    let r = fx.run(&ack);
    assert_eq!(
        r.verdict, XDP_PASS,
        "a removed service's flow is still balanced"
    );
    assert_eq!(r.frame, ack.frame());
}
