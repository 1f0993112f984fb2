//! `chaos load-dns`: a DNS-like load through the lab — one UDP query per
//! new source port, as recursive resolvers send them, at a fixed rate to
//! the lab's UDP service — and the CPU the LB nodes' holdfast-node
//! processes spend on it above idle (from /proc: user + system time of
//! every thread), in the replication mode asked for. Every query is one
//! new flow through the tier.

use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::lab::{self, Lab};

#[derive(Serialize)]
pub struct DnsLoad {
    pub mode: String,
    pub nodes: usize,
    pub rate_per_s: u32,
    pub secs: u64,
    pub queries: u64,
    pub answered: u64,
    /// Queries answered per second over the load window.
    pub answered_per_s: f64,
    /// The node processes' CPU (cores, all nodes together): idle, under
    /// the load, and the difference.
    pub idle_cores: f64,
    pub load_cores: f64,
    pub above_idle_cores: f64,
    /// CPU µs of the node processes per query above idle.
    pub us_per_query: f64,
    /// Entries the nodes sent to their peers during the load.
    pub entries_sent: u64,
}

/// User + system seconds of process `pid` (all its threads).
fn cpu_s(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces) end with ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 here.
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

fn nodes_cpu(pids: &[u32]) -> Result<f64> {
    pids.iter().map(|p| cpu_s(*p)).sum()
}

fn entries_sent(lab: &Lab) -> Result<u64> {
    let mut n = 0;
    for i in lab.running() {
        let st = lab.status(i)?;
        n += st
            .sync
            .map(|s| s.peers.iter().map(|p| p.sent).sum::<u64>())
            .unwrap_or(0);
    }
    Ok(n)
}

/// Send `rate` queries a second for `secs` from the lab's client, each from
/// a fresh socket (a new source port); returns (sent, answered).
fn queries(lab: &Lab, rate: u32, secs: u64) -> Result<(u64, u64)> {
    let target: SocketAddr = format!("{}:{}", lab::VIP, lab::UDP_PORT).parse()?;
    // This thread, in the client's namespace until the guard drops.
    let _g = lab.client.enter()?;
    let total = u64::from(rate) * secs;
    let gap = Duration::from_secs(1) / rate.max(1);
    let t0 = Instant::now();
    let (mut sent, mut answered) = (0u64, 0u64);
    let mut buf = [0u8; 512];
    while sent < total {
        let due = t0 + gap * sent as u32;
        if let Some(w) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(w);
        }
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_millis(50)))?;
        s.connect(target)?;
        let q = format!("query {sent}");
        s.send(q.as_bytes())?;
        sent += 1;
        if matches!(s.recv(&mut buf), Ok(n) if n > 0) {
            answered += 1;
        }
    }
    Ok((sent, answered))
}

pub fn run(lab: &Lab, mode: &str, rate: u32, secs: u64) -> Result<DnsLoad> {
    let pids = lab.node_pids();
    // Idle: the same window with the lab's own traffic only.
    let c0 = nodes_cpu(&pids)?;
    std::thread::sleep(Duration::from_secs(secs));
    let idle = (nodes_cpu(&pids)? - c0) / secs as f64;
    let e0 = entries_sent(lab)?;
    let (c1, t1) = (nodes_cpu(&pids)?, Instant::now());
    let (sent, answered) = queries(lab, rate, secs)?;
    let took = t1.elapsed().as_secs_f64();
    let load = (nodes_cpu(&pids)? - c1) / took;
    let above = (load - idle).max(0.0);
    Ok(DnsLoad {
        mode: mode.into(),
        nodes: pids.len(),
        rate_per_s: rate,
        secs,
        queries: sent,
        answered,
        answered_per_s: answered as f64 / took,
        idle_cores: idle,
        load_cores: load,
        above_idle_cores: above,
        us_per_query: above * took / sent.max(1) as f64 * 1e6,
        entries_sent: entries_sent(lab)? - e0,
    })
}
