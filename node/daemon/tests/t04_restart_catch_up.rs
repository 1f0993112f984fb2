//! t04: a node restarted from its redb files catches up: it keeps what it
//! had, receives what it missed — here through a snapshot, because the
//! leader compacted its log meanwhile — and programs the same epoch into its
//! datapath.

use std::time::Duration;

use holdfast_node::config::RaftTuning;
use holdfast_node::testing::{backend, service, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t04_restarted_node_catches_up_by_snapshot() {
    let tuning = RaftTuning {
        snapshot_logs: 10,
        max_in_snapshot_log_to_keep: 0,
        ..Default::default()
    };
    let mut c = Cluster::start_with(3, tuning, true).await;
    c.write(service("web", "10.200.0.1", 80)).await;
    c.wait_converged(Duration::from_secs(5)).await;
    let leader = c.wait_leader(Duration::from_secs(2)).await;
    let victim = (1..=3).find(|&i| i != leader).expect("follower");
    let epoch_before = c.node(victim).sm.current().state.epoch;
    c.kill(victim).await;

    for i in 0..40 {
        assert!(c
            .write(backend("web", &format!("10.2.0.{i}"), 80))
            .await
            .rejected
            .is_none());
    }
    let leader = c.wait_leader(Duration::from_secs(2)).await;
    let snap = c.node(leader).raft.metrics().borrow().snapshot;
    assert!(
        snap.is_some(),
        "the leader compacted its log into a snapshot"
    );

    let n = c.restart(victim).await;
    assert!(
        n.sm.current().state.epoch >= epoch_before,
        "restart kept the persisted state"
    );
    let epoch = c.wait_converged(Duration::from_secs(10)).await;
    assert_eq!(n.sm.current().state.backends.len(), 40);
    assert_eq!(n.sm.current().state.epoch, epoch);
    let dp = n
        .datapath
        .as_ref()
        .expect("dp")
        .dp
        .lock()
        .expect("dp")
        .applied_epoch()
        .expect("epoch");
    assert_eq!(dp, epoch);
}
