//! Programming the datapath: every committed epoch mapped to a
//! [`DatapathConfig`] and applied, the conntrack count, and the datapath
//! health check that readiness (and so BGP) depends on.

use std::{
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use datapath_ebpf::{
    BackendSpec, BackendState as DpState, DatapathConfig, Forwarding, Proto as DpProto,
    ServiceSpec, SnatConfig, SnatSlot, SourceRange,
};
use raft_store::cluster::{BackendState, ClusterState, ForwardingMode, Health, OnDown, Proto};
use tracing::{error, info, warn, Instrument};

use crate::node::{DatapathHandle, Node};

/// How often the conntrack entries are counted.
pub const CT_COUNT_EVERY: Duration = Duration::from_secs(2);
/// How long a failed epoch waits before it is tried again.
pub const APPLY_RETRY: Duration = Duration::from_secs(1);
/// How often the datapath health check runs.
pub const HEALTH_EVERY: Duration = Duration::from_millis(500);

/// Map the replicated config to what the datapath is programmed with.
///
/// A backend the tier marked down gets no new flows: it is programmed as
/// draining (its flows keep their entries: `on_down = keep`) or left out
/// (its flows re-pick on their next packet: `repick`). When every active
/// backend of a service is down the service is in panic and all of them
/// stay in ([`ClusterState::health_panic`]).
///
/// Every node's SNAT address goes in (a survivor forwards a dead node's
/// flows with its address); `node` is this node, whose slot new SNAT flows
/// bind from.
pub fn to_datapath(state: &ClusterState, node: u64) -> DatapathConfig {
    let snat = SnatConfig {
        slots: state
            .snat
            .slots
            .values()
            .map(|slot| {
                let (v4, v6) = state.snat.addrs_of_slot(*slot);
                SnatSlot {
                    slot: *slot,
                    v4,
                    v6,
                }
            })
            .filter(|s| s.v4.is_some() || s.v6.is_some())
            .collect(),
        own: state
            .snat
            .slots
            .get(&node)
            .copied()
            .filter(|s| state.snat.addrs_of_slot(*s) != (None, None)),
    };
    DatapathConfig {
        epoch: state.epoch,
        snat,
        services: state
            .services
            .values()
            .filter_map(|s| {
                // (Validated when committed, so each range parses; were one
                // not to, the service is left out rather than opened to
                // every client.)
                let source_ranges: Vec<SourceRange> = s
                    .source_ranges
                    .iter()
                    .filter_map(|r| raft_store::cluster::parse_cidr(r).ok())
                    .filter_map(|(net, len)| SourceRange::new(net, len).ok())
                    .collect();
                if source_ranges.len() != s.source_ranges.len() {
                    error!(service = %s.name, "a source range does not parse: service left out");
                    return None;
                }
                let on_down = s
                    .health_check
                    .as_ref()
                    .map(|c| c.on_down(s.proto == Proto::Udp));
                // Every active backend down: all of them stay in (fail
                // open); `Failing` backends (the last healthy set) are
                // in service anyway.
                let mut active = state
                    .backends_of(&s.name)
                    .filter(|b| b.state == BackendState::Active)
                    .peekable();
                let fail_open = active.peek().is_some() && active.all(|b| b.health == Health::Down);
                Some(ServiceSpec {
                    vip: s.vip,
                    port: s.port,
                    proto: match s.proto {
                        Proto::Tcp => DpProto::Tcp,
                        Proto::Udp => DpProto::Udp,
                    },
                    table_size: s.table_size,
                    forwarding: match s.mode {
                        ForwardingMode::Dsr => Forwarding::Dsr,
                        ForwardingMode::Snat => Forwarding::Snat,
                    },
                    backends: state
                        .backends_of(&s.name)
                        .filter_map(|b| {
                            let down = b.health == Health::Down && !fail_open;
                            if down && on_down == Some(OnDown::Repick) {
                                return None;
                            }
                            Some(BackendSpec {
                                id: b.id,
                                addr: b.addr,
                                // The port it listens on (DSR to another
                                // port than the service's is translated
                                // by the backend's decap agent).
                                port: b.port,
                                weight: b.weight,
                                state: match b.state {
                                    BackendState::Active if !down => DpState::Active,
                                    _ => DpState::Draining,
                                },
                            })
                        })
                        .collect(),
                    source_ranges,
                    affinity_timeout_s: s.affinity_timeout_s,
                })
            })
            .collect(),
    }
}

/// What is wrong with forwarding from this node, if anything.
fn health_problem(
    iface: Option<String>,
    backends: std::collections::BTreeSet<std::net::IpAddr>,
) -> Option<String> {
    if let Some(i) = &iface {
        match holdfast_bgp::link_state(i) {
            Ok((true, true)) => {}
            Ok((up, carrier)) => return Some(format!("interface {i}: up {up}, carrier {carrier}")),
            Err(e) => return Some(format!("interface {i}: {e}")),
        }
    }
    // Per address family: a node that reaches its IPv6 backends but none
    // of its IPv4 ones would black-hole the IPv4 VIPs it announces.
    for (family, v4) in [("IPv4", true), ("IPv6", false)] {
        let of_family: Vec<_> = backends.iter().filter(|a| a.is_ipv4() == v4).collect();
        if of_family.is_empty() {
            continue;
        }
        let mut last_err = None;
        let reachable = of_family.iter().any(|a| {
            let local: std::net::SocketAddr = match a {
                std::net::IpAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
                std::net::IpAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
            };
            match std::net::UdpSocket::bind(local).and_then(|s| s.connect((**a, 9))) {
                Ok(()) => true,
                Err(e) => {
                    last_err = Some(format!("{a}: {e}"));
                    false
                }
            }
        });
        if !reachable {
            return Some(format!(
                "no route to any of the {} {family} backends ({})",
                of_family.len(),
                last_err.unwrap_or_default()
            ));
        }
    }
    None
}

impl Node {
    /// Refresh [`Node::conntrack_entries`].
    pub(crate) async fn count_loop(self: Arc<Self>) {
        let Some(h) = self.datapath.clone() else {
            return;
        };
        loop {
            let h = h.clone();
            if let Ok(Ok(n)) = tokio::task::spawn_blocking(move || {
                h.dp.lock().expect("dp").ct_dump().map(|v| v.len())
            })
            .await
            {
                self.conntrack_entries.store(n as u64, Ordering::Relaxed);
            }
            tokio::time::sleep(CT_COUNT_EVERY).await;
        }
    }

    /// The datapath health check: the attached interface must be up with
    /// carrier, and at least one backend of the config must be routable
    /// from here (a UDP connect: a route lookup, no packet sent). A node
    /// failing it would black-hole every flow ECMP gives it, so it is
    /// unready and BGP withdraws it. (One unroutable backend does not
    /// withdraw the node: that fault is usually shared by every node.)
    pub(crate) async fn health_loop(self: Arc<Self>) {
        let Some(h) = self.datapath.clone() else {
            return;
        };
        loop {
            let iface = h.interface.clone();
            let addrs: std::collections::BTreeSet<std::net::IpAddr> = self
                .sm
                .current()
                .state
                .backends
                .values()
                .map(|b| b.addr)
                .collect();
            let problem = tokio::task::spawn_blocking(move || health_problem(iface, addrs))
                .await
                .unwrap_or_else(|e| Some(format!("health check task: {e}")));
            {
                let mut cur = self.health_error.lock().expect("health");
                if *cur != problem {
                    match &problem {
                        Some(p) => warn!(problem = %p, "datapath health check failed"),
                        None => info!("datapath health check passes"),
                    }
                    *cur = problem;
                }
            }
            tokio::time::sleep(HEALTH_EVERY).await;
        }
    }

    /// Program every new committed epoch into the datapath.
    pub(crate) async fn apply_loop(self: Arc<Self>) {
        let mut rx = self.sm.subscribe();
        loop {
            // A failed epoch is tried again after a while (a table change
            // whose moved entries could not be shared, a refused config).
            let mut retry = false;
            let data = rx.borrow_and_update().clone();
            let epoch = data.state.epoch;
            let prev = self.applied_epoch.load(Ordering::Relaxed);
            if epoch != prev || epoch == 0 {
                // Continue the traces of the requests that led to this epoch.
                let span = tracing::info_span!("datapath_apply", node = self.id(), epoch);
                crate::telemetry::continue_traces(
                    &span,
                    data.traces
                        .iter()
                        .filter(|(e, _)| *e > prev && *e <= epoch)
                        .map(|(_, tp)| tp.as_str()),
                );
                let t0 = Instant::now();
                let ok = async {
                    match &self.datapath {
                        Some(h) => {
                            let cfg = to_datapath(&data.state, self.id());
                            self.program(h, cfg, &data.state).await
                        }
                        None => Programmed::Yes,
                    }
                }
                .instrument(span)
                .await;
                match ok {
                    Programmed::Yes => {
                        *self.datapath_moved_at.lock().expect("moved") = Instant::now();
                        self.metrics.datapath_apply.observe(t0.elapsed());
                        self.applied_epoch.store(epoch, Ordering::Relaxed);
                        self.applied_tx.send_replace(epoch);
                    }
                    // Prepared: the switch comes with the leader's
                    // activation (a later epoch).
                    Programmed::Prepared => {
                        *self.datapath_moved_at.lock().expect("moved") = Instant::now();
                    }
                    Programmed::Failed => {
                        self.metrics
                            .datapath_apply_errors
                            .fetch_add(1, Ordering::Relaxed);
                        retry = true;
                    }
                }
            }
            if retry {
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(APPLY_RETRY) => {}
                }
            } else if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Program `cfg`: at once, or under divergent replication a table
    /// change in two phases (see `tables`): prepared and shared here,
    /// switched once the leader activated these tables.
    async fn program(
        &self,
        h: &Arc<DatapathHandle>,
        cfg: DatapathConfig,
        state: &ClusterState,
    ) -> Programmed {
        let epoch = cfg.epoch;
        let divergent = h.dp.lock().expect("dp").options().divergent;
        if !divergent {
            return self.switch(h, cfg, Switch::Plain).await;
        }
        let fp = crate::tables::fingerprint(&cfg);
        let live = self.tables.live.load(Ordering::Relaxed);
        if fp == live || state.tables_active == fp {
            // No table change (or the tier switched to these tables).
            return self.switch(h, cfg, Switch::Divergent).await;
        }
        if self.tables.prepared.load(Ordering::Relaxed) == fp {
            // Waiting for the activation (an epoch that changes nothing
            // else: the prepared tables still stand for it).
            self.tables.pending_epoch.store(epoch, Ordering::Relaxed);
            return Programmed::Prepared;
        }
        // Prepare: the datapath takes the next tables as the other tables.
        let dp = h.clone();
        let c = cfg.clone();
        let (report, immediate) = match tokio::task::spawn_blocking(move || {
            let mut d = dp.dp.lock().expect("dp");
            let live_cfg = d.applied_config().cloned();
            d.prepare(&c).map(|r| (r, live_cfg))
        })
        .await
        {
            Ok(Ok((r, live_cfg))) => {
                let immediate = r.services == 0
                    || live_cfg.is_some_and(|l| crate::tables::only_lost_backends(&l, &cfg, state));
                (r, immediate)
            }
            Ok(Err(e)) => {
                error!(epoch, error = %e, "datapath refused config epoch");
                return Programmed::Failed;
            }
            Err(e) => {
                error!(epoch, error = %e, "datapath prepare task failed");
                return Programmed::Failed;
            }
        };
        if immediate {
            let how = if report.services > 0 {
                Switch::Lost
            } else {
                Switch::Divergent
            };
            return self.switch(h, cfg, how).await;
        }
        self.tables.prepares.fetch_add(1, Ordering::Relaxed);
        self.tables.pending_epoch.store(epoch, Ordering::Relaxed);
        let t0 = Instant::now();
        if let Some(svc) = self.sync.get() {
            match svc
                .share_moved(crate::tables::SHARE_TIMEOUT, crate::tables::ACK_TIMEOUT)
                .await
            {
                Ok(o) => {
                    if o.late_peers > 0 {
                        warn!(
                            epoch,
                            late_peers = o.late_peers,
                            "table change: peers did not acknowledge the moved entries in time; they stay queued for them"
                        );
                    }
                    self.tables.shared.fetch_add(o.shared, Ordering::Relaxed);
                    info!(
                        epoch,
                        services = report.services,
                        shared = o.shared,
                        visited = o.visited,
                        acked_peers = o.acked_peers,
                        away_peers = o.away_peers,
                        late_peers = o.late_peers,
                        took_ms = t0.elapsed().as_millis() as u64,
                        "table change prepared: moved entries shared"
                    );
                }
                Err(e) => {
                    // Not reported as prepared: the next epoch (or the
                    // next report round) tries again.
                    warn!(epoch, error = %e, "table change: sharing the moved entries failed");
                    return Programmed::Failed;
                }
            }
        }
        self.tables.prepared.store(fp, Ordering::Relaxed);
        self.tables.changed.notify_one();
        Programmed::Prepared
    }

    /// Switch to `cfg` (apply it); under divergent replication the tables
    /// before stay the other tables for the grace period.
    async fn switch(
        &self,
        h: &Arc<DatapathHandle>,
        cfg: DatapathConfig,
        how: Switch,
    ) -> Programmed {
        let epoch = cfg.epoch;
        let fp = crate::tables::fingerprint(&cfg);
        let dp = h.clone();
        match tokio::task::spawn_blocking(move || dp.dp.lock().expect("dp").apply(&cfg)).await {
            Ok(Ok(r)) => {
                let before = self.tables.live.swap(fp, Ordering::Relaxed);
                if how != Switch::Plain && before != fp {
                    self.tables.prepared.store(0, Ordering::Relaxed);
                    self.tables.changed.notify_one();
                    if r.tables_written > 0 && before != 0 {
                        let switch = self.tables.switches.fetch_add(1, Ordering::Relaxed) + 1;
                        if how == Switch::Lost {
                            self.tables.immediate.fetch_add(1, Ordering::Relaxed);
                        }
                        // The grace ends GRACE after the latest switch: an
                        // earlier switch's timer must not cut a later one's.
                        let (dp, switches) = (h.clone(), self.tables.switches.clone());
                        tokio::spawn(async move {
                            tokio::time::sleep(crate::tables::GRACE).await;
                            if switches.load(Ordering::Relaxed) != switch {
                                return;
                            }
                            let _ = tokio::task::spawn_blocking(move || {
                                dp.dp.lock().expect("dp").end_grace()
                            })
                            .await;
                        });
                    }
                }
                Programmed::Yes
            }
            Ok(Err(e)) => {
                error!(epoch, error = %e, "datapath refused config epoch");
                Programmed::Failed
            }
            Err(e) => {
                error!(epoch, error = %e, "datapath apply task failed");
                Programmed::Failed
            }
        }
    }

    /// Divergent replication: report this node's tables to the leader,
    /// every `REPORT_EVERY` and at once when they change.
    pub(crate) async fn tables_report_loop(self: Arc<Self>) {
        let mut shutdown = self.shutdown_signal();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(crate::tables::REPORT_EVERY) => {}
                _ = self.tables.changed.notified() => {}
                _ = shutdown.changed() => return,
            }
            let report = self.tables.report(self.id());
            if self.role() == "leader" {
                self.tables.record(report, Instant::now());
                continue;
            }
            let Some((leader, admin)) = self.leader() else {
                continue;
            };
            if admin.is_empty() {
                continue;
            }
            if let Err(e) = self
                .client()
                .for_node(leader)
                .post_async::<_, serde_json::Value>(
                    &admin,
                    "/tables/report",
                    &report,
                    Duration::from_millis(800),
                )
                .await
            {
                warn!(leader, error = %e, "tables report to the leader failed");
            }
        }
    }

    /// Divergent replication, on the leader: commit the switch to tables
    /// every live node has prepared.
    pub(crate) async fn tables_decide_loop(self: Arc<Self>) {
        let mut shutdown = self.shutdown_signal();
        let mut was_leader = false;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(crate::tables::DECIDE_EVERY) => {}
                _ = self.tables.reported.notified() => {}
                _ = shutdown.changed() => return,
            }
            if self.role() != "leader" {
                if was_leader {
                    self.tables.clear();
                }
                was_leader = false;
                continue;
            }
            was_leader = true;
            let active = self.sm.current().state.tables_active;
            let Some(fingerprint) = self.tables.decide(active, Instant::now()) else {
                continue;
            };
            match self
                .write(raft_store::Request {
                    id: None,
                    command: raft_store::Command::ActivateTables { fingerprint },
                    trace: None,
                })
                .await
            {
                Ok(r) if r.rejected.is_none() => {
                    self.tables.activations.fetch_add(1, Ordering::Relaxed);
                    info!(
                        fingerprint,
                        epoch = r.epoch,
                        "tables activated: every live node prepared them"
                    );
                }
                Ok(r) => warn!(fingerprint, reason = ?r.rejected, "table activation rejected"),
                Err(e) => warn!(fingerprint, error = %e, "table activation not committed"),
            }
        }
    }
}

/// How [`Node::switch`] switches.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Switch {
    /// `all` mode: an apply, nothing more.
    Plain,
    /// Divergent: the previous tables stay the other tables for the grace.
    Divergent,
    /// Divergent, at once: only backends that are down or gone left.
    Lost,
}

/// What programming an epoch did.
enum Programmed {
    /// Applied: the datapath forwards with it.
    Yes,
    /// A table change prepared; the switch waits for the leader.
    Prepared,
    Failed,
}
