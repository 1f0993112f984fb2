//! `sync-bench --apply`: the receiver's CPU per applied entry — the
//! in-kernel batch (`Conntrack::apply`: the datapath's apply program, one
//! BPF_PROG_TEST_RUN per 48 entries, the merge rule in the kernel) beside
//! the previous code's per-entry syscalls (a BPF_MAP_UPDATE_ELEM with
//! BPF_NOEXIST per entry; for an existing one also a lookup, the merge in
//! userspace and a write), side by side in one run, on one thread, each on
//! a datapath of its own. Two loads: new flows into an empty map, then the
//! same flows again with a later last_seen (refreshes: merged in place).
//! Thread CPU time (user + system) per entry, median of the rounds.
//!
//! Then the share walk of divergent replication: a map of `--walk-entries`
//! own, unshared entries of one service over 20 backends; a 21st backend
//! is prepared (`Datapath::prepare`) and the walk (`Conntrack::share`, one
//! `bpf_for_each_map_elem` in the kernel) finds and announces the entries
//! the next table moves: their count (the burst a change sends to each
//! peer), the walk's time, and the ring records read back.

use std::time::Instant;

use anyhow::{Context, Result};
use datapath_ebpf::{
    abi::{CtKey, CtVal, CT_F_CLOSING, FAMILY_V4},
    conntrack::Conntrack,
    Datapath, DatapathOptions,
};
use serde::Serialize;

pub struct Args {
    pub entries: usize,
    pub rounds: usize,
    pub walk_entries: usize,
    pub json: bool,
}

#[derive(Serialize)]
struct Walk {
    entries: usize,
    backends_before: u32,
    backends_after: u32,
    visited: u64,
    shared: u64,
    shared_share: f64,
    ring_records: usize,
    walk_ms: f64,
    walk_cpu_ms: f64,
    prepare_ms: f64,
}

fn service(backends: u32) -> datapath_ebpf::DatapathConfig {
    use datapath_ebpf::{BackendSpec, BackendState, Proto, ServiceSpec};
    datapath_ebpf::DatapathConfig {
        epoch: u64::from(backends),
        services: vec![ServiceSpec {
            source_ranges: Vec::new(),
            affinity_timeout_s: None,
            vip: "10.200.0.1".parse().expect("static"),
            port: 53,
            proto: Proto::Udp,
            table_size: 65_537,
            backends: (1..=backends)
                .map(|i| BackendSpec {
                    id: i,
                    addr: format!("10.99.{}.{}", i / 200, 10 + i % 200)
                        .parse()
                        .expect("static"),
                    weight: 1,
                    state: BackendState::Active,
                    port: 0,
                })
                .collect(),
            forwarding: Default::default(),
        }],
        snat: Default::default(),
    }
}

/// The share walk at `n` entries: 20 backends, then a 21st prepared.
fn walk(n: usize) -> Result<Walk> {
    let mut dp = Datapath::load(DatapathOptions {
        conntrack_size: (n + n / 4).max(4096) as u32,
        ring_bytes: 1 << 26,
        node_id: 1,
        divergent: true,
        ..Default::default()
    })?;
    dp.apply(&service(20))?;
    let key = datapath_ebpf::abi::SvcKey::new("10.200.0.1".parse()?, 53, 17);
    let table = dp.table(&key)?.context("the service's table")?;
    let seed = dp.options().hash_seed;
    let mut es = entries(n, 0);
    for (k, v) in es.iter_mut() {
        // Own entries, made by this table: what the datapath writes for a
        // divergent service at steady state.
        v.origin = 1;
        v.backend_id =
            table[(datapath_ebpf::hash::flow_hash(k, seed) % table.len() as u32) as usize];
    }
    for c in es.chunks(65_536) {
        dp.ct_insert_batch(c)?;
    }
    let mut events = dp.take_flow_events()?;
    let t = Instant::now();
    dp.prepare(&service(21))?;
    let prepare_ms = t.elapsed().as_secs_f64() * 1e3;
    let ct = dp.conntrack();
    let (c0, w0) = (thread_cpu_s(), Instant::now());
    let r = ct.share()?;
    let (walk_cpu_ms, walk_ms) = (
        (thread_cpu_s() - c0) * 1e3,
        w0.elapsed().as_secs_f64() * 1e3,
    );
    anyhow::ensure!(
        r.ring_full == 0,
        "the ring had no room for {} records",
        r.ring_full
    );
    let mut got = Vec::new();
    events.drain(&mut got, usize::MAX);
    Ok(Walk {
        entries: n,
        backends_before: 20,
        backends_after: 21,
        visited: r.visited,
        shared: r.shared,
        shared_share: r.shared as f64 / n as f64,
        ring_records: got.len(),
        walk_ms,
        walk_cpu_ms,
        prepare_ms,
    })
}

#[derive(Serialize)]
struct Row {
    load: &'static str,
    path: &'static str,
    entries: usize,
    cpu_us_per_entry: f64,
    entries_per_core_s: f64,
    wall_s: f64,
}

fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

fn entries(n: usize, last: u64) -> Vec<(CtKey, CtVal)> {
    (0..n)
        .map(|i| {
            let mut saddr = [0u8; 16];
            saddr[..4].copy_from_slice(&[10, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
            let mut daddr = [0u8; 16];
            daddr[..4].copy_from_slice(&[10, 200, 0, 1]);
            let k = CtKey {
                saddr,
                daddr,
                sport: (1024 + (i % 50_000) as u16).to_be(),
                dport: 53u16.to_be(),
                proto: 17,
                family: FAMILY_V4,
                pad: 0,
            };
            let v = CtVal {
                backend_id: 1 + (i % 20) as u32,
                origin: 2,
                created_ns: 1_000 + i as u64,
                last_seen_ns: 1_000 + i as u64 + last,
                ..Default::default()
            };
            (k, v)
        })
        .collect()
}

/// The previous code's apply (sync's apply_remote before the apply
/// program), kept here as the baseline: a syscall per new entry, three
/// for an existing one.
fn per_entry_syscalls(ct: &Conntrack, entries: &[(CtKey, CtVal)]) -> Result<()> {
    let mut rest = entries;
    while !rest.is_empty() {
        let (_, existing) = ct.insert_new(rest)?;
        let Some(i) = existing else { break };
        let (k, v) = rest[i];
        if let Some(l) = ct.get(&k)? {
            if l.backend_id == v.backend_id {
                let mut m = l;
                m.last_seen_ns = m.last_seen_ns.max(v.last_seen_ns);
                m.flags |= v.flags & CT_F_CLOSING;
                if m != l {
                    ct.insert_batch(&[(k, m)])?;
                }
            } else if (v.created_ns, std::cmp::Reverse(v.origin))
                > (l.created_ns, std::cmp::Reverse(l.origin))
            {
                ct.insert_batch(&[(k, v)])?;
            }
        }
        rest = &rest[i + 1..];
    }
    Ok(())
}

/// Batches as replication hands them over (a QUIC datagram's worth).
const BATCH: usize = 256;

fn measure(
    path: &'static str,
    n: usize,
    apply: impl Fn(&Conntrack, &[(CtKey, CtVal)]) -> Result<()>,
) -> Result<[(f64, f64); 2]> {
    let dp = Datapath::load(DatapathOptions {
        conntrack_size: (2 * n).max(4096) as u32,
        node_id: 1,
        ..Default::default()
    })?;
    let ct = dp.conntrack();
    let mut out = [(0.0, 0.0); 2];
    for (slot, last) in [(0usize, 0u64), (1, 500)] {
        let es = entries(n, last);
        let (c0, w0) = (thread_cpu_s(), Instant::now());
        for b in es.chunks(BATCH) {
            apply(&ct, b)?;
        }
        out[slot] = (thread_cpu_s() - c0, w0.elapsed().as_secs_f64());
        let probe = es[n / 2];
        let got = ct.get(&probe.0)?.map(|v| v.last_seen_ns);
        anyhow::ensure!(
            got == Some(probe.1.last_seen_ns),
            "{path}: entry not applied (found last_seen {got:?})"
        );
    }
    Ok(out)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(a: Args) -> Result<()> {
    let n = a.entries;
    let mut kernel: Vec<[(f64, f64); 2]> = Vec::new();
    let mut syscalls: Vec<[(f64, f64); 2]> = Vec::new();
    for round in 0..a.rounds {
        // Alternate which goes first.
        if round % 2 == 0 {
            kernel.push(measure("kernel", n, |ct, b| {
                Ok(ct.apply(b).map(|_| ())?)
            })?);
            syscalls.push(measure("syscalls", n, per_entry_syscalls)?);
        } else {
            syscalls.push(measure("syscalls", n, per_entry_syscalls)?);
            kernel.push(measure("kernel", n, |ct, b| {
                Ok(ct.apply(b).map(|_| ())?)
            })?);
        }
    }
    let mut rows = Vec::new();
    for (slot, load) in [(0, "new"), (1, "refresh")] {
        for (path, runs) in [("per_entry_syscalls", &syscalls), ("kernel_batch", &kernel)] {
            let cpu = median(runs.iter().map(|r| r[slot].0).collect());
            let wall = median(runs.iter().map(|r| r[slot].1).collect());
            rows.push(Row {
                load,
                path,
                entries: n,
                cpu_us_per_entry: cpu / n as f64 * 1e6,
                entries_per_core_s: n as f64 / cpu,
                wall_s: wall,
            });
        }
    }
    let w = walk(a.walk_entries)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "apply": rows, "share_walk": w }))?
        );
    } else {
        println!(
            "applying {n} peer entries in batches of {BATCH}, one thread, median of {} rounds:",
            a.rounds
        );
        for r in &rows {
            println!(
                "  {:<8} {:<19} {:>6.3} µs CPU/entry = {:>9.0} entries per core-second ({:.2} s wall)",
                r.load, r.path, r.cpu_us_per_entry, r.entries_per_core_s, r.wall_s
            );
        }
        println!(
            "share walk: {} own entries, {} -> {} backends: {} moved ({:.1}%) shared and on the ring ({} records) in {:.1} ms ({:.1} ms CPU); prepare {:.1} ms",
            w.entries,
            w.backends_before,
            w.backends_after,
            w.shared,
            w.shared_share * 100.0,
            w.ring_records,
            w.walk_ms,
            w.walk_cpu_ms,
            w.prepare_ms
        );
    }
    Ok(())
}
