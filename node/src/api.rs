//! The admin API (HTTP/JSON, bound to 127.0.0.1 unless configured): status,
//! members, config, writes (a non-leader forwards them to the leader, one
//! hop), join/remove, and `/metrics` in Prometheus text format.

use std::{
    collections::BTreeMap,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use axum::{
    extract::{rejection::JsonRejection, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response as HttpResponse},
    routing::{get, post},
    Json, Router,
};
use raft_store::{cluster::Member, ClusterState, Request, Response};
use serde::{Deserialize, Serialize};
use tracing::instrument;

use crate::{
    client::{self, ApiError, ClientError},
    metrics::Writer,
    node::{Node, WriteError},
};

pub const FORWARDED_HEADER: &str = "x-holdfast-forwarded";

/// One node's view of itself.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LocalStatus {
    pub node_id: u64,
    pub raft_addr: String,
    pub admin_addr: String,
    pub role: String,
    pub term: u64,
    pub leader: Option<u64>,
    pub last_log_index: Option<u64>,
    pub last_applied_index: Option<u64>,
    /// Epoch of the replicated config this node's state machine holds.
    pub config_epoch: u64,
    /// Epoch programmed into this node's datapath.
    pub applied_epoch: u64,
    pub heartbeat_age_ms: Option<u64>,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// On the leader: matched log index per follower.
    pub replication: Option<BTreeMap<u64, Option<u64>>>,
    pub datapath_enabled: bool,
    pub datapath_attached: bool,
    /// Conntrack entries (counted every 2 s, not per request).
    pub conntrack_entries: Option<u64>,
    /// Conntrack replication, if enabled.
    pub sync: Option<crate::replication::SyncStatus>,
    /// VIPs announced over BGP (None: BGP not enabled here).
    pub bgp_announced: Option<bool>,
    /// Why the datapath health check fails (None: healthy or no datapath).
    #[serde(default)]
    pub health_error: Option<String>,
    /// Drained by the operator (`POST /drain`): VIPs withdrawn.
    #[serde(default)]
    pub draining: bool,
}

/// Body of `POST /drain` (this node only; not forwarded).
#[derive(Debug, Serialize, Deserialize)]
pub struct DrainRequest {
    pub drain: bool,
}

/// A row of `clusterctl members`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MemberRow {
    pub node_id: u64,
    pub raft_addr: String,
    pub admin_addr: Option<String>,
    pub reachable: bool,
    pub error: Option<String>,
    pub role: Option<String>,
    pub term: Option<u64>,
    pub last_log_index: Option<u64>,
    pub last_applied_index: Option<u64>,
    /// Log entries behind the leader (leader's view).
    pub lag: Option<u64>,
    pub heartbeat_age_ms: Option<u64>,
    pub applied_epoch: Option<u64>,
    pub datapath_attached: Option<bool>,
    pub conntrack_entries: Option<u64>,
    /// Warm join done (None: replication off or node unreachable).
    pub sync_ready: Option<bool>,
    /// Replication streams to peers that are up.
    pub sync_peers_connected: Option<usize>,
    /// Replication lag p99 on this node (creation on the origin → applied here).
    pub sync_lag_p99_ms: Option<f64>,
    /// VIPs announced over BGP (None: BGP off or node unreachable).
    pub bgp_announced: Option<bool>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RemoveRequest {
    pub node_id: u64,
}

struct ApiErr(StatusCode, ApiError);

impl IntoResponse for ApiErr {
    fn into_response(self) -> HttpResponse {
        (self.0, Json(self.1)).into_response()
    }
}

fn err(status: StatusCode, kind: &str, msg: impl Into<String>) -> ApiErr {
    ApiErr(
        status,
        ApiError {
            kind: kind.into(),
            error: msg.into(),
        },
    )
}

impl From<JsonRejection> for ApiErr {
    fn from(r: JsonRejection) -> Self {
        err(StatusCode::BAD_REQUEST, "bad_request", r.body_text())
    }
}

/// How long a forwarded write may take at the leader: a config commit
/// takes milliseconds, a membership change waits for the learner to catch
/// up. Past it the client gets "unavailable" and retries (exactly once by
/// request id), by then with the new leader — a leader that died mid-call
/// costs the client this long, not more.
fn forward_timeout(path: &str) -> Duration {
    if path == "/command" {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(10)
    }
}

impl From<ClientError> for ApiErr {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Api {
                status,
                kind,
                error,
                ..
            } => err(
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                &kind,
                error,
            ),
            other => err(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                other.to_string(),
            ),
        }
    }
}

pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/cluster/members", get(members))
        .route("/config", get(config))
        .route("/command", post(command))
        .route("/cluster/join", post(join))
        .route("/cluster/remove", post(remove))
        .route("/metrics", get(metrics))
        .route("/drain", post(drain))
        .route("/ready", get(ready))
        .route("/conntrack", get(conntrack))
        .with_state(node)
}

/// Serve the admin API until the node shuts down.
pub async fn serve(node: Arc<Node>, listener: tokio::net::TcpListener) {
    let n = node.clone();
    let res = axum::serve(listener, router(node))
        .with_graceful_shutdown(async move {
            while !n.is_shutting_down() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
    if let Err(e) = res {
        tracing::error!(error = %e, "admin API stopped");
    }
}

pub fn local_status(node: &Node) -> LocalStatus {
    let m = node.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let (entries, attached) = match &node.datapath {
        Some(h) => (
            Some(node.conntrack_entries.load(Ordering::Relaxed)),
            !h.dp.lock().expect("dp").attached().is_empty(),
        ),
        None => (None, false),
    };
    LocalStatus {
        node_id: node.id(),
        raft_addr: node.cfg.raft_addr.to_string(),
        admin_addr: node.cfg.admin_addr.to_string(),
        role: node.role().into(),
        term: m.current_term,
        leader: m.current_leader,
        last_log_index: m.last_log_index,
        last_applied_index: m.last_applied.map(|l| l.index),
        config_epoch: node.sm.current().state.epoch,
        applied_epoch: node.applied_epoch.load(Ordering::Relaxed),
        heartbeat_age_ms: if m.current_leader == Some(node.id()) {
            Some(0)
        } else {
            node.heartbeat.age_ms()
        },
        voters: membership.voter_ids().collect(),
        learners: membership.learner_ids().collect(),
        replication: m
            .replication
            .as_ref()
            .map(|r| r.iter().map(|(id, l)| (*id, l.map(|l| l.index))).collect()),
        datapath_enabled: node.datapath.is_some(),
        datapath_attached: attached,
        conntrack_entries: entries,
        sync: node.sync.get().map(|s| s.status()),
        bgp_announced: node
            .cfg
            .bgp
            .enabled
            .then(|| node.bgp_announced.load(Ordering::Relaxed)),
        health_error: node.health_error.lock().expect("health").clone(),
        draining: node.draining.load(Ordering::Relaxed),
    }
}

async fn status(State(node): State<Arc<Node>>) -> Json<LocalStatus> {
    let n = node.clone();
    Json(
        tokio::task::spawn_blocking(move || local_status(&n))
            .await
            .expect("status task"),
    )
}

#[derive(Debug, Deserialize)]
pub struct CtQuery {
    pub vip: Option<std::net::IpAddr>,
    pub limit: Option<usize>,
}

async fn conntrack(
    State(node): State<Arc<Node>>,
    q: Result<axum::extract::Query<CtQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<crate::replication::CtRow>>, ApiErr> {
    let axum::extract::Query(q) =
        q.map_err(|e| err(StatusCode::BAD_REQUEST, "bad_request", e.body_text()))?;
    let Some(h) = node.datapath.clone() else {
        return Err(err(
            StatusCode::CONFLICT,
            "unavailable",
            "this node has no datapath",
        ));
    };
    let rows = tokio::task::spawn_blocking(move || {
        crate::replication::ct_rows(&h.dp.lock().expect("dp"), q.vip, q.limit.unwrap_or(10_000))
    })
    .await
    .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
    .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    Ok(Json(rows))
}

/// Readiness probe: 200 when the node would announce its VIPs (datapath
/// attached and at the committed epoch, healthy, leader known, warm join
/// done, not drained), else 503 with the reason.
async fn ready(State(node): State<Arc<Node>>) -> Result<Json<serde_json::Value>, ApiErr> {
    let n = node.clone();
    let r = tokio::task::spawn_blocking(move || n.readiness())
        .await
        .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    match r.decide() {
        Ok(()) => Ok(Json(serde_json::json!({"ready": true}))),
        Err(why) => Err(err(StatusCode::SERVICE_UNAVAILABLE, "unavailable", why)),
    }
}

/// Drain (or undrain) this node: withdraw its VIPs over BGP while it stays
/// a cluster member with its datapath and conntrack (flows move to the
/// other nodes, which hold their entries).
async fn drain(
    State(node): State<Arc<Node>>,
    body: Result<Json<DrainRequest>, JsonRejection>,
) -> Result<Json<LocalStatus>, ApiErr> {
    let Json(req) = body?;
    let was = node.draining.swap(req.drain, Ordering::Relaxed);
    if was != req.drain {
        tracing::info!(drain = req.drain, "operator drain changed");
    }
    let n = node.clone();
    Ok(Json(
        tokio::task::spawn_blocking(move || local_status(&n))
            .await
            .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?,
    ))
}

async fn config(State(node): State<Arc<Node>>) -> Json<ClusterState> {
    Json(node.sm.current().state.clone())
}

/// Every member's row: this node's Raft view plus each member's own status.
#[instrument(skip_all)]
async fn members(State(node): State<Arc<Node>>) -> Json<Vec<MemberRow>> {
    let n = node.clone();
    let me = tokio::task::spawn_blocking(move || local_status(&n))
        .await
        .expect("status task");
    let state = node.sm.current();
    let m = node.raft.metrics().borrow().clone();
    let leader_last = m.last_log_index.unwrap_or(0);
    let mut ids: Vec<(u64, String)> = m
        .membership_config
        .membership()
        .nodes()
        .map(|(id, n)| (*id, n.addr.clone()))
        .collect();
    for (id, mem) in &state.state.members {
        if !ids.iter().any(|(i, _)| i == id) {
            ids.push((*id, mem.raft_addr.clone()));
        }
    }
    ids.sort();
    let mut handles = Vec::new();
    for (id, raft_addr) in ids {
        let admin = state.state.members.get(&id).map(|m| m.admin_addr.clone());
        let me = me.clone();
        let lag = me
            .replication
            .as_ref()
            .and_then(|r| r.get(&id))
            .map(|matched| leader_last.saturating_sub(matched.unwrap_or(0)));
        handles.push(tokio::spawn(async move {
            let st: Result<LocalStatus, String> = if id == me.node_id {
                Ok(me)
            } else {
                match &admin {
                    Some(a) => {
                        client::get_json::<LocalStatus>(a, "/status", Duration::from_millis(800))
                            .await
                            .map_err(|e| e.to_string())
                    }
                    None => Err("not registered (no admin address)".into()),
                }
            };
            let mut row = MemberRow {
                node_id: id,
                raft_addr,
                admin_addr: admin,
                reachable: st.is_ok(),
                error: None,
                role: None,
                term: None,
                last_log_index: None,
                last_applied_index: None,
                lag,
                heartbeat_age_ms: None,
                applied_epoch: None,
                datapath_attached: None,
                conntrack_entries: None,
                sync_ready: None,
                sync_peers_connected: None,
                sync_lag_p99_ms: None,
                bgp_announced: None,
            };
            match st {
                Ok(s) => {
                    row.role = Some(s.role);
                    row.term = Some(s.term);
                    row.last_log_index = s.last_log_index;
                    row.last_applied_index = s.last_applied_index;
                    row.heartbeat_age_ms = s.heartbeat_age_ms;
                    row.applied_epoch = Some(s.applied_epoch);
                    row.datapath_attached = Some(s.datapath_attached);
                    row.conntrack_entries = s.conntrack_entries;
                    row.bgp_announced = s.bgp_announced;
                    if let Some(sy) = &s.sync {
                        row.sync_ready = Some(sy.ready);
                        row.sync_peers_connected =
                            Some(sy.peers.iter().filter(|p| p.connected).count());
                        row.sync_lag_p99_ms = sy.lag_p99_ms;
                    }
                }
                Err(e) => row.error = Some(e),
            }
            row
        }));
    }
    let mut rows = Vec::new();
    for h in handles {
        if let Ok(r) = h.await {
            rows.push(r);
        }
    }
    Json(rows)
}

fn write_err(e: WriteError) -> ApiErr {
    match e {
        WriteError::NoLeader | WriteError::NotLeader { leader: None } => err(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_leader",
            "no leader is known; retry",
        ),
        WriteError::NotLeader {
            leader: Some((id, _)),
        } => err(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_leader",
            format!("leadership moved to node {id} while writing; retry"),
        ),
        WriteError::Raft(m) => err(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m),
    }
}

fn answer(r: Response) -> Result<Json<Response>, ApiErr> {
    match &r.rejected {
        Some(why) => Err(err(StatusCode::CONFLICT, "rejected", why.clone())),
        None => Ok(Json(r)),
    }
}

/// Run `local` on the leader; elsewhere forward `body` to the leader (one hop).
async fn leader_or_forward<B: Serialize + Send + 'static>(
    node: &Arc<Node>,
    headers: &HeaderMap,
    path: &'static str,
    body: B,
) -> Result<Option<Response>, ApiErr> {
    if node.role() == "leader" {
        return Ok(None);
    }
    if headers.contains_key(FORWARDED_HEADER) {
        return Err(err(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_leader",
            "forwarded to a node that is not the leader; retry",
        ));
    }
    let Some((leader, admin)) = node.leader() else {
        return Err(err(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_leader",
            "no leader is known; retry",
        ));
    };
    if admin.is_empty() {
        return Err(err(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_leader",
            format!("leader {leader} has not registered its admin address yet; retry"),
        ));
    }
    node.metrics
        .writes_forwarded
        .fetch_add(1, Ordering::Relaxed);
    let r = tokio::task::spawn_blocking(move || {
        client::post_blocking::<_, Response>(&admin, path, &body, forward_timeout(path), true)
    })
    .await
    .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))??;
    Ok(Some(r))
}

async fn command(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    body: Result<Json<Request>, JsonRejection>,
) -> Result<Json<Response>, ApiErr> {
    let Json(req) = body?;
    if let Some(r) = leader_or_forward(&node, &headers, "/command", req.clone()).await? {
        return answer(r);
    }
    answer(node.write(req).await.map_err(write_err)?)
}

async fn join(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    body: Result<Json<Member>, JsonRejection>,
) -> Result<Json<Response>, ApiErr> {
    let Json(m) = body?;
    if m.node_id == 0 {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "node_id must be positive",
        ));
    }
    if m.raft_addr.parse::<std::net::SocketAddr>().is_err() {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("raft_addr {:?} is not ip:port", m.raft_addr),
        ));
    }
    if let Some(r) = leader_or_forward(&node, &headers, "/cluster/join", m.clone()).await? {
        return answer(r);
    }
    answer(node.add_member(m).await.map_err(write_err)?)
}

async fn remove(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    body: Result<Json<RemoveRequest>, JsonRejection>,
) -> Result<Json<Response>, ApiErr> {
    let Json(r) = body?;
    if let Some(resp) = leader_or_forward(
        &node,
        &headers,
        "/cluster/remove",
        RemoveRequest { node_id: r.node_id },
    )
    .await?
    {
        return answer(resp);
    }
    answer(node.remove_member(r.node_id).await.map_err(write_err)?)
}

async fn metrics(State(node): State<Arc<Node>>) -> impl IntoResponse {
    let n = node.clone();
    let text = tokio::task::spawn_blocking(move || render_metrics(&n))
        .await
        .unwrap_or_default();
    ([("content-type", "text/plain; version=0.0.4")], text)
}

/// Prometheus text format of everything the node knows.
pub fn render_metrics(node: &Node) -> String {
    let mut out = String::new();
    let mut w = Writer(&mut out);
    let st = local_status(node);
    w.family(
        "holdfast_raft_role",
        "1 for the node's current Raft role",
        "gauge",
    );
    for role in ["leader", "follower", "candidate", "learner", "shutdown"] {
        w.sample(
            "holdfast_raft_role",
            &[("role", role.into())],
            if st.role == role { 1.0 } else { 0.0 },
        );
    }
    w.gauge(
        "holdfast_raft_term",
        "Current Raft term",
        &[],
        st.term as f64,
    );
    w.gauge(
        "holdfast_raft_leader",
        "Node id of the current leader (0: none)",
        &[],
        st.leader.unwrap_or(0) as f64,
    );
    w.gauge(
        "holdfast_raft_last_applied_index",
        "Index of the last log entry applied to the state machine",
        &[],
        st.last_applied_index.unwrap_or(0) as f64,
    );
    w.gauge(
        "holdfast_config_epoch",
        "Epoch of the replicated config held here",
        &[],
        st.config_epoch as f64,
    );
    w.gauge(
        "holdfast_ready",
        "1 if the node would announce its VIPs (readiness: datapath at the committed epoch, healthy, leader known, warm join done, not drained)",
        &[],
        if node.readiness().decide().is_ok() { 1.0 } else { 0.0 },
    );
    if let Some(a) = st.bgp_announced {
        w.gauge(
            "holdfast_bgp_announced",
            "1 if the VIPs are announced over BGP (absent: BGP off)",
            &[],
            if a { 1.0 } else { 0.0 },
        );
    }
    w.gauge(
        "holdfast_datapath_applied_epoch",
        "Config epoch programmed into this node's datapath",
        &[],
        st.applied_epoch as f64,
    );
    w.histogram(
        "holdfast_raft_commit_latency_seconds",
        "Write submitted on the leader until committed and applied",
        &node.metrics.commit_latency,
    );
    w.histogram(
        "holdfast_datapath_apply_seconds",
        "Committed config epoch until programmed into the datapath",
        &node.metrics.datapath_apply,
    );
    w.counter(
        "holdfast_datapath_apply_errors_total",
        "Config epochs the datapath refused",
        &[],
        node.metrics.datapath_apply_errors.load(Ordering::Relaxed),
    );
    w.counter(
        "holdfast_commands_rejected_total",
        "Commands the state machine rejected",
        &[],
        node.metrics.commands_rejected.load(Ordering::Relaxed),
    );
    w.counter(
        "holdfast_quic_handshakes_refused_total",
        "QUIC peers refused (certificate not from the cluster CA, or not a node)",
        &[],
        node.transport.stats.refused.load(Ordering::Relaxed),
    );
    if let Some(sy) = node.sync.get() {
        let m = &sy.metrics;
        let st = sy.status();
        w.gauge(
            "holdfast_sync_ready",
            "1 once the warm join is done",
            &[],
            if st.ready { 1.0 } else { 0.0 },
        );
        w.histogram(
            "holdfast_sync_lag_seconds",
            "Replication lag: entry created on the origin until applied here",
            &m.lag,
        );
        w.counter(
            "holdfast_sync_batches_sent_total",
            "Batches sent to peers",
            &[],
            m.batches_sent.load(Ordering::Relaxed),
        );
        w.counter(
            "holdfast_sync_batch_entries_total",
            "Entries in the batches sent (divide by batches for the mean batch size)",
            &[],
            m.entries_in_batches.load(Ordering::Relaxed),
        );
        w.counter(
            "holdfast_sync_refused_total",
            "Replication streams refused: not a member, wrong origin, bad message",
            &[],
            m.refused.load(Ordering::Relaxed),
        );
        w.counter(
            "holdfast_sync_snapshot_entries_total",
            "Entries received by snapshot pulls (warm join, resync)",
            &[],
            m.snapshot_entries.load(Ordering::Relaxed),
        );
        w.counter(
            "holdfast_sync_resyncs_total",
            "Snapshot pulls after lost entries",
            &[],
            m.resyncs.load(Ordering::Relaxed),
        );
        w.counter(
            "holdfast_sync_expired_total",
            "Idle conntrack entries expired",
            &[],
            m.expired.load(Ordering::Relaxed),
        );
        for (name, help, get) in [
            (
                "holdfast_sync_sent_total",
                "Entries sent to the peer",
                0usize,
            ),
            (
                "holdfast_sync_received_total",
                "Entries received from the peer",
                1,
            ),
            (
                "holdfast_sync_applied_total",
                "Entries from the peer written into conntrack",
                2,
            ),
            (
                "holdfast_sync_rejected_total",
                "Entries from the peer refused by the merge rule",
                3,
            ),
            (
                "holdfast_sync_queue_depth",
                "Entries queued for the peer",
                4,
            ),
        ] {
            w.family(name, help, if get == 4 { "gauge" } else { "counter" });
            for p in &st.peers {
                let v = [p.sent, p.received, p.applied, p.rejected, p.queued][get];
                w.sample(name, &[("peer", p.peer.to_string())], v as f64);
            }
        }
        w.family(
            "holdfast_sync_peer_connected",
            "1 while the replication session to the peer is up",
            "gauge",
        );
        for p in &st.peers {
            w.sample(
                "holdfast_sync_peer_connected",
                &[("peer", p.peer.to_string())],
                if p.connected { 1.0 } else { 0.0 },
            );
        }
    }
    if let Some(h) = &node.datapath {
        let dp = h.dp.lock().expect("dp");
        if let Ok(s) = dp.stats() {
            for (name, i) in datapath_ebpf::abi::STAT_NAMES {
                let metric = format!(
                    "holdfast_datapath_{}_total",
                    name.trim_start_matches("LB_STAT_").to_lowercase()
                );
                w.counter(&metric, datapath_stat_help(name), &[], s.c[*i]);
            }
        }
        if let Some(n) = st.conntrack_entries {
            w.gauge(
                "holdfast_conntrack_entries",
                "Entries in the conntrack map",
                &[],
                n as f64,
            );
        }
        if let Ok(per) = dp.service_stats() {
            let state = node.sm.current();
            for (name, i) in datapath_ebpf::abi::SVC_STAT_NAMES {
                let metric = format!(
                    "holdfast_service_{}_total",
                    name.trim_start_matches("LB_SVC_").to_lowercase()
                );
                w.family(&metric, service_stat_help(name), "counter");
                for (key, v) in &per {
                    let svc = state
                        .state
                        .services
                        .values()
                        .find(|s| {
                            datapath_ebpf::abi::SvcKey::new(
                                s.vip,
                                s.port,
                                match s.proto {
                                    raft_store::cluster::Proto::Tcp => 6,
                                    raft_store::cluster::Proto::Udp => 17,
                                },
                            ) == *key
                        })
                        .map(|s| s.name.clone())
                        .unwrap_or_else(|| "unknown".into());
                    w.sample(&metric, &[("service", svc)], v.c[*i] as f64);
                }
            }
        }
    }
    out
}

/// Help text of each datapath counter (`holdfast_datapath_<name>_total`).
fn datapath_stat_help(stat: &str) -> &'static str {
    match stat {
        "LB_STAT_FWD_PACKETS" => "Packets forwarded to a backend (IPIP)",
        "LB_STAT_FWD_BYTES" => "Bytes forwarded to backends, before encapsulation",
        "LB_STAT_NEW_FLOWS" => "Flows entered into conntrack by a Maglev pick",
        "LB_STAT_CT_HITS" => "Packets forwarded by an existing conntrack entry",
        "LB_STAT_MIDFLOW_MISS" => {
            "Mid-flow packets (TCP without SYN) with no conntrack entry: each a connection that may have broken"
        }
        "LB_STAT_REPICK_GONE" => "Conntrack entries whose backend was removed, re-picked by Maglev",
        "LB_STAT_REPICK_STALE" => "SYN or UDP packets that re-picked a stale conntrack entry",
        "LB_STAT_RING_LOST" => "New-flow events lost because the ring buffer to the agent was full",
        "LB_STAT_FIB_NO_NEIGH" => "Packets handed to the kernel to forward because the next hop was unresolved",
        "LB_STAT_FIB_FAIL" => "Packets dropped because no route led to the backend",
        "LB_STAT_ICMP_TOO_BIG" => "ICMP fragmentation-needed / packet-too-big sent for oversized packets",
        "LB_STAT_ICMP_ERR_FWD" => "ICMP errors about VIP flows sent on to their backends",
        "LB_STAT_PASS_MALFORMED" => "Malformed frames not addressed to a VIP, passed to the kernel",
        "LB_STAT_PASS_VIP_OTHER" => "VIP packets for a port or protocol with no service, passed to the kernel",
        "LB_STAT_DROP_MALFORMED" => "Malformed packets to a VIP, dropped",
        "LB_STAT_DROP_FRAGMENT" => "Fragments to a VIP (not balanceable), dropped",
        "LB_STAT_DROP_NO_BACKEND" => "Packets for a service with no active backend, dropped",
        "LB_STAT_DROP_UNSUPPORTED" => "VIP packets of an unsupported kind (IP options, extension headers), dropped",
        "LB_STAT_DROP_ADJUST" => "Packets dropped because the frame could not be grown for encapsulation",
        "LB_STAT_PASS_OTHERHOST" => "Unicast frames for another MAC (flooded or promiscuous), left to the kernel",
        _ => "Datapath counter (see docs/operations.md)",
    }
}

/// Help text of each per-service counter (`holdfast_service_<name>_total`).
fn service_stat_help(stat: &str) -> &'static str {
    match stat {
        "LB_SVC_PACKETS" => "Packets forwarded for the service",
        "LB_SVC_BYTES" => "Bytes forwarded for the service, before encapsulation",
        "LB_SVC_NEW_FLOWS" => "New flows of the service",
        "LB_SVC_CT_HITS" => "Packets of the service forwarded by conntrack",
        "LB_SVC_MIDFLOW_MISS" => "Mid-flow packets of the service with no conntrack entry",
        "LB_SVC_DROPS" => "Packets of the service dropped",
        _ => "Per-service datapath counter",
    }
}
