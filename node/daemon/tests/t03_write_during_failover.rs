//! t03: changes submitted while the leader dies commit exactly once or fail
//! visibly. Clients write through a follower's admin API with a request id
//! and retry (as clusterctl does); the leader is killed meanwhile. Every
//! write that reported success is in the config exactly once with the id it
//! reported; none appears twice.

use std::time::Duration;

use holdfast_node::testing::{backend, service, Cluster};
use raft_store::{Request, Response};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t03_write_during_failover_exactly_once() {
    let mut c = Cluster::start(3).await;
    c.write(service("web", "10.200.0.1", 80)).await;
    let leader = c.wait_leader(Duration::from_secs(2)).await;
    let follower = (1..=3).find(|&i| i != leader).expect("a follower");
    let other = (1..=3)
        .find(|&i| i != leader && i != follower)
        .expect("third");
    let addrs = [
        c.node(follower).cfg.admin_addr.to_string(),
        c.node(other).cfg.admin_addr.to_string(),
    ];

    let writers: Vec<_> = (0..20)
        .map(|i| {
            let addrs = addrs.to_vec();
            let client = c.client();
            tokio::task::spawn_blocking(move || {
                let req = Request {
                    id: Some(format!("t03-{i}")),
                    command: backend("web", &format!("10.1.0.{i}"), 80),
                    trace: None,
                };
                let r = client.post_retry::<_, Response>(
                    &addrs,
                    "/command",
                    &req,
                    Duration::from_secs(15),
                );
                (i, r.map_err(|e| e.to_string()))
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(30)).await;
    c.kill(leader).await;

    let mut ok = 0;
    let mut results = Vec::new();
    for w in writers {
        results.push(w.await.expect("writer"));
    }
    c.wait_converged(Duration::from_secs(10)).await;
    let state = c
        .nodes
        .values()
        .next()
        .expect("node")
        .sm
        .current()
        .state
        .clone();
    for (i, r) in results {
        let addr: std::net::IpAddr = format!("10.1.0.{i}").parse().expect("addr");
        let present: Vec<u32> = state
            .backends
            .values()
            .filter(|b| b.addr == addr)
            .map(|b| b.id)
            .collect();
        match r {
            Ok(resp) => {
                ok += 1;
                assert!(resp.rejected.is_none(), "write {i} rejected: {resp:?}");
                assert_eq!(
                    present, resp.backend_ids,
                    "write {i}: applied {present:?}, reported {:?}",
                    resp.backend_ids
                );
            }
            Err(e) => assert!(
                present.len() <= 1,
                "failed write {i} ({e}) applied {} times",
                present.len()
            ),
        }
    }
    assert_eq!(ok, 20, "all writes succeed once a new leader is up");
}
