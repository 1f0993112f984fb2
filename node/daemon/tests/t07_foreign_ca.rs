//! t07: a peer whose certificate comes from another CA is refused: its QUIC
//! handshakes fail (counted), it cannot join (the join fails visibly), and it
//! never becomes a voter or member.

use std::{collections::HashSet, sync::atomic::Ordering, time::Duration};

use holdfast_node::node::Node;
use holdfast_node::testing::{issue_node, make_ca, Cluster};
use raft_store::{cluster::Member, Response};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t07_foreign_certificate_is_refused() {
    let c = Cluster::start(3).await;
    let foreign_pki = c.dir.path().join("foreign-pki");
    make_ca(&foreign_pki, "other");
    issue_node(&foreign_pki, 9);
    let mut cfg = c.config(9, &foreign_pki);
    cfg.join = vec![];
    cfg.bootstrap = true; // a cluster of its own, so it only talks when asked
    let intruder = Node::start(cfg.clone()).await.expect("start foreign node");

    let admin = c.node(1).cfg.admin_addr.to_string();
    let member = Member {
        node_id: 9,
        raft_addr: cfg.raft_addr.to_string(),
        admin_addr: cfg.admin_addr.to_string(),
        bgp_next_hop: None,
    };
    // Even an admin asking the cluster to take it in does not help.
    let client = c.client();
    let res = tokio::task::spawn_blocking(move || {
        client.post::<_, Response>(&admin, "/cluster/join", &member, Duration::from_secs(20))
    })
    .await
    .expect("join task");
    assert!(
        res.is_err(),
        "a node with a foreign certificate joined: {res:?}"
    );
    let refused_by_intruder = intruder.transport.stats.refused.load(Ordering::Relaxed);
    assert!(
        refused_by_intruder > 0,
        "the intruder's endpoint saw no refused handshake"
    );

    // And the intruder calling into the cluster is refused by the cluster.
    let target = c.node(1).cfg.raft_addr;
    let r = intruder
        .transport
        .call(
            1,
            target,
            holdfast_node::raft_net::RPC_VOTE,
            b"{}",
            Duration::from_secs(2),
        )
        .await;
    assert!(r.is_err(), "cluster answered a foreign peer");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(c.node(1).transport.stats.refused.load(Ordering::Relaxed) > 0);
    c.wait_members(HashSet::from([1, 2, 3]), Duration::from_secs(10))
        .await;
    intruder.shutdown(false).await;
}
