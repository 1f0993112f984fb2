//! Active backend health checks that the whole tier agrees on.
//!
//! Every node checks every backend of every service that has a
//! `health_check` ([`probe`]), from its own address to the backend's, and
//! keeps its view with rise/fall counts. It reports its views to the Raft
//! leader every second and at once when one changes (`POST
//! /health/report`). The leader ([`tally`]) marks a backend down in the
//! replicated config when a quorum of the voters sees it down, and up again
//! when a quorum sees it up (after the hold-down), so every datapath
//! switches at the same epoch; a node alone that cannot reach a backend
//! only shows in its view (metrics, `clusterctl backends`, `GET /health`).

pub mod probe;
pub mod tally;
pub mod vip;

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use raft_store::{
    cluster::{ClusterState, Health, HealthCheck},
    Command, Request,
};
use tracing::{info, warn};

use holdfast_api::{
    client::Client,
    wire::{BackendView, HealthReport, HealthRow, HealthTable, NodeView},
};
use holdfast_metrics::{Histogram, Writer};
use raft_store::{state_machine::SmData, Response};

/// What the health checks need from the node they run in: who it is, the
/// config it holds, who leads and votes, a way to reach the leader and to
/// commit verdicts, and when to stop. The daemon implements it; the checks
/// never see the node itself.
pub trait Host: Send + Sync + 'static {
    /// This node's id.
    fn id(&self) -> u64;
    /// The config this node has applied.
    fn config(&self) -> Arc<SmData>;
    /// This node's health state (its views; the tally when it leads).
    fn health(&self) -> &HealthState;
    /// Whether this node is the Raft leader now.
    fn is_leader(&self) -> bool;
    /// The leader's id and admin address, if known.
    fn leader(&self) -> Option<(u64, String)>;
    /// The Raft voters this node knows.
    fn voters(&self) -> Vec<u64>;
    /// The admin API client this node calls its peers with.
    fn client(&self) -> Client;
    /// Turns true when the node shuts down.
    fn shutdown_signal(&self) -> tokio::sync::watch::Receiver<bool>;
    /// Commit a request (on the leader); the error as text.
    fn commit(
        &self,
        req: Request,
    ) -> impl std::future::Future<Output = Result<Response, String>> + Send;
}

/// How often a node reports its views when nothing changes.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);
/// How often the leader re-decides without a new report.
pub const DECIDE_EVERY: Duration = Duration::from_millis(250);

/// What one node knows about health: its own views, and on the leader the
/// tally of everybody's.
#[derive(Default)]
pub struct HealthState {
    views: Mutex<BTreeMap<u32, BackendView>>,
    tally: Mutex<tally::Tally>,
    /// A local view changed: report now.
    changed: tokio::sync::Notify,
    /// A report arrived (on the leader): decide now.
    reported: tokio::sync::Notify,
    pub check_latency: Histogram,
    pub checks_failed: AtomicU64,
    pub checks_passed: AtomicU64,
    /// Verdicts this node committed as the leader.
    pub verdicts_committed: AtomicU64,
    pub reports_failed: AtomicU64,
}

/// What a checker task of one backend checks.
#[derive(Clone, PartialEq)]
struct Target {
    service: String,
    vip: IpAddr,
    addr: IpAddr,
    port: u16,
    check: HealthCheck,
}

impl HealthState {
    /// This node's views, by backend id.
    pub fn views(&self) -> Vec<BackendView> {
        self.views
            .lock()
            .expect("views")
            .values()
            .cloned()
            .collect()
    }

    /// A node's report reached the leader.
    pub fn record(&self, report: HealthReport) {
        self.tally
            .lock()
            .expect("tally")
            .record(report.node_id, report.views, Instant::now());
        self.reported.notify_one();
    }

    /// The leader's table: verdicts and views.
    pub fn table(&self, leader: u64, state: &ClusterState) -> HealthTable {
        let now = Instant::now();
        let tally = self.tally.lock().expect("tally");
        let mut backends = Vec::new();
        let mut panic = BTreeMap::new();
        for svc in state.services.values() {
            let Some(check) = &svc.health_check else {
                continue;
            };
            if let Some(why) = state.health_panic(&svc.name) {
                panic.insert(svc.name.clone(), why);
            }
            let stale = (Duration::from_millis(u64::from(check.interval_ms))
                * tally::STALE_INTERVALS)
                .max(tally::MIN_STALE);
            for b in state.backends_of(&svc.name) {
                let views: Vec<NodeView> = tally
                    .views_of(b.id, now)
                    .into_iter()
                    .map(|(node, (age, v))| NodeView {
                        node_id: node,
                        up: v.up,
                        detail: v.detail,
                        latency_ms: v.latency_ms,
                        age_ms: age.as_millis() as u64,
                        fresh: age <= stale,
                    })
                    .collect();
                let verdict_up = b.health != Health::Down;
                let disagree = views
                    .iter()
                    .filter(|v| v.fresh && v.up != verdict_up)
                    .map(|v| v.node_id)
                    .collect();
                backends.push(HealthRow {
                    backend_id: b.id,
                    service: b.service.clone(),
                    addr: b.addr,
                    health: b.health,
                    views,
                    disagree,
                });
            }
        }
        HealthTable {
            leader,
            backends,
            panic,
        }
    }

    /// Metrics of this node's checks (its own views) and of the tier's
    /// verdicts in the config it holds.
    pub fn render(&self, w: &mut Writer<'_>, state: &ClusterState) {
        let views = self.views();
        w.family(
            "holdfast_backend_check_up",
            "1 if this node's checks see the backend passing (after rise/fall), 0 if failing",
            "gauge",
        );
        for v in &views {
            w.sample(
                "holdfast_backend_check_up",
                &[
                    ("service", v.service.clone()),
                    ("backend", v.backend_id.to_string()),
                    ("addr", v.addr.to_string()),
                ],
                if v.up { 1.0 } else { 0.0 },
            );
        }
        w.family(
            "holdfast_backend_check_transitions_total",
            "Up/down transitions of this node's view of the backend",
            "counter",
        );
        for v in &views {
            w.sample(
                "holdfast_backend_check_transitions_total",
                &[
                    ("service", v.service.clone()),
                    ("backend", v.backend_id.to_string()),
                ],
                v.transitions as f64,
            );
        }
        w.family(
            "holdfast_backend_health",
            "The tier's verdict in the config: 1 up, 0 down, 0.5 failing but kept (service in panic)",
            "gauge",
        );
        for svc in state.services.values().filter(|s| s.health_check.is_some()) {
            for b in state.backends_of(&svc.name) {
                w.sample(
                    "holdfast_backend_health",
                    &[
                        ("service", b.service.clone()),
                        ("backend", b.id.to_string()),
                        ("addr", b.addr.to_string()),
                    ],
                    match b.health {
                        Health::Up => 1.0,
                        Health::Down => 0.0,
                        Health::Failing => 0.5,
                    },
                );
            }
        }
        w.family(
            "holdfast_service_health_panic",
            "1 if every backend of the service fails its checks and the last healthy set is kept (alert)",
            "gauge",
        );
        for svc in state.services.values().filter(|s| s.health_check.is_some()) {
            w.sample(
                "holdfast_service_health_panic",
                &[("service", svc.name.clone())],
                if state.health_panic(&svc.name).is_some() {
                    1.0
                } else {
                    0.0
                },
            );
        }
        w.counter(
            "holdfast_health_checks_total",
            "Checks run by this node that passed",
            &[("result", "passed".into())],
            self.checks_passed.load(Ordering::Relaxed),
        );
        w.sample(
            "holdfast_health_checks_total",
            &[("result", "failed".into())],
            self.checks_failed.load(Ordering::Relaxed) as f64,
        );
        w.counter(
            "holdfast_health_verdicts_total",
            "Backend health changes this node committed as the leader",
            &[],
            self.verdicts_committed.load(Ordering::Relaxed),
        );
        w.counter(
            "holdfast_health_reports_failed_total",
            "Reports of this node's views that did not reach the leader",
            &[],
            self.reports_failed.load(Ordering::Relaxed),
        );
        w.histogram(
            "holdfast_health_check_seconds",
            "Duration of one check (timeouts count as the timeout)",
            &self.check_latency,
        );
    }
}

/// Start the checkers, the reporter and the leader's decision loop.
pub fn spawn<H: Host>(node: &Arc<H>) -> Vec<tokio::task::JoinHandle<()>> {
    vec![
        tokio::spawn(check_loop(node.clone())),
        tokio::spawn(report_loop(node.clone())),
        tokio::spawn(decide_loop(node.clone())),
    ]
}

/// Keep one checker task per checked backend, following the config.
async fn check_loop<H: Host>(node: Arc<H>) {
    let mut tasks: HashMap<u32, (Target, tokio::task::JoinHandle<()>)> = HashMap::new();
    let mut epoch = u64::MAX;
    let mut shutdown = node.shutdown_signal();
    loop {
        let cur = node.config();
        if cur.state.epoch != epoch {
            epoch = cur.state.epoch;
            let mut want: HashMap<u32, Target> = HashMap::new();
            for svc in cur.state.services.values() {
                let Some(check) = &svc.health_check else {
                    continue;
                };
                for b in cur.state.backends_of(&svc.name) {
                    want.insert(
                        b.id,
                        Target {
                            service: svc.name.clone(),
                            vip: svc.vip,
                            addr: b.addr,
                            port: check.port.unwrap_or(b.port),
                            check: check.clone(),
                        },
                    );
                }
            }
            tasks.retain(|id, (t, h)| {
                let keep = want.get(id) == Some(t);
                if !keep {
                    h.abort();
                    node.health().views.lock().expect("views").remove(id);
                }
                keep
            });
            for (id, t) in want {
                if let std::collections::hash_map::Entry::Vacant(e) = tasks.entry(id) {
                    let h = tokio::spawn(check_backend(node.clone(), id, t.clone()));
                    e.insert((t, h));
                }
            }
            node.health().changed.notify_one();
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = shutdown.changed() => break,
        }
    }
    for (_, (_, h)) in tasks {
        h.abort();
    }
}

/// Check one backend every interval; rise/fall decide this node's view.
async fn check_backend<H: Host>(node: Arc<H>, id: u32, t: Target) {
    let interval = Duration::from_millis(u64::from(t.check.interval_ms));
    // Spread the checks of many backends over the interval.
    let phase = Duration::from_millis(
        (u64::from(id).wrapping_mul(2_654_435_761) ^ node.id().wrapping_mul(40_503))
            % u64::from(t.check.interval_ms),
    );
    tokio::time::sleep(phase / 4).await;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut ok_streak, mut fail_streak) = (0u32, 0u32);
    let mut up = true;
    loop {
        tick.tick().await;
        let o = probe::probe(&t.check, t.addr, t.port, t.vip).await;
        node.health().check_latency.observe(o.latency);
        let mut changed = false;
        if o.ok {
            node.health().checks_passed.fetch_add(1, Ordering::Relaxed);
            ok_streak += 1;
            fail_streak = 0;
            if !up && ok_streak >= t.check.rise {
                up = true;
                changed = true;
            }
        } else {
            node.health().checks_failed.fetch_add(1, Ordering::Relaxed);
            fail_streak += 1;
            ok_streak = 0;
            if up && fail_streak >= t.check.fall {
                up = false;
                changed = true;
            }
        }
        if changed {
            info!(
                backend = id,
                service = %t.service,
                addr = %t.addr,
                port = t.port,
                up,
                detail = %o.detail,
                "backend check changed this node's view"
            );
        }
        {
            let mut views = node.health().views.lock().expect("views");
            let v = views.entry(id).or_insert_with(|| BackendView {
                backend_id: id,
                service: t.service.clone(),
                addr: t.addr,
                port: t.port,
                up,
                detail: String::new(),
                latency_ms: 0.0,
                checks: 0,
                transitions: 0,
            });
            v.up = up;
            v.detail = o.detail;
            v.latency_ms = o.latency.as_secs_f64() * 1e3;
            v.checks += 1;
            if changed {
                v.transitions += 1;
            }
        }
        if changed {
            node.health().changed.notify_one();
        }
    }
}

/// Send this node's views to the leader: every second, and at once when
/// one changes.
async fn report_loop<H: Host>(node: Arc<H>) {
    let mut shutdown = node.shutdown_signal();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(REPORT_EVERY) => {}
            _ = node.health().changed.notified() => {}
            _ = shutdown.changed() => return,
        }
        let views = node.health().views();
        let checked = node
            .config()
            .state
            .services
            .values()
            .any(|s| s.health_check.is_some());
        if views.is_empty() && !checked {
            continue;
        }
        let report = HealthReport {
            node_id: node.id(),
            views,
        };
        if node.is_leader() {
            node.health().record(report);
            continue;
        }
        let Some((leader, admin)) = node.leader() else {
            node.health().reports_failed.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        if admin.is_empty() {
            continue;
        }
        let client = node.client().for_node(leader);
        if let Err(e) = client
            .post_async::<_, serde_json::Value>(
                &admin,
                "/health/report",
                &report,
                Duration::from_millis(800),
            )
            .await
        {
            node.health().reports_failed.fetch_add(1, Ordering::Relaxed);
            warn!(leader, error = %e, "health report to the leader failed");
        }
    }
}

/// On the leader: commit the verdicts the reports agree on.
async fn decide_loop<H: Host>(node: Arc<H>) {
    let mut shutdown = node.shutdown_signal();
    let mut was_leader = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(DECIDE_EVERY) => {}
            _ = node.health().reported.notified() => {}
            _ = shutdown.changed() => return,
        }
        let leader = node.is_leader();
        if !leader {
            if was_leader {
                node.health().tally.lock().expect("tally").clear();
            }
            was_leader = false;
            continue;
        }
        was_leader = true;
        let cur = node.config();
        if !cur
            .state
            .services
            .values()
            .any(|s| s.health_check.is_some())
        {
            continue;
        }
        let voters = node.voters();
        let changes =
            node.health()
                .tally
                .lock()
                .expect("tally")
                .decide(&cur.state, &voters, Instant::now());
        if changes.is_empty() {
            continue;
        }
        let commands = changes
            .iter()
            .map(|c| Command::SetBackendHealth {
                id: c.backend,
                health: c.to,
            })
            .collect();
        match node
            .commit(Request {
                id: None,
                command: Command::Batch { commands },
                trace: None,
            })
            .await
        {
            Ok(r) if r.rejected.is_none() => {
                node.health()
                    .tally
                    .lock()
                    .expect("tally")
                    .committed(&changes, Instant::now());
                node.health()
                    .verdicts_committed
                    .fetch_add(changes.len() as u64, Ordering::Relaxed);
                for c in &changes {
                    info!(
                        backend = c.backend,
                        service = %c.service,
                        from = %c.from,
                        to = %c.to,
                        epoch = r.epoch,
                        why = %c.why,
                        "backend health committed"
                    );
                }
            }
            Ok(r) => warn!(reason = ?r.rejected, "backend health change rejected"),
            Err(e) => warn!(error = %e, "committing backend health"),
        }
    }
}
