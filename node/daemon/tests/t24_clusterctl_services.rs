//! t24: a service's source ranges and client affinity through clusterctl
//! on a 3-node cluster (loopback, no datapath): `services add` with
//! `--source-ranges` and `--affinity`, `services set` changing and lifting
//! them, every node's config and `clusterctl services -o json` showing
//! them; bad values refused by clusterctl naming the flag (exit 2) and by
//! nothing changing.

use std::time::Duration;

use holdfast_node::config::RaftTuning;
use holdfast_node::testing::Cluster;

/// The service `web` as `clusterctl services -o json` lists it.
fn listed(c: &Cluster) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_str(&c.clusterctl_ok(&["services", "-o", "json"])).expect("json");
    v.as_array()
        .expect("rows")
        .iter()
        .find(|r| r["name"] == "web")
        .cloned()
        .expect("web listed")
}

/// Wait until every node's config has `web` as `check` says.
async fn wait_all(c: &Cluster, what: &str, check: impl Fn(&raft_store::cluster::Service) -> bool) {
    let t0 = std::time::Instant::now();
    loop {
        if c.nodes
            .values()
            .all(|n| n.sm.current().state.services.get("web").is_some_and(&check))
        {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{what} on every node"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t24_source_ranges_and_client_affinity_from_clusterctl() {
    let c = Cluster::start_with(3, RaftTuning::default(), false).await;
    c.wait_converged(Duration::from_secs(10)).await;
    let epoch = c.node(1).sm.current().state.epoch;
    for (args, flag) in [
        (vec!["--affinity", "0"], "--affinity"),
        (vec!["--affinity", "86401"], "--affinity"),
        (vec!["--affinity", "soon"], "--affinity"),
        (vec!["--source-ranges", "10.0.0.1/8"], "--source-ranges"),
    ] {
        let mut a = vec![
            "services",
            "add",
            "web",
            "--vip",
            "10.200.0.90",
            "--port",
            "443",
        ];
        a.extend(args.iter().copied());
        let o = c.clusterctl(&a);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{a:?}: {err}");
        assert!(err.contains(flag), "{a:?}: {err}");
    }
    assert_eq!(c.node(1).sm.current().state.epoch, epoch, "nothing changed");

    c.clusterctl_ok(&[
        "services",
        "add",
        "web",
        "--vip",
        "10.200.0.90",
        "--port",
        "443",
        "--source-ranges",
        "10.0.0.0/8,2001:db8::/32",
        "--affinity",
        "600",
    ]);
    wait_all(&c, "ranges and affinity", |s| {
        s.affinity_timeout_s == Some(600) && s.source_ranges == ["10.0.0.0/8", "2001:db8::/32"]
    })
    .await;
    let row = listed(&c);
    assert_eq!(row["affinity_timeout_s"], 600, "{row}");
    assert_eq!(row["source_ranges"][1], "2001:db8::/32", "{row}");
    let table = c.clusterctl_ok(&["services"]);
    assert!(table.contains("client 600s"), "{table}");
    assert!(table.contains("10.0.0.0/8 +1"), "{table}");

    c.clusterctl_ok(&["services", "set", "web", "--affinity", "30"]);
    wait_all(&c, "affinity 30 s", |s| s.affinity_timeout_s == Some(30)).await;
    let o = c.clusterctl(&["services", "set", "web", "--affinity", "5", "--no-affinity"]);
    assert_eq!(o.status.code(), Some(2), "conflicting flags refused");
    c.clusterctl_ok(&["services", "set", "web", "--no-affinity", "--any-source"]);
    wait_all(&c, "lifted", |s| {
        s.affinity_timeout_s.is_none() && s.source_ranges.is_empty()
    })
    .await;
    let row = listed(&c);
    assert!(row.get("affinity_timeout_s").is_none(), "{row}");
    assert!(row.get("source_ranges").is_none(), "{row}");
}

/// VIP pools with BGP attributes through clusterctl: `pools set` with
/// communities and a local preference reaches every node's config and
/// every node's export policy (what it attaches to its announcements; a
/// drained node with `drain = "graceful-shutdown"` adds 65535:0); a
/// malformed community is refused by clusterctl (exit 2) and by the
/// config, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t24_vip_pools_with_bgp_attributes_from_clusterctl() {
    let c = Cluster::start_with(3, RaftTuning::default(), false).await;
    c.wait_converged(Duration::from_secs(10)).await;
    c.clusterctl_ok(&[
        "pools",
        "set",
        "web",
        "10.200.0.0/24",
        "--community",
        "65000:100",
        "--community",
        "65000:1:2",
        "--local-pref",
        "200",
    ]);
    let v: serde_json::Value =
        serde_json::from_str(&c.clusterctl_ok(&["pools", "-o", "json"])).expect("json");
    assert_eq!(
        v,
        serde_json::json!([{"name": "web", "cidr": "10.200.0.0/24",
            "communities": ["65000:100", "65000:1:2"], "local_pref": 200}])
    );
    let t0 = std::time::Instant::now();
    while !c.nodes.values().all(|n| {
        n.export_policy().is_some_and(|p| {
            p.pools.len() == 1
                && p.pools[0].local_pref == Some(200)
                && p.pools[0].communities.len() == 2
                && !p.graceful_shutdown
        })
    }) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "every node's policy"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let table = c.clusterctl_ok(&["pools"]);
    assert!(
        table.contains("65000:100 65000:1:2") && table.contains("200"),
        "{table}"
    );

    // Malformed: refused naming the flag, nothing written.
    for bad in ["70000:1", "65000", "a:b", "1:2:3:4", "65000:-1"] {
        let o = c.clusterctl(&["pools", "set", "web", "10.200.0.0/24", "--community", bad]);
        assert_eq!(o.status.code(), Some(2), "{bad}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("--community") && err.contains(bad),
            "{bad}: {err}"
        );
    }
    // The config itself refuses one that got past a client.
    let r = c
        .write(raft_store::Command::PutVipPool {
            pool: raft_store::cluster::VipPool {
                name: "web".into(),
                cidr: "10.200.0.0/24".into(),
                communities: vec!["65536:1".into()],
                local_pref: None,
            },
        })
        .await;
    let why = r.rejected.expect("refused");
    assert!(
        why.contains("pool web: communities") && why.contains("65536:1"),
        "{why}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&c.clusterctl_ok(&["pools", "-o", "json"])).expect("json");
    assert_eq!(
        v[0]["communities"],
        serde_json::json!(["65000:100", "65000:1:2"])
    );

    c.clusterctl_ok(&["pools", "remove", "web"]);
    let v: serde_json::Value =
        serde_json::from_str(&c.clusterctl_ok(&["pools", "-o", "json"])).expect("json");
    assert_eq!(v, serde_json::json!([]));
}
