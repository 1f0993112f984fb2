//! t27: divergent replication across three nodes with real BPF maps and
//! real QUIC. At steady state a new flow is not replicated (its peers'
//! tables would send it to the same backend). A backend added in between
//! is a table change in two phases: every node prepares the next tables
//! and shares the entries they move; the leader activates them once every
//! node reported; every node switches. Afterwards exactly the moved
//! entries are on the peers (with their origin's backend), the others are
//! not, and each node's tables are the new ones.

use std::{
    collections::BTreeSet,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use datapath_ebpf::{
    abi::{CtKey, SvcKey, CT_F_SHARED, IPPROTO_TCP},
    hash::flow_hash,
};
use holdfast_node::testing::{backend, service, Cluster};
use sync::service::SyncMode;

const VIP: &str = "10.200.0.1";

fn sent_by(c: &Cluster, id: u64) -> u64 {
    c.node(id)
        .sync
        .get()
        .expect("sync")
        .status()
        .peers
        .iter()
        .map(|p| p.sent)
        .sum()
}

/// Node `id`'s live table of VIP:80 and its hash seed.
fn table(c: &Cluster, id: u64) -> (Vec<u32>, u32) {
    let dp = c
        .node(id)
        .datapath
        .as_ref()
        .expect("dp")
        .dp
        .lock()
        .expect("dp");
    let key = SvcKey::new(VIP.parse().unwrap(), 80, IPPROTO_TCP);
    (
        dp.table(&key).expect("table").expect("service"),
        dp.options().hash_seed,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t27_divergent_replicates_only_what_a_table_change_moves() {
    let c = Cluster::start_sync_mode(3, SyncMode::Divergent).await;
    c.write(service("web", VIP, 80)).await;
    for a in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
        c.write(backend("web", a, 80)).await;
    }
    c.wait_converged(Duration::from_secs(5)).await;
    for id in 1..=3 {
        c.wait_sync_ready(id).await;
    }
    // The backends came one by one: each a table change, whose grace
    // period (new flows the previous tables send elsewhere are shared)
    // ends on its own.
    let deadline = Instant::now() + Duration::from_secs(10);
    while (1..=3).any(|id| {
        c.node(id)
            .datapath
            .as_ref()
            .expect("dp")
            .dp
            .lock()
            .expect("dp")
            .alt_tables()
            != (0, 0)
    }) {
        assert!(Instant::now() < deadline, "grace periods never ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (before, seed) = table(&c, 1);

    // Steady state: nothing replicated.
    let sent0 = sent_by(&c, 1);
    let flows = c.open_flows(1, VIP, 20_000, 400);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sent_by(&c, 1) - sent0, 0, "no entry sent at steady state");
    for k in &flows {
        let v = c.ct_entry(1, k).expect("own entry");
        assert_eq!(v.flags & CT_F_SHARED, 0, "not shared");
        assert!(
            c.ct_entry(2, k).is_none() && c.ct_entry(3, k).is_none(),
            "not replicated"
        );
    }

    // A backend added: prepared, shared, activated, switched.
    let activations = |c: &Cluster| -> u64 {
        (1..=3)
            .map(|id| c.node(id).tables.activations.load(Ordering::Relaxed))
            .sum()
    };
    let activations0 = activations(&c);
    let t0 = Instant::now();
    c.write(backend("web", "10.0.0.4", 80)).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let active = c.node(1).sm.current().state.tables_active;
        let switched = (1..=3).all(|id| {
            let g = &c.node(id).tables;
            active != 0
                && g.live.load(Ordering::Relaxed) == active
                && g.prepared.load(Ordering::Relaxed) == 0
        });
        if switched && table(&c, 1).0 != before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the tier did not switch to the new tables: active {:x}, (live, prepared) {:x?}",
            c.node(1).sm.current().state.tables_active,
            (1..=3)
                .map(|id| {
                    let g = &c.node(id).tables;
                    (
                        g.live.load(Ordering::Relaxed),
                        g.prepared.load(Ordering::Relaxed),
                    )
                })
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = t0.elapsed();
    let (after, _) = table(&c, 1);
    for id in 2..=3 {
        assert_eq!(
            table(&c, id).0,
            after,
            "node {id} forwards with the same tables"
        );
    }
    let pick = |t: &[u32], k: &CtKey| t[(flow_hash(k, seed) % t.len() as u32) as usize];
    let moved: BTreeSet<CtKey> = flows
        .iter()
        .copied()
        .filter(|k| pick(&after, k) != pick(&before, k))
        .collect();
    assert!(
        !moved.is_empty() && moved.len() < flows.len() / 2,
        "a share of the flows moves: {} of {}",
        moved.len(),
        flows.len()
    );
    for k in &flows {
        let own = c.ct_entry(1, k).expect("own entry");
        assert_eq!(
            own.backend_id,
            pick(&before, k),
            "the flow keeps its backend"
        );
        for id in 2..=3 {
            let peer = c.ct_entry(id, k);
            if moved.contains(k) {
                let v = peer.unwrap_or_else(|| panic!("node {id}: a moved entry is missing"));
                assert_eq!((v.backend_id, v.origin), (own.backend_id, 1), "node {id}");
            } else {
                assert!(
                    peer.is_none(),
                    "node {id}: an entry the tables rebuild was replicated"
                );
            }
        }
    }
    let sent = sent_by(&c, 1) - sent0;
    assert_eq!(
        sent,
        2 * moved.len() as u64,
        "each moved entry to each peer, once"
    );
    for id in 1..=3 {
        let g = &c.node(id).tables;
        assert!(
            g.prepares.load(Ordering::Relaxed) >= 1,
            "node {id} prepared"
        );
        assert!(
            g.switches.load(Ordering::Relaxed) >= 1,
            "node {id} switched"
        );
    }
    assert_eq!(
        activations(&c) - activations0,
        1,
        "one activation, by the leader"
    );
    println!(
        "t27: {} of {} flows moved and replicated; commit to switched on 3 nodes in {:?}",
        moved.len(),
        flows.len(),
        took
    );
}
