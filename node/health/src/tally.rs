//! The leader's side: every node's view of every checked backend, and the
//! tier's verdict on each — down when a quorum of the voters sees it down,
//! up again when a quorum sees it up (after the hold-down) — with the panic
//! guard: a service never loses its last healthy backends to its checks.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use raft_store::cluster::{BackendState, ClusterState, Health};

use holdfast_api::wire::BackendView;

/// A report older than this many check intervals (and at least
/// [`MIN_STALE`]) no longer counts: its node may be dead or cut off.
pub const STALE_INTERVALS: u32 = 3;
pub const MIN_STALE: Duration = Duration::from_secs(3);

/// A change the leader commits, with why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub backend: u32,
    pub service: String,
    pub from: Health,
    pub to: Health,
    pub why: String,
}

#[derive(Default)]
pub struct Tally {
    /// Node → (received, its views by backend id).
    reports: HashMap<u64, (Instant, BTreeMap<u32, BackendView>)>,
    /// When this leader marked a backend down (hold-down).
    marked_down: HashMap<u32, Instant>,
}

impl Tally {
    pub fn record(&mut self, node: u64, views: Vec<BackendView>, now: Instant) {
        self.reports.insert(
            node,
            (now, views.into_iter().map(|v| (v.backend_id, v)).collect()),
        );
    }

    /// Forget everything (this node stopped being the leader).
    pub fn clear(&mut self) {
        self.reports.clear();
        self.marked_down.clear();
    }

    /// Every node's latest view of `backend`, with its age.
    pub fn views_of(&self, backend: u32, now: Instant) -> BTreeMap<u64, (Duration, BackendView)> {
        self.reports
            .iter()
            .filter_map(|(n, (at, vs))| {
                vs.get(&backend)
                    .map(|v| (*n, (now.saturating_duration_since(*at), v.clone())))
            })
            .collect()
    }

    /// The changes the tier agrees on now. `voters`: the Raft voters
    /// (quorum = a majority of them, reports of others do not count).
    pub fn decide(&self, state: &ClusterState, voters: &[u64], now: Instant) -> Vec<Change> {
        let quorum = voters.len() / 2 + 1;
        let mut out = Vec::new();
        for svc in state.services.values() {
            let Some(check) = &svc.health_check else {
                continue;
            };
            let stale = (Duration::from_millis(u64::from(check.interval_ms)) * STALE_INTERVALS)
                .max(MIN_STALE);
            let hold_down = Duration::from_millis(u64::from(check.hold_down_ms));
            // Provisional target per backend: a verdict moves it, no
            // verdict (too few fresh reports) leaves it as it is.
            let mut target: Vec<(u32, BackendState, Health, Health, String)> = Vec::new();
            for b in state.backends_of(&svc.name) {
                let mut down = Vec::new();
                let mut up = 0usize;
                for v in voters {
                    let Some((at, views)) = self.reports.get(v) else {
                        continue;
                    };
                    if now.saturating_duration_since(*at) > stale {
                        continue;
                    }
                    match views.get(&b.id) {
                        Some(view) if view.up => up += 1,
                        Some(view) => down.push(format!("node {v}: {}", view.detail)),
                        None => {}
                    }
                }
                let verdict_down = down.len() >= quorum;
                let verdict_up = up >= quorum;
                let held = self
                    .marked_down
                    .get(&b.id)
                    .is_some_and(|t| now.saturating_duration_since(*t) < hold_down);
                let (to, why) = match b.health {
                    Health::Up | Health::Failing if verdict_down => (
                        Health::Down,
                        format!(
                            "{} of {} voters see it down ({})",
                            down.len(),
                            voters.len(),
                            down.join("; ")
                        ),
                    ),
                    Health::Down | Health::Failing if verdict_up && !held => (
                        Health::Up,
                        format!("{up} of {} voters see it up", voters.len()),
                    ),
                    h => (h, String::new()),
                };
                target.push((b.id, b.state, b.health, to, why));
            }
            let active: Vec<usize> = (0..target.len())
                .filter(|i| target[*i].1 == BackendState::Active)
                .collect();
            let serving = active
                .iter()
                .filter(|i| target[**i].3 != Health::Down)
                .count();
            if !active.is_empty() && serving == 0 {
                // Panic: keep the last healthy set (those not down now).
                for i in &active {
                    let t = &mut target[*i];
                    if t.2 != Health::Down {
                        t.3 = Health::Failing;
                        t.4 = format!(
                            "{}; kept in service: every backend of {} fails",
                            t.4, svc.name
                        );
                    }
                }
            } else {
                // Out of panic: a failing backend is resolved either way.
                for t in target.iter_mut().filter(|t| t.3 == Health::Failing) {
                    t.3 = Health::Down;
                    t.4 = format!(
                        "{} has healthy backends again; this one still fails",
                        svc.name
                    );
                }
            }
            for (id, _, from, to, why) in target {
                if from != to {
                    out.push(Change {
                        backend: id,
                        service: svc.name.clone(),
                        from,
                        to,
                        why,
                    });
                }
            }
        }
        out
    }

    /// Note committed changes (the hold-down starts when marked down).
    pub fn committed(&mut self, changes: &[Change], now: Instant) {
        for c in changes {
            if c.to == Health::Down {
                self.marked_down.insert(c.backend, now);
            } else if c.to == Health::Up {
                self.marked_down.remove(&c.backend);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft_store::{
        cluster::{CheckKind, ForwardingMode, HealthCheck, Proto, Service},
        Command,
    };

    fn state(n: usize) -> ClusterState {
        let mut s = ClusterState::default();
        let r = s.apply(&Command::PutService {
            service: Service {
                name: "dns".into(),
                vip: "10.200.0.53".parse().expect("vip"),
                port: 53,
                proto: Proto::Tcp,
                table_size: 251,
                mode: ForwardingMode::Dsr,
                health_check: Some(HealthCheck {
                    hold_down_ms: 1000,
                    ..HealthCheck::new(CheckKind::Tcp)
                }),
                source_ranges: Vec::new(),
                affinity_timeout_s: None,
            },
        });
        assert!(r.rejected.is_none());
        for i in 0..n {
            s.apply(&Command::AddBackend {
                service: "dns".into(),
                addr: format!("10.1.0.{}", i + 1).parse().expect("addr"),
                port: 53,
                weight: 1,
            });
        }
        s
    }

    fn view(id: u32, up: bool) -> BackendView {
        BackendView {
            backend_id: id,
            service: "dns".into(),
            addr: format!("10.1.0.{}", id + 1).parse().expect("addr"),
            port: 53,
            up,
            detail: if up { "connected" } else { "refused" }.into(),
            latency_ms: 1.0,
            checks: 5,
            transitions: 0,
        }
    }

    fn apply(s: &mut ClusterState, t: &mut Tally, now: Instant) -> Vec<Change> {
        let ch = t.decide(s, &[1, 2, 3], now);
        for c in &ch {
            assert!(s
                .apply(&Command::SetBackendHealth {
                    id: c.backend,
                    health: c.to
                })
                .rejected
                .is_none());
        }
        t.committed(&ch, now);
        ch
    }

    #[test]
    fn quorum_marks_down_one_node_alone_does_not() {
        let mut s = state(3);
        let mut t = Tally::default();
        let now = Instant::now();
        // Node 1 alone cannot reach backend 0.
        t.record(1, vec![view(0, false), view(1, true), view(2, true)], now);
        t.record(2, vec![view(0, true), view(1, true), view(2, true)], now);
        t.record(3, vec![view(0, true), view(1, true), view(2, true)], now);
        assert!(apply(&mut s, &mut t, now).is_empty());
        // Two of three see backend 1 down: marked down.
        t.record(2, vec![view(0, true), view(1, false), view(2, true)], now);
        t.record(3, vec![view(0, true), view(1, false), view(2, true)], now);
        let ch = apply(&mut s, &mut t, now);
        assert_eq!(ch.len(), 1, "{ch:?}");
        assert_eq!((ch[0].backend, ch[0].to), (1, Health::Down));
        assert!(ch[0].why.contains("2 of 3 voters"), "{}", ch[0].why);
        // Back up at once: held down for 1 s, then up.
        for n in [1, 2, 3] {
            t.record(n, vec![view(0, true), view(1, true), view(2, true)], now);
        }
        assert!(apply(&mut s, &mut t, now + Duration::from_millis(500)).is_empty());
        let later = now + Duration::from_millis(1100);
        for n in [1, 2, 3] {
            t.record(n, vec![view(0, true), view(1, true), view(2, true)], later);
        }
        let ch = apply(&mut s, &mut t, later);
        assert_eq!(
            ch.iter().map(|c| (c.backend, c.to)).collect::<Vec<_>>(),
            vec![(1, Health::Up)]
        );
    }

    #[test]
    fn stale_reports_do_not_count() {
        let mut s = state(2);
        let mut t = Tally::default();
        let now = Instant::now();
        for n in [1, 2] {
            t.record(n, vec![view(0, false), view(1, true)], now);
        }
        // Ten seconds later both reports are stale: no verdict.
        assert!(apply(&mut s, &mut t, now + Duration::from_secs(10)).is_empty());
        assert_eq!(s.backends[&0].health, Health::Up);
    }

    #[test]
    fn all_failing_keeps_the_last_healthy_set() {
        let mut s = state(3);
        let mut t = Tally::default();
        let now = Instant::now();
        for n in [1, 2, 3] {
            t.record(n, vec![view(0, false), view(1, true), view(2, true)], now);
        }
        apply(&mut s, &mut t, now);
        assert_eq!(s.backends[&0].health, Health::Down);
        // Now the other two fail as well: they are kept, failing.
        for n in [1, 2, 3] {
            t.record(n, vec![view(0, false), view(1, false), view(2, false)], now);
        }
        apply(&mut s, &mut t, now);
        let h: Vec<Health> = s.backends.values().map(|b| b.health).collect();
        assert_eq!(h, vec![Health::Down, Health::Failing, Health::Failing]);
        assert!(s.health_panic("dns").is_some());
        // Backend 2 recovers: the failing one goes down, panic is over.
        for n in [1, 2, 3] {
            t.record(n, vec![view(0, false), view(1, false), view(2, true)], now);
        }
        apply(&mut s, &mut t, now);
        let h: Vec<Health> = s.backends.values().map(|b| b.health).collect();
        assert_eq!(h, vec![Health::Down, Health::Down, Health::Up]);
        assert!(s.health_panic("dns").is_none());
    }
}
