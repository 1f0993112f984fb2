//! `chaos`: Holdfast's BGP/ECMP lab and fault scenarios.
//!
//! - `chaos run <scenario>|all [--json] [--sync on|off|both] [--repeat N]`
//! - `chaos lab up|down|status [--name NAME]` (a lab that stays up with
//!   traffic running until `lab down`)
//! - `chaos demo`: lab up with traffic, `clusterctl members`, live
//!   counters, kill an LB node, the connections surviving.
//!
//! Needs root (namespaces, BPF) and bird2. LB nodes run this same binary
//! as `chaos _node --config FILE`, which is holdfast-node's entry point.

use std::{
    path::PathBuf,
    process::{ExitCode, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use chaos::{
    lab::{self, Lab, LabSpec},
    scenario::{self, RunOpts, ScenarioResult},
    traffic::{Traffic, TrafficSpec},
};
use clap::{Parser, Subcommand, ValueEnum};
use holdfast_bgp::Speaker;
use raft_store::cluster::ForwardingMode;

#[derive(Parser)]
#[command(
    name = "chaos",
    version,
    about = "Holdfast's BGP/ECMP lab and fault scenarios (root)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum SyncMode {
    On,
    Off,
    Both,
}

#[derive(clap::Args, Clone, Debug)]
struct Size {
    /// LB nodes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Backends in the services (one more host is kept spare for churn).
    #[arg(long, default_value_t = 4)]
    backends: usize,
    /// Long-lived TCP connections.
    #[arg(long, default_value_t = 1000)]
    tcp: usize,
    /// UDP flows.
    #[arg(long, default_value_t = 200)]
    udp: usize,
    /// Long-lived IPv6 TCP connections (scenarios; to the IPv6 VIP).
    #[arg(long, default_value_t = 300)]
    tcp6: usize,
    /// IPv6 UDP flows (scenarios).
    #[arg(long, default_value_t = 100)]
    udp6: usize,
    /// How long the soak scenario runs, in minutes.
    #[arg(long, default_value_t = 30.0)]
    soak_minutes: f64,
    /// Short TCP connections opened (and closed) per second besides.
    #[arg(long, default_value_t = 0)]
    short_rate: u32,
    /// How the lab's services forward: dsr (backends run the decap agent)
    /// or snat (backends run plain servers; the LB rewrites both addresses).
    #[arg(long, default_value = "dsr", value_parser = parse_forwarding)]
    forwarding: ForwardingMode,
    /// The BGP speaker on the LB nodes: bird or frr.
    #[arg(long, default_value = "bird", value_parser = parse_speaker)]
    bgp: Speaker,
    /// The router's BGP speaker: bird or frr.
    #[arg(long, default_value = "bird", value_parser = parse_speaker)]
    router: Speaker,
    /// Graceful restart on the LB nodes' speakers: on, or off (the
    /// baseline of speaker-restart).
    #[arg(long, default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    graceful_restart: bool,
    /// What a drain does on the LB nodes: withdraw, or graceful-shutdown
    /// (keep announcing with the community 65535:0).
    #[arg(long, default_value = "withdraw", value_parser = parse_drain)]
    drain: holdfast_bgp::DrainMode,
    /// Which conntrack entries the LB nodes replicate: all, or divergent
    /// (only those their peers' Maglev tables would not rebuild).
    #[arg(long, default_value = "all", value_parser = parse_sync_mode)]
    sync_mode: holdfast_node::config::SyncMode,
}

fn parse_sync_mode(s: &str) -> Result<holdfast_node::config::SyncMode, String> {
    match s {
        "all" => Ok(holdfast_node::config::SyncMode::All),
        "divergent" => Ok(holdfast_node::config::SyncMode::Divergent),
        other => Err(format!("--sync-mode is all or divergent, not {other:?}")),
    }
}

fn parse_drain(s: &str) -> Result<holdfast_bgp::DrainMode, String> {
    s.parse()
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!("{other:?}: use on or off")),
    }
}

fn parse_speaker(s: &str) -> Result<Speaker, String> {
    s.parse()
}

fn parse_forwarding(s: &str) -> Result<ForwardingMode, String> {
    s.parse()
}

#[derive(Subcommand)]
enum Cmd {
    /// Run fault scenarios under load and report broken connections.
    Run {
        /// kill-node, churn-then-kill, kill-leader, restart-join,
        /// agent-restart, partition, rolling-restart, kill-two (5 nodes at
        /// least), ipv6, lossy-sync, kill-during-join, health (backend health
        /// checks: flows on the backends it kills break by design), or all;
        /// soak (not in all: --soak-minutes, 30 by default).
        scenario: String,
        /// One JSON object with a `scenarios` array on stdout.
        #[arg(long)]
        json: bool,
        /// Conntrack replication on (the product), off (the baseline) or both.
        #[arg(long, value_enum, default_value = "on")]
        sync: SyncMode,
        /// Run each scenario this many times.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        #[command(flatten)]
        size: Size,
        /// Progress lines on stderr.
        #[arg(long, short)]
        verbose: bool,
    },
    /// A lab that stays up (with traffic) until `lab down`.
    Lab {
        #[command(subcommand)]
        cmd: LabCmd,
    },
    /// The guided demo: lab, traffic, members, kill a node, survivors.
    Demo {
        #[command(flatten)]
        size: Size,
        /// Conntrack replication on or off (to see what it prevents).
        #[arg(long, value_enum, default_value = "on")]
        sync: SyncMode,
    },
    /// A DNS-like load (one UDP query per new source port) through a lab,
    /// and the CPU the node processes spend on it above idle.
    LoadDns {
        /// Queries per second.
        #[arg(long, default_value_t = 3000)]
        rate: u32,
        /// Seconds of load (and of the idle measurement before it).
        #[arg(long, default_value_t = 10)]
        secs: u64,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        size: Size,
    },
    /// holdfast-node (used by the lab to run LB nodes).
    #[command(name = "_node", hide = true)]
    Node {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// holdfast-decap (used by the lab on its backends).
    #[command(name = "_decap", hide = true)]
    Decap {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Holds a lab for `lab up` (internal).
    #[command(name = "_keeper", hide = true)]
    Keeper {
        #[arg(long)]
        name: String,
        #[command(flatten)]
        size: Size,
    },
}

#[derive(Subcommand)]
enum LabCmd {
    /// Build the lab in the background, start the traffic, wait until ready.
    Up {
        #[arg(long, default_value = "default")]
        name: String,
        #[command(flatten)]
        size: Size,
    },
    /// Tear the lab down (every namespace, process and pin).
    Down {
        #[arg(long, default_value = "default")]
        name: String,
    },
    /// Members, route and traffic counters of a running lab.
    Status {
        #[arg(long, default_value = "default")]
        name: String,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::Node { args } = cli.cmd {
        let mut full = vec![std::ffi::OsString::from("holdfast-node")];
        full.extend(args);
        return holdfast_node::daemon::main_from(full);
    }
    if let Cmd::Decap { args } = cli.cmd {
        return holdfast_decap::main_from(std::iter::once("holdfast-decap".into()).chain(args));
    }
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("chaos: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// The lab traffic of `size`.
fn traffic_spec(size: &Size) -> Result<TrafficSpec> {
    let mut t = TrafficSpec::new(lab::VIP.parse()?, lab::CLIENT.parse()?, size.tcp, size.udp);
    t.short_per_s = size.short_rate;
    Ok(t)
}

fn exe() -> Result<PathBuf> {
    std::env::current_exe().context("finding this program's path")
}

fn real_main(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Run {
            scenario,
            json,
            sync,
            repeat,
            size,
            verbose,
        } => run(&scenario, json, sync, repeat, &size, verbose),
        Cmd::Lab { cmd } => match cmd {
            LabCmd::Up { name, size } => lab_up(&name, &size),
            LabCmd::Down { name } => lab_down(&name),
            LabCmd::Status { name, json } => lab_status(&name, json),
        },
        Cmd::Demo { size, sync } => demo(&size, sync != SyncMode::Off),
        Cmd::LoadDns {
            rate,
            secs,
            json,
            size,
        } => load_dns(&size, rate, secs, json),
        Cmd::Keeper { name, size } => keeper(&name, &size),
        Cmd::Node { .. } | Cmd::Decap { .. } => unreachable!("handled in main"),
    }
}

fn run(
    which: &str,
    json: bool,
    sync: SyncMode,
    repeat: usize,
    size: &Size,
    verbose: bool,
) -> Result<ExitCode> {
    let names: Vec<&str> = if which == "all" {
        scenario::SCENARIOS.to_vec()
    } else if scenario::SCENARIOS.contains(&which) || scenario::LONG_SCENARIOS.contains(&which) {
        vec![which]
    } else {
        bail!(
            "unknown scenario {which:?}; one of: {}, {} (not in all), all",
            scenario::SCENARIOS.join(", "),
            scenario::LONG_SCENARIOS.join(", ")
        );
    };
    if repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    let modes: Vec<bool> = match sync {
        SyncMode::On => vec![true],
        SyncMode::Off => vec![false],
        SyncMode::Both => vec![true, false],
    };
    let mut results: Vec<ScenarioResult> = Vec::new();
    let mut errors = Vec::new();
    for name in names {
        for &s in &modes {
            for k in 0..repeat {
                let mut opts = RunOpts::new(exe()?);
                opts.nodes = size.nodes;
                opts.backends = size.backends;
                opts.tcp = size.tcp;
                opts.udp = size.udp;
                opts.short_per_s = size.short_rate;
                opts.forwarding = size.forwarding;
                opts.bgp = size.bgp;
                opts.router = size.router;
                opts.graceful_restart = size.graceful_restart;
                opts.drain = size.drain;
                opts.sync_mode = size.sync_mode;
                opts.tcp6 = size.tcp6;
                opts.udp6 = size.udp6;
                opts.soak = Duration::from_secs_f64(size.soak_minutes * 60.0);
                opts.sync = s;
                opts.verbose = verbose;
                match scenario::run(name, &opts) {
                    Ok(r) => {
                        if !json {
                            println!("{}", scenario::describe(&r));
                        }
                        results.push(r);
                    }
                    Err(e) => {
                        let msg = format!(
                            "{name} (replication {}, run {}): {e:#}",
                            if s { "on" } else { "off" },
                            k + 1
                        );
                        eprintln!("chaos: {msg}");
                        errors.push(msg);
                    }
                }
            }
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string(&serde_json::json!({
                "scenarios": results,
                "errors": errors,
            }))?
        );
    }
    // Replication on must not break anything; a scenario that could not
    // run is a failure too.
    let broken_with_sync = results.iter().any(|r| r.sync && r.unexpected_broken() > 0);
    Ok(if errors.is_empty() && !broken_with_sync {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

// ---- demo ----

fn clusterctl_members(lab: &Lab, node: usize) {
    // The real clusterctl, if it was built next to this program.
    let ctl = exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("clusterctl")));
    if let Some(ctl) = ctl.filter(|c| c.exists()) {
        println!(
            "$ clusterctl --node {} --ca pki/ca.pem --cert pki/client-{}.pem --key pki/client-{}.key members",
            lab::admin_addr(node),
            lab::LAB_CLIENT,
            lab::LAB_CLIENT
        );
        match lab.router.command(&ctl).map(|mut c| {
            c.args(["--node", &lab::admin_addr(node)])
                .args(lab.clusterctl_args())
                .arg("members")
                .stdin(Stdio::null())
                .output()
        }) {
            Ok(Ok(out)) => print!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Ok(Err(e)) => println!("(clusterctl failed: {e})"),
            Err(e) => println!("(clusterctl failed: {e})"),
        }
        return;
    }
    match lab.members(node) {
        Ok(rows) => {
            println!("(clusterctl not built; members from the admin API)");
            for r in rows {
                println!(
                    "node {} role {:<9} epoch {:?} conntrack {:?} sync_ready {:?} bgp {:?}",
                    r.node_id,
                    r.role.unwrap_or_else(|| "-".into()),
                    r.applied_epoch,
                    r.conntrack_entries,
                    r.sync_ready,
                    r.bgp_announced
                );
            }
        }
        Err(e) => println!("members: {e:#}"),
    }
}

fn counters(t: &Traffic, lab: &Lab) {
    let l = t.live();
    let hops: Vec<String> = lab
        .router_nexthops()
        .unwrap_or_default()
        .iter()
        .map(|h| h.to_string())
        .collect();
    println!(
        "  t={:5.1}s  answers {:>7}  tcp broken {}/{}  udp broken {}/{}  longest stall {:>4} ms  router → [{}]",
        t.elapsed().as_secs_f64(),
        l.answers,
        l.tcp_broken,
        l.tcp_total,
        l.udp_broken,
        l.udp_total,
        l.max_stall_ms,
        hops.join(" ")
    );
}

fn demo(size: &Size, sync: bool) -> Result<ExitCode> {
    let dir = std::env::temp_dir().join(format!("holdfast-demo-{}", std::process::id()));
    let mut spec = LabSpec::new("hfd", dir.clone(), exe()?);
    spec.nodes = size.nodes.max(2);
    spec.backends = size.backends;
    spec.forwarding = size.forwarding;
    spec.bgp = size.bgp;
    spec.router = size.router;
    spec.graceful_restart = size.graceful_restart;
    spec.drain = size.drain;
    spec.sync_mode = size.sync_mode;
    spec.sync = sync;
    println!(
        "Bringing up the lab: router (BIRD, ECMP, BFD), {} LB nodes (holdfast-node + BIRD), {} backends, a client ...",
        spec.nodes, spec.backends
    );
    let t0 = Instant::now();
    let mut lab = Lab::up(spec)?;
    println!(
        "lab up in {:.1} s (logs in {})",
        t0.elapsed().as_secs_f64(),
        dir.display()
    );
    println!("\n$ ip -n <router> route show {}", lab::VIP_CIDR);
    print!(
        "{}",
        lab.router.ip(&format!("route show {}", lab::VIP_CIDR))?
    );
    println!(
        "\nStarting {} TCP connections and {} UDP flows to {} ...",
        size.tcp,
        size.udp,
        lab::VIP
    );
    let traffic = Traffic::start(&lab.client, traffic_spec(size)?)?;
    traffic.mark();
    traffic.wait_all_answered(Duration::from_secs(20))?;
    if sync {
        for i in lab.running() {
            lab::wait_until("replication", Duration::from_secs(20), || {
                Ok(lab.conntrack(i)?.len() >= size.tcp + size.udp)
            })?;
        }
    }
    // Let the nodes' conntrack counters (every 2 s) catch up.
    std::thread::sleep(holdfast_node::datapath::CT_COUNT_EVERY);
    println!();
    clusterctl_members(&lab, 1);
    println!("\nLive counters:");
    for _ in 0..3 {
        counters(&traffic, &lab);
        std::thread::sleep(Duration::from_secs(1));
    }
    let leader = lab.leader()?;
    let victim = lab
        .running()
        .into_iter()
        .rfind(|i| *i != leader)
        .ok_or_else(|| anyhow!("no follower to kill"))?;
    println!(
        "\nKilling LB node {victim} silently (switch port down, SIGKILL of holdfast-node and BIRD) ..."
    );
    lab.kill_node(victim)?;
    let others: Vec<usize> = lab.running();
    let t = Instant::now();
    for _ in 0..6 {
        counters(&traffic, &lab);
        std::thread::sleep(Duration::from_secs(1));
    }
    let _ = lab.wait_route(&others, Duration::from_secs(5));
    let _ = t;
    traffic.mark();
    let _ = traffic.wait_all_answered(Duration::from_secs(15));
    counters(&traffic, &lab);
    println!();
    clusterctl_members(&lab, others[0]);
    let r = traffic.stop()?;
    println!(
        "\nResult: TCP {}/{} connections broken, UDP {}/{} flows broken, longest stall {} ms (replication {}).",
        r.tcp_broken,
        r.tcp_total,
        r.udp_broken,
        r.udp_total,
        r.max_stall_ms,
        if sync { "on" } else { "off" }
    );
    for f in r.broken.iter().take(5) {
        println!("  broken: {f:?}");
    }
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(if sync && r.tcp_broken + r.udp_broken > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

// ---- lab up/down/status ----

fn state_dir(name: &str) -> Result<PathBuf> {
    if name.is_empty()
        || name.len() > 32
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!("lab name {name:?}: use 1-32 letters, digits, '-' or '_'");
    }
    Ok(PathBuf::from("/run/holdfast-lab").join(name))
}

fn keeper_pid(dir: &std::path::Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(dir.join("keeper.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: signal 0 only probes.
    (unsafe { libc::kill(pid, 0) } == 0).then_some(pid)
}

fn lab_up(name: &str, size: &Size) -> Result<ExitCode> {
    let dir = state_dir(name)?;
    if let Some(pid) = keeper_pid(&dir) {
        bail!("lab {name} is already up (keeper pid {pid}); `chaos lab down --name {name}` first");
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let log = std::fs::File::create(dir.join("keeper.log"))?;
    use std::os::unix::process::CommandExt;
    let mut child = std::process::Command::new(exe()?)
        .args([
            "_keeper",
            "--name",
            name,
            "--nodes",
            &size.nodes.to_string(),
            "--backends",
            &size.backends.to_string(),
            "--tcp",
            &size.tcp.to_string(),
            "--udp",
            &size.udp.to_string(),
            "--forwarding",
            &size.forwarding.to_string(),
            "--bgp",
            &size.bgp.to_string(),
            "--router",
            &size.router.to_string(),
            "--graceful-restart",
            if size.graceful_restart { "on" } else { "off" },
            "--drain",
            &size.drain.to_string(),
            "--sync-mode",
            match size.sync_mode {
                holdfast_node::config::SyncMode::All => "all",
                holdfast_node::config::SyncMode::Divergent => "divergent",
            },
        ])
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    std::fs::write(dir.join("keeper.pid"), child.id().to_string())?;
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait()? {
            bail!(
                "the lab keeper exited ({st}):\n{}",
                std::fs::read_to_string(dir.join("keeper.log")).unwrap_or_default()
            );
        }
        if let Ok(s) = std::fs::read_to_string(dir.join("status.json")) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&s) {
                if v["ready"] == true {
                    break;
                }
            }
        }
        if t0.elapsed() > Duration::from_secs(120) {
            bail!(
                "the lab did not come up within 120 s; see {}",
                dir.join("keeper.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("lab {name} is up in {:.1} s", t0.elapsed().as_secs_f64());
    lab_status(name, false)
}

fn load_dns(size: &Size, rate: u32, secs: u64, json: bool) -> Result<ExitCode> {
    if rate == 0 || secs == 0 {
        bail!("--rate and --secs must be above 0");
    }
    let dir = std::env::temp_dir().join(format!("holdfast-load-{}", std::process::id()));
    let mut spec = LabSpec::new("hfq", dir.clone(), exe()?);
    spec.nodes = size.nodes;
    spec.backends = size.backends;
    spec.forwarding = size.forwarding;
    spec.bgp = size.bgp;
    spec.router = size.router;
    spec.sync_mode = size.sync_mode;
    let mode = match size.sync_mode {
        holdfast_node::config::SyncMode::All => "all",
        holdfast_node::config::SyncMode::Divergent => "divergent",
    };
    let lab = Lab::up(spec)?;
    lab.wait_ready(Duration::from_secs(30))?;
    let r = chaos::dnsload::run(&lab, mode, rate, secs)?;
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{} nodes, {mode} replication: {} queries at {}/s, {} answered ({:.0}/s); node processes {:.3} cores idle, {:.3} under load: {:.3} cores above idle, {:.1} µs per query; {} entries sent to peers",
            r.nodes, r.queries, r.rate_per_s, r.answered, r.answered_per_s, r.idle_cores, r.load_cores, r.above_idle_cores, r.us_per_query, r.entries_sent
        );
    }
    Ok(ExitCode::SUCCESS)
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn keeper(name: &str, size: &Size) -> Result<ExitCode> {
    let dir = state_dir(name)?;
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    let mut spec = LabSpec::new("hfl", dir.join("lab"), exe()?);
    spec.nodes = size.nodes;
    spec.backends = size.backends;
    spec.forwarding = size.forwarding;
    spec.bgp = size.bgp;
    spec.router = size.router;
    spec.graceful_restart = size.graceful_restart;
    spec.drain = size.drain;
    spec.sync_mode = size.sync_mode;
    let lab = Lab::up(spec)?;
    let traffic = Traffic::start(&lab.client, traffic_spec(size)?)?;
    traffic.mark();
    traffic.wait_all_answered(Duration::from_secs(30))?;
    eprintln!("lab {name} ready");
    while !STOP.load(Ordering::Relaxed) {
        let members = lab
            .running()
            .first()
            .map(|i| lab.members(*i))
            .transpose()
            .unwrap_or_else(|e| {
                eprintln!("members: {e:#}");
                None
            });
        let status = serde_json::json!({
            "ready": true,
            "updated_unix_ms": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            "vip": lab::VIP,
            "tcp_port": lab::TCP_PORT,
            "udp_port": lab::UDP_PORT,
            "namespaces": {
                "router": lab.router.name(),
                "client": lab.client.name(),
                "lb": lab.lbs.iter().map(|n| n.ns.name().to_string()).collect::<Vec<_>>(),
            },
            "admin": lab.lbs.iter().map(|n| lab::admin_addr(n.index)).collect::<Vec<_>>(),
            "router_nexthops": lab.router_nexthops().unwrap_or_default(),
            "members": members,
            "traffic": traffic.live(),
        });
        let tmp = dir.join("status.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&status)?)?;
        std::fs::rename(&tmp, dir.join("status.json"))?;
        for _ in 0..10 {
            if STOP.load(Ordering::Relaxed) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    eprintln!("lab {name}: tearing down");
    let r = traffic.stop()?;
    eprintln!(
        "lab {name}: traffic stopped: tcp {}/{} broken, udp {}/{} broken, longest stall {} ms",
        r.tcp_broken, r.tcp_total, r.udp_broken, r.udp_total, r.max_stall_ms
    );
    drop(lab);
    let _ = std::fs::remove_file(dir.join("status.json"));
    let _ = std::fs::remove_file(dir.join("keeper.pid"));
    Ok(ExitCode::SUCCESS)
}

fn lab_down(name: &str) -> Result<ExitCode> {
    let dir = state_dir(name)?;
    match keeper_pid(&dir) {
        Some(pid) => {
            // SAFETY: signalling the keeper we started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let t0 = Instant::now();
            // SAFETY: signal 0 only probes.
            while unsafe { libc::kill(pid, 0) } == 0 {
                if t0.elapsed() > Duration::from_secs(30) {
                    // SAFETY: as above.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    std::thread::sleep(Duration::from_millis(200));
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        None => println!("lab {name} is not running"),
    }
    // Namespaces of a keeper that died without cleaning up.
    for role in ["sw", "r", "cl"] {
        netns::sweep_stale(&format!("hfl{role}"));
    }
    for i in 1..=40 {
        netns::sweep_stale(&format!("hflb{i}"));
        netns::sweep_stale(&format!("hfll{i}"));
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!("lab {name} is down");
    Ok(ExitCode::SUCCESS)
}

fn lab_status(name: &str, json: bool) -> Result<ExitCode> {
    let dir = state_dir(name)?;
    if keeper_pid(&dir).is_none() {
        bail!("lab {name} is not running (`chaos lab up --name {name}`)");
    }
    let s = std::fs::read_to_string(dir.join("status.json"))
        .with_context(|| format!("lab {name} is still coming up"))?;
    if json {
        println!("{s}");
        return Ok(ExitCode::SUCCESS);
    }
    let v: serde_json::Value = serde_json::from_str(&s)?;
    println!(
        "VIP {} (TCP {}, UDP {}); router next hops: {}",
        v["vip"].as_str().unwrap_or("?"),
        v["tcp_port"],
        v["udp_port"],
        v["router_nexthops"]
    );
    println!("namespaces: {}", v["namespaces"]);
    println!(
        "{:<5} {:<10} {:<6} {:<10} {:<6} {:<6} {:<5}",
        "NODE", "ROLE", "EPOCH", "CONNTRACK", "SYNC", "BGP", "UP"
    );
    let cell = |x: &serde_json::Value| match x {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    for m in v["members"].as_array().into_iter().flatten() {
        println!(
            "{:<5} {:<10} {:<6} {:<10} {:<6} {:<6} {:<5}",
            cell(&m["node_id"]),
            cell(&m["role"]),
            cell(&m["applied_epoch"]),
            cell(&m["conntrack_entries"]),
            cell(&m["sync_ready"]),
            cell(&m["bgp_announced"]),
            cell(&m["reachable"])
        );
    }
    let t = &v["traffic"];
    println!(
        "traffic: {} answers; tcp broken {}/{}; udp broken {}/{}; longest stall {} ms",
        t["answers"],
        t["tcp_broken"],
        t["tcp_total"],
        t["udp_broken"],
        t["udp_total"],
        t["max_stall_ms"]
    );
    println!("admin API (from the router namespace): {}", v["admin"]);
    Ok(ExitCode::SUCCESS)
}
