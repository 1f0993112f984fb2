//! t01: three nodes bootstrap into one cluster over QUIC with mutual TLS:
//! exactly one leader that every node agrees on, three voters, three
//! registered members; committed config reaches every node's datapath (same
//! applied epoch, the service's Maglev table present in each). clusterctl
//! `members -o json` shows exactly one leader and equal applied epochs.

use std::{collections::HashSet, time::Duration};

use datapath_ebpf::abi::{SvcKey, IPPROTO_TCP};
use holdfast_api::wire::MemberRow;
use holdfast_node::testing::{backend, service, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t01_three_nodes_bootstrap_and_program_their_datapaths() {
    let c = Cluster::start(3).await;
    let leader = c.wait_leader(Duration::from_secs(5)).await;
    assert!((1..=3).contains(&leader));
    c.wait_members(HashSet::from([1, 2, 3]), Duration::from_secs(5))
        .await;

    assert!(c
        .write(service("web", "10.200.0.1", 80))
        .await
        .rejected
        .is_none());
    for a in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
        assert!(c.write(backend("web", a, 80)).await.rejected.is_none());
    }
    let epoch = c.wait_converged(Duration::from_secs(5)).await;
    assert!(epoch >= 4, "epoch {epoch}");
    let key = SvcKey::new("10.200.0.1".parse().expect("vip"), 80, IPPROTO_TCP);
    for n in c.nodes.values() {
        let dp = n.datapath.as_ref().expect("datapath enabled");
        let dp = dp.dp.lock().expect("dp");
        let table = dp.table(&key).expect("read").expect("service programmed");
        assert_eq!(table.len(), 251);
        let ids: HashSet<u32> = table.into_iter().collect();
        assert_eq!(
            ids.len(),
            3,
            "node {}: all three backends in the table",
            n.id()
        );
        assert_eq!(dp.applied_epoch().expect("epoch"), epoch);
    }

    // /metrics of the leader, in Prometheus text format, from the plain
    // listener and (the same families) from the admin API with a viewer
    // certificate.
    let lead = c.node(leader).cfg.metrics_addr.to_string();
    let lead_admin = c.node(leader).cfg.admin_addr.to_string();
    let viewer = c.client_as(holdfast_api::auth::Role::Viewer);
    let (text, over_tls) = tokio::task::spawn_blocking(move || {
        let (status, text) =
            holdfast_api::client::get_plain(&lead, "/metrics", Duration::from_secs(5))
                .expect("GET /metrics");
        assert_eq!(status, 200, "{text}");
        let tls = viewer
            .get_text(&lead_admin, "/metrics", Duration::from_secs(5))
            .expect("GET /metrics over mTLS");
        (text, tls)
    })
    .await
    .expect("join");
    assert!(over_tls.contains("holdfast_raft_role{role=\"leader\"} 1"));
    for want in [
        "holdfast_raft_role{role=\"leader\"} 1",
        &format!("holdfast_datapath_applied_epoch {epoch}"),
        "# TYPE holdfast_raft_commit_latency_seconds histogram",
        "holdfast_service_packets_total{service=\"web\"} 0",
        "holdfast_datapath_midflow_miss_total 0",
    ] {
        assert!(text.contains(want), "/metrics lacks {want:?}:\n{text}");
    }

    // clusterctl, as an operator runs it.
    let admin = c.node(2).cfg.admin_addr.to_string();
    let pki = c.pki.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(holdfast_node::testing::workspace_bin(
            "clusterctl",
            "clusterctl",
        ))
        .args(["--node", &admin, "members", "-o", "json"])
        .arg("--ca")
        .arg(pki.join("ca.pem"))
        .arg("--cert")
        .arg(pki.join("client-viewer.pem"))
        .arg("--key")
        .arg(pki.join("client-viewer.key"))
        .output()
        .expect("run clusterctl")
    })
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "clusterctl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<MemberRow> = serde_json::from_slice(&out.stdout).expect("members JSON");
    assert_eq!(rows.len(), 3);
    assert_eq!(
        rows.iter()
            .filter(|r| r.role.as_deref() == Some("leader"))
            .count(),
        1
    );
    assert!(
        rows.iter()
            .all(|r| r.reachable && r.applied_epoch == Some(epoch)),
        "{rows:?}"
    );
    assert!(rows.iter().all(|r| r.datapath_attached == Some(false)));
}
