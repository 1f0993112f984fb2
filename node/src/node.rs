//! The node: Raft over QUIC, the config state machine, the datapath it
//! programs from every committed epoch, and cluster membership operations.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context, Result};
use datapath_ebpf::{
    AttachMode, BackendSpec, BackendState as DpState, Datapath, DatapathConfig, Proto as DpProto,
    ServiceSpec,
};
use openraft::{error::ClientWriteError, BasicNode, ChangeMembers, ServerState};
use raft_store::{
    cluster::{BackendState, ClusterState, Health, Member, OnDown, Proto},
    types::Raft,
    Command, Request, Response, StateMachineStore,
};
use tracing::{error, info, instrument, warn, Instrument};

use crate::{
    client::Client,
    config::{NodeConfig, XdpMode},
    credentials::Credentials,
    metrics::Metrics,
    raft_net::{handler, HeartbeatClock, RaftNet},
    tls::Identity,
    transport::Transport,
};

/// How often the conntrack entries are counted.
pub const CT_COUNT_EVERY: Duration = Duration::from_secs(2);
/// How often the datapath health check runs.
pub const HEALTH_EVERY: Duration = Duration::from_millis(500);

/// How long one membership change may take before the client is told to retry.
pub const MEMBERSHIP_CHANGE_TIMEOUT: Duration = Duration::from_secs(3);

/// How long one join or registration call through a peer may take before
/// it is retried.
pub const JOIN_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a joining node may take to catch up as a learner.
pub const JOIN_CATCH_UP: Duration = Duration::from_secs(8);

/// The datapath and what is known about it.
pub struct DatapathHandle {
    pub dp: Arc<Mutex<Datapath>>,
    pub interface: Option<String>,
}

/// Replication membership from Raft: the Raft membership (voters and
/// learners) and the registered members may replicate; peers are the
/// registered members with their QUIC addresses.
struct RaftMembership {
    id: u64,
    raft: Raft,
    sm: StateMachineStore,
}

impl crate::replication::Membership for RaftMembership {
    fn is_member(&self, peer: u64) -> bool {
        let m = self.raft.metrics().borrow().membership_config.clone();
        m.nodes().any(|(id, _)| *id == peer) || self.sm.current().state.members.contains_key(&peer)
    }

    fn peers(&self) -> std::collections::HashMap<u64, std::net::SocketAddr> {
        self.sm
            .current()
            .state
            .members
            .values()
            .filter(|m| m.node_id != self.id)
            .filter_map(|m| m.raft_addr.parse().ok().map(|a| (m.node_id, a)))
            .collect()
    }

    fn registered(&self) -> bool {
        self.sm.current().state.members.contains_key(&self.id)
    }

    fn changed(&self) -> crate::transport::BoxFuture<()> {
        let mut rx = self.sm.subscribe();
        Box::pin(async move {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        })
    }
}

pub struct Node {
    pub cfg: NodeConfig,
    pub raft: Raft,
    pub sm: StateMachineStore,
    pub transport: Arc<Transport>,
    pub datapath: Option<Arc<DatapathHandle>>,
    pub metrics: Arc<Metrics>,
    pub heartbeat: Arc<HeartbeatClock>,
    /// Config epoch last programmed into the datapath (or, with the
    /// datapath disabled, last seen applied by the state machine).
    pub applied_epoch: Arc<AtomicU64>,
    pub applied_tx: tokio::sync::watch::Sender<u64>,
    /// Conntrack entries, counted every [`CT_COUNT_EVERY`] by a background
    /// task: counting dumps the whole map, which must not happen per request.
    pub conntrack_entries: AtomicU64,
    /// Why the datapath health check fails (None: healthy), checked every
    /// [`HEALTH_EVERY`]: the interface is up with carrier, and forwarding
    /// is not failing for lack of routes to the backends.
    pub health_error: Mutex<Option<String>>,
    /// Backend health checks: this node's views, the leader's tally.
    pub health: crate::health::HealthState,
    /// VIP routes announced over BGP right now.
    pub bgp_announced: AtomicBool,
    /// Conntrack replication (datapath and `sync.enabled`).
    pub sync: std::sync::OnceLock<Arc<crate::replication::SyncService>>,
    shutting_down: AtomicBool,
    shutdown_tx: tokio::sync::watch::Sender<bool>,
    /// The TLS identity in use (admin API, client calls, QUIC), rotated
    /// from the files without a restart.
    pub credentials: Credentials,
    /// Operator drain: withdraw the VIPs while staying in the cluster.
    pub draining: AtomicBool,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// Map the replicated config to what the datapath is programmed with.
///
/// A backend the tier marked down gets no new flows: it is programmed as
/// draining (its flows keep their entries: `on_down = keep`) or left out
/// (its flows re-pick on their next packet: `repick`). When every active
/// backend of a service is down the service is in panic and all of them
/// stay in ([`ClusterState::health_panic`]).
pub fn to_datapath(state: &ClusterState) -> DatapathConfig {
    DatapathConfig {
        epoch: state.epoch,
        services: state
            .services
            .values()
            .map(|s| {
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
                ServiceSpec {
                    vip: s.vip,
                    port: s.port,
                    proto: match s.proto {
                        Proto::Tcp => DpProto::Tcp,
                        Proto::Udp => DpProto::Udp,
                    },
                    table_size: s.table_size,
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
                                weight: b.weight,
                                state: match b.state {
                                    BackendState::Active if !down => DpState::Active,
                                    _ => DpState::Draining,
                                },
                            })
                        })
                        .collect(),
                }
            })
            .collect(),
    }
}

/// Outcome of a write, for the admin API.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("not the leader; leader is {leader:?}")]
    NotLeader { leader: Option<(u64, String)> },
    #[error("no leader is known right now; retry")]
    NoLeader,
    #[error("{0}")]
    Raft(String),
}

/// What is wrong with forwarding from this node, if anything.
fn health_problem(
    iface: Option<String>,
    backends: std::collections::BTreeSet<std::net::IpAddr>,
) -> Option<String> {
    if let Some(i) = &iface {
        match crate::bgp::link_state(i) {
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
    /// Start a node: storage, QUIC endpoint, Raft, datapath, apply loop,
    /// bootstrap or join.
    pub async fn start(cfg: NodeConfig) -> Result<Arc<Self>> {
        crate::tls::install_crypto_provider();
        cfg.validate()?;
        let identity = Identity::load(&cfg.tls.ca_cert, &cfg.tls.cert, &cfg.tls.key)?;
        let credentials = Credentials::new(cfg.node_id, &identity)
            .with_context(|| format!("certificate {}", cfg.tls.cert.display()))?;
        let (log, sm) = raft_store::open(&cfg.raft_dir())
            .await
            .map_err(|e| anyhow!("opening raft storage in {}: {e}", cfg.raft_dir().display()))?;
        let transport = Transport::bind(cfg.raft_addr, &identity)?;
        // Peers whose certificate the cluster revoked are refused (and
        // dropped when the revocation commits: `revocation_loop`).
        let revoked_sm = sm.clone();
        transport.set_peer_check(Some(Arc::new(
            move |c: &crate::tls::CertInfo| match revoked_sm
                .current()
                .state
                .revoked
                .contains_key(&c.serial)
            {
                true => Err(format!("serial {} is revoked", c.serial)),
                false => Ok(()),
            },
        )));
        let metrics = Arc::new(Metrics::default());
        let rc = openraft::Config {
            cluster_name: "holdfast".into(),
            heartbeat_interval: cfg.raft.heartbeat_ms,
            election_timeout_min: cfg.raft.election_timeout_min_ms,
            election_timeout_max: cfg.raft.election_timeout_max_ms,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(cfg.raft.snapshot_logs),
            max_in_snapshot_log_to_keep: cfg.raft.max_in_snapshot_log_to_keep,
            install_snapshot_timeout: 2000,
            ..Default::default()
        }
        .validate()
        .context("raft settings")?;
        let raft = Raft::new(
            cfg.node_id,
            Arc::new(rc),
            RaftNet {
                transport: transport.clone(),
            },
            log,
            sm.clone(),
        )
        .await
        .context("starting raft")?;
        let heartbeat = Arc::new(HeartbeatClock::default());
        let server = transport.serve(handler(
            raft.clone(),
            heartbeat.clone(),
            metrics.raft_rpcs_refused.clone(),
        ));

        let datapath = if cfg.datapath.enabled {
            let opts = cfg.datapath.options(cfg.node_id);
            let iface = cfg.datapath.interface.clone();
            let mode = match cfg.datapath.mode {
                XdpMode::Native => AttachMode::Native,
                XdpMode::Generic => AttachMode::Generic,
            };
            let handle = tokio::task::spawn_blocking(move || -> Result<DatapathHandle> {
                let mut dp = Datapath::load(opts)?;
                if let Some(i) = &iface {
                    dp.attach(i, mode)?;
                }
                Ok(DatapathHandle {
                    dp: Arc::new(Mutex::new(dp)),
                    interface: iface,
                })
            })
            .await??;
            Some(Arc::new(handle))
        } else {
            None
        };

        let (applied_tx, _) = tokio::sync::watch::channel(0);
        let node = Arc::new(Self {
            cfg,
            raft,
            sm,
            transport,
            datapath,
            metrics,
            heartbeat,
            applied_epoch: Arc::new(AtomicU64::new(0)),
            applied_tx,
            sync: std::sync::OnceLock::new(),
            bgp_announced: AtomicBool::new(false),
            conntrack_entries: AtomicU64::new(0),
            health_error: Mutex::new(None),
            health: Default::default(),
            shutting_down: AtomicBool::new(false),
            shutdown_tx: tokio::sync::watch::channel(false).0,
            credentials,
            draining: AtomicBool::new(false),
            tasks: Mutex::new(vec![server]),
        });
        let apply = tokio::spawn(node.clone().apply_loop());
        node.tasks.lock().expect("tasks").push(apply);
        if node.datapath.is_some() {
            let count = tokio::spawn(node.clone().count_loop());
            node.tasks.lock().expect("tasks").push(count);
            let health = tokio::spawn(node.clone().health_loop());
            node.tasks.lock().expect("tasks").push(health);
        }
        if let (Some(dp), true) = (&node.datapath, node.cfg.sync.enabled) {
            let svc = crate::replication::SyncService::start(
                node.cfg.node_id,
                node.cfg.sync.clone(),
                dp.dp.clone(),
                node.transport.clone(),
                Arc::new(RaftMembership {
                    id: node.cfg.node_id,
                    raft: node.raft.clone(),
                    sm: node.sm.clone(),
                }),
            )?;
            let _ = node.sync.set(svc);
        }

        if node.cfg.bootstrap && !node.raft.is_initialized().await? {
            let mut members = BTreeMap::new();
            members.insert(
                node.cfg.node_id,
                BasicNode {
                    addr: node.cfg.raft_addr.to_string(),
                },
            );
            node.raft.initialize(members).await.context("bootstrap")?;
            info!(node = node.cfg.node_id, "bootstrapped a new cluster");
            let seed = node.cfg.seed_commands();
            if !seed.is_empty() {
                let n = node.clone();
                tokio::spawn(async move { n.seed(seed).await });
            }
        }
        if node.cfg.bgp.enabled {
            let b = tokio::spawn(node.clone().bgp_loop());
            node.tasks.lock().expect("tasks").push(b);
        }
        if node.cfg.kubernetes.enabled {
            let k = tokio::spawn(crate::k8s::leader_loop(node.clone()));
            node.tasks.lock().expect("tasks").push(k);
        }
        node.tasks
            .lock()
            .expect("tasks")
            .extend(crate::health::spawn(&node));
        let reg = tokio::spawn(node.clone().register_loop());
        node.tasks.lock().expect("tasks").push(reg);
        let rev = tokio::spawn(node.clone().revocation_loop());
        node.tasks.lock().expect("tasks").push(rev);
        if node.cfg.tls.reload_interval_ms > 0 {
            let r = tokio::spawn(node.clone().reload_loop());
            node.tasks.lock().expect("tasks").push(r);
        }
        for (addr, tls, what) in [
            (node.cfg.admin_addr, true, "the admin API"),
            (node.cfg.metrics_addr, false, "the metrics listener"),
        ] {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {what} on {addr}"))?;
            let api = tokio::spawn(crate::api::serve(node.clone(), listener, tls));
            node.tasks.lock().expect("tasks").push(api);
        }
        info!(
            node = node.id(),
            raft = %node.cfg.raft_addr,
            admin = %node.cfg.admin_addr,
            metrics = %node.cfg.metrics_addr,
            certificate = %node.credentials.cert().subject(),
            serial = %node.credentials.cert().serial,
            "node started"
        );
        Ok(node)
    }

    /// Commit the config file's `[[service]]` entries into a cluster this
    /// node just bootstrapped (once: the request id makes retries safe).
    async fn seed(self: Arc<Self>, commands: Vec<raft_store::Command>) {
        let req = Request {
            id: Some(format!("seed-{}", self.id())),
            command: raft_store::Command::Batch { commands },
            trace: None,
        };
        for _ in 0..600 {
            match self.write(req.clone()).await {
                Ok(r) => {
                    match r.rejected {
                        None => info!(epoch = r.epoch, "seed services committed"),
                        Some(why) => error!(reason = %why, "seed services refused"),
                    }
                    return;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        error!("seed services: no leader within 60 s");
    }

    /// Turns true when the node shuts down.
    pub fn shutdown_signal(&self) -> tokio::sync::watch::Receiver<bool> {
        self.shutdown_tx.subscribe()
    }

    pub fn id(&self) -> u64 {
        self.cfg.node_id
    }

    /// The client this node calls other nodes' admin APIs with (its node
    /// certificate, as rotated).
    pub fn client(&self) -> Client {
        self.credentials.client()
    }

    /// Whether the cluster revoked this certificate serial.
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.sm.current().state.revoked.contains_key(serial)
    }

    /// Resolves once the node is shutting down.
    pub async fn shut_down(&self) {
        let mut rx = self.shutdown_tx.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Pick up rotated certificate files (content checked every
    /// `tls.reload_interval_ms`): valid ones replace the identity of the
    /// admin API, of this node's calls and of the QUIC endpoint for every
    /// new connection; invalid ones are reported and ignored.
    async fn reload_loop(self: Arc<Self>) {
        let files = crate::auth::CertFiles {
            ca: self.cfg.tls.ca_cert.clone(),
            cert: self.cfg.tls.cert.clone(),
            key: self.cfg.tls.key.clone(),
        };
        let mut watcher = {
            let f = files.clone();
            match tokio::task::spawn_blocking(move || crate::auth::Watcher::new(f)).await {
                Ok(w) => w,
                Err(e) => {
                    error!(error = %e, "certificate watcher");
                    return;
                }
            }
        };
        let every = Duration::from_millis(self.cfg.tls.reload_interval_ms);
        loop {
            tokio::time::sleep(every).await;
            let (w, change) = match tokio::task::spawn_blocking(move || {
                let c = watcher.poll();
                (watcher, c)
            })
            .await
            {
                Ok(x) => x,
                Err(e) => {
                    error!(error = %e, "certificate watcher");
                    return;
                }
            };
            watcher = w;
            match change {
                crate::auth::Change::None => {}
                crate::auth::Change::Valid(id) => {
                    match self.credentials.rotate(&id, &self.transport) {
                        Ok(cert) => info!(
                            subject = %cert.subject(),
                            serial = %cert.serial,
                            not_after = cert.not_after,
                            "certificate rotated"
                        ),
                        Err(e) => {
                            self.credentials
                                .reload_errors
                                .fetch_add(1, Ordering::Relaxed);
                            warn!(error = %format!("{e:#}"), "rotated certificate refused; keeping the current one");
                        }
                    }
                }
                crate::auth::Change::Invalid(e) => {
                    self.credentials
                        .reload_errors
                        .fetch_add(1, Ordering::Relaxed);
                    warn!(error = %format!("{e:#}"), "certificate files changed but do not form a valid identity; keeping the current one");
                }
            }
        }
    }

    /// When the revocation list changes, close the QUIC connections of
    /// peers it now names (admin API calls check it per connection).
    async fn revocation_loop(self: Arc<Self>) {
        let mut rx = self.sm.subscribe();
        let mut last = rx.borrow_and_update().state.revoked.clone();
        while rx.changed().await.is_ok() {
            let now = rx.borrow_and_update().state.revoked.clone();
            if now != last {
                let closed = self.transport.enforce_peer_check();
                info!(revoked = now.len(), closed, "revocation list changed");
                last = now;
            }
        }
    }

    fn member(&self) -> Member {
        Member {
            node_id: self.cfg.node_id,
            raft_addr: self.cfg.raft_addr.to_string(),
            admin_addr: self.cfg.admin_addr.to_string(),
            bgp_next_hop: self.cfg.bgp_next_hop,
        }
    }

    /// Refresh [`Node::conntrack_entries`].
    async fn count_loop(self: Arc<Self>) {
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
    async fn health_loop(self: Arc<Self>) {
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
    async fn apply_loop(self: Arc<Self>) {
        let mut rx = self.sm.subscribe();
        loop {
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
                            let h = h.clone();
                            let cfg = to_datapath(&data.state);
                            match tokio::task::spawn_blocking(move || {
                                h.dp.lock().expect("dp").apply(&cfg)
                            })
                            .await
                            {
                                Ok(Ok(_)) => true,
                                Ok(Err(e)) => {
                                    error!(epoch, error = %e, "datapath refused config epoch");
                                    false
                                }
                                Err(e) => {
                                    error!(epoch, error = %e, "datapath apply task failed");
                                    false
                                }
                            }
                        }
                        None => true,
                    }
                }
                .instrument(span)
                .await;
                if ok {
                    self.metrics.datapath_apply.observe(t0.elapsed());
                    self.applied_epoch.store(epoch, Ordering::Relaxed);
                    self.applied_tx.send_replace(epoch);
                } else {
                    self.metrics
                        .datapath_apply_errors
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    fn announcer(&self) -> crate::bgp::Bird {
        crate::bgp::Bird {
            ctl: self.cfg.bgp.bird_ctl.clone(),
            protocols: self.cfg.bgp.protocols.clone(),
        }
    }

    /// What announcing depends on, now.
    pub fn readiness(&self) -> crate::bgp::Readiness {
        let attached = match &self.datapath {
            Some(h) => h.interface.is_some() && !h.dp.lock().expect("dp").attached().is_empty(),
            None => false,
        };
        crate::bgp::Readiness {
            shutting_down: self.is_shutting_down(),
            draining: self.draining.load(Ordering::Relaxed),
            leader_known: self.raft.metrics().borrow().current_leader.is_some(),
            config_epoch: self.sm.current().state.epoch,
            applied_epoch: self.applied_epoch.load(Ordering::Relaxed),
            datapath_attached: attached,
            sync_ready: self.sync.get().is_none_or(|s| s.is_ready()),
            healthy: self.health_error.lock().expect("health").is_none(),
        }
    }

    /// Announce when ready, withdraw when not (every 200 ms).
    async fn bgp_loop(self: Arc<Self>) {
        use crate::bgp::Announcer;
        // Start from what BIRD really does: after an agent restart it may
        // still announce a datapath that never stopped forwarding.
        let bird = self.announcer();
        let initially = tokio::task::spawn_blocking(move || bird.is_announced())
            .await
            .ok()
            .and_then(|r| r.ok())
            .unwrap_or(false);
        let adopted = self
            .datapath
            .as_ref()
            .is_some_and(|h| h.dp.lock().expect("dp").adopted());
        let grace_until = (initially && adopted)
            .then(|| Instant::now() + Duration::from_millis(self.cfg.bgp.restart_grace_ms));
        if initially {
            info!(
                adopted,
                grace_ms = grace_until.map(|_| self.cfg.bgp.restart_grace_ms),
                "BIRD already announces the VIPs"
            );
        }
        self.bgp_announced.store(initially, Ordering::Relaxed);
        let mut was_ready = false;
        loop {
            let mut want = self.readiness().decide();
            was_ready |= want.is_ok();
            // Restart grace: the adopted datapath forwards with its pinned
            // config and conntrack; keep it announced until the node is
            // ready (or the grace ends), unless it is shutting down.
            if let (Err(why), Some(until)) = (&want, grace_until) {
                if !was_ready && *why != "shutting down" && Instant::now() < until {
                    want = Ok(());
                }
            }
            let have = self.bgp_announced.load(Ordering::Relaxed);
            let bird = self.announcer();
            let res = match (&want, have) {
                (Ok(()), false) => tokio::task::spawn_blocking(move || bird.announce())
                    .await
                    .map(|r| r.map(|_| true)),
                (Err(_), true) => tokio::task::spawn_blocking(move || bird.withdraw())
                    .await
                    .map(|r| r.map(|_| false)),
                _ => Ok(Ok(have)),
            };
            match res {
                Ok(Ok(now)) => {
                    if now != have {
                        info!(announced = now, reason = ?want.err(), "BGP announcement changed");
                    }
                    self.bgp_announced.store(now, Ordering::Relaxed);
                }
                Ok(Err(e)) => warn!(error = %e, "BGP: BIRD command failed"),
                Err(e) => warn!(error = %e, "BGP task failed"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Make sure this node is a voter and registered as a member: join
    /// through `join` addresses, or (as bootstrap leader) register itself.
    async fn register_loop(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        // One request id per process: retries apply once, a later restart
        // (maybe with new addresses) registers again.
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        loop {
            if self.shutting_down.load(Ordering::Relaxed) {
                return;
            }
            let state = self.sm.current();
            let registered = state.state.members.contains_key(&self.id());
            let voter = state
                .last_membership
                .membership()
                .voter_ids()
                .any(|v| v == self.id());
            if registered && voter {
                return;
            }
            let res = if voter || self.cfg.join.is_empty() {
                // A voter (the bootstrap node, or a joiner whose join call
                // failed after it was made a voter): register through the
                // leader — locally if this node leads, else at its admin API.
                let req = Request {
                    id: Some(format!("register-{}-{nonce}", self.id())),
                    command: Command::PutMember {
                        member: self.member(),
                    },
                    trace: None,
                };
                match self.write(req.clone()).await {
                    Ok(_) => Ok(()),
                    Err(WriteError::NotLeader {
                        leader: Some((leader, admin)),
                    }) if !admin.is_empty() => self
                        .client()
                        .for_node(leader)
                        .post_async::<_, Response>(&admin, "/command", &req, JOIN_CALL_TIMEOUT)
                        .await
                        .map(|_| ())
                        .map_err(|e| anyhow!("registering through the leader: {e}")),
                    Err(e) => Err(anyhow!("{e}")),
                }
            } else {
                self.join_through_peers().await
            };
            match res {
                Ok(()) => {
                    backoff = Duration::from_millis(100);
                    // The leader answers after its own commit; wait (bounded)
                    // for this node's log to show it before asking again.
                    let t0 = Instant::now();
                    while t0.elapsed() < Duration::from_secs(2)
                        && !self.shutting_down.load(Ordering::Relaxed)
                    {
                        let s = self.sm.current();
                        if s.state.members.contains_key(&self.id())
                            && s.last_membership
                                .membership()
                                .voter_ids()
                                .any(|v| v == self.id())
                        {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                Err(e) => {
                    info!(error = %e, "not yet a registered voter; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    async fn join_through_peers(&self) -> Result<()> {
        let member = self.member();
        let mut last = anyhow!("no join address");
        for addr in &self.cfg.join {
            match self
                .client()
                .post_async::<_, serde_json::Value>(
                    &addr.to_string(),
                    "/cluster/join",
                    &member,
                    JOIN_CALL_TIMEOUT,
                )
                .await
            {
                Ok(_) => {
                    info!(via = %addr, "joined the cluster");
                    return Ok(());
                }
                Err(e) => last = anyhow!("join via {addr}: {e}"),
            }
        }
        Err(last)
    }

    /// The leader's id and admin address, if known.
    pub fn leader(&self) -> Option<(u64, String)> {
        let id = self.raft.metrics().borrow().current_leader?;
        let admin = self
            .sm
            .current()
            .state
            .members
            .get(&id)
            .map(|m| m.admin_addr.clone())
            .unwrap_or_default();
        Some((id, admin))
    }

    /// Submit a request on this node (must be the leader).
    #[instrument(name = "raft_write", skip_all, fields(node = self.id()))]
    pub async fn write(&self, mut req: Request) -> Result<Response, WriteError> {
        if req.trace.is_none() {
            req.trace = crate::telemetry::traceparent();
        }
        let t0 = Instant::now();
        match self.raft.client_write(req).await {
            Ok(r) => Ok(self.written(t0, r)),
            Err(openraft::error::RaftError::APIError(e)) => Err(self.write_error(e)),
            Err(e) => Err(WriteError::Raft(e.to_string())),
        }
    }

    /// Several writes, pipelined: all are handed to Raft at once, in this
    /// order (so they are appended, committed and applied in this order),
    /// and replication of one does not wait for the commit of the one
    /// before. One result per request, in order.
    #[instrument(name = "raft_write", skip_all, fields(node = self.id(), batches = reqs.len()))]
    pub async fn write_pipelined(&self, reqs: Vec<Request>) -> Vec<Result<Response, WriteError>> {
        let t0 = Instant::now();
        let trace = crate::telemetry::traceparent();
        let mut pending = Vec::with_capacity(reqs.len());
        for mut req in reqs {
            if req.trace.is_none() {
                req.trace = trace.clone();
            }
            pending.push(self.raft.client_write_ff(req).await);
        }
        let mut out = Vec::with_capacity(pending.len());
        for p in pending {
            out.push(match p {
                Err(fatal) => Err(WriteError::Raft(fatal.to_string())),
                Ok(rx) => match rx.await {
                    Ok(Ok(r)) => Ok(self.written(t0, r)),
                    Ok(Err(e)) => Err(self.write_error(e)),
                    Err(_) => Err(WriteError::Raft("Raft stopped before answering".into())),
                },
            });
        }
        out
    }

    fn written(
        &self,
        t0: Instant,
        r: openraft::raft::ClientWriteResponse<raft_store::TypeConfig>,
    ) -> Response {
        self.metrics.commit_latency.observe(t0.elapsed());
        if r.data.rejected.is_some() {
            self.metrics
                .commands_rejected
                .fetch_add(1, Ordering::Relaxed);
        }
        r.data
    }

    fn write_error(&self, e: ClientWriteError<u64, BasicNode>) -> WriteError {
        match e {
            ClientWriteError::ForwardToLeader(f) => match f.leader_id {
                Some(_) => WriteError::NotLeader {
                    leader: self.leader(),
                },
                None => WriteError::NoLeader,
            },
            e => WriteError::Raft(e.to_string()),
        }
    }

    /// Leader side of a join: learner first (caught up), then voter, then
    /// registered as a member.
    #[instrument(skip_all, fields(joining = m.node_id))]
    pub async fn add_member(&self, m: Member) -> Result<Response, WriteError> {
        let node = BasicNode {
            addr: m.raft_addr.clone(),
        };
        let is_voter = self.voters().contains(&m.node_id);
        if !is_voter {
            self.raft
                .add_learner(m.node_id, node, false)
                .await
                .map_err(|e| map_membership_err(self, e))?;
            // Promote only a learner that has really replicated our log: one
            // that cannot be reached (or refuses our certificate) never
            // matches, and is taken out again.
            if let Err(e) = self.wait_caught_up(m.node_id, JOIN_CATCH_UP).await {
                let _ = self
                    .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([m.node_id])))
                    .await;
                return Err(e);
            }
            self.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([m.node_id])))
                .await?;
            info!(node = m.node_id, "added voter");
        } else {
            // A retried join (the joiner had not yet applied our answer):
            // the same member again changes nothing and takes no new epoch.
            let cur = self.sm.current();
            if cur.state.members.get(&m.node_id) == Some(&m) {
                return Ok(Response {
                    epoch: cur.state.epoch,
                    rejected: None,
                    backend_ids: Vec::new(),
                });
            }
        }
        self.write(Command::PutMember { member: m }.into()).await
    }

    /// A bounded membership change. openraft 0.9 may never answer a leader
    /// that removes itself (it steps down around the commit); the caller
    /// retries, and the retry on the new leader finds the change done.
    async fn change_membership(
        &self,
        change: ChangeMembers<u64, BasicNode>,
    ) -> Result<(), WriteError> {
        match tokio::time::timeout(
            MEMBERSHIP_CHANGE_TIMEOUT,
            self.raft.change_membership(change, false),
        )
        .await
        {
            Ok(r) => r.map(|_| ()).map_err(|e| map_membership_err(self, e)),
            Err(_) => Err(WriteError::NotLeader {
                leader: self.leader(),
            }),
        }
    }

    /// Wait until the leader's replication to `id` has matched its log.
    async fn wait_caught_up(&self, id: u64, timeout: Duration) -> Result<(), WriteError> {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.raft.metrics().borrow().clone();
            let last = m.last_log_index.unwrap_or(0);
            let matched = m
                .replication
                .as_ref()
                .and_then(|r| r.get(&id).cloned().flatten())
                .map(|l| l.index);
            if matched.is_some_and(|x| x + 1 >= last) {
                return Ok(());
            }
            if m.state != ServerState::Leader {
                return Err(WriteError::NotLeader {
                    leader: self.leader(),
                });
            }
            if Instant::now() > deadline {
                return Err(WriteError::Raft(format!(
                    "node {id} did not catch up within {timeout:?} (unreachable, or its \
                     certificate is not from this cluster's CA); matched {matched:?} of {last}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Leader side of leave/remove: out of the voters, then unregistered.
    #[instrument(skip_all, fields(leaving = node_id))]
    pub async fn remove_member(&self, node_id: u64) -> Result<Response, WriteError> {
        let membership = self.raft.metrics().borrow().membership_config.clone();
        let known = membership.nodes().any(|(id, _)| *id == node_id);
        let voter = membership.voter_ids().any(|id| id == node_id);
        if known {
            let ids = BTreeSet::from([node_id]);
            // retain=false: a removed voter does not stay on as a learner.
            self.change_membership(if voter {
                ChangeMembers::RemoveVoters(ids)
            } else {
                ChangeMembers::RemoveNodes(ids)
            })
            .await?;
            info!(node = node_id, voter, "removed from the membership");
        }
        let state = self.sm.current();
        if !known && !state.state.members.contains_key(&node_id) {
            // Idempotent: a retried removal (its first answer lost) finds
            // the node gone already.
            info!(node = node_id, "not a member (already removed)");
            return Ok(Response {
                epoch: state.state.epoch,
                rejected: None,
                backend_ids: vec![],
            });
        }
        let resp = self.write(Command::RemoveMember { node_id }.into()).await?;
        Ok(resp)
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    /// Stop: optionally leave the cluster first, then Raft, the endpoint and
    /// the datapath (kept pinned or detached per config).
    pub async fn shutdown(&self, leave: bool) {
        if self.shutting_down.swap(true, Ordering::Relaxed) {
            return;
        }
        self.shutdown_tx.send_replace(true);
        // Stop attracting traffic first.
        if self.cfg.bgp.enabled && self.bgp_announced.swap(false, Ordering::Relaxed) {
            use crate::bgp::Announcer;
            let bird = self.announcer();
            match tokio::task::spawn_blocking(move || bird.withdraw()).await {
                Ok(Ok(())) => info!("BGP: VIPs withdrawn"),
                Ok(Err(e)) => warn!(error = %e, "BGP: withdraw failed"),
                Err(e) => warn!(error = %e, "BGP: withdraw task failed"),
            }
        }
        if leave {
            if let Err(e) = self.leave().await {
                warn!(error = %e, "could not leave the cluster cleanly");
            }
        }
        if let Err(e) = self.raft.shutdown().await {
            warn!(error = %e, "raft shutdown");
        }
        if let Some(s) = self.sync.get() {
            s.stop().await;
        }
        self.transport.close();
        let tasks: Vec<_> = self.tasks.lock().expect("tasks").drain(..).collect();
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        self.transport.wait_closed().await;
        if let Some(h) = &self.datapath {
            if !self.cfg.datapath.keep_on_shutdown {
                if let Some(i) = &h.interface {
                    if let Err(e) = h.dp.lock().expect("dp").detach(i) {
                        warn!(error = %e, "detaching the datapath");
                    }
                }
            }
        }
        info!(node = self.id(), "stopped");
    }

    /// Leave the cluster gracefully: ask the leader to remove this node,
    /// retrying through leader changes for up to 10 s.
    async fn leave(&self) -> Result<()> {
        if self.voters() == [self.id()] {
            info!("last voter of the cluster: stopping without leaving");
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let res = match self.leader() {
                Some((id, _)) if id == self.id() => self
                    .remove_member(self.id())
                    .await
                    .map(|_| ())
                    .map_err(|e| anyhow!("{e}")),
                Some((id, admin)) if !admin.is_empty() => self
                    .client()
                    .for_node(id)
                    .post_async::<_, serde_json::Value>(
                        &admin,
                        "/cluster/remove",
                        &crate::wire::RemoveRequest { node_id: self.id() },
                        Duration::from_secs(5),
                    )
                    .await
                    .map(|_| ())
                    .map_err(|e| anyhow!("{e}")),
                _ => Err(anyhow!("no leader known")),
            };
            match res {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// The voters of the membership this node knows.
    pub fn voters(&self) -> Vec<u64> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    /// Raft role as shown to operators.
    pub fn role(&self) -> &'static str {
        let m = self.raft.metrics().borrow().clone();
        match m.state {
            ServerState::Leader => "leader",
            ServerState::Candidate => "candidate",
            ServerState::Shutdown => "shutdown",
            ServerState::Learner => "learner",
            ServerState::Follower if self.voters().contains(&self.id()) => "follower",
            ServerState::Follower => "learner",
        }
    }
}

fn map_membership_err(
    node: &Node,
    e: openraft::error::RaftError<u64, ClientWriteError<u64, BasicNode>>,
) -> WriteError {
    match e {
        openraft::error::RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            match f.leader_id {
                Some(_) => WriteError::NotLeader {
                    leader: node.leader(),
                },
                None => WriteError::NoLeader,
            }
        }
        other => WriteError::Raft(other.to_string()),
    }
}
