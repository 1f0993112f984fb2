//! The command line: global options and every subcommand.

use std::{net::IpAddr, path::PathBuf};

use clap::{Parser, Subcommand, ValueEnum};
use raft_store::cluster::{CheckKind, ForwardingMode, HealthCheck, OnDown, Via};

use crate::error::Failure;

/// Environment variables of clusterctl.
pub const ENV_CONFIG: &str = "HOLDFAST_CLUSTERCTL_CONFIG";

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

#[derive(Parser)]
#[command(version, about = "Operate a Holdfast L4 load-balancer cluster")]
pub struct Cli {
    /// Admin API address of any node of the cluster [default: clusterctl.toml's
    /// `node`, else 127.0.0.1:7101].
    #[arg(long = "node", global = true, env = "HOLDFAST_ADMIN")]
    pub node_api: Option<String>,
    /// The cluster CA certificate (PEM) the node's certificate must chain to.
    #[arg(long, global = true, env = "HOLDFAST_CA")]
    pub ca: Option<PathBuf>,
    /// Your client certificate (PEM), from `clusterctl certs issue --client`.
    #[arg(long, global = true, env = "HOLDFAST_CERT")]
    pub cert: Option<PathBuf>,
    /// The key of --cert.
    #[arg(long, global = true, env = "HOLDFAST_KEY")]
    pub key: Option<PathBuf>,
    /// Verify the node's certificate against this name instead of the
    /// address dialed (e.g. node-3.holdfast).
    #[arg(long, global = true, env = "HOLDFAST_SERVER_NAME")]
    pub server_name: Option<String>,
    /// Config file [default: $XDG_CONFIG_HOME/holdfast/clusterctl.toml,
    /// ~/.config/holdfast/clusterctl.toml, /etc/holdfast/clusterctl.toml].
    #[arg(long, global = true, env = ENV_CONFIG)]
    pub config: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value = "table")]
    pub output: Output,
    /// How long a write may take, retrying through leader changes.
    #[arg(long, global = true, default_value = "10")]
    pub timeout_s: u64,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// This node's Raft and datapath status.
    Status,
    /// Withdraw a node's VIPs over BGP (it stays a member; its flows
    /// move to the other nodes, which hold their conntrack entries).
    Drain {
        /// The node, by its id (found through `members`); none: the node
        /// clusterctl talks to (--node).
        node_id: Option<u64>,
        /// Wait until the routers have moved the node's traffic away (its
        /// datapath saw no VIP packet for --quiet-ms), then say it can be
        /// stopped; exit 6 if that does not happen within --max-wait-s.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 1000, requires = "wait")]
        quiet_ms: u64,
        #[arg(long, default_value_t = 60, requires = "wait")]
        max_wait_s: u64,
    },
    /// Announce a node's VIPs again (when it is ready).
    Undrain {
        /// The node, by its id; none: the node clusterctl talks to.
        node_id: Option<u64>,
    },
    /// Live view: per-service rates over all nodes and per-node health.
    Top {
        /// Seconds between the two samples of each refresh.
        #[arg(long, default_value = "1")]
        interval_s: f64,
        /// Print one view and exit.
        #[arg(long)]
        once: bool,
    },
    /// One row per member: role, term, log, lag, heartbeat, epoch, datapath.
    Members,
    /// The whole replicated config.
    Config,
    /// List, add or remove services.
    Services {
        #[command(subcommand)]
        cmd: Option<SvcCmd>,
    },
    /// List, add, remove, drain or re-weight backends.
    Backends {
        #[command(subcommand)]
        cmd: Option<BeCmd>,
    },
    /// Add a node to the cluster (learner, then voter).
    Join {
        #[arg(long)]
        node_id: u64,
        #[arg(long)]
        raft_addr: String,
        #[arg(long)]
        admin_addr: String,
        #[arg(long)]
        bgp_next_hop: Option<IpAddr>,
    },
    /// Remove a node from the cluster (gracefully: it stops being a voter).
    Leave {
        #[arg(long)]
        node_id: u64,
    },
    /// Same as leave, for a node that is gone.
    Remove {
        #[arg(long)]
        node_id: u64,
    },
    /// Conntrack entries of a node, with the node that created each.
    Conntrack {
        /// Node whose map to list (default: the node --node points at).
        #[arg(long)]
        node_id: Option<u64>,
        /// Only flows to this VIP.
        #[arg(long)]
        vip: Option<IpAddr>,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Cluster CA, node and client certificates; the revocation list.
    Certs {
        #[command(subcommand)]
        cmd: CertCmd,
    },
    /// The SNAT pools and every node's SNAT address.
    Snat {
        #[command(subcommand)]
        cmd: Option<SnatCmd>,
    },
    /// VIP pools (Kubernetes LoadBalancer addresses come from them) and
    /// the BGP attributes of what the nodes announce inside them.
    Pools {
        #[command(subcommand)]
        cmd: Option<PoolCmd>,
    },
}

#[derive(Subcommand)]
pub enum PoolCmd {
    /// Every pool with its attributes.
    List,
    /// Add a pool or replace one (its attributes included).
    Set {
        name: String,
        /// The pool, e.g. 10.200.0.0/24.
        cidr: String,
        /// A BGP community of the announced prefixes inside it: ASN:VALUE
        /// or ASN:DATA1:DATA2 (large); repeat for more.
        #[arg(long = "community")]
        communities: Vec<String>,
        /// LOCAL_PREF of those prefixes (iBGP peers).
        #[arg(long)]
        local_pref: Option<u32>,
    },
    Remove {
        name: String,
    },
}

#[derive(Subcommand)]
pub enum SnatCmd {
    /// The pools and which node holds which address.
    List,
    /// Set the pools (a family left out has no SNAT address); nodes get an
    /// address each, kept by node id.
    Set {
        /// IPv4 pool, e.g. 10.88.3.0/28.
        #[arg(long)]
        v4: Option<String>,
        /// IPv6 pool, e.g. fd88:3::/120.
        #[arg(long)]
        v6: Option<String>,
    },
    /// Free the SNAT address of a node that left for good (its SNAT flows
    /// are gone).
    Release {
        #[arg(long)]
        node_id: u64,
    },
}

fn parse_forwarding(s: &str) -> Result<ForwardingMode, String> {
    s.parse()
}

fn parse_affinity(s: &str) -> Result<u32, String> {
    let max = raft_store::cluster::MAX_AFFINITY_TIMEOUT_S;
    s.parse::<u32>()
        .ok()
        .filter(|t| (1..=max).contains(t))
        .ok_or_else(|| format!("{s:?}: seconds, 1..={max}"))
}

#[derive(Subcommand)]
pub enum SvcCmd {
    List,
    Add {
        name: String,
        #[arg(long)]
        vip: IpAddr,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "tcp")]
        proto: String,
        #[arg(long, default_value_t = 65537)]
        table_size: u32,
        /// dsr (IPIP; the backend answers the client directly) or snat
        /// (both addresses rewritten; the backend needs nothing).
        #[arg(long, default_value = "dsr", value_parser = parse_forwarding)]
        forwarding: ForwardingMode,
        /// Clients that may reach the service: CIDRs, comma-separated
        /// (default: every client).
        #[arg(long, value_delimiter = ',')]
        source_ranges: Vec<String>,
        /// Client affinity: each client's new flows go to its backend
        /// until it has been idle this many seconds (Kubernetes
        /// sessionAffinity: ClientIP; its default is 10800).
        #[arg(long, value_name = "SECONDS", value_parser = parse_affinity)]
        affinity: Option<u32>,
        #[command(flatten)]
        check: CheckArgs,
    },
    /// Change a service: its forwarding mode (new flows only: an
    /// established flow keeps its mode) or its table size.
    Set {
        name: String,
        #[arg(long, value_parser = parse_forwarding)]
        forwarding: Option<ForwardingMode>,
        #[arg(long)]
        table_size: Option<u32>,
        /// Replace the clients that may reach the service (CIDRs,
        /// comma-separated; narrowing also stops open flows from outside).
        #[arg(long, value_delimiter = ',', num_args = 1.., conflicts_with = "any_source")]
        source_ranges: Option<Vec<String>>,
        /// Let every client reach the service (remove its source ranges).
        #[arg(long)]
        any_source: bool,
        /// Client affinity with this timeout in seconds (see `add`).
        #[arg(long, value_name = "SECONDS", value_parser = parse_affinity, conflicts_with = "no_affinity")]
        affinity: Option<u32>,
        /// Remove client affinity: each new flow is placed on its own.
        #[arg(long)]
        no_affinity: bool,
    },
    Remove {
        name: String,
    },
    /// Set (or with --none remove) the health check of a service.
    Check {
        name: String,
        #[command(flatten)]
        check: CheckArgs,
        /// Remove the service's check (every backend counts as healthy).
        #[arg(long, conflicts_with = "check_type")]
        none: bool,
    },
}

/// A health check on the command line (`--check TYPE` and its settings;
/// the defaults are those of `[service.health_check]`).
#[derive(clap::Args, Clone, Default)]
pub struct CheckArgs {
    /// Check type: tcp, http, https, udp or dns.
    #[arg(long = "check", id = "check_type", value_parser = parse_kind)]
    pub kind: Option<CheckKind>,
    /// Port checked on the backend (default: the backend's port).
    #[arg(long)]
    pub check_port: Option<u16>,
    #[arg(long, default_value_t = raft_store::health::DEFAULT_INTERVAL_MS)]
    pub check_interval_ms: u32,
    #[arg(long, default_value_t = raft_store::health::DEFAULT_TIMEOUT_MS)]
    pub check_timeout_ms: u32,
    /// Consecutive passes before a node sees a down backend up.
    #[arg(long, default_value_t = raft_store::health::DEFAULT_RISE)]
    pub check_rise: u32,
    /// Consecutive failures before a node sees an up backend down.
    #[arg(long, default_value_t = raft_store::health::DEFAULT_FALL)]
    pub check_fall: u32,
    /// A backend marked down stays down at least this long.
    #[arg(long, default_value_t = raft_store::health::DEFAULT_HOLD_DOWN_MS)]
    pub check_hold_down_ms: u32,
    /// http/https: request path.
    #[arg(long)]
    pub check_path: Option<String>,
    /// http/https: Host header.
    #[arg(long)]
    pub check_host: Option<String>,
    /// http/https: the status that passes (default 200).
    #[arg(long)]
    pub check_status: Option<u16>,
    /// udp: the datagram sent.
    #[arg(long)]
    pub check_send: Option<String>,
    /// udp: the answer must start with this.
    #[arg(long)]
    pub check_expect: Option<String>,
    /// dns: the name queried (type A).
    #[arg(long)]
    pub check_query: Option<String>,
    /// Established flows of a backend marked down: keep or repick
    /// (default: keep for TCP, repick for UDP).
    #[arg(long, value_parser = parse_on_down)]
    pub on_down: Option<OnDown>,
    /// direct (to the backend's address) or vip (to the VIP, encapsulated
    /// like client packets: covers the decap agent; tcp, udp, dns).
    #[arg(long, value_parser = parse_via)]
    pub check_via: Option<Via>,
}

pub fn parse_via(s: &str) -> Result<Via, String> {
    s.parse()
}

pub fn parse_kind(s: &str) -> Result<CheckKind, String> {
    s.parse()
}

pub fn parse_on_down(s: &str) -> Result<OnDown, String> {
    s.parse()
}

impl CheckArgs {
    /// The check, validated for a service on `port` (the message names the
    /// field at fault); None without --check.
    pub fn build(&self, port: u16) -> Result<Option<HealthCheck>, Failure> {
        let Some(kind) = self.kind else {
            let stray = [
                ("--check-path", self.check_path.is_some()),
                ("--check-host", self.check_host.is_some()),
                ("--check-status", self.check_status.is_some()),
                ("--check-send", self.check_send.is_some()),
                ("--check-expect", self.check_expect.is_some()),
                ("--check-query", self.check_query.is_some()),
                ("--check-port", self.check_port.is_some()),
                ("--on-down", self.on_down.is_some()),
                ("--check-via", self.check_via.is_some()),
            ];
            if let Some((flag, _)) = stray.iter().find(|(_, set)| *set) {
                return Err(Failure::Usage(format!("{flag} needs --check TYPE")));
            }
            return Ok(None);
        };
        let c = HealthCheck {
            kind,
            port: self.check_port,
            interval_ms: self.check_interval_ms,
            timeout_ms: self.check_timeout_ms,
            rise: self.check_rise,
            fall: self.check_fall,
            hold_down_ms: self.check_hold_down_ms,
            path: self.check_path.clone(),
            host: self.check_host.clone(),
            expect_status: self.check_status,
            send: self.check_send.clone(),
            expect: self.check_expect.clone(),
            query: self.check_query.clone(),
            on_down: self.on_down,
            via: self.check_via.unwrap_or_default(),
        };
        c.validate(port).map_err(Failure::Usage)?;
        Ok(Some(c))
    }
}

#[derive(Subcommand)]
pub enum BeCmd {
    List {
        #[arg(long)]
        service: Option<String>,
    },
    Add {
        #[arg(long)]
        service: String,
        #[arg(long)]
        addr: IpAddr,
        /// The port the backend listens on (default: the service's). DSR to
        /// another port needs holdfast-decap on the backend host, which
        /// turns the answers back to the service port.
        #[arg(long)]
        port: Option<u16>,
        #[arg(long, default_value_t = 1)]
        weight: u32,
    },
    Remove {
        id: u32,
    },
    /// Keep its flows, send it no new ones.
    Drain {
        id: u32,
    },
    Undrain {
        id: u32,
    },
    Weight {
        id: u32,
        weight: u32,
    },
}

#[derive(Subcommand)]
pub enum CertCmd {
    /// Create the cluster CA (ca.pem, ca.key) in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "holdfast")]
        cluster: String,
    },
    /// Issue node-N.pem/.key (--node-id N --ip ADDR...) or a client
    /// certificate client-NAME.pem/.key (--client NAME --role ROLE; --admin
    /// NAME is --client NAME --role admin).
    Issue {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        node_id: Option<u64>,
        #[arg(long)]
        ip: Vec<IpAddr>,
        #[arg(long)]
        client: Option<String>,
        /// admin, operator or viewer.
        #[arg(long)]
        role: Option<String>,
        #[arg(long)]
        admin: Option<String>,
        /// Validity in days.
        #[arg(long, default_value_t = holdfast_pki::DEFAULT_CERT_DAYS)]
        days: u32,
    },
    /// Subject, role, serial and validity of a certificate file.
    Show { file: PathBuf },
    /// Revoke a certificate cluster-wide (by --serial, or the serial of --file).
    Revoke {
        #[arg(long)]
        serial: Option<String>,
        #[arg(long)]
        file: Option<PathBuf>,
        /// Whose certificate and why (kept in the list).
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Take a serial off the revocation list.
    Unrevoke {
        #[arg(long)]
        serial: String,
    },
    /// The revocation list.
    Revoked,
}
