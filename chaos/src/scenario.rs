//! The fault scenarios: each builds a fresh [`Lab`], starts the traffic,
//! waits until every flow is answered (and, with replication on, until
//! every node's conntrack holds every flow), injects its fault, lets the
//! traffic run on until every surviving flow is answered again, and
//! reports what broke.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use holdfast_api::wire::HealthTable;
use raft_store::{
    cluster::{Health, Proto},
    ClusterState,
};
use serde::Serialize;

use crate::{
    lab::{self, Lab, LabSpec},
    traffic::{FlowRecord, Traffic, TrafficReport, TrafficSpec},
};

pub const SCENARIOS: [&str; 20] = [
    "kill-node",
    "churn-then-kill",
    "kill-leader",
    "restart-join",
    "agent-restart",
    "partition",
    "rolling-restart",
    "kill-two",
    "ipv6",
    "lossy-sync",
    "kill-during-join",
    "health",
    "source-ranges",
    "target-port",
    "affinity",
    "config-churn",
    "drain-then-stop",
    "speaker-restart",
    "kill-during-prepare",
    "rapid-churn",
];

/// Scenarios too long for `all`: run by name.
pub const LONG_SCENARIOS: [&str; 1] = ["soak"];

/// Conntrack entries per LB node a scenario needs.
pub fn conntrack_size(name: &str) -> u32 {
    match name {
        "kill-during-join" => 1 << 20,
        // Hundreds of short connections a second: each closed one stays up
        // to the closing timeout plus an expiry round (90 s).
        "soak" => 1 << 18,
        _ => 65_536,
    }
}

/// Synthetic entries kill-during-join puts on the nodes a joiner pulls
/// from, so that its warm join takes seconds.
pub const JOIN_BULK: u32 = 800_000;

/// The fewest LB nodes a scenario runs with (`--nodes` can ask for more).
pub fn min_nodes(name: &str) -> usize {
    match name {
        "kill-two" => 5,
        _ => 3,
    }
}

#[derive(Clone, Debug)]
pub struct RunOpts {
    pub nodes: usize,
    pub backends: usize,
    pub tcp: usize,
    pub udp: usize,
    /// Long-lived IPv6 TCP connections and UDP flows (to the IPv6 VIP),
    /// beside the IPv4 ones.
    pub tcp6: usize,
    pub udp6: usize,
    /// Short TCP connections opened per second beside the long-lived flows.
    pub short_per_s: u32,
    pub sync: bool,
    /// The program that runs holdfast-node (`{exe} _node --config FILE`).
    pub exe: PathBuf,
    /// Keep traffic running this long after everything converged.
    pub settle: Duration,
    /// Print progress lines to stderr.
    pub verbose: bool,
    /// How long the soak scenario runs.
    pub soak: Duration,
    /// How the lab's services forward (DSR or SNAT).
    pub forwarding: raft_store::cluster::ForwardingMode,
    /// The BGP speaker on the LB nodes and on the router.
    pub bgp: holdfast_bgp::Speaker,
    pub router: holdfast_bgp::Speaker,
    /// Graceful restart on the LB nodes' speakers (off: the baseline).
    pub graceful_restart: bool,
    /// What a drain does: withdraw, or announce with GRACEFUL_SHUTDOWN.
    pub drain: holdfast_bgp::DrainMode,
    /// Which entries the LB nodes replicate.
    pub sync_mode: holdfast_node::config::SyncMode,
}

impl RunOpts {
    pub fn new(exe: PathBuf) -> Self {
        Self {
            nodes: 3,
            backends: 4,
            tcp: 1000,
            udp: 200,
            tcp6: 300,
            udp6: 100,
            short_per_s: 0,
            sync: true,
            exe,
            settle: Duration::from_secs(2),
            verbose: false,
            soak: Duration::from_secs(30 * 60),
            forwarding: Default::default(),
            bgp: Default::default(),
            router: Default::default(),
            graceful_restart: true,
            drain: holdfast_bgp::DrainMode::Withdraw,
            sync_mode: Default::default(),
        }
    }
}

/// One scenario run. `tcp_broken`/`udp_broken` count flows that saw a
/// reset, a close, a wrong answer (another backend) or a 10 s timeout.
#[derive(Clone, Debug, Serialize)]
pub struct ScenarioResult {
    pub name: String,
    /// LB nodes of the lab.
    pub nodes: usize,
    pub sync: bool,
    /// "dsr" or "snat": how the lab's services forwarded.
    pub forwarding: String,
    /// The BGP speakers: on the LB nodes ("bird" or "frr") and the router.
    pub bgp: String,
    pub router: String,
    /// Graceful restart on the LB nodes' speakers; what a drain did.
    pub graceful_restart: bool,
    pub drain: String,
    /// "all" or "divergent": which entries the LB nodes replicated.
    pub sync_mode: holdfast_node::config::SyncMode,
    pub tcp_total: usize,
    pub tcp_broken: usize,
    pub udp_total: usize,
    pub udp_broken: usize,
    pub max_stall_ms: u64,
    /// Times to converge, in ms: `route` (router drops / adds the node's
    /// next hop), `election` (a new leader), `warm_join` (restarted node
    /// has the cluster's conntrack), `ready` (announced again), `repair`
    /// (conntrack identical on every node after a partition heals), ...
    pub converge_ms: BTreeMap<String, u64>,
    /// Which node the fault hit.
    pub victim: Option<usize>,
    /// Broken flows by reason (first words), and a few examples.
    pub broken_reasons: BTreeMap<String, usize>,
    pub broken_examples: Vec<FlowRecord>,
    /// Flows per backend at the end.
    pub per_backend: BTreeMap<String, usize>,
    /// Short connections (when `short_per_s` > 0): completed, failed,
    /// failures by the second they were opened in.
    pub short: crate::traffic::ShortReport,
    /// The IPv6 flows, reported apart (the fields above are IPv4's).
    pub v6: FamilyResult,
    /// Scenario-specific counts (e.g. `v6_flows_on_node_2`).
    pub counts: BTreeMap<String, u64>,
    pub duration_ms: u64,
}

impl ScenarioResult {
    /// Flows that broke and should not have: in `health` the flows on the
    /// backends it kills break by design (counted apart), only those on
    /// the other backends count; elsewhere every broken flow counts.
    pub fn unexpected_broken(&self) -> u64 {
        if self.name == "health" {
            self.counts
                .get("broken_on_other_backends")
                .copied()
                .unwrap_or(u64::MAX)
                .saturating_add(
                    self.counts
                        .get("v6_broken_on_other_backends")
                        .copied()
                        .unwrap_or(0),
                )
        } else {
            let flows =
                (self.tcp_broken + self.udp_broken + self.v6.tcp_broken + self.v6.udp_broken)
                    as u64;
            // affinity: a client's connection on another backend, or none;
            // config-churn: a BGP session reset.
            let affinity = ["affinity_broken", "affinity_failed", "sessions_reset"]
                .iter()
                .filter_map(|k| self.counts.get(*k))
                .sum::<u64>();
            flows + affinity
        }
    }
}

/// What one address family's long-lived flows saw.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FamilyResult {
    pub tcp_total: usize,
    pub tcp_broken: usize,
    pub udp_total: usize,
    pub udp_broken: usize,
    pub max_stall_ms: u64,
    pub broken_examples: Vec<FlowRecord>,
    /// The flows that stalled longest.
    pub slowest: Vec<FlowRecord>,
}

struct Ctx<'a> {
    lab: Lab,
    traffic: Traffic,
    /// The IPv6 flows (none when `tcp6 + udp6` is 0).
    traffic6: Option<Traffic>,
    converge: BTreeMap<String, u64>,
    counts: BTreeMap<String, u64>,
    /// Times (ms since the traffic started) while a node was dying: short
    /// connections opened then may fail.
    kill_windows: Vec<(u64, u64)>,
    victim: Option<usize>,
    opts: &'a RunOpts,
    t0: Instant,
}

impl Ctx<'_> {
    fn say(&self, msg: impl AsRef<str>) {
        if self.opts.verbose {
            let l = self.traffic.live();
            let v6 = self
                .traffic6
                .as_ref()
                .map(|t| {
                    let l = t.live();
                    format!(", v6 broken tcp {} udp {}", l.tcp_broken, l.udp_broken)
                })
                .unwrap_or_default();
            eprintln!(
                "[{:6.2}s] {}  (answers {}, broken tcp {} udp {}{v6}, max stall {} ms)",
                self.t0.elapsed().as_secs_f64(),
                msg.as_ref(),
                l.answers,
                l.tcp_broken,
                l.udp_broken,
                l.max_stall_ms
            );
        }
    }

    fn ms(&mut self, key: &str, d: Duration) {
        self.converge.insert(key.into(), d.as_millis() as u64);
    }

    /// Wait until every flow that is not broken answers again.
    fn all_answer(&self, timeout: Duration) -> Result<()> {
        let t0 = Instant::now();
        self.traffic.mark();
        if let Some(t) = &self.traffic6 {
            t.mark();
        }
        self.traffic.wait_all_answered(timeout)?;
        match &self.traffic6 {
            Some(t) => t
                .wait_all_answered(timeout.saturating_sub(t0.elapsed()))
                .context("IPv6 flows"),
            None => Ok(()),
        }
    }

    /// With replication on: wait until every running node's conntrack
    /// holds at least `n` flows of the VIP.
    /// Divergent replication holds a flow on its own node only (until a
    /// table change moves it): then wait until the nodes together hold
    /// `n` flows.
    fn wait_replicated(&self, n: usize, timeout: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        if self.opts.sync_mode == holdfast_node::config::SyncMode::Divergent {
            lab::wait_until(
                &format!("the nodes' conntrack to hold all {n} flows between them"),
                timeout,
                || {
                    let mut all = std::collections::HashSet::new();
                    for i in self.lab.running() {
                        for r in self.lab.conntrack(i)? {
                            all.insert((r.client, r.vip, r.proto));
                        }
                    }
                    Ok(all.len() >= n)
                },
            )?;
            return Ok(t0.elapsed());
        }
        for i in self.lab.running() {
            lab::wait_until(
                &format!("node {i}'s conntrack to hold all {n} flows"),
                timeout.saturating_sub(t0.elapsed()),
                || Ok(self.lab.conntrack(i)?.len() >= n),
            )?;
        }
        Ok(t0.elapsed())
    }

    /// The running node whose own datapath created the most flows.
    fn busiest(&self, exclude_leader: bool) -> Result<usize> {
        let leader = self.lab.leader()?;
        let mut best = None;
        for i in self.lab.running() {
            if exclude_leader && i == leader {
                continue;
            }
            let own = self
                .lab
                .conntrack(i)?
                .iter()
                .filter(|r| usize::from(r.origin) == i)
                .count();
            if best.is_none_or(|(_, n)| own > n) {
                best = Some((i, own));
            }
        }
        best.map(|(i, _)| i)
            .ok_or_else(|| anyhow!("no candidate node"))
    }

    /// Time until a running node other than `old` reports a leader that
    /// is not `old`.
    fn wait_new_leader(&self, old: usize, timeout: Duration) -> Result<Duration> {
        lab::wait_until("a new leader", timeout, || {
            for i in self.lab.running() {
                if let Ok(s) = self.lab.status(i) {
                    if s.leader.is_some_and(|l| l as usize != old) {
                        return Ok(true);
                    }
                }
            }
            Ok(false)
        })
    }

    /// Kill node `v` silently and wait until the router has dropped it;
    /// records `key` (ms since the kill) and returns the kill's instant.
    fn kill_and_reroute(&mut self, v: usize, key: &str) -> Result<Instant> {
        let t = Instant::now();
        self.lab.kill_node(v)?;
        let others = self.others(v);
        self.lab.wait_route(&others, Duration::from_secs(10))?;
        let d = t.elapsed();
        self.ms(key, d);
        self.say(format!(
            "router dropped node {v} after {} ms",
            d.as_millis()
        ));
        Ok(t)
    }

    fn others(&self, i: usize) -> Vec<usize> {
        self.lab.running().into_iter().filter(|k| *k != i).collect()
    }
}

/// Run scenario `name` once.
pub fn run(name: &str, opts: &RunOpts) -> Result<ScenarioResult> {
    if !SCENARIOS.contains(&name) && !LONG_SCENARIOS.contains(&name) {
        bail!(
            "unknown scenario {name:?}; one of: {} (or all)",
            SCENARIOS.join(", ")
        );
    }
    let t0 = Instant::now();
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "holdfast-chaos-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let mut spec = LabSpec::new("hfc", dir.clone(), opts.exe.clone());
    spec.nodes = opts.nodes.max(min_nodes(name));
    spec.conntrack_size = conntrack_size(name);
    spec.backends = opts.backends;
    spec.spare_backends = 1;
    spec.sync = opts.sync;
    spec.health_checks = name == "health";
    spec.forwarding = opts.forwarding;
    spec.bgp = opts.bgp;
    spec.router = opts.router;
    spec.graceful_restart = opts.graceful_restart;
    spec.drain = opts.drain;
    spec.sync_mode = opts.sync_mode;
    let res = run_in(name, opts, spec, t0);
    match &res {
        Ok(_) if std::env::var_os("HOLDFAST_CHAOS_KEEP").is_some() => {
            eprintln!("chaos: logs of the run are kept in {}", dir.display());
        }
        Ok(_) => {
            let _ = std::fs::remove_dir_all(&dir);
        }
        Err(_) => eprintln!("chaos: logs of the failed run are in {}", dir.display()),
    }
    res
}

fn run_in(name: &str, opts: &RunOpts, spec: LabSpec, t0: Instant) -> Result<ScenarioResult> {
    if opts.verbose {
        eprintln!(
            "== {name} (replication {}) ==",
            if opts.sync { "on" } else { "off" }
        );
    }
    let lab = Lab::up(spec).context("bringing the lab up")?;
    let mut tspec = TrafficSpec::new(lab::VIP.parse()?, lab::CLIENT.parse()?, opts.tcp, opts.udp);
    tspec.short_per_s = opts.short_per_s;
    let traffic = Traffic::start(&lab.client, tspec).context("starting the traffic")?;
    let traffic6 = if opts.tcp6 + opts.udp6 > 0 {
        let t6 = TrafficSpec::new(
            lab::VIP6.parse()?,
            lab::CLIENT6.parse()?,
            opts.tcp6,
            opts.udp6,
        );
        Some(Traffic::start(&lab.client, t6).context("starting the IPv6 traffic")?)
    } else {
        None
    };
    let mut cx = Ctx {
        lab,
        traffic,
        traffic6,
        converge: BTreeMap::new(),
        counts: BTreeMap::new(),
        kill_windows: Vec::new(),
        victim: None,
        opts,
        t0,
    };
    cx.say(format!(
        "lab up: {} LB nodes, {} TCP + {} UDP flows, IPv6 {} TCP + {} UDP",
        cx.lab.spec.nodes, opts.tcp, opts.udp, opts.tcp6, opts.udp6
    ));
    cx.all_answer(Duration::from_secs(20))
        .context("every flow answered once")?;
    if opts.sync {
        let d = cx.wait_replicated(
            opts.tcp + opts.udp + opts.tcp6 + opts.udp6,
            Duration::from_secs(20),
        )?;
        cx.say(format!(
            "every node holds every flow ({} ms)",
            d.as_millis()
        ));
    }
    if opts.forwarding == raft_store::cluster::ForwardingMode::Snat {
        // Before the fault: every node's (a dead node's are gone after).
        snat_counters(&mut cx, "before_fault_")?;
    }
    match name {
        "kill-node" => kill_node(&mut cx)?,
        "churn-then-kill" => churn_then_kill(&mut cx)?,
        "kill-leader" => kill_leader(&mut cx)?,
        "restart-join" => restart_join(&mut cx)?,
        "agent-restart" => agent_restart(&mut cx)?,
        "partition" => partition(&mut cx)?,
        "rolling-restart" => rolling_restart(&mut cx)?,
        "kill-two" => kill_two(&mut cx)?,
        "ipv6" => ipv6(&mut cx)?,
        "lossy-sync" => lossy_sync(&mut cx)?,
        "kill-during-join" => kill_during_join(&mut cx)?,
        "health" => health(&mut cx)?,
        "source-ranges" => source_ranges(&mut cx)?,
        "target-port" => target_port(&mut cx)?,
        "affinity" => affinity(&mut cx)?,
        "config-churn" => config_churn(&mut cx)?,
        "drain-then-stop" => drain_then_stop(&mut cx)?,
        "speaker-restart" => speaker_restart(&mut cx)?,
        "kill-during-prepare" => kill_during_prepare(&mut cx)?,
        "rapid-churn" => rapid_churn(&mut cx)?,
        "soak" => soak(&mut cx)?,
        _ => unreachable!("checked above"),
    }
    // Every surviving flow must answer again; then keep going a little.
    if let Err(e) = cx.all_answer(Duration::from_secs(15)) {
        cx.say(format!("not every flow answered again: {e}"));
    }
    if opts.forwarding == raft_store::cluster::ForwardingMode::Snat {
        if let Err(e) = snat_census(&mut cx) {
            cx.say(format!("SNAT census failed: {e:#}"));
        }
    }
    std::thread::sleep(opts.settle);
    cx.say("stopping the traffic");
    let Ctx {
        lab,
        traffic,
        traffic6,
        converge,
        mut counts,
        kill_windows,
        victim,
        ..
    } = cx;
    let report: TrafficReport = traffic.stop()?;
    if opts.short_per_s > 0 {
        counts.insert(
            "short_failed_outside_kills".into(),
            report.short.failed_outside(&kill_windows),
        );
    }
    let v6 = match traffic6 {
        Some(t) => {
            let r = t.stop()?;
            FamilyResult {
                tcp_total: r.tcp_total,
                tcp_broken: r.tcp_broken,
                udp_total: r.udp_total,
                udp_broken: r.udp_broken,
                max_stall_ms: r.max_stall_ms,
                broken_examples: r.broken.iter().take(5).cloned().collect(),
                slowest: r.slowest,
            }
        }
        None => FamilyResult::default(),
    };
    let nodes = lab.spec.nodes;
    drop(lab);
    let mut reasons = BTreeMap::new();
    for f in &report.broken {
        let what = f.failure.as_ref().map(|x| x.what.as_str()).unwrap_or("");
        let key: String = what
            .split([':', '('])
            .next()
            .unwrap_or(what)
            .trim()
            .to_string();
        *reasons.entry(format!("{} {key}", f.proto)).or_insert(0) += 1;
    }
    Ok(ScenarioResult {
        name: name.into(),
        nodes,
        sync: opts.sync,
        forwarding: opts.forwarding.to_string(),
        bgp: opts.bgp.to_string(),
        router: opts.router.to_string(),
        graceful_restart: opts.graceful_restart,
        drain: opts.drain.to_string(),
        sync_mode: opts.sync_mode,
        tcp_total: report.tcp_total,
        tcp_broken: report.tcp_broken,
        udp_total: report.udp_total,
        udp_broken: report.udp_broken,
        max_stall_ms: report.max_stall_ms,
        converge_ms: converge,
        victim,
        broken_reasons: reasons,
        broken_examples: report.broken.iter().take(5).cloned().collect(),
        per_backend: report.per_backend,
        short: report.short,
        v6,
        counts,
        duration_ms: t0.elapsed().as_millis() as u64,
    })
}

fn kill_node(cx: &mut Ctx) -> Result<()> {
    let v = cx.busiest(true)?;
    cx.victim = Some(v);
    cx.say(format!("killing LB node {v} (switch port down, SIGKILL)"));
    cx.kill_and_reroute(v, "route")?;
    Ok(())
}

fn churn_then_kill(cx: &mut Ctx) -> Result<()> {
    let spare = cx.opts.backends + 1;
    let t = Instant::now();
    let r = cx.lab.add_backend(spare)?;
    cx.lab.wait_epoch(r.epoch, Duration::from_secs(10))?;
    cx.say(format!("added backend be{spare} (epoch {})", r.epoch));
    let r = cx
        .lab
        .set_backend_state(1, raft_store::cluster::BackendState::Draining)?;
    cx.lab.wait_epoch(r.epoch, Duration::from_secs(10))?;
    cx.say(format!("drained be1 (epoch {})", r.epoch));
    let r = cx.lab.set_backend_weight(2, 3)?;
    cx.lab.wait_epoch(r.epoch, Duration::from_secs(10))?;
    cx.say(format!("be2 weight 3 (epoch {})", r.epoch));
    cx.ms("churn", t.elapsed());
    // The flows keep their backends (conntrack) while the tables changed.
    cx.all_answer(Duration::from_secs(10))?;
    let v = cx.busiest(false)?;
    cx.victim = Some(v);
    let leader = cx.lab.leader()?;
    cx.say(format!(
        "killing LB node {v}, the one that carries the most pinned flows"
    ));
    let t = cx.kill_and_reroute(v, "route")?;
    if v == leader {
        cx.wait_new_leader(v, Duration::from_secs(10))?;
        cx.ms("election", t.elapsed());
    }
    Ok(())
}

/// A node dies while a table change is being prepared. Its holdfast-node
/// is stopped first (SIGSTOP: its datapath forwards on, the agent neither
/// prepares nor reports), a backend is added, and the node is killed
/// 300 ms later. With divergent replication the survivors prepare, wait
/// for it, and switch without it once its report is stale: its flows
/// reach them before, while they still forward with the tables those
/// flows began under.
fn kill_during_prepare(cx: &mut Ctx) -> Result<()> {
    let v = cx.busiest(true)?;
    cx.victim = Some(v);
    cx.lab.pause_agent(v)?;
    let spare = cx.opts.backends + 1;
    let t = Instant::now();
    let r = cx.lab.add_backend(spare)?;
    cx.say(format!(
        "node {v} stopped; added backend be{spare} (epoch {})",
        r.epoch
    ));
    std::thread::sleep(Duration::from_millis(300));
    cx.say(format!("killing LB node {v} during the prepare"));
    cx.kill_and_reroute(v, "route")?;
    cx.lab.wait_epoch(r.epoch, Duration::from_secs(20))?;
    cx.ms("change_applied", t.elapsed());
    cx.say(format!(
        "the change was applied on the survivors {} ms after its commit",
        t.elapsed().as_millis()
    ));
    Ok(())
}

/// A backend change every 200 ms for a minute (a weight toggled, a backend
/// drained and back), while the busiest node is killed at 20 s and revived
/// at 40 s. Every change of the tables is a table change to prepare.
fn rapid_churn(cx: &mut Ctx) -> Result<()> {
    let t0 = Instant::now();
    let mut changes = 0u32;
    let mut last_epoch = 0;
    let mut victim = None;
    let mut revived = false;
    while t0.elapsed() < Duration::from_secs(60) {
        let k = changes % 4;
        let r = match k {
            0 => cx.lab.set_backend_weight(2, 3)?,
            1 => cx
                .lab
                .set_backend_state(1, raft_store::cluster::BackendState::Draining)?,
            2 => cx.lab.set_backend_weight(2, 1)?,
            _ => cx
                .lab
                .set_backend_state(1, raft_store::cluster::BackendState::Active)?,
        };
        if let Some(why) = r.rejected {
            bail!("change {changes} refused: {why}");
        }
        last_epoch = r.epoch;
        changes += 1;
        if victim.is_none() && t0.elapsed() >= Duration::from_secs(20) {
            let v = cx.busiest(true)?;
            cx.say(format!("killing LB node {v} ({changes} changes so far)"));
            cx.kill_and_reroute(v, "route_down")?;
            victim = Some(v);
            cx.victim = Some(v);
        }
        if let (Some(v), false) = (victim, revived) {
            if t0.elapsed() >= Duration::from_secs(40) {
                cx.say(format!("reviving LB node {v} ({changes} changes so far)"));
                cx.lab.revive_node(v)?;
                revived = true;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    cx.say(format!("{changes} changes in {} s", t0.elapsed().as_secs()));
    cx.lab.wait_epoch(last_epoch, Duration::from_secs(20))?;
    cx.ms("churn", t0.elapsed());
    Ok(())
}

/// A second client address in the client's subnet: inside the lab's
/// first source ranges, outside the narrowed ones.
pub const OUTSIDE_CLIENT: &str = "10.88.2.200";
pub const OUTSIDE_CLIENT6: &str = "fd88:2::200";

/// Give the lab's four services these source ranges; wait until every
/// running node applied them.
fn set_source_ranges(cx: &mut Ctx, ranges: &[&str]) -> Result<()> {
    let cfg = cx.lab.config()?;
    let mut epoch = 0;
    for name in lab::SERVICES {
        let mut svc = cfg
            .services
            .get(name)
            .cloned()
            .with_context(|| format!("service {name}"))?;
        svc.source_ranges = ranges.iter().map(|r| r.to_string()).collect();
        let r = cx
            .lab
            .write(raft_store::Command::PutService { service: svc })?;
        if let Some(why) = r.rejected {
            bail!("source ranges {ranges:?} refused: {why}");
        }
        epoch = r.epoch;
    }
    cx.lab.wait_epoch(epoch, Duration::from_secs(10))?;
    Ok(())
}

/// Run `work` to completion on a thread inside the lab's client namespace
/// (one current-thread tokio runtime).
fn on_client<T, F>(cx: &Ctx, work: impl FnOnce() -> F + Send + 'static) -> Result<T>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T>>,
{
    cx.lab
        .client
        .spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(work())
        })
        .join()
        .map_err(|_| anyhow!("the client thread panicked"))?
}

/// A TCP connection from `src` (any port) to `to`.
async fn connect_from(
    src: std::net::IpAddr,
    to: std::net::SocketAddr,
) -> Result<tokio::net::TcpStream> {
    let sock = if src.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.bind(std::net::SocketAddr::new(src, 0))?;
    Ok(sock.connect(to).await?)
}

/// New connections and queries from `src` to the lab's services: how many
/// were tried and how many got an answer (each waits up to 2 s).
fn fresh_attempts(cx: &Ctx, src: std::net::IpAddr, n: usize) -> Result<(usize, usize)> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let vip: std::net::IpAddr = if src.is_ipv4() { lab::VIP } else { lab::VIP6 }.parse()?;
    on_client(cx, move || async move {
        // All at once: each waits out its timeout.
        let mut set = tokio::task::JoinSet::new();
        for k in 0..n {
            set.spawn(async move {
                let tcp = async {
                    let mut s =
                        connect_from(src, std::net::SocketAddr::new(vip, lab::TCP_PORT)).await?;
                    s.write_all(format!("outside{k}:1\n").as_bytes()).await?;
                    let mut line = String::new();
                    tokio::io::BufReader::new(&mut s)
                        .read_line(&mut line)
                        .await?;
                    anyhow::Ok(!line.is_empty())
                };
                let tcp_ok = matches!(
                    tokio::time::timeout(Duration::from_secs(2), tcp).await,
                    Ok(Ok(true))
                );
                let u = tokio::net::UdpSocket::bind(std::net::SocketAddr::new(src, 0)).await?;
                u.connect(std::net::SocketAddr::new(vip, lab::UDP_PORT))
                    .await?;
                u.send(format!("outside{k}:1").as_bytes()).await?;
                let mut buf = [0u8; 512];
                let udp_ok = matches!(
                    tokio::time::timeout(Duration::from_secs(2), u.recv(&mut buf)).await,
                    Ok(Ok(_))
                );
                anyhow::Ok(usize::from(tcp_ok) + usize::from(udp_ok))
            });
        }
        let (mut tried, mut answered) = (0, 0);
        while let Some(r) = set.join_next().await {
            tried += 2;
            answered += r.map_err(|e| anyhow!("attempt: {e}"))??;
        }
        Ok((tried, answered))
    })
}

/// source-ranges: the lab's services restricted to the client's subnet
/// serve both client addresses; narrowed to the first client while a
/// second one has connections open, the second one's open flows get no
/// more answers and its new connections and queries none at all, while
/// the first one's flows go on unbroken.
fn source_ranges(cx: &mut Ctx) -> Result<()> {
    cx.lab
        .client
        .ip(&format!("addr add {OUTSIDE_CLIENT}/24 dev c0"))?;
    cx.lab
        .client
        .ip(&format!("addr add {OUTSIDE_CLIENT6}/64 dev c0 nodad"))?;
    let wide = ["10.88.2.0/24", "fd88:2::/64"];
    set_source_ranges(cx, &wide)?;
    cx.say(format!("services restricted to {wide:?}"));
    let (tcp_out, udp_out) = (cx.opts.tcp.clamp(1, 50), cx.opts.udp.clamp(1, 50));
    let out = Traffic::start(
        &cx.lab.client,
        TrafficSpec::new(lab::VIP.parse()?, OUTSIDE_CLIENT.parse()?, tcp_out, udp_out),
    )
    .context("the second client's flows while it is inside")?;
    out.mark();
    out.wait_all_answered(Duration::from_secs(15))
        .context("the second client served while inside the ranges")?;
    cx.counts
        .insert("outside_open_flows".into(), (tcp_out + udp_out) as u64);
    cx.say(format!(
        "second client {OUTSIDE_CLIENT}: {tcp_out} TCP + {udp_out} UDP flows answered"
    ));

    let narrow = ["10.88.2.96/28", "fd88:2::100/128"];
    let t = Instant::now();
    set_source_ranges(cx, &narrow)?;
    cx.ms("narrowed_applied", t.elapsed());
    cx.say(format!("narrowed to {narrow:?} with its flows open"));
    // An answer already on its way back (DSR: straight from the backend)
    // may still arrive: count from a moment after every node applied.
    std::thread::sleep(Duration::from_millis(300));
    let a0 = out.live().answers;
    std::thread::sleep(Duration::from_secs(3));
    let after = out.live().answers - a0;
    cx.counts.insert("outside_open_answered".into(), after);
    let (tried4, answered4) = fresh_attempts(cx, OUTSIDE_CLIENT.parse()?, 10)?;
    let (tried6, answered6) = fresh_attempts(cx, OUTSIDE_CLIENT6.parse()?, 10)?;
    cx.counts
        .insert("outside_new_attempts".into(), (tried4 + tried6) as u64);
    cx.counts.insert(
        "outside_new_answered".into(),
        (answered4 + answered6) as u64,
    );
    cx.counts.insert(
        "outside_total".into(),
        (tcp_out + udp_out + tried4 + tried6) as u64,
    );
    cx.counts.insert(
        "outside_answered".into(),
        after + (answered4 + answered6) as u64,
    );
    cx.say(format!(
        "outside: {after} answers on open flows in 3 s, {} of {} new connections and queries answered",
        answered4 + answered6,
        tried4 + tried6
    ));
    drop(out);
    // The packets the nodes refused, by the services' counters.
    let mut refused = 0;
    for i in cx.lab.running() {
        for name in lab::SERVICES {
            refused += cx
                .lab
                .metric(
                    i,
                    "holdfast_service_src_refused_total",
                    &[("service", name)],
                )?
                .unwrap_or(0.0) as u64;
        }
    }
    cx.counts.insert("refused_packets".into(), refused);
    // The first client's flows: every one answered since the narrowing.
    cx.all_answer(Duration::from_secs(10))
        .context("the inside client's flows after narrowing")?;
    let l = cx.traffic.live();
    let mut inside_total = l.tcp_total + l.udp_total;
    let mut inside_broken = l.tcp_broken + l.udp_broken;
    if let Some(t6) = &cx.traffic6 {
        let l6 = t6.live();
        inside_total += l6.tcp_total + l6.udp_total;
        inside_broken += l6.tcp_broken + l6.udp_broken;
    }
    cx.counts.insert("inside_total".into(), inside_total as u64);
    cx.counts
        .insert("inside_broken".into(), inside_broken as u64);
    Ok(())
}

/// The answer lines and the writing half of a lab connection.
type Conn = (
    tokio::io::Lines<tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>>,
    tokio::net::tcp::OwnedWriteHalf,
);

/// A connection from `src` to `to` that asks the backend `whoami`: the
/// backend's name, the client address it sees, and the connection to go
/// on with.
async fn whoami(
    src: std::net::IpAddr,
    to: std::net::SocketAddr,
) -> Result<(String, std::net::SocketAddr, Conn)> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let (r, mut w) = connect_from(src, to).await?.into_split();
    let mut lines = tokio::io::BufReader::new(r).lines();
    w.write_all(b"whoami\n").await?;
    let l = lines.next_line().await?.context("closed")?;
    // "beN whoami ADDRESS"
    let mut words = l.split(' ');
    let name = words.next().unwrap_or_default().to_string();
    let seen = words
        .nth(1)
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("answer {l:?}"))?;
    Ok((name, seen, (lines, w)))
}

/// `n` connections from the lab's client to VIP:`port`, each asking the
/// backend who it sees (`whoami`) and then exchanging `rounds` numbered
/// echoes: (connections answered throughout, the addresses the backends
/// saw).
fn whoami_connections(
    cx: &Ctx,
    port: u16,
    n: usize,
    rounds: usize,
) -> Result<(usize, Vec<std::net::SocketAddr>)> {
    use tokio::io::AsyncWriteExt;
    let vip: std::net::IpAddr = lab::VIP.parse()?;
    let src: std::net::IpAddr = lab::CLIENT.parse()?;
    on_client(cx, move || async move {
        let mut set = tokio::task::JoinSet::new();
        for k in 0..n {
            set.spawn(async move {
                let one = async {
                    let (_, seen, (mut lines, mut w)) =
                        whoami(src, std::net::SocketAddr::new(vip, port)).await?;
                    for i in 0..rounds {
                        let msg = format!("tp{k}:{i}");
                        w.write_all(format!("{msg}\n").as_bytes()).await?;
                        let l = lines.next_line().await?.context("closed")?;
                        if !l.ends_with(&format!(" {msg}")) {
                            bail!("wrong answer {l:?} to {msg}");
                        }
                    }
                    anyhow::Ok(seen)
                };
                tokio::time::timeout(Duration::from_secs(5), one)
                    .await
                    .map_err(|_| anyhow!("timed out"))?
            });
        }
        let (mut ok, mut seen) = (0, Vec::new());
        while let Some(r) = set.join_next().await {
            if let Ok(Ok(a)) = r {
                ok += 1;
                seen.push(a);
            }
        }
        Ok((ok, seen))
    })
}

/// target-port: a service whose backends listen on another port than its
/// own (VIP:8009 to the echo servers' 8007) serves real connections in the
/// lab's forwarding mode, and the SNAT service beside it (VIP:8008 to
/// 8007) too; each connection asks the backend which client address it
/// sees (DSR: the client's own; SNAT: an LB node's SNAT address).
fn target_port(cx: &mut Ctx) -> Result<()> {
    let n = 50;
    let client: std::net::IpAddr = lab::CLIENT.parse()?;
    let (pool, plen) = raft_store::cluster::parse_cidr(lab::SNAT_POOL).map_err(|e| anyhow!(e))?;
    for (key, port) in [("tp", lab::TP_TCP_PORT), ("snat", lab::SNAT_TCP_PORT)] {
        let (ok, seen) = whoami_connections(cx, port, n, 5)?;
        let as_client = seen.iter().filter(|a| a.ip() == client).count();
        let as_snat = seen
            .iter()
            .filter(|a| raft_store::cluster::cidr_contains((pool, plen), a.ip()))
            .count();
        cx.counts.insert(format!("{key}_connections"), n as u64);
        cx.counts.insert(format!("{key}_answered"), ok as u64);
        cx.counts
            .insert(format!("{key}_seen_client_address"), as_client as u64);
        cx.counts
            .insert(format!("{key}_seen_snat_address"), as_snat as u64);
        cx.say(format!(
            "VIP:{port}: {ok} of {n} connections answered; the backends saw the client's own address in {as_client}, a SNAT address in {as_snat} (e.g. {:?})",
            seen.first()
        ));
    }
    Ok(())
}

/// Client addresses of the affinity scenario in the lab client's subnets:
/// `n` IPv4 ones from 10.88.2.`first` and `n6` IPv6 ones from
/// fd88:2::`first` (hex digits as decimal).
fn extra_clients(first: usize, n: usize, n6: usize) -> Vec<std::net::IpAddr> {
    (0..n)
        .map(|i| format!("10.88.2.{}", first + i))
        .chain((0..n6).map(|i| format!("fd88:2::{}", first + i)))
        .map(|a| a.parse().expect("static address"))
        .collect()
}

/// One connection per (client, k < `per_client`) at once to the lab's
/// echo service of the client's family, each asking which backend serves
/// it: (client, the backend's name or None when it got no answer in 5 s).
fn which_backend(
    cx: &Ctx,
    clients: &[std::net::IpAddr],
    per_client: usize,
) -> Result<Vec<(std::net::IpAddr, Option<String>)>> {
    let vip4: std::net::IpAddr = lab::VIP.parse()?;
    let vip6: std::net::IpAddr = lab::VIP6.parse()?;
    let clients = clients.to_vec();
    on_client(cx, move || async move {
        let mut set = tokio::task::JoinSet::new();
        for c in clients {
            for _ in 0..per_client {
                let vip = if c.is_ipv4() { vip4 } else { vip6 };
                set.spawn(async move {
                    let one = async {
                        let (name, ..) =
                            whoami(c, std::net::SocketAddr::new(vip, lab::TCP_PORT)).await?;
                        anyhow::Ok(name)
                    };
                    let got = tokio::time::timeout(Duration::from_secs(5), one).await;
                    (c, got.ok().and_then(|r| r.ok()))
                });
            }
        }
        let mut out = Vec::new();
        while let Some(r) = set.join_next().await {
            out.push(r.map_err(|e| anyhow!("connection task: {e}"))?);
        }
        Ok(out)
    })
}

/// affinity: the lab's echo services (IPv4 and IPv6) with client affinity;
/// clients of both families open one connection each (so most LB nodes
/// have not seen a client themselves: they know it by replication), then a
/// backend is added and each opens rounds of new connections, then an LB
/// node dies and each opens more; every connection asks which backend
/// serves it. Every connection of a client must reach the backend of its
/// first (`affinity_broken` counts those that did not, `affinity_failed`
/// those with no answer). Fresh clients after the addition show that the
/// tables did change (some reach the new backend).
fn affinity(cx: &mut Ctx) -> Result<()> {
    let clients = extra_clients(150, 40, 10);
    let fresh = extra_clients(210, 20, 0);
    for a in clients.iter().chain(&fresh) {
        let cmd = if a.is_ipv4() {
            format!("addr add {a}/24 dev c0")
        } else {
            format!("addr add {a}/64 dev c0 nodad")
        };
        cx.lab.client.ip(&cmd)?;
    }
    let cfg = cx.lab.config()?;
    let mut epoch = 0;
    for name in [lab::TCP_SERVICE, lab::TCP_SERVICE6] {
        let mut svc = cfg
            .services
            .get(name)
            .cloned()
            .with_context(|| format!("service {name}"))?;
        svc.affinity_timeout_s = Some(600);
        let r = cx
            .lab
            .write(raft_store::Command::PutService { service: svc })?;
        if let Some(why) = r.rejected {
            bail!("client affinity refused: {why}");
        }
        epoch = r.epoch;
    }
    cx.lab.wait_epoch(epoch, Duration::from_secs(10))?;
    cx.say(format!(
        "client affinity (600 s) on {} and {}; {} clients",
        lab::TCP_SERVICE,
        lab::TCP_SERVICE6,
        clients.len()
    ));

    let (rounds, per_client) = (2, 3);
    let mut first = BTreeMap::new();
    type Got = Vec<(std::net::IpAddr, Option<String>)>;
    type First = BTreeMap<std::net::IpAddr, String>;
    fn tally(cx: &mut Ctx, first: &mut First, phase: &str, got: Got) {
        let (mut broken, mut failed) = (0u64, 0u64);
        for (c, b) in &got {
            match b {
                None => failed += 1,
                Some(b) => {
                    if first.entry(*c).or_insert_with(|| b.clone()) != b {
                        broken += 1;
                    }
                }
            }
        }
        for (k, v) in [
            ("affinity_connections", got.len() as u64),
            ("affinity_broken", broken),
            ("affinity_failed", failed),
            (&format!("affinity_broken_{phase}") as &str, broken),
        ] {
            *cx.counts.entry(k.to_string()).or_default() += v;
        }
        cx.say(format!(
            "{phase}: {} connections, {broken} on another backend than their client's first, {failed} unanswered",
            got.len()
        ));
    }
    let got = which_backend(cx, &clients, 1)?;
    tally(cx, &mut first, "before", got);
    let used: std::collections::BTreeSet<&String> = first.values().collect();
    cx.counts
        .insert("affinity_clients".into(), clients.len() as u64);
    cx.counts
        .insert("affinity_backends_used".into(), used.len() as u64);

    let spare = cx.opts.backends + 1;
    let r = cx.lab.add_backend(spare)?;
    cx.lab.wait_epoch(r.epoch, Duration::from_secs(10))?;
    cx.say(format!("added backend be{spare} (epoch {})", r.epoch));
    for _ in 0..rounds {
        let got = which_backend(cx, &clients, per_client)?;
        tally(cx, &mut first, "after_addition", got);
    }
    let newcomers = which_backend(cx, &fresh, 1)?;
    let on_new = newcomers
        .iter()
        .filter(|(_, b)| b.as_deref() == Some(format!("be{spare}").as_str()))
        .count();
    cx.counts.insert("fresh_clients".into(), fresh.len() as u64);
    cx.counts
        .insert("fresh_clients_on_new_backend".into(), on_new as u64);
    cx.say(format!(
        "{on_new} of {} fresh clients on the new backend be{spare}",
        fresh.len()
    ));

    let v = cx.busiest(true)?;
    cx.victim = Some(v);
    cx.say(format!("killing LB node {v} (switch port down, SIGKILL)"));
    cx.kill_and_reroute(v, "route")?;
    for _ in 0..rounds {
        let got = which_backend(cx, &clients, per_client)?;
        tally(cx, &mut first, "after_kill", got);
    }
    Ok(())
}

/// drain-then-stop: the busiest LB node is drained the way an operator
/// does before maintenance (`clusterctl drain --wait`: its VIPs withdrawn
/// over BGP, then wait until its datapath sees no VIP packet for 1 s),
/// then it dies. The router moves its flows on the withdrawal, not on a
/// BFD timeout: no flow breaks and the longest stall stays far below the
/// ~500 ms of a silent death (kill-node).
fn drain_then_stop(cx: &mut Ctx) -> Result<()> {
    let v = cx.busiest(true)?;
    cx.victim = Some(v);
    cx.say(format!("draining LB node {v}"));
    let moved = cx
        .lab
        .drain_and_wait(v, Duration::from_secs(1), Duration::from_secs(30))?;
    cx.ms("traffic_moved", moved);
    let mut others = cx.others(v);
    others.sort();
    // (The router's route no longer has the node.)
    cx.lab.wait_route(&others, Duration::from_secs(10))?;
    if cx.lab.spec.drain == holdfast_bgp::DrainMode::GracefulShutdown {
        // Still announced, with GRACEFUL_SHUTDOWN: the router keeps the
        // path at local preference 0, out of its ECMP route.
        let paths = cx.lab.router_bgp_paths()?;
        let kept = paths
            .iter()
            .any(|(hop, lp)| *hop == lab::lb_addr(v) && *lp == 0);
        cx.counts
            .insert("graceful_shutdown_path_kept".into(), u64::from(kept));
        if !kept {
            bail!("the drained node's path is not at local preference 0 at the router: {paths:?}");
        }
    }
    cx.say(format!(
        "node {v}'s traffic moved away {} ms after the drain; stopping it (switch port down, SIGKILL)",
        moved.as_millis()
    ));
    cx.lab.kill_node(v)?;
    Ok(())
}

/// Watches the router's route to the IPv4 VIPs in a thread of its own
/// (every 10 ms): how long node `addr` was missing from its next hops,
/// in all and at the longest.
struct RouteWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<(Duration, Duration)>,
}

impl RouteWatch {
    fn start(router: &str, addr: std::net::IpAddr) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let router = router.to_string();
        let handle = std::thread::spawn(move || {
            let (mut total, mut longest) = (Duration::ZERO, Duration::ZERO);
            let mut missing_since: Option<Instant> = None;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let out = std::process::Command::new("ip")
                    .args(["-n", &router, "route", "show", lab::VIP_CIDR])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                let now = Instant::now();
                match (lab::nexthops_of(&out).contains(&addr), missing_since) {
                    (false, None) => missing_since = Some(now),
                    (true, Some(t)) => {
                        total += now - t;
                        longest = longest.max(now - t);
                        missing_since = None;
                    }
                    _ => {}
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if let Some(t) = missing_since {
                total += t.elapsed();
                longest = longest.max(t.elapsed());
            }
            (total, longest)
        });
        Self { stop, handle }
    }

    fn finish(self) -> (Duration, Duration) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

/// speaker-restart: the BGP speaker of the busiest LB node restarts (an
/// upgrade: BIRD `graceful restart` and `bird -R`; FRR's bgpd killed and
/// started again), the rest of the node running on. With graceful restart
/// the router keeps the node's routes (`route_missing_ms` 0) and no flow
/// moves; without it (the baseline) the router drops the node until its
/// session is back and its flows move away and back.
fn speaker_restart(cx: &mut Ctx) -> Result<()> {
    let v = cx.busiest(false)?;
    cx.victim = Some(v);
    let before = cx.lab.router_sessions()?;
    let watch = RouteWatch::start(cx.lab.router.name(), lab::lb_addr(v));
    cx.say(format!(
        "restarting node {v}'s BGP speaker (graceful restart {})",
        if cx.lab.spec.graceful_restart {
            "on"
        } else {
            "off"
        }
    ));
    let t = Instant::now();
    let away = cx.lab.restart_speaker(v)?;
    cx.ms("speaker_away", away);
    let nodes = cx.lab.spec.nodes;
    let back = lab::wait_until(
        "the router's session to the restarted speaker",
        Duration::from_secs(30),
        || {
            let now = cx.lab.router_sessions()?;
            Ok(now.len() == nodes && now != before)
        },
    )
    .map(|_| t.elapsed())?;
    cx.ms("session_back", back);
    // The End-of-RIB and the stale routes' end, with BIRD's 3 s slack.
    let mut all = cx.lab.running();
    all.sort();
    cx.lab.wait_route(&all, Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_secs(4));
    let (missing, longest) = watch.finish();
    cx.ms("route_missing", missing);
    cx.ms("route_missing_longest", longest);
    cx.say(format!(
        "speaker away {} ms, session back after {} ms; the router missed node {v} for {} ms",
        away.as_millis(),
        back.as_millis(),
        missing.as_millis()
    ));
    Ok(())
}

/// config-churn: 200 services added and removed (eight at a time, each
/// batch applied by every node) and a VIP pool added and removed, while
/// the lab's flows run: every BGP session of the router to the LB nodes
/// stays established, never established anew
/// (`sessions_reset` counts those that changed or went down), whichever
/// speakers run.
fn config_churn(cx: &mut Ctx) -> Result<()> {
    use raft_store::{cluster::Service, Command};
    let before = cx.lab.router_sessions()?;
    if before.len() != cx.lab.spec.nodes {
        bail!(
            "the router has {} sessions up, not {}: {before:?}",
            before.len(),
            cx.lab.spec.nodes
        );
    }
    let t = Instant::now();
    let (mut added, mut removed) = (0u64, 0u64);
    // Eight at a time: the lab's nodes hold 16 services, 6 of them its own.
    for wave in 0..25u16 {
        let names: Vec<String> = (0..8).map(|k| format!("churn-{wave}-{k}")).collect();
        let adds = names
            .iter()
            .enumerate()
            .map(|(k, name)| Command::PutService {
                service: Service {
                    name: name.clone(),
                    vip: lab::VIP.parse().expect("static"),
                    port: 20_000 + wave * 10 + k as u16,
                    proto: raft_store::cluster::Proto::Tcp,
                    table_size: 251,
                    mode: Default::default(),
                    health_check: None,
                    source_ranges: Vec::new(),
                    affinity_timeout_s: None,
                },
            })
            .collect();
        let r = cx.lab.write(Command::Batch { commands: adds })?;
        if let Some(why) = r.rejected {
            bail!("adding services refused: {why}");
        }
        cx.lab.wait_epoch(r.epoch, Duration::from_secs(10))?;
        added += names.len() as u64;
        let rms = names
            .iter()
            .map(|name| Command::RemoveService { name: name.clone() })
            .collect();
        let r = cx.lab.write(Command::Batch { commands: rms })?;
        if let Some(why) = r.rejected {
            bail!("removing services refused: {why}");
        }
        cx.lab.wait_epoch(r.epoch, Duration::from_secs(10))?;
        removed += names.len() as u64;
    }
    for cmd in [
        Command::PutVipPool {
            pool: raft_store::cluster::VipPool {
                name: "churn".into(),
                cidr: "10.88.100.128/25".into(),
                ..Default::default()
            },
        },
        Command::RemoveVipPool {
            name: "churn".into(),
        },
    ] {
        let r = cx.lab.write(cmd)?;
        if let Some(why) = r.rejected {
            bail!("VIP pool change refused: {why}");
        }
        cx.lab.wait_epoch(r.epoch, Duration::from_secs(10))?;
    }
    cx.ms("churn", t.elapsed());
    let after = cx.lab.router_sessions()?;
    let reset = before
        .iter()
        .filter(|(peer, since)| after.get(*peer) != Some(since))
        .count();
    cx.counts.insert("services_added".into(), added);
    cx.counts.insert("services_removed".into(), removed);
    cx.counts.insert("sessions".into(), before.len() as u64);
    cx.counts.insert("sessions_reset".into(), reset as u64);
    cx.say(format!(
        "{added} services added and {removed} removed, a VIP pool added and removed: {reset} of {} BGP sessions reset ({before:?} -> {after:?})",
        before.len()
    ));
    Ok(())
}

/// The SNAT counters summed over the running nodes, into counts (`prefix`
/// before each name).
fn snat_counters(cx: &mut Ctx, prefix: &str) -> Result<()> {
    for c in [
        "snat_midflow",
        "snat_no_entry",
        "snat_exhausted",
        "snat_no_addr",
    ] {
        let mut sum = 0.0;
        for i in cx.lab.running() {
            sum += cx
                .lab
                .metric(i, &format!("holdfast_datapath_{c}_total"), &[])?
                .unwrap_or(0.0);
        }
        cx.counts.insert(format!("{prefix}{c}"), sum as u64);
    }
    Ok(())
}

/// SNAT mode: how many entries the running nodes hold with a SNAT source,
/// and how many of those use a dead victim's SNAT address and port (its
/// flows, forwarded by survivors exactly as it did).
fn snat_census(cx: &mut Ctx) -> Result<()> {
    let cfg = cx.lab.config()?;
    let victim_addrs: Vec<std::net::IpAddr> = match cx.victim {
        Some(v) => {
            let (v4, v6) = cfg.snat.addrs_of(v as u64);
            v4.map(std::net::IpAddr::V4)
                .into_iter()
                .chain(v6.map(std::net::IpAddr::V6))
                .collect()
        }
        None => Vec::new(),
    };
    let (mut snat, mut of_victim) = (0u64, 0u64);
    for i in cx.lab.running() {
        for r in cx.lab.conntrack(i)? {
            let Some(src) = r.snat else { continue };
            snat += 1;
            let ip = src.parse::<std::net::SocketAddr>().map(|a| a.ip()).ok();
            if ip.is_some_and(|ip| victim_addrs.contains(&ip)) {
                of_victim += 1;
            }
        }
    }
    snat_counters(cx, "")?;
    cx.counts.insert("snat_entries".into(), snat);
    cx.counts.insert("snat_entries_of_victim".into(), of_victim);
    cx.say(format!(
        "SNAT entries on the running nodes: {snat}, {of_victim} of them with the victim's address"
    ));
    Ok(())
}

/// A backend change in flight: submitted through the nodes other than
/// `avoid`, retried by request id; [`committed_once`] checks its outcome.
fn change_in_flight(
    cx: &Ctx,
    avoid: &[usize],
) -> Result<std::thread::JoinHandle<Result<raft_store::Response, holdfast_api::client::ClientError>>>
{
    let spare = cx.opts.backends + 1;
    let addrs: Vec<String> = cx
        .lab
        .running()
        .into_iter()
        .filter(|i| !avoid.contains(i))
        .map(lab::admin_addr)
        .collect();
    let req = raft_store::Request {
        id: Some(format!("in-flight-{}", std::process::id())),
        command: raft_store::Command::Batch {
            commands: lab::add_backend_cmds(spare),
        },
        trace: None,
    };
    let api = cx.lab.api()?;
    Ok(cx.lab.router.spawn(move || {
        api.post_retry::<_, raft_store::Response>(&addrs, "/command", &req, Duration::from_secs(20))
    }))
}

/// The in-flight change committed, exactly once, on every running node.
fn committed_once(
    cx: &mut Ctx,
    pending: std::thread::JoinHandle<
        Result<raft_store::Response, holdfast_api::client::ClientError>,
    >,
    t: Instant,
) -> Result<()> {
    let spare = cx.opts.backends + 1;
    let r = pending
        .join()
        .map_err(|_| anyhow!("writer panicked"))?
        .context("the in-flight backend change")?;
    if let Some(why) = r.rejected {
        bail!("the in-flight change was rejected: {why}");
    }
    cx.lab.wait_epoch(r.epoch, Duration::from_secs(10))?;
    cx.ms("change_committed", t.elapsed());
    let cfg = cx.lab.config()?;
    let addr = lab::backend_addr(spare);
    let n = cfg.backends.values().filter(|b| b.addr == addr).count();
    // One backend per service the change adds this address to.
    let want = lab::add_backend_cmds(spare)
        .iter()
        .filter(|c| matches!(c, raft_store::Command::AddBackend { addr: a, .. } if *a == addr))
        .count();
    if n != want {
        bail!("the in-flight change was applied {n} times (expected once: {want} backends)");
    }
    cx.say(format!("the change committed once (epoch {})", r.epoch));
    Ok(())
}

fn kill_leader(cx: &mut Ctx) -> Result<()> {
    let v = cx.lab.leader()?;
    cx.victim = Some(v);
    let pending = change_in_flight(cx, &[v])?;
    std::thread::sleep(Duration::from_millis(5));
    cx.say(format!(
        "killing the leader, node {v}, with a backend change in flight"
    ));
    let t = Instant::now();
    cx.lab.kill_node(v)?;
    cx.wait_new_leader(v, Duration::from_secs(10))?;
    let d = t.elapsed();
    cx.ms("election", d);
    cx.say(format!("new leader after {} ms", d.as_millis()));
    let others = cx.others(v);
    cx.lab.wait_route(&others, Duration::from_secs(10))?;
    cx.ms("route", t.elapsed());
    committed_once(cx, pending, t)
}

/// The soak: for `opts.soak`, a config change every 3 s (a spare backend
/// added, drained and removed; an original one drained and undrained),
/// and every 3 minutes a node killed silently and started again 20 s
/// later, under the long-lived flows and `short_per_s` short connections.
/// Afterwards: no long-lived flow broke, no short connection failed
/// except those opened while a node was dying (counted), and each node's
/// memory and conntrack size at the start, peak and end are reported.
fn soak(cx: &mut Ctx) -> Result<()> {
    let spare = cx.opts.backends + 1;
    let t0 = Instant::now();
    let mut next_kill = t0 + Duration::from_secs(180);
    let mut next_churn = t0;
    let mut next_sample = t0;
    let mut step = 0usize;
    let mut victim = 0usize;
    let mut windows: Vec<(u64, u64)> = Vec::new();
    let mut mem: BTreeMap<usize, (u64, u64, u64)> = BTreeMap::new();
    let mut ct: BTreeMap<usize, (u64, u64, u64)> = BTreeMap::new();
    let mut changes = 0u64;
    let mut kills = 0u64;
    let sample = |cx: &Ctx,
                  mem: &mut BTreeMap<usize, (u64, u64, u64)>,
                  ct: &mut BTreeMap<usize, (u64, u64, u64)>| {
        for i in cx.lab.running() {
            if let Some(r) = cx.lab.node_rss_kib(i) {
                let e = mem.entry(i).or_insert((r, r, r));
                e.1 = e.1.max(r);
                e.2 = r;
            }
            if let Some(n) = cx.lab.status(i).ok().and_then(|s| s.conntrack_entries) {
                let e = ct.entry(i).or_insert((n, n, n));
                e.1 = e.1.max(n);
                e.2 = n;
            }
        }
    };
    while t0.elapsed() < cx.opts.soak {
        let now = Instant::now();
        if now >= next_sample {
            sample(cx, &mut mem, &mut ct);
            next_sample = now + Duration::from_secs(10);
        }
        if now >= next_churn {
            let r = match step % 5 {
                0 => cx.lab.add_backend(spare),
                1 => cx
                    .lab
                    .set_backend_state(2, raft_store::cluster::BackendState::Draining),
                2 => cx
                    .lab
                    .set_backend_state(2, raft_store::cluster::BackendState::Active),
                3 => cx
                    .lab
                    .set_backend_state(spare, raft_store::cluster::BackendState::Draining),
                _ => cx.lab.remove_backend(spare),
            }
            .with_context(|| format!("config change {step}"))?;
            cx.lab.wait_epoch(r.epoch, Duration::from_secs(20))?;
            step += 1;
            changes += 1;
            next_churn = now + Duration::from_secs(3);
        }
        if now >= next_kill {
            let running = cx.lab.running();
            let v = running[victim % running.len()];
            victim += 1;
            let from = cx.traffic.elapsed().as_millis() as u64;
            cx.say(format!("soak: killing LB node {v}"));
            cx.kill_and_reroute(v, "route")?;
            windows.push((from, cx.traffic.elapsed().as_millis() as u64 + 1000));
            std::thread::sleep(Duration::from_secs(20));
            cx.lab.revive_node(v)?;
            cx.lab.wait_ready(Duration::from_secs(60))?;
            cx.say(format!("soak: node {v} back"));
            kills += 1;
            next_kill = Instant::now() + Duration::from_secs(180);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    sample(cx, &mut mem, &mut ct);
    cx.counts.insert("config_changes".into(), changes);
    cx.counts.insert("node_kills".into(), kills);
    for (i, (a, b, c)) in &mem {
        cx.counts.insert(format!("node_{i}_rss_kib_start"), *a);
        cx.counts.insert(format!("node_{i}_rss_kib_peak"), *b);
        cx.counts.insert(format!("node_{i}_rss_kib_end"), *c);
    }
    for (i, (a, b, c)) in &ct {
        cx.counts.insert(format!("node_{i}_conntrack_start"), *a);
        cx.counts.insert(format!("node_{i}_conntrack_peak"), *b);
        cx.counts.insert(format!("node_{i}_conntrack_end"), *c);
    }
    cx.kill_windows = windows;
    Ok(())
}

/// A node dies while another warm-joins. The joiner is a replaced machine
/// (killed, its datapath wiped, started again) and the others hold
/// [`JOIN_BULK`] more entries than flows, so its snapshot pull takes
/// seconds; the peer it pulls from dies in the middle. The joiner must
/// finish from another peer, become ready with every flow, and only then
/// take traffic; nothing breaks.
fn kill_during_join(cx: &mut Ctx) -> Result<()> {
    let running = cx.lab.running();
    let j = *running.last().ok_or_else(|| anyhow!("no node"))?;
    cx.victim = Some(j);
    cx.say(format!("replacing LB node {j}: kill, wipe its datapath"));
    cx.kill_and_reroute(j, "route_down")?;
    cx.lab.wipe_datapath(j)?;
    let t = Instant::now();
    for i in cx.lab.running() {
        let n = cx.lab.fill_conntrack(i, JOIN_BULK)?;
        cx.counts
            .insert(format!("bulk_entries_on_node_{i}"), n as u64);
    }
    cx.ms("bulk_fill", t.elapsed());
    cx.say(format!(
        "{JOIN_BULK} more conntrack entries on every other node; starting node {j} afresh"
    ));
    let t = Instant::now();
    let log_before = cx.lab.log_lines(j).len();
    cx.lab.revive_node(j)?;
    if !cx.opts.sync {
        // The baseline: no warm join; kill another node once it runs.
        cx.lab
            .wait_status(j, "the node to run", Duration::from_secs(30), |_| true)?;
        let k = running[0];
        cx.say(format!("killing LB node {k}"));
        cx.kill_and_reroute(k, "route")?;
        return Ok(());
    }
    // Which peer the joiner pulls its snapshot from.
    let mut source = None;
    lab::wait_until(
        "the joiner to start its snapshot pull",
        Duration::from_secs(30),
        || {
            source = cx.lab.log_lines(j).iter().skip(log_before).find_map(|l| {
                l.split_once("warm join: pulling the conntrack snapshot")
                    .and_then(|(_, rest)| rest.trim().strip_prefix("peer="))
                    .and_then(|p| p.split_whitespace().next()?.parse::<usize>().ok())
            });
            Ok(source.is_some())
        },
    )?;
    let k = source.expect("found");
    cx.ms("pull_started", t.elapsed());
    cx.say(format!(
        "node {j} pulls its snapshot from node {k}: killing node {k}"
    ));
    let tk = Instant::now();
    cx.lab.kill_node(k)?;
    let st = cx.lab.status(j)?;
    if st.sync.as_ref().is_none_or(|s| s.ready) {
        bail!(
            "node {j}'s warm join ended before node {k} died ({} ms): make JOIN_BULK larger",
            t.elapsed().as_millis()
        );
    }
    cx.counts.insert("killed_during_join".into(), 1);
    let others: Vec<usize> = cx.lab.running().into_iter().filter(|i| *i != j).collect();
    cx.lab.wait_route(&others, Duration::from_secs(10))?;
    cx.ms("route", tk.elapsed());
    cx.lab.wait_status(
        j,
        "the joiner to be ready and announced",
        Duration::from_secs(60),
        |s| s.bgp_announced == Some(true) && s.sync.as_ref().is_some_and(|y| y.ready),
    )?;
    cx.ms("join_ready", t.elapsed());
    let mut all = cx.lab.running();
    all.sort();
    cx.lab.wait_route(&all, Duration::from_secs(10))?;
    let flows = cx.opts.tcp + cx.opts.udp + cx.opts.tcp6 + cx.opts.udp6;
    let have = cx.lab.conntrack(j)?.len();
    cx.counts.insert("joiner_flows".into(), have as u64);
    if cx.opts.sync_mode == holdfast_node::config::SyncMode::Divergent {
        // The joiner pulls the shared entries only (its tables rebuild the rest).
        if !shared_everywhere(cx, &all)? {
            bail!("the joiner misses shared entries (it holds {have})");
        }
    } else if have < flows {
        bail!("the joiner holds {have} of the {flows} flows");
    }
    cx.say(format!(
        "node {j} ready after {} ms with every flow, announced",
        t.elapsed().as_millis()
    ));
    Ok(())
}

/// Lossy links between the LB nodes (5% loss, 20 ms more each way; the
/// links to the router are clean): the backends change, 200 new TCP
/// connections and 40 UDP flows open and must replicate over the bad links,
/// then the node carrying the most flows dies. Replication keeps up and
/// repairs: nothing breaks, and every node holds every flow.
fn lossy_sync(cx: &mut Ctx) -> Result<()> {
    const LOSS_PPM: u32 = 50_000;
    const DELAY: Duration = Duration::from_millis(20);
    cx.lab.impair_lb_links(LOSS_PPM, DELAY)?;
    // The impairment is real: ping from one LB node to another.
    let nodes = cx.lab.running();
    let rtt = ping_avg_ms(cx, nodes[0], lab::lb_addr(nodes[1]))?;
    cx.counts.insert("lb_to_lb_rtt_ms".into(), rtt as u64);
    if rtt < (2 * DELAY).as_secs_f64() * 1000.0 {
        bail!("the links between LB nodes are not delayed: ping rtt {rtt:.1} ms");
    }
    cx.say(format!(
        "links between LB nodes: 5% loss, 20 ms delay each way (ping rtt {rtt:.1} ms)"
    ));
    let spare = cx.opts.backends + 1;
    let r = cx.lab.add_backend(spare)?;
    cx.lab.wait_epoch(r.epoch, Duration::from_secs(20))?;
    let r = cx
        .lab
        .set_backend_state(1, raft_store::cluster::BackendState::Draining)?;
    cx.lab.wait_epoch(r.epoch, Duration::from_secs(20))?;
    cx.say(format!(
        "added be{spare}, drained be1 (epoch {}) over the lossy links",
        r.epoch
    ));
    let extra = TrafficSpec::new(lab::VIP.parse()?, lab::CLIENT.parse()?, 200, 40);
    let more = Traffic::start(&cx.lab.client, extra)?;
    more.mark();
    more.wait_all_answered(Duration::from_secs(20))?;
    let all = cx.opts.tcp + cx.opts.udp + cx.opts.tcp6 + cx.opts.udp6 + 240;
    if cx.opts.sync {
        let d = cx.wait_replicated(all, Duration::from_secs(30))?;
        cx.ms("replicated_new_flows", d);
        cx.say(format!(
            "the new flows reached every node over the lossy links in {} ms",
            d.as_millis()
        ));
    }
    // Some seconds on the bad links: Raft heartbeats, replication
    // refreshes and acks all go through them.
    std::thread::sleep(Duration::from_secs(5));
    let lag = cx
        .lab
        .running()
        .into_iter()
        .filter_map(|i| cx.lab.status(i).ok()?.sync?.lag_p99_ms)
        .fold(0.0f64, f64::max);
    cx.counts
        .insert("sync_lag_p99_us".into(), (lag * 1000.0) as u64);
    let v = cx.busiest(false)?;
    cx.victim = Some(v);
    let leader = cx.lab.leader()?;
    cx.say(format!(
        "killing LB node {v} (replication lag p99 {lag:.1} ms)"
    ));
    let t = cx.kill_and_reroute(v, "route")?;
    if v == leader {
        cx.wait_new_leader(v, Duration::from_secs(10))?;
        cx.ms("election", t.elapsed());
    }
    more.mark();
    let _ = more.wait_all_answered(Duration::from_secs(15));
    std::thread::sleep(Duration::from_secs(2));
    let (st, delayed) = cx.lab.impair_stats()?;
    cx.counts.insert("impair_matched".into(), st.matched);
    cx.counts.insert("impair_dropped".into(), st.dropped);
    cx.counts.insert("impair_delayed".into(), delayed);
    cx.say(format!(
        "impairment: {} frames between LB nodes, {} dropped, {} delayed",
        st.matched, st.dropped, delayed
    ));
    cx.lab.heal_lb_links()?;
    let r = more.stop()?;
    cx.counts.insert(
        "new_flows_broken".into(),
        (r.tcp_broken + r.udp_broken) as u64,
    );
    if cx.opts.sync && r.tcp_broken + r.udp_broken > 0 {
        bail!(
            "{} TCP and {} UDP of the flows opened over the lossy links broke: {:?}",
            r.tcp_broken,
            r.udp_broken,
            r.broken.first()
        );
    }
    Ok(())
}

/// Mean ping round trip from LB node `i` to `to`, in ms.
fn ping_avg_ms(cx: &Ctx, i: usize, to: std::net::IpAddr) -> Result<f64> {
    let out = cx.lab.lb(i).ns.exec(&[
        "ping",
        "-n",
        "-q",
        "-c",
        "10",
        "-i",
        "0.05",
        "-W",
        "1",
        &to.to_string(),
    ])?;
    // rtt min/avg/max/mdev = a/b/c/d ms
    out.lines()
        .find_map(|l| l.split_once(" = ").filter(|(k, _)| k.contains("min/avg")))
        .and_then(|(_, v)| v.split('/').nth(1)?.parse().ok())
        .ok_or_else(|| anyhow!("no round trip in ping's output: {out}"))
}

/// IPv6 over the whole tier: the IPv6 VIP is announced over the same BGP
/// sessions (MP-BGP) and the router hashes IPv6 flows over every LB node
/// (checked: more than one node created IPv6 flows); then the backends
/// change and the node that created the most IPv6 flows dies. With
/// replication every IPv6 flow (and IPv4 one) survives.
fn ipv6(cx: &mut Ctx) -> Result<()> {
    let vip6: std::net::IpAddr = lab::VIP6.parse()?;
    // Each node's own entries (with replication off the maps hold nothing
    // else).
    let mut per_node: BTreeMap<usize, u64> = BTreeMap::new();
    for i in cx.lab.running() {
        let own = cx
            .lab
            .conntrack(i)?
            .iter()
            .filter(|r| usize::from(r.origin) == i)
            .filter(|r| {
                r.vip
                    .parse::<std::net::SocketAddr>()
                    .is_ok_and(|a| a.ip() == vip6)
            })
            .count() as u64;
        if own > 0 {
            per_node.insert(i, own);
        }
    }
    for (n, c) in &per_node {
        cx.counts
            .insert(format!("v6_flows_created_by_node_{n}"), *c);
    }
    if per_node.len() < 2 {
        bail!("IPv6 flows were not spread over the LB nodes by ECMP: {per_node:?}");
    }
    cx.say(format!("IPv6 flows created per node: {per_node:?}"));
    let spare = cx.opts.backends + 1;
    let r = cx.lab.add_backend(spare)?;
    cx.lab.wait_epoch(r.epoch, Duration::from_secs(10))?;
    let r = cx
        .lab
        .set_backend_state(1, raft_store::cluster::BackendState::Draining)?;
    cx.lab.wait_epoch(r.epoch, Duration::from_secs(10))?;
    cx.say(format!("added be{spare}, drained be1 (epoch {})", r.epoch));
    cx.all_answer(Duration::from_secs(10))?;
    let v = *per_node
        .iter()
        .max_by_key(|(_, c)| **c)
        .map(|(n, _)| n)
        .ok_or_else(|| anyhow!("no IPv6 flows"))?;
    cx.victim = Some(v);
    cx.say(format!(
        "killing LB node {v}, which created the most IPv6 flows"
    ));
    let leader = cx.lab.leader()?;
    let t = cx.kill_and_reroute(v, "route")?;
    if v == leader {
        cx.wait_new_leader(v, Duration::from_secs(10))?;
        cx.ms("election", t.elapsed());
    }
    Ok(())
}

/// Two LB nodes die in the same second — the Raft leader and the node
/// that carries the most flows — with a backend change in flight (a rack
/// switch taking two nodes). Needs 5 nodes: 3 keep the quorum.
fn kill_two(cx: &mut Ctx) -> Result<()> {
    let leader = cx.lab.leader()?;
    let other = cx.busiest(true)?;
    cx.victim = Some(leader);
    let pending = change_in_flight(cx, &[leader, other])?;
    std::thread::sleep(Duration::from_millis(5));
    cx.say(format!(
        "killing the leader (node {leader}) and node {other} together, with a backend change in flight"
    ));
    let t = Instant::now();
    cx.lab.kill_node(leader)?;
    cx.lab.kill_node(other)?;
    cx.ms("second_kill", t.elapsed());
    let survivors: Vec<usize> = cx
        .lab
        .running()
        .into_iter()
        .filter(|i| *i != leader && *i != other)
        .collect();
    cx.wait_new_leader(leader, Duration::from_secs(10))?;
    cx.ms("election", t.elapsed());
    cx.lab.wait_route(&survivors, Duration::from_secs(10))?;
    let d = t.elapsed();
    cx.ms("route", d);
    cx.say(format!(
        "router sends everything to {survivors:?} after {} ms",
        d.as_millis()
    ));
    committed_once(cx, pending, t)
}

/// Every running node's config shows `health` for all of `ids`, and its
/// datapath runs that epoch; the time until the last of them did.
fn wait_health(
    cx: &Ctx,
    ids: &[u32],
    what: &str,
    ok: impl Fn(Health) -> bool,
    timeout: Duration,
) -> Result<Duration> {
    let t0 = Instant::now();
    for i in cx.lab.running() {
        let mut epoch = 0;
        lab::wait_until(
            &format!("node {i}'s config to show backends {ids:?} {what}"),
            timeout.saturating_sub(t0.elapsed()),
            || {
                let c: ClusterState = cx.lab.api_get(i, "/config")?;
                epoch = c.epoch;
                Ok(ids
                    .iter()
                    .all(|id| c.backends.get(id).is_some_and(|b| ok(b.health))))
            },
        )?;
        cx.lab.wait_status(
            i,
            &format!("node {i}'s datapath at epoch {epoch}"),
            timeout.saturating_sub(t0.elapsed()),
            |s| s.applied_epoch >= epoch,
        )?;
    }
    Ok(t0.elapsed())
}

/// Ids of backend host `j` in the four services.
fn ids_of(cx: &Ctx, j: usize) -> Result<Vec<u32>> {
    lab::SERVICES
        .iter()
        .map(|s| cx.lab.backend_id(s, j))
        .collect()
}

/// health: a backend's server dies → every node marks it down within
/// fall × interval plus a commit and new flows stop going to it; it comes
/// back → up again after rise × interval; one node alone that cannot
/// reach a backend does not take it out; every backend failing keeps the
/// last healthy set and raises the alert.
fn health(cx: &mut Ctx) -> Result<()> {
    let check = lab::lab_check(Proto::Tcp);
    let interval = Duration::from_millis(u64::from(check.interval_ms));
    // One check interval of phase, a report and a commit, BIRD's 3 s are
    // not involved; 2 s of slack for this shared machine.
    let slack = interval + Duration::from_secs(2);
    let victim = 1;
    cx.victim = None;
    let ids = ids_of(cx, victim)?;
    let tcp_id = ids[0];

    // 1. The server dies.
    let ct_before: usize = cx
        .lab
        .running()
        .iter()
        .map(|i| {
            cx.lab
                .conntrack(*i)
                .map(|v| v.iter().filter(|r| r.backend_id == tcp_id).count())
        })
        .sum::<Result<usize>>()?;
    let kill_ms = cx.traffic.elapsed().as_millis() as u64;
    cx.say(format!("stopping backend {victim}'s servers (ids {ids:?})"));
    cx.lab.stop_servers(victim)?;
    let d = wait_health(
        cx,
        &ids,
        "down",
        |h| h == Health::Down,
        Duration::from_secs(20),
    )?;
    let applied_ms = kill_ms + d.as_millis() as u64;
    // New connections to the dead backend fail until every node switched.
    cx.kill_windows.push((kill_ms, applied_ms));
    cx.ms("marked_down_everywhere", d);
    cx.say(format!(
        "every node marked backend {victim} down and runs that epoch after {} ms",
        d.as_millis()
    ));
    let bound = interval * check.fall + slack;
    if d > bound {
        bail!(
            "marking a dead backend down took {} ms (bound {} ms: fall × interval + slack)",
            d.as_millis(),
            bound.as_millis()
        );
    }
    // New connections keep coming: none may go to the dead backend now.
    std::thread::sleep(Duration::from_secs(2));
    let last = cx
        .traffic
        .last_short_failure()
        .map(|t| t.as_millis() as u64);
    if let Some(l) = last.filter(|l| *l >= kill_ms) {
        cx.ms(
            "last_new_flow_to_dead_backend",
            Duration::from_millis(l - kill_ms),
        );
        cx.counts.insert(
            "short_failed_after_marked_down".into(),
            u64::from(l > applied_ms),
        );
        if l > applied_ms {
            bail!("a new connection opened {} ms after every node marked the backend down still failed", l - applied_ms);
        }
    }

    // 2. It comes back.
    let up_ms = cx.traffic.elapsed();
    cx.lab.start_servers(victim)?;
    let d = wait_health(cx, &ids, "up", |h| h == Health::Up, Duration::from_secs(20))?;
    cx.ms("marked_up_everywhere", d);
    cx.say(format!(
        "backend {victim} back up everywhere after {} ms",
        d.as_millis()
    ));
    let bound =
        interval * check.rise + Duration::from_millis(u64::from(check.hold_down_ms)) + slack;
    if d > bound {
        bail!(
            "marking a recovered backend up took {} ms (bound {} ms)",
            d.as_millis(),
            bound.as_millis()
        );
    }
    std::thread::sleep(Duration::from_secs(2));
    let ct_after: usize = cx
        .lab
        .running()
        .iter()
        .map(|i| {
            cx.lab
                .conntrack(*i)
                .map(|v| v.iter().filter(|r| r.backend_id == tcp_id).count())
        })
        .sum::<Result<usize>>()?;
    cx.counts
        .insert("entries_to_victim_before_kill".into(), ct_before as u64);
    cx.counts
        .insert("entries_to_victim_after_up".into(), ct_after as u64);
    let _ = up_ms;

    // 3. One node alone cannot reach backend 2.
    let lonely = cx
        .lab
        .running()
        .into_iter()
        .max()
        .ok_or_else(|| anyhow!("no node"))?;
    let blocked = 2;
    let bids = ids_of(cx, blocked)?;
    cx.say(format!(
        "node {lonely} alone cannot reach backend {blocked} (nftables)"
    ));
    cx.lab.nft(lonely, "add table inet hfhc")?;
    cx.lab.nft(
        lonely,
        "add chain inet hfhc out { type filter hook output priority 0 ; }",
    )?;
    cx.lab.nft(
        lonely,
        &format!(
            "add rule inet hfhc out ip daddr {} drop",
            lab::backend_addr(blocked)
        ),
    )?;
    cx.lab.nft(
        lonely,
        &format!(
            "add rule inet hfhc out ip6 daddr {} drop",
            lab::backend_addr6(blocked)
        ),
    )?;
    let leader = cx.lab.leader()?;
    lab::wait_until(
        &format!("the leader to hear node {lonely} see backend {blocked} down"),
        Duration::from_secs(15),
        || {
            let t: HealthTable = cx.lab.api_get(leader, "/health")?;
            Ok(bids.iter().all(|id| {
                t.backends
                    .iter()
                    .any(|r| r.backend_id == *id && r.disagree == vec![lonely as u64])
            }))
        },
    )?;
    // Several check intervals later it is still up everywhere.
    std::thread::sleep(interval * (check.fall + 4));
    for i in cx.lab.running() {
        let c: ClusterState = cx.lab.api_get(i, "/config")?;
        for id in &bids {
            if c.backends[id].health != Health::Up {
                bail!(
                    "node {lonely} alone took backend {id} out (node {i} sees it {})",
                    c.backends[id].health
                );
            }
        }
    }
    let seen = cx.lab.metric(
        lonely,
        "holdfast_backend_check_up",
        &[("backend", &bids[0].to_string())],
    )?;
    cx.counts.insert(
        "lonely_node_check_up_metric".into(),
        seen.unwrap_or(-1.0) as u64,
    );
    if seen != Some(0.0) {
        bail!(
            "node {lonely}'s holdfast_backend_check_up for backend {} is {seen:?}, not 0",
            bids[0]
        );
    }
    let t: HealthTable = cx.lab.api_get(leader, "/health")?;
    cx.counts.insert(
        "lonely_view_disagrees".into(),
        t.backends
            .iter()
            .filter(|r| r.disagree == vec![lonely as u64])
            .count() as u64,
    );
    cx.lab.nft(lonely, "delete table inet hfhc")?;

    // Nothing else broke so far: only the victim's flows.
    let by = cx.traffic.broken_by_backend();
    let elsewhere: usize = by
        .iter()
        .filter(|(b, _)| **b != Some(victim))
        .map(|(_, n)| n)
        .sum();
    cx.counts
        .insert("broken_on_other_backends".into(), elsewhere as u64);
    cx.counts.insert(
        "broken_on_dead_backend".into(),
        by.get(&Some(victim)).copied().unwrap_or(0) as u64,
    );
    if let Some(t6) = &cx.traffic6 {
        let by6 = t6.broken_by_backend();
        let e6: usize = by6
            .iter()
            .filter(|(b, _)| **b != Some(victim))
            .map(|(_, n)| n)
            .sum();
        cx.counts
            .insert("v6_broken_on_other_backends".into(), e6 as u64);
    }

    // 5. Backend 3's decap agent stops: its server is fine, but VIP
    //    packets are no longer decapsulated. Direct checks cannot see it;
    //    checks through the VIP path can.
    let deaf = 3;
    let dids = ids_of(cx, deaf)?;
    cx.say(format!(
        "stopping backend {deaf}'s decap agent (direct checks)"
    ));
    let deaf_ms = cx.traffic.elapsed().as_millis() as u64;
    cx.lab.stop_decap(deaf)?;
    std::thread::sleep(interval * (check.fall + 4));
    let c: ClusterState = cx.lab.api_get(leader, "/config")?;
    let missed = dids.iter().all(|id| c.backends[id].health == Health::Up);
    cx.counts
        .insert("direct_checks_miss_dead_decap".into(), u64::from(missed));
    cx.say("checks through the VIP path (IPIP / IPv6-in-IPv6) instead");
    let t = Instant::now();
    for name in lab::SERVICES {
        let mut svc = c.services[name].clone();
        if let Some(hc) = svc.health_check.as_mut() {
            hc.via = raft_store::cluster::Via::Vip;
        }
        cx.lab
            .write(raft_store::Command::PutService { service: svc })?;
    }
    let d = wait_health(
        cx,
        &dids,
        "down",
        |h| h == Health::Down,
        Duration::from_secs(20),
    )?;
    cx.ms("vip_check_marked_dead_decap_down", t.elapsed());
    cx.kill_windows
        .push((deaf_ms, cx.traffic.elapsed().as_millis() as u64));
    cx.say(format!(
        "VIP-path checks marked backend {deaf} down everywhere ({} ms)",
        d.as_millis()
    ));
    // The healthy backends pass through the VIP path.
    let healthy: Vec<u32> = (1..=cx.lab.spec.backends)
        .filter(|j| *j != deaf)
        .map(|j| ids_of(cx, j))
        .collect::<Result<Vec<_>>>()?
        .concat();
    std::thread::sleep(interval * (check.fall + 2));
    let c: ClusterState = cx.lab.api_get(leader, "/config")?;
    let up = healthy
        .iter()
        .filter(|id| c.backends[id].health == Health::Up)
        .count();
    cx.counts
        .insert("vip_checks_pass_on_healthy".into(), up as u64);
    cx.counts
        .insert("healthy_backend_ids".into(), healthy.len() as u64);
    cx.lab.start_decap(deaf)?;
    let d = wait_health(
        cx,
        &dids,
        "up",
        |h| h == Health::Up,
        Duration::from_secs(20),
    )?;
    cx.ms("vip_check_marked_decap_up", d);

    // 4. Every backend fails.
    let hosts: Vec<usize> = (1..=cx.lab.spec.backends).collect();
    cx.say("stopping every backend's servers");
    let all_fail_ms = cx.traffic.elapsed().as_millis() as u64;
    for j in &hosts {
        cx.lab.stop_servers(*j)?;
    }
    let all: Vec<u32> = hosts
        .iter()
        .map(|j| cx.lab.backend_id(lab::TCP_SERVICE, *j))
        .collect::<Result<_>>()?;
    let d = lab::wait_until(
        "the TCP service in health panic on every node",
        Duration::from_secs(20),
        || {
            for i in cx.lab.running() {
                let c: ClusterState = cx.lab.api_get(i, "/config")?;
                let settled = all.iter().all(|id| c.backends[id].health != Health::Up);
                if !settled || c.health_panic(lab::TCP_SERVICE).is_none() {
                    return Ok(false);
                }
                if cx.lab.metric(
                    i,
                    "holdfast_service_health_panic",
                    &[("service", lab::TCP_SERVICE)],
                )? != Some(1.0)
                {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )?;
    cx.ms("panic_everywhere", d);
    let c: ClusterState = cx.lab.api_get(leader, "/config")?;
    let kept = all
        .iter()
        .filter(|id| c.backends[id].health == Health::Failing)
        .count();
    cx.counts.insert("kept_when_all_fail".into(), kept as u64);
    cx.say(format!(
        "every backend fails: {kept} kept in service, alert raised on every node"
    ));
    if kept == 0 {
        bail!("every backend failed and none was kept in service");
    }
    for j in &hosts {
        cx.lab.start_servers(*j)?;
    }
    let every: Vec<u32> = hosts
        .iter()
        .map(|j| ids_of(cx, *j))
        .collect::<Result<Vec<_>>>()?
        .concat();
    let d = wait_health(
        cx,
        &every,
        "up",
        |h| h == Health::Up,
        Duration::from_secs(30),
    )?;
    cx.ms("all_up_again", d);
    cx.kill_windows
        .push((all_fail_ms, cx.traffic.elapsed().as_millis() as u64));
    Ok(())
}

fn restart_join(cx: &mut Ctx) -> Result<()> {
    let v = cx.busiest(true)?;
    cx.victim = Some(v);
    cx.say(format!("killing LB node {v}"));
    cx.kill_and_reroute(v, "route_down")?;
    std::thread::sleep(Duration::from_secs(2));
    cx.say(format!("restarting LB node {v}"));
    let t = Instant::now();
    cx.lab.revive_node(v)?;
    let d = lab::wait_until("the warm join", Duration::from_secs(30), || {
        Ok(cx
            .lab
            .status(v)
            .is_ok_and(|s| s.sync.as_ref().is_none_or(|y| y.ready) && s.applied_epoch > 0))
    })?;
    cx.ms("warm_join", d);
    let mut all = cx.lab.running();
    all.sort();
    cx.lab.wait_route(&all, Duration::from_secs(15))?;
    cx.ms("route_up", t.elapsed());
    cx.say(format!(
        "node {v} warm-joined after {} ms, routed again after {} ms",
        d.as_millis(),
        t.elapsed().as_millis()
    ));
    Ok(())
}

fn agent_restart(cx: &mut Ctx) -> Result<()> {
    let v = cx.busiest(false)?;
    cx.victim = Some(v);
    let prog = |cx: &Ctx| -> Result<String> {
        let out = cx.lab.lb(v).ns.ip("-d link show f0")?;
        Ok(out
            .split("prog/xdp id ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or("none")
            .to_string())
    };
    let before = prog(cx)?;
    cx.say(format!(
        "SIGKILL holdfast-node on node {v} (XDP program {before})"
    ));
    cx.lab.kill_agent(v)?;
    std::thread::sleep(Duration::from_secs(2));
    let during = prog(cx)?;
    if during == "none" {
        bail!("the XDP program went away with the agent");
    }
    let mut all = cx.lab.running();
    all.push(v);
    all.sort();
    // BIRD still announces: the router keeps routing to the node.
    let hops = cx.lab.router_nexthops()?;
    if !hops.contains(&lab::lb_addr(v)) {
        bail!("the router stopped routing to node {v} while only its agent was down");
    }
    let t = Instant::now();
    cx.lab.start_node(v)?;
    cx.lab.wait_ready(Duration::from_secs(30))?;
    cx.ms("ready", t.elapsed());
    let after = prog(cx)?;
    cx.say(format!(
        "agent back and ready after {} ms (XDP program {after})",
        t.elapsed().as_millis()
    ));
    Ok(())
}

/// Divergent replication: whether every node in `nodes` holds every entry
/// some node holds as a peer's (a shared entry).
fn shared_everywhere(cx: &Ctx, nodes: &[usize]) -> Result<bool> {
    let mut have = Vec::new();
    let mut shared = BTreeSet::new();
    for &i in nodes {
        let rows = cx.lab.conntrack(i)?;
        for r in rows.iter().filter(|r| r.remote) {
            shared.insert((r.client.clone(), r.proto.clone(), r.backend_id));
        }
        have.push(
            rows.into_iter()
                .map(|r| (r.client, r.proto, r.backend_id))
                .collect::<BTreeSet<_>>(),
        );
    }
    Ok(have.iter().all(|h| shared.is_subset(h)))
}

fn flow_keys(cx: &Ctx, i: usize) -> Result<BTreeSet<(String, String, u32)>> {
    Ok(cx
        .lab
        .conntrack(i)?
        .into_iter()
        .map(|r| (r.client, r.proto, r.backend_id))
        .collect())
}

fn partition(cx: &mut Ctx) -> Result<()> {
    let leader = cx.lab.leader()?;
    let v = cx.busiest(true)?;
    cx.victim = Some(v);
    cx.say(format!("cutting node {v} off from its peers for 10 s"));
    cx.lab.partition(v)?;
    // New flows during the partition: the ones that land on the cut-off
    // node cannot be replicated until the heal.
    std::thread::sleep(Duration::from_secs(2));
    let mut extra = TrafficSpec::new(lab::VIP.parse()?, lab::CLIENT.parse()?, 100, 0);
    extra.interval = Duration::from_millis(300);
    let more = Traffic::start(&cx.lab.client, extra)?;
    std::thread::sleep(Duration::from_secs(8));
    cx.lab.heal_partition(v)?;
    let t = Instant::now();
    cx.say(format!("healed node {v}"));
    if cx.opts.sync && cx.opts.sync_mode == holdfast_node::config::SyncMode::Divergent {
        // Each node holds its own entries and every shared one.
        let d = lab::wait_until(
            "every node to hold every shared entry",
            Duration::from_secs(30),
            || shared_everywhere(cx, &cx.lab.running()),
        )?;
        cx.ms("repair", d);
        cx.say(format!("replication repaired in {} ms", d.as_millis()));
    } else if cx.opts.sync {
        let d = lab::wait_until(
            "conntrack to be identical on every node",
            Duration::from_secs(30),
            || {
                let sets = cx
                    .lab
                    .running()
                    .into_iter()
                    .map(|i| flow_keys(cx, i))
                    .collect::<Result<Vec<_>>>()?;
                Ok(sets.windows(2).all(|w| w[0] == w[1]))
            },
        )?;
        cx.ms("repair", d);
        cx.say(format!("replication repaired in {} ms", d.as_millis()));
    }
    let mut all = cx.lab.running();
    all.sort();
    cx.lab.wait_ready(Duration::from_secs(30))?;
    cx.lab.wait_route(&all, Duration::from_secs(10))?;
    cx.ms("ready", t.elapsed());
    if cx.lab.leader()? != leader {
        cx.say("the leader changed during the partition");
    }
    let r = more.stop()?;
    if r.tcp_broken > 0 {
        bail!(
            "{} of the {} connections opened during the partition broke: {:?}",
            r.tcp_broken,
            r.tcp_total,
            r.broken.first()
        );
    }
    Ok(())
}

fn rolling_restart(cx: &mut Ctx) -> Result<()> {
    let nodes = cx.lab.running();
    for &i in &nodes {
        cx.say(format!(
            "restarting node {i} (SIGTERM: withdraw, keep datapath)"
        ));
        let t = Instant::now();
        cx.lab.stop_agent(i)?;
        let others = cx.others(i);
        cx.lab.wait_route(&others, Duration::from_secs(10))?;
        cx.lab.start_node(i)?;
        cx.lab.wait_ready(Duration::from_secs(30))?;
        cx.ms(&format!("node{i}_back"), t.elapsed());
        cx.all_answer(Duration::from_secs(15))?;
        cx.say(format!(
            "node {i} back after {} ms",
            t.elapsed().as_millis()
        ));
    }
    Ok(())
}

/// Human-readable lines of a result.
pub fn describe(r: &ScenarioResult) -> String {
    let mut s = format!(
        "{:<16} replication {:<3}  tcp {}/{} broken  udp {}/{} broken  longest stall {} ms",
        r.name,
        if r.sync { "on" } else { "off" },
        r.tcp_broken,
        r.tcp_total,
        r.udp_broken,
        r.udp_total,
        r.max_stall_ms
    );
    if let Some(v) = r.victim {
        s.push_str(&format!("  node {v}"));
    }
    if r.v6.tcp_total + r.v6.udp_total > 0 {
        s.push_str(&format!(
            "\n{:<16} IPv6: tcp {}/{} broken  udp {}/{} broken  longest stall {} ms",
            "", r.v6.tcp_broken, r.v6.tcp_total, r.v6.udp_broken, r.v6.udp_total, r.v6.max_stall_ms
        ));
    }
    if !r.converge_ms.is_empty() {
        let c: Vec<String> = r
            .converge_ms
            .iter()
            .map(|(k, v)| format!("{k} {v} ms"))
            .collect();
        s.push_str(&format!("\n{:<16} converge: {}", "", c.join(", ")));
    }
    if r.short.ok + r.short.failed > 0 {
        let per: Vec<String> = r
            .short
            .failed_per_s
            .iter()
            .map(|(s, n)| format!("{n} at {s} s"))
            .collect();
        s.push_str(&format!(
            "\n{:<16} short connections: {} ok, {} failed{}",
            "",
            r.short.ok,
            r.short.failed,
            if per.is_empty() {
                String::new()
            } else {
                format!(" ({})", per.join(", "))
            }
        ));
    }
    if !r.broken_reasons.is_empty() {
        let c: Vec<String> = r
            .broken_reasons
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        s.push_str(&format!("\n{:<16} broken: {}", "", c.join(", ")));
    }
    s
}
