//! Starting a node — every part wired here: storage, the QUIC endpoint,
//! Raft, the datapath and its loops, replication, BGP, health checks, the
//! Kubernetes controller, the admin API — and stopping it.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{anyhow, Context, Result};
use datapath_ebpf::{AttachMode, Datapath};
use holdfast_bgp::Announcer;
use holdfast_pki::Identity;
use openraft::BasicNode;
use raft_store::{types::Raft, Request};
use sync::transport::Transport;
use tracing::{error, info, warn};

use crate::{
    config::NodeConfig,
    config::XdpMode,
    credentials::Credentials,
    membership::RaftMembership,
    metrics::Metrics,
    node::{DatapathHandle, Node},
    raft_net::{handler, HeartbeatClock, RaftNet},
};

impl Node {
    /// Start a node: storage, QUIC endpoint, Raft, datapath, apply loop,
    /// bootstrap or join.
    pub async fn start(cfg: NodeConfig) -> Result<Arc<Self>> {
        holdfast_pki::install_crypto_provider();
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
            move |c: &holdfast_pki::CertInfo| match revoked_sm
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
            let mut opts = cfg.datapath.options(cfg.node_id);
            opts.divergent =
                cfg.sync.enabled && cfg.sync.mode == sync::service::SyncMode::Divergent;
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
            bgp_announced: Arc::new(AtomicBool::new(false)),
            conntrack_entries: AtomicU64::new(0),
            health_error: Mutex::new(None),
            health: Default::default(),
            tables: Default::default(),
            datapath_moved_at: Mutex::new(std::time::Instant::now()),
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
            let svc = sync::service::SyncService::start(
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
            if node.cfg.sync.mode == sync::service::SyncMode::Divergent {
                let report = tokio::spawn(node.clone().tables_report_loop());
                node.tasks.lock().expect("tasks").push(report);
            }
        }
        // Whichever node leads commits the tier's table switches.
        if node.cfg.sync.mode == sync::service::SyncMode::Divergent {
            let decide = tokio::spawn(node.clone().tables_decide_loop());
            node.tasks.lock().expect("tasks").push(decide);
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
            let adopted = node
                .datapath
                .as_ref()
                .is_some_and(|h| h.dp.lock().expect("dp").adopted());
            let n = node.clone();
            let m = node.clone();
            let q = node.clone();
            let b = tokio::spawn(holdfast_bgp::announce_loop(
                node.announcer(),
                move || n.readiness(),
                move || m.own_snat_addrs(),
                move || q.export_policy(),
                adopted,
                Duration::from_millis(node.cfg.bgp.restart_grace_ms),
                node.bgp_announced.clone(),
            ));
            node.tasks.lock().expect("tasks").push(b);
        }
        if node.cfg.kubernetes.enabled {
            let k = tokio::spawn(holdfast_k8s::leader_loop(
                node.clone(),
                node.cfg.kubernetes.clone(),
            ));
            node.tasks.lock().expect("tasks").push(k);
        }
        node.tasks
            .lock()
            .expect("tasks")
            .extend(holdfast_health::spawn(&node));
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
            let api = tokio::spawn(crate::admin::serve::serve(node.clone(), listener, tls));
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

    /// Pick up rotated certificate files (content checked every
    /// `tls.reload_interval_ms`): valid ones replace the identity of the
    /// admin API, of this node's calls and of the QUIC endpoint for every
    /// new connection; invalid ones are reported and ignored.
    async fn reload_loop(self: Arc<Self>) {
        let files = holdfast_api::auth::CertFiles {
            ca: self.cfg.tls.ca_cert.clone(),
            cert: self.cfg.tls.cert.clone(),
            key: self.cfg.tls.key.clone(),
        };
        let mut watcher = {
            let f = files.clone();
            match tokio::task::spawn_blocking(move || holdfast_api::auth::Watcher::new(f)).await {
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
                holdfast_api::auth::Change::None => {}
                holdfast_api::auth::Change::Valid(id) => {
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
                holdfast_api::auth::Change::Invalid(e) => {
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

    /// The BGP speaker this node drives (its settings were validated with
    /// the config).
    fn announcer(&self) -> Arc<dyn Announcer> {
        self.cfg
            .bgp
            .announcer()
            .expect("[bgp] validated when the config was loaded")
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
            holdfast_bgp::withdraw_now(self.announcer()).await;
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
}
