//! t06: a partitioned minority cannot commit. The leader is cut off from
//! both followers: a write on it never commits and never appears; the
//! majority elects a leader and commits; after the heal the old leader
//! follows and converges on the majority's config.

use std::{collections::HashSet, time::Duration};

use holdfast_node::testing::{backend, service, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t06_minority_cannot_commit() {
    let c = Cluster::start(3).await;
    c.write(service("web", "10.200.0.1", 80)).await;
    let e0 = c.wait_converged(Duration::from_secs(5)).await;
    let old = c.wait_leader(Duration::from_secs(2)).await;
    let others: HashSet<u64> = (1..=3).filter(|&i| i != old).collect();
    c.node(old).transport.isolate(others.clone());
    for &o in &others {
        c.node(o).transport.isolate(HashSet::from([old]));
    }

    let minority = c.node(old).clone();
    let attempt = tokio::time::timeout(
        Duration::from_secs(3),
        minority.write(backend("web", "10.9.9.9", 80).into()),
    )
    .await;
    assert!(
        !matches!(attempt, Ok(Ok(_))),
        "the isolated leader committed: {attempt:?}"
    );
    assert_eq!(
        minority.sm.current().state.epoch,
        e0,
        "minority applied something"
    );

    // The majority goes on.
    let majority: Vec<u64> = others.iter().copied().collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let new = loop {
        if let Some(l) = majority.iter().find(|&&i| c.node(i).role() == "leader") {
            break *l;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "majority elected no leader"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let r = c
        .node(new)
        .write(backend("web", "10.0.0.1", 80).into())
        .await
        .expect("majority write");
    assert!(r.rejected.is_none());

    // Heal: everyone converges on the majority's config.
    for n in c.nodes.values() {
        n.transport.isolate(HashSet::new());
    }
    c.wait_leader(Duration::from_secs(10)).await;
    let e = c.wait_converged(Duration::from_secs(10)).await;
    assert_eq!(e, e0 + 1);
    let state = minority.sm.current().state.clone();
    assert!(
        state
            .backends
            .values()
            .all(|b| b.addr.to_string() != "10.9.9.9"),
        "uncommitted write appeared"
    );
    assert!(state
        .backends
        .values()
        .any(|b| b.addr.to_string() == "10.0.0.1"));
}
