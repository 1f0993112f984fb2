//! clusterctl: the operator's CLI for a Holdfast cluster. Talks to the admin
//! API of any node (`--node`, or HOLDFAST_ADMIN) over HTTPS with a client
//! certificate from the cluster CA (`--cert/--key/--ca`, HOLDFAST_CERT /
//! HOLDFAST_KEY / HOLDFAST_CA, or clusterctl.toml); writes go to the leader.
//!
//! Exit codes: 0 success; 2 bad arguments or request; 3 node unreachable;
//! 4 no leader / cluster unavailable; 5 command rejected (the reason is
//! printed); 6 any other failure; 7 refused: no or untrusted certificate,
//! role too weak, or the server's certificate does not verify.

use std::{net::IpAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{anyhow, Context};
use clap::{Parser, Subcommand, ValueEnum};
use node::{
    auth::Role,
    client::{Client, ClientError},
    tls,
    wire::{HealthTable, LocalStatus, MemberRow, NodeView, RemoveRequest},
};
use raft_store::{
    cluster::{
        BackendState, CheckKind, ForwardingMode, HealthCheck, Member, OnDown, Proto, Revocation,
        Service, Via,
    },
    ClusterState, Command, Request, Response,
};
use rustls::pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};

/// Environment variables of clusterctl.
const ENV_CONFIG: &str = "HOLDFAST_CLUSTERCTL_CONFIG";

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Json,
}

#[derive(Parser)]
#[command(version, about = "Operate a Holdfast L4 load-balancer cluster")]
struct Cli {
    /// Admin API address of any node of the cluster [default: clusterctl.toml's
    /// `node`, else 127.0.0.1:7101].
    #[arg(long = "node", global = true, env = "HOLDFAST_ADMIN")]
    node_api: Option<String>,
    /// The cluster CA certificate (PEM) the node's certificate must chain to.
    #[arg(long, global = true, env = "HOLDFAST_CA")]
    ca: Option<PathBuf>,
    /// Your client certificate (PEM), from `clusterctl certs issue --client`.
    #[arg(long, global = true, env = "HOLDFAST_CERT")]
    cert: Option<PathBuf>,
    /// The key of --cert.
    #[arg(long, global = true, env = "HOLDFAST_KEY")]
    key: Option<PathBuf>,
    /// Verify the node's certificate against this name instead of the
    /// address dialed (e.g. node-3.holdfast).
    #[arg(long, global = true, env = "HOLDFAST_SERVER_NAME")]
    server_name: Option<String>,
    /// Config file [default: $XDG_CONFIG_HOME/holdfast/clusterctl.toml,
    /// ~/.config/holdfast/clusterctl.toml, /etc/holdfast/clusterctl.toml].
    #[arg(long, global = true, env = ENV_CONFIG)]
    config: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value = "table")]
    output: Output,
    /// How long a write may take, retrying through leader changes.
    #[arg(long, global = true, default_value = "10")]
    timeout_s: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// This node's Raft and datapath status.
    Status,
    /// Withdraw this node's VIPs over BGP (it stays a member; its flows
    /// move to the other nodes, which hold their conntrack entries).
    Drain,
    /// Announce this node's VIPs again (when it is ready).
    Undrain,
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
}

#[derive(Subcommand)]
enum SvcCmd {
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
        #[command(flatten)]
        check: CheckArgs,
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
struct CheckArgs {
    /// Check type: tcp, http, https, udp or dns.
    #[arg(long = "check", id = "check_type", value_parser = parse_kind)]
    kind: Option<CheckKind>,
    /// Port checked on the backend (default: the backend's port).
    #[arg(long)]
    check_port: Option<u16>,
    #[arg(long, default_value_t = raft_store::health::DEFAULT_INTERVAL_MS)]
    check_interval_ms: u32,
    #[arg(long, default_value_t = raft_store::health::DEFAULT_TIMEOUT_MS)]
    check_timeout_ms: u32,
    /// Consecutive passes before a node sees a down backend up.
    #[arg(long, default_value_t = raft_store::health::DEFAULT_RISE)]
    check_rise: u32,
    /// Consecutive failures before a node sees an up backend down.
    #[arg(long, default_value_t = raft_store::health::DEFAULT_FALL)]
    check_fall: u32,
    /// A backend marked down stays down at least this long.
    #[arg(long, default_value_t = raft_store::health::DEFAULT_HOLD_DOWN_MS)]
    check_hold_down_ms: u32,
    /// http/https: request path.
    #[arg(long)]
    check_path: Option<String>,
    /// http/https: Host header.
    #[arg(long)]
    check_host: Option<String>,
    /// http/https: the status that passes (default 200).
    #[arg(long)]
    check_status: Option<u16>,
    /// udp: the datagram sent.
    #[arg(long)]
    check_send: Option<String>,
    /// udp: the answer must start with this.
    #[arg(long)]
    check_expect: Option<String>,
    /// dns: the name queried (type A).
    #[arg(long)]
    check_query: Option<String>,
    /// Established flows of a backend marked down: keep or repick
    /// (default: keep for TCP, repick for UDP).
    #[arg(long, value_parser = parse_on_down)]
    on_down: Option<OnDown>,
    /// direct (to the backend's address) or vip (to the VIP, encapsulated
    /// like client packets: covers the decap agent; tcp, udp, dns).
    #[arg(long, value_parser = parse_via)]
    check_via: Option<Via>,
}

fn parse_via(s: &str) -> Result<Via, String> {
    s.parse()
}

fn parse_kind(s: &str) -> Result<CheckKind, String> {
    s.parse()
}

fn parse_on_down(s: &str) -> Result<OnDown, String> {
    s.parse()
}

impl CheckArgs {
    /// The check, validated for a service on `port` (the message names the
    /// field at fault); None without --check.
    fn build(&self, port: u16) -> Result<Option<HealthCheck>, Failure> {
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
enum BeCmd {
    List {
        #[arg(long)]
        service: Option<String>,
    },
    Add {
        #[arg(long)]
        service: String,
        #[arg(long)]
        addr: IpAddr,
        /// Defaults to the service's port (DSR keeps the port).
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
enum CertCmd {
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
        #[arg(long, default_value_t = tls::DEFAULT_CERT_DAYS)]
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

/// clusterctl.toml: defaults for the global options.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    node: Option<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    server_name: Option<String>,
}

/// Where the config file is looked for, in order.
fn config_candidates() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|x| !x.is_empty()) {
        v.push(PathBuf::from(x).join("holdfast/clusterctl.toml"));
    }
    if let Some(h) = std::env::var_os("HOME").filter(|x| !x.is_empty()) {
        v.push(PathBuf::from(h).join(".config/holdfast/clusterctl.toml"));
    }
    v.push(PathBuf::from("/etc/holdfast/clusterctl.toml"));
    v
}

/// The options in effect: flag, else environment, else config file.
struct Settings {
    node: String,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    server_name: Option<String>,
    /// The file the defaults came from, for messages.
    file: Option<PathBuf>,
}

impl Settings {
    fn resolve(cli: &Cli) -> anyhow::Result<Self> {
        let (file, fc) = match &cli.config {
            Some(p) => (Some(p.clone()), Some(read_config(p)?)),
            None => match config_candidates().into_iter().find(|p| p.exists()) {
                Some(p) => {
                    let c = read_config(&p)?;
                    (Some(p), Some(c))
                }
                None => (None, None),
            },
        };
        let fc = fc.unwrap_or_default();
        Ok(Self {
            node: cli
                .node_api
                .clone()
                .or(fc.node)
                .unwrap_or_else(|| "127.0.0.1:7101".into()),
            ca: cli.ca.clone().or(fc.ca),
            cert: cli.cert.clone().or(fc.cert),
            key: cli.key.clone().or(fc.key),
            server_name: cli.server_name.clone().or(fc.server_name),
            file,
        })
    }

    /// The admin API client, or why there is none.
    fn client(&self) -> Result<Client, Failure> {
        let hint = match &self.file {
            Some(f) => format!("--cert/--key/--ca, HOLDFAST_CERT/HOLDFAST_KEY/HOLDFAST_CA, or {}", f.display()),
            None => "--cert/--key/--ca, HOLDFAST_CERT/HOLDFAST_KEY/HOLDFAST_CA, or ~/.config/holdfast/clusterctl.toml".into(),
        };
        let (Some(cert), Some(key)) = (&self.cert, &self.key) else {
            return Err(Failure::Auth(format!(
                "no client certificate: the admin API accepts only certificates from the cluster CA; give {hint} (issue one with `clusterctl certs issue --client NAME --role admin|operator|viewer`)"
            )));
        };
        let Some(ca) = &self.ca else {
            return Err(Failure::Auth(format!(
                "no CA certificate to verify the node with: give {hint}"
            )));
        };
        let id = tls::Identity::load(ca, cert, key).map_err(|e| Failure::Auth(format!("{e:#}")))?;
        let c = Client::from_identity(&id).map_err(|e| Failure::Auth(format!("{e:#}")))?;
        Ok(match &self.server_name {
            Some(n) => c.with_server_name(n.clone()),
            None => c,
        })
    }
}

fn read_config(p: &std::path::Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))
}

enum Failure {
    Client(ClientError),
    /// Bad arguments found after parsing (exit 2).
    Usage(String),
    /// No usable credentials (exit 7).
    Auth(String),
    Other(anyhow::Error),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure::Client(e)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Other(e)
    }
}

fn print<T: Serialize>(
    out: Output,
    v: &T,
    table: impl FnOnce(&T) -> String,
) -> Result<(), Failure> {
    match out {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(v).map_err(|e| anyhow!(e))?
        ),
        Output::Table => print!("{}", table(v)),
    }
    Ok(())
}

fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            if i >= width.len() {
                width.push(0);
            }
            width[i] = width[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = width[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
            + "\n"
    };
    let mut s = line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        s += &line(r);
    }
    s
}

/// A row of `clusterctl backends`: the backend as configured, with each
/// node's view of its checks.
#[derive(Serialize)]
struct BackendRow {
    #[serde(flatten)]
    backend: raft_store::cluster::Backend,
    /// Its service has a health check.
    checked: bool,
    /// Each node's view (from the leader), empty without a check.
    views: Vec<NodeView>,
    /// Nodes whose fresh view differs from the tier's verdict.
    disagree: Vec<u64>,
}

/// "1:up 2:down(connect refused) 3:up"; a stale view is marked "?".
fn views_cell(r: &BackendRow) -> String {
    if r.views.is_empty() {
        return "-".into();
    }
    r.views
        .iter()
        .map(|v| {
            let st = if v.up { "up" } else { "down" };
            let stale = if v.fresh { "" } else { "?" };
            if v.up {
                format!("{}:{st}{stale}", v.node_id)
            } else {
                format!("{}:{st}{stale}({})", v.node_id, v.detail)
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref()
        .map(|x| x.to_string())
        .unwrap_or_else(|| "-".into())
}

fn request_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("clusterctl-{}-{nanos}", std::process::id())
}

/// What a command talks to: the node and the client.
struct Ctx<'a> {
    cli: &'a Cli,
    node: String,
    client: Client,
}

impl Ctx<'_> {
    fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.client
            .get(&self.node, path, Duration::from_secs(self.cli.timeout_s))
    }
}

/// POST a write, retrying through leader changes; the same request id makes
/// retries apply at most once.
fn write<B: Serialize>(cx: &Ctx, path: &str, body: &B) -> Result<Response, ClientError> {
    cx.client.post_retry(
        std::slice::from_ref(&cx.node),
        path,
        body,
        Duration::from_secs(cx.cli.timeout_s),
    )
}

fn command(cx: &Ctx, command: Command) -> Result<Response, ClientError> {
    write(
        cx,
        "/command",
        &Request {
            id: Some(request_id()),
            command,
            trace: None,
        },
    )
}

fn applied(cli: &Cli, r: Response) -> Result<(), Failure> {
    print(cli.output, &r, |r| {
        if r.backend_ids.is_empty() {
            format!("applied at epoch {}\n", r.epoch)
        } else {
            format!(
                "applied at epoch {}; backend id {}\n",
                r.epoch,
                r.backend_ids
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    })
}

fn run(cli: &Cli) -> Result<(), Failure> {
    if let Cmd::Certs { cmd } = &cli.cmd {
        if let Some(r) = certs_local(cli, cmd) {
            return r;
        }
    }
    let settings = Settings::resolve(cli)?;
    let cx = Ctx {
        cli,
        client: settings.client()?,
        node: settings.node.clone(),
    };
    let t = Duration::from_secs(cli.timeout_s);
    match &cli.cmd {
        Cmd::Top { interval_s, once } => {
            let (interval_s, once) = (*interval_s, *once);
            if !(interval_s > 0.0 && interval_s <= 3600.0) {
                return Err(Failure::Other(anyhow!("--interval-s must be in (0, 3600]")));
            }
            let interval = Duration::from_secs_f64(interval_s);
            loop {
                let v = node::top::sample(&cx.client, &cx.node, interval)?;
                if !once && matches!(cli.output, Output::Table) {
                    // Clear the screen and go home.
                    print!("\x1b[2J\x1b[H");
                }
                print(cli.output, &v, |v| {
                    let mut s = table(
                        &[
                            "SERVICE",
                            "PKT/S",
                            "BYTES/S",
                            "NEW FLOWS/S",
                            "MIDFLOW MISS/S",
                        ],
                        v.services
                            .iter()
                            .map(|r| {
                                vec![
                                    r.service.clone(),
                                    format!("{:.0}", r.packets_per_s),
                                    format!("{:.0}", r.bytes_per_s),
                                    format!("{:.1}", r.new_flows_per_s),
                                    format!("{:.1}", r.midflow_misses_per_s),
                                ]
                            })
                            .collect(),
                    );
                    s.push('\n');
                    s += &table(
                        &["NODE", "ROLE", "EPOCH", "CONNTRACK", "SYNC", "BGP"],
                        v.nodes
                            .iter()
                            .map(|n| {
                                vec![
                                    n.node_id.to_string(),
                                    n.role.clone().unwrap_or_else(|| "unreachable".into()),
                                    opt(&n.applied_epoch),
                                    opt(&n.conntrack_entries),
                                    match n.sync_ready {
                                        Some(true) => "ready".into(),
                                        Some(false) => "joining".into(),
                                        None => "-".into(),
                                    },
                                    match n.bgp_announced {
                                        Some(true) => "announced".into(),
                                        Some(false) => "withdrawn".into(),
                                        None => "-".into(),
                                    },
                                ]
                            })
                            .collect(),
                    );
                    s
                })?;
                if once {
                    break;
                }
            }
            Ok(())
        }
        Cmd::Drain | Cmd::Undrain => {
            let drain = matches!(cli.cmd, Cmd::Drain);
            let s: LocalStatus =
                cx.client
                    .post(&cx.node, "/drain", &node::wire::DrainRequest { drain }, t)?;
            print(cli.output, &s, |s| {
                format!(
                    "node {}: {} (BGP {})\n",
                    s.node_id,
                    if s.draining { "drained" } else { "not drained" },
                    match s.bgp_announced {
                        Some(true) => "announced",
                        Some(false) => "withdrawn",
                        None => "off",
                    }
                )
            })
        }
        Cmd::Status => {
            let s: LocalStatus = cx.get("/status")?;
            print(cli.output, &s, |s| {
                format!(
                    "node {} ({}) {} term {} leader {} log {} applied {} config epoch {} datapath epoch {} datapath {}\n",
                    s.node_id,
                    s.raft_addr,
                    s.role,
                    s.term,
                    opt(&s.leader),
                    opt(&s.last_log_index),
                    opt(&s.last_applied_index),
                    s.config_epoch,
                    s.applied_epoch,
                    if !s.datapath_enabled {
                        "disabled"
                    } else if s.datapath_attached {
                        "attached"
                    } else {
                        "loaded"
                    }
                )
            })
        }
        Cmd::Members => {
            let rows: Vec<MemberRow> = cx.get("/cluster/members")?;
            print(cli.output, &rows, |rows| {
                table(
                    &[
                        "ID",
                        "RAFT ADDR",
                        "ROLE",
                        "TERM",
                        "LAST LOG",
                        "APPLIED",
                        "LAG",
                        "HEARTBEAT",
                        "EPOCH",
                        "DATAPATH",
                        "CONNTRACK",
                        "SYNC",
                        "SYNC LAG P99",
                        "BGP",
                    ],
                    rows.iter()
                        .map(|r| {
                            vec![
                                r.node_id.to_string(),
                                r.raft_addr.clone(),
                                r.role.clone().unwrap_or_else(|| {
                                    format!("unreachable ({})", r.error.clone().unwrap_or_default())
                                }),
                                opt(&r.term),
                                opt(&r.last_log_index),
                                opt(&r.last_applied_index),
                                opt(&r.lag),
                                r.heartbeat_age_ms
                                    .map(|a| format!("{a}ms"))
                                    .unwrap_or_else(|| "-".into()),
                                opt(&r.applied_epoch),
                                match r.datapath_attached {
                                    Some(true) => "attached".into(),
                                    Some(false) => "detached".into(),
                                    None => "-".into(),
                                },
                                opt(&r.conntrack_entries),
                                match (r.sync_ready, r.sync_peers_connected) {
                                    (Some(true), Some(n)) => format!("ready ({n} peers)"),
                                    (Some(false), _) => "joining".into(),
                                    _ => "-".into(),
                                },
                                r.sync_lag_p99_ms
                                    .map(|l| format!("{l:.2}ms"))
                                    .unwrap_or_else(|| "-".into()),
                                match r.bgp_announced {
                                    Some(true) => "announced".into(),
                                    Some(false) => "withdrawn".into(),
                                    None => "-".into(),
                                },
                            ]
                        })
                        .collect(),
                )
            })
        }
        Cmd::Config => {
            let c: ClusterState = cx.get("/config")?;
            print(cli.output, &c, |c| {
                serde_json::to_string_pretty(c).unwrap_or_default() + "\n"
            })
        }
        Cmd::Services { cmd } => match cmd.as_ref().unwrap_or(&SvcCmd::List) {
            SvcCmd::List => {
                let c: ClusterState = cx.get("/config")?;
                let list: Vec<&Service> = c.services.values().collect();
                print(cli.output, &list, |list| {
                    table(
                        &["NAME", "VIP", "PORT", "PROTO", "TABLE", "BACKENDS", "CHECK"],
                        list.iter()
                            .map(|s| {
                                vec![
                                    s.name.clone(),
                                    s.vip.to_string(),
                                    s.port.to_string(),
                                    s.proto.to_string(),
                                    s.table_size.to_string(),
                                    c.backends_of(&s.name).count().to_string(),
                                    s.health_check
                                        .as_ref()
                                        .map(|h| {
                                            format!(
                                                "{} every {} ms, rise {} fall {}",
                                                h.kind, h.interval_ms, h.rise, h.fall
                                            )
                                        })
                                        .unwrap_or_else(|| "-".into()),
                                ]
                            })
                            .collect(),
                    )
                })
            }
            SvcCmd::Add {
                name,
                vip,
                port,
                proto,
                table_size,
                check,
            } => {
                let health_check = check.build(*port)?;
                let proto = match proto.to_ascii_lowercase().as_str() {
                    "tcp" => Proto::Tcp,
                    "udp" => Proto::Udp,
                    other => return Err(anyhow!("--proto {other:?}: use tcp or udp").into()),
                };
                let r = command(
                    &cx,
                    Command::PutService {
                        service: Service {
                            name: name.clone(),
                            vip: *vip,
                            port: *port,
                            proto,
                            table_size: *table_size,
                            mode: ForwardingMode::Dsr,
                            health_check,
                        },
                    },
                )?;
                applied(cli, r)
            }
            SvcCmd::Remove { name } => {
                let r = command(&cx, Command::RemoveService { name: name.clone() })?;
                applied(cli, r)
            }
            SvcCmd::Check { name, check, none } => {
                let c: ClusterState = cx.get("/config")?;
                let mut svc = c
                    .services
                    .get(name)
                    .cloned()
                    .ok_or_else(|| Failure::Usage(format!("no service {name:?}")))?;
                svc.health_check = match (none, check.build(svc.port)?) {
                    (true, _) => None,
                    (false, Some(hc)) => Some(hc),
                    (false, None) => {
                        return Err(Failure::Usage(
                            "give --check TYPE (and its settings) or --none".into(),
                        ))
                    }
                };
                applied(cli, command(&cx, Command::PutService { service: svc })?)
            }
        },
        Cmd::Backends { cmd } => match cmd.as_ref().unwrap_or(&BeCmd::List { service: None }) {
            BeCmd::List { service } => {
                let c: ClusterState = cx.get("/config")?;
                let checked = c.services.values().any(|s| s.health_check.is_some());
                // Each node's view lives on the leader (GET /health).
                let (health, health_error) = if checked {
                    match cx.get::<HealthTable>("/health") {
                        Ok(t) => (Some(t), None),
                        Err(e) => (None, Some(e.to_string())),
                    }
                } else {
                    (None, None)
                };
                let rows: Vec<BackendRow> = c
                    .backends
                    .values()
                    .filter(|b| service.as_ref().is_none_or(|s| &b.service == s))
                    .map(|b| {
                        let row = health
                            .as_ref()
                            .and_then(|t| t.backends.iter().find(|r| r.backend_id == b.id));
                        let checked = c
                            .services
                            .get(&b.service)
                            .is_some_and(|s| s.health_check.is_some());
                        BackendRow {
                            backend: b.clone(),
                            checked,
                            views: row.map(|r| r.views.clone()).unwrap_or_default(),
                            disagree: row.map(|r| r.disagree.clone()).unwrap_or_default(),
                        }
                    })
                    .collect();
                if let Some(e) = &health_error {
                    eprintln!("clusterctl: the nodes' views are not shown: {e}");
                }
                print(cli.output, &rows, |list| {
                    let mut t = table(
                        &[
                            "ID", "SERVICE", "ADDRESS", "PORT", "WEIGHT", "STATE", "HEALTH",
                            "VIEWS",
                        ],
                        list.iter()
                            .map(|r| {
                                let b = &r.backend;
                                vec![
                                    b.id.to_string(),
                                    b.service.clone(),
                                    b.addr.to_string(),
                                    b.port.to_string(),
                                    b.weight.to_string(),
                                    format!("{:?}", b.state).to_lowercase(),
                                    if r.checked {
                                        b.health.to_string()
                                    } else {
                                        "-".into()
                                    },
                                    views_cell(r),
                                ]
                            })
                            .collect(),
                    );
                    if let Some(h) = &health {
                        for (svc, why) in &h.panic {
                            t += &format!("ALERT {svc}: {why}\n");
                        }
                    }
                    t
                })
            }
            BeCmd::Add {
                service,
                addr,
                port,
                weight,
            } => {
                let port = match port {
                    Some(p) => *p,
                    None => {
                        let c: ClusterState = cx.get("/config")?;
                        c.services
                            .get(service)
                            .map(|s| s.port)
                            .ok_or_else(|| anyhow!("no service {service:?}"))?
                    }
                };
                let r = command(
                    &cx,
                    Command::AddBackend {
                        service: service.clone(),
                        addr: *addr,
                        port,
                        weight: *weight,
                    },
                )?;
                applied(cli, r)
            }
            BeCmd::Remove { id } => applied(cli, command(&cx, Command::RemoveBackend { id: *id })?),
            BeCmd::Drain { id } => applied(
                cli,
                command(
                    &cx,
                    Command::SetBackendState {
                        id: *id,
                        state: BackendState::Draining,
                    },
                )?,
            ),
            BeCmd::Undrain { id } => applied(
                cli,
                command(
                    &cx,
                    Command::SetBackendState {
                        id: *id,
                        state: BackendState::Active,
                    },
                )?,
            ),
            BeCmd::Weight { id, weight } => applied(
                cli,
                command(
                    &cx,
                    Command::SetBackendWeight {
                        id: *id,
                        weight: *weight,
                    },
                )?,
            ),
        },
        Cmd::Join {
            node_id,
            raft_addr,
            admin_addr,
            bgp_next_hop,
        } => {
            let r = write(
                &cx,
                "/cluster/join",
                &Member {
                    node_id: *node_id,
                    raft_addr: raft_addr.clone(),
                    admin_addr: admin_addr.clone(),
                    bgp_next_hop: *bgp_next_hop,
                },
            )?;
            applied(cli, r)
        }
        Cmd::Leave { node_id } | Cmd::Remove { node_id } => {
            let r = write(&cx, "/cluster/remove", &RemoveRequest { node_id: *node_id })?;
            applied(cli, r)
        }
        Cmd::Conntrack {
            node_id,
            vip,
            limit,
        } => {
            let addr = match node_id {
                None => cx.node.clone(),
                Some(id) => {
                    let c: ClusterState = cx.get("/config")?;
                    c.members
                        .get(id)
                        .map(|m| m.admin_addr.clone())
                        .ok_or_else(|| anyhow!("no member {id}"))?
                }
            };
            let mut path = format!("/conntrack?limit={limit}");
            if let Some(v) = vip {
                path += &format!("&vip={v}");
            }
            let client = match node_id {
                Some(id) if cli.server_name.is_none() => cx.client.clone().for_node(*id),
                _ => cx.client.clone(),
            };
            let rows: Vec<node::replication::CtRow> = client.get(&addr, &path, t)?;
            print(cli.output, &rows, |rows| {
                table(
                    &[
                        "CLIENT", "VIP", "PROTO", "BACKEND", "ORIGIN", "FLAGS", "IDLE",
                    ],
                    rows.iter()
                        .map(|r| {
                            vec![
                                r.client.clone(),
                                r.vip.clone(),
                                r.proto.clone(),
                                r.backend_id.to_string(),
                                r.origin.to_string(),
                                [(r.remote, "remote"), (r.closing, "closing")]
                                    .iter()
                                    .filter(|(on, _)| *on)
                                    .map(|(_, n)| *n)
                                    .collect::<Vec<_>>()
                                    .join(","),
                                format!("{:.1}s", r.idle_s),
                            ]
                        })
                        .collect(),
                )
            })
        }
        Cmd::Certs { cmd } => certs_remote(&cx, cmd),
    }
}

/// The certificate commands that need no cluster (None: it needs one).
fn certs_local(cli: &Cli, cmd: &CertCmd) -> Option<Result<(), Failure>> {
    Some(match cmd {
        CertCmd::Init { dir, cluster } => (|| {
            if dir.join("ca.key").exists() {
                return Err(anyhow!(
                    "{} already holds a CA; refusing to overwrite it",
                    dir.display()
                )
                .into());
            }
            let (cert, key) = tls::generate_ca(cluster)?;
            tls::write_pair(dir, "ca", &cert, &key)?;
            println!("wrote {0}/ca.pem and {0}/ca.key", dir.display());
            Ok(())
        })(),
        CertCmd::Issue {
            dir,
            node_id,
            ip,
            client,
            role,
            admin,
            days,
        } => (|| {
            if *days == 0 || *days > 36_500 {
                return Err(anyhow!("--days must be 1..=36500").into());
            }
            let (subject, name) = match (node_id, client, admin) {
                (Some(id), None, None) if role.is_none() => (
                    tls::Subject::Node {
                        id: *id,
                        ips: ip.clone(),
                    },
                    format!("node-{id}"),
                ),
                (None, Some(c), None) => {
                    let Some(r) = role.as_deref() else {
                        return Err(anyhow!("--client needs --role admin|operator|viewer").into());
                    };
                    let r = Role::parse(r)
                        .ok_or_else(|| anyhow!("--role {r:?}: use admin, operator or viewer"))?;
                    (
                        tls::Subject::Client {
                            name: c.clone(),
                            role: r.as_str().into(),
                        },
                        format!("client-{c}"),
                    )
                }
                (None, None, Some(a)) if role.is_none() => (
                    tls::Subject::Client {
                        name: a.clone(),
                        role: Role::Admin.as_str().into(),
                    },
                    format!("client-{a}"),
                ),
                _ => {
                    return Err(anyhow!(
                    "give exactly one of --node-id N, --client NAME --role ROLE, or --admin NAME"
                )
                    .into())
                }
            };
            if !ip.is_empty() && node_id.is_none() {
                return Err(anyhow!("--ip is for node certificates (--node-id)").into());
            }
            let ca = std::fs::read_to_string(dir.join("ca.pem")).context("reading ca.pem")?;
            let ca_key = std::fs::read_to_string(dir.join("ca.key")).context("reading ca.key")?;
            let (cert, key) = tls::issue_with(&ca, &ca_key, &subject, tls::Validity::days(*days))?;
            tls::write_pair(dir, &name, &cert, &key)?;
            let info = tls::Identity::from_pem(&ca, &cert, &key)?.info()?;
            println!(
                "wrote {0}/{name}.pem and {0}/{name}.key ({1}, serial {2})",
                dir.display(),
                info.subject(),
                info.serial
            );
            Ok(())
        })(),
        CertCmd::Show { file } => (|| {
            let der = rustls_pki_types::CertificateDer::from_pem_file(file)
                .with_context(|| format!("reading {}", file.display()))?;
            let info = tls::cert_info(&der)?;
            print(cli.output, &info, |i| {
                format!(
                    "subject {}\nissuer  {}\nserial  {}\nvalid   {} .. {} (Unix time)\n",
                    i.subject(),
                    i.issuer,
                    i.serial,
                    i.not_before,
                    i.not_after
                )
            })
        })(),
        _ => return None,
    })
}

/// The certificate commands that read or change the cluster config.
fn certs_remote(cx: &Ctx, cmd: &CertCmd) -> Result<(), Failure> {
    match cmd {
        CertCmd::Revoke { serial, file, note } => {
            let serial = match (serial, file) {
                (Some(s), None) => tls::normalize_serial(s)?,
                (None, Some(f)) => {
                    let der = rustls_pki_types::CertificateDer::from_pem_file(f)
                        .with_context(|| format!("reading {}", f.display()))?;
                    tls::cert_info(&der)?.serial
                }
                _ => return Err(anyhow!("give exactly one of --serial or --file").into()),
            };
            let r = command(
                cx,
                Command::RevokeCertificate {
                    revocation: Revocation {
                        serial,
                        note: note.clone(),
                    },
                },
            )?;
            applied(cx.cli, r)
        }
        CertCmd::Unrevoke { serial } => {
            let serial = tls::normalize_serial(serial)?;
            let r = command(cx, Command::UnrevokeCertificate { serial })?;
            applied(cx.cli, r)
        }
        CertCmd::Revoked => {
            let c: ClusterState = cx.get("/config")?;
            let list: Vec<&Revocation> = c.revoked.values().collect();
            print(cx.cli.output, &list, |l| {
                table(
                    &["SERIAL", "NOTE"],
                    l.iter()
                        .map(|r| vec![r.serial.clone(), r.note.clone()])
                        .collect(),
                )
            })
        }
        _ => Err(anyhow!("not a cluster command").into()),
    }
}

/// What to do about a refusal, added to the server's reason.
fn hint(e: &ClientError) -> &'static str {
    match e {
        ClientError::Api { status: 403, .. } => {
            "\nhint: your certificate's role is too weak for this; use a certificate with the role named above (`clusterctl certs show FILE` shows yours)"
        }
        ClientError::Api { status: 401, .. } => {
            "\nhint: use a current, unrevoked client certificate issued by this cluster's CA (`clusterctl certs issue --client NAME --role ROLE`)"
        }
        _ => "",
    }
}

fn main() -> ExitCode {
    tls::install_crypto_provider();
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Client(e)) => {
            eprintln!("clusterctl: {e}{}", hint(&e));
            ExitCode::from(e.exit_code() as u8)
        }
        Err(Failure::Usage(why)) => {
            eprintln!("clusterctl: {why}");
            ExitCode::from(2)
        }
        Err(Failure::Auth(why)) => {
            eprintln!("clusterctl: {why}");
            ExitCode::from(7)
        }
        Err(Failure::Other(e)) => {
            eprintln!("clusterctl: {e:#}");
            ExitCode::from(6)
        }
    }
}
