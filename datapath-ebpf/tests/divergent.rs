//! Divergent replication in the datapath: a divergent service announces
//! only the entries that a peer finding none could pick differently. At
//! steady state nothing; while a table change is prepared, the new entries
//! the next table sends elsewhere, and the share walk finds the existing
//! ones (each once); after the switch, for the grace period, the new
//! entries the previous table sends elsewhere. Checked by ring records
//! (counted and compared with the Rust mirror of Maglev), conntrack flags
//! and the walk's report, beside the same flows in `all` mode. Needs root.

mod common;

use std::collections::BTreeSet;

use common::*;
use datapath_ebpf::{
    abi::{CtKey, FlowEvent, SvcKey, CT_F_SHARED, IPPROTO_TCP},
    events::FlowEvents,
    hash::flow_hash,
    maglev::{build_table, MaglevBackend},
    packet::{Packet, TCP_ACK, TCP_FIN, TCP_SYN},
    testrun::{verdict_name, XDP_TX},
    BackendState, DatapathConfig,
};

const VIP: &str = "10.200.0.1";

fn divergent() -> datapath_ebpf::DatapathOptions {
    datapath_ebpf::DatapathOptions {
        divergent: true,
        conntrack_size: 8192,
        ring_bytes: 1 << 18,
        ..options()
    }
}

fn key(port: u16) -> CtKey {
    CtKey::new(
        "192.0.2.10".parse().unwrap(),
        port,
        VIP.parse().unwrap(),
        80,
        IPPROTO_TCP,
    )
}

fn syn(fx: &Fixture, port: u16) {
    let r = fx.run(&Packet::tcp("192.0.2.10", port, VIP, 80, TCP_SYN));
    assert_eq!(
        r.verdict,
        XDP_TX,
        "SYN :{port}: {}",
        verdict_name(r.verdict)
    );
}

fn drain(events: &mut FlowEvents) -> Vec<FlowEvent> {
    let mut got = Vec::new();
    events.drain(&mut got, usize::MAX);
    got
}

/// The Rust mirror's pick for `port` under a table of these backends.
fn pick(backends: &[u32], port: u16) -> u32 {
    let table = build_table(
        &backends
            .iter()
            .map(|id| MaglevBackend { id: *id, weight: 1 })
            .collect::<Vec<_>>(),
        TABLE,
    )
    .expect("table");
    table[(flow_hash(&key(port), SEED) % TABLE) as usize]
}

/// The base config with VIP:80 over `backends`.
fn with_backends(fx: &Fixture, backends: &[u32]) -> DatapathConfig {
    let mut cfg = fx.cfg.clone();
    cfg.epoch += 1;
    let s = cfg
        .services
        .iter_mut()
        .find(|s| s.vip.to_string() == VIP && s.port == 80)
        .expect("VIP:80");
    s.backends = backends
        .iter()
        .map(|id| be(*id, BackendState::Active))
        .collect();
    cfg
}

/// The ports among `ports` whose flows `next` sends elsewhere than `now`.
fn moved(ports: &[u16], now: &[u32], next: &[u32]) -> BTreeSet<u16> {
    ports
        .iter()
        .copied()
        .filter(|p| pick(next, *p) != pick(now, *p))
        .collect()
}

fn shared_ports(got: &[FlowEvent]) -> BTreeSet<u16> {
    got.iter().map(|e| u16::from_be(e.key.sport)).collect()
}

#[test]
fn steady_state_shares_nothing_all_mode_shares_everything() {
    for (mode, opts) in [("all", options()), ("divergent", divergent())] {
        let mut fx = Fixture::with_options(if mode == "all" { "hfdivA" } else { "hfdivD" }, opts);
        let mut events = fx.dp.take_flow_events().expect("ring");
        for port in 10_000..10_200 {
            syn(&fx, port);
        }
        let got = drain(&mut events);
        let shared = (10_000..10_200)
            .filter(|p| {
                let v = fx.dp.ct_get(&key(*p)).expect("get").expect("entry");
                v.flags & CT_F_SHARED != 0
            })
            .count();
        match mode {
            "all" => {
                assert_eq!(got.len(), 200, "all: a record per new flow");
                assert_eq!(shared, 200);
                assert!(
                    got.iter().all(|e| e.flags & CT_F_SHARED == 0),
                    "new-flow records carry no SHARED"
                );
            }
            _ => {
                assert_eq!(
                    got.len(),
                    0,
                    "divergent at steady state: no record: {got:?}"
                );
                assert_eq!(shared, 0);
            }
        }
        // A client's FIN: a closing record only for a shared entry.
        let r = fx.run(&Packet::tcp(
            "192.0.2.10",
            10_000,
            VIP,
            80,
            TCP_FIN | TCP_ACK,
        ));
        assert_eq!(r.verdict, XDP_TX);
        let got = drain(&mut events);
        assert_eq!(
            got.len(),
            if mode == "all" { 1 } else { 0 },
            "{mode}: closing records {got:?}"
        );
    }
}

#[test]
fn a_prepared_change_shares_what_it_moves_and_the_grace_what_it_moved() {
    let mut fx = Fixture::with_options("hfdiv3", divergent());
    let mut events = fx.dp.take_flow_events().expect("ring");
    let (now, next) = ([1u32, 2, 3], [1u32, 2, 3, 17]);
    // Entries made under the current table: not shared.
    let old_ports: Vec<u16> = (20_000..20_600).collect();
    for p in &old_ports {
        syn(&fx, *p);
    }
    assert!(drain(&mut events).is_empty());
    let svc = SvcKey::new(VIP.parse().unwrap(), 80, IPPROTO_TCP);
    for p in old_ports.iter().take(50) {
        assert_eq!(
            fx.predict(&key(*p), &svc),
            pick(&now, *p),
            "mirror of the current table"
        );
    }

    // Prepare: nothing switches; the walk shares the entries the next
    // table moves, each once.
    let cfg = with_backends(&fx, &next);
    let rep = fx.dp.prepare(&cfg).expect("prepare");
    assert_eq!(rep.services, 1, "one service's table changes");
    assert_eq!(fx.dp.alt_tables(), (1, 0));
    let walked = moved(&old_ports, &now, &next);
    assert!(
        !walked.is_empty() && walked.len() < old_ports.len() / 2,
        "about a quarter moves: {}",
        walked.len()
    );
    let ct = fx.dp.conntrack();
    let walk = ct.share().expect("share walk");
    assert_eq!(walk.shared as usize, walked.len(), "{walk:?}");
    assert_eq!(walk.ring_full, 0);
    assert!(walk.visited as usize >= old_ports.len());
    let got = drain(&mut events);
    assert!(
        got.iter().all(|e| e.flags & CT_F_SHARED != 0),
        "walk records are marked"
    );
    assert_eq!(shared_ports(&got), walked, "exactly the moved entries");
    for p in &old_ports {
        let v = ct.get(&key(*p)).expect("get").expect("entry");
        assert_eq!(v.flags & CT_F_SHARED != 0, walked.contains(p), "port {p}");
        assert_eq!(v.backend_id, pick(&now, *p), "still the current table's");
    }
    assert_eq!(ct.share().expect("again").shared, 0, "each entry once");
    assert!(drain(&mut events).is_empty());

    // New flows while prepared: forwarded by the current table, shared if
    // the next one sends them elsewhere.
    let new_ports: Vec<u16> = (30_000..30_400).collect();
    for p in &new_ports {
        syn(&fx, *p);
    }
    let want = moved(&new_ports, &now, &next);
    assert_eq!(
        shared_ports(&drain(&mut events)),
        want,
        "prepared: new flows the next table moves"
    );
    for p in &new_ports {
        let v = ct.get(&key(*p)).expect("get").expect("entry");
        assert_eq!(v.backend_id, pick(&now, *p), "not switched yet");
    }

    // Switch: the next table is live without a slot written again; the
    // previous one is the other table for the grace period.
    let rep = fx.dp.apply(&cfg).expect("switch");
    assert_eq!(
        rep.slots_written, 0,
        "prepared tables are not written again"
    );
    fx.cfg = cfg;
    assert_eq!(fx.dp.alt_tables(), (0, 1));
    let grace_ports: Vec<u16> = (40_000..40_400).collect();
    for p in &grace_ports {
        syn(&fx, *p);
    }
    let want = moved(&grace_ports, &now, &next);
    assert_eq!(
        shared_ports(&drain(&mut events)),
        want,
        "grace: new flows the previous table sent elsewhere"
    );
    for p in &grace_ports {
        let v = ct.get(&key(*p)).expect("get").expect("entry");
        assert_eq!(v.backend_id, pick(&next, *p), "switched");
    }
    // Old entries keep their backends (the moved ones are shared already).
    for p in &old_ports {
        let v = ct.get(&key(*p)).expect("get").expect("entry");
        assert_eq!(v.backend_id, pick(&now, *p));
    }

    // Grace over: steady state again.
    fx.dp.end_grace().expect("end grace");
    assert_eq!(fx.dp.alt_tables(), (0, 0));
    for p in 50_000..50_300 {
        syn(&fx, p);
    }
    assert!(
        drain(&mut events).is_empty(),
        "steady state after the grace"
    );
}

/// Client affinity switched on: a peer would follow the client's affinity
/// entry, which no table shows, so every entry of the service is shared.
#[test]
fn a_pick_no_table_shows_shares_every_entry() {
    let mut fx = Fixture::with_options("hfdiv5", divergent());
    let mut events = fx.dp.take_flow_events().expect("ring");
    let ports: Vec<u16> = (21_000..21_300).collect();
    for p in &ports {
        syn(&fx, *p);
    }
    assert!(drain(&mut events).is_empty());
    let mut cfg = fx.cfg.clone();
    cfg.epoch += 1;
    cfg.services
        .iter_mut()
        .find(|s| s.vip.to_string() == VIP && s.port == 80)
        .expect("VIP:80")
        .affinity_timeout_s = Some(600);
    assert_eq!(fx.dp.prepare(&cfg).expect("prepare").services, 1);
    let walk = fx.dp.conntrack().share().expect("walk");
    assert_eq!(walk.shared as usize, ports.len(), "{walk:?}");
    assert_eq!(
        shared_ports(&drain(&mut events)),
        ports.iter().copied().collect()
    );
    // And every new entry while prepared.
    for p in 22_000..22_050 {
        syn(&fx, p);
    }
    assert_eq!(drain(&mut events).len(), 50);
    fx.apply(cfg);
}

#[test]
fn a_prepare_that_changes_nothing_prepares_nothing() {
    let mut fx = Fixture::with_options("hfdiv4", divergent());
    let cfg = with_backends(&fx, &[1, 2, 3]);
    let rep = fx.dp.prepare(&cfg).expect("prepare");
    assert_eq!(rep.services, 0);
    assert_eq!(fx.dp.alt_tables(), (0, 0));
    fx.apply(cfg);
    assert_eq!(fx.dp.alt_tables(), (0, 0), "no table changed: no grace");
}
