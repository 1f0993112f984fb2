//! clusterctl: the operator's CLI for a Holdfast cluster. Talks to the admin
//! API of any node (`--node`, or HOLDFAST_ADMIN); writes go to the leader.
//!
//! Exit codes: 0 success; 2 bad arguments or request; 3 node unreachable;
//! 4 no leader / cluster unavailable; 5 command rejected (the reason is
//! printed); 6 any other failure.

use std::{net::IpAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{anyhow, Context};
use clap::{Parser, Subcommand, ValueEnum};
use node::{
    api::{LocalStatus, MemberRow, RemoveRequest},
    client::{get_blocking, post_retry, ClientError},
    tls,
};
use raft_store::{
    cluster::{BackendState, ForwardingMode, Member, Proto, Service},
    ClusterState, Command, Request, Response,
};
use serde::Serialize;

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Json,
}

#[derive(Parser)]
#[command(version, about = "Operate a Holdfast L4 load-balancer cluster")]
struct Cli {
    /// Admin API address of any node of the cluster.
    #[arg(
        long = "node",
        global = true,
        env = "HOLDFAST_ADMIN",
        default_value = "127.0.0.1:7101"
    )]
    node_api: String,
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
    /// Cluster CA, node and admin certificates.
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
    },
    Remove {
        name: String,
    },
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
    /// Issue node-N.pem/.key (with --node-id) or admin-NAME.pem/.key (with --admin).
    Issue {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        node_id: Option<u64>,
        #[arg(long)]
        ip: Vec<IpAddr>,
        #[arg(long)]
        admin: Option<String>,
    },
}

enum Failure {
    Client(ClientError),
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

/// POST a write, retrying through leader changes; the same request id makes
/// retries apply at most once.
fn write<B: Serialize>(cli: &Cli, path: &str, body: &B) -> Result<Response, ClientError> {
    post_retry(
        std::slice::from_ref(&cli.node_api),
        path,
        body,
        Duration::from_secs(cli.timeout_s),
    )
}

fn command(cli: &Cli, command: Command) -> Result<Response, ClientError> {
    write(
        cli,
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
    let t = Duration::from_secs(cli.timeout_s);
    match &cli.cmd {
        Cmd::Top { interval_s, once } => {
            let (interval_s, once) = (*interval_s, *once);
            if !(interval_s > 0.0 && interval_s <= 3600.0) {
                return Err(Failure::Other(anyhow!("--interval-s must be in (0, 3600]")));
            }
            let interval = Duration::from_secs_f64(interval_s);
            loop {
                let v = node::top::sample(&cli.node_api, interval)?;
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
            let s: LocalStatus = node::client::post_blocking(
                &cli.node_api,
                "/drain",
                &node::api::DrainRequest { drain },
                t,
                false,
            )?;
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
            let s: LocalStatus = get_blocking(&cli.node_api, "/status", t)?;
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
            let rows: Vec<MemberRow> = get_blocking(&cli.node_api, "/cluster/members", t)?;
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
            let c: ClusterState = get_blocking(&cli.node_api, "/config", t)?;
            print(cli.output, &c, |c| {
                serde_json::to_string_pretty(c).unwrap_or_default() + "\n"
            })
        }
        Cmd::Services { cmd } => match cmd.as_ref().unwrap_or(&SvcCmd::List) {
            SvcCmd::List => {
                let c: ClusterState = get_blocking(&cli.node_api, "/config", t)?;
                let list: Vec<&Service> = c.services.values().collect();
                print(cli.output, &list, |list| {
                    table(
                        &["NAME", "VIP", "PORT", "PROTO", "TABLE", "BACKENDS"],
                        list.iter()
                            .map(|s| {
                                vec![
                                    s.name.clone(),
                                    s.vip.to_string(),
                                    s.port.to_string(),
                                    s.proto.to_string(),
                                    s.table_size.to_string(),
                                    c.backends_of(&s.name).count().to_string(),
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
            } => {
                let proto = match proto.to_ascii_lowercase().as_str() {
                    "tcp" => Proto::Tcp,
                    "udp" => Proto::Udp,
                    other => return Err(anyhow!("--proto {other:?}: use tcp or udp").into()),
                };
                let r = command(
                    cli,
                    Command::PutService {
                        service: Service {
                            name: name.clone(),
                            vip: *vip,
                            port: *port,
                            proto,
                            table_size: *table_size,
                            mode: ForwardingMode::Dsr,
                        },
                    },
                )?;
                applied(cli, r)
            }
            SvcCmd::Remove { name } => {
                let r = command(cli, Command::RemoveService { name: name.clone() })?;
                applied(cli, r)
            }
        },
        Cmd::Backends { cmd } => match cmd.as_ref().unwrap_or(&BeCmd::List { service: None }) {
            BeCmd::List { service } => {
                let c: ClusterState = get_blocking(&cli.node_api, "/config", t)?;
                let list: Vec<_> = c
                    .backends
                    .values()
                    .filter(|b| service.as_ref().is_none_or(|s| &b.service == s))
                    .collect();
                print(cli.output, &list, |list| {
                    table(
                        &["ID", "SERVICE", "ADDRESS", "PORT", "WEIGHT", "STATE"],
                        list.iter()
                            .map(|b| {
                                vec![
                                    b.id.to_string(),
                                    b.service.clone(),
                                    b.addr.to_string(),
                                    b.port.to_string(),
                                    b.weight.to_string(),
                                    format!("{:?}", b.state).to_lowercase(),
                                ]
                            })
                            .collect(),
                    )
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
                        let c: ClusterState = get_blocking(&cli.node_api, "/config", t)?;
                        c.services
                            .get(service)
                            .map(|s| s.port)
                            .ok_or_else(|| anyhow!("no service {service:?}"))?
                    }
                };
                let r = command(
                    cli,
                    Command::AddBackend {
                        service: service.clone(),
                        addr: *addr,
                        port,
                        weight: *weight,
                    },
                )?;
                applied(cli, r)
            }
            BeCmd::Remove { id } => applied(cli, command(cli, Command::RemoveBackend { id: *id })?),
            BeCmd::Drain { id } => applied(
                cli,
                command(
                    cli,
                    Command::SetBackendState {
                        id: *id,
                        state: BackendState::Draining,
                    },
                )?,
            ),
            BeCmd::Undrain { id } => applied(
                cli,
                command(
                    cli,
                    Command::SetBackendState {
                        id: *id,
                        state: BackendState::Active,
                    },
                )?,
            ),
            BeCmd::Weight { id, weight } => applied(
                cli,
                command(
                    cli,
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
                cli,
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
            let r = write(cli, "/cluster/remove", &RemoveRequest { node_id: *node_id })?;
            applied(cli, r)
        }
        Cmd::Conntrack {
            node_id,
            vip,
            limit,
        } => {
            let addr = match node_id {
                None => cli.node_api.clone(),
                Some(id) => {
                    let c: ClusterState = get_blocking(&cli.node_api, "/config", t)?;
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
            let rows: Vec<node::replication::CtRow> = get_blocking(&addr, &path, t)?;
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
        Cmd::Certs { cmd } => certs(cmd),
    }
}

fn certs(cmd: &CertCmd) -> Result<(), Failure> {
    match cmd {
        CertCmd::Init { dir, cluster } => {
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
        }
        CertCmd::Issue {
            dir,
            node_id,
            ip,
            admin,
        } => {
            let ca = std::fs::read_to_string(dir.join("ca.pem")).context("reading ca.pem")?;
            let ca_key = std::fs::read_to_string(dir.join("ca.key")).context("reading ca.key")?;
            let (subject, name) = match (node_id, admin) {
                (Some(id), None) => (
                    tls::Subject::Node {
                        id: *id,
                        ips: ip.clone(),
                    },
                    format!("node-{id}"),
                ),
                (None, Some(a)) => (
                    tls::Subject::Admin { name: a.clone() },
                    format!("admin-{a}"),
                ),
                _ => return Err(anyhow!("give exactly one of --node-id or --admin").into()),
            };
            let (cert, key) = tls::issue(&ca, &ca_key, &subject)?;
            tls::write_pair(dir, &name, &cert, &key)?;
            println!("wrote {0}/{name}.pem and {0}/{name}.key", dir.display());
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    tls::install_crypto_provider();
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Client(e)) => {
            eprintln!("clusterctl: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
        Err(Failure::Other(e)) => {
            eprintln!("clusterctl: {e:#}");
            ExitCode::from(6)
        }
    }
}
