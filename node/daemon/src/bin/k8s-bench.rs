//! k8s-bench: time from an EndpointSlice change to every node's datapath
//! updated, for a burst of 1000 endpoint changes across 100 Services.
//!
//! `cargo run --release -p node --bin k8s-bench [-- --json]` (root: every
//! node loads a real BPF datapath). A 3-node cluster runs the controller
//! against the in-repo test API server (HTTPS, watch); 100 LoadBalancer
//! Services with 5 endpoints each are created and converged; then 1000
//! changes (each adds one endpoint to one Service's EndpointSlice, round
//! robin) are written as fast as the API server takes them. A change is
//! done when every node's datapath runs a config epoch that contains the
//! new backend. Prints p50/p99/max and how many Raft entries the burst
//! became; `--json` prints one JSON object (p50_ms, p99_ms, ...).

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use holdfast_k8s::{
    testapi::{Kind, TestApi},
    K8sSection,
};
use holdfast_node::testing::Cluster;
use raft_store::{cluster::VipPool, Command};
use serde_json::json;

const SERVICES: usize = 100;
const CHANGES: usize = 1000;
const INITIAL: usize = 5;

fn svc(i: usize) -> serde_json::Value {
    json!({
        "metadata": {"name": format!("svc{i:03}"), "namespace": "bench"},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": "holdfast.io/l4",
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
    })
}

fn addr(i: usize, k: usize) -> String {
    format!("10.{}.{}.{}", 100 + i / 100, i % 100, k + 1)
}

fn slice(i: usize, n: usize) -> serde_json::Value {
    json!({
        "metadata": {"name": format!("svc{i:03}-1"), "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": format!("svc{i:03}")}},
        "addressType": "IPv4",
        "endpoints": (0..n).map(|k| json!({"addresses": [addr(i, k)],
            "conditions": {"ready": true}})).collect::<Vec<_>>(),
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
    })
}

fn pct(v: &[f64], p: f64) -> f64 {
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() -> Result<()> {
    let mut json_out = false;
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "--json" => json_out = true,
            "-h" | "--help" => {
                println!("usage: k8s-bench [--json]   (root: three nodes with BPF datapaths and a test API server)");
                return Ok(());
            }
            other => bail!("unknown argument {other:?} (--json)"),
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("k8s-bench loads a BPF datapath per node: run as root");
    }
    let api = TestApi::start().await?;
    let dir = tempfile::tempdir()?;
    let k = K8sSection {
        debounce_ms: 5,
        ..api.k8s_section(dir.path())?
    };
    let c = Cluster::start_sized(3, Default::default(), true, k, 128).await;
    let r = c
        .write(Command::PutVipPool {
            pool: VipPool {
                name: "bench".into(),
                cidr: "10.230.0.0/24".into(),
                ..Default::default()
            },
        })
        .await;
    if let Some(why) = r.rejected {
        bail!("pool: {why}");
    }
    for i in 0..SERVICES {
        api.apply(Kind::Service, svc(i));
        api.apply(Kind::EndpointSlice, slice(i, INITIAL));
    }
    // Converged: every service with its endpoints on every node's datapath.
    let t0 = Instant::now();
    loop {
        let ok = c.nodes.values().all(|n| {
            let cur = n.sm.current();
            n.applied_epoch.load(Ordering::Relaxed) == cur.state.epoch
                && cur.state.backends.len() == SERVICES * INITIAL
        });
        if ok {
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("the 100 services did not converge in 60 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let epoch0 = c
        .nodes
        .values()
        .next()
        .expect("node")
        .sm
        .current()
        .state
        .epoch;

    // The burst: change k adds endpoint INITIAL + k/SERVICES to service k % SERVICES.
    let mut sent: HashMap<IpAddr, (usize, Instant)> = HashMap::new();
    let mut done: Vec<f64> = Vec::with_capacity(CHANGES);
    let mut counts = vec![INITIAL; SERVICES];
    let nodes: Vec<_> = c.nodes.values().cloned().collect();
    let burst = Instant::now();
    for kk in 0..CHANGES {
        let i = kk % SERVICES;
        counts[i] += 1;
        api.apply(Kind::EndpointSlice, slice(i, counts[i]));
        let a: IpAddr = addr(i, counts[i] - 1).parse()?;
        sent.insert(a, (kk, Instant::now()));
    }
    let written = burst.elapsed();
    // Watch every node until each change is in all datapaths.
    let mut pending: BTreeSet<IpAddr> = sent.keys().copied().collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !pending.is_empty() {
        let now = Instant::now();
        let mut present: Option<BTreeSet<IpAddr>> = None;
        for n in &nodes {
            // The state is shared (Arc), not copied: the poller must not eat
            // the CPU the nodes need.
            let cur = n.sm.current();
            let s = &cur.state;
            // Only what the datapath runs counts.
            let set: BTreeSet<IpAddr> = if n.applied_epoch.load(Ordering::Relaxed) >= s.epoch {
                s.backends.values().map(|b| b.addr).collect()
            } else {
                BTreeSet::new()
            };
            present = Some(match present {
                None => set,
                Some(p) => p.intersection(&set).copied().collect(),
            });
        }
        let present = present.unwrap_or_default();
        pending.retain(|a| {
            if present.contains(a) {
                done.push(now.duration_since(sent[a].1).as_secs_f64() * 1e3);
                false
            } else {
                true
            }
        });
        if Instant::now() > deadline {
            bail!("{} changes never reached every datapath", pending.len());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let entries = nodes[0].sm.current().state.epoch - epoch0;
    done.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let (p50, p99, max) = (pct(&done, 0.5), pct(&done, 0.99), done[done.len() - 1]);
    if json_out {
        println!(
            "{}",
            json!({"p50_ms": p50, "p99_ms": p99, "max_ms": max, "changes": CHANGES,
                   "services": SERVICES, "nodes": 3, "raft_entries": entries,
                   "burst_written_ms": written.as_secs_f64() * 1e3})
        );
    } else {
        println!(
            "k8s-bench: {CHANGES} EndpointSlice changes over {SERVICES} Services, 3 nodes\n  \
             written to the API server in {:.1} ms; committed as {entries} Raft entries\n  \
             change -> every node's datapath updated  p50 {p50:.1} ms  p99 {p99:.1} ms  max {max:.1} ms",
            written.as_secs_f64() * 1e3
        );
    }
    Ok(())
}
