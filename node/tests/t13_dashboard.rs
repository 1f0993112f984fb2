//! t13: every metric the Grafana dashboard (deploy/grafana) queries is
//! exported by a running node with a datapath, a service and replication:
//! a renamed metric breaks this test, not a dashboard in production.

use std::{collections::BTreeSet, time::Duration};

use node::testing::{backend, service, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t13_dashboard_metrics_exist() {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/grafana/holdfast-dashboard.json"),
    )
    .expect("dashboard");
    let d: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let mut used = BTreeSet::new();
    for p in d["panels"].as_array().expect("panels") {
        assert!(p["title"].as_str().is_some_and(|t| !t.is_empty()));
        for t in p["targets"].as_array().expect("targets") {
            let e = t["expr"].as_str().expect("expr");
            let mut rest = e;
            while let Some(i) = rest.find("holdfast_") {
                let tail = &rest[i..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                let mut name = &tail[..end];
                for suffix in ["_bucket", "_sum", "_count"] {
                    name = name.strip_suffix(suffix).unwrap_or(name);
                }
                used.insert(name.to_string());
                rest = &tail[end..];
            }
        }
    }
    assert!(used.len() >= 10, "{used:?}");

    let c = Cluster::start(1).await;
    c.write(service("web", "10.200.0.9", 80)).await;
    c.write(backend("web", "10.1.0.9", 80)).await;
    c.wait_converged(Duration::from_secs(10)).await;
    let admin = c.node(1).cfg.admin_addr.to_string();
    let metrics = tokio::task::spawn_blocking(move || {
        ureq::get(&format!("http://{admin}/metrics"))
            .call()
            .expect("GET /metrics")
            .body_mut()
            .read_to_string()
            .expect("body")
    })
    .await
    .expect("task");
    let exported: BTreeSet<&str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    // BGP is off in this cluster: its gauge is absent by design.
    let missing: Vec<&String> = used
        .iter()
        .filter(|m| m.as_str() != "holdfast_bgp_announced" && !exported.contains(m.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics nobody exports: {missing:?}"
    );
}
