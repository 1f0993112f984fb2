//! The admin API's wire types: what the server answers and what clients
//! (clusterctl, nodes, tests) send and parse. Both sides depend on this
//! module; it depends on neither.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Set by a node that forwards a call to the leader: the caller it acts
/// for (`node-<id>` or `<role>:<name>`), as that node authenticated it.
/// Honoured from node certificates only; a forwarded call is not
/// forwarded again.
pub const ON_BEHALF_HEADER: &str = "x-holdfast-on-behalf-of";

/// Which listener serves an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Listener {
    /// `admin_addr`: HTTPS with client certificates.
    Admin,
    /// `admin_addr` and the plain `metrics_addr`.
    Both,
}

/// An endpoint of the admin API and what calling it needs.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Endpoint {
    pub method: &'static str,
    pub path: &'static str,
    /// Writes: whether the call changes the config (or this node).
    pub write: bool,
    pub needs: &'static str,
    pub listener: Listener,
}

/// Every endpoint (docs/operations.md lists the same; the attack tests
/// call each of them).
pub const ENDPOINTS: &[Endpoint] = &[
    Endpoint { method: "GET", path: "/status", write: false, needs: "viewer", listener: Listener::Admin },
    Endpoint { method: "GET", path: "/cluster/members", write: false, needs: "viewer", listener: Listener::Admin },
    Endpoint { method: "GET", path: "/config", write: false, needs: "viewer", listener: Listener::Admin },
    Endpoint { method: "GET", path: "/conntrack", write: false, needs: "viewer", listener: Listener::Admin },
    Endpoint { method: "GET", path: "/metrics", write: false, needs: "viewer (none on metrics_addr)", listener: Listener::Both },
    Endpoint { method: "GET", path: "/ready", write: false, needs: "viewer (none on metrics_addr)", listener: Listener::Both },
    Endpoint { method: "POST", path: "/command", write: true, needs: "per command: operator for backend drain/undrain/weight, admin for the rest; node N may register itself", listener: Listener::Admin },
    Endpoint { method: "POST", path: "/cluster/join", write: true, needs: "admin, or node N joining as N", listener: Listener::Admin },
    Endpoint { method: "POST", path: "/cluster/remove", write: true, needs: "admin, or node N removing itself", listener: Listener::Admin },
    Endpoint { method: "POST", path: "/drain", write: true, needs: "operator, or this node itself", listener: Listener::Admin },
    Endpoint { method: "GET", path: "/health", write: false, needs: "viewer (answered by the leader)", listener: Listener::Admin },
    Endpoint { method: "POST", path: "/health/report", write: true, needs: "node N reporting as N", listener: Listener::Admin },
    Endpoint { method: "POST", path: "/tables/report", write: true, needs: "node N reporting as N", listener: Listener::Admin },
];

/// An error body of the admin API.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    /// Machine-readable kind: bad_request, rejected, no_leader, unavailable,
    /// internal, unauthenticated (401), forbidden (403), too_large (413),
    /// timeout (408).
    pub kind: String,
    pub error: String,
}

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
    pub sync: Option<SyncStatus>,
    /// VIPs announced over BGP (None: BGP not enabled here).
    pub bgp_announced: Option<bool>,
    /// Why the datapath health check fails (None: healthy or no datapath).
    #[serde(default)]
    pub health_error: Option<String>,
    /// Drained by the operator (`POST /drain`): VIPs withdrawn.
    #[serde(default)]
    pub draining: bool,
    /// The certificate this node serves and calls with now.
    #[serde(default)]
    pub certificate: Option<holdfast_pki::CertInfo>,
    /// Packets this node's datapath dropped per service because their
    /// source was outside the service's source ranges (services with
    /// ranges only).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub source_refused: BTreeMap<String, u64>,
    /// VIP packets this node's datapath has handled so far (conntrack hits,
    /// new flows, SNAT replies, refused and dropped ones); its rate shows whether
    /// routers still send the node traffic (a drain waits for it to stop).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip_packets: Option<u64>,
}

/// Body of `POST /drain` (this node only; not forwarded).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// Per service: packets refused for their source (see LocalStatus).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub source_refused: BTreeMap<String, u64>,
}

/// Body of `POST /cluster/remove`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveRequest {
    pub node_id: u64,
}

/// Query of `GET /conntrack`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CtQuery {
    pub vip: Option<std::net::IpAddr>,
    pub limit: Option<usize>,
}

/// One node's view of one checked backend (its own checks, after rise/fall).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendView {
    pub backend_id: u32,
    pub service: String,
    pub addr: std::net::IpAddr,
    /// The port checked.
    pub port: u16,
    /// Passing, as far as this node is concerned.
    pub up: bool,
    /// The last check's outcome ("connected", "HTTP 503, expected 200", ...).
    pub detail: String,
    /// The last check's duration.
    pub latency_ms: f64,
    /// Checks run since this node started checking the backend.
    pub checks: u64,
    /// Up/down transitions of this node's view.
    pub transitions: u64,
}

/// Body of `POST /health/report`: a node's views, sent to the leader every
/// second and at once when one changes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthReport {
    pub node_id: u64,
    pub views: Vec<BackendView>,
}

/// A node's Maglev tables, for the leader's table-change gate (divergent
/// replication): the fingerprint of the tables it forwards with, and of
/// the next tables it has prepared and shared the moved entries of.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TablesReport {
    pub node_id: u64,
    pub live: u64,
    pub prepared: Option<u64>,
}

/// A node's view in `GET /health`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NodeView {
    pub node_id: u64,
    pub up: bool,
    pub detail: String,
    pub latency_ms: f64,
    /// Age of the report it came in (the leader counts reports younger
    /// than 3 check intervals, at least 3 s).
    pub age_ms: u64,
    pub fresh: bool,
}

/// A row of `GET /health` (served by the leader): the tier's verdict on a
/// checked backend and every node's view.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HealthRow {
    pub backend_id: u32,
    pub service: String,
    pub addr: std::net::IpAddr,
    /// up, down or failing (kept: all of the service's backends fail).
    pub health: raft_store::cluster::Health,
    pub views: Vec<NodeView>,
    /// Nodes whose view differs from the verdict.
    pub disagree: Vec<u64>,
}

/// `GET /health`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HealthTable {
    /// The leader that answered.
    pub leader: u64,
    pub backends: Vec<HealthRow>,
    /// Services in health panic, with why.
    pub panic: BTreeMap<String, String>,
}

/// Replication state of a node, as the admin API reports it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SyncStatus {
    pub ready: bool,
    pub incarnation: u64,
    pub peers: Vec<PeerStatus>,
    pub lag_p50_ms: Option<f64>,
    pub lag_p99_ms: Option<f64>,
    pub snapshot_entries: u64,
    pub refused: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PeerStatus {
    pub peer: u64,
    pub connected: bool,
    pub sent: u64,
    pub received: u64,
    pub applied: u64,
    pub rejected: u64,
    pub queued: u64,
}

/// A conntrack entry as the admin API lists it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CtRow {
    pub client: String,
    pub vip: String,
    pub proto: String,
    pub backend_id: u32,
    pub origin: u16,
    pub remote: bool,
    pub closing: bool,
    pub idle_s: f64,
    /// A SNAT flow's source towards its backend ("addr:port"; the address
    /// of the slot that bound it, "slot N" if the pools no longer hold it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snat: Option<String>,
}
