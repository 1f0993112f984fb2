//! The node: its state (Raft, the config state machine, the datapath,
//! replication, credentials, metrics) and what every part asks of it — who
//! it is, who leads and votes, its role, its readiness to announce, writes
//! through Raft. Starting and stopping it is [`crate::lifecycle`];
//! membership changes are [`crate::membership`]; programming the datapath
//! is [`crate::datapath`].

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Instant,
};

use datapath_ebpf::Datapath;
use holdfast_api::client::Client;
use openraft::{error::ClientWriteError, BasicNode, ServerState};
use raft_store::{types::Raft, Request, Response, StateMachineStore};
use sync::transport::Transport;
use tracing::instrument;

use crate::{
    config::NodeConfig, credentials::Credentials, metrics::Metrics, raft_net::HeartbeatClock,
};

/// The datapath and what is known about it.
pub struct DatapathHandle {
    pub dp: Arc<Mutex<Datapath>>,
    pub interface: Option<String>,
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
    /// Conntrack entries, counted every [`crate::datapath::CT_COUNT_EVERY`] by a background
    /// task: counting dumps the whole map, which must not happen per request.
    pub conntrack_entries: AtomicU64,
    /// Why the datapath health check fails (None: healthy), checked every
    /// [`crate::datapath::HEALTH_EVERY`]: the interface is up with carrier, and forwarding
    /// is not failing for lack of routes to the backends.
    pub health_error: Mutex<Option<String>>,
    /// Backend health checks: this node's views, the leader's tally.
    pub health: holdfast_health::HealthState,
    /// Divergent replication's two-phase table changes (see `tables`).
    pub tables: crate::tables::TablesGate,
    /// When the datapath last moved to a newer epoch (applied, or began
    /// preparing a table change): readiness tolerates a short lag.
    pub(crate) datapath_moved_at: Mutex<std::time::Instant>,
    /// VIP routes announced over BGP right now.
    pub bgp_announced: Arc<AtomicBool>,
    /// Conntrack replication (datapath and `sync.enabled`).
    pub sync: std::sync::OnceLock<Arc<sync::service::SyncService>>,
    pub(crate) shutting_down: AtomicBool,
    pub(crate) shutdown_tx: tokio::sync::watch::Sender<bool>,
    /// The TLS identity in use (admin API, client calls, QUIC), rotated
    /// from the files without a restart.
    pub credentials: Credentials,
    /// Operator drain: withdraw the VIPs while staying in the cluster.
    pub draining: AtomicBool,
    /// Background tasks, aborted at shutdown.
    pub(crate) tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// How long readiness tolerates a datapath behind the committed epoch
/// while it keeps moving (see `Node::epoch_for_readiness`).
pub const EPOCH_LAG_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

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

impl Node {
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

    /// The epoch readiness compares with the committed one: the applied
    /// epoch; the committed one while a table change for it is being
    /// prepared (divergent replication: the node forwards consistently
    /// with the tier meanwhile); and the committed one while the node
    /// falls behind only as a churning config does (its datapath moved on
    /// within [`EPOCH_LAG_GRACE`]), so a change every few hundred
    /// milliseconds does not withdraw it between two applies. A node whose
    /// datapath stopped following is not ready after the grace.
    fn epoch_for_readiness(&self, committed: u64) -> u64 {
        let applied = self.applied_epoch.load(Ordering::Relaxed);
        if applied == committed || self.tables.pending_epoch.load(Ordering::Relaxed) == committed {
            return committed;
        }
        let moved = *self.datapath_moved_at.lock().expect("moved");
        if applied > 0 && moved.elapsed() < EPOCH_LAG_GRACE {
            return committed;
        }
        applied
    }

    /// What announcing depends on, now.
    pub fn readiness(&self) -> holdfast_bgp::Readiness {
        let attached = match &self.datapath {
            Some(h) => h.interface.is_some() && !h.dp.lock().expect("dp").attached().is_empty(),
            None => false,
        };
        let cur = self.sm.current();
        holdfast_bgp::Readiness {
            shutting_down: self.is_shutting_down(),
            draining: self.draining.load(Ordering::Relaxed),
            drain_graceful_shutdown: self.cfg.bgp.drain
                == holdfast_bgp::DrainMode::GracefulShutdown,
            leader_known: self.raft.metrics().borrow().current_leader.is_some(),
            config_epoch: cur.state.epoch,
            registered: cur.state.members.contains_key(&self.id()),
            applied_epoch: self.epoch_for_readiness(cur.state.epoch),
            datapath_attached: attached,
            sync_ready: self.sync.get().is_none_or(|s| s.is_ready()),
            healthy: self.health_error.lock().expect("health").is_none(),
        }
    }

    /// What this node attaches to its announcements: the committed VIP
    /// pools' attributes, and GRACEFUL_SHUTDOWN while it is drained with
    /// `[bgp] drain = "graceful-shutdown"`. None until a config is applied.
    pub fn export_policy(&self) -> Option<holdfast_bgp::ExportPolicy> {
        let cur = self.sm.current();
        if cur.state.epoch == 0 {
            return None;
        }
        Some(holdfast_bgp::ExportPolicy::from_pools(
            cur.state.pools.values(),
            self.draining.load(Ordering::Relaxed)
                && self.cfg.bgp.drain == holdfast_bgp::DrainMode::GracefulShutdown,
        ))
    }

    /// This node's SNAT addresses (announced as its own host routes); None
    /// until a config is applied (a restarting node does not know yet).
    pub fn own_snat_addrs(&self) -> Option<Vec<std::net::IpAddr>> {
        let cur = self.sm.current();
        if cur.state.epoch == 0 {
            return None;
        }
        let (v4, v6) = cur.state.snat.addrs_of(self.id());
        Some(
            v4.map(std::net::IpAddr::V4)
                .into_iter()
                .chain(v6.map(std::net::IpAddr::V6))
                .collect(),
        )
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

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
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
