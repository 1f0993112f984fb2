//! `holdfast-node --config node.toml`: one TOML file (unknown fields are
//! refused), environment overrides (`HOLDFAST_*`), and `validate()` that
//! names the bad field and why.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use datapath_ebpf::DatapathOptions;
use serde::{Deserialize, Serialize};

/// Environment variables that override the file.
pub const ENV_NODE_ID: &str = "HOLDFAST_NODE_ID";
pub const ENV_DATA_DIR: &str = "HOLDFAST_DATA_DIR";
pub const ENV_RAFT_ADDR: &str = "HOLDFAST_RAFT_ADDR";
pub const ENV_ADMIN_ADDR: &str = "HOLDFAST_ADMIN_ADDR";
pub const ENV_METRICS_ADDR: &str = "HOLDFAST_METRICS_ADDR";
pub const ENV_TLS_CA: &str = "HOLDFAST_TLS_CA";
pub const ENV_TLS_CERT: &str = "HOLDFAST_TLS_CERT";
pub const ENV_TLS_KEY: &str = "HOLDFAST_TLS_KEY";
pub const ENV_JOIN: &str = "HOLDFAST_JOIN";
pub const ENV_BOOTSTRAP: &str = "HOLDFAST_BOOTSTRAP";
pub const ENV_LOG: &str = "HOLDFAST_LOG";
pub const ENV_LOG_FORMAT: &str = "HOLDFAST_LOG_FORMAT";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id in the cluster (> 0).
    pub node_id: u64,
    /// Where the Raft log, state machine and certificates live.
    pub data_dir: PathBuf,
    /// QUIC listen address, also the address peers dial (Raft and sync).
    pub raft_addr: SocketAddr,
    /// Admin API: HTTPS, every call authenticated by a client certificate
    /// from the cluster CA and authorized by its role. Peers join and
    /// forward writes through it, so in a cluster it listens on the node's
    /// address.
    #[serde(default = "default_admin")]
    pub admin_addr: SocketAddr,
    /// Plain HTTP for `/metrics`, `/ready` and `/live` only (Prometheus,
    /// kubelet probes): nothing that writes or shows conntrack.
    #[serde(default = "default_metrics")]
    pub metrics_addr: SocketAddr,
    /// Limits of the admin API's listeners.
    #[serde(default)]
    pub admin: AdminSection,
    /// The next hop this node announces over BGP.
    #[serde(default)]
    pub bgp_next_hop: Option<std::net::IpAddr>,
    /// Initialize a new cluster with this node as its first voter (ignored
    /// if the data dir already holds a cluster).
    #[serde(default)]
    pub bootstrap: bool,
    /// Admin addresses of members to join through (learner, then voter).
    #[serde(default)]
    pub join: Vec<SocketAddr>,
    /// On SIGTERM, leave the cluster (membership change) before exiting.
    #[serde(default)]
    pub leave_on_shutdown: bool,
    pub tls: TlsConfig,
    #[serde(default)]
    pub raft: RaftTuning,
    #[serde(default)]
    pub datapath: DatapathSection,
    #[serde(default)]
    pub sync: SyncSection,
    #[serde(default)]
    pub bgp: holdfast_bgp::BgpSection,
    #[serde(default)]
    pub kubernetes: holdfast_k8s::K8sSection,
    /// Services that seed the config of a new cluster: applied once, by
    /// the node that bootstraps it (later changes: clusterctl).
    #[serde(default, rename = "service")]
    pub services: Vec<SeedService>,
    /// `[snat]`: the SNAT pools that seed a new cluster's config (later
    /// changes: `clusterctl snat set`).
    #[serde(default)]
    pub snat: Option<SnatSeed>,
    /// `[[pool]]`: VIP pools that seed a new cluster's config, with the
    /// BGP attributes of what the nodes announce inside them
    /// (`communities`, `local_pref`; later changes: `clusterctl pools`).
    #[serde(default, rename = "pool", skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<raft_store::cluster::VipPool>,
}

/// `[[service]]` of node.toml (bare metal without Kubernetes).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SeedService {
    pub name: String,
    pub vip: std::net::IpAddr,
    pub port: u16,
    /// "tcp" or "udp".
    pub proto: raft_store::cluster::Proto,
    #[serde(default = "default_seed_table")]
    pub table_size: u32,
    /// "dsr" (default: IPIP, the backend answers the client directly) or
    /// "snat" (both addresses rewritten; the backend needs nothing).
    #[serde(default)]
    pub forwarding: raft_store::cluster::ForwardingMode,
    /// The port the backends listen on (default: `port`; DSR to another
    /// port needs holdfast-decap on the backends).
    #[serde(default)]
    pub backend_port: Option<u16>,
    /// Backend addresses (DSR: they receive VIP:port unchanged).
    #[serde(default)]
    pub backends: Vec<std::net::IpAddr>,
    /// `[service.health_check]`: active health check of the backends.
    #[serde(default)]
    pub health_check: Option<raft_store::cluster::HealthCheck>,
    /// Clients that may reach the service (CIDRs, network addresses;
    /// empty: every client).
    #[serde(default)]
    pub source_ranges: Vec<String>,
    /// Client affinity: seconds an idle client keeps its backend
    /// (1..=86400; absent: none).
    #[serde(default)]
    pub affinity_timeout_s: Option<u32>,
}

/// `[snat]` of node.toml: the SNAT pools (CIDRs) each node's SNAT address
/// comes from.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SnatSeed {
    pub v4: Option<String>,
    pub v6: Option<String>,
}

fn default_seed_table() -> u32 {
    raft_store::cluster::DEFAULT_TABLE_SIZE
}

impl NodeConfig {
    /// The seed services as one batch of commands.
    pub fn seed_commands(&self) -> Vec<raft_store::Command> {
        use raft_store::{cluster::Service, Command};
        let mut v = Vec::new();
        for pool in &self.pools {
            v.push(Command::PutVipPool { pool: pool.clone() });
        }
        if let Some(p) = &self.snat {
            v.push(Command::PutSnatPools {
                v4: p.v4.clone(),
                v6: p.v6.clone(),
            });
        }
        for s in &self.services {
            v.push(Command::PutService {
                service: Service {
                    name: s.name.clone(),
                    vip: s.vip,
                    port: s.port,
                    proto: s.proto,
                    table_size: s.table_size,
                    mode: s.forwarding,
                    health_check: s.health_check.clone(),
                    source_ranges: s.source_ranges.clone(),
                    affinity_timeout_s: s.affinity_timeout_s,
                },
            });
            for b in &s.backends {
                v.push(Command::AddBackend {
                    service: s.name.clone(),
                    addr: *b,
                    port: s.backend_port.unwrap_or(s.port),
                    weight: 1,
                });
            }
        }
        v
    }
}

pub use sync::service::{SyncMode, SyncSection};

fn default_admin() -> SocketAddr {
    "127.0.0.1:7101".parse().expect("static")
}

fn default_metrics() -> SocketAddr {
    "127.0.0.1:7102".parse().expect("static")
}

/// `[admin]`: limits of the admin API (and the plain metrics listener),
/// so that a misbehaving client cannot stall the node.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// Connections open at once; more are closed at once.
    pub max_connections: usize,
    /// Connections open at once from one client address.
    pub max_connections_per_ip: usize,
    /// The TLS handshake must finish within this.
    pub handshake_timeout_ms: u64,
    /// The request line and headers must arrive within this.
    pub request_timeout_ms: u64,
    /// The request body must arrive within this.
    pub body_timeout_ms: u64,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// No connection lives longer (a forwarded join takes up to ~11 s).
    pub connection_lifetime_ms: u64,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            max_connections: 256,
            max_connections_per_ip: 64,
            handshake_timeout_ms: 5_000,
            request_timeout_ms: 5_000,
            body_timeout_ms: 5_000,
            max_body_bytes: 1 << 20,
            connection_lifetime_ms: 30_000,
        }
    }
}

impl AdminSection {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_connections == 0 || self.max_connections > 65_536 {
            return Err(invalid("admin.max_connections", "must be 1..=65536"));
        }
        if self.max_connections_per_ip == 0 || self.max_connections_per_ip > self.max_connections {
            return Err(invalid(
                "admin.max_connections_per_ip",
                "must be 1..=admin.max_connections",
            ));
        }
        for (field, v) in [
            ("admin.handshake_timeout_ms", self.handshake_timeout_ms),
            ("admin.request_timeout_ms", self.request_timeout_ms),
            ("admin.body_timeout_ms", self.body_timeout_ms),
        ] {
            if !(100..=60_000).contains(&v) {
                return Err(invalid(field, "must be 100..=60000"));
            }
        }
        if !(15_000..=600_000).contains(&self.connection_lifetime_ms) {
            return Err(invalid(
                "admin.connection_lifetime_ms",
                "must be 15000..=600000 (a forwarded join takes up to ~11 s)",
            ));
        }
        if !(4096..=(64 << 20)).contains(&self.max_body_bytes) {
            return Err(invalid("admin.max_body_bytes", "must be 4096..=67108864"));
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The cluster CA certificate (PEM): peers must present a certificate it signed.
    pub ca_cert: PathBuf,
    /// This node's certificate (PEM), issued by `clusterctl certs issue`.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// How often the three files are checked for a rotation (their
    /// content; 0: never — a restart picks up new certificates).
    #[serde(default = "default_reload_ms")]
    pub reload_interval_ms: u64,
}

fn default_reload_ms() -> u64 {
    2_000
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftTuning {
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot (and compact the log) after this many applied entries.
    pub snapshot_logs: u64,
    /// Keep this many logs after a snapshot for slow followers.
    pub max_in_snapshot_log_to_keep: u64,
}

impl Default for RaftTuning {
    fn default() -> Self {
        Self {
            heartbeat_ms: 75,
            election_timeout_min_ms: 250,
            election_timeout_max_ms: 500,
            snapshot_logs: 1000,
            max_in_snapshot_log_to_keep: 100,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    Native,
    Generic,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatapathSection {
    /// Load the XDP datapath (needs root). Off: config only.
    pub enabled: bool,
    /// Interface to attach to; none: loaded and programmed, not attached.
    pub interface: Option<String>,
    pub mode: XdpMode,
    /// bpffs directory for pinned maps and links (restart without loss).
    pub pin_dir: Option<PathBuf>,
    /// On shutdown keep the pinned datapath forwarding (true) or detach it.
    pub keep_on_shutdown: bool,
    pub max_services: u32,
    pub max_backends: u32,
    pub max_table_size: u32,
    pub conntrack_size: u32,
    pub ring_bytes: u32,
    /// New SYNs per second and CPU that enter conntrack before SYN flood
    /// mode forwards them without state (0: protection off).
    pub syn_flood_rate: u32,
    pub mtu: u32,
    pub hash_seed: u32,
    pub tcp_idle_timeout_s: u64,
    pub udp_idle_timeout_s: u64,
    /// Closing TCP entries (client sent FIN/RST) expire after this long idle.
    pub tcp_closing_timeout_s: u64,
    /// SNAT bindings the datapath holds (every node's SNAT flows).
    pub snat_size: u32,
    /// Half-open SNAT bindings in SYN flood mode.
    pub snat_half_open_size: u32,
    /// Source ports this node binds SNAT flows to (the top quarter is for
    /// SYN flood mode).
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// Source-range CIDRs of all services together.
    pub max_source_ranges: u32,
}

impl Default for DatapathSection {
    fn default() -> Self {
        let d = DatapathOptions::default();
        Self {
            enabled: true,
            interface: None,
            mode: XdpMode::Native,
            pin_dir: None,
            keep_on_shutdown: true,
            max_services: d.max_services,
            max_backends: d.max_backends,
            max_table_size: d.max_table_size,
            conntrack_size: d.conntrack_size,
            ring_bytes: d.ring_bytes,
            syn_flood_rate: d.syn_flood_rate,
            mtu: d.mtu,
            hash_seed: d.hash_seed,
            tcp_idle_timeout_s: d.tcp_idle_timeout.as_secs(),
            udp_idle_timeout_s: d.udp_idle_timeout.as_secs(),
            tcp_closing_timeout_s: d.tcp_closing_timeout.as_secs(),
            snat_size: d.snat_size,
            snat_half_open_size: d.snat_half_open_size,
            snat_port_min: d.snat_port_min,
            snat_port_max: d.snat_port_max,
            max_source_ranges: d.max_source_ranges,
        }
    }
}

impl DatapathSection {
    pub fn options(&self, node_id: u64) -> DatapathOptions {
        DatapathOptions {
            max_services: self.max_services,
            max_backends: self.max_backends,
            max_table_size: self.max_table_size,
            conntrack_size: self.conntrack_size,
            ring_bytes: self.ring_bytes,
            syn_flood_rate: self.syn_flood_rate,
            tcp_idle_timeout: Duration::from_secs(self.tcp_idle_timeout_s),
            udp_idle_timeout: Duration::from_secs(self.udp_idle_timeout_s),
            tcp_closing_timeout: Duration::from_secs(self.tcp_closing_timeout_s),
            mtu: self.mtu,
            node_id: node_id as u16,
            hash_seed: self.hash_seed,
            pin_dir: self.pin_dir.clone(),
            snat_size: self.snat_size,
            snat_half_open_size: self.snat_half_open_size,
            snat_port_min: self.snat_port_min,
            snat_port_max: self.snat_port_max,
            max_source_ranges: self.max_source_ranges,
            ..Default::default()
        }
    }
}

impl NodeConfig {
    /// Read the file, apply environment overrides, validate.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let mut cfg = Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.into(),
            message,
        })?;
        cfg.apply_env(|k| std::env::var(k).ok())?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Apply `HOLDFAST_*` overrides from `get` (the environment in production).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = get(ENV_NODE_ID) {
            self.node_id = v
                .parse()
                .map_err(|_| invalid(ENV_NODE_ID, format!("{v:?} is not a number")))?;
        }
        if let Some(v) = get(ENV_DATA_DIR) {
            self.data_dir = v.into();
        }
        if let Some(v) = get(ENV_RAFT_ADDR) {
            self.raft_addr = v
                .parse()
                .map_err(|_| invalid(ENV_RAFT_ADDR, format!("{v:?} is not ip:port")))?;
        }
        if let Some(v) = get(ENV_ADMIN_ADDR) {
            self.admin_addr = v
                .parse()
                .map_err(|_| invalid(ENV_ADMIN_ADDR, format!("{v:?} is not ip:port")))?;
        }
        if let Some(v) = get(ENV_METRICS_ADDR) {
            self.metrics_addr = v
                .parse()
                .map_err(|_| invalid(ENV_METRICS_ADDR, format!("{v:?} is not ip:port")))?;
        }
        if let Some(v) = get(ENV_TLS_CA) {
            self.tls.ca_cert = v.into();
        }
        if let Some(v) = get(ENV_TLS_CERT) {
            self.tls.cert = v.into();
        }
        if let Some(v) = get(ENV_TLS_KEY) {
            self.tls.key = v.into();
        }
        if let Some(v) = get(ENV_JOIN) {
            self.join = v
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| {
                    s.trim()
                        .parse()
                        .map_err(|_| invalid(ENV_JOIN, format!("{s:?} is not ip:port")))
                })
                .collect::<Result<_, _>>()?;
        }
        if let Some(v) = get(ENV_BOOTSTRAP) {
            self.bootstrap = matches!(v.as_str(), "1" | "true" | "yes");
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.services.is_empty() || self.snat.is_some() || !self.pools.is_empty() {
            // The state machine's own rules, on an empty config.
            let r = raft_store::ClusterState::default().apply(&raft_store::Command::Batch {
                commands: self.seed_commands(),
            });
            if let Some(why) = r.rejected {
                let field = if why.starts_with("pool ") {
                    "pool"
                } else if why.contains("snat") && !why.contains("service") {
                    "snat"
                } else {
                    "service"
                };
                return Err(invalid(field, why));
            }
        }
        if self.node_id == 0 || self.node_id > u64::from(u16::MAX) {
            return Err(invalid(
                "node_id",
                "must be 1..=65535 (it is stamped into conntrack entries as 16 bits)",
            ));
        }
        if self.raft_addr.ip().is_unspecified() {
            return Err(invalid(
                "raft_addr",
                "peers dial this address: give a concrete IP, not 0.0.0.0",
            ));
        }
        if self.raft_addr.port() == 0 || self.admin_addr.port() == 0 {
            return Err(invalid("raft_addr/admin_addr", "port 0 is not allowed"));
        }
        if self.metrics_addr.port() == 0 {
            return Err(invalid("metrics_addr", "port 0 is not allowed"));
        }
        if self.metrics_addr == self.admin_addr {
            return Err(invalid(
                "metrics_addr",
                "must differ from admin_addr (one is HTTPS with client certificates, the other plain)",
            ));
        }
        if self.tls.reload_interval_ms != 0 && self.tls.reload_interval_ms < 100 {
            return Err(invalid(
                "tls.reload_interval_ms",
                "must be 0 (off) or at least 100",
            ));
        }
        self.admin.validate()?;
        if self.bootstrap && !self.join.is_empty() {
            return Err(invalid(
                "bootstrap",
                "a node either bootstraps a new cluster or joins one, not both",
            ));
        }
        let r = &self.raft;
        if r.heartbeat_ms == 0 || r.election_timeout_min_ms <= r.heartbeat_ms * 2 {
            return Err(invalid(
                "raft.election_timeout_min_ms",
                "must exceed twice raft.heartbeat_ms",
            ));
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return Err(invalid(
                "raft.election_timeout_max_ms",
                "must exceed raft.election_timeout_min_ms",
            ));
        }
        if r.snapshot_logs == 0 {
            return Err(invalid("raft.snapshot_logs", "must be at least 1"));
        }
        if self.bgp.enabled {
            if !self.datapath.enabled {
                return Err(invalid("bgp.enabled", "announcing needs the datapath"));
            }
            // The speaker's settings, as its driver reads them.
            if let Err(e) = self.bgp.announcer() {
                let msg = format!("{e:#}");
                let field = msg
                    .split(':')
                    .next()
                    .filter(|f| f.starts_with("bgp."))
                    .unwrap_or(match self.bgp.speaker {
                        holdfast_bgp::Speaker::Bird => "bgp.protocols",
                        holdfast_bgp::Speaker::Frr => "bgp.prefixes",
                    })
                    .to_string();
                return Err(invalid(&field, msg));
            }
        }
        if self.sync.enabled && self.datapath.enabled {
            if self.sync.max_batch == 0 || self.sync.max_batch > sync::wire::MAX_BATCH {
                return Err(invalid(
                    "sync.max_batch",
                    format!("must be 1..={}", sync::wire::MAX_BATCH),
                ));
            }
            if self.sync.refresh_interval_s == 0
                || self.sync.refresh_interval_s * 2
                    > self
                        .datapath
                        .udp_idle_timeout_s
                        .min(self.datapath.tcp_idle_timeout_s)
            {
                return Err(invalid(
                    "sync.refresh_interval_s",
                    "must be positive and at most half the shortest idle timeout",
                ));
            }
        }
        if self.datapath.enabled {
            self.datapath
                .options(self.node_id)
                .validate()
                .map_err(|e| match e {
                    datapath_ebpf::Error::InvalidConfig { field, reason } => {
                        invalid(&format!("datapath.{field}"), reason)
                    }
                    other => invalid("datapath", other.to_string()),
                })?;
            if self.datapath.tcp_idle_timeout_s == 0 || self.datapath.udp_idle_timeout_s == 0 {
                return Err(invalid("datapath.*_idle_timeout_s", "must be positive"));
            }
        }
        Ok(())
    }

    pub fn raft_dir(&self) -> PathBuf {
        self.data_dir.join("raft")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node_id = 1
data_dir = "/tmp/x"
raft_addr = "127.0.0.1:7001"
bootstrap = true
[tls]
ca_cert = "ca.pem"
cert = "node.pem"
key = "node.key"
[datapath]
enabled = false
"#;

    #[test]
    fn shipped_example_is_valid() {
        let text = include_str!("../../../deploy/baremetal/node.example.toml");
        let c = NodeConfig::parse(text).expect("example parses");
        c.validate().expect("example validates");
        assert_eq!(c.datapath.hash_seed, DatapathOptions::default().hash_seed);
    }

    #[test]
    fn seed_services_parse_and_follow_the_state_machine_rules() {
        let text = format!(
            "{GOOD}\n[[service]]\nname = \"dns\"\nvip = \"10.200.0.53\"\nport = 53\nproto = \"udp\"\nbackends = [\"10.1.0.5\", \"10.1.0.6\"]\n"
        );
        let c = NodeConfig::parse(&text).expect("parses");
        c.validate().expect("valid");
        let cmds = c.seed_commands();
        assert_eq!(cmds.len(), 3, "one service, two backends: {cmds:?}");
        let mut st = raft_store::ClusterState::default();
        assert!(st
            .apply(&raft_store::Command::Batch { commands: cmds })
            .rejected
            .is_none());
        assert_eq!(st.backends.len(), 2);
        // Refused by the state machine's rules: named with the field.
        let bad = text.replace("name = \"dns\"", "name = \"d n s\"");
        let e = NodeConfig::parse(&bad)
            .expect("parses")
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("invalid service"), "{e}");
        // An unknown protocol is a parse error.
        let bad = text.replace("\"udp\"", "\"sctp\"");
        assert!(NodeConfig::parse(&bad).is_err());
    }

    #[test]
    fn seed_health_checks_are_validated_by_field() {
        let text = format!(
            "{GOOD}\n[[service]]\nname = \"dns\"\nvip = \"10.200.0.53\"\nport = 53\nproto = \"udp\"\nbackends = [\"10.1.0.5\"]\n[service.health_check]\ntype = \"dns\"\nquery = \"example.com\"\ninterval_ms = 1000\ntimeout_ms = 500\n"
        );
        let c = NodeConfig::parse(&text).expect("parses");
        c.validate().expect("valid");
        let hc = c.services[0].health_check.clone().expect("check");
        assert_eq!(hc.query.as_deref(), Some("example.com"));
        let cmds = c.seed_commands();
        assert!(
            matches!(&cmds[0], raft_store::Command::PutService { service } if service.health_check.as_ref() == Some(&hc))
        );
        for (from, to, field) in [
            (
                "interval_ms = 1000",
                "interval_ms = 0",
                "health_check.interval_ms",
            ),
            (
                "timeout_ms = 500",
                "timeout_ms = 3000",
                "health_check.timeout_ms",
            ),
            ("query = \"example.com\"", "", "health_check.query"),
        ] {
            let bad = text.replace(from, to);
            let e = NodeConfig::parse(&bad)
                .expect("parses")
                .validate()
                .expect_err(field);
            assert!(e.to_string().contains(field), "{e}");
        }
        // An unknown type or field is a parse error that names it.
        let e = NodeConfig::parse(&text.replace("type = \"dns\"", "type = \"icmp\""))
            .expect_err("icmp");
        assert!(
            e.to_string().contains("type = \"icmp\"") && e.to_string().contains("line 20"),
            "{e}"
        );
        let e = NodeConfig::parse(&text.replace("interval_ms", "intervall_ms")).expect_err("typo");
        assert!(e.to_string().contains("intervall_ms"), "{e}");
    }

    #[test]
    fn seed_pools_carry_bgp_attributes_and_are_validated() {
        let text = format!(
            "{GOOD}\n[bgp]\ndrain = \"graceful-shutdown\"\n[[pool]]\nname = \"web\"\ncidr = \"10.200.0.0/24\"\ncommunities = [\"65000:100\", \"65000:1:2\"]\nlocal_pref = 200\n"
        );
        let c = NodeConfig::parse(&text).expect("parses");
        c.validate().expect("valid");
        assert_eq!(c.bgp.drain, holdfast_bgp::DrainMode::GracefulShutdown);
        assert!(matches!(
            &c.seed_commands()[0],
            raft_store::Command::PutVipPool { pool } if pool.local_pref == Some(200) && pool.communities.len() == 2
        ));
        for bad in ["65536:1", "1:2:3:4", "no-export"] {
            let e = NodeConfig::parse(&text.replace("65000:100", bad))
                .expect("parses")
                .validate()
                .expect_err(bad);
            let e = e.to_string();
            assert!(e.contains("pool") && e.contains(bad), "{e}");
        }
        let e = NodeConfig::parse(&text.replace("graceful-shutdown", "gshut")).expect_err("drain");
        assert!(e.contains("gshut"), "{e}");
    }

    #[test]
    fn parses_and_validates() {
        let c = NodeConfig::parse(GOOD).expect("good config");
        c.validate().expect("valid");
        assert_eq!(c.admin_addr, default_admin());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = NodeConfig::parse(&format!("{GOOD}\nbogus = 1\n")).unwrap_err();
        assert!(e.contains("bogus"), "{e}");
        let e = NodeConfig::parse(&GOOD.replace("enabled = false", "enabled = false\nmtuu = 9000"))
            .unwrap_err();
        assert!(e.contains("mtuu"), "{e}");
    }

    #[test]
    fn validate_names_the_field() {
        let mut c = NodeConfig::parse(GOOD).expect("parse");
        c.node_id = 0;
        assert!(c.validate().unwrap_err().to_string().contains("node_id"));
        let mut c = NodeConfig::parse(GOOD).expect("parse");
        c.raft_addr = "0.0.0.0:7001".parse().expect("a");
        assert!(c.validate().unwrap_err().to_string().contains("raft_addr"));
        let mut c = NodeConfig::parse(GOOD).expect("parse");
        c.datapath.enabled = true;
        c.datapath.mtu = 100;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("datapath.mtu"));
        let mut c = NodeConfig::parse(GOOD).expect("parse");
        c.datapath.enabled = true;
        c.datapath.syn_flood_rate = 200_000_000;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("datapath.syn_flood_rate"), "{e}");
        let mut c = NodeConfig::parse(GOOD).expect("parse");
        c.datapath.enabled = true;
        c.datapath.syn_flood_rate = 0;
        c.validate()
            .expect("syn_flood_rate 0 turns the protection off");
        let mut c = NodeConfig::parse(GOOD).expect("parse");
        c.join = vec!["127.0.0.1:1".parse().expect("a")];
        assert!(c.validate().unwrap_err().to_string().contains("bootstrap"));
        // A seeded service's client affinity: 1..=86400 s.
        let svc = |t: u32| {
            format!(
                "{GOOD}\n[[service]]\nname = \"web\"\nvip = \"10.200.0.6\"\nport = 443\nproto = \"tcp\"\naffinity_timeout_s = {t}\n"
            )
        };
        for bad in [0, 86_401] {
            let c = NodeConfig::parse(&svc(bad)).expect("parse");
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("affinity_timeout_s"), "{bad}: {e}");
        }
        let c = NodeConfig::parse(&svc(600)).expect("parse");
        c.validate().expect("600 s");
        assert_eq!(c.services[0].affinity_timeout_s, Some(600));
    }

    #[test]
    fn environment_overrides() {
        let mut c = NodeConfig::parse(GOOD).expect("parse");
        c.apply_env(|k| match k {
            ENV_NODE_ID => Some("7".into()),
            ENV_JOIN => Some("127.0.0.1:1, 127.0.0.1:2".into()),
            ENV_BOOTSTRAP => Some("false".into()),
            _ => None,
        })
        .expect("env");
        assert_eq!(c.node_id, 7);
        assert_eq!(c.join.len(), 2);
        assert!(!c.bootstrap);
        let e = c
            .apply_env(|k| (k == ENV_RAFT_ADDR).then(|| "nope".into()))
            .unwrap_err();
        assert!(e.to_string().contains(ENV_RAFT_ADDR));
    }
}
