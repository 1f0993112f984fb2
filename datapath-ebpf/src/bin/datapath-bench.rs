//! datapath-bench: ns/packet of the XDP load balancer, measured the way
//! Katran's perf tester does: many BPF_PROG_TEST_RUN calls with repeat=1 on
//! the original frame (the program rewrites frames, so repeat>1 would time
//! its own output), minus the cost of a trivial XDP program measured in the
//! same run, interleaved so that drift hits both alike.
//!
//! ```text
//! cargo run --release -p datapath-ebpf --bin datapath-bench [-- --json] [--iters N] [--pin DIR]
//! ```
//! `--conntrack-size N` sizes the main cases' conntrack (default 1 M, the
//! node's default; the options' validation applies).
//! `--pin DIR` leaves the configured program (DIR/prog) and its maps pinned
//! so an outside harness can run it side by side; remove DIR to clean up.
//! `--cpus` adds the multi-CPU figures: the same loop on one thread pinned
//! per CPU, all at once — each CPU its own flows, and all CPUs the same
//! flow — per CPU ns/packet against one CPU alone, in the same run.
//! `--syn-flood` adds the SYN flood case: conntrack full of established
//! flows, twice as many spoofed SYNs on one CPU, with the SYN flood
//! protection off and on side by side — ns and packets/s per SYN,
//! established flows evicted, and the cost of a handshake's ACK.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use datapath_ebpf::{
    abi::{stat, FlowEvent},
    packet::{Packet, TCP_ACK, TCP_SYN},
    testbed::TestNet,
    testrun::{self, Nop, XDP_PASS, XDP_TX},
    BackendSpec, BackendState, Datapath, DatapathConfig, DatapathOptions, Forwarding, Proto,
    ServiceSpec, SnatConfig, SnatSlot,
};

struct Args {
    json: bool,
    iters: usize,
    pin: Option<PathBuf>,
    /// Also run the loop on every CPU at once.
    cpus: bool,
    /// Also run the SYN flood case (conntrack full, protection off and on).
    syn_flood: bool,
    /// Conntrack entries of the main cases' datapath.
    conntrack_size: u32,
}

fn args() -> Result<Args> {
    let mut a = Args {
        json: false,
        iters: 20_000,
        pin: None,
        cpus: false,
        syn_flood: false,
        conntrack_size: 1 << 20,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--json" => a.json = true,
            "--iters" => {
                a.iters = it
                    .next()
                    .context("--iters needs a number")?
                    .parse()
                    .context("--iters needs a number")?;
                if a.iters < 100 {
                    bail!("--iters must be at least 100");
                }
            }
            "--conntrack-size" => {
                a.conntrack_size = it
                    .next()
                    .context("--conntrack-size needs a number")?
                    .parse()
                    .context("--conntrack-size needs a number")?;
            }
            "--pin" => a.pin = Some(it.next().context("--pin needs a directory")?.into()),
            "--cpus" => a.cpus = true,
            "--syn-flood" => a.syn_flood = true,
            "-h" | "--help" => {
                println!(
                    "usage: datapath-bench [--json] [--iters N] [--conntrack-size N] [--pin DIR] \
                     [--cpus] [--syn-flood]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    Ok(a)
}

/// The SNAT service's VIP, this node's SNAT address, and a client that is
/// routed (through the test network's router: replies need a next hop).
const SNAT_VIP: &str = "10.200.0.2";
const SNAT_ADDR: &str = "10.97.0.1";
const SNAT_CLIENT: &str = "172.20.0.10";

const RANGES_VIP: &str = "10.200.0.4";
/// A service with client affinity.
const AFFINITY_VIP: &str = "10.200.0.5";

/// 1,000 source ranges: 998 host routes of 198.18.0.0/15 and the two
/// client ranges of the bench (192.0.2.0/24, 100.64.0.0/10).
fn bench_ranges() -> Vec<datapath_ebpf::SourceRange> {
    (0..998u32)
        .map(|i| format!("198.18.{}.{}/32", i / 200, 1 + i % 200))
        .chain(["192.0.2.0/24".into(), "100.64.0.0/10".into()])
        .map(|r| r.parse().expect("static range"))
        .collect()
}

fn config() -> DatapathConfig {
    let be = |id: u32, addr: &str| BackendSpec {
        id,
        addr: addr.parse().expect("static"),
        weight: 1,
        state: BackendState::Active,
        port: 0,
    };
    DatapathConfig {
        epoch: 1,
        services: vec![
            ServiceSpec {
                source_ranges: Vec::new(),
                vip: "10.200.0.1".parse().expect("static"),
                port: 80,
                proto: Proto::Tcp,
                table_size: 65_537,
                backends: vec![
                    be(1, "10.99.0.11"),
                    be(2, "10.99.0.12"),
                    be(3, "10.99.0.13"),
                ],
                forwarding: Default::default(),
                affinity_timeout_s: None,
            },
            ServiceSpec {
                source_ranges: Vec::new(),
                vip: "10.200.0.1".parse().expect("static"),
                port: 53,
                proto: Proto::Udp,
                table_size: 65_537,
                backends: vec![
                    be(7, "10.99.0.11"),
                    be(8, "10.99.0.12"),
                    be(9, "10.99.0.13"),
                ],
                forwarding: Default::default(),
                affinity_timeout_s: None,
            },
            ServiceSpec {
                source_ranges: Vec::new(),
                vip: "fd00:200::1".parse().expect("static"),
                port: 80,
                proto: Proto::Tcp,
                table_size: 65_537,
                backends: vec![
                    be(4, "fd00:99::11"),
                    be(5, "fd00:99::12"),
                    be(6, "fd00:99::13"),
                ],
                forwarding: Default::default(),
                affinity_timeout_s: None,
            },
            // SNAT: the same backends on another port, this node in slot 1.
            ServiceSpec {
                source_ranges: Vec::new(),
                vip: SNAT_VIP.parse().expect("static"),
                port: 80,
                proto: Proto::Tcp,
                table_size: 65_537,
                backends: [(10, "10.99.0.11"), (11, "10.99.0.12"), (12, "10.99.0.13")]
                    .into_iter()
                    .map(|(id, a)| BackendSpec {
                        port: 8080,
                        ..be(id, a)
                    })
                    .collect(),
                forwarding: Forwarding::Snat,
                affinity_timeout_s: None,
            },
            // Restricted to 1,000 source ranges (the clients of the hit
            // and new-flow cases among them).
            ServiceSpec {
                source_ranges: bench_ranges(),
                vip: RANGES_VIP.parse().expect("static"),
                port: 80,
                proto: Proto::Tcp,
                table_size: 65_537,
                backends: vec![
                    be(13, "10.99.0.11"),
                    be(14, "10.99.0.12"),
                    be(15, "10.99.0.13"),
                ],
                forwarding: Default::default(),
                affinity_timeout_s: None,
            },
            // Client affinity (three hours, the Kubernetes default).
            ServiceSpec {
                source_ranges: Vec::new(),
                vip: AFFINITY_VIP.parse().expect("static"),
                port: 80,
                proto: Proto::Tcp,
                table_size: 65_537,
                backends: vec![
                    be(16, "10.99.0.11"),
                    be(17, "10.99.0.12"),
                    be(18, "10.99.0.13"),
                ],
                forwarding: Default::default(),
                affinity_timeout_s: Some(10_800),
            },
        ],
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

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

struct Case {
    name: &'static str,
    key: &'static str,
    samples: Vec<u64>,
    base: Vec<u64>,
}

/// New flows through `dp` (all mode) and `dv` (divergent), interleaved,
/// with a thread blocked on each ring's epoll the way the agent's consumer
/// is: SYN and UDP, four cases.
fn live_consumers(
    dp: &Datapath,
    dv: &Datapath,
    nop: &Nop,
    ifindex: u32,
    iters: usize,
    events: datapath_ebpf::events::FlowEvents,
    dv_events: datapath_ebpf::events::FlowEvents,
) -> Result<Vec<Case>> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let consumers: Vec<_> = [events, dv_events]
        .into_iter()
        .map(|mut ev| {
            let stop = stop.clone();
            std::thread::spawn(move || -> Result<u64> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let mut buf = Vec::with_capacity(4096);
                    let mut n = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        buf.clear();
                        let got = tokio::time::timeout(
                            std::time::Duration::from_millis(50),
                            ev.recv(&mut buf, 4096),
                        )
                        .await;
                        if let Ok(r) = got {
                            n += r? as u64;
                        }
                    }
                    Ok(n)
                })
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(100));
    let mut cases = [
        (
            "new flow (SYN), consumer waiting on the ring",
            "new_flow_live_ns",
        ),
        (
            "new flow (SYN), divergent, consumer waiting",
            "new_flow_divergent_live_ns",
        ),
        (
            "new flow (UDP), consumer waiting on the ring",
            "new_flow_udp_live_ns",
        ),
        (
            "new flow (UDP), divergent, consumer waiting",
            "new_flow_udp_divergent_live_ns",
        ),
    ]
    .map(|(name, key)| Case {
        name,
        key,
        samples: Vec::with_capacity(iters),
        base: Vec::with_capacity(iters),
    });
    for i in 0..iters as u32 {
        let c = std::net::Ipv4Addr::from(0x0A40_0000u32 + i).to_string(); // 10.64.0.0/10
        let syn = Packet::tcp(&c, 23456, "10.200.0.1", 80, TCP_SYN).frame();
        let udp = Packet::udp(&c, 23456, "10.200.0.1", 53).frame();
        for (ci, case) in cases.iter_mut().enumerate() {
            let frame = if ci < 2 { &syn } else { &udp };
            let prog = if ci % 2 == 0 {
                dp.program()
            } else {
                dv.program()
            };
            let r = testrun::run(prog, frame, ifindex)?;
            if r.verdict != XDP_TX {
                bail!("{}: verdict {} instead of TX", case.name, r.verdict);
            }
            case.samples.push(r.duration.as_nanos() as u64);
            let b = testrun::run(nop.program(), frame, ifindex)?;
            case.base.push(b.duration.as_nanos() as u64);
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let got: Vec<u64> = consumers
        .into_iter()
        .map(|t| t.join().expect("consumer thread"))
        .collect::<Result<_>>()?;
    if got[1] != 0 {
        bail!(
            "divergent replication wrote {} ring records at steady state",
            got[1]
        );
    }
    Ok(cases.into())
}

fn main() -> Result<()> {
    let args = args()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("datapath-bench loads BPF programs and creates a network namespace: run as root");
    }
    let net = TestNet::new("hfbench").context("creating the bench namespace")?;
    let _guard = net.enter()?;
    if let Some(dir) = &args.pin {
        datapath_ebpf::maps::ensure_bpffs_dir(dir)?;
    }
    let mut dp = Datapath::load(DatapathOptions {
        max_services: 8,
        conntrack_size: args.conntrack_size,
        // Room for the multi-CPU rounds' new flows between drains.
        ring_bytes: 1 << 24,
        // The new-flow cases time a SYN entering conntrack: the path of
        // every SYN below the flood rate, counting included. The bench sends
        // them far faster than the default rate, so the rate here is the
        // highest allowed (counted, never reached); flood mode is timed by
        // --syn-flood.
        syn_flood_rate: 100_000_000,
        pin_dir: args.pin.clone(),
        ..Default::default()
    })?;
    dp.apply(&config())?;
    let mut events = dp.take_flow_events()?;
    // The same config with divergent replication, side by side: its new
    // flows (at steady state, no table change) write no ring record.
    let mut dv = Datapath::load(DatapathOptions {
        max_services: 8,
        conntrack_size: args.conntrack_size,
        ring_bytes: 1 << 24,
        syn_flood_rate: 100_000_000,
        divergent: true,
        ..Default::default()
    })?;
    dv.apply(&config())?;
    let mut dv_events = dv.take_flow_events()?;
    let nop = Nop::load()?;
    let ifindex = net.ifindex;

    let ct_hit = Packet::tcp("192.0.2.10", 40000, "10.200.0.1", 80, TCP_ACK).frame();
    let ct_hit_v6 = Packet::tcp("2001:db8::10", 40000, "fd00:200::1", 80, TCP_ACK).frame();
    let pass = Packet::tcp("192.0.2.10", 40000, "198.51.100.1", 80, TCP_SYN).frame();
    let snat_hit = Packet::tcp(SNAT_CLIENT, 40000, SNAT_VIP, 80, TCP_ACK).frame();
    let ranges_hit = Packet::tcp("192.0.2.10", 40000, RANGES_VIP, 80, TCP_ACK).frame();
    let refused = Packet::tcp("203.0.113.7", 40000, RANGES_VIP, 80, TCP_SYN).frame();
    let affinity_hit = Packet::tcp("192.0.2.10", 40000, AFFINITY_VIP, 80, TCP_ACK).frame();
    // Open the flows first so their packets are conntrack hits.
    for f in [
        Packet::tcp("192.0.2.10", 40000, AFFINITY_VIP, 80, TCP_SYN).frame(),
        Packet::tcp("192.0.2.10", 40000, RANGES_VIP, 80, TCP_SYN).frame(),
        Packet::tcp("192.0.2.10", 40000, "10.200.0.1", 80, TCP_SYN).frame(),
        Packet::tcp("2001:db8::10", 40000, "fd00:200::1", 80, TCP_SYN).frame(),
        Packet::tcp(SNAT_CLIENT, 40000, SNAT_VIP, 80, TCP_SYN).frame(),
    ] {
        let r = testrun::run(dp.program(), &f, ifindex)?;
        if r.verdict != XDP_TX {
            bail!("priming SYN got verdict {} instead of TX", r.verdict);
        }
    }
    // The SNAT flow's binding: its backend answers the SNAT address and port.
    let snat_key = datapath_ebpf::abi::CtKey::new(
        SNAT_CLIENT.parse()?,
        40000,
        SNAT_VIP.parse()?,
        80,
        datapath_ebpf::abi::IPPROTO_TCP,
    );
    let snat_entry = dp
        .conntrack()
        .get(&snat_key)?
        .context("the SNAT flow's entry")?;
    let backend = dp.backend(snat_entry.backend_id)?;
    let backend_addr = std::net::Ipv4Addr::new(
        backend.addr[0],
        backend.addr[1],
        backend.addr[2],
        backend.addr[3],
    )
    .to_string();
    let snat_reply = Packet::tcp(
        &backend_addr,
        8080,
        SNAT_ADDR,
        u16::from_be(snat_entry.snat_port),
        TCP_ACK,
    )
    .frame();
    // Distinct new flows: one client address per iteration.
    let new_flows: Vec<Vec<u8>> = (0..args.iters as u32)
        .map(|i| {
            let c = 0x6440_0000u32 + i; // 100.64.0.0/10
            let src = std::net::Ipv4Addr::from(c).to_string();
            Packet::tcp(&src, 12345, "10.200.0.1", 80, TCP_SYN).frame()
        })
        .collect();
    // New SNAT flows (a port bound per flow): clients of 172.20.0.0/16.
    let new_snat: Vec<Vec<u8>> = (0..args.iters as u32)
        .map(|i| {
            let c = 0xAC14_0000u32 + 256 + i; // 172.20.1.0 onwards
            let src = std::net::Ipv4Addr::from(c).to_string();
            Packet::tcp(&src, 12345, SNAT_VIP, 80, TCP_SYN).frame()
        })
        .collect();
    // New flows of the restricted service (clients of 100.64.0.0/10).
    let new_ranges: Vec<Vec<u8>> = (0..args.iters as u32)
        .map(|i| {
            let c = 0x6440_0000u32 + i;
            let src = std::net::Ipv4Addr::from(c).to_string();
            Packet::tcp(&src, 12346, RANGES_VIP, 80, TCP_SYN).frame()
        })
        .collect();
    // New flows of the affinity service: a known client from a new port
    // each time (its affinity entry decides), and new clients (an
    // affinity entry made for each).
    let new_affine: Vec<Vec<u8>> = (0..args.iters as u32)
        .map(|i| {
            Packet::tcp(
                "192.0.2.10",
                1024 + (i % 60_000) as u16,
                AFFINITY_VIP,
                80,
                TCP_SYN,
            )
            .frame()
        })
        .collect();
    let new_affinity_client: Vec<Vec<u8>> = (0..args.iters as u32)
        .map(|i| {
            let c = 0x6440_0000u32 + i;
            let src = std::net::Ipv4Addr::from(c).to_string();
            Packet::tcp(&src, 12347, AFFINITY_VIP, 80, TCP_SYN).frame()
        })
        .collect();
    // And as UDP (a DNS query from a new client: no SYN, a miss).
    let new_udp: Vec<Vec<u8>> = (0..args.iters as u32)
        .map(|i| {
            let c = 0x6480_0000u32 + i; // 100.128.0.0/10
            let src = std::net::Ipv4Addr::from(c).to_string();
            Packet::udp(&src, 12345, "10.200.0.1", 53).frame()
        })
        .collect();

    let mut cases = [
        ("conntrack hit (IPv4 TCP)", "ct_hit_ns"),
        (
            "new flow (SYN: miss, Maglev, insert, ring buffer)",
            "new_flow_ns",
        ),
        ("non-VIP pass", "pass_ns"),
        ("conntrack hit (IPv6 TCP)", "ct_hit_v6_ns"),
        (
            "new flow (UDP: miss, Maglev, insert, ring buffer)",
            "new_flow_udp_ns",
        ),
        (
            "SNAT new flow (SYN: port bound, insert, rewrite)",
            "snat_new_flow_ns",
        ),
        ("SNAT hit (client -> backend, rewrite)", "snat_hit_ns"),
        ("SNAT reply (backend -> client, rewrite)", "snat_reply_ns"),
        (
            "conntrack hit, service with 1,000 source ranges",
            "ct_hit_ranges_ns",
        ),
        (
            "new flow (SYN), source found among 1,000 ranges",
            "new_flow_ranges_ns",
        ),
        (
            "SYN from outside 1,000 source ranges (dropped)",
            "refused_ns",
        ),
        (
            "conntrack hit, service with client affinity",
            "ct_hit_affinity_ns",
        ),
        (
            "new flow (SYN) of a client with an affinity entry",
            "new_flow_affine_ns",
        ),
        (
            "new flow (SYN) of a new client: affinity entry made",
            "new_flow_affinity_client_ns",
        ),
        (
            "new flow (SYN), divergent replication: no ring record",
            "new_flow_divergent_ns",
        ),
        (
            "new flow (UDP), divergent replication: no ring record",
            "new_flow_udp_divergent_ns",
        ),
    ]
    .map(|(name, key)| Case {
        name,
        key,
        samples: Vec::with_capacity(args.iters),
        base: Vec::with_capacity(args.iters),
    });

    let mut drained: Vec<FlowEvent> = Vec::new();
    for (i, new_flow) in new_flows.iter().enumerate() {
        for (ci, case) in cases.iter_mut().enumerate() {
            let frame: &[u8] = match ci {
                0 => &ct_hit,
                1 => new_flow,
                2 => &pass,
                3 => &ct_hit_v6,
                4 => &new_udp[i],
                5 => &new_snat[i],
                6 => &snat_hit,
                7 => &snat_reply,
                8 => &ranges_hit,
                9 => &new_ranges[i],
                10 => &refused,
                11 => &affinity_hit,
                12 => &new_affine[i],
                13 => &new_affinity_client[i],
                14 => new_flow,
                _ => &new_udp[i],
            };
            let prog = if ci >= 14 { dv.program() } else { dp.program() };
            let r = testrun::run(prog, frame, ifindex)?;
            let want = match ci {
                2 => XDP_PASS,
                10 => testrun::XDP_DROP,
                _ => XDP_TX,
            };
            if r.verdict != want {
                bail!("{}: verdict {} instead of {want}", case.name, r.verdict);
            }
            case.samples.push(r.duration.as_nanos() as u64);
            let b = testrun::run(nop.program(), frame, ifindex)?;
            case.base.push(b.duration.as_nanos() as u64);
        }
        if i % 1000 == 999 {
            drained.clear();
            events.drain(&mut drained, usize::MAX);
            drained.clear();
            if dv_events.drain(&mut drained, usize::MAX) != 0 {
                bail!("divergent replication wrote ring records at steady state");
            }
        }
    }

    let st = dp.stats()?;
    if st.c[stat::RING_LOST] != 0 {
        bail!(
            "{} ring-buffer events lost: the bench must drain faster",
            st.c[stat::RING_LOST]
        );
    }

    let multi = if args.cpus {
        Some(multi_cpu(&dp, &nop, ifindex, args.iters, &mut events)?)
    } else {
        None
    };

    // New flows with the agent's consumer waiting on each ring (epoll, as
    // the replication service does): a record then also wakes the
    // consumer. Every new flow in `all` mode beside divergent's.
    let mut live = live_consumers(&dp, &dv, &nop, ifindex, args.iters, events, dv_events)?;

    let flood = if args.syn_flood {
        // Its own datapaths (small conntrack, protection off and on).
        Some(syn_flood(&nop, ifindex)?)
    } else {
        None
    };

    let mut results = Vec::new();
    for c in cases.iter_mut().chain(live.iter_mut()) {
        let lb = median(&mut c.samples);
        let base = median(&mut c.base);
        results.push((c.name, c.key, lb, base, lb.saturating_sub(base)));
    }
    if let Some(dir) = &args.pin {
        dp.pin_program(&dir.join("prog"))?;
    }
    if args.json {
        let mut obj = serde_json::Map::new();
        for (_, key, _, _, net_ns) in &results {
            obj.insert((*key).into(), serde_json::json!(net_ns));
        }
        obj.insert("iters".into(), serde_json::json!(args.iters));
        if let Some(m) = &multi {
            obj.insert("multi_cpu".into(), m.to_json());
        }
        if let Some(f) = &flood {
            obj.insert("syn_flood".into(), f.to_json());
        }
        obj.insert(
            "baseline_ns".into(),
            serde_json::json!(results.iter().map(|r| r.3).min().unwrap_or(0)),
        );
        println!("{}", serde_json::Value::Object(obj));
    } else {
        println!(
            "holdfast_lb, {} iterations, median of repeat=1 test runs minus a trivial XDP \
             program's median in the same run:",
            args.iters
        );
        for (name, _, lb, base, net_ns) in &results {
            println!("  {name:<52} {net_ns:>5} ns/packet   (raw {lb} ns, baseline {base} ns)");
        }
        if let Some(m) = &multi {
            println!(
                "on {} CPUs at once (one pinned thread each), ns/packet per CPU against one CPU alone:",
                m.cpus
            );
            for r in &m.rows {
                let judged = match (r.ratio, r.scaling) {
                    (Some(ratio), Some(scaling)) => {
                        format!("ratio {ratio:.2} (scaling {scaling:.2} of {})", m.cpus)
                    }
                    _ => "ratio n/a (alone below the test-run clock's steps)".to_string(),
                };
                println!(
                    "  {:<44} alone {:>5}   all: {:<24} {judged}",
                    r.case,
                    r.alone_ns,
                    r.per_cpu_ns
                        .iter()
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>()
                        .join(" "),
                );
            }
        }
        if let Some(f) = &flood {
            f.print();
        }
        if let Some(dir) = &args.pin {
            println!("program and maps left pinned under {}", dir.display());
        }
    }
    // With --pin, dropping the datapath keeps its pinned maps (and program).
    drop(dp);
    Ok(())
}

struct MultiRow {
    case: &'static str,
    /// Median net ns/packet with one thread on CPU 0 and the others idle.
    alone_ns: u64,
    /// Median net ns/packet of each CPU's thread, all running at once.
    per_cpu_ns: Vec<u64>,
    /// Mean of `per_cpu_ns` over `alone_ns`: the cost of sharing, per packet
    /// (None when `alone_ns` is 0: below the test-run clock's steps).
    ratio: Option<f64>,
    /// Packets per second of all CPUs over one CPU's (ideal: the CPU count).
    scaling: Option<f64>,
}

struct Multi {
    cpus: usize,
    iters: usize,
    rows: Vec<MultiRow>,
}

fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The frames one thread sends in a case: `kind` 0 = its own established
/// flow (`block` = its CPU), 1 = the flow every thread shares, 2 = new
/// flows from address block `block`, 3 = a packet for no VIP (reads only:
/// what two busy CPUs cost each other without sharing anything).
fn frames_for(kind: usize, block: usize, iters: usize) -> Vec<Vec<u8>> {
    let cpu = block;
    match kind {
        0 => vec![Packet::tcp(
            &format!("192.0.2.{}", 20 + cpu),
            40000,
            "10.200.0.1",
            80,
            TCP_ACK,
        )
        .frame()],
        1 => vec![Packet::tcp("192.0.2.10", 40000, "10.200.0.1", 80, TCP_ACK).frame()],
        3 => vec![Packet::tcp("192.0.2.10", 40000, "198.51.100.1", 80, TCP_SYN).frame()],
        _ => (0..iters as u32)
            .map(|i| {
                // 100.128.0.0/9, 4096 addresses per block.
                let c = 0x6480_0000u32 + ((cpu as u32) << 12) + i;
                Packet::tcp(
                    &std::net::Ipv4Addr::from(c).to_string(),
                    23456,
                    "10.200.0.1",
                    80,
                    TCP_SYN,
                )
                .frame()
            })
            .collect(),
    }
}

/// `iters` runs on `cpu` interleaved with the baseline: (program, baseline)
/// durations in ns.
fn loop_on(
    cpu: usize,
    prog: std::os::fd::BorrowedFd<'_>,
    nop: std::os::fd::BorrowedFd<'_>,
    frames: &[Vec<u8>],
    iters: usize,
    ifindex: u32,
    start: &std::sync::Barrier,
) -> Result<(Vec<u64>, Vec<u64>)> {
    pin_to(cpu);
    start.wait();
    let mut lb = Vec::with_capacity(iters);
    let mut base = Vec::with_capacity(iters);
    for i in 0..iters {
        let f = &frames[i % frames.len()];
        let r = testrun::run_fd(prog, f, ifindex)?;
        if r.verdict != XDP_TX && r.verdict != XDP_PASS {
            bail!("CPU {cpu}: verdict {}", r.verdict);
        }
        lb.push(r.duration.as_nanos() as u64);
        base.push(testrun::run_fd(nop, f, ifindex)?.duration.as_nanos() as u64);
    }
    Ok((lb, base))
}

/// Rounds of "CPU 0 alone" and "every CPU at once", alternated so that the
/// machine's drift hits both alike.
const ROUNDS: usize = 10;

fn multi_cpu(
    dp: &Datapath,
    nop: &Nop,
    ifindex: u32,
    iters: usize,
    events: &mut datapath_ebpf::events::FlowEvents,
) -> Result<Multi> {
    use std::os::fd::AsFd;
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let prog_fd = dp.program().fd().context("program fd")?;
    let nop_fd = nop.program().fd().context("nop fd")?;
    let (prog, nopf) = (prog_fd.as_fd(), nop_fd.as_fd());
    // Own established flows: open one per CPU.
    for cpu in 0..cpus {
        let syn = Packet::tcp(
            &format!("192.0.2.{}", 20 + cpu),
            40000,
            "10.200.0.1",
            80,
            TCP_SYN,
        )
        .frame();
        if testrun::run_fd(prog, &syn, ifindex)?.verdict != XDP_TX {
            bail!("priming the flow of CPU {cpu} failed");
        }
    }
    let cases = [
        ("conntrack hit, each CPU its own flow", 0usize),
        ("conntrack hit, all CPUs the same flow", 1),
        ("new flow, each CPU its own flows", 2),
        ("non-VIP pass (no shared writes)", 3),
    ];
    let per_round = (iters / ROUNDS).max(100);
    let mut rows = Vec::new();
    let mut sink = Vec::new();
    for (case, kind) in cases {
        // New flows: every round and phase its own addresses (block
        // numbers past the CPUs' for the "alone" phase).
        let block = |phase: usize, cpu: usize, round: usize| {
            if kind == 2 {
                (round * 2 + phase) * cpus + cpu
            } else {
                cpu
            }
        };
        let (mut alone_lb, mut alone_base) = (Vec::new(), Vec::new());
        let mut all: Vec<(Vec<u64>, Vec<u64>)> = vec![(Vec::new(), Vec::new()); cpus];
        for round in 0..ROUNDS {
            let f = frames_for(kind, block(0, 0, round), per_round);
            let one = std::sync::Barrier::new(1);
            let (l, b) = loop_on(0, prog, nopf, &f, per_round, ifindex, &one)?;
            alone_lb.extend(l);
            alone_base.extend(b);
            let frames: Vec<Vec<Vec<u8>>> = (0..cpus)
                .map(|c| frames_for(kind, block(1, c, round), per_round))
                .collect();
            let start = std::sync::Barrier::new(cpus);
            let got = std::thread::scope(|s| -> Result<Vec<(Vec<u64>, Vec<u64>)>> {
                let hs: Vec<_> = (0..cpus)
                    .map(|c| {
                        let (f, st) = (&frames[c], &start);
                        s.spawn(move || loop_on(c, prog, nopf, f, per_round, ifindex, st))
                    })
                    .collect();
                hs.into_iter()
                    .map(|h| {
                        h.join()
                            .map_err(|_| anyhow::anyhow!("bench thread panicked"))?
                    })
                    .collect()
            })?;
            for (acc, (l, b)) in all.iter_mut().zip(got) {
                acc.0.extend(l);
                acc.1.extend(b);
            }
            events.drain(&mut sink, usize::MAX);
            sink.clear();
        }
        let alone = median(&mut alone_lb).saturating_sub(median(&mut alone_base));
        let per_cpu: Vec<u64> = all
            .iter_mut()
            .map(|(l, b)| median(l).saturating_sub(median(b)))
            .collect();
        let mean = per_cpu.iter().sum::<u64>() as f64 / per_cpu.len() as f64;
        let ratio = (alone > 0).then(|| mean / alone as f64);
        rows.push(MultiRow {
            case,
            alone_ns: alone,
            per_cpu_ns: per_cpu,
            ratio,
            scaling: ratio.filter(|r| *r > 0.0).map(|r| cpus as f64 / r),
        });
    }
    let st = dp.stats()?;
    if st.c[stat::RING_LOST] != 0 {
        bail!(
            "{} ring-buffer events lost in the multi-CPU runs",
            st.c[stat::RING_LOST]
        );
    }
    Ok(Multi {
        cpus,
        iters: per_round * ROUNDS,
        rows,
    })
}

impl Multi {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "cpus": self.cpus,
            "iters": self.iters,
            "rows": self.rows.iter().map(|r| serde_json::json!({
                "case": r.case,
                "alone_ns": r.alone_ns,
                "per_cpu_ns": r.per_cpu_ns,
                "ratio": r.ratio,
                "scaling": r.scaling,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Conntrack entries of the SYN flood case, all established before it.
const FLOOD_CT: u32 = 1 << 18;
/// Spoofed SYNs sent: twice conntrack.
const FLOOD_SYNS: u32 = 2 * FLOOD_CT;
/// Handshakes timed in flood mode (SYN, then the ACK that makes the entry).
const FLOOD_ACKS: u32 = 20_000;

struct FloodRow {
    /// SYN flood rate of the datapath (0: protection off).
    rate: u32,
    /// Net ns per flood SYN (median of the program minus the baseline's).
    syn_ns: u64,
    /// 1e9 / syn_ns: SYNs per second one CPU sustains.
    pps: u64,
    established_before: usize,
    established_after: usize,
    /// SYNs forwarded without state.
    stateless: u64,
    new_entries: u64,
    /// Net ns of a handshake's ACK: conntrack miss, Maglev, insert and ring
    /// record (protection on) or a conntrack hit (off).
    ack_ns: u64,
    /// Handshake ACKs that made their entry (flood mode).
    handshakes: u64,
}

struct Flood {
    rows: Vec<FloodRow>,
}

fn syn_flood(nop: &Nop, ifindex: u32) -> Result<Flood> {
    use datapath_ebpf::abi::{CtKey, CtVal, IPPROTO_TCP};
    pin_to(0);
    let vip: std::net::IpAddr = "10.200.0.1".parse().expect("static");
    let now = datapath_ebpf::maps::monotonic_now().as_nanos() as u64;
    let established: Vec<(CtKey, CtVal)> = (0..FLOOD_CT)
        .map(|i| {
            let client = std::net::Ipv4Addr::from(0x0a00_0000u32 + i); // 10.0.0.0/8
            (
                CtKey::new(client.into(), 40000, vip, 80, IPPROTO_TCP),
                CtVal {
                    backend_id: 1,
                    flags: 0,
                    origin: 0,
                    created_ns: now,
                    last_seen_ns: now,
                    ..Default::default()
                },
            )
        })
        .collect();
    let syn = |base: u32, i: u32, flags: u8| {
        Packet::tcp(
            &std::net::Ipv4Addr::from(base + i).to_string(),
            2000,
            "10.200.0.1",
            80,
            flags,
        )
        .frame()
    };
    let flood: Vec<Vec<u8>> = (0..FLOOD_SYNS)
        .map(|i| syn(0x6440_0000, i, TCP_SYN))
        .collect();
    // Both datapaths side by side, each SYN sent to one then the other, so
    // the machine's drift hits both alike.
    let rates = [0u32, DatapathOptions::default().syn_flood_rate];
    let mut dps = Vec::new();
    for rate in rates {
        let mut dp = Datapath::load(DatapathOptions {
            max_services: 8,
            conntrack_size: FLOOD_CT,
            ring_bytes: 1 << 24,
            syn_flood_rate: rate,
            ..Default::default()
        })?;
        dp.apply(&config())?;
        let events = dp.take_flow_events()?;
        if dp.ct_insert_batch(&established)? != established.len() {
            bail!("filling conntrack failed");
        }
        dps.push((dp, events));
    }
    let mut sink = Vec::new();
    let mut run = |dps: &mut Vec<(Datapath, datapath_ebpf::events::FlowEvents)>,
                   frames: &[Vec<u8>],
                   timed: &dyn Fn(usize) -> bool|
     -> Result<Vec<(Vec<u64>, Vec<u64>)>> {
        let mut out = vec![(Vec::new(), Vec::new()); dps.len()];
        for (i, f) in frames.iter().enumerate() {
            for (d, (dp, _)) in dps.iter().enumerate() {
                let r = testrun::run(dp.program(), f, ifindex)?;
                if r.verdict != XDP_TX {
                    bail!("SYN flood case: verdict {}", r.verdict);
                }
                if timed(i) {
                    out[d].0.push(r.duration.as_nanos() as u64);
                    if out[d].0.len() % 4 == 1 {
                        let b = testrun::run(nop.program(), f, ifindex)?;
                        out[d].1.push(b.duration.as_nanos() as u64);
                    }
                }
            }
            if i % 4096 == 4095 {
                for (_, ev) in dps.iter_mut() {
                    ev.drain(&mut sink, usize::MAX);
                    sink.clear();
                }
            }
        }
        Ok(out)
    };
    let mut syn_t = run(&mut dps, &flood, &|_| true)?;
    let mut after = Vec::new();
    for (dp, _) in &dps {
        let kept = established
            .iter()
            .filter(|(k, _)| matches!(dp.ct_get(k), Ok(Some(_))))
            .count();
        let st = dp.stats()?;
        after.push((kept, st.c[stat::SYN_FLOOD], st.c[stat::NEW_FLOWS]));
    }
    // Handshakes completing while the flood goes on: SYN, then its ACK
    // (timed), interleaved with flood SYNs (the counting loop above paused
    // the flood for longer than a window). With the protection the SYN makes
    // no state and the ACK makes the entry; without, the ACK is a conntrack
    // hit.
    let mut hs = Vec::with_capacity(FLOOD_ACKS as usize * 4);
    for i in 0..FLOOD_ACKS {
        hs.push(syn(0x64c0_0000, 2 * i, TCP_SYN));
        hs.push(syn(0x64c0_0000, 2 * i + 1, TCP_SYN));
        hs.push(syn(0x6480_0000, i, TCP_SYN));
        hs.push(syn(0x6480_0000, i, TCP_ACK));
    }
    let handshakes_before: Vec<u64> = dps
        .iter()
        .map(|(dp, _)| dp.stats().map(|s| s.c[stat::FLOOD_HANDSHAKE]))
        .collect::<datapath_ebpf::Result<_>>()?;
    let mut ack_t = run(&mut dps, &hs, &|i| i % 4 == 3)?;
    let mut rows = Vec::new();
    for (d, (dp, _)) in dps.iter().enumerate() {
        let st = dp.stats()?;
        if st.c[stat::MIDFLOW_MISS] != 0 {
            bail!("{} handshake ACKs found no state", st.c[stat::MIDFLOW_MISS]);
        }
        if st.c[stat::RING_LOST] != 0 {
            bail!(
                "{} ring events lost in the SYN flood case",
                st.c[stat::RING_LOST]
            );
        }
        let syn_ns = median(&mut syn_t[d].0).saturating_sub(median(&mut syn_t[d].1));
        rows.push(FloodRow {
            rate: rates[d],
            syn_ns,
            pps: 1_000_000_000 / syn_ns.max(1),
            established_before: established.len(),
            established_after: after[d].0,
            stateless: after[d].1,
            new_entries: after[d].2,
            ack_ns: median(&mut ack_t[d].0).saturating_sub(median(&mut ack_t[d].1)),
            handshakes: st.c[stat::FLOOD_HANDSHAKE] - handshakes_before[d],
        });
    }
    Ok(Flood { rows })
}

impl Flood {
    fn print(&self) {
        println!(
            "SYN flood on one CPU: conntrack of {FLOOD_CT} entries full of established flows, \
             {FLOOD_SYNS} spoofed SYNs, then {FLOOD_ACKS} handshakes:"
        );
        for r in &self.rows {
            let what = if r.rate == 0 {
                "protection off".to_string()
            } else {
                format!("protection on ({}/s per CPU)", r.rate)
            };
            println!(
                "  {what:<34} SYN {:>4} ns ({:>8} SYN/s), established kept {:>6} of {} \
                 ({} SYNs without state, {} entered), handshake ACK {} ns ({} in flood mode)",
                r.syn_ns,
                r.pps,
                r.established_after,
                r.established_before,
                r.stateless,
                r.new_entries,
                r.ack_ns,
                r.handshakes
            );
        }
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "conntrack_entries": FLOOD_CT,
            "flood_syns": FLOOD_SYNS,
            "handshakes": FLOOD_ACKS,
            "rows": self.rows.iter().map(|r| serde_json::json!({
                "syn_flood_rate": r.rate,
                "syn_ns": r.syn_ns,
                "syn_per_s": r.pps,
                "established_before": r.established_before,
                "established_after": r.established_after,
                "syn_without_state": r.stateless,
                "new_entries": r.new_entries,
                "handshake_ack_ns": r.ack_ns,
                "flood_handshakes": r.handshakes,
            })).collect::<Vec<_>>(),
        })
    }
}
