//! config-bench: commit latency of config changes on a 3-node loopback
//! cluster over real QUIC (mutual TLS, redb fsync), and the time from commit
//! until every node's datapath has applied the change.
//!
//! ```text
//! cargo run --release -p node --bin config-bench [-- --json] [--changes N] [--via direct|leader|follower]
//! ```
//! Root (each node loads a real BPF datapath). Each change is submitted on
//! the leader and timed until committed and applied there (commit); then
//! until all three nodes report the new epoch programmed into their
//! datapaths (applied_all). `--via leader` submits through the leader's
//! admin API (HTTPS with an admin client certificate, a new TLS session
//! per call, as clusterctl does), `--via follower` through a follower's
//! (which forwards it to the leader's over a second TLS session);
//! `direct` (default) calls the leader's Raft write in process.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use holdfast_node::testing::{backend, service, Cluster};
use raft_store::Command;

fn pct(v: &mut [Duration], q: f64) -> f64 {
    v.sort_unstable();
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i].as_secs_f64() * 1e3
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let mut json = false;
    let mut changes = 500usize;
    let mut via = "direct".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => json = true,
            "--changes" => {
                changes = args
                    .next()
                    .context("--changes needs a number")?
                    .parse()
                    .context("--changes needs a number")?
            }
            "--via" => {
                via = args
                    .next()
                    .context("--via needs direct, leader or follower")?;
                if !["direct", "leader", "follower"].contains(&via.as_str()) {
                    bail!("--via {via:?}: use direct, leader or follower");
                }
            }
            "-h" | "--help" => {
                println!(
                    "usage: config-bench [--json] [--changes N] [--via direct|leader|follower]"
                );
                return Ok(());
            }
            other => bail!(
                "unknown argument {other:?} (--json, --changes N, --via direct|leader|follower)"
            ),
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("config-bench loads a BPF datapath per node: run as root");
    }
    holdfast_pki::install_crypto_provider();
    let c = Cluster::start(3).await;
    // A production-sized Maglev table: every change rebuilds and switches it.
    let mut svc = service("bench", "10.200.0.1", 80);
    if let Command::PutService { service } = &mut svc {
        service.table_size = 65_537;
    }
    c.write(svc).await;
    for i in 0..8 {
        c.write(backend("bench", &format!("10.0.0.{i}"), 80)).await;
    }
    c.wait_converged(Duration::from_secs(10)).await;
    let leader = c.wait_leader(Duration::from_secs(5)).await;
    let ln = c.node(leader).clone();
    let api_addr = match via.as_str() {
        "leader" => Some(ln.cfg.admin_addr.to_string()),
        "follower" => c
            .nodes
            .values()
            .find(|n| n.id() != leader)
            .map(|n| n.cfg.admin_addr.to_string()),
        _ => None,
    };
    let client = c.client();
    let mut watchers: Vec<_> = c.nodes.values().map(|n| n.applied_tx.subscribe()).collect();

    let mut commit = Vec::with_capacity(changes);
    let mut applied_all = Vec::with_capacity(changes);
    let ids: Vec<u32> = ln.sm.current().state.backends.keys().copied().collect();
    for i in 0..changes {
        let cmd = Command::SetBackendWeight {
            id: ids[i % ids.len()],
            weight: 1 + (i as u32 % 7),
        };
        let t0 = Instant::now();
        let r = match &api_addr {
            None => ln.write(cmd.into()).await.context("write")?,
            Some(a) => {
                let (cl, a) = (client.clone(), a.clone());
                tokio::task::spawn_blocking(move || {
                    cl.post::<_, raft_store::Response>(
                        &a,
                        "/command",
                        &raft_store::Request::from(cmd),
                        Duration::from_secs(5),
                    )
                })
                .await?
                .context("write through the admin API")?
            }
        };
        let committed = Instant::now();
        if r.rejected.is_some() {
            bail!("change {i} rejected: {:?}", r.rejected);
        }
        commit.push(committed - t0);
        for w in &mut watchers {
            while *w.borrow_and_update() < r.epoch {
                tokio::time::timeout(Duration::from_secs(5), w.changed())
                    .await
                    .context("a node did not apply within 5 s")??;
            }
        }
        applied_all.push(committed.elapsed());
    }
    let (c50, c99) = (pct(&mut commit, 0.5), pct(&mut commit, 0.99));
    let (a50, a99, amax) = (
        pct(&mut applied_all, 0.5),
        pct(&mut applied_all, 0.99),
        pct(&mut applied_all, 1.0),
    );
    if json {
        println!(
            "{}",
            serde_json::json!({
                "changes": changes,
                "via": via,
                "commit_p50_ms": c50,
                "commit_p99_ms": c99,
                "applied_all_p50_ms": a50,
                "applied_all_p99_ms": a99,
                "applied_all_max_ms": amax,
            })
        );
    } else {
        println!("3-node cluster on loopback (QUIC + mTLS, redb fsync), {changes} config changes via {via}, 65537-slot Maglev table:");
        println!(
            "  commit (leader: submit -> committed and applied)  p50 {c50:.2} ms  p99 {c99:.2} ms"
        );
        println!("  commit -> all 3 datapaths programmed             p50 {a50:.2} ms  p99 {a99:.2} ms  max {amax:.2} ms");
    }
    Ok(())
}
