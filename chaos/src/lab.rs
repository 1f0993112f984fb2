//! The BGP/ECMP lab: a router, N LB nodes running holdfast-node and BIRD on
//! a shared L2 fabric, M backends behind the router, and a client — every
//! host its own network namespace, all removed when the [`Lab`] drops (also
//! on panic; namespaces of a killed lab are swept by the next one).
//!
//! ```text
//!  client 10.88.2.100 ── r-cl ┐
//!                             router (BIRD: eBGP AS 65000, ECMP `merge paths`,
//!                             │        BFD 100 ms × 3, L4 multipath hash)
//!           fabric 10.88.0.0/24 (bridge) r-fab 10.88.0.1
//!        ┌──────────────┬──────────────┐
//!   lb1 10.88.0.11  lb2 10.88.0.12  lb3 10.88.0.13   holdfast-node (XDP on f0,
//!        (one-armed: IPIP to backends via the router)  Raft, sync) + BIRD AS 65100
//!           backends 10.88.1.0/24 (bridge) r-be 10.88.1.1
//!        be1 10.88.1.11 … beM: decap XDP on b0, VIP on lo, TCP echo :8007,
//!        UDP :5353, answering the client directly (DSR)
//! ```
//!
//! The VIP prefix 10.88.100.0/24 is announced by every ready LB node; the
//! service VIP is 10.88.100.1. The lab is dual-stack: every segment also
//! has an IPv6 prefix (fabric fd88::/64, backends fd88:1::/64, client
//! fd88:2::/64), the IPv6 VIP prefix fd88:100::/120 (VIP fd88:100::1, the
//! services `echo6` and `dns6` on the same backends) is announced over the
//! same BGP sessions (MP-BGP, next hop the LB node's fabric IPv6 address),
//! and the router hashes IPv6 flows over the LB nodes too. A dead LB node
//! keeps its fabric link on the router's side (the bridge), so only BFD
//! detects it, as in a datacenter.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use datapath_ebpf::testrun::Nop;
use holdfast_api::client::Client;
use holdfast_api::wire::CtRow;
use holdfast_api::wire::{LocalStatus, MemberRow};
use holdfast_bgp::Speaker;
use holdfast_node::config::{DatapathSection, NodeConfig, RaftTuning, SyncSection, TlsConfig};
use holdfast_pki as tls;
use netns::{veth, NetNs};
use raft_store::{
    cluster::{
        BackendState, CheckKind, Command, ForwardingMode, HealthCheck, Proto, Response, Service,
    },
    ClusterState, Request,
};

use crate::servers::Servers;
use netns::frr::Frr;

pub const VIP: &str = "10.88.100.1";
pub const VIP_CIDR: &str = "10.88.100.0/24";
pub const CLIENT: &str = "10.88.2.100";
pub const ROUTER_FABRIC: &str = "10.88.0.1";
pub const VIP6: &str = "fd88:100::1";
pub const VIP6_CIDR: &str = "fd88:100::/120";
pub const CLIENT6: &str = "fd88:2::100";
pub const ROUTER_FABRIC6: &str = "fd88::1";
pub const TCP_SERVICE6: &str = "echo6";
pub const UDP_SERVICE6: &str = "dns6";
pub const TCP_PORT: u16 = 8007;
pub const UDP_PORT: u16 = 5353;
pub const TCP_SERVICE: &str = "echo";
pub const UDP_SERVICE: &str = "dns";
/// A SNAT service beside the lab's main ones (in a DSR lab): VIP:8008 to
/// the backends' echo server on 8007 (a target port other than the port).
pub const SNAT_TCP_SERVICE: &str = "echo-snat";
pub const SNAT_TCP_PORT: u16 = 8008;
/// A service whose backends listen on another port (Kubernetes
/// targetPort): VIP:8009 to the echo server's 8007, in the lab's
/// forwarding mode (DSR: the decap agent turns the answers back).
pub const TP_TCP_SERVICE: &str = "echo-tp";
pub const TP_TCP_PORT: u16 = 8009;
/// The SNAT pools: each LB node's SNAT addresses come from them.
pub const SNAT_POOL: &str = "10.88.3.0/28";
pub const SNAT_POOL6: &str = "fd88:3::/120";
const RAFT_PORT: u16 = 7001;
const ADMIN_PORT: u16 = 7101;
const METRICS_PORT: u16 = 7102;
/// The lab's operator certificate (`pki/client-lab.pem`, role admin).
pub const LAB_CLIENT: &str = "lab";

/// Fabric address of LB node `i` (1-based).
pub fn lb_addr(i: usize) -> IpAddr {
    format!("10.88.0.{}", 10 + i).parse().expect("static")
}

/// Fabric IPv6 address of LB node `i`: its next hop for the IPv6 VIPs.
pub fn lb_addr6(i: usize) -> IpAddr {
    format!("fd88::{}", 10 + i).parse().expect("static")
}

pub fn admin_addr(i: usize) -> String {
    format!("{}:{ADMIN_PORT}", lb_addr(i))
}

/// The plain metrics/probe listener of LB node `i`.
pub fn metrics_addr(i: usize) -> String {
    format!("{}:{METRICS_PORT}", lb_addr(i))
}

/// Address of backend host `j` (1-based).
pub fn backend_addr(j: usize) -> IpAddr {
    format!("10.88.1.{}", 10 + j).parse().expect("static")
}

/// IPv6 address of backend host `j`.
pub fn backend_addr6(j: usize) -> IpAddr {
    format!("fd88:1::{}", 10 + j).parse().expect("static")
}

#[derive(Clone, Debug)]
pub struct LabSpec {
    /// Namespace name prefix (short; names become `{prefix}{role}-{pid}-{n}`).
    pub prefix: String,
    pub nodes: usize,
    /// Backends in the services from the start.
    pub backends: usize,
    /// Extra backend hosts, serving but not in the config (for churn).
    pub spare_backends: usize,
    /// Conntrack replication on (the product) or off (the baseline).
    pub sync: bool,
    /// Conntrack entries per LB node.
    pub conntrack_size: u32,
    /// Where configs, data dirs, certificates and logs go.
    pub dir: PathBuf,
    /// The program that runs holdfast-node: `{exe} _node --config FILE`.
    pub exe: PathBuf,
    /// Health checks on the services ([`lab_check`]).
    pub health_checks: bool,
    /// How the main services forward: DSR (backends run the decap agent
    /// and hold the VIP) or SNAT (backends run plain servers only).
    pub forwarding: ForwardingMode,
    /// The BGP speaker on the LB nodes (driven by holdfast-node).
    pub bgp: Speaker,
    /// The router's BGP speaker.
    pub router: Speaker,
    /// Graceful restart on the LB nodes' speakers (off: the baseline).
    pub graceful_restart: bool,
    /// What a drain does: withdraw, or announce with GRACEFUL_SHUTDOWN.
    pub drain: holdfast_bgp::DrainMode,
    /// Which entries the LB nodes replicate.
    pub sync_mode: holdfast_node::config::SyncMode,
}

impl LabSpec {
    pub fn new(prefix: &str, dir: PathBuf, exe: PathBuf) -> Self {
        Self {
            prefix: prefix.into(),
            nodes: 3,
            backends: 4,
            spare_backends: 1,
            sync: true,
            conntrack_size: 65_536,
            dir,
            exe,
            health_checks: false,
            forwarding: ForwardingMode::Dsr,
            bgp: Speaker::Bird,
            router: Speaker::Bird,
            graceful_restart: true,
            drain: holdfast_bgp::DrainMode::Withdraw,
            sync_mode: Default::default(),
        }
    }
}

/// The lab's health checks: every 500 ms, down after 2 failures, up after
/// 2 passes, held down 1 s; TCP connect for the TCP services, a request
/// answered `be{N} ...` for the UDP ones.
pub fn lab_check(proto: Proto) -> HealthCheck {
    let base = HealthCheck {
        interval_ms: 500,
        timeout_ms: 250,
        rise: 2,
        fall: 2,
        hold_down_ms: 1000,
        ..HealthCheck::new(CheckKind::Tcp)
    };
    match proto {
        Proto::Tcp => base,
        Proto::Udp => HealthCheck {
            kind: CheckKind::Udp,
            send: Some("health".into()),
            expect: Some("be".into()),
            ..base
        },
    }
}

/// A BIRD daemon started with its own pid file.
struct Bird {
    pid_file: PathBuf,
}

impl Bird {
    fn start(ns: &NetNs, dir: &Path, name: &str, conf: &str) -> Result<Self> {
        let me = Self {
            pid_file: dir.join(format!("{name}.bird.pid")),
        };
        me.spawn(ns, dir, name, conf, &[])?;
        Ok(me)
    }

    /// Write the config, start BIRD `name` with it (and extra arguments:
    /// `-R`, graceful restart recovery) and wait for its pid file and
    /// control socket.
    fn spawn(&self, ns: &NetNs, dir: &Path, name: &str, conf: &str, args: &[&str]) -> Result<()> {
        let c = dir.join(format!("{name}.bird.conf"));
        let ctl = dir.join(format!("{name}.ctl"));
        let _ = std::fs::remove_file(&ctl);
        let log = dir.join(format!("{name}.bird.log"));
        std::fs::write(&c, conf)?;
        let _ = std::fs::remove_file(&self.pid_file);
        let st = ns
            .command("bird")?
            .arg("-c")
            .arg(&c)
            .arg("-s")
            .arg(&ctl)
            .arg("-P")
            .arg(&self.pid_file)
            .args(args)
            .stdin(Stdio::null())
            .stdout(
                std::fs::File::options()
                    .create(true)
                    .append(true)
                    .open(&log)?,
            )
            .stderr(std::fs::File::options().append(true).open(&log)?)
            .status()
            .context("running bird (bird2 must be installed: scripts/install-deps.sh)")?;
        if !st.success() {
            bail!(
                "bird failed to start with {} ({st}): {}",
                c.display(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        wait_until(
            "BIRD's pid file and control socket",
            Duration::from_secs(5),
            || Ok(self.pid().is_some() && ctl.exists()),
        )?;
        Ok(())
    }

    /// Restart BIRD `name` the way an upgrade does: `birdc graceful
    /// restart` (sessions closed without a notification, so a router that
    /// does graceful restart keeps the routes), then `bird -R` (recovery:
    /// End-of-RIB only once its routes are in), with `conf`.
    fn restart_gracefully(&self, ns: &NetNs, dir: &Path, name: &str, conf: &str) -> Result<()> {
        let ctl = dir.join(format!("{name}.ctl"));
        let pid = self
            .pid()
            .ok_or_else(|| anyhow!("BIRD {name} has no pid"))?;
        let out = ns.exec(&[
            "birdc",
            "-s",
            ctl.to_str().unwrap_or_default(),
            "graceful restart",
        ])?;
        if !out.contains("Graceful restart") {
            bail!("BIRD refused the graceful restart: {out}");
        }
        wait_until("BIRD to exit", Duration::from_secs(10), || {
            Ok(netns::daemon_gone(pid))
        })?;
        self.spawn(ns, dir, name, conf, &["-R"])
    }

    fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|p| p.trim().parse().ok())
    }

    fn kill(&self) {
        if let Some(pid) = self.pid() {
            netns::kill_daemon(pid);
        }
        let _ = std::fs::remove_file(&self.pid_file);
    }
}

/// A running BGP speaker (killed on drop).
enum SpeakerProc {
    Bird(Bird),
    Frr(Frr),
}

impl SpeakerProc {
    fn kill(&self) {
        match self {
            SpeakerProc::Bird(b) => b.kill(),
            SpeakerProc::Frr(f) => f.kill(),
        }
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One LB node: its namespace, holdfast-node process and BGP speaker.
pub struct LbNode {
    pub index: usize,
    pub ns: NetNs,
    dir: PathBuf,
    config: PathBuf,
    pin_dir: PathBuf,
    speaker: Option<SpeakerProc>,
    /// With BIRD: the BIRD that answers the router's BFD, apart from the
    /// one that speaks BGP (FRR has bfdd of its own).
    bfd: Option<Bird>,
    process: Option<Child>,
    _nop: Nop,
}

impl LbNode {
    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("node.log")
    }

    /// Pid of this node's holdfast-node, if running.
    pub fn node_pid(&self) -> Option<u32> {
        self.process.as_ref().map(|p| p.id())
    }

    /// Pid of this node's BFD-only BIRD, if it runs BIRD.
    pub fn bfd_pid(&self) -> Option<u32> {
        self.bfd.as_ref()?.pid().map(|p| p as u32)
    }

    /// Pid of this node's BIRD, if it runs BIRD.
    pub fn bird_pid(&self) -> Option<u32> {
        match self.speaker.as_ref()? {
            SpeakerProc::Bird(b) => std::fs::read_to_string(&b.pid_file)
                .ok()?
                .trim()
                .parse()
                .ok(),
            SpeakerProc::Frr(_) => None,
        }
    }
}

struct Backend {
    /// The backend's servers (IPv4 and IPv6); None while stopped.
    servers: Option<(Servers, Servers)>,
    /// `holdfast-decap` (as `{exe} _decap`), what a backend host runs.
    decap: Option<std::process::Child>,
    ns: NetNs,
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(mut c) = self.decap.take() {
            // SIGTERM: it detaches and prints its counters to its log.
            // SAFETY: signalling our own child.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub struct Lab {
    pub spec: LabSpec,
    pub lbs: Vec<LbNode>,
    backends: Vec<Backend>,
    router_speaker: Option<SpeakerProc>,
    pub router: NetNs,
    pub client: NetNs,
    pub sw: NetNs,
    /// The admin API client (the lab's admin certificate); set once the
    /// PKI exists.
    api: Option<Client>,
    /// Loss and delay on the links between LB nodes, while set.
    impair: Option<crate::impair::LinkImpairment>,
}

/// Poll `f` every 20 ms until it is true or `timeout` passes.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    let t0 = Instant::now();
    let mut last_err = None;
    loop {
        match f() {
            Ok(true) => return Ok(t0.elapsed()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        if t0.elapsed() > timeout {
            return Err(match last_err {
                Some(e) => e.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The next hops in the output of `ip route show PREFIX`.
pub fn nexthops_of(ip_route: &str) -> Vec<IpAddr> {
    ip_route
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "via")
        .filter_map(|w| w[1].parse().ok())
        .collect()
}

fn router_conf(nodes: usize) -> String {
    let tpl = include_str!("../../deploy/bird/tor.bird.conf");
    let mut out = String::new();
    for line in tpl.lines() {
        if line.starts_with("protocol bgp lb") {
            continue;
        }
        out.push_str(
            &line
                .replace("10.0.0.1;", &format!("{ROUTER_FABRIC};"))
                .replace(
                    "10.200.0.0/16{16,32}",
                    "10.88.100.0/24{24,32}, 10.88.3.0/24{24,32}",
                )
                .replace(
                    "fd00:200::/47{47,128}",
                    "fd88:100::/48{48,128}, fd88:3::/48{48,128}",
                ),
        );
        out.push('\n');
    }
    for i in 1..=nodes {
        out.push_str(&format!(
            "protocol bgp lb{i} from lbpeer {{ neighbor {} as 65100; }}\n",
            lb_addr(i)
        ));
    }
    out
}

fn lb_bird_conf(i: usize, snat_routes: &Path, state: &Path, graceful_restart: bool) -> String {
    let conf = include_str!("../../deploy/bird/lb-node.bird.conf");
    let conf = if graceful_restart {
        conf.to_string()
    } else {
        conf.replace("graceful restart on;", "graceful restart off;")
    };
    conf.replace("10.0.0.11", &lb_addr(i).to_string())
        .replace("neighbor 10.0.0.1 ", &format!("neighbor {ROUTER_FABRIC} "))
        .replace("10.200.0.0/24", VIP_CIDR)
        .replace("fd00:200::/120", VIP6_CIDR)
        .replace("10.200.1.0/28", SNAT_POOL)
        .replace("fd00:201::/120", SNAT_POOL6)
        .replace(
            "/etc/bird/holdfast/holdfast-snat.conf",
            &snat_routes.display().to_string(),
        )
        .replace(
            "/run/bird/holdfast-state.conf",
            &state.display().to_string(),
        )
}

/// LB node `i`'s BIRD config, with the files it includes that the node
/// writes (its own SNAT routes: none until it writes them; its state:
/// withdrawn until it says otherwise) made first if missing.
fn lb_bird_setup(dir: &Path, i: usize, graceful_restart: bool) -> Result<String> {
    let routes = dir.join("bird-snat.conf");
    if !routes.exists() {
        std::fs::write(&routes, holdfast_bgp::render_own_routes(&[], true))?;
    }
    let state = dir.join("bird-state.conf");
    if !state.exists() {
        std::fs::write(
            &state,
            holdfast_bgp::render_state(false, &Default::default()),
        )?;
    }
    Ok(lb_bird_conf(i, &routes, &state, graceful_restart))
}

/// LB node `i`'s BFD-only BIRD: deploy/bird/lb-node-bfd.bird.conf.
fn lb_bfd_conf(i: usize) -> String {
    include_str!("../../deploy/bird/lb-node-bfd.bird.conf")
        .replace("10.0.0.11", &lb_addr(i).to_string())
        .replace("neighbor 10.0.0.1;", &format!("neighbor {ROUTER_FABRIC};"))
}

/// The LB nodes' AS (RFC 7938 style: one for all of them).
const LB_ASN: u32 = 65100;

/// The router's FRR config: deploy/frr/tor.frr.conf with the lab's
/// addresses, prefixes and one neighbor per LB node.
fn router_frr_conf(nodes: usize) -> String {
    let mut out = String::new();
    for line in include_str!("../../deploy/frr/tor.frr.conf").lines() {
        if line.starts_with(" neighbor 10.0.0.1") && line.ends_with("peer-group LB") {
            continue;
        }
        let line = line
            .replace("bgp router-id 10.0.0.1", &format!("bgp router-id {ROUTER_FABRIC}"))
            .replace(
                "seq 5 permit 10.200.0.0/16 le 32",
                "seq 5 permit 10.88.100.0/24 le 32\nip prefix-list HOLDFAST-VIPS4 seq 10 permit 10.88.3.0/24 le 32",
            )
            .replace(
                "seq 5 permit fd00:200::/47 le 128",
                "seq 5 permit fd88:100::/48 le 128\nipv6 prefix-list HOLDFAST-VIPS6 seq 10 permit fd88:3::/48 le 128",
            );
        out.push_str(&line);
        out.push('\n');
        if line.starts_with(" neighbor LB timers") {
            for i in 1..=nodes {
                out.push_str(&format!(" neighbor {} peer-group LB\n", lb_addr(i)));
            }
        }
    }
    out
}

/// LB node `i`'s FRR config: deploy/frr/lb-node.frr.conf with its
/// addresses and the router's.
fn lb_frr_conf(i: usize, graceful_restart: bool) -> String {
    include_str!("../../deploy/frr/lb-node.frr.conf")
        .lines()
        .filter(|l| graceful_restart || !l.trim_start().starts_with("bgp graceful-restart"))
        .map(|l| format!("{l}\n"))
        .collect::<String>()
        .replace("10.0.0.11", &lb_addr(i).to_string())
        .replace("fd00::11", &lb_addr6(i).to_string())
        .replace("10.0.0.1 ", &format!("{ROUTER_FABRIC} "))
}

/// The BGP protocols a lab node drives: the VIPs, its own SNAT addresses
/// and the SNAT pools.
const LAB_PROTOCOLS: [&str; 6] = [
    "vip",
    "vip6",
    "snat_own",
    "snat_own6",
    "snat_pool",
    "snat_pool6",
];

impl Lab {
    /// Build the whole lab and wait until every LB node is a voter, has the
    /// services programmed and is announced (the router's ECMP route has a
    /// next hop per node).
    pub fn up(spec: LabSpec) -> Result<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("the lab needs root (network namespaces, BPF, BIRD)");
        }
        if spec.nodes == 0 || spec.nodes > 9 || spec.backends == 0 || spec.backends > 40 {
            bail!("the lab supports 1..=9 LB nodes and 1..=40 backends");
        }
        std::fs::create_dir_all(&spec.dir)?;
        let p = &spec.prefix;
        let sw = NetNs::new(&format!("{p}sw"))?;
        let router = NetNs::new(&format!("{p}r"))?;
        let client = NetNs::new(&format!("{p}cl"))?;
        sw.ip("link add brf type bridge")?;
        sw.ip("link add brb type bridge")?;
        sw.ip("link set brf up")?;
        sw.ip("link set brb up")?;

        // Router: fabric, backend segment, client link; ECMP with L4 hash.
        veth(&router, "r-fab", &sw, "pfr")?;
        veth(&router, "r-be", &sw, "pbr")?;
        veth(&router, "r-cl", &client, "c0")?;
        sw.ip("link set pfr master brf")?;
        sw.ip("link set pbr master brb")?;
        router.ip(&format!("addr add {ROUTER_FABRIC}/24 dev r-fab"))?;
        router.ip("addr add 10.88.1.1/24 dev r-be")?;
        router.ip("addr add 10.88.2.1/24 dev r-cl")?;
        router.ip(&format!("addr add {ROUTER_FABRIC6}/64 dev r-fab nodad"))?;
        router.ip("addr add fd88:1::1/64 dev r-be nodad")?;
        router.ip("addr add fd88:2::1/64 dev r-cl nodad")?;
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.fib_multipath_hash_policy", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv4.conf.r-fab.rp_filter", "0"),
            ("net.ipv4.conf.r-be.rp_filter", "0"),
            ("net.ipv4.conf.r-cl.rp_filter", "0"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv6.fib_multipath_hash_policy", "1"),
        ] {
            router.sysctl(k, v)?;
        }
        // The client computes checksums itself (see dplab.rs: a veth leaves
        // them to the receiver, which XDP cannot finish).
        client.exec(&["ethtool", "-K", "c0", "tx", "off"])?;
        // Short connections at hundreds a second: reuse TIME_WAIT ports.
        client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        client.sysctl("net.ipv4.ip_local_port_range", "10000 65000")?;
        client.ip(&format!("addr add {CLIENT}/24 dev c0"))?;
        client.ip("route add 10.88.100.0/24 via 10.88.2.1")?;
        client.ip(&format!("addr add {CLIENT6}/64 dev c0 nodad"))?;
        client.ip(&format!("-6 route add {VIP6_CIDR} via fd88:2::1"))?;

        let mut lab = Self {
            spec: spec.clone(),
            lbs: Vec::new(),
            backends: Vec::new(),
            router_speaker: None,
            router,
            client,
            sw,
            api: None,
            impair: None,
        };

        // Backends.
        for j in 1..=spec.backends + spec.spare_backends {
            lab.add_backend_host(j)?;
        }

        lab.router_speaker = Some(match spec.router {
            Speaker::Bird => SpeakerProc::Bird(Bird::start(
                &lab.router,
                &spec.dir,
                "router",
                &router_conf(spec.nodes),
            )?),
            Speaker::Frr => SpeakerProc::Frr(Frr::start(
                &lab.router,
                &spec.dir,
                lab.router.name(),
                &router_frr_conf(spec.nodes),
            )?),
        });

        // PKI: one CA, a certificate per node.
        let pki = spec.dir.join("pki");
        std::fs::create_dir_all(&pki)?;
        tls::install_crypto_provider();
        let (ca, ca_key) = tls::generate_ca("holdfast-lab")?;
        tls::write_pair(&pki, "ca", &ca, &ca_key)?;
        for i in 1..=spec.nodes {
            let (c, k) = tls::issue(
                &ca,
                &ca_key,
                &tls::Subject::Node {
                    id: i as u64,
                    ips: vec![lb_addr(i)],
                },
            )?;
            tls::write_pair(&pki, &format!("node-{i}"), &c, &k)?;
        }
        let (c, k) = tls::issue(
            &ca,
            &ca_key,
            &tls::Subject::Client {
                name: LAB_CLIENT.into(),
                role: "admin".into(),
            },
        )?;
        tls::write_pair(&pki, &format!("client-{LAB_CLIENT}"), &c, &k)?;
        lab.api = Some(Client::from_identity(&tls::Identity::from_pem(
            &ca, &c, &k,
        )?)?);

        for i in 1..=spec.nodes {
            lab.add_lb_host(i)?;
        }
        // The first node bootstraps; the services go in; the others join
        // one at a time.
        lab.start_node(1)?;
        lab.wait_status(1, "node 1 to lead", Duration::from_secs(20), |s| {
            s.leader == Some(1)
        })?;
        let hc = lab.spec.health_checks;
        let mode = lab.spec.forwarding;
        let mut cmds = vec![
            Command::PutSnatPools {
                v4: Some(SNAT_POOL.into()),
                v6: Some(SNAT_POOL6.into()),
            },
            put_service(TCP_SERVICE, VIP, Proto::Tcp, TCP_PORT, hc, mode),
            put_service(UDP_SERVICE, VIP, Proto::Udp, UDP_PORT, hc, mode),
            put_service(TCP_SERVICE6, VIP6, Proto::Tcp, TCP_PORT, hc, mode),
            put_service(UDP_SERVICE6, VIP6, Proto::Udp, UDP_PORT, hc, mode),
            put_service(
                SNAT_TCP_SERVICE,
                VIP,
                Proto::Tcp,
                SNAT_TCP_PORT,
                false,
                ForwardingMode::Snat,
            ),
            put_service(TP_TCP_SERVICE, VIP, Proto::Tcp, TP_TCP_PORT, false, mode),
        ];
        for j in 1..=spec.backends {
            cmds.extend(add_backend_cmds(j));
        }
        lab.write(Command::Batch { commands: cmds })?;
        for i in 2..=spec.nodes {
            lab.start_node(i)?;
            lab.wait_status(
                i,
                &format!("node {i} to join as a voter"),
                Duration::from_secs(30),
                |s| s.voters.contains(&(i as u64)),
            )?;
        }
        lab.wait_ready(Duration::from_secs(30))?;
        Ok(lab)
    }

    fn add_backend_host(&mut self, j: usize) -> Result<()> {
        let be = NetNs::new(&format!("{}b{j}", self.spec.prefix))?;
        be.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        veth(&be, "b0", &self.sw, &format!("pb{j}"))?;
        self.sw.ip(&format!("link set pb{j} master brb"))?;
        be.ip(&format!("addr add {}/24 dev b0", backend_addr(j)))?;
        be.ip("route add default via 10.88.1.1")?;
        be.ip(&format!("addr add {}/64 dev b0 nodad", backend_addr6(j)))?;
        be.ip("-6 route add default via fd88:1::1")?;
        be.sysctl("net.ipv4.conf.b0.rp_filter", "0")?;
        // A SNAT reply passes the LB's XDP, which must see full checksums
        // (a veth leaves them partial; a real NIC computes them).
        be.exec(&["ethtool", "-K", "b0", "tx", "off"])?;
        let dsr = self.spec.forwarding == ForwardingMode::Dsr;
        // A DSR backend holds the VIP and runs holdfast-decap, as an
        // operator's would; a SNAT backend runs plain servers only.
        let decap = if dsr {
            be.ip(&format!("addr add {VIP}/32 dev lo"))?;
            be.ip(&format!("addr add {VIP6}/128 dev lo nodad"))?;
            Some(start_decap(&be, &self.spec, j)?)
        } else {
            None
        };
        let servers = Some(start_servers(&be, j, dsr)?);
        self.backends.push(Backend {
            servers,
            decap,
            ns: be,
        });
        Ok(())
    }

    /// Stop backend host `j`'s servers (as if its server process died;
    /// the host, its addresses and decap agent stay).
    pub fn stop_servers(&mut self, j: usize) -> Result<()> {
        let be = self
            .backends
            .get_mut(j - 1)
            .ok_or_else(|| anyhow!("no backend host {j}"))?;
        be.servers.take();
        Ok(())
    }

    /// Start backend host `j`'s servers again.
    pub fn start_servers(&mut self, j: usize) -> Result<()> {
        let be = self
            .backends
            .get_mut(j - 1)
            .ok_or_else(|| anyhow!("no backend host {j}"))?;
        if be.servers.is_none() {
            be.servers = Some(start_servers(&be.ns, j, be.decap.is_some())?);
        }
        Ok(())
    }

    /// Stop backend host `j`'s decap agent (SIGTERM: it detaches; IPIP
    /// packets to the host are no longer decapsulated).
    pub fn stop_decap(&mut self, j: usize) -> Result<()> {
        let be = self
            .backends
            .get_mut(j - 1)
            .ok_or_else(|| anyhow!("no backend host {j}"))?;
        if let Some(mut c) = be.decap.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            c.wait()?;
        }
        Ok(())
    }

    /// Start backend host `j`'s decap agent again.
    pub fn start_decap(&mut self, j: usize) -> Result<()> {
        let spec = self.spec.clone();
        let be = self
            .backends
            .get_mut(j - 1)
            .ok_or_else(|| anyhow!("no backend host {j}"))?;
        if be.decap.is_none() {
            be.decap = Some(start_decap(&be.ns, &spec, j)?);
        }
        Ok(())
    }

    /// Run `args` of `nft` in LB node `i`'s namespace.
    pub fn nft(&self, i: usize, args: &str) -> Result<()> {
        let out = self
            .lb(i)
            .ns
            .command("nft")?
            .args(args.split_whitespace())
            .output()
            .context("running nft (nftables must be installed: scripts/install-deps.sh)")?;
        if !out.status.success() {
            bail!(
                "nft {args} in node {i}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    fn add_lb_host(&mut self, i: usize) -> Result<()> {
        let ns = NetNs::new(&format!("{}l{i}", self.spec.prefix))?;
        veth(&ns, "f0", &self.sw, &format!("pf{i}"))?;
        self.sw.ip(&format!("link set pf{i} master brf"))?;
        // XDP_TX on f0 hands frames to pf{i}: give it an XDP program (NAPI).
        let ifx = self.sw.ifindex(&format!("pf{i}"))?;
        let nop = self.sw.run(move || -> Result<Nop> {
            let mut nop = Nop::load()?;
            nop.attach(ifx)?;
            Ok(nop)
        })??;
        ns.ip(&format!("addr add {}/24 dev f0", lb_addr(i)))?;
        ns.ip(&format!("route add 10.88.1.0/24 via {ROUTER_FABRIC}"))?;
        ns.ip(&format!("route add 10.88.2.0/24 via {ROUTER_FABRIC}"))?;
        ns.ip(&format!("addr add {}/64 dev f0 nodad", lb_addr6(i)))?;
        ns.ip(&format!("-6 route add fd88:1::/64 via {ROUTER_FABRIC6}"))?;
        ns.ip(&format!("-6 route add fd88:2::/64 via {ROUTER_FABRIC6}"))?;
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.f0.rp_filter", "0"),
            ("net.ipv4.conf.all.send_redirects", "0"),
            ("net.ipv4.conf.f0.send_redirects", "0"),
            // bpf_fib_lookup for IPv6 backends needs forwarding on.
            ("net.ipv6.conf.all.forwarding", "1"),
        ] {
            ns.sysctl(k, v)?;
        }
        let dir = self.spec.dir.join(format!("lb{i}"));
        std::fs::create_dir_all(&dir)?;
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(format!("holdfast-lab-{}", ns.name()));
        let pki = self.spec.dir.join("pki");
        let cfg = NodeConfig {
            node_id: i as u64,
            data_dir: dir.join("data"),
            raft_addr: SocketAddr::new(lb_addr(i), RAFT_PORT),
            admin_addr: admin_addr(i).parse()?,
            metrics_addr: metrics_addr(i).parse()?,
            admin: Default::default(),
            bgp_next_hop: Some(lb_addr(i)),
            bootstrap: i == 1,
            join: if i == 1 {
                vec![]
            } else {
                (1..i)
                    .map(|k| admin_addr(k).parse().expect("addr"))
                    .collect()
            },
            leave_on_shutdown: false,
            tls: TlsConfig {
                ca_cert: pki.join("ca.pem"),
                cert: pki.join(format!("node-{i}.pem")),
                key: pki.join(format!("node-{i}.key")),
                reload_interval_ms: 2_000,
            },
            raft: RaftTuning::default(),
            datapath: DatapathSection {
                enabled: true,
                interface: Some("f0".into()),
                pin_dir: Some(pin_dir.clone()),
                keep_on_shutdown: true,
                max_services: 16,
                conntrack_size: self.spec.conntrack_size,
                ring_bytes: 4 << 20,
                ..Default::default()
            },
            sync: SyncSection {
                enabled: self.spec.sync,
                mode: self.spec.sync_mode,
                ..Default::default()
            },
            bgp: holdfast_bgp::BgpSection {
                enabled: true,
                speaker: self.spec.bgp,
                bird_ctl: dir.join("bird.ctl"),
                protocols: LAB_PROTOCOLS.iter().map(|p| p.to_string()).collect(),
                snat_routes_file: Some(dir.join("bird-snat.conf")),
                bird_state_file: Some(dir.join("bird-state.conf")),
                drain: self.spec.drain,
                frr_pathspace: Some(ns.name().to_string()),
                asn: LB_ASN,
                prefixes: [VIP_CIDR, VIP6_CIDR, SNAT_POOL, SNAT_POOL6]
                    .iter()
                    .map(|p| p.to_string())
                    .collect(),
                ..Default::default()
            },
            kubernetes: Default::default(),
            services: vec![],
            snat: None,
            pools: vec![],
        };
        let config = dir.join("node.toml");
        std::fs::write(&config, toml::to_string(&cfg)?)?;
        self.lbs.push(LbNode {
            index: i,
            ns,
            dir,
            config,
            pin_dir,
            speaker: None,
            bfd: None,
            process: None,
            _nop: nop,
        });
        Ok(())
    }

    pub fn lb(&self, i: usize) -> &LbNode {
        &self.lbs[i - 1]
    }

    /// Start node `i`'s BIRD (if not running) and holdfast-node.
    pub fn start_node(&mut self, i: usize) -> Result<()> {
        let exe = self.spec.exe.clone();
        let n = &mut self.lbs[i - 1];
        if n.speaker.is_none() {
            n.speaker = Some(match self.spec.bgp {
                Speaker::Bird => {
                    if n.bfd.is_none() {
                        n.bfd = Some(Bird::start(&n.ns, &n.dir, "bfd", &lb_bfd_conf(i))?);
                    }
                    let bird = Bird::start(
                        &n.ns,
                        &n.dir,
                        "bird",
                        &lb_bird_setup(&n.dir, i, self.spec.graceful_restart)?,
                    )?;
                    SpeakerProc::Bird(bird)
                }
                Speaker::Frr => SpeakerProc::Frr(Frr::start(
                    &n.ns,
                    &n.dir,
                    n.ns.name(),
                    &lb_frr_conf(i, self.spec.graceful_restart),
                )?),
            });
        }
        if n.process.is_some() {
            bail!("node {i} is already running");
        }
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(n.log_path())?;
        let child =
            n.ns.command(&exe)?
                .arg("_node")
                .arg("--config")
                .arg(&n.config)
                .env("HOLDFAST_LOG_FORMAT", "plain")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {} _node", exe.display()))?;
        n.process = Some(child);
        Ok(())
    }

    /// SIGKILL node `i`'s holdfast-node (BIRD and the pinned datapath stay).
    pub fn kill_agent(&mut self, i: usize) -> Result<()> {
        let n = &mut self.lbs[i - 1];
        let mut c = n
            .process
            .take()
            .ok_or_else(|| anyhow!("node {i} not running"))?;
        c.kill()?;
        c.wait()?;
        Ok(())
    }

    /// SIGSTOP node `i`'s holdfast-node: the datapath goes on forwarding,
    /// the agent does nothing (until killed).
    pub fn pause_agent(&mut self, i: usize) -> Result<()> {
        let c = self.lbs[i - 1]
            .process
            .as_ref()
            .ok_or_else(|| anyhow!("node {i} not running"))?;
        // SAFETY: signalling our child.
        if unsafe { libc::kill(c.id() as i32, libc::SIGSTOP) } != 0 {
            bail!("SIGSTOP node {i}: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// SIGTERM node `i`'s holdfast-node and wait for it to exit (it
    /// withdraws its announcement first).
    pub fn stop_agent(&mut self, i: usize) -> Result<()> {
        let n = &mut self.lbs[i - 1];
        let mut c = n
            .process
            .take()
            .ok_or_else(|| anyhow!("node {i} not running"))?;
        // SAFETY: signalling our child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        loop {
            if c.try_wait()?.is_some() {
                return Ok(());
            }
            if t0.elapsed() > Duration::from_secs(15) {
                c.kill()?;
                c.wait()?;
                bail!("node {i} did not stop within 15 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Silent death of LB node `i`: its switch port goes down first (the
    /// router sees no link change: it is on a bridge), then holdfast-node
    /// and BIRD are SIGKILLed. Only BFD can notice.
    pub fn kill_node(&mut self, i: usize) -> Result<()> {
        // Unplug the cable: the switch port goes down, the node's own
        // interface and routes stay as they were.
        self.sw.ip(&format!("link set pf{i} down"))?;
        if self.lbs[i - 1].process.is_some() {
            self.kill_agent(i)?;
        }
        if let Some(b) = self.lbs[i - 1].speaker.take() {
            b.kill();
        }
        if let Some(b) = self.lbs[i - 1].bfd.take() {
            b.kill();
        }
        Ok(())
    }

    /// Restart LB node `i`'s BGP speaker the way an upgrade does, the rest
    /// of the node (holdfast-node, the datapath, BFD) left running. BIRD:
    /// [`Bird::restart_gracefully`]. FRR: bgpd stopped (SIGTERM: with graceful restart it leaves without a
    /// hard notification) and started again with its part of the saved
    /// frr.conf; bfdd and zebra stay. Returns how long the speaker was
    /// away (stop to started).
    pub fn restart_speaker(&mut self, i: usize) -> Result<Duration> {
        let gr = self.spec.graceful_restart;
        let n = &mut self.lbs[i - 1];
        let t0 = Instant::now();
        match n.speaker.as_ref() {
            Some(SpeakerProc::Bird(b)) => {
                b.restart_gracefully(&n.ns, &n.dir, "bird", &lb_bird_setup(&n.dir, i, gr)?)?;
            }
            Some(SpeakerProc::Frr(f)) => {
                f.restart_daemon(&n.ns, &n.dir, "bgpd", libc::SIGTERM)?;
            }
            None => bail!("node {i} runs no speaker"),
        }
        Ok(t0.elapsed())
    }

    /// Take a killed node's pinned datapath away (its conntrack with it),
    /// as if its machine were replaced: the next start loads a fresh
    /// datapath and warm-joins from nothing. Raft data stays.
    pub fn wipe_datapath(&self, i: usize) -> Result<()> {
        if self.lbs[i - 1].is_running() {
            bail!("node {i} runs: kill it first");
        }
        datapath_ebpf::loader::remove_pins(&self.lbs[i - 1].pin_dir)?;
        Ok(())
    }

    /// Write `n` synthetic conntrack entries (clients 100.64.0.0/10 to
    /// 10.88.100.200:8007, an address with no service, so no packet ever
    /// uses them; origin 99, a node that is not a member, so nobody
    /// refreshes them) into node `i`'s pinned map: a large conntrack
    /// without that many flows.
    pub fn fill_conntrack(&self, i: usize, n: u32) -> Result<usize> {
        use datapath_ebpf::abi::{CtKey, CtVal, CT_F_REMOTE, IPPROTO_TCP};
        let now = datapath_ebpf::maps::monotonic_now().as_nanos() as u64;
        let vip: IpAddr = "10.88.100.200".parse()?;
        let entries: Vec<(CtKey, CtVal)> = (0..n)
            .map(|k| {
                let client = std::net::Ipv4Addr::from(0x6440_0000u32 + k / 50_000);
                let key = CtKey::new(
                    client.into(),
                    (1024 + k % 50_000) as u16,
                    vip,
                    TCP_PORT,
                    IPPROTO_TCP,
                );
                let val = CtVal {
                    backend_id: 1,
                    flags: CT_F_REMOTE,
                    origin: 99,
                    created_ns: now,
                    last_seen_ns: now,
                    ..Default::default()
                };
                (key, val)
            })
            .collect();
        Ok(datapath_ebpf::loader::ct_fill_pinned(
            &self.lbs[i - 1].pin_dir,
            &entries,
        )?)
    }

    /// Bring a killed node back: link up, BIRD, holdfast-node (same data
    /// dir and pinned datapath).
    pub fn revive_node(&mut self, i: usize) -> Result<()> {
        self.sw.ip(&format!("link set pf{i} up"))?;
        self.start_node(i)
    }

    /// Cut node `i` off from the other LB nodes (not from the router) with
    /// nftables inside its namespace; `heal_partition` removes it.
    pub fn partition(&self, i: usize) -> Result<()> {
        let peers: Vec<String> = (1..=self.spec.nodes)
            .filter(|k| *k != i)
            .map(|k| lb_addr(k).to_string())
            .collect();
        let set = peers.join(", ");
        let rules = format!(
            "table inet holdfast_partition {{\n\
             chain in {{ type filter hook input priority -10; ip saddr {{ {set} }} drop; }}\n\
             chain out {{ type filter hook output priority -10; ip daddr {{ {set} }} drop; }}\n}}\n"
        );
        let f = self.lbs[i - 1].dir.join("partition.nft");
        std::fs::write(&f, rules)?;
        self.lbs[i - 1]
            .ns
            .exec(&["nft", "-f", &f.to_string_lossy()])?;
        Ok(())
    }

    pub fn heal_partition(&self, i: usize) -> Result<()> {
        self.lbs[i - 1]
            .ns
            .exec(&["nft", "delete", "table", "inet", "holdfast_partition"])?;
        Ok(())
    }

    /// The admin API client of the lab's operator (role admin).
    pub fn api(&self) -> Result<Client> {
        self.api
            .clone()
            .ok_or_else(|| anyhow!("the lab's PKI is not made yet"))
    }

    /// The PKI directory (CA, node and client certificates).
    pub fn pki(&self) -> PathBuf {
        self.spec.dir.join("pki")
    }

    /// clusterctl's credentials for this lab, as command-line arguments.
    pub fn clusterctl_args(&self) -> Vec<String> {
        let pki = self.pki();
        let p = |f: &str| pki.join(f).to_string_lossy().into_owned();
        vec![
            "--ca".into(),
            p("ca.pem"),
            "--cert".into(),
            p(&format!("client-{LAB_CLIENT}.pem")),
            "--key".into(),
            p(&format!("client-{LAB_CLIENT}.key")),
        ]
    }

    /// Drain node `i` (`POST /drain`, as `clusterctl drain --wait` does)
    /// and wait until its datapath saw no VIP packet for `quiet`: how long
    /// after the drain its traffic stopped.
    pub fn drain_and_wait(&self, i: usize, quiet: Duration, max: Duration) -> Result<Duration> {
        let addr = admin_addr(i);
        let api = self.api()?.for_node(i as u64);
        let moved = self.router.run(move || {
            let t = Duration::from_secs(3);
            let _: LocalStatus = api.post(
                &addr,
                "/drain",
                &holdfast_api::wire::DrainRequest { drain: true },
                t,
            )?;
            api.wait_traffic_gone(&addr, quiet, max, t)
        })??;
        moved.ok_or_else(|| anyhow!("node {i} still received VIP traffic {max:?} after its drain"))
    }

    /// GET `path` of node `i`'s admin API (from the router's namespace).
    pub fn api_get<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        i: usize,
        path: &str,
    ) -> Result<T> {
        let addr = admin_addr(i);
        let path = path.to_string();
        let api = self.api()?.for_node(i as u64);
        Ok(self
            .router
            .run(move || api.get::<T>(&addr, &path, Duration::from_secs(3)))??)
    }

    /// Node `i`'s `/metrics` (plain listener), from the router's namespace.
    pub fn metrics(&self, i: usize) -> Result<String> {
        let addr = metrics_addr(i);
        self.router.run(move || -> Result<String> {
            use std::io::{Read, Write};
            let mut s =
                std::net::TcpStream::connect_timeout(&addr.parse()?, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            write!(
                s,
                "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
            )?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            Ok(body)
        })?
    }

    /// The value of metric `name` with all of `labels` on node `i`.
    pub fn metric(&self, i: usize, name: &str, labels: &[(&str, &str)]) -> Result<Option<f64>> {
        let text = self.metrics(i)?;
        Ok(text.lines().find_map(|l| {
            let (key, v) = l.rsplit_once(' ')?;
            let (n, rest) = key.split_once('{').unwrap_or((key, ""));
            (n == name
                && labels
                    .iter()
                    .all(|(k, val)| rest.contains(&format!("{k}=\"{val}\""))))
            .then(|| v.parse().ok())
            .flatten()
        }))
    }

    /// Drain (withdraw the VIPs of) node `i`, or undrain it.
    pub fn drain(&self, i: usize, drain: bool) -> Result<LocalStatus> {
        let addr = admin_addr(i);
        let api = self.api()?.for_node(i as u64);
        Ok(self.router.run(move || {
            api.post::<_, LocalStatus>(
                &addr,
                "/drain",
                &holdfast_api::wire::DrainRequest { drain },
                Duration::from_secs(3),
            )
        })??)
    }

    pub fn status(&self, i: usize) -> Result<LocalStatus> {
        self.api_get(i, "/status")
    }

    pub fn members(&self, i: usize) -> Result<Vec<MemberRow>> {
        self.api_get(i, "/cluster/members")
    }

    pub fn config(&self) -> Result<ClusterState> {
        let i = self
            .running()
            .first()
            .copied()
            .ok_or_else(|| anyhow!("no node running"))?;
        self.api_get(i, "/config")
    }

    /// Node `i`'s conntrack entries of both VIPs.
    pub fn conntrack(&self, i: usize) -> Result<Vec<CtRow>> {
        let mut v: Vec<CtRow> = self.api_get(i, &format!("/conntrack?vip={VIP}&limit=100000"))?;
        v.extend(self.api_get::<Vec<CtRow>>(i, &format!("/conntrack?vip={VIP6}&limit=100000"))?);
        Ok(v)
    }

    /// Process ids of the running nodes' holdfast-node.
    pub fn node_pids(&self) -> Vec<u32> {
        self.lbs
            .iter()
            .filter_map(|n| n.process.as_ref().map(|c| c.id()))
            .collect()
    }

    /// Indexes of the nodes whose holdfast-node runs.
    pub fn running(&self) -> Vec<usize> {
        self.lbs
            .iter()
            .filter(|n| n.is_running())
            .map(|n| n.index)
            .collect()
    }

    pub fn wait_status(
        &self,
        i: usize,
        what: &str,
        timeout: Duration,
        f: impl Fn(&LocalStatus) -> bool,
    ) -> Result<Duration> {
        wait_until(what, timeout, || Ok(f(&self.status(i)?))).with_context(|| self.log_tail(i))
    }

    /// Node `i`'s log, without terminal colours.
    pub fn log_lines(&self, i: usize) -> Vec<String> {
        let text = std::fs::read_to_string(self.lb(i).log_path()).unwrap_or_default();
        text.lines()
            .map(|l| {
                let mut out = String::with_capacity(l.len());
                let mut esc = false;
                for c in l.chars() {
                    match (esc, c) {
                        (false, '\x1b') => esc = true,
                        (true, 'm') => esc = false,
                        (true, _) => {}
                        (false, c) => out.push(c),
                    }
                }
                out
            })
            .collect()
    }

    /// The last lines of node `i`'s log (for error messages).
    pub fn log_tail(&self, i: usize) -> String {
        let text = std::fs::read_to_string(self.lb(i).log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "node {i} log ({}):\n{}",
            self.lb(i).log_path().display(),
            lines[lines.len().saturating_sub(15)..].join("\n")
        )
    }

    /// Commit a config change through any running node (retried across
    /// leader changes; exactly once by request id).
    pub fn write(&self, command: Command) -> Result<Response> {
        let addrs: Vec<String> = self.running().into_iter().map(admin_addr).collect();
        if addrs.is_empty() {
            bail!("no node running");
        }
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let req = Request {
            id: Some(format!(
                "lab-{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            )),
            command,
            trace: None,
        };
        let api = self.api()?;
        let r: Response = self
            .router
            .run(move || api.post_retry(&addrs, "/command", &req, Duration::from_secs(20)))??;
        if let Some(why) = r.rejected {
            bail!("the cluster rejected the change: {why}");
        }
        Ok(r)
    }

    /// Drop `loss_ppm` per million of the frames between LB nodes and delay
    /// the rest by `delay` (one way), in both directions; traffic to and
    /// from the router is not touched (crate::impair).
    pub fn impair_lb_links(&mut self, loss_ppm: u32, delay: Duration) -> Result<()> {
        if self.impair.is_some() {
            bail!("the LB links are impaired already");
        }
        // Frames of the nodes' own stacks must carry full checksums: the
        // delay line copies them as they are (a veth leaves them partial).
        for n in &self.lbs {
            n.ns.exec(&["ethtool", "-K", "f0", "tx", "off"])?;
        }
        let ports: Vec<String> = self.lbs.iter().map(|n| format!("pf{}", n.index)).collect();
        self.impair = Some(crate::impair::LinkImpairment::start(
            &self.sw,
            "brf",
            &ports,
            datapath_ebpf::impair::ImpairSpec {
                net: "10.88.0.0".parse()?,
                prefix: 24,
                exclude: ROUTER_FABRIC.parse()?,
                loss_ppm,
                redirect_ifindex: 0,
            },
            delay,
        )?);
        Ok(())
    }

    /// What the impairment did: frames matched, dropped, redirected, and
    /// sent on by the delay line.
    pub fn impair_stats(&self) -> Result<(datapath_ebpf::impair::ImpairStats, u64)> {
        match &self.impair {
            Some(i) => i.stats(),
            None => bail!("the LB links are not impaired"),
        }
    }

    /// Take the impairment away.
    pub fn heal_lb_links(&mut self) -> Result<()> {
        if self.impair.take().is_some() {
            self.sw.ip("link del dl0")?;
        }
        Ok(())
    }

    /// A command of the router's BIRD (birdc on its control socket).
    fn router_birdc(&self, cmd: &str) -> Result<String> {
        let ctl = self.spec.dir.join("router.ctl");
        Ok(self
            .router
            .exec(&["birdc", "-s", ctl.to_str().unwrap_or_default(), cmd])?)
    }

    /// The router's BGP sessions to the LB nodes that are established:
    /// peer → a mark that changes whenever the session is established
    /// anew (BIRD: the `since` of `show protocols`; FRR: how many times
    /// it was established).
    pub fn router_sessions(&self) -> Result<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        match self.router_speaker.as_ref() {
            Some(SpeakerProc::Bird(_)) => {
                let text = self.router_birdc("show protocols")?;
                // Name Proto Table State Since Info
                for l in text.lines() {
                    let w: Vec<&str> = l.split_whitespace().collect();
                    if w.len() >= 6
                        && w[0].starts_with("lb")
                        && w[1] == "BGP"
                        && w[3] == "up"
                        && w[5] == "Established"
                    {
                        out.insert(w[0].to_string(), w[4].to_string());
                    }
                }
            }
            Some(SpeakerProc::Frr(f)) => {
                // How many times each was established (exact; FRR's
                // established epoch is derived from its uptime and wobbles
                // by a second).
                let text = f.vtysh(&self.router, "show bgp neighbors json")?;
                let v: serde_json::Value = serde_json::from_str(&text)
                    .with_context(|| format!("FRR's bgp neighbors: {text}"))?;
                if let Some(peers) = v.as_object() {
                    for (peer, p) in peers {
                        if p["bgpState"] == "Established" {
                            out.insert(
                                peer.clone(),
                                format!("established {} times", p["connectionsEstablished"]),
                            );
                        }
                    }
                }
            }
            None => bail!("the router has no BGP speaker"),
        }
        Ok(out)
    }

    /// The router's BGP paths to the IPv4 VIP prefix: each path's next
    /// hop and local preference (also the paths not installed, e.g. of a
    /// node drained with GRACEFUL_SHUTDOWN).
    pub fn router_bgp_paths(&self) -> Result<Vec<(IpAddr, u32)>> {
        let mut out = Vec::new();
        match self.router_speaker.as_ref() {
            Some(SpeakerProc::Bird(_)) => {
                let text = self.router_birdc(&format!("show route all {VIP_CIDR}"))?;
                let mut via: Option<IpAddr> = None;
                for l in text.lines().map(str::trim) {
                    if let Some(rest) = l.strip_prefix("via ") {
                        via = rest.split_whitespace().next().and_then(|a| a.parse().ok());
                    } else if let Some(lp) = l.strip_prefix("BGP.local_pref: ") {
                        if let (Some(v), Ok(lp)) = (via.take(), lp.trim().parse()) {
                            out.push((v, lp));
                        }
                    }
                }
            }
            Some(SpeakerProc::Frr(f)) => {
                let text = f.vtysh(
                    &self.router,
                    &format!("show bgp ipv4 unicast {VIP_CIDR} json"),
                )?;
                let v: serde_json::Value =
                    serde_json::from_str(&text).with_context(|| format!("FRR's paths: {text}"))?;
                for p in v["paths"].as_array().into_iter().flatten() {
                    let hop = p["nexthops"][0]["ip"].as_str().and_then(|a| a.parse().ok());
                    let lp = p["locPrf"].as_u64().unwrap_or(100) as u32;
                    if let Some(h) = hop {
                        out.push((h, lp));
                    }
                }
            }
            None => bail!("the router has no BGP speaker"),
        }
        Ok(out)
    }

    /// Next hops of the router's route to the IPv4 VIP prefix.
    pub fn router_nexthops(&self) -> Result<Vec<IpAddr>> {
        self.nexthops(VIP_CIDR)
    }

    /// Next hops of the router's route to the IPv6 VIP prefix.
    pub fn router_nexthops6(&self) -> Result<Vec<IpAddr>> {
        self.nexthops(VIP6_CIDR)
    }

    fn nexthops(&self, prefix: &str) -> Result<Vec<IpAddr>> {
        let family = if prefix.contains(':') { "-6" } else { "-4" };
        Ok(nexthops_of(
            &self.router.ip(&format!("{family} route show {prefix}"))?,
        ))
    }

    /// Wait until the router's ECMP routes (IPv4 and IPv6) are exactly
    /// `nodes`.
    pub fn wait_route(&self, nodes: &[usize], timeout: Duration) -> Result<Duration> {
        let mut want: Vec<IpAddr> = nodes.iter().map(|i| lb_addr(*i)).collect();
        want.sort();
        let mut want6: Vec<IpAddr> = nodes.iter().map(|i| lb_addr6(*i)).collect();
        want6.sort();
        wait_until(
            &format!("the router's routes via {want:?} and {want6:?}"),
            timeout,
            || {
                let mut have = self.router_nexthops()?;
                have.sort();
                let mut have6 = self.router_nexthops6()?;
                have6.sort();
                Ok(have == want && have6 == want6)
            },
        )
    }

    /// Wait until every running node is a voter at the committed epoch,
    /// warm-joined and announced, and the router routes over all of them.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let running = self.running();
        let t0 = Instant::now();
        for &i in &running {
            let left = timeout.saturating_sub(t0.elapsed());
            self.wait_status(
                i,
                &format!("node {i} to be ready and announced"),
                left,
                |s| {
                    s.bgp_announced == Some(true)
                        && s.datapath_attached
                        && s.config_epoch == s.applied_epoch
                        && s.sync.as_ref().is_none_or(|y| y.ready)
                },
            )?;
        }
        self.wait_route(&running, timeout.saturating_sub(t0.elapsed()))?;
        self.prime_neighbours(&running)?;
        Ok(())
    }

    /// Resolve the router's neighbour entries of the nodes' fabric
    /// addresses, as a router has them for its BGP peers. (Linux routes a
    /// flow's packets around a multipath next hop whose neighbour is still
    /// being resolved while the first packet waits for it: the two halves
    /// of a handshake would reach two LB nodes, a split that a SNAT flow
    /// does not survive. Production routers resolve their peers up front.)
    pub fn prime_neighbours(&self, nodes: &[usize]) -> Result<()> {
        for &i in nodes {
            for a in [lb_addr(i), lb_addr6(i)] {
                let a = a.to_string();
                self.router
                    .exec(&["ping", "-c", "1", "-W", "2", &a])
                    .with_context(|| format!("the router resolving LB node {i} at {a}"))?;
            }
        }
        Ok(())
    }

    /// The backend id of host `j` in `service`.
    pub fn backend_id(&self, service: &str, j: usize) -> Result<u32> {
        let cfg = self.config()?;
        cfg.backends
            .values()
            .find(|b| {
                b.service == service && (b.addr == backend_addr(j) || b.addr == backend_addr6(j))
            })
            .map(|b| b.id)
            .ok_or_else(|| anyhow!("no backend be{j} in {service}"))
    }

    pub fn add_backend(&self, j: usize) -> Result<Response> {
        self.write(Command::Batch {
            commands: add_backend_cmds(j),
        })
    }

    /// Take backend host `j` out of every service.
    pub fn remove_backend(&self, j: usize) -> Result<Response> {
        let commands = SERVICES
            .iter()
            .map(|s| {
                Ok(Command::RemoveBackend {
                    id: self.backend_id(s, j)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.write(Command::Batch { commands })
    }

    /// Resident memory of node `i`'s holdfast-node, KiB.
    pub fn node_rss_kib(&self, i: usize) -> Option<u64> {
        let pid = self.lb(i).node_pid()?;
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    }

    pub fn set_backend_state(&self, j: usize, state: BackendState) -> Result<Response> {
        let commands = SERVICES
            .iter()
            .map(|s| {
                Ok(Command::SetBackendState {
                    id: self.backend_id(s, j)?,
                    state,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.write(Command::Batch { commands })
    }

    pub fn set_backend_weight(&self, j: usize, weight: u32) -> Result<Response> {
        let commands = SERVICES
            .iter()
            .map(|s| {
                Ok(Command::SetBackendWeight {
                    id: self.backend_id(s, j)?,
                    weight,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.write(Command::Batch { commands })
    }

    /// Wait until every running node's datapath is at `epoch`.
    pub fn wait_epoch(&self, epoch: u64, timeout: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        for i in self.running() {
            self.wait_status(
                i,
                &format!("node {i} to apply epoch {epoch}"),
                timeout.saturating_sub(t0.elapsed()),
                |s| s.applied_epoch >= epoch,
            )?;
        }
        Ok(t0.elapsed())
    }

    /// The node that leads, as the running nodes see it.
    pub fn leader(&self) -> Result<usize> {
        for i in self.running() {
            if let Ok(s) = self.status(i) {
                if let Some(l) = s.leader {
                    return Ok(l as usize);
                }
            }
        }
        bail!("no leader known")
    }
}

/// Start `holdfast-decap` on backend host `j` (namespace `be`) and wait
/// until it is attached.
fn start_decap(be: &NetNs, spec: &LabSpec, j: usize) -> Result<std::process::Child> {
    let ready = spec.dir.join(format!("decap-b{j}.ready"));
    let _ = std::fs::remove_file(&ready);
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(spec.dir.join(format!("decap-b{j}.log")))?;
    let exe = spec.exe.clone();
    let mut child = be
        .command(&exe)?
        .args([
            "_decap",
            "--iface",
            "b0",
            "--vip",
            VIP,
            "--vip",
            VIP6,
            "--ready-file",
        ])
        .arg(&ready)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {} _decap", exe.display()))?;
    let started = wait_until(
        "holdfast-decap on a backend",
        Duration::from_secs(10),
        || {
            if let Some(st) = child.try_wait()? {
                bail!("holdfast-decap exited ({st}); see decap-b{j}.log");
            }
            Ok(ready.exists())
        },
    );
    if let Err(e) = started {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    Ok(child)
}

/// Backend host `j`'s servers: the VIPs (for clients, DSR) and the host's
/// own addresses (for health checks).
/// Backend host `j`'s servers: on its own addresses (SNAT, health checks)
/// and, on a DSR host (`vip`), on the VIPs too.
fn start_servers(be: &NetNs, j: usize, vip: bool) -> Result<(Servers, Servers)> {
    let on = |own: IpAddr, vip_addr: &str, port: u16| -> Result<Vec<SocketAddr>> {
        let mut v = vec![SocketAddr::new(own, port)];
        if vip {
            v.insert(0, SocketAddr::new(vip_addr.parse()?, port));
        }
        Ok(v)
    };
    let v4 = Servers::start_on(
        be,
        j,
        on(backend_addr(j), VIP, TCP_PORT)?,
        on(backend_addr(j), VIP, UDP_PORT)?,
    )?;
    let v6 = Servers::start_on(
        be,
        j,
        on(backend_addr6(j), VIP6, TCP_PORT)?,
        on(backend_addr6(j), VIP6, UDP_PORT)?,
    )?;
    Ok((v4, v6))
}

/// The lab's four services (TCP and UDP, IPv4 and IPv6), all on every
/// backend host.
pub const SERVICES: [&str; 4] = [TCP_SERVICE, UDP_SERVICE, TCP_SERVICE6, UDP_SERVICE6];

fn put_service(
    name: &str,
    vip: &str,
    proto: Proto,
    port: u16,
    checked: bool,
    mode: ForwardingMode,
) -> Command {
    Command::PutService {
        service: Service {
            name: name.into(),
            vip: vip.parse().expect("static"),
            port,
            proto,
            table_size: 1021,
            mode,
            health_check: checked.then(|| lab_check(proto)),
            source_ranges: Vec::new(),
            affinity_timeout_s: None,
        },
    }
}

/// Backend host `j` in every service (its IPv4 address in the IPv4
/// services, its IPv6 address in the IPv6 ones).
pub fn add_backend_cmds(j: usize) -> Vec<Command> {
    [
        (TCP_SERVICE, TCP_PORT, backend_addr(j)),
        (UDP_SERVICE, UDP_PORT, backend_addr(j)),
        (TCP_SERVICE6, TCP_PORT, backend_addr6(j)),
        (UDP_SERVICE6, UDP_PORT, backend_addr6(j)),
        // SNAT: VIP:8008 to the echo server's 8007.
        (SNAT_TCP_SERVICE, TCP_PORT, backend_addr(j)),
        // Target port: VIP:8009 to the echo server's 8007.
        (TP_TCP_SERVICE, TCP_PORT, backend_addr(j)),
    ]
    .iter()
    .map(|(s, port, addr)| Command::AddBackend {
        service: (*s).into(),
        addr: *addr,
        port: *port,
        weight: 1,
    })
    .collect()
}

impl Drop for Lab {
    fn drop(&mut self) {
        for n in &mut self.lbs {
            if let Some(mut c) = n.process.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            n.speaker.take();
            let _ = datapath_ebpf::loader::remove_pins(&n.pin_dir);
        }
        self.impair.take();
        self.router_speaker.take();
        self.backends.clear();
    }
}
