//! The `holdfast-decap` agent: the backend-side half of DSR. Attaches the IPIP
//! decapsulation XDP program (`bpf/decap.bpf.c`) to the host's interfaces
//! and accepts tunnelled packets whose inner destination is a Holdfast VIP;
//! the kernel then delivers them locally (a VIP on lo, or kube-proxy's rules
//! for the Service's load-balancer IP) and the answer goes straight back to
//! the client. Other IPIP packets and all other traffic pass untouched.
//! A flow the LB sent to another port than the service's (the pods listen
//! on 8080 behind VIP:80) is recorded from the service port in its outer
//! header, and an egress program (TC) on the same interfaces turns its
//! answers' source port back, so the client sees VIP:80 answer.
//!
//! ```text
//! holdfast-decap --iface IF [--iface IF ...] --vip ADDR|CIDR [--vip ...]
//!                [--mode native|generic] [--ready-file PATH]
//! ```
//!
//! `--vip` takes addresses or CIDRs (the VIP pools; at most 65 536
//! addresses in all). Runs until SIGTERM or SIGINT, then detaches and prints
//! its counters. `--ready-file` is written once every interface is attached
//! (a Kubernetes readiness probe or a test waits for it) and removed on exit.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use datapath_ebpf::{decap::Decap, AttachMode};
use raft_store::cluster::parse_cidr;

/// The most VIP addresses the decap map is given.
const MAX_VIPS: u128 = 65_536;

struct Args {
    ifaces: Vec<String>,
    vips: BTreeSet<IpAddr>,
    mode: AttachMode,
    ready_file: Option<PathBuf>,
}

const USAGE: &str =
    "usage: holdfast-decap --iface IF [--iface IF ...] --vip ADDR|CIDR [--vip ...] \
                     [--mode native|generic] [--ready-file PATH]";

/// Every address of `s` (an address or a CIDR).
fn expand(s: &str) -> Result<Vec<IpAddr>> {
    let (net, len) = if s.contains('/') {
        parse_cidr(s).map_err(|e| anyhow!("--vip {s:?}: {e}"))?
    } else {
        let a: IpAddr = s
            .parse()
            .with_context(|| format!("--vip {s:?}: not an IP address or CIDR"))?;
        (a, if a.is_ipv4() { 32 } else { 128 })
    };
    let host_bits = if net.is_ipv4() { 32 } else { 128 } - u32::from(len);
    if host_bits > MAX_VIPS.ilog2() {
        bail!("--vip {s:?}: 2^{host_bits} addresses; at most {MAX_VIPS} in all");
    }
    let start: u128 = match net {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    };
    Ok((0..1u128 << host_bits)
        .map(|i| match net {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from((start + i) as u32)),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(start + i)),
        })
        .collect())
}

fn parse(args: impl IntoIterator<Item = String>) -> Result<Option<Args>> {
    let mut a = Args {
        ifaces: Vec::new(),
        vips: BTreeSet::new(),
        mode: AttachMode::Native,
        ready_file: None,
    };
    let mut it = args.into_iter().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--iface" => a.ifaces.push(value()?),
            "--vip" => {
                a.vips.extend(expand(&value()?)?);
                if a.vips.len() as u128 > MAX_VIPS {
                    bail!("more than {MAX_VIPS} VIP addresses in all");
                }
            }
            "--mode" => {
                a.mode = match value()?.as_str() {
                    "native" => AttachMode::Native,
                    "generic" => AttachMode::Generic,
                    m => bail!("--mode {m:?}: native or generic"),
                }
            }
            "--ready-file" => a.ready_file = Some(value()?.into()),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            f => bail!("unknown argument {f:?}\n{USAGE}"),
        }
    }
    if a.ifaces.is_empty() {
        bail!("no --iface given\n{USAGE}");
    }
    if a.vips.is_empty() {
        bail!("no --vip given\n{USAGE}");
    }
    Ok(Some(a))
}

/// Block SIGTERM and SIGINT in every thread and wait for one.
fn wait_for_signal() -> Result<i32> {
    // SAFETY: plain libc signal-set calls on a local, initialised sigset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            bail!("blocking SIGTERM/SIGINT failed");
        }
        let mut sig = 0;
        if libc::sigwait(&set, &mut sig) != 0 {
            bail!("sigwait failed");
        }
        Ok(sig)
    }
}

/// The agent; `args` as from `std::env::args()` (program name first).
/// Exit codes: 0 stopped by a signal (or `--help`), 2 bad arguments,
/// 1 anything else.
pub fn main_from(args: impl IntoIterator<Item = String>) -> ExitCode {
    let a = match parse(args) {
        Ok(Some(a)) => a,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("holdfast-decap: {e:#}");
            return ExitCode::from(2);
        }
    };
    match run(a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("holdfast-decap: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(a: Args) -> Result<()> {
    let mut d = Decap::load().context(
        "loading the decap program (needs root, or CAP_BPF + CAP_NET_ADMIN + CAP_SYS_ADMIN)",
    )?;
    for vip in &a.vips {
        d.add_vip(*vip)
            .with_context(|| format!("adding VIP {vip}"))?;
    }
    for ifname in &a.ifaces {
        d.attach(ifname, a.mode)
            .with_context(|| format!("attaching to {ifname}"))?;
    }
    eprintln!(
        "holdfast-decap: decapsulating IPIP for {} VIP address(es) on {}",
        a.vips.len(),
        a.ifaces.join(", ")
    );
    if let Some(f) = &a.ready_file {
        std::fs::write(f, "ready\n").with_context(|| format!("writing {}", f.display()))?;
    }
    let sig = wait_for_signal()?;
    let s = d.stats().context("reading counters")?;
    println!("{}", {
        use datapath_ebpf::abi::decap_stat as k;
        serde_json::json!({
            "signal": sig,
            "decapsulated": s.c[k::OK],
            "not_vip": s.c[k::NOT_VIP],
            "malformed": s.c[k::MALFORMED],
            "port_flows": s.c[k::PORT_FLOWS],
            "port_out": s.c[k::PORT_OUT],
        })
    });
    if let Some(f) = &a.ready_file {
        let _ = std::fs::remove_file(f);
    }
    drop(d); // detaches
    Ok(())
}
