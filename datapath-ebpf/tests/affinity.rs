//! Client affinity (Kubernetes sessionAffinity: ClientIP): every new flow
//! of a client reaches the client's backend, across backend additions,
//! until the backend goes away or the client is idle past the timeout; a
//! peer's replicated affinity entry is followed like a local one; entries
//! are announced on the ring. Checked by verdicts, conntrack contents,
//! counters and ring records.

mod common;

use std::collections::{BTreeSet, HashMap};

use common::*;

use datapath_ebpf::{
    abi::{stat, CtKey, CtVal, FlowEvent, CT_F_AFFINE, CT_F_AFFINITY, CT_F_REMOTE, IPPROTO_TCP},
    maps::monotonic_now,
    packet::{Packet, TCP_ACK, TCP_SYN},
    testrun::{verdict_name, XDP_TX},
    BackendState, Proto,
};

const VIP: &str = "10.200.0.8";
const S: u64 = 1_000_000_000;

/// The base config plus VIP:80 over `backends` (ids; state) with client
/// affinity `timeout`.
fn set_service(fx: &mut Fixture, backends: &[(u32, BackendState)], timeout: Option<u32>) {
    let mut cfg = fx.cfg.clone();
    cfg.epoch += 1;
    cfg.services
        .retain(|s| s.vip != VIP.parse::<std::net::IpAddr>().unwrap());
    let mut s = svc(
        VIP,
        80,
        Proto::Tcp,
        backends.iter().map(|(id, st)| be(*id, *st)).collect(),
    );
    s.affinity_timeout_s = timeout;
    cfg.services.push(s);
    fx.apply(cfg);
}

fn active(ids: &[u32]) -> Vec<(u32, BackendState)> {
    ids.iter().map(|i| (*i, BackendState::Active)).collect()
}

fn flow(client: &str, port: u16, vip: &str) -> CtKey {
    CtKey::new(
        client.parse().unwrap(),
        port,
        vip.parse().unwrap(),
        80,
        IPPROTO_TCP,
    )
}

fn affinity_key(client: &str) -> CtKey {
    CtKey::affinity(
        client.parse().unwrap(),
        VIP.parse().unwrap(),
        80,
        IPPROTO_TCP,
    )
}

/// A new connection from client:port to vip:80: the backend its entry names.
fn connect(fx: &Fixture, client: &str, port: u16, vip: &str) -> CtVal {
    let r = fx.run(&Packet::tcp(client, port, vip, 80, TCP_SYN));
    assert_eq!(
        r.verdict,
        XDP_TX,
        "SYN {client}:{port} -> {vip}: {}",
        verdict_name(r.verdict)
    );
    fx.dp
        .ct_get(&flow(client, port, vip))
        .expect("lookup")
        .expect("the flow's entry")
}

fn clients(n: u32) -> Vec<String> {
    (1..=n).map(|i| format!("192.0.2.{i}")).collect()
}

#[test]
fn clients_keep_their_backend_across_new_flows_and_a_backend_addition() {
    let mut fx = Fixture::new("hfaff1");
    set_service(&mut fx, &active(&[17, 18, 19]), Some(600));
    let mut first: HashMap<String, u32> = HashMap::new();
    for c in clients(40) {
        for port in 40_000..40_005 {
            let v = connect(&fx, &c, port, VIP);
            assert_ne!(v.flags & CT_F_AFFINE, 0, "a flow of an affinity service");
            let b = *first.entry(c.clone()).or_insert(v.backend_id);
            assert_eq!(v.backend_id, b, "{c}:{port} left its backend");
        }
        let a = fx
            .dp
            .ct_get(&affinity_key(&c))
            .expect("lookup")
            .expect("the client's affinity entry");
        assert_eq!(a.flags & CT_F_AFFINITY, CT_F_AFFINITY);
        assert_eq!(a.backend_id, first[&c]);
        assert_eq!(a.origin, NODE_ID);
    }
    let used: BTreeSet<u32> = first.values().copied().collect();
    assert!(used.len() >= 2, "clients spread over backends: {used:?}");
    assert_eq!(fx.stat(stat::AFFINITY_NEW), 40);
    assert_eq!(fx.stat(stat::AFFINITY_HITS), 40 * 4);

    // The same client on a service without affinity: its connections
    // spread (what affinity changes).
    let spread: BTreeSet<u32> = (40_000..40_020)
        .map(|p| connect(&fx, "192.0.2.1", p, "10.200.0.1").backend_id)
        .collect();
    assert!(spread.len() >= 2, "without affinity: {spread:?}");

    // A backend added: the tables change, every client keeps its backend.
    set_service(&mut fx, &active(&[17, 18, 19, 20]), Some(600));
    for (c, b) in &first {
        for port in 41_000..41_003 {
            assert_eq!(
                connect(&fx, c, port, VIP).backend_id,
                *b,
                "{c} after the addition"
            );
        }
    }
    // New clients do reach the new backend.
    let newcomers: Vec<u32> = (1..=120u32)
        .map(|i| connect(&fx, &format!("198.51.100.{i}"), 40_000, VIP).backend_id)
        .collect();
    assert!(newcomers.contains(&20), "a new client on the new backend");
}

#[test]
fn a_backend_that_goes_away_releases_its_clients() {
    let mut fx = Fixture::new("hfaff2");
    set_service(&mut fx, &active(&[17, 18, 19]), Some(600));
    let c = "192.0.2.77";
    let b0 = connect(&fx, c, 40_000, VIP).backend_id;
    let rest: Vec<u32> = [17, 18, 19].into_iter().filter(|b| *b != b0).collect();
    set_service(&mut fx, &active(&rest), Some(600));
    let b1 = connect(&fx, c, 40_001, VIP).backend_id;
    assert_ne!(b1, b0, "released from the removed backend");
    assert_eq!(fx.stat(stat::AFFINITY_RELEASED), 1);
    let a = fx.dp.ct_get(&affinity_key(c)).unwrap().unwrap();
    assert_eq!(a.backend_id, b1, "the entry names the new backend");
    assert_eq!(connect(&fx, c, 40_002, VIP).backend_id, b1);

    // Drained: released too (its open flows stay).
    let mut with_drain = active(&rest);
    for b in &mut with_drain {
        if b.0 == b1 {
            b.1 = BackendState::Draining;
        }
    }
    set_service(&mut fx, &with_drain, Some(600));
    let b2 = connect(&fx, c, 40_003, VIP).backend_id;
    assert_ne!(b2, b1, "released from the draining backend");
    assert_eq!(fx.stat(stat::AFFINITY_RELEASED), 2);
    let r = fx.run(&Packet::tcp(c, 40_002, VIP, 80, TCP_ACK));
    assert_eq!(r.verdict, XDP_TX);
    assert_eq!(
        fx.dp
            .ct_get(&flow(c, 40_002, VIP))
            .unwrap()
            .unwrap()
            .backend_id,
        b1,
        "an open flow keeps its draining backend"
    );
}

#[test]
fn the_timeout_releases_an_idle_client_and_traffic_refreshes_it() {
    let mut fx = Fixture::new("hfaff3");
    set_service(&mut fx, &active(&[17, 18, 19]), Some(5));
    let c = "192.0.2.9";
    let v = connect(&fx, c, 40_000, VIP);
    let key = affinity_key(c);
    let ct = fx.dp.conntrack();
    let a0 = ct.get(&key).unwrap().unwrap();

    // Idle past the timeout (its last packet 6 s ago): a new pick, a new entry.
    let now = monotonic_now().as_nanos() as u64;
    ct.insert_batch(&[(
        key,
        CtVal {
            last_seen_ns: now - 6 * S,
            created_ns: now - 6 * S,
            ..a0
        },
    )])
    .unwrap();
    connect(&fx, c, 40_001, VIP);
    assert_eq!(fx.stat(stat::AFFINITY_EXPIRED), 1);
    let a1 = ct.get(&key).unwrap().unwrap();
    assert!(a1.created_ns >= now, "made anew");

    // Within the timeout, a packet of one of its flows keeps it fresh: the
    // flow's refresh (its entry idle past the refresh interval) refreshes
    // the client's entry.
    let now = monotonic_now().as_nanos() as u64;
    ct.insert_batch(&[(
        key,
        CtVal {
            last_seen_ns: now - 4 * S,
            ..a1
        },
    )])
    .unwrap();
    let fk = flow(c, 40_000, VIP);
    ct.insert_batch(&[(
        fk,
        CtVal {
            last_seen_ns: now - 2 * S,
            ..v
        },
    )])
    .unwrap();
    let r = fx.run(&Packet::tcp(c, 40_000, VIP, 80, TCP_ACK));
    assert_eq!(r.verdict, XDP_TX);
    let a2 = ct.get(&key).unwrap().unwrap();
    assert!(
        a2.last_seen_ns + S > now,
        "refreshed by the flow's packet: {} s old",
        (now.saturating_sub(a2.last_seen_ns)) as f64 / S as f64
    );
    assert_eq!(connect(&fx, c, 40_002, VIP).backend_id, a1.backend_id);
    assert_eq!(fx.stat(stat::AFFINITY_EXPIRED), 1);

    // The agent's expiry removes an entry idle past its service's timeout,
    // and leaves a fresh one.
    let now = monotonic_now().as_nanos() as u64;
    let other = affinity_key("192.0.2.10");
    ct.insert_batch(&[(
        other,
        CtVal {
            last_seen_ns: now - 6 * S,
            ..a2
        },
    )])
    .unwrap();
    fx.dp.ct_expire(now).unwrap();
    assert!(ct.get(&other).unwrap().is_none(), "idle past 5 s: expired");
    assert!(ct.get(&key).unwrap().is_some(), "fresh: kept");
}

#[test]
fn a_peers_affinity_entry_is_followed_and_entries_are_announced() {
    let mut fx = Fixture::new("hfaff4");
    let mut events = fx.dp.take_flow_events().expect("ring");
    set_service(&mut fx, &active(&[17, 18, 19]), Some(600));
    // A client's own pick, then a peer's entry naming another backend.
    let c = "192.0.2.50";
    let own = connect(&fx, c, 40_000, VIP).backend_id;
    let mut got: Vec<FlowEvent> = Vec::new();
    events.drain(&mut got, usize::MAX);
    let ann: Vec<&FlowEvent> = got
        .iter()
        .filter(|e| e.flags & CT_F_AFFINITY != 0)
        .collect();
    assert_eq!(ann.len(), 1, "the new entry announced: {got:?}");
    assert_eq!(ann[0].key(), affinity_key(c), "key as the map has it");
    assert_eq!(ann[0].backend_id, own);
    assert!(got
        .iter()
        .any(|e| e.flags & CT_F_AFFINE != 0 && e.key() == flow(c, 40_000, VIP)));

    let peer = [17, 18, 19].into_iter().find(|b| *b != own).unwrap();
    let now = monotonic_now().as_nanos() as u64;
    fx.dp
        .ct_insert_batch(&[(
            affinity_key(c),
            CtVal {
                backend_id: peer,
                flags: CT_F_AFFINITY | CT_F_REMOTE,
                origin: 2,
                created_ns: now,
                last_seen_ns: now,
                ..Default::default()
            },
        )])
        .unwrap();
    assert_eq!(
        connect(&fx, c, 40_001, VIP).backend_id,
        peer,
        "the replicated entry decides"
    );

    // Affinity lifted: flows are placed on their own again.
    set_service(&mut fx, &active(&[17, 18, 19]), None);
    let spread: BTreeSet<u32> = (41_000..41_020)
        .map(|p| connect(&fx, c, p, VIP).backend_id)
        .collect();
    assert!(spread.len() >= 2, "no affinity any more: {spread:?}");
    assert_eq!(
        connect(&fx, c, 41_100, VIP).flags & CT_F_AFFINE,
        0,
        "no affinity flag on new flows"
    );
}
