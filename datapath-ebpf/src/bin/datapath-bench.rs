//! datapath-bench: ns/packet of the XDP load balancer, measured the way
//! Katran's perf tester does: many BPF_PROG_TEST_RUN calls with repeat=1 on
//! the original frame (the program rewrites frames, so repeat>1 would time
//! its own output), minus the cost of a trivial XDP program measured in the
//! same run, interleaved so that drift hits both alike.
//!
//! ```text
//! cargo run --release -p datapath-ebpf --bin datapath-bench [-- --json] [--iters N] [--pin DIR]
//! ```
//! `--pin DIR` leaves the configured program (DIR/prog) and its maps pinned
//! so an outside harness can run it side by side; remove DIR to clean up.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use datapath_ebpf::{
    abi::{stat, FlowEvent},
    packet::{Packet, TCP_ACK, TCP_SYN},
    testbed::TestNet,
    testrun::{self, Nop, XDP_PASS, XDP_TX},
    BackendSpec, BackendState, Datapath, DatapathConfig, DatapathOptions, Proto, ServiceSpec,
};

struct Args {
    json: bool,
    iters: usize,
    pin: Option<PathBuf>,
}

fn args() -> Result<Args> {
    let mut a = Args {
        json: false,
        iters: 20_000,
        pin: None,
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
            "--pin" => a.pin = Some(it.next().context("--pin needs a directory")?.into()),
            "-h" | "--help" => {
                println!("usage: datapath-bench [--json] [--iters N] [--pin DIR]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    Ok(a)
}

fn config() -> DatapathConfig {
    let be = |id: u32, addr: &str| BackendSpec {
        id,
        addr: addr.parse().expect("static"),
        weight: 1,
        state: BackendState::Active,
    };
    DatapathConfig {
        epoch: 1,
        services: vec![
            ServiceSpec {
                vip: "10.200.0.1".parse().expect("static"),
                port: 80,
                proto: Proto::Tcp,
                table_size: 65_537,
                backends: vec![
                    be(1, "10.99.0.11"),
                    be(2, "10.99.0.12"),
                    be(3, "10.99.0.13"),
                ],
            },
            ServiceSpec {
                vip: "fd00:200::1".parse().expect("static"),
                port: 80,
                proto: Proto::Tcp,
                table_size: 65_537,
                backends: vec![
                    be(4, "fd00:99::11"),
                    be(5, "fd00:99::12"),
                    be(6, "fd00:99::13"),
                ],
            },
        ],
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

fn main() -> Result<()> {
    let args = args()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("datapath-bench loads BPF programs and creates a network namespace: run as root");
    }
    let net = TestNet::new("hfbench").context("creating the bench namespace")?;
    let _guard = net.enter()?;
    if let Some(dir) = &args.pin {
        datapath_ebpf::loader::ensure_bpffs_dir(dir)?;
    }
    let mut dp = Datapath::load(DatapathOptions {
        max_services: 8,
        conntrack_size: 1 << 20,
        pin_dir: args.pin.clone(),
        ..Default::default()
    })?;
    dp.apply(&config())?;
    let mut events = dp.take_flow_events()?;
    let nop = Nop::load()?;
    let ifindex = net.ifindex;

    let ct_hit = Packet::tcp("192.0.2.10", 40000, "10.200.0.1", 80, TCP_ACK).frame();
    let ct_hit_v6 = Packet::tcp("2001:db8::10", 40000, "fd00:200::1", 80, TCP_ACK).frame();
    let pass = Packet::tcp("192.0.2.10", 40000, "198.51.100.1", 80, TCP_SYN).frame();
    // Open the two flows first so their packets are conntrack hits.
    for f in [
        Packet::tcp("192.0.2.10", 40000, "10.200.0.1", 80, TCP_SYN).frame(),
        Packet::tcp("2001:db8::10", 40000, "fd00:200::1", 80, TCP_SYN).frame(),
    ] {
        let r = testrun::run(dp.program(), &f, ifindex)?;
        if r.verdict != XDP_TX {
            bail!("priming SYN got verdict {} instead of TX", r.verdict);
        }
    }
    // Distinct new flows: one client address per iteration.
    let new_flows: Vec<Vec<u8>> = (0..args.iters as u32)
        .map(|i| {
            let c = 0x6440_0000u32 + i; // 100.64.0.0/10
            let src = std::net::Ipv4Addr::from(c).to_string();
            Packet::tcp(&src, 12345, "10.200.0.1", 80, TCP_SYN).frame()
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
                _ => &ct_hit_v6,
            };
            let r = testrun::run(dp.program(), frame, ifindex)?;
            let want = if ci == 2 { XDP_PASS } else { XDP_TX };
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
        }
    }
    let st = dp.stats()?;
    if st.c[stat::RING_LOST] != 0 {
        bail!(
            "{} ring-buffer events lost: the bench must drain faster",
            st.c[stat::RING_LOST]
        );
    }

    let mut results = Vec::new();
    for c in &mut cases {
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
        if let Some(dir) = &args.pin {
            println!("program and maps left pinned under {}", dir.display());
        }
    }
    // With --pin, dropping the datapath keeps its pinned maps (and program).
    drop(dp);
    Ok(())
}
