//! datapath-demo: the Holdfast datapath in network namespaces, end to end.
//!
//! Brings up a client, one LB node running the XDP load balancer and N
//! backends (decap + TCP echo + UDP request/response), then walks through
//! what an operator cares about, checking every answer:
//!  1. long-lived TCP connections and UDP flows over IPv4 and IPv6, spread
//!     by Maglev, answered directly by the backends (DSR);
//!  2. a backend is drained: its connections continue, new ones avoid it;
//!  3. a backend is added: no established connection moves;
//!  4. the agent restarts: the pinned program keeps forwarding while no agent
//!     runs, and the new agent adopts conntrack — no connection breaks.
//!
//! `datapath-demo [--backends N] [--conns N]` (root). Everything it creates
//! is removed when it exits, also on error.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};
use chaos::dplab::{lab_config, lab_options, DpLab, TcpConn};
use datapath_ebpf::abi::{stat, STAT_NAMES};

fn args() -> Result<(usize, usize)> {
    let (mut backends, mut conns) = (4usize, 100usize);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut num = |name: &str| -> Result<usize> {
            it.next()
                .with_context(|| format!("{name} needs a number"))?
                .parse()
                .with_context(|| format!("{name} needs a number"))
        };
        match a.as_str() {
            "--backends" => backends = num("--backends")?,
            "--conns" => conns = num("--conns")?,
            "-h" | "--help" => {
                println!("usage: datapath-demo [--backends N (3..=9)] [--conns N (1..=1000)]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    ensure!((3..=9).contains(&backends), "--backends must be 3..=9");
    ensure!((1..=1000).contains(&conns), "--conns must be 1..=1000");
    Ok((backends, conns))
}

/// Exchange once on every connection; every one must answer from its backend.
fn check_all(conns: &mut [TcpConn], pinned: &[usize], step: &str) -> Result<()> {
    let mut broken = 0;
    let mut moved = 0;
    for (i, c) in conns.iter_mut().enumerate() {
        match c.exchange(&format!("{step} {i}")) {
            Ok(be) if be == pinned[i] => {}
            Ok(_) => moved += 1,
            Err(_) => broken += 1,
        }
    }
    println!(
        "   {step:<44} {} connections: {} answered by their backend, {broken} broken, {moved} moved",
        conns.len(),
        conns.len() - broken - moved
    );
    ensure!(
        broken == 0 && moved == 0,
        "{step}: connections broke or moved"
    );
    Ok(())
}

fn spread(pinned: &[usize]) -> String {
    let mut m = BTreeMap::new();
    for b in pinned {
        *m.entry(*b).or_insert(0) += 1;
    }
    m.iter()
        .map(|(b, n)| format!("be{b}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn main() -> Result<()> {
    let (n, n_conns) = args()?;
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "run as root (network namespaces, BPF)"
    );
    let pin = std::path::PathBuf::from(format!("/sys/fs/bpf/holdfast-demo-{}", std::process::id()));
    println!("== Holdfast datapath demo: client -> LB (XDP, Maglev, conntrack, IPIP) -> {n} backends -> client (DSR)");
    let mut lab = DpLab::up("hfdemo", n).context("bringing the lab up")?;
    // The last backend joins in step 3.
    lab.start_datapath(lab_options(Some(pin.clone())), lab_config(1, n - 1, &[]))?;
    println!(
        "   namespaces: {} (client), {} (LB), {} (switch), {} backends",
        lab.client.name(),
        lab.lb.name(),
        lab.sw.name(),
        n
    );

    println!("1. {n_conns} long-lived TCP connections and {n_conns} UDP flows per address family");
    let mut all_conns = Vec::new();
    let mut all_pinned = Vec::new();
    for v6 in [false, true] {
        let fam = if v6 { "IPv6" } else { "IPv4" };
        let mut conns = lab.tcp_connect(n_conns, v6)?;
        let pinned = conns
            .iter_mut()
            .enumerate()
            .map(|(i, c)| c.exchange(&format!("hello {i}")))
            .collect::<Result<Vec<_>>>()?;
        println!("   {fam} TCP spread by Maglev: {}", spread(&pinned));
        let mut udp = Vec::new();
        for i in 0..n_conns {
            let f = lab.udp_socket(v6)?;
            let be = f.exchange(&format!("query {i}"))?;
            ensure!(f.exchange("again")? == be, "a UDP flow changed backend");
            udp.push(be);
        }
        println!(
            "   {fam} UDP spread by Maglev: {} (each flow answered twice by the same backend)",
            spread(&udp)
        );
        all_conns.extend(conns);
        all_pinned.extend(pinned);
    }

    println!("2. drain be1 (Kubernetes: endpoint terminating)");
    lab.dp()?.apply(&lab_config(2, n - 1, &[1]))?;
    check_all(
        &mut all_conns,
        &all_pinned,
        "established connections after the drain",
    )?;
    let fresh = lab.tcp_connect(20, false)?;
    let mut fresh_pinned = Vec::new();
    for (i, mut c) in fresh.into_iter().enumerate() {
        fresh_pinned.push(c.exchange(&format!("fresh {i}"))?);
    }
    ensure!(
        !fresh_pinned.contains(&1),
        "a new connection went to the draining backend"
    );
    println!(
        "   20 new connections: {} (none to be1)",
        spread(&fresh_pinned)
    );

    println!("3. scale out: be{n} joins, be1 active again (every Maglev table changes)");
    lab.dp()?.apply(&lab_config(3, n, &[]))?;
    check_all(
        &mut all_conns,
        &all_pinned,
        "established connections after scale-out",
    )?;
    let fresh = lab.tcp_connect(40, false)?;
    let mut fresh_pinned = Vec::new();
    for (i, mut c) in fresh.into_iter().enumerate() {
        fresh_pinned.push(c.exchange(&format!("scaled {i}"))?);
    }
    ensure!(
        fresh_pinned.contains(&n),
        "no new connection reached the new backend"
    );
    println!("   40 new connections: {}", spread(&fresh_pinned));

    println!(
        "4. restart the agent (program and maps pinned under {})",
        pin.display()
    );
    lab.kill_agent();
    check_all(&mut all_conns, &all_pinned, "while no agent runs")?;
    lab.start_datapath(lab_options(Some(pin.clone())), lab_config(4, n, &[]))?;
    let adopted = lab.dp()?.adopted();
    let entries = lab.dp()?.ct_dump()?.len();
    println!("   new agent adopted pinned maps: {adopted}, conntrack entries kept: {entries}");
    check_all(&mut all_conns, &all_pinned, "after the restart")?;

    let s = lab.dp()?.stats()?;
    println!("== datapath counters");
    for (name, i) in STAT_NAMES {
        if s.c[*i] != 0 {
            println!(
                "   {:<28} {}",
                name.trim_start_matches("LB_STAT_").to_lowercase(),
                s.c[*i]
            );
        }
    }
    let decap: Vec<String> = (1..=n)
        .map(|i| lab.decap_ok(i).map(|v| format!("be{i}: {v}")))
        .collect::<Result<_>>()?;
    println!("   decapsulated on backends: {}", decap.join(", "));
    ensure!(
        s.c[stat::MIDFLOW_MISS] == 0,
        "established flows lost their conntrack entries"
    );
    println!(
        "== all {} connections survived drain, scale-out and an agent restart",
        all_conns.len()
    );
    Ok(())
}
