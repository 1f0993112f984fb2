//! t05: a 4th node joins through a follower (forwarded to the leader) as a
//! learner, then becomes a voter and a registered member; then a node is
//! removed: it is no longer a voter or member and the others keep working.

use std::{collections::HashSet, time::Duration};

use holdfast_api::wire::RemoveRequest;
use holdfast_node::testing::{backend, service, Cluster};
use raft_store::Response;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t05_fourth_node_joins_then_one_is_removed() {
    let mut c = Cluster::start(3).await;
    c.write(service("web", "10.200.0.1", 80)).await;
    c.add_node(4).await;
    c.wait_members(HashSet::from([1, 2, 3, 4]), Duration::from_secs(20))
        .await;
    assert_eq!(c.node(4).role(), "follower");
    c.write(backend("web", "10.0.0.1", 80)).await;
    let e = c.wait_converged(Duration::from_secs(5)).await;
    assert_eq!(c.node(4).sm.current().state.epoch, e);

    // Remove node 1 through node 3's admin API.
    let admin = vec![c.node(3).cfg.admin_addr.to_string()];
    let client = c.client();
    let r: Response = tokio::task::spawn_blocking(move || {
        client.post_retry(
            &admin,
            "/cluster/remove",
            &RemoveRequest { node_id: 1 },
            Duration::from_secs(20),
        )
    })
    .await
    .expect("join")
    .expect("remove node 1");
    assert!(r.rejected.is_none());
    c.kill(1).await;
    c.wait_members(HashSet::from([2, 3, 4]), Duration::from_secs(10))
        .await;
    assert!(c
        .write(backend("web", "10.0.0.2", 80))
        .await
        .rejected
        .is_none());
    c.wait_converged(Duration::from_secs(5)).await;
}
