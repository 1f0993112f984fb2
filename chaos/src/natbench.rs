//! Holdfast's SNAT mode against the Linux kernel's own NAT, side by side on
//! one LB node: the same client, the same backends, the same servers; only
//! what runs on the LB node changes between runs.
//!
//! ```text
//!  client (10.78.0.100)      VIP 10.78.100.1:80 -> backends :8080
//!     |  route VIP via 10.78.0.2
//!  [ bridge br0 in namespace "sw" ] ----- lb (10.78.0.2, one arm: l0)
//!     |            |                       holdfast: XDP SNAT from 10.78.200.1
//!   b1 ...        bN (10.78.0.1N)          nft: DNAT + masquerade (kube-proxy)
//!                 echo server on :8080, route 10.78.200.0/24 via the LB
//! ```
//!
//! Paths measured:
//! - `direct`: the client talks to the backends' own addresses, no LB in
//!   between (the floor: the client's and the backends' own cost);
//! - `nft`: nftables rules the way kube-proxy's nftables mode programs a
//!   LoadBalancer IP (a verdict map of service IPs, `numgen random` over
//!   endpoint chains, a masquerade mark, `dnat to`, `masquerade
//!   fully-random`), kernel conntrack and forwarding;
//! - `holdfast`: Holdfast's XDP program in SNAT mode on the same interface.
//!
//! The LB node's CPU: its interface receives through NAPI in a thread of
//! its own (threaded NAPI, GRO on so the kernel path uses NAPI too), and
//! everything the node does with a packet — XDP or the kernel's receive,
//! conntrack, NAT, routing, and the transmit into the wire — runs in that
//! thread; its run time (/proc/PID/schedstat) over the measured window is
//! the LB's CPU. The bridge's end of the wire has its own NAPI thread, so
//! the network's work is not charged to the LB. Busy time of all CPUs
//! (/proc/stat) is printed beside it: client, servers and network included.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use datapath_ebpf::{
    testrun::Nop, AttachMode, BackendSpec, BackendState, Datapath, DatapathConfig, DatapathOptions,
    Forwarding, Proto, ServiceSpec, SnatConfig, SnatSlot,
};
use netns::{veth, NetNs};
use serde::Serialize;

use crate::servers::Servers;

pub const VIP: &str = "10.78.100.1";
pub const VIP_PORT: u16 = 80;
pub const BACKEND_PORT: u16 = 8080;
pub const SNAT_ADDR: &str = "10.78.200.1";
pub const LB_ADDR: &str = "10.78.0.2";
pub const CLIENT: &str = "10.78.0.100";
/// The LB's interface, named so its NAPI thread (`napi/hfnat0-<id>`) is
/// found by name; the bridge's end of it.
const LB_IF: &str = "hfnat0";
const LB_PEER: &str = "hfnatp0";

pub fn backend_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 78, 0, 10 + i as u8)
}

/// What runs on the LB node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Path {
    Direct,
    Nft,
    Holdfast,
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Path::Direct => "direct",
            Path::Nft => "nft",
            Path::Holdfast => "holdfast",
        })
    }
}

/// The client's load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Request/response on persistent connections.
    Rr,
    /// A new connection per request (connect, request, response, close).
    Crr,
}

impl std::str::FromStr for Path {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "direct" => Ok(Path::Direct),
            "nft" => Ok(Path::Nft),
            "holdfast" => Ok(Path::Holdfast),
            _ => bail!("--paths: {s:?} is none of direct, nft, holdfast"),
        }
    }
}

impl std::str::FromStr for Kind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "rr" => Ok(Kind::Rr),
            "crr" => Ok(Kind::Crr),
            _ => bail!("--kind: {s:?} is neither rr nor crr"),
        }
    }
}

/// One measured run.
#[derive(Clone, Debug, Serialize)]
pub struct Run {
    pub path: Path,
    pub kind: Kind,
    pub conns: usize,
    pub seconds: f64,
    pub requests: u64,
    pub errors: u64,
    pub rps: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    /// Busy CPU (all CPUs, every kind of time) per request, µs.
    pub cpu_us_per_req: f64,
    /// Of which softirq (where XDP, kernel forwarding and NAT run), µs.
    pub softirq_us_per_req: f64,
    /// The LB node's CPU per request (its NAPI thread), µs; none for direct.
    pub lb_us_per_req: Option<f64>,
    /// Of which the packets' work: without the samples (perf) in the
    /// scheduler's switch and wake-up functions, µs.
    pub lb_work_us_per_req: Option<f64>,
    /// The XDP program's own run time per request (BPF statistics), µs.
    pub xdp_us_per_req: Option<f64>,
    /// The datapath's counters over the run (Holdfast only, non-zero ones).
    pub counters: std::collections::BTreeMap<String, u64>,
}

pub struct NatLab {
    datapath: Option<Datapath>,
    /// What the node's agent does beside the datapath: drain the new-flow
    /// ring (replication's input) and expire conntrack entries and SNAT
    /// bindings at the node's default interval.
    agent: Option<(
        std::sync::Arc<std::sync::atomic::AtomicBool>,
        std::thread::JoinHandle<()>,
    )>,
    servers: Vec<Servers>,
    _nop: Nop,
    pub backends: Vec<NetNs>,
    pub lb: NetNs,
    pub client: NetNs,
    pub sw: NetNs,
    n_backends: usize,
    /// Read the XDP program's run time (kernel.bpf_stats_enabled, which
    /// costs the program two clock reads per packet while on).
    pub bpf_stats: bool,
    /// Split the NAPI thread's time with perf (scheduler vs packet work).
    pub perf: bool,
}

fn holdfast_config(n_backends: usize) -> DatapathConfig {
    DatapathConfig {
        epoch: 1,
        services: vec![ServiceSpec {
            source_ranges: Vec::new(),
            affinity_timeout_s: None,
            vip: VIP.parse().expect("static"),
            port: VIP_PORT,
            proto: Proto::Tcp,
            table_size: 251,
            backends: (1..=n_backends)
                .map(|i| BackendSpec {
                    id: i as u32,
                    addr: IpAddr::V4(backend_addr(i)),
                    weight: 1,
                    state: BackendState::Active,
                    port: BACKEND_PORT,
                })
                .collect(),
            forwarding: Forwarding::Snat,
        }],
        snat: SnatConfig {
            slots: vec![SnatSlot {
                slot: 1,
                v4: Some(SNAT_ADDR.parse().expect("static")),
                v6: None,
            }],
            own: Some(1),
        },
    }
}

/// kube-proxy's nftables mode for one LoadBalancer IP with
/// externalTrafficPolicy Cluster (its chain layout, names shortened).
pub fn nft_rules(n_backends: usize) -> String {
    let mut endpoints = String::new();
    let mut vmap = Vec::new();
    for i in 1..=n_backends {
        let a = backend_addr(i);
        endpoints.push_str(&format!(
            "  chain endpoint-{i} {{\n    ip saddr {a} jump mark-for-masquerade\n    \
             meta l4proto tcp dnat to {a}:{BACKEND_PORT}\n  }}\n"
        ));
        vmap.push(format!("{} : goto endpoint-{i}", i - 1));
    }
    format!(
        "table ip holdfast-bench {{\n\
         {endpoints}\
         \x20 chain mark-for-masquerade {{\n    mark set mark or 0x4000\n  }}\n\
         \x20 chain masquerading {{\n    mark and 0x4000 == 0 return\n    \
         mark set mark xor 0x4000\n    masquerade fully-random\n  }}\n\
         \x20 chain service-echo {{\n    numgen random mod {n_backends} vmap {{ {} }}\n  }}\n\
         \x20 chain external-echo {{\n    jump mark-for-masquerade\n    goto service-echo\n  }}\n\
         \x20 map service-ips {{\n    type ipv4_addr . inet_proto . inet_service : verdict\n    \
         elements = {{ {VIP} . tcp . {VIP_PORT} : goto external-echo }}\n  }}\n\
         \x20 chain services {{\n    ip daddr . meta l4proto . th dport vmap @service-ips\n  }}\n\
         \x20 chain nat-prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
         jump services\n  }}\n\
         \x20 chain nat-postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    \
         jump masquerading\n  }}\n\
         }}\n",
        vmap.join(", ")
    )
}

impl NatLab {
    pub fn up(prefix: &str, n_backends: usize) -> Result<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("the NAT bench needs root (network namespaces, BPF, nftables)");
        }
        if !(1..=50).contains(&n_backends) {
            bail!("--backends must be 1..=50, not {n_backends}");
        }
        let sw = NetNs::new(&format!("{prefix}sw"))?;
        let client = NetNs::new(&format!("{prefix}cl"))?;
        let lb = NetNs::new(&format!("{prefix}lb"))?;
        sw.ip("link add br0 type bridge")?;
        sw.ip("link set br0 up")?;
        veth(&client, "c0", &sw, "pc0")?;
        veth(&lb, LB_IF, &sw, LB_PEER)?;
        sw.ip("link set pc0 master br0")?;
        sw.ip(&format!("link set {LB_PEER} master br0"))?;
        // Both ends of the LB's wire receive in NAPI threads of their own.
        // (veth turns NAPI on when GRO is switched on: off first; it hands
        // a frame to the peer's NAPI only when the sender has no TSO)
        lb.exec(&["ethtool", "-K", LB_IF, "tso", "off"])?;
        sw.exec(&["ethtool", "-K", LB_PEER, "tso", "off"])?;
        lb.exec(&["ethtool", "-K", LB_IF, "gro", "off"])?;
        lb.exec(&["ethtool", "-K", LB_IF, "gro", "on"])?;
        lb.exec(&[
            "sh",
            "-c",
            &format!("echo 1 > /sys/class/net/{LB_IF}/threaded"),
        ])?;
        // Checksums computed by the sender, as a NIC would (see dplab).
        client.exec(&["ethtool", "-K", "c0", "tx", "off"])?;
        client.ip(&format!("addr add {CLIENT}/24 dev c0"))?;
        client.ip(&format!("route add {VIP}/32 via {LB_ADDR}"))?;
        // A new connection per request: every port usable, TIME_WAIT reused.
        client.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        lb.ip(&format!("addr add {LB_ADDR}/24 dev {LB_IF}"))?;
        lb.sysctl("net.ipv4.ip_forward", "1")?;
        lb.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        lb.sysctl(&format!("net.ipv4.conf.{LB_IF}.rp_filter"), "0")?;
        lb.sysctl("net.ipv4.conf.all.send_redirects", "0")?;
        lb.sysctl(&format!("net.ipv4.conf.{LB_IF}.send_redirects"), "0")?;
        // XDP_TX hands frames to the peer: give it an XDP program (NAPI).
        let pl0 = sw.ifindex(LB_PEER)?;
        let nop = sw.run(move || -> Result<Nop> {
            let mut nop = Nop::load()?;
            nop.attach(pl0)?;
            Ok(nop)
        })??;
        // (threaded NAPI once there is a NAPI: with the XDP program)
        sw.exec(&[
            "sh",
            "-c",
            &format!("echo 1 > /sys/class/net/{LB_PEER}/threaded"),
        ])?;
        let mut backends = Vec::new();
        let mut servers = Vec::new();
        for i in 1..=n_backends {
            let be = NetNs::new(&format!("{prefix}b{i}"))?;
            veth(&be, "b0", &sw, &format!("pb{i}"))?;
            sw.ip(&format!("link set pb{i} master br0"))?;
            be.exec(&["ethtool", "-K", "b0", "tx", "off"])?;
            be.ip(&format!("addr add {}/24 dev b0", backend_addr(i)))?;
            // Replies to Holdfast's SNAT address go back through the LB.
            be.ip(&format!("route add {SNAT_ADDR}/32 via {LB_ADDR}"))?;
            servers.push(Servers::start_on(
                &be,
                i,
                vec![SocketAddr::new(IpAddr::V4(backend_addr(i)), BACKEND_PORT)],
                vec![],
            )?);
            backends.push(be);
        }
        let mut lab = Self {
            datapath: None,
            agent: None,
            servers,
            _nop: nop,
            backends,
            lb,
            client,
            sw,
            n_backends,
            bpf_stats: false,
            perf: false,
        };
        let opts = DatapathOptions {
            max_services: 4,
            max_backends: 64,
            max_table_size: 251,
            conntrack_size: 1 << 20,
            ring_bytes: 1 << 22,
            node_id: 1,
            snat_size: 1 << 20,
            ..Default::default()
        };
        let cfg = holdfast_config(n_backends);
        let mut dp = lab.lb.run(move || -> Result<Datapath> {
            let mut dp = Datapath::load(opts)?;
            dp.apply(&cfg)?;
            Ok(dp)
        })??;
        let mut events = dp.take_flow_events()?;
        let ct = dp.conntrack();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let agent = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut last_expire = Instant::now();
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                buf.clear();
                events.drain(&mut buf, usize::MAX);
                if last_expire.elapsed() >= Duration::from_secs(60) {
                    let now = datapath_ebpf::maps::monotonic_now().as_nanos() as u64;
                    let _ = ct.expire(now);
                    last_expire = Instant::now();
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        lab.agent = Some((stop, agent));
        lab.datapath = Some(dp);
        Ok(lab)
    }

    fn set_path(&mut self, path: Path) -> Result<()> {
        // Start from nothing: no program, no rules, no kernel conntrack.
        let _ = self
            .lb
            .exec(&["nft", "delete", "table", "ip", "holdfast-bench"]);
        let _ = self.lb.exec(&["conntrack", "-F"]);
        let mut dp = self.datapath.take().ok_or_else(|| anyhow!("no datapath"))?;
        let dp = self.lb.run(move || -> Result<Datapath> {
            if !dp.attached().is_empty() {
                dp.detach(LB_IF)?;
            }
            if path == Path::Holdfast {
                dp.attach(LB_IF, AttachMode::Native)?;
            }
            Ok(dp)
        })??;
        self.datapath = Some(dp);
        if path == Path::Nft {
            let file =
                std::env::temp_dir().join(format!("holdfast-nat-bench-{}.nft", std::process::id()));
            std::fs::write(&file, nft_rules(self.n_backends))?;
            let r = self.lb.exec(&["nft", "-f", &file.to_string_lossy()]);
            let _ = std::fs::remove_file(&file);
            r.context("loading the nftables rules")?;
        }
        Ok(())
    }

    fn dp(&self) -> Result<&Datapath> {
        self.datapath.as_ref().ok_or_else(|| anyhow!("no datapath"))
    }

    fn xdp_time(&self) -> Result<(Duration, u64)> {
        let dp = self
            .datapath
            .as_ref()
            .ok_or_else(|| anyhow!("no datapath"))?;
        let info = dp.program().info()?;
        Ok((info.run_time(), info.run_count()))
    }

    /// Measure one path under one load.
    pub fn run(&mut self, path: Path, kind: Kind, conns: usize, seconds: f64) -> Result<Run> {
        self.set_path(path)?;
        let targets: Vec<SocketAddr> = match path {
            Path::Direct => (1..=self.n_backends)
                .map(|i| SocketAddr::new(IpAddr::V4(backend_addr(i)), BACKEND_PORT))
                .collect(),
            _ => vec![SocketAddr::new(VIP.parse()?, VIP_PORT)],
        };
        // One short warm-up (neighbours, caches), then the measured window.
        self.client.run({
            let t = targets.clone();
            move || load(&t, kind, conns.min(4), Duration::from_millis(300))
        })??;
        let napi0 = if path == Path::Direct {
            None
        } else {
            Some(napi_runtime()?)
        };
        let stats0 = if path == Path::Holdfast {
            Some(self.dp()?.stats()?)
        } else {
            None
        };
        let xdp0 = if path == Path::Holdfast && self.bpf_stats {
            Some(self.xdp_time()?)
        } else {
            None
        };
        let window = Duration::from_secs_f64(seconds);
        let perf = match (self.perf, path) {
            (true, Path::Nft | Path::Holdfast) => Some(PerfSched::start(window)?),
            _ => None,
        };
        let out = self
            .client
            .run(move || load(&targets, kind, conns, window))??;
        let sched_share = perf.map(PerfSched::finish).transpose()?;
        let counters = match stats0 {
            Some(s0) => {
                let s1 = self.dp()?.stats()?;
                datapath_ebpf::abi::STAT_NAMES
                    .iter()
                    .filter(|(_, i)| s1.c[*i] > s0.c[*i])
                    .map(|(name, i)| {
                        let short = name.trim_start_matches("LB_STAT_").to_lowercase();
                        (short, s1.c[*i] - s0.c[*i])
                    })
                    .collect()
            }
            None => Default::default(),
        };
        let per_req = |d: Duration| d.as_secs_f64() * 1e6 / out.requests.max(1) as f64;
        let lb = match napi0 {
            Some(t0) => Some(per_req(
                napi_runtime()?.saturating_sub(t0).mul_f64(out.scale),
            )),
            None => None,
        };
        let xdp = match xdp0 {
            Some((t0, _)) => Some(per_req(self.xdp_time()?.0.saturating_sub(t0))),
            None => None,
        };
        if out.requests == 0 {
            bail!(
                "{path} {kind:?}: no request was answered ({} errors)",
                out.errors
            );
        }
        let mut lat = out.latencies_us;
        lat.sort_unstable();
        let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize];
        let req = out.requests as f64;
        Ok(Run {
            path,
            kind,
            conns,
            seconds: out.elapsed.as_secs_f64(),
            requests: out.requests,
            errors: out.errors,
            rps: req / out.elapsed.as_secs_f64(),
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            cpu_us_per_req: out.cpu.busy.as_secs_f64() * 1e6 / req,
            softirq_us_per_req: out.cpu.softirq.as_secs_f64() * 1e6 / req,
            lb_us_per_req: lb,
            lb_work_us_per_req: lb.zip(sched_share).map(|(l, s)| l * (1.0 - s)),
            xdp_us_per_req: xdp,
            counters,
        })
    }
}

impl Drop for NatLab {
    fn drop(&mut self) {
        if let Some((stop, h)) = self.agent.take() {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = h.join();
        }
        if let Some(dp) = self.datapath.take() {
            let _ = dp.teardown();
        }
        self.servers.clear();
    }
}

/// The LB interface's NAPI threads (`napi/hfnat0-<id>`): pid, run time.
pub fn napi_threads() -> Result<Vec<(u32, Duration)>> {
    let prefix = format!("napi/{LB_IF}-");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let p = e.path();
        let Ok(comm) = std::fs::read_to_string(p.join("comm")) else {
            continue;
        };
        if !comm.trim_end().starts_with(&prefix) {
            continue;
        }
        let Ok(sched) = std::fs::read_to_string(p.join("schedstat")) else {
            continue;
        };
        let ns: u64 = sched
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("{}: malformed schedstat {sched:?}", p.display()))?;
        out.push((pid, Duration::from_nanos(ns)));
    }
    if out.is_empty() {
        bail!("no NAPI thread {prefix}* (threaded NAPI on the LB interface)");
    }
    Ok(out)
}

pub fn napi_runtime() -> Result<Duration> {
    Ok(napi_threads()?.iter().map(|t| t.1).sum())
}

/// Kernel functions of switching to and from the NAPI thread and of waking
/// the next one (its peer's NAPI thread): what a busy core, which polls
/// without sleeping, does not pay per packet.
const SCHED_SYMBOLS: &[&str] = &[
    "finish_task_switch",
    "__schedule",
    "schedule",
    "__napi_schedule",
    "try_to_wake_up",
    "ttwu_",
    "__switch_to",
    "switch_mm",
    "enqueue_",
    "dequeue_",
    "pick_next_",
    "put_prev_",
    "update_curr",
    "update_load_avg",
    "psi_",
];

/// `perf record` of the NAPI threads for `window`: the share of samples in
/// the scheduler's switch and wake-up functions.
pub struct PerfSched {
    child: std::process::Child,
    file: std::path::PathBuf,
}

impl PerfSched {
    pub fn start(window: Duration) -> Result<Self> {
        let tids: Vec<String> = napi_threads()?.iter().map(|t| t.0.to_string()).collect();
        let file =
            std::env::temp_dir().join(format!("holdfast-nat-bench-{}.perf", std::process::id()));
        let child = std::process::Command::new("perf")
            .args(["record", "-q", "-o"])
            .arg(&file)
            .args(["-t", &tids.join(","), "--", "sleep"])
            .arg(format!("{:.3}", window.as_secs_f64()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("running perf (install linux-perf)")?;
        Ok(Self { child, file })
    }

    /// Wait for perf; the scheduler's share of the samples (0..1).
    pub fn finish(mut self) -> Result<f64> {
        let st = self.child.wait()?;
        if !st.success() {
            bail!("perf record failed: {st}");
        }
        let out = std::process::Command::new("perf")
            .args([
                "report",
                "--stdio",
                "--no-children",
                "--sort",
                "sym",
                "-q",
                "-i",
            ])
            .arg(&self.file)
            .output()?;
        let _ = std::fs::remove_file(&self.file);
        let _ = std::fs::remove_file(self.file.with_extension("perf.old"));
        if !out.status.success() {
            bail!(
                "perf report: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let (mut total, mut sched) = (0.0, 0.0);
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "    12.15%  [k] __napi_schedule"
            let mut f = line.split_whitespace();
            let Some(pct) = f
                .next()
                .and_then(|p| p.strip_suffix('%'))
                .and_then(|p| p.parse::<f64>().ok())
            else {
                continue;
            };
            let sym = f.nth(1).unwrap_or("");
            total += pct;
            if SCHED_SYMBOLS.iter().any(|s| sym.starts_with(s)) {
                sched += pct;
            }
        }
        if total <= 0.0 {
            bail!("perf recorded no sample of the NAPI thread");
        }
        Ok(sched / total)
    }
}

/// Busy time of all CPUs from /proc/stat.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu {
    pub busy: Duration,
    pub softirq: Duration,
}

pub fn cpu_now() -> Result<Cpu> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .next()
        .filter(|l| l.starts_with("cpu "))
        .ok_or_else(|| anyhow!("/proc/stat has no cpu line"))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    if v.len() < 8 {
        bail!("/proc/stat: short cpu line {line:?}");
    }
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let t = |j: u64| Duration::from_secs_f64(j as f64 / hz);
    // user nice system idle iowait irq softirq steal
    Ok(Cpu {
        busy: t(v[0] + v[1] + v[2] + v[5] + v[6] + v[7]),
        softirq: t(v[6]),
    })
}

struct LoadOut {
    requests: u64,
    errors: u64,
    latencies_us: Vec<u64>,
    elapsed: Duration,
    cpu: Cpu,
    /// The window's share of the time CPU was read over.
    scale: f64,
}

/// Run the load from the calling thread's namespace (a runtime whose
/// threads are made here, so their sockets are too).
fn load(targets: &[SocketAddr], kind: Kind, conns: usize, window: Duration) -> Result<LoadOut> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let targets = targets.to_vec();
    rt.block_on(async move {
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(conns + 1));
        let deadline = std::sync::Arc::new(std::sync::OnceLock::<tokio::time::Instant>::new());
        let mut tasks = Vec::new();
        for c in 0..conns {
            let to = targets[c % targets.len()];
            let (b, d) = (barrier.clone(), deadline.clone());
            tasks.push(tokio::spawn(worker(to, kind, c, b, d)));
        }
        // Everyone connected: start the window, then let them go.
        barrier.wait().await;
        let c0 = cpu_now()?;
        let t0 = Instant::now();
        let _ = deadline.set(tokio::time::Instant::now() + window);
        barrier.wait().await;
        let mut out = LoadOut {
            requests: 0,
            errors: 0,
            latencies_us: Vec::new(),
            elapsed: Duration::ZERO,
            cpu: Cpu::default(),
            scale: 1.0,
        };
        let mut first_err = None;
        let mut finished = 0;
        for t in tasks {
            match t.await.map_err(|e| anyhow!("load task: {e}"))? {
                Ok(w) => {
                    out.requests += w.requests;
                    out.errors += w.errors;
                    out.latencies_us.extend(w.latencies_us);
                    finished += 1;
                    if finished == 1 {
                        // The window ends with the first worker past it.
                        out.elapsed = t0.elapsed();
                    }
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        let c1 = cpu_now()?;
        out.cpu = Cpu {
            busy: c1.busy.saturating_sub(c0.busy),
            softirq: c1.softirq.saturating_sub(c0.softirq),
        };
        // CPU was read until every worker finished: scale to the window.
        let all = t0.elapsed();
        if !all.is_zero() && !out.elapsed.is_zero() {
            let f = out.elapsed.as_secs_f64() / all.as_secs_f64();
            out.scale = f;
            out.cpu.busy = out.cpu.busy.mul_f64(f);
            out.cpu.softirq = out.cpu.softirq.mul_f64(f);
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        Ok(out)
    })
}

struct WorkerOut {
    requests: u64,
    errors: u64,
    latencies_us: Vec<u64>,
}

const REQUEST: &[u8] = b"GET /bench 0123456789abcdef0123456789abcdef0123456789abcdef\n";

async fn worker(
    to: SocketAddr,
    kind: Kind,
    index: usize,
    barrier: std::sync::Arc<tokio::sync::Barrier>,
    deadline: std::sync::Arc<std::sync::OnceLock<tokio::time::Instant>>,
) -> Result<WorkerOut> {
    use tokio::io::BufReader;
    let io_timeout = Duration::from_secs(2);
    let mut out = WorkerOut {
        requests: 0,
        errors: 0,
        latencies_us: Vec::new(),
    };
    let connect = || async {
        let s = tokio::time::timeout(io_timeout, tokio::net::TcpStream::connect(to))
            .await
            .map_err(|_| anyhow!("connect to {to}: timed out"))?
            .with_context(|| format!("connect to {to}"))?;
        s.set_nodelay(true)?;
        anyhow::Ok(BufReader::new(s))
    };
    let mut persistent = match kind {
        Kind::Rr => Some(
            connect()
                .await
                .with_context(|| format!("connection {index}"))?,
        ),
        Kind::Crr => None,
    };
    barrier.wait().await;
    barrier.wait().await;
    let deadline = *deadline
        .get()
        .ok_or_else(|| anyhow!("the window was not started"))?;
    let mut line = String::new();
    while tokio::time::Instant::now() < deadline {
        let t = Instant::now();
        let r = match &mut persistent {
            Some(s) => exchange(s, &mut line, io_timeout).await,
            None => match connect().await {
                Ok(mut s) => exchange(&mut s, &mut line, io_timeout).await,
                Err(e) => Err(e),
            },
        };
        match r {
            Ok(()) => {
                out.requests += 1;
                out.latencies_us.push(t.elapsed().as_micros() as u64);
            }
            Err(e) => {
                if persistent.is_some() {
                    return Err(e.context(format!("connection {index}")));
                }
                out.errors += 1;
            }
        }
    }
    Ok(out)
}

/// One request and its answer (which must echo the request).
async fn exchange(
    s: &mut tokio::io::BufReader<tokio::net::TcpStream>,
    line: &mut String,
    io_timeout: Duration,
) -> Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    line.clear();
    s.get_mut().write_all(REQUEST).await?;
    tokio::time::timeout(io_timeout, s.read_line(line))
        .await
        .map_err(|_| anyhow!("no answer within {io_timeout:?}"))??;
    if !line.ends_with(std::str::from_utf8(REQUEST).expect("ascii")) {
        bail!("wrong answer {line:?}");
    }
    Ok(())
}
