//! sync-bench: conntrack replication between three nodes on loopback with
//! real BPF maps and real QUIC (mutual TLS).
//!
//! ```text
//! cargo run --release -p sync --bin sync-bench [-- --json] [--rate N] [--secs S] [--burst N] [--batch-delay-us N] [--no-conntrackd]
//! cargo run --release -p sync --bin sync-bench -- --apply [--entries N] [--rounds N] [--walk-entries N] [--json]
//! cargo run --release -p sync --bin sync-bench -- --scale [--entries N] [--rates R1,R2,..] [--secs S] [--json]
//! ```
//! `--mode divergent` runs phase 1 with divergent replication (nothing is
//! replicated at steady state: it reports entries sent per new flow and
//! the process's CPU, which `all` mode reports beside its lag).
//! `--apply` measures the receiver's CPU per applied entry, the in-kernel
//! batch beside per-entry syscalls: see `apply.rs`.
//! `--scale` is the million-flow bench (warm join, refresh, the rate curve
//! to 4 peers): see `scale.rs`.
//! Root. Each node is a datapath (the XDP program with its maps, not
//! attached) plus the replication service on its own QUIC endpoint. New flows
//! are created by running SYN frames through a node's program
//! (BPF_PROG_TEST_RUN), so they travel the real path: conntrack insert → ring
//! buffer → consumer → batches → QUIC → peer → merged map writes.
//!
//! Phase 1 (lag): every node creates `--rate` new flows/s for `--secs`;
//! reported: replication lag (creation on the origin → applied on a peer)
//! p50/p99/max and where it goes (milestones from creation: read from the
//! ring, taken into a peer's batch, handed to QUIC, received, applied), bytes on the wire per entry, CPU time per 100k replicated
//! entries (the whole process: the three generators — including their
//! per-flow pacing sleeps — and three nodes).
//! Phase 2 (throughput): one node creates `--burst` flows as fast as it can;
//! reported: entries/s applied by the slower receiver.
//! Phase 3 (side by side): Netfilter's conntrackd in FTFW mode over UDP
//! between two network namespaces replicates `--rate` × `--secs` new flows
//! created at `--rate` (one node's phase-1 load); see `conntrackd.rs`.

mod apply;
mod conntrackd;
mod flows;
mod locks;
mod scale;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use datapath_ebpf::{Datapath, DatapathOptions};
use flows::{config, generate};
use holdfast_pki::{self as tls, Identity};
use sync::{
    service::{Membership, SyncMode, SyncSection, SyncService},
    transport::{BoxFuture, Transport},
};

struct Static {
    me: u64,
    peers: HashMap<u64, SocketAddr>,
}

impl Membership for Static {
    fn is_member(&self, peer: u64) -> bool {
        self.peers.contains_key(&peer) || peer == self.me
    }
    fn peers(&self) -> HashMap<u64, SocketAddr> {
        self.peers.clone()
    }
    fn registered(&self) -> bool {
        true
    }
    fn changed(&self) -> BoxFuture<()> {
        Box::pin(std::future::pending())
    }
}

struct BenchNode {
    dp: Arc<Mutex<Datapath>>,
    svc: Arc<SyncService>,
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills a plain struct.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn applied(n: &BenchNode) -> u64 {
    n.svc.applied_total()
}

const USAGE: &str =
    "usage: sync-bench [--json] [--mode all|divergent] [--rate N] [--secs S] [--burst N] [--batch-delay-us N] [--no-conntrackd]
       sync-bench --scale [--entries N] [--rates R1,R2,..] [--secs S] [--json]
       sync-bench --locks [--json]
       sync-bench --apply [--entries N] [--rounds N] [--walk-entries N] [--json]";

fn main() -> Result<()> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return Ok(());
    }
    if argv.iter().any(|a| a == "--locks") {
        return locks::run(argv.iter().any(|a| a == "--json"));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("sync-bench loads BPF programs: run as root");
    }
    if argv.iter().any(|a| a == "--apply") {
        return apply::run(apply_args(&argv)?);
    }
    if argv.iter().any(|a| a == "--scale") {
        return scale::run(scale_args(&argv)?);
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(bench(argv))
}

fn apply_args(argv: &[String]) -> Result<apply::Args> {
    let mut a = apply::Args {
        entries: 200_000,
        rounds: 3,
        walk_entries: 1_000_000,
        json: false,
    };
    let mut it = argv.iter();
    while let Some(arg) = it.next() {
        let mut num = |n: &str| -> Result<usize> {
            let v = it.next().with_context(|| format!("{n} needs a value"))?;
            match v.parse::<usize>() {
                Ok(x) if x > 0 => Ok(x),
                _ => bail!("{n} needs a positive number, not {v:?}"),
            }
        };
        match arg.as_str() {
            "--apply" => {}
            "--json" => a.json = true,
            "--entries" => a.entries = num("--entries")?,
            "--rounds" => a.rounds = num("--rounds")?,
            "--walk-entries" => a.walk_entries = num("--walk-entries")?,
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(a)
}

/// Divergent mode: phase 1 only (nothing to measure a lag on at steady
/// state): entries sent per new flow and peer, the process's CPU.
async fn divergent_report(
    nodes: &[BenchNode],
    json: bool,
    rate: u32,
    secs: u64,
    created: u64,
    cpu0: f64,
    sent: impl Fn(&[BenchNode]) -> u64,
) -> Result<()> {
    // Time for anything queued to leave.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu = cpu_seconds() - cpu0;
    let per_flow = sent(nodes) as f64 / (created * 2) as f64;
    let cpu_per_100k_new = cpu / created as f64 * 100_000.0;
    for n in nodes {
        n.svc.stop().await;
    }
    if json {
        println!(
            "{}",
            serde_json::json!({
                "mode": "divergent",
                "rate_per_node": rate,
                "new_flows": created,
                "replicated_per_new_flow": per_flow,
                "cpu_s_per_100k_new_flows": cpu_per_100k_new,
            })
        );
    } else {
        println!("3 nodes on loopback, real BPF maps, divergent replication");
        println!("phase 1: {rate} new flows/s per node for {secs} s ({created} new flows, no table change)");
        println!("  entries sent per new flow and peer: {per_flow:.4}");
        println!("  CPU per 100k new flows (whole process, incl. the 0.5 s after): {cpu_per_100k_new:.3} s");
    }
    Ok(())
}

fn scale_args(argv: &[String]) -> Result<scale::Args> {
    let mut a = scale::Args {
        entries: 1_000_000,
        rates: vec![25_000, 50_000, 100_000, 150_000, 200_000, 300_000],
        secs: 3,
        json: false,
    };
    let mut it = argv.iter();
    while let Some(arg) = it.next() {
        let mut val = |n: &str| {
            it.next()
                .with_context(|| format!("{n} needs a value"))
                .map(String::as_str)
        };
        match arg.as_str() {
            "--scale" => {}
            "--json" => a.json = true,
            "--entries" => {
                a.entries = val("--entries")?
                    .parse()
                    .context("--entries needs a number")?
            }
            "--secs" => a.secs = val("--secs")?.parse().context("--secs needs a number")?,
            "--rates" => {
                a.rates = val("--rates")?
                    .split(',')
                    .map(|r| r.trim().parse::<u32>())
                    .collect::<Result<_, _>>()
                    .context("--rates needs numbers separated by commas")?
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if a.entries == 0 || a.secs == 0 || a.rates.contains(&0) {
        bail!("--entries, --secs and every rate must be above 0");
    }
    Ok(a)
}

async fn bench(argv: Vec<String>) -> Result<()> {
    let (mut json, mut rate, mut secs, mut burst) = (false, 20_000u32, 5u64, 300_000u32);
    let mut cfg = SyncSection::default();
    let mut with_conntrackd = true;
    let mut args = argv.into_iter();
    while let Some(a) = args.next() {
        let mut num = |n: &str| -> Result<u64> {
            args.next()
                .with_context(|| format!("{n} needs a number"))?
                .parse()
                .with_context(|| format!("{n} needs a number"))
        };
        match a.as_str() {
            "--json" => json = true,
            "--rate" => rate = num("--rate")? as u32,
            "--secs" => secs = num("--secs")?,
            "--burst" => burst = num("--burst")? as u32,
            "--batch-delay-us" => cfg.batch_delay_us = num("--batch-delay-us")?,
            "--no-conntrackd" => with_conntrackd = false,
            "--mode" => {
                cfg.mode = match args.next().as_deref() {
                    Some("all") => SyncMode::All,
                    Some("divergent") => SyncMode::Divergent,
                    other => bail!("--mode is all or divergent, not {other:?}"),
                }
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    tls::install_crypto_provider();
    let dir = std::env::temp_dir().join(format!("hf-sync-bench-{}", std::process::id()));
    let (ca, ca_key) = tls::generate_ca("bench")?;
    let mut transports = Vec::new();
    for id in 1..=3u64 {
        let (c, k) = tls::issue(&ca, &ca_key, &tls::Subject::Node { id, ips: vec![] })?;
        let ident = Identity::from_pem(&ca, &c, &k)?;
        let t = Transport::bind("127.0.0.1:0".parse()?, &ident)?;
        // Accept connections; this bench has no Raft, so RPCs are refused.
        t.serve(Arc::new(|_, _, _| {
            Box::pin(async { Err("no RPCs in this bench".to_string()) })
        }));
        transports.push(t);
    }
    let addrs: Vec<SocketAddr> = transports
        .iter()
        .map(|t| t.local_addr())
        .collect::<Result<_>>()?;
    let mut nodes = Vec::new();
    for (i, t) in transports.iter().enumerate() {
        let id = i as u64 + 1;
        let mut dp = Datapath::load(DatapathOptions {
            max_services: 4,
            conntrack_size: 2 << 20,
            // Phase 2 creates flows faster than a 1 MiB ring drains: 16 MiB
            // (262k events) absorbs the burst; losses are reported.
            ring_bytes: 1 << 24,
            node_id: id as u16,
            // Flows are made by SYN frames alone at rates a CPU would call a
            // flood: every SYN must enter conntrack (and replication).
            syn_flood_rate: 0,
            divergent: cfg.mode == SyncMode::Divergent,
            ..Default::default()
        })?;
        dp.apply(&config())?;
        let dp = Arc::new(Mutex::new(dp));
        let peers = (1..=3u64)
            .filter(|p| *p != id)
            .map(|p| (p, addrs[p as usize - 1]))
            .collect();
        let svc = SyncService::start(
            id,
            cfg.clone(),
            dp.clone(),
            t.clone(),
            Arc::new(Static { me: id, peers }),
        )?;
        nodes.push(BenchNode { dp, svc });
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !nodes
        .iter()
        .all(|n| n.svc.is_ready() && n.svc.connected_peers() == 2)
    {
        if Instant::now() > deadline {
            bail!("nodes did not connect");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Phase 1: every node at `rate` flows/s.
    let per_node = rate * secs as u32;
    let cpu0 = cpu_seconds();
    let gens: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let dp = n.dp.clone();
            let base = i as u32 * 10_000_000;
            std::thread::spawn(move || generate(&dp, base, base + per_node, Some(rate)))
        })
        .collect();
    for g in gens {
        g.join().expect("generator")?;
    }
    let sent = |nodes: &[BenchNode]| -> u64 {
        nodes
            .iter()
            .map(|n| n.svc.status().peers.iter().map(|p| p.sent).sum::<u64>())
            .sum()
    };
    let created = u64::from(per_node) * 3;
    if cfg.mode == SyncMode::Divergent {
        let r = divergent_report(&nodes, json, rate, secs, created, cpu0, sent).await;
        let _ = std::fs::remove_dir_all(&dir);
        return r;
    }
    let want = u64::from(per_node) * 2; // each node receives the two others' flows
    let deadline = Instant::now() + Duration::from_secs(30);
    while nodes.iter().any(|n| applied(n) < want) {
        if Instant::now() > deadline {
            bail!(
                "phase 1: not all entries applied: {:?}",
                nodes.iter().map(applied).collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cpu = cpu_seconds() - cpu0;
    let replicated = want * 3;
    let replicated_per_new_flow = sent(&nodes) as f64 / (created * 2) as f64;
    let cpu_per_100k_new = cpu / created as f64 * 100_000.0;
    let q = |f: f64| {
        nodes
            .iter()
            .filter_map(|n| n.svc.metrics.lag.quantile(f))
            .max()
            .map(|d| d.as_secs_f64() * 1e3)
            .unwrap_or(f64::NAN)
    };
    let (lag50, lag99, lagmax) = (q(0.5), q(0.99), q(1.0));
    // Where the lag goes: each milestone from creation, the same quantiles.
    let stage = |h: &dyn Fn(&BenchNode) -> &holdfast_metrics::Histogram, f: f64| {
        nodes
            .iter()
            .filter_map(|n| h(n).quantile(f))
            .max()
            .map(|d| d.as_secs_f64() * 1e3)
            .unwrap_or(f64::NAN)
    };
    type Pick = fn(&BenchNode) -> &holdfast_metrics::Histogram;
    let milestones: [(&str, Pick); 5] = [
        ("ring", |n| &n.svc.metrics.stages.ring),
        ("queued", |n| &n.svc.metrics.stages.queued),
        ("sent", |n| &n.svc.metrics.stages.sent),
        ("received", |n| &n.svc.metrics.stages.received),
        ("applied", |n| &n.svc.metrics.lag),
    ];
    let breakdown: Vec<(&str, f64, f64)> = milestones
        .iter()
        .map(|(name, h)| (*name, stage(h, 0.5), stage(h, 0.99)))
        .collect();
    let bytes: u64 = nodes
        .iter()
        .map(|n| n.svc.metrics.bytes_sent.load(Ordering::Relaxed))
        .sum();
    let bytes_per_entry = bytes as f64 / replicated as f64;
    let cpu_per_100k = cpu / replicated as f64 * 100_000.0;

    // Phase 2: node 1 as fast as it can; the slower receiver's rate.
    let before: Vec<u64> = nodes.iter().map(applied).collect();
    let dp = nodes[0].dp.clone();
    let t0 = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let d2 = done.clone();
    let g = std::thread::spawn(move || {
        let r = generate(&dp, 50_000_000, 50_000_000 + burst, None);
        d2.store(true, Ordering::Relaxed);
        r
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while nodes[1..]
        .iter()
        .enumerate()
        .any(|(i, n)| applied(n) < before[i + 1] + u64::from(burst))
    {
        if Instant::now() > deadline {
            bail!("phase 2: receivers did not apply the burst");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = t0.elapsed().as_secs_f64();
    g.join().expect("generator")?;
    let ring_lost: u64 = nodes
        .iter()
        .map(|n| {
            n.dp.lock()
                .expect("dp")
                .stats()
                .map(|s| s.c[datapath_ebpf::abi::stat::RING_LOST])
                .unwrap_or(0)
        })
        .sum();
    let applied_per_s = f64::from(burst) / took;
    for n in &nodes {
        n.svc.stop().await;
    }
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);

    // Phase 3: conntrackd, same flows per second and count as one node above.
    let ctd = if with_conntrackd {
        Some(
            tokio::task::spawn_blocking(move || conntrackd::run(rate, secs))
                .await?
                .context("conntrackd phase")?,
        )
    } else {
        None
    };

    if json {
        println!(
            "{}",
            serde_json::json!({
                "mode": "all",
                "replicated_per_new_flow": replicated_per_new_flow,
                "cpu_s_per_100k_new_flows": cpu_per_100k_new,
                "applied_per_s": applied_per_s,
                "lag_p50_ms": lag50,
                "lag_p99_ms": lag99,
                "lag_max_ms": lagmax,
                "bytes_per_entry": bytes_per_entry,
                "cpu_s_per_100k": cpu_per_100k,
                "rate_per_node": rate,
                "ring_lost": ring_lost,
                "lag_breakdown": breakdown
                    .iter()
                    .map(|(n, p50, p99)| (n.to_string(), serde_json::json!({"p50_ms": p50, "p99_ms": p99})))
                    .collect::<serde_json::Map<_, _>>(),
                "conntrackd": ctd.as_ref().map(|c| serde_json::json!({
                    "applied_per_s": c.applied_per_s,
                    "lag_p50_ms": c.lag_p50_ms,
                    "lag_p99_ms": c.lag_p99_ms,
                    "bytes_per_entry": c.bytes_per_entry,
                })),
            })
        );
    } else {
        println!("3 nodes on loopback, real BPF maps, QUIC + mTLS replication");
        println!(
            "phase 1: {rate} new flows/s per node for {secs} s ({replicated} entries replicated)"
        );
        println!("  lag (created on origin -> applied on peer): p50 {lag50:.3} ms  p99 {lag99:.3} ms  max {lagmax:.3} ms");
        println!("  where it goes, milestones from creation (p50 / p99 ms):");
        for (name, p50, p99) in &breakdown {
            println!("    {name:<9} {p50:.3} / {p99:.3}");
        }
        println!("  bytes on the wire per entry: {bytes_per_entry:.1}");
        println!("  CPU time per 100k replicated entries (whole process): {cpu_per_100k:.3} s");
        println!("  entries sent per new flow and peer: {replicated_per_new_flow:.3}; CPU per 100k new flows (whole process): {cpu_per_100k_new:.3} s");
        println!("phase 2: {burst} flows as fast as one node creates them");
        println!("  applied per receiver: {applied_per_s:.0} entries/s (slower receiver, incl. generation)");
        println!("  ring-buffer events lost: {ring_lost}");
        match &ctd {
            Some(c) => {
                println!(
                    "phase 3: conntrackd (FTFW over UDP, two namespaces), {} flows at {rate}/s",
                    u64::from(rate) * secs
                );
                println!(
                    "  lag p50 {:.1} ms  p99 {:.1} ms (polled every ~5 ms)  applied {:.0} entries/s  bytes/entry {:.1}",
                    c.lag_p50_ms, c.lag_p99_ms, c.applied_per_s, c.bytes_per_entry
                );
            }
            None => println!("phase 3: conntrackd comparison skipped (--no-conntrackd)"),
        }
    }
    Ok(())
}
