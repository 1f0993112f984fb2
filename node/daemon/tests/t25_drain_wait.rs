//! t25: `clusterctl drain --wait` on a 3-node cluster with datapaths (no
//! interface attached; packets by BPF_PROG_TEST_RUN): the node is drained
//! at once; while its datapath still forwards VIP packets the wait goes on,
//! and it reports "it can be stopped" only after the packets stopped for
//! --quiet-ms; a node without a datapath is a clear error (exit 6).

use std::time::{Duration, Instant};

use holdfast_node::config::RaftTuning;
use holdfast_node::testing::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t25_drain_waits_until_the_traffic_stopped() {
    let c = Cluster::start_with(3, RaftTuning::default(), true).await;
    c.wait_converged(Duration::from_secs(10)).await;
    assert!(c
        .write(holdfast_node::testing::service("web", "10.200.0.1", 80))
        .await
        .rejected
        .is_none());
    assert!(c
        .write(holdfast_node::testing::backend("web", "10.99.0.11", 80))
        .await
        .rejected
        .is_none());
    c.wait_converged(Duration::from_secs(10)).await;

    // Traffic on the node for 1.5 s after the drain starts, then none.
    let id = *c.nodes.keys().next().expect("a node");
    let stop_at = Instant::now() + Duration::from_millis(1500);
    let (o, waited) = std::thread::scope(|sc| {
        sc.spawn(|| {
            let mut port = 10_000u16;
            while Instant::now() < stop_at {
                c.open_flows(id, "10.200.0.1", port, 1);
                port += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let t0 = Instant::now();
        let o = c.clusterctl(&["drain", "--wait", "--quiet-ms", "500", "--max-wait-s", "20"]);
        (o, t0.elapsed())
    });
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("it can be stopped"), "{out}");
    assert!(
        waited >= Duration::from_millis(1500 + 500) - Duration::from_millis(100),
        "waited for the traffic to stop and then --quiet-ms: {waited:?}"
    );
    assert!(c
        .node(id)
        .draining
        .load(std::sync::atomic::Ordering::Relaxed));

    // Another node by its id, through the node clusterctl talks to.
    let other = *c.nodes.keys().nth(1).expect("a second node");
    let draining = |n: u64| {
        c.node(n)
            .draining
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let out = c.clusterctl_ok(&["drain", &other.to_string()]);
    assert!(out.contains(&format!("node {other}: drained")), "{out}");
    assert!(draining(other));
    let out = c.clusterctl_ok(&["--output", "json", "undrain", &other.to_string()]);
    let s: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(s["node_id"], serde_json::json!(other));
    assert_eq!(s["draining"], serde_json::json!(false));
    assert!(!draining(other));
    assert!(draining(id), "the first node stays drained");
    let o = c.clusterctl(&["drain", "99"]);
    assert_eq!(o.status.code(), Some(6));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no member with node id 99"), "{err}");

    // Without a datapath there is nothing to wait for.
    let plain = Cluster::start_with(1, RaftTuning::default(), false).await;
    let o = plain.clusterctl(&["drain", "--wait"]);
    assert_eq!(o.status.code(), Some(6), "clusterctl's \"other\" failure");
    assert!(String::from_utf8_lossy(&o.stderr).contains("no datapath"));
}
