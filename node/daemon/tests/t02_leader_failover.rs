//! t02: killing the leader elects a new one within 2 s, and no committed
//! command is lost: the new leader's config holds every change committed
//! before, and the cluster keeps accepting writes.

use std::time::{Duration, Instant};

use holdfast_node::testing::{backend, service, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t02_kill_leader_new_leader_no_loss() {
    let mut c = Cluster::start(3).await;
    c.write(service("web", "10.200.0.1", 80)).await;
    for i in 1..=10 {
        let r = c.write(backend("web", &format!("10.0.0.{i}"), 80)).await;
        assert!(r.rejected.is_none());
    }
    let before = c.wait_converged(Duration::from_secs(5)).await;
    let state_before = c
        .node(c.wait_leader(Duration::from_secs(2)).await)
        .sm
        .current()
        .state
        .clone();

    let old = c.wait_leader(Duration::from_secs(2)).await;
    let t0 = Instant::now();
    c.kill(old).await;
    let new = c.wait_leader(Duration::from_secs(5)).await;
    let took = t0.elapsed();
    assert_ne!(new, old);
    eprintln!("t02: new leader {new} after {took:?}");
    assert!(took <= Duration::from_secs(2), "new leader after {took:?}");

    let after = c.node(new).sm.current().state.clone();
    assert_eq!(after.epoch, before);
    assert_eq!(
        after.backends, state_before.backends,
        "committed backends lost"
    );
    assert!(c
        .write(backend("web", "10.0.1.1", 80))
        .await
        .rejected
        .is_none());
    let e = c.wait_converged(Duration::from_secs(5)).await;
    assert_eq!(e, before + 1);
}
