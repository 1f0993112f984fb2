//! t11: without Kubernetes, services can come from the config file: the
//! bootstrap node's `[[service]]` entries are committed once into the new
//! cluster and reach every node (and a restart of that node does not
//! apply them again).

use std::time::{Duration, Instant};

use holdfast_node::config::SeedService;
use holdfast_node::testing::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t11_seed_services_from_the_config_file() {
    let seed = vec![SeedService {
        name: "dns".into(),
        vip: "10.200.0.53".parse().unwrap(),
        port: 53,
        proto: raft_store::cluster::Proto::Udp,
        table_size: 251,
        forwarding: Default::default(),
        backend_port: None,
        backends: vec!["10.1.0.5".parse().unwrap(), "10.1.0.6".parse().unwrap()],
        health_check: None,
        source_ranges: vec!["10.0.0.0/8".into(), "2001:db8::/32".into()],
        affinity_timeout_s: Some(600),
    }];
    let mut c =
        Cluster::start_seeded(3, Default::default(), false, Default::default(), 64, seed).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ok = c.nodes.values().all(|n| {
            let s = n.sm.current().state.clone();
            s.services.contains_key("dns") && s.backends.len() == 2
        });
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "seed services did not reach every node"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.kill(1).await;
    c.restart(1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.wait_converged(Duration::from_secs(10)).await;
    for n in c.nodes.values() {
        let s = n.sm.current().state.clone();
        assert_eq!(s.backends.len(), 2, "seed applied again on node {}", n.id());
        assert_eq!(s.services.len(), 1);
        assert_eq!(
            s.services["dns"].source_ranges,
            ["10.0.0.0/8", "2001:db8::/32"],
            "source ranges seeded on node {}",
            n.id()
        );
        assert_eq!(
            s.services["dns"].affinity_timeout_s,
            Some(600),
            "client affinity seeded on node {}",
            n.id()
        );
    }
}
