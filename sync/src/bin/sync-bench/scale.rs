//! `sync-bench --scale`: a million flows.
//!
//! Node A (id 1) runs in its own tokio runtime (threads `hf-a*`), the
//! others in a second one (`hf-p*`), so A's CPU time is read apart from
//! its peers' (per-thread `schedstat`). Everything is real: BPF maps,
//! QUIC with mutual TLS, the replication service as the node runs it.
//!
//! 1. Memory: A's conntrack map (`--entries` ≥ 1M slots) as the kernel
//!    accounts it (fdinfo, cross-checked with `bpftool map show`).
//! 2. Warm join: A holds `--entries` live flows; node J (id 6) joins from
//!    A. Time until J is ready, bytes A sent, CPU of A and of J.
//! 3. Refresh: A and 4 peers; one refresh round of all of A's live
//!    entries, twice (first into empty peer maps, then the steady state
//!    where every peer holds them already). Time until every peer has
//!    them, bytes, A's CPU; per `refresh_interval_s` (10 s) that is the
//!    share of a core and the bytes per second a node pays for it.
//! 4. Rate curve: A creates new flows (SYN frames through its program) at
//!    each offered rate for `--secs`; lag (created on A → applied on a
//!    peer) p50/p99 over the 4 peers, ring-buffer losses, entries applied
//!    per second per receiver.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use datapath_ebpf::{
    abi::{CtKey, CtVal, IPPROTO_TCP},
    Datapath, DatapathOptions,
};
use holdfast_pki::{self as tls, Identity};
use sync::{
    service::{Membership, SyncSection, SyncService},
    transport::{BoxFuture, Transport},
};
use tokio::runtime::Runtime;

use crate::flows::{config, generate};

pub struct Args {
    pub entries: u32,
    pub rates: Vec<u32>,
    pub secs: u64,
    pub json: bool,
}

/// Members that the bench changes as it goes.
struct Members {
    me: u64,
    peers: Mutex<HashMap<u64, SocketAddr>>,
    allowed: Mutex<HashSet<u64>>,
    notify: Arc<tokio::sync::Notify>,
}

impl Members {
    fn new(me: u64) -> Arc<Self> {
        Arc::new(Self {
            me,
            peers: Mutex::new(HashMap::new()),
            allowed: Mutex::new(HashSet::new()),
            notify: Arc::new(tokio::sync::Notify::new()),
        })
    }
    fn set(&self, peers: HashMap<u64, SocketAddr>, allowed: impl IntoIterator<Item = u64>) {
        *self.allowed.lock().expect("members") = allowed.into_iter().collect();
        *self.peers.lock().expect("members") = peers;
        self.notify.notify_waiters();
    }
}

impl Membership for Members {
    fn is_member(&self, peer: u64) -> bool {
        peer == self.me || self.allowed.lock().expect("members").contains(&peer)
    }
    fn peers(&self) -> HashMap<u64, SocketAddr> {
        self.peers.lock().expect("members").clone()
    }
    fn registered(&self) -> bool {
        true
    }
    fn changed(&self) -> BoxFuture<()> {
        let n = self.notify.clone();
        // The timeout covers a change between reading and waiting.
        Box::pin(async move {
            let _ = tokio::time::timeout(Duration::from_millis(200), n.notified()).await;
        })
    }
}

struct Node {
    id: u64,
    dp: Arc<Mutex<Datapath>>,
    transport: Arc<Transport>,
    members: Arc<Members>,
    svc: Option<Arc<SyncService>>,
}

impl Node {
    fn svc(&self) -> &Arc<SyncService> {
        self.svc.as_ref().expect("started")
    }
}

fn runtime(name: &'static str, workers: usize) -> Result<Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(name)
        .thread_keep_alive(Duration::from_secs(3600))
        .enable_all()
        .build()?)
}

/// CPU seconds of this process's threads whose name starts with `prefix`
/// (from `/proc/self/task/*/schedstat`, nanoseconds on CPU).
fn thread_cpu(prefix: &str) -> f64 {
    let mut ns = 0u64;
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for t in dir.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if !comm.starts_with(prefix) {
                continue;
            }
            if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
                ns += s
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    ns as f64 / 1e9
}

fn node(rt: &Runtime, id: u64, ca: &str, ca_key: &str, conntrack_size: u32) -> Result<Node> {
    let (c, k) = tls::issue(ca, ca_key, &tls::Subject::Node { id, ips: vec![] })?;
    let ident = Identity::from_pem(ca, &c, &k)?;
    let transport = rt.block_on(async {
        let t = Transport::bind("127.0.0.1:0".parse()?, &ident)?;
        t.serve(Arc::new(|_, _, _| {
            Box::pin(async { Err("no RPCs in this bench".to_string()) })
        }));
        anyhow::Ok(t)
    })?;
    let mut dp = Datapath::load(DatapathOptions {
        max_services: 4,
        conntrack_size,
        ring_bytes: 1 << 24,
        node_id: id as u16,
        // SYN frames alone at up to 200 000/s: every one must enter
        // conntrack (and replication), so no SYN flood mode.
        syn_flood_rate: 0,
        ..Default::default()
    })?;
    dp.apply(&config())?;
    Ok(Node {
        id,
        dp: Arc::new(Mutex::new(dp)),
        transport,
        members: Members::new(id),
        svc: None,
    })
}

fn start(rt: &Runtime, n: &mut Node) -> Result<()> {
    let _g = rt.enter();
    n.svc = Some(SyncService::start(
        n.id,
        SyncSection::default(),
        n.dp.clone(),
        n.transport.clone(),
        n.members.clone(),
    )?);
    Ok(())
}

fn stop(rt: &Runtime, n: &mut Node) {
    if let Some(s) = n.svc.take() {
        rt.block_on(s.stop());
    }
}

fn wait(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Result<Duration> {
    let t0 = Instant::now();
    while !done() {
        if t0.elapsed() > limit {
            bail!("{what}: not done after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(t0.elapsed())
}

/// `n` live TCP entries created by node 1 on the bench's VIP.
fn synthetic(n: u32) -> Vec<(CtKey, CtVal)> {
    let now = datapath_ebpf::maps::monotonic_now().as_nanos() as u64;
    let vip = "10.200.0.1".parse().expect("static");
    (0..n)
        .map(|k| {
            let client = std::net::Ipv4Addr::from(0x0a40_0000u32 + k / 50_000);
            let key = CtKey::new(
                client.into(),
                (1024 + k % 50_000) as u16,
                vip,
                80,
                IPPROTO_TCP,
            );
            let val = CtVal {
                backend_id: 1 + k % 3,
                flags: 0,
                origin: 1,
                created_ns: now,
                last_seen_ns: now,
                ..Default::default()
            };
            (key, val)
        })
        .collect()
}

fn bytes_sent(n: &Node) -> u64 {
    let m = &n.svc().metrics;
    m.bytes_sent.load(std::sync::atomic::Ordering::Relaxed)
        + m.snapshot_bytes_sent
            .load(std::sync::atomic::Ordering::Relaxed)
}

fn refreshed(n: &Node) -> u64 {
    n.svc()
        .metrics
        .refreshed
        .load(std::sync::atomic::Ordering::Relaxed)
}

fn bpftool_memlock(id: u32) -> Result<u64> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "show", "id", &id.to_string()])
        .output()
        .context("running bpftool (Debian: bpftool)")?;
    if !out.status.success() {
        bail!(
            "bpftool map show id {id}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v["bytes_memlock"]
        .as_u64()
        .context("bpftool printed no bytes_memlock")
}

pub fn run(args: Args) -> Result<()> {
    tls::install_crypto_provider();
    let size = args.entries.next_power_of_two().max(1 << 20);
    let rt_a = runtime("hf-a", 1)?;
    let rt_p = runtime("hf-p", 2)?;
    let (ca, ca_key) = tls::generate_ca("bench")?;
    let mut a = node(&rt_a, 1, &ca, &ca_key, size)?;
    let mut peers: Vec<Node> = (2..=5)
        .map(|id| node(&rt_p, id, &ca, &ca_key, size))
        .collect::<Result<_>>()?;
    let mut j = node(&rt_p, 6, &ca, &ca_key, size)?;
    let addr = |n: &Node| n.transport.local_addr();
    let report = |msg: &str| eprintln!("scale: {msg}");

    // 1. Memory.
    let info = a.dp.lock().expect("dp").ct_map_info()?;
    let bpftool = bpftool_memlock(info.id)?;
    if bpftool != info.memlock {
        bail!("bpftool says {bpftool} bytes, fdinfo {}", info.memlock);
    }
    report(&format!(
        "conntrack map: {} entries × (key {} + value {} bytes), memlock {} bytes = {:.1} bytes/entry",
        info.max_entries,
        info.key_size,
        info.value_size,
        info.memlock,
        info.memlock as f64 / info.max_entries as f64
    ));

    // A and its 4 peers, all empty: they connect and are ready at once.
    let mut all: HashMap<u64, SocketAddr> = peers
        .iter()
        .map(|p| Ok((p.id, addr(p)?)))
        .collect::<Result<_>>()?;
    all.insert(1, addr(&a)?);
    for n in std::iter::once(&a).chain(&peers) {
        let mut m = all.clone();
        m.remove(&n.id);
        let allowed: Vec<u64> = m.keys().copied().chain([6]).collect();
        n.members.set(m, allowed);
    }
    start(&rt_a, &mut a)?;
    for p in &mut peers {
        start(&rt_p, p)?;
    }
    wait("nodes ready", Duration::from_secs(60), || {
        std::iter::once(&a)
            .chain(&peers)
            .all(|n| n.svc().is_ready() && n.svc().connected_peers() >= 4)
    })?;

    // 2. Warm join of J from A, which now holds the million.
    let flows = synthetic(args.entries);
    let t0 = Instant::now();
    let filled: usize = flows
        .chunks(65_536)
        .map(|c| a.dp.lock().expect("dp").ct_insert_batch(c))
        .sum::<datapath_ebpf::Result<usize>>()?;
    let fill_s = t0.elapsed().as_secs_f64();
    if filled != flows.len() {
        bail!("filled {filled} of {} entries", flows.len());
    }
    let mut flows = flows;
    j.members.set(HashMap::from([(1, addr(&a)?)]), [1]);
    let (cpu_a0, cpu_p0) = (thread_cpu("hf-a"), thread_cpu("hf-p"));
    let b0 = bytes_sent(&a);
    start(&rt_p, &mut j)?;
    let join = wait("warm join", Duration::from_secs(120), || j.svc().is_ready())?;
    let join_bytes = bytes_sent(&a) - b0;
    let (join_cpu_a, join_cpu_j) = (thread_cpu("hf-a") - cpu_a0, thread_cpu("hf-p") - cpu_p0);
    let got = j
        .svc()
        .metrics
        .snapshot_entries
        .load(std::sync::atomic::Ordering::Relaxed);
    if got != u64::from(args.entries) {
        bail!("the joiner applied {got} of {} entries", args.entries);
    }
    report(&format!(
        "warm join of {} entries: ready in {:.2} s, {:.1} MB sent ({:.1} bytes/entry), CPU A {:.2} s, joiner {:.2} s",
        args.entries,
        join.as_secs_f64(),
        join_bytes as f64 / 1e6,
        join_bytes as f64 / f64::from(args.entries),
        join_cpu_a,
        join_cpu_j
    ));
    stop(&rt_p, &mut j);
    drop(j);

    // 3. Refresh rounds to the 4 peers, every entry live (touched just
    // before each round, as if every flow had traffic). Two full rounds
    // (the design before slots: every live entry every round), into empty
    // maps and then the steady state; then `SLOT_ROUNDS` ordinary rounds,
    // each carrying one slot's share.
    const SLOT_ROUNDS: usize = 10;
    let interval = SyncSection::default().refresh_interval_s as f64;
    let mut rounds = Vec::new();
    let mut slotted = (0usize, 0f64, 0f64, 0u64, 0f64);
    for round in 1..=2 + SLOT_ROUNDS {
        let full = round <= 2;
        let now = datapath_ebpf::maps::monotonic_now().as_nanos() as u64;
        for (_, v) in flows.iter_mut() {
            v.last_seen_ns = now;
        }
        for c in flows.chunks(65_536) {
            a.dp.lock().expect("dp").ct_insert_batch(c)?;
        }
        let r0: Vec<u64> = peers.iter().map(refreshed).collect();
        let (cpu_a0, cpu_p0, b0) = (thread_cpu("hf-a"), thread_cpu("hf-p"), bytes_sent(&a));
        let t0 = Instant::now();
        let svc = a.svc().clone();
        let rep = rt_a.block_on(svc.refresh_round(full))?;
        let queued = t0.elapsed();
        let want = rep.sent as u64;
        wait("refresh round", Duration::from_secs(300), || {
            peers.iter().zip(&r0).all(|(p, r)| refreshed(p) - r >= want)
        })?;
        // (`refreshed` counts entries as they arrive: at most the last
        // chunk of a round is still being written.)
        let took = t0.elapsed();
        let cpu_a = thread_cpu("hf-a") - cpu_a0;
        let cpu_p = thread_cpu("hf-p") - cpu_p0;
        let bytes = bytes_sent(&a) - b0;
        if full {
            report(&format!(
                "full refresh round {round}: {} of {} entries to 4 peers in {:.2} s (dump+filter+encode {:.2} s), {:.1} MB, CPU A {:.2} s = {:.1}% of a core every {interval} s, peers {:.2} s",
                rep.sent,
                rep.scanned,
                took.as_secs_f64(),
                queued.as_secs_f64(),
                bytes as f64 / 1e6,
                cpu_a,
                cpu_a / interval * 100.0,
                cpu_p,
            ));
            rounds.push(serde_json::json!({
                "round": round,
                "full": true,
                "scanned": rep.scanned,
                "sent": rep.sent,
                "peers": 4,
                "seconds": took.as_secs_f64(),
                "queue_seconds": queued.as_secs_f64(),
                "bytes": bytes,
                "interval_s": interval,
                "bytes_per_s": bytes as f64 / interval,
                "cpu_a_s": cpu_a,
                "cpu_a_pct_of_core": cpu_a / interval * 100.0,
                "cpu_peers_s": cpu_p,
            }));
        } else {
            slotted.0 += rep.sent;
            slotted.1 += cpu_a;
            slotted.2 += cpu_p;
            slotted.3 += bytes;
            slotted.4 = slotted.4.max(took.as_secs_f64());
        }
    }
    let n = SLOT_ROUNDS as f64;
    let (sent, cpu_a, cpu_p, bytes, slowest) = slotted;
    report(&format!(
        "slotted refresh, {SLOT_ROUNDS} rounds of {} live entries: {:.0} entries per round, {:.1} kB/s to 4 peers, CPU A {:.3} s per round = {:.2}% of a core at {interval} s rounds (peers {:.3} s), slowest round {:.2} s",
        args.entries,
        sent as f64 / n,
        bytes as f64 / n / interval / 1e3,
        cpu_a / n,
        cpu_a / n / interval * 100.0,
        cpu_p / n,
        slowest
    ));
    rounds.push(serde_json::json!({
        "full": false,
        "rounds": SLOT_ROUNDS,
        "sent_per_round": sent as f64 / n,
        "interval_s": interval,
        "bytes_per_s": bytes as f64 / n / interval,
        "cpu_a_s_per_round": cpu_a / n,
        "cpu_a_pct_of_core": cpu_a / n / interval * 100.0,
        "cpu_peers_s_per_round": cpu_p / n,
        "slowest_round_s": slowest,
    }));
    drop(flows);

    // 4. New-flow rate to 4 peers.
    let mut curve = Vec::new();
    let mut base = 20_000_000u32;
    for &rate in &args.rates {
        for p in &peers {
            p.svc().metrics.lag.reset_samples();
        }
        let applied0: Vec<u64> = peers.iter().map(|p| p.svc().applied_total()).collect();
        let lost0 = ring_lost(&a)?;
        let dropped0 = dropped(&a);
        let (cpu_a0, cpu_p0) = (thread_cpu("hf-a"), thread_cpu("hf-p"));
        let count = rate * args.secs as u32;
        let dp = a.dp.clone();
        let t0 = Instant::now();
        let g = std::thread::Builder::new()
            .name("hf-gen".into())
            .spawn(move || generate(&dp, base, base + count, Some(rate)))?;
        g.join().expect("generator")?;
        let gen_s = t0.elapsed().as_secs_f64();
        base += count;
        let lost = ring_lost(&a)? - lost0;
        let dropped_at_a = || dropped(&a) - dropped0;
        let want = u64::from(count) - lost;
        let drained = wait("rate step", Duration::from_secs(120), || {
            peers
                .iter()
                .zip(&applied0)
                .all(|(p, a0)| p.svc().applied_total() - a0 >= want)
        });
        let took = t0.elapsed().as_secs_f64();
        let q = |f: f64| {
            peers
                .iter()
                .filter_map(|p| p.svc().metrics.lag.quantile(f))
                .max()
                .map(|d| d.as_secs_f64() * 1e3)
                .unwrap_or(f64::NAN)
        };
        let (p50, p99) = (q(0.5), q(0.99));
        let achieved = f64::from(count) / gen_s;
        let applied_per_s = want as f64 / took;
        let cpu_a = (thread_cpu("hf-a") - cpu_a0) / took;
        let cpu_p = (thread_cpu("hf-p") - cpu_p0) / took;
        report(&format!(
            "offered {rate}/s (generated {achieved:.0}/s): lag p50 {p50:.2} ms p99 {p99:.2} ms, ring lost {lost}, dropped at full peer queues {} (resent by a full refresh round), applied {applied_per_s:.0}/s per receiver, CPU A {:.0}% peers {:.0}%{}",
            dropped_at_a(),
            cpu_a * 100.0,
            cpu_p * 100.0,
            if drained.is_err() { " (receivers did not catch up)" } else { "" }
        ));
        curve.push(serde_json::json!({
            "offered_per_s": rate,
            "generated_per_s": achieved,
            "lag_p50_ms": p50,
            "lag_p99_ms": p99,
            "ring_lost": lost,
            "dropped_at_peer_queues": dropped_at_a(),
            "applied_per_s_per_receiver": applied_per_s,
            "caught_up": drained.is_ok(),
            "cpu_a_cores": cpu_a,
            "cpu_peers_cores": cpu_p,
        }));
    }
    let max_ok = curve
        .iter()
        .filter(|c| {
            c["lag_p99_ms"].as_f64().is_some_and(|v| v <= 10.0)
                && c["ring_lost"] == 0
                && c["dropped_at_peer_queues"] == 0
        })
        .filter_map(|c| c["generated_per_s"].as_f64())
        .fold(0.0f64, f64::max);
    report(&format!(
        "highest rate with lag p99 ≤ 10 ms and no loss: {max_ok:.0} flows/s"
    ));

    stop(&rt_a, &mut a);
    for p in &mut peers {
        stop(&rt_p, p);
    }
    let out = serde_json::json!({
        "conntrack_map": {
            "max_entries": info.max_entries,
            "key_size": info.key_size,
            "value_size": info.value_size,
            "memlock_bytes": info.memlock,
            "bytes_per_entry": info.memlock as f64 / info.max_entries as f64,
        },
        "fill_s": fill_s,
        "warm_join": {
            "entries": args.entries,
            "ready_s": join.as_secs_f64(),
            "bytes": join_bytes,
            "cpu_a_s": join_cpu_a,
            "cpu_joiner_s": join_cpu_j,
        },
        "refresh": rounds,
        "rate_curve": curve,
        "max_rate_p99_le_10ms": max_ok,
    });
    if args.json {
        println!("{out}");
    } else {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

fn dropped(n: &Node) -> u64 {
    n.svc()
        .metrics
        .peers
        .lock()
        .expect("peers")
        .values()
        .map(|p| p.dropped.load(std::sync::atomic::Ordering::Relaxed))
        .sum()
}

fn ring_lost(n: &Node) -> Result<u64> {
    Ok(n.dp.lock().expect("dp").stats()?.c[datapath_ebpf::abi::stat::RING_LOST])
}
