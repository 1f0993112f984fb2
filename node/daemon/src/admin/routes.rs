//! The admin API's routes and handlers.

use std::{net::SocketAddr, sync::atomic::Ordering, sync::Arc, time::Duration};

use axum::{
    body::Body,
    extract::{rejection::JsonRejection, Request, State},
    http::{Method, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response as HttpResponse},
    routing::{get, post},
    Extension, Json, Router,
};
use raft_store::{cluster::Member, ClusterState, Request as CmdRequest, Response};
use serde::Serialize;
use tracing::{instrument, warn};

use holdfast_api::{
    auth::{command_need, Authenticated, Caller, Need, Refusal, Role},
    client::ClientError,
    wire::{
        ApiError, CtQuery, CtRow, DrainRequest, HealthReport, HealthTable, LocalStatus, MemberRow,
        RemoveRequest, TablesReport, ON_BEHALF_HEADER,
    },
};

use crate::{
    admin::{
        conn::{ConnAuth, Limits},
        render::render_metrics,
        status::{ct_rows, local_status},
    },
    node::{Node, WriteError},
};

/// Who is calling, as the authentication layer found it (a request
/// extension of every admin API call).
#[derive(Clone, Debug)]
pub struct CallInfo {
    /// TCP peer address.
    pub peer: SocketAddr,
    /// Whom the call is for: the certificate's holder, or the caller a
    /// forwarding node acts for.
    pub caller: Caller,
    /// Subject of the TLS peer's certificate.
    pub subject: String,
    /// Forwarded by another node (it is not forwarded again).
    pub forwarded: bool,
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

/// Count, log and answer a refusal.
fn refuse(node: &Node, peer: Option<SocketAddr>, r: Refusal) -> ApiErr {
    node.metrics.admin_refused[r.index()].fetch_add(1, Ordering::Relaxed);
    warn!(
        peer = %peer.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
        subject = r.subject().unwrap_or("-"),
        reason = r.reason(),
        "admin API call refused: {r}"
    );
    err(
        StatusCode::from_u16(r.status()).unwrap_or(StatusCode::UNAUTHORIZED),
        r.kind(),
        r.to_string(),
    )
}

/// Refuse unless `call` meets `need`; `what` names the call for the message.
fn authorize(node: &Node, call: &CallInfo, need: Need, what: &str) -> Result<(), ApiErr> {
    if need.allows(&call.caller) {
        return Ok(());
    }
    Err(refuse(
        node,
        Some(call.peer),
        Refusal::Forbidden {
            caller: call.caller.to_string(),
            why: format!("{what} needs {need}"),
        },
    ))
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

/// The admin API (HTTPS listener): every route behind authentication.
pub fn router(node: Arc<Node>) -> Router {
    let limits = Limits::from(&node.cfg.admin);
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
        .route("/health", get(health))
        .route("/health/report", post(health_report))
        .route("/tables/report", post(tables_report))
        .layer(axum::middleware::from_fn_with_state(
            (node.clone(), limits),
            bound_body,
        ))
        .layer(axum::middleware::from_fn_with_state(node.clone(), authn))
        .with_state(node)
}

/// The plain listener (`metrics_addr`): metrics and probes only.
pub fn plain_router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/ready", get(ready))
        .route("/live", get(live))
        .with_state(node)
}

/// Authenticate the call by its connection's certificate; resolve a
/// forwarding node's on-behalf caller; viewers never write.
async fn authn(State(node): State<Arc<Node>>, mut req: Request, next: Next) -> HttpResponse {
    let Some(conn) = req.extensions().get::<ConnAuth>().cloned() else {
        return refuse(&node, None, Refusal::NoCertificate).into_response();
    };
    let a: Authenticated = match conn.result.as_ref() {
        Ok(a) => a.clone(),
        Err(r) => return refuse(&node, Some(conn.peer), r.clone()).into_response(),
    };
    let on_behalf = req.headers().get(ON_BEHALF_HEADER).map(|v| v.to_str().ok());
    let (caller, forwarded) = match (on_behalf, &a.caller) {
        (None, c) => (c.clone(), false),
        (Some(v), Caller::Node(_)) => match v.and_then(Caller::parse_header) {
            Some(c) => (c, true),
            None => {
                return err(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("{ON_BEHALF_HEADER}: not a caller"),
                )
                .into_response()
            }
        },
        (Some(_), c) => {
            return refuse(
                &node,
                Some(conn.peer),
                Refusal::Forbidden {
                    caller: c.to_string(),
                    why: format!("only node certificates may send {ON_BEHALF_HEADER}"),
                },
            )
            .into_response()
        }
    };
    if req.method() != Method::GET {
        if let Caller::Client {
            role: Role::Viewer, ..
        } = &caller
        {
            return refuse(
                &node,
                Some(conn.peer),
                Refusal::Forbidden {
                    caller: caller.to_string(),
                    why: format!(
                        "role viewer is read-only: {} {} needs operator or admin",
                        req.method(),
                        req.uri().path()
                    ),
                },
            )
            .into_response();
        }
    }
    req.extensions_mut().insert(CallInfo {
        peer: conn.peer,
        caller,
        subject: a.cert.subject(),
        forwarded,
    });
    next.run(req).await
}

/// Read the whole request body within the size and time limits before
/// the handler runs: a slow or huge body cannot hold the node.
async fn bound_body(
    State((node, limits)): State<(Arc<Node>, Limits)>,
    req: Request,
    next: Next,
) -> HttpResponse {
    let peer = req.extensions().get::<CallInfo>().map(|c| c.peer);
    let (parts, body) = req.into_parts();
    let bytes = match tokio::time::timeout(
        limits.body_timeout,
        axum::body::to_bytes(body, limits.max_body_bytes),
    )
    .await
    {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => return refuse(&node, peer, Refusal::BodyTooLarge).into_response(),
        Err(_) => return refuse(&node, peer, Refusal::Timeout).into_response(),
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

async fn status(State(node): State<Arc<Node>>) -> Result<Json<LocalStatus>, ApiErr> {
    let n = node.clone();
    Ok(Json(
        tokio::task::spawn_blocking(move || local_status(&n))
            .await
            .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?,
    ))
}

async fn conntrack(
    State(node): State<Arc<Node>>,
    q: Result<axum::extract::Query<CtQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<CtRow>>, ApiErr> {
    let axum::extract::Query(q) =
        q.map_err(|e| err(StatusCode::BAD_REQUEST, "bad_request", e.body_text()))?;
    let Some(h) = node.datapath.clone() else {
        return Err(err(
            StatusCode::CONFLICT,
            "unavailable",
            "this node has no datapath",
        ));
    };
    let pools = node.sm.current().state.snat.clone();
    let rows = tokio::task::spawn_blocking(move || {
        ct_rows(
            &h.dp.lock().expect("dp"),
            &pools,
            q.vip,
            q.limit.unwrap_or(10_000),
        )
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

/// Liveness probe: the process serves (no dependency on the cluster).
async fn live() -> Json<serde_json::Value> {
    Json(serde_json::json!({"live": true}))
}

/// Drain (or undrain) this node: withdraw its VIPs over BGP while it stays
/// a cluster member with its datapath and conntrack (flows move to the
/// other nodes, which hold their entries).
async fn drain(
    State(node): State<Arc<Node>>,
    Extension(call): Extension<CallInfo>,
    body: Result<Json<DrainRequest>, JsonRejection>,
) -> Result<Json<LocalStatus>, ApiErr> {
    authorize(
        &node,
        &call,
        Need::or_node(Role::Operator, node.id()),
        "POST /drain",
    )?;
    let Json(req) = body?;
    let was = node.draining.swap(req.drain, Ordering::Relaxed);
    if was != req.drain {
        tracing::info!(drain = req.drain, by = %call.caller, "operator drain changed");
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
async fn members(State(node): State<Arc<Node>>) -> Result<Json<Vec<MemberRow>>, ApiErr> {
    let n = node.clone();
    let me = tokio::task::spawn_blocking(move || local_status(&n))
        .await
        .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
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
        let client = node.client().for_node(id);
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
                    Some(a) => client
                        .get_async::<LocalStatus>(a, "/status", Duration::from_millis(800))
                        .await
                        .map_err(|e| e.to_string()),
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
                source_refused: Default::default(),
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
                    row.source_refused = s.source_refused;
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
    Ok(Json(rows))
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

/// Run `local` on the leader; elsewhere forward `body` to the leader (one
/// hop), acting for the caller this node authenticated.
async fn leader_or_forward<B: Serialize + Send + 'static>(
    node: &Arc<Node>,
    call: &CallInfo,
    path: &'static str,
    body: B,
) -> Result<Option<Response>, ApiErr> {
    if node.role() == "leader" {
        return Ok(None);
    }
    if call.forwarded {
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
    let client = node.client().for_node(leader).on_behalf_of(&call.caller);
    let r = client
        .post_async::<_, Response>(&admin, path, &body, forward_timeout(path))
        .await?;
    Ok(Some(r))
}

/// The name of a command's operation, for refusal messages.
fn op_name(cmd: &raft_store::Command) -> String {
    serde_json::to_value(cmd)
        .ok()
        .and_then(|v| v.get("op").and_then(|o| o.as_str()).map(str::to_string))
        .unwrap_or_else(|| "command".into())
}

async fn command(
    State(node): State<Arc<Node>>,
    Extension(call): Extension<CallInfo>,
    body: Result<Json<CmdRequest>, JsonRejection>,
) -> Result<Json<Response>, ApiErr> {
    let Json(req) = body?;
    authorize(
        &node,
        &call,
        command_need(&req.command),
        &format!("POST /command {}", op_name(&req.command)),
    )?;
    if let Some(r) = leader_or_forward(&node, &call, "/command", req.clone()).await? {
        return answer(r);
    }
    answer(node.write(req).await.map_err(write_err)?)
}

async fn join(
    State(node): State<Arc<Node>>,
    Extension(call): Extension<CallInfo>,
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
    authorize(
        &node,
        &call,
        Need::or_node(Role::Admin, m.node_id),
        &format!("joining as node {}", m.node_id),
    )?;
    for (field, a) in [("raft_addr", &m.raft_addr), ("admin_addr", &m.admin_addr)] {
        if a.parse::<SocketAddr>().is_err() {
            return Err(err(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("{field} {a:?} is not ip:port"),
            ));
        }
    }
    if let Some(r) = leader_or_forward(&node, &call, "/cluster/join", m.clone()).await? {
        return answer(r);
    }
    answer(node.add_member(m).await.map_err(write_err)?)
}

async fn remove(
    State(node): State<Arc<Node>>,
    Extension(call): Extension<CallInfo>,
    body: Result<Json<RemoveRequest>, JsonRejection>,
) -> Result<Json<Response>, ApiErr> {
    let Json(r) = body?;
    authorize(
        &node,
        &call,
        Need::or_node(Role::Admin, r.node_id),
        &format!("removing node {}", r.node_id),
    )?;
    if let Some(resp) = leader_or_forward(
        &node,
        &call,
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

/// A node's report to the leader: only from that node itself (not
/// forwarded), and only to the leader.
fn leader_report_check(
    node: &Node,
    call: &CallInfo,
    node_id: u64,
    what: &str,
) -> Result<(), ApiErr> {
    if call.caller != Caller::Node(node_id) || call.forwarded {
        return Err(refuse(
            node,
            Some(call.peer),
            Refusal::Forbidden {
                caller: call.caller.to_string(),
                why: format!("{what} of node {node_id} come from that node itself"),
            },
        ));
    }
    if node.role() != "leader" {
        return Err(err(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_leader",
            format!("{what} go to the leader; this node is not"),
        ));
    }
    Ok(())
}

/// Most backend views one health report may carry.
pub const MAX_REPORT_VIEWS: usize = 65_536;

/// A node's health-check views, for the leader's tally.
async fn health_report(
    State(node): State<Arc<Node>>,
    Extension(call): Extension<CallInfo>,
    body: Result<Json<HealthReport>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiErr> {
    let Json(report) = body?;
    leader_report_check(&node, &call, report.node_id, "health reports")?;
    if report.views.len() > MAX_REPORT_VIEWS {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!(
                "{} views in one report; at most {MAX_REPORT_VIEWS}",
                report.views.len()
            ),
        ));
    }
    node.health.record(report);
    Ok(Json(serde_json::json!({"recorded": true})))
}

/// A node's Maglev tables, for the leader's table-change gate (divergent
/// replication).
async fn tables_report(
    State(node): State<Arc<Node>>,
    Extension(call): Extension<CallInfo>,
    body: Result<Json<TablesReport>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiErr> {
    let Json(report) = body?;
    leader_report_check(&node, &call, report.node_id, "table reports")?;
    node.tables.record(report, std::time::Instant::now());
    Ok(Json(serde_json::json!({"recorded": true})))
}

/// The tier's verdict on every checked backend with each node's view
/// (the leader holds the views; elsewhere the call is forwarded to it).
async fn health(
    State(node): State<Arc<Node>>,
    Extension(call): Extension<CallInfo>,
) -> Result<Json<HealthTable>, ApiErr> {
    if node.role() == "leader" {
        let state = node.sm.current().state.clone();
        return Ok(Json(node.health.table(node.id(), &state)));
    }
    if call.forwarded {
        return Err(err(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_leader",
            "forwarded to a node that is not the leader; retry",
        ));
    }
    let Some((leader, admin)) = node.leader().filter(|(_, a)| !a.is_empty()) else {
        return Err(err(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_leader",
            "no leader is known; retry",
        ));
    };
    let client = node.client().for_node(leader).on_behalf_of(&call.caller);
    Ok(Json(
        client
            .get_async::<HealthTable>(&admin, "/health", Duration::from_secs(3))
            .await?,
    ))
}
