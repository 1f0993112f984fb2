//! The merge rule as the kernel runs it (bpf/ct_apply.h, the only copy):
//! peers' entries applied through the apply program, checked on the map's
//! contents. Properties over random histories: every node that applies
//! the same entries, in any order and with any newer local entry, ends
//! with the same entry per flow: the newest (latest created, lowest origin
//! on a tie) with its backend and SNAT binding, never an older one, at
//! least as fresh as its copies; where all of a flow's entries share one
//! route the nodes hold the same value exactly (latest last_seen, CLOSING
//! once seen). Counts add up. Raw batches check that a malformed
//! batch is refused whole. Needs root.

mod common;

use std::collections::HashMap;

use common::{options, require_root, NODE_ID};
use datapath_ebpf::{
    abi::{CtBatch, CtKey, CtVal, CT_BATCH_MAX, CT_F_CLOSING, CT_F_REMOTE, CT_F_SNAT, FAMILY_V4},
    testrun::{self, XDP_ABORTED, XDP_PASS},
    Datapath,
};
use proptest::{prelude::*, test_runner::TestRunner};

fn key(i: u8) -> CtKey {
    let mut saddr = [0u8; 16];
    saddr[..4].copy_from_slice(&[10, 1, 0, i]);
    let mut daddr = [0u8; 16];
    daddr[..4].copy_from_slice(&[10, 200, 0, 1]);
    CtKey {
        saddr,
        daddr,
        sport: (40_000u16 + u16::from(i)).to_be(),
        dport: 80u16.to_be(),
        proto: 6,
        family: FAMILY_V4,
        pad: 0,
    }
}

/// One node's entry for a flow: what it created (`created`, `origin`) fixes
/// the backend and the SNAT binding, as on a real node; copies differ in
/// last_seen and CLOSING only.
fn val(origin: u16, created: u64, last: u64, closing: bool) -> CtVal {
    let backend = 1 + ((created * 7 + u64::from(origin) * 3) % 5) as u32;
    let snat = (created + u64::from(origin)).is_multiple_of(3);
    CtVal {
        backend_id: backend,
        flags: if closing { CT_F_CLOSING } else { 0 } | if snat { CT_F_SNAT } else { 0 },
        origin,
        created_ns: created,
        last_seen_ns: created + last,
        snat_port: if snat {
            (1024 + created as u16).to_be()
        } else {
            0
        },
        snat_slot: if snat { origin } else { 0 },
        ranges_gen: 0,
    }
}

fn clear(dp: &Datapath) {
    let keys: Vec<CtKey> = dp
        .ct_dump()
        .expect("dump")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    dp.conntrack().delete_batch(&keys).expect("clear");
}

#[test]
fn rules() {
    require_root();
    let dp = Datapath::load(options()).expect("load datapath");
    let ct = dp.conntrack();
    let k = key(1);
    // No local entry: stored, marked REMOTE.
    let c = ct.apply(&[(k, val(2, 10, 0, false))]).expect("apply");
    assert_eq!((c.applied, c.unchanged, c.rejected), (1, 0, 0));
    let got = dp.ct_get(&k).expect("get").expect("stored");
    assert_eq!(got.flags & CT_F_REMOTE, CT_F_REMOTE);
    assert_eq!((got.origin, got.created_ns), (2, 10));
    // The same copy again: unchanged.
    let c = ct.apply(&[(k, val(2, 10, 0, false))]).expect("apply");
    assert_eq!((c.applied, c.unchanged, c.rejected), (0, 1, 0));
    // A later copy: last_seen and CLOSING taken, nothing else.
    ct.apply(&[(k, val(2, 10, 40, true))]).expect("apply");
    let got = dp.ct_get(&k).expect("get").expect("kept");
    assert_eq!(got.last_seen_ns, 50);
    assert_eq!(got.flags & CT_F_CLOSING, CT_F_CLOSING);
    // An older copy never moves last_seen back.
    ct.apply(&[(k, val(2, 10, 5, false))]).expect("apply");
    assert_eq!(dp.ct_get(&k).expect("get").expect("kept").last_seen_ns, 50);
    // A newer local entry is never overridden; an older one is.
    let mine = val(NODE_ID, 20, 0, false);
    dp.ct_insert_batch(&[(k, mine)]).expect("local");
    let c = ct.apply(&[(k, val(3, 15, 99, false))]).expect("apply");
    assert_eq!((c.applied, c.rejected), (0, 1));
    assert_eq!(dp.ct_get(&k).expect("get"), Some(mine));
    ct.apply(&[(k, val(3, 30, 0, false))]).expect("apply");
    let got = dp.ct_get(&k).expect("get").expect("replaced");
    assert_eq!((got.origin, got.created_ns), (3, 30));
    // Another node's entry for the same route (an affinity entry announced
    // again by the node its client now reaches): merged, not refused - the
    // later last_seen is taken under the older name.
    let k3 = key(3);
    ct.apply(&[(k3, val(2, 40, 0, false))]).expect("apply");
    let mut again = val(2, 40, 70, false);
    again.origin = 4;
    let c = ct.apply(&[(k3, again)]).expect("apply");
    assert_eq!(c.applied, 1);
    let got = dp.ct_get(&k3).expect("get").expect("merged");
    assert_eq!((got.origin, got.last_seen_ns), (2, 110));
    // This node's own entry coming back (a warm join after a restart) is
    // not marked REMOTE.
    let k2 = key(2);
    ct.apply(&[(k2, val(NODE_ID, 5, 0, false))]).expect("apply");
    assert_eq!(
        dp.ct_get(&k2).expect("get").expect("stored").flags & CT_F_REMOTE,
        0
    );
    // More than one batch's worth in one call.
    let many: Vec<_> = (0..200u8)
        .map(|i| (key(i), val(4, 100, 0, false)))
        .collect();
    let c = ct.apply(&many).expect("apply");
    assert_eq!(c.applied + c.unchanged + c.rejected, 200);
    for (k, _) in &many {
        assert!(dp.ct_get(k).expect("get").is_some());
    }
}

/// Raw batches: a count the packet does not hold, or above the maximum, is
/// refused (XDP_ABORTED) with nothing written.
#[test]
fn malformed_batches_are_refused_whole() {
    require_root();
    let dp = Datapath::load(options()).expect("load datapath");
    let batch = |count: u32, entries: usize| -> Vec<u8> {
        let head = CtBatch {
            count,
            ..Default::default()
        };
        let mut b = Vec::new();
        // SAFETY: CtBatch, CtKey and CtVal are repr(C) without padding.
        unsafe {
            b.extend_from_slice(std::slice::from_raw_parts(
                (&head as *const CtBatch).cast::<u8>(),
                24,
            ));
            for i in 0..entries {
                let (k, v) = (key(i as u8), val(2, 10, 0, false));
                b.extend_from_slice(std::slice::from_raw_parts(
                    (&k as *const CtKey).cast::<u8>(),
                    40,
                ));
                b.extend_from_slice(std::slice::from_raw_parts(
                    (&v as *const CtVal).cast::<u8>(),
                    32,
                ));
            }
        }
        b
    };
    for (count, entries) in [
        (3u32, 2usize),
        (CT_BATCH_MAX as u32 + 1, CT_BATCH_MAX),
        (u32::MAX, 1),
    ] {
        let r = testrun::run(dp.apply_program(), &batch(count, entries), 0).expect("test run");
        assert_eq!(
            r.verdict, XDP_ABORTED,
            "count {count} with {entries} entries"
        );
        assert!(
            dp.ct_dump().expect("dump").is_empty(),
            "count {count}: nothing applied"
        );
    }
    // Shorter than a header.
    let r = testrun::run(dp.apply_program(), &[0u8; 20], 0).expect("test run");
    assert_eq!(r.verdict, XDP_ABORTED);
    // Well formed: applied, counts written back.
    let r = testrun::run(dp.apply_program(), &batch(2, 2), 0).expect("test run");
    assert_eq!(r.verdict, XDP_PASS);
    let applied = u32::from_ne_bytes(r.frame[4..8].try_into().expect("4 bytes"));
    assert_eq!(applied, 2);
    assert_eq!(dp.ct_dump().expect("dump").len(), 2);
}

/// A history: for each flow, maybe a local entry, then peers' copies.
#[derive(Clone, Debug)]
struct History {
    local: Vec<(u8, u64, u64)>,             // (flow, created, last)
    remote: Vec<(u8, u16, u64, u64, bool)>, // (flow, origin, created, last, closing)
    order: Vec<usize>,                      // a permutation of remote
}

fn history() -> impl Strategy<Value = History> {
    (
        prop::collection::vec((0u8..6, 0u64..8, 0u64..50), 0..6),
        prop::collection::vec((0u8..6, 1u16..5, 0u64..8, 0u64..50, any::<bool>()), 1..40),
    )
        .prop_flat_map(|(local, remote)| {
            let n = remote.len();
            (
                Just(local),
                Just(remote),
                Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
            )
        })
        .prop_map(|(local, remote, order)| History {
            local,
            remote,
            order,
        })
}

#[test]
fn every_order_converges_to_the_latest_created() {
    require_root();
    let a = Datapath::load(options()).expect("load datapath");
    let b = Datapath::load(options()).expect("load datapath");
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 300,
        ..ProptestConfig::default()
    });
    runner
        .run(&history(), |h| {
            clear(&a);
            clear(&b);
            // The local entries (this node's, origin NODE_ID), one per flow.
            let mut local: HashMap<u8, CtVal> = HashMap::new();
            for &(f, c, l) in &h.local {
                local.insert(f, val(NODE_ID, c, l, false));
            }
            let local_kv: Vec<_> = local.iter().map(|(f, v)| (key(*f), *v)).collect();
            a.ct_insert_batch(&local_kv).expect("local a");
            b.ct_insert_batch(&local_kv).expect("local b");
            let remote: Vec<(CtKey, CtVal)> = h
                .remote
                .iter()
                .map(|&(f, o, c, l, cl)| (key(f), val(o, c, l, cl)))
                .collect();
            // a: in order, one call; b: shuffled, one entry per call.
            let ca = a.conntrack().apply(&remote).expect("apply a");
            prop_assert_eq!(ca.applied + ca.unchanged + ca.rejected, remote.len() as u64);
            for &i in &h.order {
                b.conntrack().apply(&remote[i..=i]).expect("apply b");
            }
            // Expected per flow: the latest created, lowest origin on a
            // tie, among the local entry and every copy; its copies merged.
            let mut copies: HashMap<u8, Vec<CtVal>> = HashMap::new();
            for (f, v) in &local {
                copies.entry(*f).or_default().push(*v);
            }
            for &(f, o, c, l, cl) in &h.remote {
                copies.entry(f).or_default().push(val(o, c, l, cl));
            }
            for (f, vs) in &copies {
                let win = vs
                    .iter()
                    .map(|v| (v.created_ns, std::cmp::Reverse(v.origin)))
                    .max()
                    .expect("one copy");
                let same: Vec<&CtVal> = vs
                    .iter()
                    .filter(|v| (v.created_ns, std::cmp::Reverse(v.origin)) == win)
                    .collect();
                let got_a = a.ct_get(&key(*f)).expect("get").expect("entry on a");
                let got_b = b.ct_get(&key(*f)).expect("get").expect("entry on b");
                let route =
                    |v: &CtVal| (v.backend_id, v.snat_slot, v.snat_port, v.flags & CT_F_SNAT);
                let name = |v: &CtVal| (v.created_ns, v.origin);
                prop_assert_eq!(
                    (name(&got_a), route(&got_a)),
                    (name(&got_b), route(&got_b)),
                    "flow {}: the nodes disagree",
                    f
                );
                prop_assert_eq!(name(&got_a), (win.0, win.1 .0));
                prop_assert_eq!(route(&got_a), route(same[0]));
                prop_assert_eq!(got_a.flags & CT_F_REMOTE != 0, win.1 .0 != NODE_ID);
                let last = same.iter().map(|v| v.last_seen_ns).max().expect("one");
                prop_assert!(got_a.last_seen_ns >= last && got_b.last_seen_ns >= last);
                if vs.iter().all(|v| route(v) == route(same[0])) {
                    let last = vs.iter().map(|v| v.last_seen_ns).max().expect("one");
                    prop_assert_eq!(got_a, got_b, "flow {}: the nodes disagree", f);
                    prop_assert_eq!(got_a.last_seen_ns, last);
                    let closing = same.iter().any(|v| v.flags & CT_F_CLOSING != 0);
                    prop_assert_eq!(got_a.flags & CT_F_CLOSING != 0, closing);
                }
            }
            prop_assert_eq!(a.ct_dump().expect("dump").len(), copies.len());
            Ok(())
        })
        .expect("merge properties");
}
