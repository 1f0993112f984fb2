//! Table changes under divergent replication, in two phases.
//!
//! With `[sync] mode = "divergent"` a node replicates only the entries a
//! peer's Maglev tables would not rebuild. So before the tier switches to
//! new tables, every node must have shared its entries that the new tables
//! send elsewhere:
//!
//! 1. **Prepare** (every node, when a committed epoch changes its tables):
//!    the datapath takes the next tables as each service's other table
//!    (`Datapath::prepare`; from then on a new entry that they would send
//!    elsewhere is shared at once), the share walk announces the existing
//!    ones, and the node waits until its peers acknowledged them
//!    (`SyncService::share_moved`). It then reports the next tables'
//!    fingerprint as prepared to the leader.
//! 2. **Activate** (the leader): once every live node (a fresh report
//!    within [`STALE`]) reports the same prepared fingerprint, it commits
//!    `ActivateTables`; every node switches on applying it, and keeps the
//!    previous tables as the other table for [`GRACE`] (nodes apply a
//!    commit milliseconds apart).
//!
//! A node that dies during prepare stops reporting; after [`STALE`] the
//! survivors, still on the current tables, activate without it. A new
//! leader collects fresh reports (every [`REPORT_EVERY`]) and decides the
//! same way, so the change resumes. A backend that health checks marked
//! down, or that was removed, switches at once: its flows are lost anyway.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use datapath_ebpf::DatapathConfig;
use holdfast_api::wire::TablesReport;
use raft_store::cluster::{ClusterState, Health};

/// A report older than this does not count: its node may be dead. Longer
/// than a dead node's flows take to reach the survivors (BFD, then the
/// router's update, which BIRD sometimes holds 3 s), so that they arrive
/// while the survivors still forward with the tables those flows began
/// under.
pub const STALE: Duration = Duration::from_secs(6);
/// How often a node reports its tables to the leader (and at once on a change).
pub const REPORT_EVERY: Duration = Duration::from_millis(500);
/// How often the leader looks at the reports (and at once on one).
pub const DECIDE_EVERY: Duration = Duration::from_millis(200);
/// How long the previous tables stay each service's other table after a switch.
pub const GRACE: Duration = Duration::from_secs(2);
/// How long a node's share may take in all (the walk again while the ring
/// is full, the consumer queueing the records).
pub const SHARE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a node waits for its peers' acknowledgements of the moved
/// entries: a peer that takes longer (dead before its connection timed
/// out, or overloaded) gets them later, as a peer that is away does.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(1);

/// FNV-1a, 64 bits: a fingerprint every build computes alike.
fn fnv(h: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *h ^= u64::from(*b);
        *h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
}

/// A service as its Maglev table sees it.
type SvcId = (std::net::IpAddr, u16, u8);

/// What a service's picks depend on: its table's size and active
/// backends with their weights (sorted), and whether client affinity or
/// SNAT decides beside the table.
#[derive(PartialEq, Eq)]
struct TableInputs {
    size: u32,
    backends: Vec<(u32, u32)>,
    affinity: bool,
    snat: bool,
}

fn tables_of(cfg: &DatapathConfig) -> BTreeMap<SvcId, TableInputs> {
    cfg.services
        .iter()
        .map(|s| {
            let (size, backends) = s.table_inputs();
            (
                (s.vip, s.port, s.proto.number()),
                TableInputs {
                    size,
                    backends,
                    affinity: s.affinity_timeout_s.is_some(),
                    snat: s.forwarding == datapath_ebpf::Forwarding::Snat,
                },
            )
        })
        .collect()
}

/// The fingerprint of a config's Maglev tables: each service's key, table
/// size and active backends with their weights, in a canonical order.
/// Never 0.
pub fn fingerprint(cfg: &DatapathConfig) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for ((vip, port, proto), t) in tables_of(cfg) {
        match vip {
            std::net::IpAddr::V4(a) => {
                fnv(&mut h, &[4]);
                fnv(&mut h, &a.octets());
            }
            std::net::IpAddr::V6(a) => {
                fnv(&mut h, &[6]);
                fnv(&mut h, &a.octets());
            }
        }
        fnv(&mut h, &port.to_le_bytes());
        fnv(&mut h, &[proto]);
        fnv(&mut h, &t.size.to_le_bytes());
        fnv(&mut h, &[u8::from(t.affinity), u8::from(t.snat)]);
        fnv(&mut h, &(t.backends.len() as u32).to_le_bytes());
        for (id, w) in &t.backends {
            fnv(&mut h, &id.to_le_bytes());
            fnv(&mut h, &w.to_le_bytes());
        }
    }
    h.max(1)
}

/// Whether going from `live` to `next` only takes backends out that are
/// gone from the config or marked down by health checks: such a change
/// switches at once (their flows are lost anyway, and new flows must stop
/// reaching them now).
pub fn only_lost_backends(
    live: &DatapathConfig,
    next: &DatapathConfig,
    state: &ClusterState,
) -> bool {
    let old = tables_of(live);
    tables_of(next).iter().all(|(k, t)| match old.get(k) {
        None => true, // a new service: nothing to share
        Some(o) => {
            (o.size, o.affinity, o.snat) == (t.size, t.affinity, t.snat)
                && t.backends.iter().all(|b| o.backends.contains(b))
                && o.backends
                    .iter()
                    .filter(|b| !t.backends.contains(b))
                    .all(|(id, _)| {
                        state
                            .backends
                            .get(id)
                            .is_none_or(|b| b.health == Health::Down)
                    })
        }
    })
}

/// This node's side and, on the leader, everyone's reports.
#[derive(Default)]
pub struct TablesGate {
    /// Fingerprint of the tables the datapath forwards with (0: none yet).
    pub live: AtomicU64,
    /// Fingerprint of the next tables prepared and shared (0: none).
    pub prepared: AtomicU64,
    /// The epoch whose table change this node is preparing or has
    /// prepared: it forwards consistently with the tier meanwhile, so its
    /// readiness counts it as applied.
    pub pending_epoch: AtomicU64,
    /// Woken when `live` or `prepared` changes (the report goes at once).
    pub changed: tokio::sync::Notify,
    /// Woken when a report arrives (the leader decides at once).
    pub reported: tokio::sync::Notify,
    reports: Mutex<HashMap<u64, (Instant, TablesReport)>>,
    /// Table changes prepared here, and entries their share walks announced.
    pub prepares: AtomicU64,
    pub shared: AtomicU64,
    /// Switches made here (each one's grace ends only if it is still the
    /// latest); of them, those made at once (lost backends).
    pub switches: std::sync::Arc<AtomicU64>,
    pub immediate: AtomicU64,
    /// Activations this node committed as the leader.
    pub activations: AtomicU64,
}

impl TablesGate {
    pub fn report(&self, node_id: u64) -> TablesReport {
        TablesReport {
            node_id,
            live: self.live.load(Ordering::Relaxed),
            prepared: match self.prepared.load(Ordering::Relaxed) {
                0 => None,
                f => Some(f),
            },
        }
    }

    pub fn record(&self, r: TablesReport, now: Instant) {
        self.reports
            .lock()
            .expect("reports")
            .insert(r.node_id, (now, r));
        self.reported.notify_one();
    }

    /// Forget the reports (this node stopped being the leader).
    pub fn clear(&self) {
        self.reports.lock().expect("reports").clear();
    }

    /// The fingerprint to activate now, if any: the prepared tables of the
    /// fresh reports, when every fresh report has prepared them (or, after
    /// a leader change, already forwards with them) and they are not the
    /// active ones already.
    pub fn decide(&self, active: u64, now: Instant) -> Option<u64> {
        let reports = self.reports.lock().expect("reports");
        let fresh: Vec<&TablesReport> = reports
            .values()
            .filter(|(at, _)| now.saturating_duration_since(*at) <= STALE)
            .map(|(_, r)| r)
            .collect();
        let target = fresh.iter().find_map(|r| r.prepared)?;
        if target == active {
            return None;
        }
        fresh
            .iter()
            .all(|r| r.prepared == Some(target) || r.live == target)
            .then_some(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datapath_ebpf::BackendState as DpState;

    fn rep(node_id: u64, live: u64, prepared: Option<u64>) -> TablesReport {
        TablesReport {
            node_id,
            live,
            prepared,
        }
    }

    #[test]
    fn activates_only_when_every_live_node_prepared_the_same_tables() {
        let g = TablesGate::default();
        let t0 = Instant::now();
        g.record(rep(1, 10, Some(20)), t0);
        g.record(rep(2, 10, None), t0);
        assert_eq!(g.decide(10, t0), None, "node 2 has not prepared");
        g.record(rep(2, 10, Some(30)), t0);
        assert_eq!(g.decide(10, t0), None, "different tables");
        g.record(rep(2, 10, Some(20)), t0);
        assert_eq!(g.decide(10, t0), Some(20));
        assert_eq!(g.decide(20, t0), None, "active already");
        // A node that stopped reporting (dead) no longer holds it back.
        g.record(rep(3, 10, None), t0);
        assert_eq!(g.decide(10, t0), None);
        let later = t0 + STALE + Duration::from_millis(1);
        g.record(rep(1, 10, Some(20)), later);
        g.record(rep(2, 10, Some(20)), later);
        assert_eq!(g.decide(10, later), Some(20));
        // After a leader change: a node already switched counts as ready.
        let g = TablesGate::default();
        g.record(rep(1, 20, None), t0);
        g.record(rep(2, 10, Some(20)), t0);
        assert_eq!(g.decide(10, t0), Some(20));
    }

    #[test]
    fn fingerprint_follows_what_tables_are_built_from() {
        use datapath_ebpf::{BackendSpec, Proto, ServiceSpec};
        let svc = |bs: &[(u32, DpState)]| ServiceSpec {
            vip: "10.0.0.1".parse().unwrap(),
            port: 80,
            proto: Proto::Tcp,
            table_size: 251,
            backends: bs
                .iter()
                .map(|(id, st)| BackendSpec {
                    id: *id,
                    addr: "10.1.0.1".parse().unwrap(),
                    weight: 1,
                    state: *st,
                    port: 0,
                })
                .collect(),
            forwarding: Default::default(),
            source_ranges: Vec::new(),
            affinity_timeout_s: None,
        };
        let cfg = |s: ServiceSpec| DatapathConfig {
            epoch: 1,
            services: vec![s],
            snat: Default::default(),
        };
        let a = fingerprint(&cfg(svc(&[(1, DpState::Active), (2, DpState::Active)])));
        let b = fingerprint(&cfg(svc(&[(2, DpState::Active), (1, DpState::Active)])));
        let c = fingerprint(&cfg(svc(&[(1, DpState::Active), (2, DpState::Draining)])));
        assert_eq!(a, b, "order does not matter");
        assert_ne!(a, c, "a draining backend is out of the table");
        let mut d = cfg(svc(&[(1, DpState::Active), (2, DpState::Active)]));
        d.epoch = 9;
        assert_eq!(fingerprint(&d), a, "the epoch is not part of the tables");
    }
}
